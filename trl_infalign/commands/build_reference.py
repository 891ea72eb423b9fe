"""`trl-infalign build-reference`: sample K reference completions per prompt, score them, save a `ref_rewards` column.

    trl-infalign build-reference --model sft-model --reward-model rm --dataset prompts.jsonl --num-samples 16 --output out/
    trl-infalign build-reference ... --reward-model helpful --reward-model harmless --per_reward   # {name: [K floats]}
    accelerate launch --multi_gpu --num_processes 8 -m trl_infalign.cli build-reference ...   # sharded
    torchrun --nproc_per_node 8 -m trl_infalign.cli build-reference ...

The output directory is a `save_to_disk` dataset (read it back with `load_from_disk(output)`) that also holds
`ref_rewards.jsonl` (`{"index", "ref_rewards"}` per row), `reference_provenance.json` (how the references were made;
the same record is in the dataset's `ref_rewards_provenance` column, which `CTRLTrainer` checks) and, unless
`--cache-dir` says otherwise, the resumable cache `<output>/cache`: rerun the same command after a crash to resume.
`--output` and the cache directory are probed for writability before anything is loaded.

Every option after the CLI's own (`--model`, `--reward-model`, `--dataset`, `--dataset-config`, `--split`, `--output`,
`--no-progress`) is a `trl_infalign.ReferenceConfig` field, added as `TrlParser((ReferenceConfig,))` adds it
(`--num_samples` and `--num-samples`; dict fields as JSON): a new reference option is defined once, in the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path

def add_parser(parser: argparse.ArgumentParser) -> None:
    """The CLI's own arguments (what to read and where to write), then every `ReferenceConfig` field, as
    `TrlParser((ReferenceConfig,))` adds them: `--num_samples` and `--num-samples`, JSON for the dict fields."""
    parser.add_argument("--model", required=True, help="Reference policy (usually the SFT model): local path or hub id.")
    parser.add_argument(
        "--reward-model", action="append", required=True, dest="reward_models", metavar="PATH",
        help="Sequence-classification reward model (path or hub id); repeat for several (combined with --reward-weights, "
        "or stored per reward with --per_reward).",
    )
    parser.add_argument(
        "--dataset", required=True,
        help="A local .json/.jsonl/.parquet/.csv file, a `save_to_disk` directory, or a hub dataset name.",
    )
    parser.add_argument("--dataset-config", default=None, help="Hub dataset configuration name.")
    parser.add_argument("--split", default="train", help="Split to use (default: train).")
    parser.add_argument("--output", required=True, help="Output directory.")
    parser.add_argument("--no-progress", action="store_true")
    add_config_arguments(parser.add_argument_group("reference settings (trl_infalign.ReferenceConfig)"))


def add_config_arguments(group) -> None:
    """Add one option per `ReferenceConfig` field to `group`, exactly as `HfArgumentParser` / `TrlParser` does."""
    import copy
    import dataclasses
    import typing

    from transformers import HfArgumentParser

    from ..reference_config import ReferenceConfig

    hints = typing.get_type_hints(ReferenceConfig)
    for config_field in dataclasses.fields(ReferenceConfig):
        config_field = copy.copy(config_field)  # HfArgumentParser rewrites `type` in place
        config_field.type = hints[config_field.name]
        HfArgumentParser._parse_dataclass_field(group, config_field)


def config_from_args(args: argparse.Namespace):
    """The `ReferenceConfig` of parsed CLI arguments (its checks raise `ValueError` naming the field)."""
    from ..reference_config import ReferenceConfig

    return ReferenceConfig(**{name: getattr(args, name) for name in ReferenceConfig.field_names()})


def load_prompts(path: str, split: str = "train", config: str | None = None):
    """A `datasets.Dataset` from a local file, a `save_to_disk` directory, or a hub name."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_file():
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
        if builder is None:
            raise ValueError(f"Unsupported dataset file {path}: use .json, .jsonl, .parquet or .csv.")
        data = load_dataset(builder, data_files=str(p), split="train")
    elif p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        data = load_from_disk(str(p))
    else:
        data = load_dataset(path, config, split=split)
    if isinstance(data, DatasetDict):
        if split not in data:
            raise ValueError(f"Split {split!r} not in {path} (splits: {list(data)}): pass --split.")
        data = data[split]
    assert isinstance(data, Dataset)
    return data


def run(args: argparse.Namespace) -> int:
    from ..reference import _build_reference_rewards, probe_writable, resolve_process_state

    config = config_from_args(args)
    state = resolve_process_state()
    output = Path(args.output)
    cache_dir = Path(config.cache_dir) if config.cache_dir else output / "cache"
    # Before loading the dataset or any model: an unwritable --output used to fail only after the whole build.
    if state.is_main_process:
        probe_writable(output, "--output", "choose a writable output directory, or fix its permissions")
    probe_writable(cache_dir, "--cache-dir" if config.cache_dir else "--cache-dir (default <output>/cache)",
                   "pass a writable --cache-dir, or fix the permissions")
    dataset = load_prompts(args.dataset, args.split, args.dataset_config)
    config = dataclasses.replace(config, cache_dir=str(cache_dir))
    result, stats = _build_reference_rewards(
        dataset, args.model, list(args.reward_models), config, accelerator=state, progress=not args.no_progress,
    )
    column = config.output_column
    if state.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        result.save_to_disk(str(output))  # load_from_disk(output) gives the dataset back
        tmp = output / "ref_rewards.jsonl.tmp"
        with open(tmp, "w") as f:
            for index, values in enumerate(result[column]):  # per-reward rows are JSON objects {name: [...]}
                f.write(json.dumps({"index": index, "ref_rewards": values}) + "\n")
        os.replace(tmp, output / "ref_rewards.jsonl")
        tmp = output / "reference_provenance.json.tmp"
        tmp.write_text(json.dumps(stats.extra["provenance"], indent=2, sort_keys=True) + "\n")
        os.replace(tmp, output / "reference_provenance.json")
        rows = list(result[column])
        per_reward = {name: [row[name] for row in rows] for name in stats.extra["reward_names"]} if stats.extra["per_reward"] else {"": rows}
        lines = [f"Reference rewards: {stats.num_rows} rows x K={stats.num_samples} -> {output}"]
        for name, values in per_reward.items():
            lines.append(f"  {name + ': ' if name else ''}{_summary(values)}")
        lines += [
            f"  chunks: {stats.num_chunks} ({stats.chunks_resumed} resumed from {cache_dir}), processes: {stats.world_size}",
            f"  time: {stats.seconds:.1f} s",
        ]
        if stats.num_dropped:
            lines.append(f"  dropped {stats.num_dropped} non-finite rewards in {stats.rows_with_dropped} rows")
        print("\n".join(lines), flush=True)
    state.wait_for_everyone()
    return 0


def _summary(rows) -> str:
    flat = [v for row in rows for v in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((v - mean) ** 2 for v in flat) / max(len(flat) - 1, 1))
    return f"reward mean {mean:.4g}, std {std:.4g} ({len(flat)} values)"
