"""Run CTRL with 2 processes on CPU (DDP or DeepSpeed per the accelerate config, or torchrun); each rank records
what it saw.

    ctrl_two_process.py OUT [rloo|grpo|rloo,grpo] [--save-resume]

Several trainers (comma-separated) train one after the other in the same launch; each writes
OUT/<kind>/rank<r>.json (with a single trainer, OUT/rank<r>.json as before). With --save-resume each trainer trains
1 step and saves checkpoint-1, then a second trainer resumes from it (`resume_from_checkpoint=True`) and trains to
step 2, saving checkpoint-2; the record describes the resumed trainer (its log history includes the restored step).

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
kinds = (sys.argv[2] if len(sys.argv) > 2 and not sys.argv[2].startswith("--") else "rloo").split(",")
save_resume = "--save-resume" in sys.argv
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


def run(trainer_kind: str, run_dir: Path) -> dict:
    seen, calibrated = [], []

    def reward(prompts, completions, **kwargs):
        values = [1000.0 * int(p.split()[1]) + len(c) % 7 for p, c in zip(prompts, completions)]
        seen.extend(zip(prompts, kwargs["ref_rewards"]))
        return values

    common = dict(
        output_dir=str(run_dir / "run"), transform="bon:t=2", per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, max_steps=3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, min_reference_samples=7,
    )
    if trainer_kind == "grpo":
        config_class, trainer_class = CTRLGRPOConfig, CTRLGRPOTrainer
        extra = dict(kl_budget=0.2, learning_rate=5e-2)
    else:
        config_class, trainer_class = CTRLConfig, CTRLTrainer
        extra = dict(beta=1.0)

    class RecordingTrainer(trainer_class):
        def _calculate_rewards(self, *args, **kwargs):
            transformed = super()._calculate_rewards(*args, **kwargs)
            calibrated.extend(list(self._logs["rewards"]["ctrl_calibrated"])[-len(transformed):])
            return transformed

    def make(**overrides):
        args = config_class(**{**common, **extra, **overrides})
        return RecordingTrainer(model=str(policy), reward_funcs=reward, args=args, train_dataset=dataset,
                                processing_class=tokenizer)

    record = {}
    if save_resume:
        first = make(max_steps=1, save_strategy="steps", save_steps=1)
        first.train()
        record["first_global_step"] = first.state.global_step
        record["first_beta"] = first.current_beta
        del first
        trainer = make(max_steps=2, save_strategy="steps", save_steps=1)
        trainer.train(resume_from_checkpoint=True)
        run_root = run_dir / "run"
        record["checkpoints"] = {p.name: sorted(f.name for f in p.iterdir()) for p in sorted(run_root.glob("checkpoint-*"))}
        controller = trainer.ctrl_kl_controller
        record["kl_controller_updates"] = None if controller is None else controller.num_updates
    else:
        trainer = make()
        trainer.train()
    record.update({
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "deepspeed_zero_stage": (
            trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
        ),
        "global_step": trainer.state.global_step,
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
    })
    return record


for kind in kinds:
    where = out if len(kinds) == 1 else out / kind
    where.mkdir(parents=True, exist_ok=True)
    record = run(kind, where)
    (where / f"rank{rank}.json").write_text(json.dumps(record))
