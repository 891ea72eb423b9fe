"""Is the README's demo row what any machine prints? `examples/quickstart.py` (default settings) over seeds, CPU thread
counts and CPU instruction sets, the things that differ between two fresh clones on two machines.

Float rounding differs with the thread count (the order of a matmul's reductions) and with the instruction set
(`ATEN_CPU_CAPABILITY=avx2` makes torch run its AVX2 kernels on an AVX-512 machine; `default` the scalar ones). Any such
difference changes the training run from its first step on, as a change of seed does; so the seed spread is the
spread a user on another machine should expect, and the thread / instruction-set runs check that nothing else moves.

Run:  python benchmarks/demo_stability.py [--seeds 0 1 2] [--threads 1 2] [--cpu-capabilities native avx2]
      [--parallel 2]
Prints a table and writes benchmarks/results/demo_stability.json.
Target (issue #20 item 7): every run within 0.02 BoN-4 win rate and 10% KL of the README's seed-0 row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alignment_tasks.report import machine_description  # noqa: E402
from kl_budget import ROOT, run_quickstart  # noqa: E402


def run(output: Path, seed: int, threads: int, capability: str, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if capability != "native":
        env["ATEN_CPU_CAPABILITY"] = capability
    row = run_quickstart(output / f"seed{seed}-threads{threads}-{capability}", seed, "adaptive", args.kl_budget,
                         args.steps, args.eval_samples, env=env)
    return {**row, "threads": threads, "cpu_capability": capability}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--cpu-capabilities", nargs="+", default=["native"],
                        help="native (the machine's best), avx512, avx2 or default (scalar); see ATEN_CPU_CAPABILITY.")
    parser.add_argument("--kl-budget", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-samples", type=int, default=512)
    parser.add_argument("--parallel", type=int, default=1, help="Runs at a time (each with its own thread count).")
    parser.add_argument("--reference", type=float, nargs=2, metavar=("KL", "BON4"), default=None,
                        help="The README row to check against (default: the seed-0 run of the first thread count "
                        "and instruction set).")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    output = Path(args.output)
    grid = [(s, t, c) for c in args.cpu_capabilities for t in args.threads for s in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda point: run(output / "demo_stability", *point, args), grid))

    reference_kl, reference_bon4 = args.reference or (rows[0]["kl_k1"], rows[0]["bon4_win_rate"])
    print(f"\nReference row: KL {reference_kl:.3f}, BoN-4 {reference_bon4:.3f}; target: BoN-4 within 0.02, KL within 10%")
    print("| seed | threads | instruction set | KL (k1) [95% CI] | vs reference | BoN-4 win | vs reference | standard win |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        row["kl_vs_reference"] = row["kl_k1"] / reference_kl - 1
        row["bon4_vs_reference"] = row["bon4_win_rate"] - reference_bon4
        low, high = row["kl_k1_ci"]
        print(f"| {row['seed']} | {row['threads']} | {row['cpu_capability']} | {row['kl_k1']:.3f} [{low:.3f}, {high:.3f}] "
              f"| {100 * row['kl_vs_reference']:+.1f}% | {row['bon4_win_rate']:.3f} | {row['bon4_vs_reference']:+.3f} "
              f"| {row['standard_win_rate']:.3f} |")
    kls = [r["kl_k1"] for r in rows]
    bons = [r["bon4_win_rate"] for r in rows]
    worst_kl = max(abs(r["kl_vs_reference"]) for r in rows)
    worst_bon = max(abs(r["bon4_vs_reference"]) for r in rows)
    holds = worst_kl <= 0.10 and worst_bon <= 0.02
    print(f"\nKL {min(kls):.3f}–{max(kls):.3f}, BoN-4 {min(bons):.3f}–{max(bons):.3f} over {len(rows)} runs; worst vs "
          f"reference: KL {100 * worst_kl:.1f}%, BoN-4 {worst_bon:.3f} -> target {'holds' if holds else 'MISSED'}")
    output.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    (output / "demo_stability.json").write_text(json.dumps(
        {"machine": machine, "reference": {"kl_k1": reference_kl, "bon4_win_rate": reference_bon4},
         "worst_kl_relative": worst_kl, "worst_bon4_abs": worst_bon, "target_holds": holds, "rows": rows,
         "steps": args.steps, "eval_samples": args.eval_samples}, indent=2) + "\n")


if __name__ == "__main__":
    main()
