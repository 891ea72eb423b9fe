"""Calibrated-space model (trl_infalign.theory) against the closed forms of notes §2 (InfAlign, arXiv 2412.19792)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trl_infalign import theory
from trl_infalign.theory import CalibratedPolicy

TOL = 1e-3


def bon_kl(n):
    return math.log(n) - (n - 1) / n


def identity_closed_form(beta):
    """g = e^{c/β} / (β (e^{1/β} − 1)): mean, KL."""
    mean = 1.0 / (-math.expm1(-1.0 / beta)) - beta
    log_z = math.log(beta) + 1.0 / beta + math.log(-math.expm1(-1.0 / beta))
    return mean, mean / beta - log_z


# ---------------------------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_bon_policy_closed_forms(n):
    pol = CalibratedPolicy.bon_policy(n)
    assert pol.kl() == pytest.approx(bon_kl(n), abs=TOL)
    assert pol.standard_win_rate() == pytest.approx(n / (n + 1), abs=TOL)
    assert pol.win_rate("bon", n) == pytest.approx(n / (n + 1), abs=TOL)
    assert np.all(np.diff(pol.cdf()) >= 0) and pol.cdf()[-1] == pytest.approx(1.0)
    if n == 4:
        assert pol.kl() == pytest.approx(0.636294, abs=1e-5)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_log_transform_at_beta_one_over_n_minus_one_is_bon_policy(n):
    pol = theory.policy("log", 1.0 / (n - 1))
    assert pol.kl() == pytest.approx(bon_kl(n), abs=TOL)
    assert pol.standard_win_rate() == pytest.approx(n / (n + 1), abs=TOL)
    assert pol.win_rate("bon", n) == pytest.approx(n / (n + 1), abs=TOL)
    c = np.linspace(0.05, 1.0, 50)
    np.testing.assert_allclose(np.interp(c, pol.grid, pol.density()), n * c ** (n - 1), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("beta", [1e-3, 0.01, 0.1, 1.0, 10.0])
def test_identity_transform_closed_form(beta):
    pol = theory.policy("identity", beta)
    mean, kl = identity_closed_form(beta)
    assert pol.standard_win_rate() == pytest.approx(mean, abs=1e-6)
    assert pol.kl() == pytest.approx(kl, abs=1e-6)
    c = np.linspace(0.0, 1.0, 11)
    log_expected = (c - 1.0) / beta - math.log(beta * -math.expm1(-1.0 / beta))
    np.testing.assert_allclose(np.interp(c, pol.grid, pol.log_density), log_expected, rtol=1e-9, atol=1e-9)
    assert theory.kl_divergence("identity", beta) == pol.kl()
    assert theory.win_rate("identity", beta) == pol.standard_win_rate()


def test_reference_policy_has_zero_kl_and_even_win_rates():
    flat = CalibratedPolicy.from_log_density(np.linspace(0, 1, 101), np.full(101, 3.7))
    assert flat.kl() == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(flat.density(), 1.0)
    for procedure, n in [("standard", 1), ("bon", 4), ("won", 4), ("bon", 16), ("won", 16)]:
        assert flat.win_rate(procedure, n) == pytest.approx(0.5, abs=1e-4)
    far = theory.policy("bon:t=5", 1e9)  # β → ∞
    assert far.kl() < 1e-9
    for procedure, n in [("standard", 1), ("bon", 4), ("won", 8)]:
        assert far.win_rate(procedure, n) == pytest.approx(0.5, abs=1e-4)


def test_won_and_bon_win_rates_match_direct_integrals():
    pol = theory.policy("won:t=5", 0.3)
    g = pol.density()
    G = pol.cdf()
    c = pol.grid
    n = 4
    direct_bon = np.trapezoid(n * G ** (n - 1) * g * c**n, c)
    direct_won = np.trapezoid(n * (1 - G) ** (n - 1) * g * (1 - (1 - c) ** n), c)
    assert pol.win_rate("bon", n) == pytest.approx(direct_bon, abs=1e-4)
    assert pol.win_rate("won", n) == pytest.approx(direct_won, abs=1e-4)


# ------------------------------------------------------------------------------------------------- optimality
@pytest.mark.parametrize("kl", [0.1, 0.5, 1.5])
def test_identity_is_optimal_for_standard_win_rate(kl):
    identity = theory.policy("identity", theory.beta_for_kl("identity", kl))
    assert identity.kl() == pytest.approx(kl, abs=1e-8)
    for spec in ["bon:t=1", "bon:t=5", "bon:t=20", "won:t=1", "won:t=5", "won:t=20", "log"]:
        other = theory.policy(spec, theory.beta_for_kl(spec, kl))
        assert other.kl() == pytest.approx(kl, abs=1e-8)
        assert other.standard_win_rate() <= identity.standard_win_rate() + 1e-9, spec


@pytest.mark.parametrize("beta", [1e-3, 0.1, 3.0])
def test_optimal_standard_is_identity(beta):
    opt = theory.optimal_policy("standard", 1, beta=beta)
    ref = theory.policy("identity", beta)
    assert opt.beta == pytest.approx(beta)
    assert opt.kl() == pytest.approx(ref.kl(), abs=1e-9)
    assert opt.standard_win_rate() == pytest.approx(ref.standard_win_rate(), abs=1e-9)
    assert theory.optimal_policy("bon", 1, beta=beta).kl() == pytest.approx(ref.kl(), abs=1e-9)


@pytest.mark.parametrize("procedure", ["bon", "won"])
def test_optimal_beats_exp_family_at_equal_kl(procedure):
    n, kl = 4, 0.5
    opt = theory.optimal_policy(procedure, n, kl=kl)
    assert opt.kl() == pytest.approx(kl, abs=1e-4)
    best_family = 0.0
    for family in ("bon", "won"):
        for t in [0.3, 1, 2, 4, 7, 10, 15, 25, 40]:
            spec = f"{family}:t={t}"
            pol = theory.policy(spec, theory.beta_for_kl(spec, kl))
            assert pol.win_rate(procedure, n) <= opt.win_rate(procedure, n) + 1e-5, spec
            best_family = max(best_family, pol.win_rate(procedure, n))
    assert opt.win_rate(procedure, n) - best_family < 0.02  # the paper's exp families are near-optimal


@pytest.mark.parametrize("procedure", ["bon", "won"])
def test_optimal_maximises_regularised_objective(procedure):
    n, beta = 4, 0.1
    opt = theory.optimal_policy(procedure, n, beta=beta)
    objective = opt.win_rate(procedure, n) - beta * opt.kl()
    for spec in ["identity", "log", "bon:t=3", "bon:t=8", "won:t=3", "won:t=8"]:
        for scale in (0.3, 1.0, 3.0):
            pol = theory.policy(spec, beta * scale)
            assert pol.win_rate(procedure, n) - beta * pol.kl() <= objective + 1e-6, (spec, scale)


def test_optimal_first_order_condition_bon():
    n, beta = 4, 0.05
    opt = theory.optimal_policy("bon", n, beta=beta)
    phi = beta * opt.log_density
    c, G = opt.grid, opt.cdf()
    inner = (c > 0.05) & (c < 0.99)
    dphi = np.gradient(phi, c)
    expected = n * n * c ** (n - 1) * G ** (n - 1)
    np.testing.assert_allclose(dphi[inner], expected[inner], rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("procedure", ["bon", "won"])
@pytest.mark.parametrize("n", [2, 32])
@pytest.mark.parametrize("beta", [1e-3, 10.0])
def test_optimal_converges_over_range(procedure, n, beta):
    opt = theory.optimal_policy(procedure, n, beta=beta)
    assert np.isfinite(opt.kl()) and opt.kl() >= 0
    assert 0.5 <= opt.win_rate(procedure, n) <= 1.0
    assert opt.cdf()[-1] == pytest.approx(1.0)


def test_optimal_transform_spec_reproduces_policy():
    from trl_infalign.transforms import get_transform

    opt = theory.optimal_policy("bon", 4, beta=0.1)
    transform = get_transform("optimal:procedure=bon,n=4,beta=0.1")
    again = theory.policy(transform, 0.1)
    assert again.kl() == pytest.approx(opt.kl(), abs=TOL)
    assert again.win_rate("bon", 4) == pytest.approx(opt.win_rate("bon", 4), abs=TOL)


def test_optimal_policy_argument_checks():
    with pytest.raises(ValueError, match="exactly one"):
        theory.optimal_policy("bon", 4)
    with pytest.raises(ValueError, match="exactly one"):
        theory.optimal_policy("bon", 4, beta=0.1, kl=0.5)
    with pytest.raises(ValueError, match="standard, bon, won"):
        theory.optimal_policy("median", 4, beta=0.1)
    with pytest.raises(ValueError, match="standard, bon, won"):
        theory.policy("identity", 1.0).win_rate("median", 3)


# ---------------------------------------------------------------------------------------------- β ↔ KL, best t
@pytest.mark.parametrize("spec", ["identity", "log", "bon:t=10", "won:t=5", "bon:t=30"])
@pytest.mark.parametrize("kl", [0.05, 0.5, 2.5])
def test_beta_for_kl_round_trip(spec, kl):
    beta = theory.beta_for_kl(spec, kl)
    assert theory.kl_divergence(spec, beta) == pytest.approx(kl, abs=1e-7)


def test_beta_for_kl_unreachable():
    with pytest.raises(ValueError, match="> 0"):
        theory.beta_for_kl("identity", 0.0)
    with pytest.raises(ValueError, match="> 0"):
        theory.beta_for_kl("identity", -1.0)
    with pytest.raises(ValueError, match="unreachable"):
        theory.beta_for_kl("identity", 1e6)


def test_best_t():
    best = theory.best_t("bon", 4, 0.5)
    assert best.family == "bon" and 0.01 <= best.t <= 60
    assert best.kl == pytest.approx(0.5, abs=1e-6)
    assert best.transform == f"bon:t={best.t:.6g}"
    for t in [2, 5, 10, 20, 40]:
        spec = f"bon:t={t}"
        assert theory.win_rate(spec, theory.beta_for_kl(spec, 0.5), "bon", 4) <= best.win_rate + 1e-6
    assert theory.optimal_policy("bon", 4, kl=0.5).win_rate("bon", 4) >= best.win_rate - 1e-5
    won = theory.best_t("won", 4, 0.5)
    assert won.family == "won"
    t_beta = theory.best_t_for_beta("bon", 4, 0.05)
    assert 0.01 <= t_beta <= 60


# ------------------------------------------------------------------------------------------------- stability
@pytest.mark.parametrize("spec", ["bon:t=30", "won:t=30", "identity", "bon:t=60"])
def test_stability_large_t_small_beta(spec):
    betas = np.logspace(-3, 30, 12)
    kls = []
    for beta in betas:
        pol = theory.policy(spec, beta)
        kls.append(pol.kl())
        assert np.isfinite(pol.kl())
        for procedure, n in [("standard", 1), ("bon", 4), ("won", 4), ("bon", 32)]:
            w = pol.win_rate(procedure, n)
            assert np.isfinite(w) and 0.0 <= w <= 1.0
    assert np.all(np.diff(kls) <= 1e-12), kls  # KL decreases in β
    assert kls[0] > 0.2 and kls[-1] < 1e-6


# ------------------------------------------------------------------------------------------------- frontier
def test_frontier_and_plot(tmp_path):
    kls = [0.2, 0.6, 1.2]
    points = theory.frontier(["identity", "bon:t=10", "optimal"], "bon", 4, kls=kls)
    by = {}
    for p in points:
        by.setdefault(p.transform, []).append(p)
    assert set(by) == {"identity", "bon:t=10", "optimal"}
    for name, pts in by.items():
        np.testing.assert_allclose([p.kl for p in pts], kls, atol=1e-4)
        assert np.all(np.diff([p.win_rate for p in pts]) > 0)
    for opt, other in zip(by["optimal"], by["bon:t=10"]):
        assert opt.win_rate >= other.win_rate - 1e-5
    assert len(theory.frontier("identity", "standard", 1)) == len(theory.DEFAULT_KLS)
    with_betas = theory.frontier(["identity"], "bon", 4, betas=[0.1, 1.0])
    assert [p.beta for p in with_betas] == [0.1, 1.0]
    pytest.importorskip("matplotlib")
    path = tmp_path / "frontier.png"
    theory.plot_frontiers("bon", 4, ["identity", "bon:t=10"], kls=[0.2, 0.8], path=str(path))
    assert path.stat().st_size > 1000
