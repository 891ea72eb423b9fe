"""Inference-time win rates (standard, Best-of-N, Worst-of-N, mixtures, user procedures) and KL of a policy against
its reference (notes §3).

Two entry points:

- :func:`evaluate_policy` samples `m` completions per prompt from the policy and from the reference, scores them with
  the reward functions (exactly as TRL's `RLOOTrainer` does, via :mod:`trl_infalign.sampling`) and computes the log-probs
  of the policy samples under both models for the KL estimators;
- :func:`evaluate_scored` does the statistics only, for samples generated and scored elsewhere (vLLM, an API, ...).

Which win rates: `procedures` are :mod:`trl_infalign.procedures` specs or objects. A bare name whose procedure is
parameterised by N (``"bon"``, ``"won"``) is evaluated at every N of `ns`; ``"standard"`` once; a full spec with its
own parameters (``"bon:n=8"``, ``"mixture:0.5*standard+0.5*bon:n=4"``, a registered user procedure, an
:class:`~trl_infalign.procedures.InferenceProcedure` instance) once, as given. The procedure object computes the win
rate (:meth:`~trl_infalign.procedures.InferenceProcedure.per_prompt_win_rates`) and names it (`metric_key`, `label`).
A deployment that names rewards (``"mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"``, :mod:`trl_infalign.deployment`)
is evaluated component by component, each on its own reward's scores, and reported as Σ_j w_j W_j with a CI paired
with the components' (:class:`DeploymentResult`).

Win rates use the exact *all-subsets* estimator: for a prompt with scores `a_1..a_m` (policy) and `b_1..b_m'`
(reference), the BoN-N win probability is the average, over every N-subset of the policy samples and every N-subset of
the reference samples, of `1[max A > max B] + ½·1[max A = max B]`. It is computed in O(m log m) per prompt from the
order statistics: the max of a uniformly random N-subset of m sorted values is the j-th smallest with probability
C(j−1, N−1)/C(m, N) (the min: C(m−j, N−1)/C(m, N)). It is unbiased for the BoN-N win rate of the two policies and has
far lower variance than drawing one random BoN pair per prompt. A request-level mixture's estimate is Σ_j w_j (component
j's estimate), unbiased when every component's is; a user procedure given by a non-polynomial output-CDF map f uses the
plug-in estimator (the empirical CDF through f), biased by O(1/m) — rows say which (`unbiased`). Confidence intervals
are percentile bootstraps over prompts (prompts are the independent units; samples within a prompt are not resampled).

KL is reported **per completion, in nats** — the unit of `CTRLConfig.kl_budget`, of RLOO's penalty and of the
calibrated-space theory: for a policy sample y, log π(y) − log π_ref(y) summed over the completion's tokens (TRL's
logged `kl` is instead the per-token mean, smaller by the completion length). The headline estimator is k1 (notes §6).

Layout (each module one concept; imports run downwards):

- :mod:`.planning`: which win rates — procedure specs resolved, bare names expanded over `ns`, deployments that name
  rewards set apart and bound to the reward functions' names, too-large N dropped;
- :mod:`.estimators`: pure tensor code — per-prompt win rates, the KL terms, the bootstrap over prompts;
- :mod:`.results`: :class:`WinRateResult`, :class:`DeploymentResult`, :class:`EvaluationResult` and their JSON,
  markdown and plot;
- :mod:`.scored`: :func:`inference_win_rate` and :func:`evaluate_scored`, statistics of scored samples;
- :mod:`.policy`: :func:`evaluate_policy` and the sampling helpers it shares with the callback.
"""

from __future__ import annotations

from ..procedures import PROCEDURES
from .estimators import kl_estimates, order_statistic_weights, per_prompt_win_rates
from .planning import (
    DEFAULT_NS,
    PlannedWinRate,
    ProcedureLike,
    SkippedNWarning,
    metric_name,
    plan_procedures,
    split_by_samples,
)
from .policy import describe_policy, evaluate_policy
from .results import KL_HEADLINE, KL_UNIT, ROW_KEYS, DeploymentResult, EvaluationResult, WinRateResult
from .scored import evaluate_scored, inference_win_rate

__all__ = [
    "DEFAULT_NS",
    "DeploymentResult",
    "EvaluationResult",
    "KL_HEADLINE",
    "KL_UNIT",
    "PROCEDURES",
    "PlannedWinRate",
    "ProcedureLike",
    "ROW_KEYS",
    "SkippedNWarning",
    "WinRateResult",
    "describe_policy",
    "evaluate_policy",
    "evaluate_scored",
    "inference_win_rate",
    "kl_estimates",
    "metric_name",
    "order_statistic_weights",
    "per_prompt_win_rates",
    "plan_procedures",
    "split_by_samples",
]
