"""`ctrl/calibration_saturation`: the share of completions that beat every reference of their prompt (c = 1)."""

import warnings

import pytest
import torch

from trl_infalign import CTRLTrainer
from trl_infalign.calibrated_reward import CalibratedBatch

from bandit_utils import bandit_config, make_bandit


def test_saturation_is_exact_on_constructed_batches():
    refs = torch.tensor([[0.0, 1.0, 2.0]] * 4 + [[5.0, 5.0, 5.0]] * 2, dtype=torch.float64)
    raw = torch.tensor([3.0, 2.0, -1.0, float("nan"), 6.0, 5.0], dtype=torch.float64)
    c = torch.tensor([1.0, 5 / 6, 0.0, float("nan"), 1.0, 0.5], dtype=torch.float64)
    batch = CalibratedBatch(raw, refs, torch.ones_like(refs, dtype=torch.bool), c)
    # 5 finite c: two beat every reference (3 > 2, 6 > 5), one loses to all; a tie with the top (2.0) is not c = 1
    assert batch.saturation == (2 / 5, 1 / 5)
    assert [r.tolist() for r in batch.reference_rows()[-1:]] == [[5.0, 5.0, 5.0]]


@pytest.mark.slow
def test_rewards_beyond_every_reference_saturate_and_warn_once(tmp_path):
    """References built from r, training on r + 100 with the health check off: every completion beats all K."""
    path, tokenizer, _, _, _, dataset, reward_func = make_bandit(tmp_path)

    def shifted(completion_ids, **kwargs):
        return [r + 100.0 for r in reward_func(completion_ids)]

    args = bandit_config(tmp_path / "out", "bon:t=3", 4.0, calibration_check="off", max_steps=12, logging_steps=1,
                         per_device_train_batch_size=16, num_generations=4)
    trainer = CTRLTrainer(model=path, reward_funcs=shifted, args=args, train_dataset=dataset, processing_class=tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    values = [h["ctrl/calibration_saturation"] for h in trainer.state.log_history if "ctrl/calibration_saturation" in h]
    assert len(values) == 12 and all(v == 1.0 for v in values)
    saturated = [w for w in caught if "beat all K = 64 reference rewards" in str(w.message)]
    assert len(saturated) == 1 and "K = 256" in str(saturated[0].message)
