"""Inference-time win-rate estimator (exactness, closed forms, CI coverage), KL estimators, evaluate_policy, CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from trl_infalign.cli import main as cli_main
from trl_infalign.evaluation import (
    EvaluationResult,
    evaluate_policy,
    evaluate_scored,
    inference_win_rate,
    kl_estimates,
    per_prompt_win_rates,
)
from trl_infalign.tiny import build_tiny_policy, build_tiny_reward_model, build_tokenizer


# ------------------------------------------------------------------------------------------------ exact estimator
def brute_force(a, b, n, procedure):
    """Average over every N-subset of each side of 1[X_a > X_b] + ½ 1[X_a = X_b] (NaN = missing sample)."""
    a = [x for x in a if not math.isnan(x)]
    b = [x for x in b if not math.isnan(x)]
    pick = {"bon": max, "won": min, "standard": max}[procedure]
    n = 1 if procedure == "standard" else n
    total = count = 0
    for sa in itertools.combinations(a, n):
        for sb in itertools.combinations(b, n):
            x, y = pick(sa), pick(sb)
            total += (x > y) + 0.5 * (x == y)
            count += 1
    return total / count


@pytest.mark.parametrize("procedure", ["bon", "won", "standard"])
def test_all_subsets_matches_brute_force_with_ties(procedure):
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(40):
        m_a, m_b = rng.integers(1, 8, size=2)
        # few distinct values: ties within each side and across sides
        a = rng.integers(0, 4, size=m_a).astype(float)
        b = rng.integers(0, 4, size=m_b).astype(float)
        for n in range(1, min(m_a, m_b) + 1):
            got = per_prompt_win_rates(a[None], b[None], n, procedure)[0]
            assert got == pytest.approx(brute_force(a, b, n, procedure), abs=1e-12), (a, b, n)
            checked += 1
    assert checked > 60


@pytest.mark.parametrize("procedure", ["bon", "won"])
def test_vectorised_rows_with_missing_samples_match_brute_force(procedure):
    rng = np.random.default_rng(2)
    P, m = 12, 7
    a = rng.normal(size=(P, m)).round(1)
    b = rng.normal(size=(P, m + 2)).round(1)
    a[rng.random((P, m)) < 0.2] = np.nan  # missing samples
    a[:, :3] = rng.normal(size=(P, 3)).round(1)  # at least 3 valid per row
    b[rng.random((P, m + 2)) < 0.2] = np.nan
    b[:, :3] = rng.normal(size=(P, 3)).round(1)
    for n in (1, 2, 3):
        got = per_prompt_win_rates(torch.tensor(a), b, n, procedure)  # torch and numpy inputs
        want = [brute_force(a[p], b[p], n, procedure) for p in range(P)]
        np.testing.assert_allclose(got, want, atol=1e-12)
        res = inference_win_rate(a, b, n, procedure, num_bootstrap=50)
        assert res.estimate == pytest.approx(np.mean(want), abs=1e-12)


def test_large_m_no_overflow_and_symmetry():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 3000)).round(2)  # many ties
    for procedure in ("bon", "won"):
        res = inference_win_rate(x, x.copy(), 1000, procedure, num_bootstrap=20)
        np.testing.assert_allclose(res.per_prompt, 0.5, atol=1e-9)  # identical samples: exactly ½ by symmetry
    shifted = inference_win_rate(x + 10.0, x, 2500, "won", num_bootstrap=0)
    assert shifted.estimate == 1.0 and math.isnan(shifted.ci_low)


def test_standard_ignores_n_and_equals_n1():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(20, 6)), rng.normal(size=(20, 5))
    std = inference_win_rate(a, b, 4, "standard", num_bootstrap=0)
    assert std.n == 1 and std.procedure == "standard"
    assert std.estimate == pytest.approx(inference_win_rate(a, b, 1, "bon", num_bootstrap=0).estimate, abs=1e-14)
    assert std.estimate == pytest.approx(np.mean(a[:, :, None] > b[:, None, :]), abs=1e-12)


# ------------------------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("N", [2, 4])
def test_bon_policy_closed_forms(N):
    """Policy c ~ Beta(N, 1) (the BoN-N policy, g = N c^{N−1}) vs reference c ~ U(0, 1): standard and BoN-N win rate
    are both N/(N+1) (notes §2)."""
    rng = np.random.default_rng(N)
    P, m = 1500, 16
    policy = rng.beta(N, 1, size=(P, m))
    reference = rng.uniform(size=(P, m))
    truth = N / (N + 1)
    for procedure in ("standard", "bon"):
        res = inference_win_rate(policy, reference, N, procedure, num_bootstrap=300)
        assert res.ci_low < res.estimate < res.ci_high
        half = (res.ci_high - res.ci_low) / 2
        assert abs(res.estimate - truth) < 2.5 * half, (procedure, res.estimate, truth)
    # WoN-N of the BoN-N policy: ∫ (1 − (1−c)^N) d(1 − (1−G)^N) with G = c^N, by quadrature
    c = np.linspace(0, 1, 200_001)
    integrand = (1 - (1 - c) ** N) * N * (1 - c**N) ** (N - 1) * N * c ** (N - 1)
    won_truth = float(np.sum((integrand[1:] + integrand[:-1]) / 2) * (c[1] - c[0]))
    res = inference_win_rate(policy, reference, N, "won", num_bootstrap=300)
    assert abs(res.estimate - won_truth) < 2.5 * (res.ci_high - res.ci_low) / 2
    assert won_truth > truth  # the BoN policy gains even more at WoN (its lower tail moved most)


def test_against_theory_module_when_available():
    theory = pytest.importorskip("trl_infalign.theory")
    if not hasattr(theory, "CalibratedPolicy"):
        pytest.skip("theory.CalibratedPolicy not available")
    N = 4
    pol = theory.CalibratedPolicy.bon_policy(N)
    rng = np.random.default_rng(7)
    policy, reference = rng.beta(N, 1, size=(1500, 16)), rng.uniform(size=(1500, 16))
    for procedure in ("standard", "bon", "won"):
        res = inference_win_rate(policy, reference, N, procedure, num_bootstrap=300)
        assert abs(res.estimate - pol.win_rate(procedure, N)) < 2.5 * (res.ci_high - res.ci_low) / 2


def test_identical_distributions_give_half():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(1500, 16)), rng.normal(size=(1500, 16))
    for procedure, n in (("standard", 1), ("bon", 8), ("won", 8)):
        res = inference_win_rate(a, b, n, procedure, num_bootstrap=300)
        assert res.ci_low < 0.5 < res.ci_high or abs(res.estimate - 0.5) < 0.01


def test_ci_coverage():
    """Over repeated simulated datasets the 95% bootstrap CI covers the true BoN-4 win rate (4/5) most of the time."""
    rng = np.random.default_rng(6)
    N, truth, trials, covered = 4, 0.8, 120, 0
    for t in range(trials):
        policy, reference = rng.beta(N, 1, size=(60, 8)), rng.uniform(size=(60, 8))
        res = inference_win_rate(policy, reference, N, "bon", num_bootstrap=200, seed=t)
        covered += res.ci_low <= truth <= res.ci_high
    assert covered / trials >= 0.85, covered / trials


def test_all_subsets_has_lower_variance_than_one_random_draw():
    rng = np.random.default_rng(8)
    N, P, m, reps = 4, 50, 16, 60
    exact, single = [], []
    for _ in range(reps):
        a, b = rng.beta(N, 1, size=(P, m)), rng.uniform(size=(P, m))
        exact.append(inference_win_rate(a, b, N, "bon", num_bootstrap=0).estimate)
        pick = lambda x: np.array([row[rng.choice(m, N, replace=False)].max() for row in x])  # noqa: E731
        single.append(np.mean(pick(a) > pick(b)))
    assert np.var(exact) < 0.6 * np.var(single)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(policy_rewards=np.zeros((3, 4)), reference_rewards=np.zeros((2, 4)), n=2), "policy_rewards has 3 prompts"),
        (dict(policy_rewards=np.zeros((3, 2)), reference_rewards=np.zeros((3, 4)), n=4), "policy_rewards has only 2"),
        (dict(policy_rewards=np.zeros((3, 4)), reference_rewards=np.zeros((3, 3)), n=4), "reference_rewards has only 3"),
        (dict(policy_rewards=np.zeros((3, 4)), reference_rewards=np.zeros((3, 4)), n=0), "n must be"),
        (dict(policy_rewards=np.zeros((3, 4)), reference_rewards=np.zeros((3, 4)), n=2, procedure="top"), "procedure"),
        (dict(policy_rewards=np.array([[0.0, np.inf]]), reference_rewards=np.zeros((1, 2)), n=1), "policy_rewards contains non-finite"),
        (dict(policy_rewards=np.zeros(4), reference_rewards=np.zeros((1, 4)), n=1), "policy_rewards must have shape"),
        (dict(policy_rewards=np.array([[0.0, np.nan, np.nan]]), reference_rewards=np.zeros((1, 4)), n=2), "policy_rewards has only 1"),
    ],
)
def test_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        inference_win_rate(**kwargs)


# ------------------------------------------------------------------------------------------------ KL
def test_kl_estimators_on_categoricals():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    kl = float(np.sum(p * np.log(p / q)))
    rng = np.random.default_rng(0)
    y = rng.choice(4, size=200_000, p=p)
    k1, k3 = kl_estimates(np.log(p)[y], torch.tensor(np.log(q)[y]))
    assert k1 == pytest.approx(kl, abs=0.005) and k3 == pytest.approx(kl, abs=0.005)
    # exact expectations over y ~ p (weighting each category by p): both estimators are unbiased
    rho = q / p
    assert float(np.sum(p * ((rho - 1) - np.log(rho)))) == pytest.approx(kl, abs=1e-12)
    # same distribution: both exactly 0; k3 is non-negative term by term
    assert kl_estimates(np.log(p)[y], np.log(p)[y]) == (0.0, 0.0)
    small = y[:5]
    assert kl_estimates(np.log(q)[small], np.log(p)[small])[1] >= 0
    with pytest.raises(ValueError, match="shape"):
        kl_estimates(np.zeros(3), np.zeros(4))


# ------------------------------------------------------------------------------------------------ evaluate_scored
def test_evaluate_scored_rows_kl_and_outputs(tmp_path):
    rng = np.random.default_rng(9)
    a, b = rng.beta(2, 1, size=(40, 8)), rng.uniform(size=(40, 8))
    lp = rng.normal(-5, 1, size=(40, 8))
    with pytest.warns(UserWarning, match="16"):
        res = evaluate_scored(a, b, ns=(1, 2, 4, 8, 16), policy_logps=lp, reference_logps=lp - 0.1, num_bootstrap=100)
    assert isinstance(res, EvaluationResult)
    keys = [(r["procedure"], r["n"]) for r in res.win_rates]
    assert keys == [("standard", 1)] + [(p, n) for p in ("bon", "won") for n in (1, 2, 4, 8)]
    assert set(res.win_rates[0]) >= {"procedure", "n", "estimate", "ci_low", "ci_high"}
    assert res.win_rate("bon", 4)["estimate"] == pytest.approx(inference_win_rate(a, b, 4).estimate)
    assert res.kl_k1 == pytest.approx(0.1) and res.kl_k1_ci[0] <= 0.1 + 1e-9 <= res.kl_k1_ci[1] + 2e-9
    assert res.kl_k3 == pytest.approx(math.exp(-0.1) - 1 + 0.1)
    metrics = res.metrics("eval_infalign/")
    assert {"eval_infalign/bon@4_win_rate", "eval_infalign/standard_win_rate", "eval_infalign/kl_k3"} <= set(metrics)
    data = json.loads(res.to_json(tmp_path / "e.json", per_prompt=True))
    assert json.loads((tmp_path / "e.json").read_text()) == data
    assert len(data["per_prompt"]["won@2_win_rate"]) == 40 and data["kl"]["k1"]["estimate"] == pytest.approx(0.1)
    md = res.to_markdown()
    assert "| bon | 4 |" in md and "k3" in md
    res.plot(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="Nothing to evaluate"):
        evaluate_scored(a, b, ns=(16,), procedures=("bon",))


# ------------------------------------------------------------------------------------------------ end to end
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "hello world, how are you", "good morning to you all"]
PROMPTS = ["the cat", "a dog", "hello", "good morning", "the mat", "a park"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    tokenizer = build_tokenizer(TEXTS * 4, vocab_size=300)
    policy = build_tiny_policy(tokenizer, root / "policy", hidden_size=32, num_layers=1, seed=0)
    other = build_tiny_policy(tokenizer, root / "other", hidden_size=32, num_layers=1, seed=1)
    build_tiny_reward_model(tokenizer, root / "reward", hidden_size=16)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    return {"root": root, "tokenizer": tokenizer, "policy": policy, "other": other, "reward": str(root / "reward"), "data": data}


def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_evaluate_policy_same_model_is_half_and_zero_kl(tiny):
    res = evaluate_policy(
        tiny["policy"], tiny["policy"], [tiny["reward"]], PROMPTS, num_samples=8, ns=(1, 2, 4, 8, 16, 32),
        max_new_tokens=6, num_bootstrap=300, progress=False,
    )
    assert [(r["procedure"], r["n"]) for r in res.win_rates][-1] == ("won", 8)  # ns filtered to <= num_samples
    for row in res.win_rates:
        assert row["ci_low"] <= 0.5 <= row["ci_high"], row
    assert res.kl_k1 == 0.0 and res.kl_k3 == 0.0
    assert res.num_prompts == 6 and res.num_samples_policy == 8


def test_evaluate_policy_different_models_and_dataset_columns(tiny):
    seen = {}

    def topic_reward(prompts, completions, topic, **kwargs):
        seen["topic"] = topic
        return [float(t == "cat") + 0.1 * len(c) for t, c in zip(topic, completions)]

    dataset = Dataset.from_dict({"prompt": PROMPTS, "topic": ["cat", "dog", "x", "y", "cat", "dog"]})
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny["policy"])  # a loaded model works as well as a path
    res = evaluate_policy(
        tiny["other"], ref, [topic_reward, length_reward], dataset, reward_weights=[1.0, 0.5], num_samples=4,
        ns=(2, 4), procedures=("bon",), max_new_tokens=6, num_bootstrap=100, progress=False,
    )
    assert len(seen["topic"]) == 6 * 4 and seen["topic"][:4] == ["cat"] * 4
    assert [(r["procedure"], r["n"]) for r in res.win_rates] == [("bon", 2), ("bon", 4)]
    assert res.kl_k3 > 0 and math.isfinite(res.kl_k1)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_scored(tmp_path, capsys):
    rng = np.random.default_rng(10)
    policy = rng.beta(2, 1, size=(30, 8)).tolist()
    policy[0][3] = None  # missing sample
    scored = {"policy_rewards": policy, "reference_rewards": rng.uniform(size=(30, 8)).tolist()}
    path = tmp_path / "scored.json"
    path.write_text(json.dumps(scored))
    out = tmp_path / "out"
    assert cli_main(["evaluate", "--scored", str(path), "--n", "1", "2", "4", "--num-bootstrap", "100", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| bon | 4 |" in printed
    data = json.loads((out / "evaluation.json").read_text())
    assert {"win_rates", "kl", "num_prompts", "num_samples_policy", "num_samples_reference", "confidence"} <= set(data)
    assert data["kl"] is None and data["num_prompts"] == 30
    assert {(r["procedure"], r["n"]) for r in data["win_rates"]} == {("standard", 1)} | {(p, n) for p in ("bon", "won") for n in (1, 2, 4)}
    assert (out / "evaluation.md").read_text().startswith("# Inference-time win rates")
    assert (out / "win_rate_vs_n.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--scored", str(path), "--model", "some-model", "--output", str(out)])


def test_cli_models(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main([
        "evaluate", "--model", tiny["other"], "--ref-model", tiny["policy"], "--reward-model", tiny["reward"],
        "--dataset", str(tiny["data"]), "--prompt-column", "text", "--num-prompts", "4", "--num-samples", "4",
        "--n", "1", "2", "4", "8", "--max-new-tokens", "5", "--num-bootstrap", "50", "--no-progress", "--output", str(out),
    ])
    assert code == 0
    data = json.loads((out / "evaluation.json").read_text())
    assert data["num_prompts"] == 4 and data["num_samples_policy"] == 4
    assert set(data["kl"]) == {"k1", "k3"} and data["kl"]["k3"]["estimate"] > 0
    assert max(r["n"] for r in data["win_rates"]) == 4
    assert (out / "evaluation.md").exists() and (out / "win_rate_vs_n.png").exists()
    assert "standard" in capsys.readouterr().out
