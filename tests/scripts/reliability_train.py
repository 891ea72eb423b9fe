"""Train a tiny CTRL run with checkpoints; used by tests/test_reliability.py to SIGKILL it mid-run and resume.

    python reliability_train.py WORKDIR [--resume] [--max-steps 6] [--save-steps 2] [--sleep 0.3]

WORKDIR must hold `policy/` (a tiny model + tokenizer) and `data/` (a dataset saved with `save_to_disk`). Each run
appends one JSON line to WORKDIR/runs.jsonl at start (calibration state, fingerprint of the ref_rewards column) and one
at the end (final global_step, the steps run by this process).
"""

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import load_from_disk  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from trl_infalign import CTRLConfig, CTRLTrainer  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--sleep", type=float, default=0.3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.workdir)
    dataset = load_from_disk(str(work / "data"))
    tokenizer = AutoTokenizer.from_pretrained(str(work / "policy"))

    def reward(completions, **kwargs):
        time.sleep(args.sleep)  # slow enough to be killed between checkpoints
        return [float(len(c)) for c in completions]

    config = CTRLConfig(
        output_dir=str(work / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
        max_steps=args.max_steps, logging_steps=1, save_strategy="steps", save_steps=args.save_steps, report_to="none",
        use_cpu=True, bf16=False, transform="auto", inference_procedure="bon", inference_n=4, kl_budget=0.3,
        min_reference_samples=2, disable_tqdm=True, seed=0,
        calibration_check="off",  # hand-made reference rewards: not samples of this policy
    )
    trainer = CTRLTrainer(model=str(work / "policy"), reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    rows = json.dumps(list(dataset["ref_rewards"])).encode()
    record = {
        "event": "start", "resume": args.resume, "pid": os.getpid(),
        "ref_rewards_sha256": hashlib.sha256(rows).hexdigest(), "calibration": trainer.ctrl_calibration_state(),
    }
    with open(work / "runs.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    from transformers import TrainerCallback

    executed = []

    betas = {}

    class RecordSteps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            betas["at_start"] = trainer.current_beta  # after a resume: the checkpoint's KL-controller state

        def on_step_end(self, args, state, control, **kwargs):
            executed.append(state.global_step)
            betas[state.global_step] = trainer.current_beta

    trainer.add_callback(RecordSteps())
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model()
    with open(work / "runs.jsonl", "a") as f:
        f.write(json.dumps({"event": "end", "global_step": trainer.state.global_step, "executed_steps": executed,
                            "betas": betas}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
