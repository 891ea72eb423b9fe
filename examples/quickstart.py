"""Quickstart: CTRL for Best-of-4 on a tiny policy, fully offline on a CPU, in a few minutes.

1. Build a tiny "SFT" policy: a byte-level BPE tokenizer and a small Llama trained locally on generated review snippets.
2. Reward: VADER sentiment (the `vaderSentiment` package's lexicon; nobody here wrote or tuned it).
3. Reference rewards: K samples per prompt from the SFT policy, scored (`build_reference_rewards`).
4. CTRL for Best-of-4 (`transform="auto"` picks exp(t·c) with t from the calibrated-space theory).
5. Before/after table of KL, standard win rate and BoN-4 win rate against the reference, and a plot.

The defaults make the result a property of the method, not of one machine's float rounding: the SFT policy is trained
to convergence (learning rate decayed to 0), K = 128 references keep completions from saturating the calibration,
every step trains on all 32 prompts (256 completions), the adaptive KL controller holds the budget, and the
evaluation draws 512 samples per prompt. `python benchmarks/demo_stability.py` measures the spread over seeds and
CPU instruction sets.

Run:  python examples/quickstart.py [--output outputs/quickstart] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the ending", "the music", "the story", "the cast"]
VERBS = ["was", "is", "felt", "seemed"]
ADJECTIVES = [
    "great", "wonderful", "fine", "good", "brilliant", "moving", "fun", "okay", "long", "slow", "quiet", "strange",
    "boring", "bad", "terrible", "dull", "awful", "weak", "beautiful", "sad", "funny", "loud", "simple", "clever",
]
ENDINGS = ["", " and i liked it", " but too long", " and a bit sad", " overall", " to me", " and loud", " at times"]


def review_corpus(size: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(ADJECTIVES)}{rng.choice(ENDINGS)}" for _ in range(size)
    ]


PROMPTS = [f"{s} {v}" for s in SUBJECTS for v in VERBS]
SFT_STEPS = 1500


def build_sft_policy(path: Path, seed: int, steps: int = SFT_STEPS):
    """The tiny "SFT" policy: a byte-level BPE tokenizer and a 64×2 Llama pre-trained on generated review snippets,
    saved to `path`. The learning rate decays to 0 over `steps`, so the policy settles near the corpus's distribution
    (the same on every machine) instead of wherever float rounding left the last noisy step. Returns (path, tokenizer)."""
    from transformers import AutoModelForCausalLM

    from trl_infalign.tiny import build_tiny_policy, build_tokenizer, pretrain_on_texts

    corpus = review_corpus(2000, seed)
    tokenizer = build_tokenizer(corpus, vocab_size=400)
    build_tiny_policy(tokenizer, path, hidden_size=64, num_layers=2, seed=seed)
    policy = AutoModelForCausalLM.from_pretrained(path)
    pretrain_on_texts(policy, tokenizer, corpus, steps=steps, lr=3e-3, batch_size=64, seed=seed, decay_lr=True)
    policy.save_pretrained(path)
    return path, tokenizer


def vader_sentiment(prompts, completions, **kwargs):
    """Reward: VADER compound sentiment of prompt + completion, in [-1, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = vader_sentiment.analyzer = getattr(vader_sentiment, "analyzer", None) or SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(p + c)["compound"] for p, c in zip(prompts, completions, strict=True)]


def main() -> None:
    from trl_infalign.commands import number_type, positive_float, positive_int

    multiple_of_8 = number_type("multiple_of_8", int, lambda v: v >= 8 and v % 8 == 0, "a multiple of 8",
                                unparsable="an integer", note=" (8 completions per prompt)")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/quickstart", help="Where models, tables and the plot go.")
    parser.add_argument("--steps", type=int, default=300, help="CTRL training steps.")
    parser.add_argument("--completions-per-step", type=multiple_of_8, default=256,
                        help="Completions per training step (8 per prompt; 256 = every prompt in every step).")
    parser.add_argument("--learning-rate", type=positive_float, default=1e-3,
                        help="CTRL learning rate (decays linearly to 0).")
    parser.add_argument("--sft-steps", type=positive_int, default=SFT_STEPS, help="Pre-training steps of the tiny SFT policy.")
    parser.add_argument("--num-reference-samples", type=int, default=128, help="K reference samples per prompt.")
    parser.add_argument("--eval-samples", type=int, default=512, help="Samples per prompt and model for the evaluation.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kl-budget", type=float, default=1.0, help="Per-completion KL budget (nats).")
    parser.add_argument("--kl-control", choices=["adaptive", "fixed"], default="adaptive",
                        help="adaptive: correct beta from the measured KL; fixed: the theory's open-loop beta.")
    parser.add_argument("--procedure", default=None,
                        help="Align for another deployment (a procedure spec, e.g. "
                        "'mixture:0.5*standard+0.25*bon:n=4+0.25*bon:n=16'); default: Best-of-4.")
    parser.add_argument("--transform", default="auto", help="CTRL transform (auto, optimal, identity, bon:t=5, ...).")
    args = parser.parse_args()

    import torch
    from datasets import Dataset

    from trl_infalign import CTRLConfig, CTRLTrainer, build_reference_rewards, evaluate_policy, theory

    start = time.time()
    torch.manual_seed(args.seed)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    print("1/5  Building the tiny SFT policy (local tokenizer + small Llama, pre-trained on review snippets)")
    sft_path, tokenizer = build_sft_policy(output / "sft", args.seed, args.sft_steps)
    prompts = PROMPTS
    dataset = Dataset.from_dict({"prompt": prompts})

    print(f"2/5  Reference rewards: {args.num_reference_samples} samples per prompt from the SFT policy, VADER-scored")
    dataset = build_reference_rewards(
        dataset,
        str(sft_path),
        vader_sentiment,
        num_samples=args.num_reference_samples,
        max_new_tokens=8,
        cache_dir=str(output / "reference_cache"),
        seed=args.seed,
    )

    config = CTRLConfig(
        output_dir=str(output / ("ctrl-bon4" if args.procedure is None else "ctrl")),
        inference_procedure=args.procedure or "bon",
        inference_n=4,
        transform=args.transform,
        kl_budget=args.kl_budget,
        kl_control=args.kl_control,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.completions_per_step,
        num_generations=8,
        max_completion_length=8,
        max_steps=args.steps,
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=args.seed,
        num_reference_samples=args.num_reference_samples,
    )
    procedure = config.procedure
    print(f"3/5  Training CTRL for {procedure.label}")
    trainer = CTRLTrainer(
        model=str(sft_path), reward_funcs=vader_sentiment, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    predicted = theory.policy(config.resolved_transform, config.beta)
    print(
        f"     transform {config.resolved_transform}, beta {config.beta:.4g} from kl_budget {config.kl_budget} "
        f"(per-completion KL, nats; RLOO sees Phi rescaled to [0, 1] with beta {trainer.beta:.3g}); theory predicts "
        f"KL {predicted.kl():.3f}, {procedure.label} win rate {predicted.win_rate(procedure):.3f} at the optimum; "
        f"kl_control={config.kl_control} corrects beta from the measured KL"
    )
    trainer.train()
    print(f"     final beta {trainer.current_beta:.4g} (started at {config.beta:.4g})")

    print(f"4/5  Evaluating KL and standard / BoN-4{'' if args.procedure is None else ' / ' + procedure.label} win "
          "rates against the SFT reference")
    eval_prompts = prompts
    extra = () if args.procedure is None else (procedure,)
    common = dict(
        num_samples=args.eval_samples, ns=(1, 2, 4, 8), procedures=("standard", "bon", "won", *extra), max_new_tokens=8,
        seed=args.seed + 1
    )
    before = evaluate_policy(str(sft_path), str(sft_path), vader_sentiment, eval_prompts, tokenizer=tokenizer, **common)
    after = evaluate_policy(trainer.model, str(sft_path), vader_sentiment, eval_prompts, tokenizer=tokenizer,
                            policy_name=config.output_dir, **common)
    trainer.record_evaluation(after.to_dict())
    trainer.save_model(config.output_dir)

    columns = [("standard win rate", "standard"), ("BoN-4 win rate", "bon:n=4")]
    if args.procedure is not None:
        columns.append((f"{procedure.label} win rate", procedure.spec))

    def row(name, result):
        wins = {w["spec"]: w for w in result.win_rates}
        return name, result.kl_k1, result.kl_k1_ci, [wins[spec] for _, spec in columns]

    def interval(estimate, low, high):
        return f"{estimate:.3f} [{low:.3f}, {high:.3f}]"

    trained_name = "CTRL-BoN4 (after)" if args.procedure is None else "CTRL (after)"
    rows = [row("SFT (before)", before), row(trained_name, after)]
    lines = [
        f"| policy | KL per completion (k1, nats; budget {config.kl_budget:g}) | "
        + " | ".join(title for title, _ in columns) + " |",
        "|---" * (2 + len(columns)) + "|",
        *[
            f"| {name} | {interval(kl, *ci)} | "
            + " | ".join(interval(w["estimate"], w["ci_low"], w["ci_high"]) for w in wins) + " |"
            for name, kl, ci, wins in rows
        ],
        f"| theory (calibrated-space optimum) | {predicted.kl():.3f} | "
        + " | ".join(f"{predicted.win_rate(spec):.3f}" for _, spec in columns) + " |",
    ]
    table = "\n".join(lines)
    print("\n5/5  Results (win rates against the SFT reference; 0.5 = no change)\n")
    print(table)
    (output / "results.md").write_text(table + "\n")
    training = {
        "kl_budget": config.kl_budget, "kl_unit": "nats per completion", "kl_control": config.kl_control,
        "initial_beta": config.beta, "final_beta": trainer.current_beta, "transform": config.resolved_transform,
        "inference_procedure": procedure.spec,
        "steps": args.steps, "seed": args.seed, "completions_per_step": args.completions_per_step,
        "learning_rate": args.learning_rate, "sft_steps": args.sft_steps,
        "num_reference_samples": args.num_reference_samples, "eval_samples": args.eval_samples,
        "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    results = {"training": training, "kl_budget": config.kl_budget, "before": before.to_dict(), "after": after.to_dict()}
    (output / "results.json").write_text(json.dumps(results, indent=2))
    after.plot(output / "win_rate_vs_n.png")
    print(f"\nSaved: {output / 'results.md'}, {output / 'win_rate_vs_n.png'}, model in {config.output_dir}")
    print(f"Done in {time.time() - start:.0f} s.")


if __name__ == "__main__":
    main()
