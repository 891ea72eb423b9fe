r"""The estimators: pure tensor code on scored samples (notes §3, §6).

- Win rates: for a prompt with scores a_1..a_m (policy) and b_1..b_m' (reference), the procedure's win probability
  P(X_π > X_ref) + ½ P(X_π = X_ref), computed by the procedure object
  (:meth:`~trl_infalign.procedures.InferenceProcedure.per_prompt_win_rates`). For BoN-N it is the *all-subsets*
  average over every N-subset of both sides of 1[max A > max B] + ½·1[max A = max B], in O(m log m) from the order
  statistics: the max of a uniformly random N-subset of m sorted values is the j-th smallest with probability
  C(j−1, N−1)/C(m, N) (the min: C(m−j, N−1)/C(m, N); :meth:`~trl_infalign.procedures.InferenceProcedure.rank_weights`).
- KL per completion from log-probs of policy samples: k1 = log π − log π_ref, k3 = (ρ − 1) − log ρ with ρ = π_ref/π.
- Percentile bootstrap over prompts. The resamples depend only on (seed, number of prompts, num_bootstrap), so every
  interval of one evaluation — each win rate, a deployment's objective, the KL — is computed on the same resamples of
  prompts: they are paired.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .planning import ProcedureLike, _resolve_procedure


def _as_2d_float(values, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        t = values.detach().to("cpu", torch.float64)
    else:
        try:
            t = torch.as_tensor(np.asarray(values, dtype=np.float64))
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{name} must be a rectangular (num_prompts, num_samples) array of numbers (use NaN for missing "
                f"samples): {e}"
            ) from None
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape (num_prompts, num_samples), got shape {tuple(t.shape)}.")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has no prompts (shape {tuple(t.shape)}).")
    if torch.isinf(t).any():
        row = int(torch.isinf(t).any(dim=1).nonzero()[0])
        raise ValueError(
            f"{name} contains non-finite values (±inf, first in prompt {row}): only NaN is allowed, meaning a missing "
            "sample."
        )
    return t


def _as_paired_rewards(policy_rewards, reference_rewards, names: tuple[str, str] = ("policy_rewards", "reference_rewards")
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides as (P, m) float64 tensors, checked to cover the same P prompts."""
    a = _as_2d_float(policy_rewards, names[0])
    b = _as_2d_float(reference_rewards, names[1])
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{names[0]} has {a.shape[0]} prompts but {names[1]} has {b.shape[0]}: both must have shape "
            "(num_prompts, num_samples) with the same prompts in the same order."
        )
    return a, b


def _min_valid_samples(*sides: torch.Tensor) -> int:
    """The smallest number of valid (non-NaN) samples of any prompt on any side."""
    return int(min((~torch.isnan(t)).sum(dim=1).min() for t in sides))


def order_statistic_weights(num_valid: torch.Tensor, width: int, n: int, procedure: ProcedureLike) -> torch.Tensor:
    """Deprecated: use ``get_procedure(procedure, n).rank_weights(num_valid, width)``.

    P(the procedure's output is the j-th smallest of a row's k valid values), (P, width) float64, zero for j > k:
    bon: C(j−1, n−1)/C(k, n); won: C(k−j, n−1)/C(k, n); standard (n = 1): 1/k. Any procedure spec works.
    """
    warnings.warn("order_statistic_weights is deprecated: use trl_infalign.procedures.get_procedure(procedure, n)"
                  ".rank_weights(num_valid, width).", DeprecationWarning, stacklevel=2)
    return _resolve_procedure(procedure, n).rank_weights(num_valid, width)


def per_prompt_win_rates(policy_rewards, reference_rewards, n: int | None = None,
                         procedure: ProcedureLike = "bon") -> np.ndarray:
    """Win probability of each prompt, shape (P,): P(X_π > X_ref) + ½ P(X_π = X_ref), where X is each side's output
    under the procedure (the max (bon) / min (won) / a single sample (standard) of N samples drawn without replacement
    from the row, a mixture's Σ_j w_j of its components, ...). Exact all-subsets average, unbiased, for bon / won /
    standard / mixtures of them / polynomial user procedures; the plug-in estimator otherwise (`procedure.unbiased`).

    `n` is the N of a bare name ("bon", 4); a spec with its own N ("bon:n=8", "mixture:...") needs none."""
    proc = _resolve_procedure(procedure, n)
    a, b = _as_paired_rewards(policy_rewards, reference_rewards)
    return proc.per_prompt_win_rates(a, b).numpy()


def _bootstrap_mean_ci(per_prompt: np.ndarray, num_bootstrap: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over prompts (NaN, NaN when num_bootstrap == 0).

    Resample b draws prompt indices from ``np.random.default_rng(seed)`` in a fixed order, so two calls with the same
    seed and number of prompts use the same resamples: intervals of one evaluation are paired."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
    if num_bootstrap < 0:
        raise ValueError(f"num_bootstrap must be >= 0, got {num_bootstrap!r}.")
    if num_bootstrap == 0:
        return math.nan, math.nan
    x = np.asarray(per_prompt, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(num_bootstrap)
    chunk = max(1, 2_000_000 // max(len(x), 1))
    for start in range(0, num_bootstrap, chunk):
        stop = min(start + chunk, num_bootstrap)
        idx = rng.integers(0, len(x), size=(stop - start, len(x)))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _kl_terms(policy_logps, reference_logps) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(np.asarray(policy_logps, dtype=np.float64)) if not isinstance(policy_logps, torch.Tensor) else policy_logps.detach().cpu().double()
    r = torch.as_tensor(np.asarray(reference_logps, dtype=np.float64)) if not isinstance(reference_logps, torch.Tensor) else reference_logps.detach().cpu().double()
    if p.shape != r.shape:
        raise ValueError(
            f"policy_logps has shape {tuple(p.shape)} but reference_logps has shape {tuple(r.shape)}: give log π(y) and "
            "log π_ref(y) of the same policy samples y."
        )
    if torch.isinf(p).any() or torch.isinf(r).any():
        raise ValueError("policy_logps / reference_logps contain ±inf: a sample with zero probability under a model.")
    log_ratio = r - p  # log ρ, ρ = π_ref / π
    k1 = -log_ratio
    k3 = torch.expm1(log_ratio) - log_ratio
    return k1, k3


def kl_estimates(policy_logps, reference_logps) -> tuple[float, float]:
    """Monte-Carlo estimates of KL(π‖π_ref) from samples y ~ π (NaN entries ignored).

    `policy_logps` = log π(y), `reference_logps` = log π_ref(y) (sequence log-probs, any matching shape).
    k1 = mean(log π − log π_ref) (unbiased, can be negative on a finite sample);
    k3 = mean((ρ − 1) − log ρ), ρ = π_ref/π (unbiased too, every term ≥ 0, lower variance when π ≈ π_ref).
    """
    k1, k3 = _kl_terms(policy_logps, reference_logps)
    ok = ~torch.isnan(k1)
    if not ok.any():
        raise ValueError("policy_logps has no valid (non-NaN) entries.")
    return float(k1[ok].mean()), float(k3[ok].mean())


def _per_prompt_kl(policy_logps, reference_logps, num_prompts: int) -> tuple[np.ndarray, np.ndarray]:
    """(k1(x), k3(x)) per prompt: the mean over the prompt's valid (non-NaN) policy samples, shape (P,) each."""
    k1, k3 = _kl_terms(policy_logps, reference_logps)
    if k1.ndim == 1:
        k1, k3 = k1.unsqueeze(1), k3.unsqueeze(1)
    if k1.shape[0] != num_prompts:
        raise ValueError(f"policy_logps has {k1.shape[0]} prompts but policy_rewards has {num_prompts}.")
    ok = ~torch.isnan(k1)
    if (ok.sum(dim=1) == 0).any():
        raise ValueError("policy_logps has a prompt without any valid (non-NaN) log-prob.")
    per_k1 = (torch.where(ok, k1, 0.0).sum(1) / ok.sum(1)).numpy()
    per_k3 = (torch.where(ok, k3, 0.0).sum(1) / ok.sum(1)).numpy()
    return per_k1, per_k3
