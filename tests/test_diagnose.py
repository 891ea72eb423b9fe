"""`trl_infalign.diagnose` and `trl-infalign diagnose`: exact discrete predictions from reference rewards."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import norm

from trl_infalign import theory
from trl_infalign.calibration import calibrate
from trl_infalign.cli import main
from trl_infalign.diagnose import METHODS, DiagnosisResult, _Atoms, diagnose
from trl_infalign.transforms import get_transform

# ragged rows with ties, including a tie at the top of row 1
ROWS = [[0.0, 1.0, 1.0, 2.5, 2.5], [3.0, -1.0, 3.0, 0.5], [1.0, 2.0, 2.0, 2.0, 4.0]]


def quiet(*args, **kwargs) -> DiagnosisResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diagnose(*args, **kwargs)


def stratified(num_prompts: int, k: int, sigma: float, offsets: bool = True) -> np.ndarray:
    """Gaussian rewards at the K stratified quantiles per prompt; per-prompt scale log-normal(σ), random offsets."""
    z = norm.ppf((np.arange(k) + 0.5) / k)
    scale = np.exp(sigma * norm.ppf((np.arange(num_prompts) + 0.5) / num_prompts))
    offset = np.random.default_rng(0).normal(size=num_prompts) * 3 if offsets else np.zeros(num_prompts)
    return offset[:, None] + scale[:, None] * z[None, :]


# ---------------------------------------------------------------------------------------------------------------------
# brute force: enumerate N-tuples of atoms
def mid_ranks(row: np.ndarray) -> np.ndarray:
    return np.array([(np.sum(row < r) + 0.5 * np.sum(row == r)) / row.size for r in row])


def brute_force(rows, phis, beta, procedure, n):
    """Mean over prompts of (KL, win rate) of p ∝ exp(Φ/β) on the atoms, by enumerating all K^N tuples."""
    kls, wins = [], []
    for row, phi in zip(rows, phis):
        row, phi = np.asarray(row, dtype=np.float64), np.asarray(phi, dtype=np.float64)
        k = row.size
        w = np.exp((phi - phi.max()) / beta)
        p = w / w.sum()
        kls.append(float(np.sum(p * np.log(k * p))))
        tuples = np.indices((k,) * n).reshape(n, -1)  # every N-tuple of atom indices
        values = row[tuples]
        stat = values.max(axis=0) if procedure == "bon" else values.min(axis=0)
        p_tuple = np.prod(p[tuples], axis=0)
        diff = np.sign(stat[:, None] - stat[None, :])  # policy tuple vs reference tuple
        wins.append(float(p_tuple @ (0.5 * (1 + diff)) @ np.full(stat.size, 1.0 / stat.size)))
    return float(np.mean(kls)), float(np.mean(wins))


def brute_phi(method: dict, rows) -> list[np.ndarray]:
    spec = method["transform"]
    out = []
    for row in map(np.asarray, rows):
        c = mid_ranks(row)
        if spec == "raw":
            out.append(row)
        elif spec.startswith("lsc"):
            out.append(np.log(1 / (1 + np.exp(-(row - row.mean())))))
        elif spec == "par":
            out.append(np.array([np.mean(1 / (1 + np.exp(-(r - row)))) for r in row]))
        else:
            out.append(get_transform(spec).phi(c))
    return out


@pytest.mark.parametrize("procedure, n", [("bon", 3), ("won", 2), ("standard", 1)])
def test_exact_against_brute_force(procedure, n):
    result = quiet(ROWS, procedure=procedure, n=n, kl=0.3)
    assert (result.num_prompts, result.K, result.K_min) == (3, 5, 4)
    assert result.max_kl == pytest.approx(np.mean([math.log(5 / 2), math.log(4 / 2), math.log(5)]))
    assert set(result.methods) == set(METHODS)
    for name, method in result.methods.items():
        phis = brute_phi(method, ROWS)
        kl, win = brute_force(ROWS, phis, method["beta"], procedure, n)
        assert method["kl"] == pytest.approx(0.3, abs=1e-9), name
        assert kl == pytest.approx(0.3, abs=1e-8), name
        assert method["win_rate"] == pytest.approx(win, abs=1e-9), name
        assert method["standard_win_rate"] == pytest.approx(brute_force(ROWS, phis, method["beta"], "bon", 1)[1],
                                                            abs=1e-9), name
        if n > 1:
            other = "won" if procedure == "bon" else "bon"
            assert method[f"{other}_win_rate"] == pytest.approx(
                brute_force(ROWS, phis, method["beta"], other, n)[1], abs=1e-9), name


def test_mid_ranks_match_calibrate():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 5, size=(40, 7)).astype(np.float64)  # many ties
    atoms = _Atoms.from_matrix(values, np.ones(values.shape, dtype=bool))
    refs = torch.from_numpy(np.repeat(atoms.values, 7, axis=0))
    expected = calibrate(torch.from_numpy(atoms.values.reshape(-1)), refs).numpy().reshape(40, 7)
    np.testing.assert_array_equal(atoms.c, expected)


def test_lsc_and_par_match_the_trainer_transforms():
    rows = [[0.3, -1.0, 2.0, 2.0], [5.0, 4.0, 7.5]]
    for spec in ("lsc:centre=mean", "lsc:centre=median", "par"):
        method = quiet(rows, kl=0.2, methods=[spec]).methods[get_transform(spec).spec]
        transform = get_transform(spec)
        phis = [transform(None, rewards=torch.tensor(row, dtype=torch.float64),
                          ref_rewards=torch.tensor([row] * len(row), dtype=torch.float64)).numpy() for row in rows]
        kl, _ = brute_force(rows, phis, method["beta"], "bon", 1)
        assert kl == pytest.approx(0.2, abs=1e-9), spec
        assert method["standard_win_rate"] == pytest.approx(brute_force(rows, phis, method["beta"], "bon", 1)[1])


# ---------------------------------------------------------------------------------------------------------------------
# continuum limit and the calibration story (notes §8)
def test_continuum_limit_identity_best_t_optimal():
    ref = norm.ppf((np.arange(2000) + 0.5) / 2000)[None, :]  # distinct rewards: c = (k + ½)/K
    result = quiet(ref, procedure="bon", n=4, kl=0.5, methods=["identity", "best_t", "optimal"])
    identity = theory.policy("identity", theory.beta_for_kl("identity", 0.5))
    m = result.methods["identity"]
    assert m["beta"] == pytest.approx(identity.beta, rel=1e-2)
    assert m["win_rate"] == pytest.approx(identity.win_rate("bon", 4), abs=1e-2)
    assert m["standard_win_rate"] == pytest.approx(identity.standard_win_rate(), abs=1e-2)
    assert m["won_win_rate"] == pytest.approx(identity.win_rate("won", 4), abs=1e-2)
    best = theory.best_t("bon", 4, 0.5)
    b = result.methods["best_t"]
    assert b["family"] == "bon" and b["t"] == pytest.approx(best.t, rel=0.25)
    assert b["win_rate"] == pytest.approx(best.win_rate, abs=1e-2)
    assert b["standard_win_rate"] == pytest.approx(best.standard_win_rate, abs=1e-2)
    assert b["beta"] == pytest.approx(theory.beta_for_kl(f"bon:t={b['t']}", 0.5), rel=2e-2)  # β of exp(t c) itself
    o = result.methods["optimal"]
    assert o["win_rate"] == pytest.approx(o["continuum_win_rate"], abs=2e-3)
    assert o["win_rate"] >= b["win_rate"] - 1e-4 >= m["win_rate"]


def gaussian_bon_win(shift, n: int = 4) -> np.ndarray:
    """Continuum: best of n from N(shift, 1) beats best of n from N(0, 1) (the raw-reward tilt of a Gaussian)."""
    shift = np.atleast_1d(np.asarray(shift, dtype=np.float64))[:, None]
    x = np.linspace(-10.0, 10.0, 4001)[None, :] + shift / 2
    y = n * norm.cdf(x - shift) ** (n - 1) * norm.pdf(x - shift) * norm.cdf(x) ** n
    return np.sum(0.5 * (y[:, 1:] + y[:, :-1]) * np.diff(x, axis=1), axis=1)


def tilted_bon_win(rows: np.ndarray, phis: np.ndarray, kl: float, n: int) -> tuple[float, float]:
    """(β, BoN-n win rate) of p_x ∝ exp(Φ_x/β) on each row's K distinct atoms, one β for every prompt with mean KL
    = `kl`, by hand: β by Brent on the mean of Σ p log(K p); P(best of n = j-th smallest atom) = F_j^n − F_{j−1}^n
    for the policy (F its CDF) and ((j/K)^n − ((j−1)/K)^n) for the reference, ties (same atom) counting ½."""
    from scipy.optimize import brentq

    order = np.argsort(rows, axis=1)
    phis = np.take_along_axis(phis, order, axis=1)
    k = rows.shape[1]

    def tilt(beta):
        logits = (phis - phis.max(axis=1, keepdims=True)) / beta
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        return p, float(np.mean(np.sum(p * np.log(np.maximum(k * p, 1e-300)), axis=1)))

    beta = brentq(lambda b: tilt(b)[1] - kl, 1e-3, 1e3, xtol=1e-14, rtol=1e-14)
    p = tilt(beta)[0]
    cdf = np.concatenate([np.zeros((p.shape[0], 1)), np.minimum(np.cumsum(p, axis=1), 1.0)], axis=1)
    policy_best = np.diff(cdf**n, axis=1)
    ref_cdf = np.arange(k + 1) / k
    ref_below, ref_at = ref_cdf[:-1] ** n, np.diff(ref_cdf**n)
    return beta, float(np.mean(policy_best @ (ref_below + 0.5 * ref_at)))


def test_calibration_story_lognormal_scales():
    """BoN-4, KL 0.5, one global β: per-prompt reward scale log-normal(σ = 1) across 300 prompts × K = 1000."""
    rows = stratified(300, 1000, 1.0)
    result = quiet(rows, procedure="bon", n=4, kl=0.5, methods=["raw_reward", "identity", "best_t", "optimal"])
    m = {name: v["win_rate"] for name, v in result.methods.items()}
    assert m["identity"] == pytest.approx(0.801, abs=0.01)
    assert m["best_t"] == pytest.approx(0.876, abs=0.01)  # notes §8; the continuum best exp(t c) is 0.8727
    assert m["best_t"] <= m["optimal"] + 1e-4
    # raw reward Φ_x = r and identity Φ_x = c = (rank + ½)/K, recomputed by hand (the notes' continuum quotes raw
    # 0.742; the discrete value sits lower: prompts with large scales saturate at log K, so convergence is slow)
    c = (np.argsort(np.argsort(rows, axis=1), axis=1) + 0.5) / rows.shape[1]
    for name, phis in (("raw_reward", rows), ("identity", c)):
        beta, win = tilted_bon_win(rows, phis, 0.5, 4)
        assert result.methods[name]["beta"] == pytest.approx(beta, rel=1e-6), name
        assert m[name] == pytest.approx(win, abs=1e-6), name
    assert m["identity"] - m["raw_reward"] > 0.07 and m["best_t"] - m["raw_reward"] > 0.15
    h = result.heterogeneity
    assert h["ref_std"]["log_std_std"] == pytest.approx(1.0, abs=0.02)
    assert h["ref_std"]["p90_p10_ratio"] == pytest.approx(math.exp(2 * 1.2816), rel=0.05)
    kl = h["raw_reward_kl"]
    assert kl["p90"] / kl["p10"] > 50 and kl["top10_share"] > 0.5  # one β spends the budget very unequally


def test_calibration_story_moderate_heterogeneity_matches_continuum():
    """σ = 0.5: per-prompt tilts stay well below log K, and the discrete raw-reward prediction matches the continuum
    (Gaussian tilt by δ_x = s_x/β is a shift: KL δ²/2, β² = E[s²]) to a few 1e-3."""
    data = stratified(300, 1000, 0.5)
    raw = quiet(data, procedure="bon", n=4, kl=0.5, methods=["raw_reward"]).methods["raw_reward"]
    s = np.exp(0.5 * norm.ppf((np.arange(300) + 0.5) / 300))
    beta = math.sqrt(np.mean(s**2))
    continuum = float(np.mean(gaussian_bon_win(s / beta)))
    assert raw["beta"] == pytest.approx(beta, rel=5e-2)  # the discrete tails are truncated at ±3.3σ
    assert raw["win_rate"] == pytest.approx(continuum, abs=1e-2)


def test_calibration_story_homogeneous():
    result = quiet(stratified(200, 1000, 0.0), procedure="bon", n=4, kl=0.5, methods=["raw_reward", "identity"])
    raw = result.methods["raw_reward"]
    assert raw["win_rate"] == pytest.approx(0.847, abs=0.01)  # notes §8
    assert raw["win_rate"] == pytest.approx(gaussian_bon_win(1.0)[0], abs=2e-3)  # N(1, 1) vs N(0, 1): KL ½
    spread = result.heterogeneity["raw_reward_kl"]
    assert spread["p10"] == pytest.approx(0.5, abs=1e-6) and spread["p90"] == pytest.approx(0.5, abs=1e-6)
    assert result.heterogeneity["ref_std"]["p90_p10_ratio"] == pytest.approx(1.0)


def test_monotone_per_prompt_changes_leave_calibrated_methods_unchanged():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(60, 12)).round(1)  # ties
    a = np.exp(rng.normal(size=(60, 1)))
    b = rng.normal(size=(60, 1)) * 5
    methods = ["raw_reward", "identity", "best_t", "optimal", "vbon", "lsc"]
    ref = quiet(base, kl=0.4, methods=methods).methods
    affine = quiet(a * base + b, kl=0.4, methods=methods).methods
    warped = quiet(np.exp(base), kl=0.4, methods=methods).methods  # monotone, non-linear
    offset = quiet(base + b, kl=0.4, methods=methods).methods
    for name in ("identity", "best_t", "optimal", "vbon"):
        for key in ("beta", "win_rate", "standard_win_rate", "won_win_rate"):
            assert affine[name][key] == pytest.approx(ref[name][key], rel=1e-12), (name, key)
            assert warped[name][key] == pytest.approx(ref[name][key], rel=1e-12), (name, key)
    assert abs(affine["raw_reward"]["win_rate"] - ref["raw_reward"]["win_rate"]) > 1e-3
    assert abs(warped["raw_reward"]["win_rate"] - ref["raw_reward"]["win_rate"]) > 1e-3
    # a per-prompt offset alone never changes the raw-reward tilt (nor the centred lsc)
    for name in ("raw_reward", "lsc"):
        assert offset[name]["win_rate"] == pytest.approx(ref[name]["win_rate"], abs=1e-9)


@pytest.mark.filterwarnings("ignore:N = 4 is large")
def test_vbon_paper_beta_and_ragged_constant_rows():
    rows = [[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0], [0.0, 1.0]]
    with pytest.warns(UserWarning, match="1 prompts have all-equal"):
        result = diagnose(rows, kl=0.2, methods=["vbon"])
    v = result.methods["vbon"]
    assert v["paper_beta"] == pytest.approx(1 / 3)
    assert v["transform"] == "log"
    assert result.heterogeneity["num_constant_prompts"] == 1
    assert result.K_min == 2


# ---------------------------------------------------------------------------------------------------------------------
# API surface, plot, CLI
def test_result_serialisation_and_plot(tmp_path):
    result = quiet(stratified(20, 16, 1.0), kl=0.5, methods=["raw_reward", "identity", "best_t"])
    d = result.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert {"procedure", "n", "kl", "num_prompts", "K", "methods", "heterogeneity", "warnings"} <= set(d)
    md = result.to_markdown()
    assert "| raw_reward |" in md and "bon:t=" in md and "p90/p10" in md
    path = tmp_path / "diag.png"
    result.plot(str(path), kls=[0.25, 0.5, 0.75])
    assert path.stat().st_size > 1000
    curves = result.curves(kls=[0.25, 0.5], methods=["identity"])
    assert [round(k, 9) for k, _ in curves["identity"]] == [0.25, 0.5]


def run_json(capsys, *argv):
    code = main(["diagnose", *argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert len(lines) == 1, captured.out
    return json.loads(lines[0])


def write_jsonl(path, rows, column="ref_rewards"):
    with open(path, "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"prompt": f"p{i}", column: row}) + "\n")
    return str(path)


def check_contract(out, num_prompts, k):
    assert (out["procedure"], out["n"], out["kl"], out["num_prompts"], out["K"]) == ("bon", 4, 0.5, num_prompts, k)
    for name in ("raw_reward", "identity", "best_t", "optimal", "lsc", "par", "vbon"):
        for key in ("beta", "kl", "win_rate", "standard_win_rate"):
            assert isinstance(out["methods"][name][key], float), (name, key)
        assert out["methods"][name]["kl"] == pytest.approx(0.5, abs=1e-9)
    assert "t" in out["methods"]["best_t"]
    assert {"ref_std", "raw_reward_kl"} <= set(out["heterogeneity"])


def test_cli_contract_jsonl_and_save_to_disk(tmp_path, capsys):
    from datasets import Dataset

    rows = stratified(30, 16, 1.0).round(3).tolist()
    out = run_json(capsys, "--dataset", write_jsonl(tmp_path / "d.jsonl", rows), "--column", "ref_rewards",
                   "--procedure", "bon", "--n", "4", "--kl", "0.5")
    check_contract(out, 30, 16)
    # the layout of `trl-infalign build-reference --output DIR`: a save_to_disk dataset plus ref_rewards.jsonl
    saved = tmp_path / "ref-out"
    Dataset.from_dict({"prompt": [f"p{i}" for i in range(30)], "ref_rewards": rows}).save_to_disk(str(saved))
    write_jsonl(saved / "ref_rewards.jsonl", rows)
    again = run_json(capsys, "--dataset", str(saved), "--procedure", "bon", "--n", "4", "--kl", "0.5")
    check_contract(again, 30, 16)
    assert again["methods"] == out["methods"]
    only = tmp_path / "only"
    only.mkdir()
    write_jsonl(only / "ref_rewards.jsonl", rows)
    assert run_json(capsys, "--dataset", str(only), "--methods", "identity")["methods"]["identity"] == \
        out["methods"]["identity"]


def test_cli_parquet_table_and_plot(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [[float(v) for v in r] for r in stratified(10, 8, 0.5).round(2)]
    pq.write_table(pa.table({"scores": rows}), tmp_path / "d.parquet")
    plot = tmp_path / "p.png"
    code = main(["diagnose", "--dataset", str(tmp_path / "d.parquet"), "--column", "scores", "--procedure", "won",
                 "--n", "2", "--kl", "0.3", "--methods", "raw_reward", "identity", "won:t=5", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert code == 0
    assert "| won:t=5 |" in out and "Worst-of-2 win" in out and plot.stat().st_size > 1000


@pytest.mark.parametrize(
    "rows, argv, needles",
    [
        ([[1.0, 2.0]], ["--column", "scores"], ["column 'scores' not found", "columns: prompt, ref_rewards",
                                                 "--column"]),
        ([[1.0, 2.0], [3.0]], [], ["row 1 (1 valid)", "fewer than 2", "--num-samples"]),
        ([[1.0, 2.0], [3.0, float("nan")]], [], ["non-finite", "row 1 (reference 1 is nan)"]),
        ([[1.0, 2.0], [3.0, None]], [], ["non-finite", "row 1"]),
        ([[1.0, 2.0, 3.0], [0.0, 1.0, 1.0]], ["--kl", "1.5"], ["KL budget 1.5 is unreachable", "log K = 1.099",
                                                                "--kl"]),
        ([[1.0, 2.0]], ["--methods", "bestofn"], ["unknown method 'bestofn'", "raw_reward"]),
    ],
)
def test_cli_errors(tmp_path, capsys, rows, argv, needles):
    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({"prompt": "p", "ref_rewards": row}).replace("NaN", "NaN") + "\n")
    code = main(["diagnose", "--dataset", str(path), *argv, "--json"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trl-infalign diagnose: error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_api_errors():
    with pytest.raises(FileNotFoundError, match="no such file"):
        diagnose("/nonexistent/refs.jsonl")
    with pytest.raises(ValueError, match="procedure"):
        diagnose(ROWS, procedure="median")
    with pytest.raises(ValueError, match="KL budget"):
        diagnose(ROWS, kl=0)
    with pytest.raises(ValueError, match="no rows"):
        diagnose([])


def test_best_t_on_the_search_bound_warns(monkeypatch):
    import trl_infalign.diagnose as module

    monkeypatch.setattr(module._Data, "t_max", lambda self: 2.0)  # the best t for BoN-4 at KL 0.5 is ≈ 12.6
    with pytest.warns(UserWarning, match="upper bound"):
        result = diagnose(stratified(5, 64, 0.0), kl=0.5, methods=["best_t"])
    assert result.methods["best_t"]["t"] == pytest.approx(2.0, rel=1e-3)
    assert any("upper bound" in note for note in result.warnings)


def test_large_n_for_k_warns():
    with pytest.warns(UserWarning, match=r"N = 64 is large for K = 16 .* probability 98%"):
        result = diagnose(stratified(4, 16, 0.5), n=64, kl=0.5, methods=["identity"])
    assert abs(result.methods["identity"]["win_rate"] - 0.5) < 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diagnose(stratified(4, 16, 0.5), n=4, kl=0.5, methods=["identity"])  # the default case stays quiet


# ---------------------------------------------------------------------------------------------------------------------
# issue 20 item 6b: rewards around 1e300; issue 18 item 2: K-sensitivity
def test_rewards_around_1e300_are_diagnosed(tmp_path, capsys):
    """Var_p(Φ) of raw rewards ~1e300 overflowed: raw_reward and lsc reported "math domain error" and the table
    crashed (KeyError 'win_rate'). Raw-reward RLHF is scale-free (β scales with the reward): same policy at 1e300."""
    base = stratified(10, 16, 0.5)
    small = quiet(base, kl=0.5, methods=["raw_reward", "identity", "lsc"])
    huge = quiet(base * 1e300, kl=0.5, methods=["raw_reward", "identity", "lsc"])
    for name in ("raw_reward", "identity", "lsc"):
        assert "error" not in huge.methods[name], huge.methods[name]
        assert huge.methods[name]["kl"] == pytest.approx(0.5, abs=1e-9)
    raw, raw_small = huge.methods["raw_reward"], small.methods["raw_reward"]
    assert raw["win_rate"] == pytest.approx(raw_small["win_rate"], abs=1e-9)
    assert raw["beta"] == pytest.approx(raw_small["beta"] * 1e300, rel=1e-9)
    assert huge.heterogeneity["ref_std"]["p50"] == pytest.approx(small.heterogeneity["ref_std"]["p50"] * 1e300)
    assert huge.methods["identity"] == small.methods["identity"]
    assert "| raw_reward |" in huge.to_markdown() and "+0.0000 |" in huge.to_markdown()
    failed = dataclasses.replace(huge, methods={**huge.methods, "raw_reward": {"error": "math domain error"}})
    table = failed.to_markdown()  # a failed raw_reward: its row says so, and there is no Δ vs raw column
    assert "| raw_reward | — | — | — | math domain error |" in table and "Δ vs raw" not in table
    out = run_json(capsys, "--dataset", write_jsonl(tmp_path / "d.jsonl", (base * 1e300).tolist()), "--methods",
                   "raw_reward", "lsc", "identity", "--kl", "0.5")
    assert not [n for n, m in out["methods"].items() if "error" in m] and not out["warnings"]
    assert main(["diagnose", "--dataset", str(tmp_path / "d.jsonl"), "--kl", "0.5", "--no-k-sensitivity",
                 "--methods", "raw_reward", "lsc", "identity"]) == 0
    assert "| lsc |" in capsys.readouterr().out


def test_k_sensitivity_at_k_equals_methods_and_subsamples_are_exact(tmp_path, capsys):
    rows = stratified(6, 32, 1.0)  # distinct rewards: a calibrated method sees only K, not which K samples
    result = quiet(rows, kl=0.4, methods=["raw_reward", "identity", "best_t"], k_sensitivity=True, k_repeats=3)
    ks = result.k_sensitivity
    assert [entry["k"] for entry in ks] == [32, 16, 8] and [e.get("repeats") for e in ks] == [None, 3, 3]
    assert ks[0]["methods"] == {name: {"win_rate": m["win_rate"], "kl": m["kl"]} for name, m in result.methods.items()}
    for entry in ks[1:]:
        exact = quiet(rows[:, : entry["k"]], kl=0.4, methods=["identity", "best_t"]).methods
        for name in ("identity", "best_t"):
            assert entry["methods"][name]["win_rate"] == pytest.approx(exact[name]["win_rate"], abs=1e-9)
            assert entry["methods"][name]["win_rate_std"] == pytest.approx(0.0, abs=1e-9)
        assert entry["methods"]["raw_reward"]["win_rate_std"] > 0  # which references are kept matters for raw
    summary = result.to_dict()["k_sensitivity_summary"]
    moves = {n: ks[0]["methods"][n]["win_rate"] - ks[1]["methods"][n]["win_rate"] for n in result.methods}
    assert summary["points"] == pytest.approx(100 * max(abs(v) for v in moves.values()))
    assert f"~{summary['points']:.1f} points" in result.to_markdown()
    assert "k_sensitivity" not in quiet(rows, kl=0.4, methods=["identity"]).to_dict()  # off by default in Python
    out = run_json(capsys, "--dataset", write_jsonl(tmp_path / "d.jsonl", rows.tolist()), "--kl", "0.4",
                   "--methods", "identity", "raw_reward", "--k-repeats", "2")  # on by default in the CLI
    assert out["k_sensitivity"][0]["methods"] == {n: {"win_rate": m["win_rate"], "kl": m["kl"]}
                                                  for n, m in out["methods"].items()}
    assert [e["k"] for e in out["k_sensitivity"]] == [32, 16, 8]
