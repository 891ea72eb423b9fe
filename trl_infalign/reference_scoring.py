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

    def score(self, rows, first_row: int, prompts, texts, ids, other_columns, starts=None) -> dict[int, dict]:
        """The records of one chunk: `rows` (the chunk's dataset rows, `first_row` the index of the first), its
        `prompts`, the sampled `texts[p][k]` / `ids[p][k]`, and the dataset columns callables receive. `starts[p]`
        is the index of prompt p's first sample here (a top-up draws samples K₁..K₂−1): a record of samples
        [a, b) with a > 0 says so in `"samples": [a, b]`; one without covers [0, b)."""
        config = self.config
        counts = [len(per) for per in texts]
        starts = [0] * len(prompts) if starts is None else list(starts)
        flat_prompts = [p for p, n in zip(prompts, counts) for _ in range(n)]
        flat_texts = [t for per in texts for t in per]
        flat_ids = [c for per in ids for c in per]
        columns = {c: [v for v, n in zip(rows[c], counts) for _ in range(n)] for c in other_columns}
        columns.update(trainer_state=None, log_extra=_noop, log_metric=_noop)
        sample_index = [start + j for start, n in zip(starts, counts) for j in range(n)]
        raw = self._score(flat_prompts, flat_texts, flat_ids, columns, sample_index) if flat_texts else None
        per_prompt = []
        offset = 0
        for n in counts:  # [p][j][k]: each prompt's n samples, per reward function (or combined)
            block = raw[offset : offset + n] if raw is not None else None
            offset += n
            if block is None:
                per_prompt.append([[] for _ in (self.funcs if self.per_reward else [None])])
            elif self.per_reward:
                per_prompt.append(block.T.tolist())
            else:
                per_prompt.append([combine_rewards(block, self.weights).tolist()])
        results = {}
        for offset, (values, start) in enumerate(zip(per_prompt, starts, strict=True)):
            row, n = first_row + offset, counts[offset]
            keep = [all(math.isfinite(v[j]) for v in values) for j in range(n)]
            if not all(keep):
                self._check_nonfinite(row, values, keep, prompts[offset], texts[offset], start)
            kept = [[v for v, ok in zip(per, keep) if ok] for per in values]
            record = {"index": row, "ref_rewards": dict(zip(self.names, kept)) if self.per_reward else kept[0]}
            if start:
                record["samples"] = [start, start + n]
            if not all(keep):
                record["num_dropped"] = keep.count(False)
            if config.keep_completions:
                record["ref_completions"] = [t for t, ok in zip(texts[offset], keep) if ok]
            results[row] = record
        return results

    def _score(self, prompts, texts, ids, columns, sample_index):
        """(n, F) raw rewards. Callables get every completion of the chunk in one call (as before); reward models score
        one group per sample index j (sample j of every prompt of the chunk), so that a completion's reward does not
        depend on K: the batches of a top-up are those of a build from scratch (padding to the longest text of a
        batch changes a model's output in its last bits)."""
        import torch

        config = self.config
        raw = torch.full((len(texts), len(self.funcs)), math.nan, dtype=torch.float32)
        calls = [i for i, f in enumerate(self.funcs) if not _is_module(f)]
        models = [i for i, f in enumerate(self.funcs) if _is_module(f)]
        if calls:
            raw[:, calls] = score_completions(
                [self.funcs[i] for i in calls], [self.classes[i] for i in calls], prompts, texts, completion_ids=ids,
                columns=columns, chat_template_kwargs=config.chat_template_kwargs, batch_size=config.reward_batch_size,
            )
        if models:
            groups: dict[int, list[int]] = {}
            for position, j in enumerate(sample_index):
                groups.setdefault(j, []).append(position)
            for positions in groups.values():
                index = torch.tensor(positions)
                raw[index.unsqueeze(1), torch.tensor(models)] = score_completions(
                    [self.funcs[i] for i in models], [self.classes[i] for i in models],
                    [prompts[q] for q in positions], [texts[q] for q in positions],
                    completion_ids=[ids[q] for q in positions], chat_template_kwargs=config.chat_template_kwargs,
                    batch_size=config.reward_batch_size,
                )
        return raw

    def _check_nonfinite(self, row: int, values, keep, prompt, texts, start: int = 0) -> None:
        k = self.config.num_samples
        if self.config.nonfinite == "raise":
            j = keep.index(False)
            texts = [None] * start + list(texts)  # sample j of the row is texts[j - start]
            values = [[None] * start + list(v) for v in values]
            j += start
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
        if not any(keep) and start == 0:
            raise ValueError(
                f"Dataset row {row}: all {k} reference samples got non-finite rewards, so the "
                "row has nothing to calibrate against. Fix the reward function(s) for this prompt or "
                "remove the row."
            )


__all__ = ["RewardScorer"]
