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
    SkippedNWarning,
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
    # exact: a "sample" holding each category in proportion to p (20 = 10 + 6 + 3 + 1) has sample means equal to the
    # expectations over y ~ p, so both estimators must return KL(p‖q) itself (unbiased means exactly this)
    y = np.repeat(np.arange(4), (p * 20).round().astype(int))
    k1, k3 = kl_estimates(np.log(p)[y], torch.tensor(np.log(q)[y]))
    assert k1 == pytest.approx(kl, abs=1e-12) and k3 == pytest.approx(kl, abs=1e-12)
    # the reverse direction is a different number: KL(q‖p) from samples of q
    y_q = np.repeat(np.arange(4), 5)
    assert kl_estimates(np.log(q)[y_q], np.log(p)[y_q]) == pytest.approx(
        (float(np.sum(q * np.log(q / p))),) * 2, abs=1e-12)
    # Monte Carlo: y ~ p
    rng = np.random.default_rng(0)
    sample = rng.choice(4, size=200_000, p=p)
    k1, k3 = kl_estimates(np.log(p)[sample], torch.tensor(np.log(q)[sample]))
    assert k1 == pytest.approx(kl, abs=0.005) and k3 == pytest.approx(kl, abs=0.005)
    # NaN entries are ignored: the same numbers as without them; all NaN is an error
    with_nan_p, with_nan_q = np.append(np.log(p)[y], [np.nan, -1.0]), np.append(np.log(q)[y], [-1.0, np.nan])
    assert kl_estimates(with_nan_p, with_nan_q) == pytest.approx((kl, kl), abs=1e-12)
    with pytest.raises(ValueError, match="no valid"):
        kl_estimates(np.full(3, np.nan), np.zeros(3))
    # same distribution: both exactly 0; k3 is non-negative term by term
    assert kl_estimates(np.log(p)[sample], np.log(p)[sample]) == (0.0, 0.0)
    small = sample[:5]
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
    with pytest.warns(SkippedNWarning, match=r"N = \[16, 32\]"):
        res = evaluate_policy(
            tiny["policy"], tiny["policy"], [tiny["reward"]], PROMPTS, num_samples=8, ns=(1, 2, 4, 8, 16, 32),
            max_new_tokens=6, num_bootstrap=300, progress=False,
        )
    assert [(r["procedure"], r["n"]) for r in res.win_rates][-1] == ("won", 8)  # ns filtered to <= num_samples
    assert res.metadata["policy"] == res.metadata["reference"] == tiny["policy"]  # it *is* the reference
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
    assert cli_main(["evaluate", "--scored", str(path), "--n", "1", "2", "4", "16", "--num-bootstrap", "100",
                     "--output", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "| bon | 4 |" in printed
    # N = 16 > 8 samples: dropped, and said so on stderr with the fix
    assert "warning: Skipping N = [16]" in captured.err and "m >= N" in captured.err
    data = json.loads((out / "evaluation.json").read_text())
    assert {"win_rates", "kl", "num_prompts", "num_samples_policy", "num_samples_reference", "confidence"} <= set(data)
    assert data["kl"] is None and data["num_prompts"] == 30
    assert {(r["procedure"], r["n"]) for r in data["win_rates"]} == {("standard", 1)} | {(p, n) for p in ("bon", "won") for n in (1, 2, 4)}
    assert (out / "evaluation.md").read_text().startswith("# Inference-time win rates")
    assert (out / "win_rate_vs_n.png").stat().st_size > 1000
    # each refusal is a failing exit: SystemExit(message) exits with status 1, SystemExit(0) or (None) would be success
    with pytest.raises(SystemExit, match="--scored replaces --model/--ref-model/--reward-model/--dataset") as exit_:
        cli_main(["evaluate", "--scored", str(path), "--model", "some-model", "--output", str(out)])
    assert exit_.value.code not in (0, None)
    with pytest.raises(SystemExit, match="with --scored the samples were drawn elsewhere: drop --temperature") as exit_:
        cli_main(["evaluate", "--scored", str(path), "--temperature", "0.7", "--output", str(out)])
    assert exit_.value.code not in (0, None)
    with pytest.raises(SystemExit, match="Nothing to evaluate.*N = \\[16\\]") as exit_:
        cli_main(["evaluate", "--scored", str(path), "--n", "16", "--procedures", "bon", "--output", str(out)])
    assert exit_.value.code not in (0, None)


def test_cli_models(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main([
        "evaluate", "--model", tiny["other"], "--ref-model", tiny["policy"], "--reward-model", tiny["reward"],
        "--dataset", str(tiny["data"]), "--prompt-column", "text", "--num-prompts", "4", "--num-samples", "4",
        "--n", "1", "2", "4", "8", "--max-new-tokens", "5", "--num-bootstrap", "50", "--no-progress", "--output", str(out),
        "--top-p", "0.999",
    ])
    assert code == 0
    captured = capsys.readouterr()
    # N = 8 > --num-samples 4: a warning line on stderr naming the dropped N and the fix
    assert "warning: skipping --n 8" in captured.err and "--num-samples 8" in captured.err
    assert "standard" in captured.out and "KL per completion (k1, nats)" in captured.out
    data = json.loads((out / "evaluation.json").read_text())
    # the metadata names the evaluated model (the --model path) and the sampling settings
    md = data["metadata"]
    assert md["policy"] == tiny["other"] and md["reference"] == tiny["policy"]
    assert (md["temperature"], md["top_p"], md["top_k"]) == (1.0, 0.999, 0) and md["ns_skipped"] == [8]
    assert data["kl_per_completion"]["estimate"] == data["kl"]["k1"]["estimate"]
    assert data["num_prompts"] == 4 and data["num_samples_policy"] == 4
    assert set(data["kl"]) == {"k1", "k3"} and data["kl"]["k3"]["estimate"] > 0
    assert max(r["n"] for r in data["win_rates"]) == 4
    assert (out / "evaluation.md").exists() and (out / "win_rate_vs_n.png").exists()


def test_cli_refuses_when_every_n_exceeds_num_samples_and_bad_sampling_flags(tmp_path, capsys):
    common = ["evaluate", "--model", "m", "--ref-model", "r", "--reward-model", "rm", "--dataset", "d.jsonl",
              "--output", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"--num-samples 16"):
        cli_main(common + ["--num-samples", "4", "--n", "16", "--procedures", "bon"])
    for flag, value in (("--temperature", "0"), ("--top-p", "1.5"), ("--top-k", "-1")):
        with pytest.raises(SystemExit):
            cli_main(common + [flag, value])
        assert flag in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ KL units and CI
def test_k1_ci_brackets_estimate_and_matches_brute_force_bootstrap(tmp_path):
    """The headline KL is k1 per completion (nats) with a percentile bootstrap CI over prompts, same seed as the win
    rates: recompute it by hand (per-prompt means, resampled prompts, quantiles)."""
    rng = np.random.default_rng(11)
    P, m, B, seed = 30, 6, 400, 3
    lp = rng.normal(-8, 2, size=(P, m))
    lr = lp - rng.exponential(0.5, size=(P, m))  # log π − log π_ref ≥ 0, heavy-ish right tail
    lp[0, 1] = np.nan  # a missing sample: per-prompt means skip it
    a, b = rng.uniform(size=(P, m)), rng.uniform(size=(P, m))
    res = evaluate_scored(a, b, ns=(2,), policy_logps=lp, reference_logps=lr, num_bootstrap=B, seed=seed)

    k1 = lp - lr
    rho = np.exp(lr - lp)
    k3 = rho - 1 - np.log(rho)
    per_k1, per_k3 = np.nanmean(k1, axis=1), np.nanmean(k3, axis=1)
    idx = np.random.default_rng(seed).integers(0, P, size=(B, P))
    means = np.array([[per[row].mean() for row in idx] for per in (per_k1, per_k3)])
    want = np.quantile(means, [0.025, 0.975], axis=1)
    assert res.kl_k1 == pytest.approx(per_k1.mean(), abs=1e-12)
    assert res.kl_k1_ci == pytest.approx(tuple(want[:, 0]), abs=1e-12)
    assert res.kl_k3_ci == pytest.approx(tuple(want[:, 1]), abs=1e-12)
    assert res.kl_k1_ci[0] < res.kl_k1 < res.kl_k1_ci[1]
    np.testing.assert_allclose(res.kl_k1_per_prompt, per_k1, atol=1e-12)

    # every output says what the number is: KL per completion (k1, nats), with its CI
    low, high = res.kl_k1_ci
    headline = f"KL per completion (k1, nats) = {res.kl_k1:.4f} [{low:.4f}, {high:.4f}]"
    assert res.kl_summary() == headline and headline in res.to_markdown()
    fig = res.plot(tmp_path / "kl.png")
    assert fig.axes[0].get_title() == res.kl_summary(digits=3)
    data = res.to_dict(per_prompt=True)
    assert data["kl_per_completion"] == {"estimator": "k1", "unit": "nats per completion", "estimate": res.kl_k1,
                                         "ci_low": low, "ci_high": high}
    assert data["kl"]["k1"]["ci_low"] == low and len(data["per_prompt"]["kl_k1"]) == P  # old keys kept
    metrics = res.metrics("eval/")
    assert metrics["eval/kl_k1_ci_low"] == low and metrics["eval/kl_k1_ci_high"] == high


def test_evaluate_scored_warns_naming_skipped_n_and_fix():
    rng = np.random.default_rng(12)
    a, b = rng.uniform(size=(5, 4)), rng.uniform(size=(5, 3))
    with pytest.warns(SkippedNWarning, match=r"Skipping N = \[4, 8\].*3 samples.*m >= N"):
        res = evaluate_scored(a, b, ns=(2, 4, 8), procedures=("bon",), num_bootstrap=0)
    assert [r["n"] for r in res.win_rates] == [2]


# ------------------------------------------------------------------------------------------------ what was evaluated
def _small_eval(tiny, policy, reference, **kwargs):
    kwargs = {"num_samples": 2, "ns": (2,), "procedures": ("bon",), "max_new_tokens": 3, "num_bootstrap": 0,
              "progress": False, "tokenizer": tiny["tokenizer"], **kwargs}
    return evaluate_policy(policy, reference, length_reward, PROMPTS[:2], **kwargs)


def test_metadata_policy_names_the_in_memory_model_not_the_reference(tiny):
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tiny["policy"])  # e.g. trainer.model: _name_or_path is the SFT path
    assert trained.config._name_or_path == tiny["policy"]
    res = _small_eval(tiny, trained, tiny["policy"])
    assert res.metadata["policy"] == f"in-memory model (initialised from {tiny['policy']!r})"
    assert res.metadata["reference"] == tiny["policy"] and res.metadata["policy_in_memory"] is True
    named = _small_eval(tiny, trained, tiny["policy"], policy_name="ctrl-out (step 300)")
    assert named.metadata["policy"] == "ctrl-out (step 300)"
    by_path = _small_eval(tiny, tiny["other"], tiny["policy"])
    assert by_path.metadata["policy"] == tiny["other"] and by_path.metadata["policy_in_memory"] is False
    assert "policy: `" + tiny["other"] + "`" in by_path.to_markdown()
    with pytest.raises(ValueError, match="policy_name"):
        _small_eval(tiny, trained, tiny["policy"], policy_name="")


def test_sampling_parameters_reach_both_models_and_are_recorded(tiny):
    seen = []

    def recording_reward(prompts, completions, **kwargs):
        seen.append(list(completions))
        return [float(len(c)) for c in completions]

    common = dict(num_samples=6, ns=(2,), procedures=("bon",), max_new_tokens=4, num_bootstrap=0, progress=False)
    with pytest.warns(UserWarning, match="not draws from π"):
        greedy = evaluate_policy(tiny["other"], tiny["policy"], recording_reward, PROMPTS[:2], top_k=1, **common)
    # top_k=1 is greedy: the 6 samples of each prompt are identical, for the policy and for the reference
    for call in seen:
        assert all(len(set(call[i * 6:(i + 1) * 6])) == 1 for i in range(2)), call
    assert (greedy.metadata["temperature"], greedy.metadata["top_p"], greedy.metadata["top_k"]) == (1.0, 1.0, 1)
    assert "not draws from π" in greedy.metadata["kl_note"] and "Note:" in greedy.to_markdown()
    seen.clear()
    sampled = evaluate_policy(tiny["other"], tiny["policy"], recording_reward, PROMPTS[:2], **common)
    assert any(len(set(call[i * 6:(i + 1) * 6])) > 1 for call in seen for i in range(2))
    assert sampled.metadata["top_k"] == 0 and "kl_note" not in sampled.metadata


@pytest.mark.parametrize(
    "kwargs,match",
    [({"temperature": 0.0}, "temperature"), ({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"num_samples": 0}, "num_samples")],
)
def test_evaluate_policy_validates_sampling_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _small_eval(tiny, tiny["other"], tiny["policy"], **kwargs)


def test_evaluate_policy_warns_for_n_above_num_samples_and_refuses_when_nothing_is_left(tiny):
    with pytest.warns(SkippedNWarning, match=r"Skipping N = \[4, 8\].*num_samples >= N"):
        res = _small_eval(tiny, tiny["other"], tiny["policy"], ns=(1, 2, 4, 8), procedures=("standard", "bon"))
    assert [(r["procedure"], r["n"]) for r in res.win_rates] == [("standard", 1), ("bon", 1), ("bon", 2)]
    assert res.metadata["ns_skipped"] == [4, 8] and res.metadata["ns_requested"] == [1, 2, 4, 8]
    with pytest.raises(ValueError, match=r"N = \[4\].*num_samples >= N"):
        _small_eval(tiny, tiny["other"], tiny["policy"], ns=(4,))


# ------------------------------------------------------------------------------------------------ model card
class _FakeCTRLTrainer:
    """What `build_ctrl_model_card` reads from a `CTRLTrainer`."""

    _tag_names = ["trl", "ctrl", "infalign"]
    _paper = {"id": "2412.19792", "citation": "@article{balashankar2025infalign}"}

    def __init__(self, tmp_path, settings, evaluation=None):
        from types import SimpleNamespace

        self.model = SimpleNamespace(config=SimpleNamespace(_name_or_path=str(tmp_path / "sft")))
        from trl_infalign.procedures import get_procedure

        # CTRLConfig.procedure: the InferenceProcedure of inference_procedure / inference_n
        procedure = get_procedure(settings["inference_procedure"], settings.get("inference_n"))
        self.args = SimpleNamespace(output_dir=str(tmp_path / "out"), procedure=procedure)
        self.ctrl_evaluation = evaluation
        self._settings = settings

    def ctrl_card_settings(self):
        return self._settings


CARD_SETTINGS = {"inference_procedure": "bon", "inference_n": 4, "transform": "bon:t=2", "t": 2.0, "beta": 0.5,
                 "kl_budget": 1.0, "num_reference_samples": 8, "reference_rewards_column": "ref_rewards"}


def test_model_card_reports_per_completion_kl_and_labels_per_token_kl(tmp_path):
    from trl_infalign.model_card import build_ctrl_model_card

    rng = np.random.default_rng(13)
    lp = rng.normal(-6, 1, size=(20, 4))
    evaluation = evaluate_scored(rng.beta(2, 1, size=(20, 4)), rng.uniform(size=(20, 4)), ns=(4,),
                                 policy_logps=lp, reference_logps=lp - 0.9, num_bootstrap=100,
                                 metadata={"policy": "out (step 40)", "reference": "sft"})
    settings = {**CARD_SETTINGS, "kl_control": "adaptive", "final_beta": 0.4137,
                "final_training_metrics": {"kl": 0.1234, "ctrl/sequence_kl": 0.9876, "ctrl/beta": 0.4137,
                                           "ctrl/calibrated_reward": 0.61}}
    card = build_ctrl_model_card(_FakeCTRLTrainer(tmp_path, settings, evaluation)).text
    assert "**KL per completion (k1, nats) at the end of training: 0.9876** (KL budget 1)" in card
    assert "| KL budget (per completion, nats) | 1 |" in card
    assert "| measured KL per completion (k1, nats), last training batch | 0.9876 |" in card
    assert "| `kl` | 0.1234 | TRL's `kl`: per-token mean" in card  # per-token, labelled as such
    assert "| β (KL coefficient) | 0.5 at the start → 0.4137 at the end |" in card
    assert "| KL control | adaptive" in card
    low, high = evaluation.kl_k1_ci
    assert f"**KL per completion (k1, nats): {evaluation.kl_k1:.4f}** [{low:.4f}, {high:.4f}] (95% CI)" in card
    assert "Evaluated `out (step 40)` against `sft`." in card

    # a trainer that logs only TRL's per-token `kl` (no ctrl/sequence_kl, no kl_control / final_beta) still renders,
    # and does not pass the per-token number off as the per-completion one
    old = {**CARD_SETTINGS, "final_training_metrics": {"kl": 0.1234}}
    card = build_ctrl_model_card(_FakeCTRLTrainer(tmp_path, old, {"win_rates": [], "kl_k1": 0.12, "kl_k3": 0.11})).text
    assert "| measured KL per completion (k1, nats), last training batch | not logged |" in card
    assert "TRL's `kl` (0.1234) is the **per-token** mean" in card
    assert "| β (KL coefficient) | 0.5 |" in card and "| KL control | – |" in card
    assert "**KL per completion (k1, nats): 0.1200**; k3: 0.1100" in card


# ------------------------------------------------------------------------------------------------ procedures: specs, mixtures
MIX = "mixture:0.5*standard+0.3*bon:n=3+0.2*won:n=2"
PRIMITIVES = {"standard": ("standard", 1), "bon:n=3": ("bon", 3), "won:n=2": ("won", 2)}


def _tied_rows(seed, P=25, m_a=6, m_b=5, missing=True):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, size=(P, m_a)).astype(float)  # few distinct values: ties within and across sides
    b = rng.integers(0, 5, size=(P, m_b)).astype(float)
    if missing:
        a[rng.random((P, m_a)) < 0.15] = np.nan
        a[:, :3] = rng.integers(0, 5, size=(P, 3))  # at least 3 valid per row
        b[rng.random((P, m_b)) < 0.15] = np.nan
        b[:, :3] = rng.integers(0, 5, size=(P, 3))
    return a, b


def test_mixture_per_prompt_estimate_is_the_weighted_sum_of_its_components():
    a, b = _tied_rows(20)
    got = per_prompt_win_rates(a, b, procedure=MIX)
    parts = {spec: per_prompt_win_rates(a, b, n, name) for spec, (name, n) in PRIMITIVES.items()}  # old (name, n) form
    want = 0.5 * parts["standard"] + 0.3 * parts["bon:n=3"] + 0.2 * parts["won:n=2"]
    np.testing.assert_allclose(got, want, atol=1e-13)
    assert not np.allclose(got, parts["bon:n=3"])  # the weights matter
    res = inference_win_rate(a, b, procedure=MIX, num_bootstrap=0)
    assert (res.procedure, res.n, res.spec, res.unbiased) == ("mixture", 3, MIX, True)
    assert res.name == "mixture(0.5*standard+0.3*bon@3+0.2*won@2)_win_rate"
    assert res.estimate == pytest.approx(float(want.mean()), abs=1e-13)


@pytest.mark.parametrize("spec,name,n", [("bon:n=3", "bon", 3), ("won:n=2", "won", 2), ("standard", "standard", 1)])
def test_one_component_mixture_equals_its_component(spec, name, n):
    a, b = _tied_rows(21)
    one = inference_win_rate(a, b, procedure=f"mixture:1*{spec}", num_bootstrap=30, seed=4)
    component = inference_win_rate(a, b, n, name, num_bootstrap=30, seed=4)
    np.testing.assert_allclose(one.per_prompt, component.per_prompt, atol=1e-14)
    assert (one.estimate, one.ci_low, one.ci_high) == pytest.approx((component.estimate, component.ci_low, component.ci_high))
    assert one.procedure == "mixture" and component.spec == spec and one.n == component.n == n


def test_mixture_estimator_is_the_exact_average_over_all_subsets_of_both_sides():
    """Brute force, m = 5 (and 4 on the reference side): a request-level mixture of BoN-2 and WoN-3 given the samples
    is Σ_j w_j (the average over every N_j-subset of the policy samples and every N_j-subset of the reference's)."""
    rng = np.random.default_rng(22)
    spec, weights = "mixture:0.6*bon:n=2+0.4*won:n=3", {("bon", 2): 0.6, ("won", 3): 0.4}
    checked = 0
    for _ in range(30):
        a = rng.integers(0, 4, size=5).astype(float)
        b = rng.integers(0, 4, size=rng.integers(4, 6)).astype(float)
        want = sum(w * brute_force(a, b, n, name) for (name, n), w in weights.items())
        # written out for the mixture itself: enumerate both sides' subsets of each component
        direct = 0.0
        for (name, n), w in weights.items():
            pick = max if name == "bon" else min
            pairs = [(pick(sa), pick(sb)) for sa in itertools.combinations(a, n) for sb in itertools.combinations(b, n)]
            direct += w * np.mean([(x > y) + 0.5 * (x == y) for x, y in pairs])
        assert want == pytest.approx(direct, abs=1e-12)
        got = per_prompt_win_rates(a[None], b[None], procedure=spec)[0]
        assert got == pytest.approx(want, abs=1e-12), (a, b)
        checked += 1
    assert checked == 30


def _enumerate_discrete(values, probs, m):
    """Every m-tuple of i.i.d. draws from a discrete distribution, with its probability: ((K^m, m), (K^m,))."""
    tuples = np.array(list(itertools.product(values, repeat=m)), dtype=np.float64)
    weights = np.array([np.prod(t) for t in itertools.product(probs, repeat=m)])
    return tuples, weights


def _population_win_rate(values, p, q, f):
    """Exact P(X > Y) + ½ P(X = Y) where X (Y) is the procedure's output for the policy (reference): output CDF f(F)."""
    F_p, F_q = np.cumsum(p), np.cumsum(q)
    out_p = np.diff(np.concatenate([[0.0], f(F_p)]))  # pmf of the policy's output on `values`
    cdf_q = f(F_q)
    below_q = np.concatenate([[0.0], cdf_q[:-1]])
    return float(np.sum(out_p * (below_q + 0.5 * (cdf_q - below_q))))


SOFT_BON = "evaltest_soft_bon"  # non-polynomial user map: plug-in estimator, biased
HALF_BON2 = "evaltest_half_bon2"  # polynomial user map f = ½G + ½G²: unbiased


def _register_user_procedures():
    from trl_infalign.procedures import available_procedures, register_procedure

    if SOFT_BON not in available_procedures():
        register_procedure(SOFT_BON, lambda G, power=2.5: G ** power, label="Best-of-2.5")
    if HALF_BON2 not in available_procedures():
        register_procedure(HALF_BON2, polynomial=[0.0, 0.5, 0.5], label="½ standard + ½ Best-of-2 (polynomial)")


def test_all_subsets_expectation_is_the_population_win_rate_for_a_discrete_distribution():
    """Average the estimator over every possible sample (m = 4 per side, 3 values with ties) weighted by its
    probability: unbiased procedures (bon, won, standard, mixtures of them, polynomial user maps) give exactly the
    population win rate; the plug-in estimator of a non-polynomial map does not (its bias is stated: unbiased=False)."""
    _register_user_procedures()
    values, p, q, m = [0.0, 1.0, 2.0], np.array([0.2, 0.3, 0.5]), np.array([0.45, 0.35, 0.2]), 4
    pol, w_pol = _enumerate_discrete(values, p, m)
    ref, w_ref = _enumerate_discrete(values, q, m)
    A = np.repeat(pol, len(ref), axis=0)  # every (policy sample, reference sample) pair as one "prompt"
    B = np.tile(ref, (len(pol), 1))
    weight = np.repeat(w_pol, len(ref)) * np.tile(w_ref, len(pol))
    assert weight.sum() == pytest.approx(1.0, abs=1e-12)
    maps = {
        "standard": lambda G: G, "bon:n=2": lambda G: G**2, "bon:n=3": lambda G: G**3, "won:n=3": lambda G: 1 - (1 - G) ** 3,
        "won:n=4": lambda G: 1 - (1 - G) ** 4,
    }
    cases = {spec: _population_win_rate(values, p, q, f) for spec, f in maps.items()}
    cases["mixture:0.5*standard+0.3*bon:n=3+0.2*won:n=4"] = (
        0.5 * cases["standard"] + 0.3 * cases["bon:n=3"] + 0.2 * cases["won:n=4"])
    cases["mixture:0.7*bon:n=2+0.3*won:n=3"] = 0.7 * cases["bon:n=2"] + 0.3 * cases["won:n=3"]
    cases[HALF_BON2] = _population_win_rate(values, p, q, lambda G: 0.5 * G + 0.5 * G**2)
    for spec, truth in cases.items():
        expectation = float(np.sum(weight * per_prompt_win_rates(A, B, procedure=spec)))
        assert expectation == pytest.approx(truth, abs=1e-12), spec
    assert cases["bon:n=3"] > cases["standard"] > 0.5  # a non-trivial comparison
    soft_truth = _population_win_rate(values, p, q, lambda G: G**2.5)
    soft = inference_win_rate(A, B, procedure=SOFT_BON, num_bootstrap=0)
    assert soft.unbiased is False and soft.spec == SOFT_BON
    assert abs(float(np.sum(weight * soft.per_prompt)) - soft_truth) > 1e-3  # the plug-in estimator's O(1/m) bias


def test_evaluate_scored_with_specs_mixtures_user_procedures_and_instances(tmp_path):
    from trl_infalign.procedures import BestOfN

    _register_user_procedures()
    rng = np.random.default_rng(23)
    a, b = rng.beta(2, 1, size=(40, 8)), rng.uniform(size=(40, 8))
    mix = "mixture:0.5*standard+0.5*bon:n=4"
    res = evaluate_scored(a, b, ns=(2, 4), procedures=("standard", "bon", mix, "won:n=8", BestOfN(4), SOFT_BON),
                          num_bootstrap=50)
    # a spec with its own N is evaluated once; bon:n=4 given twice (bare "bon" at N = 4 and the instance) is one row
    assert [r["spec"] for r in res.win_rates] == ["standard", "bon:n=2", "bon:n=4", mix, "won:n=8", SOFT_BON]
    assert [(r["procedure"], r["n"]) for r in res.win_rates] == [
        ("standard", 1), ("bon", 2), ("bon", 4), ("mixture", 4), ("won", 8), (SOFT_BON, 1)]
    assert [r["unbiased"] for r in res.win_rates] == [True] * 5 + [False]
    row = res.win_rate(mix)
    assert row["estimate"] == pytest.approx(
        0.5 * res.win_rate("standard")["estimate"] + 0.5 * res.win_rate("bon", 4)["estimate"], abs=1e-13)
    assert res.win_rate("bon:n=4") is res.win_rate("bon", 4) is res.win_rate(BestOfN(4))
    metrics = res.metrics("e/")
    assert metrics["e/mixture(0.5*standard+0.5*bon@4)_win_rate"] == row["estimate"]
    assert {"e/standard_win_rate", "e/bon@2_win_rate", "e/won@8_win_rate", f"e/{SOFT_BON}_win_rate"} <= set(metrics)
    data = json.loads(res.to_json(per_prompt=True))
    assert data["win_rates"][3] == {**row, "ci_low": pytest.approx(row["ci_low"]), "ci_high": pytest.approx(row["ci_high"])}
    assert len(data["per_prompt"]["mixture(0.5*standard+0.5*bon@4)_win_rate"]) == 40
    md = res.to_markdown()
    assert "| bon | 4 |" in md and f"| `{mix}` | 4 |" in md and "| won | 8 |" in md
    assert "†" in md and "plug-in estimator" in md  # the biased row is marked
    fig = res.plot(tmp_path / "plot.png")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels[0] == "Best-of-N" and "standard" in labels and "Worst-of-8" in labels
    assert "0.5·standard + 0.5·Best-of-4" in labels and "Best-of-2.5 (plug-in)" in labels
    # a single spec string works as `procedures`; a spec needing more samples than there are is skipped, named
    single = evaluate_scored(a, b, procedures=mix, num_bootstrap=0)
    assert [r["spec"] for r in single.win_rates] == [mix]
    with pytest.warns(SkippedNWarning, match=r"mixture:0\.5\*standard\+0\.5\*bon:n=16 \(needs 16\).*m >= N"):
        skipped = evaluate_scored(a, b, ns=(4,), procedures=("bon", "mixture:0.5*standard+0.5*bon:n=16"),
                                  num_bootstrap=0)
    assert [r["spec"] for r in skipped.win_rates] == ["bon:n=4"]
    with pytest.raises(ValueError, match="Unknown inference procedure 'median'"):
        evaluate_scored(a, b, procedures=("median",))
    with pytest.raises(ValueError, match="sum to 1"):
        evaluate_scored(a, b, procedures=("mixture:0.5*standard+0.4*bon:n=4",))


def test_old_forms_keep_working():
    """(name, n) pairs, metric names, order-statistic weights and WinRateResult built by hand."""
    from trl_infalign.evaluation import WinRateResult, metric_name, order_statistic_weights

    assert metric_name("standard", 4) == "standard_win_rate" and metric_name("bon", 4) == "bon@4_win_rate"
    assert metric_name("won", 8) == "won@8_win_rate" and metric_name("bon:n=2") == "bon@2_win_rate"
    k, width, n = torch.tensor([5, 3]), 5, 2
    for procedure in ("bon", "won", "standard"):
        got = order_statistic_weights(k, width, n, procedure)
        nn = 1 if procedure == "standard" else n
        for row, kk in enumerate(k.tolist()):
            for j in range(1, width + 1):
                top = (j - 1) if procedure != "won" else (kk - j)
                want = math.comb(top, nn - 1) / math.comb(kk, nn) if j <= kk and top >= nn - 1 else 0.0
                assert float(got[row, j - 1]) == pytest.approx(want, abs=1e-12)
    by_hand = WinRateResult(0.6, 0.5, 0.7, np.array([0.6]), 4, "bon", 1)
    assert by_hand.name == "bon@4_win_rate" and by_hand.to_dict()["spec"] == "bon:n=4" and by_hand.unbiased is True
    with pytest.raises(ValueError, match="needs its N"):
        inference_win_rate(np.zeros((2, 3)), np.zeros((2, 3)), procedure="bon")
    with pytest.raises(ValueError, match="n=8, but n=4"):
        inference_win_rate(np.zeros((2, 8)), np.zeros((2, 8)), 4, "bon:n=8")


def test_cli_scored_with_a_mixture_spec(tmp_path, capsys):
    rng = np.random.default_rng(24)
    scored = {"policy_rewards": rng.beta(2, 1, size=(20, 8)).tolist(), "reference_rewards": rng.uniform(size=(20, 8)).tolist()}
    path = tmp_path / "scored.json"
    path.write_text(json.dumps(scored))
    out = tmp_path / "out"
    mix = "mixture:0.5*standard+0.5*bon:n=4"
    assert cli_main(["evaluate", "--scored", str(path), "--procedures", "standard", "bon", mix,
                     "mixture:0.5*standard+0.5*bon:n=16", "--n", "4", "--num-bootstrap", "50", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"| `{mix}` | 4 |" in captured.out and "| bon | 4 |" in captured.out
    assert "warning: Skipping mixture:0.5*standard+0.5*bon:n=16 (needs 16)" in captured.err
    data = json.loads((out / "evaluation.json").read_text())
    rows = {r["spec"]: r for r in data["win_rates"]}
    assert set(rows) == {"standard", "bon:n=4", mix} and rows[mix]["procedure"] == "mixture" and rows[mix]["n"] == 4
    assert rows[mix]["unbiased"] is True
    assert rows[mix]["estimate"] == pytest.approx(0.5 * rows["standard"]["estimate"] + 0.5 * rows["bon:n=4"]["estimate"])
    assert (out / "win_rate_vs_n.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--scored", str(path), "--procedures", "median:n=4", "--output", str(out)])
    assert "Unknown inference procedure 'median'" in capsys.readouterr().err
    # sampling path: a spec needing more samples than --num-samples is refused up front, in CLI terms
    common = ["evaluate", "--model", "m", "--ref-model", "r", "--reward-model", "rm", "--dataset", "d.jsonl",
              "--output", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"--procedures mixture:0\.5\*standard\+0\.5\*bon:n=16.*--num-samples 16"):
        cli_main(common + ["--num-samples", "4", "--procedures", "mixture:0.5*standard+0.5*bon:n=16"])
