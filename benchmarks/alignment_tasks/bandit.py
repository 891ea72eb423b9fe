"""Task `bandit`: one prompt, V one-token actions with distinct Gaussian rewards, a tiny Llama pre-trained so that
π_ref is known exactly, K stratified reference rewards; exact metrics from the action distributions (also used by
`hetero_bandit` and benchmarks/grpo_bandit.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from .common import METHODS, N, base_row, common_train_kwargs, diagnose_tables, make_config, plan_runs, row_line, train

DEFAULTS = {
    "quick": dict(target_kls=(0.25, 0.5, 0.75), methods=("identity", "ctrl_bon", "ctrl_won", "optimal"),
                  num_actions=200, steps=150, lr=1e-2, num_reference=512),
    "full": dict(target_kls=(0.125, 0.25, 0.5, 0.75, 1.0), methods=tuple(METHODS), num_actions=500, steps=600,
                 lr=5e-3, num_reference=2048),
}


def exact_metrics(pi, pi_ref, rewards, n: int = N) -> dict:
    """Exact KL(π‖π_ref) and standard / BoN-n / WoN-n win rates (ties ½) of a distribution over tokens with the given
    rewards (ties between equal rewards allowed) against π_ref."""
    import torch

    pi, pi_ref, rewards = (torch.as_tensor(x, dtype=torch.float64) for x in (pi, pi_ref, rewards))
    pi, pi_ref = pi / pi.sum(), pi_ref / pi_ref.sum()
    support = pi > 0
    kl = float((pi[support] * (pi[support].log() - pi_ref[support].log())).sum())
    values, inverse = torch.unique(rewards, sorted=True, return_inverse=True)
    p = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, pi)
    q = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, pi_ref)
    P, Q = p.cumsum(0).clamp(max=1.0), q.cumsum(0).clamp(max=1.0)  # CDFs at each reward value
    P0, Q0 = torch.cat([P.new_zeros(1), P[:-1]]), torch.cat([Q.new_zeros(1), Q[:-1]])  # CDFs just below

    def win(p_mass, q_cdf, q_cdf_below):  # P(X > Y) + ½ P(X = Y) for X with masses p_mass, Y with CDF q_cdf
        return float((p_mass * (q_cdf_below + 0.5 * (q_cdf - q_cdf_below))).sum())

    # worst of n: CDF 1 − (1 − F)^n
    wP, wP0 = 1 - (1 - P) ** n, 1 - (1 - P0) ** n
    wQ, wQ0 = 1 - (1 - Q) ** n, 1 - (1 - Q0) ** n
    return {
        "kl": kl,
        "standard_win": win(p, Q, Q0),
        "bon_win": win(P**n - P0**n, Q**n, Q0**n),
        "won_win": win(wP - wP0, wQ, wQ0),
    }


def mean_exact_metrics(pi, pi_ref, rewards) -> dict:
    """`exact_metrics` per prompt (rows of (P, vocab) tensors), averaged over prompts (uniform prompt distribution)."""
    per = [exact_metrics(pi[i], pi_ref[i], rewards[i]) for i in range(len(pi))]
    return {k: sum(m[k] for m in per) / len(per) for k in per[0]}


def stratified_reference_rewards(pi_ref, rewards, k: int) -> list[float]:
    """K reference rewards at the quantile levels (i + ½)/K of the reward distribution under π_ref (a stratified sample
    of π_ref: calibration against it is the true mid-CDF up to 1/K, without the ~1/√K noise of K random draws)."""
    import torch

    order = torch.argsort(torch.as_tensor(rewards, dtype=torch.float64))
    cdf = torch.as_tensor(pi_ref, dtype=torch.float64)[order].cumsum(0)
    cdf = cdf / cdf[-1]
    levels = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    idx = torch.searchsorted(cdf, levels).clamp(max=len(order) - 1)
    return torch.as_tensor(rewards, dtype=torch.float64)[order][idx].tolist()


def bandit_optimum(pi_ref, rewards, ref_rewards, transform: str | None, beta: float):
    """The exact stationary point of RLOO (k1 penalty) on a one-token bandit: π_ref·exp(Φ/β)/Z, with Φ the CTRL
    transform of the calibrated (or, for raw-reward transforms, the raw) reward; `transform=None` means Φ = r."""
    import torch

    from trl_infalign import calibrate, get_transform

    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    if transform is None:
        score = rewards
    else:
        ref = torch.tensor(ref_rewards, dtype=torch.float64).expand(len(rewards), -1)
        mask = torch.ones_like(ref, dtype=torch.bool)
        score = get_transform(transform)(calibrate(rewards, ref), rewards=rewards, ref_rewards=ref, ref_mask=mask)
        score = score.double()
    logits = torch.log(torch.as_tensor(pi_ref, dtype=torch.float64)) + (score - score.max()) / beta
    return torch.softmax(logits, dim=0)


def bandit_config_kwargs(device, seed, *, lr, batch, num_generations, steps) -> dict:
    return common_train_kwargs(
        device, seed, learning_rate=lr, per_device_train_batch_size=batch, num_generations=num_generations,
        max_completion_length=1, mask_truncated_completions=False, max_steps=steps, min_reference_samples=8,
        # hand-made benchmark datasets: no `ref_rewards_provenance` column to compare with
        reference_provenance_check="off",
    )


def run_bandit(workdir: Path, *, target_kls, methods, num_actions: int, steps: int, num_reference: int = 512,
               lr: float = 1e-2, num_generations: int = 64, device: str = "cpu", seed: int = 0, log=print) -> dict:
    """One prompt, V one-token actions with distinct N(0, 1) rewards; exact metrics."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from trl_infalign.tiny import BANDIT_PROMPT, bandit_action_ids, bandit_next_token_probs, build_bandit_policy, \
        build_bandit_tokenizer

    generator = torch.Generator().manual_seed(seed)
    tokenizer = build_bandit_tokenizer(num_actions)
    target = torch.softmax(torch.randn(num_actions, generator=generator) * 0.6, dim=0)
    path = build_bandit_policy(tokenizer, workdir / "bandit-reference", target, seed=seed)
    pi_ref = bandit_next_token_probs(AutoModelForCausalLM.from_pretrained(path), tokenizer)
    action_rewards = torch.randn(num_actions, generator=generator, dtype=torch.float64)
    rewards = torch.full((len(tokenizer),), float(action_rewards.min()) - 1.0, dtype=torch.float64)
    rewards[bandit_action_ids(tokenizer, num_actions)] = action_rewards
    ref_rewards = stratified_reference_rewards(pi_ref, rewards, num_reference)
    dataset = Dataset.from_dict({"prompt": [BANDIT_PROMPT] * 64, "ref_rewards": [ref_rewards] * 64})
    reward_table = rewards.tolist()

    def bandit_reward(completion_ids, **kwargs):
        return [reward_table[ids[0]] if ids else reward_table[tokenizer.pad_token_id] for ids in completion_ids]

    log(f"[bandit] V={num_actions} actions, π_ref max prob {pi_ref.max():.4f}, K={num_reference} stratified reference "
        f"rewards, {steps} steps per run")
    tables = diagnose_tables([ref_rewards], target_kls)
    common = bandit_config_kwargs(device, seed, lr=lr, batch=64, num_generations=num_generations, steps=steps)
    rows = []
    for spec in plan_runs(target_kls, methods, {k: v["bon"]["methods"] for k, v in tables.items()}):
        start = time.time()
        args = make_config(spec, workdir / "bandit-run", **common)
        model, final_beta = train(args, path, tokenizer, bandit_reward, dataset, numpy_references=True)
        pi = bandit_next_token_probs(model, tokenizer)
        measured = exact_metrics(pi, pi_ref, rewards)
        optimum = bandit_optimum(pi_ref, rewards, ref_rewards, args.resolved_transform, final_beta)
        at_optimum = exact_metrics(optimum, pi_ref, rewards)
        row = base_row("bandit", spec, args, final_beta, measured, [ref_rewards], time.time() - start)
        row.update({"metrics": "exact", "tv_to_optimum": 0.5 * float((pi - optimum).abs().sum()),
                    "optimum_at_final_beta": at_optimum})
        rows.append(row)
        log(row_line(row))
        del model
    return {"rows": rows, "diagnose": tables,
            "setup": {"num_actions": num_actions, "num_reference": num_reference, "steps": steps, "lr": lr,
                      "batch": 64, "num_generations": num_generations, "pi_ref_max": float(pi_ref.max())}}
