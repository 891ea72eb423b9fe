"""Scoring for the reference pass: the reward functions loaded as TRL loads them, and a chunk's completions turned into
cache records.

A record is `{"index": row, "ref_rewards": values}` (plus `"num_dropped"` and `"ref_completions"` when relevant), where
`values` is the list of the K *combined* rewards (Σ_j w_j r_j, NaN-skipping, as `RLOOTrainer` combines a completion's
rewards before CTRL calibrates it) or, for a per-reward build, `{name: [K floats]}` with each reward function's own,
unweighted values for the same K completions.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math

from .reference_cache import _short
from .sampling import combine_rewards, load_reward_funcs, reward_func_name, score_completions
from .provenance import reward_func_identity


def _noop(*args, **kwargs):
    return None


def _is_module(func) -> bool:
    from torch import nn

    return isinstance(func, nn.Module)


def _sync_callable(func):
    """Async reward callables (supported by TRL) run to completion here."""
    if _is_module(func) or not inspect.iscoroutinefunction(func):
        return func

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return asyncio.run(func(*args, **kwargs))

    return wrapper


class RewardScorer:
    """The reward functions of one build and how a chunk is scored (`config`: a `ReferenceConfig`).

    `names` are TRL's names (:func:`~trl_infalign.sampling.reward_func_name`); `identities` their provenance
    identities; `per_reward` is True when the build stores each reward under its name (``config.per_reward`` and more
    than one reward function).
    """

    def __init__(self, reward_funcs, reward_processing_classes, config):
        funcs_in = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        # Reward-model paths load with the same `model_init_kwargs` as the policy, as in RLOOTrainer.
        funcs, self.classes = load_reward_funcs(funcs_in, reward_processing_classes, model_init_kwargs=config.model_init_kwargs)
        self.names = [reward_func_name(f) for f in funcs]
        self.identities = [reward_func_identity(f) for f in funcs]
        self.weights = [1.0] * len(funcs) if config.reward_weights is None else list(config.reward_weights)
        if len(self.weights) != len(funcs):
            raise ValueError(
                f"reward_weights has {len(self.weights)} entries for {len(funcs)} reward functions: give one weight per "
                "reward function."
            )
        self.per_reward = bool(config.per_reward) and len(funcs) > 1
        if self.per_reward:
            seen: dict[str, int] = {}
            for i, name in enumerate(self.names):
                if name in seen:
                    raise ValueError(
                        f"reward functions {seen[name]} and {i} are both named {name!r} (TRL's name: a model's directory "
                        "or hub id, a callable's __name__), and per_reward=True stores each reward under its name. Give "
                        "them different names (rename the function, or save the reward model under another directory)."
                    )
                seen[name] = i
        self.funcs = [_sync_callable(f) for f in funcs]
        self.config = config

    def to(self, device) -> None:
        for f in self.funcs:
            if _is_module(f):
                f.to(device)

    def score(self, rows, first_row: int, prompts, texts, ids, other_columns) -> dict[int, dict]:
        """The records of one chunk: `rows` (the chunk's dataset rows, `first_row` the index of the first), its
        `prompts`, the sampled `texts[p][k]` / `ids[p][k]`, and the dataset columns callables receive."""
        config, k = self.config, self.config.num_samples
        flat_prompts = [p for p in prompts for _ in range(k)]
        flat_texts = [t for per in texts for t in per]
        flat_ids = [c for per in ids for c in per]
        columns = {c: [v for v in rows[c] for _ in range(k)] for c in other_columns}
        columns.update(trainer_state=None, log_extra=_noop, log_metric=_noop)
        raw = score_completions(
            self.funcs, self.classes, flat_prompts, flat_texts, completion_ids=flat_ids, columns=columns,
            chat_template_kwargs=config.chat_template_kwargs, batch_size=config.reward_batch_size,
        )
        if self.per_reward:
            per_func = raw.view(len(prompts), k, len(self.funcs)).permute(0, 2, 1).tolist()  # [p][j][k]
        else:
            per_func = [[row] for row in combine_rewards(raw, self.weights).view(len(prompts), k).tolist()]
        results = {}
        for offset, values in enumerate(per_func):
            row = first_row + offset
            keep = [all(math.isfinite(v[j]) for v in values) for j in range(k)]
            if not all(keep):
                self._check_nonfinite(row, values, keep, prompts[offset], texts[offset])
            kept = [[v for v, ok in zip(per, keep) if ok] for per in values]
            record = {"index": row, "ref_rewards": dict(zip(self.names, kept)) if self.per_reward else kept[0]}
            if not all(keep):
                record["num_dropped"] = keep.count(False)
            if config.keep_completions:
                record["ref_completions"] = [t for t, ok in zip(texts[offset], keep) if ok]
            results[row] = record
        return results

    def _check_nonfinite(self, row: int, values, keep, prompt, texts) -> None:
        k = self.config.num_samples
        if self.config.nonfinite == "raise":
            j = keep.index(False)
            if self.per_reward:
                name, value = next((n, v[j]) for n, v in zip(self.names, values) if not math.isfinite(v[j]))
                raise ValueError(
                    f"Dataset row {row}: reference sample {j} got a non-finite reward ({value}) from {name!r} (prompt "
                    f"{_short(prompt)}, completion {_short(texts[j])}). Fix the reward function, or pass "
                    "nonfinite='skip' (CLI: --nonfinite skip) to drop such samples from their row (for every reward, "
                    "so the per-reward lists stay aligned)."
                )
            raise ValueError(
                f"Dataset row {row}: reference sample {j} got a non-finite combined reward ({values[0][j]}) "
                f"from {self.names} (prompt {_short(prompt)}, completion {_short(texts[j])}). "
                "Fix the reward function(s), or pass nonfinite='skip' (CLI: --nonfinite skip) to drop "
                "such samples from their row."
            )
        if not any(keep):
            raise ValueError(
                f"Dataset row {row}: all {k} reference samples got non-finite rewards, so the "
                "row has nothing to calibrate against. Fix the reward function(s) for this prompt or "
                "remove the row."
            )


__all__ = ["RewardScorer"]
