"""Win rates and KL from samples generated and scored elsewhere (vLLM, an API, ...): :func:`inference_win_rate` for
one procedure, :func:`evaluate_scored` for a whole sweep."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..procedures import PROCEDURES, InferenceProcedure
from .estimators import _as_paired_rewards, _bootstrap_mean_ci, _min_valid_samples, _per_prompt_kl
from .planning import DEFAULT_NS, ProcedureLike, _resolve_ns, _resolve_procedure
from .results import ROW_KEYS, EvaluationResult, WinRateResult


def _win_rate_of(procedure: InferenceProcedure, a: torch.Tensor, b: torch.Tensor, *, num_bootstrap: int,
                 confidence: float, seed: int) -> WinRateResult:
    per_prompt = procedure.per_prompt_win_rates(a, b).numpy()
    low, high = _bootstrap_mean_ci(per_prompt, num_bootstrap, confidence, seed)
    return WinRateResult(
        estimate=float(per_prompt.mean()), ci_low=low, ci_high=high, per_prompt=per_prompt, n=procedure.n,
        procedure=procedure.name, num_prompts=len(per_prompt), confidence=confidence, spec=procedure.spec,
        unbiased=bool(procedure.unbiased), inference_procedure=procedure,
    )


def inference_win_rate(
    policy_rewards,
    reference_rewards,
    n: int | None = None,
    procedure: ProcedureLike = "bon",
    *,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> WinRateResult:
    """Win rate of a policy against its reference under an inference procedure, from scored samples (notes §3).

    Args:
        policy_rewards: (P, m_policy) rewards of m_policy samples of the policy for each of P prompts (numpy, torch or
            nested lists). NaN marks a missing sample; every row must keep at least `procedure.min_samples` (N) valid
            values.
        reference_rewards: (P, m_reference) rewards of the reference policy's samples for the same prompts.
        n: N of a bare procedure name (`inference_win_rate(a, b, 4, "bon")`). Ignored for "standard", which is
            N = 1 (the result has `n == 1`); not needed for a spec with its own N ("bon:n=8", "mixture:...").
        procedure: a spec — "standard" (one sample each), "bon" / "won" (best / worst of N each), "bon:n=8",
            "mixture:0.5*standard+0.5*bon:n=4", a registered user procedure — or an `InferenceProcedure`.
        num_bootstrap: bootstrap resamples of the prompts for the CI (0: no CI, NaN bounds).
        confidence: CI level. seed: bootstrap seed.

    Returns:
        :class:`WinRateResult` — `estimate` = mean over prompts of P(X_π > X_ref) + ½ P(X_π = X_ref), computed exactly
        over all N-subsets of both sides' samples (Σ_j w_j of the components' for a mixture; the plug-in estimate,
        `unbiased=False`, for a non-polynomial user procedure); `ci_low`/`ci_high` the percentile bootstrap interval.
    """
    proc = _resolve_procedure(procedure, n)
    a, b = _as_paired_rewards(policy_rewards, reference_rewards)
    return _win_rate_of(proc, a, b, num_bootstrap=num_bootstrap, confidence=confidence, seed=seed)


def evaluate_scored(
    policy_rewards,
    reference_rewards,
    ns: Sequence[int] = DEFAULT_NS,
    procedures: Sequence[ProcedureLike] | ProcedureLike = PROCEDURES,
    policy_logps=None,
    reference_logps=None,
    *,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    metadata: dict | None = None,
) -> EvaluationResult:
    """Win rates (and KL, if log-probs are given) from samples generated and scored elsewhere (vLLM, an API, ...).

    `policy_rewards` (P, m), `reference_rewards` (P, m'); `policy_logps` / `reference_logps` (P, m): log π(y) and
    log π_ref(y) of the *policy* samples (same layout as `policy_rewards`), each the **sum over the completion's
    tokens**, so that the KL comes out per completion, in nats (see :class:`EvaluationResult`).

    `procedures`: "standard" (evaluated once, N = 1), "bon" / "won" (at every N of `ns`), and full specs evaluated
    once at their own N — "bon:n=8", "won:n=16", "mixture:0.5*standard+0.5*bon:n=4", registered user procedures,
    `InferenceProcedure` instances. A win rate whose procedure needs more samples (`min_samples`) than the smallest
    per-prompt valid count (on either side) is skipped with a :class:`SkippedNWarning` naming it; a ValueError if
    nothing is left.
    """
    a, b = _as_paired_rewards(policy_rewards, reference_rewards)
    max_n = _min_valid_samples(a, b)
    plans = _resolve_ns(ns, procedures, max_n,
                        fix="give at least N valid (non-NaN) samples per prompt on both sides (m >= N)")
    results = [_win_rate_of(p.procedure, a, b, num_bootstrap=num_bootstrap, confidence=confidence, seed=seed)
               for p in plans]
    out = EvaluationResult(
        win_rates=[{k: r.to_dict()[k] for k in ROW_KEYS} for r in results],
        num_prompts=a.shape[0], num_samples_policy=a.shape[1], num_samples_reference=b.shape[1],
        confidence=confidence, num_bootstrap=num_bootstrap, metadata=dict(metadata or {}), results=results,
    )
    if (policy_logps is None) != (reference_logps is None):
        raise ValueError("Give both policy_logps and reference_logps (log π and log π_ref of the policy samples), or neither.")
    if policy_logps is not None:
        # Mean of per-prompt means: the prompt is the bootstrap unit, as for the win rates.
        per_k1, per_k3 = _per_prompt_kl(policy_logps, reference_logps, a.shape[0])
        out.kl_k1, out.kl_k3 = float(per_k1.mean()), float(per_k3.mean())
        out.kl_k1_per_prompt, out.kl_k3_per_prompt = per_k1, per_k3
        out.kl_k1_ci = _bootstrap_mean_ci(per_k1, num_bootstrap, confidence, seed)
        out.kl_k3_ci = _bootstrap_mean_ci(per_k3, num_bootstrap, confidence, seed)
    return out

