"""CTRLTrainer: RLOO on calibrated, transformed rewards (InfAlign, arXiv 2412.19792).

TRL's `RLOOTrainer` does everything that is not CTRL-specific — generation, reward-model placement (DDP, DeepSpeed,
PEFT), the KL penalty and the leave-one-out baseline. The CTRL reward step (`_calculate_rewards`), shared with
`CTRLGRPOTrainer`, lives in `trl_infalign.ctrl_mixin`:

    r   = Σ_i w_i r_i(x, y)                          (the user's reward functions, weighted as in TRL)
    c   = (#{ref < r} + ½ #{ref = r}) / K             (calibration against the prompt's K reference rewards)
    Φ(c)                                             (the transform RLOO then maximises, minus β·KL)

RLOO subtracts β·KL (per completion, k1) from the reward before its leave-one-out baseline, so π_ref·exp(R/β)/Z is its
exact stationary point: RLOO's `beta` is the user's β divided by the Φ normalisation scale, nothing else.
"""

from __future__ import annotations

import shutil  # noqa: F401  (kept importable as `ctrl_trainer.shutil`: tests patch `shutil.disk_usage` through it)

import torch
from trl import RLOOTrainer

from .ctrl_config import CTRLConfig
from .ctrl_mixin import (  # noqa: F401  (public names, re-exported from here as before the GRPO trainer)
    CALIBRATION_STATE_FILE,
    INFALIGN_CITATION,
    CTRLTrainerMixin,
    HubUploadError,
    pooled_inference_win_rate,
)


class CTRLTrainer(CTRLTrainerMixin, RLOOTrainer):
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
    `ctrl/nonfinite_rewards`, `ctrl/sequence_kl` (KL(π‖π_ref) per completion in nats, batch k1: the unit of
    `kl_budget`; TRL's `kl` is the per-token mean), `ctrl/beta` (β now, in the units of the unnormalised Φ; it moves
    with `kl_control="adaptive"`), `ctrl/step0_calibrated_reward` (the health check's mean c at step 0),
    `ctrl/calibration_saturation` (share of completions that beat every reference of their prompt, c = 1) and
    `ctrl/calibration_saturation_bottom` (c = 0). A deployment that names rewards
    (`inference_procedure="mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"`) calibrates each reward on its own and
    adds `ctrl/calibrated_reward/<reward>`, each component's `ctrl/<procedure>_win_rate/<reward>` and
    `ctrl/deployment_win_rate`.
    """

    _ctrl_config_class = CTRLConfig
    _ctrl_base_trainer = "RLOO"
    _tag_names = ["trl", "ctrl", "infalign", "rloo"]
    _name = "CTRL"
    _paper = {
        "title": "InfAlign: Inference-aware language model alignment",
        "id": "2412.19792",
        "citation": INFALIGN_CITATION,
    }

    def _generate_and_score_completions(self, inputs):
        """RLOO's generation and scoring, plus the per-completion KL (`ctrl/sequence_kl`) and the KL controller."""
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        if self.beta != 0.0 and metrics.get("kl"):
            sequence_kl = self._sequence_kl(metrics["kl"][-1], output["completion_mask"])
            self._ctrl_record_sequence_kl(sequence_kl, mode)
        metrics["ctrl/beta"].append(self.current_beta)
        return output

    def _sequence_kl(self, per_token_kl: float, completion_mask: torch.Tensor) -> float:
        """Per-completion KL (nats, batch k1 over all processes) from RLOO's logged per-token mean:
        Σ_i Σ_t kl_it / #completions = (Σ kl / #tokens) · (#tokens / #completions)."""
        counts = torch.tensor([completion_mask.sum().item(), completion_mask.shape[0]], dtype=torch.float64,
                              device=completion_mask.device)
        tokens, completions = self.accelerator.reduce(counts, reduction="sum").tolist()
        return per_token_kl * tokens / max(completions, 1.0)
