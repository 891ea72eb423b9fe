"""`ReferenceConfig`: how the reference pass of CTRL makes its K reference rewards per prompt.

One dataclass in TRL's style (fields grouped by concern, `metadata={"help": ...}`, checked in `__post_init__`), read by
:func:`trl_infalign.build_reference_rewards`, by `trl-infalign build-reference` and by `TrlParser((ReferenceConfig,))`,
and recorded in the provenance of the references it makes. A new option is added here once.
"""

import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

#: The `generation_kwargs` keys that have a field of their own (a key there overrides the field, with a warning).
_SAMPLING_FIELD_NAMES = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")
_DICT_FIELDS = ("generation_kwargs", "chat_template_kwargs", "vllm_kwargs", "model_init_kwargs")


@dataclass
class ReferenceConfig:
    r"""
    Configuration of the reference pass ([`build_reference_rewards`], `trl-infalign build-reference`).

    CTRL calibrates a policy completion's reward against the rewards of K samples of the reference policy for the same
    prompt (InfAlign, arXiv 2412.19792, §1). Those samples must be drawn the way TRL draws training samples, so the
    generation fields below mean what the same fields of `RLOOConfig` / `CTRLConfig` mean (`max_new_tokens` is the
    trainer's `max_completion_length`). [`~trl.TrlParser`] turns this class into command-line arguments
    (`--num_samples 8` or `--num-samples 8`).

    Parameters:
        > Parameters that control the references

        num_samples (`int`, *optional*, defaults to `16`):
            K, reference samples per prompt. The resolution of the calibrated reward is 1/K.
        reward_weights (`list[float]`, *optional*):
            One weight per reward function; the references are the weighted, NaN-skipping sum, as TRL combines
            rewards (default: all 1). Ignored in the values of a per-reward build (each reward is stored unweighted).
        per_reward (`bool`, *optional*, defaults to `False`):
            With several reward functions, store each one's rewards for the same K completions under its TRL name:
            one column holding `{name: [K floats]}`. With one reward function the column stays a plain list.
        nonfinite (`str`, *optional*, defaults to `"raise"`):
            NaN/inf rewards: `"raise"` names the row and the sample; `"skip"` drops the sample from its row (with
            `per_reward`, a sample dropped for one reward is dropped for every reward, so the rows stay aligned).

        > Parameters that control generation

        max_new_tokens (`int`, *optional*, defaults to `64`):
            Maximum completion length; must equal the trainer's `max_completion_length`.
        temperature, top_p, top_k, min_p, repetition_penalty:
            Sampling settings, passed to `generate` explicitly as TRL does (so the model's `generation_config.json`
            does not leak in); `min_p=None` takes the model's generation config, as in TRL.
        generation_kwargs (`dict` or `str`, *optional*):
            Further `generate` / `SamplingParams` kwargs, applied last (a JSON string on the command line).
        chat_template_kwargs (`dict` or `str`, *optional*):
            Extra kwargs of the chat template for conversational prompts.

        > Parameters that control batching, seeding and the cache

        batch_size (`int`, *optional*, defaults to `32`):
            Prompts per chunk: the unit of seeding (chunk i is seeded with `seed + i`), caching and sharding.
            Changing it changes the samples.
        generation_batch_size (`int`, *optional*):
            Completions per `generate` call (default: a whole chunk, `batch_size * num_samples`).
        reward_batch_size (`int`, *optional*, defaults to `64`):
            Completions per reward-model forward pass.
        seed (`int`, *optional*, defaults to `0`):
            Seed of chunk 0 (vLLM: one seed per row, derived from `seed` and the row index).
        cache_dir (`str`, *optional*):
            Resumable cache of finished chunks; a rerun with the same settings resumes.

        > Parameters that control the models and vLLM

        model_init_kwargs (`dict` or `str`, *optional*):
            `from_pretrained` kwargs for the policy and reward-model paths (e.g. `{"dtype": "bfloat16"}`), as in TRL.
        use_vllm (`bool`, *optional*, defaults to `False`):
            Sample with vLLM (`pip install trl-infalign[vllm]`).
        vllm_kwargs (`dict` or `str`, *optional*):
            Extra `vllm.LLM(...)` kwargs (e.g. `gpu_memory_utilization`, `max_model_len`).

        > Parameters that control the columns

        prompt_column (`str`, *optional*, defaults to `"prompt"`), output_column (`"ref_rewards"`):
            Where the prompts are read and the references written (plus `<output_column>_provenance`).
        keep_completions (`bool`, *optional*, defaults to `False`), completions_column (`"ref_completions"`):
            Also store the decoded reference completions.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace existing output columns instead of raising.
    """

    # Parameters that control the references
    num_samples: int = field(
        default=16,
        metadata={"help": "K, reference samples per prompt (the calibrated reward's resolution is 1/K).",
                  "aliases": ["-k"]},
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per reward function (default: all 1); the references are the weighted sum, as "
                  "TRL combines rewards. A per-reward build stores each reward unweighted."},
    )
    per_reward: bool = field(
        default=False,
        metadata={"help": "With several reward functions, store each one's rewards for the same K completions under "
                  "its TRL name, in one column holding {name: [K floats]}. With one reward function the column stays a "
                  "plain list."},
    )
    nonfinite: str = field(
        default="raise",
        metadata={"help": "NaN/inf rewards: `raise` names the row; `skip` drops the sample from its row (with "
                  "--per_reward, from every reward's list, so the rows stay aligned).", "choices": ["raise", "skip"]},
    )

    # Parameters that control generation
    max_new_tokens: int = field(
        default=64, metadata={"help": "Maximum completion length: the trainer's `max_completion_length`."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0), as the trainer's."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]; 1 = no truncation."})
    top_k: int = field(default=0, metadata={"help": "Top-k truncation; 0 = none."})
    min_p: float | None = field(
        default=None,
        metadata={"help": "Minimum token probability relative to the most likely token, in [0, 1]. None takes the "
                  "model's generation config on the transformers path (as in TRL) and 0 on vLLM."},
    )
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Repetition penalty (> 0; 1 = none), passed explicitly as TRL does."}
    )
    generation_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Further generate / vLLM SamplingParams kwargs, applied last (JSON on the command line)."},
    )
    chat_template_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Extra chat-template kwargs for conversational prompts (JSON)."}
    )

    # Parameters that control batching, seeding and the cache
    batch_size: int = field(
        default=32,
        metadata={"help": "Prompts per chunk: the unit of seeding (chunk i: seed + i), caching and sharding. Changing "
                  "it changes the samples."},
    )
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Completions per generate call (default: batch_size x num_samples)."}
    )
    reward_batch_size: int = field(default=64, metadata={"help": "Completions per reward-model forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of chunk 0 (chunk i is seeded with seed + i)."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Resumable cache of finished chunks (the CLI's default: <output>/cache); a rerun resumes."},
    )

    # Parameters that control the models and vLLM
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "from_pretrained kwargs for the policy and reward-model paths, e.g. '{\"dtype\": "
                  "\"bfloat16\"}', as in TRL."},
    )
    use_vllm: bool = field(default=False, metadata={"help": "Sample with vLLM (pip install trl-infalign[vllm])."})
    vllm_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Extra vllm.LLM kwargs, e.g. '{\"gpu_memory_utilization\": 0.5}'."}
    )

    # Parameters that control the columns
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})
    output_column: str = field(
        default="ref_rewards", metadata={"help": "Column for the references (plus <output_column>_provenance)."}
    )
    keep_completions: bool = field(default=False, metadata={"help": "Also store the reference completions."})
    completions_column: str = field(
        default="ref_completions", metadata={"help": "Column for the completions (with keep_completions)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace existing output columns instead of raising."})

    def __post_init__(self):
        for name in _DICT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as error:
                    raise ValueError(f"{name} must be a dict or a JSON object string, got {value!r} ({error}).") from None
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{name} must be a dict (a JSON object on the command line), got {value!r}.")
            setattr(self, name, value)
        if isinstance(self.cache_dir, os.PathLike):
            self.cache_dir = os.fspath(self.cache_dir)
        if self.top_k is None:  # TRL's "no truncation", spelled None by some configs
            self.top_k = 0
        _check_int("num_samples", self.num_samples, 1, "(K reference samples per prompt)")
        _check_int("batch_size", self.batch_size, 1, "(prompts per chunk)")
        _check_int("max_new_tokens", self.max_new_tokens, 1, "(the trainer's max_completion_length)")
        _check_int("reward_batch_size", self.reward_batch_size, 1, "(completions per reward-model forward)")
        if self.generation_batch_size is not None:
            _check_int("generation_batch_size", self.generation_batch_size, 1, "or None (a whole chunk)")
        _check_int("top_k", self.top_k, 0, "(0 = no top-k truncation)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        if not _is_number(self.temperature) or not self.temperature > 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r} (1.0 = the model's "
                             "distribution).")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r} (1.0 = no nucleus truncation).")
        if self.min_p is not None and (not _is_number(self.min_p) or not 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1] or None, got {self.min_p!r} (0 = off).")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r} "
                             "(1.0 = no penalty, TRL's default).")
        if self.nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {self.nonfinite!r}.")
        if self.reward_weights is not None:
            weights = list(self.reward_weights) if isinstance(self.reward_weights, (list, tuple)) else None
            if not weights or not all(_is_number(w) for w in weights):
                raise ValueError(f"reward_weights must be a non-empty list of finite numbers (one per reward "
                                 f"function) or None, got {self.reward_weights!r}.")
            self.reward_weights = [float(w) for w in weights]
        for key in sorted(set(self.generation_kwargs or {}) & set(_SAMPLING_FIELD_NAMES)):
            if self.generation_kwargs[key] != getattr(self, key):
                warnings.warn(
                    f"generation_kwargs[{key!r}]={self.generation_kwargs[key]!r} overrides {key}={getattr(self, key)!r}: "
                    f"the references are sampled with {key}={self.generation_kwargs[key]!r}. Set {key} itself instead.",
                    UserWarning, stacklevel=3,
                )
        for key in ("n", "num_return_sequences"):
            if key in (self.generation_kwargs or {}):
                raise ValueError(f"generation_kwargs must not set {key!r}: the number of samples per prompt is "
                                 f"num_samples (got {key}={self.generation_kwargs[key]!r}).")
        from .provenance import provenance_column_name

        columns = [self.prompt_column, self.output_column] + ([self.completions_column] if self.keep_completions else [])
        if len(set(columns)) < len(columns):
            raise ValueError("output_column, completions_column and prompt_column must be different columns.")
        provenance = provenance_column_name(self.output_column)
        if provenance in (self.prompt_column, self.completions_column if self.keep_completions else None):
            raise ValueError(f"{provenance!r} (the provenance of {self.output_column!r}) must not be another column.")

    # ------------------------------------------------------------------------------------------------------------------
    @property
    def sampling(self):
        """The :class:`~trl_infalign.sampling.SamplingSettings` of this pass (before the model fills `min_p=None`)."""
        from .sampling import SamplingSettings

        return SamplingSettings.from_args(self)

    @property
    def generation_batch_size_or_chunk(self) -> int:
        return self.generation_batch_size or self.batch_size * self.num_samples

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_training_args(cls, args, **overrides) -> "ReferenceConfig":
        """The reference pass that matches a `CTRLConfig` / `CTRLGRPOConfig` (or any TRL RLOO/GRPO config): K from
        `num_reference_samples`, `max_new_tokens` from `max_completion_length`, the same sampling fields, generation
        and chat-template kwargs, reward weights, seed, `nonfinite_rewards`, `use_vllm`, `model_init_kwargs` and
        `reference_rewards_column`, and `per_reward` for a deployment that names rewards (`args.is_multi_reward`);
        `overrides` (e.g. `cache_dir`, `batch_size`) on top."""
        mapping = {
            "num_samples": "num_reference_samples", "max_new_tokens": "max_completion_length",
            "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty", "generation_kwargs": "generation_kwargs",
            "chat_template_kwargs": "chat_template_kwargs", "reward_weights": "reward_weights", "seed": "seed",
            "nonfinite": "nonfinite_rewards", "use_vllm": "use_vllm", "model_init_kwargs": "model_init_kwargs",
            "output_column": "reference_rewards_column",
        }
        values = {name: getattr(args, source) for name, source in mapping.items() if hasattr(args, source)}
        if getattr(args, "is_multi_reward", False):  # a deployment that names rewards calibrates each on its own
            values["per_reward"] = True
        values.update(overrides)
        return cls(**values)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value, minimum: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} {meaning}, got {value!r}.")


__all__ = ["ReferenceConfig"]
