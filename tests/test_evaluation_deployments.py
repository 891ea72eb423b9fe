"""Deployments that name rewards in the evaluation (issue 19 item 6): each component's win rate on its own reward, the
deployment's Σ_j w_j W_j with a paired CI; evaluate_scored, evaluate_policy, the CLI. Exact against brute force."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from trl_infalign.cli import main as cli_main
from trl_infalign.evaluation import SkippedNWarning, evaluate_policy, evaluate_scored
from trl_infalign.procedures import ProcedureError
from trl_infalign.tiny import build_tiny_policy, build_tiny_reward_model, build_tokenizer

SPEC = "mixture:0.3*bon:n=2@helpful+0.7*won:n=3@harmless"


def brute_force(a, b, n, pick):
    """Average over every n-subset of each side's valid samples of 1[pick(A) > pick(B)] + ½·1[pick(A) = pick(B)]."""
    a = [x for x in a if not math.isnan(x)]
    b = [x for x in b if not math.isnan(x)]
    total = count = 0
    for sa in itertools.combinations(a, n):
        for sb in itertools.combinations(b, n):
            x, y = pick(sa), pick(sb)
            total += (x > y) + 0.5 * (x == y)
            count += 1
    return total / count


def per_prompt(a, b, n, pick):
    return np.array([brute_force(ra, rb, n, pick) for ra, rb in zip(a, b)])


# Hand-made scores of the same samples by two rewards: 4 prompts, 5 policy and 4 reference samples, ties within and
# across sides, one missing (NaN) harmless score.
HELPFUL_POLICY = np.array([[3, 1, 2, 2, 0], [1, 1, 1, 4, 2], [0, 2, 3, 1, 1], [2, 2, 2, 2, 3]], dtype=float)
HELPFUL_REFERENCE = np.array([[1, 2, 0, 2], [3, 0, 1, 1], [2, 2, 1, 0], [1, 3, 2, 0]], dtype=float)
HARMLESS_POLICY = np.array([[0, 1, 1, 2, 3], [2, np.nan, 0, 1, 1], [1, 1, 1, 0, 2], [3, 0, 2, 1, 1]], dtype=float)
HARMLESS_REFERENCE = np.array([[1, 0, 2, 2], [0, 1, 1, 3], [2, 0, 1, 1], [1, 1, 0, 2]], dtype=float)
BY_REWARD = dict(policy_rewards_by_reward={"helpful": HELPFUL_POLICY, "harmless": HARMLESS_POLICY},
                 reference_rewards_by_reward={"helpful": HELPFUL_REFERENCE, "harmless": HARMLESS_REFERENCE})


def test_components_are_judged_on_their_own_reward_exactly():
    combined_policy, combined_reference = HELPFUL_POLICY + np.nan_to_num(HARMLESS_POLICY), HELPFUL_REFERENCE + HARMLESS_REFERENCE
    res = evaluate_scored(combined_policy, combined_reference, ns=(2,), procedures=("bon", SPEC), num_bootstrap=200,
                          **BY_REWARD)
    helpful = per_prompt(HELPFUL_POLICY, HELPFUL_REFERENCE, 2, max)
    harmless = per_prompt(HARMLESS_POLICY, HARMLESS_REFERENCE, 3, min)
    # the test can tell the rewards apart: the same component judged on the other reward gives another number
    assert abs(per_prompt(HELPFUL_POLICY, HELPFUL_REFERENCE, 3, min).mean() - harmless.mean()) > 0.05
    assert abs(per_prompt(HARMLESS_POLICY, HARMLESS_REFERENCE, 2, max).mean() - helpful.mean()) > 0.05

    d = res.deployment()
    assert d.spec == SPEC and [(c.reward, c.weight) for c, _ in d.components] == [("helpful", 0.3), ("harmless", 0.7)]
    assert d.component("helpful").per_prompt == pytest.approx(helpful, abs=1e-12)
    assert d.component("harmless").per_prompt == pytest.approx(harmless, abs=1e-12)
    assert d.objective == pytest.approx(0.3 * helpful.mean() + 0.7 * harmless.mean(), abs=1e-12)
    assert d.ci_low <= d.objective <= d.ci_high and d.unbiased
    # the ordinary procedure still compares the combined reward, exactly as without per-reward scores
    alone = evaluate_scored(combined_policy, combined_reference, ns=(2,), procedures=("bon",), num_bootstrap=200)
    assert res.win_rates == alone.win_rates
    assert res.win_rate("bon", 2)["estimate"] == pytest.approx(per_prompt(combined_policy, combined_reference, 2, max).mean())
    # flat metrics, JSON and markdown carry the deployment next to the existing keys
    metrics = res.metrics("eval/")
    assert metrics["eval/bon@2_win_rate/helpful"] == pytest.approx(helpful.mean())
    assert metrics["eval/won@3_win_rate/harmless"] == pytest.approx(harmless.mean())
    assert metrics["eval/deployment_win_rate"] == d.objective and metrics["eval/deployment_win_rate_ci_low"] == d.ci_low
    data = json.loads(res.to_json(per_prompt=True))
    assert [r["spec"] for r in data["win_rates"]] == ["bon:n=2"]
    (entry,) = data["deployments"]
    assert entry["spec"] == SPEC and entry["objective"] == pytest.approx(d.objective)
    assert [(c["spec"], c["reward"], c["weight"], c["n"]) for c in entry["components"]] == [
        ("bon:n=2@helpful", "helpful", 0.3, 2), ("won:n=3@harmless", "harmless", 0.7, 3)]
    assert entry["components"][1]["win_rate"] == pytest.approx(harmless.mean())
    assert data["per_prompt"]["bon@2_win_rate/helpful"] == pytest.approx(list(helpful))
    table = res.to_markdown()
    assert "| bon:n=2 | helpful | 0.3 | 2 |" in table and f"**{d.objective:.4f}**" in table


def test_deployment_ci_is_paired_with_the_components():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.2, 1, size=(30, 6)), rng.normal(size=(30, 6))
    # standard on -r is 1 − (standard on r) prompt by prompt: the deployment is exactly 0.5 on every prompt, so its
    # paired interval has zero width while each component's does not (combining the components' bounds, or
    # resampling them independently, would not give [0.5, 0.5])
    res = evaluate_scored(a, b, ns=(2,), procedures=("bon", "mixture:0.5*standard@x+0.5*standard@neg", "bon:n=2@x"),
                          policy_rewards_by_reward={"x": a, "neg": -a}, reference_rewards_by_reward={"x": b, "neg": -b},
                          num_bootstrap=300)
    d = res.deployment("mixture:0.5*standard@x+0.5*standard@neg")
    assert d.objective == pytest.approx(0.5, abs=1e-12)
    assert (d.ci_low, d.ci_high) == pytest.approx((0.5, 0.5), abs=1e-12)
    for _, r in d.components:
        assert r.ci_high - r.ci_low > 0.1
    # the same resamples as the ordinary win rates: one component on the combined reward's scores has its CI exactly
    single = res.deployment("bon:n=2@x")
    row = res.win_rate("bon", 2)
    assert (single.objective, single.ci_low, single.ci_high) == (row["estimate"], row["ci_low"], row["ci_high"])
    with pytest.raises(KeyError, match="2 deployments"):
        res.deployment()
    keys = res.metrics()
    assert "deployment(bon:n=2@x)_win_rate" in keys and "deployment_win_rate" not in keys


def test_deployment_errors_name_the_field_and_the_fix():
    a = np.zeros((3, 4))
    with pytest.raises(ProcedureError, match=r"names reward\(s\) \['nope'\].*named \['helpful', 'harmless'\]"):
        evaluate_scored(a, a, procedures=("bon:n=2@nope",), **{k: {"helpful": a, "harmless": a} for k in BY_REWARD})
    with pytest.raises(ValueError, match="policy_rewards_by_reward"):
        evaluate_scored(a, a, procedures=("bon:n=2@helpful",))
    with pytest.raises(ProcedureError, match="add '@name'"):
        evaluate_scored(a, a, procedures=("mixture:0.5*bon:n=2@x+0.5*won:n=2",),
                        **{k: {"x": a, "y": a} for k in BY_REWARD})
    with pytest.raises(ValueError, match="same reward functions"):
        evaluate_scored(a, a, procedures=("bon:n=2@x",), policy_rewards_by_reward={"x": a},
                        reference_rewards_by_reward={"y": a})
    with pytest.raises(ValueError, match="compare them"):
        evaluate_scored(None, None, procedures=("bon", "bon:n=2@x"), **{k: {"x": a} for k in BY_REWARD})
    # a component without '@' takes the only reward; rewards need only be given by name for deployments-only calls
    only = evaluate_scored(None, None, procedures=("mixture:0.5*bon:n=2@x+0.5*won:n=2",),
                           **{k: {"x": a} for k in BY_REWARD}, num_bootstrap=0)
    assert only.win_rates == [] and only.deployment().spec == "mixture:0.5*bon:n=2@x+0.5*won:n=2@x"
    # a deployment needing more samples than there are is skipped with the usual warning, naming it
    with pytest.warns(SkippedNWarning, match=r"deployment bon:n=8@x \(needs 8\)"):
        res = evaluate_scored(a, a, ns=(2,), procedures=("bon", "bon:n=8@x"), **{k: {"x": a} for k in BY_REWARD})
    assert res.deployments == [] and len(res.win_rates) == 1
    with pytest.raises(ValueError, match=r"Nothing to evaluate.*deployment bon:n=8@x \(needs 8\)"):
        evaluate_scored(a, a, procedures=("bon:n=8@x",), **{k: {"x": a} for k in BY_REWARD})


# ------------------------------------------------------------------------------------------------ with models
PROMPTS = ["the cat", "a dog", "hello", "good morning", "the mat"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployments")
    tokenizer = build_tokenizer(["the cat sat on the mat", "a dog ran in the park", "hello world, good morning"] * 4,
                                vocab_size=300)
    policy = build_tiny_policy(tokenizer, root / "policy", hidden_size=32, num_layers=1, seed=0)
    other = build_tiny_policy(tokenizer, root / "other", hidden_size=32, num_layers=1, seed=1)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {"root": root, "tokenizer": tokenizer, "policy": policy, "other": other, "data": data}


def test_evaluate_policy_scores_every_completion_with_every_reward(models):
    seen = {"helpful": [], "harmless": []}

    def helpful(prompts, completions, **kwargs):
        seen["helpful"].append(list(completions))
        return [float(len(c)) for c in completions]

    def harmless(prompts, completions, **kwargs):
        seen["harmless"].append(list(completions))
        return [-float(sum(ch in "aeiou" for ch in c)) for c in completions]

    spec = "mixture:0.5*bon:n=2@helpful+0.5*won:n=3@harmless"
    res = evaluate_policy(models["other"], models["policy"], [helpful, harmless], PROMPTS, reward_weights=[1.0, 2.0],
                          num_samples=4, ns=(2,), procedures=("bon", spec), max_new_tokens=6, num_bootstrap=100,
                          progress=False)
    # each function scored the policy's samples, then the reference's (the same completions for both functions)
    assert len(seen["helpful"]) == len(seen["harmless"]) == 2 and seen["helpful"] == seen["harmless"]
    (policy_texts, reference_texts) = seen["helpful"]

    def scores(texts, func):
        return np.array(func(PROMPTS, texts)).reshape(len(PROMPTS), 4)

    h = per_prompt(scores(policy_texts, helpful), scores(reference_texts, helpful), 2, max)
    s = per_prompt(scores(policy_texts, harmless), scores(reference_texts, harmless), 3, min)
    d = res.deployment()
    assert d.component("helpful").per_prompt == pytest.approx(h, abs=1e-12)
    assert d.component("harmless").per_prompt == pytest.approx(s, abs=1e-12)
    assert d.objective == pytest.approx(0.5 * h.mean() + 0.5 * s.mean(), abs=1e-12)
    # the ordinary row compares the weighted sum of the rewards, as TRL combines them
    combined = [scores(t, helpful) + 2.0 * scores(t, harmless) for t in (policy_texts, reference_texts)]
    assert res.win_rate("bon", 2)["estimate"] == pytest.approx(per_prompt(*combined, 2, max).mean(), abs=1e-12)
    assert res.metadata["reward_names"] == ["helpful", "harmless"]

    # a name that is no reward function's fails before anything is sampled, naming the known ones
    seen["helpful"].clear()
    with pytest.raises(ProcedureError, match=r"\['nope'\].*\['helpful', 'harmless'\]"):
        evaluate_policy(models["other"], models["policy"], [helpful, harmless], PROMPTS, num_samples=4,
                        procedures=("bon:n=2@nope",), max_new_tokens=6, progress=False)
    assert seen["helpful"] == []


def test_cli_deployment_with_two_reward_models_and_scored(models, tmp_path, capsys):
    root = models["root"]
    for name in ("helpful", "harmless"):
        if not (root / "rms" / name).exists():
            build_tiny_reward_model(models["tokenizer"], root / "rms" / name, hidden_size=16, seed=len(name))
    out = tmp_path / "out"
    spec = "mixture:0.5*bon:n=2@helpful+0.5*won:n=2@harmless"
    assert cli_main([
        "evaluate", "--model", models["other"], "--ref-model", models["policy"], "--reward-model",
        str(root / "rms" / "helpful"), "--reward-model", str(root / "rms" / "harmless") + "/", "--dataset",
        str(models["data"]), "--num-samples", "4", "--n", "2", "--procedures", "bon", spec, "--max-new-tokens", "4",
        "--num-bootstrap", "50", "--no-progress", "--output", str(out),
    ]) == 0
    printed = capsys.readouterr().out
    assert "| bon:n=2 | helpful | 0.5 | 2 |" in printed and "| **deployment** |" in printed
    data = json.loads((out / "evaluation.json").read_text())
    (entry,) = data["deployments"]
    assert entry["spec"] == spec and [c["reward"] for c in entry["components"]] == ["helpful", "harmless"]
    assert entry["objective"] == pytest.approx(sum(c["weight"] * c["win_rate"] for c in entry["components"]))
    assert [r["spec"] for r in data["win_rates"]] == ["bon:n=2"] and data["metadata"]["reward_names"] == ["helpful", "harmless"]
    assert (out / "win_rate_vs_n.png").stat().st_size > 1000

    # a misnamed reward is refused before any model is loaded (these paths do not exist), naming the known names
    with pytest.raises(SystemExit, match=r"\['nope'\].*\['rm-a', 'rm-b'\]"):
        cli_main(["evaluate", "--model", "m", "--ref-model", "r", "--reward-model", "/x/rm-a", "--reward-model",
                  "/x/rm-b", "--dataset", "d.jsonl", "--procedures", "bon:n=2@nope", "--output", str(tmp_path)])

    # --scored: per-reward matrices as JSON objects; without the combined rewards only deployments are evaluated
    scored = tmp_path / "scored.json"
    scored.write_text(json.dumps({
        "policy_rewards_by_reward": {"helpful": HELPFUL_POLICY.tolist(),
                                     "harmless": [[None if math.isnan(v) else v for v in r] for r in HARMLESS_POLICY]},
        "reference_rewards_by_reward": {"helpful": HELPFUL_REFERENCE.tolist(), "harmless": HARMLESS_REFERENCE.tolist()},
    }))
    assert cli_main(["evaluate", "--scored", str(scored), "--procedures", SPEC, "--num-bootstrap", "50",
                     "--output", str(tmp_path / "scored_out"), "--no-plot"]) == 0
    data = json.loads((tmp_path / "scored_out" / "evaluation.json").read_text())
    expected = 0.3 * per_prompt(HELPFUL_POLICY, HELPFUL_REFERENCE, 2, max).mean() \
        + 0.7 * per_prompt(HARMLESS_POLICY, HARMLESS_REFERENCE, 3, min).mean()
    assert data["win_rates"] == [] and data["deployments"][0]["objective"] == pytest.approx(expected, abs=1e-12)
