"""Model card of a CTRL run: TRL's card (tags, paper, citation, versions) plus the InfAlign settings and results.

Numbers are written one way: 4 significant digits (`format_number`), except the evaluation table, whose win rates,
KL estimates and their confidence intervals keep fixed decimals (3 for win rates, 4 for KL) so that an estimate and
its interval read at one resolution. β is shown twice: in the units of the transform Φ the user chose (the
calibrated-space theory's β, e.g. ≈ 7.8e6 for `bon:t=17.3`, whose Φ = exp(17.3·c) spans 1 … 3.2e7), and as the
trainer applies it to the normalised Φ, (Φ − min Φ)/(max Φ − min Φ) ∈ [0, 1] (RLOO's / GRPO's own `beta`).
"""

from __future__ import annotations

import math
import os
import textwrap
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = Path(__file__).parent / "templates" / "ctrl_model_card.md"

INFALIGN_CITATION = textwrap.dedent("""\
    @inproceedings{balashankar2025infalign,
        title     = {{InfAlign: Inference-aware language model alignment}},
        author    = {Ananth Balashankar and Ziteng Sun and Jonathan Berant and Jacob Eisenstein and Michael Collins and Adrian Hutter and Jong Lee and Chirag Nagpal and Flavien Prost and Aradhana Sinha and Ananda Theertha Suresh and Ahmad Beirami},
        booktitle = {Forty-second International Conference on Machine Learning, {ICML} 2025},
        year      = 2025,
        eprint    = {arXiv:2412.19792},
    }""")


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


# What each training metric of the card means (TRL's `kl` is per token; the KL budget and theory are per completion).
class _MetricDescriptions(dict):
    """Metric key → meaning; a per-reward key (`ctrl/calibrated_reward/helpful`) reads its family's meaning."""

    def get(self, key, default=""):
        if key in self:
            return self[key]
        family, _, reward = key.rpartition("/")
        if family in self:
            return f"{self[family]}, reward `{reward}`"
        if key.startswith("ctrl/") and key.endswith("_win_rate"):
            return "running win rate of the procedure against the reference's, from the batch's calibrated rewards"
        if family.startswith("ctrl/") and family.endswith("_win_rate"):
            return f"running win rate of this component on reward `{reward}`"
        return default


METRIC_DESCRIPTIONS = _MetricDescriptions({
    "kl": "TRL's `kl`: per-token mean of log π − log π_ref over the last logged batch (sum over tokens / number of "
          "tokens), **not** the per-completion KL of the budget",
    "ctrl/sequence_kl": "KL per completion (k1, nats): sum over a completion's tokens of log π − log π_ref, batch mean "
                        "(the unit of the KL budget)",
    "ctrl/beta": "β (KL coefficient) at the last logged step",
    "ctrl/calibrated_reward": "mean calibrated reward c (the standard win rate against the reference; several "
                              "rewards: Σ_r W_r mean c_r)",
    "ctrl/calibration_saturation": "share of completions that beat every reference of their prompt (c = 1): "
                                   "calibration cannot rank them; high means more references are needed",
    "ctrl/calibration_saturation_bottom": "share of completions below every reference of their prompt (c = 0)",
    "ctrl/deployment_win_rate": "running win rate of the deployment, Σ_j w_j W_j over its components",
    "ctrl/raw_reward": "mean raw reward",
    "ctrl/transformed_reward": "mean normalised Φ(c), the reward the trainer maximises",
})


def format_number(value, digits: int = 4) -> str:
    """Every number of the card's settings and metrics: `digits` significant digits (`%.4g`: 0.5, 0.4137, 17.3,
    7.805e+06); integers as they are; "–" for None; anything else as text."""
    if value is None:
        return "–"
    if isinstance(value, dict):  # per reward: {"helpful": 0.236, "harmless": 7.72}
        return ", ".join(f"{key}: {format_number(v, digits)}" for key, v in value.items())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def _describe_reference_counts(trainer) -> str:
    counts = trainer.ctrl_reference_counts
    if counts is None:
        return str(trainer.args.num_reference_samples)
    return str(counts[0]) if counts[0] == counts[1] else f"{counts[0]}–{counts[1]}"


def card_settings(trainer) -> dict:
    """The InfAlign settings and latest training metrics that the model card reports (`ctrl_card_settings()`).

    Besides the user's β (`beta`, `final_beta`: units of the unnormalised Φ) it gives the trainer's own coefficient on
    the normalised Φ (`trainer_beta_start`, `trainer_beta`: RLOO's / GRPO's `beta` = β · factor / scale, with
    `transform_offset` and `transform_scale` the normalisation)."""
    args = trainer.args
    transform = trainer.ctrl_transform
    settings = {
        "inference_procedure": args.inference_procedure,
        "inference_n": args.inference_n,
        "transform": transform.spec,
        "t": transform.params.get("t"),
        "beta": args.beta,
        "final_beta": trainer.current_beta,
        "trainer_beta_start": trainer._ctrl_penalty_beta(args.beta),
        "trainer_beta": trainer.beta,
        "penalty_factor": trainer._ctrl_penalty_factor(),
        "transform_offset": trainer.ctrl_offset,
        "transform_scale": trainer.ctrl_scale,
        "kl_control": args.kl_control,
        "kl_budget": args.kl_budget,
        "num_reference_samples": _describe_reference_counts(trainer),
        "reference_rewards_column": args.reference_rewards_column,
    }
    last = {}
    for entry in getattr(trainer.state, "log_history", []) or []:
        last.update({k: v for k, v in entry.items() if k == "kl" or k.startswith("ctrl/")})
    settings["final_training_metrics"] = last
    return settings


def _finite(value) -> float | None:
    """`value` as a float if it is a finite number, else None."""
    if isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _ci(low, high):
    low, high = _finite(low), _finite(high)
    return (low, high) if low is not None and high is not None else None


def _one_standard_row(rows) -> list:
    """The win-rate rows with N = 1 of `bon` / `won` folded into `standard`: best-of-1 and worst-of-1 *are* one
    sample, so their estimates are the standard row's."""
    out, seen_standard = [], False
    for row in rows:
        row = dict(row)
        single = row.get("n") == 1 and row.get("procedure") in ("standard", "bon", "won")
        if single:
            if seen_standard:
                continue
            seen_standard = True
            row.update(procedure="standard", spec="standard")
        out.append(row)
    return out


def _evaluation_for_card(evaluation) -> dict | None:
    """Win-rate rows and KL from an `EvaluationResult`, its `to_dict()`, or a plain dict with `kl_k1`/`kl_k3`.

    Returns `{"win_rates", "kl_k1", "kl_k1_ci", "kl_k3", "kl_k3_ci", "policy", "reference"}`; the KL entries only when
    the evaluation has them (per completion, nats; CIs None when not available).
    """
    if evaluation is None:
        return None
    if hasattr(evaluation, "to_dict"):
        evaluation = evaluation.to_dict()
    card = {"win_rates": _one_standard_row(evaluation.get("win_rates", [])), "confidence": evaluation.get("confidence") or 0.95}
    kl = evaluation.get("kl")
    if isinstance(kl, dict):
        for name in ("k1", "k3"):
            entry = kl.get(name) or {}
            card[f"kl_{name}"] = _finite(entry.get("estimate"))
            card[f"kl_{name}_ci"] = _ci(entry.get("ci_low"), entry.get("ci_high"))
    elif "kl_k1" in evaluation:
        card["kl_k1"], card["kl_k3"] = _finite(evaluation["kl_k1"]), _finite(evaluation.get("kl_k3"))
        for name in ("k1", "k3"):
            ci = evaluation.get(f"kl_{name}_ci")
            card[f"kl_{name}_ci"] = _ci(*ci) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None
    if card.get("kl_k1") is None:
        for key in ("kl_k1", "kl_k1_ci", "kl_k3", "kl_k3_ci"):
            card.pop(key, None)
    metadata = evaluation.get("metadata") or {}
    card["policy"], card["reference"] = metadata.get("policy"), metadata.get("reference")
    card["deployments"] = list(evaluation.get("deployments") or [])
    return card


def _deployment_quick_start(deployment) -> tuple[int, str]:
    return deployment.n, (f"Aligned for {deployment.label}: serve each request with its procedure, each judged by its "
                          f"own reward model (sample up to {deployment.n} completions).")


def _deployment_for_card(trainer, deployment) -> dict:
    """The deployment table: per component its weight, procedure, reward and transform, plus the prediction made
    from the training references when the transforms were fitted on them (`trainer.ctrl_fit`)."""
    transforms = trainer.ctrl_reward_transforms.transforms
    fit = getattr(trainer, "ctrl_fit", None)
    rows = [{"weight": c.weight, "procedure": c.procedure.label, "reward": c.reward,
             "transform": transforms[c.reward].spec, "predicted": None if fit is None else fit.win_rates.get(c.metric_key)}
            for c in deployment.components]
    return {"spec": deployment.spec, "components": rows,
            "predicted": None if fit is None else {"objective": fit.objective, "kl": fit.kl}}


def _kl_for_card(settings: dict) -> dict:
    """The KL block of the card from `ctrl_card_settings()` (every key read with `.get`, so older trainers work).

    `sequence_kl`: last logged `ctrl/sequence_kl` (per completion, nats); `token_kl`: TRL's per-token `kl`;
    `budget`: `kl_budget` (per completion, nats); `initial_beta`: `beta`; `final_beta`: `final_beta`, else the last
    logged `ctrl/beta`; `beta_changed`: whether they differ (the card then shows both); `trainer_beta_start` /
    `trainer_beta`: the trainer's own coefficient on the normalised Φ at the start / end, with `penalty_factor`,
    `transform_offset`, `transform_scale` (`normalised`: whether Φ was rescaled); `control`: `kl_control`
    ("adaptive" / "fixed"), None when the trainer does not say.
    """
    metrics = settings.get("final_training_metrics") or {}
    final_beta = settings.get("final_beta")
    if final_beta is None:
        final_beta = metrics.get("ctrl/beta")
    initial, final = settings.get("beta"), _finite(final_beta)
    scale, offset = _finite(settings.get("transform_scale")), _finite(settings.get("transform_offset"))
    return {
        "sequence_kl": _finite(metrics.get("ctrl/sequence_kl")),
        "token_kl": _finite(metrics.get("kl")),
        "budget": _finite(settings.get("kl_budget")),
        "initial_beta": initial,
        "final_beta": final,
        "beta_changed": final is not None and _finite(initial) is not None
        and not math.isclose(final, float(initial), rel_tol=1e-9, abs_tol=0.0),
        "trainer_beta_start": _finite(settings.get("trainer_beta_start")),
        "trainer_beta": _finite(settings.get("trainer_beta")),
        "penalty_factor": _finite(settings.get("penalty_factor")),
        "transform_scale": scale,
        "transform_offset": offset,
        "normalised": scale is not None and offset is not None and (scale != 1.0 or offset != 0.0),
        "control": settings.get("kl_control"),
    }


def build_ctrl_model_card(trainer, model_name: str | None = None, dataset_name: str | None = None, tags=None) -> ModelCard:
    """Render the card for `trainer` (a `CTRLTrainer` or `CTRLGRPOTrainer`) without writing it."""
    import trl

    base_trainer = getattr(trainer, "_ctrl_base_trainer", None) or "RLOO"
    base_citation = getattr(trl, f"{base_trainer}Trainer")._paper["citation"]

    base_model = getattr(trainer.model.config, "_name_or_path", None) or None
    base_model_is_hub = bool(base_model) and not os.path.isdir(base_model) and not os.path.isabs(base_model)
    all_tags = set([tags] if isinstance(tags, str) else (tags or []))
    all_tags.update(trainer._tag_names)
    settings = trainer.ctrl_card_settings()
    dataset_is_hub = bool(dataset_name) and not os.path.exists(dataset_name)
    card_data = ModelCardData(
        base_model=base_model if base_model_is_hub else None,
        datasets=dataset_name if dataset_is_hub else None,
        library_name="transformers",
        model_name=model_name,
        tags=["generated_from_trainer", *sorted(all_tags)],
    )
    procedure = trainer.args.procedure
    deployment = getattr(trainer, "ctrl_deployment", None)
    deployment = deployment if deployment is not None and deployment.is_multi_reward else None
    # keep the card's final-metrics table readable: numbers only, in a stable order (headline KL first)
    metrics = dict(settings.get("final_training_metrics") or {})
    order = [k for k in ("ctrl/sequence_kl", "kl", "ctrl/beta") if k in metrics]
    settings = {**settings, "final_training_metrics": {k: metrics[k] for k in order + sorted(set(metrics) - set(order))}}
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        base_model=base_model or "a local model",
        base_model_is_hub=base_model_is_hub,
        model_name=model_name or Path(trainer.args.output_dir).name,
        hub_model_id=getattr(trainer, "hub_model_id", None),
        dataset_name=dataset_name,
        dataset_is_hub=dataset_is_hub,
        settings=settings,
        procedure_text=procedure.description if deployment is None else deployment.description,
        quick_start=procedure.quick_start if deployment is None else _deployment_quick_start(deployment),
        deployment=None if deployment is None else _deployment_for_card(trainer, deployment),
        evaluation=_evaluation_for_card(getattr(trainer, "ctrl_evaluation", None)),
        kl=_kl_for_card(settings),
        num=format_number,
        metric_descriptions=METRIC_DESCRIPTIONS,
        wandb_url=None,
        paper_id=trainer._paper["id"],
        trainer_citation=trainer._paper["citation"],
        base_trainer=base_trainer,
        base_trainer_citation=base_citation,
        infalign_version=_version("trl-infalign"),
        trl_version=_version("trl"),
        transformers_version=_version("transformers"),
        pytorch_version=_version("torch"),
        datasets_version=_version("datasets"),
        tokenizers_version=_version("tokenizers"),
    )


def write_ctrl_model_card(
    trainer, model_name: str | None = None, dataset_name: str | None = None, tags=None, output_dir=None
) -> Path:
    card = build_ctrl_model_card(trainer, model_name=model_name, dataset_name=dataset_name, tags=tags)
    path = Path(output_dir or trainer.args.output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    card.save(str(path))
    return path
