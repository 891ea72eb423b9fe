"""Task `lm` (and the runner of `hetero_lm`): the tiny-LM VADER task of examples/quickstart.py, Monte-Carlo metrics
with the evaluator (k1 KL per completion with its bootstrap CI, win rates with CIs). With `distort=True` the reward
is VADER under a per-family affine distortion (`LM_FAMILIES`): the `hetero_lm` task.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .bandit import bandit_optimum
from .common import METHODS, N, base_row, common_train_kwargs, diagnose_tables, make_config, plan_runs, row_line, train

# Per-family affine distortion of VADER for `hetero_lm`: prompt "<subject> <verb>" belongs to family VERB_INDEX
# ("was", "is", "felt", "seemed" → 0, 1, 2, 3: 8 prompts each); its reward is scale · vader + offset. Scales are a
# geometric ladder ×3 apart, 0.2 … 5.4 (a 27× spread): a reward model that is 27× sharper on some prompt families than
# on others (and offset). Calibration removes it exactly, one global β for the raw reward cannot. Families are keyed
# by the verb — the last prompt token, which the policy sees at the position where it generates — so that the tiny
# policy can represent (and reach) a different tilt per family. The first design keyed them by the subject
# (SUBJECT_INDEX % 3, scales 0.2 / 1 / 5, `LM_FAMILIES_BY_SUBJECT`): the SFT corpus draws subject and adjective
# independently, the policy's next-token distribution ignores the subject, and raw-reward RLOO spent the *same* KL
# on every family (measured 0.55 / 0.50 / 0.41 nats where the per-prompt optimum puts 0.02 / 0.29 / 1.54): the
# imbalance calibration fixes never materialised (docs/benchmarks.md).
LM_FAMILIES = ((0.2, 0.5), (0.6, 0.0), (1.8, -0.5), (5.4, -1.0))
LM_FAMILIES_BY_SUBJECT = ((0.2, 0.5), (1.0, 0.0), (5.0, -1.0))


DEFAULTS = {
    "quick": dict(target_kls=(0.25, 0.5, 0.75), methods=("identity", "ctrl_bon", "ctrl_won", "optimal"),
                  steps=300, lr=1e-3, pretrain_steps=250, num_reference=16, eval_samples=64, hidden_size=64,
                  num_layers=2, max_new_tokens=8, prompt_repeats=1),
    "full": dict(target_kls=(0.25, 0.5, 1.0), methods=tuple(METHODS), steps=400, lr=1e-3, pretrain_steps=600,
                 num_reference=64, eval_samples=64, hidden_size=128, num_layers=4, max_new_tokens=12,
                 prompt_repeats=4),
}


def _quickstart():
    """`examples/quickstart.py` (corpus generator, prompts' parts, the VADER reward), imported by path."""
    examples = str(Path(__file__).resolve().parents[2] / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import quickstart

    return quickstart


def lm_family(prompt: str, family_by: str = "verb", num_families: int | None = None) -> int:
    """Family of a quickstart prompt "<subject> <verb>": the index of its verb (`family_by="verb"`, the default) or of
    its subject (`"subject"`, the first design) modulo the number of families (default len(LM_FAMILIES))."""
    qs = _quickstart()
    num_families = len(LM_FAMILIES) if num_families is None else num_families
    prompt = prompt.strip()
    for i, subject in enumerate(qs.SUBJECTS):
        for j, verb in enumerate(qs.VERBS):
            if prompt == f"{subject} {verb}":
                return (j if family_by == "verb" else i) % num_families
    raise ValueError(f"not a quickstart prompt: {prompt!r}")


def make_distorted_vader(families=None, family_by: str = "verb"):
    """VADER compound sentiment under a per-family affine distortion: scale_f · vader + offset_f (`families`, default
    LM_FAMILIES). Within a prompt it is an increasing map of VADER, so win rates (and every calibrated reward) are those
    of VADER itself."""
    families = tuple(tuple(f) for f in (LM_FAMILIES if families is None else families))

    def distorted_vader(prompts, completions, **kwargs):
        scores = _quickstart().vader_sentiment(prompts, completions)
        out = []
        for p, s in zip(prompts, scores):
            scale, offset = families[lm_family(p, family_by, len(families))]
            out.append(scale * s + offset)
        return out

    return distorted_vader


distorted_vader = make_distorted_vader()


class PolicySampler:
    """Fixed evaluation protocol of the lm tasks: fresh reference samples scored once, then, per policy, `m` samples per
    prompt scored with the same reward, plus their log-probs under the policy and the reference (per-completion KL)."""

    def __init__(self, reference, tokenizer, prompts, reward_func, *, num_samples: int, max_new_tokens: int, seed: int,
                 families: list[int] | None = None):
        import torch

        from trl_infalign.sampling import generate_completions, load_reward_funcs

        self.reference, self.tokenizer, self.prompts = reference, tokenizer, list(prompts)
        self.funcs, self.classes = load_reward_funcs(reward_func)
        self.num_samples, self.max_new_tokens, self.seed = num_samples, max_new_tokens, seed
        self.families = None if families is None else list(families)
        torch.manual_seed(seed + 7919)
        ref = generate_completions(reference, tokenizer, self.prompts, num_samples, max_new_tokens=max_new_tokens,
                                   progress=False)
        self.reference_rewards = self._score(ref)

    def _score(self, comps):
        from trl_infalign.sampling import score_completions

        flat_prompts = [p for p, texts in zip(comps.prompts, comps.texts) for _ in texts]
        flat_texts = [t for texts in comps.texts for t in texts]
        flat_ids = [i for ids in comps.ids for i in ids]
        scores = score_completions(self.funcs, self.classes, flat_prompts, flat_texts, completion_ids=flat_ids)
        return scores[:, 0].reshape(len(comps.prompts), -1).double()

    def evaluate(self, model) -> dict:
        import torch

        from trl_infalign.evaluation import evaluate_scored
        from trl_infalign.sampling import completion_logprobs, generate_completions

        torch.manual_seed(self.seed)
        comps = generate_completions(model, self.tokenizer, self.prompts, self.num_samples,
                                     max_new_tokens=self.max_new_tokens, progress=False)
        rewards = self._score(comps)
        prompt_ids = [comps.prompt_ids[p] for p in range(len(comps.prompts)) for _ in comps.ids[p]]
        completion_ids = [i for ids in comps.ids for i in ids]
        pad = self.tokenizer.pad_token_id
        shape = rewards.shape
        logp = completion_logprobs(model, prompt_ids, completion_ids, pad_token_id=pad).reshape(shape)
        logp_ref = completion_logprobs(self.reference, prompt_ids, completion_ids, pad_token_id=pad).reshape(shape)
        result = evaluate_scored(rewards, self.reference_rewards, ns=(N,), procedures=("standard", "bon", "won"),
                                 policy_logps=logp, reference_logps=logp_ref, seed=self.seed)
        out = {"kl": result.kl_k1, "kl_ci": list(result.kl_k1_ci), "kl_k3": result.kl_k3, "kl_k3_ci": list(result.kl_k3_ci)}
        for r in result.win_rates:
            key = {"standard": "standard_win", "bon": "bon_win", "won": "won_win"}[r["procedure"]]
            out[key], out[f"{key}_ci"] = r["estimate"], [r["ci_low"], r["ci_high"]]
        out["mean_reward"] = float(rewards.mean())
        out["mean_completion_tokens"] = sum(len(i) for i in completion_ids) / len(completion_ids)
        out["kl_per_prompt"] = (logp - logp_ref).mean(dim=1).tolist()
        out["per_prompt"] = {{"standard": "standard_win", "bon": "bon_win", "won": "won_win"}[r.procedure]:
                             [float(v) for v in r.per_prompt] for r in result.results}
        if self.families is not None:
            out["per_family"] = self._per_family(rewards, logp, logp_ref)
        return out

    def _per_family(self, rewards, logp, logp_ref) -> dict:
        """KL (k1 per completion) and win rates of each prompt family separately (95% bootstrap CIs over its
        prompts): where raw reward spends its KL is the mechanism calibration fixes."""
        import torch

        from trl_infalign.evaluation import evaluate_scored

        fam = torch.as_tensor(self.families)
        out = {}
        for f in sorted(set(self.families)):
            idx = (fam == f).nonzero().flatten()
            r = evaluate_scored(rewards[idx], self.reference_rewards[idx], ns=(N,), procedures=("standard", "bon"),
                                policy_logps=logp[idx], reference_logps=logp_ref[idx], seed=self.seed)
            entry = {"num_prompts": len(idx), "kl": r.kl_k1, "kl_ci": list(r.kl_k1_ci)}
            for w in r.win_rates:
                key = {"standard": "standard_win", "bon": "bon_win"}[w["procedure"]]
                entry[key], entry[f"{key}_ci"] = w["estimate"], [w["ci_low"], w["ci_high"]]
            out[str(f)] = entry
        return out


def tilt_kl_per_prompt(ref_rewards, transform: str, beta: float) -> list[float]:
    """Per-prompt KL of the tilt `diagnose` models, π*_x ∝ π_ref,x·exp(Φ_x/β) on prompt x's K reference atoms (each
    of weight 1/K), for one global β: where a method *should* spend its KL at equilibrium."""
    import torch

    out = []
    for ref in ref_rewards:
        k = len(ref)
        pi_ref = torch.full((k,), 1.0 / k, dtype=torch.float64)
        p = bandit_optimum(pi_ref, torch.tensor(ref, dtype=torch.float64), ref, transform, beta)
        p = p[p > 0]
        out.append(float((p * (p * k).log()).sum()))
    return out


def family_means(values, families) -> dict[str, float]:
    out: dict[str, list] = {}
    for v, f in zip(values, families):
        out.setdefault(str(f), []).append(v)
    return {f: sum(v) / len(v) for f, v in sorted(out.items())}


def run_lm(workdir: Path, *, target_kls, methods, steps: int, pretrain_steps: int, num_reference: int,
           eval_samples: int, hidden_size: int, num_layers: int, max_new_tokens: int, prompt_repeats: int = 1,
           lr: float = 1e-3, distort: bool = False, families=None, family_by: str = "verb", batch_size: int = 32,
           num_generations: int = 8, device: str = "cpu", seed: int = 0, log=print) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from trl_infalign import build_reference_rewards
    from trl_infalign.tiny import build_tiny_policy, build_tokenizer, pretrain_on_texts

    task = "hetero_lm" if distort else "lm"
    qs = _quickstart()
    families_spec = tuple(tuple(f) for f in (LM_FAMILIES if families is None else families)) if distort else None
    reward = make_distorted_vader(families_spec, family_by) if distort else qs.vader_sentiment
    torch.manual_seed(seed)
    corpus = qs.review_corpus(2000, seed)
    tokenizer = build_tokenizer(corpus, vocab_size=400)
    sft_path = workdir / f"{task}-sft"
    build_tiny_policy(tokenizer, sft_path, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    sft = AutoModelForCausalLM.from_pretrained(sft_path).to(device)
    pretrain_on_texts(sft, tokenizer, corpus, steps=pretrain_steps, lr=3e-3, batch_size=32, seed=seed)
    sft.save_pretrained(sft_path)
    prompts = [f"{s} {v}" for s in qs.SUBJECTS for v in qs.VERBS]
    log(f"[{task}] tiny Llama {hidden_size}x{num_layers} pre-trained {pretrain_steps} steps; {len(prompts)} prompts, "
        f"K={num_reference} reference samples, {steps} RL steps per run, {eval_samples} eval samples per prompt and side"
        + (f"; reward = scale·VADER + offset per family (by {family_by}) {families_spec}" if distort else ""))
    dataset = build_reference_rewards(Dataset.from_dict({"prompt": prompts}), sft, reward, tokenizer=tokenizer,
                                      num_samples=num_reference, max_new_tokens=max_new_tokens, seed=seed,
                                      progress=False)
    ref_rewards = [list(r) for r in dataset["ref_rewards"]]
    if prompt_repeats > 1:
        from datasets import concatenate_datasets

        dataset = concatenate_datasets([dataset] * prompt_repeats)
    prompt_families = [lm_family(p, family_by, len(families_spec)) for p in prompts] if distort else None
    sampler = PolicySampler(sft, tokenizer, prompts, reward, num_samples=eval_samples, max_new_tokens=max_new_tokens,
                            seed=seed + 1, families=prompt_families)
    common = common_train_kwargs(
        device, seed, learning_rate=lr, per_device_train_batch_size=batch_size, num_generations=num_generations,
        max_completion_length=max_new_tokens, max_steps=steps,
        # the reference rewards come from the in-memory SFT model saved at sft_path; the trainer loads that path
        reference_provenance_check="warn",
    )
    tables = diagnose_tables(ref_rewards, target_kls)
    rows = []
    for spec in plan_runs(target_kls, methods, {k: v["bon"]["methods"] for k, v in tables.items()}):
        start = time.time()
        args = make_config(spec, workdir / f"{task}-run", **common)
        model, final_beta = train(args, sft_path, tokenizer, reward, dataset)
        measured = sampler.evaluate(model)
        row = base_row(task, spec, args, final_beta, measured, ref_rewards, time.time() - start)
        row["metrics"] = (f"sampled: {eval_samples} samples/prompt/side, {len(prompts)} prompts; KL = k1 per completion "
                          "(95% bootstrap CI over prompts); win rates: all-subsets estimator, 95% bootstrap CIs")
        row["seed"] = seed
        if prompt_families is not None:
            at_budget = row["diagnose_at_budget"]
            if at_budget is not None:
                predicted = family_means(tilt_kl_per_prompt(ref_rewards, row["transform"], at_budget["beta"]),
                                         prompt_families)
                for f, v in predicted.items():
                    row["per_family"][f]["diagnose_kl_at_budget"] = v
            for f, entry in row["per_family"].items():
                entry["scale"], entry["offset"] = families_spec[int(f)]
        rows.append(row)
        log(row_line(row))
        del model
    return {"rows": rows, "diagnose": tables, "ref_rewards": ref_rewards,
            "setup": {"num_prompts": len(prompts), "num_reference": num_reference, "eval_samples": eval_samples,
                      "steps": steps, "lr": lr, "hidden_size": hidden_size, "num_layers": num_layers,
                      "max_new_tokens": max_new_tokens, "batch_size": batch_size, "num_generations": num_generations,
                      "families": families_spec, "family_by": family_by if distort else None,
                      "prompt_families": prompt_families}}
