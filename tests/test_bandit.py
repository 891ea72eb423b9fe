"""End to end: CTRL on a one-token bandit must reach the known optimum π_ref·exp(Φ(c)/β)/Z.

RLOO's k1 KL penalty makes π* ∝ π_ref·exp(R/β) its exact stationary point (every leave-one-out advantage vanishes in
expectation there), so total variation to π* measures whether the whole pipeline — reference rewards, calibration,
transform, the reward hand-off to RLOO — is CTRL, and not merely something that trains.
"""

import pytest
import torch

from trl_infalign import CTRLTrainer
from trl_infalign.tiny import bandit_next_token_probs

from bandit_utils import bandit_config, make_bandit, optimal_policy

CASES = [("bon:t=3", 4.0), ("won:t=3", 0.25), ("identity", 0.2)]


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


@pytest.mark.slow
@pytest.mark.parametrize("transform,beta", CASES)
def test_bandit_reaches_ctrl_optimum(tmp_path, transform, beta):
    path, tokenizer, pi_ref, rewards, ref_rewards, dataset, reward_func = make_bandit(tmp_path)
    target = optimal_policy(pi_ref, rewards, ref_rewards, transform, beta)
    # The optimum must be far from both the reference and a one-hot maximiser, or the test proves nothing.
    assert total_variation(target, pi_ref) > 0.15
    assert target.max().item() < 0.7

    args = bandit_config(tmp_path / "out", transform, beta)
    trainer = CTRLTrainer(model=path, reward_funcs=reward_func, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trained = bandit_next_token_probs(trainer.model, tokenizer)
    assert total_variation(trained, target) < 0.02, (transform, trained, target)
    # and it is the *calibrated, transformed* optimum, not the raw-reward one at the same β
    raw_target = torch.softmax(torch.log(pi_ref) + rewards / beta, dim=0)
    assert total_variation(trained, raw_target) > total_variation(trained, target) + 0.05


@pytest.mark.slow
def test_bandit_trained_for_a_mixture_lands_on_its_optimal_transform(tmp_path):
    """A deployment that samples plainly for half the requests and runs Best-of-4 / Best-of-16 for the rest: the
    config resolves the general solver's Φ* for that mixture, and RLOO lands on π_ref·exp(Φ*(c)/β)/Z."""
    mixture = "mixture:0.5*standard+0.25*bon:n=4+0.25*bon:n=16"
    path, tokenizer, pi_ref, rewards, ref_rewards, dataset, reward_func = make_bandit(tmp_path)
    args = bandit_config(tmp_path / "out", "optimal", 0.1, inference_procedure=mixture, max_steps=100)
    assert args.resolved_transform == f"optimal:procedure={mixture},beta=0.1"
    target = optimal_policy(pi_ref, rewards, ref_rewards, args.resolved_transform, args.beta)
    assert total_variation(target, pi_ref) > 0.15 and target.max().item() < 0.7
    # the Best-of-16 part matters: the optimum for plain sampling (identity) at the same β is elsewhere
    assert total_variation(target, optimal_policy(pi_ref, rewards, ref_rewards, "identity", 0.1)) > 0.05

    trainer = CTRLTrainer(model=path, reward_funcs=reward_func, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trained = bandit_next_token_probs(trainer.model, tokenizer)
    assert total_variation(trained, target) < 0.02, (trained, target)
    logged = [h for h in trainer.state.log_history if "ctrl/mixture(0.5*standard+0.25*bon@4+0.25*bon@16)_win_rate" in h]
    assert logged and 0.5 < logged[-1]["ctrl/mixture(0.5*standard+0.25*bon@4+0.25*bon@16)_win_rate"] < 1.0
