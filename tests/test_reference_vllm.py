"""The vLLM reference pass, with a stand-in engine (no GPU, no vLLM here): issue #20 item 9.

`vllm` is replaced in `sys.modules` by a module whose `LLM` records how it was built, generates seeded token ids, and
records its shutdown; `SamplingParams` validates like vLLM's (it compares `top_k`, so `None` fails). Every test fails
on the code before the fix: the engine was built lazily on ranks with a chunk only, never shut down, model_init_kwargs
were dropped, and `seed` / `top_k=None` / tensor parallelism over several processes crashed or passed silently."""

from __future__ import annotations

import gc
import importlib.machinery
import random
import sys
import types
import warnings
import weakref

import pytest
import torch
from datasets import Dataset

from trl_infalign.reference import build_reference_rewards
from trl_infalign.provenance import read_reference_provenance

from conftest import TINY_PROMPTS


def length_reward(completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


class FakeSamplingParams:
    def __init__(self, n=1, max_tokens=16, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                 seed=None, **extra):
        if top_k < -1:  # as vLLM's _verify_args: None cannot be compared
            raise ValueError("top_k must be -1, 0 or positive")
        self.n, self.max_tokens, self.seed, self.top_k, self.extra = n, max_tokens, seed, top_k, extra


class FakeLLM:
    built: list[dict] = []
    instances: list = []
    shutdowns: list = []

    def __init__(self, **kwargs):
        FakeLLM.built.append(kwargs)
        FakeLLM.instances.append(weakref.ref(self))
        self.generate_calls = 0
        self.llm_engine = types.SimpleNamespace()

    def generate(self, prompts, params, use_tqdm=True):
        self.generate_calls += 1
        outputs = []
        for _, p in zip(prompts, params, strict=True):
            rng = random.Random(p.seed)
            completions = [types.SimpleNamespace(token_ids=[rng.randrange(5, 60) for _ in range(rng.randint(1, p.max_tokens))])
                           for _ in range(p.n)]
            outputs.append(types.SimpleNamespace(outputs=completions))
        return outputs

    def shutdown(self):
        FakeLLM.shutdowns.append(id(self))


@pytest.fixture
def fake_vllm(monkeypatch):
    import trl.data_utils  # noqa: F401 - TRL looks for vLLM when first imported: before the stand-in exists

    FakeLLM.built, FakeLLM.instances, FakeLLM.shutdowns = [], [], []
    destroyed: list[str] = []
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    distributed = types.ModuleType("vllm.distributed")
    parallel_state = types.ModuleType("vllm.distributed.parallel_state")
    parallel_state.destroy_model_parallel = lambda: destroyed.append("model_parallel")
    parallel_state.destroy_distributed_environment = lambda: destroyed.append("distributed_environment")
    vllm.distributed, distributed.parallel_state = distributed, parallel_state
    for module in (vllm, distributed, parallel_state):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    for name, module in (("vllm", vllm), ("vllm.distributed", distributed), ("vllm.distributed.parallel_state", parallel_state)):
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(LLM=FakeLLM, destroyed=destroyed)


def _build(tiny, prompts=TINY_PROMPTS, **kwargs):
    settings = dict(num_samples=3, max_new_tokens=4, batch_size=2, seed=1, progress=False, use_vllm=True)
    settings.update(kwargs)
    return build_reference_rewards(Dataset.from_dict({"prompt": list(prompts)}), tiny[0], length_reward, **settings)


def test_the_engine_is_shut_down_and_freed_before_the_build_returns(tiny, fake_vllm):
    out = _build(tiny)
    assert len(fake_vllm.LLM.built) == 1 and len(fake_vllm.LLM.shutdowns) == 1
    assert fake_vllm.destroyed == ["model_parallel", "distributed_environment"]  # vLLM made the process group itself
    gc.collect()
    assert all(ref() is None for ref in fake_vllm.LLM.instances)  # nothing holds the engine: its memory can go
    assert all(len(row) == 3 for row in out["ref_rewards"])
    assert read_reference_provenance(out)["sampler"] == "vllm"


def test_every_rank_builds_the_engine_when_any_rank_has_work(tiny, fake_vllm, tmp_path, monkeypatch):
    """Rank 0 of 2 resumes with its whole share cached while rank 1 still has chunks: the external launcher builds
    the engine collectively, so rank 0 must build it too (before: it never did, and rank 1 hung)."""
    import accelerate.utils

    cache = tmp_path / "cache"
    _build(tiny, cache_dir=str(cache))  # one process: every chunk cached in rank-00000.jsonl
    fake_vllm.LLM.built.clear()
    state = types.SimpleNamespace(process_index=0, local_process_index=0, num_processes=2, is_main_process=True,
                                  device=torch.device("cpu"), wait_for_everyone=lambda: None)
    # the other rank's answer to every gather: it has work; no error
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda values: list(values) + [True if values == [False] else None])
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # the launch's process group
    fake_vllm.destroyed.clear()
    out, stats = _build(tiny, cache_dir=str(cache), accelerator=state, return_stats=True)
    assert stats.chunks_computed == 0 and stats.chunks_resumed == 2
    (kwargs,) = fake_vllm.LLM.built  # built although this rank had nothing to compute
    assert kwargs["distributed_executor_backend"] == "external_launcher" and kwargs["tensor_parallel_size"] == 1
    assert fake_vllm.destroyed == ["model_parallel"]  # shut down, but the launch's process group (the trainer's) stays
    # nobody has work: no engine at all (a fully cached rerun never starts vLLM)
    fake_vllm.LLM.built.clear()
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda values: list(values) + [False if values == [False] else None])
    _build(tiny, cache_dir=str(cache), accelerator=state)
    assert fake_vllm.LLM.built == []


def test_model_init_kwargs_reach_vllm_and_the_revision_is_recorded(tiny, fake_vllm):
    with pytest.warns(UserWarning, match=r"model_init_kwargs \['attn_implementation'\] .*ignored on the vLLM path"):
        out = _build(tiny, model_init_kwargs={"revision": "v1.0", "trust_remote_code": True, "dtype": "bfloat16",
                                              "attn_implementation": "eager"},
                     vllm_kwargs={"gpu_memory_utilization": 0.4})
    (kwargs,) = fake_vllm.LLM.built
    assert (kwargs["revision"], kwargs["tokenizer_revision"], kwargs["trust_remote_code"], kwargs["dtype"]) == (
        "v1.0", "v1.0", True, "bfloat16")
    assert kwargs["gpu_memory_utilization"] == 0.4 and "attn_implementation" not in kwargs
    assert read_reference_provenance(out)["reference_model"]["revision"] == "v1.0"  # a local dir: as asked


def test_a_model_object_is_refused_on_the_vllm_path(tiny, fake_vllm):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny[0])
    with pytest.raises(ValueError, match=r"use_vllm=True needs the reference model as a path.*model.save_pretrained"):
        build_reference_rewards(Dataset.from_dict({"prompt": TINY_PROMPTS}), policy, length_reward, use_vllm=True,
                                tokenizer=tiny[1], progress=False)
    assert fake_vllm.LLM.built == []


def test_seed_n_top_k_none_and_tensor_parallelism_give_clear_errors(tiny, fake_vllm):
    from trl_infalign.reference_config import ReferenceConfig
    from trl_infalign.reference_sampling import check_vllm_settings

    with pytest.raises(ValueError, match=r"generation_kwargs must not set 'seed'.*ReferenceConfig.seed"):
        _build(tiny, generation_kwargs={"seed": 7})
    with pytest.raises(ValueError, match=r"generation_kwargs must not set 'n'.*num_samples"):
        _build(tiny, generation_kwargs={"n": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # None is top_k's neutral value: no override to announce
        out = _build(tiny, generation_kwargs={"top_k": None})
    assert len(out) == len(TINY_PROMPTS) and read_reference_provenance(out)["sampling"]["top_k"] == 0
    config = ReferenceConfig(use_vllm=True, vllm_kwargs={"tensor_parallel_size": 2})
    check_vllm_settings(config, world_size=1)  # one process: vLLM's own executor spans the GPUs
    with pytest.raises(ValueError, match=r"vllm_kwargs\['tensor_parallel_size'\]=2 with 4 processes.*external_launcher"):
        check_vllm_settings(config, world_size=4)



def test_vllm_top_up_requests_only_the_new_samples_with_their_keys(tiny, fake_vllm, tmp_path):
    from trl_infalign.reference_sampling import sample_key

    requests = []
    generate = FakeLLM.generate

    def recording(self, prompts, params, use_tqdm=True):
        requests.extend((p.n, p.seed) for p in params)
        return generate(self, prompts, params, use_tqdm)

    FakeLLM.generate = recording
    try:
        _build(tiny, cache_dir=str(tmp_path / "cache"))  # K = 3
        requests.clear()
        topped = _build(tiny, cache_dir=str(tmp_path / "cache"), num_samples=5)
        expected = sorted((1, sample_key(1, r, j) >> 1) for r in range(len(TINY_PROMPTS)) for j in (3, 4))
        assert sorted(requests) == expected  # one request per new sample, keyed by (seed, row, j)
        assert topped["ref_rewards"] == _build(tiny, num_samples=5)["ref_rewards"]
    finally:
        FakeLLM.generate = generate
