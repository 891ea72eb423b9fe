"""Run CTRL with 2 processes on CPU (DDP or DeepSpeed per the accelerate config, or torchrun); each rank records
what it saw.

    ctrl_two_process.py OUT [rloo|grpo]

Prompt i's reference rewards are 1000·i + {0..6}; the reward of a completion to prompt i is 1000·i + (length mod 7).
So a completion calibrated against its own prompt's references gets c = (j + ½)/7, strictly inside (0, 1), while one
calibrated against another prompt's references (a cross-rank mix-up) gets exactly 0 or 1. The GRPO run uses a
kl_budget and also records the gathered per-completion KL and the controller's β.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402

from trl_infalign import CTRLConfig, CTRLGRPOConfig, CTRLGRPOTrainer, CTRLTrainer  # noqa: E402
from trl_infalign.tiny import build_tiny_policy, build_tokenizer  # noqa: E402

out = Path(sys.argv[1])
trainer_kind = sys.argv[2] if len(sys.argv) > 2 else "rloo"
rank = int(os.environ.get("RANK", "0"))
prompts = [f"prompt {i} says" for i in range(8)]
tokenizer = build_tokenizer(prompts * 10 + ["hello world and more words"] * 10, vocab_size=300)
policy = out / "policy"
if rank == 0:
    build_tiny_policy(tokenizer, policy, hidden_size=32, num_layers=1)
else:
    import time

    while not (policy / "config.json").exists():
        time.sleep(0.2)
    time.sleep(1.0)

dataset = Dataset.from_dict(
    {"prompt": prompts, "ref_rewards": [[1000.0 * i + k for k in range(7)] for i in range(len(prompts))]}
)
seen = []


def reward(prompts, completions, **kwargs):
    values = [1000.0 * int(p.split()[1]) + len(c) % 7 for p, c in zip(prompts, completions)]
    seen.extend(zip(prompts, kwargs["ref_rewards"]))
    return values


common = dict(
    output_dir=str(out / "run"), transform="bon:t=2", per_device_train_batch_size=4, num_generations=2,
    max_completion_length=4, max_steps=3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
    bf16=False, min_reference_samples=7,
)
if trainer_kind == "grpo":
    config_class, trainer_class = CTRLGRPOConfig, CTRLGRPOTrainer
    args = config_class(**common, kl_budget=0.2, learning_rate=5e-2)
else:
    config_class, trainer_class = CTRLConfig, CTRLTrainer
    args = config_class(**common, beta=1.0)
calibrated = []


class RecordingTrainer(trainer_class):
    def _calculate_rewards(self, *args, **kwargs):
        transformed = super()._calculate_rewards(*args, **kwargs)
        calibrated.extend(list(self._logs["rewards"]["ctrl_calibrated"])[-len(transformed):])
        return transformed


trainer = RecordingTrainer(model=str(policy), reward_funcs=reward, args=args, train_dataset=dataset,
                           processing_class=tokenizer)
trainer.train()
record = {
    "rank": rank,
    "world_size": trainer.accelerator.num_processes,
    "deepspeed_zero_stage": (
        trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    ),
    "prompts": sorted({p for p, _ in seen}),
    "ref_matches_prompt": all(r[0] == 1000.0 * int(p.split()[1]) for p, r in seen),
    "calibrated": calibrated,
    "logged": [h for h in trainer.state.log_history if "ctrl/calibrated_reward" in h],
    "sequence_kl": [h["ctrl/sequence_kl"] for h in trainer.state.log_history if "ctrl/sequence_kl" in h],
    "beta": trainer.current_beta,
    "health": None if trainer.ctrl_calibration_health is None else {
        key: getattr(trainer.ctrl_calibration_health, key)
        for key in ("num_completions", "extra_completions", "mean_calibrated", "p_value", "failed")
    },
}
(out / f"rank{rank}.json").write_text(json.dumps(record))
