"""Calibrated-space model (trl_infalign.theory) against the closed forms of notes §2 (InfAlign, arXiv 2412.19792)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trl_infalign import theory
from trl_infalign.theory import CalibratedPolicy
from trl_infalign.procedures import get_procedure

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
    """At both ends of β (10⁻³: KL ≈ 0.3–5.6; 10: KL < 0.011) the solver's optimum is the 0.1 ODE solver's
    (tests/reference_optimal_ode.py, an independent shooting in c): Φ* = β log g* agrees where the policy has mass,
    and so does the KL. The reference policy (g = 1) misses Φ* by 0.01–32 and the KL by 7·10⁻⁴ or more."""
    from reference_optimal_ode import optimum

    opt = theory.optimal_policy(procedure, n, beta=beta)
    assert opt.cdf()[-1] == pytest.approx(1.0)
    log_g_of, kl_ode = optimum(procedure, n, beta)
    log_g_ode = log_g_of(opt.grid)
    alive = log_g_ode >= log_g_ode.max() - 40  # where the policy has mass (e^-40); below, Φ is not resolved
    phi_ode, phi = beta * log_g_ode[alive], beta * opt.log_density[alive]
    assert np.max(np.abs(phi - phi_ode)) <= 1e-3 * np.ptp(phi_ode)  # measured ≤ 2·10⁻⁵ of the range
    assert opt.kl() == pytest.approx(kl_ode, rel=2e-4)  # measured ≤ 3·10⁻⁵
    assert 0.5 < opt.win_rate(procedure, n) <= 1.0


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


# ------------------------------------------------------------------------------------------------- large N
def reference_order_statistic_win(log_g_from_end, n, u_min=1e-22):
    """Independent quadrature of T = ∫₀¹ N (1−u)^{N−1} (1 − M(u))^N du, M(u) = ∫₀^u g̃, g̃(u) = exp(log_g_from_end(u))
    the density at distance u from the winning end, as an ODE in s = log u (DOP853, rtol 1e-11).

    BoN-N win = 1 − T with g̃(u) = g(1 − u); WoN-N win = T with g̃(u) = g(u).  Returns (M(1), T)."""
    from scipy.integrate import solve_ivp

    def rhs(s, y):
        u = min(math.exp(s), 1.0 - 1e-16)
        m = min(y[0], 1.0)
        weight = n * math.exp((n - 1) * math.log1p(-u) + n * math.log1p(-m)) if m < 1 else 0.0
        return [u * math.exp(log_g_from_end(u)), u * weight]

    y0 = [u_min * math.exp(log_g_from_end(u_min)), n * u_min]
    sol = solve_ivp(rhs, (math.log(u_min), 0.0), y0, method="DOP853", rtol=1e-11, atol=1e-14)
    return float(sol.y[0, -1]), float(sol.y[1, -1])


def exp_family_log_g(spec, beta):
    """log g(c) = Φ(c)/β − log Z for bon:t / won:t, with log Z from scipy quad (independent of theory.py)."""
    from scipy.integrate import quad

    family, t = spec.split(":t=")
    t = float(t)
    phi = (lambda c: math.exp(t * c)) if family == "bon" else (lambda c: -math.exp(-t * c))
    top = max(phi(0.0), phi(1.0)) / beta
    z = quad(lambda c: math.exp(phi(c) / beta - top), 0, 1, points=[min(10 / t, 0.5), max(1 - 10 / t, 0.5)],
             limit=500, epsabs=1e-14)[0]
    log_z = top + math.log(z)
    return lambda c: phi(c) / beta - log_z


@pytest.mark.parametrize(
    "spec, n",
    [("bon:t=8.26427", 10_000), ("bon:t=60", 10_000), ("bon:t=500", 10_000), ("bon:t=12.6339", 4),
     ("won:t=9.67762", 4), ("bon:t=20", 100), ("won:t=5", 100), ("bon:t=700", 10**6), ("won:t=10", 10**6)],
)
def test_exp_family_win_rates_match_independent_quadrature(spec, n):
    """The issue's case: bon:t=8.26 at N = 10⁴, KL 0.5 wins 0.914 (the old uniform-grid quadrature said 0.9994)."""
    beta = theory.beta_for_kl(spec, 0.5)
    pol = theory.policy(spec, beta)
    log_g = exp_family_log_g(spec, beta)
    mass_b, tail_b = reference_order_statistic_win(lambda u: log_g(1.0 - u), n)
    mass_w, tail_w = reference_order_statistic_win(log_g, n)
    assert mass_b == pytest.approx(1.0, abs=1e-8) and mass_w == pytest.approx(1.0, abs=1e-8)
    assert pol.win_rate("bon", n) == pytest.approx(1.0 - tail_b, abs=1e-5)
    assert pol.win_rate("won", n) == pytest.approx(tail_w, abs=1e-5)
    if (spec, n) == ("bon:t=8.26427", 10_000):
        assert pol.win_rate("bon", n) == pytest.approx(0.914, abs=1e-3)


@pytest.mark.parametrize("n", [100, 10_000, 10**6])
def test_bon_policy_closed_forms_large_n(n):
    pol = CalibratedPolicy.bon_policy(n)
    assert pol.kl() == pytest.approx(bon_kl(n), abs=1e-6)
    assert pol.win_rate("bon", n) == pytest.approx(n / (n + 1), abs=1e-6)
    assert pol.standard_win_rate() == pytest.approx(n / (n + 1), abs=1e-6)


@pytest.mark.parametrize("n", [100, 10_000, 10**6])
@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_identity_transform_large_n_against_closed_form_density(n, beta):
    """g = e^{c/β} / (β (e^{1/β} − 1)) in closed form, integrated independently; at large N the BoN-N win tends to
    g(1)/(1 + g(1)) and the WoN-N win to 1/(1 + g(0)) (within O(1/N))."""
    pol = theory.policy("identity", beta)
    log_norm = -math.log(beta * math.expm1(1.0 / beta))
    _, tail_b = reference_order_statistic_win(lambda u: (1.0 - u) / beta + log_norm, n)
    _, tail_w = reference_order_statistic_win(lambda u: u / beta + log_norm, n)
    assert pol.win_rate("bon", n) == pytest.approx(1.0 - tail_b, abs=1e-6)
    assert pol.win_rate("won", n) == pytest.approx(tail_w, abs=1e-6)
    g1, g0 = math.exp(1.0 / beta + log_norm), math.exp(log_norm)
    if n == 10**6:
        assert pol.win_rate("bon", n) == pytest.approx(g1 / (1.0 + g1), abs=1e-3)
        assert pol.win_rate("won", n) == pytest.approx(1.0 / (1.0 + g0), abs=1e-3)


@pytest.mark.parametrize("procedure", ["bon", "won"])
@pytest.mark.parametrize("n", [100, 10_000])
def test_optimal_policy_win_rate_large_n_matches_its_ode(procedure, n):
    """The grid representation of optimal_policy against the shooting ODE's own mass M = 1 − G, integrated on a
    log scale from the end that decides the win rate (u = 1 − c for bon, c for won)."""
    from scipy.integrate import quad

    from trl_infalign import optimal

    opt = theory.optimal_policy(procedure, n, beta=0.1)
    proc = get_procedure(procedure, n)
    orientation = optimal._orientation(proc.spec)
    assert orientation.mirrored == (procedure == "bon")  # shot from the end the kernel does not live at
    l1, kl = optimal._core(proc.spec, opt.beta)
    _, sol = optimal._shoot(orientation, l1, opt.beta, dense=True)

    def state_mass(z):  # the ODE's M at z of the problem it solved (the mirror's z = −z)
        return min(max(float(sol.sol(min(max(z, sol.t[-1]), sol.t[0]))[0]), 0.0), 1.0)

    def integrand(s):
        x = math.exp(s)  # distance from the deciding end
        z = math.log1p(-x) - s  # logit(1 − x)
        if procedure == "bon":  # N (1−u)^{N−1} G(1−u)^N; the mirror's mass above 1 − (1 − x) = x is G(1 − x)
            G = state_mass(-z)
            return x * n * math.exp((n - 1) * math.log1p(-x) + n * math.log(G)) if G > 0 else 0.0
        M = state_mass(-z)  # won: N (1−c)^{N−1} (1 − G(c))^N at c = x, M(c) = mass above c
        return x * n * math.exp((n - 1) * math.log1p(-x) + n * math.log(M)) if M > 0 else 0.0

    cuts = np.linspace(math.log(1e-14 / n), 0.0, 40)
    tail = sum(quad(integrand, a, b, epsabs=1e-13, epsrel=1e-10, limit=200)[0] for a, b in zip(cuts[:-1], cuts[1:]))
    assert opt.win_rate(procedure, n) == pytest.approx(1.0 - tail if procedure == "bon" else tail, abs=1e-5)
    assert opt.kl() == pytest.approx(kl, abs=2e-3)


@pytest.mark.parametrize("procedure", ["bon", "won"])
@pytest.mark.parametrize("n,beta", [(2, 0.3), (4, 0.1), (4, 0.03), (16, 0.05)])
def test_general_solver_matches_the_0_1_ode_solver(procedure, n, beta):
    """The general first-order-condition solver (any procedure, in logit c) against the 0.1 BoN/WoN-only ODE."""
    from reference_optimal_ode import optimum

    from trl_infalign._quadrature import _adaptive_grid

    log_g_of, kl_old = optimum(procedure, n, beta)
    c = np.linspace(0.0, 1.0, 2001)
    log_g_old = log_g_of(c)
    new = theory.optimal_policy(procedure, n, beta=beta)
    phi_new = beta * np.interp(c, new.grid, new.log_density)
    alive = log_g_old >= log_g_old.max() - 40  # where the policy has mass (e^-40); below, Φ is not resolved
    assert np.max(np.abs(phi_new - beta * log_g_old)[alive]) <= 1e-4
    assert new.kl() == pytest.approx(kl_old, abs=1e-4)
    old = theory.CalibratedPolicy.from_log_density(*_adaptive_grid(log_g_of, n0=513, tol=0.05))
    assert new.win_rate(procedure, n) == pytest.approx(old.win_rate(procedure, n), abs=1e-4)


def test_best_t_large_n_searches_far_enough_and_warns():
    with pytest.warns(UserWarning, match=r"Best-of-10000 at KL 0.5 sits on t = 700"):
        best = theory.best_t("bon", 10_000, 0.5)
    assert best.on_bound and best.bound == "t_max" and best.t_range == (0.01, 700.0) and best.t == 700.0
    assert best.kl == pytest.approx(0.5, abs=1e-6)
    for t in (8.26427, 60, 500):  # the reference values: 0.914, 0.980, 0.997
        spec = f"bon:t={t}"
        assert theory.win_rate(spec, theory.beta_for_kl(spec, 0.5), "bon", 10_000) < best.win_rate
    assert best.win_rate > 0.997


def test_t_range_grows_with_n_and_interior_optimum_has_no_warning(recwarn):
    assert theory.t_range("bon", 4) == theory.T_RANGE == (0.01, 60.0)
    assert theory.t_range("standard", 10**6) == (0.01, 60.0)
    assert theory.t_range("won", 8)[1] == 240.0 and theory.t_range("bon", 10**6)[1] == theory.T_CAP
    best = theory.best_t("bon", 16, 0.5)  # t* ≈ 104 > the old bound 60
    assert 60 < best.t < best.t_range[1] and not best.on_bound and best.bound is None
    for t in (60, 200):
        spec = f"bon:t={t}"
        assert theory.win_rate(spec, theory.beta_for_kl(spec, 0.5), "bon", 16) < best.win_rate
    small = theory.best_t("bon", 4, 0.5)
    assert not small.on_bound and small.normalised_beta > 0.1
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_best_t_lower_bound_warns_for_standard():
    with pytest.warns(UserWarning, match="lower end.*identity"):
        best = theory.best_t("standard", 1, 0.5)
    assert best.on_bound and best.bound == "t_min" and best.t == 0.01


def test_beta_floor_binds_for_won_and_costs_little():
    with pytest.warns(UserWarning, match=r"Worst-of-4 at KL 0.75 is limited by the floor min_beta=0.01"):
        floored = theory.best_t("won", 4, 0.75)
    free = theory.best_t("won", 4, 0.75, min_beta=0)
    assert floored.bound == "min_beta" and floored.on_bound
    assert floored.normalised_beta == pytest.approx(0.01, rel=1e-5)
    assert floored.beta / (1 - math.exp(-floored.t)) == pytest.approx(floored.normalised_beta)
    assert free.normalised_beta < 1e-3 and not free.on_bound and free.t > floored.t
    assert 0 < free.win_rate - floored.win_rate < 2e-3
    assert floored.unconstrained is not None and floored.unconstrained[1] > floored.win_rate
    not_binding = theory.best_t("won", 4, 0.5)
    assert not not_binding.on_bound and not_binding.normalised_beta > 0.01
    for kl in (0.5, 1.0):  # BoN: never binds (β / span ≈ 0.2-0.3)
        assert theory.best_t("bon", 4, kl).bound is None


def test_beta_floor_prefers_flatter_member_on_won_plateau():
    best = theory.best_t("won", 10_000, 0.5)  # every t ≳ 5 wins to 1e-12: take the smallest (largest β / span)
    assert best.win_rate > 1 - 1e-9 and best.normalised_beta >= 0.01 and not best.on_bound


def test_best_t_for_beta_floor():
    beta = 1e-3
    with pytest.warns(UserWarning, match="best_t_for_beta.*floor min_beta=0.01"):
        t = theory.best_t_for_beta("bon", 4, beta)
    assert t == pytest.approx(math.log1p(beta / 0.01), rel=1e-5)  # the floor: β / (e^t − 1) ≥ 0.01
    assert theory.best_t_for_beta("bon", 4, beta, min_beta=0) > t
    details = theory.best_t_for_beta("bon", 4, 0.05, details=True)
    assert details.t == theory.best_t_for_beta("bon", 4, 0.05) and details.beta == 0.05
    assert not details.on_bound and details.normalised_beta >= 0.01


@pytest.mark.parametrize(
    "call, match",
    [(lambda: theory.best_t("bon", 4, 0.5, min_beta=-1), "min_beta"),
     (lambda: theory.best_t("bon", 4, 0.5, min_beta=float("nan")), "min_beta"),
     (lambda: theory.best_t("bon", 4, 0.5, t_max=1000), "t_max"),
     (lambda: theory.best_t("bon", 4, 0.0), "kl"),
     (lambda: theory.best_t("bon", 0, 0.5), "n must"),
     (lambda: theory.best_t("bon", 4, 0.5, family="x"), "family"),
     (lambda: theory.best_t_for_beta("bon", 4, -1.0), "beta"),
     (lambda: theory.best_t_for_beta("won", 4, 0.1, t_max=0), "t_max"),
     (lambda: theory.best_t("standard", 1, 8.0), "min_beta")],
)
def test_best_t_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_optimal_at_ten_million_says_the_kl_budget_is_unreachable(tmp_path, capsys):
    """issue 20: at N = 10⁷ the KL-0.5 solve (API, `trl-infalign theory`, CTRLConfig) ended in numpy's "need at least
    one array to concatenate": building the policy's grid asked the ODE solution for an empty set of points past its
    last step.  Now it is the same "KL budget unreachable" message as at N = 10⁶."""
    from trl_infalign import CTRLConfig
    from trl_infalign.cli import main

    with pytest.raises(ValueError, match="KL budget 0.5 is unreachable for the optimal Best-of-10000000 policy.*"
                                         "never spends"):
        theory.optimal_policy("bon:n=10000000", kl=0.5)
    assert main(["theory", "--transform", "optimal", "--procedure", "bon:n=10000000", "--kl", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "error: KL budget 0.5 is unreachable" in err and "concatenate" not in err
    with pytest.raises(ValueError, match="CTRLConfig.kl_budget=0.5 with transform='optimal': KL budget 0.5 is unreachable"):
        CTRLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", transform="optimal",
                   inference_procedure="bon:n=10000000", kl_budget=0.5)
