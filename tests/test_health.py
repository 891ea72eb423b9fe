"""Step-0 calibration health check: exact under the null (false alarms ≤ 1e-4), and every gross mismatch of issue #11
(another reward scale, sampling settings, weights) raises before the second optimizer step of a real run."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from datasets import Dataset

from trl_infalign import CTRLConfig, CTRLTrainer, build_reference_rewards
from trl_infalign.health import check_calibration_health

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
