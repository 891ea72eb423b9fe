"""Smoke test of benchmarks/alignment_quality.py with tiny settings (well under a minute on 2 cores): exact bandit
metrics, the run plan, a homogeneous and a heterogeneous bandit run (CTRL and raw reward, both under kl_budget), the
JSON row schema with `diagnose`'s predictions attached, the tables, the acceptance summary and the plots."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

ROW_KEYS = {"task", "method", "transform", "procedure", "target_kl", "kl_control", "start_beta", "final_beta", "kl",
            "kl_rel_error", "standard_win", "bon_win", "won_win", "theory_bon_win", "theory_won_win",
            "diagnose_method", "diagnose_at_budget", "diagnose_at_measured_kl", "train_seconds", "metrics",
            "tv_to_optimum", "optimum_at_final_beta"}
PREDICTION_KEYS = {"beta", "kl", "standard_win", "bon_win", "won_win"}


@pytest.fixture(scope="module")
def aq():
    spec = importlib.util.spec_from_file_location("alignment_quality", ROOT / "benchmarks" / "alignment_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["alignment_quality"] = module
    spec.loader.exec_module(module)
    return module


def test_exact_metrics_closed_forms(aq):
    pi_ref = torch.full((1000,), 1e-3, dtype=torch.float64)
    rewards = torch.arange(1000, dtype=torch.float64)
    same = aq.exact_metrics(pi_ref, pi_ref, rewards)
    assert same["kl"] == pytest.approx(0.0, abs=1e-12)
    for key in ("standard_win", "bon_win", "won_win"):
        assert same[key] == pytest.approx(0.5, abs=1e-12)
    # the exact Best-of-4 policy: KL log 4 − 3/4, BoN-4 win 4/5 (up to the 1/1000 discretisation)
    cdf = (rewards + 1) / 1000
    bon = cdf**4 - (cdf - 1e-3) ** 4
    m = aq.exact_metrics(bon, pi_ref, rewards)
    assert m["kl"] == pytest.approx(math.log(4) - 0.75, abs=5e-3)
    assert m["standard_win"] == pytest.approx(0.8, abs=2e-3)
    assert m["bon_win"] == pytest.approx(0.8, abs=2e-3)
    two = aq.mean_exact_metrics(torch.stack([pi_ref, bon]), torch.stack([pi_ref, pi_ref]), torch.stack([rewards] * 2))
    assert two["bon_win"] == pytest.approx((0.5 + m["bon_win"]) / 2)


def test_plan_uses_diagnose_betas_for_raw_transforms(aq):
    predictions = {0.5: {"raw_reward": {"beta": 1.7}, "lsc": {"beta": 0.3}, "par": {"beta": 0.2},
                         "vbon": {"beta": 0.4, "transform": "log:eps=0.0005"}}}
    runs = aq.plan_runs([0.5], tuple(aq.METHODS), predictions)
    by = {r.method: r for r in runs}
    assert set(by) == set(aq.METHODS) and all(r.target_kl == 0.5 for r in runs)
    assert by["raw_reward"].transform == "raw" and by["raw_reward"].start_beta == 1.7
    assert by["vbon"].transform == "log:eps=0.0005" and by["vbon"].start_beta is None
    assert by["ctrl_bon"].transform == "auto" and by["ctrl_won"].procedure == "won"
    theory_bon, theory_won = aq.theory_at_kl("bon:t=12.6", 0.5)
    assert 0.85 < theory_bon < 0.9 and theory_won < 0.7
    assert aq.theory_at_kl("raw", 0.5) == (None, None)


def test_hetero_problem_spreads_reward_scales(aq):
    target, scales, offsets, rewards = aq.hetero_bandit_problem(16, 20, seed=0)
    assert target.shape == (16, 20) and torch.allclose(target.sum(1), torch.ones(16))
    assert scales.max() / scales.min() > 10 and rewards.shape == (16, 20)


def _check_rows(rows, task):
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["task"] == task and r["kl_control"] == "adaptive" and r["kl"] >= 0
        assert 0 <= r["bon_win"] <= 1 and r["final_beta"] > 0
        assert set(r["diagnose_at_budget"]) == PREDICTION_KEYS
        assert r["diagnose_at_budget"]["kl"] == pytest.approx(r["target_kl"], rel=1e-6)
    json.dumps(rows)


def test_bandit_and_hetero_bandit_smoke(aq, tmp_path):
    torch.set_num_threads(1)
    result = aq.run_task("bandit", tmp_path, tmp_path, dict(target_kls=(0.5,), methods=("raw_reward", "identity"),
                         num_actions=16, steps=3, num_reference=64), device="cpu", seed=0, log=lambda *a: None,
                         plot=False)
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["raw_reward", "identity"]
    _check_rows(rows, "bandit")
    assert rows[1]["theory_bon_win"] is not None and rows[0]["theory_bon_win"] is None
    assert rows[0]["start_beta"] == pytest.approx(result["diagnose"][0.5]["bon"]["methods"]["raw_reward"]["beta"])
    curves = {"identity": {"kl": [0.1, 0.5], "bon": [0.6, 0.8], "won": [0.6, 0.85]}}
    aq.plot_theory_task("bandit", rows, tmp_path / "bandit.png", curves=curves)
    assert (tmp_path / "bandit.png").stat().st_size > 1000

    hetero = aq.run_task("hetero_bandit", tmp_path, tmp_path, dict(
        target_kls=(0.5,), methods=("raw_reward", "ctrl_bon"), num_prompts=4, num_actions=12, num_reference=32,
        steps=2, lr=1e-2, num_generations=4, step_factor={"ctrl_bon": 2}), device="cpu", seed=0,
        log=lambda *a: None, plot=False)
    hrows = hetero["rows"]
    _check_rows(hrows, "hetero_bandit")
    assert [r["steps"] for r in hrows] == [2, 4]  # step_factor: a per-method multiple of the task's steps
    assert [t[0] for t in hrows[1]["kl_trace"]] == [4] and hrows[1]["kl_trace"][-1][2] == pytest.approx(
        hrows[1]["final_beta"])
    assert aq.DEFAULTS["hetero_bandit"]["quick"]["step_factor"] == {"ctrl_won": 3}
    assert hrows[1]["transform"].startswith("bon:t=") and len(hrows[0]["kl_per_prompt"]) == 4
    assert hetero["diagnose"][0.5]["bon"]["num_prompts"] == 4
    assert max(hetero["setup"]["scales"]) / min(hetero["setup"]["scales"]) > 5
    all_rows = rows + hrows
    assert "| hetero_bandit | ctrl_bon |" in aq.kl_table(all_rows)
    assert "| bandit | identity |" in aq.win_table(all_rows)
    summary = aq.acceptance(all_rows)
    entry = summary["hetero_bandit"]["0.5"]
    assert "ctrl_bon_minus_raw_bon4" in entry and "max_abs_deviation_diagnose_at_budget" in entry
    assert set(summary["kl_within_tolerance"]) == {f"{r['task']}/{r['method']}@0.5" for r in all_rows}
    fake_curves = {"bon": {"raw_reward": [[0.2, 0.6], [0.5, 0.7]], "best_t": [[0.2, 0.7], [0.5, 0.87]]},
                   "won": {"raw_reward": [[0.2, 0.6], [0.5, 0.7]]}}
    aq.plot_diagnose_task("hetero_bandit", hrows, fake_curves, tmp_path / "hetero.png")
    assert (tmp_path / "hetero.png").stat().st_size > 1000


def test_hetero_lm_families_and_distortion(aq):
    qs = aq._quickstart()
    prompts = [f"{s} {v}" for s in qs.SUBJECTS for v in qs.VERBS]
    families = [aq.lm_family(p) for p in prompts]
    assert sorted(set(families)) == list(range(len(aq.LM_FAMILIES)))
    assert all(families.count(f) == len(prompts) // len(aq.LM_FAMILIES) for f in set(families))  # 8 prompts each
    assert all(aq.lm_family(f"{s} {v}") == j for s in qs.SUBJECTS for j, v in enumerate(qs.VERBS))
    assert aq.lm_family("the plot was", "subject", 3) == 2
    scales = [s for s, _ in aq.LM_FAMILIES]
    assert max(scales) / min(scales) >= 10
    reward = aq.make_distorted_vader()
    completions = [" great", " bad", " okay"]
    for p in ("the movie was", "the movie seemed"):
        raw = qs.vader_sentiment([p] * 3, completions)
        scale, offset = aq.LM_FAMILIES[aq.lm_family(p)]
        assert reward([p] * 3, completions) == pytest.approx([scale * r + offset for r in raw])


def test_pooled_lm_acceptance_pairs_seeds_and_prompts(aq):
    def row(method, seed, wins):
        return {"task": "hetero_lm", "method": method, "seed": seed, "target_kl": 0.5, "kl": 0.5, "kl_rel_error": 0.0,
                "bon_win": sum(wins) / len(wins), "standard_win": 0.6, "won_win": 0.6, "kl_per_prompt": [0.5] * 4,
                "per_prompt": {"bon_win": wins, "standard_win": [0.6] * 4, "won_win": [0.6] * 4}}

    rows = []
    for seed in (0, 1):
        base = [0.60, 0.70, 0.80, 0.65]
        rows += [row("raw_reward", seed, base), row("identity", seed, [b + 0.02 for b in base]),
                 row("ctrl_bon", seed, [b + 0.05 for b in base])]
    entry = aq.acceptance(rows)["hetero_lm"]["0.5"]
    assert entry["seeds"] == [0, 1] and entry["ordering_point_estimates"] and entry["ordering_per_seed"] == [True] * 2
    # the marginal CIs overlap (prompts differ a lot), the paired differences (constant per prompt) do not
    assert entry["identity_vs_raw_reward_cis_overlap"] and entry["ordering_shown_paired_95"]
    diff = entry["paired_differences"]["identity_minus_raw_reward"]
    assert diff["bon_win"] == pytest.approx(0.02) and diff["bon_win_ci"] == pytest.approx([0.02, 0.02])
    assert entry["ctrl_bon_minus_raw_bon4"] == pytest.approx(0.05)
    assert "| hetero_lm | 0.5 | identity_minus_raw_reward |" in aq.pooled_table({"hetero_lm": {"0.5": entry}})
