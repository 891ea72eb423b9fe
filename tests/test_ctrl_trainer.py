"""CTRLConfig validation, the reward hand-off to RLOO on hand-computed cases, the model card and Hub failures."""

import json
import math

import pytest
import torch
from datasets import Dataset

from trl_infalign import CTRLConfig, CTRLTrainer, HubUploadError, get_procedure, get_transform, theory

PROMPTS = ["the movie was", "this film is", "the plot felt", "the cast was"]



def config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
        max_steps=2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        transform="bon:t=2", beta=0.5, min_reference_samples=2, disable_tqdm=True,
    )
    kwargs.update(overrides)
    return CTRLConfig(**kwargs)


def dataset(k=4):
    return Dataset.from_dict({"prompt": PROMPTS, "ref_rewards": [[float(j) for j in range(k)] for _ in PROMPTS]})


# ---------------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"inference_procedure": "top-k"}, "inference_procedure"),
        ({"inference_n": 0}, "inference_n"),
        ({"inference_procedure": "standard", "inference_n": 4}, "inference_n=1"),
        ({"transform": "nope"}, "transform"),
        ({"transform": "bon:t=-1"}, "transform"),
        ({"kl_budget": -0.5}, "kl_budget"),
        ({"kl_budget": float("nan")}, "kl_budget"),
        ({"beta": 0.0}, "beta"),
        ({"num_reference_samples": 0}, "num_reference_samples"),
        ({"min_reference_samples": 0}, "min_reference_samples"),
        ({"nonfinite_rewards": "ignore"}, "nonfinite_rewards"),
        ({"reference_rewards_column": ""}, "reference_rewards_column"),
        ({"transform": "lsc", "kl_budget": 0.5, "kl_control": "fixed"}, "kl_budget"),
        ({"kl_control": "adaptive"}, "kl_control"),
    ],
)
def test_invalid_config_names_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        config(tmp_path, **overrides)


def test_auto_transform_resolution(tmp_path):
    assert config(tmp_path, transform="auto", inference_procedure="standard", inference_n=1).resolved_transform == "identity"

    budgeted = config(tmp_path, transform="auto", inference_procedure="bon", inference_n=4, kl_budget=0.5)
    best = theory.best_t("bon", 4, 0.5)
    assert budgeted.resolved_transform.startswith("bon:t=")
    assert get_transform(budgeted.resolved_transform).params["t"] == pytest.approx(best.t, rel=1e-5)
    assert budgeted.beta == pytest.approx(best.beta)
    assert theory.kl_divergence(budgeted.resolved_transform, budgeted.beta) == pytest.approx(0.5, abs=1e-3)

    at_beta = config(tmp_path, transform="auto", inference_procedure="won", inference_n=4, beta=0.3)
    assert at_beta.resolved_transform.startswith("won:t=") and at_beta.beta == 0.3

    fixed = config(tmp_path, transform="bon:t=5", kl_budget=0.3)
    assert theory.kl_divergence("bon:t=5", fixed.beta) == pytest.approx(0.3, abs=1e-3)

    optimal = config(tmp_path, transform="optimal", inference_procedure="won", inference_n=2, beta=0.2)
    assert optimal.resolved_transform == "optimal:procedure=won,n=2,beta=0.2"


def test_optimal_spec_parameters_are_kept_or_their_override_announced(tmp_path):
    """issue 20: `optimal:procedure=bon,n=4,beta=0.1` with kl_budget=0.5 silently became beta=0.216613, and a
    `procedure=won` inside it silently became bon.  Now the budget's beta replaces the spec's with a warning naming
    both, the spec's procedure is kept (a mismatch with inference_procedure warns with the cost), and without a budget
    the spec's beta is the trainer's."""
    import warnings

    common = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    budget_beta = theory.optimal_policy("bon:n=4", kl=0.5).beta
    with pytest.warns(UserWarning, match=r"beta=0.1 in transform='optimal:procedure=bon,n=4,beta=0.1' is replaced by "
                      + f"{budget_beta:.6g}"):
        cfg = CTRLConfig(**common, transform="optimal:procedure=bon,n=4,beta=0.1", kl_budget=0.5)
    assert cfg.beta == pytest.approx(budget_beta) and cfg.resolved_transform == f"optimal:procedure=bon,n=4,beta={budget_beta:.6g}"

    won = theory.optimal_policy("won:n=4", kl=0.5)
    with pytest.warns(UserWarning, match="optimal transform for Worst-of-4, but inference_procedure='bon'") as record:
        cfg = CTRLConfig(**common, inference_procedure="bon", transform="optimal:procedure=won,n=4", kl_budget=0.5)
    assert cfg.resolved_transform == f"optimal:procedure=won,n=4,beta={won.beta:.6g}" and cfg.beta == pytest.approx(won.beta)
    message = str(next(w.message for w in record if "optimal transform for" in str(w.message)))
    given, best = won.win_rate("bon:n=4"), theory.best_t("bon:n=4", kl=0.5).win_rate
    assert f"{given:.3f}" in message and f"{best:.3f}" in message and given < best - 0.1

    with warnings.catch_warnings():  # no budget: the spec's beta is the trainer's, nothing is overridden
        warnings.simplefilter("error", UserWarning)
        cfg = CTRLConfig(**common, transform="optimal:procedure=bon,n=4,beta=0.1")
        assert (cfg.beta, cfg.resolved_transform) == (0.1, "optimal:procedure=bon,n=4,beta=0.1")
        cfg = CTRLConfig(**common, transform="optimal", kl_budget=0.5)  # the config's own procedure: no warning
        assert cfg.resolved_transform == f"optimal:procedure=bon,n=4,beta={budget_beta:.6g}"
    with pytest.raises(ValueError, match=r"optimal transform at beta=0.1, but CTRLConfig.beta=0.3"):
        CTRLConfig(**common, transform="optimal:procedure=bon,n=4,beta=0.1", beta=0.3)


@pytest.mark.parametrize("transform,procedure", [("log", "won"), ("identity", "won"), ("identity", "bon:n=16"),
                                                 ("log", "bon:n=4")])
def test_calibrated_transforms_that_miss_the_deployment_warn_with_the_cost(tmp_path, transform, procedure):
    """issue 20: `log` for won warned nothing while `bon:t` did.  Every calibrated transform whose theory win rate
    for the deployment is clearly below auto's at the same KL warns, with both numbers."""
    common = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    with pytest.warns(UserWarning, match=f"does not align for inference_procedure='{procedure}'") as record:
        CTRLConfig(**common, inference_procedure=procedure, transform=transform, kl_budget=0.5)
    message = str(next(w.message for w in record if "does not align" in str(w.message)))
    given = theory.policy(transform, theory.beta_for_kl(transform, 0.5)).win_rate(get_procedure(procedure))
    best = theory.best_t(get_procedure(procedure), kl=0.5).win_rate
    assert f"{given:.3f}" in message and f"{best:.3f}" in message and given < best - 0.01


def test_transforms_that_fit_the_deployment_do_not_warn(tmp_path):
    import warnings

    common = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        CTRLConfig(**common, inference_procedure="bon", transform="bon:t=5", kl_budget=0.5)  # its own family
        CTRLConfig(**common, inference_procedure="won", transform="auto", kl_budget=0.5)
        CTRLConfig(**common, inference_procedure="standard", inference_n=1, transform="identity", kl_budget=0.5)


# ------------------------------------------------------------------------------------------------- reward hand-off
def make_trainer(tmp_path, tiny, reward_funcs, ds=None, **overrides):
    path, tokenizer = tiny
    trainer = CTRLTrainer(
        model=path, reward_funcs=reward_funcs, args=config(tmp_path, **overrides), train_dataset=ds or dataset(),
        processing_class=tokenizer,
    )
    trainer.model.train()  # metrics of direct `_calculate_rewards` calls go to the "train" bucket
    return trainer


def test_rewards_are_transformed_calibrated_values(tmp_path, tiny):
    """Hand-computed: references {0,1,2,3}; rewards 1.0, 3.5, -2, 2 → c = 3/8, 1, 0, 5/8 → Φ = exp(2c)."""
    raw = [1.0, 3.5, -2.0, 2.0]
    trainer = make_trainer(tmp_path, tiny, lambda completions, **kw: raw[: len(completions)], normalize_transform=False)
    inputs = [{"prompt": p, "ref_rewards": [0.0, 1.0, 2.0, 3.0]} for p in PROMPTS]
    out = trainer._calculate_rewards(inputs, PROMPTS, ["a", "b", "c", "d"], [[1], [2], [3], [4]])
    expected = torch.exp(2 * torch.tensor([3 / 8, 1.0, 0.0, 5 / 8]))
    assert out.shape == (4, 1)
    torch.testing.assert_close(out[:, 0], expected)
    metrics = trainer._metrics["train"]
    assert metrics["ctrl/calibrated_reward"][-1] == pytest.approx((3 / 8 + 1 + 0 + 5 / 8) / 4)
    assert metrics["ctrl/raw_reward"][-1] == pytest.approx(sum(raw) / 4)
    assert metrics["ctrl/transformed_reward"][-1] == pytest.approx(expected.mean().item(), rel=1e-6)


def test_normalised_transform_keeps_the_optimum(tmp_path, tiny):
    """Default: RLOO sees (Φ − Φ(0))/(Φ(1) − Φ(0)) with β/(Φ(1) − Φ(0)) — the same Φ/β, so the same optimum."""
    raw = [1.0, 3.5, -2.0, 2.0]
    trainer = make_trainer(tmp_path, tiny, lambda completions, **kw: raw[: len(completions)])
    inputs = [{"prompt": p, "ref_rewards": [0.0, 1.0, 2.0, 3.0]} for p in PROMPTS]
    out = trainer._calculate_rewards(inputs, PROMPTS, ["a", "b", "c", "d"], [[1], [2], [3], [4]])[:, 0]
    span = math.exp(2) - 1
    torch.testing.assert_close(out, (torch.exp(2 * torch.tensor([3 / 8, 1.0, 0.0, 5 / 8])) - 1) / span)
    assert trainer.beta == pytest.approx(0.5 / span)
    assert trainer.args.beta == 0.5  # the user's β (units of the unnormalised Φ) is reported unchanged


def test_weighted_reward_functions_are_combined_before_calibration(tmp_path, tiny):
    def first(completions, **kw):
        return [1.0, 2.0, 3.0, None][: len(completions)]

    def second(completions, **kw):
        return [10.0, 0.0, 0.0, None][: len(completions)]

    trainer = make_trainer(tmp_path, tiny, [first, second], transform="identity", reward_weights=[1.0, 0.1])
    inputs = [{"prompt": p, "ref_rewards": [1.5, 2.5, 3.0]} for p in PROMPTS]
    out = trainer._calculate_rewards(inputs, PROMPTS, ["a", "b", "c", "d"], [[1]] * 4)[:, 0]
    # combined r = 2, 2, 3, NaN → c = 1/3, 1/3, (2 + ½)/3, NaN (all functions returned None → unscorable, as in TRL)
    torch.testing.assert_close(out[:3], torch.tensor([1 / 3, 1 / 3, 2.5 / 3]))
    assert math.isnan(out[3].item())
    assert trainer._metrics["train"]["ctrl/raw_reward/second"][-1] == pytest.approx(10 / 3)


def test_infinite_reward_raises_or_is_skipped(tmp_path, tiny):
    def reward(completions, **kw):
        return [0.5, float("inf"), 1.0, 2.0][: len(completions)]

    inputs = [{"prompt": p, "ref_rewards": [0.0, 1.0]} for p in PROMPTS]
    trainer = make_trainer(tmp_path, tiny, reward)
    with pytest.raises(ValueError, match=r"nonfinite_rewards='skip'"):
        trainer._calculate_rewards(inputs, PROMPTS, ["a", "b", "c", "d"], [[1]] * 4)
    trainer = make_trainer(tmp_path, tiny, reward, nonfinite_rewards="skip")
    out = trainer._calculate_rewards(inputs, PROMPTS, ["a", "b", "c", "d"], [[1]] * 4)[:, 0]
    assert math.isnan(out[1].item()) and torch.isfinite(out[[0, 2, 3]]).all()
    assert trainer._metrics["train"]["ctrl/nonfinite_rewards"][-1] == 1


def test_dataset_without_reference_rewards_is_refused_with_instructions(tmp_path, tiny):
    with pytest.raises(ValueError, match="build_reference_rewards|build-reference"):
        make_trainer(tmp_path, tiny, lambda completions, **kw: [0.0] * len(completions), ds=Dataset.from_dict({"prompt": PROMPTS}))
    short = Dataset.from_dict({"prompt": PROMPTS, "ref_rewards": [[1.0]] * len(PROMPTS)})
    with pytest.raises(ValueError, match="ref_rewards"):
        make_trainer(tmp_path, tiny, lambda completions, **kw: [0.0] * len(completions), ds=short)


def test_trainer_requires_ctrl_config(tmp_path, tiny):
    from trl import RLOOConfig

    with pytest.raises(TypeError, match="CTRLConfig"):
        CTRLTrainer(model=tiny[0], reward_funcs=lambda **kw: [], args=RLOOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False), train_dataset=dataset())


# ------------------------------------------------------------------------------------------------ model card and Hub
def test_model_card_names_method_paper_and_settings(tmp_path, tiny):
    trainer = make_trainer(tmp_path, tiny, lambda completions, **kw: [float(len(c)) for c in completions], num_reference_samples=4)
    trainer.train()
    trainer.record_evaluation({"win_rates": [{"procedure": "bon", "n": 4, "estimate": 0.61, "ci_low": 0.55, "ci_high": 0.67}], "kl_k1": 0.12, "kl_k3": 0.11})
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    for needle in ["CTRL", "InfAlign", "2412.19792", "balashankar2025infalign", "`bon:t=2`", "| t | 2", "| N | 4",
                   "| β (KL coefficient) | 0.5", "K (reference samples per prompt) | 4", "ctrl/calibrated_reward", "0.610",
                   "- ctrl", "- infalign", "- trl", "Best-of-4"]:
        assert needle in card, needle


def test_card_numbers_are_readable_and_beta_is_given_on_the_normalised_transform(tmp_path, tiny):
    """The demo's case: bon:t=17.3 with beta 7804817.927095893 -> 9.324e6. Every number with 4 significant digits,
    beta also as RLOO applies it to (Phi - 1)/(e^17.3 - 1), and standard = BoN-1 = WoN-1 shown once."""
    from trl_infalign.model_card import build_ctrl_model_card

    start, end = 7804817.927095893, 9.324e6
    trainer = make_trainer(tmp_path, tiny, length_reward_for_card, transform="bon:t=17.3", beta=start)
    trainer.beta = trainer._ctrl_penalty_beta(end)  # where an adaptive run ends
    row = {"ci_low": 0.4, "ci_high": 0.6, "unbiased": True}
    trainer.record_evaluation({"win_rates": [
        {"procedure": "standard", "n": 1, "estimate": 0.55, **row}, {"procedure": "bon", "n": 1, "estimate": 0.55, **row},
        {"procedure": "won", "n": 1, "estimate": 0.55, **row}, {"procedure": "bon", "n": 4, "estimate": 0.61, **row},
    ]})
    card = build_ctrl_model_card(trainer).text
    scale = math.exp(17.3) - 1  # Phi = exp(17.3 c) spans [1, e^17.3] on c in [0, 1]
    assert "| β (KL coefficient) | 7.805e+06 at the start → 9.324e+06 at the end |" in card
    assert (f"| β on the normalised Φ (RLOO's `beta` = β / 3.261e+07, for (Φ − 1) / 3.261e+07 ∈ [0, 1]) | "
            f"{start / scale:.4g} at the start → {end / scale:.4g} at the end |") in card
    assert f"{start / scale:.4g}" == "0.2394" and "| t | 17.3 |" in card
    assert "7804817" not in card and "927095893" not in card
    assert card.count("| standard | 1 | 0.550 |") == 1 and "| bon | 1 |" not in card and "| won | 1 |" not in card
    assert "| bon | 4 | 0.610 | [0.400, 0.600] |" in card


def length_reward_for_card(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_push_to_hub_offline_keeps_local_output_and_says_why(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    secret = "hf_THISISAFAKETOKEN1234567890"
    trainer = make_trainer(tmp_path, tiny, lambda completions, **kw: [0.0] * len(completions), hub_token=secret,
                           hub_model_id="someone/ctrl-test")
    with pytest.raises(HubUploadError) as error:
        trainer.push_to_hub()
    message = str(error.value)
    assert "saved locally" in message and str((tmp_path / "out").resolve()) in message
    assert secret not in message
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "README.md").exists()
    assert (tmp_path / "out" / "tokenizer.json").exists()


# ------------------------------------------------------------------------------------------------------- resume
def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def checkpointed_run(tiny, tmp_path_factory):
    """One run trained to checkpoint-1 with a reward model + a callable (weights [1, 0.5]); the resumes below are
    built against it and refused before any step."""
    from trl_infalign.tiny import build_tiny_reward_model

    root = tmp_path_factory.mktemp("resume")
    path, tokenizer = tiny
    for name, seed in (("rm_a", 0), ("rm_b", 1)):
        build_tiny_reward_model(tokenizer, root / name, seed=seed)
    trainer = resumed_trainer(root, tiny)
    trainer.train()
    checkpoint = root / "out" / "checkpoint-1"
    assert (checkpoint / "ctrl_run.json").is_file()
    return root, checkpoint


def resumed_trainer(root, tiny, reward_model="rm_a", **overrides):
    path, tokenizer = tiny
    kwargs = dict(max_steps=1, save_strategy="steps", save_steps=1, reward_weights=[1.0, 0.5],
                  calibration_check="off")  # hand-made reference rewards: not samples of this policy
    kwargs.update(overrides)
    return CTRLTrainer(model=path, reward_funcs=[str(root / reward_model), length_reward], args=config(root, **kwargs),
                       train_dataset=dataset(), processing_class=tokenizer)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"reward_model": "rm_b"}, r"reward function 0 '.*rm_b': checkpoint reward model '.*rm_a' \(weights \w+\), "
                                   r"now reward model '.*rm_b' \(weights \w+\)"),
        ({"max_completion_length": 6}, r"max_completion_length: checkpoint 4, now 6 \(set CTRLConfig.max_completion_length=4\)"),
        ({"temperature": 0.7}, r"temperature: checkpoint 1.0, now 0.7 \(set CTRLConfig.temperature=1.0\)"),
        ({"reward_weights": [1.0, 2.0]}, r"reward_weights: checkpoint \[1.0, 0.5\], now \[1.0, 2.0\] \(set "
                                         r"CTRLConfig.reward_weights=\[1.0, 0.5\]\)"),
        ({"top_k": 5, "repetition_penalty": 1.3}, r"repetition_penalty: checkpoint 1.0, now 1.3 .*; "
                                                  r"top_k: checkpoint 0, now 5"),
    ],
    ids=["reward model", "max_completion_length", "temperature", "reward_weights", "top_k and repetition_penalty"],
)
def test_resume_refuses_another_run_naming_each_difference(checkpointed_run, tiny, overrides, needle):
    """Without a provenance column nothing else would notice: the run record (ctrl_run.json) does, before any step,
    and names the override."""
    root, checkpoint = checkpointed_run
    trainer = resumed_trainer(root, tiny, max_steps=2, **overrides)
    with pytest.raises(ValueError, match=needle + r".*delete .*ctrl_run.json \(reward functions, weights and sampling"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0 and not (root / "out" / "checkpoint-2").exists()


def test_resume_from_a_checkpoint_without_run_record_warns_and_trains(checkpointed_run, tiny):
    """An older checkpoint (no ctrl_run.json): a warning saying what cannot be checked; the run continues."""
    import shutil

    root, checkpoint = checkpointed_run
    old = root / "old"
    shutil.copytree(checkpoint, old / "out" / "checkpoint-1")
    (old / "out" / "checkpoint-1" / "ctrl_run.json").unlink()
    trainer = resumed_trainer(old, tiny, reward_model="../rm_a", max_steps=2, temperature=0.7)
    with pytest.warns(UserWarning, match=r"holds no run record \(ctrl_run.json.*reward_weights and sampling settings"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 2
    assert json.loads((old / "out" / "checkpoint-2" / "ctrl_run.json").read_text())["sampling"]["temperature"] == 0.7


# ------------------------------------------------------------------------------------------- PEFT and accumulation
def test_trains_with_peft_and_gradient_accumulation(tmp_path, tiny):
    from peft import LoraConfig

    path, tokenizer = tiny
    trainer = CTRLTrainer(
        model=path,
        reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
        args=config(tmp_path, gradient_accumulation_steps=2, max_steps=2),
        train_dataset=dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert before and any(not torch.equal(before[n], after[n]) for n in before), "LoRA weights did not move"
    logged = [h for h in trainer.state.log_history if "ctrl/calibrated_reward" in h]
    assert len(logged) == 2 and all(0 <= h["ctrl/calibrated_reward"] <= 1 for h in logged)


# ---------------------------------------------------------------------------------------------- running win-rate metric
def test_running_win_rate_estimate_matches_theory_for_the_bon_policy():
    """c drawn from the BoN-4 policy g(c) = 4c³: BoN-4 win rate 4/5 (closed form), WoN-4 from the theory module."""
    from trl_infalign.ctrl_trainer import pooled_inference_win_rate

    generator = torch.Generator().manual_seed(0)
    c = torch.rand(100_000, generator=generator, dtype=torch.float64) ** 0.25
    assert pooled_inference_win_rate(c, 4, "bon") == pytest.approx(0.8, abs=3e-3)
    won = theory.CalibratedPolicy.bon_policy(4).win_rate("won", 4)
    assert pooled_inference_win_rate(c, 4, "won") == pytest.approx(won, abs=3e-3)
    uniform = torch.rand(100_000, generator=generator, dtype=torch.float64)
    assert pooled_inference_win_rate(uniform, 4, "bon") == pytest.approx(0.5, abs=3e-3)
    assert math.isnan(pooled_inference_win_rate(torch.tensor([0.5, float("nan")]), 4, "bon"))
