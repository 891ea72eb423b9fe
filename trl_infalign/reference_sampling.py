"""Sampling for the reference pass: the reference policy loaded once, and a chunk sampler on transformers or vLLM.

A sampler is called as `(prompts, rows, ranges) -> (texts[p][k], ids[p][k])`: for each prompt p of one chunk (dataset
row `rows[p]`) it draws the samples j in `range(*ranges[p])` (all K of a new row, only the new ones of a top-up). Both
samplers use one :class:`~trl_infalign.sampling.SamplingSettings`, the effective values that TRL's trainer uses (every
sampling field explicit, EOS = tokenizer's ∪ generation config's). `close()` releases what the sampler holds: the vLLM
engine is shut down and its GPU memory freed, so that a training run in the same process (TRL's colocate vLLM engine
checks the free memory at start) finds the GPU as it was.

Seeding: sample j of dataset row r is keyed by :func:`sample_key` `(seed, r, j)` alone, not by K, the chunk or the
batch it is generated in. transformers: every token of the sample is drawn by inverse CDF from the distribution
`generate` samples from (the same processors and warpers, in transformers' order) with the uniform
:func:`keyed_uniforms` `(key, step)` (:class:`KeyedSampling`); vLLM: one request per sample with `seed=key`. So the
first K₁ samples of a K₂ build are the K₁ build's samples, and raising K on a cached build (top-up) draws only samples
K₁..K₂−1, giving what a K₂ build from scratch gives (bit for bit where the model's kernels are batch-invariant: on
CPU, tested; on GPUs a batch of another shape can move a logit in its last bits, which changes a token rarely).

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
  per-sample seeds, but is not bit-identical to an uninterrupted one (transformers' `generate` path is).
"""

from __future__ import annotations

import gc
import logging
import os
import warnings

from .sampling import (
    SamplingSettings,
    eos_token_ids,
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


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_key(seed: int, row: int, sample: int) -> int:
    """The 64-bit key of sample `sample` of dataset row `row` under `seed` (a splitmix64 chain): it alone decides the
    sample's random draws, whatever K, the chunk or the batch."""
    return _splitmix64(_splitmix64(_splitmix64(int(seed) & _MASK64) ^ int(row)) ^ int(sample))


def keyed_uniforms(keys, step: int):
    """Uniform(0, 1) numbers, one per key, for token step `step` (splitmix64 of key ⊕ h(step), 53-bit mantissa)."""
    import numpy as np

    with np.errstate(over="ignore"):
        x = np.asarray(keys, dtype=np.uint64) ^ np.uint64(_splitmix64(step + 1))
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


#: The sampling warpers of `generate` (transformers applies them after every other processor, when sampling).
_WARPER_KEYS = ("temperature", "top_h", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def _warpers(values: dict, device) -> list:
    """transformers' sampling warpers for `values`, under the conditions and in the order of
    `GenerationMixin._get_logits_processor` (do_sample, one beam: min_tokens_to_keep=1)."""
    from transformers.generation import logits_process as lp

    warpers = []
    if values.get("temperature") is not None and values["temperature"] != 1.0:
        warpers.append(lp.TemperatureLogitsWarper(values["temperature"]))
    if values.get("top_h") is not None:
        warpers.append(lp.TopHLogitsWarper(top_h=values["top_h"]))
    if values.get("top_k") is not None and values["top_k"] != 0:
        warpers.append(lp.TopKLogitsWarper(top_k=values["top_k"], min_tokens_to_keep=1))
    if values.get("top_p") is not None and values["top_p"] < 1.0:
        warpers.append(lp.TopPLogitsWarper(top_p=values["top_p"], min_tokens_to_keep=1))
    if values.get("min_p") is not None:
        warpers.append(lp.MinPLogitsWarper(min_p=values["min_p"], min_tokens_to_keep=1))
    if values.get("typical_p") is not None and values["typical_p"] < 1.0:
        warpers.append(lp.TypicalLogitsWarper(mass=values["typical_p"], min_tokens_to_keep=1))
    if values.get("epsilon_cutoff") is not None and 0.0 < values["epsilon_cutoff"] < 1.0:
        warpers.append(lp.EpsilonLogitsWarper(epsilon=values["epsilon_cutoff"], min_tokens_to_keep=1))
    if values.get("eta_cutoff") is not None and 0.0 < values["eta_cutoff"] < 1.0:
        warpers.append(lp.EtaLogitsWarper(epsilon=values["eta_cutoff"], min_tokens_to_keep=1, device=device))
    return warpers


class KeyedSampling:
    """A `generate` logits processor that draws each row's next token itself: the sampling warpers (temperature,
    top-k, top-p, min-p, ...), then an inverse-CDF draw with the row's keyed uniform for this step. It returns scores
    that are −inf except at the drawn token, which greedy decoding (`do_sample=False`) then takes.

    The distribution is exactly the one `generate(do_sample=True)` samples from (the same processors and warpers, in
    the same order; `torch.multinomial` is an inverse-CDF draw as well), but a row's draw depends only on its key, not
    on the other rows of the batch nor on the torch RNG."""

    def __init__(self, keys, warpers):
        self.keys, self.warpers, self.step = list(keys), warpers, 0

    def __call__(self, input_ids, scores):
        import torch

        for warper in self.warpers:
            scores = warper(input_ids, scores)
        u = torch.as_tensor(keyed_uniforms(self.keys, self.step), device=scores.device, dtype=torch.float32)
        self.step += 1
        cdf = torch.softmax(scores.float(), dim=-1).cumsum(dim=-1)  # float32, as torch.multinomial's
        token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def generate_keyed(model, tokenizer, prompts, keys, settings: SamplingSettings, *, batch_size: int,
                   chat_template_kwargs: dict | None = None):
    """`len(keys[p])` completions of prompt p, the one of key k drawn by :class:`KeyedSampling` from the distribution
    TRL's `generate` samples from (`settings`, resolved; EOS = tokenizer's ∪ generation config's). Returns
    `(texts[p][i], ids[p][i])`, completion ids up to and including the first EOS."""
    import torch
    from transformers import LogitsProcessorList

    from .sampling import _left_pad

    prompt_ids = tokenize_prompts(tokenizer, list(prompts), chat_template_kwargs)
    flat = [(p, key) for p in range(len(prompts)) for key in keys[p]]
    device = next(model.parameters()).device
    stop_ids = eos_token_ids(model, tokenizer)
    kwargs = settings.generate_kwargs(tokenizer, stop_ids)
    model_config = getattr(model, "generation_config", None)
    values = {key: kwargs.pop(key, None) for key in _WARPER_KEYS}
    for key in ("top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"):  # not passed by TRL: generate takes the model's
        if values[key] is None:
            values[key] = getattr(model_config, key, None)
    greedy = kwargs.get("do_sample") is False  # generation_kwargs={"do_sample": False}: plain greedy decoding
    kwargs["do_sample"] = False  # KeyedSampling draws; greedy decoding takes its token
    warpers = _warpers(values, device)
    # every batch padded to the longest prompt of the call (the chunk), not of the batch: a top-up's batches then
    # differ from a from-scratch build's only in their number of rows
    width = max((len(prompt_ids[p]) for p, _ in flat), default=0)
    ids: list[list[list[int]]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(flat), batch_size):
            batch = flat[start : start + batch_size]
            input_ids, attention_mask = _left_pad([prompt_ids[p] for p, _ in batch], tokenizer.pad_token_id, device,
                                                  width=width)
            processors = [] if greedy else [KeyedSampling([key for _, key in batch], warpers)]
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                    logits_processor=LogitsProcessorList(processors), **kwargs)
            for (p, _), row in zip(batch, output[:, input_ids.shape[1]:].cpu().tolist(), strict=True):
                end = next((k for k, tok in enumerate(row) if tok in stop_ids), None)
                ids[p].append(row if end is None else row[: end + 1])
    model.train(was_training)
    conversational = bool(prompts) and is_conversational_prompt(prompts[0])
    texts = []
    for per_prompt in ids:
        decoded = tokenizer.batch_decode(per_prompt, skip_special_tokens=True) if per_prompt else []
        texts.append([[{"role": "assistant", "content": d}] for d in decoded] if conversational else decoded)
    return texts, ids


class TransformersSampler:
    """Samples with `model.generate` and :class:`KeyedSampling` (sample j of row r keyed by `(seed, r, j)`)."""

    def __init__(self, policy, tokenizer, state, config, settings: SamplingSettings):
        self.model = policy.to(state.device)
        self.tokenizer, self.config, self.settings = tokenizer, config, settings

    def __call__(self, prompts, rows, ranges):
        config = self.config
        keys = [[sample_key(config.seed, r, j) for j in range(*span)] for r, span in zip(rows, ranges, strict=True)]
        return generate_keyed(self.model, self.tokenizer, prompts, keys, self.settings,
                              batch_size=config.generation_batch_size_or_chunk,
                              chat_template_kwargs=config.chat_template_kwargs)

    def close(self) -> None:
        self.model = None


class VLLMSampler:
    """Samples with a `vllm.LLM` built at construction (on every process of a multi-process build): one request
    `SamplingParams(n=1, seed=sample_key(seed, row, j))` per sample; `close()` shuts the engine down and frees its
    memory."""

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
        self.base = settings.vllm_kwargs(1)
        # vLLM creates its own process group unless one exists (the external launcher reuses the launch's): only the
        # former is ours to destroy when the engine is shut down.
        self._owns_world = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        if state.num_processes > 1:  # what vLLM's external launcher reads, as TRL's colocate mode sets it
            os.environ.setdefault("RANK", str(state.process_index))
            os.environ.setdefault("LOCAL_RANK", str(getattr(state, "local_process_index", state.process_index)))
            os.environ.setdefault("WORLD_SIZE", str(state.num_processes))
        self.llm = vllm.LLM(**vllm_engine_kwargs(path, config, state.num_processes))

    def __call__(self, prompts, rows, ranges):
        prompt_ids = tokenize_prompts(self.tokenizer, prompts, self.config.chat_template_kwargs)
        # One request per sample, seeded by its key: independent of K, chunking and batching (identical prompts still
        # get independent samples); vLLM batches the requests (and caches the shared prompt).
        requests = [(p, j) for p, span in enumerate(ranges) for j in range(*span)]
        params = [self.vllm.SamplingParams(**self.base, seed=sample_key(self.config.seed, rows[p], j) >> 1)
                  for p, j in requests]
        outputs = self.llm.generate([{"prompt_token_ids": prompt_ids[p]} for p, _ in requests], params, use_tqdm=False)
        ids = [[] for _ in prompts]
        for (p, _), out in zip(requests, outputs, strict=True):
            ids[p].extend(list(o.token_ids) for o in out.outputs)
        conversational = bool(prompts) and is_conversational_prompt(prompts[0])
        texts = []
        for per in ids:
            decoded = self.tokenizer.batch_decode(per, skip_special_tokens=True) if per else []
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
    "vllm_engine_kwargs", "vllm_model_identity", "VLLMSampler", "TransformersSampler", "sample_key",
    "keyed_uniforms", "KeyedSampling", "generate_keyed",
]
