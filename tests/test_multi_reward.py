"""Several rewards in one deployment: specs, the calibrated-reward wrapper, and end-to-end optima.

The end-to-end tests use the one-token bandit with two rewards per action scored on the same reference samples: the
KL-regularised optimum of Φ = Σ_r W_r Φ_r(c_r) is π_ref·exp(Φ/β)/Z (RLOO) or the tilt at β·G/(G−1) (stock GRPO with
bias-corrected KL and `scale_rewards="none"`), known in advance.
"""

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from trl_infalign import CalibratedReward, CTRLConfig, CTRLTrainer, get_deployment, get_transform
from trl_infalign.calibration import CalibrationError
from trl_infalign.deployment import RewardTransforms, parse_reward_transforms
from trl_infalign.procedures import ProcedureError
from trl_infalign.tiny import BANDIT_PROMPT, bandit_next_token_probs

from bandit_utils import NUM_ACTIONS, bandit_config, make_bandit

DEPLOYMENT = "mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"


def mid_rank(r: float, refs) -> float:
    """c by its definition, with explicit loops: (#{ref < r} + ½ #{ref = r}) / K."""
    return (sum(1.0 for x in refs if x < r) + 0.5 * sum(1.0 for x in refs if x == r)) / len(refs)


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


# ------------------------------------------------------------------------------------------------------------ specs
def test_deployment_spec_weights_and_procedures():
    d = get_deployment("mixture:0.3*bon:n=4@helpful+0.2*bon:n=16@helpful+0.5*won@harmless", n=8)
    assert d.rewards == ("helpful", "harmless")
    assert d.reward_weights == {"helpful": 0.5, "harmless": 0.5}
    assert d.procedure_for("helpful").spec == "mixture:0.6*bon:n=4+0.4*bon:n=16"
    assert d.procedure_for("harmless").spec == "won:n=8"  # a bare name takes n
    assert d.n == 16 and get_deployment(d.spec) == d
    assert [c.metric_key for c in d.components] == ["bon@4_win_rate/helpful", "bon@16_win_rate/helpful",
                                                    "won@8_win_rate/harmless"]
    # without '@' it is an ordinary procedure on the one reward
    single = get_deployment("mixture:0.5*standard+0.5*bon:n=4")
    assert not single.is_multi_reward and single.procedure.spec == "mixture:0.5*standard+0.5*bon:n=4"


def test_a_component_without_a_reward_uses_the_only_one():
    d = get_deployment("mixture:0.5*bon:n=4@helpful+0.5*won:n=4")
    assert d.bind(["helpful"]).spec == "mixture:0.5*bon:n=4@helpful+0.5*won:n=4@helpful"
    with pytest.raises(ProcedureError, match=r"name no reward, and there are 2 reward functions"):
        d.bind(["helpful", "harmless"])


def test_unknown_reward_name_error_names_the_known_ones():
    with pytest.raises(ProcedureError, match=r"names reward\(s\) \['harmless'\].*named \['helpful', 'safety'\]"):
        get_deployment(DEPLOYMENT).bind(["helpful", "safety"])
    with pytest.raises(ProcedureError, match=r"\['extra'\] are not named by the deployment"):
        get_deployment(DEPLOYMENT).bind(["helpful", "harmless", "extra"])
    with pytest.raises(ProcedureError, match="must sum to 1"):
        get_deployment("mixture:0.5*bon:n=4@helpful+0.6*won:n=4@harmless")
    with pytest.raises(ProcedureError, match="not a reward name"):
        get_deployment("bon:n=4@two words")


def test_reward_transform_specs():
    assert parse_reward_transforms("bon:t=3@helpful+won:t=5@harmless") == {"helpful": "bon:t=3", "harmless": "won:t=5"}
    inner = "optimal:procedure=mixture:0.5*bon:n=4+0.5*bon:n=16,beta=0.1"
    assert parse_reward_transforms(f"{inner}@helpful+won:t=5@harmless")["helpful"] == inner  # '+' inside a term
    d = get_deployment("mixture:0.25*bon:n=4@helpful+0.75*won:n=4@harmless")
    phi = RewardTransforms.from_spec("bon:t=3@helpful+won:t=5@harmless", d)
    c1, c2 = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    expected = [0.25 * math.exp(3 * a) - 0.75 * math.exp(-5 * b) for a, b in zip(c1.tolist(), c2.tolist())]
    assert phi({"helpful": c1, "harmless": c2}).tolist() == pytest.approx(expected, rel=1e-12)
    low, high = phi.bounds()  # each c_r ranges over [0, 1] on its own
    assert low == pytest.approx(0.25 * 1 - 0.75 * 1) and high == pytest.approx(0.25 * math.exp(3) - 0.75 * math.exp(-5))


def test_config_checks_per_reward_transforms():
    common = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none", inference_procedure=DEPLOYMENT)
    args = CTRLConfig(transform="bon:t=3@helpful+won:t=5@harmless", beta=0.5, **common)
    assert args.is_multi_reward and not args.fits_on_references and args.inference_n == 4
    assert CTRLConfig(transform="auto", kl_budget=0.5, **common).fits_on_references
    with pytest.raises(ValueError, match=r"no transform for reward\(s\) \['harmless'\]"):
        CTRLConfig(transform="bon:t=3@helpful", beta=0.5, **common)
    with pytest.raises(ValueError, match="names reward 'other'"):
        CTRLConfig(transform="bon:t=3@helpful+won:t=5@other", beta=0.5, **common)
    with pytest.raises(ValueError, match="shapes raw rewards"):
        CTRLConfig(transform="lsc", beta=0.5, **common)


# ---------------------------------------------------------------------------------------------------- the wrapper
def _two_reward_rows():
    refs = {"helpful": [0.0, 1.0, 2.0, 2.0], "harmless": [5.0, -1.0, 3.0, 4.0]}
    other = {"helpful": [10.0, 20.0, 30.0, 40.0], "harmless": [0.0, 0.0, 1.0, 2.0]}
    return [refs, refs, other]


def helpful(completions, **kwargs):
    return [float(c.count("a")) for c in completions]


def test_calibrated_reward_returns_phi_of_the_mid_rank_per_row():
    rows = _two_reward_rows()
    completions = ["aa", "aaaaa", "aaaaaaaaaaaaaaaaaaaaaaaaa"]  # helpful rewards 2, 5, 25
    wrapper = CalibratedReward(helpful, "bon:t=3")
    assert wrapper.__name__ == "helpful"  # TRL names callables by __name__; the per-reward entry of that name is read
    logged = {}
    out = wrapper(prompts=["p"] * 3, completions=completions, ref_rewards=rows,
                  log_metric=lambda k, v: logged.__setitem__(k, v))
    expected_c = [mid_rank(2.0, rows[0]["helpful"]), mid_rank(5.0, rows[1]["helpful"]), mid_rank(25.0, rows[2]["helpful"])]
    assert expected_c == [0.75, 1.0, 0.5]
    assert out == pytest.approx([math.exp(3 * c) for c in expected_c], rel=1e-6)
    assert logged["calibrated_reward/helpful"] == pytest.approx(sum(expected_c) / 3)
    # key= picks another entry; a plain column works without key
    other = CalibratedReward(helpful, "identity", key="harmless", name="helpful_vs_harmless_refs")
    assert other(prompts=["p"] * 3, completions=completions, ref_rewards=rows) == pytest.approx(
        [mid_rank(2.0, rows[0]["harmless"]), mid_rank(5.0, rows[1]["harmless"]), mid_rank(25.0, rows[2]["harmless"])])
    plain = [r["helpful"] for r in rows]
    assert CalibratedReward(helpful)(prompts=["p"] * 3, completions=completions, ref_rewards=plain) == pytest.approx(expected_c)


def test_calibrated_reward_errors_name_the_reward_and_the_row():
    rows = _two_reward_rows()
    rows[2] = {"helpful": [1.0, 2.0]}
    with pytest.raises(CalibrationError, match=r"no reference rewards for reward 'harmless' at row 2"):
        CalibratedReward(helpful, key="harmless")(prompts=["p"] * 3, completions=["a"] * 3, ref_rewards=rows)
    with pytest.raises(ValueError, match=r"got no 'ref_rewards' column"):
        CalibratedReward(helpful)(prompts=["p"], completions=["a"], other=[1])
    with pytest.raises(ValueError, match="give a concrete transform"):
        CalibratedReward(helpful, "auto")


def test_calibrated_reward_scores_a_reward_model_as_trl_does(tiny):
    from transformers import AutoModelForSequenceClassification

    from trl_infalign.tiny import build_tiny_reward_model

    path, tokenizer = tiny
    model_path = str(Path(path).parent / "rm")
    build_tiny_reward_model(tokenizer, model_path)
    wrapper = CalibratedReward(str(model_path), processing_class=tokenizer)
    prompts, completions = ["the movie was", "this film is"], [" good", " bad bad"]
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1).eval()
    inputs = tokenizer(text=[p + c for p, c in zip(prompts, completions)], return_tensors="pt", padding=True,
                       padding_side="right", add_special_tokens=False)
    with torch.inference_mode():
        direct = model(**inputs).logits[:, 0].double()
    refs = [[direct[0].item() - 1, direct[0].item() + 1], [direct[1].item() + 1, direct[1].item() + 2]]
    assert wrapper(prompts=prompts, completions=completions, ref_rewards=refs) == pytest.approx([0.5, 0.0])


# ------------------------------------------------------------------------------------------------------ end to end
def make_two_reward_bandit(tmp_path):
    """The bandit with two rewards per action: helpful(a) = a, harmless(a) = (5a mod 12), scored on the same 64
    reference samples (one per-reward column)."""
    path, tokenizer, pi_ref, rewards, ref_rewards, _, _ = make_bandit(tmp_path)
    second = rewards.clone()
    actions = rewards >= 0
    second[actions] = (rewards[actions] * 5) % NUM_ACTIONS
    index = {r: i for i, r in enumerate(rewards.tolist())}  # action reward -> token (rewards are distinct per action)
    ref_second = [second[index[r]].item() for r in ref_rewards]
    column = {"helpful": ref_rewards, "harmless": ref_second}
    dataset = Dataset.from_dict({"prompt": [BANDIT_PROMPT] * 64, "ref_rewards": [column] * 64})

    def helpful(completion_ids, **kwargs):
        return [rewards[ids[0]].item() if ids else -1.0 for ids in completion_ids]

    def harmless(completion_ids, **kwargs):
        return [second[ids[0]].item() if ids else -1.0 for ids in completion_ids]

    return path, tokenizer, pi_ref, (rewards, second), column, dataset, (helpful, harmless)


def two_reward_optimum(pi_ref, rewards, column, transforms: dict, weights: dict, beta: float):
    """π*(a) ∝ π_ref(a)·exp(Σ_r W_r Φ_r(c_r(a))/β), c by explicit mid-rank loops."""
    phi = torch.zeros(len(pi_ref), dtype=torch.float64)
    for (name, transform), reward in zip(transforms.items(), rewards):
        c = torch.tensor([mid_rank(r, column[name]) for r in reward.tolist()], dtype=torch.float64)
        phi += weights[name] * get_transform(transform)(c).double()
    return torch.softmax(torch.log(pi_ref) + phi / beta, dim=0)


TRANSFORMS = {"helpful": "bon:t=3", "harmless": "won:t=4"}
WEIGHTS = {"helpful": 0.5, "harmless": 0.5}
SPEC = "bon:t=3@helpful+won:t=4@harmless"


def test_explicit_per_reward_transforms_build_the_reward_step(tmp_path):
    path, tokenizer, pi_ref, rewards, column, dataset, funcs = make_two_reward_bandit(tmp_path)
    args = bandit_config(tmp_path / "out", SPEC, 3.0, inference_procedure=DEPLOYMENT, reward_weights=[2.0, 1.0])
    with pytest.warns(UserWarning, match=r"reward_weights=\[2.0, 1.0\] is ignored"):
        trainer = CTRLTrainer(model=path, reward_funcs=list(funcs), args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    assert trainer.ctrl_fit is None and args.beta == 3.0 and args.resolved_transform == SPEC
    low, high = 0.5 * 1 - 0.5 * 1, 0.5 * math.exp(3) - 0.5 * math.exp(-4)
    assert (trainer.ctrl_offset, trainer.ctrl_scale) == pytest.approx((low, high - low))
    assert trainer.beta == pytest.approx(3.0 / (high - low))  # RLOO's β on the normalised Φ
    with pytest.raises(ProcedureError, match=r"names reward\(s\) \['harmless'\]"):
        CTRLTrainer(model=path, reward_funcs=[funcs[0]], args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.slow
def test_ctrl_trainer_fitted_for_a_two_reward_deployment_lands_on_its_tilt(tmp_path):
    """`transform="auto"` with a KL budget: t's and β come from the training references (exact on the atoms); with
    the β held fixed RLOO must land on π_ref·exp(Σ_r W_r Φ_r(c_r)/β)/Z and its KL on the budget."""
    path, tokenizer, pi_ref, rewards, column, dataset, funcs = make_two_reward_bandit(tmp_path)
    args = bandit_config(tmp_path / "out", "auto", 1.0, inference_procedure=DEPLOYMENT, kl_budget=0.5,
                         kl_control="fixed")
    trainer = CTRLTrainer(model=path, reward_funcs=list(funcs), args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    fit = trainer.ctrl_fit
    assert args.beta == fit.beta and fit.kl == pytest.approx(0.5, abs=1e-6)
    assert fit.t["helpful"] < 1 < 3 < fit.t["harmless"]  # a flat BoN reward, a steep WoN reward (notes §9)
    transforms = {r: t.spec for r, t in fit.transforms.transforms.items()}
    target = two_reward_optimum(pi_ref, rewards, column, transforms, WEIGHTS, fit.beta)
    assert total_variation(target, pi_ref) > 0.15 and target.max().item() < 0.7
    # calibrating the summed reward (the package before several rewards) trains somewhere else, at any β
    summed = {"sum": [a + b for a, b in zip(column["helpful"], column["harmless"])]}
    assert min(total_variation(target, two_reward_optimum(pi_ref, [rewards[0] + rewards[1]], summed,
                                                          {"sum": "identity"}, {"sum": 1.0}, b))
               for b in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)) > 0.1

    trainer.train()
    trained = bandit_next_token_probs(trainer.model, tokenizer)
    assert total_variation(trained, target) < 0.03, (trained, target)
    kl = (trained * torch.log(trained / pi_ref)).sum().item()
    assert kl == pytest.approx(0.5, rel=0.1)
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    for key in ("ctrl/calibrated_reward/helpful", "ctrl/calibrated_reward/harmless", "ctrl/bon@4_win_rate/helpful",
                "ctrl/won@4_win_rate/harmless", "ctrl/deployment_win_rate", "ctrl/calibration_saturation"):
        assert key in logs, key
    assert logs["ctrl/deployment_win_rate"] == pytest.approx(
        0.5 * logs["ctrl/bon@4_win_rate/helpful"] + 0.5 * logs["ctrl/won@4_win_rate/harmless"], abs=1e-9)


@pytest.mark.slow
def test_stock_grpo_trainer_with_calibrated_rewards_lands_on_the_tilt_at_beta_g_over_g_minus_1(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    from bandit_utils import GRPO_BANDIT_SETTINGS

    path, tokenizer, pi_ref, rewards, column, dataset, (helpful_fn, harmless_fn) = make_two_reward_bandit(tmp_path)
    beta, G = 2.25, 4
    target = two_reward_optimum(pi_ref, rewards, column, TRANSFORMS, WEIGHTS, beta * G / (G - 1))
    at_beta = two_reward_optimum(pi_ref, rewards, column, TRANSFORMS, WEIGHTS, beta)
    assert total_variation(target, at_beta) > 0.04  # the compensation is visible
    funcs = [CalibratedReward(helpful_fn, TRANSFORMS["helpful"]), CalibratedReward(harmless_fn, TRANSFORMS["harmless"])]
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), beta=beta, scale_rewards="none", reward_weights=[0.5, 0.5],
                      num_generations=G, max_completion_length=1, temperature=1.0, top_k=0, top_p=1.0,
                      mask_truncated_completions=False, logging_steps=50, save_strategy="no", report_to="none",
                      use_cpu=True, bf16=False, seed=0, disable_dropout=True, disable_tqdm=True, **GRPO_BANDIT_SETTINGS)
    trainer = GRPOTrainer(model=path, reward_funcs=funcs, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.reward_func_names == ["helpful", "harmless"]
    trainer.train()
    trained = bandit_next_token_probs(trainer.model, tokenizer)
    assert total_variation(trained, target) < 0.03, (trained, target)
    assert total_variation(trained, target) < total_variation(trained, at_beta)


def test_ctrl_grpo_trainer_takes_a_two_reward_deployment(tmp_path):
    from bandit_utils import grpo_bandit_config
    from trl_infalign import CTRLGRPOTrainer

    path, tokenizer, pi_ref, rewards, column, dataset, funcs = make_two_reward_bandit(tmp_path)
    args = grpo_bandit_config(tmp_path / "out", SPEC, 3.0, inference_procedure=DEPLOYMENT, max_steps=2,
                              logging_steps=1, per_device_train_batch_size=16)
    trainer = CTRLGRPOTrainer(model=path, reward_funcs=list(funcs), args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    low, high = 0.5 * 1 - 0.5 * 1, 0.5 * math.exp(3) - 0.5 * math.exp(-4)
    assert trainer.beta == pytest.approx(3.0 * (4 - 1) / 4 / (high - low))  # β·(G−1)/G on the normalised Φ
    trainer.train()
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert {"ctrl/bon@4_win_rate/helpful", "ctrl/won@4_win_rate/harmless", "ctrl/deployment_win_rate"} <= set(logs)


def test_stock_rloo_trainer_takes_calibrated_rewards(tmp_path):
    """Stock `trl.RLOOTrainer` names the wrappers like the wrapped functions and trains on Σ_j w_j Φ_j(c_j)."""
    from trl import RLOOConfig, RLOOTrainer

    path, tokenizer, pi_ref, rewards, column, dataset, (helpful_fn, harmless_fn) = make_two_reward_bandit(tmp_path)
    funcs = [CalibratedReward(helpful_fn, TRANSFORMS["helpful"]), CalibratedReward(harmless_fn, TRANSFORMS["harmless"])]
    args = RLOOConfig(output_dir=str(tmp_path / "rloo"), beta=3.0, reward_weights=[0.5, 0.5], num_generations=4,
                      per_device_train_batch_size=16, max_completion_length=1, mask_truncated_completions=False,
                      max_steps=1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                      disable_tqdm=True)
    trainer = RLOOTrainer(model=path, reward_funcs=funcs, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.reward_func_names == ["helpful", "harmless"]
    trainer.train()
    (logged,) = [h for h in trainer.state.log_history if "rewards/helpful/mean" in h]
    # each wrapper returns its Φ_j(c_j): exp(3c) ∈ [1, e³] and −exp(−4c) ∈ [−1, −e⁻⁴]
    assert 1.0 <= logged["rewards/helpful/mean"] <= math.exp(3)
    assert -1.0 <= logged["rewards/harmless/mean"] <= -math.exp(-4)
    assert 0.0 <= logged["calibrated_reward/helpful"] <= 1.0  # the wrapper's own metric, through TRL's log_metric
    # Jensen: the mean of exp(3c) is at least exp(3·mean c)
    assert logged["rewards/helpful/mean"] >= math.exp(3 * logged["calibrated_reward/helpful"]) - 1e-6


def test_model_card_lists_the_deployment_and_its_prediction(tmp_path):
    path, tokenizer, pi_ref, rewards, column, dataset, funcs = make_two_reward_bandit(tmp_path)
    args = bandit_config(tmp_path / "out", "auto", 1.0, inference_procedure=DEPLOYMENT, kl_budget=0.5, max_steps=1)
    trainer = CTRLTrainer(model=path, reward_funcs=list(funcs), args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    from trl_infalign.model_card import build_ctrl_model_card

    card = str(build_ctrl_model_card(trainer))
    fit = trainer.ctrl_fit
    assert "judged on the helpful reward" in card and "judged on the harmless reward" in card
    for component in trainer.ctrl_deployment.components:
        transform = fit.transforms.transforms[component.reward].spec
        assert f"| {component.weight:.4g} | {component.procedure.label} | `{component.reward}` | `{transform}` | " \
               f"{fit.win_rates[component.metric_key]:.4g} |" in card
    assert f"**{fit.objective:.4g}**" in card
    assert f"| t | helpful: {fit.t['helpful']:.4g}, harmless: {fit.t['harmless']:.4g} |" in card
