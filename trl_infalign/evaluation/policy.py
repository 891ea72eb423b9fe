"""Sample, score and compare: :func:`evaluate_policy` generates completions from the policy and the reference, scores
them with the reward functions exactly as TRL's trainers do (:mod:`trl_infalign.sampling`), computes the log-probs of
the policy samples under both models, and hands the scored samples to :func:`~.scored.evaluate_scored`. The sampling
helpers here are shared with :class:`~trl_infalign.callbacks.InferenceWinRateCallback`."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..procedures import PROCEDURES
from ..sampling import model_name, resolve_process_state, resolve_tokenizer
from .planning import (
    DEFAULT_NS,
    ProcedureLike,
    _check_n_value,
    _resolve_plan,
    bind_deployment,
    deployment_min_samples,
    plan_procedures,
    split_by_samples,
    split_deployments,
)
from .results import EvaluationResult
from .scored import evaluate_scored


def _check_sampling(temperature, top_p, top_k) -> tuple[float, float, int]:
    """Validate the sampling settings (same meaning as `transformers.GenerationConfig`): returns them normalised."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(temperature)) or temperature <= 0:
        raise ValueError(
            f"temperature must be a finite number > 0, got {temperature!r} (1.0 samples from the policy itself; greedy "
            "decoding is not sampling and would make every BoN/WoN subset identical)."
        )
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(top_p)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r} (1.0 disables nucleus truncation).")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r} (0 disables top-k truncation).")
    return float(temperature), float(top_p), int(top_k)


def _is_default_sampling(temperature: float, top_p: float, top_k: int) -> bool:
    return temperature == 1.0 and top_p == 1.0 and top_k == 0


def _kl_sampling_note(temperature: float, top_p: float, top_k: int) -> str:
    return (
        f"samples drawn with temperature={temperature:g}, top_p={top_p:g}, top_k={top_k}: they are not draws from π "
        "itself, so kl_k1 / kl_k3 estimate E_sampled[log π − log π_ref] (log-probs at temperature 1), not KL(π‖π_ref). "
        "Evaluate KL with temperature=1, top_p=1, top_k=0."
    )


def _load_causal_lm(model, device):
    if isinstance(model, (str, Path)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model))
        model.to(device)
    return model


def _split_prompts(prompts) -> tuple[list, dict[str, list]]:
    """A list of prompts, or a `datasets.Dataset` with a `prompt` column (other columns go to reward callables)."""
    if hasattr(prompts, "column_names"):
        if "prompt" not in prompts.column_names:
            raise ValueError(f"The prompts dataset has no 'prompt' column (columns: {prompts.column_names}).")
        columns = {c: list(prompts[c]) for c in prompts.column_names if c != "prompt"}
        return list(prompts["prompt"]), columns
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty.")
    return prompts, {}


@dataclass
class _Sampled:
    rewards: torch.Tensor  # (P_local, m): the reward functions combined with their weights, as TRL does
    completions: Any  # sampling.Completions
    per_func: torch.Tensor | None = None  # (P_local, m, F): each reward function's own score


def _sample_and_score(model, tokenizer, prompts, columns, funcs, classes, weights, *, num_samples, max_new_tokens,
                      batch_size, progress, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> _Sampled:
    from ..sampling import combine_rewards, generate_completions, score_completions

    comps = generate_completions(
        model, tokenizer, prompts, num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k, batch_size=batch_size, progress=progress,
    )
    flat_prompts = [p for p in prompts for _ in range(num_samples)]
    flat_texts = [t for row in comps.texts for t in row]
    flat_ids = [ids for row in comps.ids for ids in row]
    flat_columns = {k: [v for v in col for _ in range(num_samples)] for k, col in columns.items()}
    per_func = score_completions(funcs, classes, flat_prompts, flat_texts, completion_ids=flat_ids, columns=flat_columns)
    rewards = combine_rewards(per_func, weights).double().reshape(len(prompts), num_samples)
    return _Sampled(rewards=rewards, completions=comps,
                    per_func=per_func.double().reshape(len(prompts), num_samples, per_func.shape[1]))


def _bind_deployments(deployments, funcs) -> tuple[list[str], list]:
    """The reward functions' names (as TRL derives them) and the deployments bound to them (an error naming the known
    names for an unknown one), checked before anything is sampled."""
    from ..sampling import reward_func_name

    names = [reward_func_name(f) for f in funcs]
    return names, [bind_deployment(d, names) for d in deployments]


def _by_reward(names: Sequence[str], per_func: torch.Tensor) -> dict[str, torch.Tensor]:
    """{reward name: (P, m)} from the (P, m, F) per-function scores."""
    return {name: per_func[:, :, i] for i, name in enumerate(names)}



def _policy_sample_logps(model, reference, tokenizer, comps, num_samples, batch_size) -> tuple[torch.Tensor, torch.Tensor]:
    from ..sampling import completion_logprobs

    prompt_ids = [comps.prompt_ids[p] for p in range(len(comps.prompts)) for _ in range(num_samples)]
    completion_ids = [ids for row in comps.ids for ids in row]
    shape = (len(comps.prompts), num_samples)
    pad = tokenizer.pad_token_id
    lp = completion_logprobs(model, prompt_ids, completion_ids, pad_token_id=pad, batch_size=batch_size)
    if reference is model:
        lr = lp.clone()
    else:
        lr = completion_logprobs(reference, prompt_ids, completion_ids, pad_token_id=pad, batch_size=batch_size)
    return lp.reshape(shape), lr.reshape(shape)


def _completion_lengths(comps) -> torch.Tensor:
    """(P, m) number of tokens of each completion (EOS included when generated)."""
    return torch.tensor([[len(ids) for ids in row] for row in comps.ids], dtype=torch.float64)


def _same_model_name(a: str, b: str) -> bool:
    if a.rstrip("/") == b.rstrip("/"):
        return True
    try:
        return bool(a) and bool(b) and os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def describe_policy(policy, reference, policy_name: str | None = None) -> str:
    """The name `metadata["policy"]` records for the evaluated model.

    `policy_name` if given; else the policy's path when it is a path; else, for an in-memory model, its
    `config._name_or_path` — unless that is the reference's name (a model being trained from the reference keeps the
    reference's `_name_or_path`), in which case `"in-memory model (initialised from '<reference>')"`. Passing the
    reference object itself as the policy records the reference's name (it *is* the reference).
    """
    if policy_name is not None:
        if not isinstance(policy_name, (str, os.PathLike)) or not str(policy_name):
            raise ValueError(f"policy_name must be a non-empty string naming the evaluated model, got {policy_name!r}.")
        return str(policy_name)
    if isinstance(policy, (str, os.PathLike)):
        return str(policy)
    name = str(getattr(getattr(policy, "config", None), "_name_or_path", "") or "")
    if policy is reference:
        return model_name(policy)
    if not name:
        return f"in-memory {type(policy).__name__} (no name_or_path; pass policy_name=)"
    if _same_model_name(name, model_name(reference)):
        return f"in-memory model (initialised from {name!r})"
    return name


def _gather_rows(state, indices: list[int], *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Gather per-prompt rows from every process (in prompt order); no-op on one process."""
    if getattr(state, "num_processes", 1) <= 1:
        return list(tensors)
    from accelerate.utils import gather_object

    records = [(i, *[t[k].tolist() for t in tensors]) for k, i in enumerate(indices)]
    records = sorted(gather_object(records), key=lambda r: r[0])
    return [torch.tensor([r[1 + j] for r in records], dtype=torch.float64) for j in range(len(tensors))]


def _local_indices(state, num_prompts: int) -> list[int]:
    if getattr(state, "num_processes", 1) <= 1:
        return list(range(num_prompts))
    with state.split_between_processes(list(range(num_prompts))) as local:
        return list(local)


def evaluate_policy(
    policy,
    reference,
    reward_funcs,
    prompts,
    *,
    tokenizer=None,
    reward_processing_classes=None,
    reward_weights=None,
    num_samples: int = 32,
    ns: Sequence[int] = DEFAULT_NS,
    procedures: Sequence[ProcedureLike] | ProcedureLike = PROCEDURES,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 32,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    accelerator=None,
    progress: bool = True,
    policy_name: str | None = None,
) -> EvaluationResult:
    """Sample, score and compare: win rates under each inference procedure (standard / BoN-N / WoN-N / mixtures /
    user procedures) and KL of `policy` against `reference`.

    Args:
        policy, reference: causal LMs or paths. They must share the tokenizer (the KL needs log π_ref of the
            policy's tokens). Passing the same object twice is allowed (k1 is then exactly 0).
        reward_funcs: reward model path(s), sequence-classification model(s) or callable(s), as for TRL's trainers;
            combined with `reward_weights` exactly as TRL does.
        prompts: list of prompts (strings or conversational message lists), or a `datasets.Dataset` with a `prompt`
            column (its other columns are passed to reward callables).
        tokenizer: the policy tokenizer (default: loaded from the policy's path).
        ns, procedures: which win rates, as in :func:`evaluate_scored`: "standard" once, "bon" / "won" at every N
            of `ns`, full specs ("bon:n=8", "mixture:0.5*standard+0.5*bon:n=4", registered names, instances) once.
            These are judged on the reward functions combined with `reward_weights`. A deployment that names rewards
            (``"mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"``, names as TRL derives them: a callable's
            `__name__`, a model path's last segment) is judged component by component: every completion is scored by
            every reward function, component j is judged on its reward's scores only (the policy's and the
            reference's samples), and the deployment's win rate is Σ_j w_j W_j (`result.deployments`). An unknown
            reward name is a ValueError naming the known ones, raised before anything is sampled.
        num_samples: m samples per prompt from each model. A procedure needing more than m samples (N > m) cannot be
            evaluated: it is dropped with a :class:`SkippedNWarning` naming it (fix: `num_samples >= N`); a ValueError
            if nothing is left.
        temperature, top_p, top_k: sampling settings for **both** models (as in `transformers.GenerationConfig`:
            temperature > 0, top_p in (0, 1], top_k >= 0 with 0 = off). The defaults (1, 1, 0) sample π itself, as
            TRL's trainers do; the win rates then compare the models deployed with these settings. Other settings
            make the policy samples draws from a tempered / truncated π, so the KL estimators (log-probs at
            temperature 1) no longer estimate KL(π‖π_ref): a UserWarning says so and `metadata["kl_note"]` records it.
        accelerator: an `Accelerator` / `PartialState` (default `PartialState()`): prompts are sharded across processes,
            per-prompt results gathered with `gather_object`; every process returns the same result.
        seed: sampling seed (offset per process and per model) and bootstrap seed.
        policy_name: what `metadata["policy"]` records. Default: the policy's path if given as a path; for an
            in-memory model its `config._name_or_path`, except that a model trained in memory from the reference
            (whose `_name_or_path` is still the reference's) is recorded as "in-memory model (initialised from
            '<reference>')" — pass e.g. the output directory and step to name it properly.

    Returns:
        :class:`EvaluationResult`; `metadata` has `policy`, `reference`, `policy_in_memory`, `num_samples`,
        `max_new_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `num_processes`, `ns_requested`, `ns_skipped`
        (the N of `ns` dropped), `procedures_skipped` (the specs of every dropped win rate),
        `mean_completion_tokens` (policy samples; per-completion KL / this ≈ a per-token KL), `reward_names` (the
        reward functions' names, in order) and, with non-default sampling, `kl_note`.
    """
    from ..sampling import load_reward_funcs

    state = resolve_process_state(accelerator)
    prompt_list, columns = _split_prompts(prompts)
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
    temperature, top_p, top_k = _check_sampling(temperature, top_p, top_k)
    requested = sorted({_check_n_value(n) for n in ns})
    ordinary, deployments = split_deployments(procedures)
    plans = plan_procedures(ordinary, requested) if ordinary else []
    need = max([p.procedure.min_samples for p in plans] + [deployment_min_samples(d) for d in deployments] + [1])
    kept, kept_deployments = _resolve_plan(requested, procedures, num_samples,
                                           fix=f"pass num_samples >= N (num_samples={need} keeps every N)")
    dropped = split_by_samples(plans, num_samples)[1]
    dropped_deployments = [d for d in deployments if d not in kept_deployments]
    kl_note = None if _is_default_sampling(temperature, top_p, top_k) else _kl_sampling_note(temperature, top_p, top_k)
    if kl_note is not None:
        warnings.warn(f"evaluate_policy: {kl_note}", UserWarning, stacklevel=2)
    name = describe_policy(policy, reference, policy_name)
    tokenizer = resolve_tokenizer(policy, tokenizer)
    tokenizer.padding_side = "left"
    same = reference is policy or (isinstance(reference, (str, Path)) and isinstance(policy, (str, Path)) and str(reference) == str(policy))
    policy_model = _load_causal_lm(policy, state.device)
    reference_model = policy_model if same else _load_causal_lm(reference, state.device)
    funcs, classes = load_reward_funcs(reward_funcs, reward_processing_classes)
    reward_names, kept_deployments = _bind_deployments(kept_deployments, funcs)
    for f in funcs:
        if isinstance(f, torch.nn.Module):
            f.to(state.device)

    local = _local_indices(state, len(prompt_list))
    local_prompts = [prompt_list[i] for i in local]
    local_columns = {k: [v[i] for i in local] for k, v in columns.items()}
    show = progress and state.is_main_process
    rank = getattr(state, "process_index", 0)
    kwargs = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                  temperature=temperature, top_p=top_p, top_k=top_k)
    if local_prompts:
        torch.manual_seed(seed * 1_000_003 + 2 * rank)
        pol = _sample_and_score(policy_model, tokenizer, local_prompts, local_columns, funcs, classes, reward_weights,
                                progress="Policy samples" if show else False, **kwargs)
        torch.manual_seed(seed * 1_000_003 + 2 * rank + 1)
        ref = _sample_and_score(reference_model, tokenizer, local_prompts, local_columns, funcs, classes, reward_weights,
                                progress="Reference samples" if show else False, **kwargs)
        lp, lr = _policy_sample_logps(policy_model, reference_model, tokenizer, pol.completions, num_samples, batch_size)
        pr, rr, lengths = pol.rewards, ref.rewards, _completion_lengths(pol.completions)
        pf, rf = pol.per_func, ref.per_func
    else:
        pr = rr = lp = lr = lengths = torch.zeros(0, num_samples, dtype=torch.float64)
        pf = rf = torch.zeros(0, num_samples, len(funcs), dtype=torch.float64)
    pr, rr, lp, lr, lengths, pf, rf = _gather_rows(state, local, pr, rr, lp, lr, lengths, pf, rf)
    metadata = {
        "policy": name, "reference": model_name(reference),
        "policy_in_memory": not isinstance(policy, (str, os.PathLike)),
        "num_samples": num_samples, "max_new_tokens": max_new_tokens,
        "temperature": temperature, "top_p": top_p, "top_k": top_k,
        "seed": seed, "num_processes": getattr(state, "num_processes", 1),
        "ns_requested": requested,
        "ns_skipped": sorted({p.n for p in dropped if p.n is not None}),
        "procedures_skipped": [p.procedure.spec for p in dropped] + [d.spec for d in dropped_deployments],
        "mean_completion_tokens": float(lengths.mean()) if lengths.numel() else None,
        "reward_names": reward_names,
    }
    if kl_note is not None:
        metadata["kl_note"] = kl_note
    by_reward = {} if not kept_deployments else dict(policy_rewards_by_reward=_by_reward(reward_names, pf),
                                                     reference_rewards_by_reward=_by_reward(reward_names, rf))
    return evaluate_scored(
        pr, rr, sorted({p.n for p in kept if p.n is not None}), [p.procedure for p in kept] + kept_deployments, lp, lr,
        num_bootstrap=num_bootstrap, confidence=confidence, seed=seed, metadata=metadata, **by_reward,
    )
