"""The CTRL HH recipes: HH parsing, the text-pair reward adapter, the YAML / accelerate configs, and the whole recipe
end to end on CPU with tiny local models (no downloads), including publishing to a mocked Hub."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
FIXTURE = ROOT / "tests" / "fixtures" / "hh-tiny"
TINY_CONFIG = RECIPES / "configs" / "ctrl_hh_tiny_offline.yaml"
FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdef"


def _load_recipe():
    spec = importlib.util.spec_from_file_location("ctrl_hh_recipe", RECIPES / "ctrl_hh.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return _load_recipe()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A BPE tokenizer (with a chat template), a tiny policy and a tiny reward model, saved locally."""
    from trl_infalign.tiny import build_tiny_policy, build_tiny_reward_model, build_tokenizer

    if not (FIXTURE / "helpful-base" / "train.jsonl").exists():
        subprocess.run([sys.executable, str(FIXTURE.parent / "make_hh_fixture.py")], check=True)
    texts = []
    for path in FIXTURE.rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer(texts + ["user: assistant:"] * 20, vocab_size=400, chat_template=True)
    policy = build_tiny_policy(tokenizer, root / "policy", hidden_size=32, num_layers=1)
    build_tiny_reward_model(tokenizer, root / "rm")
    return {"policy": policy, "rm": str(root / "rm"), "tokenizer": tokenizer}


def _recipe_args(tiny_models, output_dir, *extra):
    return ["--config", str(TINY_CONFIG), "--model_name_or_path", tiny_models["policy"],
            "--reward_model_name_or_path", tiny_models["rm"], "--dataset_name", str(FIXTURE),
            "--output_dir", str(output_dir), *extra]


# ---------------------------------------------------------------------------------------------------------------------
# HH transcripts


def test_parse_single_and_multi_turn():
    from trl_infalign.hh import hh_prompt, parse_hh_transcript

    assert parse_hh_transcript("\n\nHuman: Hi there?\n\nAssistant: Hello!") == [
        {"role": "user", "content": "Hi there?"}, {"role": "assistant", "content": "Hello!"}]
    text = "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: A2"
    assert [m["role"] for m in parse_hh_transcript(text)] == ["user", "assistant", "user", "assistant"]
    assert hh_prompt({"chosen": text}) == [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]


def test_parse_tolerates_hh_quirks():
    from trl_infalign.hh import hh_prompt, parse_hh_transcript

    # no leading blank lines, consecutive human turns (merged), bare final "Assistant:", text with "Human" inside
    assert parse_hh_transcript("Human: a\n\nAssistant: b") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    merged = parse_hh_transcript("\n\nHuman: a\n\nHuman: b\n\nAssistant: c")
    assert merged == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]
    assert hh_prompt({"chosen": "\n\nHuman: What is a Human: role?\n\nAssistant:"}) == [
        {"role": "user", "content": "What is a Human: role?"}]
    # a transcript ending with a human turn is a prompt already
    assert hh_prompt({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"})[-1] == {"role": "user", "content": "c"}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("just some text", "found no 'Human:'/'Assistant:' turns"),
        ("preamble\n\nHuman: a\n\nAssistant: b", "text before the first turn"),
        ("\n\nAssistant: a\n\nHuman: b", "must start with a 'Human:' turn"),
        (None, "Expected an HH-RLHF transcript string"),
    ],
)
def test_malformed_transcripts_say_what_was_expected(text, needle):
    from trl_infalign.hh import HHFormatError, parse_hh_transcript

    with pytest.raises(HHFormatError) as info:
        parse_hh_transcript(text)
    assert needle in str(info.value)
    assert "Human:" in str(info.value)


def test_missing_chosen_column(tmp_path):
    from datasets import Dataset

    from trl_infalign.hh import hh_prompt, load_hh_prompts

    with pytest.raises(KeyError, match="chosen"):
        hh_prompt({"rejected": "\n\nHuman: a\n\nAssistant: b"})
    Dataset.from_dict({"text": ["x"]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(KeyError, match="neither a 'prompt' column nor a 'chosen' column"):
        load_hh_prompts(str(tmp_path / "bad"))


def test_load_hh_prompts_from_local_layouts(tmp_path):
    from trl_infalign.hh import HHFormatError, load_hh_prompts

    ds = load_hh_prompts(str(FIXTURE), data_dir="helpful-base", split="test", max_prompts=5)
    assert ds.column_names == ["prompt"] and len(ds) == 5
    for prompt in ds["prompt"]:
        assert prompt[0]["role"] == "user" and prompt[-1]["role"] == "user"
    single = load_hh_prompts(str(FIXTURE / "harmless-base" / "train.jsonl"))
    assert len(single) == 24
    # a dataset with its own prompt column (trl-lib/tldr style) keeps it
    tldr = tmp_path / "tldr.jsonl"
    tldr.write_text("\n".join(json.dumps({"prompt": f"POST {i}\nTL;DR:", "completion": "x"}) for i in range(3)))
    assert load_hh_prompts(str(tldr))["prompt"] == [f"POST {i}\nTL;DR:" for i in range(3)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"chosen": "\n\nHuman: ok\n\nAssistant: ok"}) + "\n" + json.dumps({"chosen": "oops"}) + "\n")
    with pytest.raises(HHFormatError, match="row 1"):
        load_hh_prompts(str(bad))
    with pytest.raises(FileNotFoundError, match="validation"):
        load_hh_prompts(str(FIXTURE), data_dir="helpful-base", split="validation")


# ---------------------------------------------------------------------------------------------------------------------
# Text-pair reward adapter


def test_text_pair_reward_on_tiny_sequence_classifier(tiny_models):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trl_infalign.hh import TextPairRewardModel, flatten_prompt, text_pair_reward

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["rm"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["rm"])
    reward = TextPairRewardModel(model, tokenizer, batch_size=2)
    prompts = [[{"role": "user", "content": "How do I look after tea?"}],
               [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
               "plain text prompt"]
    completions = [[{"role": "assistant", "content": "Keep it dry."}], [{"role": "assistant", "content": "No."}],
                   "a plain completion that is a little longer than the others"]
    scores = reward(prompts=prompts, completions=completions, completion_ids=None, ref_rewards=[[0.0]] * 3)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    # each score is the model's logits[0] on tokenizer(question, answer), batched or not
    expected = []
    for q, a in [("How do I look after tea?", "Keep it dry."), (flatten_prompt(prompts[1]), "No."),
                 ("plain text prompt", completions[2])]:
        with torch.inference_mode():
            expected.append(model(**tokenizer(q, a, return_tensors="pt")).logits[0, 0].item())
    assert scores == pytest.approx(expected, abs=1e-5)
    assert reward.__name__ == "rm"
    assert flatten_prompt(prompts[1]) == "Human: Q1\n\nAssistant: A1\n\nHuman: Q2"
    # from paths, batch size 1
    assert text_pair_reward(tiny_models["rm"], tiny_models["rm"], batch_size=1)(prompts, completions) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="one prompt per completion"):
        reward(prompts[:2], completions)


# ---------------------------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("path", sorted(glob.glob(str(RECIPES / "configs" / "*.yaml"))), ids=os.path.basename)
def test_recipe_config_parses_into_ctrl_config(recipe, path):
    from trl_infalign import CTRLArguments

    # GPU configs ask for bf16; on this CPU-only machine TrainingArguments refuses bf16 without use_cpu.
    script_args, training_args, model_args = recipe.make_parser().parse_args_and_config(
        args=["--config", path, "--bf16", "false", "--use_cpu", "true", "--output_dir", "/tmp/unused-ctrl-out"])
    assert isinstance(training_args, CTRLArguments)  # CTRLConfig (RLOO) or CTRLGRPOConfig
    name = os.path.basename(path)
    if training_args.is_multi_reward:  # a deployment on named rewards: one reward model per name
        names = [entry.split("=")[0] for entry in script_args.reward_models]
        assert training_args.deployment.bind(names).rewards == tuple(names)
        assert training_args.fits_on_references and training_args.kl_budget is not None
        assert (name, script_args.data_dir) == ("ctrl_hh_helpful_harmless.yaml", "helpful-base,harmless-base")
        return
    assert training_args.inference_procedure in ("bon", "won")
    assert training_args.resolved_transform.split(":")[0] == training_args.inference_procedure
    assert training_args.per_device_train_batch_size % training_args.num_generations == 0
    assert training_args.num_reference_samples >= training_args.min_reference_samples
    assert script_args.eval_num_samples >= training_args.inference_n
    assert script_args.reward_model_input in ("pair", "text")
    assert model_args.model_name_or_path
    if name.startswith("ctrl_hh_helpful"):
        assert (script_args.dataset_name, script_args.data_dir, training_args.inference_procedure, training_args.inference_n) == (
            "Anthropic/hh-rlhf", "helpful-base", "bon", 4)
    if name.startswith("ctrl_hh_harmless"):
        assert (script_args.dataset_name, script_args.data_dir, training_args.inference_procedure, training_args.inference_n) == (
            "Anthropic/hh-rlhf", "harmless-base", "won", 4)
    if name.startswith("ctrl_tldr"):
        assert (script_args.dataset_name, script_args.dataset_prompt_column) == ("trl-lib/tldr", "prompt")


def test_recipe_reference_pass_samples_like_the_trainer(recipe, tmp_path):
    """The reference pass gets every sampling field of the training config (issue #20 item 8), min_p and
    repetition_penalty included, through one ReferenceConfig."""
    from trl_infalign import ReferenceConfig

    script_args, training_args, model_args = recipe.make_parser().parse_args_and_config(
        args=["--config", str(TINY_CONFIG), "--output_dir", str(tmp_path / "out"), "--min_p", "0.05",
              "--repetition_penalty", "1.3", "--temperature", "0.9", "--top_k", "7"])
    config = recipe.reference_config(script_args, training_args, model_args)
    assert isinstance(config, ReferenceConfig)
    assert (config.min_p, config.repetition_penalty, config.temperature, config.top_k) == (0.05, 1.3, 0.9, 7)
    assert (config.num_samples, config.max_new_tokens, config.seed, config.batch_size) == (
        training_args.num_reference_samples, training_args.max_completion_length, training_args.seed,
        script_args.reference_batch_size)
    assert config.cache_dir == recipe.reference_cache_dir(script_args, training_args)


@pytest.mark.parametrize("path", sorted(glob.glob(str(RECIPES / "accelerate_configs" / "*.yaml"))), ids=os.path.basename)
def test_accelerate_config_parses(path):
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    raw = yaml.safe_load(Path(path).read_text())
    for key in ("compute_environment", "distributed_type", "mixed_precision", "num_machines", "num_processes", "machine_rank"):
        assert key in raw, f"{path} lacks {key}"
    config = load_config_from_file(path)
    name = os.path.basename(path)
    expected = {"single_gpu.yaml": ("NO", 1), "multi_gpu.yaml": ("MULTI_GPU", 8), "deepspeed_zero2.yaml": ("DEEPSPEED", 8),
                "deepspeed_zero3.yaml": ("DEEPSPEED", 8), "cpu_2proc.yaml": ("MULTI_GPU", 2)}[name]
    assert (str(config.distributed_type).split(".")[-1], config.num_processes) == expected
    if name.startswith("deepspeed"):
        assert raw["deepspeed_config"]["zero_stage"] == int(name[-6])


@pytest.mark.slow
def test_cpu_2proc_config_really_runs_two_ranks(tmp_path):
    """`cpu_2proc.yaml` + a state built with cpu=True (what the recipes do via use_cpu) gives world_size == 2."""
    script = tmp_path / "ws.py"
    script.write_text(
        "import json, sys\nfrom transformers import TrainingArguments\nfrom accelerate import PartialState\n"
        "args = TrainingArguments(output_dir=sys.argv[1], use_cpu=True, report_to='none')\n_ = args.device\n"
        "s = PartialState()\n"
        "open(f'{sys.argv[1]}/rank{s.process_index}.json', 'w').write(json.dumps([s.num_processes, str(s.distributed_type)]))\n"
    )
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(accelerate), "launch", "--config_file", str(RECIPES / "accelerate_configs" / "cpu_2proc.yaml"),
                             "--main_process_port", "29547", str(script), str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records == [[2, "DistributedType.MULTI_CPU"]] * 2


# ---------------------------------------------------------------------------------------------------------------------
# The recipe end to end


def _all_text(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in Path(root).rglob("*") if p.is_file())


def test_recipe_end_to_end_cli(tiny_models, tmp_path):
    """`python recipes/ctrl_hh.py --config ctrl_hh_tiny_offline.yaml`: reference pass, training, evaluation, card."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(RECIPES / "ctrl_hh.py"), *_recipe_args(tiny_models, out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "infalign_eval.json"):
        assert (out / name).exists(), name
    cache = Path(str(out) + "-reference-cache")
    assert (cache / "meta.json").exists() and list(cache.glob("rank-*.jsonl"))
    evaluation = json.loads((out / "infalign_eval.json").read_text())
    procedures = {(row["procedure"], row["n"]) for row in evaluation["win_rates"]}
    assert ("bon", 2) in procedures
    card = (out / "README.md").read_text()
    assert "CTRL" in card and "2412.19792" in card and "Inference-time evaluation" in card

    # resuming: a second run with the same cache recomputes no reference chunk (nothing is appended to the shards)
    shards = {p.name: p.read_text() for p in cache.glob("rank-*.jsonl")}
    rerun = subprocess.run(cmd + ["--skip_eval", "true", "--max_steps", "1"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {p.name: p.read_text() for p in cache.glob("rank-*.jsonl")} == shards
    assert json.loads((cache / "meta.json").read_text())["num_samples"] == 4


def test_helpful_harmless_recipe_end_to_end_on_the_tiny_fixture(tiny_models, tmp_path):
    """`ctrl_hh_helpful_harmless.yaml` (BoN-4 on helpfulness + WoN-4 on harmlessness, one run), shrunk to the tiny
    offline models: per-reward references, the fit on them, training, the deployment's evaluation and the card."""
    from trl_infalign.tiny import build_tiny_reward_model

    second = tmp_path / "rm2"
    build_tiny_reward_model(tiny_models["tokenizer"], second, seed=1)
    out = tmp_path / "out"
    tiny = {"dtype": "float32", "bf16": "false", "use_cpu": "true", "num_generations": "2",
            "per_device_train_batch_size": "4", "gradient_accumulation_steps": "1", "max_completion_length": "8",
            "max_steps": "2", "max_train_prompts": "8", "max_eval_prompts": "4", "num_reference_samples": "4",
            "min_reference_samples": "2", "reference_batch_size": "4", "eval_num_samples": "4", "logging_steps": "1",
            "save_strategy": "no", "warmup_steps": "0", "learning_rate": "1e-3", "disable_tqdm": "true",
            "gradient_checkpointing": "false", "seed": "0"}
    cmd = [sys.executable, str(RECIPES / "ctrl_hh.py"), "--config", str(RECIPES / "configs" / "ctrl_hh_helpful_harmless.yaml"),
           "--model_name_or_path", tiny_models["policy"], "--dataset_name", str(FIXTURE), "--output_dir", str(out),
           "--reward_models", f"helpful={tiny_models['rm']}", f"harmless={second}",
           *[item for key, value in tiny.items() for item in (f"--{key}", value)]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "2"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    evaluation = json.loads((out / "infalign_eval.json").read_text())
    (deployment,) = evaluation["deployments"]
    assert deployment["spec"] == "mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"
    assert {c["reward"] for c in deployment["components"]} == {"helpful", "harmless"}
    state = json.loads((out / "ctrl_calibration.json").read_text())
    assert state["resolved_transform"].startswith("bon:t=") and "@helpful+won:t=" in state["resolved_transform"]
    card = (out / "README.md").read_text()
    assert "@helpful" in card and "@harmless" in card


class _FakeHub:
    """Replaces the network calls of huggingface_hub: repos are folders under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.tokens: list = []

    def create_repo(self, api, repo_id, *args, token=None, **kwargs):
        from huggingface_hub import RepoUrl

        self.tokens.append(token)
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, token=None, ignore_patterns=None, **kwargs):
        self.tokens.append(token)
        ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        for path in Path(folder_path).rglob("*"):
            rel = path.relative_to(folder_path).as_posix()
            if path.is_file() and not any(fnmatch(rel, p) for p in ignore):
                target = self.root / repo_id / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        return f"https://huggingface.co/{repo_id}/commit/0000"


def best_exp_t_at_beta(n: int, beta: float) -> float:
    """argmax_t W_BoN-n(g_t) − β·KL(g_t) for g_t ∝ exp(exp(t·c)/β) on c ∈ [0, 1] (InfAlign's BoN family at a fixed KL
    coefficient, notes §2): W = ∫ n G^{n−1} g c^n dc, KL = ∫ g log g dc, trapezoids on 20 001 points, bounded Brent on
    log t over [0.01, 60]."""
    import math

    import numpy as np
    from scipy.integrate import cumulative_trapezoid
    from scipy.optimize import minimize_scalar

    c = np.linspace(0.0, 1.0, 20_001)

    def objective(t: float) -> float:
        log_g = np.exp(t * c) / beta
        log_g -= log_g.max()
        log_g -= math.log(np.trapezoid(np.exp(log_g), c))
        g = np.exp(log_g)
        cdf = cumulative_trapezoid(g, c, initial=0.0)
        cdf /= cdf[-1]
        return float(np.trapezoid(n * cdf ** (n - 1) * g * c**n, c) - beta * np.trapezoid(g * log_g, c))

    found = minimize_scalar(lambda u: -objective(math.exp(u)), bounds=(math.log(0.01), math.log(60.0)),
                            method="bounded", options={"xatol": 1e-10})
    return math.exp(found.x)


def test_push_to_hub_publishes_model_tokenizer_and_card(recipe, tiny_models, tmp_path, monkeypatch, capfd):
    from huggingface_hub import HfApi

    hub = _FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: hub.create_repo(self, *a, **k))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, *a, **k: hub.upload_folder(self, *a, **k))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "out"
    args = recipe.make_parser().parse_args_and_config(args=_recipe_args(
        tiny_models, out, "--push_to_hub", "true", "--hub_model_id", "me/tiny-ctrl", "--hub_token", FAKE_TOKEN))
    assert recipe.main(*args) == 0
    repo = tmp_path / "hub" / "me" / "tiny-ctrl"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (repo / name).exists(), name
    assert not list(repo.glob("*reference*")), "the reference cache must not be uploaded"
    card = (repo / "README.md").read_text()
    evaluation = json.loads((out / "infalign_eval.json").read_text())
    t = re.search(r"`bon:t=([0-9.eE+-]+)`", card)
    assert t, "the card names the transform's t"
    for needle in ("CTRL", "InfAlign", "2412.19792", "| inference-time procedure | `bon` |", "| N | 2 |",
                   "| K (reference samples per prompt) | 4 |", "| β (KL coefficient) | 0.1 |", f"bon:t={t[1]}",
                   f"| t | {float(t[1]):.4g} |", "hh-tiny/helpful-base", "KL(π‖π_ref)", "Inference-time evaluation",
                   f"{evaluation['kl']['k1']['estimate']:.4f}", "me/tiny-ctrl"):
        assert needle in card, needle
    # transform=auto at β = 0.1 for BoN-2: the card's t is the best exp(t·c) for that β, derived here by quadrature
    assert float(t[1]) == pytest.approx(best_exp_t_at_beta(n=2, beta=0.1), rel=1e-4)
    for row in evaluation["win_rates"]:  # standard = BoN-1 = WoN-1: one row
        procedure = "standard" if row["n"] == 1 else row["procedure"]
        assert f"| {procedure} | {row['n']} | {row['estimate']:.3f} |" in card
    assert card.count("| standard | 1 |") == 1 and "| bon | 1 |" not in card and "| won | 1 |" not in card
    # the token reached the Hub calls (through HF_TOKEN) but nothing written or printed
    captured = capfd.readouterr()
    leaks = [name for name, blob in (("stdout", captured.out.encode()), ("stderr", captured.err.encode()),
                                      ("hub", _all_text(tmp_path / "hub")), ("output", _all_text(out)))
             if FAKE_TOKEN.encode() in blob]
    assert not leaks, f"token leaked into {leaks}"
    assert os.environ.get("HF_TOKEN") == FAKE_TOKEN  # where the recipe moved it for huggingface_hub to pick up


def test_offline_push_failure_keeps_local_output_and_says_why(tiny_models, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "2"}
    env.pop("HF_TOKEN", None)
    cmd = [sys.executable, str(RECIPES / "ctrl_hh.py"), *_recipe_args(
        tiny_models, out, "--skip_eval", "true", "--max_steps", "1", "--push_to_hub", "true",
        "--hub_model_id", "me/tiny-ctrl", "--hub_token", FAKE_TOKEN)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Hub upload failed" in result.stderr
    assert "Offline" in result.stderr or "offline" in result.stderr  # the reason: HF_HUB_OFFLINE / OfflineModeIsEnabled
    assert str(out.resolve()) in result.stderr  # where the finished output is
    for name in ("model.safetensors", "tokenizer.json", "README.md"):
        assert (out / name).exists(), name
    assert "CTRL" in (out / "README.md").read_text()
    assert FAKE_TOKEN not in result.stdout + result.stderr
    assert FAKE_TOKEN.encode() not in _all_text(out)


@pytest.mark.slow
def test_recipe_two_cpu_processes(tiny_models, tmp_path):
    """`accelerate launch --config_file cpu_2proc.yaml recipes/ctrl_hh.py`: sharded reference pass, training, eval."""
    out = tmp_path / "out"
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(accelerate), "launch", "--config_file", str(RECIPES / "accelerate_configs" / "cpu_2proc.yaml"),
           "--main_process_port", "29553", str(RECIPES / "ctrl_hh.py"), *_recipe_args(tiny_models, out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    cache = Path(str(out) + "-reference-cache")
    assert sorted(p.name for p in cache.glob("rank-*.jsonl")) == ["rank-00000.jsonl", "rank-00001.jsonl"]
    assert (out / "model.safetensors").exists() and (out / "infalign_eval.json").exists()
    assert "Inference-time evaluation" in (out / "README.md").read_text()
