"""Sub-commands of the `trl-infalign` CLI (see `trl_infalign/cli.py`), and the argument types they share."""

import argparse
import math


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def top_p_value(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] (1 = no nucleus truncation), got {text!r}")
    return value


def top_k_value(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0 = no top-k truncation), got {text!r}")
    return value


def procedure_spec(text: str) -> str:
    """argparse type: an inference-procedure spec (standard, bon, won, bon:n=8, mixture:0.5*standard+0.5*bon:n=4,
    or a registered name), checked here so a typo fails at parse time."""
    from ..procedures import get_procedure

    try:
        get_procedure(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def resolve_procedure(spec: str, n: int | None):
    """The procedure of `--procedure SPEC [--n N]`: a bare bon / won takes N from --n (default 4), standard is one
    sample, a spec with its own N (bon:n=8, a mixture) must not get a different --n."""
    from ..procedures import get_procedure

    bare = ":" not in spec
    procedure = get_procedure(spec, (4 if n is None else n) if bare else None)
    if not bare and n is not None and n != procedure.n:
        raise ValueError(f"--n {n} conflicts with --procedure {spec!r}, which draws {procedure.n} samples: drop --n.")
    return procedure
