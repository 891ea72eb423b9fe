"""`evaluate_policy` under `torchrun --nproc_per_node 2` on CPU: each rank writes the result it returned."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trl_infalign import evaluate_policy  # noqa: E402

policy, out = sys.argv[1], Path(sys.argv[2])
prompts = [f"prompt {i} says" for i in range(6)]
scored = []


def length_reward(prompts, completions, **kwargs):
    scored.extend(prompts)
    return [float(len(c)) for c in completions]


result = evaluate_policy(policy, policy, length_reward, prompts, num_samples=4, ns=(1, 2, 4),
                         procedures=("standard", "bon", "won"), max_new_tokens=4, num_bootstrap=50, progress=False)
rank = int(os.environ["RANK"])
record = {"result": result.to_dict(), "scored_prompts": sorted(set(scored))}
(out / f"eval_rank{rank}.json").write_text(json.dumps(record))
