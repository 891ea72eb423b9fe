"""`trl-infalign build-reference`: sample K reference completions per prompt, score them, save a `ref_rewards` column.

    trl-infalign build-reference --model sft-model --reward-model rm --dataset prompts.jsonl --num-samples 16 --output out/
    accelerate launch --multi_gpu --num_processes 8 -m trl_infalign.cli build-reference ...   # sharded
    torchrun --nproc_per_node 8 -m trl_infalign.cli build-reference ...

The output directory is a `save_to_disk` dataset (read it back with `load_from_disk(output)`) that also holds
`ref_rewards.jsonl` (`{"index", "ref_rewards"}` per row), `reference_provenance.json` (how the references were made;
the same record is in the dataset's `ref_rewards_provenance` column, which `CTRLTrainer` checks) and, unless
`--cache-dir` says otherwise, the resumable cache `<output>/cache`: rerun the same command after a crash to resume.
`--output` and the cache directory are probed for writability before anything is loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from . import positive_float, top_k_value, top_p_value


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Reference policy (usually the SFT model): local path or hub id.")
    parser.add_argument(
        "--reward-model", action="append", required=True, dest="reward_models", metavar="PATH",
        help="Sequence-classification reward model (path or hub id); repeat for several (combined with --reward-weights).",
    )
    parser.add_argument("--reward-weights", type=float, nargs="+", default=None, help="One weight per --reward-model.")
    parser.add_argument(
        "--dataset", required=True,
        help="A local .json/.jsonl/.parquet/.csv file, a `save_to_disk` directory, or a hub dataset name.",
    )
    parser.add_argument("--dataset-config", default=None, help="Hub dataset configuration name.")
    parser.add_argument("--split", default="train", help="Split to use (default: train).")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--output-column", default="ref_rewards")
    parser.add_argument("--num-samples", "-k", type=int, default=16, help="K reference samples per prompt (default 16).")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="Prompts per chunk (unit of seeding/caching/sharding).")
    parser.add_argument("--generation-batch-size", type=int, default=None, help="Completions per generate call.")
    parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument("--top-p", type=top_p_value, default=1.0)
    parser.add_argument("--top-k", type=top_k_value, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nonfinite", choices=["raise", "skip"], default="raise", help="NaN/inf reference rewards.")
    parser.add_argument("--keep-completions", action="store_true", help="Also store the reference completions.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output column.")
    parser.add_argument("--output", required=True, help="Output directory.")
    parser.add_argument("--cache-dir", default=None, help="Resumable cache (default: <output>/cache).")
    parser.add_argument("--use-vllm", action="store_true", help="Sample with vLLM (pip install trl-infalign[vllm]).")
    parser.add_argument("--no-progress", action="store_true")


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

    state = resolve_process_state()
    output = Path(args.output)
    cache_dir = Path(args.cache_dir) if args.cache_dir else output / "cache"
    # Before loading the dataset or any model: an unwritable --output used to fail only after the whole build.
    if state.is_main_process:
        probe_writable(output, "--output", "choose a writable output directory, or fix its permissions")
    probe_writable(cache_dir, "--cache-dir" if args.cache_dir else "--cache-dir (default <output>/cache)",
                   "pass a writable --cache-dir, or fix the permissions")
    dataset = load_prompts(args.dataset, args.split, args.dataset_config)
    result, stats = _build_reference_rewards(
        dataset, args.model, list(args.reward_models), num_samples=args.num_samples,
        reward_weights=args.reward_weights, prompt_column=args.prompt_column, output_column=args.output_column,
        keep_completions=args.keep_completions, cache_dir=cache_dir, batch_size=args.batch_size,
        generation_batch_size=args.generation_batch_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, nonfinite=args.nonfinite,
        overwrite=args.overwrite, use_vllm=args.use_vllm, accelerator=state, progress=not args.no_progress,
    )
    if state.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        result.save_to_disk(str(output))  # load_from_disk(output) gives the dataset back
        tmp = output / "ref_rewards.jsonl.tmp"
        with open(tmp, "w") as f:
            for index, values in enumerate(result[args.output_column]):
                f.write(json.dumps({"index": index, "ref_rewards": values}) + "\n")
        os.replace(tmp, output / "ref_rewards.jsonl")
        tmp = output / "reference_provenance.json.tmp"
        tmp.write_text(json.dumps(stats.extra["provenance"], indent=2, sort_keys=True) + "\n")
        os.replace(tmp, output / "reference_provenance.json")
        flat = [v for row in result[args.output_column] for v in row]
        mean = sum(flat) / len(flat)
        std = math.sqrt(sum((v - mean) ** 2 for v in flat) / max(len(flat) - 1, 1))
        lines = [
            f"Reference rewards: {stats.num_rows} rows x K={stats.num_samples} -> {output}",
            f"  reward mean {mean:.4g}, std {std:.4g} ({len(flat)} values)",
            f"  chunks: {stats.num_chunks} ({stats.chunks_resumed} resumed from {cache_dir}), processes: {stats.world_size}",
            f"  time: {stats.seconds:.1f} s",
        ]
        if stats.num_dropped:
            lines.append(f"  dropped {stats.num_dropped} non-finite rewards in {stats.rows_with_dropped} rows")
        print("\n".join(lines), flush=True)
    state.wait_for_everyone()
    return 0
