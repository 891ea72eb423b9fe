"""Inference procedures as objects: specs, closed forms, the general optimal-transform solver, estimators, configs."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from trl_infalign import theory
from trl_infalign.procedures import (
    BestOfN,
    Mixture,
    ProcedureError,
    Standard,
    WorstOfN,
    available_procedures,
    get_procedure,
    register_procedure,
)

MIXTURE = "mixture:0.5*standard+0.25*bon:n=4+0.25*bon:n=16"


# ------------------------------------------------------------------------------------------------------------ specs
@pytest.mark.parametrize("spec", ["standard", "bon:n=4", "won:n=8", MIXTURE, "mixture:0.7*standard+0.3*won:n=2"])
def test_specs_round_trip(spec):
    procedure = get_procedure(spec)
    assert procedure.spec == spec and get_procedure(procedure.spec) == procedure
    assert get_procedure(procedure) is procedure


def test_old_name_and_n_form_still_works():
    assert get_procedure("bon", 4) == get_procedure("bon:n=4") == BestOfN(4)
    assert get_procedure("won", 8) == WorstOfN(8)
    assert get_procedure("standard", 4) == Standard()  # N is one sample for plain sampling
    assert get_procedure(MIXTURE).n == 16 and get_procedure(MIXTURE).label == "0.5·standard + 0.25·Best-of-4 + 0.25·Best-of-16"
    assert available_procedures()[:3] == ["standard", "bon", "won"]


@pytest.mark.parametrize("spec,needles", [
    ("mixture:0.5*standard+0.4*bon:n=4", ["sum to 1", "0.9"]),
    ("mixture:0.5*standard+bon:n=4", ["weight*procedure", "bon:n=4"]),
    ("mixture:x*standard+0.5*bon:n=4", ["not a number"]),
    ("mixture:0.5*standard+0.5*mixture:1*bon", ["cannot contain a mixture"]),
    ("mixture:-0.5*standard+1.5*bon:n=4", ["> 0"]),
    ("median:n=4", ["Unknown inference procedure 'median'", "standard, bon, won", "register_procedure"]),
    ("bon:n=0", ["n must be an integer >= 1"]),
    ("bon:m=3", ["Invalid parameters"]),
    ("bon:n", ["Malformed procedure spec"]),
])
def test_bad_specs_say_what_is_wrong(spec, needles):
    with pytest.raises(ProcedureError) as info:
        get_procedure(spec)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_n_given_twice_must_agree():
    with pytest.raises(ProcedureError, match="n=8, but n=4"):
        get_procedure("bon:n=8", 4)
    assert get_procedure("bon:n=8", 8) == BestOfN(8)


# ------------------------------------------------------------------------------------------------------ closed forms
def test_every_bon_win_rate_of_the_bon_n_policy_is_n_over_n_plus_1():
    """G = c^N: W_bon-M = ∫ c^M d(c^{NM}) = N/(N+1) for every M, so any mixture of BoN-Ms and standard gives it too."""
    pol = theory.CalibratedPolicy.bon_policy(4)
    for spec in ("standard", "bon:n=2", "bon:n=16", "mixture:0.3*standard+0.2*bon:n=2+0.5*bon:n=16"):
        assert pol.win_rate(spec) == pytest.approx(0.8, abs=1e-6), spec


def test_mixture_is_the_weighted_sum_and_a_single_component_is_the_component():
    pol = theory.policy("identity", 0.3)
    parts = {"standard": 0.5, "bon:n=4": 0.25, "won:n=16": 0.25}
    expected = sum(w * pol.win_rate(spec) for spec, w in parts.items())
    assert pol.win_rate("mixture:0.5*standard+0.25*bon:n=4+0.25*won:n=16") == pytest.approx(expected, abs=1e-12)
    single = get_procedure("mixture:1*bon:n=4")
    assert single.components() == ((1.0, BestOfN(4)),)
    assert pol.win_rate(single) == pol.win_rate("bon:n=4")
    a = theory.optimal_policy(single, beta=0.1)
    b = theory.optimal_policy("bon:n=4", beta=0.1)
    np.testing.assert_allclose(np.interp(np.linspace(0, 1, 101), a.grid, a.log_density),
                               np.interp(np.linspace(0, 1, 101), b.grid, b.log_density), atol=1e-9)
    assert Mixture([(0.5, "bon:n=4"), (0.5, "bon:n=4")]) == get_procedure("mixture:1*bon:n=4")  # merged


def test_a_user_cdf_map_matches_the_built_in_it_reproduces():
    """f(G) = G^(n·m) registered by its map (numerical derivative, generic quadrature) is Best-of-(n·m)."""
    name = "bon_of_bon_test"
    if name not in available_procedures():
        register_procedure(name, lambda G, n=2, m=2: G ** (n * m), samples=lambda n=2, m=2: n * m)
    user = get_procedure(f"{name}:n=2,m=3")
    assert user.spec == f"{name}:n=2,m=3" and user.n == 6 and not user.unbiased
    assert get_procedure(name, 3) == get_procedure(f"{name}:n=3")  # a bare name takes inference_n as its n
    for transform, beta in (("identity", 0.2), ("bon:t=5", 20.0)):
        pol = theory.policy(transform, beta)
        assert pol.win_rate(user) == pytest.approx(pol.win_rate("bon:n=6"), abs=1e-6)
    mine, builtin = theory.optimal_policy(user, beta=0.1), theory.optimal_policy("bon:n=6", beta=0.1)
    assert mine.kl() == pytest.approx(builtin.kl(), abs=1e-4)
    assert mine.win_rate(user) == pytest.approx(builtin.win_rate("bon:n=6"), abs=1e-5)
    with pytest.raises(ProcedureError, match="f\\(0\\) = 0 to f\\(1\\) = 1"):
        register_procedure("broken_test", lambda G: 0.5 + 0.5 * G)  # registration works; building it fails
        get_procedure("broken_test")


# --------------------------------------------------------------------------------------------------- optimal transform
def test_optimal_for_the_mixture_beats_every_exp_transform_at_equal_kl():
    """The issue's numbers: the optimum beats the best exp(t·c) by ≈ 1 point and identity by ≈ 3 at KL 0.5."""
    opt = theory.optimal_policy(MIXTURE, kl=0.5)
    assert opt.kl() == pytest.approx(0.5, abs=1e-4)
    w_opt = opt.win_rate(MIXTURE)
    best = theory.best_t(MIXTURE, kl=0.5)
    identity = theory.policy("identity", theory.beta_for_kl("identity", 0.5)).win_rate(MIXTURE)
    assert w_opt > best.win_rate + 0.01 and w_opt > identity + 0.03
    for family in ("bon", "won"):
        for t in (0.5, 2.0, 5.0, 10.0, 30.0):
            spec = f"{family}:t={t}"
            assert theory.policy(spec, theory.beta_for_kl(spec, 0.5)).win_rate(MIXTURE) < w_opt


@pytest.mark.parametrize("spec", ["bon:n=1000000", "won:n=1000000"])
def test_general_solver_stays_accurate_at_a_million(spec):
    """At N = 10⁶ the optimum wins almost surely with a tiny KL: its grid KL matches the ODE's, its win rate the
    large-N limit of its own density (BoN: g(1)/(1 + g(1)), WoN: 1/(1 + g(0)); notes §8), and it beats the best
    exp member at the same KL by far.  A KL budget of 0.5 is unreachable, and the error says why."""
    from trl_infalign import optimal

    opt = theory.optimal_policy(spec, beta=0.01)
    ode_kl = optimal._core(get_procedure(spec).spec, 0.01)[1]
    assert 0 < opt.kl() < 1e-3 and opt.kl() == pytest.approx(ode_kl, rel=0.03)
    log_odds = opt.log_density[-1] if spec.startswith("bon") else -opt.log_density[0]
    assert opt.win_rate(spec) == pytest.approx(1.0 / (1.0 + math.exp(-log_odds)), abs=1e-6)
    assert opt.win_rate(spec) > 0.99999
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the best t sits on the t = 700 cap
        best = theory.best_t(spec, kl=opt.kl(), min_beta=0)
    assert best.win_rate < opt.win_rate(spec) - 0.3
    with pytest.raises(ValueError, match="never spends"):
        theory.optimal_policy(spec, kl=0.5)


# ------------------------------------------------------------------------------------------------------- estimators
def _brute_force_win(policy_row, reference_row, draws):
    """Exact average over all ways each side makes its output: `draws` = [(weight, k, largest)] per side."""
    total = 0.0
    for (wa, ka, la), (wb, kb, lb) in itertools.product(draws, draws):
        wins = []
        for a in itertools.combinations(policy_row, ka):
            for b in itertools.combinations(reference_row, kb):
                x, y = (max(a) if la else min(a)), (max(b) if lb else min(b))
                wins.append(1.0 if x > y else 0.5 if x == y else 0.0)
        total += wa * wb * float(np.mean(wins))
    return total


def test_polynomial_user_procedure_estimator_is_the_exact_all_subsets_average():
    """f(G) = ½G + ½G³: each side serves one sample or the best of 3 independently (cross terms included)."""
    name = "poly_test"
    if name not in available_procedures():
        register_procedure(name, polynomial=[0.0, 0.5, 0.0, 0.5])
    procedure = get_procedure(name)
    assert procedure.unbiased and procedure.min_samples == 3
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.integers(0, 4, size=(3, 5)).astype(np.float64))  # ties on purpose
    b = torch.tensor(rng.integers(0, 4, size=(3, 5)).astype(np.float64))
    got = procedure.per_prompt_win_rates(a, b)
    for i in range(3):
        exact = _brute_force_win(a[i].tolist(), b[i].tolist(), [(0.5, 1, True), (0.5, 3, True)])
        assert got[i].item() == pytest.approx(exact, abs=1e-12)


def test_mixture_estimator_is_the_request_level_average():
    procedure = get_procedure("mixture:0.6*bon:n=2+0.4*won:n=3")
    rng = np.random.default_rng(1)
    a = torch.tensor(rng.normal(size=(2, 5)).round(1))
    b = torch.tensor(rng.normal(size=(2, 5)).round(1))
    got = procedure.per_prompt_win_rates(a, b)
    for i in range(2):  # the same procedure on both sides of a request: no cross terms
        exact = (0.6 * _brute_force_win(a[i].tolist(), b[i].tolist(), [(1.0, 2, True)])
                 + 0.4 * _brute_force_win(a[i].tolist(), b[i].tolist(), [(1.0, 3, False)]))
        assert got[i].item() == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError, match="needs at least 3 samples"):
        procedure.per_prompt_win_rates(a[:, :2], b[:, :2])


def test_pooled_calibrated_win_rate_of_the_reference_is_one_half():
    c = torch.linspace(0, 1, 4001)[1:-1]  # calibrated values of the reference itself
    for spec in ("standard", "bon:n=4", "won:n=4", MIXTURE):
        assert get_procedure(spec).pooled_calibrated_win_rate(c) == pytest.approx(0.5, abs=2e-3), spec


# --------------------------------------------------------------------------------------------------------- configs
def _config(tmp_path, **overrides):
    from trl_infalign import CTRLConfig

    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    kwargs.update(overrides)
    return CTRLConfig(**kwargs)


def test_config_accepts_a_mixture_and_aligns_for_it(tmp_path):
    auto = _config(tmp_path, inference_procedure=MIXTURE, transform="auto", kl_budget=0.5)
    assert auto.procedure == get_procedure(MIXTURE) and auto.inference_n == 16
    best = theory.best_t(MIXTURE, kl=0.5)
    assert auto.resolved_transform == best.transform and auto.beta == pytest.approx(best.beta)
    opt = _config(tmp_path, inference_procedure=MIXTURE, transform="optimal", kl_budget=0.5)
    assert opt.resolved_transform.startswith(f"optimal:procedure={MIXTURE},beta=")
    assert opt.beta == pytest.approx(theory.optimal_policy(MIXTURE, kl=0.5).beta)
    old = _config(tmp_path, inference_procedure="bon", inference_n=8)
    assert old.inference_procedure == "bon" and old.procedure == BestOfN(8)


def test_config_errors_name_the_field_and_overrides_warn(tmp_path):
    with pytest.raises(ValueError, match="inference_procedure='mixture:0.5\\*standard\\+0.4\\*bon:n=4'.*sum to 1"):
        _config(tmp_path, inference_procedure="mixture:0.5*standard+0.4*bon:n=4")
    with pytest.warns(UserWarning, match="inference_n=8 is overridden"):
        cfg = _config(tmp_path, inference_procedure="bon:n=16", inference_n=8)
    assert cfg.inference_n == 16


def test_theory_cli_takes_a_procedure_spec_and_plots_its_frontier(tmp_path, capsys):
    import json

    from trl_infalign.cli import main

    plot = tmp_path / "frontier.png"
    assert main(["theory", "--transform", "optimal", "--procedure", MIXTURE, "--kl", "0.5", "--json",
                 "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["procedure"] == MIXTURE and out["n"] == 16 and out["transform"].startswith(f"optimal:procedure={MIXTURE}")
    assert out["win_rate"] == pytest.approx(theory.optimal_policy(MIXTURE, kl=0.5).win_rate(MIXTURE), abs=1e-6)
    assert plot.stat().st_size > 1000
    assert main(["theory", "--best-t", "--procedure", "bon", "--n", "4", "--kl", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["procedure"] == "bon"
    with pytest.raises(SystemExit):
        main(["theory", "--best-t", "--procedure", "mixture:0.5*standard+0.4*bon:n=4", "--kl", "0.5"])
    assert "sum to 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------- user procedures are validated (issue 20)
def _register_once(name, *args, **kwargs):
    if name not in available_procedures():
        register_procedure(name, *args, **kwargs)
    return name


def test_a_map_that_dips_only_between_the_old_grid_points_is_rejected_where_it_dips():
    """f(G) = G + 0.01·sin(2π·512·G) equals G on the 257 points of the old check (its period is 1/512) and
    decreases over half of [0, 1]; the error names an interval where it really decreases."""
    import re

    def wiggle(G):
        return G + 0.01 * np.sin(2 * np.pi * 512 * G)

    assert np.allclose(wiggle(np.linspace(0, 1, 257)), np.linspace(0, 1, 257), atol=1e-12)  # invisible there
    with pytest.raises(ProcedureError, match="'wiggle_test'.*non-decreasing.*decreases between G = ") as error:
        register_procedure("wiggle_test", wiggle)
    a, b = map(float, re.search(r"decreases between G = ([\d.e-]+) and G = ([\d.e-]+)", str(error.value)).groups())
    assert a < b and wiggle(b) < wiggle(a)
    assert "wiggle_test" not in available_procedures()  # a bad map is never registered


def test_the_non_monotone_error_says_where_f_decreases():
    """f = G + 0.3·sin(2πG) has f(0) = 0, f(1) = 1 and f' = 1 + 0.6π·cos(2πG) < 0 exactly on (0.3390, 0.6610):
    the error reports an interval inside it, not the (correct) end values."""
    import re

    lo = math.acos(-1 / (0.6 * math.pi)) / (2 * math.pi)
    with pytest.raises(ProcedureError) as error:
        register_procedure("sine_dip_test", lambda G: G + 0.3 * np.sin(2 * np.pi * G))
    message = str(error.value)
    assert "got f(0) = 0, f(1) = 1" not in message
    a, b = map(float, re.search(r"decreases between G = ([\d.e-]+) and G = ([\d.e-]+)", message).groups())
    assert lo - 1e-4 <= a < b <= 1 - lo + 1e-4
    with pytest.raises(ProcedureError, match=r"f\(0\) = 0 to f\(1\) = 1.*got f\(0\) = 0.5\.$"):
        register_procedure("offset_test", lambda G: 0.5 + 0.5 * G)


def test_a_wrong_derivative_is_caught_against_finite_differences():
    """f = G² with f' = 1 (the issue: it moved the optimal win rate from 0.792 to 0.882): the error names the
    procedure, a G where the two disagree and both values there."""
    import re

    with pytest.raises(ProcedureError, match="'square_wrong_derivative_test': derivative= disagrees") as error:
        register_procedure("square_wrong_derivative_test", lambda G: G**2, derivative=lambda G: np.ones_like(G))
    x, given, fd = map(float, re.search(r"at G = ([\d.e-]+) it gives f'\(G\) = ([\d.e-]+), but central differences "
                                        r"of output_cdf give ([\d.e-]+)", str(error.value)).groups())
    assert given == 1.0 and fd == pytest.approx(2 * x, rel=1e-4, abs=1e-9) and abs(2 * x - 1) > 0.1
    with pytest.raises(ProcedureError, match="derivative= must be >= 0"):
        register_procedure("negative_derivative_test", lambda G: G**2, derivative=lambda G: 2 * G - 0.5)
    # exact derivatives pass, also where central differences cannot resolve them (G^(10^5) near G = 1)
    _register_once("steep_bon_test", lambda G, n=100000: G**n, derivative=lambda G, n=100000: n * G ** (n - 1),
                   samples=lambda n=100000: n)
    _register_once("won7_derivative_test", lambda G: 1 - (1 - G) ** 7, derivative=lambda G: 7 * (1 - G) ** 6, samples=7)
    assert get_procedure("steep_bon_test").n == 100000 and get_procedure("won7_derivative_test").n == 7


@pytest.mark.parametrize("samples", [-2, 0, 2.5, True, float("nan")])
def test_invalid_samples_are_rejected_at_registration(samples):
    with pytest.raises(ProcedureError, match=r"samples \(the number of samples one request draws\) must be an integer >= 1"):
        register_procedure(f"bad_samples_test_{samples}", lambda G: G**2, samples=samples)


def test_samples_from_a_callable_or_against_the_map_are_checked():
    with pytest.raises(ProcedureError, match="'bad_callable_samples_test'.*must be an integer >= 1, got -2"):
        register_procedure("bad_callable_samples_test", lambda G, n=2: G**n, samples=lambda n=2: n - 4)
    with pytest.raises(ProcedureError, match="samples=2, but its polynomial has degree 3"):
        register_procedure("short_polynomial_test", polynomial=[0.0, 0.5, 0.0, 0.5], samples=2)
    with pytest.raises(ProcedureError, match="samples=1, but output_cdf is not the identity"):
        register_procedure("one_sample_square_test", lambda G: G**2, samples=1)
    assert get_procedure(_register_once("polynomial_samples_test", polynomial=[0.0, 0.5, 0.0, 0.5])).n == 3
    identity = get_procedure(_register_once("identity_map_test", lambda G: G))
    assert identity.n == 1 and identity.samples_known and identity.is_standard


def test_is_standard_is_decided_by_the_map_not_by_n():
    """A user subclass that leaves n at its default 1 but serves Best-of-3 is not plain sampling (before: it was,
    and `auto` trained the identity for it)."""
    from trl_infalign.procedures import InferenceProcedure

    class Best3(InferenceProcedure):
        def output_cdf(self, G, one_minus_G=None):
            return np.asarray(G, dtype=np.float64) ** 3

        def output_cdf_derivative(self, G, one_minus_G=None):
            return 3 * np.asarray(G, dtype=np.float64) ** 2

    assert Best3().n == 1 and not Best3().is_standard
    assert Standard().is_standard and BestOfN(1).is_standard and not BestOfN(2).is_standard
    assert get_procedure("mixture:0.5*standard+0.5*bon:n=1").is_standard
    assert not get_procedure("mixture:0.5*standard+0.5*bon:n=2").is_standard


def test_a_user_map_without_samples_is_never_trained_as_one_sample(tmp_path):
    """The docstring's own example without samples=: before, CTRLConfig trained the identity with inference_n=1 and
    said nothing (identity wins 0.805 under G^12, bon:t≈60 0.955).  Now the number of samples is unknown: a
    warning at registration, and the config refuses with the fix — also under the bare name, whose old advice
    ("set inference_n=1") led into the same trap."""
    name = "bon_of_bon_nosamples_test"
    if name not in available_procedures():
        with pytest.warns(UserWarning, match="registered without samples=.*unknown"):
            register_procedure(name, lambda G, n=2, m=2: G ** (n * m))
    assert not get_procedure(f"{name}:n=3,m=4").samples_known
    for spec, extra in ((f"{name}:n=3,m=4", {}), (name, {}), (name, {"inference_n": 1})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with pytest.raises(ValueError, match="number of samples one request draws is unknown.*samples="):
                _config(tmp_path, inference_procedure=spec, kl_budget=0.5, **extra)


def test_a_user_map_with_samples_gets_the_best_exp_transform_and_its_n(tmp_path):
    """With samples=, `auto` for f = G^12 is the theory's best exp member for Best-of-12 (the same map), at
    inference_n = 12; under a bare name the map takes inference_n as its n and inference_n becomes its sample count,
    with a warning."""
    name = _register_once("bon_of_bon_samples_test", lambda G, n=2, m=2: G ** (n * m), samples=lambda n=2, m=2: n * m)
    cfg = _config(tmp_path, inference_procedure=f"{name}:n=3,m=4", kl_budget=0.5)
    assert cfg.inference_n == 12 and cfg.resolved_transform.startswith(("bon:t=", "won:t="))
    best = theory.best_t("bon:n=12", kl=0.5)
    won = theory.policy(cfg.resolved_transform, cfg.beta).win_rate(cfg.procedure)
    assert won == pytest.approx(best.win_rate, abs=2e-4)
    assert won > theory.policy("identity", theory.beta_for_kl("identity", 0.5)).win_rate("bon:n=12") + 0.1
    with pytest.warns(UserWarning, match=f"'{name}' takes inference_n=3 as its n.*draws 6 samples"):
        bare = _config(tmp_path, inference_procedure=name, inference_n=3, transform="bon:t=5", kl_budget=0.5)
    assert (bare.inference_procedure, bare.inference_n) == (f"{name}:n=3", 6)
    assert bare.procedure == get_procedure(f"{name}:n=3") and bare.procedure.n == get_procedure("bon:n=6").n
