"""The reference pass of CTRL: K reference-policy samples per prompt, scored once, stored as a `ref_rewards` column.

Calibration (InfAlign §1) needs, for every training prompt x, the rewards R_x = {r(x, y_k)} of K samples y_k ~ π_ref.
:func:`build_reference_rewards` draws them with the same prompt formatting, sampling settings, decoding and reward
combination as TRL's `RLOOTrainer` (through :mod:`trl_infalign.sampling`), so that the calibrated reward of a policy
completion compares like with like. :func:`validate_reference_rewards` is what `CTRLTrainer` runs on its datasets.

Determinism and resumption
--------------------------
Prompts are processed in fixed chunks of `batch_size` rows: chunk i is rows [i*C, (i+1)*C). Sample j of row r is
drawn with its own key (seed, r, j) (see :mod:`trl_infalign.reference_sampling`), so a row's samples depend neither on
the chunks run before it, nor on the process that runs it, nor on K: the first K₁ samples of a K₂ build are the K₁
build's, and raising `num_samples` on a cached build (top-up) draws only the new samples K₁..K₂−1 (the cache keeps
the rows it holds; `meta.json` records the K it grew from). With `cache_dir`, each process appends its finished chunks to its own
`rank-XXXXX.jsonl` (`{"index": row, "ref_rewards": [...], "sha256": ...}` per row, flushed and fsync'ed per chunk)
next to a `meta.json` describing the run; a restarted run skips every chunk whose rows are all on disk and pass the
integrity check, so a resumed build is bit-identical to an uninterrupted one on the transformers path (floats go
through JSON with exact round-trip); under vLLM, which is not batch-invariant, it draws from the same distribution
with the same per-sample seeds, not bit for bit. The cache directory is probed for writability before any model is loaded, and a chunk is only computed
under its `flock` (`locks/chunk-XXXXXXXX.lock`), so concurrent builders on one cache split the work (see `_Cache`).

Layout: :class:`~trl_infalign.ReferenceConfig` (reference_config.py) says how references are made; the pass is
split into sampling (reference_sampling.py: the policy, transformers `generate` or vLLM), scoring (reference_scoring.py:
the reward functions, a chunk's records, non-finite rewards, per-reward rows), the cache (reference_cache.py) and the
orchestration here, which ties them together and runs the chunks.

Per-reward references (`per_reward=True` with several reward functions): each row holds `{name: [K floats]}`, every
reward function's unweighted values for the same K completions, keyed by TRL's reward names (an Arrow struct of lists;
a JSON object in JSONL). With `nonfinite="skip"` a sample dropped for one reward is dropped for all.

Provenance: the output also gets `<output_column>_provenance` (see :mod:`trl_infalign.provenance`), which
`CTRLTrainer` compares with its own settings.

Sharding: process `rank` of `world_size` runs the chunks with `chunk_index % world_size == rank`; results are merged on
every rank, in dataset order, from the shard files (with `cache_dir`) or with `gather_object` (without).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .calibration import CalibrationError, reference_reward_names, select_reference_rewards
from .provenance import build_provenance, chat_template_sha256, model_identity, provenance_column_name, provenance_rows
from .reference_cache import (  # noqa: F401 - re-exported: imported from here by the CLI, the trainer and tests
    CACHE_FORMAT_VERSION,
    LOCK_DIR,
    META_FILE,
    ReferenceCache,
    _Cache,
    _record_checksum,
    _short,
    cache_meta,
    merge_segments,
    prompts_fingerprint,
    probe_writable,
)
from .reference_config import ReferenceConfig
from .reference_sampling import (
    check_vllm_settings,
    effective_sampling,
    generation_config_overridden,
    load_policy,
    make_sampler,
    vllm_model_identity,
)
from .reference_scoring import RewardScorer, _noop  # noqa: F401
from .sampling import is_conversational_prompt, resolve_process_state

logger = logging.getLogger(__name__)

_BUILD_HINT = (
    "Build it with `trl_infalign.build_reference_rewards(dataset, model, reward_funcs, num_samples=16)` or "
    "`trl-infalign build-reference --model MODEL --reward-model RM --dataset DATA --output DIR`."
)
#: keyword arguments of `build_reference_rewards` that are objects of the run, not settings (with their defaults).
RUNTIME_ARGUMENTS = {
    "tokenizer": None, "reward_processing_classes": None, "accelerator": None, "progress": True, "return_stats": False,
}


# ---------------------------------------------------------------------------------------------------------------------
# Validation used by the trainer


def validate_reference_rewards(dataset, column: str = "ref_rewards", min_samples: int = 1, max_report: int = 5,
                               reward_names=None) -> None:
    """Check that every row of `dataset[column]` is a list of at least `min_samples` finite numbers, or, for
    per-reward references, `{name: list}` with every reward of the first such row (or of `reward_names`) present, each
    list valid and all lists of a row of the same length (they score the same K completions).

    Raises `ValueError` naming the first bad rows (up to `max_report`), the reward where a per-reward entry is missing
    or bad, and the total number of bad rows. For an `IterableDataset` only the first 1000 rows are checked (checking
    more would consume the stream).
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
    expected = list(reward_names) if reward_names is not None else None
    bad: list[str] = []
    num_bad = 0
    per_reward = False
    for index, value in enumerate(rows):
        if isinstance(value, dict):
            per_reward = True
            if expected is None:
                expected = reference_reward_names(value)
            problem = _per_reward_row_problem(value, expected, min_samples, column, index)
        elif per_reward:  # a plain row after per-reward rows
            problem = f"expected per-reward rewards {{name: list}} for {expected}, got {type(value).__name__} {_short(value)}"
        else:
            problem = _row_problem(value, min_samples)
        if problem is not None:
            num_bad += 1
            if len(bad) < max_report:
                bad.append(f"row {index}: {problem}")
    if num_bad:
        more = f" (and {num_bad - len(bad)} more)" if num_bad > len(bad) else ""
        shape = (
            f"Each row must map every reward ({expected}) to a list of at least {min_samples} finite reference rewards, "
            "all of one length (the rewards of the same reference samples)"
            if per_reward else
            f"Each row must be a list of at least {min_samples} finite reference rewards (one per reference sample)"
        )
        raise ValueError(
            f"Column {column!r} has {num_bad} invalid row(s): " + "; ".join(bad) + more + f". {shape}. Rebuild the "
            "column (e.g. with a larger `num_samples`, or `nonfinite='skip'` plus a fixed reward model), or lower "
            "`min_reference_samples`. " + _BUILD_HINT
        )


def _per_reward_row_problem(value: dict, names: list[str], min_samples: int, column: str, index: int) -> str | None:
    """What is wrong with one per-reward row `{name: list}` (None if nothing): a missing reward, a bad entry, an
    unexpected reward, or entries of different lengths."""
    lengths = {}
    for name in names:
        try:
            (entry,) = select_reference_rewards([value], key=name, column=column, first_row=index)
        except CalibrationError:
            held = sorted(k for k, v in value.items() if v is not None)
            return f"no rewards for reward {name!r} (the row holds {held})"
        problem = _row_problem(entry, min_samples)
        if problem is not None:
            return f"reward {name!r}: {problem}"
        lengths[name] = len(entry)
    extra = sorted(set(value) - set(names))
    if extra:
        return f"reward(s) {extra} not in the other rows ({names})"
    if len(set(lengths.values())) > 1:
        return (f"the rewards hold different numbers of values ({lengths}): they score the same reference samples, so "
                "each needs one value per sample")
    return None


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
    completions_generated: int = 0  # on this process
    samples_reused: int = 0  # cached samples of the chunks this process topped up (raised K)
    num_dropped: int = 0  # non-finite samples dropped (nonfinite="skip")
    rows_with_dropped: int = 0
    seconds: float = 0.0
    world_size: int = 1
    extra: dict = field(default_factory=dict)


def resolve_reference_config(args: ReferenceConfig | None, overrides: dict) -> tuple[ReferenceConfig, dict]:
    """(config, runtime arguments) of a `build_reference_rewards` call: `args` (default `ReferenceConfig()`) with the
    keyword `overrides` that name its fields applied; the others must be :data:`RUNTIME_ARGUMENTS`. An override that
    changes a field of an explicit `args` is announced with a warning naming it."""
    config_fields = set(ReferenceConfig.field_names())
    unknown = sorted(set(overrides) - config_fields - set(RUNTIME_ARGUMENTS))
    if unknown:
        raise TypeError(
            f"build_reference_rewards() got unexpected keyword argument(s) {unknown}. Valid: the ReferenceConfig fields "
            f"{sorted(config_fields)} and {sorted(RUNTIME_ARGUMENTS)}."
        )
    settings = {k: v for k, v in overrides.items() if k in config_fields}
    runtime = {**RUNTIME_ARGUMENTS, **{k: v for k, v in overrides.items() if k in RUNTIME_ARGUMENTS}}
    if args is None:
        return ReferenceConfig(**settings), runtime
    if not isinstance(args, ReferenceConfig):
        raise TypeError(f"args must be a trl_infalign.ReferenceConfig (or None), got {type(args).__name__}.")
    if not settings:
        return args, runtime
    config = dataclasses.replace(args, **settings)
    changed = [k for k in settings if getattr(config, k) != getattr(args, k)]  # compared after normalisation
    if changed:
        warnings.warn(
            "build_reference_rewards: keyword argument(s) override the ReferenceConfig passed as args: "
            + ", ".join(f"{k}={getattr(config, k)!r} (args.{k}={getattr(args, k)!r})" for k in changed),
            UserWarning, stacklevel=3,
        )
    return config, runtime


def build_reference_rewards(dataset, model, reward_funcs, args: ReferenceConfig | None = None, **overrides):
    """Sample K reference completions per prompt, score them, and return `dataset` with a new column.

    `dataset[output_column][i]` is the list of K *combined* rewards of prompt i's reference samples: the weighted sum
    over `reward_funcs` (NaN-skipping, `reward_weights`) exactly as `RLOOTrainer` / `CTRLTrainer` combine a policy
    completion's rewards before calibrating it. With `per_reward=True` and several reward functions it is
    `{name: [K floats]}` instead: each function's own values for the same K completions, under TRL's names. Cost:
    K × len(dataset) generations and reward evaluations.

    Args:
        dataset: a `datasets.Dataset` with a `prompt_column` (plain strings or conversational message lists).
        model: the reference policy (usually the SFT model the trainer starts from): a path / hub id, or a loaded
            causal LM (its tokenizer is then loaded from `model.config._name_or_path` unless `tokenizer` is given).
        reward_funcs: as in TRL: a sequence-classification model path, a loaded `nn.Module`, a callable
            `f(prompts, completions, completion_ids, **columns) -> list[float]`, or a list of these. Callables receive
            every other dataset column (repeated per completion), plus `trainer_state=None` and no-op `log_extra` /
            `log_metric`, like inside the trainer.
        args: a :class:`~trl_infalign.ReferenceConfig`: K, sampling, batching, seed, cache, vLLM, columns,
            `per_reward` (default: `ReferenceConfig()`).
        **overrides: any `ReferenceConfig` field by name (`num_samples=16, cache_dir=...`: the keyword form, applied
            on top of `args`), and the objects of the run:

            - `tokenizer`: the policy's tokenizer (default: loaded beside `model`);
            - `reward_processing_classes`: one tokenizer (or None) per reward function, as in TRL;
            - `accelerator`: an `accelerate.Accelerator` / `PartialState` (default: `PartialState()`); each process
              builds its share of the chunks and every process returns the full, merged dataset;
            - `progress`: show a progress bar (default True);
            - `return_stats`: return `(dataset, ReferenceStats)` — chunks computed / resumed, timing — instead.
    """
    from tqdm.auto import tqdm

    start_time = time.perf_counter()
    config, run = resolve_reference_config(args, overrides)
    dataset = _prepare_dataset(dataset, config)
    provenance_column = provenance_column_name(config.output_column)

    # ---- processes and cache: probe writability before loading or computing anything -----------------------------
    state = resolve_process_state(run["accelerator"])
    rank, world_size = state.process_index, state.num_processes
    check_vllm_settings(config, world_size, model)
    cache_path = Path(config.cache_dir) if config.cache_dir is not None else None
    if cache_path is not None:
        ReferenceCache(cache_path, rank, world_size, state, num_samples=config.num_samples, nonfinite=config.nonfinite,
                       keep_completions=config.keep_completions, num_rows=len(dataset)).probe()

    # ---- models: the reward functions, then the policy (loaded up front, also for a fully cached rerun: its weights
    # fingerprint keys the cache and the provenance; vLLM loads the model itself, then only its path is recorded) ---
    scorer = RewardScorer(reward_funcs, run["reward_processing_classes"], config)
    reward_names = scorer.names if scorer.per_reward else None
    policy, tokenizer = load_policy(model, run["tokenizer"], config.use_vllm, config.model_init_kwargs)
    reference_identity = vllm_model_identity(policy, config.model_init_kwargs) if config.use_vllm else model_identity(policy)
    sampling = effective_sampling(config, policy)

    # ---- provenance and cache key, from the config -------------------------------------------------------------
    num_rows = len(dataset)
    num_chunks = math.ceil(num_rows / config.batch_size)
    prompt_format = "conversational" if is_conversational_prompt(dataset[0][config.prompt_column]) else "plain"
    provenance = build_provenance(
        config, reference_model=reference_identity, reward_funcs=scorer.identities, reward_names=scorer.names,
        prompt_format=prompt_format, chat_template=chat_template_sha256(tokenizer), sampling=sampling.record(),
    )
    cache = None
    if cache_path is not None:
        cache = ReferenceCache(cache_path, rank, world_size, state, num_samples=config.num_samples,
                               nonfinite=config.nonfinite, keep_completions=config.keep_completions, num_rows=num_rows,
                               reward_names=reward_names)
        cache.check_or_write_meta(cache_meta(
            config, reference_identity=reference_identity, reward_identities=scorer.identities,
            reward_names=reward_names, weights=scorer.weights, sampling=provenance["sampling"],
            chat_template_sha256=provenance["chat_template_sha256"], num_rows=num_rows,
            prompts_sha256=prompts_fingerprint(_iter_column(dataset, config.prompt_column)),
            generation_config_overridden=(
                None if config.use_vllm else generation_config_overridden(policy, tokenizer, sampling)
            ),
        ))

    def chunk_rows(chunk: int) -> range:
        return range(chunk * config.batch_size, min((chunk + 1) * config.batch_size, num_rows))

    done: dict[int, dict] = {}
    if cache is not None:
        cache.refresh(done)
        cache.warn_bad_records(done)
        state.wait_for_everyone()  # every process has read the cache before anyone appends
    todo = [i for i in range(num_chunks) if i % world_size == rank and not all(r in done for r in chunk_rows(i))]
    resumed = sum(all(r in done for r in chunk_rows(i)) for i in range(num_chunks))
    stats = ReferenceStats(num_rows=num_rows, num_samples=config.num_samples, num_chunks=num_chunks,
                           chunks_resumed=resumed, world_size=world_size)
    if cache is not None:
        stats.records_recomputed = len(cache.bad_rows(done))

    # ---- compute own chunks ---------------------------------------------------------------------------------------
    other_columns = [c for c in dataset.column_names if c not in (config.prompt_column, "prompt", "completion", "completion_ids")]
    sampler = None
    if config.use_vllm and _any_rank(state, bool(todo)):
        # vLLM's external launcher builds the engine collectively: every process builds it when any has work (a
        # process whose share is cached, or that has no chunk, would otherwise leave the others waiting)
        sampler = make_sampler(policy, tokenizer, state, config, sampling)

    scorer_moved = False

    def compute_chunk(chunk: int) -> tuple[dict[int, dict], dict[int, dict]]:
        """(new records, complete records) of chunk `chunk`: each row's samples not cached yet (all K, or the new
        ones of a top-up), and the row's K samples with the cached ones in front."""
        nonlocal sampler, scorer_moved
        if sampler is None:  # transformers: started lazily, a fully cached run never moves the model
            sampler = make_sampler(policy, tokenizer, state, config, sampling)
        if not scorer_moved:
            scorer.to(state.device)
            scorer_moved = True
        rows_range = chunk_rows(chunk)
        cached = [cache.coverage(r) if cache is not None else None for r in rows_range]
        starts = [c["samples"][1] if c is not None else 0 for c in cached]
        if len(set(starts)) > 1:  # rows of one chunk cached to different depths (a damaged record): redraw the chunk,
            starts, cached = [0] * len(starts), [None] * len(starts)  # so that its batches are a fresh build's
        rows = dataset.select(rows_range)
        prompts = list(rows[config.prompt_column])
        texts, ids = sampler(prompts, list(rows_range), [(a, config.num_samples) for a in starts])
        stats.completions_generated += sum(config.num_samples - a for a in starts)
        stats.samples_reused += sum(starts)
        scored = scorer.score(rows, rows_range.start, prompts, texts, ids, other_columns, starts)
        new = {r: scored[r] for r, a in zip(rows_range, starts) if a < config.num_samples}
        complete = {
            r: (merge_segments({0: c, a: new[r]}) if r in new else c) if a else new[r]
            for r, c, a in zip(rows_range, cached, starts, strict=True)
        }
        return new, complete

    local: dict[int, dict] = {}
    error: str | None = None
    try:
        if todo:
            bar = tqdm(total=len(todo), desc="Reference rewards", unit="chunk",
                       disable=not (run["progress"] and state.is_main_process))
            try:
                _run_chunks(todo, compute_chunk, cache, done, local, stats, bar, chunk_rows)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below, so no rank waits forever
                if world_size == 1:
                    raise
                error = f"rank {rank}: {type(exc).__name__}: {exc}"
                logger.error("Reference building failed on %s", error)
            finally:
                bar.close()

        # ---- merge ------------------------------------------------------------------------------------------------
        records = _merge(done, local, error, cache, state, num_rows, config.batch_size)
    finally:
        if sampler is not None:  # vLLM: shut the engine down and free its GPU memory before anything trains
            sampler.close()
            sampler = None
    stats.num_dropped = sum(rec.get("num_dropped", 0) for rec in records)
    stats.rows_with_dropped = sum(1 for rec in records if rec.get("num_dropped", 0))
    if stats.num_dropped:
        logger.warning(
            "Dropped %d non-finite reference rewards in %d row(s) (nonfinite='skip'%s); those rows hold fewer than K=%d rewards.",
            stats.num_dropped, stats.rows_with_dropped, ", for every reward" if reward_names else "", config.num_samples,
        )
    values = [rec["ref_rewards"] for rec in records]
    out = dataset.add_column(config.output_column, values)
    out = out.add_column(provenance_column, provenance_rows(provenance, _iter_column(dataset, config.prompt_column), values))
    if config.keep_completions:
        out = out.add_column(config.completions_column, [rec["ref_completions"] for rec in records])
    stats.extra["provenance"] = provenance
    stats.extra["reward_names"] = list(scorer.names)
    stats.extra["per_reward"] = bool(reward_names)
    stats.seconds = time.perf_counter() - start_time
    return (out, stats) if run["return_stats"] else out


def _any_rank(state, value: bool) -> bool:
    """Whether `value` holds on any process (every process must call this)."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import gather_object

    return any(gather_object([value]))


def _prepare_dataset(dataset, config: ReferenceConfig):
    """`dataset` checked against `config` (one split, the prompt column, not empty, no output column unless
    `overwrite`), with the old output columns dropped when `overwrite`."""
    from datasets import Dataset, DatasetDict

    if isinstance(dataset, DatasetDict):
        raise TypeError(f"dataset is a DatasetDict with splits {list(dataset)}: pass one split, e.g. dataset['train'].")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
    if config.prompt_column not in dataset.column_names:
        raise ValueError(
            f"prompt_column={config.prompt_column!r} is not a column of the dataset (columns: {dataset.column_names}); "
            "pass `prompt_column=` naming the column that holds the prompts."
        )
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there are no prompts to build reference rewards for.")
    provenance_column = provenance_column_name(config.output_column)
    outputs = [config.output_column, provenance_column] + ([config.completions_column] if config.keep_completions else [])
    for name in outputs:
        if name in dataset.column_names and not config.overwrite:
            raise ValueError(
                f"The dataset already has a column {name!r}: pass `overwrite=True` to rebuild it, or choose another "
                "`output_column` / `completions_column`."
            )
    drop = [c for c in (config.output_column, provenance_column, config.completions_column) if c in dataset.column_names]
    return dataset.remove_columns(drop) if drop and config.overwrite else dataset


def _run_chunks(todo, compute_chunk, cache, done, local, stats, bar, chunk_rows) -> None:
    """Compute this process's chunks `todo` into `local` (and the cache).

    Shard protocol: a chunk is computed only under its lock (`locks/chunk-XXXXXXXX.lock`, flock), after re-reading
    what other builders appended. A chunk locked by a concurrent builder on the same cache is deferred, then waited
    for (blocking lock) and read back; it is recomputed only if that builder died."""
    if cache is None:
        for chunk in todo:
            local.update(compute_chunk(chunk)[1])
            stats.chunks_computed += 1
            bar.update(1)
        return
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
                new, results = compute_chunk(chunk)
                cache.append(new.values())
            local.update(results)
            stats.chunks_computed += 1
            bar.update(1)


def _merge(done, local, error, cache, state, num_rows: int, batch_size: int) -> list[dict]:
    """Every row's record in dataset order: from the shard files (with a cache) or `gather_object` (without), after
    raising any process's error on every process."""
    if state.num_processes > 1:
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
    return [done[r] for r in range(num_rows)]


def _build_reference_rewards(*args, **kwargs):
    """`build_reference_rewards(..., return_stats=True)`: the dataset and what the build did (CLI, tests, benchmark)."""
    return build_reference_rewards(*args, return_stats=True, **kwargs)


__all__ = [
    "build_reference_rewards", "validate_reference_rewards", "resolve_process_state", "ReferenceStats", "ReferenceConfig",
]
