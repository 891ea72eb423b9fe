"""Sampling and scoring helpers shared by reference building, evaluation and the trainer.

They reproduce exactly what TRL's `RLOOTrainer` does when it generates and scores a completion, so that a reward
computed here (for the reference samples) and one computed inside training are comparable: calibration is only
meaningful if both sides format the prompt, decode the completion and read the reward model the same way.

- prompts: plain strings, or conversational lists of `{"role", "content"}` messages (chat template applied with
  `add_generation_prompt=True`, as in TRL);
- completions: decoded with `skip_special_tokens=True`; for conversational prompts wrapped as
  `[{"role": "assistant", "content": text}]`;
- reward models (`nn.Module` sequence classifiers) read `logits[:, 0]` of prompt + completion, right padded;
- callables receive `prompts`, `completions`, `completion_ids` and every extra column as keyword arguments.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

RewardFunc = str | nn.Module | Callable[..., list]


def is_conversational_prompt(prompt: Any) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def tokenize_prompts(tokenizer, prompts: Sequence, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of each prompt, as `RLOOTrainer._tokenize_prompts` builds them."""
    if not prompts:
        return []
    if is_conversational_prompt(prompts[0]):
        tokenized = tokenizer.apply_chat_template(
            conversation=list(prompts),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(chat_template_kwargs or {}),
        )
        return [list(ids) for ids in tokenized["input_ids"]]
    return [list(ids) for ids in tokenizer(text=list(prompts))["input_ids"]]


def resolve_process_state(accelerator=None):
    """The accelerate state to shard work over: `accelerator` itself, or `PartialState()`.

    On a machine without GPUs, `PartialState()` ignores a `torchrun` / `accelerate launch --multi_gpu` launch (every
    process believes it is alone) unless created with `cpu=True`; this does that when `WORLD_SIZE > 1` and no CUDA
    device is visible, and refuses to go on if the launch and the state still disagree (every process would do all
    the work and write the same files).
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator is None:
        from accelerate import PartialState

        cpu = world > 1 and not torch.cuda.is_available()
        accelerator = PartialState(cpu=True) if cpu else PartialState()
    if world > 1 and accelerator.num_processes != world:
        raise RuntimeError(
            f"The launcher started WORLD_SIZE={world} processes but the accelerate state has "
            f"{accelerator.num_processes}: on CPU create it with `PartialState(cpu=True)` / `Accelerator(cpu=True)`."
        )
    return accelerator  # an Accelerator or a PartialState: both have process_index, num_processes, device, ...


def resolve_tokenizer(model, tokenizer=None, **from_pretrained_kwargs):
    """`tokenizer`, or the one saved beside `model` (a path or a model with `config._name_or_path`, loaded with
    `from_pretrained_kwargs`, e.g. `revision`); pad = EOS if unset, as RLOOTrainer does."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        path = model if isinstance(model, (str, os.PathLike)) else getattr(model.config, "_name_or_path", "")
        if not path:
            raise ValueError(
                "The model was given as an object without `config._name_or_path`: pass its `tokenizer=` explicitly."
            )
        tokenizer = AutoTokenizer.from_pretrained(str(path), **from_pretrained_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_name(model) -> str:
    """A readable name for a model given as a path or an object (for metadata and reports)."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


def eos_token_ids(model, tokenizer) -> list[int]:
    """The token ids that end a completion: the union of the model's `generation_config.eos_token_id` (e.g. an
    end-of-turn token) and the tokenizer's EOS, tokenizer's first, as `RLOOTrainer.__init__` builds them."""
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) is not None else None
    ids = [] if ids is None else (list(ids) if isinstance(ids, (list, tuple)) else [ids])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos not in ids:
        ids = [eos, *ids]
    return ids


#: generation kwargs that do not change the sampling distribution (left out of the provenance record).
_NON_DISTRIBUTIONAL_GENERATION_KWARGS = frozenset(
    {"use_cache", "cache_implementation", "disable_compile", "compile_config", "pad_token_id", "bos_token_id",
     "output_scores", "output_logits", "return_dict_in_generate", "num_return_sequences"}
)
#: generation kwargs at the value TRL's `generate` uses anyway (left out of the record when they hold it: only another
#: value, such as greedy `do_sample=False`, changes the distribution).
_TRL_GENERATION_DEFAULTS = {"do_sample": True}
#: Sampling fields that TRL passes to `generate` explicitly (`RLOOTrainer.__init__`), with their neutral values.
SAMPLING_FIELDS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled: the one object shared by the reference pass, the trainer's provenance check and
    the provenance record, so that all three see the values `generate` really uses.

    CTRL calibrates a policy completion's reward against rewards of reference samples (InfAlign §1); that is only
    meaningful if both are drawn the same way. TRL's `RLOOTrainer` passes `temperature`, `top_p`, `top_k`, `min_p`
    and `repetition_penalty` to `generate` explicitly and stops on the union of the tokenizer's and the generation
    config's EOS ids; transformers then fills every value left at None from the model's `generation_config.json`.
    :meth:`resolved` applies the same rule (on the transformers path only `min_p=None` is filled in: TRL passes every
    other field; vLLM gets `min_p=0.0`, as TRL gives it), so a repetition penalty in a model's generation config no
    longer changes the reference samples while TRL trains with 1.0.
    """

    max_new_tokens: int | None = 64
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = 0
    min_p: float | None = None
    repetition_penalty: float | None = 1.0
    generation_kwargs: dict | None = None

    @classmethod
    def from_args(cls, args) -> "SamplingSettings":
        """Read from a TRL config (`max_completion_length`, ...) or a `ReferenceConfig` (`max_new_tokens`, ...)."""
        max_new_tokens = getattr(args, "max_new_tokens", None)
        if max_new_tokens is None:
            max_new_tokens = getattr(args, "max_completion_length", None)
        return cls(
            max_new_tokens=max_new_tokens,
            temperature=getattr(args, "temperature", 1.0),
            top_p=getattr(args, "top_p", 1.0),
            top_k=getattr(args, "top_k", 0),
            min_p=getattr(args, "min_p", None),
            repetition_penalty=getattr(args, "repetition_penalty", 1.0),
            generation_kwargs=dict(getattr(args, "generation_kwargs", None) or {}) or None,
        )

    def resolved(self, model=None, sampler: str = "transformers") -> "SamplingSettings":
        """The effective settings: `min_p=None` takes `model.generation_config.min_p` on the transformers path (as it
        does inside TRL's `generate`) and 0.0 on vLLM; other None values take their neutral value."""
        values = {}
        for name, neutral in SAMPLING_FIELDS.items():
            value = getattr(self, name)
            if value is None and name == "min_p" and sampler == "transformers" and model is not None:
                value = getattr(getattr(model, "generation_config", None), "min_p", None)
            values[name] = neutral if value is None else value
        return SamplingSettings(max_new_tokens=self.max_new_tokens, generation_kwargs=self.generation_kwargs, **values)

    def generate_kwargs(self, tokenizer, eos_ids: Sequence[int]) -> dict:
        """`model.generate` kwargs, as `RLOOTrainer` builds them: every sampling field explicit, EOS ids given,
        `generation_kwargs` applied last. Call on :meth:`resolved` settings."""
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=True,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=list(eos_ids) or None,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p or None,  # 0 is "off": no warper, as when TRL's None meets a generation config without it
            repetition_penalty=self.repetition_penalty,
        )
        kwargs.update(self.generation_kwargs or {})
        return _neutral_for_none(kwargs, keep_min_p_none=True)

    def vllm_kwargs(self, n: int) -> dict:
        """`vllm.SamplingParams` kwargs, as TRL's colocate engine builds them (`min_p=None` is 0.0). A sampling field
        set to None in `generation_kwargs` (`{"top_k": None}`, which `SamplingParams` cannot compare) takes its neutral
        value, as the provenance record does."""
        kwargs = dict(n=n, max_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                      top_k=self.top_k, min_p=0.0 if self.min_p is None else self.min_p,
                      repetition_penalty=self.repetition_penalty)
        kwargs.update(self.generation_kwargs or {})
        return _neutral_for_none(kwargs)

    def record(self) -> dict:
        """The provenance record: the sampling fields with neutral values for None, `max_new_tokens`, and every
        distribution-changing `generation_kwargs` entry on top (as `generate` sees them)."""
        settings = {name: (neutral if getattr(self, name) is None else getattr(self, name)) for name, neutral in SAMPLING_FIELDS.items()}
        settings = {
            "temperature": float(settings["temperature"]), "top_p": float(settings["top_p"]), "top_k": int(settings["top_k"]),
            "min_p": float(settings["min_p"]), "repetition_penalty": float(settings["repetition_penalty"]),
            "max_new_tokens": None if self.max_new_tokens is None else int(self.max_new_tokens),
        }
        for key, value in sorted((self.generation_kwargs or {}).items()):
            if key in _NON_DISTRIBUTIONAL_GENERATION_KWARGS or (
                key in _TRL_GENERATION_DEFAULTS and value == _TRL_GENERATION_DEFAULTS[key]
            ):
                continue
            settings[key] = json.loads(json.dumps(value, default=repr))
        for key, neutral in SAMPLING_FIELDS.items():
            if settings.get(key) is None:
                settings[key] = neutral
        return settings


def _neutral_for_none(kwargs: dict, keep_min_p_none: bool = False) -> dict:
    """Sampling fields left at None (e.g. by `generation_kwargs`) replaced by their neutral values (`SAMPLING_FIELDS`),
    so that neither transformers (which would read the model's generation config) nor vLLM (which cannot compare None)
    sees a None; `min_p=None` stays None for `generate` when asked (it is transformers' "off")."""
    for name, neutral in SAMPLING_FIELDS.items():
        if name in kwargs and kwargs[name] is None and not (keep_min_p_none and name == "min_p"):
            kwargs[name] = neutral
    return kwargs


def _left_pad(rows: list[list[int]], pad_id: int, device, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([len(r) for r in rows] + [width or 0])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


@dataclass
class Completions:
    """`num_completions` samples for each of P prompts: `texts[p][j]`, `ids[p][j]` (completion token ids, EOS kept)."""

    prompts: list
    texts: list[list[Any]]
    ids: list[list[list[int]]]
    prompt_ids: list[list[int]]


def generate_completions(
    model,
    tokenizer,
    prompts: Sequence,
    num_completions: int,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    batch_size: int = 32,
    generation_kwargs: dict | None = None,
    chat_template_kwargs: dict | None = None,
    progress: bool | str = True,
) -> Completions:
    """Sample `num_completions` completions per prompt with `model.generate`, batched over prompt copies.

    Sampling mirrors `RLOOTrainer`: `do_sample=True`, every sampling field passed explicitly (defaults: temperature
    1, no top-k/top-p truncation, repetition penalty 1; `min_p=None` takes the model's generation config, as in TRL),
    generation stops at the union of the tokenizer's and the generation config's EOS ids (see
    :class:`SamplingSettings`). So reference samples come from the distribution the trainer samples from.
    """
    if num_completions < 1:
        raise ValueError(f"num_completions must be >= 1, got {num_completions}.")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The policy tokenizer has no pad token: set `tokenizer.pad_token = tokenizer.eos_token` (or add one) "
            "before generating."
        )
    prompts = list(prompts)
    prompt_ids = tokenize_prompts(tokenizer, prompts, chat_template_kwargs)
    flat = [(p, j) for p in range(len(prompts)) for j in range(num_completions)]
    device = next(model.parameters()).device
    stop_ids = eos_token_ids(model, tokenizer)
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, generation_kwargs=generation_kwargs,
    ).resolved(model)
    kwargs = settings.generate_kwargs(tokenizer, stop_ids)
    ids: list[list[list[int]]] = [[[] for _ in range(num_completions)] for _ in prompts]
    desc = progress if isinstance(progress, str) else "Sampling"
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(flat), batch_size), desc=desc, disable=not progress, unit="batch"):
            chunk = flat[start : start + batch_size]
            input_ids, attention_mask = _left_pad([prompt_ids[p] for p, _ in chunk], tokenizer.pad_token_id, device)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            completion = output[:, input_ids.shape[1] :].cpu()
            for (p, j), row in zip(chunk, completion, strict=True):
                row = row.tolist()
                end = next((k for k, tok in enumerate(row) if tok in stop_ids), None)
                ids[p][j] = row if end is None else row[: end + 1]
    model.train(was_training)
    conversational = bool(prompts) and is_conversational_prompt(prompts[0])
    texts = []
    for per_prompt in ids:
        decoded = tokenizer.batch_decode(per_prompt, skip_special_tokens=True)
        texts.append([[{"role": "assistant", "content": d}] for d in decoded] if conversational else decoded)
    return Completions(prompts=prompts, texts=texts, ids=ids, prompt_ids=prompt_ids)


def completion_logprobs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    batch_size: int = 16,
) -> torch.Tensor:
    """Sum over completion tokens of log π(token | prefix) at temperature 1, one value per (prompt, completion) pair.

    Used for the KL estimators of the evaluation module: k1 = mean(log π − log π_ref) over policy samples.
    """
    device = next(model.parameters()).device
    out = torch.zeros(len(prompt_ids), dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompt_ids), batch_size):
            rows = [list(p) + list(c) for p, c in zip(prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size], strict=True)]
            starts = [len(p) for p in prompt_ids[start : start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            positions = torch.arange(1, width).unsqueeze(0)
            take = (positions >= torch.tensor(starts).unsqueeze(1)) & mask[:, 1:].bool()
            out[start : start + len(rows)] = (logps.cpu().double() * take).sum(-1)
    model.train(was_training)
    return out


def load_reward_funcs(
    reward_funcs: RewardFunc | Sequence[RewardFunc],
    reward_processing_classes=None,
    model_init_kwargs: dict | None = None,
) -> tuple[list, list]:
    """Normalise reward functions as `RLOOTrainer.__init__` does: load model paths, pair models with tokenizers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if reward_processing_classes is None:
        classes = [None] * len(funcs)
    elif isinstance(reward_processing_classes, (list, tuple)):
        classes = list(reward_processing_classes)
    else:
        classes = [reward_processing_classes]
    if len(classes) != len(funcs):
        raise ValueError(
            f"reward_processing_classes has {len(classes)} entries but there are {len(funcs)} reward functions: "
            "give one tokenizer (or None) per reward function."
        )
    for i, func in enumerate(funcs):
        if isinstance(func, str):
            funcs[i] = AutoModelForSequenceClassification.from_pretrained(func, num_labels=1, **(model_init_kwargs or {}))
        if isinstance(funcs[i], PreTrainedModel):
            if classes[i] is None:
                classes[i] = AutoTokenizer.from_pretrained(funcs[i].config._name_or_path)
            if classes[i].pad_token_id is None:
                if classes[i].eos_token is None:
                    raise ValueError(
                        f"The tokenizer of reward model {i} has neither a pad token nor an EOS token: set "
                        "`tokenizer.pad_token` before passing it in `reward_processing_classes`."
                    )
                classes[i].pad_token = classes[i].eos_token
            funcs[i].config.get_text_config().pad_token_id = classes[i].pad_token_id
            funcs[i].eval()
        elif not callable(funcs[i]):
            raise TypeError(
                f"reward function {i} is a {type(funcs[i]).__name__}: expected a model path, a sequence-classification "
                "model, or a callable returning one float per completion."
            )
    return funcs, classes


def reward_func_name(func) -> str:
    """The reward function's name as TRL derives it (`RLOOTrainer.reward_func_names`): a model's
    `config._name_or_path.split("/")[-1]`, a callable's `__name__` (a `functools.partial` unwrapped, an object by its
    class name). Per-reward references are keyed by it. A model without a config is named after its class; a model
    path, before it is loaded, by what its config's `_name_or_path` will be: the path as given."""
    if isinstance(func, str):
        return func.split("/")[-1]
    if isinstance(func, nn.Module):
        config = getattr(func, "config", None)
        if config is None:
            return type(func).__name__
        return str(getattr(config, "_name_or_path", "")).split("/")[-1]
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def score_completions(
    reward_funcs: Sequence,
    reward_processing_classes: Sequence,
    prompts: Sequence,
    completions: Sequence,
    *,
    completion_ids: Sequence | None = None,
    columns: dict[str, Sequence] | None = None,
    chat_template_kwargs: dict | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Raw reward of each (prompt, completion) pair for each reward function: a float tensor of shape (len, F).

    Mirrors `RLOOTrainer._calculate_rewards` (without the cross-process gather). `None` from a callable becomes NaN.
    `reward_funcs` / `reward_processing_classes` as returned by :func:`load_reward_funcs`.
    """
    from trl.data_utils import apply_chat_template

    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"{len(completions)} completions for {n} prompts: pass one prompt per completion.")
    out = torch.full((n, len(reward_funcs)), math.nan, dtype=torch.float32)
    columns = dict(columns or {})
    for i, (func, tokenizer) in enumerate(zip(reward_funcs, reward_processing_classes, strict=True)):
        if isinstance(func, nn.Module):
            device = next(func.parameters()).device
            for start in range(0, n, batch_size):
                ps, cs = prompts[start : start + batch_size], completions[start : start + batch_size]
                if is_conversational_prompt(ps[0]):
                    texts = [
                        apply_chat_template({"messages": p + c}, tokenizer, **(chat_template_kwargs or {}))["text"]
                        for p, c in zip(ps, cs, strict=True)
                    ]
                else:
                    texts = [p + c for p, c in zip(ps, cs, strict=True)]
                inputs = tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                with torch.inference_mode():
                    out[start : start + len(texts), i] = func(**inputs).logits[:, 0].float().cpu()
        else:
            values = func(
                prompts=list(prompts),
                completions=list(completions),
                completion_ids=list(completion_ids) if completion_ids is not None else None,
                **columns,
            )
            values = [math.nan if v is None else float(v) for v in values]
            if len(values) != n:
                raise ValueError(
                    f"The reward function '{reward_func_name(func)}' returned {len(values)} rewards for {n} completions: "
                    "it must return exactly one reward per completion."
                )
            out[:, i] = torch.tensor(values, dtype=torch.float32)
    return out


def combine_rewards(rewards_per_func: torch.Tensor, reward_weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum over reward functions as TRL does (NaN-skipping); NaN where every function returned NaN."""
    weights = torch.ones(rewards_per_func.shape[1]) if reward_weights is None else torch.as_tensor(reward_weights, dtype=torch.float32)
    if weights.numel() != rewards_per_func.shape[1]:
        raise ValueError(
            f"reward_weights has {weights.numel()} entries for {rewards_per_func.shape[1]} reward functions: give one "
            "weight per reward function."
        )
    combined = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    combined[torch.isnan(rewards_per_func).all(dim=1)] = math.nan
    return combined
