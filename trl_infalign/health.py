r"""Step-0 calibration health check: are the reference rewards made the way this run makes its rewards?

At step 0 of a fresh run the policy *is* the reference policy, so a completion and the K reference samples of its
prompt are exchangeable draws of the same reward distribution — if, and only if, the references were sampled and
scored the way the trainer samples and scores (same model, reward functions and weights, prompt formatting,
sampling settings).  Its calibrated reward c = (#{ref < r} + ½ #{ref = r}) / K is then ≈ Uniform[0, 1].  Three exact,
distribution-free tests on the first generation batch detect the usual mismatches:

* **rank sum** (Mann–Whitney): in each stratum (the completions that share one reference row, so duplicated prompts
  are pooled rather than counted as independent) U = K·Σ_i c_i has, under exchangeability, mean G·K/2 and the
  tie-corrected variance G·K/12·[(N + 1) − Σ_t (t³ − t)/(N(N − 1))], N = G + K.  Strata are independent, so
  z = Σ(U − G·K/2) / √Σ Var is ≈ N(0, 1) (two-sided p-value);
* **mass at 1** and **mass at 0**: the number of completions strictly above (below) every reference.  Without ties,
  P(count ≥ j) = C(G, j) / C(G + K, j) (the top j of the pooled G + K are all completions); ties only make "strictly
  above" rarer, so the p-value of the total over strata (exact convolution) is conservative.

The check fails when the smallest p-value is below α/3 (Bonferroni over the three tests); α = 1e-4 by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_FALSE_ALARM_RATE = 1e-4


@dataclass
class CalibrationHealth:
    """Statistics of one batch of step-0 calibrated rewards and the three p-values (see the module docstring)."""

    num_completions: int
    num_strata: int
    mean_calibrated: float
    expected_sd: float  # sd of the mean calibrated reward under the null
    fraction_at_one: float
    fraction_at_zero: float
    expected_fraction_at_edge: float  # Σ G/(K+1) / Σ G: the null rate without ties (an upper bound with ties)
    p_rank_sum: float
    p_at_one: float
    p_at_zero: float
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE

    @property
    def p_value(self) -> float:
        """Bonferroni-combined p-value of the three tests."""
        return min(1.0, 3.0 * min(self.p_rank_sum, self.p_at_one, self.p_at_zero))

    @property
    def failed(self) -> bool:
        return self.p_value < self.false_alarm_rate

    def describe(self) -> str:
        return (
            f"mean calibrated reward {self.mean_calibrated:.3f} (expected 0.500 ± {self.expected_sd:.3f}), "
            f"{100 * self.fraction_at_one:.1f}% of completions above every reference reward and "
            f"{100 * self.fraction_at_zero:.1f}% below every one (expected at most "
            f"{100 * self.expected_fraction_at_edge:.1f}% each), over {self.num_completions} completions of "
            f"{self.num_strata} prompt(s); p = {self.p_value:.2g} (rank sum {self.p_rank_sum:.2g}, mass at 1 "
            f"{self.p_at_one:.2g}, mass at 0 {self.p_at_zero:.2g})"
        )


def _edge_count_pmf(g: int, k: int) -> np.ndarray:
    """P(count = j), j = 0..g, of completions above every reference, exchangeable and untied: a_j − a_{j+1} with
    a_j = C(g, j)/C(g + k, j)."""
    a = np.ones(g + 2)
    for j in range(1, g + 1):
        a[j] = a[j - 1] * (g - j + 1) / (g + k - j + 1)
    a[g + 1] = 0.0
    return np.clip(a[:-1] - a[1:], 0.0, 1.0)


def _upper_tail(pmfs: list[np.ndarray], observed: int) -> float:
    total = np.ones(1)
    for pmf in pmfs:
        total = np.convolve(total, pmf)
    return float(min(1.0, total[observed:].sum())) if observed < total.size else 0.0


def check_calibration_health(
    rewards, reference_rows, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE
) -> CalibrationHealth | None:
    """Test the completions' rewards against their reference rewards (the step-0 null: exchangeable draws).

    Args:
        rewards: one combined raw reward per completion (NaN = unscored, ignored).
        reference_rows: per completion, its prompt's reference rewards (non-finite values ignored).
    Returns None when no completion has both a finite reward and at least one reference.
    """
    strata: dict[tuple, list[float]] = {}
    for reward, row in zip(np.asarray(rewards, dtype=np.float64).tolist(), reference_rows):
        if math.isfinite(reward):
            refs = tuple(v for v in (float(x) for x in row) if math.isfinite(v))
            if refs:
                strata.setdefault(refs, []).append(reward)
    if not strata:
        return None
    excess = variance = sum_c = 0.0
    top = bottom = completions = 0
    edge_expected = 0.0
    pmfs = []
    for refs, values in strata.items():
        r = np.sort(np.asarray(refs))
        y = np.asarray(values)
        g, k = y.size, r.size
        below = np.searchsorted(r, y, side="left")
        ties = np.searchsorted(r, y, side="right") - below
        u = float(np.sum(below + 0.5 * ties))
        n = g + k
        _, tie_counts = np.unique(np.concatenate([r, y]), return_counts=True)
        tie_term = float(np.sum(tie_counts.astype(np.float64) ** 3 - tie_counts)) / (n * (n - 1)) if n > 1 else 0.0
        excess += u - g * k / 2.0
        variance += g * k / 12.0 * ((n + 1) - tie_term)
        sum_c += u / k
        top += int(np.sum(y > r[-1]))
        bottom += int(np.sum(y < r[0]))
        completions += g
        edge_expected += g / (k + 1)
        pmfs.append(_edge_count_pmf(g, k))
    if variance > 0:
        z = excess / math.sqrt(variance)
        p_rank = math.erfc(abs(z) / math.sqrt(2.0))
    else:  # every value tied: nothing to rank
        p_rank = 1.0
    # sd of the mean calibrated reward: Var(Σ c) = Σ Var(U)/K², with one K per stratum
    sd = math.sqrt(sum(
        len(values) * len(refs) / 12.0 * (len(values) + len(refs) + 1) / len(refs) ** 2 for refs, values in strata.items()
    )) / completions
    return CalibrationHealth(
        num_completions=completions,
        num_strata=len(strata),
        mean_calibrated=sum_c / completions,
        expected_sd=sd,
        fraction_at_one=top / completions,
        fraction_at_zero=bottom / completions,
        expected_fraction_at_edge=edge_expected / completions,
        p_rank_sum=p_rank,
        p_at_one=_upper_tail(pmfs, top),
        p_at_zero=_upper_tail(pmfs, bottom),
        false_alarm_rate=false_alarm_rate,
    )


def calibration_check_message(health: CalibrationHealth, column: str) -> str:
    return (
        f"Calibration check failed at step 0: the policy is still the reference policy, so the calibrated rewards "
        f"against the reference rewards in column {column!r} should be ≈ Uniform[0, 1], but the first batch has "
        f"{health.describe()}. The reference rewards were not made the way this run makes its rewards; likely "
        "causes: (1) other reward functions, reward-model weights or reward_weights than the ones that scored the "
        "references (a scale or offset change puts every c at 0 or 1); (2) other sampling settings "
        "(max_completion_length vs the references' max_new_tokens, temperature, top_p, top_k); (3) other prompt "
        "formatting (chat template vs plain text); (4) the model being trained is not the reference policy. Fix: "
        "rebuild the references with `build_reference_rewards` / `trl-infalign build-reference` using this run's "
        "model, reward functions, weights and sampling settings. If the difference is intended, set "
        "CTRLConfig.calibration_check='warn' (or 'off'). Nothing has been trained yet."
    )
