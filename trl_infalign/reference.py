"""The reference pass of CTRL: K reference-policy samples per prompt, scored once, stored as a `ref_rewards` column.

Calibration (InfAlign §1) needs, for every training prompt x, the rewards R_x = {r(x, y_k)} of K samples y_k ~ π_ref.
:func:`build_reference_rewards` draws them with the same prompt formatting, sampling settings, decoding and reward
combination as TRL's `RLOOTrainer` (through :mod:`trl_infalign.sampling`), so that the calibrated reward of a policy
completion compares like with like. :func:`validate_reference_rewards` is what `CTRLTrainer` runs on its datasets.

Determinism and resumption
--------------------------
Prompts are processed in fixed chunks of `batch_size` rows: chunk i is rows [i*C, (i+1)*C). Before chunk i the RNG is
seeded with `seed + i` (vLLM: one seed per row), so a chunk's result depends neither on the chunks run before it nor
on the process that runs it. With `cache_dir`, each process appends its finished chunks to its own
`rank-XXXXX.jsonl` (`{"index": row, "ref_rewards": [...], "sha256": ...}` per row, flushed and fsync'ed per chunk)
next to a `meta.json` describing the run; a restarted run skips every chunk whose rows are all on disk and pass the
integrity check, so a resumed build is bit-identical to an uninterrupted one (floats go through JSON with exact
round-trip). The cache directory is probed for writability before any model is loaded, and a chunk is only computed
under its `flock` (`locks/chunk-XXXXXXXX.lock`), so concurrent builders on one cache split the work (see `_Cache`).

Provenance: the output also gets `<output_column>_provenance` (see :mod:`trl_infalign.provenance`), which
`CTRLTrainer` compares with its own settings.

Sharding: process `rank` of `world_size` runs the chunks with `chunk_index % world_size == rank`; results are merged on
every rank, in dataset order, from the shard files (with `cache_dir`) or with `gather_object` (without).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .provenance import (
    build_provenance,
    chat_template_sha256,
    model_identity,
    provenance_column_name,
    provenance_rows,
    reward_func_identity,
    sampling_settings,
)
from .sampling import (
    combine_rewards,
    generate_completions,
    is_conversational_prompt,
    load_reward_funcs,
    resolve_process_state,
    resolve_tokenizer,
    reward_func_name,
    score_completions,
    tokenize_prompts,
)

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
META_FILE = "meta.json"
LOCK_DIR = "locks"
_BUILD_HINT = (
    "Build it with `trl_infalign.build_reference_rewards(dataset, model, reward_funcs, num_samples=16)` or "
    "`trl-infalign build-reference --model MODEL --reward-model RM --dataset DATA --output DIR`."
)


# ---------------------------------------------------------------------------------------------------------------------
# Validation used by the trainer


def validate_reference_rewards(dataset, column: str = "ref_rewards", min_samples: int = 1, max_report: int = 5) -> None:
    """Check that every row of `dataset[column]` is a list of at least `min_samples` finite numbers.

    Raises `ValueError` naming the first bad rows (up to `max_report`) and the total number of bad rows. For an
    `IterableDataset` only the first 1000 rows are checked (checking more would consume the stream).
    """
    from datasets import IterableDataset

    columns = getattr(dataset, "column_names", None)
    if columns is not None and column not in columns:
        raise ValueError(
            f"The dataset has no reference-rewards column {column!r} (columns: {list(columns)}). CTRL calibrates each "
            f"completion against K reference-policy rewards per prompt. {_BUILD_HINT}"
        )
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}.")
    if isinstance(dataset, IterableDataset):
        rows = (example.get(column) if isinstance(example, dict) else None for _, example in zip(range(1000), dataset))
    else:
        rows = _iter_column(dataset, column)
    bad: list[str] = []
    num_bad = 0
    for index, value in enumerate(rows):
        problem = _row_problem(value, min_samples)
        if problem is not None:
            num_bad += 1
            if len(bad) < max_report:
                bad.append(f"row {index}: {problem}")
    if num_bad:
        more = f" (and {num_bad - len(bad)} more)" if num_bad > len(bad) else ""
        raise ValueError(
            f"Column {column!r} has {num_bad} invalid row(s): " + "; ".join(bad) + more + ". Each row must be a list of "
            f"at least {min_samples} finite reference rewards (one per reference sample). Rebuild the column (e.g. with "
            "a larger `num_samples`, or `nonfinite='skip'` plus a fixed reward model), or lower `min_reference_samples`. "
            + _BUILD_HINT
        )


def _iter_column(dataset, column: str, batch_size: int = 4096):
    if hasattr(dataset, "select_columns") and hasattr(dataset, "iter"):
        for batch in dataset.select_columns([column]).iter(batch_size=batch_size):
            yield from batch[column]
    else:
        yield from dataset[column]


def _row_problem(value, min_samples: int) -> str | None:
    if isinstance(value, dict):  # per-reward references: {name: [K floats]}
        for name, entry in value.items():
            problem = _row_problem(entry, min_samples)
            if problem is not None:
                return f"reward {name!r}: {problem}"
        return None
    if not isinstance(value, (list, tuple)):
        return f"expected a list of rewards, got {type(value).__name__} {_short(value)}"
    if len(value) == 0:
        return "empty list"
    for k, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"element {k} is {type(v).__name__} {_short(v)}, not a number"
        if not math.isfinite(v):
            return f"element {k} is {v} (non-finite)"
    if len(value) < min_samples:
        return f"{len(value)} reward(s), fewer than min_samples={min_samples}"
    return None


def _short(value, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------------
# Building


@dataclass
class ReferenceStats:
    """What a build did (returned by :func:`_build_reference_rewards`, printed by the CLI)."""

    num_rows: int = 0
    num_samples: int = 0
    num_chunks: int = 0
    chunks_computed: int = 0  # on this process
    chunks_resumed: int = 0  # found in the cache (all processes)
    chunks_by_others: int = 0  # finished by a concurrent builder on the same cache_dir while this one ran
    records_recomputed: int = 0  # cached records that failed the integrity check and were recomputed
    num_dropped: int = 0  # non-finite samples dropped (nonfinite="skip")
    rows_with_dropped: int = 0
    seconds: float = 0.0
    world_size: int = 1
    extra: dict = field(default_factory=dict)


def build_reference_rewards(
    dataset,
    model,
    reward_funcs,
    *,
    num_samples: int = 16,
    tokenizer=None,
    reward_processing_classes=None,
    reward_weights: Sequence[float] | None = None,
    prompt_column: str = "prompt",
    output_column: str = "ref_rewards",
    keep_completions: bool = False,
    completions_column: str = "ref_completions",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    generation_batch_size: int | None = None,
    reward_batch_size: int = 64,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generation_kwargs: dict | None = None,
    chat_template_kwargs: dict | None = None,
    seed: int = 0,
    nonfinite: str = "raise",
    overwrite: bool = False,
    use_vllm: bool = False,
    vllm_kwargs: dict | None = None,
    model_init_kwargs: dict | None = None,
    accelerator=None,
    progress: bool = True,
    return_stats: bool = False,
):
    """Sample `num_samples` (K) reference completions per prompt, score them, and return `dataset` with a new column.

    `dataset[output_column][i]` is the list of K *combined* rewards of prompt i's reference samples: the weighted sum
    over `reward_funcs` (NaN-skipping, `reward_weights`) exactly as `RLOOTrainer` / `CTRLTrainer` combine a policy
    completion's rewards before calibrating it. Cost: K × len(dataset) generations and reward evaluations.

    Args:
        dataset: a `datasets.Dataset` with a `prompt_column` (plain strings or conversational message lists).
        model: the reference policy (usually the SFT model the trainer starts from): a path / hub id, or a loaded
            causal LM (its tokenizer is then loaded from `model.config._name_or_path` unless `tokenizer` is given).
        reward_funcs: as in TRL: a sequence-classification model path, a loaded `nn.Module`, a callable
            `f(prompts, completions, completion_ids, **columns) -> list[float]`, or a list of these. Callables receive
            every other dataset column (repeated per completion), plus `trainer_state=None` and no-op `log_extra` /
            `log_metric`, like inside the trainer.
        batch_size: prompts per chunk — the unit of seeding, caching/resumption and sharding (chunk i = rows
            [i*batch_size, (i+1)*batch_size), seeded with `seed + i`). Changing it changes the samples.
        generation_batch_size: completions per `model.generate` call (default: a whole chunk, `batch_size * K`).
        nonfinite: `"raise"` (default) stops at the first NaN/inf combined reward and names the row; `"skip"` drops
            such samples from their row (rows may then hold fewer than K rewards; a row left with none is an error).
        keep_completions: also store the decoded reference completions in `completions_column`.
        model_init_kwargs: `from_pretrained` kwargs for the policy and reward-model paths (e.g. `dtype`), as in TRL.
        cache_dir: directory for per-process JSONL shards and `meta.json`; a rerun with the same settings resumes.
        use_vllm: sample with `vllm.LLM(...).generate(SamplingParams(n=K, ...))` (needs `pip install trl-infalign[vllm]`).
        accelerator: an `accelerate.Accelerator` / `PartialState` (default: `PartialState()`); each process builds its
            share of the chunks and every process returns the full, merged dataset.
        return_stats: return `(dataset, ReferenceStats)` — chunks computed / resumed, timing — instead of the dataset.
    """
    from datasets import Dataset, DatasetDict
    from tqdm.auto import tqdm

    start_time = time.perf_counter()
    # ---- validation -----------------------------------------------------------------------------------------------
    if isinstance(dataset, DatasetDict):
        raise TypeError(
            f"dataset is a DatasetDict with splits {list(dataset)}: pass one split, e.g. dataset['train']."
        )
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
    if prompt_column not in dataset.column_names:
        raise ValueError(
            f"prompt_column={prompt_column!r} is not a column of the dataset (columns: {dataset.column_names}); pass "
            "`prompt_column=` naming the column that holds the prompts."
        )
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there are no prompts to build reference rewards for.")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1 (K reference samples per prompt), got {num_samples!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (prompts per chunk), got {batch_size!r}.")
    if generation_batch_size is not None and generation_batch_size < 1:
        raise ValueError(f"generation_batch_size must be >= 1 or None, got {generation_batch_size!r}.")
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}.")
    provenance_column = provenance_column_name(output_column)
    for name in (output_column, provenance_column, completions_column if keep_completions else None):
        if name is not None and name in dataset.column_names and not overwrite:
            raise ValueError(
                f"The dataset already has a column {name!r}: pass `overwrite=True` to rebuild it, or choose another "
                "`output_column` / `completions_column`."
            )
    if output_column == prompt_column or (keep_completions and completions_column in (prompt_column, output_column)):
        raise ValueError("output_column, completions_column and prompt_column must be different columns.")
    if provenance_column in (prompt_column, completions_column if keep_completions else None):
        raise ValueError(f"{provenance_column!r} (the provenance of {output_column!r}) must not be another column.")
    drop = [c for c in (output_column, provenance_column, completions_column) if c in dataset.column_names and overwrite]
    if drop:
        dataset = dataset.remove_columns(drop)

    # ---- processes ------------------------------------------------------------------------------------------------
    state = resolve_process_state(accelerator)
    rank, world_size = state.process_index, state.num_processes

    # ---- cache: probe writability before loading or computing anything -------------------------------------------
    cache = (
        _Cache(Path(cache_dir), rank, world_size, state, num_samples=num_samples, nonfinite=nonfinite,
               keep_completions=keep_completions, num_rows=len(dataset))
        if cache_dir is not None else None
    )
    if cache is not None:
        cache.probe()

    # ---- models ---------------------------------------------------------------------------------------------------
    reward_funcs_in = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    # Reward-model paths load with the same `model_init_kwargs` as the policy, as in RLOOTrainer.
    funcs, classes = load_reward_funcs(reward_funcs_in, reward_processing_classes, model_init_kwargs=model_init_kwargs)
    names = [reward_func_name(f) for f in funcs]
    reward_identities = [reward_func_identity(f) for f in funcs]
    weights = [1.0] * len(funcs) if reward_weights is None else [float(w) for w in reward_weights]
    if len(weights) != len(funcs):
        raise ValueError(
            f"reward_weights has {len(weights)} entries for {len(funcs)} reward functions: give one weight per reward "
            "function."
        )
    funcs = [_sync_callable(f) for f in funcs]
    gen_bs = generation_batch_size or batch_size * num_samples
    # The policy is loaded up front (also for a fully cached rerun): its weights fingerprint is part of the cache key
    # and of the recorded provenance. vLLM loads the model itself; then only its path is recorded.
    policy, tokenizer = _load_policy(model, tokenizer, use_vllm, model_init_kwargs)
    reference_identity = model_identity(model if use_vllm else policy)

    num_rows = len(dataset)
    num_chunks = math.ceil(num_rows / batch_size)
    first_prompt = dataset[0][prompt_column]
    prompt_format = "conversational" if is_conversational_prompt(first_prompt) else "plain"
    provenance = build_provenance(
        reference_model=reference_identity,
        reward_funcs=reward_identities,
        reward_weights=weights,
        prompt_format=prompt_format,
        chat_template=chat_template_sha256(tokenizer),
        chat_template_kwargs=chat_template_kwargs,
        sampling=sampling_settings(
            temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
            generation_kwargs=generation_kwargs,
        ),
        num_samples=num_samples,
        seed=seed,
        batch_size=batch_size,
        nonfinite=nonfinite,
        sampler="vllm" if use_vllm else "transformers",
    )
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "model": reference_identity["name"],
        "model_revision": reference_identity["revision"],
        "model_fingerprint": reference_identity["fingerprint"],
        "num_samples": num_samples,
        "reward_funcs": [_identity_key(identity) for identity in reward_identities],
        "reward_weights": weights,
        "seed": seed,
        "batch_size": batch_size,
        "generation_batch_size": gen_bs,
        "reward_batch_size": reward_batch_size,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "generation_kwargs": _jsonable(generation_kwargs or {}),
        "chat_template_kwargs": _jsonable(chat_template_kwargs or {}),
        "chat_template_sha256": provenance["chat_template_sha256"],
        "use_vllm": bool(use_vllm),
        "model_init_kwargs": _jsonable(model_init_kwargs or {}),
        "nonfinite": nonfinite,
        "keep_completions": bool(keep_completions),
        "prompt_column": prompt_column,
        "dataset_num_rows": num_rows,
        "dataset_fingerprint": _prompts_fingerprint(dataset, prompt_column),
    }

    def chunk_rows(chunk: int) -> range:
        return range(chunk * batch_size, min((chunk + 1) * batch_size, num_rows))

    # ---- cache ----------------------------------------------------------------------------------------------------
    done: dict[int, dict] = {}
    if cache is not None:
        cache.check_or_write_meta(meta)
        cache.refresh(done)
        cache.warn_bad_records(done)
        state.wait_for_everyone()  # every process has read the cache before anyone appends
    todo = [i for i in range(num_chunks) if i % world_size == rank and not all(r in done for r in chunk_rows(i))]
    resumed = sum(all(r in done for r in chunk_rows(i)) for i in range(num_chunks))
    stats = ReferenceStats(num_rows=num_rows, num_samples=num_samples, num_chunks=num_chunks, chunks_resumed=resumed, world_size=world_size)
    if cache is not None:
        stats.records_recomputed = len(cache.bad_rows(done))

    # ---- compute own chunks ---------------------------------------------------------------------------------------
    local: dict[int, dict] = {}
    error: str | None = None
    sampler = None
    other_columns = [c for c in dataset.column_names if c not in (prompt_column, "prompt", "completion", "completion_ids")]

    def compute_chunk(chunk: int) -> dict[int, dict]:
        nonlocal sampler
        if sampler is None:  # started lazily: a fully cached run never moves the model or starts vLLM
            sampler = _make_sampler(
                policy if not use_vllm else model, tokenizer, use_vllm, state, vllm_kwargs=vllm_kwargs,
                num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                top_k=top_k, generation_kwargs=generation_kwargs, chat_template_kwargs=chat_template_kwargs,
                generation_batch_size=gen_bs, seed=seed,
            )
            for f in funcs:
                if _is_module(f):
                    f.to(state.device)
        lo, hi = chunk * batch_size, min((chunk + 1) * batch_size, num_rows)
        rows = dataset.select(range(lo, hi))
        prompts = list(rows[prompt_column])
        texts, ids = sampler(prompts, chunk, list(range(lo, hi)))
        flat_prompts = [p for p in prompts for _ in range(num_samples)]
        flat_texts = [t for per in texts for t in per]
        flat_ids = [c for per in ids for c in per]
        columns = {c: [v for v in rows[c] for _ in range(num_samples)] for c in other_columns}
        columns.update(trainer_state=None, log_extra=_noop, log_metric=_noop)
        raw = score_completions(
            funcs, classes, flat_prompts, flat_texts, completion_ids=flat_ids, columns=columns,
            chat_template_kwargs=chat_template_kwargs, batch_size=reward_batch_size,
        )
        combined = combine_rewards(raw, weights).view(len(prompts), num_samples).tolist()
        results = {}
        for offset, values in enumerate(combined):
            row = lo + offset
            finite = [v for v in values if math.isfinite(v)]
            if len(finite) < len(values):
                if nonfinite == "raise":
                    k = next(k for k, v in enumerate(values) if not math.isfinite(v))
                    raise ValueError(
                        f"Dataset row {row}: reference sample {k} got a non-finite combined reward ({values[k]}) "
                        f"from {names} (prompt {_short(prompts[offset])}, completion {_short(texts[offset][k])}). "
                        "Fix the reward function(s), or pass nonfinite='skip' (CLI: --nonfinite skip) to drop "
                        "such samples from their row."
                    )
                if not finite:
                    raise ValueError(
                        f"Dataset row {row}: all {num_samples} reference samples got non-finite rewards, so the "
                        "row has nothing to calibrate against. Fix the reward function(s) for this prompt or "
                        "remove the row."
                    )
            record = {"index": row, "ref_rewards": finite}
            if len(finite) < len(values):
                record["num_dropped"] = len(values) - len(finite)
            if keep_completions:
                record["ref_completions"] = [t for t, v in zip(texts[offset], values) if math.isfinite(v)]
            results[row] = record
        return results

    if todo:
        bar = tqdm(total=len(todo), desc="Reference rewards", unit="chunk", disable=not (progress and state.is_main_process))
        try:
            if cache is None:
                for chunk in todo:
                    local.update(compute_chunk(chunk))
                    stats.chunks_computed += 1
                    bar.update(1)
            else:
                # Shard protocol: a chunk is computed only under its lock (`locks/chunk-XXXXXXXX.lock`, flock), after
                # re-reading what other builders appended. A chunk locked by a concurrent builder on the same cache is
                # deferred, then waited for (blocking lock) and read back; it is recomputed only if that builder died.
                deferred = []
                for blocking, chunks in ((False, todo), (True, deferred)):
                    for chunk in chunks:
                        with cache.chunk_lock(chunk, blocking=blocking) as locked:
                            if not locked:
                                deferred.append(chunk)
                                continue
                            cache.refresh(done)
                            if all(r in done for r in chunk_rows(chunk)):
                                stats.chunks_by_others += 1
                                bar.update(1)
                                continue
                            results = compute_chunk(chunk)
                            cache.append(results.values())
                        local.update(results)
                        stats.chunks_computed += 1
                        bar.update(1)
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below, so no rank waits forever
            if world_size == 1:
                raise
            error = f"rank {rank}: {type(exc).__name__}: {exc}"
            logger.error("Reference building failed on %s", error)
        finally:
            bar.close()

    # ---- merge ----------------------------------------------------------------------------------------------------
    if world_size > 1:
        from accelerate.utils import gather_object

        errors = [e for e in gather_object([error]) if e]
        if errors:
            raise RuntimeError("Building reference rewards failed: " + " | ".join(errors))
        if cache is not None:
            state.wait_for_everyone()
            cache.refresh(done)
        else:
            for record in gather_object(list(local.values())):
                done[record["index"]] = record
    done.update(local)
    if cache is not None:
        missing_chunks = sorted({r // batch_size for r in range(num_rows) if r not in done})
        for chunk in missing_chunks:  # rows a concurrent builder is still writing (another rank's share)
            with cache.chunk_lock(chunk, blocking=True):
                cache.refresh(done)
    missing = [r for r in range(num_rows) if r not in done]
    if missing:
        raise RuntimeError(
            f"Reference rewards are missing for {len(missing)} row(s) (first: {missing[:5]}) after the build: a shard "
            "file may have been deleted or written by another run. Rerun with the same cache_dir to fill them in."
        )
    records = [done[r] for r in range(num_rows)]
    stats.num_dropped = sum(rec.get("num_dropped", 0) for rec in records)
    stats.rows_with_dropped = sum(1 for rec in records if rec.get("num_dropped", 0))
    if stats.num_dropped:
        logger.warning(
            "Dropped %d non-finite reference rewards in %d row(s) (nonfinite='skip'); those rows hold fewer than K=%d rewards.",
            stats.num_dropped, stats.rows_with_dropped, num_samples,
        )
    out = dataset.add_column(output_column, [rec["ref_rewards"] for rec in records])
    out = out.add_column(provenance_column, provenance_rows(provenance, _iter_column(dataset, prompt_column)))
    if keep_completions:
        out = out.add_column(completions_column, [rec["ref_completions"] for rec in records])
    stats.extra["provenance"] = provenance
    stats.seconds = time.perf_counter() - start_time
    return (out, stats) if return_stats else out


def _build_reference_rewards(*args, **kwargs):
    """`build_reference_rewards(..., return_stats=True)`: the dataset and what the build did (CLI, tests, benchmark)."""
    return build_reference_rewards(*args, return_stats=True, **kwargs)


def _noop(*args, **kwargs):
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Sampling back-ends


def _load_policy(model, tokenizer, use_vllm: bool, model_init_kwargs: dict | None):
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


def _identity_key(identity: dict) -> str:
    """One string per reward function for the cache key: kind, normalised name and weights fingerprint; a callable by
    its qualname only (a script's function is `__main__:f` when run, `script:f` when imported: same function)."""
    if identity["kind"] == "model":
        return f"model:{identity['name']}#{identity.get('fingerprint')}"
    return f"callable:{identity['name'].rpartition(':')[2]}"


def _make_sampler(model, tokenizer, use_vllm, state, *, vllm_kwargs, num_samples, max_new_tokens, temperature, top_p,
                  top_k, generation_kwargs, chat_template_kwargs, generation_batch_size, seed):
    """A function `(prompts, chunk_index, row_indices) -> (texts[p][k], ids[p][k])` for one chunk (`model`: a loaded
    causal LM, or a path with `use_vllm`)."""
    if use_vllm:
        return _make_vllm_sampler(
            model, tokenizer, state, vllm_kwargs=vllm_kwargs, num_samples=num_samples, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, generation_kwargs=generation_kwargs,
            chat_template_kwargs=chat_template_kwargs, seed=seed,
        )
    import torch

    model = model.to(state.device)

    def sample(prompts, chunk_index, rows):
        torch.manual_seed(seed + chunk_index)
        out = generate_completions(
            model, tokenizer, prompts, num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, batch_size=generation_batch_size, generation_kwargs=generation_kwargs,
            chat_template_kwargs=chat_template_kwargs, progress=False,
        )
        return out.texts, out.ids

    return sample


def _make_vllm_sampler(model, tokenizer, state, *, vllm_kwargs, num_samples, max_new_tokens, temperature, top_p, top_k,
                       generation_kwargs, chat_template_kwargs, seed):
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "use_vllm=True needs vLLM, which is not installed: `pip install trl-infalign[vllm]` (or set use_vllm=False "
            "to sample with transformers' generate)."
        ) from exc
    import numpy as np

    path = str(model)
    kwargs = dict(model=path, seed=seed)
    if state.num_processes > 1:  # one engine per process, as TRL's colocate mode does
        kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
    kwargs.update(vllm_kwargs or {})
    llm = vllm.LLM(**kwargs)
    base = dict(n=num_samples, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens)
    base.update(generation_kwargs or {})

    def sample(prompts, chunk_index, rows):
        prompt_ids = tokenize_prompts(tokenizer, prompts, chat_template_kwargs)
        # One seed per dataset row: independent of chunking, and identical prompts still get independent samples.
        params = [vllm.SamplingParams(**base, seed=int(np.random.SeedSequence([seed, r]).generate_state(1)[0])) for r in rows]
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        ids = [[list(o.token_ids) for o in out.outputs] for out in outputs]
        conversational = bool(prompts) and is_conversational_prompt(prompts[0])
        texts = []
        for per in ids:
            decoded = tokenizer.batch_decode(per, skip_special_tokens=True)
            texts.append([[{"role": "assistant", "content": d}] for d in decoded] if conversational else decoded)
        return texts, ids

    return sample


def _is_module(func) -> bool:
    from torch import nn

    return isinstance(func, nn.Module)


def _sync_callable(func):
    """Async reward callables (supported by TRL) run to completion here."""
    if _is_module(func) or not inspect.iscoroutinefunction(func):
        return func

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return asyncio.run(func(*args, **kwargs))

    return wrapper


def _jsonable(value):
    return json.loads(json.dumps(value, default=repr, sort_keys=True))


def _prompts_fingerprint(dataset, prompt_column: str) -> str:
    """sha256 of the prompts (not `dataset._fingerprint`, which is random for in-memory datasets)."""
    digest = hashlib.sha256()
    for prompt in _iter_column(dataset, prompt_column):
        digest.update(json.dumps(prompt, sort_keys=True, default=repr).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------------------------
# Cache


class _Cache:
    """A resumable, lock-protected cache of finished rows: `meta.json`, JSONL shards, and per-chunk lock files.

    Layout of `cache_dir`:

    - `meta.json`: the settings that determine the result (checked on every run);
    - `rank-XXXXX.jsonl`: finished rows, one JSON record per line, appended per chunk by the process(es) of that rank
      (under an exclusive `flock` of the shard, with `flush` + `fsync`); each record carries a checksum;
    - `locks/chunk-XXXXXXXX.lock`: empty files; a builder holds a chunk's `flock` while it computes that chunk.

    Several builders may share one cache (the ranks of one launch, or independent runs): the lock makes sure that no
    chunk is computed twice at the same time, and the re-read under the lock that no finished chunk is recomputed.
    Locks die with their process, so a killed builder never blocks the others. `flock` is advisory and needs a file
    system that supports it (local disks; NFSv4 emulates it with byte-range locks).
    """

    def __init__(self, path: Path, rank: int, world_size: int, state, *, num_samples: int, nonfinite: str,
                 keep_completions: bool, num_rows: int):
        self.path, self.rank, self.world_size, self.state = path, rank, world_size, state
        self.shard = path / f"rank-{rank:05d}.jsonl"
        self.num_samples, self.nonfinite, self.keep_completions, self.num_rows = num_samples, nonfinite, keep_completions, num_rows
        self._offsets: dict[Path, int] = {}
        self._bad: dict[int, str] = {}  # row -> why its cached record was rejected (until a valid one is read)

    # ---- writability ----------------------------------------------------------------------------------------------
    def probe(self) -> None:
        """Fail now, naming `cache_dir`, if the directory cannot be created or written (probe file + fsync)."""
        probe_writable(self.path, "cache_dir", "choose a writable cache_dir (CLI: --cache-dir), or fix the permissions")
        if self.path.is_dir() and (self.path / META_FILE).exists() and not os.access(self.path / META_FILE, os.R_OK):
            raise OSError(f"cache_dir={str(self.path)!r}: {META_FILE} is not readable. Fix its permissions or use a new cache_dir.")

    # ---- metadata -------------------------------------------------------------------------------------------------
    def check_or_write_meta(self, meta: dict) -> None:
        meta_path = self.path / META_FILE
        if self.state.is_main_process:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / LOCK_DIR).mkdir(exist_ok=True)
            if not meta_path.exists():
                tmp = meta_path.with_name(f"{META_FILE}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
                os.replace(tmp, meta_path)  # atomic: a concurrent builder sees either no file or the whole file
        self.state.wait_for_everyone()
        try:
            stored = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"Cannot read {meta_path} ({exc}): the cache directory is damaged. Delete {self.path} or use a new "
                "cache_dir."
            ) from None
        if stored.get("format_version") != meta["format_version"]:
            raise ValueError(
                f"The cache in {self.path} has format_version {stored.get('format_version')!r}, this trl-infalign writes "
                f"{meta['format_version']} (records with checksums, normalised model paths, locks). Use a new "
                f"cache_dir, or delete {self.path} to rebuild from scratch."
            )
        missing = "<missing>"
        diffs = [
            f"{key!r} is {_short(stored.get(key, missing), 120)} in {META_FILE} but {_short(meta.get(key, missing), 120)} now"
            for key in sorted(set(meta) | set(stored))
            if stored.get(key, missing) != meta.get(key, missing)
        ]
        if diffs:
            raise ValueError(
                f"The cache in {self.path} was built with different settings: " + "; ".join(diffs) + ". Use a new "
                f"cache_dir, or delete {self.path} to rebuild from scratch."
            )
        (self.path / LOCK_DIR).mkdir(parents=True, exist_ok=True)

    # ---- locking --------------------------------------------------------------------------------------------------
    @contextmanager
    def chunk_lock(self, chunk: int, blocking: bool):
        """Hold chunk `chunk`'s exclusive flock; yields False (without waiting) if another builder holds it and
        `blocking` is False. Waiting is logged every 60 s."""
        path = self.path / LOCK_DIR / f"chunk-{chunk:08d}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if not blocking:
                    yield False
                    return
                logger.info("Chunk %d is being computed by another builder on %s: waiting for it.", chunk, self.path)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield True
        finally:
            os.close(fd)  # releases the lock

    # ---- records --------------------------------------------------------------------------------------------------
    def record_problem(self, record) -> str | None:
        """Why `record` cannot be trusted (None if it can): wrong index, number of rewards, non-finite values, a
        completions list of another length, or a checksum that does not match the content."""
        if not isinstance(record, dict):
            return f"not a JSON object ({type(record).__name__})"
        index, values = record.get("index"), record.get("ref_rewards")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_rows:
            return f"index {index!r} is not a row of this dataset"
        if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            return "ref_rewards is not a list of finite numbers"
        dropped = record.get("num_dropped", 0)
        if self.nonfinite == "skip":
            if not (1 <= len(values) <= self.num_samples and len(values) + dropped == self.num_samples):
                return f"{len(values)} reward(s) + {dropped} dropped, expected {self.num_samples} in all"
        elif len(values) != self.num_samples or dropped:
            return f"{len(values)} reward(s), expected K={self.num_samples}"
        if self.keep_completions and len(record.get("ref_completions") or []) != len(values):
            return "ref_completions does not match ref_rewards"
        if record.get("sha256") != _record_checksum(record):
            return "checksum mismatch (the record was modified or damaged)"
        return None

    def refresh(self, done: dict[int, dict]) -> None:
        """Add to `done` every valid record appended to any shard since the last call (reads only the new bytes;
        an unfinished last line is left for later)."""
        for shard in sorted(self.path.glob("rank-*.jsonl")):
            offset = self._offsets.get(shard, 0)
            try:
                size = shard.stat().st_size
                if size < offset:  # the shard was replaced: read it again
                    offset = 0
                with open(shard, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1
            for number, line in enumerate(data[:end].split(b"\n")):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    logger.warning("Ignoring an unreadable line in %s (byte %d)", shard, offset)
                    continue
                problem = self.record_problem(record)
                index = record.get("index") if isinstance(record, dict) else None
                if problem is None:
                    done[index] = record
                    self._bad.pop(index, None)
                elif isinstance(index, int) and index not in done:
                    self._bad[index] = problem
            self._offsets[shard] = offset + end

    def bad_rows(self, done: dict[int, dict]) -> dict[int, str]:
        """Rows whose only cached records failed the integrity check (they will be recomputed)."""
        return {row: why for row, why in self._bad.items() if row not in done}

    def warn_bad_records(self, done: dict[int, dict]) -> None:
        bad = self.bad_rows(done)
        if bad and self.state.is_main_process:
            shown = "; ".join(f"row {row}: {why}" for row, why in sorted(bad.items())[:5])
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            message = (
                f"{len(bad)} cached reference record(s) in {self.path} failed the integrity check ({shown}{more}); "
                "their chunks are recomputed."
            )
            logger.warning(message)
            warnings.warn(message, UserWarning, stacklevel=4)

    def append(self, records) -> None:
        """Append `records` (with their checksums) to this rank's shard under an exclusive lock of the shard; a
        half-written last line (a builder killed mid-write) is cut off first, so every record starts a line."""
        payload = "".join(json.dumps({**r, "sha256": _record_checksum(r)}) + "\n" for r in records).encode()
        with open(self.shard, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(max(size - 1, 0))
                if f.read(1) != b"\n":
                    keep = _last_newline(f, size) + 1
                    f.truncate(keep)
                    if self._offsets.get(self.shard, 0) > keep:
                        self._offsets[self.shard] = keep
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())


def _last_newline(f, size: int, block: int = 1 << 16) -> int:
    """Offset of the last b"\\n" in the first `size` bytes of binary file `f` (-1 if none), reading backwards."""
    end = size
    while end > 0:
        start = max(0, end - block)
        f.seek(start)
        position = f.read(end - start).rfind(b"\n")
        if position >= 0:
            return start + position
        end = start
    return -1


def _record_checksum(record: dict) -> str:
    """sha256 (16 hex digits) of a cache record's content (everything but its checksum), in canonical JSON."""
    content = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def probe_writable(directory: Path, argument: str, fix: str) -> None:
    """Create `directory` (and parents) and a probe file in it, fsync and remove it; on failure raise an `OSError`
    naming `argument` and `fix`, before any work has been done."""
    directory = Path(directory)
    probe = directory / f".trl-infalign-write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise OSError(
            f"{argument}={str(directory)!r} is not writable ({type(error).__name__}: {error}): {fix}. Nothing has been "
            "computed yet."
        ) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


__all__ = ["build_reference_rewards", "validate_reference_rewards", "resolve_process_state", "ReferenceStats"]
