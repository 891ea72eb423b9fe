"""Inference-time win rates (standard, Best-of-N, Worst-of-N) and KL of a policy against its reference (notes §3).

Two entry points:

- :func:`evaluate_policy` samples `m` completions per prompt from the policy and from the reference, scores them with
  the reward functions (exactly as TRL's `RLOOTrainer` does, via :mod:`trl_infalign.sampling`) and computes the log-probs
  of the policy samples under both models for the KL estimators;
- :func:`evaluate_scored` does the statistics only, for samples generated and scored elsewhere (vLLM, an API, ...).

Win rates use the exact *all-subsets* estimator: for a prompt with scores `a_1..a_m` (policy) and `b_1..b_m'`
(reference), the BoN-N win probability is the average, over every N-subset of the policy samples and every N-subset of
the reference samples, of `1[max A > max B] + ½·1[max A = max B]`. It is computed in O(m log m) per prompt from the
order statistics: the max of a uniformly random N-subset of m sorted values is the j-th smallest with probability
C(j−1, N−1)/C(m, N) (the min: C(m−j, N−1)/C(m, N)). It is unbiased for the BoN-N win rate of the two policies and has
far lower variance than drawing one random BoN pair per prompt. Confidence intervals are percentile bootstraps over
prompts (prompts are the independent units; samples within a prompt are not resampled).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .sampling import model_name, resolve_process_state, resolve_tokenizer

PROCEDURES = ("standard", "bon", "won")
DEFAULT_NS = (1, 2, 4, 8, 16, 32)


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------
def metric_name(procedure: str, n: int) -> str:
    """Key of a win rate in flat metric dicts: `standard_win_rate`, `bon@4_win_rate`, `won@8_win_rate`."""
    return "standard_win_rate" if procedure == "standard" else f"{procedure}@{n}_win_rate"


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


def _check_procedure(procedure: str, n) -> tuple[str, int]:
    if procedure not in PROCEDURES:
        raise ValueError(f"procedure must be one of {PROCEDURES}, got {procedure!r}.")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}.")
    return procedure, (1 if procedure == "standard" else int(n))


def _log_comb(n: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """log C(n, r) elementwise (float64), −inf where r < 0 or r > n."""
    n, r = torch.broadcast_tensors(n.double(), r.double())
    valid = (r >= 0) & (r <= n)
    n_ = torch.where(valid, n, torch.zeros_like(n))
    r_ = torch.where(valid, r, torch.zeros_like(r))
    out = torch.lgamma(n_ + 1) - torch.lgamma(r_ + 1) - torch.lgamma(n_ - r_ + 1)
    return torch.where(valid, out, torch.full_like(out, -math.inf))


def order_statistic_weights(num_valid: torch.Tensor, width: int, n: int, procedure: str) -> torch.Tensor:
    """P(the max (bon) / min (won) of a uniformly random n-subset is the j-th smallest of the row's k valid values).

    `num_valid`: (P,) valid counts k; returns (P, width) float64 weights, zero for j > k. bon: C(j−1, n−1)/C(k, n);
    won: C(k−j, n−1)/C(k, n); standard (n = 1): 1/k.
    """
    k = num_valid.double().unsqueeze(1)
    j = torch.arange(1, width + 1, dtype=torch.float64).unsqueeze(0)
    if procedure == "won":
        logw = _log_comb(k - j, torch.tensor(float(n - 1))) - _log_comb(k, torch.tensor(float(n)))
    else:  # bon and standard (n = 1 gives uniform weights)
        logw = _log_comb(j - 1, torch.tensor(float(n - 1))) - _log_comb(k, torch.tensor(float(n)))
    logw = torch.where(j <= k, logw, torch.full_like(logw, -math.inf))
    w = torch.exp(logw - logw.max(dim=1, keepdim=True).values)
    return w / w.sum(dim=1, keepdim=True)  # sums to 1 exactly up to rounding


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


def per_prompt_win_rates(policy_rewards, reference_rewards, n: int, procedure: str = "bon") -> np.ndarray:
    """Exact all-subsets win probability of each prompt, shape (P,): P(X_π > X_ref) + ½ P(X_π = X_ref), where X is
    the max (bon) / min (won) / a single sample (standard) of N samples drawn without replacement from the row."""
    procedure, n = _check_procedure(procedure, n)
    a, b = _as_paired_rewards(policy_rewards, reference_rewards)
    sides = {}
    for name, t in (("policy_rewards", a), ("reference_rewards", b)):
        valid = ~torch.isnan(t)
        k = valid.sum(dim=1)
        if (k < n).any():
            row = int((k < n).nonzero()[0])
            raise ValueError(
                f"{name} has only {int(k[row])} valid samples for prompt {row} (and {int((k < n).sum())} prompts in "
                f"all with fewer than {n}), but {procedure} with N={n} needs at least N samples per prompt: draw more "
                "samples (m >= N) or lower N."
            )
        # NaN (missing) sorts last as +inf with weight 0; finite values never tie with it.
        values = torch.sort(torch.where(valid, t, torch.full_like(t, math.inf)), dim=1).values
        sides[name] = (values, order_statistic_weights(k, t.shape[1], n, procedure))
    (av, aw), (bv, bw) = sides["policy_rewards"], sides["reference_rewards"]
    cum = torch.cat([torch.zeros(bw.shape[0], 1, dtype=torch.float64), torch.cumsum(bw, dim=1)], dim=1)
    below = torch.searchsorted(bv.contiguous(), av.contiguous(), side="left")  # #ref values < a
    at_or_below = torch.searchsorted(bv.contiguous(), av.contiguous(), side="right")  # #ref values <= a
    p_less, p_leq = cum.gather(1, below), cum.gather(1, at_or_below)
    win = p_less + 0.5 * (p_leq - p_less)  # P(X_ref < a) + ½ P(X_ref = a) for each policy order statistic a
    out = (aw * torch.where(torch.isinf(av), torch.zeros_like(win), win)).sum(dim=1)
    return out.clamp(0.0, 1.0).numpy()


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

    `estimate` is the mean over prompts of `per_prompt` (each the exact all-subsets win probability of its prompt).
    """

    estimate: float
    ci_low: float
    ci_high: float
    per_prompt: np.ndarray
    n: int
    procedure: str
    num_prompts: int
    confidence: float = 0.95

    @property
    def name(self) -> str:
        return metric_name(self.procedure, self.n)

    def to_dict(self, per_prompt: bool = False) -> dict:
        out = {
            "procedure": self.procedure, "n": self.n, "estimate": self.estimate, "ci_low": self.ci_low,
            "ci_high": self.ci_high, "num_prompts": self.num_prompts, "confidence": self.confidence,
        }
        if per_prompt:
            out["per_prompt"] = [float(v) for v in self.per_prompt]
        return out


def inference_win_rate(
    policy_rewards,
    reference_rewards,
    n: int,
    procedure: str = "bon",
    *,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> WinRateResult:
    """Standard / BoN-N / WoN-N win rate of a policy against its reference from scored samples (notes §3).

    Args:
        policy_rewards: (P, m_policy) rewards of m_policy samples of the policy for each of P prompts (numpy, torch or
            nested lists). NaN marks a missing sample; every row must keep at least `n` valid values.
        reference_rewards: (P, m_reference) rewards of the reference policy's samples for the same prompts.
        n: N of the procedure. Ignored for `procedure="standard"`, which is N = 1 (the result has `n == 1`).
        procedure: `"standard"` (one sample each), `"bon"` (best of N each) or `"won"` (worst of N each).
        num_bootstrap: bootstrap resamples of the prompts for the CI (0: no CI, NaN bounds).
        confidence: CI level. seed: bootstrap seed.

    Returns:
        :class:`WinRateResult` — `estimate` = mean over prompts of P(X_π > X_ref) + ½ P(X_π = X_ref), computed exactly
        over all N-subsets of both sides' samples; `ci_low`/`ci_high` the percentile bootstrap interval.
    """
    procedure, n = _check_procedure(procedure, n)
    per_prompt = per_prompt_win_rates(policy_rewards, reference_rewards, n, procedure)
    low, high = _bootstrap_mean_ci(per_prompt, num_bootstrap, confidence, seed)
    return WinRateResult(
        estimate=float(per_prompt.mean()), ci_low=low, ci_high=high, per_prompt=per_prompt, n=n, procedure=procedure,
        num_prompts=len(per_prompt), confidence=confidence,
    )


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
@dataclass
class EvaluationResult:
    """Win rates for every (procedure, N) and the KL of the policy against the reference.

    `win_rates`: rows `{procedure, n, estimate, ci_low, ci_high}` (standard first, then bon / won by N);
    `kl_k1`, `kl_k3` and their CIs `kl_k1_ci`, `kl_k3_ci` (None when no log-probs were given).
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

    def win_rate(self, procedure: str, n: int = 1) -> dict:
        """The row of one (procedure, N)."""
        procedure, n = _check_procedure(procedure, n)
        for row in self.win_rates:
            if row["procedure"] == procedure and row["n"] == n:
                return row
        raise KeyError(f"no win rate for procedure={procedure!r}, n={n} (have {[(r['procedure'], r['n']) for r in self.win_rates]}).")

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat metrics: `{prefix}bon@4_win_rate`, `..._ci_low`, `..._ci_high`, `{prefix}kl_k1`, `{prefix}kl_k3`."""
        out: dict[str, float] = {}
        for row in self.win_rates:
            key = prefix + metric_name(row["procedure"], row["n"])
            out[key] = row["estimate"]
            out[key + "_ci_low"] = row["ci_low"]
            out[key + "_ci_high"] = row["ci_high"]
        if self.kl_k1 is not None:
            out[prefix + "kl_k1"] = self.kl_k1
            out[prefix + "kl_k3"] = self.kl_k3
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
            "num_prompts": self.num_prompts,
            "num_samples_policy": self.num_samples_policy,
            "num_samples_reference": self.num_samples_reference,
            "confidence": self.confidence,
            "num_bootstrap": self.num_bootstrap,
            "metadata": self.metadata,
        }
        if per_prompt:
            out["per_prompt"] = {r.name: [float(v) for v in r.per_prompt] for r in self.results}
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
        for row in self.win_rates:
            ci = "—" if math.isnan(row["ci_low"]) else f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
            lines.append(f"| {row['procedure']} | {row['n']} | {row['estimate']:.4f} | {ci} |")
        if self.kl_k1 is not None:
            lines += ["", f"| KL(π‖π_ref) estimator | value | {pct} CI |", "|---|---:|---|"]
            for name, value, ci in (("k1", self.kl_k1, self.kl_k1_ci), ("k3", self.kl_k3, self.kl_k3_ci)):
                ci_text = "—" if math.isnan(ci[0]) else f"[{ci[0]:.4f}, {ci[1]:.4f}]"
                lines.append(f"| {name} | {value:.4f} | {ci_text} |")
        lines += [
            "",
            f"{self.num_prompts} prompts, {self.num_samples_policy} policy and {self.num_samples_reference} reference "
            "samples per prompt; exact all-subsets estimator, ties count ½; CI: percentile bootstrap over prompts "
            f"({self.num_bootstrap} resamples).",
        ]
        return "\n".join(lines)

    def plot(self, path: str | Path | None = None, ax=None, title: str | None = None):
        """Win rate vs N for BoN and WoN (standard at N = 1 as a marker), with CI bands; saves to `path` if given.

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
        styles = {"bon": ("tab:blue", "Best-of-N"), "won": ("tab:red", "Worst-of-N")}
        for procedure, (color, label) in styles.items():
            rows = sorted((r for r in self.win_rates if r["procedure"] == procedure), key=lambda r: r["n"])
            if not rows:
                continue
            ns = [r["n"] for r in rows]
            ax.plot(ns, [r["estimate"] for r in rows], "o-", color=color, label=label)
            if not math.isnan(rows[0]["ci_low"]):
                ax.fill_between(ns, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], color=color, alpha=0.2)
        std = [r for r in self.win_rates if r["procedure"] == "standard"]
        if std:
            r = std[0]
            yerr = None if math.isnan(r["ci_low"]) else [[r["estimate"] - r["ci_low"]], [r["ci_high"] - r["estimate"]]]
            ax.errorbar([1], [r["estimate"]], yerr=yerr, fmt="s", color="black", capsize=3, label="standard")
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        from matplotlib.ticker import NullLocator, ScalarFormatter

        ticks = sorted({r["n"] for r in self.win_rates})
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("N")
        ax.set_ylabel("win rate vs reference")
        if title is None and self.kl_k1 is not None:
            title = f"KL k1 = {self.kl_k1:.3f}, k3 = {self.kl_k3:.3f}"
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


def _resolve_ns(ns: Sequence[int], procedures: Sequence[str], max_n: int) -> list[tuple[str, int]]:
    procedures = list(procedures)
    for p in procedures:
        _check_procedure(p, 1)
    ns = sorted({int(n) for n in ns})
    for n in ns:
        _check_procedure("bon", n)
    dropped = [n for n in ns if n > max_n]
    kept = [n for n in ns if n <= max_n]
    if dropped and any(p != "standard" for p in procedures):
        warnings.warn(
            f"Skipping N = {dropped}: only {max_n} samples per prompt are available on the smaller side (N must be <= m).",
            stacklevel=3,
        )
    pairs = [("standard", 1)] if "standard" in procedures else []
    for p in ("bon", "won"):
        if p in procedures:
            pairs += [(p, n) for n in kept]
    if not pairs:
        raise ValueError(f"Nothing to evaluate: procedures={procedures}, ns={ns} with at most {max_n} samples per prompt.")
    return pairs


def evaluate_scored(
    policy_rewards,
    reference_rewards,
    ns: Sequence[int] = DEFAULT_NS,
    procedures: Sequence[str] = PROCEDURES,
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
    log π_ref(y) of the *policy* samples (same layout as `policy_rewards`). N values above the smallest per-prompt
    valid count are skipped with a warning; `standard` is evaluated once (N = 1).
    """
    a, b = _as_paired_rewards(policy_rewards, reference_rewards)
    max_n = int(min((~torch.isnan(a)).sum(dim=1).min(), (~torch.isnan(b)).sum(dim=1).min()))
    results = [
        inference_win_rate(a, b, n, p, num_bootstrap=num_bootstrap, confidence=confidence, seed=seed)
        for p, n in _resolve_ns(ns, procedures, max_n)
    ]
    out = EvaluationResult(
        win_rates=[{k: r.to_dict()[k] for k in ("procedure", "n", "estimate", "ci_low", "ci_high")} for r in results],
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
                      batch_size, progress) -> _Sampled:
    from .sampling import combine_rewards, generate_completions, score_completions

    comps = generate_completions(
        model, tokenizer, prompts, num_samples, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
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
    procedures: Sequence[str] = PROCEDURES,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    accelerator=None,
    progress: bool = True,
) -> EvaluationResult:
    """Sample, score and compare: standard / BoN-N / WoN-N win rates and KL of `policy` against `reference`.

    Args:
        policy, reference: causal LMs or paths. They must share the tokenizer (the KL needs log π_ref of the
            policy's tokens). Passing the same object twice is allowed (k1 is then exactly 0).
        reward_funcs: reward model path(s), sequence-classification model(s) or callable(s), as for TRL's trainers;
            combined with `reward_weights` exactly as TRL does.
        prompts: list of prompts (strings or conversational message lists), or a `datasets.Dataset` with a `prompt`
            column (its other columns are passed to reward callables).
        tokenizer: the policy tokenizer (default: loaded from the policy's path).
        num_samples: m samples per prompt from each model; `ns` is filtered to N <= m.
        accelerator: an `Accelerator` / `PartialState` (default `PartialState()`): prompts are sharded across processes,
            per-prompt results gathered with `gather_object`; every process returns the same result.
        seed: sampling seed (offset per process and per model) and bootstrap seed.
    """
    from .sampling import load_reward_funcs

    state = resolve_process_state(accelerator)
    prompt_list, columns = _split_prompts(prompts)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    tokenizer = resolve_tokenizer(policy, tokenizer)
    tokenizer.padding_side = "left"
    same = reference is policy or (isinstance(reference, (str, Path)) and isinstance(policy, (str, Path)) and str(reference) == str(policy))
    policy_model = _load_causal_lm(policy, state.device)
    reference_model = policy_model if same else _load_causal_lm(reference, state.device)
    funcs, classes = load_reward_funcs(reward_funcs, reward_processing_classes)
    for f in funcs:
        if isinstance(f, torch.nn.Module):
            f.to(state.device)
    ns = [n for n in ns if int(n) <= num_samples]  # N <= m by construction
    _resolve_ns(ns, procedures, num_samples)  # validate before the expensive part

    local = _local_indices(state, len(prompt_list))
    local_prompts = [prompt_list[i] for i in local]
    local_columns = {k: [v[i] for i in local] for k, v in columns.items()}
    show = progress and state.is_main_process
    rank = getattr(state, "process_index", 0)
    kwargs = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if local_prompts:
        torch.manual_seed(seed * 1_000_003 + 2 * rank)
        pol = _sample_and_score(policy_model, tokenizer, local_prompts, local_columns, funcs, classes, reward_weights,
                                progress="Policy samples" if show else False, **kwargs)
        torch.manual_seed(seed * 1_000_003 + 2 * rank + 1)
        ref = _sample_and_score(reference_model, tokenizer, local_prompts, local_columns, funcs, classes, reward_weights,
                                progress="Reference samples" if show else False, **kwargs)
        lp, lr = _policy_sample_logps(policy_model, reference_model, tokenizer, pol.completions, num_samples, batch_size)
        pr, rr = pol.rewards, ref.rewards
    else:
        pr = rr = lp = lr = torch.zeros(0, num_samples, dtype=torch.float64)
    pr, rr, lp, lr = _gather_rows(state, local, pr, rr, lp, lr)
    metadata = {
        "policy": model_name(policy), "reference": model_name(reference), "num_samples": num_samples,
        "max_new_tokens": max_new_tokens, "seed": seed, "num_processes": getattr(state, "num_processes", 1),
    }
    return evaluate_scored(
        pr, rr, ns, procedures, lp, lr,
        num_bootstrap=num_bootstrap, confidence=confidence, seed=seed, metadata=metadata,
    )
