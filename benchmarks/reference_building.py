"""Throughput of the reference pass (`build_reference_rewards`): completions per second vs. generation batch size.

    python benchmarks/reference_building.py                 # tiny model, HF generate, batch sizes 8 / 32 / 128
    python benchmarks/reference_building.py --quick         # < 1 min
    python benchmarks/reference_building.py --vllm          # also vLLM (when installed; needs a GPU)

Everything is built offline with `trl_infalign.tiny` (a byte-level BPE tokenizer, a tiny Llama policy and a tiny Llama
reward model). The numbers measure the pipeline (sampling + decoding + reward model + bookkeeping) on a toy model;
for a real model, generation dominates and the cost is K x prompts generations of up to `max_new_tokens` tokens.
Prints a table and writes `reference_building.json` to `--output` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="Small run (< 1 min).")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="Completions per generate call.")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--num-samples", type=int, default=16, help="K")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--vllm", action="store_true", help="Also time use_vllm=True (skipped if vLLM is missing).")
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset

    from trl_infalign.reference import _build_reference_rewards
    from trl_infalign.tiny import SAMPLE_TEXTS, build_tiny_policy, build_tiny_reward_model, build_tokenizer

    batch_sizes = args.batch_sizes or [8, 32, 128]
    num_prompts = args.num_prompts or (8 if args.quick else 64)
    max_new_tokens = args.max_new_tokens or (8 if args.quick else 32)
    k = args.num_samples
    device = "cuda" if torch.cuda.is_available() else "cpu"

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(SAMPLE_TEXTS * 8, vocab_size=400)
        policy = build_tiny_policy(tokenizer, Path(tmp) / "policy", hidden_size=args.hidden_size)
        build_tiny_reward_model(tokenizer, Path(tmp) / "reward")
        prompts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)].split(",")[0][: 8 + i % 12] for i in range(num_prompts)]
        dataset = Dataset.from_dict({"prompt": prompts})
        # Warm-up (model loading, first-call overheads) outside the timings.
        _build_reference_rewards(dataset.select(range(2)), policy, str(Path(tmp) / "reward"), num_samples=2,
                                 max_new_tokens=4, progress=False)
        backends = [("hf", bs) for bs in batch_sizes]
        if args.vllm:
            if importlib.util.find_spec("vllm") is None:
                print("vLLM is not installed: skipping the vLLM row (pip install trl-infalign[vllm]).")
            else:
                backends.append(("vllm", None))
        for backend, bs in backends:
            # One chunk holds enough prompts to fill `bs` completions (at least one prompt).
            chunk = max(1, (bs or 32 * k) // k)
            start = time.perf_counter()
            out, stats = _build_reference_rewards(
                dataset, policy, str(Path(tmp) / "reward"), num_samples=k, batch_size=chunk, generation_batch_size=bs,
                max_new_tokens=max_new_tokens, use_vllm=backend == "vllm", progress=False,
            )
            seconds = time.perf_counter() - start
            n = num_prompts * k
            rows.append({
                "backend": backend, "generation_batch_size": bs, "prompts_per_chunk": chunk, "num_prompts": num_prompts,
                "num_samples": k, "max_new_tokens": max_new_tokens, "completions": n, "seconds": round(seconds, 3),
                "completions_per_s": round(n / seconds, 1), "prompts_per_s": round(num_prompts / seconds, 2),
            })
            print(f"  {backend:5s} batch {str(bs):>5s}: {n / seconds:8.1f} completions/s ({seconds:.2f} s)", flush=True)

    header = f"{'backend':8s} {'gen batch':>9s} {'prompts/chunk':>13s} {'completions':>11s} {'seconds':>8s} {'compl/s':>9s}"
    print("\nReference pass throughput (tiny Llama, hidden %d, K=%d, max_new_tokens=%d, %s)" % (
        args.hidden_size, k, max_new_tokens, device))
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['backend']:8s} {str(r['generation_batch_size']):>9s} {r['prompts_per_chunk']:>13d} "
              f"{r['completions']:>11d} {r['seconds']:>8.2f} {r['completions_per_s']:>9.1f}")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "reference_building",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "quick": args.quick,
        "hidden_size": args.hidden_size,
        "rows": rows,
    }
    (output / "reference_building.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {output / 'reference_building.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
