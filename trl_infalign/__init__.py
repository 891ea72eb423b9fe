"""trl-infalign: InfAlign / CTRL (Calibrate-and-Transform RL, arXiv 2412.19792) for Hugging Face TRL.

Public names are imported lazily, so `import trl_infalign` (and the theory CLI) stays fast; the trainer pulls in TRL
only when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "calibration": ["calibrate", "pad_reference_rewards", "CalibrationError"],
    "transforms": ["Transform", "TabulatedTransform", "TransformError", "register_transform", "get_transform", "available_transforms"],
    "theory": [
        "CalibratedPolicy", "policy", "kl_divergence", "win_rate", "beta_for_kl", "best_t", "best_t_for_beta",
        "optimal_policy", "frontier", "plot_frontiers",
    ],
    "procedures": [
        "InferenceProcedure", "Mixture", "ProcedureError", "register_procedure", "get_procedure",
        "available_procedures",
    ],
    "optimal": ["solve_optimal", "OptimalSolution"],
    "deployment": ["Deployment", "RewardTransforms", "get_deployment"],
    "calibrated_reward": ["CalibratedReward", "RewardCalibration"],
    "ctrl_config": ["CTRLConfig", "CTRLArguments"],
    "ctrl_trainer": ["CTRLTrainer", "HubUploadError"],
    "ctrl_grpo_config": ["CTRLGRPOConfig"],
    "ctrl_grpo_trainer": ["CTRLGRPOTrainer"],
    "reference": ["build_reference_rewards", "validate_reference_rewards"],
    "reference_config": ["ReferenceConfig"],
    "evaluation": [
        "inference_win_rate", "kl_estimates", "evaluate_policy", "evaluate_scored", "WinRateResult", "EvaluationResult",
        "DeploymentResult",
    ],
    "callbacks": ["InferenceWinRateCallback"],
    "kl_control": ["AdaptiveKLController"],
    "health": ["CalibrationHealth", "check_calibration_health"],
    "provenance": [
        "read_reference_provenance", "read_reference_provenances", "check_reference_provenance",
        "ReferenceProvenanceWarning",
    ],
    "diagnose": ["diagnose", "DiagnosisResult", "load_reference_rewards"],
    "diagnose_deployment": ["fit_deployment", "DeploymentFit", "DeploymentDiagnosis"],
}
_NAME_TO_MODULE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_NAME_TO_MODULE)


def __getattr__(name: str):
    if name in _NAME_TO_MODULE:
        value = getattr(importlib.import_module(f".{_NAME_TO_MODULE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trl_infalign' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from .calibrated_reward import CalibratedReward, RewardCalibration
    from .calibration import CalibrationError, calibrate, pad_reference_rewards
    from .ctrl_config import CTRLArguments, CTRLConfig
    from .ctrl_grpo_config import CTRLGRPOConfig
    from .ctrl_grpo_trainer import CTRLGRPOTrainer
    from .ctrl_trainer import CTRLTrainer, HubUploadError
    from .deployment import Deployment, RewardTransforms, get_deployment
    from .optimal import OptimalSolution, solve_optimal
    from .procedures import (
        InferenceProcedure,
        Mixture,
        ProcedureError,
        available_procedures,
        get_procedure,
        register_procedure,
    )
    from .reference import build_reference_rewards, validate_reference_rewards
    from .reference_config import ReferenceConfig
    from .transforms import get_transform, register_transform
