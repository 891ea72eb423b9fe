r"""The calibrated-reward wrapper: CTRL's reward as a TRL reward function (InfAlign, arXiv 2412.19792, §3).

    c    = (#{ref < r} + ½·#{ref = r}) / K      (the completion's mid-rank among its prompt's K reference rewards)
    Φ(c)                                        (the transform; returned unnormalised)

:class:`CalibratedReward` wraps any TRL reward function — a callable, a sequence-classification model or a model
path — and returns Φ(c) per completion, reading each row's reference rewards from the dataset column TRL passes to
reward functions. It is a `reward_funcs` entry of stock `trl.GRPOTrainer` / `trl.RLOOTrainer`; several wrappers plus
TRL's `reward_weights` give Σ_j w_j Φ_j(c_j). A stock trainer needs `scale_rewards="none"` (std scaling moves the
optimum), and GRPO's bias-corrected KL puts the optimum at π_ref·exp(Φ/β_eff)/Z with β_eff = β·G/(G−1) (notes §7).
`CTRLTrainer` / `CTRLGRPOTrainer` calibrate with the same :class:`RewardCalibration` and add the β compensation, the
KL budget and its controller, the step-0 health check, provenance checks and the model card.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .calibration import calibrate, pad_reference_rewards, select_reference_rewards
from .sampling import load_reward_funcs, reward_func_name, score_completions
from .transforms import Transform, get_transform

__all__ = ["CalibratedReward", "RewardCalibration", "CalibratedBatch"]


@dataclass
class CalibratedBatch:
    """One batch through :class:`RewardCalibration`: the raw rewards, their reference rows (padded) and c."""

    raw: torch.Tensor
    references: torch.Tensor
    mask: torch.Tensor
    calibrated: torch.Tensor

    def reference_rows(self) -> list[np.ndarray]:
        """Each completion's valid reference rewards (the padded matrix back as rows)."""
        values, mask = self.references.cpu().numpy(), self.mask.cpu().numpy()
        return [row[valid] for row, valid in zip(values, mask)]

    @property
    def saturation(self) -> tuple[float, float]:
        """(share of completions with c = 1, share with c = 0): they beat (lose to) every reference of their prompt,
        so calibration cannot rank them against each other. NaN for a batch without finite c."""
        c = self.calibrated[torch.isfinite(self.calibrated)]
        if c.numel() == 0:
            return math.nan, math.nan
        return float((c == 1).double().mean()), float((c == 0).double().mean())


@dataclass
class RewardCalibration:
    """Calibrate raw rewards against a reference column, then transform: the one implementation behind
    :class:`CalibratedReward` and the CTRL trainers' reward step.

    `key` picks one reward of a per-reward column (rows ``{name: [K floats]}``); `default_key` is used for such
    rows when `key` is None (a wrapper's own reward name)."""

    transform: Transform
    column: str = "ref_rewards"
    key: str | None = None
    default_key: str | None = None
    min_references: int = 1

    def reference_rows(self, rows: Sequence[Any]) -> list:
        """This reward's reference rewards per row (:func:`~trl_infalign.calibration.select_reference_rewards`)."""
        key = self.key
        if key is None and self.default_key is not None and rows and isinstance(rows[0], dict) and (
            self.default_key in rows[0]
        ):
            key = self.default_key
        return select_reference_rewards(rows, key, column=self.column)

    def reference_matrix(self, rows: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """This reward's reference rewards as a padded float64 matrix and its validity mask, (B, K_max) each. Rows of
        one length (the usual case) convert in one numpy call, without a Python loop over the values."""
        rows = self.reference_rows(rows)
        if rows and all(isinstance(row, (list, tuple, np.ndarray)) for row in rows):
            lengths = {len(row) for row in rows}
            if len(lengths) == 1 and 0 not in lengths:
                try:
                    values = np.array(rows, dtype=np.float64)
                except (TypeError, ValueError):
                    values = None  # not numbers: pad_reference_rewards names the rows
                if values is not None and values.ndim == 2:
                    return values, np.ones(values.shape, dtype=bool)
        values, mask = pad_reference_rewards(rows)
        return values.numpy(), mask.numpy()

    def calibrate(self, raw: torch.Tensor, rows: Sequence[Any] | None = None, *,
                  matrix: tuple[np.ndarray, np.ndarray] | None = None) -> CalibratedBatch:
        """c for each completion against its reference row (`rows`, or a padded `matrix` from
        :meth:`reference_matrix`); NaN where the raw reward is NaN/±inf (TRL: no reward, no advantage)."""
        values, mask = self.reference_matrix(rows) if matrix is None else matrix
        references = torch.as_tensor(values, device=raw.device)
        mask = torch.as_tensor(mask, device=raw.device)
        c = calibrate(raw, references, mask, nonfinite="nan", min_references=self.min_references)
        return CalibratedBatch(raw, references, mask, c)

    def transformed(self, batch: CalibratedBatch) -> torch.Tensor:
        """Φ(c), unnormalised (transforms of raw rewards, e.g. `lsc`, see the raw and reference rewards too)."""
        return self.transform(batch.calibrated, rewards=batch.raw, ref_rewards=batch.references, ref_mask=batch.mask)


class CalibratedReward:
    r"""A TRL reward function returning Φ(c), the transformed calibrated reward of each completion.

    c = (#{ref < r} + ½·#{ref = r}) / K is the completion's mid-rank among its prompt's K reference rewards
    (uniform under the reference policy, InfAlign arXiv 2412.19792 §3), and Φ the transform (``"identity"``,
    ``"bon:t=3"``, ``"won:t=5"``, ``"optimal:procedure=bon,n=4,beta=0.1"``, ...; unnormalised).

    Args:
        reward_func: a callable ``f(prompts, completions, completion_ids, **columns) -> list[float]``, a
            sequence-classification model, or a model path; scored exactly as TRL scores it (a model sees
            prompt + completion, chat-templated for conversational prompts, and its ``logits[:, 0]``).
        transform: transform spec or :class:`~trl_infalign.transforms.Transform`.
        reference_rewards_column: the dataset column with each prompt's K reference rewards; TRL passes every
            dataset column to reward functions, so it arrives as a keyword argument.
        key: the entry of a per-reward column (``{name: [K floats]}``) to calibrate against. Default: the entry named
            like the wrapped reward function, or the only entry.
        name: the name TRL shows for this reward (its ``__name__``); default: the wrapped function's name.
        processing_class: the tokenizer of a reward model (default: loaded from the model's path, as TRL does).
        min_references: refuse rows with fewer valid reference rewards.
        model_init_kwargs: ``from_pretrained`` kwargs when `reward_func` is a path.

    With stock TRL trainers set ``scale_rewards="none"`` (GRPO), and remember that GRPO's optimum sits at
    β·G/(G−1) (docs/multi_reward.md)::

        from trl import GRPOConfig, GRPOTrainer
        from trl_infalign import CalibratedReward

        helpful = CalibratedReward(helpful_rm, "bon:t=3", key="helpful")
        harmless = CalibratedReward(harmless_rm, "won:t=5", key="harmless")
        trainer = GRPOTrainer(model, reward_funcs=[helpful, harmless], train_dataset=dataset,
                              args=GRPOConfig(..., beta=0.1, scale_rewards="none", reward_weights=[0.5, 0.5]))
    """

    def __init__(self, reward_func, transform: "str | Transform" = "identity", *,
                 reference_rewards_column: str = "ref_rewards", key: str | None = None, name: str | None = None,
                 processing_class=None, min_references: int = 1, model_init_kwargs: dict | None = None):
        if isinstance(reward_func, CalibratedReward):
            raise TypeError("reward_func is already a CalibratedReward: wrap the plain reward function once.")
        (self.reward_func,), (self.processing_class,) = load_reward_funcs([reward_func], [processing_class],
                                                                          model_init_kwargs)
        self.reward_name = reward_func_name(self.reward_func)
        self.__name__ = name or self.reward_name  # TRL names a callable reward by its __name__
        spec = transform.strip() if isinstance(transform, str) else transform
        if spec in ("auto", "optimal"):
            raise ValueError(
                f"CalibratedReward(transform={spec!r}): give a concrete transform, e.g. 'bon:t=3' or "
                "'optimal:procedure=bon,n=4,beta=0.1'; `trl-infalign theory --best-t` / `diagnose` find t for your "
                "KL budget (CTRLTrainer resolves 'auto' itself)."
            )
        self.calibration = RewardCalibration(get_transform(spec), reference_rewards_column, key, self.reward_name,
                                             min_references)

    @property
    def transform(self) -> Transform:
        return self.calibration.transform

    def __repr__(self) -> str:
        key = f", key={self.calibration.key!r}" if self.calibration.key is not None else ""
        return f"CalibratedReward({self.reward_name!r}, {self.transform.spec!r}{key})"

    def score(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
              **columns) -> torch.Tensor:
        """The wrapped reward function's raw rewards (float64, NaN for a callable's None)."""
        columns = {k: v for k, v in columns.items() if k not in ("trainer_state", "log_extra", "log_metric")}
        scores = score_completions([self.reward_func], [self.processing_class], prompts, completions,
                                   completion_ids=completion_ids, columns=columns)
        return scores[:, 0].double()

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 **kwargs) -> list[float]:
        column = self.calibration.column
        if column not in kwargs:
            given = sorted(k for k in kwargs if k not in ("trainer_state", "log_extra", "log_metric", "environments"))
            raise ValueError(
                f"CalibratedReward({self.__name__!r}) got no {column!r} column (reward functions received: {given}). "
                "Each training row needs its prompt's K reference rewards: build them with "
                "trl_infalign.build_reference_rewards(...) / `trl-infalign build-reference`, keep the column in the "
                "dataset (remove_unused_columns=False, the TRL default for GRPO/RLOO), or set "
                "reference_rewards_column."
            )
        raw = self.score(prompts, completions, completion_ids, **kwargs)
        batch = self.calibration.calibrate(raw, kwargs[column])
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric(f"calibrated_reward/{self.__name__}", float(torch.nanmean(batch.calibrated)))
        return self.calibration.transformed(batch).tolist()
