# /// script
# dependencies = ["trl-infalign", "trl>=1.16", "peft", "matplotlib"]
# ///
"""CTRL (InfAlign, arXiv 2412.19792) on Anthropic HH-RLHF — or any prompt dataset — with TRL.

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml recipes/ctrl_hh.py \
        --config recipes/configs/ctrl_hh_helpful_bon.yaml
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/ctrl_hh.py \
        --config recipes/configs/ctrl_hh_harmless_won.yaml --push_to_hub --hub_model_id me/qwen-ctrl-won4
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml recipes/ctrl_hh.py \
        --config recipes/configs/ctrl_hh_helpful_bon_grpo.yaml          # CTRL on GRPO (or --trainer grpo)

Steps: load prompts (HH `chosen` transcripts -> chat prompts without the final answer), build or resume the reference
rewards (K reference samples per prompt, cached in `reference_cache_dir`), train `CTRLTrainer` (`--trainer rloo`,
the default) or `CTRLGRPOTrainer` (`--trainer grpo`: every GRPOConfig option, vLLM included, parses as in TRL), evaluate BoN-N / WoN-N
win rates and KL against the reference policy, write them into the model card, save, and optionally push to the Hub.
Every `--flag` overrides the YAML. See docs/recipes.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ScriptArguments as TrlScriptArguments

from trl_infalign import CTRLConfig
from trl_infalign.ctrl_grpo_config import CTRLGRPOConfig

#: --trainer: (config class, trainer class)
TRAINERS = {
    "rloo": (CTRLConfig, "trl_infalign.ctrl_trainer.CTRLTrainer"),
    "grpo": (CTRLGRPOConfig, "trl_infalign.ctrl_grpo_trainer.CTRLGRPOTrainer"),
}


@dataclass
class ScriptArguments(TrlScriptArguments):
    """Data, reward model, reference pass and evaluation of the CTRL recipes (training knobs live in `CTRLConfig`, or
    `CTRLGRPOConfig` with `--trainer grpo`)."""

    trainer: str = field(
        default="rloo",
        metadata={"help": "TRL algorithm under CTRL: `rloo` (CTRLTrainer, CTRLConfig) or `grpo` (CTRLGRPOTrainer, "
                  "CTRLGRPOConfig; same CTRL knobs and optimum, see docs/grpo.md).", "choices": list(TRAINERS)},
    )

    dataset_name: str | None = field(
        default="Anthropic/hh-rlhf",
        metadata={"help": "Hub dataset (e.g. `Anthropic/hh-rlhf`, `trl-lib/tldr`), a local .jsonl/.json/.parquet file, a "
                  "directory laid out like the Hub repo (`<data_dir>/<split>.jsonl[.gz]`), or a `save_to_disk` dir."},
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Subset directory of the dataset: `helpful-base` (helpfulness, BoN) or `harmless-base` "
                  "(harmlessness / jailbreak, WoN) for Anthropic/hh-rlhf; several, comma-separated "
                  "(`helpful-base,harmless-base`), are concatenated with the prompt budget split evenly."},
    )
    dataset_prompt_column: str = field(
        default="prompt",
        metadata={"help": "Prompt column for datasets that have one (e.g. trl-lib/tldr). Datasets without it must have "
                  "HH `chosen` transcripts, which are turned into chat prompts."},
    )
    max_train_prompts: int | None = field(default=None, metadata={"help": "Use at most this many training prompts."})
    max_eval_prompts: int | None = field(default=256, metadata={"help": "Evaluate on at most this many test prompts."})
    reward_model_name_or_path: str = field(
        default="OpenAssistant/reward-model-deberta-v3-large-v2",
        metadata={"help": "Sequence-classification reward model: Hub id or local directory."},
    )
    reward_models: list[str] = field(
        default_factory=list,
        metadata={"help": "Several rewards, one `name=path` entry each (e.g. `helpful=OpenAssistant/reward-model-"
                  "deberta-v3-large-v2`); the names are the ones the deployment spec judges on "
                  "(`inference_procedure: mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless`). Replaces "
                  "reward_model_name_or_path; the reference pass then stores each reward's K values."},
    )
    reward_model_input: str = field(
        default="pair",
        metadata={"help": "`pair`: the RM scores tokenizer(prompt, completion) as a text pair (OpenAssistant deberta RMs); "
                  "`text`: TRL's default, the RM scores the chat-templated prompt + completion as one text.",
                  "choices": ["pair", "text"]},
    )
    reward_max_length: int = field(default=512, metadata={"help": "Truncate text pairs to this many tokens (pair mode)."})
    reward_batch_size: int = field(default=16, metadata={"help": "Pairs per reward-model forward pass (pair mode)."})
    reference_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where the reference rewards are cached (resumable, shared by all processes); default "
                  "`<output_dir>-reference-cache`. Reuse it across runs with the same reference policy and RM."},
    )
    reference_batch_size: int = field(
        default=8, metadata={"help": "Prompts per reference chunk (unit of caching and sharding)."}
    )
    reference_vllm_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Extra vllm.LLM kwargs of the reference pass with `use_vllm: true` (ReferenceConfig.vllm_kwargs), "
                  "e.g. '{\"gpu_memory_utilization\": 0.5, \"max_model_len\": 2048}'. The engine is shut down and its "
                  "memory freed before training starts."},
    )
    eval_num_samples: int = field(
        default=16, metadata={"help": "Samples per eval prompt from the policy and from the reference (>= max eval N)."}
    )
    eval_ns: list[int] = field(default_factory=lambda: [1, 4], metadata={"help": "N values for BoN-N / WoN-N win rates."})
    skip_eval: bool = field(default=False, metadata={"help": "Skip the final evaluation."})


def is_local(name_or_path: str) -> bool:
    return os.path.exists(os.path.expanduser(name_or_path))


def load_prompts(script_args: ScriptArguments, split: str, max_prompts: int | None, seed: int | None = None):
    from datasets import concatenate_datasets

    from trl_infalign.hh import load_hh_prompts

    subsets = [d.strip() for d in script_args.data_dir.split(",")] if script_args.data_dir else [None]
    share = None if max_prompts is None else max(1, max_prompts // len(subsets))
    parts = [
        load_hh_prompts(
            script_args.dataset_name, data_dir=subset, split=split, max_prompts=share,
            name=script_args.dataset_config, prompt_column=script_args.dataset_prompt_column, seed=seed,
        )
        for subset in subsets
    ]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def named_reward_models(script_args: ScriptArguments) -> list[tuple[str | None, str]]:
    """(name, path) of each reward model: `reward_models` entries `name=path`, else the one reward model."""
    if not script_args.reward_models:
        return [(None, script_args.reward_model_name_or_path)]
    pairs = []
    for entry in script_args.reward_models:
        name, eq, path = entry.partition("=")
        if not eq or not name.strip() or not path.strip():
            raise SystemExit(f"--reward_models entries look like name=path (e.g. helpful=OpenAssistant/reward-model-"
                             f"deberta-v3-large-v2), got {entry!r}.")
        pairs.append((name.strip(), path.strip()))
    return pairs


def load_reward(script_args: ScriptArguments, model_args, training_args):
    """(reward_funcs, reward_processing_classes) for the trainer, the reference pass and the evaluation."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trl_infalign.hh import TextPairRewardModel

    kwargs = {"revision": model_args.model_revision, "trust_remote_code": training_args.trust_remote_code}
    if model_args.dtype not in (None, "auto"):
        kwargs["dtype"] = model_args.dtype
    funcs, classes = [], []
    for name, path in named_reward_models(script_args):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=training_args.trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if script_args.reward_model_input == "text":
            # TRL loads and places (DDP / DeepSpeed / FSDP) reward models given as paths itself, naming each by its
            # path's last segment.
            if name is not None and name != path.rstrip("/").split("/")[-1]:
                raise SystemExit(
                    f"--reward_models {name}={path} with reward_model_input=text: TRL names a reward model by its path's "
                    f"last segment ({path.rstrip('/').split('/')[-1]!r}); use that name in the deployment spec, or "
                    "reward_model_input=pair (which takes any name)."
                )
            funcs.append(path)
            classes.append(tokenizer)
            continue
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
        funcs.append(TextPairRewardModel(model, tokenizer, batch_size=script_args.reward_batch_size,
                                         max_length=script_args.reward_max_length, name=name))
        classes.append(None)
    return funcs, classes


def model_init_kwargs(model_args, training_args) -> dict:
    kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                  attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


def reference_cache_dir(script_args: ScriptArguments, training_args) -> str:
    # Not inside output_dir: everything there is uploaded by push_to_hub.
    return script_args.reference_cache_dir or training_args.output_dir.rstrip("/\\") + "-reference-cache"


def reference_config(script_args, training_args, model_args):
    """The reference pass that matches the training run: `ReferenceConfig.from_training_args` reads K, the sampling
    fields (temperature, top_p, top_k, min_p, repetition_penalty, generation_kwargs), max_completion_length, reward
    weights, seed, nonfinite_rewards, use_vllm and the column from the training config, so the references are drawn
    the way the trainer samples; the recipe adds the cache, the chunk size and `reference_vllm_kwargs`. With vLLM
    the reference engine is shut down (its GPU memory freed) when the pass returns, before TRL's own colocate engine
    checks the free memory; a fully cached pass (e.g. after recipes/build_reference.py) never starts it."""
    from trl_infalign import ReferenceConfig

    return ReferenceConfig.from_training_args(
        training_args,
        cache_dir=reference_cache_dir(script_args, training_args),
        batch_size=script_args.reference_batch_size,
        model_init_kwargs=model_init_kwargs(model_args, training_args),
        vllm_kwargs=script_args.reference_vllm_kwargs,
    )


def build_reference(dataset, script_args, training_args, model_args, reward_funcs, reward_classes):
    """Add `ref_rewards` (K reference rewards per prompt), resuming from / writing to the cache dir."""
    from trl_infalign import build_reference_rewards

    return build_reference_rewards(
        dataset, model_args.model_name_or_path, reward_funcs, reference_config(script_args, training_args, model_args),
        reward_processing_classes=reward_classes, progress=not training_args.disable_tqdm,
    )


def card_dataset_name(script_args: ScriptArguments) -> str | None:
    """The dataset named in the model card: the Hub id (plus subset), or a local dataset's directory/file name."""
    name = script_args.dataset_name
    if name is None:
        return None
    if is_local(name):
        path = Path(name).resolve()
        return f"{path.name}/{script_args.data_dir}" if script_args.data_dir else path.name
    return name


def evaluate(trainer, script_args, training_args, model_args, reward_funcs, reward_classes):
    """BoN-N / WoN-N (and standard) win rates and KL of the trained policy against the reference policy."""
    from trl.models import unwrap_model_for_generation

    from trl_infalign import evaluate_policy

    prompts = load_prompts(script_args, script_args.dataset_test_split, script_args.max_eval_prompts)
    procedures = ["standard", "bon", "won"]  # same samples: all three cost one evaluation pass
    if training_args.is_multi_reward:  # each component on its own reward, and the deployment's win rate
        procedures = [training_args.inference_procedure]
    ns = sorted(set(script_args.eval_ns) | {training_args.inference_n})
    with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as policy:
        result = evaluate_policy(
            policy, model_args.model_name_or_path, reward_funcs, prompts["prompt"],
            tokenizer=trainer.processing_class, reward_processing_classes=reward_classes,
            num_samples=script_args.eval_num_samples, ns=ns, procedures=procedures,
            max_new_tokens=training_args.max_completion_length, seed=training_args.seed,
            accelerator=trainer.accelerator, progress=not training_args.disable_tqdm,
        )
    return result


def init_state(training_args):
    """The process state, set up by the training arguments first (gloo on CPU with `use_cpu`, NCCL on GPUs), so that
    the reference pass, the trainer and the evaluation all see the same world size."""
    from accelerate import PartialState

    _ = training_args.device  # TrainingArguments builds the shared PartialState (cpu=use_cpu, ddp_backend, timeout)
    return PartialState()


def main(script_args: ScriptArguments, training_args: CTRLConfig | CTRLGRPOConfig, model_args) -> int:
    from transformers import set_seed
    from trl import get_peft_config

    from trl_infalign import HubUploadError

    config_class, trainer_module = TRAINERS[script_args.trainer]
    if not isinstance(training_args, config_class):
        raise TypeError(f"--trainer {script_args.trainer} needs a {config_class.__name__}, got "
                        f"{type(training_args).__name__}: parse the arguments with make_parser().")
    module, _, name = trainer_module.rpartition(".")
    trainer_class = getattr(importlib.import_module(module), name)

    state = init_state(training_args)
    set_seed(training_args.seed)
    # Never keep a Hub token in the training arguments: Trainer pickles them into training_args.bin, which is uploaded.
    if training_args.hub_token:
        os.environ["HF_TOKEN"] = training_args.hub_token
        training_args.hub_token = None
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    # Contact the Hub only once the run is complete: a missing login or network then costs no training, and the
    # upload failure below leaves the finished output directory intact.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False

    # 1. Prompts.
    train_dataset = load_prompts(script_args, script_args.dataset_train_split, script_args.max_train_prompts)
    state.print(f"Loaded {len(train_dataset)} training prompts from {script_args.dataset_name} "
                f"({script_args.data_dir or script_args.dataset_config or 'default'}, {script_args.dataset_train_split}).")

    # 2. Reward model and reference rewards (cached, resumable, sharded over processes).
    reward_funcs, reward_classes = load_reward(script_args, model_args, training_args)
    train_dataset = build_reference(train_dataset, script_args, training_args, model_args, reward_funcs, reward_classes)
    state.print(f"Reference rewards: K={training_args.num_reference_samples} per prompt "
                f"(cache: {reference_cache_dir(script_args, training_args)}).")

    # 3. Train.
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        reward_processing_classes=reward_classes,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    state.print(f"Training done: transform {training_args.resolved_transform}, beta {training_args.beta:.4g}.")

    # 4. Evaluate against the reference policy and put the results in the model card.
    if not script_args.skip_eval:
        result = evaluate(trainer, script_args, training_args, model_args, reward_funcs, reward_classes)
        # the card reads the rows in `win_rates` and the point KL estimates `kl_k1` / `kl_k3`
        trainer.record_evaluation({**result.to_dict(), "kl_k1": result.kl_k1, "kl_k3": result.kl_k3})
        if state.is_main_process:
            eval_dir = Path(training_args.output_dir)
            eval_dir.mkdir(parents=True, exist_ok=True)
            result.to_json(eval_dir / "infalign_eval.json")
            try:
                result.plot(eval_dir / "infalign_eval.png")
            except ImportError:
                pass  # matplotlib is optional
            print(result.to_markdown(), flush=True)

    # 5. Save (model, tokenizer, model card) and publish.
    dataset_name = card_dataset_name(script_args)
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(dataset_name=dataset_name)
    state.print(f"Saved to {training_args.output_dir}.")
    if push_to_hub:
        try:
            trainer.push_to_hub(dataset_name=dataset_name)
        except HubUploadError as error:
            state.print(f"Hub upload failed: {error}", file=sys.stderr)
            return 3
        state.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    state.wait_for_everyone()
    return 0


def selected_trainer(argv: list[str]) -> str:
    """`--trainer` from the command line, else the YAML's `trainer:` key, else `rloo`: it decides the config class."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--trainer")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.trainer is None and known.config:
        import yaml

        known.trainer = (yaml.safe_load(Path(known.config).read_text()) or {}).get("trainer")
    trainer = known.trainer or "rloo"
    if trainer not in TRAINERS:
        raise SystemExit(f"--trainer must be one of {list(TRAINERS)}, got {trainer!r}.")
    return trainer


class RecipeParser:
    """`TrlParser((ScriptArguments, <config of --trainer>, ModelConfig))`, choosing the config class per call."""

    def __init__(self, trainer: str | None = None):
        self.trainer = trainer

    def parser(self, argv: list[str]):
        from trl import ModelConfig, TrlParser

        config_class = TRAINERS[self.trainer or selected_trainer(argv)][0]
        return TrlParser((ScriptArguments, config_class, ModelConfig))

    def parse_args_and_config(self, args=None, **kwargs):
        argv = sys.argv[1:] if args is None else list(args)
        return self.parser(argv).parse_args_and_config(args=argv, **kwargs)


def make_parser(trainer: str | None = None) -> RecipeParser:
    return RecipeParser(trainer)


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    sys.exit(main(script_args, training_args, model_args))
