"""InferenceWinRateCallback: hooks with a fake state, reference caching, train mode, and a tiny RLOO run."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState, TrainingArguments

from trl_infalign.callbacks import InferenceWinRateCallback

PROMPTS = ["the movie was", "this film is", "the plot felt", "the cast was"]



class CountingReward:
    __name__ = "counting_reward"

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, completions, **kwargs):
        self.calls += 1
        return [float(len(c)) for c in completions]


def test_hooks_with_fake_state(tiny, tmp_path):
    path, tokenizer = tiny
    model = AutoModelForCausalLM.from_pretrained(path)
    model.train()
    reward = CountingReward()
    cb = InferenceWinRateCallback(
        PROMPTS, [reward], tokenizer=tokenizer, ns=(2, 4), procedures=("standard", "bon", "won"), num_samples=4,
        every_n_steps=2, max_new_tokens=4, num_bootstrap=50,
    )
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control, model=model, processing_class=tokenizer)
    assert cb._reference_path == path  # default reference: the initial checkpoint

    rng_before = torch.random.get_rng_state()
    for step in (1, 2, 3, 4):
        state.global_step = step
        cb.on_step_end(args, state, control, model=model, processing_class=tokenizer)
        assert model.training  # train mode restored
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # trainer's RNG stream untouched
    assert [entry["step"] for entry in state.log_history] == [2, 4]
    logged = state.log_history[-1]
    for key in ("eval_infalign/bon@4_win_rate", "eval_infalign/won@2_win_rate", "eval_infalign/standard_win_rate",
                "eval_infalign/bon@4_win_rate_ci_low", "eval_infalign/kl_k1", "eval_infalign/kl_k3"):
        assert key in logged and math.isfinite(logged[key]), key
    # the policy did not change and is its own reference: KL exactly 0
    assert logged["eval_infalign/kl_k1"] == 0.0
    # reference scored once (cached), policy scored at each evaluation
    assert reward.calls == 1 + 2
    assert [s for s, _ in cb.history] == [2, 4]
    # the headline KL (per completion, k1, nats) is logged with its CI
    assert logged["eval_infalign/kl_k1_ci_low"] <= logged["eval_infalign/kl_k1"] <= logged["eval_infalign/kl_k1_ci_high"]
    # each result names what was evaluated: the run at its step, not the reference it started from
    metadata = cb.history[-1][1].metadata
    assert metadata["policy"] == f"{tmp_path} (step 4)" and metadata["global_step"] == 4
    assert metadata["reference"] == path
    assert (metadata["temperature"], metadata["top_p"], metadata["top_k"]) == (1.0, 1.0, 0)


def test_sampling_settings_reach_reference_and_policy(tiny, tmp_path):
    path, tokenizer = tiny
    model = AutoModelForCausalLM.from_pretrained(path)
    seen = []

    def reward(prompts, completions, **kwargs):
        seen.append(list(completions))
        return [float(len(c)) for c in completions]

    with pytest.warns(UserWarning, match="not draws from π"):
        cb = InferenceWinRateCallback(PROMPTS[:2], [reward], tokenizer=tokenizer, reference_model=path, ns=(2,),
                                      procedures=("bon",), num_samples=4, max_new_tokens=3, num_bootstrap=0, top_k=1,
                                      policy_name="my-run")
    result = cb.evaluate({"model": model})
    assert len(seen) == 2  # reference, then policy: both greedy (top_k=1), so each prompt's 4 samples are identical
    assert all(len(set(call[i * 4:(i + 1) * 4])) == 1 for call in seen for i in range(2)), seen
    assert result.metadata["top_k"] == 1 and result.metadata["policy"] == "my-run"
    assert "kl_note" in result.metadata


@pytest.mark.parametrize("kwargs,match", [({"temperature": 0}, "temperature"), ({"top_p": 2.0}, "top_p"),
                                          ({"top_k": -3}, "top_k"), ({"policy_name": ""}, "policy_name")])
def test_rejects_bad_sampling_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InferenceWinRateCallback(PROMPTS, [CountingReward()], ns=(2,), num_samples=4, **kwargs)


def test_rejects_n_above_num_samples(tiny):
    with pytest.raises(ValueError, match="num_samples"):
        InferenceWinRateCallback(PROMPTS, [CountingReward()], ns=(8,), num_samples=4)


def test_tiny_rloo_run_logs_metrics(tiny, tmp_path):
    from trl import RLOOConfig, RLOOTrainer

    path, tokenizer = tiny

    def reward(completions, **kwargs):
        return [float(c.count("g")) for c in completions]

    config = RLOOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
        max_steps=4, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, beta=0.1,
        disable_tqdm=True, learning_rate=1e-3,
    )
    trainer = RLOOTrainer(
        model=path, reward_funcs=reward, args=config, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        processing_class=tokenizer,
    )
    assert trainer.ref_model is not None
    cb = InferenceWinRateCallback(
        PROMPTS, reward, ns=(2,), num_samples=4, every_n_steps=2, max_new_tokens=4, num_bootstrap=50, trainer=trainer,
    )
    trainer.add_callback(cb)
    trainer.train()
    assert cb._reference is trainer.ref_model  # default reference: the trainer's ref model
    history = trainer.state.log_history
    ours = [h for h in history if "eval_infalign/bon@2_win_rate" in h]
    assert [h["step"] for h in ours] == [2, 4]
    assert all("eval_infalign/kl_k3" in h and "eval_infalign/won@2_win_rate" in h for h in ours)
    # the trained in-memory model still has the initial path as `_name_or_path`; the metadata names the run instead
    assert cb.history[-1][1].metadata["policy"] == f"{config.output_dir} (step 4)"
    # TRL's own training metrics are still logged at every step (our log does not consume them)
    train_logs = [h for h in history if "reward" in h]
    assert [h["step"] for h in train_logs] == [1, 2, 3, 4]


def test_callback_with_a_mixture_spec(tiny, tmp_path):
    path, tokenizer = tiny
    model = AutoModelForCausalLM.from_pretrained(path)
    mix = "mixture:0.5*standard+0.5*bon:n=4"
    cb = InferenceWinRateCallback(
        PROMPTS[:2], [CountingReward()], tokenizer=tokenizer, reference_model=path, ns=(4,),
        procedures=("standard", "bon", mix), num_samples=4, every_n_steps=1, max_new_tokens=3, num_bootstrap=20,
    )
    assert [p.spec for p in cb.inference_procedures] == ["standard", "bon:n=4", mix]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state, control = TrainerState(), TrainerControl()
    state.global_step = 1
    cb.on_step_end(args, state, control, model=model, processing_class=tokenizer)
    logged = state.log_history[-1]
    key = "eval_infalign/mixture(0.5*standard+0.5*bon@4)_win_rate"
    assert key in logged and key + "_ci_low" in logged and math.isfinite(logged[key])
    assert logged[key] == pytest.approx(
        0.5 * logged["eval_infalign/standard_win_rate"] + 0.5 * logged["eval_infalign/bon@4_win_rate"], abs=1e-12)
    row = cb.history[-1][1].win_rate(mix)
    assert (row["procedure"], row["n"], row["spec"], row["unbiased"]) == ("mixture", 4, mix, True)
    # a spec whose N exceeds num_samples is refused up front, naming it
    with pytest.raises(ValueError, match=r"mixture:0\.5\*standard\+0\.5\*bon:n=8 \(needs 8\).*num_samples = 4"):
        InferenceWinRateCallback(PROMPTS, [CountingReward()], ns=(2,), num_samples=4,
                                 procedures=("bon", "mixture:0.5*standard+0.5*bon:n=8"))


def test_callback_with_a_deployment_that_names_rewards(tiny, tmp_path):
    """Each component is judged on its own reward's scores of the cached reference samples and the policy's samples."""
    from trl_infalign.evaluation import per_prompt_win_rates
    from trl_infalign.procedures import ProcedureError

    path, tokenizer = tiny
    model = AutoModelForCausalLM.from_pretrained(path)
    seen = {"helpful": [], "harmless": []}

    def helpful(prompts, completions, **kwargs):
        seen["helpful"].append([float(len(c)) for c in completions])
        return seen["helpful"][-1]

    def harmless(prompts, completions, **kwargs):
        seen["harmless"].append([-float(c.count("e")) for c in completions])
        return seen["harmless"][-1]

    spec = "mixture:0.5*bon:n=2@helpful+0.5*won:n=2@harmless"
    cb = InferenceWinRateCallback(PROMPTS, [helpful, harmless], tokenizer=tokenizer, reference_model=path, ns=(2,),
                                  procedures=("bon", spec), num_samples=4, every_n_steps=1, max_new_tokens=4,
                                  num_bootstrap=50)
    assert cb.reward_names == ["helpful", "harmless"] and [d.spec for d in cb.deployments] == [spec]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state, control = TrainerState(), TrainerControl()
    for step in (1, 2):
        state.global_step = step
        cb.on_step_end(args, state, control, model=model, processing_class=tokenizer)
    assert len(seen["helpful"]) == 1 + 2  # the reference scored once (cached), the policy at each evaluation
    logged = state.log_history[-1]

    def matrix(values):
        return torch.tensor(values, dtype=torch.float64).reshape(len(PROMPTS), 4)

    reference_h, reference_s = matrix(seen["helpful"][0]), matrix(seen["harmless"][0])
    policy_h, policy_s = matrix(seen["helpful"][-1]), matrix(seen["harmless"][-1])
    want_h = per_prompt_win_rates(policy_h, reference_h, procedure="bon:n=2").mean()
    want_s = per_prompt_win_rates(policy_s, reference_s, procedure="won:n=2").mean()
    assert logged["eval_infalign/bon@2_win_rate/helpful"] == pytest.approx(want_h, abs=1e-12)
    assert logged["eval_infalign/won@2_win_rate/harmless"] == pytest.approx(want_s, abs=1e-12)
    assert logged["eval_infalign/deployment_win_rate"] == pytest.approx(0.5 * want_h + 0.5 * want_s, abs=1e-12)
    assert "eval_infalign/bon@2_win_rate" in logged and "eval_infalign/deployment_win_rate_ci_low" in logged
    with pytest.raises(ProcedureError, match=r"\['nope'\].*\['helpful', 'harmless'\]"):
        InferenceWinRateCallback(PROMPTS, [helpful, harmless], procedures=("bon:n=2@nope",), num_samples=4)
