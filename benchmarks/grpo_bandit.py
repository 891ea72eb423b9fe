"""CTRL on GRPO, on the one-token bandit of the tests (issue #13): optimum exactness over seeds, and `kl_budget` with
adaptive KL control side by side with CTRL on RLOO.

    python benchmarks/grpo_bandit.py                       # both parts, seeds 0-4 (~35 min on 2 shared CPU cores)
    python benchmarks/grpo_bandit.py --part exactness --seeds 0 1
    python benchmarks/grpo_bandit.py --part kl_budget --budgets 0.5 --seeds 0

The bandit is `tests/bandit_utils.make_bandit`: 12 one-token actions with rewards 0..11 (non-action tokens −1), a tiny
Llama fitted so that π_ref is known exactly, 64 reference rewards drawn from π_ref. Metrics are **exact**, from the
trained policy's action distribution (no sampling): TV, KL(π‖π_ref) per completion (nats, the unit of `kl_budget`),
and BoN-4 win rate against π_ref's BoN-4 (ties ½). The training seed varies; the bandit itself is fixed.

Part `exactness` runs the body of `tests/test_grpo.py::test_bandit_reaches_the_ctrl_optimum_with_g4` (G = 4, the
test's settings `GRPO_BANDIT_SETTINGS`) per seed: TV of the trained policy to the CTRL optimum π_ref·exp(Φ(c)/β)/Z and
to the uncompensated tilt at β·G/(G−1). Pass: TV < 0.02 and closer to the CTRL optimum by > 0.02, as in the test.

Part `kl_budget` trains `CTRLGRPOTrainer` and `CTRLTrainer` (RLOO) with the same settings (G = 4, same batch, steps
and learning rate) and `CTRLGRPOConfig/CTRLConfig(kl_budget=B, transform="auto", inference_procedure="bon",
inference_n=4)` — adaptive KL control. Reported next to the measured KL and BoN-4 win rate: the predictions
`trl_infalign.diagnose` makes from the 64 reference rewards at B, the continuum calibrated-space theory at B, and the
exact optimum of this bandit with the KL of B (β bisected on the true π_ref and reward table, for the run's resolved
transform). Pass: KL within ±10 % of B and BoN-4 within 0.02 of `diagnose`'s prediction.

Prints tables and writes benchmarks/results/grpo_bandit.json ({"meta", "exactness": rows, "kl_budget": rows,
"summary"}). Parts not rerun are kept from the existing JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

G = 4
N = 4
CASES = (("bon:t=3", 4.0), ("won:t=3", 0.25), ("identity", 0.2))  # those of the test
KL_TOLERANCE = 0.10  # relative
WIN_TOLERANCE = 0.02  # absolute, BoN-4 against diagnose


def tv(p, q) -> float:
    return 0.5 * float((p - q).abs().sum())


def quiet_train(trainer) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()


def run_exactness(seed: int, transform: str, beta: float, workdir: Path) -> dict:
    from bandit_utils import GRPO_BANDIT_SETTINGS, grpo_bandit_config, make_bandit, optimal_policy

    from trl_infalign.ctrl_grpo_trainer import CTRLGRPOTrainer
    from trl_infalign.tiny import bandit_next_token_probs

    path, tokenizer, pi_ref, rewards, ref_rewards, dataset, reward_func = make_bandit(workdir)
    target = optimal_policy(pi_ref, rewards, ref_rewards, transform, beta)
    uncompensated = optimal_policy(pi_ref, rewards, ref_rewards, transform, beta * G / (G - 1))
    args = grpo_bandit_config(workdir / "out", transform, beta, num_generations=G, seed=seed, logging_steps=10_000)
    start = time.perf_counter()
    trainer = CTRLGRPOTrainer(model=path, reward_funcs=reward_func, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    quiet_train(trainer)
    trained = bandit_next_token_probs(trainer.model, tokenizer)
    row = {"seed": seed, "transform": transform, "beta": beta, "tv_to_ctrl_optimum": tv(trained, target),
           "tv_to_uncompensated": tv(trained, uncompensated), "tv_ctrl_optimum_to_uncompensated": tv(target, uncompensated),
           "train_seconds": time.perf_counter() - start, "settings": dict(GRPO_BANDIT_SETTINGS)}
    row["passes"] = bool(row["tv_to_ctrl_optimum"] < 0.02
                         and row["tv_to_uncompensated"] > row["tv_to_ctrl_optimum"] + 0.02)
    return row


def exact_optimum_at_kl(pi_ref, rewards, ref_rewards, transform: str, kl: float, beta_guess: float):
    """β (bisection in log β, within e^±12 of `beta_guess`: unnormalised exp(t·c) transforms put β near e^t) whose
    exact optimum π_ref·exp(Φ(c)/β)/Z on this bandit has KL(π‖π_ref) = kl, and that optimum's exact metrics."""
    from alignment_quality import exact_metrics

    from bandit_utils import optimal_policy

    def kl_at(log_beta):
        return exact_metrics(optimal_policy(pi_ref, rewards, ref_rewards, transform, math.exp(log_beta)), pi_ref,
                             rewards)["kl"]

    low, high = math.log(beta_guess) - 12, math.log(beta_guess) + 12
    if not kl_at(high) < kl < kl_at(low):
        raise ValueError(f"KL {kl} is not bracketed by beta in {beta_guess:g}·e^±12 for {transform}")
    for _ in range(80):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if kl_at(mid) > kl else (low, mid)
    beta = math.exp(0.5 * (low + high))
    return beta, exact_metrics(optimal_policy(pi_ref, rewards, ref_rewards, transform, beta), pi_ref, rewards)


def predictions(row: dict, pi_ref, rewards, ref_rewards) -> dict:
    """What the theory says of a kl_budget row (no training): diagnose from the reference rewards, the continuum
    calibrated-space theory, and this bandit's exact optimum with KL = B."""
    from alignment_quality import predict, theory_at_kl

    transform, budget = row["transform"], row["kl_budget"]
    theory_bon, _ = theory_at_kl(transform, budget)
    diagnosed = predict([ref_rewards], transform, budget) or {}
    exact_beta, exact = exact_optimum_at_kl(pi_ref, rewards, ref_rewards, transform, budget, row["start_beta"])
    out = {"diagnose_bon_win": diagnosed.get("bon_win"), "diagnose_beta": diagnosed.get("beta"),
           "theory_bon_win": theory_bon, "exact_optimum_beta": exact_beta, "exact_optimum_bon_win": exact["bon_win"]}
    out["passes"] = bool(abs(row["kl_rel_error"]) <= KL_TOLERANCE and out["diagnose_bon_win"] is not None
                         and abs(row["bon_win"] - out["diagnose_bon_win"]) <= WIN_TOLERANCE)
    out["passes_vs_exact_optimum"] = bool(abs(row["kl_rel_error"]) <= KL_TOLERANCE
                                          and abs(row["bon_win"] - out["exact_optimum_bon_win"]) <= WIN_TOLERANCE)
    return out


def run_kl_budget(trainer_name: str, seed: int, budget: float, settings: dict, workdir: Path,
                  num_reference: int = 64) -> dict:
    from alignment_quality import exact_metrics

    from bandit_utils import make_bandit, optimal_policy

    from trl_infalign import CTRLConfig, CTRLTrainer
    from trl_infalign.ctrl_grpo_config import CTRLGRPOConfig
    from trl_infalign.ctrl_grpo_trainer import CTRLGRPOTrainer
    from trl_infalign.tiny import bandit_next_token_probs

    config_class, trainer_class = {"grpo": (CTRLGRPOConfig, CTRLGRPOTrainer), "rloo": (CTRLConfig, CTRLTrainer)}[trainer_name]
    path, tokenizer, pi_ref, rewards, ref_rewards, dataset, reward_func = make_bandit(workdir, num_reference=num_reference)
    args = config_class(
        output_dir=str(workdir / "out"), transform="auto", inference_procedure="bon", inference_n=N, kl_budget=budget,
        num_generations=G, max_completion_length=1, temperature=1.0, top_k=0, top_p=1.0,
        mask_truncated_completions=False, logging_steps=10_000, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, seed=seed, min_reference_samples=8, disable_dropout=True, disable_tqdm=True, **settings)
    assert args.kl_control == "adaptive"
    start = time.perf_counter()
    trainer = trainer_class(model=path, reward_funcs=reward_func, args=args, train_dataset=dataset,
                            processing_class=tokenizer)
    quiet_train(trainer)
    trained = bandit_next_token_probs(trainer.model, tokenizer)
    measured = exact_metrics(trained, pi_ref, rewards)
    transform, final_beta = args.resolved_transform, float(trainer.current_beta)
    at_final_beta = optimal_policy(pi_ref, rewards, ref_rewards, transform, final_beta)
    row = {
        "trainer": trainer_name, "seed": seed, "kl_budget": budget, "transform": transform,
        "num_reference": num_reference, "start_beta": float(args.beta), "final_beta": final_beta,
        "kl": measured["kl"], "kl_rel_error": measured["kl"] / budget - 1.0,
        "bon_win": measured["bon_win"], "standard_win": measured["standard_win"],
        "tv_to_optimum_at_final_beta": tv(trained, at_final_beta),
        "train_seconds": time.perf_counter() - start, "settings": settings,
    }
    row.update(predictions(row, pi_ref, rewards, ref_rewards))
    return row


def exactness_line(r: dict) -> str:
    return (f"| `{r['transform']}`, {r['beta']:g} | {r['seed']} | {r['tv_to_ctrl_optimum']:.4f} | "
            f"{r['tv_to_uncompensated']:.4f} | {'yes' if r['passes'] else 'NO'} |")


def kl_line(r: dict) -> str:
    f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"| {'GRPO' if r['trainer'] == 'grpo' else 'RLOO'} | {r['num_reference']} | {r['kl_budget']:g} | {r['seed']} "
            f"| `{r['transform']}` "
            f"| {r['kl']:.3f} ({100 * r['kl_rel_error']:+.1f}%) | {r['bon_win']:.3f} | {f(r['diagnose_bon_win'])} "
            f"| {f(r['exact_optimum_bon_win'])} | {f(r['theory_bon_win'])} | {r['start_beta']:.3g}→{r['final_beta']:.3g} "
            f"| {r['tv_to_optimum_at_final_beta']:.3f} | {'yes' if r['passes'] else 'NO'} "
            f"| {'yes' if r['passes_vs_exact_optimum'] else 'NO'} |")


EXACTNESS_HEADER = ("| transform, β | seed | TV to CTRL optimum | TV to uncompensated tilt | pass |\n"
                    "|---|---|---|---|---|")
KL_HEADER = ("| trainer | K | budget B | seed | resolved transform | KL(π‖π_ref) exact (error) | BoN-4 win | diagnose "
             "| exact optimum at B | continuum theory | β start→final | TV to tilt at final β | pass vs diagnose "
             "| pass vs exact optimum |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def summarise(exactness: list[dict], kl_rows: list[dict]) -> dict:
    out = {}
    if exactness:
        out["exactness"] = {
            f"{t}@{b:g}": {"seeds": [r["seed"] for r in exactness if r["transform"] == t],
                           "max_tv": max(r["tv_to_ctrl_optimum"] for r in exactness if r["transform"] == t),
                           "passes": sum(r["passes"] for r in exactness if r["transform"] == t)}
            for t, b in sorted({(r["transform"], r["beta"]) for r in exactness})}
        out["exactness_all_pass"] = all(r["passes"] for r in exactness)
    if kl_rows:
        groups = {}
        for r in kl_rows:
            groups.setdefault(f"{r['trainer']}@{r['kl_budget']:g}/K={r['num_reference']}", []).append(r)
        out["kl_budget"] = {
            k: {"seeds": len(v), "mean_kl": statistics.mean(r["kl"] for r in v),
                "worst_abs_kl_rel_error": max(abs(r["kl_rel_error"]) for r in v),
                "mean_bon_win": statistics.mean(r["bon_win"] for r in v),
                "diagnose_bon_win": v[0]["diagnose_bon_win"], "exact_optimum_bon_win": v[0]["exact_optimum_bon_win"],
                "worst_abs_bon_win_error_vs_diagnose": max(abs(r["bon_win"] - r["diagnose_bon_win"]) for r in v),
                "worst_abs_bon_win_error_vs_exact_optimum": max(abs(r["bon_win"] - r["exact_optimum_bon_win"])
                                                                for r in v),
                "passes": sum(r["passes"] for r in v),
                "passes_vs_exact_optimum": sum(r["passes_vs_exact_optimum"] for r in v)}
            for k, v in groups.items()}
        out["kl_budget_all_pass"] = all(r["passes"] for r in kl_rows)
        out["kl_budget_all_pass_vs_exact_optimum"] = all(r["passes_vs_exact_optimum"] for r in kl_rows)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["exactness", "kl_budget", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--trainers", nargs="+", choices=["grpo", "rloo"], default=["grpo", "rloo"])
    parser.add_argument("--kl-steps", type=int, default=None, help="Steps of the kl_budget runs (default: the test's).")
    parser.add_argument("--num-reference", type=int, default=64,
                        help="K reference rewards of the kl_budget bandit (64: the test's; more resolve pi_ref better).")
    parser.add_argument("--reanalyse", action="store_true",
                        help="Recompute the predictions of the kl_budget rows in the JSON (no training).")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (tiny models: 1 is fastest).")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    import torch

    from bandit_utils import GRPO_BANDIT_SETTINGS

    torch.set_num_threads(args.threads)
    out_path = Path(args.output) / "grpo_bandit.json"
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    exactness, kl_rows = previous.get("exactness", []), previous.get("kl_budget", [])
    started = time.perf_counter()
    kl_settings = {k: GRPO_BANDIT_SETTINGS[k] for k in ("learning_rate", "per_device_train_batch_size", "max_steps")}
    if args.kl_steps:
        kl_settings["max_steps"] = args.kl_steps

    if args.part in ("exactness", "both"):
        exactness = []
        print(EXACTNESS_HEADER)
        for seed in args.seeds:
            for transform, beta in CASES:
                with tempfile.TemporaryDirectory() as tmp:
                    exactness.append(run_exactness(seed, transform, beta, Path(tmp)))
                print(exactness_line(exactness[-1]), flush=True)
    if args.reanalyse:
        from bandit_utils import make_bandit

        bandits = {}
        for row in kl_rows:
            k = row.get("num_reference", 64)
            if k not in bandits:
                bandits[k] = make_bandit(Path(tempfile.mkdtemp()), num_reference=k)
            _, _, pi_ref, rewards, ref_rewards, *_ = bandits[k]
            row.setdefault("num_reference", k)
            row.update(predictions(row, pi_ref, rewards, ref_rewards))
    elif args.part in ("kl_budget", "both"):
        kl_rows = [r for r in kl_rows if r.get("num_reference", 64) != args.num_reference]  # other K: kept
        print(KL_HEADER)
        for budget in args.budgets:
            for seed in args.seeds:
                for name in args.trainers:
                    with tempfile.TemporaryDirectory() as tmp:
                        kl_rows.append(run_kl_budget(name, seed, budget, kl_settings, Path(tmp), args.num_reference))
                    print(kl_line(kl_rows[-1]), flush=True)

    summary = summarise(exactness, kl_rows)
    print()
    if exactness:
        print(EXACTNESS_HEADER)
        for r in sorted(exactness, key=lambda r: (CASES.index((r["transform"], r["beta"])), r["seed"])):
            print(exactness_line(r))
        for key, s in summary["exactness"].items():
            print(f"{key}: {s['passes']}/{len(s['seeds'])} seeds pass, max TV {s['max_tv']:.4f}")
    if kl_rows:
        print()
        print(KL_HEADER)
        for r in sorted(kl_rows, key=lambda r: (r["num_reference"], r["kl_budget"], r["trainer"], r["seed"])):
            print(kl_line(r))
        for key, s in summary["kl_budget"].items():
            print(f"{key}: {s['passes']}/{s['seeds']} pass vs diagnose, {s['passes_vs_exact_optimum']}/{s['seeds']} vs "
                  f"the exact optimum; mean KL {s['mean_kl']:.3f}, worst |KL error| "
                  f"{100 * s['worst_abs_kl_rel_error']:.1f}%; mean BoN-4 {s['mean_bon_win']:.3f} vs diagnose "
                  f"{s['diagnose_bon_win']:.3f} (worst |Δ| {s['worst_abs_bon_win_error_vs_diagnose']:.3f}), exact "
                  f"optimum {s['exact_optimum_bon_win']:.3f} (worst |Δ| {s['worst_abs_bon_win_error_vs_exact_optimum']:.3f})")
    meta = {
        "command": " ".join(["benchmarks/grpo_bandit.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": previous.get("meta", {}).get("machine") if args.part != "both" else None,
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "wall_seconds_this_invocation": time.perf_counter() - started,
        "exactness_settings": dict(GRPO_BANDIT_SETTINGS), "kl_budget_settings": kl_settings, "G": G, "N": N,
        "kl_tolerance": KL_TOLERANCE, "win_tolerance": WIN_TOLERANCE,
    }
    meta["machine"] = meta["machine"] or f"{platform.machine()} VM, {os.cpu_count()} shared CPU cores"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"meta": meta, "exactness": exactness, "kl_budget": kl_rows, "summary": summary},
                                   indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
