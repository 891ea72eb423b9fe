"""Quickstart on GRPO: CTRL for Best-of-4 with `CTRLGRPOTrainer`, fully offline on a CPU.

The same pipeline as examples/quickstart.py (whose tiny review corpus, prompts and VADER reward it imports) with the
GRPO trainer: same knobs (`kl_budget`, `transform="auto"`), same optimum π_ref·exp(Φ(c)/β)/Z. The trainer compensates
GRPO's G/(G−1) group-mean factor; `ctrl/beta` and the printed β are in the user's units. See docs/grpo.md.

Run:  python examples/quickstart_grpo.py [--output outputs/quickstart_grpo] [--steps 300]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location("quickstart", Path(__file__).with_name("quickstart.py"))
quickstart = importlib.util.module_from_spec(_spec)
sys.modules["quickstart"] = quickstart
_spec.loader.exec_module(quickstart)  # sets the offline environment variables, defines the corpus and reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/quickstart_grpo")
    parser.add_argument("--steps", type=int, default=300,
                        help="CTRL-GRPO training steps (as in examples/quickstart.py: 150 are too short for the "
                        "KL control to settle).")
    parser.add_argument("--num-reference-samples", type=int, default=16, help="K reference samples per prompt.")
    parser.add_argument("--eval-samples", type=int, default=64, help="Samples per prompt and model for the evaluation.")
    parser.add_argument("--kl-budget", type=float, default=1.0, help="Per-completion KL budget (nats).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from datasets import Dataset

    from trl_infalign import build_reference_rewards, evaluate_policy
    from trl_infalign.ctrl_grpo_config import CTRLGRPOConfig
    from trl_infalign.ctrl_grpo_trainer import CTRLGRPOTrainer

    start = time.time()
    torch.manual_seed(args.seed)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    print("1/4  Tiny SFT policy (local tokenizer + small Llama, pre-trained on review snippets)")
    sft_path, tokenizer = quickstart.build_sft_policy(output / "sft", args.seed)
    prompts = quickstart.PROMPTS

    print(f"2/4  Reference rewards: {args.num_reference_samples} samples per prompt, VADER-scored")
    dataset = build_reference_rewards(
        Dataset.from_dict({"prompt": prompts}), str(sft_path), quickstart.vader_sentiment,
        num_samples=args.num_reference_samples, max_new_tokens=8, cache_dir=str(output / "reference_cache"),
        seed=args.seed,
    )

    print("3/4  Training CTRL-GRPO for Best-of-4")
    config = CTRLGRPOConfig(
        output_dir=str(output / "ctrl-grpo-bon4"), inference_procedure="bon", inference_n=4, transform="auto",
        kl_budget=args.kl_budget,  # scale_rewards="none", loss_type="dr_grpo": CTRLGRPOConfig's defaults
        learning_rate=1e-3, per_device_train_batch_size=32, num_generations=8, max_completion_length=8,
        max_steps=args.steps, logging_steps=25, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        seed=args.seed, num_reference_samples=args.num_reference_samples,
    )
    trainer = CTRLGRPOTrainer(model=str(sft_path), reward_funcs=quickstart.vader_sentiment, args=config,
                              train_dataset=dataset, processing_class=tokenizer)
    print(f"     transform {config.resolved_transform}, beta {config.beta:.4g} (user units; GRPO's loss uses "
          f"{trainer.beta:.3g} = beta·(G-1)/G / Phi-scale)")
    trainer.train()

    print("4/4  KL and BoN-4 win rate against the SFT reference")
    result = evaluate_policy(trainer.model, str(sft_path), quickstart.vader_sentiment, prompts, tokenizer=tokenizer,
                             num_samples=args.eval_samples, ns=(1, 4), procedures=("standard", "bon"),
                             max_new_tokens=8, seed=args.seed + 1, policy_name=config.output_dir)
    trainer.record_evaluation(result.to_dict())
    trainer.save_model(config.output_dir)
    bon4 = next(w for w in result.win_rates if (w["procedure"], w["n"]) == ("bon", 4))
    print(f"     KL per completion {result.kl_k1:.3f} nats (budget {config.kl_budget:g}), final beta "
          f"{trainer.current_beta:.4g}, BoN-4 win rate {bon4['estimate']:.3f} [{bon4['ci_low']:.3f}, {bon4['ci_high']:.3f}]")
    print(f"Done in {time.time() - start:.0f} s; model and card in {config.output_dir}.")


if __name__ == "__main__":
    main()
