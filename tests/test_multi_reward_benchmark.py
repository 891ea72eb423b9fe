"""The exact metrics of benchmarks/multi_reward.py against brute force: each component's win rate by enumerating
every N-tuple of samples on both sides, the deployment objective, KL, mid-ranks, the normalised shape and the
stratified atoms. Pure numpy, no training (the benchmark itself is not run in CI)."""

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mr():
    spec = importlib.util.spec_from_file_location("multi_reward", ROOT / "benchmarks" / "multi_reward.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["multi_reward"] = module
    spec.loader.exec_module(module)
    return module


def brute_force_win_rate(pi, pi_ref, rewards, n: int, pick) -> float:
    """P(X > Y) + ½ P(X = Y), X = pick (max / min) of the rewards of n i.i.d. tokens from π, Y the same from π_ref,
    by enumerating every ordered n-tuple of tokens on each side."""
    def law(p):
        out: dict[float, float] = {}
        for tup in itertools.product(range(len(p)), repeat=n):
            value = pick(rewards[i] for i in tup)
            out[value] = out.get(value, 0.0) + math.prod(p[i] for i in tup)
        return out

    a, b = law(pi), law(pi_ref)
    return sum(pa * pb * (1.0 if x > y else 0.5 if x == y else 0.0) for x, pa in a.items() for y, pb in b.items())


def random_case(seed: int, size: int = 5):
    rng = np.random.default_rng(seed)
    pi, pi_ref = rng.dirichlet(np.ones(size)), rng.dirichlet(np.ones(size))
    r1 = rng.normal(size=size)
    r2 = rng.integers(0, 3, size=size).astype(float)  # ties on the second reward
    r1[1] = r1[3]  # and one tie on the first
    return pi, pi_ref, r1, r2


@pytest.mark.parametrize("seed", [0, 1])
def test_component_win_rates_match_brute_force(mr, seed):
    pi, pi_ref, r1, r2 = random_case(seed)
    for rewards in (r1, r2):
        for n in (1, 2, 4):
            assert mr.procedure_win_rate(pi, pi_ref, rewards, f"bon:n={n}") == pytest.approx(
                brute_force_win_rate(pi, pi_ref, rewards, n, max), abs=1e-12)
            assert mr.procedure_win_rate(pi, pi_ref, rewards, f"won:n={n}") == pytest.approx(
                brute_force_win_rate(pi, pi_ref, rewards, n, min), abs=1e-12)
        # a mixture on one reward is the weighted sum of its components
        assert mr.procedure_win_rate(pi, pi_ref, rewards, "mixture:0.25*standard+0.75*won:n=4") == pytest.approx(
            0.25 * brute_force_win_rate(pi, pi_ref, rewards, 1, max)
            + 0.75 * brute_force_win_rate(pi, pi_ref, rewards, 4, min), abs=1e-12)
    # against itself every procedure wins half the time
    assert mr.procedure_win_rate(pi_ref, pi_ref, r2, "won:n=4") == pytest.approx(0.5, abs=1e-12)


def test_deployment_metrics_and_kl_match_brute_force(mr):
    pi, pi_ref, r1, r2 = random_case(2)
    spec = "mixture:0.3*bon:n=4@helpful+0.7*won:n=4@harmless"
    m = mr.exact_deployment_metrics(pi, pi_ref, {"helpful": r1, "harmless": r2}, spec)
    bon = brute_force_win_rate(pi, pi_ref, r1, 4, max)
    won = brute_force_win_rate(pi, pi_ref, r2, 4, min)
    assert m["bon@4_win_rate/helpful"] == pytest.approx(bon, abs=1e-12)
    assert m["won@4_win_rate/harmless"] == pytest.approx(won, abs=1e-12)
    assert m["objective"] == pytest.approx(0.3 * bon + 0.7 * won, abs=1e-12)
    assert m["kl"] == pytest.approx(sum(p * math.log(p / q) for p, q in zip(pi, pi_ref)), abs=1e-12)
    # zero-probability tokens of π drop out of the KL; the mean over prompts is the plain mean
    pi0 = pi.copy()
    pi0[0] = 0.0
    pi0 /= pi0.sum()
    assert mr.exact_kl(pi0, pi_ref) == pytest.approx(sum(p * math.log(p / q) for p, q in zip(pi0, pi_ref) if p > 0))
    mean, per = mr.mean_exact_metrics(np.stack([pi, pi_ref]), np.stack([pi_ref, pi_ref]),
                                      {"helpful": np.stack([r1, r1]), "harmless": np.stack([r2, r2])}, spec)
    assert per[1]["objective"] == pytest.approx(0.5, abs=1e-12) and per[1]["kl"] == pytest.approx(0.0, abs=1e-12)
    assert mean["objective"] == pytest.approx((m["objective"] + 0.5) / 2, abs=1e-12)


def test_mid_ranks_normalisation_tilt_and_atoms(mr):
    refs = [0.0, 1.0, 1.0, 3.0]
    values = [-1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    by_loop = [(sum(x < v for x in refs) + 0.5 * sum(x == v for x in refs)) / len(refs) for v in values]
    assert mr.mid_ranks(values, refs).tolist() == pytest.approx(by_loop)
    z = mr.normalized_values(values, refs)
    assert z.tolist() == pytest.approx([(v - np.mean(refs)) / np.std(refs) for v in values])
    assert mr.normalized_values(values, [2.0, 2.0]).tolist() == [0.0] * len(values)  # constant references: 0
    pi_ref, phi, beta = np.array([0.2, 0.3, 0.5]), np.array([1.0, -2.0, 0.5]), 0.7
    expected = pi_ref * np.exp(phi / beta)
    assert mr.tilt(pi_ref, phi, beta).tolist() == pytest.approx((expected / expected.sum()).tolist(), rel=1e-12)
    # stratified atoms: every token's count is within 1 of K·π_ref
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(30))
    counts = np.bincount(mr.systematic_atoms(p, 256), minlength=30)
    assert counts.sum() == 256 and np.max(np.abs(counts - 256 * p)) < 1.0


def test_shaped_references_are_the_shapes_of_the_atoms(mr):
    refs = {"helpful": [[0.0, 2.0, 4.0]], "harmless": [[10.0, 10.0, 40.0]]}
    weights = {"helpful": 0.5, "harmless": 0.5}
    assert mr.shaped_references("raw_sum", refs, weights) == [[5.0, 6.0, 22.0]]
    assert mr.shaped_references("calibrated_sum", refs, weights) == [[10.0, 12.0, 44.0]]
    z1 = (np.array([0.0, 2.0, 4.0]) - 2.0) / np.std([0.0, 2.0, 4.0])
    z2 = (np.array([10.0, 10.0, 40.0]) - 20.0) / np.std([10.0, 10.0, 40.0])
    assert mr.shaped_references("normalized_sum", refs, weights)[0] == pytest.approx((0.5 * z1 + 0.5 * z2).tolist())
    # the normalized_sum reward callable reads the per-reward references of its rows
    funcs = {"helpful": lambda completions, **kw: [float(len(c)) for c in completions],
             "harmless": lambda completions, **kw: [10.0 * len(c) for c in completions]}
    reward = mr.shaped_reward("normalized_sum", funcs, weights)
    row = {"helpful": refs["helpful"][0], "harmless": refs["harmless"][0]}
    out = reward(prompts=["p", "p"], completions=["aa", "aaaa"], completion_ids=[[1], [1]], ref_by_reward=[row, row])
    assert out == pytest.approx([0.5 * (2 - 2.0) / np.std([0, 2, 4]) + 0.5 * (20 - 20.0) / np.std([10, 10, 40]),
                                 0.5 * (4 - 2.0) / np.std([0, 2, 4]) + 0.5 * (40 - 20.0) / np.std([10, 10, 40])])
    assert reward.__name__ == "normalized_sum"
