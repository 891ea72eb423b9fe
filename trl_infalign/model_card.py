"""Model card of a CTRL run: TRL's card (tags, paper, citation, versions) plus the InfAlign settings and results."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = Path(__file__).parent / "templates" / "ctrl_model_card.md"
PROCEDURE_TEXT = {
    "standard": "plain sampling (one sample; the standard win rate against the reference)",
    "bon": "Best-of-{n} sampling (keep the highest-reward of {n} samples)",
    "won": "Worst-of-{n} robustness (e.g. a jailbreak attacker keeping the worst of {n} samples)",
}


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _evaluation_for_card(evaluation) -> dict | None:
    """Win-rate rows and KL from an `EvaluationResult`, its `to_dict()`, or a plain dict with `kl_k1`/`kl_k3`."""
    if evaluation is None:
        return None
    if hasattr(evaluation, "to_dict"):
        evaluation = evaluation.to_dict()
    card = {"win_rates": list(evaluation.get("win_rates", []))}
    kl = evaluation.get("kl")
    if isinstance(kl, dict):
        card["kl_k1"], card["kl_k3"] = kl["k1"]["estimate"], kl["k3"]["estimate"]
    elif "kl_k1" in evaluation:
        card["kl_k1"], card["kl_k3"] = evaluation["kl_k1"], evaluation.get("kl_k3", float("nan"))
    return card


def build_ctrl_model_card(trainer, model_name: str | None = None, dataset_name: str | None = None, tags=None) -> ModelCard:
    """Render the card for `trainer` (a `CTRLTrainer`) without writing it."""
    from trl import RLOOTrainer

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
    procedure = settings["inference_procedure"]
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
        procedure_text=PROCEDURE_TEXT[procedure].format(n=settings["inference_n"]),
        evaluation=_evaluation_for_card(trainer.ctrl_evaluation),
        wandb_url=None,
        paper_id=trainer._paper["id"],
        trainer_citation=trainer._paper["citation"],
        rloo_citation=RLOOTrainer._paper["citation"],
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
