"""CTRL on GRPO: the same optimum π_ref·exp(Φ(c)/β)/Z as on RLOO, the refused settings, the KL controller, PEFT, DDP.

GRPO's group-mean baseline includes the sample itself, which scales its policy gradient by (G−1)/G: uncompensated, a
one-token bandit lands on the tilt at β·G/(G−1). With G = 4 that tilt is TV 0.05–0.13 away from the one at β, so
the bandit tests below tell a compensated trainer from an uncompensated one.
"""

import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from trl_infalign import theory
from trl_infalign.ctrl_grpo_config import CTRLGRPOConfig
from trl_infalign.ctrl_grpo_trainer import CTRLGRPOTrainer
from trl_infalign.tiny import bandit_next_token_probs

from bandit_utils import grpo_bandit_config, make_bandit, optimal_policy

PROMPTS = ["the movie was", "this film is", "the plot felt", "the cast was"]
G = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine they make GRPO steps ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


def config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
        max_steps=2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        transform="bon:t=2", beta=0.5, min_reference_samples=2, disable_tqdm=True,
    )
    kwargs.update(overrides)
    return CTRLGRPOConfig(**kwargs)


def dataset(k=4):
    return Dataset.from_dict({"prompt": PROMPTS, "ref_rewards": [[float(j) for j in range(k)] for _ in PROMPTS]})


def length_reward(completions, **kwargs):
    """Spread over the references' range 0..3, so that calibrated rewards (and advantages) differ."""
    return [float(len(c) % 4) for c in completions]


# ---------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"scale_rewards": "group"}, "scale_rewards='group'"),
        ({"scale_rewards": "batch"}, "scale_rewards='batch'"),
        ({"scale_rewards": True}, "scale_rewards=True"),
        ({"use_bias_correction_kl": False}, "use_bias_correction_kl=False"),
        ({"beta": 0.0}, "beta must be > 0.*default beta=0.0"),
        ({"loss_type": "cispo"}, "loss_type='cispo'"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation"),
        ({"entropy_coef": 0.01}, "entropy_coef"),
        ({"top_entropy_quantile": 0.5}, "top_entropy_quantile"),
        ({"inference_n": 0}, "CTRLGRPOConfig.inference_n"),  # the shared CTRL validation, naming this config
        ({"transform": "nope"}, "CTRLGRPOConfig.transform"),
    ],
)
def test_settings_that_move_the_optimum_are_refused_with_the_reason(tmp_path, overrides, needle):
    with pytest.raises(ValueError, match=needle):
        config(tmp_path, **overrides)


def test_defaults_keep_the_objective(tmp_path):
    args = config(tmp_path)
    assert (args.scale_rewards, args.loss_type, args.use_bias_correction_kl) == ("none", "dr_grpo", True)
    with pytest.raises(ValueError, match="beta must be > 0"):
        CTRLGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, transform="bon:t=2")  # GRPO's beta=0.0
    budgeted = CTRLGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, kl_budget=0.5)  # same knobs as RLOO
    best = theory.best_t("bon", 4, 0.5)
    assert budgeted.beta == pytest.approx(best.beta) and budgeted.kl_control == "adaptive"
    with pytest.warns(UserWarning, match="1/length"):
        config(tmp_path, loss_type="grpo")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        config(tmp_path, loss_type="grpo", max_completion_length=1)  # one token: exact, nothing to warn about
        config(tmp_path, loss_type="dapo")


def test_trainer_needs_a_grpo_config(tmp_path, tiny):
    from trl import GRPOConfig

    from trl_infalign import CTRLConfig

    for args in (GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=0.1),
                 CTRLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=0.1, transform="bon:t=2")):
        with pytest.raises(TypeError, match="CTRLGRPOConfig"):
            CTRLGRPOTrainer(model=tiny[0], reward_funcs=length_reward, args=args, train_dataset=dataset())
    with pytest.raises(ValueError, match="beta > 0 or a kl_budget"):
        CTRLGRPOTrainer(model=tiny[0], reward_funcs=length_reward, train_dataset=dataset())


# ------------------------------------------------------------------------------------------ reward step and β mapping
def make_trainer(tmp_path, tiny, reward_funcs=length_reward, ds=None, **overrides):
    path, tokenizer = tiny
    trainer = CTRLGRPOTrainer(model=path, reward_funcs=reward_funcs, args=config(tmp_path, **overrides),
                              train_dataset=ds or dataset(), processing_class=tokenizer)
    trainer.model.train()
    return trainer


def test_reward_step_and_beta_mapping(tmp_path, tiny):
    """The shared CTRL reward step on GRPO (hand-computed as in test_ctrl_trainer), and β_GRPO = β·(G−1)/G / scale."""
    raw = [1.0, 3.5, -2.0, 2.0]
    trainer = make_trainer(tmp_path, tiny, lambda completions, **kw: raw[: len(completions)], num_generations=4)
    inputs = [{"prompt": p, "ref_rewards": [0.0, 1.0, 2.0, 3.0]} for p in PROMPTS]
    out = trainer._calculate_rewards(inputs, PROMPTS, ["a", "b", "c", "d"], [[1], [2], [3], [4]])
    span = math.exp(2) - 1
    torch.testing.assert_close(out[:, 0], (torch.exp(2 * torch.tensor([3 / 8, 1.0, 0.0, 5 / 8])) - 1) / span)
    assert trainer._metrics["train"]["ctrl/calibrated_reward"][-1] == pytest.approx(0.5)
    assert trainer.beta == pytest.approx(0.5 * (4 - 1) / 4 / span)  # what GRPO's loss uses
    assert trainer.current_beta == pytest.approx(0.5) and trainer.args.beta == 0.5  # the user's units
    assert trainer.ctrl_calibration_state()["num_generations"] == 4


def test_trains_and_logs_sequence_kl_from_grpo_logprobs(tmp_path, tiny):
    """Multi-token completions: `ctrl/sequence_kl` is Σ_t (log π − log π_ref) per completion, one value per generation
    batch (with gradient accumulation the batch's micro-batches are pooled), and `ctrl/beta` is in the user's units."""
    trainer = make_trainer(tmp_path, tiny, max_steps=3, gradient_accumulation_steps=2, learning_rate=5e-2)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "ctrl/sequence_kl" in h]
    assert len(logged) == 3 and all(h["ctrl/beta"] == pytest.approx(0.5) for h in logged)
    assert logged[0]["ctrl/sequence_kl"] == pytest.approx(0.0, abs=1e-6)  # step 0: the policy is the reference
    assert logged[-1]["ctrl/sequence_kl"] > 0
    card = (tmp_path / "out" / "README.md")
    trainer.save_model()
    assert "- grpo" in card.read_text()
    state = json.loads((tmp_path / "out" / "ctrl_calibration.json").read_text())
    assert state["grpo_beta"] == pytest.approx(0.5 * 0.5 / (math.exp(2) - 1)) and state["final_beta"] == pytest.approx(0.5)


def completion_logps(model, output):
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    length = output["completion_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -length - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, output["completion_ids"].unsqueeze(-1)).squeeze(-1)


def test_sequence_kl_matches_an_independent_k1(tmp_path, tiny):
    """A policy moved away from the reference (and frozen: lr 0): the logged `ctrl/sequence_kl` equals k1 recomputed
    from scratch with both models on the generated completions, Σ_t (log π − log π_ref) averaged over completions."""
    trainer = make_trainer(tmp_path, tiny, max_steps=1, learning_rate=0.0, gradient_accumulation_steps=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    seen = []
    original = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: seen.append(original(inputs)) or seen[-1]
    trainer.args.calibration_check = "off"
    trainer._ctrl_health_pending = False
    trainer.train()
    output = seen[0]
    mask = output["completion_mask"]
    k1 = ((completion_logps(trainer.model, output) - completion_logps(trainer.ref_model, output)) * mask).sum(-1)
    logged = [h["ctrl/sequence_kl"] for h in trainer.state.log_history if "ctrl/sequence_kl" in h]
    assert k1.abs().mean() > 0.05  # the two models do differ on these completions
    assert logged == [pytest.approx(k1.mean().item(), abs=1e-4)]


# ------------------------------------------------------------------------------------------------------ bandit
CASES = [("bon:t=3", 4.0), ("won:t=3", 0.25), ("identity", 0.2)]


@pytest.mark.slow
@pytest.mark.parametrize("transform,beta", CASES)
def test_bandit_reaches_the_ctrl_optimum_with_g4(tmp_path, transform, beta):
    """Training seed 0 here; `benchmarks/grpo_bandit.py --part exactness` runs this body on seeds 0-4 (docs/grpo.md).
    Settings: `bandit_utils.GRPO_BANDIT_SETTINGS` (300 steps, lr 5e-3, 256 completions per step)."""
    path, tokenizer, pi_ref, rewards, ref_rewards, dataset_, reward_func = make_bandit(tmp_path)
    target = optimal_policy(pi_ref, rewards, ref_rewards, transform, beta)
    uncompensated = optimal_policy(pi_ref, rewards, ref_rewards, transform, beta * G / (G - 1))
    assert total_variation(target, pi_ref) > 0.15 and target.max().item() < 0.7
    assert total_variation(target, uncompensated) > 0.05  # the test can tell the two apart

    args = grpo_bandit_config(tmp_path / "out", transform, beta, num_generations=G)
    trainer = CTRLGRPOTrainer(model=path, reward_funcs=reward_func, args=args, train_dataset=dataset_,
                              processing_class=tokenizer)
    trainer.train()
    trained = bandit_next_token_probs(trainer.model, tokenizer)
    assert total_variation(trained, target) < 0.02, (transform, trained, target)
    assert total_variation(trained, uncompensated) > total_variation(trained, target) + 0.02


# ---------------------------------------------------------------------------------------------- KL controller resume
@pytest.mark.slow
def test_adaptive_controller_state_is_checkpointed_and_restored(tmp_path, tiny):
    """kl_budget + adaptive control on GRPO: β moves, the checkpoint holds the controller, a resume restores it."""
    common = dict(kl_budget=0.05, transform="bon:t=2", learning_rate=5e-2, save_strategy="steps", save_steps=4)
    with pytest.warns(UserWarning, match="kl_budget wins"):
        trainer = make_trainer(tmp_path, tiny, max_steps=8, **common)
    trainer.train()
    final = trainer.ctrl_kl_controller.state_dict()
    assert final["num_updates"] == 8 and final["beta"] != trainer.args.beta
    saved = json.loads((tmp_path / "out" / "checkpoint-4" / "ctrl_calibration.json").read_text())
    assert saved["kl_controller"]["num_updates"] == 4
    with pytest.warns(UserWarning, match="kl_budget wins"):
        resumed = make_trainer(tmp_path, tiny, max_steps=8, **common)
    resumed._check_resumed_calibration(str(tmp_path / "out" / "checkpoint-4"))
    assert resumed.ctrl_kl_controller.state_dict() == saved["kl_controller"]
    assert resumed.current_beta == pytest.approx(saved["kl_controller"]["beta"])
    # GRPO's loss coefficient is the controller's β mapped by (G−1)/G / scale (the saved `grpo_beta` is the one in
    # effect at save time: the controller's latest β only applies from the next generation batch on)
    assert resumed.beta == pytest.approx(saved["kl_controller"]["beta"] * (2 - 1) / 2 / resumed.ctrl_scale)


# ----------------------------------------------------------------------------------------------------------- PEFT
def test_peft_construction_and_training(tmp_path, tiny):
    from peft import LoraConfig

    path, tokenizer = tiny
    trainer = CTRLGRPOTrainer(
        model=path, reward_funcs=length_reward, args=config(tmp_path, max_steps=2, learning_rate=5e-2),
        train_dataset=dataset(), processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None  # GRPO's reference is the adapter-disabled base model
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert before and any(not torch.equal(before[n], after[n]) for n in before), "LoRA weights did not move"
    kls = [h["ctrl/sequence_kl"] for h in trainer.state.log_history if "ctrl/sequence_kl" in h]
    assert len(kls) == 2 and kls[0] == pytest.approx(0.0, abs=1e-5)  # step 0: adapter-disabled base == policy


# -------------------------------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_process_grpo_calibrates_each_prompt_against_its_own_references(tmp_path):
    script = Path(__file__).parent / "scripts" / "ctrl_two_process.py"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port: fixed ones collide with other runs on a shared machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), str(script), str(tmp_path), "grpo"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["prompts"] != records[1]["prompts"]
    assert all(r["ref_matches_prompt"] for r in records)
    for record in records:
        values = record["calibrated"]
        assert len(values) == 3 * 4 * 2  # steps x per-device batch x processes (gathered)
        assert all(0 < v < 1 and abs(v * 7 - round(v * 7 - 0.5) - 0.5) < 1e-6 for v in values), values
        assert record["sequence_kl"] and record["sequence_kl"][0] == pytest.approx(0.0, abs=1e-5)
    # every rank holds the same (gathered) KL measurement and β
    assert records[0]["sequence_kl"] == pytest.approx(records[1]["sequence_kl"])
    assert records[0]["beta"] == pytest.approx(records[1]["beta"])


# --------------------------------------------------------------------------------------------------------- recipe
def test_recipe_parses_grpo_from_the_yaml_or_the_flag():
    import importlib.util

    recipes = Path(__file__).parent.parent / "recipes"
    spec = importlib.util.spec_from_file_location("ctrl_hh_recipe_grpo", recipes / "ctrl_hh.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe
    spec.loader.exec_module(recipe)
    common = ["--bf16", "false", "--use_cpu", "true", "--output_dir", "/tmp/unused-ctrl-grpo-out"]
    script, args, _ = recipe.make_parser().parse_args_and_config(
        args=["--config", str(recipes / "configs" / "ctrl_hh_helpful_bon_grpo.yaml"), *common])
    assert isinstance(args, CTRLGRPOConfig) and script.trainer == "grpo"
    assert (args.scale_rewards, args.loss_type, args.beta, args.num_generations) == ("none", "dr_grpo", 0.05, 8)
    script, args, _ = recipe.make_parser().parse_args_and_config(
        args=["--config", str(recipes / "configs" / "ctrl_hh_tiny_offline.yaml"), "--trainer", "grpo", "--use_vllm",
              "true", "--vllm_mode", "colocate", *common])
    assert isinstance(args, CTRLGRPOConfig) and (args.use_vllm, args.vllm_mode) == (True, "colocate")
    with pytest.raises(ValueError, match="scale_rewards='group'"):
        recipe.make_parser().parse_args_and_config(
            args=["--config", str(recipes / "configs" / "ctrl_hh_tiny_offline.yaml"), "--trainer", "grpo",
                  "--scale_rewards", "group", *common])


def test_model_card_names_grpo_and_cites_it(tmp_path, tiny):
    import trl

    trainer = make_trainer(tmp_path, tiny)
    trainer.create_model_card(output_dir=str(tmp_path / "card"))
    card = (tmp_path / "card" / "README.md").read_text()
    assert "TRL](https://github.com/huggingface/trl)'s GRPO trainer" in card and "Cite GRPO as" in card
    assert trl.GRPOTrainer._paper["citation"].splitlines()[0] in card and "RLOO" not in card
