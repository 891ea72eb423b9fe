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
`rank-XXXXX.jsonl` (`{"index": row, "ref_rewards": [...]}` per row, flushed and fsync'ed per chunk) next to a
`meta.json` describing the run; a restarted run skips every chunk whose rows are all on disk, so a resumed build is
bit-identical to an uninterrupted one (floats go through JSON with exact round-trip).

Sharding: process `rank` of `world_size` runs the chunks with `chunk_index % world_size == rank`; results are merged on
every rank, in dataset order, from the shard files (with `cache_dir`) or with `gather_object` (without).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .sampling import (
    combine_rewards,
    generate_completions,
    is_conversational_prompt,
    load_reward_funcs,
    model_name,
    resolve_process_state,
    resolve_tokenizer,
    reward_func_name,
    score_completions,
    tokenize_prompts,
)

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
META_FILE = "meta.json"
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
    for name in (output_column, completions_column if keep_completions else None):
        if name is not None and name in dataset.column_names and not overwrite:
            raise ValueError(
                f"The dataset already has a column {name!r}: pass `overwrite=True` to rebuild it, or choose another "
                "`output_column` / `completions_column`."
            )
    if output_column == prompt_column or (keep_completions and completions_column in (prompt_column, output_column)):
        raise ValueError("output_column, completions_column and prompt_column must be different columns.")
    drop = [c for c in (output_column, completions_column) if c in dataset.column_names and overwrite]
    if drop:
        dataset = dataset.remove_columns(drop)

    # ---- processes ------------------------------------------------------------------------------------------------
    state = resolve_process_state(accelerator)
    rank, world_size = state.process_index, state.num_processes

    # ---- models ---------------------------------------------------------------------------------------------------
    policy_name = model_name(model)
    reward_funcs_in = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    # Reward-model paths load with the same `model_init_kwargs` as the policy, as in RLOOTrainer.
    funcs, classes = load_reward_funcs(reward_funcs_in, reward_processing_classes, model_init_kwargs=model_init_kwargs)
    names = [reward_func_name(f) for f in funcs]
    weights = [1.0] * len(funcs) if reward_weights is None else [float(w) for w in reward_weights]
    if len(weights) != len(funcs):
        raise ValueError(
            f"reward_weights has {len(weights)} entries for {len(funcs)} reward functions: give one weight per reward "
            "function."
        )
    funcs = [_sync_callable(f) for f in funcs]
    gen_bs = generation_batch_size or batch_size * num_samples

    num_rows = len(dataset)
    num_chunks = math.ceil(num_rows / batch_size)
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "model": policy_name,
        "num_samples": num_samples,
        "reward_funcs": names,
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
        "use_vllm": bool(use_vllm),
        "model_init_kwargs": _jsonable(model_init_kwargs or {}),
        "nonfinite": nonfinite,
        "keep_completions": bool(keep_completions),
        "prompt_column": prompt_column,
        "dataset_num_rows": num_rows,
        "dataset_fingerprint": _prompts_fingerprint(dataset, prompt_column),
    }

    # ---- cache ----------------------------------------------------------------------------------------------------
    cache = _Cache(Path(cache_dir), rank, world_size, state) if cache_dir is not None else None
    done: dict[int, dict] = {}
    if cache is not None:
        cache.check_or_write_meta(meta)
        done = cache.read_all()
        state.wait_for_everyone()  # nobody appends before every process has read the cache
    todo = [
        i
        for i in range(num_chunks)
        if i % world_size == rank and not all(r in done for r in range(i * batch_size, min((i + 1) * batch_size, num_rows)))
    ]
    resumed = sum(
        all(r in done for r in range(i * batch_size, min((i + 1) * batch_size, num_rows))) for i in range(num_chunks)
    )
    stats = ReferenceStats(num_rows=num_rows, num_samples=num_samples, num_chunks=num_chunks, chunks_resumed=resumed, world_size=world_size)

    # ---- compute own chunks ---------------------------------------------------------------------------------------
    local: dict[int, dict] = {}
    error: str | None = None
    if todo:
        try:
            sampler = _make_sampler(
                model, tokenizer, use_vllm, state, model_init_kwargs=model_init_kwargs, vllm_kwargs=vllm_kwargs,
                num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                top_k=top_k, generation_kwargs=generation_kwargs, chat_template_kwargs=chat_template_kwargs,
                generation_batch_size=gen_bs, seed=seed,
            )
            for f in funcs:
                if _is_module(f):
                    f.to(state.device)
            other_columns = [
                c for c in dataset.column_names if c not in (prompt_column, "prompt", "completion", "completion_ids")
            ]
            bar = tqdm(todo, desc="Reference rewards", unit="chunk", disable=not (progress and state.is_main_process))
            for chunk in bar:
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
                if cache is not None:
                    cache.append(results.values())
                local.update(results)
                stats.chunks_computed += 1
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below, so no rank waits forever
            if world_size == 1:
                raise
            error = f"rank {rank}: {type(exc).__name__}: {exc}"
            logger.error("Reference building failed on %s", error)

    # ---- merge ----------------------------------------------------------------------------------------------------
    if world_size > 1:
        from accelerate.utils import gather_object

        errors = [e for e in gather_object([error]) if e]
        if errors:
            raise RuntimeError("Building reference rewards failed: " + " | ".join(errors))
        if cache is not None:
            state.wait_for_everyone()
            done = cache.read_all()
        else:
            for record in gather_object(list(local.values())):
                done[record["index"]] = record
    else:
        done.update(local)
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
    if keep_completions:
        out = out.add_column(completions_column, [rec["ref_completions"] for rec in records])
    stats.seconds = time.perf_counter() - start_time
    return (out, stats) if return_stats else out


def _build_reference_rewards(*args, **kwargs):
    """`build_reference_rewards(..., return_stats=True)`: the dataset and what the build did (CLI, tests, benchmark)."""
    return build_reference_rewards(*args, return_stats=True, **kwargs)


def _noop(*args, **kwargs):
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Sampling back-ends


def _make_sampler(model, tokenizer, use_vllm, state, *, model_init_kwargs, vllm_kwargs, num_samples, max_new_tokens,
                  temperature, top_p, top_k, generation_kwargs, chat_template_kwargs, generation_batch_size, seed):
    """A function `(prompts, chunk_index, row_indices) -> (texts[p][k], ids[p][k])` for one chunk."""
    if use_vllm:
        return _make_vllm_sampler(
            model, tokenizer, state, vllm_kwargs=vllm_kwargs, num_samples=num_samples, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, generation_kwargs=generation_kwargs,
            chat_template_kwargs=chat_template_kwargs, seed=seed,
        )
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(model, (str, os.PathLike)):
        path = str(model)
        model = AutoModelForCausalLM.from_pretrained(path, **(model_init_kwargs or {}))
    model = model.to(state.device)
    tokenizer = resolve_tokenizer(model, tokenizer)

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

    path = model if isinstance(model, (str, os.PathLike)) else getattr(getattr(model, "config", None), "_name_or_path", "")
    if not path:
        raise ValueError("use_vllm=True needs the reference model as a path (vLLM loads it itself).")
    tokenizer = resolve_tokenizer(path, tokenizer)
    kwargs = dict(model=str(path), seed=seed)
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
    """`meta.json` + one append-only JSONL file per process (`rank-XXXXX.jsonl`)."""

    def __init__(self, path: Path, rank: int, world_size: int, state):
        self.path, self.rank, self.world_size, self.state = path, rank, world_size, state
        self.shard = path / f"rank-{rank:05d}.jsonl"

    def check_or_write_meta(self, meta: dict) -> None:
        meta_path = self.path / META_FILE
        if self.state.is_main_process:
            self.path.mkdir(parents=True, exist_ok=True)
            if not meta_path.exists():
                tmp = meta_path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
                os.replace(tmp, meta_path)
        self.state.wait_for_everyone()
        try:
            stored = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"Cannot read {meta_path} ({exc}): the cache directory is damaged. Delete {self.path} or use a new "
                "cache_dir."
            ) from None
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
        self.path.mkdir(parents=True, exist_ok=True)
        self._repair_tail()

    def _repair_tail(self) -> None:
        """Cut a half-written last line (a process killed mid-write) so that appends start on a fresh line."""
        if not self.shard.exists():
            return
        data = self.shard.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.shard, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def read_all(self) -> dict[int, dict]:
        done: dict[int, dict] = {}
        for shard in sorted(self.path.glob("rank-*.jsonl")):
            with open(shard, "rb") as f:
                lines = f.read().split(b"\n")
            for number, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    done[int(record["index"])] = record
                except (ValueError, KeyError, TypeError):
                    if number < len(lines) - 1:  # only a trailing partial line is expected
                        logger.warning("Ignoring unreadable line %d of %s", number + 1, shard)
        return done

    def append(self, records) -> None:
        payload = "".join(json.dumps(r) + "\n" for r in records).encode()
        with open(self.shard, "ab") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())


__all__ = ["build_reference_rewards", "validate_reference_rewards", "resolve_process_state", "ReferenceStats"]
