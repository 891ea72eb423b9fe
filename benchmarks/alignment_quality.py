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

This file is the CLI and the runner; the tasks live in ``benchmarks/alignment_tasks/``: ``bandit``, ``hetero_bandit``,
``lm`` and ``hetero_lm`` (each with its ``DEFAULTS`` and its run function), ``common`` (methods, run plan, training,
predictions) and ``report`` (curves, plots, tables, acceptance).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tasks live in benchmarks/alignment_tasks/

from alignment_tasks import bandit, hetero_bandit, hetero_lm, lm  # noqa: E402
# the names the tests and benchmarks/grpo_bandit.py use, from where they now live
from alignment_tasks.bandit import exact_metrics, mean_exact_metrics  # noqa: E402, F401
from alignment_tasks.common import METHODS, N, TASKS, plan_runs, predict, theory_at_kl  # noqa: E402, F401
from alignment_tasks.hetero_bandit import hetero_bandit_problem  # noqa: E402, F401
from alignment_tasks.lm import LM_FAMILIES, _quickstart, lm_family, make_distorted_vader  # noqa: E402, F401
from alignment_tasks.report import (  # noqa: E402, F401
    acceptance, diagnose_curves, family_table, kl_table, machine_description, plot_diagnose_task, plot_theory_task,
    pooled_table, win_table,
)

DEFAULTS = {"bandit": bandit.DEFAULTS, "hetero_bandit": hetero_bandit.DEFAULTS, "lm": lm.DEFAULTS,
            "hetero_lm": hetero_lm.DEFAULTS}


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
RUNNERS = {"bandit": bandit.run_bandit, "hetero_bandit": hetero_bandit.run_hetero_bandit, "lm": lm.run_lm,
           "hetero_lm": hetero_lm.run_lm}



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
