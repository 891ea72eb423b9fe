"""Alignment quality of CTRL vs raw-reward RLOO: measured KL and inference-time win rates against the calibrated-space theory.

    python benchmarks/alignment_quality.py --quick                      # CPU, <= 10 minutes, both tasks
    python benchmarks/alignment_quality.py --device cuda                # full sweep (GPU)
    python benchmarks/alignment_quality.py --task bandit --target-kls 0.25 0.5 1.0 --betas 0.7 1.0 1.4

For every task it trains, over a KL sweep, five methods from the same reference policy:

- ``raw_reward``  plain ``trl.RLOOTrainer`` on the raw reward (β swept directly with ``--betas``: there is no
  calibrated-space theory for an uncalibrated reward, so its KL is whatever the β gives — measured, not targeted);
- ``identity``    CTRL with Φ(c) = c (InfAlign's "calibration alone" baseline), β = ``theory.beta_for_kl``;
- ``ctrl_bon``    CTRL with Φ(c) = exp(t·c), (t, β) = ``theory.best_t("bon", 4, kl)``;
- ``ctrl_won``    CTRL with Φ(c) = −exp(−t·c), (t, β) = ``theory.best_t("won", 4, kl)``;
- ``optimal``     CTRL with the numerically optimal transform for BoN-4, β from ``theory.optimal_policy(kl=)``;

at each target KL of ``--target-kls``, then measures KL(π‖π_ref) and the standard / BoN-4 / WoN-4 win rates against the
reference, and the theory's prediction for the method's *transform* at the *measured* KL (``theory_bon_win``,
``theory_won_win``; null for ``raw_reward``, whose calibrated-space transform is the unknown reference quantile
function of the reward — its points are compared with the optimal frontier instead).

Tasks (reported separately):

- ``bandit``: one prompt, one-token completions over V actions with distinct rewards (a tiny Llama pre-trained so that
  π_ref over the actions is known). The policy can represent the optimum exactly and every metric is computed
  *exactly* from the action distributions (no sampling error): points should sit on the theory curves.
- ``lm``: the multi-token tiny-LM VADER-sentiment task of ``examples/quickstart.py``; metrics are Monte-Carlo
  (``trl_infalign.evaluation.inference_win_rate`` on sampled rewards, ``kl_estimates`` k3 on sampled log-probs): the
  realistic gap to theory (finite training, a policy that cannot represent π* exactly, K-sample calibration).

Outputs in ``--output``: ``alignment_quality.json`` (a list of rows: task, method, transform, target_kl, beta, kl,
standard_win, bon_win, won_win, theory_bon_win, theory_won_win, ...), ``alignment_quality_<task>.png`` and a printed
table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

N = 4  # N of the inference-time procedures
METHODS = ("raw_reward", "identity", "ctrl_bon", "ctrl_won", "optimal")
METHOD_LABELS = {
    "raw_reward": "raw-reward RLOO",
    "identity": "calibrated identity",
    "ctrl_bon": "CTRL-BoN (exp, best t)",
    "ctrl_won": "CTRL-WoN (-exp(-tc), best t)",
    "optimal": "CTRL optimal (BoN-4)",
}
COLORS = {"raw_reward": "tab:gray", "identity": "tab:blue", "ctrl_bon": "tab:orange", "ctrl_won": "tab:green",
          "optimal": "black"}
MARKERS = {"raw_reward": "X", "identity": "o", "ctrl_bon": "s", "ctrl_won": "^", "optimal": "D"}

# Defaults per task and mode. Raw-reward β ranges are chosen so that its KLs span those of the target-KL sweep.
DEFAULTS = {
    "bandit": {
        "quick": dict(target_kls=(0.25, 0.5, 0.75), betas=(0.8, 1.1, 1.4), num_actions=200, steps=150),
        "full": dict(target_kls=(0.125, 0.25, 0.5, 0.75, 1.0, 1.5), betas=(0.5, 0.7, 1.0, 1.4, 2.0),
                     num_actions=500, steps=1000, lr=5e-3, num_reference=2048),
    },
    "lm": {
        "quick": dict(target_kls=(0.25, 0.5, 0.75), betas=(0.25, 0.5, 1.0), steps=100, lr=1e-3, pretrain_steps=250, num_reference=16,
                      eval_samples=16, hidden_size=64, num_layers=2, max_new_tokens=8, prompt_repeats=1),
        "full": dict(target_kls=(0.25, 0.5, 1.0, 2.0), betas=(0.1, 0.2, 0.5, 1.0, 2.0), steps=400, lr=1e-3,
                     pretrain_steps=600, num_reference=64, eval_samples=64, hidden_size=128, num_layers=4,
                     max_new_tokens=12, prompt_repeats=4),
    },
}


# ---------------------------------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One training run: `transform` is a CTRL transform spec (None for raw-reward RLOO)."""

    method: str
    transform: str | None
    beta: float
    target_kl: float | None
    procedure: str = "bon"  # CTRLConfig.inference_procedure (only logging/`optimal` resolution depend on it)


def plan_runs(target_kls, raw_betas, methods=METHODS) -> list[RunSpec]:
    """The sweep: each calibrated method at each target KL (β, t from the calibrated-space theory), raw reward per β."""
    from trl_infalign import theory

    runs = []
    for kl in target_kls:
        kl = float(kl)
        if "identity" in methods:
            runs.append(RunSpec("identity", "identity", theory.beta_for_kl("identity", kl), kl))
        if "ctrl_bon" in methods:
            best = theory.best_t("bon", N, kl)
            runs.append(RunSpec("ctrl_bon", f"bon:t={best.t:.6g}", best.beta, kl))
        if "ctrl_won" in methods:
            best = theory.best_t("won", N, kl)
            runs.append(RunSpec("ctrl_won", f"won:t={best.t:.6g}", best.beta, kl, procedure="won"))
        if "optimal" in methods:
            beta = theory.optimal_policy("bon", N, kl=kl).beta
            runs.append(RunSpec("optimal", f"optimal:procedure=bon,n={N},beta={beta:.6g}", float(f"{beta:.6g}"), kl))
    if "raw_reward" in methods:
        runs.extend(RunSpec("raw_reward", None, float(b), None) for b in raw_betas)
    return runs


def theory_at_kl(transform: str | None, kl: float) -> tuple[float | None, float | None]:
    """(BoN-4, WoN-4) win rates that the calibrated-space theory predicts for `transform` at KL `kl` (β re-solved so
    that the transform's optimum has exactly this KL). None for raw reward or a KL the transform cannot reach."""
    from trl_infalign import theory

    if transform is None or not (kl > 1e-6 and math.isfinite(kl)):
        return None, None
    try:
        pol = theory.policy(transform, theory.beta_for_kl(transform, kl))
    except ValueError:
        return None, None
    return pol.win_rate("bon", N), pol.win_rate("won", N)


def _train_config(spec: RunSpec, output_dir, **common):
    if spec.transform is None:
        from trl import RLOOConfig

        return RLOOConfig(output_dir=str(output_dir), beta=spec.beta, **common)
    from trl_infalign import CTRLConfig

    transform = "optimal" if spec.transform.startswith("optimal") else spec.transform
    return CTRLConfig(output_dir=str(output_dir), transform=transform, beta=spec.beta, inference_procedure=spec.procedure,
                      inference_n=N, **common)


def train(spec: RunSpec, model_path, tokenizer, reward_func, dataset, output_dir, **common):
    """Train one run; returns the trained model (raw reward: plain `trl.RLOOTrainer`, else `CTRLTrainer`)."""
    args = _train_config(spec, output_dir, **common)
    if spec.transform is None:
        from trl import RLOOTrainer

        dataset = dataset.remove_columns([c for c in dataset.column_names if c != "prompt"])
        trainer = RLOOTrainer(model=str(model_path), reward_funcs=reward_func, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    else:
        from trl_infalign import CTRLTrainer

        if spec.transform.startswith("optimal"):
            assert args.resolved_transform == spec.transform, (args.resolved_transform, spec.transform)
        trainer = CTRLTrainer(model=str(model_path), reward_funcs=reward_func, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    trainer.train()
    model = trainer.model
    model.eval()
    return model


def _common_train_kwargs(device: str, seed: int, **overrides) -> dict:
    kwargs = dict(
        temperature=1.0, top_k=0, top_p=1.0, num_train_epochs=1, save_strategy="no", report_to="none", seed=seed,
        disable_dropout=True, disable_tqdm=True, logging_steps=10_000, bf16=False, use_cpu=device == "cpu",
    )
    kwargs.update(overrides)
    return kwargs


# ---------------------------------------------------------------------------------------------------------------------
# bandit: exact metrics from the action distributions
# ---------------------------------------------------------------------------------------------------------------------
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

    bon_p, bon_q = P**n - P0**n, Q**n - Q0**n
    # worst of n: CDF 1 − (1 − F)^n
    wP, wP0 = 1 - (1 - P) ** n, 1 - (1 - P0) ** n
    wQ, wQ0 = 1 - (1 - Q) ** n, 1 - (1 - Q0) ** n
    del bon_q
    return {
        "kl": kl,
        "standard_win": win(p, Q, Q0),
        "bon_win": win(bon_p, Q**n, Q0**n),
        "won_win": win(wP - wP0, wQ, wQ0),
    }


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
    """The exact stationary point of RLOO (k1 penalty) on this bandit: π_ref·exp(R/β)/Z, R = Φ(c) (or the raw reward)."""
    import torch

    from trl_infalign import calibrate, get_transform

    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    if transform is None:
        score = rewards
    else:
        ref = torch.tensor(ref_rewards, dtype=torch.float64).expand(len(rewards), -1)
        score = get_transform(transform)(calibrate(rewards, ref)).double()
    logits = torch.log(torch.as_tensor(pi_ref, dtype=torch.float64)) + (score - score.max()) / beta
    return torch.softmax(logits, dim=0)


def run_bandit(workdir: Path, *, target_kls, betas, num_actions: int, steps: int, num_reference: int = 512, lr: float = 1e-2, num_generations: int = 64,
               device: str = "cpu", seed: int = 0, methods=METHODS, log=print) -> list[dict]:
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
    # distinct Gaussian rewards (a typical reward-model scale), independent of π_ref; non-action tokens: below all
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
    common = _common_train_kwargs(
        device, seed, learning_rate=lr, per_device_train_batch_size=64, num_generations=num_generations, max_completion_length=1,
        mask_truncated_completions=False, max_steps=steps,
    )
    rows = []
    for spec in plan_runs(target_kls, betas, methods):
        start = time.time()
        extra = {} if spec.transform is None else dict(min_reference_samples=8)
        model = train(spec, path, tokenizer, bandit_reward, dataset, workdir / "bandit-run", **common, **extra)
        pi = bandit_next_token_probs(model, tokenizer)
        measured = exact_metrics(pi, pi_ref, rewards)
        optimum = bandit_optimum(pi_ref, rewards, ref_rewards, spec.transform, spec.beta)
        at_optimum = exact_metrics(optimum, pi_ref, rewards)
        theory_bon, theory_won = theory_at_kl(spec.transform, measured["kl"])
        row = {
            "task": "bandit", "method": spec.method, "transform": spec.transform or "raw", "target_kl": spec.target_kl,
            "beta": spec.beta, **measured, "theory_bon_win": theory_bon, "theory_won_win": theory_won,
            "metrics": "exact",
            "tv_to_optimum": 0.5 * float((pi - optimum).abs().sum()),
            "optimum_kl": at_optimum["kl"], "optimum_bon_win": at_optimum["bon_win"],
            "optimum_won_win": at_optimum["won_win"], "train_seconds": time.time() - start,
        }
        rows.append(row)
        log(_row_line(row))
        del model
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# lm: the quickstart's tiny-LM VADER task, Monte-Carlo metrics with the evaluator
# ---------------------------------------------------------------------------------------------------------------------
def _quickstart():
    """`examples/quickstart.py` (corpus generator, prompts' parts, the VADER reward), imported by path."""
    examples = str(Path(__file__).resolve().parent.parent / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import quickstart

    return quickstart


class PolicySampler:
    """Fixed evaluation protocol of the lm task: fresh reference samples scored once, then, per policy, `m` samples per
    prompt scored with the same reward, plus their log-probs under the policy and the reference (for the KL)."""

    def __init__(self, reference, tokenizer, prompts, reward_func, *, num_samples: int, max_new_tokens: int, seed: int):
        import torch

        from trl_infalign.sampling import generate_completions, load_reward_funcs

        self.reference, self.tokenizer, self.prompts = reference, tokenizer, list(prompts)
        self.funcs, self.classes = load_reward_funcs(reward_func)
        self.num_samples, self.max_new_tokens, self.seed = num_samples, max_new_tokens, seed
        torch.manual_seed(seed + 7919)
        ref = generate_completions(reference, tokenizer, self.prompts, num_samples, max_new_tokens=max_new_tokens,
                                   progress=False)
        self.reference_rewards = self._score(ref)

    def _score(self, comps):
        from trl_infalign.sampling import score_completions

        flat_prompts = [p for p, texts in zip(comps.prompts, comps.texts) for _ in texts]
        flat_texts = [t for texts in comps.texts for t in texts]
        flat_ids = [i for ids in comps.ids for i in ids]
        scores = score_completions(self.funcs, self.classes, flat_prompts, flat_texts, completion_ids=flat_ids)
        return scores[:, 0].reshape(len(comps.prompts), -1).double()

    def evaluate(self, model) -> dict:
        import torch

        from trl_infalign.evaluation import inference_win_rate, kl_estimates
        from trl_infalign.sampling import completion_logprobs, generate_completions

        torch.manual_seed(self.seed)
        comps = generate_completions(model, self.tokenizer, self.prompts, self.num_samples,
                                     max_new_tokens=self.max_new_tokens, progress=False)
        rewards = self._score(comps)
        prompt_ids = [comps.prompt_ids[p] for p in range(len(comps.prompts)) for _ in comps.ids[p]]
        completion_ids = [i for ids in comps.ids for i in ids]
        pad = self.tokenizer.pad_token_id
        logp = completion_logprobs(model, prompt_ids, completion_ids, pad_token_id=pad)
        logp_ref = completion_logprobs(self.reference, prompt_ids, completion_ids, pad_token_id=pad)
        k1, k3 = kl_estimates(logp, logp_ref)
        out = {"kl": k3, "kl_k1": k1}
        for key, procedure, n in (("standard_win", "standard", 1), ("bon_win", "bon", N), ("won_win", "won", N)):
            result = inference_win_rate(rewards, self.reference_rewards, n, procedure, seed=self.seed)
            out[key], out[f"{key}_ci"] = result.estimate, [result.ci_low, result.ci_high]
        out["mean_reward"] = float(rewards.mean())
        return out


def run_lm(workdir: Path, *, target_kls, betas, steps: int, pretrain_steps: int, num_reference: int, eval_samples: int,
           hidden_size: int, num_layers: int, max_new_tokens: int, prompt_repeats: int = 1, lr: float = 3e-3,
           device: str = "cpu", seed: int = 0, methods=METHODS, log=print) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from trl_infalign import build_reference_rewards
    from trl_infalign.tiny import build_tiny_policy, build_tokenizer, pretrain_on_texts

    qs = _quickstart()
    torch.manual_seed(seed)
    corpus = qs.review_corpus(2000, seed)
    tokenizer = build_tokenizer(corpus, vocab_size=400)
    sft_path = workdir / "lm-sft"
    build_tiny_policy(tokenizer, sft_path, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    sft = AutoModelForCausalLM.from_pretrained(sft_path).to(device)
    pretrain_on_texts(sft, tokenizer, corpus, steps=pretrain_steps, lr=3e-3, batch_size=32, seed=seed)
    sft.save_pretrained(sft_path)
    prompts = [f"{s} {v}" for s in qs.SUBJECTS for v in qs.VERBS]
    log(f"[lm] tiny Llama {hidden_size}x{num_layers} pre-trained {pretrain_steps} steps; {len(prompts)} prompts, "
        f"K={num_reference} reference samples, {steps} RL steps per run, {eval_samples} eval samples per prompt and side")
    dataset = build_reference_rewards(Dataset.from_dict({"prompt": prompts}), sft, qs.vader_sentiment,
                                      tokenizer=tokenizer, num_samples=num_reference, max_new_tokens=max_new_tokens,
                                      seed=seed, progress=False)
    if prompt_repeats > 1:
        from datasets import concatenate_datasets

        dataset = concatenate_datasets([dataset] * prompt_repeats)
    sampler = PolicySampler(sft, tokenizer, prompts, qs.vader_sentiment, num_samples=eval_samples,
                            max_new_tokens=max_new_tokens, seed=seed + 1)
    common = _common_train_kwargs(
        device, seed, learning_rate=lr, per_device_train_batch_size=32, num_generations=8,
        max_completion_length=max_new_tokens, max_steps=steps,
    )
    rows = []
    for spec in plan_runs(target_kls, betas, methods):
        start = time.time()
        model = train(spec, sft_path, tokenizer, qs.vader_sentiment, dataset, workdir / "lm-run", **common)
        measured = sampler.evaluate(model)
        theory_bon, theory_won = theory_at_kl(spec.transform, measured["kl"])
        row = {
            "task": "lm", "method": spec.method, "transform": spec.transform or "raw", "target_kl": spec.target_kl,
            "beta": spec.beta, **measured, "theory_bon_win": theory_bon, "theory_won_win": theory_won,
            "metrics": f"sampled: {eval_samples} samples/prompt/side, {len(prompts)} prompts, KL = k3 estimate",
            "train_seconds": time.time() - start,
        }
        rows.append(row)
        log(_row_line(row))
        del model
    return rows


def _row_line(row: dict) -> str:
    def f(v):
        return "   -  " if v is None else f"{v:.4f}"

    return (f"  [{row['task']}] {row['method']:<10} β={row['beta']:<11.5g} KL={row['kl']:.4f}  std={f(row['standard_win'])} "
            f"bon4={f(row['bon_win'])} (theory {f(row['theory_bon_win'])})  won4={f(row['won_win'])} "
            f"(theory {f(row['theory_won_win'])})  {row.get('train_seconds', 0):.0f}s")


# ---------------------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------------------
def theory_curves(kl_max: float, num: int = 14) -> dict[str, dict[str, list[float]]]:
    """Win-vs-KL curves of the calibrated-space model: {curve: {"kl", "bon", "won"}} for the identity, the bon / won exp
    families at their best t for each KL (BoN-4 / WoN-4), the optimal transform for BoN-4 and the WoN-4 optimum."""
    import numpy as np

    from trl_infalign import theory

    kls = [float(k) for k in np.geomspace(0.02, kl_max, num)]
    curves: dict[str, dict[str, list[float]]] = {}

    def add(name, policies):
        pols = [p for p in policies if p is not None]
        curves[name] = {"kl": [p.kl() for p in pols], "bon": [p.win_rate("bon", N) for p in pols],
                        "won": [p.win_rate("won", N) for p in pols]}

    def safe(fn):
        try:
            return fn()
        except ValueError:
            return None

    add("identity", [safe(lambda k=k: theory.policy("identity", theory.beta_for_kl("identity", k))) for k in kls])
    for family, name in (("bon", "ctrl_bon"), ("won", "ctrl_won")):
        def best(k, family=family):
            b = theory.best_t(family, N, k)
            return theory.policy(b.transform, b.beta)

        add(name, [safe(lambda k=k: best(k)) for k in kls])
    for procedure, name in (("bon", "optimal"), ("won", "optimal_won")):
        points = theory.frontier(["optimal"], procedure, N, kls=kls)
        add(name, [theory.optimal_policy(procedure, N, beta=p.beta) for p in points])
    return curves


CURVE_STYLE = {
    "identity": dict(color=COLORS["identity"], label="theory: identity"),
    "ctrl_bon": dict(color=COLORS["ctrl_bon"], label="theory: bon exp(t·c), best t"),
    "ctrl_won": dict(color=COLORS["ctrl_won"], label="theory: won −exp(−t·c), best t"),
    "optimal": dict(color="black", linestyle="--", label="theory: optimal for BoN-4"),
    "optimal_won": dict(color="gray", linestyle=":", label="theory: optimal for WoN-4"),
}


def plot_task(task: str, rows: list[dict], path: Path, curves: dict | None = None) -> None:
    """Two panels (BoN-4, WoN-4 win rate vs KL): theory curves, measured points (with CIs when sampled)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    kl_max = min(max([r["kl"] for r in rows] + [r["target_kl"] or 0 for r in rows] + [0.3]) * 1.15, 3.0)
    curves = curves if curves is not None else theory_curves(kl_max)
    off_plot = [r for r in rows if r["kl"] > kl_max]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (key, title) in zip(axes, (("bon", f"Best-of-{N}"), ("won", f"Worst-of-{N}"))):
        for name, curve in curves.items():
            if name == "optimal_won" and key == "bon":
                continue
            ax.plot(curve["kl"], curve[key], linewidth=1.6, **{"linestyle": "-", **CURVE_STYLE[name]})
        for method in METHODS:
            pts = [r for r in rows if r["method"] == method]
            if not pts:
                continue
            x = [r["kl"] for r in pts]
            y = [r[f"{key}_win"] for r in pts]
            ci = [r.get(f"{key}_win_ci") for r in pts]
            if all(c is not None for c in ci):
                yerr = [[v - c[0] for v, c in zip(y, ci)], [c[1] - v for v, c in zip(y, ci)]]
                ax.errorbar(x, y, yerr=yerr, fmt="none", ecolor=COLORS[method], alpha=0.5, capsize=2)
            ax.scatter(x, y, marker=MARKERS[method], s=55, color=COLORS[method], edgecolor="white", linewidth=0.8,
                       zorder=5, label=f"measured: {METHOD_LABELS[method]}")
        ax.set_xlabel("KL(π ‖ π_ref) [nats]" + (" (exact)" if task == "bandit" else " (k3 estimate)"))
        ax.set_ylabel(f"{title} win rate vs π_ref's {title}")
        ax.set_title(f"{task}: {title} (N={N})")
        ax.grid(alpha=0.3)
        ax.set_xlim(0, kl_max)
        if off_plot:
            ax.text(0.02, 0.98, "off plot (KL > {:.2g}): ".format(kl_max) + ", ".join(
                f"{r['method']} KL={r['kl']:.3g}" for r in off_plot), transform=ax.transAxes, ha="left", va="top", fontsize=7)
    axes[1].legend(fontsize=7, loc="lower right")
    kind = ("one-token bandit, exact metrics" if task == "bandit"
            else "tiny-LM VADER task, sampled metrics (95% bootstrap CIs)")
    fig.suptitle(f"Alignment quality — {kind}; curves: calibrated-space theory", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    """One markdown table of every run (theory columns: the method's transform at its measured KL)."""
    lines = [
        "| task | method | transform | target KL | β | KL | standard win | BoN-4 win | theory BoN-4 | WoN-4 win | theory WoN-4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['method']} | `{r['transform']}` | {_fmt(r['target_kl'], 2)} | {r['beta']:.4g} | "
            f"{r['kl']:.3f} | {r['standard_win']:.3f} | {r['bon_win']:.3f} | {_fmt(r['theory_bon_win'])} | "
            f"{r['won_win']:.3f} | {_fmt(r['theory_won_win'])} |"
        )
    return "\n".join(lines)


def interpolate_raw(rows: list[dict], task: str, kl: float, key: str = "bon_win") -> float | None:
    """Raw-reward RLOO's `key` at KL `kl`, linearly interpolated between its measured points (None outside them)."""
    pts = sorted((r["kl"], r[key]) for r in rows if r["task"] == task and r["method"] == "raw_reward")
    for (k0, v0), (k1, v1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1 and k1 > k0:
            return v0 + (v1 - v0) * (kl - k0) / (k1 - k0)
    return None


def matched_kl_summary(rows: list[dict]) -> str:
    """BoN-4 win rate at matched KL: per task and target KL, CTRL-BoN vs calibrated identity vs raw reward (raw
    interpolated to the CTRL-BoN run's measured KL between its own measured points)."""
    lines = [
        "| task | target KL | CTRL-BoN: KL → BoN-4 | optimal: KL → BoN-4 | identity: KL → BoN-4 | raw reward at CTRL-BoN's KL: BoN-4 "
        "| raw reward at identity's KL: BoN-4 (standard) | identity: standard |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        targets = sorted({r["target_kl"] for r in rows if r["task"] == task and r["target_kl"] is not None})
        for kl in targets:
            get = {r["method"]: r for r in rows if r["task"] == task and r["target_kl"] == kl}

            def cell(method):
                r = get.get(method)
                return "–" if r is None else f"{r['kl']:.3f} → {r['bon_win']:.3f}"

            def raw_at(method, key="bon_win"):
                r = get.get(method)
                v = interpolate_raw(rows, task, r["kl"], key) if r else None
                return "out of raw's KL range" if r and v is None else ("–" if v is None else f"{v:.3f}")

            ident = get.get("identity")
            raw_id = raw_at("identity")
            if not raw_id.startswith("out") and raw_id != "–":
                raw_id += f" ({raw_at('identity', 'standard_win')})"
            lines.append(f"| {task} | {kl:g} | {cell('ctrl_bon')} | {cell('optimal')} | {cell('identity')} | "
                         f"{raw_at('ctrl_bon')} | {raw_id} | {_fmt(ident['standard_win'] if ident else None)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results", help="Directory for the JSON and the plots.")
    parser.add_argument("--quick", action="store_true", help="Small CPU settings (<= 10 minutes on 2 cores).")
    parser.add_argument("--task", choices=("bandit", "lm", "both"), default="both")
    parser.add_argument("--betas", type=float, nargs="+", default=None,
                        help="β sweep of the raw-reward RLOO baseline (default: per task, spanning the target KLs).")
    parser.add_argument("--target-kls", type=float, nargs="+", default=None,
                        help="Target KLs of the calibrated methods (β and t from the theory). Default: per task/mode.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available, else cpu).")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these models are tiny, and extra threads on a busy "
                        "machine slow every matmul down by an order of magnitude).")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    tasks = ("bandit", "lm") if args.task == "both" else (args.task,)
    start = time.time()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="alignment_quality_") as tmp:
        for task in tasks:
            settings = dict(DEFAULTS[task][mode])
            if args.betas is not None:
                settings["betas"] = tuple(args.betas)
            if args.target_kls is not None:
                settings["target_kls"] = tuple(args.target_kls)
            task_start = time.time()
            runner = run_bandit if task == "bandit" else run_lm
            task_rows = runner(Path(tmp), device=device, seed=args.seed, **settings)
            for r in task_rows:
                r["mode"] = mode
            rows.extend(task_rows)
            plot_task(task, task_rows, output / f"alignment_quality_{task}.png")
            print(f"[{task}] done in {time.time() - task_start:.0f} s")
    (output / "alignment_quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    print()
    print(markdown_table(rows))
    print()
    print(matched_kl_summary(rows))
    print(f"\nWrote {output / 'alignment_quality.json'} and the plots; total {time.time() - start:.0f} s on {device}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
