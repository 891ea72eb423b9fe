"""Smoke test of benchmarks/alignment_quality.py with tiny settings (a few seconds): exact bandit metrics, the sweep plan,
one bandit run per kind of trainer (CTRL, raw RLOO), the JSON row keys, the table and the plot."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


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


def test_plan_and_theory(aq):
    runs = aq.plan_runs([0.5], [1.0])
    assert [r.method for r in runs] == ["identity", "ctrl_bon", "ctrl_won", "optimal", "raw_reward"]
    bon = runs[1]
    assert bon.transform.startswith("bon:t=") and bon.target_kl == 0.5
    theory_bon, theory_won = aq.theory_at_kl(bon.transform, 0.5)
    assert 0.85 < theory_bon < 0.9 and theory_won < 0.7
    assert aq.theory_at_kl(None, 0.5) == (None, None)


def test_bandit_run_rows_table_plot(aq, tmp_path):
    torch.set_num_threads(1)
    rows = aq.run_bandit(tmp_path, target_kls=(0.5,), betas=(1.0,), num_actions=16, steps=3, num_reference=64,
                         methods=("identity", "raw_reward"), log=lambda *a: None)
    assert [r["method"] for r in rows] == ["identity", "raw_reward"]
    for r in rows:
        for key in ("method", "beta", "kl", "standard_win", "bon_win", "won_win", "theory_bon_win", "theory_won_win"):
            assert key in r
        assert r["kl"] >= 0 and 0 <= r["bon_win"] <= 1
    assert rows[0]["theory_bon_win"] is not None and rows[1]["theory_bon_win"] is None
    assert "| bandit | identity |" in aq.markdown_table(rows)
    assert "bandit" in aq.matched_kl_summary(rows)
    curves = {"identity": {"kl": [0.1, 0.5], "bon": [0.6, 0.8], "won": [0.6, 0.85]}}
    aq.plot_task("bandit", rows, tmp_path / "plot.png", curves=curves)
    assert (tmp_path / "plot.png").stat().st_size > 1000
