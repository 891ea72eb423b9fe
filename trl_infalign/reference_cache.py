"""The resumable cache of the reference pass: `meta.json`, per-process JSONL shards, per-chunk locks.

A build with `cache_dir` appends every finished chunk to its process's `rank-XXXXX.jsonl` (one checksummed record per
row, flushed and fsync'ed per chunk) next to a `meta.json` holding everything that determines the result; a rerun
with the same settings skips every chunk whose rows are all on disk and pass the integrity check. A rerun with a larger
K tops the cache up: `meta.json` is rewritten with the new K (and `"grown_from"`), and each row gets a second record
`{"samples": [K₁, K₂], ...}` holding only its new samples; a row's records are chained from sample 0
(:func:`merge_segments`). See :class:`ReferenceCache` and docs/reference_rewards.md ("Caching and resumption",
"Seeding and top-up", "Cache").
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("trl_infalign.reference")

CACHE_FORMAT_VERSION = 2
#: How samples are seeded (see trl_infalign.reference_sampling): sample j of row r by the key (seed, r, j).
SEEDING = "per-sample-key-v1"
META_FILE = "meta.json"
LOCK_DIR = "locks"


def _short(value, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _not_finite_number(v) -> bool:
    return isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)


def _jsonable(value):
    return json.loads(json.dumps(value, default=repr, sort_keys=True))


def identity_key(identity: dict) -> str:
    """One string per reward function for the cache key: kind, normalised name and weights fingerprint; a callable by
    its qualname only (a script's function is `__main__:f` when run, `script:f` when imported: same function)."""
    if identity["kind"] == "model":
        return f"model:{identity['name']}#{identity.get('fingerprint')}"
    return f"callable:{identity['name'].rpartition(':')[2]}"


def prompts_fingerprint(prompts) -> str:
    """sha256 of the prompts (not `dataset._fingerprint`, which is random for in-memory datasets)."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps(prompt, sort_keys=True, default=repr).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


def cache_meta(config, *, reference_identity: dict, reward_identities: list[dict], reward_names: list[str] | None,
               weights: list[float], sampling: dict, chat_template_sha256: str | None, num_rows: int,
               prompts_sha256: str, generation_config_overridden: dict | None = None) -> dict:
    """The `meta.json` of a build with `config` (a `ReferenceConfig`): every setting that determines the result.

    Keys added after format 2 (`min_p`, `repetition_penalty`, `per_reward`, `generation_config_overridden`) appear only
    when they are not neutral, so a cache written before them still resumes when nothing they describe changed, and
    is refused (the key is "<missing>" there) when it did: a per-reward build never resumes a combined one, and a
    cache sampled while the model's generation config leaked into `generate` is not mixed with explicit sampling.
    """
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "model": reference_identity["name"],
        "model_revision": reference_identity["revision"],
        "model_fingerprint": reference_identity["fingerprint"],
        "num_samples": config.num_samples,
        "reward_funcs": [identity_key(identity) for identity in reward_identities],
        "reward_weights": weights,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "generation_batch_size": config.generation_batch_size_or_chunk,
        "reward_batch_size": config.reward_batch_size,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "generation_kwargs": _jsonable(config.generation_kwargs or {}),
        "chat_template_kwargs": _jsonable(config.chat_template_kwargs or {}),
        "chat_template_sha256": chat_template_sha256,
        "use_vllm": bool(config.use_vllm),
        "model_init_kwargs": _jsonable(config.model_init_kwargs or {}),
        "nonfinite": config.nonfinite,
        "keep_completions": bool(config.keep_completions),
        "prompt_column": config.prompt_column,
        "dataset_num_rows": num_rows,
        "dataset_fingerprint": prompts_sha256,
        "seeding": SEEDING,
    }
    if sampling.get("min_p", 0.0) != 0.0:
        meta["min_p"] = sampling["min_p"]
    if sampling.get("repetition_penalty", 1.0) != 1.0:
        meta["repetition_penalty"] = sampling["repetition_penalty"]
    if reward_names is not None:
        meta["per_reward"] = list(reward_names)
    if generation_config_overridden:
        meta["generation_config_overridden"] = _jsonable(generation_config_overridden)
    return meta


# ---------------------------------------------------------------------------------------------------------------------
# Cache


class ReferenceCache:
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
                 keep_completions: bool, num_rows: int, reward_names: list[str] | None = None):
        self.path, self.rank, self.world_size, self.state = path, rank, world_size, state
        self.shard = path / f"rank-{rank:05d}.jsonl"
        self.num_samples, self.nonfinite, self.keep_completions, self.num_rows = num_samples, nonfinite, keep_completions, num_rows
        self.reward_names = reward_names  # per-reward records ({name: [...]}); None: one list per record
        self._offsets: dict[Path, int] = {}
        self._bad: dict[int, str] = {}  # row -> why its cached record was rejected (until a valid one is read)
        self._segments: dict[int, dict[int, dict]] = {}  # row -> {first sample: record of samples [first, stop)}
        self._partial: dict[int, dict] = {}  # row -> its samples [0, n) merged (n < K until a top-up finishes)
        self.record_lengths = {num_samples}  # K of a whole-row record: this build's, or that of a build topped up

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
                _write_json(meta_path, meta)  # atomic: a concurrent builder sees either no file or the whole file
            else:
                try:
                    stored = json.loads(meta_path.read_text())
                except (OSError, json.JSONDecodeError):
                    stored = None  # reported below, on every process
                if isinstance(stored, dict) and stored.get("format_version") == meta["format_version"]:
                    diffs, topup_from, legacy = meta_differences(stored, meta)
                    if legacy:
                        warnings.warn(
                            f"The cache in {self.path} was sampled by an earlier trl-infalign, which seeded each chunk "
                            "as a whole: its rows are kept, and the rows and samples still missing are drawn with "
                            "per-sample keys (the same distribution; not bit-identical to a build from scratch).",
                            UserWarning, stacklevel=4,
                        )
                    if not diffs and (topup_from is not None or legacy):
                        if topup_from is not None:
                            logger.warning("Topping up the cache in %s from K=%d to K=%d: the %d samples per row "
                                           "already drawn are kept, only the new ones are drawn.", self.path,
                                           topup_from, meta["num_samples"], topup_from)
                        grown = sorted(set(stored.get("grown_from", [])) | ({topup_from} if topup_from else set()))
                        _write_json(meta_path, {**{k: v for k, v in meta.items() if not (legacy and k == "seeding")},
                                                **({"grown_from": grown} if grown else {})})
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
        diffs, _, _ = meta_differences(stored, meta)
        self.record_lengths = {self.num_samples, *stored.get("grown_from", [])}
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
        per-reward record without every reward (or with lists of different lengths), a completions list of another
        length, or a checksum that does not match the content."""
        if not isinstance(record, dict):
            return f"not a JSON object ({type(record).__name__})"
        index, values = record.get("index"), record.get("ref_rewards")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_rows:
            return f"index {index!r} is not a row of this dataset"
        if self.reward_names is not None:
            if not isinstance(values, dict) or sorted(values) != sorted(self.reward_names):
                return f"ref_rewards is not a per-reward record of {sorted(self.reward_names)}"
            lists = list(values.values())
        else:
            lists = [values]
        for value in lists:
            if not isinstance(value, list) or any(_not_finite_number(v) for v in value):
                return "ref_rewards is not a list of finite numbers"
        if len({len(value) for value in lists}) > 1:
            return "the per-reward lists have different lengths"
        length = len(lists[0])
        dropped = record.get("num_dropped", 0)
        if isinstance(dropped, bool) or not isinstance(dropped, int) or dropped < 0:
            return f"num_dropped {dropped!r} is not a count"
        span = record_samples(record)
        if span is None:
            return f"samples {record.get('samples')!r} is not a range [start, stop) of sample indices"
        start, stop = span
        if stop > self.num_samples:
            return f"samples [{start}, {stop}) reach beyond K={self.num_samples}"
        if "samples" not in record and stop not in self.record_lengths:  # K of this build, or of one it topped up
            if self.nonfinite == "skip":
                return f"{length} reward(s) + {dropped} dropped, expected {self.num_samples} in all"
            return f"{length} reward(s), expected K={self.num_samples}"
        if self.nonfinite == "skip":
            if length + dropped != stop - start or (start == 0 and length < 1):
                return f"{length} reward(s) + {dropped} dropped, expected {stop - start} in all"
        elif dropped or length != stop - start or length == 0:
            return f"{length} reward(s) for samples [{start}, {stop})"
        if self.keep_completions and len(record.get("ref_completions") or []) != length:
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
                    segments = self._segments.setdefault(index, {})
                    start, stop = record_samples(record)
                    if start not in segments or record_samples(segments[start])[1] < stop:  # the longest from start
                        segments[start] = record
                    merged = merge_segments(self._segments[index])
                    self._partial[index] = merged
                    if merged["samples"][1] == self.num_samples:
                        done[index] = merged
                    self._bad.pop(index, None)
                elif isinstance(index, int) and index not in done:
                    self._bad[index] = problem
            self._offsets[shard] = offset + end

    def coverage(self, row: int) -> dict | None:
        """Row `row`'s cached samples [0, n) merged into one record (``"samples": [0, n]``), or None."""
        return self._partial.get(row)

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


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
    os.replace(tmp, path)


def meta_differences(stored: dict, meta: dict) -> tuple[list[str], int | None, bool]:
    """(blocking differences, K of a top-up, legacy seeding) between a cache's stored `meta.json` and this run's.

    A larger `num_samples` is a top-up (the samples drawn are kept, the new ones added), with `generation_batch_size`
    following it when both are the default (`batch_size × K`); a smaller one is refused. A cache written before
    per-sample seeding has no `"seeding"` key: it is accepted (legacy), with a warning."""
    missing = "<missing>"
    topup_from = None
    ignore = set()
    stored_k, k = stored.get("num_samples"), meta.get("num_samples")
    if isinstance(stored_k, int) and isinstance(k, int) and stored_k < k:
        topup_from = stored_k
        ignore.add("num_samples")
        batch = meta.get("batch_size")
        if stored.get("generation_batch_size") == batch * stored_k and meta.get("generation_batch_size") == batch * k:
            ignore.add("generation_batch_size")
    legacy = "seeding" in meta and "seeding" not in stored
    if legacy:
        ignore.add("seeding")
    ignore.add("grown_from")  # the K values a cache was topped up from (whole-row records of those sizes are valid)
    diffs = [
        f"{key!r} is {_short(stored.get(key, missing), 120)} in {META_FILE} but {_short(meta.get(key, missing), 120)} now"
        for key in sorted(set(meta) | set(stored))
        if key not in ignore and stored.get(key, missing) != meta.get(key, missing)
    ]
    if isinstance(stored_k, int) and isinstance(k, int) and stored_k > k:
        diffs = [d for d in diffs if not d.startswith("'num_samples'")]
        diffs.append(
            f"'num_samples' is {stored_k} in {META_FILE} but {k} now: the cache holds (or is being topped up to) "
            f"K={stored_k} samples per row. Ask for num_samples={stored_k} (a cache only grows: raising K keeps the "
            "samples drawn and adds the new ones)"
        )
    return diffs, topup_from, legacy


def record_samples(record: dict) -> tuple[int, int] | None:
    """The sample indices [start, stop) a cache record covers: its ``"samples"``, else [0, rewards + dropped)."""
    span = record.get("samples")
    if span is None:
        values = record.get("ref_rewards")
        first = next(iter(values.values()), []) if isinstance(values, dict) else values
        return 0, len(first or []) + int(record.get("num_dropped", 0) or 0)
    if (not isinstance(span, list) or len(span) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in span)
            or not 0 <= span[0] < span[1]):
        return None
    return span[0], span[1]


def merge_segments(segments: dict[int, dict]) -> dict:
    """One row's records chained from sample 0 (`segments`: first sample -> record) into one record of samples
    [0, n): rewards (per reward), completions and dropped counts concatenated; ``"samples": [0, n]``."""
    first = segments[0] if 0 in segments else None
    if first is None:
        return {"index": next(iter(segments.values()))["index"], "ref_rewards": [], "samples": [0, 0]}
    values = first["ref_rewards"]
    merged = {"index": first["index"], "ref_rewards": dict(values) if isinstance(values, dict) else list(values)}
    dropped = first.get("num_dropped", 0)
    completions = list(first["ref_completions"]) if "ref_completions" in first else None
    stop = record_samples(first)[1]
    while stop in segments:
        record = segments[stop]
        if isinstance(merged["ref_rewards"], dict):
            merged["ref_rewards"] = {n: merged["ref_rewards"][n] + record["ref_rewards"][n] for n in merged["ref_rewards"]}
        else:
            merged["ref_rewards"] = merged["ref_rewards"] + record["ref_rewards"]
        dropped += record.get("num_dropped", 0)
        if completions is not None:
            completions += record.get("ref_completions", [])
        stop = record_samples(record)[1]
    if dropped:
        merged["num_dropped"] = dropped
    if completions is not None:
        merged["ref_completions"] = completions
    merged["samples"] = [0, stop]
    return merged


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



_Cache = ReferenceCache  # the name used before the split

__all__ = ["ReferenceCache", "probe_writable", "cache_meta", "CACHE_FORMAT_VERSION", "META_FILE", "LOCK_DIR"]
