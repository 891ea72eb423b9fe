"""Task `hetero_lm`: the `lm` task with a per-family affine distortion of VADER (`lm.LM_FAMILIES`: four families
keyed by the prompt's verb, scales 0.2 … 5.4), three seeds; its seed-pooled summary and acceptance check (CTRL-BoN >
identity > raw reward in BoN-4, with paired 95% CIs). It trains with `lm.run_lm(distort=True, ...)`.
"""

from __future__ import annotations

from .common import METHODS
from .lm import LM_FAMILIES, run_lm  # noqa: F401  (run_lm: this task's runner)

# hetero_lm: 1200 steps (not the lm task's 300): raw-reward RLOO needs them to move its per-family KL to where
# the per-prompt optimum puts it (at 300 steps it is still a shared shift of all families); 128 evaluation samples
# per prompt and side, three seeds (each its own SFT policy, reference rewards and evaluation samples).
DEFAULTS = {
    "quick": dict(target_kls=(0.5,), methods=("raw_reward", "identity", "ctrl_bon"), steps=1200, lr=1e-3,
                  pretrain_steps=250, num_reference=16, eval_samples=128, hidden_size=64, num_layers=2,
                  max_new_tokens=8, prompt_repeats=1, distort=True, families=LM_FAMILIES, family_by="verb",
                  seeds=(0, 1, 2)),
    "full": dict(target_kls=(0.5, 1.0), methods=tuple(METHODS), steps=1600, lr=1e-3, pretrain_steps=600,
                 num_reference=64, eval_samples=128, hidden_size=128, num_layers=4, max_new_tokens=12,
                 prompt_repeats=4, distort=True, families=LM_FAMILIES, family_by="verb", seeds=(0, 1, 2)),
}


LM_PAIRS = (("ctrl_bon", "identity"), ("identity", "raw_reward"), ("ctrl_bon", "raw_reward"))


def _stratified_bootstrap(groups: list, num_bootstrap: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% CI of the mean over all (seed, prompt) values, resampling prompts with replacement within each seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    groups = [np.asarray(g, dtype=np.float64) for g in groups]
    total = sum(len(g) for g in groups)
    stats = np.zeros(num_bootstrap)
    for g in groups:
        idx = rng.integers(0, len(g), size=(num_bootstrap, len(g)))
        stats += g[idx].sum(axis=1)
    stats /= total
    low, high = np.quantile(stats, [0.025, 0.975])
    return float(low), float(high)


def pooled_lm_summary(rows: list[dict]) -> dict:
    """Seed-pooled numbers of one (LM task, KL budget): per method, the mean over seeds and prompts of KL and win
    rates with 95% CIs (bootstrap over prompts within each seed); per method pair, the paired difference (same seed,
    same prompt, same reference samples) with its 95% CI."""
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["method"], {})[int(r.get("seed", 0))] = r
    seeds = sorted(set.intersection(*(set(v) for v in by.values()))) if by else []
    methods: dict = {}
    paired: dict = {}
    for name, per_seed in by.items():
        rs = [per_seed[s] for s in seeds]
        if not rs:
            continue
        entry: dict = {"seeds": seeds, "kl_per_seed": [r["kl"] for r in rs],
                       "bon_win_per_seed": [r["bon_win"] for r in rs]}
        for key, per in (("kl", "kl_per_prompt"), ("standard_win", "standard_win"), ("bon_win", "bon_win"),
                         ("won_win", "won_win")):
            entry[key] = sum(r[key] for r in rs) / len(rs)
            groups = [r["kl_per_prompt"] if per == "kl_per_prompt" else (r.get("per_prompt") or {}).get(per)
                      for r in rs]
            if all(g is not None for g in groups):
                entry[f"{key}_ci"] = list(_stratified_bootstrap(groups))
            elif len(rs) == 1 and rs[0].get(f"{key}_ci"):
                entry[f"{key}_ci"] = rs[0][f"{key}_ci"]
        methods[name] = entry
    for a, b in LM_PAIRS:
        if a not in methods or b not in methods:
            continue
        ra, rb = [by[a][s] for s in seeds], [by[b][s] for s in seeds]
        d: dict = {"bon_win": methods[a]["bon_win"] - methods[b]["bon_win"],
                   "bon_win_per_seed": [x["bon_win"] - y["bon_win"] for x, y in zip(ra, rb)]}
        ga = [(x.get("per_prompt") or {}).get("bon_win") for x in ra]
        gb = [(y.get("per_prompt") or {}).get("bon_win") for y in rb]
        if all(g is not None for g in ga + gb):
            d["bon_win_ci"] = list(_stratified_bootstrap([[u - v for u, v in zip(x, y)] for x, y in zip(ga, gb)]))
        paired[f"{a}_minus_{b}"] = d
    return {"seeds": seeds, "methods": methods, "paired": paired}


def lm_acceptance(rows: list[dict]) -> dict:
    """#12's LM check at one budget: CTRL-BoN > identity > raw in BoN-4, pooled over seeds, with CIs."""
    summary = pooled_lm_summary(rows)
    methods, paired = summary["methods"], summary["paired"]
    entry: dict = {"seeds": summary["seeds"], "pooled": methods, "paired_differences": paired}
    for a, b in LM_PAIRS:
        if a in methods and b in methods:
            entry[f"{a}_minus_{b.replace('raw_reward', 'raw')}_bon4"] = methods[a]["bon_win"] - methods[b]["bon_win"]
            ca, cb = methods[a].get("bon_win_ci"), methods[b].get("bon_win_ci")
            if ca and cb:
                entry[f"{a}_vs_{b}_cis_overlap"] = ca[0] <= cb[1] and cb[0] <= ca[1]
            ci = paired[f"{a}_minus_{b}"].get("bon_win_ci")
            entry[f"{a}_minus_{b}_paired_ci_above_zero"] = None if ci is None else ci[0] > 0
    if all(m in methods for m in ("ctrl_bon", "identity", "raw_reward")):
        c, i, r = (methods[m]["bon_win"] for m in ("ctrl_bon", "identity", "raw_reward"))
        entry["ordering_point_estimates"] = c > i > r
        entry["ordering_per_seed"] = [x > y > z for x, y, z in zip(*(methods[m]["bon_win_per_seed"]
                                                                     for m in ("ctrl_bon", "identity", "raw_reward")))]
        flags = [entry.get(f"{a}_minus_{b}_paired_ci_above_zero") for a, b in LM_PAIRS[:2]]
        entry["ordering_shown_paired_95"] = None if None in flags else all(flags)
        entry["ordering_shown_marginal_cis_disjoint"] = (
            None if "ctrl_bon_vs_identity_cis_overlap" not in entry or "identity_vs_raw_reward_cis_overlap" not in entry
            else (entry["ordering_point_estimates"] and not entry["ctrl_bon_vs_identity_cis_overlap"]
                  and not entry["identity_vs_raw_reward_cis_overlap"]))
    return entry
