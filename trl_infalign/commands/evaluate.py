"""`trl-infalign evaluate`: standard / BoN-N / WoN-N win rates and KL of a policy against its reference.

    trl-infalign evaluate --model ctrl-out --ref-model sft --reward-model rm --dataset prompts.jsonl \\
        --num-prompts 256 --num-samples 32 --n 1 2 4 8 16 32 --output eval/
    trl-infalign evaluate --scored scored.json --n 1 2 4 8 --output eval/     # samples scored elsewhere (vLLM, ...)
    accelerate launch --multi_gpu --num_processes 8 -m trl_infalign.cli evaluate ...   # prompts sharded

`--scored` takes `{"policy_rewards": [[...], ...], "reference_rewards": [[...], ...]}` (one row per prompt, null for a
missing sample), optionally with `"policy_logps"` / `"reference_logps"` (log π and log π_ref of the policy samples) for
the KL. Writes `evaluation.json`, `evaluation.md` and `win_rate_vs_n.png` to `--output` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from . import positive_int


def add_parser(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("models (sample and score here)")
    src.add_argument("--model", help="Policy to evaluate: local path or hub id.")
    src.add_argument("--ref-model", help="Reference policy (usually the SFT model); must share the policy's tokenizer.")
    src.add_argument(
        "--reward-model", action="append", dest="reward_models", metavar="PATH",
        help="Sequence-classification reward model; repeat for several (combined with --reward-weights).",
    )
    src.add_argument("--reward-weights", type=float, nargs="+", default=None, help="One weight per --reward-model.")
    src.add_argument("--dataset", help="A .json/.jsonl/.parquet/.csv file, a `save_to_disk` directory, or a hub name.")
    src.add_argument("--dataset-config", default=None)
    src.add_argument("--split", default="test", help="Split (default: test; a local file is read as one split).")
    src.add_argument("--prompt-column", default="prompt")
    src.add_argument("--num-prompts", type=positive_int, default=None, help="Use the first k prompts.")
    src.add_argument("--num-samples", "-m", type=positive_int, default=32, help="m samples per prompt and model.")
    src.add_argument("--max-new-tokens", type=positive_int, default=64)
    src.add_argument("--batch-size", type=positive_int, default=32, help="Completions per generate call.")
    parser.add_argument("--scored", metavar="FILE.json", help="Already-scored samples instead of models (see above).")
    parser.add_argument("--n", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16, 32], dest="ns",
                        help="N values (filtered to N <= m).")
    parser.add_argument("--procedures", nargs="+", choices=["standard", "bon", "won"], default=["standard", "bon", "won"])
    parser.add_argument("--num-bootstrap", type=int, default=1000)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="Output directory.")
    parser.add_argument("--per-prompt", action="store_true", help="Also store per-prompt win rates in the JSON.")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def _load_scored(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    missing = [k for k in ("policy_rewards", "reference_rewards") if k not in data]
    if missing:
        raise SystemExit(f"error: {path} lacks {missing}: expected {{\"policy_rewards\": [[...]], \"reference_rewards\": [[...]]}}.")

    def matrix(rows, key):
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
            raise SystemExit(f"error: {path}: {key} must be a non-empty list of per-prompt lists.")
        width = max(len(r) for r in rows)
        return [[math.nan if v is None else float(v) for v in r] + [math.nan] * (width - len(r)) for r in rows]

    return {k: matrix(data[k], k) for k in ("policy_rewards", "reference_rewards", "policy_logps", "reference_logps") if k in data}


def run(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate_policy, evaluate_scored

    output = Path(args.output)
    if args.scored:
        if args.model or args.ref_model or args.reward_models or args.dataset:
            raise SystemExit("error: --scored replaces --model/--ref-model/--reward-model/--dataset: give one or the other.")
        data = _load_scored(args.scored)
        result = evaluate_scored(
            data["policy_rewards"], data["reference_rewards"], args.ns, args.procedures,
            data.get("policy_logps"), data.get("reference_logps"), num_bootstrap=args.num_bootstrap,
            confidence=args.confidence, seed=args.seed, metadata={"scored": str(args.scored)},
        )
        is_main = True
    else:
        missing = [flag for flag, v in (("--model", args.model), ("--ref-model", args.ref_model),
                                        ("--reward-model", args.reward_models), ("--dataset", args.dataset)) if not v]
        if missing:
            raise SystemExit(f"error: missing {', '.join(missing)} (or pass --scored FILE.json).")
        from ..sampling import resolve_process_state
        from .build_reference import load_prompts

        state = resolve_process_state()
        dataset = load_prompts(args.dataset, args.split, args.dataset_config)
        if args.prompt_column not in dataset.column_names:
            raise SystemExit(f"error: no column {args.prompt_column!r} in {args.dataset} (columns: {dataset.column_names}).")
        if args.num_prompts is not None:
            dataset = dataset.select(range(min(args.num_prompts, len(dataset))))
        if args.prompt_column != "prompt":
            dataset = dataset.remove_columns([c for c in ["prompt"] if c in dataset.column_names])
            dataset = dataset.rename_column(args.prompt_column, "prompt")
        result = evaluate_policy(
            args.model, args.ref_model, list(args.reward_models), dataset, reward_weights=args.reward_weights,
            num_samples=args.num_samples, ns=args.ns, procedures=args.procedures, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, num_bootstrap=args.num_bootstrap, confidence=args.confidence, seed=args.seed,
            accelerator=state, progress=not args.no_progress,
        )
        result.metadata["dataset"] = args.dataset
        is_main = state.is_main_process
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        result.to_json(output / "evaluation.json", per_prompt=args.per_prompt)
        table = result.to_markdown()
        (output / "evaluation.md").write_text("# Inference-time win rates\n\n" + table + "\n")
        if not args.no_plot:
            try:
                result.plot(output / "win_rate_vs_n.png")
            except ImportError as e:
                print(f"(no plot: {e})")
        print(table, flush=True)
        print(f"\nWrote {output / 'evaluation.json'}, {output / 'evaluation.md'}"
              + ("" if args.no_plot else f", {output / 'win_rate_vs_n.png'}"), flush=True)
    return 0
