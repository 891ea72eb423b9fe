"""The reference pass of CTRL on its own: K reference-policy samples per training prompt, scored, cached on disk.

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/build_reference.py \
        --config recipes/configs/ctrl_hh_helpful_bon.yaml --reference_cache_dir runs/ref-hh-helpful

Same arguments (and YAML) as recipes/ctrl_hh.py: the pass is the `ReferenceConfig` that `ctrl_hh.reference_config`
derives from the training config (`ReferenceConfig.from_training_args`: K, max_completion_length, every sampling
field, reward weights, seed, ...), so it draws the references the way that training run samples. Chunks of `reference_batch_size` prompts are sharded over the
processes and appended to `reference_cache_dir` as they finish; rerunning resumes. Point ctrl_hh.py at the same
`reference_cache_dir` (same policy, reward model, K, seed, sampling settings) and it trains without recomputing.
The finished dataset (prompt + ref_rewards) is also written to `<reference_cache_dir>/dataset` (`load_from_disk`).
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ctrl_hh import (  # noqa: E402
    build_reference,
    init_state,
    load_prompts,
    load_reward,
    make_parser,
    model_init_kwargs,
    reference_cache_dir,
)


def main(script_args, training_args, model_args) -> int:
    state = init_state(training_args)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    dataset = load_prompts(script_args, script_args.dataset_train_split, script_args.max_train_prompts)
    reward_funcs, reward_classes = load_reward(script_args, model_args, training_args)
    dataset = build_reference(dataset, script_args, training_args, model_args, reward_funcs, reward_classes)
    cache = reference_cache_dir(script_args, training_args)
    if state.is_main_process:
        dataset.save_to_disk(os.path.join(cache, "dataset"))
        values = [v for row in dataset[training_args.reference_rewards_column] for v in row]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
        print(f"Reference rewards for {len(dataset)} prompts x K={training_args.num_reference_samples} "
              f"on {state.num_processes} process(es): mean {mean:.4g}, std {std:.4g}. Cache: {cache}", flush=True)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    sys.exit(main(script_args, training_args, model_args))
