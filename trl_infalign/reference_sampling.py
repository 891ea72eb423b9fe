"""Sampling for the reference pass: the reference policy loaded once, and a chunk sampler on transformers or vLLM.

A sampler is called as `(prompts, chunk_index, row_indices) -> (texts[p][k], ids[p][k])` and draws K completions per
prompt of one chunk, reproducibly: transformers seeds the RNG with `seed + chunk_index` before the chunk, vLLM gives
every dataset row its own seed. Both sample with one :class:`~trl_infalign.sampling.SamplingSettings`, the effective
values that TRL's trainer uses (every sampling field explicit, EOS = tokenizer's ∪ generation config's). `close()`
releases what the sampler holds: the vLLM engine is shut down and its GPU memory freed, so that a training run in the
same process (TRL's colocate vLLM engine checks the free memory at start) finds the GPU as it was.

vLLM facts this module follows (vLLM 0.22-0.31, the range TRL 1.16 supports):

- with several processes every process builds its own engine with `distributed_executor_backend="external_launcher"`
  (as TRL's colocate mode does); building it is collective, so every process builds it when any process has a chunk
  to compute (:func:`trl_infalign.reference.build_reference_rewards` decides that), and `tensor_parallel_size > 1` is
  refused there (a tensor-parallel group must generate the same prompts; here each process has its own chunks);
- vLLM loads the model itself, from a path or hub id: `model_init_kwargs` `revision`, `trust_remote_code` and `dtype`
  are passed to `vllm.LLM`, other keys are ignored with a warning, and a model object is refused (it may differ from
  what is on disk at `config._name_or_path`: a PEFT adapter, weights changed in memory);
- vLLM is not batch-invariant: a row's samples depend (in the last bits, sometimes in a token) on the other requests
  of its batch, so a resumed or differently sharded vLLM build draws from the same distribution, with the same
  per-row seeds, but is not bit-identical to an uninterrupted one (transformers' `generate` path is).
"""

from __future__ import annotations

import gc
import logging
import os
import warnings

from .sampling import (
    SamplingSettings,
    eos_token_ids,
    generate_completions,
    is_conversational_prompt,
    resolve_tokenizer,
    tokenize_prompts,
)

logger = logging.getLogger("trl_infalign.reference")

#: `model_init_kwargs` keys that `vllm.LLM` takes under the same name (`torch_dtype` as `dtype`).
_VLLM_MODEL_KWARGS = {"revision": "revision", "trust_remote_code": "trust_remote_code", "dtype": "dtype",
                      "torch_dtype": "dtype"}
#: `model_init_kwargs` keys that also load the tokenizer beside the model.
_TOKENIZER_KWARGS = ("revision", "trust_remote_code")


def _tokenizer_kwargs(model_init_kwargs: dict | None) -> dict:
    return {k: v for k, v in (model_init_kwargs or {}).items() if k in _TOKENIZER_KWARGS and v is not None}


def load_policy(model, tokenizer, use_vllm: bool, model_init_kwargs: dict | None):
    """(policy, tokenizer): the causal LM loaded from a path (kept on CPU until the first chunk), or `model` itself;
    with vLLM the policy stays a path (vLLM loads it) and only the tokenizer is loaded. The tokenizer beside a path
    is loaded with the `revision` and `trust_remote_code` of `model_init_kwargs`."""
    if use_vllm:
        _check_vllm_model(model)
        path = os.fspath(model)
        return path, resolve_tokenizer(path, tokenizer, **_tokenizer_kwargs(model_init_kwargs))
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        path = os.fspath(model)
        model = AutoModelForCausalLM.from_pretrained(path, **(model_init_kwargs or {}))
        return model, resolve_tokenizer(path, tokenizer, **_tokenizer_kwargs(model_init_kwargs))
    return model, resolve_tokenizer(model, tokenizer)


def vllm_model_identity(path, model_init_kwargs: dict | None) -> dict:
    """The provenance identity of a model that vLLM loads from `path`: normalised name and the revision it loads —
    the commit hash transformers resolves for `revision` (what the trainer's loaded model reports as
    `config._commit_hash`), else `revision` as given. No weights fingerprint (the weights are not loaded here)."""
    from .provenance import normalise_model_name

    kwargs = _tokenizer_kwargs(model_init_kwargs)
    revision = None
    try:
        from transformers import AutoConfig

        revision = getattr(AutoConfig.from_pretrained(os.fspath(path), **kwargs), "_commit_hash", None)
    except Exception as error:  # noqa: BLE001 - offline hub id, unknown architecture: record what was asked
        logger.debug("No commit hash for %s: %s", path, error)
    return {"name": normalise_model_name(path), "revision": revision or kwargs.get("revision"), "fingerprint": None}


def effective_sampling(config, policy) -> SamplingSettings:
    """The settings the pass really samples with: `config.sampling` with `min_p=None` filled from the policy's
    generation config (transformers) or 0 (vLLM), as TRL's `generate` fills it."""
    if config.use_vllm:
        return config.sampling.resolved(sampler="vllm")
    return config.sampling.resolved(policy, sampler="transformers")


def generation_config_overridden(policy, tokenizer, settings: SamplingSettings) -> dict:
    """What the model's generation config says that the pass no longer takes from it (before TRL-style explicit
    sampling it leaked into `generate`): a repetition penalty other than the one used, and EOS ids other than the
    union that now ends a completion. Empty for most models; keys the cache so that such a model's old cache is not
    resumed."""
    config = getattr(policy, "generation_config", None)
    if config is None:
        return {}
    overridden = {}
    penalty = getattr(config, "repetition_penalty", None)
    if penalty is not None and float(penalty) != float(settings.repetition_penalty):
        overridden["repetition_penalty"] = float(penalty)
    declared = config.eos_token_id
    declared = [] if declared is None else (list(declared) if isinstance(declared, (list, tuple)) else [declared])
    if declared and sorted(declared) != sorted(eos_token_ids(policy, tokenizer)):
        overridden["eos_token_id"] = declared
    return overridden


def _check_vllm_model(model) -> None:
    if not isinstance(model, (str, os.PathLike)):
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        raise ValueError(
            f"use_vllm=True needs the reference model as a path or hub id, got a {type(model).__name__} object "
            f"(config._name_or_path={name!r}). vLLM loads the weights itself, from disk, so the references would come "
            "from the weights at that path while the provenance describes the object in memory (a PEFT adapter or "
            "in-memory changes make them differ). Fix: save it first (model.save_pretrained(dir), after "
            "merge_and_unload() for a PEFT model) and pass dir, or set use_vllm=False to sample from the object."
        )


def check_vllm_settings(config, world_size: int, model=None) -> None:
    """Refuse vLLM settings that cannot work (a model object; `tensor_parallel_size > 1` with several processes),
    before anything is loaded."""
    if not config.use_vllm:
        return
    if model is not None:
        _check_vllm_model(model)
    tp = (config.vllm_kwargs or {}).get("tensor_parallel_size", 1)
    if world_size > 1 and tp not in (None, 1):
        raise ValueError(
            f"vllm_kwargs['tensor_parallel_size']={tp} with {world_size} processes: each process builds its own vLLM "
            "engine with distributed_executor_backend='external_launcher', where a tensor-parallel group must generate "
            "the same prompts, but the reference pass gives every process its own chunks. Fix: use "
            "tensor_parallel_size=1 (one engine per process, the chunks split over processes), or launch a single "
            f"process with vllm_kwargs={{\"tensor_parallel_size\": {tp}}}."
        )


def vllm_engine_kwargs(path, config, world_size: int) -> dict:
    """`vllm.LLM(**kwargs)` of the reference pass: the model and seed; with several processes the external launcher
    with one GPU per engine (as TRL's colocate mode); `model_init_kwargs` mapped onto vLLM's names (`revision`,
    `trust_remote_code`, `dtype`; the rest ignored with a warning naming them); then `vllm_kwargs` on top (a key that
    overrides one of the above warns)."""
    kwargs = dict(model=os.fspath(path), seed=config.seed)
    if world_size > 1:
        kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
    ignored = []
    for key, value in (config.model_init_kwargs or {}).items():
        if value is None:
            continue
        if key not in _VLLM_MODEL_KWARGS:
            ignored.append(key)
            continue
        if _VLLM_MODEL_KWARGS[key] == "dtype" and not isinstance(value, str):
            value = str(value).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16"
        kwargs[_VLLM_MODEL_KWARGS[key]] = value
    if "revision" in kwargs:
        kwargs.setdefault("tokenizer_revision", kwargs["revision"])
    if ignored:
        warnings.warn(
            f"model_init_kwargs {sorted(ignored)} are transformers loading options that vLLM does not take: they are "
            "ignored on the vLLM path (vLLM loads the model itself; pass engine options in vllm_kwargs).",
            UserWarning, stacklevel=4,
        )
    for key, value in (config.vllm_kwargs or {}).items():
        if key in kwargs and kwargs[key] != value and key not in ("tensor_parallel_size",):
            warnings.warn(f"vllm_kwargs[{key!r}]={value!r} overrides {key}={kwargs[key]!r} of the reference pass.",
                          UserWarning, stacklevel=4)
        kwargs[key] = value
    return kwargs


class TransformersSampler:
    """Samples a chunk with `model.generate`, after `torch.manual_seed(seed + chunk_index)`."""

    def __init__(self, policy, tokenizer, state, config, settings: SamplingSettings):
        self.model = policy.to(state.device)
        self.tokenizer, self.config, self.settings = tokenizer, config, settings

    def __call__(self, prompts, chunk_index, rows):
        import torch

        config, settings = self.config, self.settings
        torch.manual_seed(config.seed + chunk_index)
        out = generate_completions(
            self.model, self.tokenizer, prompts, config.num_samples, max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k, min_p=settings.min_p,
            repetition_penalty=settings.repetition_penalty, batch_size=config.generation_batch_size_or_chunk,
            generation_kwargs=settings.generation_kwargs, chat_template_kwargs=config.chat_template_kwargs,
            progress=False,
        )
        return out.texts, out.ids

    def close(self) -> None:
        self.model = None


def row_seed(seed: int, row: int) -> int:
    """vLLM's per-request seed of dataset row `row` (independent of chunking and of the process)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, row]).generate_state(1)[0])


class VLLMSampler:
    """Samples a chunk with a `vllm.LLM` built at construction (on every process of a multi-process build), one
    `SamplingParams(n=K, seed=row_seed(seed, row))` per row; `close()` shuts the engine down and frees its memory."""

    def __init__(self, path, tokenizer, state, config, settings: SamplingSettings):
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(
                "use_vllm=True needs vLLM, which is not installed: `pip install trl-infalign[vllm]` (or set "
                "use_vllm=False to sample with transformers' generate)."
            ) from exc
        import torch

        self.vllm, self.tokenizer, self.config = vllm, tokenizer, config
        self.base = settings.vllm_kwargs(config.num_samples)
        # vLLM creates its own process group unless one exists (the external launcher reuses the launch's): only the
        # former is ours to destroy when the engine is shut down.
        self._owns_world = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        if state.num_processes > 1:  # what vLLM's external launcher reads, as TRL's colocate mode sets it
            os.environ.setdefault("RANK", str(state.process_index))
            os.environ.setdefault("LOCAL_RANK", str(getattr(state, "local_process_index", state.process_index)))
            os.environ.setdefault("WORLD_SIZE", str(state.num_processes))
        self.llm = vllm.LLM(**vllm_engine_kwargs(path, config, state.num_processes))

    def __call__(self, prompts, chunk_index, rows):
        prompt_ids = tokenize_prompts(self.tokenizer, prompts, self.config.chat_template_kwargs)
        # One seed per dataset row: independent of chunking, and identical prompts still get independent samples.
        params = [self.vllm.SamplingParams(**self.base, seed=row_seed(self.config.seed, r)) for r in rows]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        ids = [[list(o.token_ids) for o in out.outputs] for out in outputs]
        conversational = bool(prompts) and is_conversational_prompt(prompts[0])
        texts = []
        for per in ids:
            decoded = self.tokenizer.batch_decode(per, skip_special_tokens=True)
            texts.append([[{"role": "assistant", "content": d}] for d in decoded] if conversational else decoded)
        return texts, ids

    def close(self) -> None:
        """Shut the engine down (engine core processes, vLLM's parallel groups; the process group too if vLLM made
        it), drop it and empty the CUDA cache."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        shutdown_vllm_engine(llm, owns_world=self._owns_world)


def shutdown_vllm_engine(llm, owns_world: bool) -> None:
    """Free what a `vllm.LLM` holds: its engine's `shutdown()` (the newest API that exists), vLLM's model-parallel
    groups, its process group when vLLM created it (`owns_world`; never the launch's, which the trainer uses), then
    `gc.collect()` and `torch.cuda.empty_cache()`. Each step is best effort: a failure is logged, not raised."""
    engine = getattr(llm, "llm_engine", None)
    for target in (llm, engine, getattr(engine, "engine_core", None)):
        shutdown = getattr(target, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception as error:  # noqa: BLE001
                logger.warning("Shutting down the vLLM engine failed (%s); freeing it anyway.", error)
            break
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        if owns_world:
            destroy_distributed_environment()
    except Exception as error:  # noqa: BLE001 - an older / newer vLLM layout
        logger.debug("vLLM parallel state not destroyed: %s", error)
    del llm, engine
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception as error:  # noqa: BLE001
        logger.debug("torch.cuda.empty_cache failed: %s", error)


def make_sampler(policy, tokenizer, state, config, settings: SamplingSettings):
    """The chunk sampler of `config` (a `ReferenceConfig`) with effective `settings` (:func:`effective_sampling`);
    `policy` is a loaded causal LM, or a path with `config.use_vllm`. Call `close()` when done."""
    if config.use_vllm:
        return VLLMSampler(policy, tokenizer, state, config, settings)
    return TransformersSampler(policy, tokenizer, state, config, settings)


__all__ = [
    "load_policy", "make_sampler", "effective_sampling", "generation_config_overridden", "check_vllm_settings",
    "vllm_engine_kwargs", "vllm_model_identity", "VLLMSampler", "TransformersSampler", "row_seed",
]
