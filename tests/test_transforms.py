"""Tests of trl_infalign.transforms: closed forms, spec strings, registry, lsc, tabulated/optimal interpolation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import trl_infalign.transforms as transforms_module
from trl_infalign.transforms import (
    TabulatedTransform,
    Transform,
    TransformError,
    TransformParam,
    available_transforms,
    get_transform,
    parse_spec,
    register_transform,
)

C = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)


@pytest.fixture
def clean_registry():
    saved = dict(transforms_module._REGISTRY)
    yield
    transforms_module._REGISTRY.clear()
    transforms_module._REGISTRY.update(saved)


def test_builtins_registered():
    assert {"identity", "log", "bon", "won", "lsc", "optimal"} <= set(available_transforms())
    assert available_transforms() == sorted(available_transforms())


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("identity", lambda c: c),
        ("log", lambda c: np.log(np.maximum(c, 1e-3))),
        ("log:eps=0.05", lambda c: np.log(np.maximum(c, 0.05))),
        ("bon", lambda c: np.exp(10 * c)),
        ("bon:t=3.5", lambda c: np.exp(3.5 * c)),
        ("won", lambda c: -np.exp(-10 * c)),
        ("won:t=0.5", lambda c: -np.exp(-0.5 * c)),
    ],
)
def test_closed_forms(spec, expected):
    tr = get_transform(spec)
    c = C.numpy()
    want = expected(c)
    np.testing.assert_allclose(tr.phi(c), want, rtol=1e-14, atol=0)
    got64 = tr(C)
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.numpy(), want, rtol=1e-14, atol=0)
    got32 = tr(C.float())
    assert got32.dtype == torch.float32 and got32.shape == C.shape
    np.testing.assert_allclose(got32.numpy(), want, rtol=2e-6, atol=1e-6)


def test_default_parameters_and_spec():
    assert get_transform("bon").params == {"t": 10.0}
    assert get_transform("won").spec == "won:t=10"
    assert get_transform("log").params == {"eps": 1e-3}
    assert get_transform("identity").spec == "identity"
    assert str(get_transform("bon:t=2.5")) == "bon:t=2.5"
    assert repr(get_transform("bon:t=2.5")) == "BoNTransform(t=2.5)"


@pytest.mark.parametrize(
    "spec",
    ["identity", "log", "log:eps=1e-05", "bon:t=10", "bon:t=0.1", "won:t=7.25", "lsc", "lsc:centre=median",
     "lsc:centre=0.25", "optimal:procedure=won,n=8,beta=0.05", "optimal"],
)
def test_spec_round_trip(spec):
    tr = get_transform(spec)
    again = get_transform(tr.spec)
    assert again == tr and again.spec == tr.spec and hash(again) == hash(tr)
    assert get_transform(tr) is tr  # instances pass through


def test_keyword_and_spec_forms_agree():
    assert get_transform("bon", t=10) == get_transform("bon:t=10") == get_transform("bon")
    assert get_transform("bon", t=3) != get_transform("bon", t=4)
    assert get_transform("bon:t=3") != get_transform("won:t=3")
    assert get_transform("optimal", procedure="bon", n=4, beta=0.1) == get_transform("optimal:n=4,beta=0.1,procedure=bon")
    assert get_transform(" bon : t = 3 ") == get_transform("bon:t=3")
    with pytest.raises(TransformError, match="given twice"):
        get_transform("bon:t=3", t=4)
    with pytest.raises(TransformError, match="instance"):
        get_transform(get_transform("bon"), t=3)


def test_parse_spec():
    assert parse_spec("optimal:procedure=bon,n=4,beta=0.1") == ("optimal", {"procedure": "bon", "n": 4, "beta": 0.1})
    assert parse_spec("identity") == ("identity", {})
    for bad in ("bon:t", "bon:t=", "bon:=3", "bon:t=1,t=2"):
        with pytest.raises(TransformError, match="spec"):
            parse_spec(bad)
    with pytest.raises(TransformError):
        get_transform(3.0)


def test_unknown_name_lists_available():
    with pytest.raises(TransformError) as info:
        get_transform("bestofn:t=3")
    msg = str(info.value)
    assert "'bestofn'" in msg
    for name in available_transforms():
        assert name in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("bon:t=0", ["t=0", "0 < t <= 700", "Accepted parameters"]),
        ("bon:t=-1", ["t=-1", "0 < t"]),
        ("won:t=inf", ["t=inf", "finite"]),
        ("won:t=nan", ["t=nan"]),
        ("bon:t=abc", ["t='abc'", "number"]),
        ("bon:t=1000", ["t=1000", "700"]),
        ("log:eps=1", ["eps", "(0, 1)"]),
        ("log:eps=0", ["eps"]),
        ("optimal:n=0", ["n=0", "integer >= 1", "procedure", "beta"]),
        ("optimal:n=2.5", ["n=2.5", "integer"]),
        ("optimal:beta=0", ["beta=0", "> 0"]),
        ("optimal:beta=-0.1", ["beta"]),
        ("optimal:procedure=median", ["procedure='median'", "standard, bon, won"]),
        ("lsc:centre=mode", ["centre", "mean", "median"]),
        ("lsc:centre=1.5", ["centre", "[0, 1]"]),
        ("bon:s=1", ["Unknown parameter", "s", "t ("]),
        ("identity:t=1", ["Unknown parameter", "Accepted parameters: none"]),
    ],
)
def test_invalid_parameters(spec, needles):
    with pytest.raises(TransformError) as info:
        get_transform(spec)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_large_t_does_not_overflow():
    c32 = torch.linspace(0, 1, 11)
    out = get_transform("bon:t=30")(c32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out[-1].item() == pytest.approx(math.exp(30), rel=1e-6)
    assert torch.isfinite(get_transform("won:t=30")(c32)).all()
    big = get_transform("bon:t=200")(c32)  # exp(200) overflows float32: upcast
    assert big.dtype == torch.float64 and torch.isfinite(big).all()
    assert big[-1].item() == pytest.approx(math.exp(200), rel=1e-12)
    assert np.isfinite(get_transform("bon:t=700").phi(np.array([1.0]))).all()


def test_nan_propagates():
    c = torch.tensor([0.5, float("nan")])
    for spec in ("identity", "log", "bon", "won", "optimal"):
        if spec == "optimal":
            tr = TabulatedTransform([0.0, 1.0], [0.0, 1.0])
        else:
            tr = get_transform(spec)
        out = tr(c)
        assert math.isfinite(out[0].item()) and math.isnan(out[1].item()), spec


def test_log_is_bon_policy_at_beta():
    """At β = 1/(N−1), exp(Φ/β) ∝ c^{N−1}: the BoN-N density."""
    n = 5
    beta = 1.0 / (n - 1)
    c = np.linspace(0.01, 1.0, 50)
    g = np.exp(get_transform("log").phi(c) / beta)
    np.testing.assert_allclose(g / g[-1], c ** (n - 1), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# registry
def test_custom_registration(clean_registry):
    @register_transform("square_test")
    class Square(Transform):
        """Φ(c) = a·c²."""

        parameters = {"a": TransformParam(float, 1.0, check=lambda v: v > 0, valid="> 0")}

        def forward(self, c):
            return self.params["a"] * c**2

    assert "square_test" in available_transforms()
    tr = get_transform("square_test:a=2")
    assert isinstance(tr, Square) and tr.name == "square_test" and tr.spec == "square_test:a=2"
    assert torch.allclose(tr(torch.tensor([0.5, 1.0])), torch.tensor([0.5, 2.0]))
    np.testing.assert_allclose(tr.phi(np.array([0.5])), [0.5])  # default numpy phi via forward
    with pytest.raises(TransformError, match="a=0"):
        get_transform("square_test:a=0")
    with pytest.raises(ValueError, match="already registered"):
        register_transform("square_test")(Square)
    with pytest.raises(ValueError, match="already registered"):
        register_transform("bon")(Square)


def test_factory_registration(clean_registry):
    @register_transform("shifted_bon_test")
    def factory(t=2.0):
        return get_transform("bon", t=t)

    assert get_transform("shifted_bon_test:t=3") == get_transform("bon:t=3")

    @register_transform("broken_test")
    def broken():
        return 42

    with pytest.raises(TransformError, match="not a Transform"):
        get_transform("broken_test")


def test_bad_registration_names():
    with pytest.raises(ValueError):
        register_transform("a:b")
    with pytest.raises(TypeError):
        register_transform("not_a_transform_test")(int)


def test_theory_compatible_phi():
    from trl_infalign import theory

    # the BoN-4 policy: log at β = 1/3 has KL = log 4 − 3/4
    assert theory.kl_divergence(get_transform("log:eps=1e-12"), 1 / 3) == pytest.approx(math.log(4) - 0.75, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# lsc
def test_lsc_values_mean_and_median():
    rewards = torch.tensor([1.0, 0.0, 5.0])
    rows = [[0.0, 1.0, 5.0], [2.0, -2.0], [4.0]]
    tr = get_transform("lsc")
    assert tr.requires_raw_rewards
    out = tr(torch.zeros(3), rewards=rewards, ref_rewards=rows)
    centre = np.array([2.0, 0.0, 4.0])
    expected = -np.log1p(np.exp(-(rewards.numpy() - centre)))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)
    med = get_transform("lsc:centre=median")(None, rewards=rewards, ref_rewards=rows)
    np.testing.assert_allclose(med.numpy(), -np.log1p(np.exp(-(rewards.numpy() - np.array([1.0, 0.0, 4.0])))),
                               rtol=1e-6)
    q = get_transform("lsc", centre=1.0)(None, rewards=rewards, ref_rewards=rows)
    np.testing.assert_allclose(q.numpy(), -np.log1p(np.exp(-(rewards.numpy() - np.array([5.0, 2.0, 4.0])))),
                               rtol=1e-6)


def test_lsc_with_padded_tensors_and_mask():
    values = torch.tensor([[1.0, 3.0, 99.0], [0.0, 99.0, 99.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    rewards = torch.tensor([2.0, -1.0])
    out = get_transform("lsc")(None, rewards=rewards, ref_rewards=values, ref_mask=mask)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), torch.nn.functional.logsigmoid(torch.tensor([0.0, -1.0])).numpy())
    # invariant to adding a per-prompt constant to rewards and references; not to scaling
    shifted = get_transform("lsc")(None, rewards=rewards + 10, ref_rewards=values + 10, ref_mask=mask)
    assert torch.allclose(out, shifted)
    # huge rewards stay finite (log σ is computed stably)
    big = get_transform("lsc")(None, rewards=torch.tensor([-1e4, 1e4]), ref_rewards=values, ref_mask=mask)
    assert torch.isfinite(big).all() and big[1].item() == 0.0


def test_lsc_requires_raw_rewards():
    tr = get_transform("lsc")
    with pytest.raises(TransformError, match="rewards=") as info:
        tr(torch.zeros(2))
    assert "ref_rewards=" in str(info.value)
    with pytest.raises(TransformError, match="Missing: ref_rewards="):
        tr(torch.zeros(2), rewards=torch.zeros(2))
    with pytest.raises(ValueError, match="no calibrated-space form"):
        tr.phi(np.array([0.5]))
    with pytest.raises(TransformError, match="row 1"):
        tr(None, rewards=torch.zeros(2), ref_rewards=[[1.0], []])


# ---------------------------------------------------------------------------------------------------------------------
# tabulated / optimal
def test_tabulated_interpolation_matches_numpy():
    grid = np.array([0.0, 0.1, 0.15, 0.5, 0.9, 1.0])
    values = np.array([-2.0, 0.0, 3.0, 1.0, 1.5, 7.0])
    tr = TabulatedTransform(grid, values)
    c = np.concatenate([np.linspace(-0.2, 1.2, 301), grid])  # includes knots and out-of-range points
    expected = np.interp(c, grid, values)
    np.testing.assert_allclose(tr.phi(c), expected, rtol=0, atol=1e-14)
    np.testing.assert_allclose(tr(torch.tensor(c)).numpy(), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tr(torch.tensor(c, dtype=torch.float32)).numpy(), expected, rtol=1e-6, atol=1e-5)
    assert tr(torch.tensor([0.05])).item() == pytest.approx(-1.0)  # halfway between the first two knots
    with pytest.raises(TransformError, match="increasing"):
        TabulatedTransform([0.0, 0.5, 0.5, 1.0], [0, 1, 2, 3])
    with pytest.raises(TransformError, match="same length"):
        TabulatedTransform([0.0, 1.0], [0.0])


def test_optimal_uses_the_solver_table(monkeypatch):
    import trl_infalign.optimal as optimal

    grid = np.linspace(0.0, 1.0, 11) ** 2
    log_density = np.sin(3 * grid) - 0.5
    calls = []

    def fake_solve_optimal(procedure, beta):
        calls.append((procedure.spec, beta))
        return SimpleNamespace(grid=grid, transform_values=lambda: beta * log_density)

    monkeypatch.setattr(optimal, "solve_optimal", fake_solve_optimal)
    tr = get_transform("optimal", procedure="won", n=8, beta=0.25)
    assert calls == []  # lazy
    c = np.linspace(0, 1, 57)
    expected = 0.25 * np.interp(c, grid, log_density)
    np.testing.assert_allclose(tr(torch.tensor(c)).numpy(), expected, rtol=0, atol=1e-14)
    np.testing.assert_allclose(tr.phi(c), expected, rtol=0, atol=1e-14)
    tr(torch.tensor(c, dtype=torch.float32))
    assert calls == [("won:n=8", 0.25)]  # cached per instance
    assert tr.spec == "optimal:procedure=won,n=8,beta=0.25"


def test_optimal_with_real_theory():
    theory = pytest.importorskip("trl_infalign.theory")
    if not hasattr(theory, "optimal_policy"):
        pytest.skip("theory.optimal_policy not available yet")
    tr = get_transform("optimal:procedure=bon,n=4,beta=0.1")
    pol = theory.optimal_policy("bon", 4, 0.1)
    c = np.linspace(0, 1, 201)
    np.testing.assert_allclose(tr.phi(c), 0.1 * np.interp(c, pol.grid, pol.log_density), atol=1e-12)
    # Φ* is increasing for BoN
    assert np.all(np.diff(tr.phi(c)) >= -1e-12)
    # standard procedure: Φ* is the identity up to a constant
    std = get_transform("optimal:procedure=standard,n=1,beta=0.5").phi(c)
    np.testing.assert_allclose(std - std[0], c, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# raw-reward baselines: par, raw
def test_par_values_ragged_and_masked():
    tr = get_transform("par")
    assert tr.requires_raw_rewards and tr.spec == "par" and "par" in available_transforms()
    rewards = torch.tensor([1.0, 0.0, 5.0])
    rows = [[0.0, 1.0, 5.0], [2.0, -2.0], [4.0]]
    out = tr(torch.zeros(3), rewards=rewards, ref_rewards=rows)
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))  # noqa: E731
    expected = [np.mean(sigmoid(r - np.array(row))) for r, row in zip(rewards.tolist(), rows)]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    values = torch.tensor([[1.0, 3.0, 99.0], [0.0, 99.0, 99.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    padded = tr(None, rewards=torch.tensor([2.0, -1.0]), ref_rewards=values, ref_mask=mask)
    assert padded.dtype == torch.float32
    np.testing.assert_allclose(padded.numpy(), [0.5 * (sigmoid(1.0) + sigmoid(-1.0)), sigmoid(-1.0)], rtol=1e-6)
    # numpy form (used by `trl-infalign diagnose`): M rewards per prompt, same values
    shaped = tr.shaped(np.array([[2.0, 0.0], [-1.0, 7.0]]), values.numpy(), mask.numpy(), chunk_elements=3)
    np.testing.assert_allclose(shaped[:, 0], padded.numpy(), rtol=1e-6)
    np.testing.assert_allclose(shaped[1, 1], sigmoid(7.0), rtol=1e-12)
    # bounded in (0, 1), invariant to a per-prompt offset, not to a scale; huge rewards stay finite
    shifted = tr(None, rewards=torch.tensor([12.0, 9.0]), ref_rewards=values + 10, ref_mask=mask)
    assert torch.allclose(padded, shifted)
    scaled = tr(None, rewards=torch.tensor([20.0, -10.0]), ref_rewards=values * 10, ref_mask=mask)
    assert not torch.allclose(padded, scaled)
    big = tr(None, rewards=torch.tensor([-1e6, 1e6]), ref_rewards=values, ref_mask=mask)
    assert big.tolist() == [0.0, 1.0]


def test_par_and_raw_errors():
    par, raw = get_transform("par"), get_transform("raw")
    with pytest.raises(TransformError, match="Missing: ref_rewards="):
        par(torch.zeros(2), rewards=torch.zeros(2))
    with pytest.raises(TransformError, match="Missing: rewards="):
        raw(torch.zeros(2))
    with pytest.raises(TransformError, match="row 1"):
        par(None, rewards=torch.zeros(2), ref_rewards=[[1.0], []])
    with pytest.raises(TransformError, match="2 rows of reference rewards"):
        par(None, rewards=torch.zeros(3), ref_rewards=[[1.0], [2.0]])
    for tr in (par, raw):
        with pytest.raises(ValueError, match="no calibrated-space form"):
            tr.phi(np.array([0.5]))


def test_raw_is_the_reward():
    tr = get_transform("raw")
    assert tr.requires_raw_rewards and tr.spec == "raw"
    rewards = torch.tensor([1.5, -2.0], dtype=torch.float64)
    out = tr(torch.tensor([0.1, 0.9]), rewards=rewards, ref_rewards=[[0.0], [1.0]])
    assert out.dtype == torch.float64 and out.tolist() == [1.5, -2.0] and out is not rewards
    assert tr(None, rewards=[1, 2]).dtype == torch.float32
    np.testing.assert_array_equal(tr.shaped(np.array([[1.0, 2.0]])), [[1.0, 2.0]])
