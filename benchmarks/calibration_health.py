"""False alarms and power of the step-0 calibration health check (`trl_infalign.health`) on a real tiny LM.

The quickstart's policy (a tiny Llama, VADER sentiment as the reward). Each trial draws a fresh "first training batch"
(4 prompts × 8 completions, as the quickstart's first step) and fresh K = 16 reference samples for its prompts, both
from the policy, and runs the check:
- matched: references and completions sampled and scored alike (every alarm is a false alarm; target rate ≤ 1e-4);
- 10r + 3: the training reward rescaled (same model, other scale and offset);
- max_new_tokens 2 vs 8: references shorter than the training completions (VADER is length-sensitive);
- other reward: references scored with VADER, training with VADER's negative-word count (another "reward model").

Run:  python benchmarks/calibration_health.py [--trials 200]
Prints a table and writes benchmarks/results/calibration_health.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from quickstart import PROMPTS, build_sft_policy, vader_sentiment
    from trl_infalign.health import check_calibration_health
    from trl_infalign.sampling import generate_completions

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sft_path, tokenizer = build_sft_policy(Path(args.output) / "calibration_health" / "sft", seed=0)
    policy = AutoModelForCausalLM.from_pretrained(sft_path).eval()
    prompts = PROMPTS
    negative = {"boring", "bad", "terrible", "dull", "awful", "weak", "sad", "slow", "strange", "long"}

    def other_reward(batch_prompts, completions):  # a different "reward model": minus the count of negative words
        return [-float(sum(w in negative for w in (p + c).split())) for p, c in zip(batch_prompts, completions)]

    cases = {"matched": [], "10r + 3": [], "max_new_tokens 2 vs 8": [], "other reward": []}
    rng = random.Random(0)
    start = time.perf_counter()
    for trial in tqdm(range(args.trials), desc="trials"):
        batch = rng.sample(prompts, 4)
        torch.manual_seed(10_000 + trial)
        ref8 = generate_completions(policy, tokenizer, batch, 16, max_new_tokens=8, progress=False).texts
        ref2 = generate_completions(policy, tokenizer, batch, 16, max_new_tokens=2, progress=False).texts
        completions = generate_completions(policy, tokenizer, batch, 8, max_new_tokens=8, progress=False).texts
        flat_prompts = [p for p in batch for _ in range(8)]
        flat = [c for texts in completions for c in texts]
        rewards = vader_sentiment(flat_prompts, flat)
        refs8 = [vader_sentiment([p] * 16, texts) for p, texts in zip(batch, ref8)]
        refs2 = [vader_sentiment([p] * 16, texts) for p, texts in zip(batch, ref2)]
        rows8 = [row for row in refs8 for _ in range(8)]
        rows2 = [row for row in refs2 for _ in range(8)]
        cases["matched"].append(check_calibration_health(rewards, rows8))
        cases["10r + 3"].append(check_calibration_health([10 * r + 3 for r in rewards], rows8))
        cases["max_new_tokens 2 vs 8"].append(check_calibration_health(rewards, rows2))
        cases["other reward"].append(check_calibration_health(other_reward(flat_prompts, flat), rows8))
    wall = time.perf_counter() - start

    rows = []
    for case, results in cases.items():
        alarms = sum(h.failed for h in results)
        rows.append({
            "case": case, "trials": len(results), "alarms": alarms, "alarm_rate": alarms / len(results),
            "mean_calibrated": sum(h.mean_calibrated for h in results) / len(results),
            "median_p_value": sorted(h.p_value for h in results)[len(results) // 2],
        })
    print("\n| case | trials | alarms | alarm rate | mean c | median p |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['trials']} | {row['alarms']} | {row['alarm_rate']:.3f} | "
              f"{row['mean_calibrated']:.3f} | {row['median_p_value']:.2g} |")
    print(f"\n{args.trials} trials in {wall:.0f} s (4 prompts x 8 completions, K = 16, false-alarm rate 1e-4)")
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "calibration_health.json").write_text(
        json.dumps({"rows": rows, "trials": args.trials, "batch": "4 prompts x 8 completions", "K": 16}, indent=2) + "\n")


if __name__ == "__main__":
    main()
