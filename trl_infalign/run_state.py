"""What a CTRL checkpoint records about its run, and the checks made when a run resumes from it (Train layer).

Two files are written beside the weights at every save (checkpoints and the final output):

- `ctrl_calibration.json` (`CALIBRATION_STATE_FILE`): what the run calibrates against and optimises — the reference
  rewards' fingerprint, the resolved transform and its normalisation, β, the KL budget and control, the procedure —
  plus what moves during the run (the current β, the KL controller's state, restored on resume);
- `ctrl_run.json` (`RUN_RECORD_FILE`): how the run makes its rewards — the reference model it started from, each
  reward function (name, kind, weights fingerprint or `module:qualname`), the reward weights, the sampling settings
  (temperature, top_p, top_k, min_p, repetition_penalty, max_completion_length, generation_kwargs) and the prompt
  formatting.

A resume compares both with the resumed trainer and refuses, naming every difference, its fix and the override
(deleting the file). A difference in either changes the objective mid-run: the reference rewards were sampled and
scored one way, and training would go on sampling and scoring another, which no later step can notice (the step-0
health check is skipped on a resumed run: the policy is no longer the reference). Checkpoints written before the run
record existed resume with a warning.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from .kl_control import AdaptiveKLController

#: Written into every checkpoint and the final output: what the run calibrates against (checked on resume).
CALIBRATION_STATE_FILE = "ctrl_calibration.json"
#: Written beside it: the run's reward functions, weights and sampling settings (checked on resume).
RUN_RECORD_FILE = "ctrl_run.json"
RUN_RECORD_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------------
# What is recorded
def calibration_state(trainer) -> dict:
    """What the run calibrates against; saved in every checkpoint and compared on resume."""
    args = trainer.args
    return {
        "reference_rewards_column": args.reference_rewards_column,
        "reference_rewards_sha256": trainer.ctrl_reference_fingerprint,
        "resolved_transform": trainer.ctrl_transform.spec,
        "beta": args.beta,
        "kl_budget": args.kl_budget,
        "kl_control": args.kl_control,
        "transform_offset": trainer.ctrl_offset,
        "transform_scale": trainer.ctrl_scale,
        "inference_procedure": args.inference_procedure,
        "inference_n": args.inference_n,
        "min_reference_samples": args.min_reference_samples,
    }


def dynamic_state(trainer) -> dict:
    """What changes during the run (not compared on resume): the current β and the KL controller's state."""
    state = {"final_beta": trainer.current_beta, f"{trainer._ctrl_base_trainer.lower()}_beta": trainer.beta}
    if trainer.ctrl_kl_controller is not None:
        state["kl_controller"] = trainer.ctrl_kl_controller.state_dict()
    return state


def describe_run(trainer, train_dataset=None) -> dict:
    """The run record (`ctrl_run.json`) of a freshly built trainer: read once at construction, while the policy is
    still the model the run starts from."""
    from .provenance import describe_trainer
    from .sampling import is_conversational_prompt

    run = describe_trainer(trainer)
    names = run.get("reward_func_names") or []
    prompt_format = None  # map-style datasets only: reading an iterable one could start a download
    if (hasattr(train_dataset, "__len__") and hasattr(train_dataset, "__getitem__") and len(train_dataset)
            and "prompt" in (getattr(train_dataset, "column_names", None) or [])):
        first = train_dataset[0]["prompt"]
        prompt_format = "conversational" if is_conversational_prompt(first) else "plain"
    record = {
        "format": RUN_RECORD_FORMAT,
        "reference_model": run["reference_model"],
        "reward_funcs": [{"name": names[i] if i < len(names) else None, **identity}
                         for i, identity in enumerate(run["reward_funcs"])],
        "reward_weights": run["reward_weights"],
        "sampling": run["sampling"],
        "prompt_format": prompt_format,
        "chat_template_sha256": run["chat_template_sha256"],
        "chat_template_kwargs": run["chat_template_kwargs"],
    }
    return json.loads(json.dumps(record, default=repr))


def write_state(target: Path, state: dict, run_record: dict | None) -> None:
    """Write `ctrl_calibration.json` (calibration + dynamic state) and `ctrl_run.json` into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    (target / CALIBRATION_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    if run_record is not None:
        (target / RUN_RECORD_FILE).write_text(json.dumps(run_record, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Comparing on resume
def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def compare_calibration(saved: dict, current: dict) -> list[str]:
    """Each key of `current` (`calibration_state`) that the checkpoint holds with another value."""
    current = json.loads(json.dumps(current))
    return [
        f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
        for key in current
        if key in saved and saved[key] != current[key] and not (
            isinstance(saved[key], float) and isinstance(current[key], float)
            and math.isclose(saved[key], current[key], rel_tol=1e-12)
        )
    ]


_SAMPLING_FIELDS = {"max_new_tokens": "max_completion_length"}
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def compare_run_records(saved: dict, current: dict, config_name: str = "CTRLConfig") -> list[str]:
    """Each difference between a checkpoint's run record and the resumed run's, naming the setting and its fix."""
    from .provenance import _describe_model, _describe_reward, _models_match, _reward_matches

    problems = []
    saved_model, current_model = saved.get("reference_model") or {}, current.get("reference_model") or {}
    if saved_model and current_model and not _models_match(saved_model, current_model):
        problems.append(
            f"reference model (the policy the run started from): checkpoint {_describe_model(saved_model)}, now "
            f"{_describe_model(current_model)} (pass the model the run started from as `model=`; "
            "resume_from_checkpoint loads the trained weights on top of it)"
        )
    saved_funcs, current_funcs = saved.get("reward_funcs") or [], current.get("reward_funcs") or []
    if len(saved_funcs) != len(current_funcs):
        problems.append(
            f"reward functions: checkpoint {len(saved_funcs)} ({', '.join(_describe_reward(f) for f in saved_funcs)}), "
            f"now {len(current_funcs)} ({', '.join(_describe_reward(f) for f in current_funcs)}) (pass the "
            "reward_funcs the run was trained with)"
        )
    else:
        for i, (old, new) in enumerate(zip(saved_funcs, current_funcs)):
            if not _reward_matches(old, new):
                label = f" {new.get('name')!r}" if new.get("name") else ""
                problems.append(
                    f"reward function {i}{label}: checkpoint {_describe_reward(old)}, now {_describe_reward(new)} "
                    "(pass the reward function the run was trained with)"
                )
        old_weights, new_weights = saved.get("reward_weights"), current.get("reward_weights")
        if old_weights is not None and new_weights is not None and (
            len(old_weights) != len(new_weights)
            or not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(old_weights, new_weights))
        ):
            problems.append(
                f"reward_weights: checkpoint {old_weights}, now {new_weights} (set "
                f"{config_name}.reward_weights={old_weights})"
            )
    old_sampling, new_sampling = saved.get("sampling") or {}, current.get("sampling") or {}
    for key in sorted(set(old_sampling) | set(new_sampling)):
        old, new = old_sampling.get(key, "<unset>"), new_sampling.get(key, "<unset>")
        if _same(old, new):
            continue
        if key in _SAMPLING_FIELDS or key in _SAMPLING_KEYS:
            field = _SAMPLING_FIELDS.get(key, key)
            problems.append(f"{field}: checkpoint {old!r}, now {new!r} (set {config_name}.{field}={old!r})")
        else:
            problems.append(
                f"generation_kwargs[{key!r}]: checkpoint {old!r}, now {new!r} (make "
                f"{config_name}.generation_kwargs[{key!r}] match)"
            )
    conversational = "conversational" in (saved.get("prompt_format"), current.get("prompt_format"))
    if saved.get("prompt_format") and current.get("prompt_format") and saved["prompt_format"] != current["prompt_format"]:
        problems.append(
            f"prompt format: checkpoint {saved['prompt_format']} prompts, now {current['prompt_format']} (train on "
            "the prompts the run was trained on)"
        )
    elif conversational:
        old, new = saved.get("chat_template_sha256"), current.get("chat_template_sha256")
        if old and new and old != new:
            problems.append(
                f"chat template (processing_class): checkpoint sha256 {old}, now {new} (pass the tokenizer the run "
                "was trained with)"
            )
        old, new = saved.get("chat_template_kwargs") or {}, current.get("chat_template_kwargs") or {}
        if old != new:
            problems.append(f"chat_template_kwargs: checkpoint {old}, now {new} (set {config_name}.chat_template_kwargs={old})")
    return problems


def restore_kl_controller(trainer, saved: dict, checkpoint: str) -> None:
    """Continue the adaptive KL controller from the checkpoint's state (β included)."""
    if trainer.ctrl_kl_controller is None:
        return
    state = saved.get("kl_controller")
    if state is None:
        warnings.warn(
            f"{checkpoint} holds no KL-controller state (written by an older version, or with kl_control='fixed'): "
            f"the adaptive controller restarts from beta={trainer.args.beta:.6g}.",
            stacklevel=5,
        )
        return
    trainer.ctrl_kl_controller = AdaptiveKLController.from_state_dict(state)
    trainer.beta = trainer._ctrl_penalty_beta(trainer.ctrl_kl_controller.beta)


def check_resume(trainer, checkpoint: str) -> None:
    """Restore the KL controller from `checkpoint` and refuse a resume whose calibration or run differs from the one
    that wrote it (one `ValueError` listing every difference and the override)."""
    calibration_path = Path(checkpoint) / CALIBRATION_STATE_FILE
    record_path = Path(checkpoint) / RUN_RECORD_FILE
    config_name = type(trainer.args).__name__
    calibration_problems, run_problems = [], []
    if calibration_path.is_file():
        saved = json.loads(calibration_path.read_text())
        restore_kl_controller(trainer, saved, checkpoint)
        calibration_problems = compare_calibration(saved, trainer.ctrl_calibration_state())
    current_record = getattr(trainer, "ctrl_run_record", None)
    if record_path.is_file():
        if current_record is not None:
            run_problems = compare_run_records(json.loads(record_path.read_text()), current_record, config_name)
    else:
        warnings.warn(
            f"{checkpoint} holds no run record ({RUN_RECORD_FILE}, written by trl-infalign since this check exists): "
            "the resumed run's reward functions, reward_weights and sampling settings (temperature, top_p, top_k, "
            "min_p, repetition_penalty, max_completion_length) cannot be compared with the ones it was trained with. "
            "Make sure they are the same; the next checkpoint will record them.",
            UserWarning,
            stacklevel=4,
        )
    if not (calibration_problems or run_problems):
        return
    overrides = []
    if calibration_problems:
        overrides.append(f"delete {calibration_path} (calibration settings)")
    if run_problems:
        overrides.append(f"delete {record_path} (reward functions, weights and sampling settings)")
    raise ValueError(
        f"Resuming from {checkpoint} with different calibration than the run that wrote it ("
        + "; ".join(calibration_problems + run_problems)
        + "). The rewards before and after the resume would not be the same objective. Resume with the same "
        "dataset (reference rewards), reward functions, reward weights, sampling settings and CTRL settings, or "
        "start a new run in a fresh output_dir (or " + " and ".join(overrides) + " to override)."
    )


def last_complete_checkpoint(output_dir) -> str | None:
    """The newest `checkpoint-N` in `output_dir` with a `trainer_state.json` (the Trainer writes it last), warning
    about newer incomplete ones; None when there is no checkpoint; an error when every one is incomplete."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        name = path.name
        if path.is_dir() and name.startswith(PREFIX_CHECKPOINT_DIR + "-") and name.split("-")[-1].isdigit():
            found.append((int(name.split("-")[-1]), path))
    incomplete = []
    for _, path in sorted(found, reverse=True):
        if (path / "trainer_state.json").is_file():
            if incomplete:
                warnings.warn(
                    f"Skipping incomplete checkpoint(s) {', '.join(str(p) for p in incomplete)} (no trainer_state.json: "
                    f"the run was probably killed while saving); resuming from {path}.",
                    stacklevel=4,
                )
            return str(path)
        incomplete.append(path)
    if incomplete:
        raise ValueError(
            f"resume_from_checkpoint=True, but every checkpoint in {root} is incomplete (no trainer_state.json): "
            f"{', '.join(str(p) for p in incomplete)}. Delete them and train from scratch, or pass a checkpoint path."
        )
    return None
