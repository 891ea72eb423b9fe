"""Does `kl_budget` hold? The quickstart (tiny LM, VADER, CTRL for Best-of-4) on several seeds, with the adaptive KL
controller and with the theory's open-loop beta, measured by the evaluator's per-completion KL (k1, 95 % CI).

Run:  python benchmarks/kl_budget.py [--seeds 0 1 2] [--modes adaptive fixed] [--kl-budget 1.0]
Prints a table and writes benchmarks/results/kl_budget.json. Target: adaptive within ±15 % of the budget on every seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_quickstart(output: Path, seed: int, mode: str, budget: float, steps: int, eval_samples: int,
                   env: dict | None = None) -> dict:
    """One `examples/quickstart.py` run in a subprocess (`env`: its environment, e.g. a thread count); returns its
    after-training KL, win rates and betas from results.json."""
    command = [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output", str(output), "--seed", str(seed),
               "--kl-control", mode, "--kl-budget", str(budget), "--steps", str(steps), "--eval-samples", str(eval_samples)]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    results = json.loads((output / "results.json").read_text())
    after, training = results["after"], results["training"]
    wins = {(w["procedure"], w["n"]): w["estimate"] for w in after["win_rates"]}
    k1 = after["kl"]["k1"]
    return {
        "seed": seed, "kl_control": mode, "kl_budget": budget, "kl_k1": k1["estimate"],
        "kl_k1_ci": [k1["ci_low"], k1["ci_high"]], "kl_k3": after["kl"]["k3"]["estimate"],
        "relative_error": k1["estimate"] / budget - 1.0, "bon4_win_rate": wins[("bon", 4)],
        "standard_win_rate": wins[("standard", 1)], "initial_beta": training["initial_beta"],
        "final_beta": training["final_beta"], "wall_s": time.perf_counter() - start,
    }


def format_row(row: dict) -> str:
    low, high = row["kl_k1_ci"]
    return (f"| {row['kl_control']} | {row['seed']} | {row['kl_budget']:g} | {row['kl_k1']:.3f} [{low:.3f}, {high:.3f}] "
            f"| {100 * row['relative_error']:+.1f}% | {row['bon4_win_rate']:.3f} "
            f"| {row['final_beta'] / row['initial_beta']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["adaptive", "fixed"], choices=["adaptive", "fixed"])
    parser.add_argument("--kl-budget", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-samples", type=int, default=512,
                        help="Samples per prompt and model for the evaluation (the quickstart's default).")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    output = Path(args.output)
    rows = []
    for mode in args.modes:
        for seed in args.seeds:
            rows.append(run_quickstart(output / "kl_budget" / f"{mode}-seed{seed}", seed, mode, args.kl_budget, args.steps,
                                      args.eval_samples))
            print(format_row(rows[-1]), flush=True)
    print("\n| kl_control | seed | budget | KL per completion (k1) [95% CI] | error | BoN-4 win | final/initial beta |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(format_row(row))
    for mode in args.modes:
        errors = [abs(r["relative_error"]) for r in rows if r["kl_control"] == mode]
        print(f"{mode}: worst |error| {100 * max(errors):.1f}% over {len(errors)} seeds")
    output.mkdir(parents=True, exist_ok=True)
    (output / "kl_budget.json").write_text(
        json.dumps({"rows": rows, "steps": args.steps, "eval_samples": args.eval_samples}, indent=2) + "\n")


if __name__ == "__main__":
    main()
