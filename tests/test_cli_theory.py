"""`trl-infalign theory` command line (trl_infalign/commands/theory.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trl_infalign import theory
from trl_infalign.cli import main


def run_json(capsys, *argv):
    code = main(["theory", *argv, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out  # exactly one JSON object
    return json.loads(lines[0])


def test_transform_at_kl_matches_python_api(capsys):
    result = run_json(capsys, "--transform", "bon:t=10", "--procedure", "bon", "--n", "4", "--kl", "0.5")
    for key in ("beta", "kl", "win_rate", "standard_win_rate", "transform", "procedure", "n", "bon_win_rate",
                "won_win_rate"):
        assert key in result
    beta = theory.beta_for_kl("bon:t=10", 0.5)
    pol = theory.policy("bon:t=10", beta)
    assert result["beta"] == pytest.approx(beta, rel=1e-9)
    assert result["kl"] == pytest.approx(0.5, abs=1e-8)
    assert result["win_rate"] == pytest.approx(pol.win_rate("bon", 4), abs=1e-12)
    assert result["won_win_rate"] == pytest.approx(pol.win_rate("won", 4), abs=1e-12)
    assert result["standard_win_rate"] == pytest.approx(pol.standard_win_rate(), abs=1e-12)
    assert (result["procedure"], result["n"]) == ("bon", 4)


def test_transform_at_beta(capsys):
    result = run_json(capsys, "--transform", "won:t=5", "--procedure", "won", "--n", "8", "--beta", "0.2")
    pol = theory.policy("won:t=5", 0.2)
    assert result["beta"] == 0.2
    assert result["kl"] == pytest.approx(pol.kl(), abs=1e-12)
    assert result["win_rate"] == pytest.approx(pol.win_rate("won", 8), abs=1e-12)


def test_optimal_transform(capsys):
    result = run_json(capsys, "--transform", "optimal", "--procedure", "bon", "--n", "4", "--kl", "0.5")
    opt = theory.optimal_policy("bon", 4, kl=0.5)
    assert result["transform"].startswith("optimal:procedure=bon,n=4,beta=")
    assert result["beta"] == pytest.approx(opt.beta)
    assert result["win_rate"] == pytest.approx(opt.win_rate("bon", 4), abs=1e-12)
    exp = run_json(capsys, "--transform", "bon:t=10", "--procedure", "bon", "--n", "4", "--kl", "0.5")
    assert result["win_rate"] >= exp["win_rate"]


def test_best_t(capsys):
    result = run_json(capsys, "--best-t", "--procedure", "bon", "--n", "4", "--kl", "0.5")
    best = theory.best_t("bon", 4, 0.5)
    for key in ("t", "beta", "kl", "win_rate", "standard_win_rate", "transform"):
        assert key in result
    assert result["t"] == pytest.approx(best.t)
    assert result["transform"] == f"bon:t={best.t:.6g}"
    assert result["win_rate"] == pytest.approx(best.win_rate, abs=1e-9)
    assert result["kl"] == pytest.approx(0.5, abs=1e-6)


def test_standard_procedure_uses_one_sample(capsys):
    result = run_json(capsys, "--transform", "identity", "--procedure", "standard", "--kl", "1.0")
    assert result["n"] == 1
    assert result["win_rate"] == pytest.approx(result["standard_win_rate"])


def test_table_output(capsys):
    assert main(["theory", "--transform", "identity", "--beta", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "win_rate" in out and "standard_win_rate" in out


def test_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "f.png"
    result = run_json(capsys, "--transform", "bon:t=10", "--procedure", "bon", "--n", "2", "--kl", "0.5",
                      "--plot", str(path))
    assert result["plot"] == str(path)
    assert path.stat().st_size > 1000


@pytest.mark.parametrize(
    "argv",
    [
        ["--transform", "identity"],  # neither --kl nor --beta
        ["--transform", "identity", "--kl", "0.5", "--beta", "0.1"],  # both
        ["--kl", "0.5"],  # no transform
        ["--best-t", "--procedure", "bon"],  # best-t without budget
        ["--transform", "identity", "--kl", "-1"],
        ["--transform", "identity", "--kl", "0.5", "--procedure", "median"],
    ],
)
def test_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["theory", *argv])
    assert excinfo.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bad_spec_exit_code_and_message(capsys):
    code = main(["theory", "--transform", "nosuch:t=1", "--kl", "0.5", "--json"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "nosuch" in captured.err and "Traceback" not in captured.err


def test_bad_spec_subprocess_no_traceback():
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "trl_infalign.cli", "theory", "--transform", "bon:t=oops", "--kl", "0.5"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip()


def test_best_t_reports_bounds_and_floor(capsys):
    result = run_json(capsys, "--best-t", "--procedure", "won", "--n", "4", "--kl", "0.75")
    with pytest.warns(UserWarning, match="floor"):
        best = theory.best_t("won", 4, 0.75)
    for key in ("t", "beta", "kl", "win_rate", "standard_win_rate", "transform", "on_bound", "bound",
                "normalised_beta", "t_range", "min_beta", "unconstrained", "family"):
        assert key in result
    assert result["on_bound"] is True and result["bound"] == "min_beta" and result["t"] == pytest.approx(best.t)
    assert result["normalised_beta"] == pytest.approx(0.01, rel=1e-5)
    free = run_json(capsys, "--best-t", "--procedure", "won", "--n", "4", "--kl", "0.75", "--min-beta", "0")
    assert free["on_bound"] is False and free["bound"] is None and free["win_rate"] > result["win_rate"]


def test_best_t_large_n_on_cap_warns_on_stderr(capsys):
    code = main(["theory", "--best-t", "--procedure", "bon", "--n", "10000", "--kl", "0.5", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)
    assert result["t"] == 700.0 and result["on_bound"] is True and result["bound"] == "t_max"
    assert result["t_range"] == [0.01, 700.0]
    assert "warning" in captured.err and "Best-of-10000" in captured.err and "KL 0.5" in captured.err


def test_best_t_at_beta_reports_floor(capsys):
    result = run_json(capsys, "--best-t", "--procedure", "bon", "--n", "4", "--beta", "0.001")
    assert result["bound"] == "min_beta" and result["beta"] == 0.001
    assert result["unconstrained"]["t"] > result["t"]


@pytest.mark.parametrize("argv", [["--best-t", "--kl", "0.5", "--min-beta", "-1"],
                                  ["--transform", "identity", "--kl", "0.5", "--min-beta", "0.1"]])
def test_min_beta_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["theory", *argv])
    assert excinfo.value.code == 2
    assert "min-beta" in capsys.readouterr().err


def test_t_max_out_of_range_is_an_error(capsys):
    code = main(["theory", "--best-t", "--kl", "0.5", "--t-max", "1000", "--json"])
    assert code == 2
    assert "t_max" in capsys.readouterr().err
