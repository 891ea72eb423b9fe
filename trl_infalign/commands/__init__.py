"""Sub-commands of the `trl-infalign` CLI (see `trl_infalign/cli.py`), and the argument types they share."""

import argparse
import math


def number_type(name: str, convert, valid, expected: str, *, unparsable: str | None = None, note: str = ""):
    """An argparse type named `name`: `convert(text)` (int or float), which must satisfy `valid(value)`.

    Errors say what was expected: "expected {unparsable or expected}, got 'x'" when the text is not a number,
    "expected {expected}{note}, got 'x'" when it is out of range."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {unparsable or expected}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}{note}, got {text!r}")
        return value

    parse.__name__ = parse.__qualname__ = name  # argparse names the type in its own messages
    parse.__doc__ = f"argparse type: {expected}."
    return parse


positive_int = number_type("positive_int", int, lambda v: v >= 1, "an integer >= 1", unparsable="an integer")
positive_float = number_type("positive_float", float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0",
                             unparsable="a number")
nonnegative_float = number_type("nonnegative_float", float, lambda v: math.isfinite(v) and v >= 0,
                                "a finite number >= 0", unparsable="a number >= 0")
top_p_value = number_type("top_p_value", float, lambda v: 0 < v <= 1, "a number in (0, 1]",
                          note=" (1 = no nucleus truncation)")
top_k_value = number_type("top_k_value", int, lambda v: v >= 0, "an integer >= 0", note=" (0 = no top-k truncation)")


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
