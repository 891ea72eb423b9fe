"""Step-time overhead of `CTRLTrainer` over plain `RLOOTrainer` (and of `CTRLGRPOTrainer` over plain `GRPOTrainer`).

    python benchmarks/trainer_overhead.py --quick                 # < 3 min on 2 CPU cores
    python benchmarks/trainer_overhead.py                         # more steps and repetitions
    python benchmarks/trainer_overhead.py --quick --pair grpo     # CTRL-GRPO vs GRPO (trainer_overhead_grpo.json)
    python benchmarks/trainer_overhead.py --pair grpo --repetitions 12 --steps 12 --threads 1   # docs/grpo.md's figure

Both trainers get the same tiny Llama policy, the same tiny Llama reward model (plain RLOO trains on its raw reward;
CTRL on the same reward calibrated against the dataset's `ref_rewards` column and transformed), the same prompts and
seed. Runs are interleaved (A B A B ...) so that drifting machine load hits both alike; the first `--warmup` steps of
each run are dropped. Reported: median step time of each, their ratio (per repetition and pooled; target <= 1.03), the
spread of the per-repetition ratios (quartiles, range, bootstrap 95 % CI of their median), and
a micro-measurement of CTRL's reward hand-off alone: `CTRLTrainer._calculate_rewards` (reward model + gather +
calibrate + transform + metrics) against RLOO's `_calculate_rewards` on the same batch, interleaved, per call.
Prints a table and writes `trainer_overhead.json` to `--output` (default benchmarks/results).

`--ks 16,64,256 --batch-size 1024` repeats the measurement at each K (reference rewards per prompt) and reports the
hand-off (CTRL's `_calculate_rewards` minus RLOO's, per batch) as a share of a RLOO step at each K, the large-K case of
issue #18 (target: <= 3 % at K = 256); written to `trainer_overhead_ks.json`:

    python benchmarks/trainer_overhead.py --ks 16,64,256 --batch-size 1024 --quick --repetitions 1 --steps 3 --warmup 1

`--pair grpo` does the same for GRPO: plain `GRPOTrainer` and `CTRLGRPOTrainer` with the same β, `scale_rewards="none"`
and `loss_type="dr_grpo"` (CTRL-GRPO's required/default settings, so that both run the same loss), written to
`trainer_overhead_grpo.json`. CTRL-GRPO adds no forward pass: its per-completion KL comes from the log-probs GRPO
computes anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._start = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def ratio_spread(ratios: list[float], seed: int = 0, resamples: int = 2000) -> dict:
    """Quartiles, range and a percentile-bootstrap 95 % CI of the median of the per-repetition ratios (each A/B pair's
    runs share the machine's load of the moment, so their ratio is the paired measurement)."""
    import random

    rng = random.Random(seed)
    ordered = sorted(ratios)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else (ordered[0],) * 3
    medians = sorted(statistics.median(rng.choices(ordered, k=len(ordered))) for _ in range(resamples))
    return {"q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1],
            "ci95": [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="Small run (< 3 min on 2 CPU cores).")
    parser.add_argument("--repetitions", type=int, default=None, help="A/B pairs (default 3 quick, 6 full).")
    parser.add_argument("--steps", type=int, default=None, help="Training steps per run (default 8 quick, 20 full).")
    parser.add_argument("--warmup", type=int, default=2, help="Steps dropped at the start of each run.")
    parser.add_argument("--batch-size", type=int, default=16, help="Completions per step.")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=8)
    parser.add_argument("--num-reference", type=int, default=16, help="K reference rewards per prompt.")
    parser.add_argument("--ks", default=None,
                        help="Comma-separated K values (e.g. 16,64,256): measure at each, report the hand-off's share "
                        "of a step per K (trainer_overhead_ks.json).")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--micro-calls", type=int, default=None, help="Calls per side in the hand-off micro-benchmark.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pair", choices=["rloo", "grpo"], default="rloo",
                        help="Which TRL trainer CTRL is compared with (default rloo).")
    args = parser.parse_args(argv)
    base = args.pair

    import torch
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from trl_infalign import CTRLConfig, CTRLTrainer
    from trl_infalign.ctrl_grpo_config import CTRLGRPOConfig
    from trl_infalign.ctrl_grpo_trainer import CTRLGRPOTrainer

    plain_config, plain_trainer, ctrl_config, ctrl_trainer = {
        "rloo": (RLOOConfig, RLOOTrainer, CTRLConfig, CTRLTrainer),
        "grpo": (GRPOConfig, GRPOTrainer, CTRLGRPOConfig, CTRLGRPOTrainer),
    }[base]
    extra = {"scale_rewards": "none", "loss_type": "dr_grpo"} if base == "grpo" else {}

    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.repetitions or (3 if args.quick else 6)
    steps = args.steps or (8 if args.quick else 20)
    micro_calls = args.micro_calls or (30 if args.quick else 200)
    if steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    ks = [int(k) for k in args.ks.split(",")] if args.ks else [args.num_reference]
    runs = [measure(args, k, reps, steps, micro_calls, base, plain_config, plain_trainer, ctrl_config, ctrl_trainer,
                    extra) for k in ks]
    meta = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "repetitions": reps, "steps": steps, "warmup": args.warmup, "batch_size": args.batch_size,
        "num_generations": args.num_generations, "max_completion_length": args.max_completion_length,
        "num_reference": ks if args.ks else args.num_reference, "hidden_size": args.hidden_size,
        "micro_calls": micro_calls, "pair": base,
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    name = base.upper()
    if args.ks:
        print()
        print(f"{'K':>5s} {name + ' step (ms)':>15s} {'CTRL step (ms)':>15s} {'CTRL/' + name:>10s} "
              f"{name + ' hand-off':>14s} {'CTRL hand-off':>14s} {'overhead':>10s} {'share':>8s}")
        for k, results in zip(ks, runs):
            med, micro_med = results["median_step_s"], results["handoff_median_s"]
            print(f"{k:5d} {med[base] * 1e3:15.1f} {med['ctrl'] * 1e3:15.1f} {results[f'ratio_ctrl_over_{base}']:10.3f} "
                  f"{micro_med[base] * 1e3:11.2f} ms {micro_med['ctrl'] * 1e3:11.2f} ms "
                  f"{results['handoff_overhead_s'] * 1e3:7.2f} ms {100 * results['handoff_overhead_fraction_of_step']:7.2f}%")
        print(f"(hand-off overhead = CTRL's _calculate_rewards minus {name}'s on one batch of {args.batch_size} "
              f"completions; share = overhead / median {name} step; target <= 3% at K = 256)")
        target = out / ("trainer_overhead_ks.json" if base == "rloo" else f"trainer_overhead_ks_{base}.json")
        target.write_text(json.dumps({"meta": meta, "results": [{"k": k, **r} for k, r in zip(ks, runs)]}, indent=2))
        print(f"wrote {target}")
        return 0
    results = runs[0]
    med, micro_med, per_rep, spread = (results["median_step_s"], results["handoff_median_s"],
                                       results["ratio_per_repetition"], results["ratio_spread"])
    print()
    print(f"{'':28s} {name:>10s} {'CTRL':>10s} {'CTRL/' + name:>10s}")
    print(f"{'median step time (ms)':28s} {med[base] * 1e3:10.1f} {med['ctrl'] * 1e3:10.1f} {results[f'ratio_ctrl_over_{base}']:10.3f}")
    print(f"{'ratio per repetition':28s} " + " ".join(f"{r:.3f}" for r in per_rep)
          + f"  (median {results['ratio_median_of_repetitions']:.3f}; target <= 1.03)")
    print(f"{'ratio spread':28s} quartiles {spread['q1']:.3f} / {spread['q3']:.3f}, range {spread['min']:.3f}-"
          f"{spread['max']:.3f}, 95% bootstrap CI of the median [{spread['ci95'][0]:.3f}, {spread['ci95'][1]:.3f}] "
          f"over {len(per_rep)} A/B pairs")
    print(f"{'_calculate_rewards (ms)':28s} {micro_med[base] * 1e3:10.2f} {micro_med['ctrl'] * 1e3:10.2f} "
          f"{micro_med['ctrl'] / micro_med[base]:10.3f}")
    print(f"CTRL hand-off overhead: {results['handoff_overhead_s'] * 1e3:.2f} ms per batch of {args.batch_size} "
          f"= {100 * results['handoff_overhead_fraction_of_step']:.2f}% of a {name} step")
    target = out / ("trainer_overhead.json" if base == "rloo" else f"trainer_overhead_{base}.json")
    target.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {target}")
    return 0


def measure(args, num_reference: int, reps: int, steps: int, micro_calls: int, base: str, plain_config, plain_trainer,
            ctrl_config, ctrl_trainer, extra) -> dict:
    """Step times (interleaved A/B runs) and the hand-off micro-measurement at K = `num_reference`."""
    import torch
    from datasets import Dataset

    from trl_infalign.tiny import SAMPLE_TEXTS, build_tiny_policy, build_tiny_reward_model, build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = build_tokenizer(SAMPLE_TEXTS * 20, vocab_size=400)
        policy = build_tiny_policy(tokenizer, tmp / "policy", hidden_size=args.hidden_size, seed=args.seed)
        reward_model_path = tmp / "rm"
        build_tiny_reward_model(tokenizer, reward_model_path, hidden_size=32, seed=args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        num_prompts = max(32, args.batch_size // args.num_generations)  # a step's prompts are distinct rows
        prompts = (SAMPLE_TEXTS * (num_prompts // len(SAMPLE_TEXTS) + 1))[:num_prompts]
        ref = torch.randn(len(prompts), num_reference, generator=generator, dtype=torch.float64).tolist()
        plain_data = Dataset.from_dict({"prompt": prompts})
        ctrl_data = Dataset.from_dict({"prompt": prompts, "ref_rewards": ref})
        common = dict(
            per_device_train_batch_size=args.batch_size, num_generations=args.num_generations,
            max_completion_length=args.max_completion_length, max_steps=steps, logging_steps=1000,
            save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=args.seed, beta=0.05,
            disable_tqdm=True, learning_rate=1e-5, **extra,
        )

        def make(kind: str):
            from transformers import AutoModelForSequenceClassification

            rm = AutoModelForSequenceClassification.from_pretrained(str(reward_model_path), num_labels=1)
            out = str(tmp / f"out-{kind}")
            if kind == base:
                return plain_trainer(model=policy, reward_funcs=rm, args=plain_config(output_dir=out, **common),
                                     train_dataset=plain_data, processing_class=tokenizer,
                                     reward_processing_classes=tokenizer)
            config = ctrl_config(output_dir=out, transform="bon:t=4", inference_n=4, min_reference_samples=2, **common)
            return ctrl_trainer(model=policy, reward_funcs=rm, args=config, train_dataset=ctrl_data,
                                processing_class=tokenizer, reward_processing_classes=tokenizer)

        step_times: dict[str, list[list[float]]] = {base: [], "ctrl": []}
        started = time.perf_counter()
        for rep in range(reps):
            for kind in (base, "ctrl") if rep % 2 == 0 else ("ctrl", base):  # A B, B A, ...: no order bias
                trainer = make(kind)
                timer = _step_timer()
                trainer.add_callback(timer)
                trainer.train()
                step_times[kind].append(timer.times[args.warmup:])
                print(f"K={num_reference} rep {rep} {kind:4s}: median step "
                      f"{statistics.median(timer.times[args.warmup:]) * 1e3:7.1f} ms", flush=True)
        train_seconds = time.perf_counter() - started

        # Micro: the reward hand-off alone, on one fixed batch.
        trainer = make("ctrl")
        trainer.model.train()
        batch_prompts = [prompts[i // args.num_generations] for i in range(args.batch_size)]
        inputs = [{"prompt": p, "ref_rewards": ref[i // args.num_generations]} for i, p in enumerate(batch_prompts)]
        completions = [" good fine" if i % 2 else " bad" for i in range(args.batch_size)]
        completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]

        def plain_call():
            with trainer._user_reward_names():
                return plain_trainer._calculate_rewards(trainer, inputs, batch_prompts, completions, completion_ids)

        def ctrl_call():
            return trainer._calculate_rewards(inputs, batch_prompts, completions, completion_ids)

        for _ in range(3):
            plain_call(), ctrl_call()
        micro = {base: [], "ctrl": []}
        for i in range(micro_calls):
            for kind, fn in (((base, plain_call), ("ctrl", ctrl_call)) if i % 2 == 0 else (("ctrl", ctrl_call), (base, plain_call))):
                t0 = time.perf_counter()
                fn()
                micro[kind].append(time.perf_counter() - t0)

    med = {k: statistics.median([t for run in v for t in run]) for k, v in step_times.items()}
    per_rep = [statistics.median(c) / statistics.median(r) for r, c in zip(step_times[base], step_times["ctrl"])]
    micro_med = {k: statistics.median(v) for k, v in micro.items()}
    return {
        "median_step_s": med,
        f"ratio_ctrl_over_{base}": med["ctrl"] / med[base],
        "ratio_per_repetition": per_rep,
        "ratio_median_of_repetitions": statistics.median(per_rep),
        "ratio_spread": ratio_spread(per_rep, seed=args.seed),
        "step_times_s": step_times,
        "handoff_median_s": micro_med,
        "handoff_overhead_s": micro_med["ctrl"] - micro_med[base],
        "handoff_overhead_fraction_of_step": (micro_med["ctrl"] - micro_med[base]) / med[base],
        "train_seconds": train_seconds,
    }


if __name__ == "__main__":
    sys.exit(main())
