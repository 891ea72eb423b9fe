"""Checks made when a CTRL trainer is built, before any training work (Train layer).

Each function refuses, with the field and the fix, what would otherwise fail hours later: an unwritable or full
`output_dir`, a dataset without `prompt` or valid reference rewards, tokenizers without a pad token, prompts that
fill the model's context. `scan_reference_rewards` also fingerprints the reference rewards (compared on resume,
`trl_infalign.run_state`) and counts them per row (for the model card).
"""

from __future__ import annotations

import hashlib
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch


def check_output_dir(args) -> None:
    """Fail now, not at the first checkpoint, if `output_dir` cannot be created or written (probe file)."""
    from .reference import probe_writable

    probe_writable(
        Path(args.output_dir), f"{type(args).__name__}.output_dir",
        "checkpoints, the model and its card are written there: choose a writable directory with free space",
    )


def check_disk_space(args, model) -> None:
    """Refuse to start if the output directory's disk cannot hold even the model weights; warn below one checkpoint.

    A checkpoint holds the weights plus (unless `save_only_model`) the optimizer's two fp32 moments per trainable
    parameter; the estimate ignores the tokenizer and small files."""
    if not args.should_save:
        return
    try:
        free = shutil.disk_usage(args.output_dir).free
    except OSError:
        return
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    checkpoint = weights + (0 if args.save_only_model else 8 * trainable)
    gib = 1024**3
    if free < weights:
        raise OSError(
            f"Only {free / gib:.3g} GiB free under {type(args).__name__}.output_dir={str(args.output_dir)!r}, but the "
            f"model weights alone need {weights / gib:.3g} GiB: training could not be saved. Free space or choose "
            "another output_dir (nothing has been computed yet)."
        )
    if args.save_strategy != "no" and free < checkpoint:
        warnings.warn(
            f"Only {free / gib:.3g} GiB free under {str(args.output_dir)!r}; one checkpoint needs about "
            f"{checkpoint / gib:.3g} GiB (weights + optimizer state). Set `save_only_model=True` or "
            "`save_total_limit`, or free space.",
            stacklevel=3,
        )


def check_prompt_column(dataset, split: str, trainer_name: str, base_trainer: str) -> None:
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"{split} has no 'prompt' column (columns: {list(columns)}). {trainer_name}, like "
            f"{base_trainer}Trainer, samples "
            "completions for `dataset['prompt']`: rename your prompt column, e.g. "
            "`dataset = dataset.rename_column('question', 'prompt')`."
        )


def check_reference_rewards(dataset, args, split: str) -> None:
    from .reference import validate_reference_rewards

    try:
        validate_reference_rewards(dataset, column=args.reference_rewards_column, min_samples=args.min_reference_samples)
    except ValueError as error:
        raise ValueError(f"{split}: {error}") from None


def check_pad_tokens(tokenizer, reward_funcs, reward_processing_classes, reward_func_names) -> None:
    """The trainer pads the policy's prompts and each reward model's inputs: with neither pad nor EOS token (TRL falls
    back to pad = EOS) the first batch would fail mid-training."""
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The policy's tokenizer (processing_class) has neither a pad token nor an EOS token, so prompts cannot "
            "be batched: set `tokenizer.pad_token = ...` (e.g. an existing special token) before creating the trainer."
        )
    for i, (func, reward_tokenizer) in enumerate(zip(reward_funcs, reward_processing_classes)):
        if isinstance(func, torch.nn.Module) and (reward_tokenizer is None or reward_tokenizer.pad_token_id is None):
            raise ValueError(
                f"The tokenizer of reward model {i} ({reward_func_names[i]!r}) has neither a pad token nor "
                "an EOS token (TRL uses EOS as pad when there is no pad token), so prompt + completion cannot be "
                "batched for scoring: set `tokenizer.pad_token` and pass the tokenizer in `reward_processing_classes`."
            )


def context_length(model) -> int | None:
    """The model's context in tokens (`max_position_embeddings`, `n_positions`, ...), None when the config has none."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt_lengths(dataset, split: str, tokenizer, context: int | None, max_completion_length: int | None,
                         chat_template_kwargs: dict | None = None, batch_size: int = 1024) -> None:
    """Prompts that fill the model's context leave no room to generate: refuse them now, naming the rows.

    Prompts whose length plus `max_completion_length` exceeds the context are allowed (completions usually end
    earlier), with one warning giving their number. Only map-style datasets of text prompts are checked."""
    from .sampling import tokenize_prompts

    if context is None or not hasattr(dataset, "select_columns") or "prompt" not in dataset.column_names:
        return
    too_long, over_budget, max_new = [], 0, max_completion_length or 0
    for start in range(0, len(dataset), batch_size):
        prompts = dataset[start : start + batch_size]["prompt"]
        for offset, ids in enumerate(tokenize_prompts(tokenizer, prompts, chat_template_kwargs)):
            if len(ids) >= context:
                too_long.append((start + offset, len(ids)))
            elif len(ids) + max_new > context:
                over_budget += 1
    if too_long:
        shown = ", ".join(f"row {row} ({n} tokens)" for row, n in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        raise ValueError(
            f"{split}: {len(too_long)} prompt(s) fill the model's context of {context} tokens, leaving no room for "
            f"a completion: {shown}{more}. Drop or shorten them, e.g. `dataset.filter(lambda x: "
            f"len(tokenizer(x['prompt']).input_ids) <= {max(context - max_new, 1)})`, or use a model with a longer "
            "context. (Nothing has been trained yet.)"
        )
    if over_budget:
        warnings.warn(
            f"{split}: {over_budget} prompt(s) plus max_completion_length={max_new} exceed the model's context of "
            f"{context} tokens; their completions may run past the context.",
            stacklevel=3,
        )


def scan_reference_rewards(dataset, column: str) -> tuple[str | None, tuple[int, int] | None]:
    """Fingerprint of the train dataset's reference rewards (checked on resume) and the (min, max) number per row
    (for the model card), in one pass; warns once about all-equal rows.

    A row whose K reference rewards are all equal calibrates every completion to 0, ½ or 1 (below, tied with, or
    above that single value): training still works, but such prompts carry almost no ranking signal."""
    if dataset is None or not hasattr(dataset, "select_columns") or column not in (dataset.column_names or []):
        return None, None
    digest = hashlib.sha256()
    constant: list[int] = []
    index, fewest, most = 0, math.inf, 0
    for batch in dataset.select_columns([column]).iter(batch_size=4096):
        for row in batch[column]:
            for name, entry in sorted(row.items()) if isinstance(row, dict) else [(None, row)]:  # per-reward rows
                values = np.asarray(entry, dtype=np.float64)
                if name is not None:
                    digest.update(name.encode())
                digest.update(np.int64(values.size).tobytes())
                digest.update(values.tobytes())
                if values.size > 1 and values.min() == values.max() and index not in constant[-1:]:
                    constant.append(index)
                fewest, most = min(fewest, values.size), max(most, values.size)
            index += 1
    if constant:
        shown = ", ".join(str(i) for i in constant[:5]) + (" ..." if len(constant) > 5 else "")
        warnings.warn(
            f"{len(constant)} of {index} prompts have all-equal reference rewards in column {column!r} (rows {shown}): "
            "their calibrated reward can only be 0, 0.5 or 1, so they carry little training signal. Check the "
            "reward model / reference samples (e.g. a larger K or temperature), or drop these rows.",
            UserWarning,
            stacklevel=3,
        )
    return digest.hexdigest(), ((int(fewest), most) if index else None)
