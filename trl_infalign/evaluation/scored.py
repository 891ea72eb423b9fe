"""Win rates and KL from samples generated and scored elsewhere (vLLM, an API, ...): :func:`inference_win_rate` for
one procedure, :func:`evaluate_scored` for a whole sweep (procedures, deployments that name rewards, KL)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..deployment import Deployment
from ..procedures import PROCEDURES, InferenceProcedure
from .estimators import _as_paired_rewards, _bootstrap_mean_ci, _min_valid_samples, _per_prompt_kl
from .planning import DEFAULT_NS, ProcedureLike, _resolve_plan, _resolve_procedure, bind_deployment, split_deployments
from .results import ROW_KEYS, DeploymentResult, EvaluationResult, WinRateResult


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


def _as_rewards_by_reward(policy, reference) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{reward name: (policy (P, m), reference (P, m'))} from the two per-reward mappings, checked to name the same
    rewards and cover the same P prompts."""
    if policy is None and reference is None:
        return {}
    fields = ("policy_rewards_by_reward", "reference_rewards_by_reward")
    if policy is None or reference is None:
        raise ValueError(f"Give both {fields[0]} and {fields[1]} ({{reward name: (num_prompts, num_samples)}}), or "
                         "neither.")
    for name, value in zip(fields, (policy, reference)):
        if not isinstance(value, Mapping) or not value:
            raise ValueError(f"{name} must be a non-empty mapping {{reward name: (num_prompts, num_samples) scores}}, "
                             f"got {type(value).__name__}.")
    if set(policy) != set(reference):
        raise ValueError(
            f"{fields[0]} names rewards {list(policy)} but {fields[1]} names {list(reference)}: both sides must be "
            "scored by the same reward functions."
        )
    out = {}
    for reward in policy:
        out[str(reward)] = _as_paired_rewards(policy[reward], reference[reward],
                                              names=(f"{fields[0]}[{reward!r}]", f"{fields[1]}[{reward!r}]"))
    prompts = {reward: a.shape[0] for reward, (a, _) in out.items()}
    if len(set(prompts.values())) > 1:
        raise ValueError(f"The per-reward scores cover different numbers of prompts ({prompts}): every reward must "
                         "score the same prompts' samples.")
    return out


def _deployment_result(deployment: Deployment, rewards_by_reward: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                       num_bootstrap: int, confidence: float, seed: int) -> DeploymentResult:
    """W_j of each component on its own reward's scores (both sides), and Σ_j w_j W_j(x) per prompt; every interval
    from the same bootstrap resamples (same seed and prompts), so the deployment's is paired with the components'."""
    components = [
        (c, _win_rate_of(c.procedure, *rewards_by_reward[c.reward], num_bootstrap=num_bootstrap,
                         confidence=confidence, seed=seed))
        for c in deployment.components
    ]
    per_prompt = np.sum([c.weight * r.per_prompt for c, r in components], axis=0)
    low, high = _bootstrap_mean_ci(per_prompt, num_bootstrap, confidence, seed)
    return DeploymentResult(deployment=deployment, objective=float(per_prompt.mean()), ci_low=low, ci_high=high,
                            per_prompt=per_prompt, components=components, confidence=confidence)


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
    policy_rewards_by_reward: Mapping[str, Any] | None = None,
    reference_rewards_by_reward: Mapping[str, Any] | None = None,
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

    Deployments that name rewards (``"mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"``, or a
    :class:`~trl_infalign.deployment.Deployment`) are entries of `procedures` too. They need each reward's own scores
    of the same samples: `policy_rewards_by_reward` / `reference_rewards_by_reward`, {reward name: (P, m) / (P, m')}.
    Component j (weight w_j, procedure P_j, reward r_j) is judged on r_j's scores only, on both sides: W_j is P_j's
    win rate there, and the deployment's is Σ_j w_j W_j (:class:`DeploymentResult`, in `result.deployments`). A
    component without ``@`` uses the only reward. `policy_rewards` / `reference_rewards` are what the other
    procedures compare (one reward, or the rewards' weighted sum); they may be None when every entry is a deployment.
    """
    ordinary, deployments = split_deployments(procedures)
    by_reward = _as_rewards_by_reward(policy_rewards_by_reward, reference_rewards_by_reward)
    if policy_rewards is None and reference_rewards is None:
        if ordinary or not by_reward:
            raise ValueError(
                f"policy_rewards and reference_rewards are None, but procedures {[str(p) for p in ordinary]} compare "
                "them: give the (num_prompts, num_samples) rewards (one reward, or the rewards' weighted sum); only "
                "deployments that name rewards can do without."
            )
        a = b = None
    else:
        a, b = _as_paired_rewards(policy_rewards, reference_rewards)
    deployments = [bind_deployment(d, list(by_reward)) for d in deployments]
    first = a if a is not None else next(iter(by_reward.values()))[0]
    num_prompts = first.shape[0]
    for reward, (ra, _) in by_reward.items():
        if ra.shape[0] != num_prompts:
            raise ValueError(f"policy_rewards_by_reward[{reward!r}] has {ra.shape[0]} prompts but policy_rewards has "
                             f"{num_prompts}: every score matrix must cover the same prompts in the same order.")
    used = [t for reward in dict.fromkeys(r for d in deployments for r in d.rewards) for t in by_reward[reward]]
    max_n = _min_valid_samples(a, b) if a is not None else _min_valid_samples(*used)
    plans, deployments = _resolve_plan(
        ns, ordinary + deployments, max_n, deployment_max_n=_min_valid_samples(*used) if used else None,
        fix="give at least N valid (non-NaN) samples per prompt on both sides (m >= N)",
    )
    results = [_win_rate_of(p.procedure, a, b, num_bootstrap=num_bootstrap, confidence=confidence, seed=seed)
               for p in plans]
    out = EvaluationResult(
        win_rates=[{k: r.to_dict()[k] for k in ROW_KEYS} for r in results],
        num_prompts=num_prompts, num_samples_policy=first.shape[1],
        num_samples_reference=(b if b is not None else next(iter(by_reward.values()))[1]).shape[1],
        confidence=confidence, num_bootstrap=num_bootstrap, metadata=dict(metadata or {}), results=results,
        deployments=[_deployment_result(d, by_reward, num_bootstrap=num_bootstrap, confidence=confidence, seed=seed)
                     for d in deployments],
    )
    if (policy_logps is None) != (reference_logps is None):
        raise ValueError("Give both policy_logps and reference_logps (log π and log π_ref of the policy samples), or neither.")
    if policy_logps is not None:
        # Mean of per-prompt means: the prompt is the bootstrap unit, as for the win rates.
        per_k1, per_k3 = _per_prompt_kl(policy_logps, reference_logps, num_prompts)
        out.kl_k1, out.kl_k3 = float(per_k1.mean()), float(per_k3.mean())
        out.kl_k1_per_prompt, out.kl_k3_per_prompt = per_k1, per_k3
        out.kl_k1_ci = _bootstrap_mean_ci(per_k1, num_bootstrap, confidence, seed)
        out.kl_k3_ci = _bootstrap_mean_ci(per_k3, num_bootstrap, confidence, seed)
    return out
