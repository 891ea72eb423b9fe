"""Deployments over several rewards: `fit_deployment` and `diagnose` exact on shared reference atoms (notes §9)."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest

from trl_infalign.cli import main
from trl_infalign.deployment import get_deployment
from trl_infalign.diagnose import diagnose, fit_deployment, load_reference_rewards, two_reward_example
from trl_infalign.transforms import TabulatedTransform, get_transform

# 2 prompts × 4 shared completions, scored by rewards a (with ties) and b; the second prompt has 3 completions
REFS = {"a": [[0.0, 1.0, 1.0, 3.0], [2.0, -1.0, 0.5]], "b": [[2.0, 0.3, -1.0, 0.0], [0.0, 4.0, 1.0]]}
SPEC = "mixture:0.3*bon:n=2@a+0.7*won:n=3@b"


def quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diagnose(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# brute force, with explicit loops and nothing from the implementation
def mid_rank(row, k):
    return (sum(v < row[k] for v in row) + 0.5 * sum(v == row[k] for v in row)) / len(row)


def brute_phi(name: str, method: dict, a: list, b: list, weights: dict) -> list:
    k = len(a)
    ca, cb = [mid_rank(a, i) for i in range(k)], [mid_rank(b, i) for i in range(k)]
    if name == "raw_sum":
        return [weights["a"] * a[i] + weights["b"] * b[i] for i in range(k)]
    if name == "calibrated_sum":
        total = [a[i] + b[i] for i in range(k)]
        return [mid_rank(total, i) for i in range(k)]
    if name == "normalized_sum":
        def z(row, i):
            mean = sum(row) / k
            std = math.sqrt(sum((v - mean) ** 2 for v in row) / k)
            return (row[i] - mean) / std
        return [weights["a"] * z(a, i) + weights["b"] * z(b, i) for i in range(k)]
    if name == "identity":
        return [weights["a"] * ca[i] + weights["b"] * cb[i] for i in range(k)]
    if name == "best_t":
        def family(fam, t, c):
            return math.exp(t * c) if fam == "bon" else -math.exp(-t * c)
        return [weights["a"] * family(method["families"]["a"], method["t"]["a"], ca[i])
                + weights["b"] * family(method["families"]["b"], method["t"]["b"], cb[i]) for i in range(k)]
    raise AssertionError(name)


def brute_win(p: list, values: list, n: int, best: bool) -> float:
    """P(X > Y) + ½ P(X = Y): X the pick (max for BoN, min for WoN) of n atoms drawn from p, Y of n uniform atoms."""
    k = len(values)
    win = 0.0
    for mine in itertools.product(range(k), repeat=n):
        p_mine = math.prod(p[i] for i in mine)
        x = (max if best else min)(values[i] for i in mine)
        for theirs in itertools.product(range(k), repeat=n):
            y = (max if best else min)(values[i] for i in theirs)
            win += p_mine * (1.0 / k) ** n * (1.0 if x > y else 0.5 if x == y else 0.0)
    return win


def brute_force(phis: list, beta: float) -> tuple[float, float, float, float]:
    """(mean KL, mean BoN-2 win on a, mean WoN-3 win on b, 0.3·bon + 0.7·won) of p ∝ exp(Φ/β) per prompt."""
    kls, bons, wons = [], [], []
    for x, phi in enumerate(phis):
        top = max(phi)
        w = [math.exp((v - top) / beta) for v in phi]
        p = [v / sum(w) for v in w]
        kls.append(sum(q * math.log(len(p) * q) for q in p if q > 0))
        bons.append(brute_win(p, REFS["a"][x], 2, True))
        wons.append(brute_win(p, REFS["b"][x], 3, False))
    bon, won = float(np.mean(bons)), float(np.mean(wons))
    return float(np.mean(kls)), bon, won, 0.3 * bon + 0.7 * won


def test_multi_reward_diagnose_against_brute_force():
    methods = ["raw_sum", "calibrated_sum", "normalized_sum", "identity", "best_t"]
    result = quiet(REFS, SPEC, kl=0.3, methods=methods)
    assert (result.num_prompts, result.K, result.K_min) == (2, 4, 3)
    assert result.reward_weights == {"a": 0.3, "b": 0.7}
    keys = [c["key"] for c in result.components]
    assert keys == ["bon@2_win_rate/a", "won@3_win_rate/b"]
    for name in methods:
        m = result.methods[name]
        phis = [brute_phi(name, m, REFS["a"][x], REFS["b"][x], {"a": 0.3, "b": 0.7}) for x in range(2)]
        kl, bon, won, total = brute_force(phis, m["beta"])
        assert m["kl"] == pytest.approx(0.3, abs=1e-9), name
        assert kl == pytest.approx(0.3, abs=1e-8), name
        assert m["win_rates"][keys[0]] == pytest.approx(bon, abs=1e-10), name
        assert m["win_rates"][keys[1]] == pytest.approx(won, abs=1e-10), name
        assert m["objective"] == pytest.approx(total, abs=1e-10), name
        assert m["win_rate"] == m["objective"]


@pytest.mark.parametrize("transform", ["identity", "bon:t=2@a+won:t=4@b", "auto", "optimal"])
def test_fit_deployment_kl_is_exact_on_the_atoms(transform):
    fit = fit_deployment(REFS, SPEC, kl=0.3, transform=transform)
    assert set(fit.transforms.transforms) == {"a", "b"} and fit.transforms.weights == {"a": 0.3, "b": 0.7}
    phis = [[0.3 * fit.transforms.transforms["a"].phi(np.array([mid_rank(REFS["a"][x], i)]))[0]
             + 0.7 * fit.transforms.transforms["b"].phi(np.array([mid_rank(REFS["b"][x], i)]))[0]
             for i in range(len(REFS["a"][x]))] for x in range(2)]
    kl, bon, won, total = brute_force(phis, fit.beta)  # β in the units of the unnormalised Φ
    assert kl == pytest.approx(0.3, abs=1e-6) and fit.kl == pytest.approx(0.3, abs=1e-9)
    assert fit.objective == pytest.approx(total, abs=1e-9)
    assert fit.win_rates == pytest.approx({"bon@2_win_rate/a": bon, "won@3_win_rate/b": won}, abs=1e-9)
    if transform == "auto":
        assert set(fit.t) == {"a", "b"} and all(t > 0 for t in fit.t.values())
        assert fit.transforms.spec == f"bon:t={fit.t['a']:g}@a+won:t={fit.t['b']:g}@b"
    if transform == "optimal":
        assert all(isinstance(t, TabulatedTransform) for t in fit.transforms.transforms.values())
        assert all(np.all(np.diff(t.values) >= 0) for t in fit.transforms.transforms.values())  # monotone


def test_fit_deployment_beta_and_kl_agree_and_plain_rows():
    by_kl = fit_deployment(REFS, SPEC, kl=0.3, transform="bon:t=2@a+won:t=4@b")
    by_beta = fit_deployment(REFS, SPEC, beta=by_kl.beta, transform="bon:t=2@a+won:t=4@b")
    assert by_beta.kl == pytest.approx(0.3, abs=1e-9) and by_beta.objective == pytest.approx(by_kl.objective)
    # the raw per-reward column rows give the same fit; one spec for every reward applies to each
    rows = [{"a": a, "b": b} for a, b in zip(REFS["a"], REFS["b"])]
    assert fit_deployment(rows, get_deployment(SPEC), kl=0.3, transform="identity").objective == pytest.approx(
        fit_deployment(REFS, SPEC, kl=0.3, transform="identity@a+identity@b").objective, abs=1e-12)
    # one reward: plain rows, the single-reward prediction
    single = fit_deployment(REFS["a"], "bon:n=2", kl=0.3, transform="bon:t=3")
    exact = quiet(REFS["a"], "bon:n=2", kl=0.3, methods=["bon:t=3"]).methods["bon:t=3"]
    assert single.objective == pytest.approx(exact["win_rate"], abs=1e-12)
    assert single.beta == pytest.approx(exact["beta"], rel=1e-9)  # both β of Φ = exp(3c) itself


def test_auto_beats_identity_and_optimal_beats_auto():
    refs = two_reward_example(6, 24, seed=3)
    spec = "mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"
    result = quiet(refs, spec, kl=0.5, methods=["identity", "best_t", "optimal", "per_prompt_optimum"])
    w = {name: m["objective"] for name, m in result.methods.items()}
    assert w["best_t"] > w["identity"]
    assert w["optimal"] >= w["best_t"] - 1e-3
    assert w["per_prompt_optimum"] >= w["optimal"] - 1e-6  # the per-prompt optimum bounds every reward shape
    # at a fixed β, auto and optimal maximise win rate − β·KL (β of the unnormalised Φ)
    auto = fit_deployment(REFS, SPEC, beta=0.05)
    optimal = fit_deployment(REFS, SPEC, beta=0.05, transform="optimal")
    for t in ("identity", "bon:t=2@a+won:t=4@b", "bon:t=1@a+won:t=8@b"):
        other = fit_deployment(REFS, SPEC, beta=0.05, transform=t)
        assert auto.objective - 0.05 * auto.kl >= other.objective - 0.05 * other.kl - 1e-9, t
    assert optimal.objective - 0.05 * optimal.kl >= auto.objective - 0.05 * auto.kl - 1e-9


def test_worked_example_ordering():
    """notes §9: 12 prompts × 64 atoms, scales spread 100×, anti-correlated rewards, 0.5·BoN-4 + 0.5·WoN-4, KL 0.5."""
    refs = two_reward_example()
    spec = "mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"
    result = quiet(refs, spec, kl=0.5, methods=["raw_sum", "calibrated_sum", "normalized_sum", "identity", "best_t"])
    w = {name: m["objective"] for name, m in result.methods.items()}
    assert w["best_t"] > w["normalized_sum"] > w["calibrated_sum"] > w["raw_sum"]
    assert w["identity"] > w["calibrated_sum"] and abs(w["identity"] - w["normalized_sum"]) < 0.02
    t = result.methods["best_t"]["t"]
    assert 0.05 < t["helpful"] < 1.0 and 3.0 < t["harmless"] < 15.0  # notes: t ≈ 0.3 (BoN), ≈ 7 (WoN)
    assert result.heterogeneity["rank_correlation"]["helpful~harmless"]["mean"] < -0.4


# ---------------------------------------------------------------------------------------------------------------------
# errors
def test_unknown_reward_name_names_the_known_ones():
    with pytest.raises(ValueError, match=r"names reward\(s\) \['helpfull'\].*\['a', 'b'\]"):
        fit_deployment(REFS, "mixture:0.5*bon:n=2@helpfull+0.5*won:n=2@b", kl=0.3)
    rows = [{"a": a, "b": b} for a, b in zip(REFS["a"], REFS["b"])]
    with pytest.raises(ValueError, match=r"names reward\(s\) \['c'\].*\['a', 'b'\]"):
        diagnose(rows, "bon:n=2@c", kl=0.3)


def test_missing_reward_at_a_row_names_the_reward_and_the_row():
    rows = [{"a": REFS["a"][0], "b": REFS["b"][0]}, {"a": REFS["a"][1]}]
    with pytest.raises(ValueError, match=r"reward 'b' at row 1"):
        fit_deployment(rows, SPEC, kl=0.3)
    with pytest.raises(ValueError, match=r"row 1: reward 'b' has 2 reference rewards but 'a' has 3"):
        fit_deployment({"a": REFS["a"], "b": [REFS["b"][0], [0.0, 1.0]]}, SPEC, kl=0.3)
    with pytest.raises(ValueError, match="exactly one of kl= .* or beta="):
        fit_deployment(REFS, SPEC)
    with pytest.raises(ValueError, match="say which reward to calibrate"):
        diagnose([{"a": [1.0, 2.0], "b": [2.0, 1.0]}], "bon", kl=0.3)  # several rewards, no '@'


# ---------------------------------------------------------------------------------------------------------------------
# loading, CLI, K-sensitivity
def write_jsonl(path, refs):
    with open(path, "w") as f:
        for i, (a, b) in enumerate(zip(refs["helpful"], refs["harmless"])):
            f.write(json.dumps({"prompt": f"p{i}", "ref_rewards": {"helpful": a, "harmless": b}}) + "\n")
    return str(path)


def test_cli_json_and_table_per_reward_column(tmp_path, capsys):
    from datasets import Dataset

    refs = two_reward_example(4, 12, seed=1)
    spec = "mixture:0.5*bon:n=2@helpful+0.5*won:n=2@harmless"
    path = write_jsonl(tmp_path / "d.jsonl", refs)
    saved = tmp_path / "saved"  # an Arrow struct of lists
    Dataset.from_dict({"ref_rewards": [{"helpful": a, "harmless": b}
                                       for a, b in zip(refs["helpful"], refs["harmless"])]}).save_to_disk(str(saved))
    rows = load_reference_rewards(str(saved))
    assert rows[0] == {"helpful": refs["helpful"][0], "harmless": refs["harmless"][0]}
    methods = ["raw_sum", "calibrated_sum", "normalized_sum", "identity", "best_t"]
    code = main(["diagnose", "--dataset", path, "--procedure", spec, "--kl", "0.3", "--k-repeats", "2",
                 "--methods", *methods, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert out["rewards"] == ["helpful", "harmless"] and out["K"] == 12
    keys = {"bon@2_win_rate/helpful", "won@2_win_rate/harmless"}
    for name in methods:
        m = out["methods"][name]
        assert isinstance(m["objective"], float) and isinstance(m["beta"], float) and m["kl"] == pytest.approx(0.3)
        assert set(m["win_rates"]) == keys
        assert m["objective"] == pytest.approx(0.5 * sum(m["win_rates"].values()), abs=1e-12)
    assert set(out["methods"]["best_t"]["t"]) == {"helpful", "harmless"}
    ks = out["k_sensitivity"]
    assert [e["k"] for e in ks] == [12, 6, 3]
    assert ks[0]["methods"] == {n: {"win_rate": m["objective"], "kl": m["kl"]} for n, m in out["methods"].items()}
    assert all(set(e["methods"]["identity"]) >= {"win_rate", "win_rate_std", "kl"} for e in ks[1:])
    assert main(["diagnose", "--dataset", str(saved), "--procedure", spec, "--kl", "0.3", "--no-k-sensitivity",
                 "--methods", *methods, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["methods"] == out["methods"] and "k_sensitivity" not in again
    assert main(["diagnose", "--dataset", path, "--procedure", spec, "--kl", "0.3", "--no-k-sensitivity",
                 "--methods", "raw_sum", "identity", "bon:t=2@helpful+won:t=3@harmless"]) == 0
    table = capsys.readouterr().out
    assert "| identity |" in table and "Best-of-2 on helpful (0.5)" in table and "Δ vs raw_sum" in table
    assert "| bon:t=2@helpful+won:t=3@harmless |" in table
    assert main(["diagnose", "--dataset", path, "--procedure", "bon:n=2@helpfull", "--kl", "0.3"]) == 2
    assert "['helpfull']" in capsys.readouterr().err
