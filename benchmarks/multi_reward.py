"""Several rewards, one deployment: CTRL for the deployment vs summed-reward baselines at matched per-completion KL.

    python benchmarks/multi_reward.py --quick            # both tasks: 222 s on a loaded 2-core CPU VM
    python benchmarks/multi_reward.py --task bandit --seeds 0 1 2
    python benchmarks/multi_reward.py                    # full settings, 3 seeds each: 1 116 s on the same VM

The deployment (issue #19, notes §9) serves half the requests Best-of-4 on reward 1 and pits the other half against
a Worst-of-4 attacker on reward 2: ``mixture:0.5*bon:n=4@<r1>+0.5*won:n=4@<r2>``. Its win rate, the *objective*, is
0.5·W_BoN-4(r1) + 0.5·W_WoN-4(r2), each W judged on its own reward against the same procedure run on the reference
(ties ½). Every method is one `CTRLTrainer` run per seed at ``kl_budget=0.5`` under the adaptive KL controller
(``kl_control="adaptive"``); KL is per completion (nats), the unit of `kl_budget` and of `diagnose`. Methods:

- ``ctrl``            CTRL for the deployment: ``inference_procedure=<deployment>``, ``transform="auto"``, the two
  reward functions named as the deployment names them, a per-reward reference column {name: [K floats]}; the t's
  and the starting β fitted on the training references (`fit_deployment`, = `diagnose`'s ``best_t``);
- ``normalized_sum``  Φ = Σ_r W_r (r_r − mean_r)/std_r with the prompt's reference mean and std (ddof 0), a reward
  callable reading the per-reward references from a dataset column (GDPO-like); transform ``raw``;
- ``calibrated_sum``  the package with one reward: c of the unweighted sum r1 + r2, transform ``identity``, the
  summed reference column (single-reward path);
- ``raw_sum``         Φ = Σ_r W_r r_r, transform ``raw`` (RLOO on the raw weighted sum).

The baselines train on the reward-free mixture ``mixture:0.5*bon:n=4+0.5*won:n=4`` (one shaped reward); the raw
shapes' controllers start from `diagnose`'s β for that shape (they have no calibrated-space β), as in
benchmarks/alignment_quality.py.

Tasks:

- ``bandit`` (exact): P one-token prompts × V one-token actions. Per prompt the two rewards of the actions are jointly
  Gaussian with correlation −0.6 (they pull against each other), each reward with its own per-prompt scale 10^u,
  u ~ U(−1, 1) (a 100× spread across prompts, so raw sums are dominated by some prompts and by one reward) and a
  random offset. A tiny Llama is pre-trained so that π_ref(·|x) is known. Reference: K atoms per prompt, a
  systematic (stratified) sample of π_ref's actions, each scored by both rewards — the per-reward column. Metrics
  are exact from the action distributions (:func:`exact_deployment_metrics`), averaged over prompts, next to
  `diagnose`'s prediction for the same Φ on the same atoms at the budget and at the measured KL, and next to the exact
  tilt π_ref·exp(Φ/β)/Z at the run's final β (TV to it). Each seed is its own instance (policy, rewards, atoms).
- ``lm`` (sampled): the quickstart's tiny Llama and prompts; ``sentiment`` = VADER compound of prompt + completion
  (examples/quickstart.py's reward) and ``calm`` = Σ (5 − arousal) over the completion's words, from a small
  hand-assigned arousal list (1–9 scale) over the SFT corpus's vocabulary (:data:`AROUSAL`; nothing downloaded).
  Most of the corpus's positive adjectives are high-arousal ("great", "brilliant", "fun") and many negative ones
  low-arousal ("dull", "slow", "weak"), so calm pulls against sentiment (`diagnose` reports the within-prompt rank
  correlation on the references: ``setup_by_seed.*.heterogeneity``). Deployment
  ``mixture:0.5*bon:n=4@sentiment+0.5*won:n=4@calm``: half the requests served Best-of-4 on sentiment, half facing
  an attacker who picks the least calm of 4 samples. Per-reward references from
  ``build_reference_rewards(..., per_reward=True)``. Metrics from fresh samples (the same reference samples for every
  method of a seed): each component's all-subsets win rate on its own reward, k1 KL per completion; paired bootstrap
  CIs over (seed, prompt) of CTRL − each baseline on the objective.

Output: ``--output``/multi_reward.json (default benchmarks/results/): {"machine", "mode", "device", "threads",
"tasks": {task: {"settings", "seeds", "setup_by_seed", "diagnose_by_seed", "rows", "summary", "seconds"}},
"wall_seconds"}; the tables are printed. Tasks not rerun are kept from the existing JSON (``--fresh`` drops them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

warnings.filterwarnings("ignore", category=FutureWarning)

N = 4
KL_BUDGET = 0.5
TASKS = ("bandit", "lm")
REWARDS = {"bandit": ("helpful", "harmless"), "lm": ("sentiment", "calm")}


def deployment_spec(rewards: tuple[str, str]) -> str:
    return f"mixture:0.5*bon:n={N}@{rewards[0]}+0.5*won:n={N}@{rewards[1]}"


#: The baselines' `inference_procedure`: the same mixture, on their one shaped reward.
SINGLE_REWARD_PROCEDURE = f"mixture:0.5*bon:n={N}+0.5*won:n={N}"


@dataclass(frozen=True)
class Method:
    label: str
    transform: str  # CTRLConfig.transform
    diagnose: str  # diagnose_deployment's method name ("spec": the run's resolved per-reward transform spec)
    raw: bool  # a raw-reward shape: the controller starts from diagnose's β


METHODS = {
    "ctrl": Method("CTRL for the deployment (auto)", "auto", "best_t", False),
    "normalized_sum": Method("Σ W_r z_r (reference mean/std)", "raw", "normalized_sum", True),
    "calibrated_sum": Method("c(r1 + r2), identity", "identity", "calibrated_sum", False),
    "raw_sum": Method("raw Σ W_r r_r", "raw", "raw_sum", True),
}
BASELINES = ("normalized_sum", "calibrated_sum", "raw_sum")

DEFAULTS = {
    "bandit": {
        "quick": dict(num_prompts=8, num_actions=48, num_reference=256, steps=300, lr=1e-2, num_generations=16,
                      seeds=(0, 1)),
        "full": dict(num_prompts=12, num_actions=64, num_reference=512, steps=400, lr=1e-2, num_generations=16,
                     seeds=(0, 1, 2)),
    },
    "lm": {
        "quick": dict(steps=300, pretrain_steps=250, num_reference=64, eval_samples=64, lr=1e-3, max_new_tokens=8,
                      seeds=(0,)),
        "full": dict(steps=600, pretrain_steps=250, num_reference=64, eval_samples=128, lr=1e-3, max_new_tokens=8,
                     seeds=(0, 1, 2)),
    },
}


def _alignment_quality():
    """The helpers shared with benchmarks/alignment_quality.py (benchmarks/alignment_tasks/): training kwargs, the
    quickstart module, the stratified bootstrap, the machine description."""
    from types import SimpleNamespace

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from alignment_tasks.bandit import bandit_config_kwargs
    from alignment_tasks.common import common_train_kwargs, trace_kl_controller
    from alignment_tasks.hetero_lm import _stratified_bootstrap
    from alignment_tasks.lm import _quickstart
    from alignment_tasks.report import machine_description

    return SimpleNamespace(bandit_config_kwargs=bandit_config_kwargs, common_train_kwargs=common_train_kwargs,
                           _stratified_bootstrap=_stratified_bootstrap, _quickstart=_quickstart,
                           machine_description=machine_description, trace_kl_controller=trace_kl_controller)


# ---------------------------------------------------------------------------------------------------------------------
# exact metrics on one-token bandits
# ---------------------------------------------------------------------------------------------------------------------
def procedure_win_rate(pi, pi_ref, rewards, procedure) -> float:
    r"""Exact win rate of `procedure` run on π against the same procedure run on π_ref, both judged on `rewards`
    (one value per token; ties allowed and counted ½).

    With F, H the CDFs of the reward under π and π_ref at each distinct value v (v⁻: just below) and f the
    procedure's output-CDF map (BoN-N: f(u) = u^N; WoN-N: 1 − (1 − u)^N), per primitive component

        W = Σ_v [f(F(v)) − f(F(v⁻))] · ½ [f(H(v⁻)) + f(H(v))],

    weighted over a mixture's components (notes §3, §9; `trl_infalign.diagnose`'s tie formula on exact masses)."""
    from trl_infalign.procedures import get_procedure

    proc = get_procedure(procedure) if isinstance(procedure, str) else procedure
    pi, pi_ref, rewards = (np.asarray(x, dtype=np.float64) for x in (pi, pi_ref, rewards))
    pi, pi_ref = pi / pi.sum(), pi_ref / pi_ref.sum()
    values, inverse = np.unique(rewards, return_inverse=True)
    p = np.bincount(inverse, weights=pi, minlength=len(values))
    q = np.bincount(inverse, weights=pi_ref, minlength=len(values))

    def cdfs(mass):  # (CDF at v, 1 − CDF at v, CDF below v, 1 − CDF below v); tails summed from the top
        head = np.minimum(np.cumsum(mass), 1.0)
        tail_incl = np.minimum(np.cumsum(mass[::-1])[::-1], 1.0)  # mass ≥ v
        tail_excl = np.append(tail_incl[1:], 0.0)  # mass > v
        return head, tail_excl, head - mass, tail_incl

    P, P_up, P0, P0_up = cdfs(p)
    Q, Q_up, Q0, Q0_up = cdfs(q)
    total = 0.0
    for weight, part in proc.components():
        mass = part.output_cdf(P, P_up) - part.output_cdf(np.maximum(P0, 0.0), P0_up)
        reference = 0.5 * (part.output_cdf(np.maximum(Q0, 0.0), Q0_up) + part.output_cdf(Q, Q_up))
        total += weight * float(np.sum(mass * reference))
    return total


def exact_kl(pi, pi_ref) -> float:
    """KL(π‖π_ref) = Σ_a π(a) log(π(a)/π_ref(a)) over π's support."""
    pi, pi_ref = np.asarray(pi, dtype=np.float64), np.asarray(pi_ref, dtype=np.float64)
    pi, pi_ref = pi / pi.sum(), pi_ref / pi_ref.sum()
    support = pi > 0
    return float(np.sum(pi[support] * (np.log(pi[support]) - np.log(pi_ref[support]))))


def exact_deployment_metrics(pi, pi_ref, rewards: dict, deployment) -> dict:
    """Exact metrics of one prompt: {"kl", "objective" (= Σ_j w_j W_j), component metric_key: W_j}. `rewards` maps
    each reward the deployment names to its values per token."""
    from trl_infalign.deployment import get_deployment

    deployment = get_deployment(deployment)
    out = {"kl": exact_kl(pi, pi_ref)}
    for c in deployment.components:
        out[c.metric_key] = procedure_win_rate(pi, pi_ref, rewards[c.reward], c.procedure)
    out["objective"] = float(sum(c.weight * out[c.metric_key] for c in deployment.components))
    return out


def mean_exact_metrics(pi, pi_ref, rewards: dict, deployment) -> tuple[dict, list[dict]]:
    """:func:`exact_deployment_metrics` per prompt (rows of (P, vocab) arrays; `rewards[r]` (P, vocab)), and their
    mean over prompts (uniform prompt distribution)."""
    per = [exact_deployment_metrics(pi[i], pi_ref[i], {r: v[i] for r, v in rewards.items()}, deployment)
           for i in range(len(pi))]
    return {k: float(np.mean([m[k] for m in per])) for k in per[0]}, per


def mid_ranks(values, references) -> np.ndarray:
    """c = (#{ref < v} + ½ #{ref = v}) / K of each value against one prompt's K references."""
    ref = np.sort(np.asarray(references, dtype=np.float64))
    v = np.asarray(values, dtype=np.float64)
    below = np.searchsorted(ref, v, side="left")
    upto = np.searchsorted(ref, v, side="right")
    return (below + 0.5 * (upto - below)) / len(ref)


def tilt(pi_ref, phi, beta: float) -> np.ndarray:
    """π_ref·exp(Φ/β)/Z: RLOO's exact stationary point on a one-token bandit (notes §5)."""
    pi_ref, phi = np.asarray(pi_ref, dtype=np.float64), np.asarray(phi, dtype=np.float64)
    logits = np.log(pi_ref) + (phi - phi.max()) / beta
    logits -= logits.max()
    w = np.exp(logits)
    return w / w.sum()


def systematic_atoms(pi_ref, k: int) -> np.ndarray:
    """K tokens at the levels (i + ½)/K of π_ref's CDF in token order: a stratified sample of π_ref whose counts
    differ from K·π_ref(a) by less than 1 per token. The same atoms are scored by every reward (shared atoms)."""
    cdf = np.cumsum(np.asarray(pi_ref, dtype=np.float64))
    cdf = cdf / cdf[-1]
    levels = (np.arange(k) + 0.5) / k
    return np.minimum(np.searchsorted(cdf, levels), len(cdf) - 1)


# ---------------------------------------------------------------------------------------------------------------------
# the methods' rewards (generic: any base reward callables) and reference columns
# ---------------------------------------------------------------------------------------------------------------------
def _row_refs(row, name) -> np.ndarray:
    return np.asarray(row[name], dtype=np.float64)


def normalized_values(values, references) -> np.ndarray:
    """(v − mean)/std with the reference mean and std (ddof 0); 0 where the references are all equal (as
    `diagnose`'s ``normalized_sum``)."""
    ref = np.asarray(references, dtype=np.float64)
    std = float(ref.std())
    v = np.asarray(values, dtype=np.float64)
    return np.zeros_like(v) if std == 0 else (v - float(ref.mean())) / std


def shaped_reward(method: str, funcs: dict, weights: dict, by_reward_column: str = "ref_by_reward"):
    """The baselines' one reward callable from the base reward callables `funcs` {name: f}:
    ``raw_sum`` Σ W_r r_r; ``calibrated_sum`` Σ_r r_r (calibrated by the trainer); ``normalized_sum``
    Σ W_r (r_r − mean_r)/std_r, mean/std of the row's per-reward references from the `by_reward_column` kwarg."""

    def rewards_of(prompts, completions, completion_ids, kwargs):
        return {r: np.asarray(f(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs),
                              dtype=np.float64) for r, f in funcs.items()}

    def reward(prompts, completions, completion_ids, **kwargs):
        values = rewards_of(prompts, completions, completion_ids, kwargs)
        if method == "raw_sum":
            return sum(weights[r] * v for r, v in values.items()).tolist()
        if method == "calibrated_sum":
            return sum(values.values()).tolist()
        rows = kwargs[by_reward_column]
        out = np.zeros(len(completions))
        for r, v in values.items():
            out += weights[r] * np.array([normalized_values(v[i], _row_refs(row, r))[()] for i, row in enumerate(rows)])
        return out.tolist()

    reward.__name__ = method
    return reward


def shaped_references(method: str, refs: dict, weights: dict) -> list[list[float]]:
    """The method's single-reward reference column from the per-reward references {name: rows}: its shaped reward of
    each reference atom (every reward scores the same K atoms)."""
    names = list(refs)
    out = []
    for i in range(len(refs[names[0]])):
        atoms = {r: np.asarray(refs[r][i], dtype=np.float64) for r in names}
        if method == "raw_sum":
            row = sum(weights[r] * atoms[r] for r in names)
        elif method == "calibrated_sum":
            row = sum(atoms.values())
        else:
            row = sum(weights[r] * normalized_values(atoms[r], atoms[r]) for r in names)
        out.append(row.tolist())
    return out


def method_dataset(method: str, prompts, refs: dict, weights: dict):
    """The run's training set: ``prompt``, ``ref_rewards`` (per-reward {name: [K]} for CTRL, the shaped reward's
    references otherwise) and, for normalized_sum, ``ref_by_reward`` (the per-reward references its reward reads)."""
    from datasets import Dataset

    names = list(refs)
    per_reward = [{r: list(map(float, refs[r][i])) for r in names} for i in range(len(prompts))]
    data = {"prompt": list(prompts)}
    if method == "ctrl":
        data["ref_rewards"] = per_reward
    else:
        data["ref_rewards"] = shaped_references(method, refs, weights)
        if method == "normalized_sum":
            data["ref_by_reward"] = per_reward
    return Dataset.from_dict(data)


def make_config(method: str, deployment: str, output_dir, start_beta: float | None, **common):
    from trl_infalign import CTRLConfig

    m = METHODS[method]
    extra = {"beta": start_beta} if (m.raw and start_beta is not None) else {}
    procedure = deployment if method == "ctrl" else SINGLE_REWARD_PROCEDURE
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no calibrated-space prediction of beta.*")
        warnings.filterwarnings("ignore", message=".*aligns for.*")
        warnings.filterwarnings("ignore", category=UserWarning, message=".*identity.*")
        return CTRLConfig(output_dir=str(output_dir), transform=m.transform, kl_budget=KL_BUDGET,
                          inference_procedure=procedure, **extra, **common)


def train(args, model_path, tokenizer, reward_funcs, dataset, numpy_columns=(), trace: list | None = None):
    """One CTRLTrainer run; returns (trainer, model in eval mode, final β in the units of the unnormalised Φ).
    `trace`: if a list, gets [update, smoothed per-completion KL, β (unnormalised units)] from the adaptive
    controller every 10 updates and at the last."""
    from trl_infalign import CTRLTrainer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        trainer = CTRLTrainer(model=str(model_path), reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the end-of-run metrics dict; the row line says what matters
    if numpy_columns:  # see alignment_quality.train: accelerate walks every float of list columns at every step
        trainer.train_dataset = trainer.train_dataset.with_format("numpy", columns=list(numpy_columns),
                                                                  output_all_columns=True)
    _alignment_quality().trace_kl_controller(trainer, trace, args.max_steps)
    trainer.train()
    model = trainer.model
    model.eval()
    return trainer, model, float(trainer.current_beta)


def diagnose_methods(refs: dict, deployment: str, kl: float, methods) -> dict:
    """`diagnose_deployment(...).methods` at `kl` (warnings silenced; an unreachable KL gives {})."""
    from trl_infalign.diagnose_deployment import diagnose_deployment

    if not (math.isfinite(kl) and kl > 1e-4):
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return diagnose_deployment(refs, deployment, kl, methods=list(methods)).methods
        except ValueError:
            return {}


def diagnose_report(refs: dict, deployment: str, kl: float) -> tuple[dict, list, dict]:
    """Every `diagnose_deployment` method at `kl`: (methods, warnings, heterogeneity)."""
    from trl_infalign.diagnose_deployment import diagnose_deployment

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = diagnose_deployment(refs, deployment, kl)
    return report.methods, list(report.warnings), report.heterogeneity


def prediction(entry: dict | None) -> dict | None:
    if not entry or "error" in entry:
        return None
    return {"beta": entry["beta"], "kl": entry["kl"], "objective": entry["objective"], **entry["win_rates"]}


# ---------------------------------------------------------------------------------------------------------------------
# bandit
# ---------------------------------------------------------------------------------------------------------------------
def bandit_problem(num_prompts: int, num_actions: int, seed: int, correlation: float = -0.6,
                   scale_spread: float = 100.0):
    """π_ref targets (P, V) and the two rewards' action values {name: (P, V)}: jointly Gaussian per prompt with
    `correlation`, each reward's per-prompt scale 10^u (u ~ U(−½ log10 spread, +½ log10 spread)) and offset 3·N(0, 1)
    (as `trl_infalign.diagnose_deployment.two_reward_example`)."""
    rng = np.random.default_rng(seed)
    target = np.exp(0.6 * rng.standard_normal((num_prompts, num_actions)))
    target /= target.sum(axis=1, keepdims=True)
    z = rng.multivariate_normal([0.0, 0.0], [[1.0, correlation], [correlation, 1.0]], size=(num_prompts, num_actions))
    half = 0.5 * math.log10(scale_spread)
    values, scales = {}, {}
    for i, name in enumerate(REWARDS["bandit"]):
        scale = 10.0 ** rng.uniform(-half, half, size=(num_prompts, 1))
        offset = 3.0 * rng.standard_normal((num_prompts, 1))
        values[name] = offset + scale * z[:, :, i]
        scales[name] = scale[:, 0].tolist()
    return target, values, scales


def method_phi(method: str, values: dict, refs_row: dict, weights: dict, trainer=None) -> np.ndarray:
    """Φ of every token of one prompt, for the tilt at the run's final β: CTRL's Σ W_r Φ_r(c_r) (its fitted
    transforms), or the baselines' shaped reward (calibrated against the shaped references for calibrated_sum)."""
    names = list(values)
    if method == "ctrl":
        c = {r: mid_ranks(values[r], refs_row[r]) for r in names}
        return np.asarray(trainer.ctrl_reward_transforms.phi(c), dtype=np.float64)
    if method == "raw_sum":
        return sum(weights[r] * values[r] for r in names)
    if method == "calibrated_sum":
        return mid_ranks(sum(values[r] for r in names), sum(np.asarray(refs_row[r]) for r in names))
    return sum(weights[r] * normalized_values(values[r], refs_row[r]) for r in names)


def run_bandit(workdir: Path, *, num_prompts: int, num_actions: int, num_reference: int, steps: int, lr: float,
               num_generations: int, methods=tuple(METHODS), device: str = "cpu", seed: int = 0, log=print) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from trl_infalign.deployment import get_deployment
    from trl_infalign.tiny import bandit_action_ids, build_contextual_bandit_policy, \
        build_contextual_bandit_tokenizer, contextual_bandit_next_token_probs, contextual_bandit_prompts

    aq = _alignment_quality()
    names = REWARDS["bandit"]
    spec = deployment_spec(names)
    deployment = get_deployment(spec)
    weights = deployment.reward_weights
    target, action_values, scales = bandit_problem(num_prompts, num_actions, seed)
    tokenizer = build_contextual_bandit_tokenizer(num_prompts, num_actions)
    path = build_contextual_bandit_policy(tokenizer, workdir / "reference", target, hidden_size=max(64, 2 * num_prompts),
                                          seed=seed)
    pi_ref = contextual_bandit_next_token_probs(AutoModelForCausalLM.from_pretrained(path), tokenizer,
                                                num_prompts).numpy()
    actions = np.asarray(bandit_action_ids(tokenizer, num_actions))
    values = {}
    for r in names:  # non-action tokens (≈ 0 probability): below every action on both rewards
        v = np.repeat(action_values[r].min(axis=1, keepdims=True) - 1.0, len(tokenizer), axis=1)
        v[:, actions] = action_values[r]
        values[r] = v
    atoms = [systematic_atoms(pi_ref[i], num_reference) for i in range(num_prompts)]
    refs = {r: [values[r][i, atoms[i]].tolist() for i in range(num_prompts)] for r in names}
    prompts = contextual_bandit_prompts(num_prompts)
    index = {p: i for i, p in enumerate(prompts)}
    tables = {r: values[r].tolist() for r in names}

    def lookup(r):
        table = tables[r]

        def reward(prompts, completion_ids, **kwargs):
            return [table[index[p.strip()]][ids[0] if ids else tokenizer.pad_token_id]
                    for p, ids in zip(prompts, completion_ids)]

        reward.__name__ = r
        return reward

    funcs = {r: lookup(r) for r in names}
    tv_ref = 0.5 * float(np.abs(pi_ref[:, actions] - target).sum(axis=1).max())
    log(f"[bandit seed {seed}] P={num_prompts} × V={num_actions}, K={num_reference} shared atoms; scales "
        + ", ".join(f"{r} {min(scales[r]):.3g}–{max(scales[r]):.3g}" for r in names)
        + f"; π_ref max TV to target {tv_ref:.4f}; {steps} steps of {num_prompts}×{num_generations}")
    diag, diag_warnings, heterogeneity = diagnose_report(refs, spec, KL_BUDGET)
    at_ref, _ = mean_exact_metrics(pi_ref, pi_ref, values, deployment)
    rows = []
    for method in methods:
        start = time.time()
        m = METHODS[method]
        common = aq.bandit_config_kwargs(device, seed, lr=lr, batch=num_prompts * num_generations,
                                         num_generations=num_generations, steps=steps)
        start_beta = diag.get(m.diagnose, {}).get("beta") if m.raw else None
        args = make_config(method, spec, workdir / f"run-{method}", start_beta, **common)
        dataset = method_dataset(method, prompts, refs, weights)
        reward_funcs = [funcs[r] for r in names] if method == "ctrl" else shaped_reward(method, funcs, weights)
        # numpy columns arrive as float32 arrays: calibration compares in the less precise dtype of reward and
        # reference (`trl_infalign.calibrate`), and normalized_values computes in float64
        numpy_columns = ["ref_rewards", "ref_by_reward"] if method == "normalized_sum" else ["ref_rewards"]
        trace: list = []
        trainer, model, final_beta = train(args, path, tokenizer, reward_funcs, dataset, numpy_columns, trace)
        pi = contextual_bandit_next_token_probs(model, tokenizer, num_prompts).numpy()
        measured, per_prompt = mean_exact_metrics(pi, pi_ref, values, deployment)
        refs_rows = [{r: refs[r][i] for r in names} for i in range(num_prompts)]
        optimum = np.stack([tilt(pi_ref[i], method_phi(method, {r: values[r][i] for r in names}, refs_rows[i], weights,
                                                       trainer), final_beta) for i in range(num_prompts)])
        at_optimum, _ = mean_exact_metrics(optimum, pi_ref, values, deployment)
        name = args.resolved_transform if method == "ctrl" else m.diagnose
        row = {
            "task": "bandit", "seed": seed, "method": method, "label": m.label, "transform": args.resolved_transform,
            "procedure": args.inference_procedure, "target_kl": KL_BUDGET, "start_beta": float(args.beta),
            "final_beta": final_beta, **measured, "kl_rel_error": measured["kl"] / KL_BUDGET - 1.0,
            "per_prompt": {k: [p[k] for p in per_prompt] for k in per_prompt[0]},
            "diagnose_method": m.diagnose, "diagnose_at_budget": prediction(diag.get(m.diagnose)),
            "diagnose_at_measured_kl": prediction(diagnose_methods(refs, spec, measured["kl"], [name]).get(name)),
            "tilt_at_final_beta": at_optimum, "tv_to_tilt": 0.5 * float(np.abs(pi - optimum).sum(axis=1).mean()),
            "metrics": f"exact, mean over {num_prompts} prompts", "kl_trace": trace, "train_seconds": time.time() - start,
        }
        if method == "ctrl":
            row["t"] = {str(r): t for r, t in trainer.ctrl_reward_transforms.t.items()}
        rows.append(row)
        log(row_line(row, deployment))
        del trainer, model
    setup = {"num_prompts": num_prompts, "num_actions": num_actions, "num_reference": num_reference, "steps": steps,
             "lr": lr, "num_generations": num_generations, "scales": scales, "pi_ref_max_tv_to_target": tv_ref,
             "reference_policy": at_ref, "deployment": spec, "heterogeneity": heterogeneity,
             "diagnose_warnings": diag_warnings}
    return {"rows": rows, "diagnose": diag, "setup": setup}


# ---------------------------------------------------------------------------------------------------------------------
# tiny LM: VADER sentiment vs calm
# ---------------------------------------------------------------------------------------------------------------------
def sentiment(prompts, completions, **kwargs):
    """VADER compound sentiment of prompt + completion, in [−1, 1] (examples/quickstart.py's reward)."""
    return _alignment_quality()._quickstart().vader_sentiment(prompts, completions)


#: Hand-assigned arousal of the SFT corpus's lexicon (examples/quickstart.py: ADJECTIVES and ENDINGS) on the 1–9
#: scale of valence–arousal affect norms (1 calm … 9 excited). Not taken from a published norm (nothing is downloaded):
#: the order follows the usual one — "loud", "fun", "terrible" high; "quiet", "dull", "slow" low. Most positive
#: adjectives of the corpus are high-arousal and many negative ones low-arousal, so `calm` pulls against VADER.
AROUSAL = {
    "loud": 7.0, "fun": 6.8, "terrible": 6.6, "brilliant": 6.4, "wonderful": 6.2, "awful": 6.2, "great": 6.0,
    "funny": 6.0, "beautiful": 5.6, "strange": 5.4, "moving": 5.2, "bad": 5.2, "clever": 5.0, "liked": 5.0,
    "good": 4.6, "sad": 3.8, "weak": 3.6, "long": 3.4, "fine": 3.2, "okay": 3.0, "simple": 2.8, "slow": 2.6,
    "boring": 2.5, "dull": 2.4, "quiet": 2.0,
}


def calm(prompts, completions, **kwargs):
    """Σ (5 − arousal(w)) over the completion's words w found in :data:`AROUSAL` (lower-cased, split on whitespace,
    punctuation stripped): higher is calmer; 0 for a completion without such words."""
    out = []
    for c in completions:
        words = [w.strip(".,;:!?\"'()") for w in c.lower().split()]
        out.append(float(sum(5.0 - AROUSAL[w] for w in words if w in AROUSAL)))
    return out


class TwoRewardSampler:
    """Fixed evaluation protocol: `m` fresh reference samples per prompt scored by both rewards once; per policy, `m`
    samples per prompt, both rewards, and their log-probs under the policy and the reference (k1 KL per completion).
    Per prompt: each component's all-subsets win rate on its own reward and the objective."""

    def __init__(self, reference, tokenizer, prompts, funcs: dict, deployment, *, num_samples: int,
                 max_new_tokens: int, seed: int):
        import torch

        from trl_infalign.deployment import get_deployment
        from trl_infalign.sampling import generate_completions, load_reward_funcs

        self.reference, self.tokenizer, self.prompts = reference, tokenizer, list(prompts)
        self.names = list(funcs)
        self.funcs, self.classes = load_reward_funcs([funcs[r] for r in self.names])
        self.deployment = get_deployment(deployment)
        self.num_samples, self.max_new_tokens, self.seed = num_samples, max_new_tokens, seed
        torch.manual_seed(seed + 7919)
        ref = generate_completions(reference, tokenizer, self.prompts, num_samples, max_new_tokens=max_new_tokens,
                                   progress=False)
        self.reference_rewards = self._score(ref)

    def _score(self, comps) -> dict:
        from trl_infalign.sampling import score_completions

        flat_prompts = [p for p, texts in zip(comps.prompts, comps.texts) for _ in texts]
        flat_texts = [t for texts in comps.texts for t in texts]
        flat_ids = [i for ids in comps.ids for i in ids]
        scores = score_completions(self.funcs, self.classes, flat_prompts, flat_texts, completion_ids=flat_ids)
        return {r: scores[:, j].reshape(len(comps.prompts), -1).double() for j, r in enumerate(self.names)}

    def evaluate(self, model) -> dict:
        import torch

        from trl_infalign.evaluation import per_prompt_win_rates
        from trl_infalign.sampling import completion_logprobs, generate_completions

        torch.manual_seed(self.seed)
        comps = generate_completions(model, self.tokenizer, self.prompts, self.num_samples,
                                     max_new_tokens=self.max_new_tokens, progress=False)
        rewards = self._score(comps)
        prompt_ids = [comps.prompt_ids[p] for p in range(len(comps.prompts)) for _ in comps.ids[p]]
        completion_ids = [i for ids in comps.ids for i in ids]
        pad = self.tokenizer.pad_token_id
        shape = rewards[self.names[0]].shape
        logp = completion_logprobs(model, prompt_ids, completion_ids, pad_token_id=pad).reshape(shape)
        logp_ref = completion_logprobs(self.reference, prompt_ids, completion_ids, pad_token_id=pad).reshape(shape)
        per = {"kl": (logp - logp_ref).mean(dim=1).double().numpy()}
        objective = 0.0
        for c in self.deployment.components:
            w = per_prompt_win_rates(rewards[c.reward], self.reference_rewards[c.reward], procedure=c.procedure)
            per[c.metric_key] = np.asarray(w, dtype=np.float64)
            objective = objective + c.weight * per[c.metric_key]
        per["objective"] = objective
        out = {k: float(np.mean(v)) for k, v in per.items()}
        out["per_prompt"] = {k: v.tolist() for k, v in per.items()}
        for r in self.names:
            out[f"mean_{r}"] = float(rewards[r].mean())
        out["mean_completion_tokens"] = sum(len(i) for i in completion_ids) / len(completion_ids)
        return out


def run_lm(workdir: Path, *, steps: int, pretrain_steps: int, num_reference: int, eval_samples: int, lr: float,
           max_new_tokens: int, methods=tuple(METHODS), hidden_size: int = 64, num_layers: int = 2,
           batch_size: int = 32, num_generations: int = 8, device: str = "cpu", seed: int = 0, log=print) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from trl_infalign import ReferenceConfig, build_reference_rewards
    from trl_infalign.deployment import get_deployment
    from trl_infalign.tiny import build_tiny_policy, build_tokenizer, pretrain_on_texts

    aq = _alignment_quality()
    qs = aq._quickstart()
    names = REWARDS["lm"]
    spec = deployment_spec(names)
    deployment = get_deployment(spec)
    weights = deployment.reward_weights
    funcs = {"sentiment": sentiment, "calm": calm}
    torch.manual_seed(seed)
    corpus = qs.review_corpus(2000, seed)
    tokenizer = build_tokenizer(corpus, vocab_size=400)
    sft_path = workdir / "sft"
    build_tiny_policy(tokenizer, sft_path, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    sft = AutoModelForCausalLM.from_pretrained(sft_path).to(device)
    pretrain_on_texts(sft, tokenizer, corpus, steps=pretrain_steps, lr=3e-3, batch_size=32, seed=seed)
    sft.save_pretrained(sft_path)
    prompts = list(qs.PROMPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = build_reference_rewards(Dataset.from_dict({"prompt": prompts}), sft, [funcs[r] for r in names],
                                        ReferenceConfig(num_samples=num_reference, max_new_tokens=max_new_tokens,
                                                        seed=seed, per_reward=True),
                                        tokenizer=tokenizer, progress=False)
    refs = {r: [list(row[r]) for row in built["ref_rewards"]] for r in names}
    log(f"[lm seed {seed}] tiny Llama {hidden_size}x{num_layers} pre-trained {pretrain_steps} steps; {len(prompts)} "
        f"prompts, K={num_reference} per-reward references, {steps} RL steps per run, {eval_samples} evaluation "
        f"samples per prompt and side; deployment {spec}")
    diag, diag_warnings, heterogeneity = diagnose_report(refs, spec, KL_BUDGET)
    sampler = TwoRewardSampler(sft, tokenizer, prompts, funcs, spec, num_samples=eval_samples,
                               max_new_tokens=max_new_tokens, seed=seed + 1)
    reference_eval = sampler.evaluate(sft)
    common = aq.common_train_kwargs(device, seed, learning_rate=lr, per_device_train_batch_size=batch_size,
                                    num_generations=num_generations, max_completion_length=max_new_tokens,
                                    max_steps=steps, reference_provenance_check="off")
    rows = []
    for method in methods:
        start = time.time()
        m = METHODS[method]
        start_beta = diag.get(m.diagnose, {}).get("beta") if m.raw else None
        args = make_config(method, spec, workdir / f"run-{method}", start_beta, **common)
        dataset = method_dataset(method, prompts, refs, weights)
        reward_funcs = [funcs[r] for r in names] if method == "ctrl" else shaped_reward(method, funcs, weights)
        trace: list = []
        trainer, model, final_beta = train(args, sft_path, tokenizer, reward_funcs, dataset, trace=trace)
        measured = sampler.evaluate(model)
        name = args.resolved_transform if method == "ctrl" else m.diagnose
        row = {
            "task": "lm", "seed": seed, "method": method, "label": m.label, "transform": args.resolved_transform,
            "procedure": args.inference_procedure, "target_kl": KL_BUDGET, "start_beta": float(args.beta),
            "final_beta": final_beta, **measured, "kl_rel_error": measured["kl"] / KL_BUDGET - 1.0,
            "diagnose_method": m.diagnose, "diagnose_at_budget": prediction(diag.get(m.diagnose)),
            "diagnose_at_measured_kl": prediction(diagnose_methods(refs, spec, measured["kl"], [name]).get(name)),
            "metrics": (f"sampled: {eval_samples} samples/prompt/side, {len(prompts)} prompts; KL = k1 per completion; "
                        "win rates: all-subsets estimator per component"),
            "kl_trace": trace, "train_seconds": time.time() - start,
        }
        if method == "ctrl":
            row["t"] = {str(r): t for r, t in trainer.ctrl_reward_transforms.t.items()}
        rows.append(row)
        log(row_line(row, deployment))
        del trainer, model
    setup = {"num_prompts": len(prompts), "num_reference": num_reference, "eval_samples": eval_samples, "steps": steps,
             "lr": lr, "hidden_size": hidden_size, "num_layers": num_layers, "max_new_tokens": max_new_tokens,
             "batch_size": batch_size, "num_generations": num_generations, "pretrain_steps": pretrain_steps,
             "deployment": spec, "reference_policy": {k: v for k, v in reference_eval.items() if k != "per_prompt"},
             "heterogeneity": heterogeneity, "diagnose_warnings": diag_warnings}
    return {"rows": rows, "diagnose": diag, "setup": setup}


# ---------------------------------------------------------------------------------------------------------------------
# summaries and tables
# ---------------------------------------------------------------------------------------------------------------------
def _keys(deployment) -> list[str]:
    from trl_infalign.deployment import get_deployment

    return [c.metric_key for c in get_deployment(deployment).components]


def row_line(row: dict, deployment) -> str:
    keys = _keys(deployment)
    d = row["diagnose_at_budget"] or {}
    comps = " ".join(f"{k.split('_win_rate')[0]} {row[k]:.3f}" for k in keys)
    return (f"  [{row['task']} seed {row['seed']}] {row['method']:<15} KL {row['kl']:.3f} ({100 * row['kl_rel_error']:+.0f}%) "
            f"β {row['start_beta']:.4g}→{row['final_beta']:.4g}  objective {row['objective']:.4f} "
            f"(diagnose {d.get('objective', float('nan')):.4f})  {comps}  {row['train_seconds']:.0f}s")


def summarize(rows: list[dict], task: str) -> dict:
    """Per method: the mean over seeds of KL, objective and components, with 95% CIs (bootstrap over prompts within
    seeds); per baseline: the paired difference CTRL − baseline on the objective (same seed, same prompt) with its
    95% CI; the ordering checks; for the bandit the deviation of each run from `diagnose`."""
    aq = _alignment_quality()
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["method"], {})[int(r["seed"])] = r
    seeds = sorted(set.intersection(*(set(v) for v in by.values()))) if by else []
    keys = [k for k in rows[0]["per_prompt"] if k not in ("objective", "kl")] if rows else []
    methods = {}
    for name, per_seed in by.items():
        rs = [per_seed[s] for s in seeds]
        entry = {"seeds": seeds, "objective_per_seed": [r["objective"] for r in rs], "kl_per_seed": [r["kl"] for r in rs]}
        for key in ("kl", "objective", *keys):
            entry[key] = float(np.mean([r[key] for r in rs]))
            entry[f"{key}_ci"] = list(aq._stratified_bootstrap([r["per_prompt"][key] for r in rs]))
        methods[name] = entry
    paired = {}
    if "ctrl" in by:
        for b in BASELINES:
            if b not in by:
                continue
            diffs = [np.asarray(by["ctrl"][s]["per_prompt"]["objective"]) - np.asarray(by[b][s]["per_prompt"]["objective"])
                     for s in seeds]
            paired[f"ctrl_minus_{b}"] = {
                "objective": float(np.mean([d.mean() for d in diffs])),
                "objective_ci": list(aq._stratified_bootstrap(diffs)),
                "per_seed": [float(d.mean()) for d in diffs],
            }
    out: dict = {"seeds": seeds, "methods": methods, "paired": paired}
    have = all(m in methods for m in METHODS)
    if have:
        o = {m: methods[m]["objective"] for m in METHODS}
        out["ordering_point_estimates"] = {
            "ctrl > normalized_sum > calibrated_sum": o["ctrl"] > o["normalized_sum"] > o["calibrated_sum"],
            "ctrl > raw_sum": o["ctrl"] > o["raw_sum"],
        }
        out["ordering_per_seed"] = [
            by["ctrl"][s]["objective"] > by["normalized_sum"][s]["objective"] > by["calibrated_sum"][s]["objective"]
            and by["ctrl"][s]["objective"] > by["raw_sum"][s]["objective"] for s in seeds]
        out["ctrl_above_every_baseline_paired_95"] = all(p["objective_ci"][0] > 0 for p in paired.values())
    if rows:
        dev = {}
        for r in rows:
            for where in ("diagnose_at_budget", "diagnose_at_measured_kl"):
                pred = r.get(where)
                if pred is None:
                    continue
                for key in ("objective", *keys):
                    dev.setdefault(where, {})[f"{r['method']}/seed{r['seed']}/{key}"] = r[key] - pred[key]
        out["measured_minus_diagnose"] = dev
        for where, d in dev.items():
            ctrl = [abs(v) for k, v in d.items() if k.startswith("ctrl/")]
            out[f"ctrl_max_abs_deviation_{where}"] = max(ctrl) if ctrl else None
            out[f"all_max_abs_deviation_{where}"] = max(abs(v) for v in d.values()) if d else None
    if task == "bandit":  # exact metrics: the trained CTRL bandit must sit on diagnose's prediction
        worst = out.get("ctrl_max_abs_deviation_diagnose_at_budget")
        out["ctrl_within_0.02_of_diagnose_at_budget"] = None if worst is None else worst <= 0.02
    kl_err = [abs(r["kl_rel_error"]) for r in rows]
    out["max_abs_kl_rel_error"] = max(kl_err) if kl_err else None
    return out


def _ci(entry, key, digits=3) -> str:
    ci = entry.get(f"{key}_ci")
    return f"{entry[key]:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _f(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def runs_table(rows: list[dict], deployment) -> str:
    keys = _keys(deployment)
    head = " | ".join(k.replace("_win_rate", "") for k in keys)
    lines = [f"| seed | method | transform | KL | β start → final | objective | diagnose at budget | diagnose at KL | "
             f"{head} | TV to tilt |", "|---:|---|---|---:|---|---:|---:|---:|" + "---:|" * len(keys) + "---:|"]
    for r in rows:
        b, m = r["diagnose_at_budget"] or {}, r["diagnose_at_measured_kl"] or {}
        lines.append(f"| {r['seed']} | {r['method']} | `{r['transform']}` | {r['kl']:.3f} | {r['start_beta']:.4g} → "
                     f"{r['final_beta']:.4g} | {r['objective']:.4f} | {_f(b.get('objective'), 4)} | "
                     f"{_f(m.get('objective'), 4)} | " + " | ".join(f"{r[k]:.4f}" for k in keys)
                     + f" | {_f(r.get('tv_to_tilt'))} |")
    return "\n".join(lines)


def pooled_table(summary: dict, deployment) -> str:
    keys = _keys(deployment)
    head = " | ".join(k.replace("_win_rate", "") for k in keys)
    lines = [f"| method | KL | objective [95% CI] | {head} | objective per seed |",
             "|---|---:|---:|" + "---:|" * len(keys) + "---|"]
    for name, m in summary["methods"].items():
        lines.append(f"| {name} | {m['kl']:.3f} | {_ci(m, 'objective')} | " + " | ".join(_ci(m, k) for k in keys)
                     + f" | {', '.join(f'{v:.3f}' for v in m['objective_per_seed'])} |")
    lines += ["", "| paired difference (objective) | mean [95% CI, paired over seeds × prompts] | per seed |",
              "|---|---:|---|"]
    for name, p in summary["paired"].items():
        lines.append(f"| {name.replace('_minus_', ' − ')} | {_ci(p, 'objective')} | "
                     f"{', '.join(f'{v:+.3f}' for v in p['per_seed'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
RUNNERS = {"bandit": run_bandit, "lm": run_lm}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results", help="Directory for multi_reward.json.")
    parser.add_argument("--quick", action="store_true", help="Small CPU settings (both tasks in a few minutes).")
    parser.add_argument("--task", choices=(*TASKS, "all"), nargs="+", default=["all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="Seeds (each its own problem instance / SFT policy, references and evaluation samples). "
                        "Default per task and mode: bandit 0 1 (quick) / 0 1 2; lm 0 (quick) / 0 1 2.")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=None, help="Methods (default: all).")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: per task and mode).")
    parser.add_argument("--fresh", action="store_true", help="Drop the other tasks' results from the JSON.")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available, else cpu).")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1).")
    args = parser.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    tasks = TASKS if "all" in args.task else tuple(dict.fromkeys(args.task))
    aq = _alignment_quality()
    machine = aq.machine_description()
    path = output / "multi_reward.json"
    report = {"machine": machine, "mode": mode, "device": device, "threads": args.threads, "tasks": {}}
    if path.exists() and not args.fresh:
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            print(f"could not read {path} ({error}); writing it afresh", flush=True)
        else:
            report["tasks"].update({k: v for k, v in (old.get("tasks") or {}).items() if k not in tasks})
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="multi_reward_") as tmp:
        for task in tasks:
            settings = dict(DEFAULTS[task][mode])
            if args.seeds is not None:
                settings["seeds"] = tuple(args.seeds)
            if args.steps is not None:
                settings["steps"] = args.steps
            if args.methods is not None:
                settings["methods"] = tuple(args.methods)
            seeds = settings.pop("seeds")
            task_start = time.time()
            rows, diag, setup = [], {}, {}
            for s in seeds:
                (Path(tmp) / task / f"seed{s}").mkdir(parents=True, exist_ok=True)
                result = RUNNERS[task](Path(tmp) / task / f"seed{s}", device=device, seed=s, **settings)
                rows += result["rows"]
                diag[str(s)], setup[str(s)] = result["diagnose"], result["setup"]
            summary = summarize(rows, task)
            report["tasks"][task] = {
                "mode": mode, "machine": machine, "seeds": list(seeds), "deployment": deployment_spec(REWARDS[task]),
                "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
                "setup_by_seed": setup, "diagnose_by_seed": diag, "rows": rows, "summary": summary,
                "seconds": time.time() - task_start, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            report["wall_seconds"] = time.time() - start
            path.write_text(json.dumps(report, indent=2, default=float) + "\n")
            print(f"[{task}] done in {time.time() - task_start:.0f} s", flush=True)
    for task in tasks:
        entry = report["tasks"][task]
        spec = entry["deployment"]
        print(f"\n## {task}: {spec}, KL budget {KL_BUDGET} ({'exact' if task == 'bandit' else 'sampled'} metrics)\n")
        print(runs_table(entry["rows"], spec))
        print(f"\n### {task}: pooled over seeds {entry['seeds']}, 95% CIs\n")
        print(pooled_table(entry["summary"], spec))
        checks = {k: v for k, v in entry["summary"].items() if k not in ("methods", "paired", "measured_minus_diagnose")}
        print("\n" + json.dumps(checks, indent=2, default=float))
    print(f"\nWrote {path}; total {time.time() - start:.0f} s on {device} ({machine['cpu']}, {machine['cpu_count']} CPUs, "
          f"load average at start {machine['load_average_at_start']}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
