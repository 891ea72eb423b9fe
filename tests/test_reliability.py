"""Reliability: bad input, faults (SIGKILL + resume, unwritable output, offline Hub, token hygiene), determinism.

Every case is exercised at the user-facing API (CTRLConfig, CTRLTrainer, build_reference_rewards, calibrate); the
table in docs/reliability.md maps each case to its test here.
"""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from trl_infalign import CTRLConfig, CTRLTrainer, build_reference_rewards, calibrate
from trl_infalign.calibration import CalibrationError
from trl_infalign.tiny import build_tiny_reward_model

from process_utils import sigkill_when

PROMPTS = ["the movie was", "this film is", "the plot felt", "the cast was"]
SCRIPT = Path(__file__).parent / "scripts" / "reliability_train.py"



def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
        max_steps=1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        transform="bon:t=2", beta=0.5, min_reference_samples=2, disable_tqdm=True, seed=0,
    )
    kwargs.update(overrides)
    return CTRLConfig(**kwargs)


def dataset(rows=None, **columns):
    rows = rows if rows is not None else [[0.0, 1.0, 2.0, 3.0] for _ in PROMPTS]
    return Dataset.from_dict({"prompt": PROMPTS, "ref_rewards": rows, **columns})


def trainer_for(tmp_path, tiny, reward_funcs=length_reward, ds=None, reward_processing_classes=None, **overrides):
    path, tokenizer = tiny
    return CTRLTrainer(
        model=path, reward_funcs=reward_funcs, args=config(tmp_path, **overrides), train_dataset=ds or dataset(),
        processing_class=tokenizer, reward_processing_classes=reward_processing_classes,
    )


def ctrl_logs(trainer):
    return [h for h in trainer.state.log_history if "ctrl/calibrated_reward" in h]


# ================================================================================================ non-finite rewards
@pytest.mark.slow  # > 5 s when other jobs load the CPU
def test_infinite_reward_raises_naming_function_and_keeps_checkpoints(tmp_path, tiny):
    """±inf at step 2 stops training with the function, prompt and fix named; checkpoint-1 is intact."""

    def breaks_later(completions, trainer_state=None, **kwargs):
        bad = trainer_state is not None and trainer_state.global_step >= 1
        return [float("inf") if bad and i == 1 else 1.0 + i for i in range(len(completions))]

    trainer = trainer_for(tmp_path, tiny, breaks_later, max_steps=3, save_strategy="steps", save_steps=1)
    with pytest.raises(ValueError, match=r"'breaks_later' returned inf .*nonfinite_rewards='skip'.*resume_from_checkpoint"):
        trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "model.safetensors").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 1


@pytest.mark.slow  # > 5 s when other jobs load the CPU
def test_nonfinite_rewards_skip_counts_and_trains(tmp_path, tiny):
    def half_inf(completions, **kwargs):
        return [float("-inf") if i % 2 else float(len(c)) for i, c in enumerate(completions)]

    trainer = trainer_for(tmp_path, tiny, half_inf, nonfinite_rewards="skip", max_steps=2)
    trainer.train()
    logs = ctrl_logs(trainer)
    assert len(logs) == 2 and all(h["ctrl/nonfinite_rewards"] == 2 for h in logs)  # 2 of 4 completions per step
    assert all(math.isfinite(h["ctrl/calibrated_reward"]) for h in logs)


def test_nan_from_reward_model_raises_or_is_skipped(tmp_path, tiny):
    """A reward *model* returning NaN is a failure (a callable's None/NaN means 'no reward', as in TRL)."""
    _, tokenizer = tiny
    model = build_tiny_reward_model(tokenizer, tmp_path / "rm", hidden_size=32)
    model.score.weight.data.fill_(float("nan"))
    trainer = trainer_for(tmp_path, tiny, model, reward_processing_classes=tokenizer)
    with pytest.raises(ValueError, match=r"returned nan .*nonfinite_rewards='skip'"):
        trainer.train()
    trainer = trainer_for(tmp_path, tiny, [model, length_reward], reward_processing_classes=[tokenizer, None],
                          nonfinite_rewards="skip")
    trainer.model.train()
    inputs = [{"prompt": p, "ref_rewards": [0.0, 1.0, 2.0]} for p in PROMPTS]
    out = trainer._calculate_rewards(inputs, PROMPTS, ["a", "bb", "", "c"], [[5], [6], [1], [7]])[:, 0]
    assert torch.isnan(out).all()  # the other function's finite reward does not hide the broken model
    assert trainer._metrics["train"]["ctrl/nonfinite_rewards"][-1] == 4


def test_calibrate_nonfinite_inputs():
    ref = [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]
    with pytest.raises(CalibrationError, match="NaN"):
        calibrate([0.5, float("nan")], ref)
    out = calibrate([0.5, float("inf")], ref, nonfinite="nan")
    assert out[0].item() == pytest.approx(1 / 3) and math.isnan(out[1].item())
    with pytest.raises(CalibrationError, match=r"row 1 \(reference 2 is inf\)"):
        calibrate([0.5, 0.5], [[0.0, 1.0, 2.0], [0.0, 1.0, float("inf")]])


def test_build_reference_rewards_nonfinite_raise_or_skip(tiny):
    path, tokenizer = tiny

    def reward(completions, **kwargs):
        return [float("nan") if i == 0 else float(len(c)) for i, c in enumerate(completions)]

    ds = Dataset.from_dict({"prompt": PROMPTS[:2]})
    kwargs = dict(num_samples=3, tokenizer=tokenizer, max_new_tokens=3, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="row 0"):
        build_reference_rewards(ds, path, reward, **kwargs)
    built = build_reference_rewards(ds, path, reward, nonfinite="skip", **kwargs)
    assert [len(r) for r in built["ref_rewards"]] == [2, 3]  # the first sample of the first chunk was dropped


# ================================================================================================ reference rewards
def test_missing_reference_rewards_column_lists_columns(tmp_path, tiny):
    ds = Dataset.from_dict({"prompt": PROMPTS, "refs": [[1.0, 2.0]] * 4})
    with pytest.raises(ValueError, match=r"no reference-rewards column 'ref_rewards' \(columns: \['prompt', 'refs'\]\).*build"):
        trainer_for(tmp_path, tiny, ds=ds)


def test_missing_or_short_reference_row_is_named(tmp_path, tiny):
    with pytest.raises(ValueError, match=r"train_dataset: .*row 2: expected a list of rewards, got NoneType"):
        trainer_for(tmp_path, tiny, ds=dataset([[0.0, 1.0], [0.0, 1.0], None, [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"row 1: 1 reward\(s\), fewer than min_samples=2.*min_reference_samples"):
        trainer_for(tmp_path, tiny, ds=dataset([[0.0, 1.0], [3.0], [0.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"row 3: element 1 is nan"):
        trainer_for(tmp_path, tiny, ds=dataset([[0.0, 1.0]] * 3 + [[0.0, float("nan")]]))
    with pytest.raises(CalibrationError, match=r"Too few reference rewards in row 1 \(1 valid\).*min_references=2"):
        calibrate([0.5, 0.5], [[0.0, 1.0], [3.0]], min_references=2)


def test_eval_dataset_reference_rows_are_checked(tmp_path, tiny):
    path, tokenizer = tiny
    with pytest.raises(ValueError, match=r"eval_dataset: .*row 0"):
        CTRLTrainer(model=path, reward_funcs=length_reward, args=config(tmp_path), train_dataset=dataset(),
                    eval_dataset=dataset([[1.0]] * 4), processing_class=tokenizer)


@pytest.mark.slow  # > 5 s when other jobs load the CPU
def test_ragged_reference_rewards_train(tmp_path, tiny):
    """With rows of 2 to 5 references, each completion's calibrated reward is the hand count against its own prompt's
    row, c = (#{ref < r} + ½ #{ref = r}) / K_x (no padding counted), and the trainer's reward is its normalised
    Φ(c) = (e^{2c} − 1) / (e² − 1) (bon:t=2)."""
    rows = [[0.0, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0], [2.0, 5.0, 9.0], [0.0, 1.0, 1.5, 2.0]]
    row_of = dict(zip(PROMPTS, rows))

    def in_range_reward(completions, **kwargs):  # 0..5: inside the rows' range, with ties
        return [float(len(c) % 6) for c in completions]

    trainer = trainer_for(tmp_path, tiny, in_range_reward, ds=dataset(rows), max_steps=2)
    assert trainer.ctrl_reference_counts == (2, 5)
    batches = []
    calculate = trainer._calculate_rewards

    def recording(inputs, prompts, completions, completion_ids_list):
        out = calculate(inputs, prompts, completions, completion_ids_list)
        batches.append((list(prompts), list(completions), out[:, 0].tolist()))
        return out

    trainer._calculate_rewards = recording
    trainer.train()
    logs = ctrl_logs(trainer)
    assert len(logs) == len(batches) == 2
    seen = set()
    for log, (prompts, completions, transformed) in zip(logs, batches):
        c = []
        for prompt, completion in zip(prompts, completions, strict=True):
            r, row = len(completion) % 6, row_of[prompt]
            c.append((sum(x < r for x in row) + 0.5 * sum(x == r for x in row)) / len(row))
        assert transformed == pytest.approx([math.expm1(2 * v) / math.expm1(2) for v in c], abs=1e-6)
        assert log["ctrl/calibrated_reward"] == pytest.approx(sum(c) / len(c), abs=1e-6)
        seen.update(c)
    assert len(seen) >= 3  # the batches exercise several ranks, not one saturated end
    torch.testing.assert_close(calibrate([1.0, 3.0], [[0.0, 2.0], [1.0, 2.0, 3.0, 4.0]]), torch.tensor([0.5, 0.625], dtype=torch.float64))


def test_all_equal_reference_rewards_warn_once_with_count(tmp_path, tiny):
    rows = [[1.0, 1.0, 1.0], [0.0, 1.0, 2.0], [2.5, 2.5], [0.0, 1.0, 2.0]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # hand-made reference rewards, not samples of this policy: the step-0 health check would (rightly) refuse them
        trainer = trainer_for(tmp_path, tiny, ds=dataset(rows), calibration_check="off")
    relevant = [w for w in caught if "all-equal reference rewards" in str(w.message)]
    assert len(relevant) == 1
    assert "2 of 4 prompts" in str(relevant[0].message) and "rows 0, 2" in str(relevant[0].message)
    torch.testing.assert_close(calibrate([0.0, 1.0, 2.0], [[1.0] * 3] * 3), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    trainer.train()  # still trains
    assert trainer.state.global_step == 1


# ============================================================================================================ config
@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"transform": "softmax:t=3"}, r"CTRLConfig.transform='softmax:t=3'"),
        ({"transform": "bon:t=0"}, r"CTRLConfig.transform='bon:t=0'"),
        ({"transform": "bon:t=abc"}, r"CTRLConfig.transform='bon:t=abc'"),
        ({"transform": "won:t=-2"}, r"CTRLConfig.transform='won:t=-2'"),
        ({"beta": 0.0}, r"CTRLConfig.beta must be > 0"),
        ({"beta": -1.0}, r"CTRLConfig.beta must be > 0"),
        ({"inference_n": 0}, r"CTRLConfig.inference_n must be an integer >= 1, got 0"),
        ({"inference_n": -3}, r"inference_n must be an integer >= 1, got -3"),
        ({"inference_n": 2.5}, r"inference_n must be an integer >= 1, got 2.5"),
    ],
)
def test_invalid_transform_beta_and_n_name_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


# ========================================================================================================== prompts
@pytest.mark.slow  # > 5 s when other jobs load the CPU
def test_empty_completions_are_scored(tmp_path, tiny):
    """Every completion is "" (only EOS may be sampled): the reward of "" is computed, calibrated and trained on."""
    path, tokenizer = tiny
    seen = []

    def reward(completions, **kwargs):
        seen.extend(completions)
        return [0.25 * i for i in range(len(completions))]

    rm = build_tiny_reward_model(tokenizer, hidden_size=32)
    suppress = [i for i in range(len(tokenizer)) if i != tokenizer.eos_token_id]
    trainer = trainer_for(tmp_path, tiny, [reward, rm], reward_processing_classes=[None, tokenizer], max_steps=2,
                          generation_kwargs={"suppress_tokens": suppress}, mask_truncated_completions=False)
    trainer.train()
    assert seen and set(seen) == {""}
    logs = ctrl_logs(trainer)
    assert len(logs) == 2
    for h in logs:
        assert math.isfinite(h["ctrl/raw_reward/reward"]) and math.isfinite(h["ctrl/calibrated_reward"])
        assert h["ctrl/nonfinite_rewards"] == 0
    assert any(k.startswith("ctrl/raw_reward/") and k != "ctrl/raw_reward/reward" and math.isfinite(v)
               for k, v in logs[0].items())  # the reward model scored prompt + ""


def test_prompt_longer_than_context_is_refused_at_construction(tmp_path, tiny):
    long_prompt = " ".join(str(i) for i in range(400))
    n_tokens = len(tiny[1](long_prompt)["input_ids"])
    assert n_tokens >= 256
    ds = Dataset.from_dict({"prompt": [PROMPTS[0], PROMPTS[1], long_prompt, PROMPTS[3]], "ref_rewards": [[0.0, 1.0]] * 4})
    with pytest.raises(ValueError, match=rf"train_dataset: 1 prompt\(s\) fill the model's context of 256 tokens.*row 2 \({n_tokens} tokens\)"):
        trainer_for(tmp_path, tiny, ds=ds)
    medium = " ".join(str(i) for i in range(60))
    assert 20 < len(tiny[1](medium)["input_ids"]) < 256 and all(len(tiny[1](p)["input_ids"]) < 16 for p in PROMPTS)
    ds = Dataset.from_dict({"prompt": [medium, *PROMPTS[1:]], "ref_rewards": [[0.0, 1.0]] * 4})
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) plus max_completion_length=240 exceed"):
        trainer_for(tmp_path, tiny, ds=ds, max_completion_length=240)


def test_dataset_without_prompt_column_lists_columns(tmp_path, tiny):
    ds = Dataset.from_dict({"question": PROMPTS, "ref_rewards": [[0.0, 1.0]] * 4})
    with pytest.raises(ValueError, match=r"no 'prompt' column \(columns: \['question', 'ref_rewards'\]\).*rename_column"):
        trainer_for(tmp_path, tiny, ds=ds)
    with pytest.raises(ValueError, match=r"prompt_column='prompt' is not a column .*\['question', 'ref_rewards'\]"):
        build_reference_rewards(ds, tiny[0], length_reward, tokenizer=tiny[1], num_samples=2, progress=False)


def test_reward_tokenizer_without_pad_token(tmp_path, tiny):
    from transformers import AutoTokenizer

    path, tokenizer = tiny
    rm = build_tiny_reward_model(tokenizer, hidden_size=32)
    no_pad = AutoTokenizer.from_pretrained(path)
    no_pad.pad_token = None
    trainer = trainer_for(tmp_path, tiny, rm, reward_processing_classes=no_pad)
    assert trainer.reward_processing_classes[0].pad_token == tokenizer.eos_token  # TRL: pad = EOS
    neither = AutoTokenizer.from_pretrained(path)
    neither.pad_token = None
    neither.eos_token = None
    with pytest.raises(ValueError, match=r"tokenizer of reward model 0 .* neither a pad token nor an EOS token"):
        trainer_for(tmp_path, tiny, rm, reward_processing_classes=neither)


# ========================================================================================================== faults
def test_unwritable_output_dir_fails_before_loading_anything(tmp_path, tiny, monkeypatch):
    """Tests run as root, where chmod does not block writes: a directory *under a regular file* can never be created.

    Every model load ends in `PreTrainedModel.from_pretrained` (TRL's `create_model_from_path` calls it through the
    config's architecture class, `LlamaForCausalLM` here, not `AutoModelForCausalLM`): the sentinel sits there, and the
    writable case proves the sentinel is on the trainer's loading path."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    import transformers

    loads = []

    def no_loading(cls, *args, **kwargs):
        loads.append(cls.__name__)
        raise AssertionError("the model was loaded before the output_dir check")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_loading))
    path, tokenizer = tiny
    with pytest.raises(AssertionError, match="the model was loaded"):  # writable: the sentinel fires
        CTRLTrainer(model=path, reward_funcs=length_reward, args=config(tmp_path), train_dataset=dataset(),
                    processing_class=tokenizer)
    assert loads == ["LlamaForCausalLM"]
    args = config(tmp_path, output_dir=str(blocker / "sub"))
    with pytest.raises(OSError, match=r"output_dir='.*a_file/sub' is not writable.*[Nn]othing has been computed"):
        CTRLTrainer(model=path, reward_funcs=length_reward, args=args, train_dataset=dataset(), processing_class=tokenizer)
    assert loads == ["LlamaForCausalLM"]  # nothing loaded this time


def test_full_disk_is_refused_before_training(tmp_path, tiny, monkeypatch):
    import shutil as real_shutil

    from trl_infalign import ctrl_trainer

    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ctrl_trainer.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(OSError, match=r"GiB free under CTRLConfig.output_dir=.*model weights alone need"):
        trainer_for(tmp_path, tiny)
    monkeypatch.setattr(ctrl_trainer.shutil, "disk_usage", lambda path: usage._replace(free=200_000))
    with pytest.warns(UserWarning, match="one checkpoint needs about"):
        trainer_for(tmp_path, tiny, save_strategy="steps", save_steps=1)


@pytest.mark.slow  # > 5 s when other jobs load the CPU
def test_hub_token_never_written_to_logs_or_outputs(tmp_path, tiny, capfd, caplog):
    import logging

    secret = "hf_FAKEtokenNEVERtoBEwritten0123456789"
    caplog.set_level(logging.DEBUG)
    trainer = trainer_for(tmp_path, tiny, hub_token=secret, max_steps=2, save_strategy="steps", save_steps=1,
                          disable_tqdm=False, log_level="info")
    trainer.train()
    trainer.save_model()
    print(trainer.args)  # even the repr of the arguments
    captured = capfd.readouterr()
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"README.md", "trainer_state.json", "training_args.bin", "model.safetensors"} <= names
    for p in files:
        assert secret.encode() not in p.read_bytes(), p
    assert secret not in captured.out and secret not in captured.err and secret not in caplog.text
    assert trainer.args.hub_token == secret  # still usable for push_to_hub
    # push_to_hub offline: tests/test_ctrl_trainer.py::test_push_to_hub_offline_keeps_local_output_and_says_why


@pytest.mark.slow
def test_sigkill_during_training_then_resume(tmp_path, tiny):
    path, tokenizer = tiny
    work = tmp_path / "work"
    work.mkdir()
    import shutil

    shutil.copytree(path, work / "policy")
    ds = Dataset.from_dict({"prompt": PROMPTS, "ref_rewards": [[0.0, 1.0, 2.0, 3.0, float(i)] for i in range(4)]})
    ds.save_to_disk(str(work / "data"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(SCRIPT), str(work), "--max-steps", "8", "--save-steps", "2", "--sleep", "0.4"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = work / "out" / "checkpoint-2" / "trainer_state.json"
    sigkill_when(proc, first.exists)
    assert not (work / "out" / "checkpoint-8").exists()
    (work / "out" / "checkpoint-999").mkdir()  # what a kill in the middle of a save leaves: no trainer_state.json

    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Skipping incomplete checkpoint" in done.stderr
    runs = [json.loads(line) for line in (work / "runs.jsonl").read_text().splitlines()]
    starts = [r for r in runs if r["event"] == "start"]
    ends = [r for r in runs if r["event"] == "end"]
    assert [s["resume"] for s in starts] == [False, True] and len(ends) == 1
    assert starts[0]["ref_rewards_sha256"] == starts[1]["ref_rewards_sha256"]
    assert starts[0]["calibration"] == starts[1]["calibration"]
    assert starts[1]["calibration"]["resolved_transform"].startswith("bon:t=")
    assert ends[0]["global_step"] == 8
    executed = ends[0]["executed_steps"]
    assert executed[0] in (3, 5, 7) and executed == list(range(executed[0], 9))  # resumed after a checkpoint
    state = json.loads((work / "out" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["max_steps"] == 8
    saved = json.loads((work / "out" / "ctrl_calibration.json").read_text())
    assert {key: saved[key] for key in starts[0]["calibration"]} == starts[0]["calibration"]
    # the adaptive KL controller resumes from the checkpoint's β, not from the theory's starting β
    assert saved["kl_control"] == "adaptive" and saved["kl_controller"]["num_updates"] == 8
    resumed_from = json.loads((work / "out" / f"checkpoint-{executed[0] - 1}" / "ctrl_calibration.json").read_text())
    assert ends[0]["betas"]["at_start"] == resumed_from["final_beta"] != starts[0]["calibration"]["beta"]
    assert saved["final_beta"] == ends[0]["betas"]["8"]

    # Resuming with different reference rewards is refused before any step.
    changed = ds.map(lambda row: {"ref_rewards": [v + 1.0 for v in row["ref_rewards"]]})
    trainer = CTRLTrainer(
        model=str(work / "policy"), reward_funcs=length_reward, train_dataset=changed, processing_class=tokenizer,
        args=config(tmp_path, output_dir=str(work / "out"), max_steps=10, transform="auto", inference_procedure="bon",
                    inference_n=4, kl_budget=0.3),
    )
    shutil.rmtree(work / "out" / "checkpoint-999")
    with pytest.raises(ValueError, match=r"different calibration.*reference_rewards_sha256"):
        trainer.train(resume_from_checkpoint=True)


# ===================================================================================================== determinism
def token_reward(completion_ids, **kwargs):
    return [float(sum(ids) % 17) for ids in completion_ids]


@pytest.mark.slow
def test_same_seed_same_calibration_and_first_steps(tmp_path, tiny):
    runs = []
    for name in ("a", "b"):
        trainer = trainer_for(tmp_path / name, tiny, token_reward, max_steps=3, transform="auto", kl_budget=0.3, seed=7,
                              learning_rate=1e-3)
        trainer.train()
        runs.append(trainer)
    a, b = runs
    assert a._logs["rewards"]["ctrl_calibrated"] and list(a._logs["rewards"]["ctrl_calibrated"]) == list(b._logs["rewards"]["ctrl_calibrated"])
    logs_a, logs_b = ([h for h in t.state.log_history if "loss" in h] for t in runs)
    assert [h["step"] for h in logs_a] == [1, 2, 3]
    keys = [k for k in logs_a[0] if k.startswith("ctrl/") or k in ("loss", "grad_norm", "reward", "kl")]
    assert "grad_norm" in keys and "ctrl/calibrated_reward" in keys
    for ha, hb in zip(logs_a, logs_b):
        assert {k: ha.get(k) for k in keys} == {k: hb.get(k) for k in keys}
    assert any(h["grad_norm"] > 0 for h in logs_a)  # the runs did move the weights
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
