"""Helper launched by tests/test_reference.py: build reference rewards in a separate process.

    python build_reference_script.py --policy P --reward-model R --data prompts.jsonl --out result.json
        [--cache-dir DIR] [--sleep S] [--no-cache-too]

Works as a single process, under `torchrun --nproc_per_node N` and `accelerate launch --multi_gpu`. Rank 0 writes the
merged `ref_rewards` (and, with --no-cache-too, a second build without cache_dir, merged with gather_object) to --out;
every rank writes `<out>.rank<r>` with the chunks it computed itself, those a concurrent builder on the same
cache_dir finished meanwhile, and those resumed from the cache.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SETTINGS = dict(num_samples=3, batch_size=2, max_new_tokens=6, seed=7, reward_weights=[1.0, 0.5])


def length_reward(completions, **kwargs):
    """Deterministic callable reward; sleeps REFERENCE_TEST_SLEEP seconds per call (to be killed mid-build)."""
    time.sleep(float(os.environ.get("REFERENCE_TEST_SLEEP", "0")))
    return [len(c) / 10.0 for c in completions]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward-model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--no-cache-too", action="store_true")
    args = parser.parse_args()
    os.environ["REFERENCE_TEST_SLEEP"] = str(args.sleep)

    import torch
    from datasets import load_dataset

    from trl_infalign.reference import _build_reference_rewards, resolve_process_state

    torch.set_num_threads(1)
    state = resolve_process_state()  # PartialState(cpu=True) under a CPU-only multi-process launch
    dataset = load_dataset("json", data_files=args.data, split="train")
    funcs = [args.reward_model, length_reward]
    result, stats = _build_reference_rewards(
        dataset, args.policy, funcs, cache_dir=args.cache_dir, accelerator=state, progress=False, **SETTINGS
    )
    out = {"ref_rewards": list(result["ref_rewards"]), "world_size": state.num_processes}
    if args.no_cache_too:
        again, _ = _build_reference_rewards(dataset, args.policy, funcs, accelerator=state, progress=False, **SETTINGS)
        out["no_cache"] = list(again["ref_rewards"])
    with open(f"{args.out}.rank{state.process_index}", "w") as f:
        json.dump({"chunks_computed": stats.chunks_computed, "chunks_by_others": stats.chunks_by_others,
                   "chunks_resumed": stats.chunks_resumed, "rank": state.process_index}, f)
    if state.is_main_process:
        with open(args.out, "w") as f:
            json.dump(out, f)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
