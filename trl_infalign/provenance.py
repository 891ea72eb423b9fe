"""Provenance of reference rewards: how they were made, recorded by `build_reference_rewards` and checked by
`CTRLTrainer` against its own settings.

CTRL calibrates a policy completion's reward against K reference rewards per prompt. That is only meaningful if both
come from the *same* reward (reward models and their weights, callables, weights of the combination) applied to
samples drawn the *same way* (same reference policy, prompt formatting, sampling settings). Nothing in a bare
`ref_rewards` column says how it was made, so :func:`build_reference_rewards` adds a second column,
`<output_column>_provenance`, and :func:`check_reference_provenance` (run by `CTRLTrainer.__init__` on every dataset)
compares it with the run.

Encoding (format 2)
-------------------
The provenance column is a struct per row:

- ``build``: compact JSON (sorted keys) of the build settings — the reference model (normalised path / hub id,
  revision, weights fingerprint), each reward function's identity and weight, the prompt format and chat-template
  hash, the sampling settings, K, seed, `nonfinite`, the trl-infalign version. What is common to a build is stored
  once per `ANCHOR_STRIDE` (32) rows ("anchor" rows: build rows 0, 32, 64, ...; every row of a build of up to
  `ANCHOR_ALL_ROWS_UP_TO` = 1024 rows) and is null elsewhere, so that the record survives formats that keep only rows
  (JSON, Parquet, Hub), `concatenate_datasets` of several builds, and any row subset that holds an anchor.
- ``build_sha256``: the build's id, the first 16 hex digits of the sha256 of ``build``; an anchor's record must hash
  to it (an edited record is refused).
- ``prompt_sha256``: the first 16 hex digits of the sha256 of the row's prompt as it was sampled (canonical JSON).
  A training row whose prompt was edited after the build (re-formatted, a system prompt added) no longer matches.
- ``rewards_digest``: ``[mean, std]`` of the row's reference rewards (per reward, by sorted name, for per-reward
  rows): binds the provenance row to the rewards beside it. `ref_rewards` permuted across rows, or another build's
  rewards put under this provenance, no longer match. A digest compared with a tolerance (1e-6 of the row's largest
  |reward|, plus 1e-9), not a hash, because `Dataset.to_json` keeps 10 decimals and a user may cast the column to
  float32; other rows' or other builds' rewards differ by sampling noise, far more.

Per row this costs ~80 bytes in Arrow (measured on a 1 100-row build: 79 B; format 1, with the record in every row,
cost ~490-580 B). A small subset of a large build that holds no anchor row (say 38 rows of a JSON export) has lost the
record: the check then warns that the build settings were not compared, unless another dataset of the same trainer
(its training set) carried the record; the subset's prompts and rewards digests are still checked.

Format 1 (datasets built before the rewards digest): ``{"build": <record in every row>, "prompt_sha256"}``. It is
still read and checked as before (no rewards digest, so no check of the rewards against their rows).

Weights fingerprint
-------------------
:func:`weights_fingerprint` hashes the names and shapes of every parameter plus 4096 evenly spaced values of four
of them (first, ⅓, ⅔, last), rounded to bfloat16 so that a float32 and a bfloat16 load of one checkpoint agree.
PEFT wrappers are looked through (adapter weights are ignored: a fresh LoRA adapter leaves the model unchanged).
It costs a few milliseconds; it returns None where parameters are not materialised (DeepSpeed ZeRO-3, meta device),
and the check then falls back to comparing model names.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

#: Version of the provenance record (the ``build`` JSON's ``"format"``).
PROVENANCE_FORMAT = 2
PROVENANCE_SUFFIX = "_provenance"
#: A build's record is stored in every row of a build of up to this many rows, else in every `ANCHOR_STRIDE`-th row.
ANCHOR_ALL_ROWS_UP_TO = 1024
ANCHOR_STRIDE = 32
#: Tolerance of the rewards digest: |recorded − current| <= DIGEST_RTOL × max |reward| of the row + DIGEST_ATOL.
DIGEST_RTOL = 1e-6
DIGEST_ATOL = 1e-9
_FINGERPRINT_TENSORS = 4
_FINGERPRINT_VALUES = 4096
_HOW_TO_GET_PROVENANCE = (
    "Build the column with `trl_infalign.build_reference_rewards(...)` or `trl-infalign build-reference`, which record "
    "how the references were made in a `<column>_provenance` column."
)
_OVERRIDE = (
    "To train anyway (calibration may then compare unlike rewards), set "
    "CTRLConfig.reference_provenance_check=\"warn\" (warn and continue) or \"off\" (skip this check)."
)


class ReferenceProvenanceWarning(UserWarning):
    """The reference rewards' provenance is missing, unreadable, or differs from the run (with `"warn"`)."""


# ---------------------------------------------------------------------------------------------------------------------
# Identities


def provenance_column_name(column: str = "ref_rewards") -> str:
    """The provenance column that goes with reference-rewards column `column` (`ref_rewards_provenance`)."""
    return f"{column}{PROVENANCE_SUFFIX}"


def normalise_model_name(name) -> str:
    """A local path as its resolved absolute path (so `./m`, `m` and `/abs/m` agree); a hub id as given."""
    text = os.fspath(name) if isinstance(name, os.PathLike) else str(name)
    expanded = os.path.expanduser(text)
    if text and os.path.exists(expanded):
        return os.path.realpath(expanded)
    return text.rstrip("/") or text


def _base_model(model):
    """Look through PEFT (`PeftModel.get_base_model()`); DDP / DeepSpeed wrappers are removed by the caller."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        try:
            return get_base()
        except Exception:  # noqa: BLE001 - not a PEFT model after all
            return model
    return model


def _normalised_parameter_name(name: str) -> str | None:
    """Parameter name with PEFT's wrapping undone; None for adapter-only parameters."""
    parts = name.split(".")
    if any(part.startswith("lora_") or part == "modules_to_save" for part in parts):
        return None
    return ".".join(part for part in parts if part not in ("base_layer", "original_module"))


def weights_fingerprint(model) -> str | None:
    """A cheap fingerprint of a model's weights (16 hex digits), or None where it cannot be computed cheaply.

    sha256 over every parameter's (normalised) name and shape, plus `_FINGERPRINT_VALUES` evenly spaced values of
    `_FINGERPRINT_TENSORS` parameters, rounded to bfloat16 (float32 / bfloat16 loads of one checkpoint agree; a
    float16 load may not). PEFT adapters are ignored; ZeRO-3-partitioned or meta-device parameters give None.
    """
    import torch

    try:
        named = []
        for name, param in _base_model(model).named_parameters():
            normalised = _normalised_parameter_name(name)
            if normalised is None:
                continue
            if hasattr(param, "ds_numel") or param.device.type == "meta" or type(param.data) not in (torch.Tensor,):
                return None  # DeepSpeed ZeRO-3 partition, meta tensor or DTensor: not cheap to read
            named.append((normalised, param))
        if not named:
            return None
        digest = hashlib.sha256()
        for name, param in named:
            digest.update(f"{name}:{tuple(param.shape)}\n".encode())
        count = len(named)
        picks = sorted({round(i * (count - 1) / max(_FINGERPRINT_TENSORS - 1, 1)) for i in range(_FINGERPRINT_TENSORS)})
        with torch.no_grad():
            for i in picks:
                flat = named[i][1].detach().reshape(-1)
                if flat.numel() == 0:
                    continue
                steps = min(flat.numel(), _FINGERPRINT_VALUES)
                index = torch.linspace(0, flat.numel() - 1, steps=steps, device=flat.device).round().long()
                values = flat[index].to(torch.bfloat16).view(torch.int16).cpu().numpy()
                digest.update(values.tobytes())
        return digest.hexdigest()[:16]
    except Exception as error:  # noqa: BLE001 - a fingerprint is optional; never break training for it
        logger.debug("No weights fingerprint for %s: %s", type(model).__name__, error)
        return None


def model_identity(model, fingerprint: bool = True) -> dict:
    """`{"name", "revision", "fingerprint"}` of a model given as a path / hub id (no fingerprint) or an object."""
    if isinstance(model, (str, os.PathLike)):
        return {"name": normalise_model_name(model), "revision": None, "fingerprint": None}
    config = getattr(_base_model(model), "config", None) or getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    return {
        "name": normalise_model_name(name),
        "revision": getattr(config, "_commit_hash", None),
        "fingerprint": weights_fingerprint(model) if fingerprint else None,
    }


def reward_func_identity(func) -> dict:
    """`{"kind": "model", "name", "revision", "fingerprint"}` for a reward model, `{"kind": "callable", "name":
    "module:qualname"}` for a callable (a `functools.partial` is named after its function, an object after its class)."""
    from torch import nn

    if isinstance(func, nn.Module):
        return {"kind": "model", **model_identity(func)}
    if isinstance(func, (str, os.PathLike)):
        return {"kind": "model", **model_identity(func)}
    target = func.func if isinstance(func, functools.partial) else func
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return {"kind": "callable", "name": f"{module}:{qualname}"}


def chat_template_sha256(processing_class) -> str | None:
    """sha256 (16 hex digits) of a tokenizer's / processor's chat template, or None without one."""
    template = getattr(processing_class, "chat_template", None)
    if template is None and hasattr(processing_class, "tokenizer"):
        template = getattr(processing_class.tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _canonical(value):
    """Drop None-valued keys (Arrow fills missing struct fields with None) and sort keys."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in sorted(value.items()) if v is not None}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def prompt_fingerprint(prompt) -> str:
    """sha256 (16 hex digits) of a prompt (a string or a list of messages) in canonical JSON."""
    text = json.dumps(_canonical(prompt), sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sampling_settings(*, temperature, top_p, top_k, max_new_tokens, generation_kwargs=None, min_p=None,
                      repetition_penalty=None) -> dict:
    """The sampling settings as recorded, with neutral values normalised (top_k None ≡ 0, top_p None ≡ 1, ...) and
    `generation_kwargs` applied on top, as `model.generate` sees them (:meth:`SamplingSettings.record`)."""
    from .sampling import SamplingSettings

    return SamplingSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, generation_kwargs=generation_kwargs,
    ).record()


def build_provenance(config, *, reference_model: dict, reward_funcs: list[dict], reward_names: list[str] | None = None,
                     prompt_format: str, chat_template: str | None, sampling: dict | None = None) -> dict:
    """The ``build`` record of a reference-rewards build (see the module docstring) made with `config` (a
    :class:`~trl_infalign.ReferenceConfig`): K, seed, chunk size, `nonfinite`, the chat-template kwargs, the weights
    and the sampler come from it; `sampling` is the effective record (:meth:`SamplingSettings.resolved`, default: the
    config's own settings). A per-reward build (`config.per_reward` with several reward functions) also records
    ``"per_reward": true`` and ``"rewards"``: each reward function's identity under its name."""
    from . import __version__

    weights = config.reward_weights if config.reward_weights is not None else [1.0] * len(reward_funcs)
    build = {
        "format": PROVENANCE_FORMAT,
        "trl_infalign": __version__,
        "reference_model": reference_model,
        "reward_funcs": [{**identity, "weight": float(w)} for identity, w in zip(reward_funcs, weights, strict=True)],
        "prompt_format": prompt_format,
        "chat_template_sha256": chat_template if prompt_format == "conversational" else None,
        "chat_template_kwargs": json.loads(json.dumps(config.chat_template_kwargs or {}, default=repr, sort_keys=True)),
        "sampling": sampling if sampling is not None else config.sampling.resolved(sampler=_sampler(config)).record(),
        "sampler": _sampler(config),
        "num_samples": int(config.num_samples),
        "seed": int(config.seed),
        "batch_size": int(config.batch_size),
        "nonfinite": config.nonfinite,
    }
    if config.per_reward and len(reward_funcs) > 1:
        if reward_names is None or len(reward_names) != len(reward_funcs):
            raise ValueError("a per-reward provenance record needs one name per reward function (reward_names).")
        build["per_reward"] = True
        build["rewards"] = {name: dict(identity) for name, identity in zip(reward_names, reward_funcs, strict=True)}
    return build


def _sampler(config) -> str:
    return "vllm" if config.use_vllm else "transformers"


def per_reward_identities(build: dict) -> dict[str, dict] | None:
    """``{name: identity}`` of a per-reward build record (identity: ``kind``, ``name``, and for a model ``revision``
    and ``fingerprint``), or None for a build whose column holds one (combined) list per row."""
    if not build.get("per_reward"):
        return None
    rewards = build.get("rewards")
    if not isinstance(rewards, dict) or not rewards:
        raise ValueError("a per-reward provenance record without its 'rewards' (name -> identity): rebuild the "
                         "references with build_reference_rewards(..., per_reward=True).")
    return {str(name): dict(identity) for name, identity in rewards.items()}


def read_per_reward_identities(dataset, column: str = "ref_rewards") -> dict[str, dict] | None:
    """The recorded ``{name: identity}`` of a per-reward build in `dataset` (see :func:`per_reward_identities`);
    None without a provenance column or for a plain build. Several builds raise, as :func:`read_reference_provenance`."""
    build = read_reference_provenance(dataset, column)
    return None if build is None else per_reward_identities(build)


def compare_reward_identities(recorded: dict[str, dict], run: dict[str, dict]) -> list[str]:
    """Per-reward comparison: one line (naming the reward and the fix) for each of the run's rewards that the
    references do not hold, or hold for another function. Order does not matter; recorded rewards that the run does
    not use are not a problem (their entries are just not read)."""
    problems = []
    for name, current in run.items():
        if name not in recorded:
            problems.append(
                f"reward {name!r}: the per-reward references hold no rewards for it (they hold {sorted(recorded)}). "
                f"Fix: rebuild the references with this run's reward functions (build_reference_rewards(..., "
                "per_reward=True) / build-reference --per_reward), or train with the recorded ones."
            )
        elif not _reward_matches(recorded[name], current):
            problems.append(
                f"reward {name!r}: recorded {_describe_reward(recorded[name])}, this run {_describe_reward(current)}. "
                "Fix: pass the reward function the references were scored with under this name, or rebuild the "
                "references with this one."
            )
    return problems


def encode_provenance(build: dict) -> str:
    """Compact, deterministic JSON of a ``build`` record (identical builds give identical strings)."""
    return json.dumps(build, sort_keys=True, separators=(",", ":"), default=repr)


def build_sha256(encoded: str) -> str:
    """The id of a build: the first 16 hex digits of the sha256 of its encoded record (:func:`encode_provenance`)."""
    return hashlib.sha256(encoded.encode()).hexdigest()[:16]


def _is_anchor(index: int, num_rows: int) -> bool:
    """Does build row `index` carry a copy of the build record (every row of a small build, else every
    `ANCHOR_STRIDE`-th row)?"""
    return num_rows <= ANCHOR_ALL_ROWS_UP_TO or index % ANCHOR_STRIDE == 0


def rewards_digest(value) -> list[float]:
    """The numeric digest of one row's reference rewards: ``[mean, std]`` (population std, float64) of a plain row;
    ``[mean_1, std_1, mean_2, std_2, ...]`` of a per-reward row ``{name: list}``, by sorted name.

    A digest rather than a hash: it is compared with a tolerance (:data:`DIGEST_RTOL` × the row's largest |reward| +
    :data:`DIGEST_ATOL`), so that the rounding of `to_json` (10 decimals) or a float32 cast of the column passes,
    while rewards from another row or another build (which differ by sampling noise) do not. The order of the K
    values inside a row does not enter (calibration does not depend on it)."""
    import numpy as np

    if isinstance(value, dict):
        return [x for name in sorted(k for k, v in value.items() if v is not None) for x in rewards_digest(value[name])]
    array = np.asarray(list(value), dtype=np.float64)
    if array.size == 0:
        return [math.nan, math.nan]
    mean = float(array.mean())
    return [mean, float(np.sqrt(np.mean((array - mean) ** 2)))]


def provenance_rows(build: dict, prompts, rewards=None) -> list[dict]:
    """The provenance column's values for `prompts` and their reference `rewards` (format 2, one dict per row):
    ``{"build": <record JSON on anchor rows, else None>, "build_sha256", "prompt_sha256", "rewards_digest"}``.

    Without `rewards`, the rows of format 1 (``{"build": <record JSON>, "prompt_sha256"}``, the full record in every
    row), as datasets built before the rewards digest carry them; still read and checked."""
    encoded = encode_provenance(build)
    prompts = list(prompts)
    if rewards is None:
        return [{"build": encoded, "prompt_sha256": prompt_fingerprint(p)} for p in prompts]
    rewards = list(rewards)
    if len(rewards) != len(prompts):
        raise ValueError(f"provenance_rows: {len(rewards)} reward rows for {len(prompts)} prompts.")
    sha, num_rows = build_sha256(encoded), len(prompts)
    return [
        {"build": encoded if _is_anchor(i, num_rows) else None, "build_sha256": sha, "prompt_sha256": prompt_fingerprint(p),
         "rewards_digest": rewards_digest(r)}
        for i, (p, r) in enumerate(zip(prompts, rewards))
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class ProvenanceColumn:
    """What a provenance column holds, read once (:func:`read_provenance_column`).

    `records`: build id (`build_sha256`) -> encoded record, for every build whose record some row carries; `counts`:
    build id -> number of rows. A format-1 column (the record in every row) is keyed by the record's own id too.
    `prompt_hashes`: each row's `prompt_sha256`; `row_builds` / `digests`: each row's build id and rewards digest
    (format 2; None for format 1, which has no rewards digest); `problems`: records that do not match their id."""

    records: dict[str, str]
    counts: dict[str, int]
    prompt_hashes: list
    row_builds: list | None
    digests: list | None
    prompts: list | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def format(self) -> int:
        return 1 if self.row_builds is None else 2

    @property
    def missing(self) -> dict[str, int]:
        """Build ids that no row of this column carries the record of, with their row counts."""
        return {sha: n for sha, n in self.counts.items() if sha not in self.records}

    def builds(self, extra_records: dict[str, str] | None = None) -> list[tuple[str, int]]:
        """(encoded record, rows) per build whose record is known (here, or in `extra_records`: id -> record)."""
        known = {**(extra_records or {}), **self.records}
        return [(known[sha], n) for sha, n in self.counts.items() if sha in known]


def _struct_field(array, name: str):
    try:
        return array.field(name)
    except (KeyError, AttributeError, TypeError, ValueError):
        return None


def read_provenance_column(dataset, column: str, with_prompts: bool = False,
                           max_iterable_rows: int = 1000) -> ProvenanceColumn:
    """Read provenance column `column` of `dataset` (either format). Map-style datasets are read column-wise through
    Arrow (fast for 100k+ rows); an `IterableDataset` only for its first `max_iterable_rows` rows. Raises
    `ValueError` if the column is not a provenance struct."""
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        examples = [example for _, example in zip(range(max_iterable_rows), dataset)]
        values = [example.get(column) if isinstance(example.get(column), dict) else {} for example in examples]
        prompts = [example.get("prompt") for example in examples] if with_prompts else None
        return _from_rows(values, prompts)
    import pyarrow as pa

    records: dict[str, str] = {}
    counts: dict[str, int] = {}
    prompt_hashes: list = []
    row_builds: list | None = None
    digests: list | None = None
    problems: list[str] = []
    for table in dataset.select_columns([column]).with_format("arrow").iter(batch_size=16384):
        array = table.column(column).combine_chunks()
        build_array, hash_array = _struct_field(array, "build"), _struct_field(array, "prompt_sha256")
        if build_array is None or hash_array is None:
            raise ValueError(
                f"column {column!r} is not a reference-provenance struct of 'build' and 'prompt_sha256' "
                f"(type {array.type})"
            )
        sha_array, digest_array = _struct_field(array, "build_sha256"), _struct_field(array, "rewards_digest")
        if sha_array is None:  # format 1: the record in every row
            for text, count in zip(*_value_counts(build_array)):
                sha = build_sha256(str(text)) if text is not None else "<none>"
                records.setdefault(sha, text)
                counts[sha] = counts.get(sha, 0) + count
        else:
            row_builds = (row_builds or []) + sha_array.to_pylist()
            digests = (digests or []) + _digest_rows(digest_array, len(array))
            for sha, count in zip(*_value_counts(sha_array)):
                counts[sha] = counts.get(sha, 0) + count
            if not pa.types.is_null(build_array.type):
                import pyarrow.compute as pc

                anchors = pc.is_valid(build_array)
                pairs = set(zip(build_array.filter(anchors).to_pylist(), sha_array.filter(anchors).to_pylist()))
                for text, sha in pairs:
                    _add_record(records, problems, text, sha, column)
        prompt_hashes.extend(hash_array.to_pylist())
    prompts = None
    if with_prompts:
        prompts = []
        if "prompt" in dataset.column_names:
            for batch in dataset.select_columns(["prompt"]).iter(batch_size=4096):
                prompts.extend(batch["prompt"])
    return ProvenanceColumn(records, counts, prompt_hashes, row_builds, digests, prompts, problems)


def _from_rows(values: list[dict], prompts) -> ProvenanceColumn:
    records: dict[str, str] = {}
    counts: dict[str, int] = {}
    problems: list[str] = []
    new_format = any("build_sha256" in v for v in values)
    row_builds = [v.get("build_sha256") for v in values] if new_format else None
    for value in values:
        text = value.get("build")
        sha = value.get("build_sha256") if new_format else (build_sha256(str(text)) if text is not None else "<none>")
        counts[sha] = counts.get(sha, 0) + 1
        if text is not None:
            if new_format:
                _add_record(records, problems, text, sha, "provenance")
            else:
                records.setdefault(sha, text)
    digests = [v.get("rewards_digest") for v in values] if new_format else None
    return ProvenanceColumn(records, counts, [v.get("prompt_sha256") for v in values], row_builds, digests, prompts,
                            problems)


def _add_record(records: dict, problems: list, text, sha, column: str) -> None:
    if build_sha256(str(text)) != sha:
        message = (f"a row of {column!r} carries a build record whose sha256 is not its build_sha256 {sha!r}: the "
                   "record was edited after the build")
        if message not in problems:
            problems.append(message)
        return
    records[sha] = text


def _digest_rows(digest_array, n: int) -> list:
    """Per-row rewards digests (lists of floats, or None) of an Arrow list array (None when the field is absent)."""
    if digest_array is None:
        return [None] * n
    return digest_array.to_pylist()


def _value_counts(array):
    import pyarrow.compute as pc

    counts = pc.value_counts(array)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


def read_reference_provenance(dataset, column: str = "ref_rewards") -> dict | None:
    """How the reference rewards in `dataset[column]` were made, or None if the dataset has no provenance column.

    Returns the ``build`` record written by :func:`build_reference_rewards` (reference model, reward functions with
    weights, prompt format, sampling settings, K, seed, version). Rows from several builds (e.g. concatenated
    datasets) raise a `ValueError` saying how many builds there are; use :func:`read_reference_provenances` for them.
    """
    builds = read_reference_provenances(dataset, column)
    if builds is None:
        return None
    if len(builds) > 1:
        raise ValueError(
            f"The rows of column {column!r} come from {len(builds)} different reference builds "
            f"({', '.join(str(n) for _, n in builds)} rows): use read_reference_provenances() to get each."
        )
    return builds[0][0]


def read_reference_provenances(dataset, column: str = "ref_rewards") -> list[tuple[dict, int]] | None:
    """Every distinct ``build`` record in `dataset`'s provenance column with its number of rows (None: no column).

    Raises `ValueError` if the column cannot be decoded, or if some rows' build record is in none of the rows (a
    small subset of a large build exported to a row-only format; see docs/reference_rewards.md, "Provenance")."""
    name = provenance_column_name(column)
    columns = getattr(dataset, "column_names", None)
    if columns is None or name not in columns:
        return None
    read = read_provenance_column(dataset, name)
    if read.problems:
        raise ValueError(f"column {name!r}: " + "; ".join(read.problems))
    if read.missing:
        raise ValueError(_missing_message(name, read.missing))
    return [(_decode(text, name), count) for text, count in read.builds()]


def _missing_message(name: str, missing: dict[str, int]) -> str:
    rows = sum(missing.values())
    return (
        f"column {name!r}: {rows} row(s) belong to build(s) {sorted(missing)} whose record none of these rows carries "
        f"(a build stores its record in one row out of every {ANCHOR_STRIDE}, or in every row of a build of up "
        f"to {ANCHOR_ALL_ROWS_UP_TO} rows; this looks like a small subset of a large build saved to a row-only format)"
    )


def _decode(text, name: str) -> dict:
    try:
        build = json.loads(text)
    except (TypeError, ValueError):
        raise ValueError(f"column {name!r} holds an unreadable provenance record: {str(text)[:80]!r}") from None
    if not isinstance(build, dict) or "format" not in build:
        raise ValueError(f"column {name!r} holds a record that is not reference provenance: {str(text)[:80]!r}")
    return build


# ---------------------------------------------------------------------------------------------------------------------
# Rewards digests of a dataset's reference-rewards column


def current_rewards_digests(dataset, column: str, max_iterable_rows: int = 1000):
    """(digests, scales): each row's :func:`rewards_digest` of `dataset[column]` as it is now (a list of floats, None
    for a row that is not a reward list) and its largest |reward| (the tolerance's scale). Arrow-vectorised for
    map-style datasets (160k rows × K = 16: ~0.5 s with the comparison, on a loaded 2-core machine)."""
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        rows = [example.get(column) for _, example in zip(range(max_iterable_rows), dataset)]
        return [_python_digest(r) for r in rows], [_python_scale(r) for r in rows]
    import numpy as np
    import pyarrow as pa

    digests: list = []
    scales: list = []
    for table in dataset.select_columns([column]).with_format("arrow").iter(batch_size=16384):
        array = table.column(column).combine_chunks()
        if pa.types.is_struct(array.type):
            names = sorted(array.type.field(i).name for i in range(array.type.num_fields))
            parts = [_list_moments(array.field(n)) for n in names]
            valid = np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
            for i in range(len(array)):
                if not valid[i]:
                    digests.append(None)
                    scales.append(0.0)
                    continue
                present = [p for p in parts if p[3][i]]
                digests.append([x for p in present for x in (p[0][i], p[1][i])])
                scales.append(max((p[2][i] for p in present), default=0.0))
        elif pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
            mean, std, absmax, valid = _list_moments(array)
            digests.extend([[m, s] if ok else None for m, s, ok in zip(mean.tolist(), std.tolist(), valid)])
            scales.extend(absmax.tolist())
        else:
            digests.extend([None] * len(array))
            scales.extend([0.0] * len(array))
    return digests, scales


def _list_moments(list_array):
    """(mean, std, max |value|, valid) per row of an Arrow list array of numbers; empty or null rows are not valid."""
    import numpy as np
    import pyarrow as pa

    n = len(list_array)
    offsets = np.asarray(list_array.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    values = list_array.values.cast(pa.float64()).to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    offsets = offsets - offsets[0]
    lengths = np.diff(offsets)
    valid = np.asarray(list_array.is_valid().to_numpy(zero_copy_only=False), dtype=bool) & (lengths > 0)
    mean, std, absmax = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n)
    nonempty = lengths > 0
    if values.size:
        starts = offsets[:-1][nonempty]
        count = lengths[nonempty]
        mean[nonempty] = np.add.reduceat(values, starts) / count
        deviation = values - np.repeat(mean[nonempty], count)
        std[nonempty] = np.sqrt(np.add.reduceat(deviation * deviation, starts) / count)
        absmax[nonempty] = np.maximum.reduceat(np.abs(values), starts)
    return mean, std, absmax, valid


def _python_digest(value):
    try:
        if isinstance(value, dict) or (isinstance(value, (list, tuple)) and value):
            return rewards_digest(value)
    except (TypeError, ValueError):
        pass
    return None


def _python_scale(value) -> float:
    try:
        lists = value.values() if isinstance(value, dict) else [value]
        return max((abs(float(v)) for entry in lists if entry for v in entry), default=0.0)
    except (TypeError, ValueError):
        return 0.0


def digest_mismatches(recorded: list, current: list, scales: list) -> list[int]:
    """Rows whose recorded rewards digest does not match the current one within the tolerance (a row without a
    recorded digest is not compared)."""
    bad = []
    for i, (rec, cur, scale) in enumerate(zip(recorded, current, scales)):
        if rec is None:
            continue
        if cur is None or len(rec) != len(cur):
            bad.append(i)
            continue
        tol = DIGEST_RTOL * (scale if math.isfinite(scale) else 0.0) + DIGEST_ATOL
        if not all(a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tol
                   for a, b in zip(rec, cur)):
            bad.append(i)
    return bad


# ---------------------------------------------------------------------------------------------------------------------
# Comparing with a trainer


def describe_trainer(trainer) -> dict:
    """The run's side of the comparison, read from `trainer` cheaply (no forward pass, no gather).

    Uses `trainer.accelerator.unwrap_model` for the policy and reward models (DDP / DeepSpeed engines), looks through
    PEFT, and reads the user's reward weights (`ctrl_reward_weights` once set, RLOO's `reward_weights` before)."""
    accelerator = getattr(trainer, "accelerator", None)

    from torch import nn

    from .sampling import SamplingSettings

    def unwrap(model):
        return accelerator.unwrap_model(model) if accelerator is not None and isinstance(model, nn.Module) else model

    args = trainer.args
    weights = getattr(trainer, "ctrl_reward_weights", None)
    if weights is None:
        weights = trainer.reward_weights
    weights = [float(w) for w in (weights.tolist() if hasattr(weights, "tolist") else weights)]
    funcs = [reward_func_identity(unwrap(f)) for f in trainer.reward_funcs]
    names = getattr(trainer, "ctrl_reward_func_names", None) or getattr(trainer, "reward_func_names", None) or []
    return {
        "reference_model": model_identity(unwrap(trainer.model)),
        "reward_funcs": funcs,
        "reward_func_names": list(names),
        "reward_weights": weights,
        "chat_template_sha256": chat_template_sha256(trainer.processing_class),
        "chat_template_kwargs": json.loads(json.dumps(getattr(args, "chat_template_kwargs", None) or {}, default=repr, sort_keys=True)),
        # the values TRL's generate uses: min_p=None takes the policy's generation config (transformers) or 0 (vLLM)
        "sampling": SamplingSettings.from_args(args).resolved(
            unwrap(trainer.model), sampler="vllm" if getattr(args, "use_vllm", False) else "transformers"
        ).record(),
    }


def _models_match(recorded: dict, current: dict) -> bool:
    if recorded.get("fingerprint") and current.get("fingerprint"):
        return recorded["fingerprint"] == current["fingerprint"]  # excuses a copied / renamed directory
    if recorded.get("revision") and current.get("revision") and recorded["revision"] != current["revision"]:
        return False
    return normalise_model_name(recorded.get("name", "")) == normalise_model_name(current.get("name", ""))


def _callables_match(recorded: str, current: str) -> bool:
    """`module:qualname` equal; a function defined in a script is `__main__:f` there and `script:f` when imported,
    so `__main__` matches any module with the same qualname."""
    if recorded == current:
        return True
    rec_module, _, rec_qual = recorded.rpartition(":")
    cur_module, _, cur_qual = current.rpartition(":")
    return rec_qual == cur_qual and "__main__" in (rec_module, cur_module)


def _reward_matches(recorded: dict, current: dict) -> bool:
    if recorded.get("kind") != current.get("kind"):
        return False
    if recorded.get("kind") == "model":
        return _models_match(recorded, current)
    return _callables_match(str(recorded.get("name")), str(current.get("name")))


def _describe_model(identity: dict) -> str:
    text = repr(identity.get("name"))
    if identity.get("revision"):
        text += f" @ {identity['revision']}"
    if identity.get("fingerprint"):
        text += f" (weights {identity['fingerprint']})"
    return text


def _describe_reward(identity: dict) -> str:
    if identity.get("kind") == "model":
        return "reward model " + _describe_model(identity)
    return f"callable {identity.get('name')}"


def _identity_tail(identity: dict) -> str:
    """A reward's TRL-style name from its identity (when the run's names are not known)."""
    name = str(identity.get("name", ""))
    return name.rpartition(":")[2] if identity.get("kind") == "callable" else name.split("/")[-1]


def compare_provenance(build: dict, run: dict, prompt_format: str | None) -> list[str]:
    """Each difference between a recorded ``build`` record and the run (:func:`describe_trainer`), as one line naming
    the field, the recorded value, the run's value and the fix. `prompt_format` is the training rows' format."""
    problems: list[str] = []
    recorded_model, current_model = build.get("reference_model") or {}, run["reference_model"]
    if recorded_model and not _models_match(recorded_model, current_model):
        why = " (same name, different weights: was the model changed in place?)" if (
            normalise_model_name(recorded_model.get("name", "")) == current_model.get("name")
        ) else ""
        problems.append(
            f"reference model: recorded {_describe_model(recorded_model)}, this run trains {_describe_model(current_model)}"
            f"{why}. CTRL calibrates against samples of the policy it starts from. Fix: pass the model the references "
            "were built with as `model=`, or rebuild the references from this model."
        )
    recorded_funcs = build.get("reward_funcs") or []
    current_funcs, names = run["reward_funcs"], run.get("reward_func_names") or []
    try:
        recorded_rewards = per_reward_identities(build)
    except ValueError as error:
        problems.append(f"reward functions: {error}")
        recorded_rewards = {}
    if recorded_rewards is not None:
        # Each reward is stored unweighted under its name: compare by name, in any order; weights do not enter.
        if len(names) != len(current_funcs):
            names = [_identity_tail(identity) for identity in current_funcs]
        problems += compare_reward_identities(recorded_rewards, dict(zip(names, current_funcs)))
    elif len(recorded_funcs) != len(current_funcs):
        problems.append(
            f"reward functions: recorded {len(recorded_funcs)} ({', '.join(_describe_reward(f) for f in recorded_funcs)}), "
            f"this run has {len(current_funcs)} ({', '.join(_describe_reward(f) for f in current_funcs)}). Fix: pass "
            "the same reward_funcs (and reward_weights) the references were built with, or rebuild the references "
            "with this run's."
        )
    else:
        for i, (recorded, current) in enumerate(zip(recorded_funcs, current_funcs)):
            if not _reward_matches(recorded, current):
                label = f" {names[i]!r}" if i < len(names) else ""
                problems.append(
                    f"reward function {i}{label}: recorded {_describe_reward(recorded)}, this run "
                    f"{_describe_reward(current)}. Fix: pass the reward function the references were scored with, "
                    "or rebuild the references with this one (build_reference_rewards(reward_funcs=...) / "
                    "--reward-model)."
                )
        recorded_weights = [float(f.get("weight", 1.0)) for f in recorded_funcs]
        current_weights = run["reward_weights"]
        if len(recorded_weights) == len(current_weights) and not all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(recorded_weights, current_weights)
        ):
            problems.append(
                f"reward weights: recorded {recorded_weights}, this run {[round(w, 7) for w in current_weights]}. "
                "The reference rewards are the combined sum, so the weights must be equal. Fix: set "
                f"CTRLConfig.reward_weights={recorded_weights}, or rebuild with "
                f"reward_weights={[round(w, 7) for w in current_weights]} (--reward-weights)."
            )
    recorded_format = build.get("prompt_format")
    if prompt_format is not None and recorded_format and recorded_format != prompt_format:
        problems.append(
            f"prompt format: the references were sampled from {recorded_format} prompts, this dataset's prompts are "
            f"{prompt_format}. The policy would see differently formatted prompts than the reference samples did. "
            "Fix: train on the prompts the references were built from, or rebuild the references on these prompts."
        )
    elif prompt_format == "conversational":
        recorded_template = build.get("chat_template_sha256")
        if recorded_template and run["chat_template_sha256"] and recorded_template != run["chat_template_sha256"]:
            problems.append(
                f"chat template: recorded sha256 {recorded_template}, this run's processing_class has "
                f"{run['chat_template_sha256']}. Fix: use the tokenizer the references were built with "
                "(processing_class=), or rebuild the references with this tokenizer (tokenizer=)."
            )
        recorded_kwargs = build.get("chat_template_kwargs") or {}
        if recorded_kwargs != (run.get("chat_template_kwargs") or {}):
            problems.append(
                f"chat_template_kwargs: recorded {recorded_kwargs}, this run {run.get('chat_template_kwargs') or {}}. "
                "Fix: set CTRLConfig.chat_template_kwargs to the recorded value, or rebuild with this run's."
            )
    recorded_sampling = build.get("sampling") or {}
    current_sampling = run["sampling"]
    trainer_field = {"max_new_tokens": "max_completion_length"}
    for key in sorted(set(recorded_sampling) | set(current_sampling)):
        recorded, current = recorded_sampling.get(key, "<unset>"), current_sampling.get(key, "<unset>")
        if recorded == current or (
            isinstance(recorded, (int, float)) and isinstance(current, (int, float))
            and math.isclose(recorded, current, rel_tol=1e-9)
        ):
            continue
        config_field = trainer_field.get(key)
        if config_field is not None:
            run_value = f"{config_field}={current}"
            fix = f"set CTRLConfig.{config_field}={recorded}, or rebuild with {key}={current} (--max-new-tokens)"
        elif key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            run_value = f"{key}={current}"
            fix = f"set CTRLConfig.{key}={recorded}, or rebuild the references with {key}={current}"
        elif current == "<unset>":
            run_value = f"generation_kwargs without {key!r}"
            fix = (f"rebuild the references without generation_kwargs[{key!r}], or set "
                   f"CTRLConfig.generation_kwargs[{key!r}]={recorded!r}")
        else:
            run_value = f"generation_kwargs[{key!r}]={current}"
            fix = f"make CTRLConfig.generation_kwargs[{key!r}] match, or rebuild with generation_kwargs={{{key!r}: {current!r}}}"
        problems.append(
            f"{key}: the references were sampled with {key}={recorded}, this run samples with {run_value}. Samples "
            f"drawn differently have a different reward distribution. Fix: {fix}."
        )
    return problems


def _prompt_problem(hashes: list, prompts: list | None, max_report: int = 5) -> str | None:
    if not prompts:
        return None
    changed = [i for i, (h, p) in enumerate(zip(hashes, prompts)) if h is not None and h != prompt_fingerprint(p)]
    if not changed:
        return None
    shown = ", ".join(str(i) for i in changed[:max_report]) + (" ..." if len(changed) > max_report else "")
    return (
        f"prompts: {len(changed)} of {len(prompts)} rows have a different prompt than the one their references were "
        f"sampled for (rows {shown}): the prompts were edited after the build (re-formatted, a system prompt "
        "added...), or reference rewards were attached to the wrong rows. Fix: rebuild the references on the final "
        "prompts."
    )


def _rewards_problem(read: ProvenanceColumn, dataset, column: str, max_report: int = 5) -> str | None:
    """Format 2: rows whose reference rewards are not the ones their provenance row was written for."""
    if read.digests is None or not any(d is not None for d in read.digests):
        return None
    current, scales = current_rewards_digests(dataset, column)
    bad = digest_mismatches(read.digests, current, scales)
    if not bad:
        return None
    shown = ", ".join(str(i) for i in bad[:max_report]) + (" ..." if len(bad) > max_report else "")
    return (
        f"reference rewards: {len(bad)} of {len(read.digests)} rows of {column!r} hold other rewards than the ones "
        f"their provenance row was recorded with (rows {shown}): the column was reordered or replaced after the "
        "build (permuted across rows, or another build's rewards placed under this build's provenance). Calibration "
        "would compare each completion with another prompt's or another build's references. Fix: keep "
        f"{column!r} and its provenance column together (reorder whole rows: shuffle / select / sort the dataset, "
        "never one column), or rebuild the references."
    )


#: Attribute of the trainer holding the build records seen in its datasets (id -> record): a small eval split whose
#: rows carry no copy of their record takes it from the training set.
_TRAINER_RECORDS = "_ctrl_reference_provenance_records"


def check_reference_provenance(trainer, dataset, split: str) -> None:
    """Compare the provenance recorded in `dataset` with `trainer`'s settings (see `CTRLConfig.reference_provenance_check`).

    With `"raise"` (default) every difference — reference model, each reward function, the reward weights, the prompt
    format / chat template, the sampling settings (`max_new_tokens` vs `max_completion_length`, temperature, top-p,
    top-k, generation kwargs), prompts edited after the build, and (format 2) reference rewards that are not the
    ones each row was built with (rows permuted, another build's rewards) — is listed in **one** `ValueError` naming
    the field, the recorded value, the run's value and the fix, plus the override. `"warn"` emits the same text once
    as a :class:`ReferenceProvenanceWarning`; `"off"` skips the check. A dataset without a provenance column (older
    or hand-made), or rows whose build record none of the run's datasets carries, get one warning saying what was
    not checked and how to get provenance. Datasets of format 1 (built before the rewards digest) keep their checks.
    """
    mode = getattr(trainer.args, "reference_provenance_check", "raise")
    if mode == "off":
        logger.info("%s: reference provenance check is off (CTRLConfig.reference_provenance_check='off').", split)
        return
    column = trainer.args.reference_rewards_column
    name = provenance_column_name(column)
    columns = getattr(dataset, "column_names", None)
    if columns is None or name not in columns:
        warnings.warn(
            f"{split}: no reference provenance column {name!r}, so nothing checks that the reference rewards in "
            f"{column!r} come from this run's reward functions, weights, prompt format, sampling settings and "
            f"reference model (check skipped). {_HOW_TO_GET_PROVENANCE.replace('<column>', column)}",
            ReferenceProvenanceWarning,
            stacklevel=3,
        )
        return
    known = getattr(trainer, _TRAINER_RECORDS, None)
    if not isinstance(known, dict):
        known = {}
        try:
            setattr(trainer, _TRAINER_RECORDS, known)
        except AttributeError:
            pass
    read = None
    try:
        read = read_provenance_column(dataset, name, with_prompts=True)
        problems = [f"provenance: {p}. Fix: rebuild the references with build_reference_rewards." for p in read.problems]
        known.update(read.records)
        decoded = [(_decode(text, name), count) for text, count in read.builds(known)]
    except ValueError as error:
        problems, decoded = [f"provenance: {error}. Fix: rebuild the references with build_reference_rewards."], []
    prompts = read.prompts if read is not None else None
    missing = {sha: n for sha, n in read.missing.items() if sha not in known} if read is not None else {}
    if missing:
        warnings.warn(
            f"{split}: {_missing_message(name, missing)}. The build settings of those rows are not compared with this "
            "run (their prompts and reward digests are). Fix: train on the dataset as built (or a subset kept in "
            "Arrow / save_to_disk), or rebuild the references for this subset.",
            ReferenceProvenanceWarning, stacklevel=3,
        )
    first_prompt = prompts[0] if prompts else None
    from .sampling import is_conversational_prompt

    prompt_format = None if first_prompt is None else ("conversational" if is_conversational_prompt(first_prompt) else "plain")
    run = describe_trainer(trainer)
    for index, (build, count) in enumerate(decoded):
        prefix = f"[build {index + 1} of {len(decoded)}, {count} rows] " if len(decoded) > 1 else ""
        problems += [prefix + p for p in compare_provenance(build, run, prompt_format)]
    if read is not None:
        prompt_problem = _prompt_problem(read.prompt_hashes, prompts)
        if prompt_problem:
            problems.append(prompt_problem)
        if column in columns:
            rewards_problem = _rewards_problem(read, dataset, column)
            if rewards_problem:
                problems.append(rewards_problem)
    if not problems:
        return
    message = (
        f"{split}: the reference rewards in column {column!r} were not made the way this run trains, so calibration "
        f"would compare unlike rewards ({len(problems)} difference{'s' if len(problems) > 1 else ''}, recorded in "
        f"{name!r}):\n" + "\n".join(f"  - {p}" for p in problems) + f"\n{_OVERRIDE}"
    )
    if mode == "warn":
        warnings.warn(message, ReferenceProvenanceWarning, stacklevel=3)
        return
    raise ValueError(message)


__all__ = [
    "ReferenceProvenanceWarning",
    "check_reference_provenance",
    "read_reference_provenance",
    "read_reference_provenances",
    "read_provenance_column",
    "rewards_digest",
    "read_per_reward_identities",
    "per_reward_identities",
    "compare_reward_identities",
    "provenance_column_name",
    "weights_fingerprint",
]
