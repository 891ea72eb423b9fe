"""Shared set-up of the one-token bandit used by the end-to-end tests."""

from __future__ import annotations

import torch
from datasets import Dataset

from trl_infalign import CTRLConfig, calibrate, get_transform
from trl_infalign.tiny import (
    BANDIT_PROMPT,
    bandit_action_ids,
    bandit_next_token_probs,
    build_bandit_policy,
    build_bandit_tokenizer,
)

NUM_ACTIONS = 12


def make_bandit(tmp_path, num_actions: int = NUM_ACTIONS, num_reference: int = 64, seed: int = 0, levels: int | None = None):
    """Reference policy on disk, its action probabilities, a reward table and a one-prompt dataset with ref rewards.

    Action a has reward a, or ⌊a·levels/num_actions⌋ with `levels` (few distinct rewards: many ties)."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(num_actions, generator=generator) * 0.6, dim=0)
    tokenizer = build_bandit_tokenizer(num_actions)
    path = build_bandit_policy(tokenizer, tmp_path / "reference", target, seed=seed)
    from transformers import AutoModelForCausalLM

    pi_ref = bandit_next_token_probs(AutoModelForCausalLM.from_pretrained(path), tokenizer)
    rewards = torch.full((len(tokenizer),), -1.0, dtype=torch.float64)  # non-action tokens: worst reward
    action_rewards = torch.arange(num_actions, dtype=torch.float64)
    if levels is not None:
        action_rewards = torch.div(action_rewards * levels, num_actions, rounding_mode="floor")
    rewards[bandit_action_ids(tokenizer, num_actions)] = action_rewards
    ref_samples = torch.multinomial(pi_ref, num_reference, replacement=True, generator=generator)
    ref_rewards = rewards[ref_samples].tolist()
    dataset = Dataset.from_dict({"prompt": [BANDIT_PROMPT] * 64, "ref_rewards": [ref_rewards] * 64})

    def reward_func(completion_ids, **kwargs):
        return [rewards[ids[0]].item() if ids else -1.0 for ids in completion_ids]

    return path, tokenizer, pi_ref, rewards, ref_rewards, dataset, reward_func


def optimal_policy(pi_ref, rewards, ref_rewards, transform: str, beta: float):
    """π*(a) ∝ π_ref(a)·exp(Φ(c(a))/β) with c(a) calibrated against the prompt's fixed reference rewards."""
    ref = torch.tensor(ref_rewards, dtype=torch.float64).expand(len(rewards), -1)
    c = calibrate(rewards, ref)
    logits = torch.log(pi_ref) + get_transform(transform)(c).double() / beta
    return torch.softmax(logits, dim=0)


def bandit_config(output_dir, transform: str, beta: float, **overrides) -> CTRLConfig:
    kwargs = dict(
        output_dir=str(output_dir),
        transform=transform,
        inference_procedure="bon",
        inference_n=4,
        beta=beta,
        learning_rate=1e-2,
        per_device_train_batch_size=64,
        num_generations=16,
        max_completion_length=1,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        mask_truncated_completions=False,
        num_train_epochs=1,
        max_steps=150,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        min_reference_samples=8,
        disable_dropout=True,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return CTRLConfig(**kwargs)


#: Learning rate, batch and steps of the G = 4 GRPO bandit (`grpo_bandit_config`). 256 completions (64 groups of 4) per
#: step: with only 3 other samples in its baseline, GRPO at G = 4 is noisier than RLOO at G = 16. Measured on seeds 0-4
#: (benchmarks/grpo_bandit.py, docs/grpo.md): 150 steps at lr 1e-2 with 128 completions ended TV 0.013-0.036 from the
#: optimum, 300 steps at lr 5e-3 with 128 completions 0.005-0.025; these settings stay below 0.02 on every seed.
GRPO_BANDIT_SETTINGS = {"learning_rate": 5e-3, "per_device_train_batch_size": 256, "max_steps": 300}


def grpo_bandit_config(output_dir, transform: str, beta: float, **overrides):
    """`bandit_config`'s settings as a `CTRLGRPOConfig`, G = 4 (β and β·G/(G−1) are then far apart), with
    `GRPO_BANDIT_SETTINGS` for learning rate, batch and steps."""
    from trl_infalign.ctrl_grpo_config import CTRLGRPOConfig

    ctrl = dict(output_dir=str(output_dir), transform=transform, inference_procedure="bon", inference_n=4, beta=beta,
                num_generations=4, max_completion_length=1, temperature=1.0, top_k=0, top_p=1.0,
                mask_truncated_completions=False, logging_steps=50, save_strategy="no", report_to="none", use_cpu=True,
                bf16=False, seed=0, min_reference_samples=8, disable_dropout=True, disable_tqdm=True,
                **GRPO_BANDIT_SETTINGS)
    ctrl.update(overrides)
    return CTRLGRPOConfig(**ctrl)
