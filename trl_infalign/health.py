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

**Can the check decide?** Its strongest evidence is complete separation (every completion above, or below, every
reference of its prompt), whose p-value is

    p_sep = 3 · Π_s C(G_s + K_s, G_s)⁻¹.

When p_sep ≥ α no outcome of the batch can fail the check: one prompt × 4 completions against K = 16 references gives
p_sep = 3/4845 = 6.2e-4, so a run whose every completion beats every reference trains silently. The trainer therefore
plans, from the batch's shape alone (the G_s and K_s, never the rewards), how many more rounds of completions of the
same prompts it needs — drawn from the policy while it is still the reference, and scored by the run's reward
functions, exactly as TRL draws and scores training completions — for p_sep ≤ α/100 (so near-complete separation is
caught too), or at least p_sep < α, within `calibration_check_max_samples` (:func:`plan_extra_rounds`). The test then
runs once, on the batch plus those completions. Because the number of extra completions does not depend on the
rewards, this is one test at level α, with no multiple-testing correction. When not even that can decide, the check
says so (:func:`inconclusive_message`). Several rewards (one check per reward) share the drawn completions; called
with `false_alarm_rate = α/J` each (Bonferroni over the J rewards), the run's false-alarm rate stays ≤ α.
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

DEFAULT_FALSE_ALARM_RATE = 1e-4
#: The trainer draws extra completions until complete separation would give p ≤ α / DECISIVE_FACTOR.
DECISIVE_FACTOR = 100.0


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
    separation_p_value: float = 0.0  # p of complete separation on these strata: the smallest p the check can give
    extra_completions: int = 0  # completions drawn for the check beyond the training batch
    label: str | None = None  # the reward checked (several rewards: one check each)
    batch_shape: list | None = None  # (G_s, K_s) of the training batch's strata, before any extra completions

    @property
    def conclusive(self) -> bool:
        """Whether the batch could fail the check at all (complete separation would be significant)."""
        return self.separation_p_value < self.false_alarm_rate

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
            f"{100 * self.expected_fraction_at_edge:.1f}% each), over {self.num_completions} completions"
            + (f" ({self.extra_completions} of them drawn for the check)" if self.extra_completions else "")
            + f" of {self.num_strata} prompt(s); p = {self.p_value:.2g} (rank sum {self.p_rank_sum:.2g}, mass at 1 "
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


def _strata(rewards, reference_rows) -> dict[tuple, list[float]]:
    """Completions grouped by their (finite) reference row: duplicated prompts form one stratum."""
    strata: dict[tuple, list[float]] = {}
    for reward, row in zip(np.asarray(rewards, dtype=np.float64).tolist(), reference_rows):
        if math.isfinite(reward):
            refs = tuple(v for v in (float(x) for x in row) if math.isfinite(v))
            if refs:
                strata.setdefault(refs, []).append(reward)
    return strata


def separation_p_value(shape) -> float:
    """p-value of complete separation, 3 · Π_s C(G_s + K_s, G_s)⁻¹, for strata `shape` = [(G_s, K_s), ...]:
    the smallest p-value the check can return on such a batch (module docstring)."""
    log_p = math.log(3.0)
    for g, k in shape:
        log_p -= math.lgamma(g + k + 1) - math.lgamma(g + 1) - math.lgamma(k + 1)
    return min(1.0, math.exp(log_p))


def batch_shape(rewards, reference_rows) -> list[tuple[int, int]]:
    """(G_s, K_s) of each stratum: completions with a finite reward, and the number of finite references."""
    return [(len(values), len(refs)) for refs, values in _strata(rewards, reference_rows).items()]


def plan_extra_rounds(shape, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE, max_rounds: int = 0) -> int | None:
    """How many more rounds of the batch (each adds the batch's G_s completions to every stratum) the check needs.

    The smallest r ≤ `max_rounds` with p_sep ≤ α / `DECISIVE_FACTOR` on strata (G_s·(1 + r), K_s); else the smallest
    with p_sep < α; None when no r ≤ `max_rounds` can decide. Depends on the batch's shape only, not on its rewards.
    """
    if not shape:
        return None
    ps = [separation_p_value([(g * (1 + r), k) for g, k in shape]) for r in range(max_rounds + 1)]
    for target in (false_alarm_rate / DECISIVE_FACTOR, false_alarm_rate * (1 - 1e-12)):
        for rounds, p in enumerate(ps):
            if p <= target:
                return rounds
    return None


def completions_needed(shape, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE, limit: int = 10**6) -> int | None:
    """Completions (batch included) for the check to decide at all (p_sep < α), adding rounds of the batch; None when
    more than `limit` would be needed."""
    size = sum(g for g, _ in shape)
    rounds = 0
    while size * (1 + rounds) <= limit:
        if separation_p_value([(g * (1 + rounds), k) for g, k in shape]) < false_alarm_rate:
            return size * (1 + rounds)
        rounds = max(rounds + 1, int(rounds * 1.25))
    return None


def check_calibration_health(
    rewards, reference_rows, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE
) -> CalibrationHealth | None:
    """Test the completions' rewards against their reference rewards (the step-0 null: exchangeable draws).

    Args:
        rewards: one combined raw reward per completion (NaN = unscored, ignored).
        reference_rows: per completion, its prompt's reference rewards (non-finite values ignored).
    Returns None when no completion has both a finite reward and at least one reference.
    """
    strata = _strata(rewards, reference_rows)
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
        separation_p_value=separation_p_value([(len(v), len(r)) for r, v in strata.items()]),
    )


def step0_health_check(
    rewards, reference_rows, draw=None, max_extra_completions: int = 0, label: str | None = None,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
) -> CalibrationHealth | None:
    """The trainer's step-0 check of one reward: gather the evidence the test needs, then test once.

    Args:
        rewards: the batch's raw rewards for this reward (gathered over processes; NaN = unscored).
        reference_rows: per completion, its prompt's reference rewards for this reward.
        draw: `draw(rounds)` → `rounds` more rounds of the batch's completions (the same prompts, in the batch's
            order, drawn from the policy while it is the reference) scored with this reward: `rounds · len(rewards)`
            values. None when no more completions can be drawn.
        max_extra_completions: at most this many extra completions (`calibration_check_max_samples`).
        label: the reward's name, kept in the result for the messages.
    Every process must call it with the same (gathered) values: the decision is then the same everywhere.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    shape = batch_shape(rewards, reference_rows)
    if not shape:
        return None
    max_rounds = max_extra_completions // max(len(rewards), 1) if draw is not None else 0
    rounds = plan_extra_rounds(shape, false_alarm_rate, max_rounds) or 0
    rows = list(reference_rows)
    if rounds:
        extra = np.asarray(draw(rounds), dtype=np.float64).reshape(-1)
        rewards = np.concatenate([rewards, extra])
        rows = rows * (1 + rounds)
    health = check_calibration_health(rewards, rows, false_alarm_rate)
    if health is not None:
        health.extra_completions = rounds * len(reference_rows)
        health.label = label
        health.batch_shape = shape
    return health


#: Why no completions can be drawn when the reward step runs outside TRL's generation (a direct call).
NOT_AT_HAND = "the reward step was called outside TRL's generation, so the batch's prompts are not at hand"


def report_calibration_health(health: CalibrationHealth | None, args, unavailable: str | None = None) -> None:
    """Act on a step-0 result as `args.calibration_check` says: a failed check raises (`raise`) or warns (`warn`);
    an inconclusive one always warns, naming why and the setting to change."""
    if health is None:
        return
    config_name = type(args).__name__
    if health.failed:
        message = calibration_check_message(health, args.reference_rewards_column, config_name)
        if args.calibration_check == "raise":
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    elif not health.conclusive:
        warnings.warn(
            inconclusive_message(health, args.reference_rewards_column, args.calibration_check_max_samples,
                                 config_name, unavailable=unavailable, shape=health.batch_shape),
            UserWarning, stacklevel=3,
        )


def _for_reward(health: CalibrationHealth) -> str:
    return f" for reward {health.label!r}" if health.label else ""


def calibration_check_message(health: CalibrationHealth, column: str, config_name: str = "CTRLConfig") -> str:
    return (
        f"Calibration check failed at step 0{_for_reward(health)}: the policy is still the reference policy, so the "
        f"calibrated rewards against the reference rewards in column {column!r} should be ≈ Uniform[0, 1], but the "
        "first batch has "
        f"{health.describe()}. The reference rewards were not made the way this run makes its rewards; likely "
        "causes: (1) other reward functions, reward-model weights or reward_weights than the ones that scored the "
        "references (a scale or offset change puts every c at 0 or 1); (2) other sampling settings "
        "(max_completion_length vs the references' max_new_tokens, temperature, top_p, top_k); (3) other prompt "
        "formatting (chat template vs plain text); (4) the model being trained is not the reference policy. Fix: "
        "rebuild the references with `build_reference_rewards` / `trl-infalign build-reference` using this run's "
        "model, reward functions, weights and sampling settings. If the difference is intended, set "
        f"{config_name}.calibration_check='warn' (or 'off'). Nothing has been trained yet."
    )


def inconclusive_message(health: CalibrationHealth, column: str, max_samples: int, config_name: str = "CTRLConfig",
                         unavailable: str | None = None, shape=None) -> str:
    """Why the step-0 check could not decide, and which setting to change."""
    if unavailable:
        why = f"no extra completions could be drawn for the check ({unavailable})"
    else:
        why = (f"{config_name}.calibration_check_max_samples={max_samples} allows too few extra completions "
               f"({health.extra_completions} drawn)")
    needed = completions_needed(shape, health.false_alarm_rate) if shape else None
    fix = (
        f"set {config_name}.calibration_check_max_samples to at least {needed - health.num_completions + health.extra_completions}, "
        if needed is not None and not unavailable else ""
    )
    return (
        f"Calibration check inconclusive at step 0{_for_reward(health)}: even if every completion had beaten (or lost "
        f"to) every reference reward in column {column!r}, the test could only reach p = "
        f"{health.separation_p_value:.2g}, not below its false-alarm rate {health.false_alarm_rate:.2g}, so it cannot "
        f"tell whether the reference rewards were made the way this run makes its rewards. Why: {health.num_completions} "
        f"completions of {health.num_strata} prompt(s), and {why}. Fix: {fix}use a larger per_device_train_batch_size "
        "or more reference samples per prompt (build_reference_rewards(num_samples=...)), or keep the provenance "
        "column of build_reference_rewards in the dataset (checked at construction). Training continues unchecked "
        f"({config_name}.calibration_check='off' silences this)."
    )


# ---------------------------------------------------------------------------------------------------------------------
# The trainer's side: more completions of the first batch, drawn and scored exactly as TRL does
class Step0Batch:
    """The first training batch (its local inputs and the prompts TRL generated from) and the extra rounds of it
    drawn for the check.

    A round samples the batch's prompts again with the trainer's own generation (`trainer._ctrl_sample`: TRL's
    `_generate`, so the sampling settings, EOS handling and backend are the training ones) and scores them with its
    own reward step (`trainer._ctrl_score`: TRL's `_calculate_rewards`, gathered over processes). Every process
    draws the same number of rounds (the plan is made from gathered values), which the collectives inside need.
    Rounds are drawn once and shared by every reward's check. TRL's generation metrics, the token count and the reward
    functions' `log_extra` / `log_metric` calls are left as they were.
    """

    def __init__(self, inputs):
        self.inputs = inputs
        self.prompts = None
        self.rounds: list = []

    def keep_prompts(self, prompts) -> None:
        if self.prompts is None:
            self.prompts = copy.deepcopy(prompts)

    def unavailable(self, trainer) -> str | None:
        """Why no round can be drawn, or None."""
        if self.prompts is None or not self.inputs:
            return NOT_AT_HAND
        if any(key in self.inputs[0] for key in ("image", "images")):
            return "multimodal prompts"
        for name in ("rollout_func", "tools", "environment_factories"):
            if getattr(trainer, name, None):
                return f"{name} is set: a rollout cannot be repeated without side effects"
        return None

    def draw(self, trainer, rounds: int):
        """The reward matrix of `rounds` rounds, (rounds · batch, num_reward_funcs), in the batch's order."""
        import torch

        while len(self.rounds) < rounds:
            with _quiet(trainer):
                completion_ids, completions = trainer._ctrl_sample(copy.deepcopy(self.prompts))
                self.rounds.append(trainer._ctrl_score(self.inputs, self.prompts, completions, completion_ids))
        return torch.cat(self.rounds[:rounds]) if rounds else torch.zeros(0, len(trainer.reward_funcs))


@contextmanager
def _quiet(trainer):
    """Restore the trainer's metrics and token count afterwards; reward-function logging goes nowhere meanwhile."""
    metrics = {mode: {k: list(v) for k, v in values.items()} for mode, values in trainer._metrics.items()}
    tokens = trainer.state.num_input_tokens_seen
    trainer._log_completion_extra = lambda column, values: None
    trainer._log_metric = lambda name, value: None
    try:
        yield
    finally:
        del trainer._log_completion_extra, trainer._log_metric
        trainer.state.num_input_tokens_seen = tokens
        for mode, values in metrics.items():
            trainer._metrics[mode].clear()
            trainer._metrics[mode].update(values)
