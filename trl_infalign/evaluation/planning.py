"""Which win rates to evaluate: procedure specs resolved to objects, bare names expanded over N, and the ones that
need more samples per prompt than there are dropped with a warning naming them."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from ..procedures import InferenceProcedure, ProcedureError, get_procedure

DEFAULT_NS = (1, 2, 4, 8, 16, 32)

#: What a `procedures` entry may be: a spec string ("bon", "bon:n=8", "mixture:...", a registered name) or an object.
ProcedureLike = Union[str, InferenceProcedure]


class SkippedNWarning(UserWarning):
    """Some requested N were dropped because there are fewer than N samples per prompt (N must be <= m)."""


def _check_n_value(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}.")
    return int(n)


@functools.lru_cache(maxsize=None)
def _name_takes_n(name: str) -> bool:
    """Whether the bare spec `name` is a family parameterised by N (``get_procedure(name, n)`` depends on n)."""
    return get_procedure(name, 1) != get_procedure(name, 2)


def _expands_over_n(procedure: ProcedureLike) -> bool:
    """True for a bare name of a procedure family parameterised by N ("bon", "won"): it is evaluated at every N of
    `ns`. Specs with their own parameters, "standard" and instances are evaluated once."""
    if not isinstance(procedure, str) or ":" in procedure:
        return False
    try:
        return _name_takes_n(procedure.strip())
    except ProcedureError:
        return False


def _n_family(procedure: InferenceProcedure) -> str | None:
    """The family name when `procedure` is exactly its family's member at its N (BestOfN(8) is "bon" at N = 8), else
    None (mixtures, standard, user procedures with other parameters)."""
    if not _expands_over_n(procedure.name):
        return None
    try:
        return procedure.name if get_procedure(procedure.name, procedure.n) == procedure else None
    except ProcedureError:
        return None


def _resolve_procedure(procedure: ProcedureLike, n=None) -> InferenceProcedure:
    """The procedure object of (`procedure`, `n`): ``("bon", 4)`` → Best-of-4; ``("standard", 4)`` → standard (N is
    one sample); a spec with its own N or an instance is taken as is (a conflicting `n` raises)."""
    if n is not None:
        n = _check_n_value(n)
    if n is None and _expands_over_n(procedure):
        raise ValueError(
            f"procedure {procedure!r} needs its N: pass n= (e.g. n=4) or give a full spec such as {f'{procedure}:n=4'!r}."
        )
    return get_procedure(procedure, n)


def _as_procedure_list(procedures) -> list:
    if isinstance(procedures, (str, InferenceProcedure)):
        return [procedures]
    procedures = list(procedures)
    if not procedures:
        raise ValueError("procedures is empty: give e.g. ('standard', 'bon', 'won') or a spec such as 'bon:n=8'.")
    return procedures


@dataclass(frozen=True)
class PlannedWinRate:
    """One win rate to evaluate: the procedure object and, when it came from expanding a bare name over `ns`, that N."""

    procedure: InferenceProcedure
    n: int | None = None  # the N of `ns` it was expanded at (None: a spec with its own N, evaluated once)


def plan_procedures(procedures: Sequence[ProcedureLike] | ProcedureLike, ns: Sequence[int] = ()) -> list[PlannedWinRate]:
    """Expand `procedures` over `ns`: a bare name of an N-family ("bon", "won") gives one entry per N (sorted), any
    other spec or instance one entry; duplicates (same spec) are dropped, the order of `procedures` is kept."""
    procedures = _as_procedure_list(procedures)
    ns = sorted({_check_n_value(n) for n in ns})
    out: list[PlannedWinRate] = []
    seen: set[str] = set()
    for spec in procedures:
        if _expands_over_n(spec):
            items = [PlannedWinRate(get_procedure(spec.strip(), n), n) for n in ns]
        else:
            items = [PlannedWinRate(get_procedure(spec))]
        for item in items:
            if item.procedure.spec not in seen:
                seen.add(item.procedure.spec)
                out.append(item)
    return out


def _describe_needs(plans: Sequence[PlannedWinRate]) -> str:
    """"N = [16, 32]" for expanded entries, "mixture:... (needs 16)" for specs with their own N."""
    parts = []
    ns = sorted({p.n for p in plans if p.n is not None})
    if ns:
        parts.append(f"N = {ns}")
    own = [f"{p.procedure.spec} (needs {p.procedure.min_samples})" for p in plans if p.n is None]
    if own:
        parts.append(", ".join(own))
    return " and ".join(parts)


def split_by_samples(plans: Sequence[PlannedWinRate], max_n: int) -> tuple[list[PlannedWinRate], list[PlannedWinRate]]:
    """(kept, dropped): entries whose procedure needs more than `max_n` samples per prompt (`min_samples`) are dropped."""
    kept = [p for p in plans if p.procedure.min_samples <= max_n]
    dropped = [p for p in plans if p.procedure.min_samples > max_n]
    return kept, dropped


def metric_name(procedure: ProcedureLike, n: int | None = None) -> str:
    """Key of a win rate in flat metric dicts, the procedure's `metric_key`: `standard_win_rate`, `bon@4_win_rate`,
    `won@8_win_rate`, `mixture(0.5*standard+0.5*bon@4)_win_rate`. `n` is the N of a bare name ("bon", 4)."""
    return _resolve_procedure(procedure, n).metric_key


def _resolve_ns(
    ns: Sequence[int], procedures: Sequence[ProcedureLike] | ProcedureLike, max_n: int, *, fix: str | None = None,
    stacklevel: int = 3,
) -> list[PlannedWinRate]:
    """The win rates to evaluate (:func:`plan_procedures`); those whose procedure needs more than `max_n` samples per
    prompt (`min_samples`) are dropped with a :class:`SkippedNWarning` naming them and `fix`.

    Raises a ValueError (naming the dropped ones and `fix`) when nothing is left to evaluate.
    """
    plans = plan_procedures(procedures, ns)
    kept, dropped = split_by_samples(plans, max_n)
    names = [str(p) for p in _as_procedure_list(procedures)]
    requested = sorted({int(n) for n in ns})
    if fix is None:
        need = max([p.procedure.min_samples for p in plans] or [1])
        fix = f"give at least {need} valid samples per prompt on both sides"
    if not kept:
        if not dropped:
            raise ValueError(f"Nothing to evaluate: procedures={names} with ns={requested} gives no win rate (a bare "
                             "name such as 'bon' is evaluated at every N of ns: give ns, or a spec such as 'bon:n=4').")
        raise ValueError(
            f"Nothing to evaluate: procedures={names}, ns={requested}, but {_describe_needs(dropped)} need more than "
            f"the {max_n} samples per prompt available (a procedure drawing N samples per request needs N <= m). "
            f"Fix: {fix}, or lower N."
        )
    if dropped:
        warnings.warn(
            f"Skipping {_describe_needs(dropped)}: only {max_n} samples per prompt are available, and a procedure "
            f"drawing N samples per request needs at least N samples per prompt (evaluating "
            f"{', '.join(p.procedure.spec for p in kept)}). Fix: {fix}.",
            SkippedNWarning,
            stacklevel=stacklevel,
        )
    return kept
