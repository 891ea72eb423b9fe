"""Reporting of benchmarks/alignment_quality.py: theory and `diagnose` curves, the plots, the markdown tables, the
acceptance checks and the machine description.
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

from .common import METHODS, N
from .hetero_lm import lm_acceptance, pooled_lm_summary

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
