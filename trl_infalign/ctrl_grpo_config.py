r"""Configuration of CTRL on GRPO (InfAlign, arXiv 2412.19792): [`CTRLGRPOConfig`].

GRPO keeps the KL term in the loss (per-token k3 with the importance-ratio bias correction, whose gradient is that of
KL(π‖π_ref)) and uses the group mean — which includes the sample itself — as its baseline. With unscaled advantages
its one-step optimum is π_ref·exp(R/β_eff)/Z with β_eff = β·G/(G−1) (G = `num_generations`); `CTRLGRPOTrainer`
compensates that factor, so `beta` and `kl_budget` mean here what they mean for [`CTRLConfig`]. The GRPO settings that
move the optimum away from the exp-tilt are refused with the reason (see `docs/grpo.md`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from trl import GRPOConfig

from .ctrl_config import CTRLArguments

#: Loss aggregations that keep the sequence-level objective: a constant (or per-batch) normaliser of Σ_t over tokens.
SEQUENCE_LEVEL_LOSS_TYPES = ("dr_grpo", "dapo", "bnpo")
#: `grpo` divides each sequence's token sum by its own length: exact for one-token completions only.
LENGTH_NORMALISED_LOSS_TYPES = ("grpo",)


@dataclass
class CTRLGRPOConfig(CTRLArguments, GRPOConfig):
    r"""
    Configuration class for [`CTRLGRPOTrainer`]: every [`trl.GRPOConfig`] field, plus the InfAlign ones of
    [`CTRLArguments`] (the same as [`CTRLConfig`]'s, with the same meaning and validation).

    The objective is the one of [`CTRLConfig`]: the KL-regularised optimum
    \\(\pi^*(y|x) \propto \pi_{\mathrm{ref}}(y|x)\, e^{\Phi(c(x,y))/\beta}\\), with `beta` (or the β set from
    `kl_budget`, per-completion KL in nats) in the units of the unnormalised Φ. What differs on GRPO, and what this
    config does about it:

    - `beta` has no usable default: GRPO's `beta=0.0` means no KL term at all (no optimum to speak of). Set `beta > 0`
      or a `kl_budget`. The trainer passes GRPO \\(\beta \cdot \tfrac{G-1}{G} / s\\) (G = `num_generations`, s the
      Φ normalisation scale) so that GRPO's optimum π_ref·exp(R/(β_GRPO·G/(G−1))) is the CTRL one.
    - `scale_rewards` defaults to `"none"`. `"group"` divides each advantage by a standard deviation that depends on
      π, `"batch"` by the batch's: the fixed point is then no exp-tilt (measured: `"group"` TV 0.044 from it at
      β = 1, `"batch"` collapses onto the top action), so neither the theory's predictions nor `kl_budget` hold.
      Both are refused.
    - `use_bias_correction_kl=False` is refused: the plain k3 loss has the gradient of KL(π_ref‖π), whose optimum is
      π_ref/(1 − (R − μ)/β_eff), not π_ref·exp(R/β_eff)/Z.
    - `loss_type` defaults to `"dr_grpo"` (Σ over tokens / a constant): the policy-gradient term is then
      \\(A\,\nabla\log\pi(y)\\) per completion, the sequence-level objective. `"dapo"` and `"bnpo"` divide by the
      batch's token count instead (the same for the reward and KL terms, so the same fixed point up to an O(1/batch)
      ratio effect); they are allowed. `"grpo"` divides each completion by its own length, which reweights
      completions by 1/length: allowed with a warning when `max_completion_length > 1` (exact for one-token
      completions). `cispo`, `sapo`, `vespo`, `luspo` and `importance_sampling_level="sequence"` change the surrogate
      or the KL correction and are refused.
    - `multi_objective_aggregation="normalize_then_sum"` (per-function std scaling), entropy bonuses
      (`entropy_coef`, `use_adaptive_entropy`) and `top_entropy_quantile < 1` (policy gradient on some tokens only)
      change the objective and are refused.

    Multi-token caveat (all loss types): GRPO's per-token KL term differentiates KL at the visited contexts only, not
    the effect of a token on the KL of the tokens after it, so for multi-token completions its fixed point is the
    per-token tilt π(a|s) ∝ π_ref(a|s)·exp(Q(s, a)/β_eff) with Q the expected Φ-reward-to-go, not the sequence-level
    tilt. For one-token completions the two coincide (the tests check it); see `docs/grpo.md`.
    """

    scale_rewards: str = field(
        default="none",
        metadata={
            "help": "CTRL on GRPO needs unscaled advantages (`none`, the default here): std scaling (`group`, "
            "`batch`) moves the optimum away from pi_ref*exp(Phi(c)/beta) and is refused.",
        },
    )
    loss_type: str = field(
        default="dr_grpo",
        metadata={
            "help": "GRPO loss aggregation. `dr_grpo` (default here): token sum / constant, the sequence-level "
            "objective. `dapo`, `bnpo`: token sum / batch token count (allowed). `grpo`: per-sequence length "
            "normalisation, reweights completions by 1/length (warning for max_completion_length > 1). Others "
            "are refused.",
        },
    )

    _beta_hint = (
        " GRPOConfig's default beta=0.0 means no KL term (and no reference model), so CTRLGRPOConfig needs an "
        "explicit beta > 0 or a kl_budget."
    )

    def _validate_trainer_fields(self) -> None:
        name = self._ctrl_name
        scale = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if scale != "none":
            raise ValueError(
                f"{name}.scale_rewards={self.scale_rewards!r} is not supported: GRPO would divide each advantage by a "
                f"{'group' if scale == 'group' else 'batch'} standard deviation that depends on the policy, so the "
                "optimum is no longer pi_ref * exp(Phi(c)/beta) (with 'group' it lands elsewhere, with 'batch' it "
                "collapses onto the best action) and neither beta, kl_budget nor the theory's win-rate predictions "
                "hold. Use scale_rewards='none' (the default of CTRLGRPOConfig); CTRL's normalised transform already "
                "keeps rewards in [0, 1]."
            )
        if not self.use_bias_correction_kl:
            raise ValueError(
                f"{name}.use_bias_correction_kl=False is not supported: without the importance-ratio correction "
                "GRPO's k3 loss has the gradient of KL(pi_ref || pi), whose optimum is pi_ref / (1 - (R - mu)/beta), "
                "not the exp-tilt pi_ref * exp(Phi(c)/beta) that beta, kl_budget and the theory describe. Keep "
                "use_bias_correction_kl=True (GRPO's default)."
            )
        if self.loss_type not in SEQUENCE_LEVEL_LOSS_TYPES + LENGTH_NORMALISED_LOSS_TYPES:
            raise ValueError(
                f"{name}.loss_type={self.loss_type!r} is not supported: CTRL's optimum is modelled for losses that "
                f"sum the clipped policy-gradient and KL terms over tokens, {list(SEQUENCE_LEVEL_LOSS_TYPES)} "
                "(and 'grpo'). Use loss_type='dr_grpo' (the default of CTRLGRPOConfig)."
            )
        if self.loss_type in LENGTH_NORMALISED_LOSS_TYPES and (self.max_completion_length or 0) > 1:
            warnings.warn(
                f"{name}.loss_type='grpo' divides each completion's loss by its own length, which reweights "
                "completions by 1/length: with max_completion_length > 1 the optimum is no longer "
                "pi_ref * exp(Phi(c)/beta). Use loss_type='dr_grpo' (the default) to keep the sequence-level objective.",
                UserWarning,
                stacklevel=4,
            )
        if self.importance_sampling_level != "token":
            raise ValueError(
                f"{name}.importance_sampling_level={self.importance_sampling_level!r} is not supported: a "
                "sequence-level ratio changes GRPO's KL bias correction, and the gradient is then no longer that of "
                "KL(pi || pi_ref). Use importance_sampling_level='token' (the default)."
            )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"{name}.multi_objective_aggregation={self.multi_objective_aggregation!r} is not supported: it divides "
                "each reward by a policy-dependent std. CTRL combines the reward functions itself (with reward_weights) "
                "before calibration; keep multi_objective_aggregation='sum_then_normalize' (the default)."
            )
        if self.entropy_coef != 0.0 or self.use_adaptive_entropy:
            raise ValueError(
                f"{name}: an entropy bonus (entropy_coef={self.entropy_coef!r}, use_adaptive_entropy="
                f"{self.use_adaptive_entropy!r}) adds a term to the objective, so its optimum is no longer "
                "pi_ref * exp(Phi(c)/beta). Set entropy_coef=0.0 and use_adaptive_entropy=False; the KL term already "
                "keeps the policy close to the reference."
            )
        if self.top_entropy_quantile < 1.0:
            raise ValueError(
                f"{name}.top_entropy_quantile={self.top_entropy_quantile!r} applies the policy gradient to part of the "
                "tokens only (the KL term to all), which changes the optimum. Use top_entropy_quantile=1.0 (the default)."
            )
        if self.use_liger_kernel and self.kl_control == "adaptive":
            raise ValueError(
                f"{name}: use_liger_kernel=True computes GRPO's loss in a fused kernel that CTRL does not see, so the "
                "per-completion KL (ctrl/sequence_kl) that kl_control='adaptive' feeds on is not measured. Set "
                "use_liger_kernel=False, or kl_control='fixed'."
            )
