"""What every task of benchmarks/alignment_quality.py shares: the methods, the run plan (one `CTRLTrainer` per
(method, KL budget), every one under the adaptive KL controller), training, and the theory / `diagnose` predictions
attached to each JSON row.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

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
    trace_kl_controller(trainer, trace, args.max_steps)
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


def trace_kl_controller(trainer, trace: list | None, max_steps: int) -> None:
    """Append [update, KL estimate, β] to `trace` every 10 controller updates (and at the last step)."""
    controller = getattr(trainer, "ctrl_kl_controller", None)
    if trace is None or controller is None:
        return
    update = controller.update

    def traced(measured_kl):
        beta = update(measured_kl)
        if controller.num_updates % 10 == 0 or controller.num_updates == max_steps:
            trace.append([controller.num_updates, controller.kl_estimate, beta])
        return beta

    controller.update = traced
