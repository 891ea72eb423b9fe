"""Inference-time win rates (standard, Best-of-N, Worst-of-N, mixtures, user procedures) and KL of a policy against
its reference (notes §3).

Two entry points:

- :func:`evaluate_policy` samples `m` completions per prompt from the policy and from the reference, scores them with
  the reward functions (exactly as TRL's `RLOOTrainer` does, via :mod:`trl_infalign.sampling`) and computes the log-probs
  of the policy samples under both models for the KL estimators;
- :func:`evaluate_scored` does the statistics only, for samples generated and scored elsewhere (vLLM, an API, ...).

Which win rates: `procedures` are :mod:`trl_infalign.procedures` specs or objects. A bare name whose procedure is
parameterised by N (``"bon"``, ``"won"``) is evaluated at every N of `ns`; ``"standard"`` once; a full spec with its
own parameters (``"bon:n=8"``, ``"mixture:0.5*standard+0.5*bon:n=4"``, a registered user procedure, an
:class:`~trl_infalign.procedures.InferenceProcedure` instance) once, as given. The procedure object computes the win
rate (:meth:`~trl_infalign.procedures.InferenceProcedure.per_prompt_win_rates`) and names it (`metric_key`, `label`).

Win rates use the exact *all-subsets* estimator: for a prompt with scores `a_1..a_m` (policy) and `b_1..b_m'`
(reference), the BoN-N win probability is the average, over every N-subset of the policy samples and every N-subset of
the reference samples, of `1[max A > max B] + ½·1[max A = max B]`. It is computed in O(m log m) per prompt from the
order statistics: the max of a uniformly random N-subset of m sorted values is the j-th smallest with probability
C(j−1, N−1)/C(m, N) (the min: C(m−j, N−1)/C(m, N)). It is unbiased for the BoN-N win rate of the two policies and has
far lower variance than drawing one random BoN pair per prompt. A request-level mixture's estimate is Σ_j w_j (component
j's estimate), unbiased when every component's is; a user procedure given by a non-polynomial output-CDF map f uses the
plug-in estimator (the empirical CDF through f), biased by O(1/m) — rows say which (`unbiased`). Confidence intervals
are percentile bootstraps over prompts (prompts are the independent units; samples within a prompt are not resampled).

KL is reported **per completion, in nats** — the unit of `CTRLConfig.kl_budget`, of RLOO's penalty and of the
calibrated-space theory: for a policy sample y, log π(y) − log π_ref(y) summed over the completion's tokens (TRL's
logged `kl` is instead the per-token mean, smaller by the completion length). The headline estimator is k1 (notes §6).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .procedures import PROCEDURES, InferenceProcedure, ProcedureError, get_procedure
from .sampling import model_name, resolve_process_state, resolve_tokenizer

DEFAULT_NS = (1, 2, 4, 8, 16, 32)

#: What a `procedures` entry may be: a spec string ("bon", "bon:n=8", "mixture:...", a registered name) or an object.
ProcedureLike = Union[str, InferenceProcedure]


# ---------------------------------------------------------------------------------------------------------------------
# procedures: resolution and expansion over N
# ---------------------------------------------------------------------------------------------------------------------
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


def order_statistic_weights(num_valid: torch.Tensor, width: int, n: int, procedure: ProcedureLike) -> torch.Tensor:
    """Deprecated: use ``get_procedure(procedure, n).rank_weights(num_valid, width)``.

    P(the procedure's output is the j-th smallest of a row's k valid values), (P, width) float64, zero for j > k:
    bon: C(j−1, n−1)/C(k, n); won: C(k−j, n−1)/C(k, n); standard (n = 1): 1/k. Any procedure spec works.
    """
    warnings.warn("order_statistic_weights is deprecated: use trl_infalign.procedures.get_procedure(procedure, n)"
                  ".rank_weights(num_valid, width).", DeprecationWarning, stacklevel=2)
    return _resolve_procedure(procedure, n).rank_weights(num_valid, width)


def _as_paired_rewards(policy_rewards, reference_rewards) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides as (P, m) float64 tensors, checked to cover the same P prompts."""
    a = _as_2d_float(policy_rewards, "policy_rewards")
    b = _as_2d_float(reference_rewards, "reference_rewards")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"policy_rewards has {a.shape[0]} prompts but reference_rewards has {b.shape[0]}: both must have shape "
            "(num_prompts, num_samples) with the same prompts in the same order."
        )
    return a, b


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
    """Percentile bootstrap CI of the mean over prompts (NaN, NaN when num_bootstrap == 0)."""
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


# ---------------------------------------------------------------------------------------------------------------------
# win rates
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class WinRateResult:
    """Win rate of the policy against the reference under an inference procedure, with a bootstrap CI over prompts.

    `estimate` is the mean over prompts of `per_prompt` (each prompt's win probability: the exact all-subsets average,
    or the plug-in estimate when `unbiased` is False). `procedure` is the procedure's name ("standard", "bon", "won",
    "mixture", a registered name), `n` its samples per request, `spec` its full spec ("bon:n=4", "mixture:...") and
    `inference_procedure` the :class:`~trl_infalign.procedures.InferenceProcedure` itself.
    """

    estimate: float
    ci_low: float
    ci_high: float
    per_prompt: np.ndarray
    n: int
    procedure: str
    num_prompts: int
    confidence: float = 0.95
    spec: str | None = None
    unbiased: bool | None = None
    inference_procedure: InferenceProcedure | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.inference_procedure is None:
            try:
                self.inference_procedure = get_procedure(self.spec) if self.spec else _resolve_procedure(self.procedure, self.n)
            except (ValueError, TypeError):
                return
        if self.spec is None:
            self.spec = self.inference_procedure.spec
        if self.unbiased is None:
            self.unbiased = bool(self.inference_procedure.unbiased)

    @property
    def name(self) -> str:
        """The procedure's metric key: `bon@4_win_rate`, `standard_win_rate`, `mixture(...)_win_rate`."""
        if self.inference_procedure is None:
            raise ValueError(f"unknown procedure {self.spec or self.procedure!r}: register it to name its metric.")
        return self.inference_procedure.metric_key

    @property
    def label(self) -> str:
        """Human-readable name of the procedure ("Best-of-4")."""
        return self.inference_procedure.label if self.inference_procedure is not None else str(self.spec or self.procedure)

    def to_dict(self, per_prompt: bool = False) -> dict:
        out = {
            "procedure": self.procedure, "n": self.n, "estimate": self.estimate, "ci_low": self.ci_low,
            "ci_high": self.ci_high, "spec": self.spec, "unbiased": self.unbiased, "num_prompts": self.num_prompts,
            "confidence": self.confidence,
        }
        if per_prompt:
            out["per_prompt"] = [float(v) for v in self.per_prompt]
        return out


#: The keys of an `EvaluationResult.win_rates` row.
ROW_KEYS = ("procedure", "n", "estimate", "ci_low", "ci_high", "spec", "unbiased")


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


# ---------------------------------------------------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------------
# evaluation of a whole sweep
# ---------------------------------------------------------------------------------------------------------------------
KL_UNIT = "nats per completion"
KL_HEADLINE = "KL per completion (k1, nats)"


@dataclass
class EvaluationResult:
    """Win rates for every procedure evaluated and the KL of the policy against the reference.

    `win_rates`: rows `{procedure, n, estimate, ci_low, ci_high, spec, unbiased}`, in the order of `procedures` (a
    bare name such as "bon" by N). `procedure` is the procedure's name ("standard", "bon", "won", "mixture", a
    registered name), `n` its samples per request, `spec` its full spec ("bon:n=4", "mixture:0.5*standard+0.5*bon:n=4")
    and `unbiased` whether its estimator is unbiased (False: the plug-in estimator of a non-polynomial user procedure,
    bias O(1/m)).

    KL is per completion, in nats (the unit of `kl_budget`): for policy samples y_{x,j} of prompt x,

        k1(x) = mean_j [log π(y_{x,j}) − log π_ref(y_{x,j})]                        (headline)
        k3(x) = mean_j [ρ − 1 − log ρ],  ρ = π_ref(y_{x,j}) / π(y_{x,j})

    with log π(y) the sum of the completion's token log-probs. `kl_k1` / `kl_k3` are the means over prompts of
    k1(x) / k3(x), and `kl_k1_ci` / `kl_k3_ci` their percentile bootstrap CIs over prompts (same resampling and seed as
    the win rates). Both are unbiased; k1 has light tails, k3 is heavy-tailed once KL ≳ 1 (a single sample with large
    log ρ can carry most of its mean), which is why k1 is the headline. All None when no log-probs were given.
    `kl_k1_per_prompt` / `kl_k3_per_prompt` hold k1(x) / k3(x).
    """

    win_rates: list[dict]
    kl_k1: float | None = None
    kl_k3: float | None = None
    kl_k1_ci: tuple[float, float] | None = None
    kl_k3_ci: tuple[float, float] | None = None
    num_prompts: int = 0
    num_samples_policy: int = 0
    num_samples_reference: int = 0
    confidence: float = 0.95
    num_bootstrap: int = 1000
    metadata: dict = field(default_factory=dict)
    results: list[WinRateResult] = field(default_factory=list, repr=False)
    kl_k1_per_prompt: np.ndarray | None = field(default=None, repr=False)
    kl_k3_per_prompt: np.ndarray | None = field(default=None, repr=False)

    @property
    def kl_per_completion(self) -> dict | None:
        """The headline KL: `{"estimator": "k1", "unit": "nats per completion", "estimate", "ci_low", "ci_high"}`."""
        if self.kl_k1 is None:
            return None
        low, high = self.kl_k1_ci if self.kl_k1_ci is not None else (math.nan, math.nan)
        return {"estimator": "k1", "unit": KL_UNIT, "estimate": self.kl_k1, "ci_low": low, "ci_high": high}

    def kl_summary(self, digits: int = 4) -> str | None:
        """`"KL per completion (k1, nats) = 1.4800 [1.3300, 1.6300]"` (the CI at `confidence`), or None without KL."""
        if self.kl_k1 is None:
            return None
        text = f"{KL_HEADLINE} = {self.kl_k1:.{digits}f}"
        low, high = self.kl_k1_ci if self.kl_k1_ci is not None else (math.nan, math.nan)
        if not math.isnan(low):
            text += f" [{low:.{digits}f}, {high:.{digits}f}]"
        return text

    def win_rate(self, procedure: ProcedureLike, n: int | None = None) -> dict:
        """The row of one procedure: `win_rate("bon", 4)`, `win_rate("standard")`, `win_rate("bon:n=4")`,
        `win_rate("mixture:0.5*standard+0.5*bon:n=4")` or an `InferenceProcedure` (a bare "bon" without `n` is N = 1)."""
        if n is None and _expands_over_n(procedure):
            n = 1
        wanted = _resolve_procedure(procedure, n)
        for row in self.win_rates:
            if _row_procedure(row) == wanted:
                return row
        raise KeyError(f"no win rate for procedure {wanted.spec!r} (have {[_row_spec(r) for r in self.win_rates]}).")

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat metrics: `{prefix}<procedure.metric_key>` (`bon@4_win_rate`, `standard_win_rate`,
        `mixture(0.5*standard+0.5*bon@4)_win_rate`, ...), `..._ci_low`, `..._ci_high`, `{prefix}kl_k1` (per-completion
        KL, nats) with `{prefix}kl_k1_ci_low` / `_ci_high`, and the same for `{prefix}kl_k3`."""
        out: dict[str, float] = {}
        for row in self.win_rates:
            key = prefix + _row_procedure(row).metric_key
            out[key] = row["estimate"]
            out[key + "_ci_low"] = row["ci_low"]
            out[key + "_ci_high"] = row["ci_high"]
        if self.kl_k1 is not None:
            for name, value, ci in (("kl_k1", self.kl_k1, self.kl_k1_ci), ("kl_k3", self.kl_k3, self.kl_k3_ci)):
                out[prefix + name] = value
                if ci is not None:
                    out[prefix + name + "_ci_low"], out[prefix + name + "_ci_high"] = ci
        return out

    def to_dict(self, per_prompt: bool = False) -> dict:
        kl = None
        if self.kl_k1 is not None:
            kl = {
                "k1": {"estimate": self.kl_k1, "ci_low": self.kl_k1_ci[0], "ci_high": self.kl_k1_ci[1]},
                "k3": {"estimate": self.kl_k3, "ci_low": self.kl_k3_ci[0], "ci_high": self.kl_k3_ci[1]},
            }
        out = {
            "win_rates": [dict(row) for row in self.win_rates],
            "kl": kl,
            "kl_per_completion": self.kl_per_completion,
            "kl_unit": KL_UNIT,
            "num_prompts": self.num_prompts,
            "num_samples_policy": self.num_samples_policy,
            "num_samples_reference": self.num_samples_reference,
            "confidence": self.confidence,
            "num_bootstrap": self.num_bootstrap,
            "metadata": self.metadata,
        }
        if per_prompt:
            out["per_prompt"] = {r.name: [float(v) for v in r.per_prompt] for r in self.results}
            for name, values in (("kl_k1", self.kl_k1_per_prompt), ("kl_k3", self.kl_k3_per_prompt)):
                if values is not None:
                    out["per_prompt"][name] = [float(v) for v in values]
        return _jsonable(out)

    def to_json(self, path: str | Path | None = None, per_prompt: bool = False, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(per_prompt=per_prompt), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
        return text

    def to_markdown(self) -> str:
        pct = f"{round(100 * self.confidence)}%"
        lines = [
            f"| procedure | N | win rate | {pct} CI |",
            "|---|---:|---:|---|",
        ]
        biased = False
        for row in self.win_rates:
            ci = "—" if _is_nan(row["ci_low"]) else f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
            mark = "" if row.get("unbiased", True) is not False else " †"
            biased = biased or bool(mark)
            lines.append(f"| {_row_display(row)} | {row['n']} | {row['estimate']:.4f}{mark} | {ci} |")
        if biased:
            lines += ["", "† plug-in estimator (the empirical CDF through the procedure's output-CDF map f): biased, by "
                      "O(1/m) for m samples per prompt; give the procedure as a polynomial in G for an unbiased one."]
        if self.kl_k1 is not None:
            lines += ["", f"| KL(π‖π_ref) per completion (nats), estimator | value | {pct} CI |", "|---|---:|---|"]
            for name, value, ci in (("k1 (headline)", self.kl_k1, self.kl_k1_ci), ("k3", self.kl_k3, self.kl_k3_ci)):
                ci_text = "—" if ci is None or math.isnan(ci[0]) else f"[{ci[0]:.4f}, {ci[1]:.4f}]"
                lines.append(f"| {name} | {value:.4f} | {ci_text} |")
            lines += ["", f"**{self.kl_summary()}** ({pct} CI): the sum over a completion's tokens of "
                      "log π − log π_ref, the unit of `kl_budget`. k3 is heavy-tailed once KL ≳ 1; TRL's logged `kl` is "
                      "the per-token mean."]
            if self.metadata.get("kl_note"):
                lines += ["", f"Note: {self.metadata['kl_note']}"]
        lines += [
            "",
            f"{self.num_prompts} prompts, {self.num_samples_policy} policy and {self.num_samples_reference} reference "
            f"samples per prompt; {'exact all-subsets estimator' if not biased else 'exact all-subsets estimator (except †)'}, "
            "ties count ½; CI: percentile bootstrap over prompts "
            f"({self.num_bootstrap} resamples).",
        ]
        described = self._describe_models()
        if described:
            lines += ["", described]
        return "\n".join(lines)

    def _describe_models(self) -> str | None:
        """One line naming the evaluated models and the sampling settings, from `metadata`."""
        md = self.metadata
        parts = []
        if md.get("policy") is not None:
            parts.append(f"policy: `{md['policy']}`")
        if md.get("reference") is not None:
            parts.append(f"reference: `{md['reference']}`")
        if "temperature" in md:
            def fmt(v):
                return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

            parts.append(f"sampling: temperature {fmt(md['temperature'])}, top_p {fmt(md.get('top_p', 1.0))}, "
                         f"top_k {md.get('top_k', 0)}")
        if md.get("max_new_tokens") is not None:
            parts.append(f"max_new_tokens {md['max_new_tokens']}")
        return ("Evaluated " + "; ".join(parts) + ".") if parts else None

    def plot(self, path: str | Path | None = None, ax=None, title: str | None = None):
        """Win rate vs N with CI bands: one line per N-family (Best-of-N, Worst-of-N: the rows of one name at several
        N, labelled by the procedures), one marker per other procedure at its N (standard at N = 1, a mixture at its largest N,
        labelled with `procedure.label`); saves to `path` if given.

        Needs matplotlib (`pip install trl-infalign[plot]`). Returns the matplotlib figure.
        """
        try:
            import matplotlib

            if ax is None and path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("EvaluationResult.plot needs matplotlib: pip install 'trl-infalign[plot]'.") from e
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(5.5, 4))
        else:
            fig = ax.figure
        lines: dict[str, list[tuple[InferenceProcedure, dict]]] = {}
        points: list[tuple[InferenceProcedure, dict]] = []
        for row in self.win_rates:
            proc = _row_procedure(row)
            family = _n_family(proc)
            if family is None:
                points.append((proc, row))
            else:
                lines.setdefault(family, []).append((proc, row))
        colors = iter(plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3", "C4"]) * 4)
        for members in lines.values():
            members = sorted(members, key=lambda m: m[0].n)
            color = next(colors)
            ns = [p.n for p, _ in members]
            rows = [r for _, r in members]
            label = members[0][0].label if len(members) == 1 else _family_label(members[-1][0])
            ax.plot(ns, [r["estimate"] for r in rows], "o-", color=color, label=label)
            if not _is_nan(rows[0]["ci_low"]):
                ax.fill_between(ns, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], color=color, alpha=0.2)
        for proc, r in points:
            yerr = None if _is_nan(r["ci_low"]) else [[r["estimate"] - r["ci_low"]], [r["ci_high"] - r["estimate"]]]
            color = "black" if proc.is_standard else next(colors)
            ax.errorbar([proc.n], [r["estimate"]], yerr=yerr, fmt="s" if proc.is_standard else "D", color=color,
                        capsize=3, label=proc.label + ("" if proc.unbiased else " (plug-in)"))
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        from matplotlib.ticker import NullLocator, ScalarFormatter

        ticks = sorted({r["n"] for r in self.win_rates})
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("N (samples per request)")
        ax.set_ylabel("win rate vs reference")
        if title is None and self.kl_k1 is not None:
            title = self.kl_summary(digits=3)
        if title:
            ax.set_title(title)
        ax.legend()
        if own:
            fig.tight_layout()
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=120)
            if own:
                plt.close(fig)
        return fig


def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _row_procedure(row: dict) -> InferenceProcedure:
    """The procedure of a `win_rates` row: from its `spec`, or (older rows) from `procedure` and `n`."""
    if row.get("spec"):
        return get_procedure(row["spec"])
    return _resolve_procedure(row["procedure"], row["n"])


def _row_spec(row: dict) -> str:
    try:
        return _row_procedure(row).spec
    except ValueError:
        return str(row.get("spec") or row.get("procedure"))


def _row_display(row: dict) -> str:
    """A row's name in the table: the bare name when (name, N) says it all ("bon" at N = 4, "standard"), else the
    full spec (a mixture, a user procedure with other parameters)."""
    proc = _row_procedure(row)
    return row["procedure"] if _n_family(proc) is not None or proc.spec == proc.name else f"`{proc.spec}`"


def _family_label(procedure: InferenceProcedure) -> str:
    """Legend of an N-family's line: the member's label with its N written as "N" ("Best-of-32" → "Best-of-N")."""
    label, count = re.subn(rf"(?<!\d){procedure.n}(?!\d)", "N", procedure.label, count=1)
    return label if count else f"{procedure.name} (N)"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


class SkippedNWarning(UserWarning):
    """Some requested N were dropped because there are fewer than N samples per prompt (N must be <= m)."""


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


def _check_sampling(temperature, top_p, top_k) -> tuple[float, float, int]:
    """Validate the sampling settings (same meaning as `transformers.GenerationConfig`): returns them normalised."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(temperature)) or temperature <= 0:
        raise ValueError(
            f"temperature must be a finite number > 0, got {temperature!r} (1.0 samples from the policy itself; greedy "
            "decoding is not sampling and would make every BoN/WoN subset identical)."
        )
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(top_p)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r} (1.0 disables nucleus truncation).")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r} (0 disables top-k truncation).")
    return float(temperature), float(top_p), int(top_k)


def _is_default_sampling(temperature: float, top_p: float, top_k: int) -> bool:
    return temperature == 1.0 and top_p == 1.0 and top_k == 0


def _kl_sampling_note(temperature: float, top_p: float, top_k: int) -> str:
    return (
        f"samples drawn with temperature={temperature:g}, top_p={top_p:g}, top_k={top_k}: they are not draws from π "
        "itself, so kl_k1 / kl_k3 estimate E_sampled[log π − log π_ref] (log-probs at temperature 1), not KL(π‖π_ref). "
        "Evaluate KL with temperature=1, top_p=1, top_k=0."
    )


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
    max_n = int(min((~torch.isnan(a)).sum(dim=1).min(), (~torch.isnan(b)).sum(dim=1).min()))
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
        k1, k3 = _kl_terms(policy_logps, reference_logps)
        if k1.ndim == 1:
            k1, k3 = k1.unsqueeze(1), k3.unsqueeze(1)
        if k1.shape[0] != a.shape[0]:
            raise ValueError(f"policy_logps has {k1.shape[0]} prompts but policy_rewards has {a.shape[0]}.")
        ok = ~torch.isnan(k1)
        if (ok.sum(dim=1) == 0).any():
            raise ValueError("policy_logps has a prompt without any valid (non-NaN) log-prob.")
        # Mean of per-prompt means: the prompt is the bootstrap unit, as for the win rates.
        per_k1 = (torch.where(ok, k1, 0.0).sum(1) / ok.sum(1)).numpy()
        per_k3 = (torch.where(ok, k3, 0.0).sum(1) / ok.sum(1)).numpy()
        out.kl_k1, out.kl_k3 = float(per_k1.mean()), float(per_k3.mean())
        out.kl_k1_per_prompt, out.kl_k3_per_prompt = per_k1, per_k3
        out.kl_k1_ci = _bootstrap_mean_ci(per_k1, num_bootstrap, confidence, seed)
        out.kl_k3_ci = _bootstrap_mean_ci(per_k3, num_bootstrap, confidence, seed)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# sampling + scoring (shared with the callback)
# ---------------------------------------------------------------------------------------------------------------------
def _load_causal_lm(model, device):
    if isinstance(model, (str, Path)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model))
        model.to(device)
    return model


def _split_prompts(prompts) -> tuple[list, dict[str, list]]:
    """A list of prompts, or a `datasets.Dataset` with a `prompt` column (other columns go to reward callables)."""
    if hasattr(prompts, "column_names"):
        if "prompt" not in prompts.column_names:
            raise ValueError(f"The prompts dataset has no 'prompt' column (columns: {prompts.column_names}).")
        columns = {c: list(prompts[c]) for c in prompts.column_names if c != "prompt"}
        return list(prompts["prompt"]), columns
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty.")
    return prompts, {}


@dataclass
class _Sampled:
    rewards: torch.Tensor  # (P_local, m)
    completions: Any  # sampling.Completions


def _sample_and_score(model, tokenizer, prompts, columns, funcs, classes, weights, *, num_samples, max_new_tokens,
                      batch_size, progress, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> _Sampled:
    from .sampling import combine_rewards, generate_completions, score_completions

    comps = generate_completions(
        model, tokenizer, prompts, num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k, batch_size=batch_size, progress=progress,
    )
    flat_prompts = [p for p in prompts for _ in range(num_samples)]
    flat_texts = [t for row in comps.texts for t in row]
    flat_ids = [ids for row in comps.ids for ids in row]
    flat_columns = {k: [v for v in col for _ in range(num_samples)] for k, col in columns.items()}
    per_func = score_completions(funcs, classes, flat_prompts, flat_texts, completion_ids=flat_ids, columns=flat_columns)
    rewards = combine_rewards(per_func, weights).double().reshape(len(prompts), num_samples)
    return _Sampled(rewards=rewards, completions=comps)


def _policy_sample_logps(model, reference, tokenizer, comps, num_samples, batch_size) -> tuple[torch.Tensor, torch.Tensor]:
    from .sampling import completion_logprobs

    prompt_ids = [comps.prompt_ids[p] for p in range(len(comps.prompts)) for _ in range(num_samples)]
    completion_ids = [ids for row in comps.ids for ids in row]
    shape = (len(comps.prompts), num_samples)
    pad = tokenizer.pad_token_id
    lp = completion_logprobs(model, prompt_ids, completion_ids, pad_token_id=pad, batch_size=batch_size)
    if reference is model:
        lr = lp.clone()
    else:
        lr = completion_logprobs(reference, prompt_ids, completion_ids, pad_token_id=pad, batch_size=batch_size)
    return lp.reshape(shape), lr.reshape(shape)


def _completion_lengths(comps) -> torch.Tensor:
    """(P, m) number of tokens of each completion (EOS included when generated)."""
    return torch.tensor([[len(ids) for ids in row] for row in comps.ids], dtype=torch.float64)


def _same_model_name(a: str, b: str) -> bool:
    if a.rstrip("/") == b.rstrip("/"):
        return True
    try:
        return bool(a) and bool(b) and os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def describe_policy(policy, reference, policy_name: str | None = None) -> str:
    """The name `metadata["policy"]` records for the evaluated model.

    `policy_name` if given; else the policy's path when it is a path; else, for an in-memory model, its
    `config._name_or_path` — unless that is the reference's name (a model being trained from the reference keeps the
    reference's `_name_or_path`), in which case `"in-memory model (initialised from '<reference>')"`. Passing the
    reference object itself as the policy records the reference's name (it *is* the reference).
    """
    if policy_name is not None:
        if not isinstance(policy_name, (str, os.PathLike)) or not str(policy_name):
            raise ValueError(f"policy_name must be a non-empty string naming the evaluated model, got {policy_name!r}.")
        return str(policy_name)
    if isinstance(policy, (str, os.PathLike)):
        return str(policy)
    name = str(getattr(getattr(policy, "config", None), "_name_or_path", "") or "")
    if policy is reference:
        return model_name(policy)
    if not name:
        return f"in-memory {type(policy).__name__} (no name_or_path; pass policy_name=)"
    if _same_model_name(name, model_name(reference)):
        return f"in-memory model (initialised from {name!r})"
    return name


def _gather_rows(state, indices: list[int], *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Gather per-prompt rows from every process (in prompt order); no-op on one process."""
    if getattr(state, "num_processes", 1) <= 1:
        return list(tensors)
    from accelerate.utils import gather_object

    records = [(i, *[t[k].tolist() for t in tensors]) for k, i in enumerate(indices)]
    records = sorted(gather_object(records), key=lambda r: r[0])
    return [torch.tensor([r[1 + j] for r in records], dtype=torch.float64) for j in range(len(tensors))]


def _local_indices(state, num_prompts: int) -> list[int]:
    if getattr(state, "num_processes", 1) <= 1:
        return list(range(num_prompts))
    with state.split_between_processes(list(range(num_prompts))) as local:
        return list(local)


def evaluate_policy(
    policy,
    reference,
    reward_funcs,
    prompts,
    *,
    tokenizer=None,
    reward_processing_classes=None,
    reward_weights=None,
    num_samples: int = 32,
    ns: Sequence[int] = DEFAULT_NS,
    procedures: Sequence[ProcedureLike] | ProcedureLike = PROCEDURES,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 32,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    accelerator=None,
    progress: bool = True,
    policy_name: str | None = None,
) -> EvaluationResult:
    """Sample, score and compare: win rates under each inference procedure (standard / BoN-N / WoN-N / mixtures /
    user procedures) and KL of `policy` against `reference`.

    Args:
        policy, reference: causal LMs or paths. They must share the tokenizer (the KL needs log π_ref of the
            policy's tokens). Passing the same object twice is allowed (k1 is then exactly 0).
        reward_funcs: reward model path(s), sequence-classification model(s) or callable(s), as for TRL's trainers;
            combined with `reward_weights` exactly as TRL does.
        prompts: list of prompts (strings or conversational message lists), or a `datasets.Dataset` with a `prompt`
            column (its other columns are passed to reward callables).
        tokenizer: the policy tokenizer (default: loaded from the policy's path).
        ns, procedures: which win rates, as in :func:`evaluate_scored`: "standard" once, "bon" / "won" at every N
            of `ns`, full specs ("bon:n=8", "mixture:0.5*standard+0.5*bon:n=4", registered names, instances) once.
        num_samples: m samples per prompt from each model. A procedure needing more than m samples (N > m) cannot be
            evaluated: it is dropped with a :class:`SkippedNWarning` naming it (fix: `num_samples >= N`); a ValueError
            if nothing is left.
        temperature, top_p, top_k: sampling settings for **both** models (as in `transformers.GenerationConfig`:
            temperature > 0, top_p in (0, 1], top_k >= 0 with 0 = off). The defaults (1, 1, 0) sample π itself, as
            TRL's trainers do; the win rates then compare the models deployed with these settings. Other settings
            make the policy samples draws from a tempered / truncated π, so the KL estimators (log-probs at
            temperature 1) no longer estimate KL(π‖π_ref): a UserWarning says so and `metadata["kl_note"]` records it.
        accelerator: an `Accelerator` / `PartialState` (default `PartialState()`): prompts are sharded across processes,
            per-prompt results gathered with `gather_object`; every process returns the same result.
        seed: sampling seed (offset per process and per model) and bootstrap seed.
        policy_name: what `metadata["policy"]` records. Default: the policy's path if given as a path; for an
            in-memory model its `config._name_or_path`, except that a model trained in memory from the reference
            (whose `_name_or_path` is still the reference's) is recorded as "in-memory model (initialised from
            '<reference>')" — pass e.g. the output directory and step to name it properly.

    Returns:
        :class:`EvaluationResult`; `metadata` has `policy`, `reference`, `policy_in_memory`, `num_samples`,
        `max_new_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `num_processes`, `ns_requested`, `ns_skipped`
        (the N of `ns` dropped), `procedures_skipped` (the specs of every dropped win rate),
        `mean_completion_tokens` (policy samples; per-completion KL / this ≈ a per-token KL) and, with non-default
        sampling, `kl_note`.
    """
    from .sampling import load_reward_funcs

    state = resolve_process_state(accelerator)
    prompt_list, columns = _split_prompts(prompts)
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
    temperature, top_p, top_k = _check_sampling(temperature, top_p, top_k)
    requested = sorted({_check_n_value(n) for n in ns})
    plans = plan_procedures(procedures, requested)
    need = max(p.procedure.min_samples for p in plans) if plans else 1
    kept = _resolve_ns(requested, procedures, num_samples,
                       fix=f"pass num_samples >= N (num_samples={need} keeps every N)")
    dropped = split_by_samples(plans, num_samples)[1]
    kl_note = None if _is_default_sampling(temperature, top_p, top_k) else _kl_sampling_note(temperature, top_p, top_k)
    if kl_note is not None:
        warnings.warn(f"evaluate_policy: {kl_note}", UserWarning, stacklevel=2)
    name = describe_policy(policy, reference, policy_name)
    tokenizer = resolve_tokenizer(policy, tokenizer)
    tokenizer.padding_side = "left"
    same = reference is policy or (isinstance(reference, (str, Path)) and isinstance(policy, (str, Path)) and str(reference) == str(policy))
    policy_model = _load_causal_lm(policy, state.device)
    reference_model = policy_model if same else _load_causal_lm(reference, state.device)
    funcs, classes = load_reward_funcs(reward_funcs, reward_processing_classes)
    for f in funcs:
        if isinstance(f, torch.nn.Module):
            f.to(state.device)

    local = _local_indices(state, len(prompt_list))
    local_prompts = [prompt_list[i] for i in local]
    local_columns = {k: [v[i] for i in local] for k, v in columns.items()}
    show = progress and state.is_main_process
    rank = getattr(state, "process_index", 0)
    kwargs = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                  temperature=temperature, top_p=top_p, top_k=top_k)
    if local_prompts:
        torch.manual_seed(seed * 1_000_003 + 2 * rank)
        pol = _sample_and_score(policy_model, tokenizer, local_prompts, local_columns, funcs, classes, reward_weights,
                                progress="Policy samples" if show else False, **kwargs)
        torch.manual_seed(seed * 1_000_003 + 2 * rank + 1)
        ref = _sample_and_score(reference_model, tokenizer, local_prompts, local_columns, funcs, classes, reward_weights,
                                progress="Reference samples" if show else False, **kwargs)
        lp, lr = _policy_sample_logps(policy_model, reference_model, tokenizer, pol.completions, num_samples, batch_size)
        pr, rr, lengths = pol.rewards, ref.rewards, _completion_lengths(pol.completions)
    else:
        pr = rr = lp = lr = lengths = torch.zeros(0, num_samples, dtype=torch.float64)
    pr, rr, lp, lr, lengths = _gather_rows(state, local, pr, rr, lp, lr, lengths)
    metadata = {
        "policy": name, "reference": model_name(reference),
        "policy_in_memory": not isinstance(policy, (str, os.PathLike)),
        "num_samples": num_samples, "max_new_tokens": max_new_tokens,
        "temperature": temperature, "top_p": top_p, "top_k": top_k,
        "seed": seed, "num_processes": getattr(state, "num_processes", 1),
        "ns_requested": requested,
        "ns_skipped": sorted({p.n for p in dropped if p.n is not None}),
        "procedures_skipped": [p.procedure.spec for p in dropped],
        "mean_completion_tokens": float(lengths.mean()) if lengths.numel() else None,
    }
    if kl_note is not None:
        metadata["kl_note"] = kl_note
    return evaluate_scored(
        pr, rr, sorted({p.n for p in kept if p.n is not None}), [p.procedure for p in kept], lp, lr,
        num_bootstrap=num_bootstrap, confidence=confidence, seed=seed, metadata=metadata,
    )
