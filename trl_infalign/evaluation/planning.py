"""Which win rates to evaluate: procedure specs resolved to objects, bare names expanded over N, deployments that
name rewards (``mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless``) set apart and bound to the reward functions'
names, and the ones that need more samples per prompt than there are dropped with a warning naming them."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from ..deployment import Deployment, DeploymentComponent, get_deployment, is_multi_reward_spec
from ..procedures import InferenceProcedure, ProcedureError, get_procedure

DEFAULT_NS = (1, 2, 4, 8, 16, 32)

#: What a `procedures` entry may be: a spec string ("bon", "bon:n=8", "mixture:...", a registered name) or an object.
ProcedureLike = Union[str, InferenceProcedure, Deployment]


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
    if isinstance(procedures, (str, InferenceProcedure, Deployment)):
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


def _describe_needs(plans: Sequence[PlannedWinRate], deployments: Sequence[Deployment] = ()) -> str:
    """"N = [16, 32]" for expanded entries, "mixture:... (needs 16)" for specs with their own N, "deployment
    bon:n=4@a (needs 4)" for deployments."""
    parts = []
    ns = sorted({p.n for p in plans if p.n is not None})
    if ns:
        parts.append(f"N = {ns}")
    own = [f"{p.procedure.spec} (needs {p.procedure.min_samples})" for p in plans if p.n is None]
    own += [f"deployment {d.spec} (needs {deployment_min_samples(d)})" for d in deployments]
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


def split_deployments(procedures: Sequence[ProcedureLike] | ProcedureLike) -> tuple[list, list[Deployment]]:
    """(procedures, deployments): entries that name rewards — a spec with ``@reward``
    (``"mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"``) or a :class:`~trl_infalign.deployment.Deployment` whose
    components name rewards — are deployments, each judged component by component on its own reward; every other
    entry is an ordinary procedure, judged on the one (weighted-sum) reward. A deployment without reward names counts
    as its procedure. Duplicate deployments (same spec) are dropped; the order is kept."""
    ordinary, deployments, seen = [], [], set()
    for entry in _as_procedure_list(procedures):
        if isinstance(entry, Deployment):
            if not entry.is_multi_reward:
                ordinary.append(entry.procedure)
                continue
            deployment = entry
        elif is_multi_reward_spec(entry):
            deployment = get_deployment(entry)
        else:
            ordinary.append(entry)
            continue
        if deployment.spec not in seen:
            seen.add(deployment.spec)
            deployments.append(deployment)
    return ordinary, deployments


def deployment_min_samples(deployment: Deployment) -> int:
    """Samples per prompt a deployment needs on each side: the most any of its components' procedures needs."""
    return max(c.procedure.min_samples for c in deployment.components)


def bind_deployment(deployment: Deployment, reward_names: Sequence[str]) -> Deployment:
    """`deployment` with every component's reward checked against the reward functions' names (as TRL derives them:
    a callable's ``__name__``, a model path's last segment); a component without ``@`` gets the only reward.

    Unlike :meth:`Deployment.bind` (training), reward functions that no component names are allowed: an evaluation
    may judge several deployments, and ordinary procedures, on the same samples."""
    names = list(reward_names)
    if not names:
        raise ValueError(
            f"Deployment {deployment.spec!r} judges its components on rewards {list(deployment.rewards)}, but no "
            "per-reward scores were given: pass each reward function's scores by name (evaluate_scored's "
            "policy_rewards_by_reward / reference_rewards_by_reward, {reward name: (num_prompts, num_samples)})."
        )
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(
            f"Reward functions share the name(s) {duplicated} (all names: {names}), so the deployment "
            f"{deployment.spec!r} cannot tell them apart: give each reward function a distinct name (a callable's "
            "__name__, e.g. via functools.wraps; a model path's last segment)."
        )
    if None in deployment.rewards:
        unnamed = [c.procedure.spec for c in deployment.components if c.reward is None]
        if len(names) != 1:
            raise ProcedureError(
                f"Deployment {deployment.spec!r}: component(s) {unnamed} name no reward, and there are {len(names)} "
                f"reward functions ({names}): add '@name' to each."
            )
        deployment = Deployment([DeploymentComponent(c.weight, c.procedure, c.reward or names[0])
                                 for c in deployment.components])
    unknown = [r for r in deployment.rewards if r not in names]
    if unknown:
        raise ProcedureError(
            f"Deployment {deployment.spec!r} names reward(s) {unknown}, but the reward functions are named {names}. "
            "Use those names after '@' (a callable's __name__, a model path's last segment), or rename a callable "
            "(e.g. functools.wraps / setting __name__)."
        )
    return deployment


def _resolve_plan(
    ns: Sequence[int], procedures: Sequence[ProcedureLike] | ProcedureLike, max_n: int, *, fix: str | None = None,
    deployment_max_n: int | None = None, stacklevel: int = 3,
) -> tuple[list[PlannedWinRate], list[Deployment]]:
    """The win rates (:func:`plan_procedures`) and deployments (:func:`split_deployments`) to evaluate. Those that need
    more than `max_n` samples per prompt (`deployment_max_n` for deployments, default `max_n`) are dropped with a
    :class:`SkippedNWarning` naming them and `fix`.

    Raises a ValueError (naming the dropped ones and `fix`) when nothing is left to evaluate.
    """
    ordinary, deployments = split_deployments(procedures)
    plans = plan_procedures(ordinary, ns) if ordinary else []
    kept, dropped = split_by_samples(plans, max_n)
    deployment_max_n = max_n if deployment_max_n is None else deployment_max_n
    kept_d = [d for d in deployments if deployment_min_samples(d) <= deployment_max_n]
    dropped_d = [d for d in deployments if deployment_min_samples(d) > deployment_max_n]
    names = [str(p) for p in _as_procedure_list(procedures)]
    requested = sorted({int(n) for n in ns})
    if fix is None:
        need = max([p.procedure.min_samples for p in plans] + [deployment_min_samples(d) for d in deployments] + [1])
        fix = f"give at least {need} valid samples per prompt on both sides"
    # the samples per prompt that the dropped entries lacked (the deployments' count is over their own rewards)
    available = min([max_n] * bool(dropped) + [deployment_max_n] * bool(dropped_d) or [max_n])
    if not kept and not kept_d:
        if not dropped and not dropped_d:
            raise ValueError(f"Nothing to evaluate: procedures={names} with ns={requested} gives no win rate (a bare "
                             "name such as 'bon' is evaluated at every N of ns: give ns, or a spec such as 'bon:n=4').")
        raise ValueError(
            f"Nothing to evaluate: procedures={names}, ns={requested}, but {_describe_needs(dropped, dropped_d)} need "
            f"more than the {available} samples per prompt available (a procedure drawing N samples per request "
            f"needs N <= m). Fix: {fix}, or lower N."
        )
    if dropped or dropped_d:
        evaluating = [p.procedure.spec for p in kept] + [d.spec for d in kept_d]
        warnings.warn(
            f"Skipping {_describe_needs(dropped, dropped_d)}: only {available} samples per prompt are available, and "
            "a procedure drawing N samples per request needs at least N samples per prompt (evaluating "
            f"{', '.join(evaluating)}). Fix: {fix}.",
            SkippedNWarning,
            stacklevel=stacklevel,
        )
    return kept, kept_d


def _resolve_ns(
    ns: Sequence[int], procedures: Sequence[ProcedureLike] | ProcedureLike, max_n: int, *, fix: str | None = None,
    stacklevel: int = 3,
) -> list[PlannedWinRate]:
    """The win rates of :func:`_resolve_plan` (procedures without deployments)."""
    return _resolve_plan(ns, procedures, max_n, fix=fix, stacklevel=stacklevel + 1)[0]
