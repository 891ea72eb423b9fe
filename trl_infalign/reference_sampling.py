"""Sampling for the reference pass: the reference policy loaded once, and a chunk sampler on transformers or vLLM.

A sampler is a function `(prompts, chunk_index, row_indices) -> (texts[p][k], ids[p][k])` that draws K completions per
prompt of one chunk, reproducibly: transformers seeds the RNG with `seed + chunk_index` before the chunk, vLLM gives
every dataset row its own seed. Both sample with one :class:`~trl_infalign.sampling.SamplingSettings`, the effective
values that TRL's trainer uses (every sampling field explicit, EOS = tokenizer's ∪ generation config's).
"""

from __future__ import annotations

import os

from .sampling import (
    SamplingSettings,
    eos_token_ids,
    generate_completions,
    is_conversational_prompt,
    resolve_tokenizer,
    tokenize_prompts,
)


def load_policy(model, tokenizer, use_vllm: bool, model_init_kwargs: dict | None):
    """(policy, tokenizer): the causal LM loaded from a path (kept on CPU until the first chunk), or `model` itself;
    with vLLM the policy stays a path (vLLM loads it) and only the tokenizer is loaded."""
    if use_vllm:
        path = model if isinstance(model, (str, os.PathLike)) else getattr(getattr(model, "config", None), "_name_or_path", "")
        if not path:
            raise ValueError("use_vllm=True needs the reference model as a path (vLLM loads it itself).")
        return str(path), resolve_tokenizer(str(path), tokenizer)
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model), **(model_init_kwargs or {}))
    return model, resolve_tokenizer(model, tokenizer)


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


def make_sampler(policy, tokenizer, state, config, settings: SamplingSettings):
    """The chunk sampler of `config` (a `ReferenceConfig`) with effective `settings` (:func:`effective_sampling`);
    `policy` is a loaded causal LM, or a path with `config.use_vllm`."""
    if config.use_vllm:
        return _make_vllm_sampler(policy, tokenizer, state, config, settings)
    import torch

    model = policy.to(state.device)

    def sample(prompts, chunk_index, rows):
        torch.manual_seed(config.seed + chunk_index)
        out = generate_completions(
            model, tokenizer, prompts, config.num_samples, max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k, min_p=settings.min_p,
            repetition_penalty=settings.repetition_penalty, batch_size=config.generation_batch_size_or_chunk,
            generation_kwargs=settings.generation_kwargs, chat_template_kwargs=config.chat_template_kwargs,
            progress=False,
        )
        return out.texts, out.ids

    return sample


def _make_vllm_sampler(path, tokenizer, state, config, settings: SamplingSettings):
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "use_vllm=True needs vLLM, which is not installed: `pip install trl-infalign[vllm]` (or set use_vllm=False "
            "to sample with transformers' generate)."
        ) from exc
    import numpy as np

    kwargs = dict(model=str(path), seed=config.seed)
    if state.num_processes > 1:  # one engine per process, as TRL's colocate mode does
        kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
    kwargs.update(config.vllm_kwargs or {})
    llm = vllm.LLM(**kwargs)
    base = settings.vllm_kwargs(config.num_samples)

    def sample(prompts, chunk_index, rows):
        prompt_ids = tokenize_prompts(tokenizer, prompts, config.chat_template_kwargs)
        # One seed per dataset row: independent of chunking, and identical prompts still get independent samples.
        params = [
            vllm.SamplingParams(**base, seed=int(np.random.SeedSequence([config.seed, r]).generate_state(1)[0]))
            for r in rows
        ]
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        ids = [[list(o.token_ids) for o in out.outputs] for out in outputs]
        conversational = bool(prompts) and is_conversational_prompt(prompts[0])
        texts = []
        for per in ids:
            decoded = tokenizer.batch_decode(per, skip_special_tokens=True)
            texts.append([[{"role": "assistant", "content": d}] for d in decoded] if conversational else decoded)
        return texts, ids

    return sample


__all__ = ["load_policy", "make_sampler", "effective_sampling", "generation_config_overridden"]
