"""Step-0 calibration health check: exact under the null (false alarms ≤ 1e-4), and every gross mismatch of issue #11
(another reward scale, sampling settings, weights) raises before the second optimizer step of a real run."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from datasets import Dataset

from trl_infalign import CTRLConfig, CTRLGRPOConfig, CTRLGRPOTrainer, CTRLTrainer, build_reference_rewards
from trl_infalign.health import (
    DECISIVE_FACTOR,
    check_calibration_health,
    plan_extra_rounds,
    separation_p_value,
    step0_health_check,
)

from conftest import TINY_PROMPTS


# ------------------------------------------------------------------------------------------------------ statistics
def simulated_batch(rng, prompts, generations, references, levels=None, shift=0.0, duplicate=False):
    """Completions and references drawn from one distribution (plus `shift` for the completions); `levels` makes the
    rewards discrete (ties); `duplicate` gives every prompt the same reference row (one prompt repeated)."""
    def draw(size):
        return rng.integers(0, levels, size).astype(float) if levels else rng.standard_normal(size)

    rewards, rows, shared = [], [], None
    for _ in range(prompts):
        refs = shared if (duplicate and shared is not None) else draw(references).tolist()
        shared = refs
        rewards += (draw(generations) + shift).tolist()
        rows += [refs] * generations
    return rewards, rows


@pytest.mark.parametrize(
    "shape", [dict(prompts=4, generations=8, references=16), dict(prompts=2, generations=16, references=64, levels=12,
                                                                  duplicate=True), dict(prompts=8, generations=4, references=8, levels=3)],
)
def test_matched_batches_never_trip_the_check(shape):
    """3 × 1000 matched batches (continuous, tied, duplicated prompts): no p-value below 1e-4, and the p-values are
    not anti-conservative at 1e-2 either (the tests are exact or conservative)."""
    rng = np.random.default_rng(0)
    p_values = np.array([check_calibration_health(*simulated_batch(rng, **shape)).p_value for _ in range(1000)])
    assert (p_values < 1e-4).sum() == 0
    assert (p_values < 1e-2).mean() <= 0.02


@pytest.mark.parametrize(
    "case,make",
    [
        ("scaled reward 10r+3", lambda r: 10 * r + 3),
        ("offset reward r+2", lambda r: r + 2),
        ("negated reward", lambda r: -r - 1),
    ],
)
def test_gross_mismatches_are_detected(case, make):
    rng = np.random.default_rng(1)
    rewards, rows = simulated_batch(rng, prompts=4, generations=8, references=16)
    health = check_calibration_health([make(r) for r in rewards], rows)
    assert health.failed, (case, health.describe())


def test_statistics_are_exact_on_a_hand_computed_case():
    # references {0, 1, 2, 3}: rewards 1.0 (c = 3/8), 3.5 (c = 1), -2 (c = 0), 2 (c = 5/8)
    health = check_calibration_health([1.0, 3.5, -2.0, 2.0], [[0.0, 1.0, 2.0, 3.0]] * 4)
    assert health.mean_calibrated == pytest.approx((3 / 8 + 1 + 0 + 5 / 8) / 4)
    assert health.fraction_at_one == 0.25 and health.fraction_at_zero == 0.25
    assert health.num_strata == 1 and health.expected_fraction_at_edge == pytest.approx(1 / 5)
    # P(at least one of 4 completions above all 4 references) = 1 − C(4,0)... = 1 − P(top of 8 is a reference) = 1/2
    assert health.p_at_one == pytest.approx(0.5)
    assert not health.failed
    assert check_calibration_health([math.nan], [[1.0]]) is None


def test_complete_separation_p_value_and_the_plan_of_extra_rounds():
    """p of complete separation = 3 / C(G + K, G) per stratum (the top G of G + K exchangeable values are all
    completions): the issue's cases, 1 prompt x 4 completions vs K = 16 (p = 6.2e-4) and GRPO's 1 x 2 vs K = 8 (0.067),
    cannot fail the check at alpha = 1e-4 whatever the rewards; the plan adds rounds until they can."""
    above = check_calibration_health([100.0 + i for i in range(4)], [[float(k) for k in range(16)]] * 4)
    assert above.p_value == pytest.approx(3 / math.comb(20, 4)) == pytest.approx(6.19e-4, rel=1e-3)
    assert above.separation_p_value == pytest.approx(3 / math.comb(20, 4)) and not above.conclusive
    assert separation_p_value([(2, 8)]) == pytest.approx(3 / math.comb(10, 2)) == pytest.approx(0.0667, rel=1e-2)
    assert separation_p_value([(4, 16), (2, 8)]) == pytest.approx(3 / (math.comb(20, 4) * math.comb(10, 2)))
    target = 1e-4 / DECISIVE_FACTOR
    # one prompt x 4 vs K = 16: 1 more round gives 3/C(24, 8) = 4.1e-6 > 1e-6, 2 rounds 3/C(28, 12) = 9.9e-8
    assert 3 / math.comb(24, 8) > target > 3 / math.comb(28, 12)
    assert plan_extra_rounds([(4, 16)], 1e-4, max_rounds=10) == 2
    assert plan_extra_rounds([(4, 16)], 1e-4, max_rounds=1) == 1  # the cap: at least decisive at alpha itself
    assert plan_extra_rounds([(4, 16)], 1e-4, max_rounds=0) is None
    # GRPO G = 2 vs K = 8: the smallest n = 2(1 + r) with 3/C(n + 8, n) <= 1e-6
    n = next(n for n in range(2, 100, 2) if 3 / math.comb(n + 8, n) <= target)
    assert plan_extra_rounds([(2, 8)], 1e-4, max_rounds=50) == n // 2 - 1
    assert plan_extra_rounds([(40, 16)] * 4, 1e-4, max_rounds=10) == 0  # a real batch needs nothing


def test_drawing_extra_completions_keeps_the_false_alarm_rate():
    """The number of extra completions depends on the batch's shape only, so batch + extra is one test at alpha
    (no multiple-testing inflation): over 2000 matched small batches (1 prompt x 4 vs K = 16, continuous and tied),
    each topped up by the plan to 12 completions, every check is conclusive and the p-values are not
    anti-conservative at 1e-2, 1e-3 or 1e-4 (bounds a few binomial sd above the nominal rates: 40, 6 and 1 of 2000)."""
    rng = np.random.default_rng(3)
    results = []
    for levels in (None, 6):
        def draw(size):
            return rng.integers(0, levels, size).astype(float) if levels else rng.standard_normal(size)

        for _ in range(1000):
            refs = draw(16).tolist()
            results.append(step0_health_check(draw(4), [refs] * 4, draw=lambda rounds: draw(4 * rounds),
                                              max_extra_completions=256))
    p_values = np.array([h.p_value for h in results])
    assert all(h.conclusive and h.extra_completions == 8 for h in results)
    assert (p_values < 1e-2).sum() <= 40 and (p_values < 1e-3).sum() <= 6 and (p_values < 1e-4).sum() <= 1


# ------------------------------------------------------------------------------------------------------ end to end
def length_reward(completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


def scaled_length_reward(completions, **kwargs):  # the same reward model, re-scaled: 10 r + 3
    return [10 * r + 3 for r in length_reward(completions)]


@pytest.fixture(scope="module")
def references(tiny):
    path, tokenizer = tiny
    prompts = Dataset.from_dict({"prompt": TINY_PROMPTS * 2})
    built = {
        tokens: build_reference_rewards(prompts, path, length_reward, num_samples=16, max_new_tokens=tokens, seed=5,
                                        progress=False, tokenizer=tokenizer)
        for tokens in (2, 6)
    }
    return path, tokenizer, built


def train(tmp_path, references, reward=length_reward, tokens=6, build_tokens=6, **overrides):
    path, tokenizer, built = references
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=4, max_completion_length=tokens,
        max_steps=2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        transform="identity", beta=0.5, disable_tqdm=True, reference_provenance_check="off",
    )
    kwargs.update(overrides)
    trainer = CTRLTrainer(model=path, reward_funcs=reward, args=CTRLConfig(**kwargs),
                          train_dataset=built[build_tokens], processing_class=tokenizer)
    trainer.train()
    return trainer


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matched_run_passes_the_check(tmp_path, references, seed):
    trainer = train(tmp_path, references, seed=seed)
    assert trainer.ctrl_calibration_health is not None and not trainer.ctrl_calibration_health.failed
    assert trainer.state.global_step == 2


@pytest.mark.parametrize(
    "reward,build_tokens,what",
    [(scaled_length_reward, 6, "10r + 3 reward"), (length_reward, 2, "references with max_new_tokens=2, training 6")],
)
def test_mismatched_references_raise_before_the_second_step(tmp_path, references, reward, build_tokens, what):
    with pytest.raises(ValueError, match=r"Calibration check failed at step 0.*'ref_rewards'.*calibration_check='warn'"):
        train(tmp_path, references, reward=reward, build_tokens=build_tokens)


def test_warn_and_off_let_a_mismatched_run_train(tmp_path, references):
    with pytest.warns(UserWarning, match="Calibration check failed"):
        trainer = train(tmp_path / "warn", references, reward=scaled_length_reward, calibration_check="warn")
    assert trainer.state.global_step == 2 and trainer.ctrl_calibration_health.failed
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        # the config's advice that identity is behind for the default Best-of-4 deployment is not this test's business
        warnings.filterwarnings("ignore", message=".*does not align for inference_procedure", category=UserWarning)
        trainer = train(tmp_path / "off", references, reward=scaled_length_reward, calibration_check="off")
    assert trainer.ctrl_calibration_health is None


def test_resumed_run_skips_the_check(tmp_path, references, monkeypatch):
    """After a resume the policy is no longer the reference: the check must not run, nor draw completions.
    (A resume with another reward, which the check would have flagged, is refused by the run record:
    tests/test_ctrl_trainer.py::test_resume_refuses_another_run_naming_each_difference.)"""
    first = train(tmp_path, references, max_steps=1, save_strategy="steps", save_steps=1)
    assert first.ctrl_calibration_health is not None
    path, tokenizer, built = references
    args = CTRLConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=4, max_completion_length=6,
        max_steps=2, save_strategy="no", report_to="none", use_cpu=True, bf16=False, transform="identity", beta=0.5,
        disable_tqdm=True, reference_provenance_check="off",
    )
    resumed = CTRLTrainer(model=path, reward_funcs=length_reward, args=args, train_dataset=built[6],
                          processing_class=tokenizer)
    calls = []
    monkeypatch.setattr(resumed, "_check_calibration_health", lambda *a, **k: calls.append(a))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2 and resumed.ctrl_calibration_health is None and calls == []


# ----------------------------------------------------------------------------------------- small batches (issue 20.1)
def shifted_length_reward(completions, **kwargs):  # references built with r, training with r + 100
    return [r + 100 for r in length_reward(completions)]


def small_batch_args(tmp_path, config_class=CTRLConfig, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        transform="identity", beta=0.5, disable_tqdm=True, reference_provenance_check="off", seed=0,
    )
    kwargs.update(overrides)
    return config_class(**kwargs)


def small_batch_run(tmp_path, references, reward, trainer_class=CTRLTrainer, k=16, **overrides):
    path, tokenizer, built = references
    dataset = built[6] if k == 16 else built[6].map(lambda row: {"ref_rewards": row["ref_rewards"][:k]})
    config_class = CTRLGRPOConfig if trainer_class is CTRLGRPOTrainer else CTRLConfig
    trainer = trainer_class(model=path, reward_funcs=reward, args=small_batch_args(tmp_path, config_class, **overrides),
                            train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer


GRPO_SMALL = dict(trainer_class=CTRLGRPOTrainer, k=8, per_device_train_batch_size=2, num_generations=2)


@pytest.mark.parametrize("setup", [{}, GRPO_SMALL], ids=["rloo 1x4 K=16", "grpo 1x2 K=8"])
def test_every_completion_beating_every_reference_raises_at_step_0_on_a_small_batch(tmp_path, references, setup):
    """The first batch alone could not fail the check (p >= 6e-4); the trainer draws the completions it needs from
    the policy (still the reference) and raises before the first optimizer step."""
    with pytest.raises(ValueError, match=r"Calibration check failed at step 0.*100.0% of completions above every "
                                         r"reference.*drawn for the check"):
        small_batch_run(tmp_path, references, shifted_length_reward, **setup)


@pytest.mark.parametrize("setup", [{}, GRPO_SMALL], ids=["rloo 1x4 K=16", "grpo 1x2 K=8"])
def test_matched_small_batch_draws_extra_completions_and_passes(tmp_path, references, setup):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer = small_batch_run(tmp_path, references, length_reward, **setup)
    health = trainer.ctrl_calibration_health
    assert trainer.state.global_step == 1 and not health.failed and health.conclusive
    assert health.extra_completions > 0 and health.num_completions > 4
    # the extra draws left TRL's bookkeeping alone: the same token count and completion metrics as the same run
    # without the check (the first batch is generated before the draws, so it is the same batch)
    unchecked = small_batch_run(tmp_path / "off", references, length_reward, calibration_check="off", **setup)
    assert trainer.state.num_input_tokens_seen == unchecked.state.num_input_tokens_seen
    keys = ("num_tokens", "completions/mean_length", "completions/max_length", "completions/clipped_ratio")
    logged, expected = ({k: t.state.log_history[0][k] for k in keys} for t in (trainer, unchecked))
    assert logged == expected


def test_inconclusive_check_warns_naming_the_setting_and_trains(tmp_path, references):
    with pytest.warns(UserWarning, match=r"Calibration check inconclusive at step 0.*p = 0.00062.*"
                                         r"CTRLConfig.calibration_check_max_samples=0.*set "
                                         r"CTRLConfig.calibration_check_max_samples to at least 4"):
        trainer = small_batch_run(tmp_path, references, shifted_length_reward, calibration_check_max_samples=0)
    assert trainer.state.global_step == 1 and not trainer.ctrl_calibration_health.conclusive
