"""The CTRL reward step and the TRL hooks around it, shared by the RLOO and GRPO trainers (InfAlign, arXiv 2412.19792).

`CTRLTrainerMixin` goes in front of a TRL online trainer whose `_calculate_rewards` returns the gathered
(num_completions, num_reward_funcs) reward matrix — `RLOOTrainer` and `GRPOTrainer` both do:

    class CTRLTrainer(CTRLTrainerMixin, RLOOTrainer): ...
    class CTRLGRPOTrainer(CTRLTrainerMixin, GRPOTrainer): ...

It changes only what a completion's reward *is*:

    r   = Σ_i w_i r_i(x, y)                          (the user's reward functions, weighted as in TRL)
    c   = (#{ref < r} + ½ #{ref = r}) / K             (calibration against the prompt's K reference rewards)
    Φ(c)                                             (the transform the trainer then maximises, minus β·KL)

A deployment that names rewards (`mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless`, `trl_infalign.deployment`)
calibrates each reward function r on its own, c_r against the prompt's K references of r, and trains on
Φ = Σ_r W_r Φ_r(c_r). Both paths run through `trl_infalign.calibrated_reward.RewardCalibration`, the implementation
behind the `CalibratedReward` wrapper for stock TRL trainers.

The mixin is the list of TRL hooks it overrides; each concern around the reward step lives in its own module:

- construction checks (output dir, disk, prompt column, pad tokens, context lengths, reference scan):
  `trl_infalign.preflight`;
- the step-0 calibration health check and the completions it draws: `trl_infalign.health`;
- checkpointed state, resume checks, the KL controller's restore, the last complete checkpoint:
  `trl_infalign.run_state` (`ctrl_calibration.json`, `ctrl_run.json`);
- the model card and Hub failures: `trl_infalign.model_card`, `trl_infalign.hub`.

A subclass says how its KL coefficient relates to the user's β (`_ctrl_penalty_factor`), feeds the per-completion
KL it measures to `_ctrl_record_sequence_kl`, and says how to draw completions with TRL's own generation
(`_ctrl_sample`).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from . import preflight, run_state
from .health import DEFAULT_FALSE_ALARM_RATE, NOT_AT_HAND, CalibrationHealth, Step0Batch, report_calibration_health, step0_health_check
from .hub import HubUploadError, hub_failure, hub_token_redacted
from .kl_control import AdaptiveKLController
from .model_card import INFALIGN_CITATION
from .procedures import get_procedure
from .run_state import CALIBRATION_STATE_FILE, RUN_RECORD_FILE
from .sampling import combine_rewards, reward_func_name
from .transforms import get_transform

logger = logging.getLogger(__name__)

#: `ctrl/calibration_saturation` above this share for `SATURATION_WINDOW` training batches in a row gets one warning
#: (the reference policy itself has a share 1/(K+1) at the top: 0.2 at the smallest default K = 4).
SATURATION_WARNING = 0.25
SATURATION_WINDOW = 10

__all__ = [
    "CALIBRATION_STATE_FILE",
    "RUN_RECORD_FILE",
    "INFALIGN_CITATION",
    "CTRLTrainerMixin",
    "HubUploadError",
    "pooled_inference_win_rate",
]


def pooled_inference_win_rate(calibrated: torch.Tensor, n: int | None = None, procedure="bon") -> float:
    """Win rate of the policy under the inference procedure against the reference's, from the batch's calibrated
    rewards (the trainer's running `ctrl/<procedure>_win_rate` metric).

    Pools c over prompts (under π_ref, c is Uniform[0,1] for every prompt), so the reference's output has the exact
    CDF f(c); the policy's output is weighted over the sorted batch by the procedure's all-subsets rank weights
    (:meth:`~trl_infalign.procedures.InferenceProcedure.pooled_calibrated_win_rate`). `procedure` is a spec or the
    old pair (n, "bon"); NaN when the batch has fewer values than the procedure draws.
    """
    return get_procedure(procedure, n).pooled_calibrated_win_rate(calibrated)


def _gather_matrix(local: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every process's (values, mask) reference matrix, stacked in process order (padded to the largest K)."""
    parts = gather_object([local])
    if len(parts) == 1:
        return parts[0]
    width = max(values.shape[1] for values, _ in parts)
    values = np.zeros((sum(v.shape[0] for v, _ in parts), width))
    mask = np.zeros(values.shape, dtype=bool)
    start = 0
    for v, m in parts:
        values[start : start + v.shape[0], : v.shape[1]], mask[start : start + v.shape[0], : v.shape[1]] = v, m
        start += v.shape[0]
    return values, mask


class CTRLTrainerMixin:
    """CTRL on top of a TRL online trainer (see the module docstring). Not usable on its own.

    Class attributes a trainer sets: `_ctrl_config_class` (the config it requires) and `_ctrl_base_trainer` (the TRL
    algorithm's name, e.g. "RLOO", used in messages and in `ctrl_calibration.json`).
    """

    _ctrl_config_class: type = None
    _ctrl_base_trainer: str = None

    def __init__(self, model, reward_funcs, args=None, train_dataset=None, eval_dataset=None, *a, **kw):
        config_class = self._ctrl_config_class
        if args is None:
            args = self._ctrl_default_args(model)
        elif not isinstance(args, config_class):
            name = config_class.__name__
            raise TypeError(
                f"{type(self).__name__} needs a {name}, got {type(args).__name__}: build one with "
                f"{name}(**your_args.to_dict()) plus the CTRL fields (inference_procedure, inference_n, transform, ...)."
            )
        self.ctrl_procedure = args.procedure  # resolved once: the reward step runs every batch
        self.ctrl_deployment = args.deployment
        preflight.check_output_dir(args)  # before anything is loaded or computed
        named_datasets = [
            (name, ds)
            for split, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset))
            for name, ds in (dataset.items() if isinstance(dataset, dict) else [(split, dataset)])
            if ds is not None
        ]
        for name, ds in named_datasets:
            preflight.check_prompt_column(ds, name, type(self).__name__, self._ctrl_base_trainer)
            preflight.check_reference_rewards(ds, args, name)
        self.ctrl_reference_fingerprint, self.ctrl_reference_counts = preflight.scan_reference_rewards(
            train_dataset, args.reference_rewards_column
        )
        self.ctrl_fit = None  # several rewards: the transforms and β fitted on the training set's references
        self._ctrl_set_reward_transforms(args, reward_funcs, train_dataset)
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, *a, **kw)
        self._ctrl_check_after_loading(named_datasets)
        from .provenance import check_reference_provenance

        for name, ds in named_datasets:
            check_reference_provenance(self, ds, name)
        # RLOO and GRPO combine what `_calculate_rewards` returns with `reward_weights`; CTRL returns one column, Φ(c),
        # and applies the user's weights itself, before calibration (the reference rewards are combined the same way).
        self.ctrl_reward_weights = self.reward_weights.clone()
        self.ctrl_reward_func_names = list(self.reward_func_names)
        if self.ctrl_deployment.is_multi_reward:  # TRL's own names: the ones the deployment was bound to above
            self.ctrl_deployment.bind(self.ctrl_reward_func_names)
        self.reward_weights = torch.ones(1)
        self.reward_func_names = ["ctrl_transformed"]
        self.ctrl_offset, self.ctrl_scale = self._transform_normalisation()
        self.beta = self._ctrl_penalty_beta(args.beta)  # Φ/β is unchanged by the rescaling
        self.ctrl_kl_controller = (
            AdaptiveKLController(budget=args.kl_budget, beta=args.beta) if args.kl_control == "adaptive" else None
        )
        self.ctrl_evaluation: dict | None = None
        # the step-0 check needs the policy to be the reference: not on a resumed run (see `train`)
        self.ctrl_calibration_health: CalibrationHealth | None = None
        self.ctrl_calibration_healths: dict[str, CalibrationHealth | None] = {}  # several rewards: one each
        self._ctrl_saturation_history: deque = deque(maxlen=SATURATION_WINDOW)
        self._ctrl_saturation_warned = False
        self._ctrl_health_pending = args.calibration_check != "off"
        self.ctrl_dataset_name: str | None = getattr(args, "dataset_name", None)
        self._ctrl_step0 = None  # the first batch's inputs and prompts, and the completions drawn for the check
        # how this run makes its rewards, read while the policy is still the model it starts from (`ctrl_run.json`)
        self.ctrl_run_record: dict | None = run_state.describe_run(self, train_dataset)

    # ----------------------------------------------------------------------------------------------------------------
    # The reward: one RewardCalibration per calibrated reward, Φ = Σ_r W_r Φ_r(c_r)
    def _ctrl_set_reward_transforms(self, args, reward_funcs, train_dataset) -> None:
        """Set `ctrl_transform` (the Transform of one reward, or the RewardTransforms of several), the per-reward
        `RewardTransforms` and their `RewardCalibration`s. Several rewards: bind the deployment to the reward
        functions' names and, for `auto` / `optimal` / `kl_budget`, fit t's and β on the training references."""
        from .calibrated_reward import RewardCalibration
        from .deployment import RewardTransforms

        column, deployment = args.reference_rewards_column, self.ctrl_deployment
        if not deployment.is_multi_reward:
            self.ctrl_transform = get_transform(args.resolved_transform)
            self.ctrl_reward_transforms = RewardTransforms({None: self.ctrl_transform}, {None: 1.0})
        else:
            funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
            deployment = self.ctrl_deployment = deployment.bind([reward_func_name(f) for f in funcs])
            if args.reward_weights is not None and any(float(w) != 1.0 for w in args.reward_weights):
                warnings.warn(
                    f"{type(args).__name__}.reward_weights={list(args.reward_weights)} is ignored: the deployment "
                    f"{deployment.spec!r} weighs its rewards itself (Φ = Σ_r W_r Φ_r(c_r), W = "
                    f"{deployment.reward_weights}). Drop reward_weights, or change the mixture weights.",
                    UserWarning,
                    stacklevel=3,
                )
            if args.fits_on_references:
                self.ctrl_fit = self._ctrl_fit_deployment(args, deployment, train_dataset)
                self.ctrl_reward_transforms = self.ctrl_fit.transforms
            else:
                self.ctrl_reward_transforms = RewardTransforms.from_spec(args.resolved_transform, deployment)
            args.resolved_transform = self.ctrl_reward_transforms.spec
            self.ctrl_transform = self.ctrl_reward_transforms
        self.ctrl_calibrations = {
            reward: RewardCalibration(transform, column, key=reward, min_references=args.min_reference_samples)
            for reward, transform in self.ctrl_reward_transforms.transforms.items()
        }

    def _ctrl_fit_deployment(self, args, deployment, train_dataset):
        """t's and/or β for several rewards from the training set's reference rewards (exact on the shared atoms,
        :func:`trl_infalign.diagnose.fit_deployment`); `args.beta` becomes the fitted starting β."""
        from .calibration import select_reference_rewards
        from .diagnose import fit_deployment

        column = args.reference_rewards_column
        if train_dataset is None or not hasattr(train_dataset, "select_columns"):
            raise ValueError(
                f"{type(args).__name__}.transform={args.transform!r} / kl_budget with several rewards fits the "
                "transforms on the training set's reference rewards, which needs a map-style train_dataset. Give an "
                "explicit per-reward transform ('bon:t=3@helpful+won:t=5@harmless') and beta instead."
            )
        rows = list(train_dataset.select_columns([column])[column])
        references = {r: select_reference_rewards(rows, r, column=column) for r in deployment.rewards}
        budget = args.kl_budget
        fit = fit_deployment(references, deployment, kl=budget, beta=None if budget is not None else args.beta,
                             transform=args.transform.strip())
        beta_given = args.beta != args._default_beta()
        if budget is not None and beta_given and not math.isclose(args.beta, fit.beta, rel_tol=1e-9):
            warnings.warn(
                f"{type(args).__name__}: beta={args.beta:g} and kl_budget={budget:g} were both given; kl_budget wins: "
                f"beta is set to {fit.beta:.6g}, where the reference rewards predict KL = {budget:g} for "
                f"{fit.transforms.spec!r}. Drop beta to silence this, or drop kl_budget to train at beta={args.beta:g}.",
                UserWarning,
                stacklevel=4,
            )
        args.beta = float(fit.beta)
        logger.info("CTRL: fitted %s at beta=%.6g on the training references (predicted KL %.4g, %s win rate %.4f)",
                    fit.transforms.spec, fit.beta, fit.kl, deployment.label, fit.objective)
        return fit

    def _ctrl_default_args(self, model):
        """The config used when `args` is None: the config class's defaults, named after the model."""
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
        return self._ctrl_config_class(f"{str(name).rstrip('/').split('/')[-1]}-CTRL")

    # ----------------------------------------------------------------------------------------------------------------
    # How the trainer's KL coefficient relates to the user's β
    def _ctrl_penalty_factor(self) -> float:
        """Trainer KL coefficient = `_ctrl_penalty_factor()` · β_user / `ctrl_scale`. 1 where the trainer's optimum is
        π_ref·exp(reward/β) itself (RLOO); a subclass whose optimum sits at another β corrects for it here."""
        return 1.0

    def _ctrl_penalty_beta(self, beta: float) -> float:
        """The trainer's `self.beta` for a β in the user's units (those of the unnormalised Φ)."""
        return beta * self._ctrl_penalty_factor() / self.ctrl_scale

    def _ctrl_record_sequence_kl(self, sequence_kl: float, mode: str) -> None:
        """Log one batch's per-completion KL (nats, gathered over processes) and, in training, feed the controller."""
        self._metrics[mode]["ctrl/sequence_kl"].append(sequence_kl)
        if mode == "train" and self.ctrl_kl_controller is not None:
            self.beta = self._ctrl_penalty_beta(self.ctrl_kl_controller.update(sequence_kl))

    # ----------------------------------------------------------------------------------------------------------------
    # Checks made after the models are loaded, before any training work (`trl_infalign.preflight`)
    def _ctrl_check_after_loading(self, named_datasets):
        preflight.check_pad_tokens(self._tokenizer, self.reward_funcs, self.reward_processing_classes, self.reward_func_names)
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        preflight.check_disk_space(self.args, model)
        context = None if self._is_vlm else preflight.context_length(model)
        for name, ds in named_datasets:
            preflight.check_prompt_lengths(ds, name, self._tokenizer, context, self.args.max_completion_length,
                                           self.chat_template_kwargs)

    # ----------------------------------------------------------------------------------------------------------------
    # Run state: checkpointed calibration, KL controller, resume (`trl_infalign.run_state`)
    def ctrl_calibration_state(self) -> dict:
        """What the run calibrates against; saved in every checkpoint and compared on resume."""
        return run_state.calibration_state(self)

    def ctrl_run_state(self) -> dict:
        """What changes during the run (not compared on resume): the current β and the KL controller's state."""
        return run_state.dynamic_state(self)

    @property
    def current_beta(self) -> float:
        """β now, in the units of the unnormalised transform (`args.beta` is the starting value)."""
        return self.beta * self.ctrl_scale / self._ctrl_penalty_factor()

    def _check_resumed_calibration(self, checkpoint: str):
        """Restore the KL controller and refuse a resume with other calibration, rewards or sampling settings."""
        run_state.check_resume(self, checkpoint)

    def _last_complete_checkpoint(self) -> str | None:
        return run_state.last_complete_checkpoint(self.args.output_dir)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, plus: `resume_from_checkpoint=True` skips checkpoints left incomplete by a crash (no
        `trainer_state.json`, which the Trainer writes last), and a resume with other calibration data, reward
        functions, weights or sampling settings is refused."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = self._last_complete_checkpoint()
            if checkpoint is not None:
                resume_from_checkpoint = checkpoint
        if isinstance(checkpoint, (str, os.PathLike)):
            self._check_resumed_calibration(str(checkpoint))
            self._ctrl_health_pending = False  # the policy is no longer the reference
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )

    def _transform_normalisation(self) -> tuple[float, float]:
        """(offset, scale) with (Φ − offset)/scale spanning [0, 1] over c ∈ [0, 1]; (0, 1) when not normalising."""
        transform = self.ctrl_transform
        if not self.args.normalize_transform or transform.requires_raw_rewards:
            return 0.0, 1.0
        low, high = self.ctrl_reward_transforms.bounds()
        if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
            return 0.0, 1.0
        return low, high - low

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.reference_rewards_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.args.reference_rewards_column]

    @contextmanager
    def _user_reward_names(self):
        ctrl_names, self.reward_func_names = self.reward_func_names, self.ctrl_reward_func_names
        try:
            yield
        finally:
            self.reward_func_names = ctrl_names

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        with self._user_reward_names():
            raw_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        device = raw_per_func.device
        raw = combine_rewards(raw_per_func, self.ctrl_reward_weights)
        column = self.args.reference_rewards_column
        local_rows = [example[column] for example in inputs]

        # ±inf from any reward function, and NaN from a reward *model*, are failures (a callable's NaN means None:
        # "no reward", which TRL skips). Checked per function, so that +inf and -inf cannot cancel into a NaN.
        is_model = torch.tensor([isinstance(f, torch.nn.Module) for f in self.reward_funcs], device=device)
        bad_per_func = torch.isinf(raw_per_func) | (torch.isnan(raw_per_func) & is_model.unsqueeze(0))
        infinite = bad_per_func.any(dim=1) | torch.isinf(raw)
        if infinite.any() and self.args.nonfinite_rewards == "raise":  # same on every rank: `raw` is gathered
            all_prompts, all_completions = gather_object(list(prompts)), gather_object(list(completions))
            row = int(infinite.nonzero()[0, 0])
            funcs = bad_per_func[row].nonzero().flatten().tolist()
            func = self.ctrl_reward_func_names[funcs[0]] if funcs else "combined"
            value = raw_per_func[row, funcs[0]].item() if funcs else raw[row].item()
            raise ValueError(
                f"The reward function {func!r} returned {value} for the completion at batch row {row} (global step "
                f"{self.state.global_step}; prompt: {str(all_prompts[row])[:200]!r}; completion: "
                f"{str(all_completions[row])[:200]!r}). Fix the reward model, or set "
                f"{type(self.args).__name__}.nonfinite_rewards='skip' to give such completions no advantage (counted in "
                "ctrl/nonfinite_rewards). Checkpoints already saved in output_dir are intact: resume with "
                "`trainer.train(resume_from_checkpoint=True)`."
            )
        raw = torch.where(infinite, torch.full_like(raw, math.nan), raw)
        if self.ctrl_deployment.is_multi_reward:  # each named reward on its own (one function each, unweighted)
            raw_per_func = torch.where(torch.isinf(raw_per_func), torch.full_like(raw_per_func, math.nan), raw_per_func)
            signals = {name: raw_per_func[:, i] for i, name in enumerate(self.ctrl_reward_func_names)}
        else:
            signals = {None: raw}
        # each process converts its own rows to one padded matrix per reward; the matrices, not lists, are gathered
        batches = {
            r: calibration.calibrate(signals[r], matrix=_gather_matrix(calibration.reference_matrix(local_rows)))
            for r, calibration in self.ctrl_calibrations.items()
        }
        weights = self.ctrl_reward_transforms.weights
        phi = sum(weights[r] * self.ctrl_calibrations[r].transformed(batch) for r, batch in batches.items())
        transformed = ((phi - self.ctrl_offset) / self.ctrl_scale).to(torch.float32)

        mode = "train" if self.model.training else "eval"
        if mode == "train" and self._ctrl_health_pending and self.state.global_step == 0:
            alpha = DEFAULT_FALSE_ALARM_RATE / len(batches)  # one test per calibrated reward: α/J each
            for r, batch in batches.items():
                self._check_calibration_health(batch.raw, batch.reference_rows(), r,
                                               None if r is None else alpha)
        self._ctrl_log_reward_metrics(mode, raw, raw_per_func, batches, transformed, infinite)
        return transformed.unsqueeze(1)

    def _ctrl_log_reward_metrics(self, mode, raw, raw_per_func, batches, transformed, infinite) -> None:
        metrics = self._metrics[mode]
        weights = self.ctrl_reward_transforms.weights
        calibrated = {r: batch.calibrated for r, batch in batches.items()}
        if self.ctrl_deployment.is_multi_reward:
            raw = sum(weights[r] * batch.raw for r, batch in batches.items())
        metrics["ctrl/raw_reward"].append(torch.nanmean(raw).item())
        for i, name in enumerate(self.ctrl_reward_func_names):
            metrics[f"ctrl/raw_reward/{name}"].append(torch.nanmean(raw_per_func[:, i]).item())
        metrics["ctrl/calibrated_reward"].append(sum(weights[r] * torch.nanmean(c).item() for r, c in calibrated.items()))
        metrics["ctrl/transformed_reward"].append(torch.nanmean(transformed).item())
        metrics["ctrl/nonfinite_rewards"].append(float(infinite.sum().item()))
        top = bottom = 0.0
        for r, batch in batches.items():
            top_r, bottom_r = batch.saturation
            top, bottom = max(top, top_r), max(bottom, bottom_r)
            if r is not None:
                metrics[f"ctrl/calibrated_reward/{r}"].append(torch.nanmean(batch.calibrated).item())
                metrics[f"ctrl/calibration_saturation/{r}"].append(top_r)
                metrics[f"ctrl/calibration_saturation_bottom/{r}"].append(bottom_r)
        metrics["ctrl/calibration_saturation"].append(top)
        metrics["ctrl/calibration_saturation_bottom"].append(bottom)
        if mode == "train":
            self._ctrl_watch_saturation(top, bottom, batches)
        if self.ctrl_deployment.is_multi_reward:
            for key, value in self.ctrl_deployment.pooled_win_rates(calibrated).items():
                metrics[f"ctrl/{key}"].append(value)
            for r, c in calibrated.items():
                self._logs["rewards"][f"ctrl_calibrated/{r}"].extend(c.tolist())
        else:
            procedure = self.ctrl_procedure
            if not procedure.is_standard:  # the standard win rate is ctrl/calibrated_reward itself
                metrics[f"ctrl/{procedure.metric_key}"].append(procedure.pooled_calibrated_win_rate(calibrated[None]))
            self._logs["rewards"]["ctrl_calibrated"].extend(calibrated[None].tolist())

    def _ctrl_watch_saturation(self, top: float, bottom: float, batches) -> None:
        """Warn once when, over `SATURATION_WINDOW` consecutive training batches, more than `SATURATION_WARNING` of the
        completions beat (or lose to) every reference of their prompt: calibration cannot rank them any more."""
        history = self._ctrl_saturation_history
        history.append(max(top, bottom))
        if self._ctrl_saturation_warned or len(history) < SATURATION_WINDOW:
            return
        if min(list(history)[-SATURATION_WINDOW:]) > SATURATION_WARNING:
            self._ctrl_saturation_warned = True
            k = max(int(batch.mask.sum(dim=1).max()) for batch in batches.values())
            side = "beat" if top >= bottom else "lose to"
            warnings.warn(
                f"{100 * max(top, bottom):.0f}% of completions {side} all K = {k} reference rewards of their prompt "
                f"(ctrl/calibration_saturation{'' if top >= bottom else '_bottom'}, for {SATURATION_WINDOW} steps): "
                "calibration cannot rank them, so the transform no longer tells them apart. Build more references "
                f"(K = {4 * k}, `build_reference_rewards(..., num_samples={4 * k})`), or lower the KL budget.",
                UserWarning,
                stacklevel=3,
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Step-0 calibration health check (`trl_infalign.health`)
    def _generate_and_score_completions(self, inputs):
        """TRL's generation and scoring; the first training batch is kept for the health check's extra draws."""
        if self._ctrl_health_pending and self.model.training:
            self._ctrl_step0 = Step0Batch(inputs)
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._ctrl_step0 = None

    def _generate(self, prompts):
        if self._ctrl_step0 is not None:
            self._ctrl_step0.keep_prompts(prompts)  # as TRL generates from them (after its own preparation)
        return super()._generate(prompts)

    def _ctrl_sample(self, prompts) -> tuple[list, list]:
        """(completion_ids, completions) for `prompts` from TRL's own generation (RLOO's `_generate`)."""
        _, completion_ids, completions = self._generate(prompts)
        return completion_ids, completions

    def _ctrl_score(self, inputs, prompts, completions, completion_ids) -> torch.Tensor:
        """TRL's own reward step (gathered (num_completions, num_reward_funcs)), without CTRL's calibration."""
        with self._user_reward_names():
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids)

    def _ctrl_health_values(self, rewards_per_func: torch.Tensor, label: str | None = None) -> torch.Tensor:
        """The values one check tests: the weighted sum of the reward functions (label None), or the named function's
        column; ±inf → NaN (unscored), as in the reward step."""
        if label is None or label not in self.ctrl_reward_func_names:
            values = combine_rewards(rewards_per_func, self.ctrl_reward_weights)
        else:
            values = rewards_per_func[:, self.ctrl_reward_func_names.index(label)]
        return torch.where(torch.isinf(values), torch.full_like(values, math.nan), values)

    def _check_calibration_health(self, raw: torch.Tensor, ref_rows: list, label: str | None = None,
                                  false_alarm_rate: float | None = None) -> None:
        """Step 0 of a fresh run: the policy is the reference, so its calibrated rewards must be ≈ Uniform[0, 1]
        (`trl_infalign.health`). `raw` and `ref_rows` are one reward's gathered values and reference rows (`label`
        names it); completions are drawn until the test can decide (`calibration_check_max_samples`). Every process
        decides alike. Several rewards: call once per reward with `false_alarm_rate = α / J`."""
        self._ctrl_health_pending = False
        step0 = self._ctrl_step0
        unavailable = step0.unavailable(self) if step0 is not None else NOT_AT_HAND

        def draw(rounds):
            return self._ctrl_health_values(step0.draw(self, rounds), label).cpu().double().numpy()

        health = step0_health_check(
            raw.detach().cpu().double().numpy(), ref_rows, draw=None if unavailable else draw,
            max_extra_completions=self.args.calibration_check_max_samples, label=label,
            **({} if false_alarm_rate is None else {"false_alarm_rate": false_alarm_rate}),
        )
        if label is None or self.ctrl_calibration_health is None:
            self.ctrl_calibration_health = health
        if label is not None:
            self.ctrl_calibration_healths[label] = health
        if health is not None:
            suffix = "" if label is None else f"/{label}"
            self._metrics["train"][f"ctrl/step0_calibrated_reward{suffix}"].append(health.mean_calibrated)
        report_calibration_health(health, self.args, unavailable)

    # ----------------------------------------------------------------------------------------------------------------
    # Model card (`trl_infalign.model_card`)
    def record_evaluation(self, results: dict):
        """Attach inference-time evaluation results (e.g. `EvaluationResult.to_dict()`) to the model card."""
        self.ctrl_evaluation = results

    def ctrl_card_settings(self) -> dict:
        """The InfAlign settings and latest training metrics that the model card reports."""
        from .model_card import card_settings

        return card_settings(self)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, output_dir=None):
        from .model_card import write_ctrl_model_card

        if not self.is_world_process_zero():
            return
        if dataset_name is None:
            dataset_name = self.ctrl_dataset_name
        write_ctrl_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags, output_dir=output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save as `Trainer.save_model` does, plus the CTRL model card (README.md), `ctrl_calibration.json` and
        `ctrl_run.json` beside the weights."""
        with hub_token_redacted(self.args):  # Trainer pickles `args` into training_args.bin: never the token
            super().save_model(output_dir, _internal_call=_internal_call)
            self.create_model_card(output_dir=output_dir)
        if self.is_world_process_zero():
            target = Path(output_dir if output_dir is not None else self.args.output_dir)
            state = {**self.ctrl_calibration_state(), **self.ctrl_run_state()}
            run_state.write_state(target, state, self.ctrl_run_record)

    # ----------------------------------------------------------------------------------------------------------------
    # Hub (`trl_infalign.hub`)
    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as error:  # offline, not logged in, no permission...
            raise hub_failure(self.args, error, f"Creating the Hub repo {self.args.hub_model_id!r}") from None

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token=None, revision=None, **kwargs):
        """Save the model, tokenizer and card locally, then upload them; an upload failure loses nothing and says why."""
        self.save_model(self.args.output_dir)
        try:
            return super().push_to_hub(commit_message=commit_message, blocking=blocking, token=token, revision=revision, **kwargs)
        except HubUploadError:
            raise
        except Exception as error:
            raise hub_failure(self.args, error, "Uploading to the Hub") from None
