"""Alignment quality of CTRL vs raw-reward RLHF at matched per-completion KL, against the theory and `diagnose`.

    python benchmarks/alignment_quality.py --quick --threads 1            # CPU, all four tasks (~70 min, 2 cores)
    python benchmarks/alignment_quality.py --quick --task hetero_bandit   # one task (the JSON keeps the others)
    python benchmarks/alignment_quality.py --device cuda                  # full sweep (GPU)

Every method is trained with `CTRLTrainer(kl_budget=B)` and its default closed-loop KL control
(`kl_control="adaptive"`): β starts from the theory (calibrated transforms) or from `trl_infalign.diagnose`'s
prediction on the task's own reference rewards (raw-reward transforms, which have no calibrated-space β) and is
corrected from the measured per-completion KL. KL is always **per completion** (nats, summed over the completion's
tokens: the unit of `kl_budget`, the theory and `diagnose`), never TRL's per-token `kl` metric. Methods:

- ``raw_reward``  Φ = r (transform ``raw``: RLOO on the raw reward, the standard RLHF baseline);
- ``lsc``         Φ = log σ(r − mean of the prompt's reference rewards)  (Wang et al. 2024);
- ``par``         Φ = mean_k σ(r − r_ref,k)  (PAR, Fu et al. 2025);
- ``vbon``        Φ = log c  (vBoN, Amini et al. 2024; its paper β = 1/(N−1) is reported, it is *trained* at the budget);
- ``identity``    Φ = c  (calibration alone, InfAlign's baseline);
- ``ctrl_bon``    CTRL ``auto`` for Best-of-4: Φ = exp(t·c), (t, β) = ``theory.best_t("bon", 4, B)``;
- ``ctrl_won``    CTRL ``auto`` for Worst-of-4: Φ = −exp(−t·c), (t, β) = ``theory.best_t("won", 4, B)`` (β floor 0.01);
- ``optimal``     CTRL ``optimal`` for Best-of-4 (the numerically optimal transform at B).

Tasks (reported separately):

- ``bandit``         one prompt, V one-token actions with distinct Gaussian rewards, a tiny Llama pre-trained so that
  π_ref is known exactly; K stratified reference rewards. **Exact** metrics from the action distributions.
- ``hetero_bandit``  the headline: a contextual bandit of P one-token prompts whose reward scales spread log-normally
  (σ = 1, p90/p10 ≈ 10) with random offsets — what calibration fixes. Exact metrics, averaged over prompts, next to
  `diagnose`'s predictions from the same reference rewards.
- ``lm``             the tiny-LM VADER task of ``examples/quickstart.py``; Monte-Carlo metrics with the evaluator
  (k1 KL per completion with its bootstrap CI, win rates with CIs).
- ``hetero_lm``      the same with a documented per-family affine distortion of VADER (see ``LM_FAMILIES``: four
  families keyed by the prompt's verb, scales 0.2 … 5.4, a 27× spread), standing in for a reward model whose scale and
  offset differ across prompt families; 1200 steps, three seeds, per-family KL next to where `diagnose`'s per-prompt
  optimum puts it, and seed-pooled win rates with paired differences (95% CIs).

Outputs in ``--output`` (default benchmarks/results/): ``alignment_quality.json`` — {"machine", "mode", "seed",
"device", "threads", "tasks": {task: {"settings", "setup", "diagnose" (full reports per budget), "diagnose_curves",
"seconds"}}, "rows", "acceptance", "wall_seconds"}, one row per run with target and measured KL, start and final β,
win rates, `diagnose`'s predictions at the budget and at the measured KL, and continuum-theory predictions for
calibrated transforms — plus ``alignment_quality_<task>.png`` and the printed tables. The JSON is rewritten after
each task; tasks not rerun are kept from the existing JSON (``--fresh`` drops them). Rows carry their ``seed``; for
``hetero_lm`` the acceptance entry holds the seed-pooled numbers (``pooled``, ``paired_differences``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

N = 4  # N of the inference-time procedures
TASKS = ("hetero_bandit", "hetero_lm", "bandit", "lm")


@dataclass(frozen=True)
class Method:
    label: str
    transform: str  # CTRLConfig.transform ("vbon" is filled in from diagnose: log with its eps)
    procedure: str  # CTRLConfig.inference_procedure
    diagnose: str  # diagnose's method name ("spec": the run's resolved transform spec)
    raw: bool  # a transform of the raw reward: no calibrated-space β, the controller starts from diagnose's
    color: str
    marker: str


METHODS = {
    "raw_reward": Method("raw-reward RLOO", "raw", "bon", "raw_reward", True, "tab:gray", "X"),
    "lsc": Method("log-sigmoid centred (lsc)", "lsc", "bon", "lsc", True, "tab:brown", "v"),
    "par": Method("PAR sigmoid (par)", "par", "bon", "par", True, "tab:pink", "P"),
    "vbon": Method("vBoN (log c)", "vbon", "bon", "spec", False, "tab:purple", "<"),
    "identity": Method("calibrated identity", "identity", "bon", "spec", False, "tab:blue", "o"),
    "ctrl_bon": Method("CTRL-BoN (exp, best t)", "auto", "bon", "spec", False, "tab:orange", "s"),
    "ctrl_won": Method("CTRL-WoN (-exp(-tc), best t)", "auto", "won", "spec", False, "tab:green", "^"),
    "optimal": Method("CTRL optimal (BoN-4)", "optimal", "bon", "spec", False, "black", "D"),
}

# Per-family affine distortion of VADER for `hetero_lm`: prompt "<subject> <verb>" belongs to family VERB_INDEX
# ("was", "is", "felt", "seemed" → 0, 1, 2, 3: 8 prompts each); its reward is scale · vader + offset. Scales are a
# geometric ladder ×3 apart, 0.2 … 5.4 (a 27× spread): a reward model that is 27× sharper on some prompt families than
# on others (and offset). Calibration removes it exactly, one global β for the raw reward cannot. Families are keyed
# by the verb — the last prompt token, which the policy sees at the position where it generates — so that the tiny
# policy can represent (and reach) a different tilt per family. The first design keyed them by the subject
# (SUBJECT_INDEX % 3, scales 0.2 / 1 / 5, `LM_FAMILIES_BY_SUBJECT`): the SFT corpus draws subject and adjective
# independently, the policy's next-token distribution ignores the subject, and raw-reward RLOO spent the *same* KL
# on every family (measured 0.55 / 0.50 / 0.41 nats where the per-prompt optimum puts 0.02 / 0.29 / 1.54): the
# imbalance calibration fixes never materialised (docs/benchmarks.md).
LM_FAMILIES = ((0.2, 0.5), (0.6, 0.0), (1.8, -0.5), (5.4, -1.0))
LM_FAMILIES_BY_SUBJECT = ((0.2, 0.5), (1.0, 0.0), (5.0, -1.0))

DEFAULTS = {
    "bandit": {
        "quick": dict(target_kls=(0.25, 0.5, 0.75), methods=("identity", "ctrl_bon", "ctrl_won", "optimal"),
                      num_actions=200, steps=150, lr=1e-2, num_reference=512),
        "full": dict(target_kls=(0.125, 0.25, 0.5, 0.75, 1.0), methods=tuple(METHODS), num_actions=500, steps=600,
                     lr=5e-3, num_reference=2048),
    },
    # hetero_bandit: CTRL-WoN trains 3 × the task's steps (step_factor; 660 at quick, same lr 7e-3, same batch, the
    # linear lr decay stretched over the longer run). Its β is ~0.013 on Φ = −exp(−9.7c), which is flat above
    # c ≈ 0.5: only β·KL pulls that region back to π_ref, so the KL spent by the start-up overshoot (1.3 nats at step
    # 20, β raised to 0.044 by step 100) drains at a rate ∝ β. Its controller trace at 660 steps: KL within ±5 % of
    # the budget from ~420 updates, β back within 10 % of the theory's from ~600 (0.0143 at the end vs 0.0130); at
    # 220 steps it ended 17 % under budget with β 2× the theory's (TV 0.17 to the tilt at its β; 0.06 at 660). The
    # other methods (β 0.16–0.43, or BoN's steep Φ) settle within 220 steps (TV ≤ 0.07, BoN-4 within 0.004 of
    # diagnose), so the whole task is not tripled (≈ 3× the wall time for no measured change).
    "hetero_bandit": {
        "quick": dict(target_kls=(0.5,), methods=tuple(METHODS), num_prompts=16, num_actions=100, num_reference=256,
                      steps=220, lr=7e-3, num_generations=32, step_factor={"ctrl_won": 3}),
        "full": dict(target_kls=(0.25, 0.5, 1.0), methods=tuple(METHODS), num_prompts=32, num_actions=200,
                     num_reference=512, steps=600, lr=1e-2, num_generations=32, step_factor={"ctrl_won": 3}),
    },
    "lm": {
        "quick": dict(target_kls=(0.25, 0.5, 0.75), methods=("identity", "ctrl_bon", "ctrl_won", "optimal"),
                      steps=300, lr=1e-3, pretrain_steps=250, num_reference=16, eval_samples=64, hidden_size=64,
                      num_layers=2, max_new_tokens=8, prompt_repeats=1),
        "full": dict(target_kls=(0.25, 0.5, 1.0), methods=tuple(METHODS), steps=400, lr=1e-3, pretrain_steps=600,
                     num_reference=64, eval_samples=64, hidden_size=128, num_layers=4, max_new_tokens=12,
                     prompt_repeats=4),
    },
    # hetero_lm: 1200 steps (not the lm task's 300): raw-reward RLOO needs them to move its per-family KL to where
    # the per-prompt optimum puts it (at 300 steps it is still a shared shift of all families); 128 evaluation samples
    # per prompt and side, three seeds (each its own SFT policy, reference rewards and evaluation samples).
    "hetero_lm": {
        "quick": dict(target_kls=(0.5,), methods=("raw_reward", "identity", "ctrl_bon"), steps=1200, lr=1e-3,
                      pretrain_steps=250, num_reference=16, eval_samples=128, hidden_size=64, num_layers=2,
                      max_new_tokens=8, prompt_repeats=1, distort=True, families=LM_FAMILIES, family_by="verb",
                      seeds=(0, 1, 2)),
        "full": dict(target_kls=(0.5, 1.0), methods=tuple(METHODS), steps=1600, lr=1e-3, pretrain_steps=600,
                     num_reference=64, eval_samples=128, hidden_size=128, num_layers=4, max_new_tokens=12,
                     prompt_repeats=4, distort=True, families=LM_FAMILIES, family_by="verb", seeds=(0, 1, 2)),
    },
}


# ---------------------------------------------------------------------------------------------------------------------
# runs: one CTRLTrainer per (method, target KL), every one under the adaptive KL controller
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    method: str
    target_kl: float
    transform: str  # CTRLConfig.transform
    procedure: str
    start_beta: float | None = None  # raw-reward transforms: the controller's starting β (diagnose's prediction)


def plan_runs(target_kls, methods, predictions: dict[float, dict]) -> list[RunSpec]:
    """One run per (target KL, method). `predictions[kl]` is `diagnose(..., "bon", 4, kl).methods` on the task's
    reference rewards: it gives the raw-reward transforms their starting β and vBoN its spec (log c with eps ≤ 1/(2K))."""
    runs = []
    for kl in target_kls:
        kl = float(kl)
        for name in methods:
            m = METHODS[name]
            transform = predictions[kl]["vbon"]["transform"] if name == "vbon" else m.transform
            start = predictions[kl][m.diagnose]["beta"] if m.raw else None
            runs.append(RunSpec(name, kl, transform, m.procedure, start))
    return runs


def make_config(spec: RunSpec, output_dir, **common):
    """The run's `CTRLConfig` (kl_budget = target KL, kl_control adaptive by default)."""
    from trl_infalign import CTRLConfig

    extra = {} if spec.start_beta is None else {"beta": spec.start_beta}
    with warnings.catch_warnings():
        # raw-reward transforms: "no calibrated-space prediction of beta ... starts from beta" — we pass diagnose's β
        warnings.filterwarnings("ignore", message=".*has no calibrated-space prediction of beta.*")
        # ctrl_won at KL >= ~0.6: best_t is held by its β floor (min_beta = 0.01); recorded in the row instead
        warnings.filterwarnings("ignore", message=".*limited by the floor min_beta.*")
        return CTRLConfig(output_dir=str(output_dir), transform=spec.transform, kl_budget=spec.target_kl,
                          inference_procedure=spec.procedure, inference_n=N, **extra, **common)


def train(args, model_path, tokenizer, reward_func, dataset, numpy_references: bool = False, trace: list | None = None):
    """Train one run; returns (model in eval mode, final β of the controller).

    `trace`: if a list, gets [update, smoothed per-completion KL, β] from the adaptive controller every 10 updates
    (and the last), the convergence record kept in the hetero_bandit rows.

    `numpy_references`: serve the reference-rewards column as numpy arrays once the trainer has validated it. With
    K = 256 references per row and ~500 completions per step, accelerate's `send_to_device` otherwise walks every
    Python float of the column at every step, which doubled the bandit's step time (identical results either way)."""
    from trl_infalign import CTRLTrainer

    trainer = CTRLTrainer(model=str(model_path), reward_funcs=reward_func, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    if numpy_references:
        trainer.train_dataset = trainer.train_dataset.with_format(
            "numpy", columns=[args.reference_rewards_column], output_all_columns=True)
    controller = getattr(trainer, "ctrl_kl_controller", None)
    if trace is not None and controller is not None:
        update = controller.update

        def traced(measured_kl):
            beta = update(measured_kl)
            if controller.num_updates % 10 == 0 or controller.num_updates == args.max_steps:
                trace.append([controller.num_updates, controller.kl_estimate, beta])
            return beta

        controller.update = traced
    trainer.train()
    model = trainer.model
    model.eval()
    return model, float(trainer.current_beta)


def common_train_kwargs(device: str, seed: int, **overrides) -> dict:
    kwargs = dict(
        temperature=1.0, top_k=0, top_p=1.0, num_train_epochs=1, save_strategy="no", report_to="none", seed=seed,
        disable_dropout=True, disable_tqdm=True, logging_steps=10_000, bf16=False, use_cpu=device == "cpu",
    )
    kwargs.update(overrides)
    return kwargs


def theory_at_kl(transform: str, kl: float) -> tuple[float | None, float | None]:
    """Continuum calibrated-space (BoN-4, WoN-4) win rates of `transform` at KL `kl` (β re-solved); None for
    transforms of the raw reward or an unreachable KL."""
    from trl_infalign import get_transform, theory

    if get_transform(transform).requires_raw_rewards or not (kl > 1e-6 and math.isfinite(kl)):
        return None, None
    try:
        pol = theory.policy(transform, theory.beta_for_kl(transform, kl))
    except ValueError:
        return None, None
    return pol.win_rate("bon", N), pol.win_rate("won", N)


def diagnose_name(spec: RunSpec, resolved: str) -> str:
    m = METHODS[spec.method]
    return resolved if m.diagnose == "spec" else m.diagnose


def predict(ref_rewards, name: str, kl: float) -> dict | None:
    """`diagnose`'s prediction for one method at KL `kl`: {beta, kl, standard_win, bon_win, won_win} (None if the KL
    is unreachable). `name` is a diagnose method name or a resolved transform spec (the exact Φ the run trained on)."""
    from trl_infalign.diagnose import diagnose

    if not (math.isfinite(kl) and kl > 1e-4):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            m = diagnose(ref_rewards, "bon", N, kl, methods=[name]).methods[name]
        except ValueError:
            return None
    if "error" in m:
        return None
    return {"beta": m["beta"], "kl": m["kl"], "standard_win": m["standard_win_rate"], "bon_win": m["bon_win_rate"],
            "won_win": m["won_win_rate"]}


def diagnose_tables(ref_rewards, target_kls) -> dict[float, dict]:
    """Full `diagnose` reports (BoN-4 and WoN-4) at each target KL, for the JSON and for `plan_runs`."""
    from trl_infalign.diagnose import diagnose

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kl in target_kls:
            out[float(kl)] = {"bon": diagnose(ref_rewards, "bon", N, float(kl)).to_dict(),
                              "won": diagnose(ref_rewards, "won", N, float(kl), methods=["best_t"]).to_dict()}
    return out


def base_row(task: str, spec: RunSpec, args, final_beta: float, measured: dict, ref_rewards, seconds: float) -> dict:
    """The JSON row shared by all tasks: target / measured KL, β, win rates, theory and diagnose predictions."""
    resolved = args.resolved_transform
    theory_bon, theory_won = theory_at_kl(resolved, measured["kl"])
    name = diagnose_name(spec, resolved)
    row = {
        "task": task, "method": spec.method, "label": METHODS[spec.method].label, "transform": resolved,
        "procedure": spec.procedure, "target_kl": spec.target_kl, "kl_control": args.kl_control,
        "start_beta": float(args.beta), "final_beta": final_beta, **measured,
        "kl_rel_error": measured["kl"] / spec.target_kl - 1.0,
        "theory_bon_win": theory_bon, "theory_won_win": theory_won,
        "diagnose_method": name,
        "diagnose_at_budget": predict(ref_rewards, name, spec.target_kl),
        "diagnose_at_measured_kl": predict(ref_rewards, name, measured["kl"]),
        "train_seconds": seconds,
    }
    return row


def row_line(row: dict) -> str:
    def f(v):
        return "  –  " if v is None else f"{v:.3f}"

    d = row["diagnose_at_measured_kl"] or {}
    ci = row.get("kl_ci")
    kl = f"{row['kl']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    return (f"  [{row['task']}] {row['method']:<10} target {row['target_kl']:.2f} KL {kl} ({100 * row['kl_rel_error']:+.0f}%) "
            f"β {row['start_beta']:.4g}→{row['final_beta']:.4g}  std {f(row['standard_win'])} bon4 {f(row['bon_win'])} "
            f"(diag {f(d.get('bon_win'))}) won4 {f(row['won_win'])} (diag {f(d.get('won_win'))})  "
            f"{row['train_seconds']:.0f}s")


# ---------------------------------------------------------------------------------------------------------------------
# exact metrics on one-token bandits
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


def hetero_bandit_problem(num_prompts: int, num_actions: int, seed: int):
    """Per-prompt π_ref targets, reward scales and offsets of the heterogeneous contextual bandit.

    Scales: the stratified log-normal quantiles exp(Φ⁻¹((i + ½)/P)) (σ = 1; p90/p10 ≈ 10, max/min ≈ 40 at P = 16),
    in random order; offsets N(0, 2²); per prompt, action rewards scale · z + offset with z ~ N(0, 1) distinct."""
    import torch
    from scipy.stats import norm

    generator = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(num_prompts, num_actions, generator=generator) * 0.6, dim=1)
    levels = (torch.arange(num_prompts, dtype=torch.float64) + 0.5) / num_prompts
    scales = torch.exp(torch.as_tensor(norm.ppf(levels.numpy())))[torch.randperm(num_prompts, generator=generator)]
    offsets = 2.0 * torch.randn(num_prompts, generator=generator, dtype=torch.float64)
    z = torch.randn(num_prompts, num_actions, generator=generator, dtype=torch.float64)
    return target, scales, offsets, scales[:, None] * z + offsets[:, None]


def run_hetero_bandit(workdir: Path, *, target_kls, methods, num_prompts: int, num_actions: int, num_reference: int,
                      steps: int, lr: float, num_generations: int, step_factor: dict | None = None,
                      device: str = "cpu", seed: int = 0, log=print) -> dict:
    """P one-token prompts × V one-token actions, per-prompt reward scale spread log-normally; exact metrics averaged
    over prompts, next to `diagnose` on the same reference rewards. `step_factor` ({method: k}): that method trains
    k × `steps` steps (see DEFAULTS: CTRL-WoN's settling time)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from trl_infalign.tiny import bandit_action_ids, build_contextual_bandit_policy, \
        build_contextual_bandit_tokenizer, contextual_bandit_next_token_probs, contextual_bandit_prompts

    target, scales, offsets, action_rewards = hetero_bandit_problem(num_prompts, num_actions, seed)
    tokenizer = build_contextual_bandit_tokenizer(num_prompts, num_actions)
    path = build_contextual_bandit_policy(tokenizer, workdir / "hetero-bandit-reference", target,
                                          hidden_size=max(64, 2 * num_prompts), seed=seed)
    pi_ref = contextual_bandit_next_token_probs(AutoModelForCausalLM.from_pretrained(path), tokenizer, num_prompts)
    actions = bandit_action_ids(tokenizer, num_actions)
    rewards = (action_rewards.min(dim=1, keepdim=True).values - 1.0).expand(-1, len(tokenizer)).clone()
    rewards[:, actions] = action_rewards  # non-action tokens (≈ 0 probability): below every action
    ref_rewards = [stratified_reference_rewards(pi_ref[i], rewards[i], num_reference) for i in range(num_prompts)]
    prompts = contextual_bandit_prompts(num_prompts)
    dataset = Dataset.from_dict({"prompt": prompts, "ref_rewards": ref_rewards})
    index = {p: i for i, p in enumerate(prompts)}
    table = rewards.tolist()

    def hetero_reward(prompts, completion_ids, **kwargs):
        return [table[index[p.strip()]][ids[0] if ids else tokenizer.pad_token_id]
                for p, ids in zip(prompts, completion_ids)]

    tv_ref = 0.5 * (pi_ref[:, actions] - target).abs().sum(dim=1).max().item()
    log(f"[hetero_bandit] P={num_prompts} prompts × V={num_actions} actions; reward scales {scales.min():.3g}–"
        f"{scales.max():.3g}; π_ref max TV to its target {tv_ref:.4f}; K={num_reference} stratified references; "
        f"{steps} steps of {num_prompts}×{num_generations} completions per run"
        + "".join(f"; {m}: {k:g}× the steps" for m, k in (step_factor or {}).items()))
    tables = diagnose_tables(ref_rewards, target_kls)
    step_factor = dict(step_factor or {})
    rows = []
    for spec in plan_runs(target_kls, methods, {k: v["bon"]["methods"] for k, v in tables.items()}):
        start = time.time()
        run_steps = int(round(steps * step_factor.get(spec.method, 1)))
        common = bandit_config_kwargs(device, seed, lr=lr, batch=num_prompts * num_generations,
                                      num_generations=num_generations, steps=run_steps)
        args = make_config(spec, workdir / "hetero-bandit-run", **common)
        trace = []
        model, final_beta = train(args, path, tokenizer, hetero_reward, dataset, numpy_references=True, trace=trace)
        pi = contextual_bandit_next_token_probs(model, tokenizer, num_prompts)
        measured = mean_exact_metrics(pi, pi_ref, rewards)
        optimum = torch.stack([bandit_optimum(pi_ref[i], rewards[i], ref_rewards[i], args.resolved_transform, final_beta)
                               for i in range(num_prompts)])
        row = base_row("hetero_bandit", spec, args, final_beta, measured, ref_rewards, time.time() - start)
        row.update({"metrics": f"exact, mean over {num_prompts} prompts", "steps": run_steps, "kl_trace": trace,
                    "tv_to_optimum": 0.5 * float((pi - optimum).abs().sum(dim=1).mean()),
                    "optimum_at_final_beta": mean_exact_metrics(optimum, pi_ref, rewards),
                    "kl_per_prompt": [exact_metrics(pi[i], pi_ref[i], rewards[i])["kl"] for i in range(num_prompts)]})
        rows.append(row)
        log(row_line(row))
        del model
    return {"rows": rows, "diagnose": tables, "ref_rewards": ref_rewards,
            "setup": {"num_prompts": num_prompts, "num_actions": num_actions, "num_reference": num_reference,
                      "steps": steps, "step_factor": step_factor, "lr": lr, "num_generations": num_generations,
                      "scales": scales.tolist(), "offsets": offsets.tolist(), "pi_ref_max_tv_to_target": tv_ref}}


# ---------------------------------------------------------------------------------------------------------------------
# lm / hetero_lm: the quickstart's tiny-LM VADER task, Monte-Carlo metrics with the evaluator
# ---------------------------------------------------------------------------------------------------------------------
def _quickstart():
    """`examples/quickstart.py` (corpus generator, prompts' parts, the VADER reward), imported by path."""
    examples = str(Path(__file__).resolve().parent.parent / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import quickstart

    return quickstart


def lm_family(prompt: str, family_by: str = "verb", num_families: int | None = None) -> int:
    """Family of a quickstart prompt "<subject> <verb>": the index of its verb (`family_by="verb"`, the default) or of
    its subject (`"subject"`, the first design) modulo the number of families (default len(LM_FAMILIES))."""
    qs = _quickstart()
    num_families = len(LM_FAMILIES) if num_families is None else num_families
    prompt = prompt.strip()
    for i, subject in enumerate(qs.SUBJECTS):
        for j, verb in enumerate(qs.VERBS):
            if prompt == f"{subject} {verb}":
                return (j if family_by == "verb" else i) % num_families
    raise ValueError(f"not a quickstart prompt: {prompt!r}")


def make_distorted_vader(families=None, family_by: str = "verb"):
    """VADER compound sentiment under a per-family affine distortion: scale_f · vader + offset_f (`families`, default
    LM_FAMILIES). Within a prompt it is an increasing map of VADER, so win rates (and every calibrated reward) are those
    of VADER itself."""
    families = tuple(tuple(f) for f in (LM_FAMILIES if families is None else families))

    def distorted_vader(prompts, completions, **kwargs):
        scores = _quickstart().vader_sentiment(prompts, completions)
        out = []
        for p, s in zip(prompts, scores):
            scale, offset = families[lm_family(p, family_by, len(families))]
            out.append(scale * s + offset)
        return out

    return distorted_vader


distorted_vader = make_distorted_vader()


class PolicySampler:
    """Fixed evaluation protocol of the lm tasks: fresh reference samples scored once, then, per policy, `m` samples per
    prompt scored with the same reward, plus their log-probs under the policy and the reference (per-completion KL)."""

    def __init__(self, reference, tokenizer, prompts, reward_func, *, num_samples: int, max_new_tokens: int, seed: int,
                 families: list[int] | None = None):
        import torch

        from trl_infalign.sampling import generate_completions, load_reward_funcs

        self.reference, self.tokenizer, self.prompts = reference, tokenizer, list(prompts)
        self.funcs, self.classes = load_reward_funcs(reward_func)
        self.num_samples, self.max_new_tokens, self.seed = num_samples, max_new_tokens, seed
        self.families = None if families is None else list(families)
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

        from trl_infalign.evaluation import evaluate_scored
        from trl_infalign.sampling import completion_logprobs, generate_completions

        torch.manual_seed(self.seed)
        comps = generate_completions(model, self.tokenizer, self.prompts, self.num_samples,
                                     max_new_tokens=self.max_new_tokens, progress=False)
        rewards = self._score(comps)
        prompt_ids = [comps.prompt_ids[p] for p in range(len(comps.prompts)) for _ in comps.ids[p]]
        completion_ids = [i for ids in comps.ids for i in ids]
        pad = self.tokenizer.pad_token_id
        shape = rewards.shape
        logp = completion_logprobs(model, prompt_ids, completion_ids, pad_token_id=pad).reshape(shape)
        logp_ref = completion_logprobs(self.reference, prompt_ids, completion_ids, pad_token_id=pad).reshape(shape)
        result = evaluate_scored(rewards, self.reference_rewards, ns=(N,), procedures=("standard", "bon", "won"),
                                 policy_logps=logp, reference_logps=logp_ref, seed=self.seed)
        out = {"kl": result.kl_k1, "kl_ci": list(result.kl_k1_ci), "kl_k3": result.kl_k3, "kl_k3_ci": list(result.kl_k3_ci)}
        for r in result.win_rates:
            key = {"standard": "standard_win", "bon": "bon_win", "won": "won_win"}[r["procedure"]]
            out[key], out[f"{key}_ci"] = r["estimate"], [r["ci_low"], r["ci_high"]]
        out["mean_reward"] = float(rewards.mean())
        out["mean_completion_tokens"] = sum(len(i) for i in completion_ids) / len(completion_ids)
        out["kl_per_prompt"] = (logp - logp_ref).mean(dim=1).tolist()
        out["per_prompt"] = {{"standard": "standard_win", "bon": "bon_win", "won": "won_win"}[r.procedure]:
                             [float(v) for v in r.per_prompt] for r in result.results}
        if self.families is not None:
            out["per_family"] = self._per_family(rewards, logp, logp_ref)
        return out

    def _per_family(self, rewards, logp, logp_ref) -> dict:
        """KL (k1 per completion) and win rates of each prompt family separately (95% bootstrap CIs over its
        prompts): where raw reward spends its KL is the mechanism calibration fixes."""
        import torch

        from trl_infalign.evaluation import evaluate_scored

        fam = torch.as_tensor(self.families)
        out = {}
        for f in sorted(set(self.families)):
            idx = (fam == f).nonzero().flatten()
            r = evaluate_scored(rewards[idx], self.reference_rewards[idx], ns=(N,), procedures=("standard", "bon"),
                                policy_logps=logp[idx], reference_logps=logp_ref[idx], seed=self.seed)
            entry = {"num_prompts": len(idx), "kl": r.kl_k1, "kl_ci": list(r.kl_k1_ci)}
            for w in r.win_rates:
                key = {"standard": "standard_win", "bon": "bon_win"}[w["procedure"]]
                entry[key], entry[f"{key}_ci"] = w["estimate"], [w["ci_low"], w["ci_high"]]
            out[str(f)] = entry
        return out


def tilt_kl_per_prompt(ref_rewards, transform: str, beta: float) -> list[float]:
    """Per-prompt KL of the tilt `diagnose` models, π*_x ∝ π_ref,x·exp(Φ_x/β) on prompt x's K reference atoms (each
    of weight 1/K), for one global β: where a method *should* spend its KL at equilibrium."""
    import torch

    out = []
    for ref in ref_rewards:
        k = len(ref)
        pi_ref = torch.full((k,), 1.0 / k, dtype=torch.float64)
        p = bandit_optimum(pi_ref, torch.tensor(ref, dtype=torch.float64), ref, transform, beta)
        p = p[p > 0]
        out.append(float((p * (p * k).log()).sum()))
    return out


def family_means(values, families) -> dict[str, float]:
    out: dict[str, list] = {}
    for v, f in zip(values, families):
        out.setdefault(str(f), []).append(v)
    return {f: sum(v) / len(v) for f, v in sorted(out.items())}


def run_lm(workdir: Path, *, target_kls, methods, steps: int, pretrain_steps: int, num_reference: int,
           eval_samples: int, hidden_size: int, num_layers: int, max_new_tokens: int, prompt_repeats: int = 1,
           lr: float = 1e-3, distort: bool = False, families=None, family_by: str = "verb", batch_size: int = 32,
           num_generations: int = 8, device: str = "cpu", seed: int = 0, log=print) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from trl_infalign import build_reference_rewards
    from trl_infalign.tiny import build_tiny_policy, build_tokenizer, pretrain_on_texts

    task = "hetero_lm" if distort else "lm"
    qs = _quickstart()
    families_spec = tuple(tuple(f) for f in (LM_FAMILIES if families is None else families)) if distort else None
    reward = make_distorted_vader(families_spec, family_by) if distort else qs.vader_sentiment
    torch.manual_seed(seed)
    corpus = qs.review_corpus(2000, seed)
    tokenizer = build_tokenizer(corpus, vocab_size=400)
    sft_path = workdir / f"{task}-sft"
    build_tiny_policy(tokenizer, sft_path, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    sft = AutoModelForCausalLM.from_pretrained(sft_path).to(device)
    pretrain_on_texts(sft, tokenizer, corpus, steps=pretrain_steps, lr=3e-3, batch_size=32, seed=seed)
    sft.save_pretrained(sft_path)
    prompts = [f"{s} {v}" for s in qs.SUBJECTS for v in qs.VERBS]
    log(f"[{task}] tiny Llama {hidden_size}x{num_layers} pre-trained {pretrain_steps} steps; {len(prompts)} prompts, "
        f"K={num_reference} reference samples, {steps} RL steps per run, {eval_samples} eval samples per prompt and side"
        + (f"; reward = scale·VADER + offset per family (by {family_by}) {families_spec}" if distort else ""))
    dataset = build_reference_rewards(Dataset.from_dict({"prompt": prompts}), sft, reward, tokenizer=tokenizer,
                                      num_samples=num_reference, max_new_tokens=max_new_tokens, seed=seed,
                                      progress=False)
    ref_rewards = [list(r) for r in dataset["ref_rewards"]]
    if prompt_repeats > 1:
        from datasets import concatenate_datasets

        dataset = concatenate_datasets([dataset] * prompt_repeats)
    prompt_families = [lm_family(p, family_by, len(families_spec)) for p in prompts] if distort else None
    sampler = PolicySampler(sft, tokenizer, prompts, reward, num_samples=eval_samples, max_new_tokens=max_new_tokens,
                            seed=seed + 1, families=prompt_families)
    common = common_train_kwargs(
        device, seed, learning_rate=lr, per_device_train_batch_size=batch_size, num_generations=num_generations,
        max_completion_length=max_new_tokens, max_steps=steps,
        # the reference rewards come from the in-memory SFT model saved at sft_path; the trainer loads that path
        reference_provenance_check="warn",
    )
    tables = diagnose_tables(ref_rewards, target_kls)
    rows = []
    for spec in plan_runs(target_kls, methods, {k: v["bon"]["methods"] for k, v in tables.items()}):
        start = time.time()
        args = make_config(spec, workdir / f"{task}-run", **common)
        model, final_beta = train(args, sft_path, tokenizer, reward, dataset)
        measured = sampler.evaluate(model)
        row = base_row(task, spec, args, final_beta, measured, ref_rewards, time.time() - start)
        row["metrics"] = (f"sampled: {eval_samples} samples/prompt/side, {len(prompts)} prompts; KL = k1 per completion "
                          "(95% bootstrap CI over prompts); win rates: all-subsets estimator, 95% bootstrap CIs")
        row["seed"] = seed
        if prompt_families is not None:
            at_budget = row["diagnose_at_budget"]
            if at_budget is not None:
                predicted = family_means(tilt_kl_per_prompt(ref_rewards, row["transform"], at_budget["beta"]),
                                         prompt_families)
                for f, v in predicted.items():
                    row["per_family"][f]["diagnose_kl_at_budget"] = v
            for f, entry in row["per_family"].items():
                entry["scale"], entry["offset"] = families_spec[int(f)]
        rows.append(row)
        log(row_line(row))
        del model
    return {"rows": rows, "diagnose": tables, "ref_rewards": ref_rewards,
            "setup": {"num_prompts": len(prompts), "num_reference": num_reference, "eval_samples": eval_samples,
                      "steps": steps, "lr": lr, "hidden_size": hidden_size, "num_layers": num_layers,
                      "max_new_tokens": max_new_tokens, "batch_size": batch_size, "num_generations": num_generations,
                      "families": families_spec, "family_by": family_by if distort else None,
                      "prompt_families": prompt_families}}


# ---------------------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------------------
KL_TOLERANCE = {"bandit": 0.15, "hetero_bandit": 0.15, "lm": 0.25, "hetero_lm": 0.25}


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

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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
    "identity": dict(color=METHODS["identity"].color, label="theory: identity"),
    "ctrl_bon": dict(color=METHODS["ctrl_bon"].color, label="theory: bon exp(t·c), best t"),
    "ctrl_won": dict(color=METHODS["ctrl_won"].color, label="theory: won −exp(−t·c), best t (β floor 0.01)"),
    "optimal": dict(color="black", linestyle="--", label="theory: optimal for BoN-4"),
    "optimal_won": dict(color="gray", linestyle=":", label="theory: optimal for WoN-4"),
}


def _points(ax, rows, key):
    for method in METHODS:
        pts = [r for r in rows if r["method"] == method]
        if not pts:
            continue
        m = METHODS[method]
        x, y = [r["kl"] for r in pts], [r[f"{key}_win"] for r in pts]
        ci = [r.get(f"{key}_win_ci") for r in pts]
        if all(c is not None for c in ci):
            xci = [r.get("kl_ci") or [r["kl"], r["kl"]] for r in pts]
            ax.errorbar(x, y, yerr=[[v - c[0] for v, c in zip(y, ci)], [c[1] - v for v, c in zip(y, ci)]],
                        xerr=[[v - c[0] for v, c in zip(x, xci)], [c[1] - v for v, c in zip(x, xci)]],
                        fmt="none", ecolor=m.color, alpha=0.5, capsize=2)
        ax.scatter(x, y, marker=m.marker, s=60, color=m.color, edgecolor="white", linewidth=0.8, zorder=5,
                   label=f"measured: {m.label}")


def _pooled_points(ax, rows, key):
    """Several seeds: each seed's run as a small faint marker, the seed-pooled mean as a large one with its 95% CIs
    (bootstrap over prompts within seeds; `pooled_lm_summary`)."""
    for kl in sorted({r["target_kl"] for r in rows}):
        at = [r for r in rows if r["target_kl"] == kl]
        pooled = pooled_lm_summary(at)["methods"]
        for method, p in pooled.items():
            m = METHODS[method]
            pts = [r for r in at if r["method"] == method]
            ax.scatter([r["kl"] for r in pts], [r[f"{key}_win"] for r in pts], marker=m.marker, s=22, color=m.color,
                       alpha=0.45, zorder=4)
            x, y = p["kl"], p[f"{key}_win"]
            xci, yci = p.get("kl_ci") or [x, x], p.get(f"{key}_win_ci") or [y, y]
            ax.errorbar([x], [y], yerr=[[y - yci[0]], [yci[1] - y]], xerr=[[x - xci[0]], [xci[1] - x]], fmt="none",
                        ecolor=m.color, capsize=3, linewidth=1.4)
            ax.scatter([x], [y], marker=m.marker, s=90, color=m.color, edgecolor="black", linewidth=0.9, zorder=6,
                       label=f"measured: {m.label}, {len(p['seeds'])}-seed mean")


def plot_theory_task(task: str, rows: list[dict], path: Path, curves: dict | None = None) -> None:
    """bandit / lm: two panels (BoN-4, WoN-4 win rate vs KL): continuum theory curves and the measured points."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    kl_max = min(max([r["kl"] for r in rows] + [r["target_kl"] for r in rows] + [0.3]) * 1.15, 3.0)
    curves = curves if curves is not None else theory_curves(kl_max)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (key, title) in zip(axes, (("bon", f"Best-of-{N}"), ("won", f"Worst-of-{N}"))):
        for name, curve in curves.items():
            if name == "optimal_won" and key == "bon":
                continue
            ax.plot(curve["kl"], curve[key], linewidth=1.6, **{"linestyle": "-", **CURVE_STYLE[name]})
        _points(ax, rows, key)
        for kl in sorted({r["target_kl"] for r in rows}):
            ax.axvline(kl, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("KL(π ‖ π_ref) per completion [nats]" + (" (exact)" if "bandit" in task else " (k1, 95% CI)"))
        ax.set_ylabel(f"{title} win rate vs π_ref's {title}")
        ax.set_title(f"{task}: {title} (N={N}); dotted: KL budgets")
        ax.grid(alpha=0.3)
        ax.set_xlim(0, kl_max)
    axes[1].legend(fontsize=7, loc="lower right")
    kind = ("one-token bandit, exact metrics" if task == "bandit"
            else "tiny-LM VADER task, sampled metrics (95% bootstrap CIs)")
    fig.suptitle(f"Alignment quality — {kind}; every run under kl_budget (adaptive); curves: calibrated-space theory",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


DIAGNOSE_CURVES = {"bon": ("raw_reward", "lsc", "par", "vbon", "identity", "best_t", "optimal"),
                   "won": ("raw_reward", "identity", "best_t")}
DIAGNOSE_METHOD = {"raw_reward": "raw_reward", "lsc": "lsc", "par": "par", "vbon": "vbon", "identity": "identity",
                   "best_t": "ctrl_bon", "optimal": "optimal"}


def diagnose_curves(ref_rewards, kl_max: float, num: int = 10) -> dict:
    """{procedure: {diagnose method: [(kl, win), ...]}} from `diagnose` on the task's reference rewards."""
    import numpy as np

    from trl_infalign.diagnose import diagnose

    kls = [float(k) for k in np.linspace(kl_max / num, kl_max, num)]
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for procedure, methods in DIAGNOSE_CURVES.items():
            result = diagnose(ref_rewards, procedure, N, kls[len(kls) // 2], methods=list(methods))
            out[procedure] = {k: [list(p) for p in v] for k, v in result.curves(kls).items()}
    return out


def plot_diagnose_task(task: str, rows: list[dict], curves: dict, path: Path) -> None:
    """hetero tasks: BoN-4 and WoN-4 win rate vs KL — `diagnose`'s predicted curves from the task's own reference
    rewards (lines) and the measured runs (points)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5))
    for ax, (key, title) in zip(axes, (("bon", f"Best-of-{N}"), ("won", f"Worst-of-{N}"))):
        for name, points in curves[key].items():
            if not points:
                continue
            method = "ctrl_won" if (name == "best_t" and key == "won") else DIAGNOSE_METHOD[name]
            m = METHODS[method]
            ax.plot(*zip(*points), color=m.color, linestyle="--" if name == "optimal" else "-", linewidth=1.3,
                    alpha=0.8, label=f"diagnose: {name}" + (" (won)" if method == "ctrl_won" else ""))
        shown = [r for r in rows if key == "won" or r["method"] != "ctrl_won"]
        if len({r.get("seed", 0) for r in shown}) > 1:
            _pooled_points(ax, shown, key)
        else:
            _points(ax, shown, key)
        for kl in sorted({r["target_kl"] for r in rows}):
            ax.axvline(kl, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("KL(π ‖ π_ref) per completion, mean over prompts [nats]"
                      + (" (exact)" if "bandit" in task else " (k1, 95% CI)"))
        ax.set_ylabel(f"{title} win rate vs π_ref's {title}")
        ax.set_title(f"{task}: {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6.5, loc="lower right", ncol=2)
    axes[1].legend(fontsize=6.5, loc="lower right", ncol=2)
    kind = ("heterogeneous contextual bandit, exact metrics" if task == "hetero_bandit"
            else "tiny-LM VADER, per-family affine distortion, sampled metrics (95% CIs; faint: single seeds)")
    fig.suptitle(f"{kind} — lines: diagnose from the reference rewards (all seeds' prompts); points: trained runs "
                 "under kl_budget", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ci(row, key, digits=3) -> str:
    ci = row.get(f"{key}_ci")
    return f"{row[key]:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def kl_table(rows: list[dict]) -> str:
    """Target vs measured per-completion KL for every run (exact on bandits, k1 with 95% CI on LM tasks)."""
    lines = ["| task | method | transform | target KL | measured KL | error | tolerance | β start → final | seed |",
             "|---|---|---|---:|---:|---:|---|---|---:|"]
    for r in rows:
        tol = KL_TOLERANCE[r["task"]]
        ok = "✓" if abs(r["kl_rel_error"]) <= tol else "✗"
        lines.append(f"| {r['task']} | {r['method']} | `{r['transform']}` | {r['target_kl']:.2f} | {_ci(r, 'kl')} | "
                     f"{100 * r['kl_rel_error']:+.1f}% | ±{100 * tol:.0f}% {ok} | {r['start_beta']:.4g} → "
                     f"{r['final_beta']:.4g} | {r.get('seed', '–')} |")
    return "\n".join(lines)


def win_table(rows: list[dict]) -> str:
    """Win rates per run, with `diagnose`'s prediction at the measured KL and the continuum theory's."""
    lines = ["| task | method | KL | standard win | BoN-4 win | diagnose BoN-4 | theory BoN-4 | WoN-4 win | "
             "diagnose WoN-4 | theory WoN-4 | seed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = r["diagnose_at_measured_kl"] or {}
        lines.append(f"| {r['task']} | {r['method']} | {r['kl']:.3f} | {_ci(r, 'standard_win')} | {_ci(r, 'bon_win')} | "
                     f"{_fmt(d.get('bon_win'))} | {_fmt(r['theory_bon_win'])} | {_ci(r, 'won_win')} | "
                     f"{_fmt(d.get('won_win'))} | {_fmt(r['theory_won_win'])} | {r.get('seed', '–')} |")
    return "\n".join(lines)


def family_table(rows: list[dict]) -> str:
    """hetero_lm: per prompt family, measured KL (95% CI over the family's prompts) against the KL the per-prompt
    optimum `diagnose` models spends there at the budget's β, and BoN-4."""
    lines = ["| task | method | seed | family (scale, offset) | prompts | measured KL | optimum's KL | BoN-4 win |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        for f, e in (r.get("per_family") or {}).items():
            lines.append(f"| {r['task']} | {r['method']} | {r.get('seed', '–')} | {f} (×{e['scale']:g}, "
                         f"{e['offset']:+g}) | {e['num_prompts']} | {_ci(e, 'kl')} | "
                         f"{_fmt(e.get('diagnose_kl_at_budget'))} | {_ci(e, 'bon_win')} |")
    return "\n".join(lines)


def pooled_table(acceptance_report: dict) -> str:
    """LM tasks: seed-pooled KL and win rates per method, and the paired differences, with 95% CIs."""
    lines = ["| task | budget | method | seeds | KL (k1) | standard win | BoN-4 win | WoN-4 win | BoN-4 per seed |",
             "|---|---:|---|---|---:|---:|---:|---:|---|"]
    diffs = ["| task | budget | difference (BoN-4) | pooled [95% CI, paired] | per seed |", "|---|---:|---|---:|---|"]
    for task in ("hetero_lm",):
        for kl, entry in (acceptance_report.get(task) or {}).items():
            for name, m in (entry.get("pooled") or {}).items():
                lines.append(f"| {task} | {kl} | {name} | {', '.join(map(str, m['seeds']))} | {_ci(m, 'kl')} | "
                             f"{_ci(m, 'standard_win')} | {_ci(m, 'bon_win')} | {_ci(m, 'won_win')} | "
                             f"{', '.join(f'{v:.3f}' for v in m['bon_win_per_seed'])} |")
            for name, d in (entry.get("paired_differences") or {}).items():
                diffs.append(f"| {task} | {kl} | {name} | {_ci(d, 'bon_win')} | "
                             f"{', '.join(f'{v:+.3f}' for v in d['bon_win_per_seed'])} |")
    return "\n".join(lines) + "\n\n" + "\n".join(diffs)


def acceptance(rows: list[dict]) -> dict:
    """The checks of issues #10 (KL budget holds) and #12 (calibration pays where reward scales differ)."""
    out: dict = {"kl_within_tolerance": {}, "hetero_bandit": {}, "hetero_lm": {}}
    for r in rows:
        out["kl_within_tolerance"][f"{r['task']}/{r['method']}@{r['target_kl']:g}"] = (
            abs(r["kl_rel_error"]) <= KL_TOLERANCE[r["task"]])
    out["kl_all_within_tolerance"] = all(out["kl_within_tolerance"].values()) if rows else None
    for task in ("hetero_bandit", "hetero_lm"):
        for kl in sorted({r["target_kl"] for r in rows if r["task"] == task}):
            get = {r["method"]: r for r in rows if r["task"] == task and r["target_kl"] == kl}
            entry: dict = {}
            if "ctrl_bon" in get and "raw_reward" in get:
                entry["ctrl_bon_minus_raw_bon4"] = get["ctrl_bon"]["bon_win"] - get["raw_reward"]["bon_win"]
            if "ctrl_bon" in get and "identity" in get:
                entry["ctrl_bon_minus_identity_bon4"] = get["ctrl_bon"]["bon_win"] - get["identity"]["bon_win"]
            if "identity" in get and "raw_reward" in get:
                entry["identity_minus_raw_bon4"] = get["identity"]["bon_win"] - get["raw_reward"]["bon_win"]
            if task == "hetero_bandit":
                dev = {}
                for name, r in get.items():
                    for key in ("bon_win", "won_win", "standard_win"):
                        for where in ("diagnose_at_budget", "diagnose_at_measured_kl"):
                            if r[where] is not None:
                                dev.setdefault(where, {})[f"{name}/{key}"] = r[key] - r[where][key]
                entry["measured_minus_diagnose"] = dev
                for where, d in dev.items():
                    main = {k: v for k, v in d.items() if k.endswith("/bon_win") or k == "ctrl_won/won_win"}
                    entry[f"max_abs_deviation_{where}"] = max(abs(v) for v in main.values()) if main else None
                gain = entry.get("ctrl_bon_minus_raw_bon4")
                entry["gain_at_least_8_points"] = None if gain is None else gain >= 0.08
                worst = entry.get("max_abs_deviation_diagnose_at_budget")
                entry["within_0.02_of_diagnose_at_budget"] = None if worst is None else worst <= 0.02
            else:
                entry = lm_acceptance([r for r in rows if r["task"] == task and r["target_kl"] == kl])
            out[task][f"{kl:g}"] = entry
    return out


LM_PAIRS = (("ctrl_bon", "identity"), ("identity", "raw_reward"), ("ctrl_bon", "raw_reward"))


def _stratified_bootstrap(groups: list, num_bootstrap: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% CI of the mean over all (seed, prompt) values, resampling prompts with replacement within each seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    groups = [np.asarray(g, dtype=np.float64) for g in groups]
    total = sum(len(g) for g in groups)
    stats = np.zeros(num_bootstrap)
    for g in groups:
        idx = rng.integers(0, len(g), size=(num_bootstrap, len(g)))
        stats += g[idx].sum(axis=1)
    stats /= total
    low, high = np.quantile(stats, [0.025, 0.975])
    return float(low), float(high)


def pooled_lm_summary(rows: list[dict]) -> dict:
    """Seed-pooled numbers of one (LM task, KL budget): per method, the mean over seeds and prompts of KL and win
    rates with 95% CIs (bootstrap over prompts within each seed); per method pair, the paired difference (same seed,
    same prompt, same reference samples) with its 95% CI."""
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["method"], {})[int(r.get("seed", 0))] = r
    seeds = sorted(set.intersection(*(set(v) for v in by.values()))) if by else []
    methods: dict = {}
    paired: dict = {}
    for name, per_seed in by.items():
        rs = [per_seed[s] for s in seeds]
        if not rs:
            continue
        entry: dict = {"seeds": seeds, "kl_per_seed": [r["kl"] for r in rs],
                       "bon_win_per_seed": [r["bon_win"] for r in rs]}
        for key, per in (("kl", "kl_per_prompt"), ("standard_win", "standard_win"), ("bon_win", "bon_win"),
                         ("won_win", "won_win")):
            entry[key] = sum(r[key] for r in rs) / len(rs)
            groups = [r["kl_per_prompt"] if per == "kl_per_prompt" else (r.get("per_prompt") or {}).get(per)
                      for r in rs]
            if all(g is not None for g in groups):
                entry[f"{key}_ci"] = list(_stratified_bootstrap(groups))
            elif len(rs) == 1 and rs[0].get(f"{key}_ci"):
                entry[f"{key}_ci"] = rs[0][f"{key}_ci"]
        methods[name] = entry
    for a, b in LM_PAIRS:
        if a not in methods or b not in methods:
            continue
        ra, rb = [by[a][s] for s in seeds], [by[b][s] for s in seeds]
        d: dict = {"bon_win": methods[a]["bon_win"] - methods[b]["bon_win"],
                   "bon_win_per_seed": [x["bon_win"] - y["bon_win"] for x, y in zip(ra, rb)]}
        ga = [(x.get("per_prompt") or {}).get("bon_win") for x in ra]
        gb = [(y.get("per_prompt") or {}).get("bon_win") for y in rb]
        if all(g is not None for g in ga + gb):
            d["bon_win_ci"] = list(_stratified_bootstrap([[u - v for u, v in zip(x, y)] for x, y in zip(ga, gb)]))
        paired[f"{a}_minus_{b}"] = d
    return {"seeds": seeds, "methods": methods, "paired": paired}


def lm_acceptance(rows: list[dict]) -> dict:
    """#12's LM check at one budget: CTRL-BoN > identity > raw in BoN-4, pooled over seeds, with CIs."""
    summary = pooled_lm_summary(rows)
    methods, paired = summary["methods"], summary["paired"]
    entry: dict = {"seeds": summary["seeds"], "pooled": methods, "paired_differences": paired}
    for a, b in LM_PAIRS:
        if a in methods and b in methods:
            entry[f"{a}_minus_{b.replace('raw_reward', 'raw')}_bon4"] = methods[a]["bon_win"] - methods[b]["bon_win"]
            ca, cb = methods[a].get("bon_win_ci"), methods[b].get("bon_win_ci")
            if ca and cb:
                entry[f"{a}_vs_{b}_cis_overlap"] = ca[0] <= cb[1] and cb[0] <= ca[1]
            ci = paired[f"{a}_minus_{b}"].get("bon_win_ci")
            entry[f"{a}_minus_{b}_paired_ci_above_zero"] = None if ci is None else ci[0] > 0
    if all(m in methods for m in ("ctrl_bon", "identity", "raw_reward")):
        c, i, r = (methods[m]["bon_win"] for m in ("ctrl_bon", "identity", "raw_reward"))
        entry["ordering_point_estimates"] = c > i > r
        entry["ordering_per_seed"] = [x > y > z for x, y, z in zip(*(methods[m]["bon_win_per_seed"]
                                                                     for m in ("ctrl_bon", "identity", "raw_reward")))]
        flags = [entry.get(f"{a}_minus_{b}_paired_ci_above_zero") for a, b in LM_PAIRS[:2]]
        entry["ordering_shown_paired_95"] = None if None in flags else all(flags)
        entry["ordering_shown_marginal_cis_disjoint"] = (
            None if "ctrl_bon_vs_identity_cis_overlap" not in entry or "identity_vs_raw_reward_cis_overlap" not in entry
            else (entry["ordering_point_estimates"] and not entry["ctrl_bon_vs_identity_cis_overlap"]
                  and not entry["identity_vs_raw_reward_cis_overlap"]))
    return entry


def machine_description() -> dict:
    import torch
    import transformers
    import trl

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "python": platform.python_version(), "torch": torch.__version__, "trl": trl.__version__,
            "transformers": transformers.__version__, "load_average_at_start": load}


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
RUNNERS = {"bandit": run_bandit, "hetero_bandit": run_hetero_bandit, "lm": run_lm, "hetero_lm": run_lm}


def run_task(task: str, workdir: Path, output: Path, settings: dict, *, device: str, seed: int, log=print,
             plot: bool = True) -> dict:
    """Run one task, write its plot; returns {"rows", "diagnose", "setup", ...} (rows carry "mode" if given).

    `settings["seeds"]` (optional) runs the whole task once per seed — its own reference policy, reference rewards
    and evaluation samples — instead of once at `seed`; rows carry their "seed", and "diagnose" / "setup" are the
    first seed's, with every seed's in "diagnose_by_seed" / "setup_by_seed"."""
    settings = dict(settings)
    seeds = [int(s) for s in settings.pop("seeds", None) or [seed]]
    results = {}
    for s in seeds:
        if len(seeds) > 1:
            log(f"[{task}] seed {s} ({seeds.index(s) + 1}/{len(seeds)})")
        (workdir / f"seed{s}").mkdir(parents=True, exist_ok=True)
        results[s] = RUNNERS[task](workdir / f"seed{s}", device=device, seed=s, log=log, **settings)
        for r in results[s]["rows"]:
            r.setdefault("seed", s)
    result = dict(results[seeds[0]])
    result["rows"] = [r for s in seeds for r in results[s]["rows"]]
    result["seeds"] = seeds
    if len(seeds) > 1:
        result["diagnose_by_seed"] = {str(s): results[s]["diagnose"] for s in seeds}
        result["setup_by_seed"] = {str(s): results[s]["setup"] for s in seeds}
        if "ref_rewards" in result:  # diagnose's curves for the plot: on every seed's prompts pooled
            result["ref_rewards"] = [r for s in seeds for r in results[s]["ref_rewards"]]
    rows = result["rows"]
    if plot and rows:
        if task in ("bandit", "lm"):
            plot_theory_task(task, rows, output / f"alignment_quality_{task}.png")
        else:
            kl_max = max([r["kl"] for r in rows] + [r["target_kl"] for r in rows]) * 1.6
            ref = result.pop("ref_rewards")
            result["diagnose_curves"] = diagnose_curves(ref, kl_max)
            plot_diagnose_task(task, rows, result["diagnose_curves"], output / f"alignment_quality_{task}.png")
    result.pop("ref_rewards", None)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results", help="Directory for the JSON and the plots.")
    parser.add_argument("--quick", action="store_true",
                        help="Small CPU settings (all four tasks: ~70 min wall on a 2-core VM, 40 of them hetero_lm).")
    parser.add_argument("--task", choices=(*TASKS, "all"), nargs="+", default=["all"])
    parser.add_argument("--target-kls", type=float, nargs="+", default=None,
                        help="KL budgets (per completion, nats) of every method. Default: per task/mode.")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=None,
                        help="Methods to train (default: per task/mode).")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: per task/mode).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of tasks without a `seeds` default (all but hetero_lm).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="Run every selected task once per seed (default: the task's own `seeds` setting — "
                        "hetero_lm: 0 1 2 — else --seed).")
    parser.add_argument("--replot", action="store_true",
                        help="Train nothing: redraw the selected tasks' plots from the existing alignment_quality.json.")
    parser.add_argument("--fresh", action="store_true",
                        help="Rewrite alignment_quality.json with only the tasks of this invocation (default: keep "
                        "the other tasks' results already in it).")
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
    tasks = TASKS if "all" in args.task else tuple(dict.fromkeys(args.task))
    machine = machine_description()
    report = {"machine": machine, "mode": mode, "seed": args.seed, "device": device,
              "threads": args.threads, "tasks": {}, "rows": []}
    path = output / "alignment_quality.json"
    if args.replot:
        saved = json.loads(path.read_text())
        for task in tasks:
            rows = [r for r in saved.get("rows", []) if r.get("task") == task]
            if not rows:
                continue
            if task in ("bandit", "lm"):
                plot_theory_task(task, rows, output / f"alignment_quality_{task}.png")
            else:
                plot_diagnose_task(task, rows, saved["tasks"][task]["diagnose_curves"],
                                   output / f"alignment_quality_{task}.png")
            print(f"redrew {output / f'alignment_quality_{task}.png'} from {path}")
        return 0
    kept: dict = {"tasks": {}, "rows": []}
    if path.exists() and not args.fresh:
        # several invocations (one task each, say) build one report: keep the tasks this one does not rerun
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            print(f"could not read {path} ({error}); writing it afresh", flush=True)
        else:
            for name, value in (old.get("tasks") or {}).items():
                if name not in tasks:
                    value.setdefault("mode", old.get("mode"))
                    value.setdefault("machine", old.get("machine"))
                    value.setdefault("seeds", [old.get("seed")])
                    kept["tasks"][name] = value
            kept["rows"] = [r for r in old.get("rows", []) if r.get("task") in kept["tasks"]]
            if kept["tasks"]:
                print(f"keeping {', '.join(kept['tasks'])} from {path} ({len(kept['rows'])} rows)", flush=True)
    report["tasks"].update(kept["tasks"])
    report["rows"].extend(kept["rows"])
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="alignment_quality_") as tmp:
        for task in tasks:
            settings = dict(DEFAULTS[task][mode])
            for name in ("target_kls", "methods", "steps"):
                if getattr(args, name) is not None:
                    settings[name] = tuple(getattr(args, name)) if name != "steps" else args.steps
            if args.seeds is not None:
                settings["seeds"] = tuple(args.seeds)
            task_start = time.time()
            result = run_task(task, Path(tmp), output, settings, device=device, seed=args.seed)
            for r in result["rows"]:
                r["mode"] = mode
            result["settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
            result["seconds"] = time.time() - task_start
            report["tasks"][task] = {**{k: v for k, v in result.items() if k != "rows"}, "mode": mode,
                                     "machine": machine, "seeds": result["seeds"],
                                     "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
            report["rows"] = [r for r in report["rows"] if r.get("task") != task] + result["rows"]
            print(f"[{task}] done in {result['seconds']:.0f} s", flush=True)
            # write as we go: a long run that dies late keeps what it measured
            report["acceptance"] = acceptance(report["rows"])
            report["wall_seconds"] = time.time() - start
            path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    rows = [r for r in report["rows"] if r["task"] in tasks]
    print("\n## KL budget: target vs measured (per completion)\n")
    print(kl_table(rows))
    print("\n## Win rates (diagnose: prediction from the task's reference rewards at the measured KL)\n")
    print(win_table(rows))
    if any(r.get("per_family") for r in rows):
        print("\n## Per prompt family (hetero_lm): where the KL goes\n")
        print(family_table(rows))
    if any(r["task"] == "hetero_lm" for r in rows):
        print("\n## Pooled over seeds (hetero_lm), 95% CIs\n")
        print(pooled_table(report["acceptance"]))
    print("\n## Acceptance\n")
    print(json.dumps({k: v for k, v in report["acceptance"].items() if k != "kl_within_tolerance"}, indent=2,
                     default=float))
    print(f"\nWrote {output / 'alignment_quality.json'} and the plots; total {time.time() - start:.0f} s on {device} "
          f"({report['machine']['cpu']}, {report['machine']['cpu_count']} CPUs).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
