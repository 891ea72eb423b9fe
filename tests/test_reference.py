"""Reference pass: values, determinism, resumption (incl. a real SIGKILL), sharding, validation, CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from trl_infalign.reference import _build_reference_rewards, build_reference_rewards, validate_reference_rewards
from trl_infalign.sampling import combine_rewards, load_reward_funcs, score_completions
from trl_infalign.tiny import build_tiny_policy, build_tiny_reward_model, build_tokenizer

from process_utils import sigkill_when

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "build_reference_script.py"
VENV_BIN = Path(sys.executable).parent

TEXTS = [
    "the cat sat on the mat", "a dog ran in the park", "hello world, how are you", "good morning to you all",
    "the quick brown fox jumps", "over the lazy dog again", "tell me a story about a cat", "write a poem on rain",
]
PROMPTS = ["the cat", "a dog", "hello", "good morning", "the quick", "over the", "tell me"]
TOPICS = ["pets", "pets", "greet", "greet", "fox", "fox", "story"]


def _load_script_module():
    spec = importlib.util.spec_from_file_location("build_reference_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script_module()
SETTINGS = script.SETTINGS
length_reward = script.length_reward


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    tokenizer = build_tokenizer(TEXTS * 4, vocab_size=300)
    policy = build_tiny_policy(tokenizer, root / "policy", hidden_size=32, num_layers=1)
    build_tiny_reward_model(tokenizer, root / "reward", hidden_size=16)
    data = root / "prompts.jsonl"
    with open(data, "w") as f:
        for p, t in zip(PROMPTS, TOPICS):
            f.write(json.dumps({"prompt": p, "topic": t}) + "\n")
    dataset = Dataset.from_dict({"prompt": PROMPTS, "topic": TOPICS})
    return {"root": root, "tokenizer": tokenizer, "policy": policy, "reward": str(root / "reward"), "data": data, "dataset": dataset}


def _build(tiny, funcs=None, **kwargs):
    settings = {**SETTINGS, "progress": False, **kwargs}
    if funcs is not None and "reward_weights" not in kwargs:
        settings["reward_weights"] = None
    return build_reference_rewards(tiny["dataset"], tiny["policy"], funcs or [tiny["reward"], length_reward], **settings)


@pytest.fixture(scope="module")
def baseline(tiny):
    """An uninterrupted single-process build without cache: what every other path must reproduce exactly."""
    return list(_build(tiny)["ref_rewards"])


def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


class CountingReward:
    """Callable reward that counts its calls (one per chunk), records kwargs, and can fail after `fail_after` calls."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after, self.kwargs = 0, fail_after, []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.kwargs.append(kwargs)
        return [len(c) / 10.0 for c in completions]


# ---------------------------------------------------------------------------------------------------------------------
# Values


def _direct_reward(reward_model, tokenizer, prompt: str, completion: str) -> float:
    """The weighted reward of SETTINGS computed by hand: the reward model on the one unpadded sequence prompt +
    completion (its logit 0, as TRL reads it) plus 0.5 × the length reward."""
    ids = tokenizer(prompt + completion, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        rm = reward_model(input_ids=ids).logits[0, 0].item()
    w_rm, w_len = SETTINGS["reward_weights"]
    return w_rm * rm + w_len * len(completion) / 10.0


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding by hand, one unpadded prompt at a time, stopping after EOS."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.cat([ids, torch.tensor([new], dtype=ids.dtype)], dim=1)).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True)


def test_values_equal_direct_computation(tiny, baseline):
    """Every reference reward is the reward of its own prompt's completion, computed by hand (not with the sampling
    helpers): for sampled completions (kept with keep_completions) and, where the completions themselves can be
    computed without the sampler's seeds, for greedy ones (`do_sample=False`) against a hand-written greedy loop."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer, k = tiny["tokenizer"], SETTINGS["num_samples"]
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny["reward"]).eval()
    sampled = _build(tiny, keep_completions=True)
    assert list(sampled["ref_rewards"]) == baseline  # keeping the completions changes nothing
    assert len(baseline) == len(PROMPTS) and all(len(row) == k for row in baseline)
    assert len({tuple(r) for r in baseline}) == len(PROMPTS)  # samples differ between rows
    for prompt, rewards, completions in zip(PROMPTS, baseline, sampled["ref_completions"], strict=True):
        assert rewards == pytest.approx([_direct_reward(reward_model, tokenizer, prompt, c) for c in completions],
                                        rel=1e-5, abs=1e-6)
    policy = AutoModelForCausalLM.from_pretrained(tiny["policy"]).eval()
    greedy = _build(tiny, keep_completions=True, generation_kwargs={"do_sample": False})
    for prompt, rewards, completions in zip(PROMPTS, greedy["ref_rewards"], greedy["ref_completions"], strict=True):
        expected = _greedy(policy, tokenizer, prompt, SETTINGS["max_new_tokens"])
        assert completions == [expected] * k, prompt
        assert rewards == pytest.approx([_direct_reward(reward_model, tokenizer, prompt, expected)] * k,
                                        rel=1e-5, abs=1e-6)



def test_samples_are_the_keyed_draws_of_the_model(tiny, baseline):
    """Brute force: sample j of row r is drawn token by token, each by inverse CDF of the model's next-token
    distribution (one unpadded forward per token, no KV cache) with the uniform keyed by (seed, r, j, step), then
    scored and combined directly. The build (batched, left-padded `generate` + KeyedSampling) gives the same values."""
    from transformers import AutoModelForCausalLM

    from trl_infalign.reference_sampling import keyed_uniforms, sample_key
    from trl_infalign.sampling import eos_token_ids, tokenize_prompts

    model = AutoModelForCausalLM.from_pretrained(tiny["policy"]).eval()
    tokenizer = tiny["tokenizer"]
    funcs, classes = load_reward_funcs([tiny["reward"], length_reward])
    k, stop = SETTINGS["num_samples"], set(eos_token_ids(model, tokenizer))
    expected = []
    for row, prompt_ids in enumerate(tokenize_prompts(tokenizer, PROMPTS)):
        texts, ids = [], []
        for j in range(k):
            key, tokens = sample_key(SETTINGS["seed"], row, j), []
            for step in range(SETTINGS["max_new_tokens"]):
                with torch.no_grad():
                    logits = model(torch.tensor([prompt_ids + tokens])).logits[0, -1].float()
                cdf = torch.softmax(logits, -1).cumsum(-1)
                u = torch.tensor(keyed_uniforms([key], step), dtype=torch.float32)
                tokens.append(int(torch.searchsorted(cdf, u * cdf[-1])))
                if tokens[-1] in stop:
                    break
            ids.append(tokens)
            texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
        raw = score_completions(funcs, classes, [PROMPTS[row]] * k, texts, completion_ids=ids)
        expected.append(combine_rewards(raw, SETTINGS["reward_weights"]).tolist())
    # the same draws, scored in other batch shapes: the reward model's float32 matmuls may round differently (seen:
    # 3e-8 under a loaded machine); a different sample would move its reward by far more
    assert len(baseline) == len(expected)
    for row, (built, direct) in enumerate(zip(baseline, expected, strict=True)):
        assert built == pytest.approx(direct, rel=1e-6, abs=1e-7), row

def test_callable_gets_columns_and_completions_kept(tiny):
    reward = CountingReward()
    out = _build(tiny, [reward], keep_completions=True)
    assert out.column_names == ["prompt", "topic", "ref_rewards", "ref_rewards_provenance", "ref_completions"]
    k = SETTINGS["num_samples"]
    assert reward.kwargs[0]["topic"] == [t for t in TOPICS[:2] for _ in range(k)]
    assert {"trainer_state", "log_extra", "log_metric"} <= set(reward.kwargs[0])
    for rewards, completions in zip(out["ref_rewards"], out["ref_completions"]):
        assert rewards == [_f32(len(t) / 10.0) for t in completions]  # float32, like the trainer's rewards
    validate_reference_rewards(out, min_samples=k)


def test_loaded_model_and_conversational_prompts(tiny):
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(TEXTS * 4, vocab_size=300, chat_template=True)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS[:3]]})
    model = AutoModelForCausalLM.from_pretrained(tiny["policy"])
    out = build_reference_rewards(
        dataset, model, length_reward, tokenizer=tokenizer, num_samples=2, max_new_tokens=4, keep_completions=True,
        progress=False,
    )
    first = out["ref_completions"][0][0]
    assert first[0]["role"] == "assistant"
    assert out["ref_rewards"][0][0] == _f32(len(first) / 10.0)  # a callable sees message lists, as in TRL


# ---------------------------------------------------------------------------------------------------------------------
# Caching and resumption


def test_resume_after_crash_is_identical_and_skips_finished_chunks(tiny, tmp_path):
    cache = tmp_path / "cache"
    crashing = CountingReward(fail_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _build(tiny, [crashing], cache_dir=cache)
    lines = (cache / "rank-00000.jsonl").read_text().splitlines()
    assert len(lines) == 2 * SETTINGS["batch_size"]  # two finished chunks on disk
    assert json.loads(lines[0]).keys() >= {"index", "ref_rewards"}
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["num_samples"] == SETTINGS["num_samples"] and meta["dataset_num_rows"] == len(PROMPTS)

    resumed_reward = CountingReward()
    resumed = _build(tiny, [resumed_reward], cache_dir=cache)
    num_chunks = math.ceil(len(PROMPTS) / SETTINGS["batch_size"])
    assert resumed_reward.calls == num_chunks - 2  # finished chunks were not recomputed
    fresh = _build(tiny, [CountingReward()])
    assert resumed["ref_rewards"] == fresh["ref_rewards"]

    # A third run finds everything on disk and computes nothing.
    idle = CountingReward()
    assert _build(tiny, [idle], cache_dir=cache)["ref_rewards"] == fresh["ref_rewards"]
    assert idle.calls == 0


def test_half_written_last_line_is_redone(tiny, tmp_path, baseline):
    cache = tmp_path / "cache"
    assert _build(tiny, cache_dir=cache)["ref_rewards"] == baseline
    shard = cache / "rank-00000.jsonl"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 15])  # killed in the middle of writing the last row
    _, stats = _build_reference_rewards(
        tiny["dataset"], tiny["policy"], [tiny["reward"], length_reward], cache_dir=cache, progress=False, **SETTINGS
    )
    assert stats.chunks_computed == 1 and stats.chunks_resumed == stats.num_chunks - 1
    again = _build(tiny, cache_dir=cache)["ref_rewards"]
    assert again == baseline
    assert all(line.strip() and json.loads(line) for line in shard.read_text().splitlines())


def test_metadata_mismatch_names_the_field(tiny, tmp_path):
    cache = tmp_path / "cache"
    _build(tiny, [length_reward], cache_dir=cache)
    with pytest.raises(ValueError, match=r"'num_samples' is 3 in meta.json but 2 now.*Ask for num_samples=3.*new cache_dir"):
        _build(tiny, [length_reward], cache_dir=cache, num_samples=2)  # a larger K tops the cache up (test_top_up_...)
    with pytest.raises(ValueError, match="'temperature'"):
        _build(tiny, [length_reward], cache_dir=cache, temperature=0.7)
    with pytest.raises(ValueError, match="'dataset_fingerprint'"):
        build_reference_rewards(
            tiny["dataset"].map(lambda x: {"prompt": x["prompt"] + "!"}), tiny["policy"], [length_reward],
            cache_dir=cache, progress=False, **{**SETTINGS, "reward_weights": None},
        )


@pytest.mark.slow
def test_sigkill_mid_build_then_resume(tiny, tmp_path, baseline):
    cache = tmp_path / "cache"
    out = tmp_path / "killed.json"
    cmd = [sys.executable, str(SCRIPT), "--policy", tiny["policy"], "--reward-model", tiny["reward"],
           "--data", str(tiny["data"]), "--out", str(out), "--cache-dir", str(cache), "--sleep", "1.0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    shard = cache / "rank-00000.jsonl"
    sigkill_when(proc, lambda: shard.exists() and len(shard.read_text().splitlines()) >= SETTINGS["batch_size"])
    assert not out.exists()
    finished = len(shard.read_text().splitlines())
    assert SETTINGS["batch_size"] <= finished < len(PROMPTS)

    _, stats = _build_reference_rewards(
        tiny["dataset"], tiny["policy"], [tiny["reward"], length_reward], cache_dir=cache, progress=False, **SETTINGS
    )
    assert stats.chunks_resumed >= 1 and stats.chunks_computed == stats.num_chunks - stats.chunks_resumed
    resumed = _build(tiny, cache_dir=cache)["ref_rewards"]
    assert resumed == baseline


# ---------------------------------------------------------------------------------------------------------------------
# Sharding


@pytest.mark.slow
def test_two_process_sharding_with_torchrun(tiny, tmp_path, baseline):
    cache = tmp_path / "cache"
    out = tmp_path / "sharded.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
           str(SCRIPT), "--policy", tiny["policy"], "--reward-model", tiny["reward"], "--data", str(tiny["data"]),
           "--out", str(out), "--cache-dir", str(cache), "--no-cache-too"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    # Both ranks really ran: each wrote its own shard with its own chunks (chunk i -> rank i % 2).
    c = SETTINGS["batch_size"]
    for rank in (0, 1):
        rows = {json.loads(line)["index"] for line in (cache / f"rank-{rank:05d}.jsonl").read_text().splitlines()}
        assert rows == {r for r in range(len(PROMPTS)) if (r // c) % 2 == rank}
        assert json.loads(Path(f"{out}.rank{rank}").read_text())["chunks_computed"] == len({r // c for r in rows})
    assert result["ref_rewards"] == baseline
    assert result["no_cache"] == baseline  # gather_object path


# ---------------------------------------------------------------------------------------------------------------------
# Validation of inputs


def test_input_validation_errors(tiny):
    ds = tiny["dataset"]
    with pytest.raises(ValueError, match=r"prompt_column='question'.*\['prompt', 'topic'\]"):
        _build(tiny, [length_reward], prompt_column="question")
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        _build(tiny, [length_reward], num_samples=0)
    with pytest.raises(ValueError, match="empty"):
        build_reference_rewards(ds.select([]), tiny["policy"], length_reward, progress=False)
    with pytest.raises(ValueError, match=r"already has a column 'ref_rewards'.*overwrite=True"):
        build_reference_rewards(ds.add_column("ref_rewards", [[0.0]] * len(ds)), tiny["policy"], length_reward, progress=False)
    with pytest.raises(ValueError, match="reward_weights has 1 entries for 2"):
        _build(tiny, reward_weights=[1.0])
    with pytest.raises(ValueError, match="nonfinite must be"):
        _build(tiny, [length_reward], nonfinite="ignore")
    replaced = build_reference_rewards(
        ds.add_column("ref_rewards", [[0.0]] * len(ds)), tiny["policy"], length_reward, overwrite=True, progress=False,
        num_samples=2, max_new_tokens=3,
    )
    assert all(len(r) == 2 for r in replaced["ref_rewards"])


def test_vllm_missing_is_a_clear_import_error(tiny):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(ImportError, match=r"pip install trl-infalign\[vllm\]"):
        _build(tiny, [length_reward], use_vllm=True)


def _nan_for(bad):
    """Reward that is NaN for the samples whose (row, k) is in `bad` (a row's samples are consecutive)."""
    k = SETTINGS["num_samples"]

    def nan_reward(prompts, completions, **kwargs):
        start = PROMPTS.index(prompts[0])
        return [math.nan if divmod(start * k + j, k) in bad else 1.0 for j in range(len(completions))]

    return nan_reward


def test_nonfinite_rewards_raise_or_skip(tiny, caplog):
    with pytest.raises(ValueError, match=r"Dataset row 3: reference sample 1 .*nonfinite='skip'"):
        _build(tiny, [_nan_for({(3, 1)})])
    out = _build(tiny, [_nan_for({(3, 1), (5, 0), (5, 2)})], nonfinite="skip")
    lengths = [len(r) for r in out["ref_rewards"]]
    k = SETTINGS["num_samples"]
    assert lengths == [k, k, k, k - 1, k, k - 2, k]
    assert "Dropped 3 non-finite reference rewards in 2 row(s)" in caplog.text
    with pytest.raises(ValueError, match="min_samples=2"):
        validate_reference_rewards(out, min_samples=2)
    with pytest.raises(ValueError, match=r"Dataset row 6: all 3 reference samples"):
        _build(tiny, [_nan_for({(6, 0), (6, 1), (6, 2)})], nonfinite="skip")


def test_validate_reference_rewards():
    good = Dataset.from_dict({"prompt": ["a", "b"], "ref_rewards": [[0.1, 0.2], [0.3, 0.4]]})
    validate_reference_rewards(good, min_samples=2)
    with pytest.raises(ValueError, match=r"no reference-rewards column 'ref_rewards'.*build_reference_rewards.*build-reference"):
        validate_reference_rewards(Dataset.from_dict({"prompt": ["a"]}))
    with pytest.raises(ValueError, match=r"row 1: 2 reward\(s\), fewer than min_samples=3"):
        validate_reference_rewards(Dataset.from_dict({"ref_rewards": [[1.0, 2.0, 3.0], [1.0, 2.0]]}), min_samples=3)
    with pytest.raises(ValueError, match="row 0: empty list"):
        validate_reference_rewards(Dataset.from_dict({"ref_rewards": [[], [1.0]]}))
    with pytest.raises(ValueError, match=r"row 1: element 1 is nan"):
        validate_reference_rewards(Dataset.from_dict({"ref_rewards": [[1.0], [1.0, float("nan")]]}))
    with pytest.raises(ValueError, match=r"row 0: element 0 is inf"):
        validate_reference_rewards(Dataset.from_dict({"ref_rewards": [[float("inf")]]}))
    with pytest.raises(ValueError, match=r"row 1: expected a list of rewards, got float"):
        validate_reference_rewards(Dataset.from_dict({"ref_rewards": [0.5, 0.7]}))
    with pytest.raises(ValueError, match=r"row 0: element 0 is NoneType"):
        validate_reference_rewards(Dataset.from_dict({"ref_rewards": [[None, 1.0]]}))
    many = Dataset.from_dict({"ref_rewards": [[]] * 9 + [[1.0]]})
    with pytest.raises(ValueError, match=r"9 invalid row\(s\): row 0.*row 4: empty list \(and 4 more\)"):
        validate_reference_rewards(many)
    with pytest.raises(ValueError, match="'scores'"):
        validate_reference_rewards(good, column="scores")


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_end_to_end(tiny, tmp_path, capsys):
    from datasets import load_from_disk

    from trl_infalign.cli import main

    output = tmp_path / "out"
    argv = ["build-reference", "--model", tiny["policy"], "--reward-model", tiny["reward"], "--dataset", str(tiny["data"]),
            "--num-samples", "3", "--max-new-tokens", "6", "--batch-size", "2", "--seed", "7", "--output", str(output),
            "--no-progress"]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "7 rows x K=3" in summary and "mean" in summary and "std" in summary
    dataset = load_from_disk(str(output))
    assert dataset.column_names == ["prompt", "topic", "ref_rewards", "ref_rewards_provenance"]
    lines = [json.loads(line) for line in (output / "ref_rewards.jsonl").read_text().splitlines()]
    assert [line["ref_rewards"] for line in lines] == dataset["ref_rewards"]
    assert (output / "cache" / "meta.json").exists()
    # Same as the Python API with the same settings (single reward model).
    direct = build_reference_rewards(
        tiny["dataset"], tiny["policy"], tiny["reward"], num_samples=3, max_new_tokens=6, batch_size=2, seed=7,
        progress=False,
    )
    assert dataset["ref_rewards"] == direct["ref_rewards"]
    # A rerun resumes everything from the cache.
    assert main(argv) == 0
    assert "4 resumed" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# Cache robustness (issue #11 part 5)


def _a_file(tmp_path) -> Path:
    """A regular file: a directory below it cannot be created, not even by root (chmod does not stop root)."""
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


def test_unwritable_cache_dir_fails_before_any_sampling(tiny, tmp_path):
    reward = CountingReward()
    with pytest.raises(OSError, match=r"cache_dir='.*a_file/cache' is not writable.*writable cache_dir.*Nothing has been computed"):
        _build(tiny, [reward], cache_dir=_a_file(tmp_path) / "cache")
    assert reward.calls == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_existing_cache_dir_fails_before_any_sampling(tiny, tmp_path):
    cache = tmp_path / "cache"
    _build(tiny, [length_reward], cache_dir=cache, num_samples=2)
    os.chmod(cache, 0o555)
    try:
        reward = CountingReward()
        with pytest.raises(OSError, match="cache_dir=.* is not writable"):
            _build(tiny, [reward], cache_dir=cache)
        assert reward.calls == 0
    finally:
        os.chmod(cache, 0o755)


def test_cli_unwritable_output_fails_before_any_sampling(tiny, tmp_path, capsys):
    from trl_infalign.cli import main

    cache = tmp_path / "cache"
    argv = ["build-reference", "--model", tiny["policy"], "--reward-model", tiny["reward"], "--dataset", str(tiny["data"]),
            "--num-samples", "2", "--max-new-tokens", "2", "--output", str(_a_file(tmp_path) / "out"),
            "--cache-dir", str(cache), "--no-progress"]
    assert main(argv) == 2
    assert "--output=" in capsys.readouterr().err
    assert not cache.exists() or not list(cache.glob("rank-*.jsonl"))  # nothing was sampled
    argv[argv.index("--output") + 1], argv[argv.index("--cache-dir") + 1] = str(tmp_path / "out"), str(_a_file(tmp_path) / "c")
    assert main(argv) == 2
    assert "--cache-dir=" in capsys.readouterr().err


def test_corrupted_cache_record_is_recomputed_with_a_warning(tiny, tmp_path, baseline):
    cache = tmp_path / "cache"
    assert _build(tiny, cache_dir=cache)["ref_rewards"] == baseline
    shard = cache / "rank-00000.jsonl"
    lines = shard.read_text().splitlines()
    cut = json.loads(lines[3])
    cut["ref_rewards"] = cut["ref_rewards"][:2]  # valid JSON, wrong content: a row cut to 2 values
    tampered = json.loads(lines[5])
    tampered["ref_rewards"][0] += 1.0  # right length, wrong value: only the checksum catches it
    lines[3], lines[5] = json.dumps(cut), json.dumps(tampered)
    shard.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"2 cached reference record\(s\).*row 3: 2 reward\(s\), expected K=3.*row 5: checksum mismatch"):
        out, stats = _build_reference_rewards(
            tiny["dataset"], tiny["policy"], [tiny["reward"], length_reward], cache_dir=cache, progress=False, **SETTINGS
        )
    assert out["ref_rewards"] == baseline
    assert stats.records_recomputed == 2 and stats.chunks_computed == 2  # rows 3 and 5: chunks 1 and 2
    import warnings as _warnings

    with _warnings.catch_warnings():
        _warnings.simplefilter("error")  # the recomputed records now win: no warning any more
        assert _build(tiny, cache_dir=cache)["ref_rewards"] == baseline


def test_relative_and_absolute_model_paths_share_the_cache(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    policy = Path(tiny["policy"])
    monkeypatch.chdir(policy.parent)
    first = build_reference_rewards(tiny["dataset"], tiny["policy"], [CountingReward()], cache_dir=cache, progress=False,
                                    **{**SETTINGS, "reward_weights": None})
    for spelling in (f"./{policy.name}", policy.name, str(policy.resolve()), f"{policy.name}/"):
        reward = CountingReward()
        out = build_reference_rewards(tiny["dataset"], spelling, [reward], cache_dir=cache, progress=False,
                                      **{**SETTINGS, "reward_weights": None})
        assert reward.calls == 0, spelling  # everything came from the cache
    assert json.loads((cache / "meta.json").read_text())["model"] == str(policy.resolve())
    assert out["ref_rewards"] == first["ref_rewards"]


@pytest.mark.slow
def test_two_concurrent_builders_share_one_cache(tiny, tmp_path, baseline):
    """Two independent single-process builds on one cache_dir at the same time: same result as one build, and every
    chunk computed exactly once (per-chunk flock + re-read under the lock)."""
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "--policy", tiny["policy"], "--reward-model", tiny["reward"],
             "--data", str(tiny["data"]), "--out", str(out), "--cache-dir", str(cache), "--sleep", "0.6"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for out in outs
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output.decode()[-3000:]
    num_chunks = math.ceil(len(PROMPTS) / SETTINGS["batch_size"])
    stats = [json.loads(Path(f"{out}.rank0").read_text()) for out in outs]
    assert sum(s["chunks_computed"] for s in stats) == num_chunks  # no chunk computed twice
    for out in outs:
        assert json.loads(out.read_text())["ref_rewards"] == baseline
    rows = [json.loads(line)["index"] for line in (cache / "rank-00000.jsonl").read_text().splitlines()]
    assert sorted(rows) == list(range(len(PROMPTS)))  # each row written once, no interleaved or torn lines


# ---------------------------------------------------------------------------------------------------------------------
# Per-reward references (issue #19 item 2)


def _reward_names_type(dataset, column="ref_rewards"):
    import pyarrow as pa

    arrow_type = dataset.data.column(column).type
    assert pa.types.is_struct(arrow_type), arrow_type
    assert all(pa.types.is_list(arrow_type.field(i).type) for i in range(arrow_type.num_fields))
    return sorted(arrow_type.field(i).name for i in range(arrow_type.num_fields))


def test_per_reward_rows_hold_each_reward_for_the_same_completions(tiny, baseline):
    from trl_infalign.provenance import read_per_reward_identities, read_reference_provenance

    out = _build(tiny, per_reward=True, keep_completions=True)  # reward model "reward" + length_reward, weights 1, 0.5
    assert _reward_names_type(out) == ["length_reward", "reward"]  # TRL's names: the model's directory, __name__
    k = SETTINGS["num_samples"]
    for row, completions, combined in zip(out["ref_rewards"], out["ref_completions"], baseline):
        assert len(row["reward"]) == len(row["length_reward"]) == k
        assert row["length_reward"] == [_f32(len(t) / 10.0) for t in completions]  # unweighted, this row's completions
        # same seed, same completions: the combined build is the weighted sum of the per-reward values
        assert combined == pytest.approx([a + 0.5 * b for a, b in zip(row["reward"], row["length_reward"])], rel=1e-6)
    record = read_reference_provenance(out)
    assert record["per_reward"] is True and sorted(record["rewards"]) == ["length_reward", "reward"]
    assert record["rewards"]["length_reward"] == {"kind": "callable", "name": "build_reference_script:length_reward"}
    assert record["rewards"]["reward"]["kind"] == "model" and record["rewards"]["reward"]["fingerprint"]
    assert read_per_reward_identities(out) == record["rewards"]
    validate_reference_rewards(out, min_samples=k)


def test_per_reward_with_one_reward_keeps_the_plain_list(tiny):
    from trl_infalign.provenance import read_per_reward_identities, read_reference_provenance

    plain = _build(tiny, [length_reward])
    single = _build(tiny, [length_reward], per_reward=True)
    assert single["ref_rewards"] == plain["ref_rewards"] and isinstance(single["ref_rewards"][0], list)
    assert read_reference_provenance(single) == read_reference_provenance(plain)
    assert read_per_reward_identities(single) is None


def test_per_reward_names_must_differ(tiny):
    with pytest.raises(ValueError, match=r"reward functions 0 and 1 are both named '<lambda>'.*per_reward=True"):
        _build(tiny, [lambda completions, **kw: [0.0] * len(completions),
                      lambda completions, **kw: [1.0] * len(completions)], per_reward=True)


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


def test_per_reward_nonfinite_skip_drops_the_sample_for_every_reward(tiny):
    k = SETTINGS["num_samples"]
    full = _build(tiny, [length_reward, constant_reward], per_reward=True, keep_completions=True)
    out = _build(tiny, [length_reward, _nan_for({(3, 1), (5, 0), (5, 2)})], per_reward=True, nonfinite="skip",
                 keep_completions=True)
    assert [len(r["length_reward"]) for r in out["ref_rewards"]] == [k, k, k, k - 1, k, k - 2, k]
    assert [len(r["nan_reward"]) for r in out["ref_rewards"]] == [k, k, k, k - 1, k, k - 2, k]
    dropped = {3: {1}, 5: {0, 2}}
    for row in range(len(PROMPTS)):
        keep = [j for j in range(k) if j not in dropped.get(row, set())]
        assert out["ref_completions"][row] == [full["ref_completions"][row][j] for j in keep]
        assert out["ref_rewards"][row]["length_reward"] == [full["ref_rewards"][row]["length_reward"][j] for j in keep]
    with pytest.raises(ValueError, match=r"Dataset row 3: reference sample 1 got a non-finite reward \(nan\) from "
                                         r"'nan_reward'.*nonfinite='skip'"):
        _build(tiny, [length_reward, _nan_for({(3, 1)})], per_reward=True)


def test_cache_keys_on_per_reward_and_checks_per_reward_records(tiny, tmp_path):
    cache = tmp_path / "cache"
    _build(tiny, [length_reward, constant_reward], cache_dir=cache)
    with pytest.raises(ValueError, match=r"'per_reward' is '<missing>' in meta.json but \['length_reward', 'constant_reward'\] now"):
        _build(tiny, [length_reward, constant_reward], cache_dir=cache, per_reward=True)

    cache = tmp_path / "per-reward-cache"
    first = _build(tiny, [CountingReward(), length_reward], cache_dir=cache, per_reward=True)
    idle = CountingReward()
    assert _build(tiny, [idle, length_reward], cache_dir=cache, per_reward=True)["ref_rewards"] == first["ref_rewards"]
    assert idle.calls == 0  # resumed in full
    shard = cache / "rank-00000.jsonl"
    lines = shard.read_text().splitlines()
    record = json.loads(lines[2])
    del record["ref_rewards"]["length_reward"]  # a per-reward record without one of its rewards
    lines[2] = json.dumps(record)
    shard.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"row 2: ref_rewards is not a per-reward record of \['CountingReward', 'length_reward'\]"):
        again = _build(tiny, [CountingReward(), length_reward], cache_dir=cache, per_reward=True)
    assert again["ref_rewards"] == first["ref_rewards"]


def test_validate_per_reward_rows():
    good = Dataset.from_dict({"ref_rewards": [{"a": [0.1, 0.2], "b": [1.0, 2.0]}, {"a": [0.3], "b": [3.0]}]})
    validate_reference_rewards(good)  # rows may differ in length (nonfinite="skip"), a row's entries may not
    with pytest.raises(ValueError, match=r"row 1: reward 'a': 1 reward\(s\), fewer than min_samples=2"):
        validate_reference_rewards(good, min_samples=2)
    missing = Dataset.from_list([{"ref_rewards": {"a": [1.0], "b": [2.0]}}, {"ref_rewards": {"a": [1.0]}}])
    with pytest.raises(ValueError, match=r"row 1: no rewards for reward 'b' \(the row holds \['a'\]\)"):
        validate_reference_rewards(missing)
    with pytest.raises(ValueError, match=r"row 0: reward 'b': element 1 is nan"):
        validate_reference_rewards(Dataset.from_dict({"ref_rewards": [{"a": [1.0, 2.0], "b": [1.0, float("nan")]}]}))
    with pytest.raises(ValueError, match=r"row 0: the rewards hold different numbers of values \(\{'a': 2, 'b': 1\}\)"):
        validate_reference_rewards(Dataset.from_dict({"ref_rewards": [{"a": [1.0, 2.0], "b": [1.0]}]}))
    with pytest.raises(ValueError, match=r"row 0: no rewards for reward 'c'"):
        validate_reference_rewards(good, reward_names=["a", "c"])
    with pytest.raises(ValueError, match=r"row 1: expected per-reward rewards \{name: list\} for \['a'\], got list"):
        validate_reference_rewards({"ref_rewards": [{"a": [1.0]}, [1.0]]})


def test_cli_per_reward_writes_a_struct_column_and_json_objects(tiny, tmp_path, capsys):
    from datasets import load_from_disk

    from trl_infalign.cli import main

    second = build_tiny_reward_model(tiny["tokenizer"], tmp_path / "harmless", hidden_size=16, seed=1)
    output = tmp_path / "out"
    argv = ["build-reference", "--model", tiny["policy"], "--reward-model", tiny["reward"], "--reward-model",
            str(tmp_path / "harmless"), "--dataset", str(tiny["data"]), "--num-samples", "2", "--max-new-tokens", "3",
            "--batch-size", "4", "--per_reward", "--output", str(output), "--no-progress"]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "reward: reward mean" in summary and "harmless: reward mean" in summary
    dataset = load_from_disk(str(output))
    assert _reward_names_type(dataset) == ["harmless", "reward"]
    lines = [json.loads(line) for line in (output / "ref_rewards.jsonl").read_text().splitlines()]
    assert [line["ref_rewards"] for line in lines] == dataset["ref_rewards"]
    assert set(lines[0]["ref_rewards"]) == {"reward", "harmless"} and len(lines[0]["ref_rewards"]["harmless"]) == 2
    provenance = json.loads((output / "reference_provenance.json").read_text())
    assert sorted(provenance["rewards"]) == ["harmless", "reward"]
    del second


# ---------------------------------------------------------------------------------------------------------------------
# Sampling as TRL samples (issue #20 item 8)


def _policy_with_generation_config(tiny, tmp_path, **values) -> str:
    import shutil

    path = tmp_path / "policy-gc"
    shutil.copytree(tiny["policy"], path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, **values}))
    return str(path)


def test_generation_config_repetition_penalty_does_not_leak_into_the_references(tiny, tmp_path):
    from trl_infalign.provenance import read_reference_provenance

    leaky = _policy_with_generation_config(tiny, tmp_path, repetition_penalty=3.0)
    settings = dict(num_samples=4, max_new_tokens=8, batch_size=4, seed=1, keep_completions=True, progress=False)
    clean = build_reference_rewards(tiny["dataset"], tiny["policy"], length_reward, **settings)
    out = build_reference_rewards(tiny["dataset"], leaky, length_reward, cache_dir=tmp_path / "cache", **settings)
    assert out["ref_completions"] == clean["ref_completions"]  # repetition_penalty=1.0, as TRL passes it
    assert read_reference_provenance(out)["sampling"]["repetition_penalty"] == 1.0
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["generation_config_overridden"] == {"repetition_penalty": 3.0}  # an old leaky cache is not resumed
    penalised = build_reference_rewards(tiny["dataset"], leaky, length_reward, repetition_penalty=3.0, **settings)
    assert penalised["ref_completions"] != clean["ref_completions"]  # asked for explicitly, it applies
    assert read_reference_provenance(penalised)["sampling"]["repetition_penalty"] == 3.0


def test_generation_config_min_p_is_recorded_as_used(tiny, tmp_path):
    from trl_infalign.provenance import read_reference_provenance

    path = _policy_with_generation_config(tiny, tmp_path, min_p=0.2)
    out = build_reference_rewards(tiny["dataset"].select([0]), path, length_reward, num_samples=2, max_new_tokens=2,
                                  progress=False)
    assert read_reference_provenance(out)["sampling"]["min_p"] == 0.2  # TRL's generate takes it too (min_p=None)


# ---------------------------------------------------------------------------------------------------------------------
# Top-up (issue #18 item 3)


class CountingLength:
    """length/10 reward that counts the completions it scores (and can fail after `fail_after` calls)."""

    __name__ = "length_reward"

    def __init__(self, fail_after=None):
        self.completions, self.calls, self.fail_after = 0, 0, fail_after

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.completions += len(completions)
        return [len(c) / 10.0 for c in completions]


def test_top_up_reuses_the_cache_and_equals_a_build_from_scratch(tiny, tmp_path):
    from trl_infalign.provenance import read_reference_provenance

    cache, n = tmp_path / "cache", len(PROMPTS)
    k1 = _build(tiny, [tiny["reward"], CountingLength()], cache_dir=cache, keep_completions=True, reward_weights=[1.0, 0.5])
    counter = CountingLength()
    topped, stats = _build(tiny, [tiny["reward"], counter], cache_dir=cache, keep_completions=True, num_samples=5,
                           reward_weights=[1.0, 0.5], return_stats=True)
    assert counter.completions == stats.completions_generated == n * 2  # only samples 3 and 4 of every row
    assert stats.samples_reused == n * 3 and stats.chunks_resumed == 0
    scratch = _build(tiny, [tiny["reward"], CountingLength()], keep_completions=True, num_samples=5, reward_weights=[1.0, 0.5])
    assert topped["ref_rewards"] == scratch["ref_rewards"]  # bit for bit
    assert topped["ref_completions"] == scratch["ref_completions"]
    assert [row[:3] for row in topped["ref_rewards"]] == k1["ref_rewards"]  # the first K1 samples are the old ones
    assert read_reference_provenance(topped) == read_reference_provenance(scratch)
    meta = json.loads((cache / "meta.json").read_text())
    assert (meta["num_samples"], meta["grown_from"]) == (5, [3])
    again = CountingLength()
    rerun = _build(tiny, [tiny["reward"], again], cache_dir=cache, keep_completions=True, num_samples=5, reward_weights=[1.0, 0.5])
    assert again.completions == 0 and rerun["ref_rewards"] == scratch["ref_rewards"]


def test_top_up_resumes_after_a_crash_and_never_lowers_k(tiny, tmp_path):
    cache = tmp_path / "cache"
    _build(tiny, [CountingLength()], cache_dir=cache)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _build(tiny, [CountingLength(fail_after=2)], cache_dir=cache, num_samples=6)  # 2 of 4 chunks topped up
    counter = CountingLength()
    resumed = _build(tiny, [counter], cache_dir=cache, num_samples=6)
    assert counter.completions == 3 * 3  # the 3 rows of the 2 chunks not topped up yet, samples 3..5
    assert resumed["ref_rewards"] == _build(tiny, [CountingLength()], num_samples=6)["ref_rewards"]
    with pytest.raises(ValueError, match=r"'num_samples' is 6 in meta.json but 3 now: the cache holds .* K=6"):
        _build(tiny, [CountingLength()], cache_dir=cache)


def test_cache_of_chunk_seeded_builds_is_kept_with_a_warning(tiny, tmp_path):
    """A cache written before per-sample keys (no "seeding" in meta.json) still resumes: its rows are kept."""
    cache = tmp_path / "cache"
    first = _build(tiny, [CountingLength()], cache_dir=cache)
    meta = json.loads((cache / "meta.json").read_text())
    del meta["seeding"]
    (cache / "meta.json").write_text(json.dumps(meta))
    counter = CountingLength()
    with pytest.warns(UserWarning, match="sampled by an earlier trl-infalign, which seeded each chunk as a whole"):
        again = _build(tiny, [counter], cache_dir=cache)
    assert counter.completions == 0 and again["ref_rewards"] == first["ref_rewards"]
