r"""CTRLGRPOTrainer: GRPO on calibrated, transformed rewards (InfAlign, arXiv 2412.19792).

The CTRL reward step is the one of `CTRLTrainer` (`trl_infalign.ctrl_mixin`); TRL's `GRPOTrainer` does the rest. What
is GRPO-specific is how its KL coefficient maps to the user's β. With G = `num_generations`, unscaled advantages
A_i = R_i − mean_j R_j (the group mean includes i itself) and the bias-corrected per-token k3 term in the loss, the
expected gradient is

    ∇ E_π[A·log π] − β_GRPO ∇ KL(π‖π_ref) = (G−1)/G · ∇ E_π[R] − β_GRPO ∇ KL(π‖π_ref),

since E[R_i ∇log π(y_i)]/G, the sample's own share of the baseline, is not zero. The fixed point is therefore
π_ref·exp(R/β_eff)/Z with β_eff = β_GRPO·G/(G−1). CTRL trains on R = (Φ(c) − Φ_min)/s (s = `ctrl_scale`, the
normalisation of Φ) and wants π_ref·exp(Φ(c)/β), so it sets

    β_GRPO = β · (G−1)/G / s.

`ctrl/beta`, `final_beta`, the KL controller and the model card all speak of β in the user's units.
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer

from .ctrl_grpo_config import CTRLGRPOConfig
from .ctrl_mixin import INFALIGN_CITATION, CTRLTrainerMixin


class CTRLGRPOTrainer(CTRLTrainerMixin, GRPOTrainer):
    """
    Trainer for CTRL (Calibrate-and-Transform Reinforcement Learning) on GRPO, the method of
    [InfAlign: Inference-aware language model alignment](https://huggingface.co/papers/2412.19792).

    Same constructor as [`trl.GRPOTrainer`], with a [`CTRLGRPOConfig`]; the same reward functions, reference-rewards
    column and CTRL knobs as [`CTRLTrainer`], and the same optimum π_ref·exp(Φ(c)/β)/Z for a given (`transform`,
    `beta`) or `kl_budget` (the G/(G−1) factor of GRPO's group-mean baseline and the Φ normalisation scale are
    compensated internally; see the module docstring). vLLM generation, PEFT, DeepSpeed and the other GRPO options
    work as in TRL; the settings that change the optimum are refused by [`CTRLGRPOConfig`].

    Example:

    ```python
    from trl_infalign import CTRLGRPOConfig, CTRLGRPOTrainer, build_reference_rewards

    dataset = build_reference_rewards(dataset, "my-sft-model", "my-reward-model", num_samples=16)
    args = CTRLGRPOConfig(output_dir="ctrl-grpo-bon4", inference_procedure="bon", inference_n=4, kl_budget=0.5)
    trainer = CTRLGRPOTrainer(model="my-sft-model", reward_funcs="my-reward-model", args=args, train_dataset=dataset)
    trainer.train()
    ```

    Logged metrics: GRPO's (`reward` is the normalised transformed reward; `kl` is GRPO's per-token k3 mean) and
    [`CTRLTrainer`]'s `ctrl/*` metrics, with `ctrl/sequence_kl` the per-completion k1 KL in nats,
    Σ_t (log π − log π_ref) over the completion, batch mean over all processes (the unit of `kl_budget`), and
    `ctrl/beta` β in the user's units (before the G/(G−1) compensation).
    """

    _ctrl_config_class = CTRLGRPOConfig
    _ctrl_base_trainer = "GRPO"
    _tag_names = ["trl", "ctrl", "infalign", "grpo"]
    _name = "CTRL"
    _paper = {
        "title": "InfAlign: Inference-aware language model alignment",
        "id": "2412.19792",
        "citation": INFALIGN_CITATION,
    }

    def __init__(self, model, reward_funcs, args: CTRLGRPOConfig | None = None, train_dataset=None, eval_dataset=None, *a, **kw):
        self._ctrl_loss_inputs = None  # the inputs of the `_compute_loss` call in progress
        self._ctrl_kl_pending = None  # per-completion KL accumulated over a generation batch's loss passes
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, *a, **kw)

    def _ctrl_default_args(self, model):
        raise ValueError(
            "CTRLGRPOTrainer needs args=CTRLGRPOConfig(...) with beta > 0 or a kl_budget: GRPO's default beta=0.0 "
            "has no KL term, so there is no CTRL optimum to train towards. For example "
            "CTRLGRPOConfig(output_dir='ctrl-grpo', inference_procedure='bon', inference_n=4, kl_budget=0.5)."
        )

    def _ctrl_penalty_factor(self) -> float:
        """(G−1)/G: GRPO's optimum sits at β_GRPO·G/(G−1) (its group mean includes the sample itself)."""
        g = self.num_generations
        return (g - 1) / g

    def _ctrl_sample(self, prompts) -> tuple[list, list]:
        """(completion_ids, completions) from GRPO's own `_generate` (for the health check's extra draws)."""
        output = self._generate(prompts)
        return output[1], output[3]

    def ctrl_calibration_state(self) -> dict:
        # the compensation depends on G: a resume with another num_generations is another objective's β_GRPO
        return {**super().ctrl_calibration_state(), "num_generations": self.num_generations}

    # ----------------------------------------------------------------------------------------------------------------
    # Per-completion KL: k1 = Σ_t (log π − log π_ref) over the completion, from the log-probs GRPO computes anyway
    def _generate_and_score_completions(self, inputs):
        """GRPO's generation and scoring, plus `ctrl/sequence_kl`, `ctrl/beta` and the KL controller.

        The controller's β takes effect at generation boundaries, so every micro-batch of a generation batch sees
        one β. Where GRPO computed the policy's log-probs at generation (`old_per_token_logps`: several iterations
        per batch, misaligned accumulation, vLLM), k1 is taken from them right away; otherwise the policy is still
        the sampling policy during the batch's loss passes, and k1 is accumulated from the log-probs
        `_compute_loss` computes (no extra forward pass).
        """
        mode = "train" if self.model.training else "eval"
        if mode == "train" and self.ctrl_kl_controller is not None:
            self.beta = self._ctrl_penalty_beta(self.ctrl_kl_controller.beta)
        self._ctrl_kl_pending = None
        output = super()._generate_and_score_completions(inputs)
        ref = output.get("ref_per_token_logps")
        if ref is not None:
            mask = self._ctrl_kl_mask(output)
            old = output.get("old_per_token_logps")
            if old is not None:
                self._ctrl_finish_sequence_kl(((old - ref) * mask).sum(-1).sum(), mask.shape[0], mode)
            else:
                self._ctrl_kl_pending = {"mode": mode, "remaining": mask.shape[0], "sum": 0.0, "count": 0}
        self._metrics[mode]["ctrl/beta"].append(self.current_beta)
        return output

    @staticmethod
    def _ctrl_kl_mask(inputs) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask * inputs["tool_mask"] if inputs.get("tool_mask") is not None else mask

    def _ctrl_finish_sequence_kl(self, local_sum, local_count: int, mode: str) -> None:
        device = self.accelerator.device
        totals = torch.stack([torch.as_tensor(local_sum, dtype=torch.float64, device=device).reshape(()),
                              torch.tensor(float(local_count), dtype=torch.float64, device=device)])
        total, count = self.accelerator.reduce(totals, reduction="sum").tolist()
        beta = self.beta  # the controller's new β applies from the next generation batch on (see above)
        self._ctrl_record_sequence_kl(total / max(count, 1.0), mode)
        self.beta = beta

    def _compute_loss(self, model, inputs):
        self._ctrl_loss_inputs = inputs
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._ctrl_loss_inputs = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        inputs, pending = self._ctrl_loss_inputs, self._ctrl_kl_pending
        # the policy forward of `_compute_loss` (the only call that asks for entropies), on the first pass over the batch
        if inputs is not None and pending is not None and kwargs.get("compute_entropy") and pending["remaining"] > 0:
            mask = self._ctrl_kl_mask(inputs)
            k1 = ((result[0].detach() - inputs["ref_per_token_logps"]) * mask).sum()
            pending["sum"] = pending["sum"] + k1.double()
            pending["count"] += mask.shape[0]
            pending["remaining"] -= mask.shape[0]
            if pending["remaining"] <= 0:
                self._ctrl_kl_pending = None
                self._ctrl_finish_sequence_kl(pending["sum"], pending["count"], pending["mode"])
        return result
