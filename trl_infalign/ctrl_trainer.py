"""CTRLTrainer: RLOO on calibrated, transformed rewards (InfAlign, arXiv 2412.19792).

TRL's `RLOOTrainer` does everything that is not CTRL-specific — generation, reward-model placement (DDP, DeepSpeed,
PEFT), the KL penalty and the leave-one-out baseline. This trainer only changes what a completion's reward *is*:

    r   = Σ_i w_i r_i(x, y)                          (the user's reward functions, weighted as in TRL)
    c   = (#{ref < r} + ½ #{ref = r}) / K             (calibration against the prompt's K reference rewards)
    Φ(c)                                             (the transform RLOO then maximises, minus β·KL)
"""

from __future__ import annotations

import math
import os
import textwrap
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import gather_object
from trl import RLOOTrainer

from .calibration import calibrate, pad_reference_rewards
from .ctrl_config import CTRLConfig
from .sampling import combine_rewards
from .transforms import get_transform

INFALIGN_CITATION = textwrap.dedent("""\
    @inproceedings{balashankar2025infalign,
        title     = {{InfAlign: Inference-aware language model alignment}},
        author    = {Ananth Balashankar and Ziteng Sun and Jonathan Berant and Jacob Eisenstein and Michael Collins and Adrian Hutter and Jong Lee and Chirag Nagpal and Flavien Prost and Aradhana Sinha and Ananda Theertha Suresh and Ahmad Beirami},
        booktitle = {Forty-second International Conference on Machine Learning, {ICML} 2025},
        year      = 2025,
        eprint    = {arXiv:2412.19792},
    }""")


class HubUploadError(RuntimeError):
    """The Hub could not be reached or refused the upload; the local output directory is complete."""


def pooled_inference_win_rate(calibrated: torch.Tensor, n: int, procedure: str) -> float:
    """Win rate of the policy's BoN-n (WoN-n) against the reference's, from the batch's calibrated rewards.

    Pools c over prompts (under π_ref, c is Uniform[0,1] for every prompt): sort the m values; the max of a random
    n-subset is the j-th smallest with probability C(j−1, n−1)/C(m, n) (the min: C(m−j, n−1)/C(m, n)); the
    reference's BoN-n calibrated value has CDF c^n, its WoN-n 1 − (1 − c)^n. Needs m ≥ n; NaN otherwise.
    """
    c = calibrated[torch.isfinite(calibrated)].double().sort().values
    m = c.numel()
    if procedure == "standard":
        return c.mean().item() if m else math.nan
    if m < n:
        return math.nan
    j = torch.arange(1, m + 1, dtype=torch.float64)

    def log_binom(a, b):
        return torch.lgamma(a + 1) - torch.lgamma(b + 1) - torch.lgamma(a - b + 1)

    total = log_binom(torch.tensor(float(m)), torch.tensor(float(n)))
    if procedure == "bon":
        k = j - 1
        weight = torch.where(k >= n - 1, torch.exp(log_binom(k, torch.tensor(n - 1.0)) - total), torch.zeros_like(k))
        return (weight * c**n).sum().item()
    k = m - j
    weight = torch.where(k >= n - 1, torch.exp(log_binom(k, torch.tensor(n - 1.0)) - total), torch.zeros_like(k))
    return (weight * (1 - (1 - c) ** n)).sum().item()


class CTRLTrainer(RLOOTrainer):
    """
    Trainer for CTRL (Calibrate-and-Transform Reinforcement Learning), the method of
    [InfAlign: Inference-aware language model alignment](https://huggingface.co/papers/2412.19792).

    Same constructor as [`trl.RLOOTrainer`]. `reward_funcs` are the user's rewards (model paths, sequence-classification
    models, callables, or a list of them weighted by `args.reward_weights`); the training dataset must carry, per
    prompt, the rewards of K reference-policy samples in `args.reference_rewards_column` (build them with
    [`build_reference_rewards`] or `trl-infalign build-reference`). RLOO then optimises Φ(c) − β·KL where c is the
    completion's calibrated reward among its prompt's reference rewards and Φ the transform of `args`.

    Example:

    ```python
    from trl_infalign import CTRLConfig, CTRLTrainer, build_reference_rewards

    dataset = build_reference_rewards(dataset, "my-sft-model", "my-reward-model", num_samples=16)
    args = CTRLConfig(output_dir="ctrl-bon4", inference_procedure="bon", inference_n=4, kl_budget=0.5)
    trainer = CTRLTrainer(model="my-sft-model", reward_funcs="my-reward-model", args=args, train_dataset=dataset)
    trainer.train()
    ```

    Logged metrics (besides RLOO's; `reward` is the transformed reward Φ(c)):
    `ctrl/raw_reward`, `ctrl/raw_reward/<func>`, `ctrl/calibrated_reward` (running standard win rate vs π_ref),
    `ctrl/transformed_reward`, `ctrl/<procedure>@<N>_win_rate` (running BoN-N / WoN-N win-rate estimate),
    `ctrl/nonfinite_rewards`.
    """

    _tag_names = ["trl", "ctrl", "infalign", "rloo"]
    _name = "CTRL"
    _paper = {
        "title": "InfAlign: Inference-aware language model alignment",
        "id": "2412.19792",
        "citation": INFALIGN_CITATION,
    }

    def __init__(self, model, reward_funcs, args: CTRLConfig | None = None, train_dataset=None, eval_dataset=None, *a, **kw):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = CTRLConfig(f"{str(name).rstrip('/').split('/')[-1]}-CTRL")
        elif not isinstance(args, CTRLConfig):
            raise TypeError(
                f"CTRLTrainer needs a CTRLConfig, got {type(args).__name__}: build one with CTRLConfig(**your_args.to_dict()) "
                "plus the CTRL fields (inference_procedure, inference_n, transform, ...)."
            )
        self.ctrl_transform = get_transform(args.resolved_transform)
        self.ctrl_reference_counts = self._reference_counts(train_dataset, args.reference_rewards_column)
        for split, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            for name, ds in (dataset.items() if isinstance(dataset, dict) else [(split, dataset)]):
                if ds is not None:
                    self._check_reference_rewards(ds, args, name)
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, *a, **kw)
        # RLOO combines what `_calculate_rewards` returns with `reward_weights`; CTRL returns one column, Φ(c), and
        # applies the user's weights itself, before calibration (the reference rewards are combined the same way).
        self.ctrl_reward_weights = self.reward_weights.clone()
        self.ctrl_reward_func_names = list(self.reward_func_names)
        self.reward_weights = torch.ones(1)
        self.reward_func_names = ["ctrl_transformed"]
        self.ctrl_evaluation: dict | None = None
        self.ctrl_dataset_name: str | None = getattr(args, "dataset_name", None)

    @staticmethod
    def _check_reference_rewards(dataset, args: CTRLConfig, split: str):
        from .reference import validate_reference_rewards

        try:
            validate_reference_rewards(dataset, column=args.reference_rewards_column, min_samples=args.min_reference_samples)
        except ValueError as error:
            raise ValueError(f"{split}: {error}") from None

    @staticmethod
    def _reference_counts(dataset, column: str) -> tuple[int, int] | None:
        """(min, max) number of reference rewards per row of a map-style dataset, for the model card."""
        try:
            lengths = [len(row) for row in dataset[column]]
        except (TypeError, KeyError, ValueError):
            return None
        return (min(lengths), max(lengths)) if lengths else None

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
        ref_rows = gather_object([list(example[column]) for example in inputs])
        all_prompts = gather_object(list(prompts))

        infinite = torch.isinf(raw)
        if infinite.any() and self.args.nonfinite_rewards == "raise":
            row = int(infinite.nonzero()[0, 0])
            raise ValueError(
                f"The reward function(s) returned {raw[row].item()} for the completion at batch row {row} (prompt: "
                f"{str(all_prompts[row])[:200]!r}). Fix the reward model, or set CTRLConfig.nonfinite_rewards='skip' to "
                "give such completions no advantage."
            )
        raw = torch.where(infinite, torch.full_like(raw, math.nan), raw)
        ref, mask = pad_reference_rewards(ref_rows, device=device)
        calibrated = calibrate(raw, ref, mask, nonfinite="nan", min_references=self.args.min_reference_samples)
        transformed = self.ctrl_transform(calibrated, rewards=raw, ref_rewards=ref, ref_mask=mask).to(torch.float32)

        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        metrics["ctrl/raw_reward"].append(torch.nanmean(raw).item())
        for i, name in enumerate(self.ctrl_reward_func_names):
            metrics[f"ctrl/raw_reward/{name}"].append(torch.nanmean(raw_per_func[:, i]).item())
        metrics["ctrl/calibrated_reward"].append(torch.nanmean(calibrated).item())
        metrics["ctrl/transformed_reward"].append(torch.nanmean(transformed).item())
        metrics["ctrl/nonfinite_rewards"].append(float(infinite.sum().item()))
        procedure, n = self.args.inference_procedure, self.args.inference_n
        if procedure != "standard":
            win = pooled_inference_win_rate(calibrated, n, procedure)
            metrics[f"ctrl/{procedure}@{n}_win_rate"].append(win)
        self._logs["rewards"]["ctrl_calibrated"].extend(calibrated.tolist())
        return transformed.unsqueeze(1)

    # ----------------------------------------------------------------------------------------------------------------
    # Model card
    def record_evaluation(self, results: dict):
        """Attach inference-time evaluation results (e.g. `EvaluationResult.to_dict()`) to the model card."""
        self.ctrl_evaluation = results

    def _describe_reference_counts(self) -> str:
        counts = self.ctrl_reference_counts
        if counts is None:
            return str(self.args.num_reference_samples)
        return str(counts[0]) if counts[0] == counts[1] else f"{counts[0]}–{counts[1]}"

    def ctrl_card_settings(self) -> dict:
        """The InfAlign settings and latest training metrics that the model card reports."""
        args = self.args
        transform = self.ctrl_transform
        settings = {
            "inference_procedure": args.inference_procedure,
            "inference_n": args.inference_n,
            "transform": transform.spec,
            "t": transform.params.get("t"),
            "beta": args.beta,
            "kl_budget": args.kl_budget,
            "num_reference_samples": self._describe_reference_counts(),
            "reference_rewards_column": args.reference_rewards_column,
        }
        last = {}
        for entry in getattr(self.state, "log_history", []) or []:
            last.update({k: v for k, v in entry.items() if k == "kl" or k.startswith("ctrl/")})
        settings["final_training_metrics"] = last
        return settings

    # ----------------------------------------------------------------------------------------------------------------
    # Hub
    def _hub_failure(self, error: Exception, what: str) -> "HubUploadError":
        secrets = [s for s in (self.args.hub_token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")) if s]
        reason = f"{type(error).__name__}: {error}"
        for secret in secrets:
            reason = reason.replace(secret, "***")
        return HubUploadError(f"{what} failed ({reason}). {self._local_copy_note()}")

    def _local_copy_note(self) -> str:
        return (
            f"The model, tokenizer and model card are saved locally in {Path(self.args.output_dir).resolve()}; "
            "upload them later with `trainer.push_to_hub()` or `hf upload <repo_id> <output_dir>` once you are online "
            "and logged in."
        )

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as error:  # offline, not logged in, no permission...
            raise self._hub_failure(error, f"Creating the Hub repo {self.args.hub_model_id!r}") from None

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token=None, revision=None, **kwargs):
        """Save the model, tokenizer and card locally, then upload them; an upload failure loses nothing and says why."""
        self.save_model(self.args.output_dir)
        try:
            return super().push_to_hub(commit_message=commit_message, blocking=blocking, token=token, revision=revision, **kwargs)
        except HubUploadError:
            raise
        except Exception as error:
            raise self._hub_failure(error, "Uploading to the Hub") from None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save as `Trainer.save_model` does, plus the CTRL model card (README.md) beside the weights."""
        super().save_model(output_dir, _internal_call=_internal_call)
        self.create_model_card(output_dir=output_dir)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, output_dir=None):
        from .model_card import write_ctrl_model_card

        if not self.is_world_process_zero():
            return
        if dataset_name is None:
            dataset_name = self.ctrl_dataset_name
        write_ctrl_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags, output_dir=output_dir)
