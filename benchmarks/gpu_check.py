"""GPU check: CTRL's step-time overhead over TRL's trainers, and the reference pass's speed, on one GPU.

    bash benchmarks/gpu_check.sh                    # the GPU check: < 8 min on one GPU, nothing fetched
    python benchmarks/gpu_check.py --tiny           # the same logic on CPU with a tiny model (~1 min on 2 cores)

What it measures, on a randomly initialised Llama built from a config (no weights: ~0.5 B parameters, 24 layers,
hidden 1280, GQA 20/4 heads, vocab 32 000), bf16 autocast, completions of exactly `--completion-length` tokens (256;
`min_new_tokens` forces the length, so that every run generates the same work):

- step-time ratios CTRLGRPOTrainer / GRPOTrainer and CTRLTrainer / RLOOTrainer. Each pair gets the same policy, the
  same small reward model, the same prompts, seed, β and batch (GRPO with `scale_rewards="none"`,
  `loss_type="dr_grpo"`, CTRL-GRPO's required settings, so both run the same loss). Runs alternate A B, B A, ... so
  that drift hits both alike, the first `--warmup` steps of each run are dropped, and the ratio is the median step
  of one over the other (pooled) and per A/B pair;
- the reference pass (`build_reference_rewards`: sample K completions per prompt with HF generate, score them with
  the reward model) in completions/s and generated tokens/s, after a small warm-up build.

It stops starting new runs when `--budget-s` would be exceeded (the JSON then says `"truncated": true`). Prints a
table and writes `gpu_check.json` to `--output` (default benchmarks/results). See docs/benchmarks.md, "GPU check".
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_overhead import _step_timer, ratio_spread  # noqa: E402

# ~0.5 B parameters: 24 × (attention 4.3 M + MLP 15.7 M) + tied 32 000 × 1280 embeddings = 0.52 B
FULL_MODEL = dict(hidden_size=1280, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=20,
                  num_key_value_heads=4, vocab_size=32_000)
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=None)  # None: the tokenizer's size
REWARD_MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
PAIRS = ("grpo", "rloo")


def build_models(root: Path, tiny: bool, seed: int):
    """Tokenizer, and the saved paths of the policy (bf16 on disk) and of a small reward model, all from configs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from trl_infalign.tiny import SAMPLE_TEXTS, build_tokenizer

    tokenizer = build_tokenizer(SAMPLE_TEXTS * 20, vocab_size=400)
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.bos_token_id, max_position_embeddings=1024, tie_word_embeddings=True)
    shape = dict(TINY_MODEL if tiny else FULL_MODEL)
    # ids above the tokenizer's decode to nothing: the full model keeps a realistic LM head (vocab 32 000)
    shape["vocab_size"] = shape["vocab_size"] or len(tokenizer)
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(LlamaConfig(**shape, **special))
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    num_parameters = sum(p.numel() for p in policy.parameters())
    policy.to(torch.float32 if tiny else torch.bfloat16).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    del policy
    reward = LlamaForSequenceClassification(LlamaConfig(**REWARD_MODEL, vocab_size=len(tokenizer), num_labels=1,
                                                        **special))
    reward.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    return tokenizer, str(root / "policy"), str(root / "rm"), num_parameters


def summarise(step_times: dict, seed: int) -> dict:
    """Per pair: median step (pooled over runs), their ratio, the per-A/B-pair ratios and their spread."""
    ratios = {}
    for pair, sides in step_times.items():
        if not sides["plain"] or not sides["ctrl"]:
            continue
        med = {side: statistics.median([t for run in runs for t in run]) for side, runs in sides.items()}
        per_rep = [statistics.median(c) / statistics.median(p) for p, c in zip(sides["plain"], sides["ctrl"])]
        ratios[pair] = {"median_step_s": med, "ratio_ctrl_over_plain": med["ctrl"] / med["plain"],
                        "ratio_per_repetition": per_rep, "ratio_spread": ratio_spread(per_rep, seed=seed)}
    return ratios


def save(args, tiny: bool, meta: dict, results: dict) -> Path:
    """Write the JSON (also after every run, marked partial, so that a run stopped by a timeout leaves its figures)."""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    target = out / ("gpu_check_tiny.json" if tiny else "gpu_check.json")
    target.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny model, short completions, few steps (CPU check).")
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--repetitions", type=int, default=None, help="A/B pairs per trainer pair (default 2; tiny 1).")
    parser.add_argument("--steps", type=int, default=None, help="Training steps per run (default 4; tiny 3).")
    parser.add_argument("--warmup", type=int, default=1, help="Steps dropped at the start of each run.")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--completion-length", type=int, default=None, help="Tokens per completion (256; tiny 8).")
    parser.add_argument("--num-reference", type=int, default=16, help="K reference rewards per prompt (trainer data).")
    parser.add_argument("--reference-prompts", type=int, default=None, help="Prompts of the timed reference pass.")
    parser.add_argument("--reference-samples", type=int, default=None, help="K of the timed reference pass (16; tiny 4).")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="No new run starts once this many seconds would be exceeded (default 400; tiny none).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tiny = args.tiny
    reps = args.repetitions or (1 if tiny else 2)
    steps = args.steps or (3 if tiny else 4)
    length = args.completion_length or (8 if tiny else 256)
    ref_prompts = args.reference_prompts or (8 if tiny else 32)
    ref_k = args.reference_samples or (4 if tiny else 16)
    budget = args.budget_s if args.budget_s is not None else (float("inf") if tiny else 400.0)
    if steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    started = time.perf_counter()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    import trl_infalign
    from trl_infalign import CTRLConfig, CTRLGRPOConfig, CTRLGRPOTrainer, CTRLTrainer, build_reference_rewards

    cuda = torch.cuda.is_available()
    if not cuda and not tiny:
        print("warning: no CUDA device: running the full-size check on CPU will not fit any time budget "
              "(use --tiny to check the logic)", file=sys.stderr)
    meta = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "trl": trl.__version__, "trl_infalign": trl_infalign.__version__,
        "tiny": tiny, "repetitions": reps, "steps": steps, "warmup": args.warmup,
        "completions_per_step": args.prompts_per_step * args.num_generations, "num_generations": args.num_generations,
        "completion_length": length, "num_reference": args.num_reference, "reference_prompts": ref_prompts,
        "reference_samples": ref_k, "budget_s": budget, "dtype": "bf16 autocast" if cuda else "fp32",
    }
    print(json.dumps(meta), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer, policy, reward_model, num_parameters = build_models(tmp, tiny, args.seed)
        meta["policy_parameters"] = num_parameters
        print(f"policy: {num_parameters / 1e6:.1f} M parameters; models built in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        from trl_infalign.tiny import SAMPLE_TEXTS

        prompts = (SAMPLE_TEXTS * 8)[:max(32, ref_prompts)]
        generator = torch.Generator().manual_seed(args.seed)
        ref = torch.randn(len(prompts), args.num_reference, generator=generator, dtype=torch.float64).tolist()
        data = {"plain": Dataset.from_dict({"prompt": prompts}),
                "ctrl": Dataset.from_dict({"prompt": prompts, "ref_rewards": ref})}
        generation = {"min_new_tokens": length}  # every completion exactly `length` tokens: same work per run

        # ---- the reference pass: completions/s ----------------------------------------------------------------
        build = dict(num_samples=ref_k, tokenizer=tokenizer, reward_processing_classes=[tokenizer],
                     max_new_tokens=length, generation_kwargs=generation, progress=False, seed=args.seed,
                     model_init_kwargs={"dtype": torch.bfloat16 if cuda else torch.float32})
        t0 = time.perf_counter()
        build_reference_rewards(data["plain"].select(range(2)), policy, reward_model, **{**build, "num_samples": 2})
        warm = time.perf_counter() - t0
        subset = data["plain"].select(range(ref_prompts))
        t0 = time.perf_counter()
        built = build_reference_rewards(subset, policy, reward_model, batch_size=ref_prompts, **build)
        seconds = time.perf_counter() - t0
        assert all(len(row) == ref_k for row in built["ref_rewards"])
        completions = ref_prompts * ref_k
        reference = {"completions": completions, "seconds": seconds, "completions_per_s": completions / seconds,
                     "tokens_per_s": completions * length / seconds, "warmup_build_seconds": warm,
                     "includes": "model load, sampling (HF generate, one call per chunk), reward-model scoring"}
        print(f"reference pass: {completions} completions x {length} tokens in {seconds:.1f} s = "
              f"{reference['completions_per_s']:.1f} completions/s", flush=True)

        # ---- step times: A B, B A, ... per pair --------------------------------------------------------------
        common = dict(
            per_device_train_batch_size=args.prompts_per_step * args.num_generations,
            num_generations=args.num_generations, max_completion_length=length, max_steps=steps,
            logging_steps=1000, save_strategy="no", report_to="none", use_cpu=not cuda, bf16=cuda, seed=args.seed,
            beta=0.05, disable_tqdm=True, learning_rate=1e-6, generation_kwargs=generation,
        )
        grpo_extra = {"scale_rewards": "none", "loss_type": "dr_grpo"}
        kinds = {
            ("grpo", "plain"): (GRPOConfig, GRPOTrainer, grpo_extra),
            ("grpo", "ctrl"): (CTRLGRPOConfig, CTRLGRPOTrainer, grpo_extra),
            ("rloo", "plain"): (RLOOConfig, RLOOTrainer, {}),
            ("rloo", "ctrl"): (CTRLConfig, CTRLTrainer, {}),
        }

        def run(pair: str, side: str) -> list[float]:
            config_class, trainer_class, extra = kinds[pair, side]
            config = dict(output_dir=str(tmp / f"out-{pair}-{side}"), **common, **extra)
            if side == "ctrl":
                config.update(transform="bon:t=4", inference_n=4, min_reference_samples=2)
            trainer = trainer_class(model=policy, reward_funcs=reward_model, args=config_class(**config),
                                    train_dataset=data[side], processing_class=tokenizer,
                                    reward_processing_classes=tokenizer)
            timer = _step_timer()
            trainer.add_callback(timer)
            trainer.train()
            del trainer
            if cuda:
                torch.cuda.empty_cache()
            return timer.times[args.warmup:]

        step_times = {pair: {"plain": [], "ctrl": []} for pair in PAIRS}
        run_seconds: list[float] = []
        truncated = False
        for rep in range(reps):
            for pair in PAIRS:
                elapsed = time.perf_counter() - started
                estimate = 2 * (max(run_seconds) if run_seconds else 0.0)
                if elapsed + estimate > budget:
                    truncated = True
                    break
                for side in ("plain", "ctrl") if rep % 2 == 0 else ("ctrl", "plain"):
                    t0 = time.perf_counter()
                    times = run(pair, side)
                    run_seconds.append(time.perf_counter() - t0)
                    step_times[pair][side].append(times)
                    print(f"rep {rep} {pair} {side:5s}: median step {statistics.median(times):.3f} s "
                          f"(run {run_seconds[-1]:.0f} s)", flush=True)
                    save(args, tiny, meta, {"partial": True, "step_time": summarise(step_times, args.seed),
                                            "step_times_s": step_times, "reference_pass": reference})
            if truncated:
                print(f"budget {budget:.0f} s: stopping after {rep} full repetitions", flush=True)
                break
        peak_gib = torch.cuda.max_memory_allocated() / 1024**3 if cuda else None

    results = {"step_time": summarise(step_times, args.seed), "step_times_s": step_times,
               "reference_pass": reference, "peak_gpu_memory_gib": peak_gib, "truncated": truncated,
               "total_seconds": time.perf_counter() - started}
    ratios = results["step_time"]
    target = save(args, tiny, meta, results)

    names = {"grpo": ("GRPOTrainer", "CTRLGRPOTrainer"), "rloo": ("RLOOTrainer", "CTRLTrainer")}
    print()
    print(f"GPU check on {meta['device']}: policy {num_parameters / 1e6:.0f} M parameters, {meta['dtype']}, "
          f"{meta['completions_per_step']} completions x {length} tokens per step")
    print(f"| {'pair':34s} | {'plain step (s)':>14s} | {'CTRL step (s)':>13s} | {'CTRL / plain':>12s} | {'per A/B pair':>18s} |")
    print(f"|{'-' * 36}|{'-' * 16}|{'-' * 15}|{'-' * 14}|{'-' * 20}|")
    for pair, r in ratios.items():
        plain, ctrl = names[pair]
        print(f"| {ctrl + ' vs ' + plain:34s} | {r['median_step_s']['plain']:14.3f} | {r['median_step_s']['ctrl']:13.3f} "
              f"| {r['ratio_ctrl_over_plain']:12.3f} | {' '.join(f'{x:.3f}' for x in r['ratio_per_repetition']):>18s} |")
    print(f"reference pass: {reference['completions_per_s']:.1f} completions/s, {reference['tokens_per_s']:.0f} "
          f"tokens/s ({reference['completions']} completions of {length} tokens, K = {ref_k})")
    if peak_gib is not None:
        print(f"peak GPU memory {peak_gib:.1f} GiB")
    print(f"total {results['total_seconds']:.0f} s" + (" (truncated by --budget-s)" if truncated else ""))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
