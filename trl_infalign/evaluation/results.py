"""What an evaluation returns and how it is shown: :class:`WinRateResult` (one win rate), :class:`DeploymentResult`
(a deployment that names rewards: each component's win rate on its own reward and the deployment's Σ_j w_j W_j),
:class:`EvaluationResult` (a sweep of win rates, deployments and the KL), their JSON, markdown table and
win-rate-vs-N plot."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..deployment import Deployment, DeploymentComponent, get_deployment
from ..procedures import InferenceProcedure, get_procedure
from .planning import ProcedureLike, _expands_over_n, _n_family, _resolve_procedure


@dataclass
class WinRateResult:
    """Win rate of the policy against the reference under an inference procedure, with a bootstrap CI over prompts.

    `estimate` is the mean over prompts of `per_prompt` (each prompt's win probability: the exact all-subsets average,
    or the plug-in estimate when `unbiased` is False). `procedure` is the procedure's name ("standard", "bon", "won",
    "mixture", a registered name), `n` its samples per request, `spec` its full spec ("bon:n=4", "mixture:...") and
    `inference_procedure` the :class:`~trl_infalign.procedures.InferenceProcedure` itself.
    """

    estimate: float
    ci_low: float
    ci_high: float
    per_prompt: np.ndarray
    n: int
    procedure: str
    num_prompts: int
    confidence: float = 0.95
    spec: str | None = None
    unbiased: bool | None = None
    inference_procedure: InferenceProcedure | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.inference_procedure is None:
            try:
                self.inference_procedure = get_procedure(self.spec) if self.spec else _resolve_procedure(self.procedure, self.n)
            except (ValueError, TypeError):
                return
        if self.spec is None:
            self.spec = self.inference_procedure.spec
        if self.unbiased is None:
            self.unbiased = bool(self.inference_procedure.unbiased)

    @property
    def name(self) -> str:
        """The procedure's metric key: `bon@4_win_rate`, `standard_win_rate`, `mixture(...)_win_rate`."""
        if self.inference_procedure is None:
            raise ValueError(f"unknown procedure {self.spec or self.procedure!r}: register it to name its metric.")
        return self.inference_procedure.metric_key

    @property
    def label(self) -> str:
        """Human-readable name of the procedure ("Best-of-4")."""
        return self.inference_procedure.label if self.inference_procedure is not None else str(self.spec or self.procedure)

    def to_dict(self, per_prompt: bool = False) -> dict:
        out = {
            "procedure": self.procedure, "n": self.n, "estimate": self.estimate, "ci_low": self.ci_low,
            "ci_high": self.ci_high, "spec": self.spec, "unbiased": self.unbiased, "num_prompts": self.num_prompts,
            "confidence": self.confidence,
        }
        if per_prompt:
            out["per_prompt"] = [float(v) for v in self.per_prompt]
        return out


#: The keys of an `EvaluationResult.win_rates` row.
ROW_KEYS = ("procedure", "n", "estimate", "ci_low", "ci_high", "spec", "unbiased")


@dataclass
class DeploymentResult:
    r"""Win rate of a deployment that serves different procedures on different rewards
    (:mod:`trl_infalign.deployment`), e.g. ``mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless``.

    `components` pairs each :class:`~trl_infalign.deployment.DeploymentComponent` j (weight w_j, procedure P_j,
    reward r_j) with its :class:`WinRateResult` W_j: P_j's win rate when both the policy's and the reference's samples
    are judged by reward r_j alone. `objective` is the deployment's win rate Σ_j w_j W_j (mean over prompts of
    `per_prompt` = Σ_j w_j W_j(x)), and `ci_low` / `ci_high` its percentile bootstrap interval, computed on the same
    resamples of prompts as every component's interval (paired: e.g. components with W_2(x) = 1 − W_1(x) and equal
    weights give the zero-width interval [0.5, 0.5]).
    """

    deployment: Deployment
    objective: float
    ci_low: float
    ci_high: float
    per_prompt: np.ndarray = field(repr=False)
    components: list[tuple[DeploymentComponent, WinRateResult]] = field(repr=False)
    confidence: float = 0.95

    @property
    def spec(self) -> str:
        return self.deployment.spec

    @property
    def label(self) -> str:
        return self.deployment.label

    @property
    def unbiased(self) -> bool:
        """Whether every component's estimator is unbiased (then so is Σ_j w_j W_j)."""
        return all(bool(r.unbiased) for _, r in self.components)

    def component(self, reward: str, procedure: ProcedureLike | None = None) -> WinRateResult:
        """The win rate of the component judged on `reward` (give `procedure` when several are)."""
        wanted = None if procedure is None else _resolve_procedure(procedure)
        found = [r for c, r in self.components if c.reward == reward and (wanted is None or c.procedure == wanted)]
        if len(found) != 1:
            raise KeyError(
                f"{'no' if not found else 'several'} component(s) of {self.spec!r} on reward {reward!r}"
                f"{'' if wanted is None else f' with procedure {wanted.spec!r}'} (components: "
                f"{[c.spec for c, _ in self.components]})."
            )
        return found[0]

    def to_dict(self, per_prompt: bool = False) -> dict:
        """`{spec, label, objective, ci_low, ci_high, unbiased, confidence, components: [{spec, procedure, reward,
        weight, n, win_rate, ci_low, ci_high, unbiased, metric_key}]}` (+ `per_prompt` lists)."""
        components = []
        for c, r in self.components:
            entry = {
                "spec": c.spec, "procedure": c.procedure.spec, "reward": c.reward, "weight": c.weight, "n": r.n,
                "win_rate": r.estimate, "ci_low": r.ci_low, "ci_high": r.ci_high, "unbiased": r.unbiased,
                "metric_key": c.metric_key,
            }
            if per_prompt:
                entry["per_prompt"] = [float(v) for v in r.per_prompt]
            components.append(entry)
        out = {
            "spec": self.spec, "label": self.label, "objective": self.objective, "ci_low": self.ci_low,
            "ci_high": self.ci_high, "unbiased": self.unbiased, "confidence": self.confidence,
            "components": components,
        }
        if per_prompt:
            out["per_prompt"] = [float(v) for v in self.per_prompt]
        return out


KL_UNIT = "nats per completion"
KL_HEADLINE = "KL per completion (k1, nats)"


@dataclass
class EvaluationResult:
    """Win rates for every procedure evaluated and the KL of the policy against the reference.

    `win_rates`: rows `{procedure, n, estimate, ci_low, ci_high, spec, unbiased}`, in the order of `procedures` (a
    bare name such as "bon" by N). `procedure` is the procedure's name ("standard", "bon", "won", "mixture", a
    registered name), `n` its samples per request, `spec` its full spec ("bon:n=4", "mixture:0.5*standard+0.5*bon:n=4")
    and `unbiased` whether its estimator is unbiased (False: the plug-in estimator of a non-polynomial user procedure,
    bias O(1/m)).

    KL is per completion, in nats (the unit of `kl_budget`): for policy samples y_{x,j} of prompt x,

        k1(x) = mean_j [log π(y_{x,j}) − log π_ref(y_{x,j})]                        (headline)
        k3(x) = mean_j [ρ − 1 − log ρ],  ρ = π_ref(y_{x,j}) / π(y_{x,j})

    with log π(y) the sum of the completion's token log-probs. `kl_k1` / `kl_k3` are the means over prompts of
    k1(x) / k3(x), and `kl_k1_ci` / `kl_k3_ci` their percentile bootstrap CIs over prompts (same resampling and seed as
    the win rates). Both are unbiased; k1 has light tails, k3 is heavy-tailed once KL ≳ 1 (a single sample with large
    log ρ can carry most of its mean), which is why k1 is the headline. All None when no log-probs were given.
    `kl_k1_per_prompt` / `kl_k3_per_prompt` hold k1(x) / k3(x).

    `deployments`: one :class:`DeploymentResult` per deployment that names rewards (each component's win rate on its
    own reward and the deployment's Σ_j w_j W_j); empty otherwise. They are not rows of `win_rates`.
    """

    win_rates: list[dict]
    kl_k1: float | None = None
    kl_k3: float | None = None
    kl_k1_ci: tuple[float, float] | None = None
    kl_k3_ci: tuple[float, float] | None = None
    num_prompts: int = 0
    num_samples_policy: int = 0
    num_samples_reference: int = 0
    confidence: float = 0.95
    num_bootstrap: int = 1000
    metadata: dict = field(default_factory=dict)
    results: list[WinRateResult] = field(default_factory=list, repr=False)
    kl_k1_per_prompt: np.ndarray | None = field(default=None, repr=False)
    kl_k3_per_prompt: np.ndarray | None = field(default=None, repr=False)
    deployments: list[DeploymentResult] = field(default_factory=list)

    @property
    def kl_per_completion(self) -> dict | None:
        """The headline KL: `{"estimator": "k1", "unit": "nats per completion", "estimate", "ci_low", "ci_high"}`."""
        if self.kl_k1 is None:
            return None
        low, high = self.kl_k1_ci if self.kl_k1_ci is not None else (math.nan, math.nan)
        return {"estimator": "k1", "unit": KL_UNIT, "estimate": self.kl_k1, "ci_low": low, "ci_high": high}

    def kl_summary(self, digits: int = 4) -> str | None:
        """`"KL per completion (k1, nats) = 1.4800 [1.3300, 1.6300]"` (the CI at `confidence`), or None without KL."""
        if self.kl_k1 is None:
            return None
        text = f"{KL_HEADLINE} = {self.kl_k1:.{digits}f}"
        low, high = self.kl_k1_ci if self.kl_k1_ci is not None else (math.nan, math.nan)
        if not math.isnan(low):
            text += f" [{low:.{digits}f}, {high:.{digits}f}]"
        return text

    def win_rate(self, procedure: ProcedureLike, n: int | None = None) -> dict:
        """The row of one procedure: `win_rate("bon", 4)`, `win_rate("standard")`, `win_rate("bon:n=4")`,
        `win_rate("mixture:0.5*standard+0.5*bon:n=4")` or an `InferenceProcedure` (a bare "bon" without `n` is N = 1)."""
        if n is None and _expands_over_n(procedure):
            n = 1
        wanted = _resolve_procedure(procedure, n)
        for row in self.win_rates:
            if _row_procedure(row) == wanted:
                return row
        raise KeyError(f"no win rate for procedure {wanted.spec!r} (have {[_row_spec(r) for r in self.win_rates]}).")

    def deployment(self, spec: "str | Deployment | None" = None) -> DeploymentResult:
        """The result of one deployment: the only one evaluated, or the one of `spec`
        (``"mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"``)."""
        if spec is None:
            if len(self.deployments) != 1:
                raise KeyError(f"{len(self.deployments)} deployments were evaluated "
                               f"({[d.spec for d in self.deployments]}): pass the spec of the one you want.")
            return self.deployments[0]
        wanted = get_deployment(spec).spec
        for d in self.deployments:
            if d.spec == wanted:
                return d
        raise KeyError(f"no deployment {wanted!r} (have {[d.spec for d in self.deployments]}).")

    def deployment_metric_key(self, deployment: DeploymentResult) -> str:
        """`deployment_win_rate` (the trainer's name for Σ_j w_j W_j) when one deployment was evaluated, else
        `deployment(<spec>)_win_rate`."""
        return "deployment_win_rate" if len(self.deployments) == 1 else f"deployment({deployment.spec})_win_rate"

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat metrics: `{prefix}<procedure.metric_key>` (`bon@4_win_rate`, `standard_win_rate`,
        `mixture(0.5*standard+0.5*bon@4)_win_rate`, ...), `..._ci_low`, `..._ci_high`, `{prefix}kl_k1` (per-completion
        KL, nats) with `{prefix}kl_k1_ci_low` / `_ci_high`, and the same for `{prefix}kl_k3`. A deployment adds each
        component's `{prefix}<component.metric_key>` (`bon@4_win_rate/helpful`) and its objective
        (:meth:`deployment_metric_key`), each with `_ci_low` / `_ci_high`."""
        out: dict[str, float] = {}
        for row in self.win_rates:
            key = prefix + _row_procedure(row).metric_key
            out[key] = row["estimate"]
            out[key + "_ci_low"] = row["ci_low"]
            out[key + "_ci_high"] = row["ci_high"]
        for d in self.deployments:
            entries = [(c.metric_key, r.estimate, r.ci_low, r.ci_high) for c, r in d.components]
            entries.append((self.deployment_metric_key(d), d.objective, d.ci_low, d.ci_high))
            for key, value, low, high in entries:
                out[prefix + key], out[prefix + key + "_ci_low"], out[prefix + key + "_ci_high"] = value, low, high
        if self.kl_k1 is not None:
            for name, value, ci in (("kl_k1", self.kl_k1, self.kl_k1_ci), ("kl_k3", self.kl_k3, self.kl_k3_ci)):
                out[prefix + name] = value
                if ci is not None:
                    out[prefix + name + "_ci_low"], out[prefix + name + "_ci_high"] = ci
        return out

    def to_dict(self, per_prompt: bool = False) -> dict:
        kl = None
        if self.kl_k1 is not None:
            kl = {
                "k1": {"estimate": self.kl_k1, "ci_low": self.kl_k1_ci[0], "ci_high": self.kl_k1_ci[1]},
                "k3": {"estimate": self.kl_k3, "ci_low": self.kl_k3_ci[0], "ci_high": self.kl_k3_ci[1]},
            }
        out = {
            "win_rates": [dict(row) for row in self.win_rates],
            "kl": kl,
            "kl_per_completion": self.kl_per_completion,
            "kl_unit": KL_UNIT,
            "num_prompts": self.num_prompts,
            "num_samples_policy": self.num_samples_policy,
            "num_samples_reference": self.num_samples_reference,
            "confidence": self.confidence,
            "num_bootstrap": self.num_bootstrap,
            "metadata": self.metadata,
        }
        if self.deployments:
            out["deployments"] = [d.to_dict(per_prompt=per_prompt) for d in self.deployments]
        if per_prompt:
            out["per_prompt"] = {r.name: [float(v) for v in r.per_prompt] for r in self.results}
            for name, values in (("kl_k1", self.kl_k1_per_prompt), ("kl_k3", self.kl_k3_per_prompt)):
                if values is not None:
                    out["per_prompt"][name] = [float(v) for v in values]
            for d in self.deployments:
                for c, r in d.components:
                    out["per_prompt"][c.metric_key] = [float(v) for v in r.per_prompt]
                out["per_prompt"][self.deployment_metric_key(d)] = [float(v) for v in d.per_prompt]
        return _jsonable(out)

    def to_json(self, path: str | Path | None = None, per_prompt: bool = False, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(per_prompt=per_prompt), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
        return text

    def to_markdown(self) -> str:
        pct = f"{round(100 * self.confidence)}%"
        lines = []
        if self.win_rates or not self.deployments:
            lines += [f"| procedure | N | win rate | {pct} CI |", "|---|---:|---:|---|"]
        biased = False
        for row in self.win_rates:
            ci = "—" if _is_nan(row["ci_low"]) else f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
            mark = "" if row.get("unbiased", True) is not False else " †"
            biased = biased or bool(mark)
            lines.append(f"| {_row_display(row)} | {row['n']} | {row['estimate']:.4f}{mark} | {ci} |")
        for d in self.deployments:
            lines += ([""] if lines else []) + [
                f"Deployment `{d.spec}`: each component judged on its own reward; the deployment's win rate is "
                "Σ_j w_j W_j (its CI from the same bootstrap resamples of prompts as the components').",
                "",
                f"| component | reward | weight | N | win rate | {pct} CI |",
                "|---|---|---:|---:|---:|---|",
            ]
            for c, r in d.components:
                mark = "" if r.unbiased else " †"
                biased = biased or bool(mark)
                lines.append(f"| {c.procedure.spec} | {c.reward} | {c.weight:g} | {r.n} | {r.estimate:.4f}{mark} | "
                             f"{_ci_text(r.ci_low, r.ci_high)} |")
            lines.append(f"| **deployment** | | 1 | {d.deployment.n} | **{d.objective:.4f}** | "
                         f"{_ci_text(d.ci_low, d.ci_high)} |")
        if biased:
            lines += ["", "† plug-in estimator (the empirical CDF through the procedure's output-CDF map f): biased, by "
                      "O(1/m) for m samples per prompt; give the procedure as a polynomial in G for an unbiased one."]
        if self.kl_k1 is not None:
            lines += ["", f"| KL(π‖π_ref) per completion (nats), estimator | value | {pct} CI |", "|---|---:|---|"]
            for name, value, ci in (("k1 (headline)", self.kl_k1, self.kl_k1_ci), ("k3", self.kl_k3, self.kl_k3_ci)):
                ci_text = "—" if ci is None or math.isnan(ci[0]) else f"[{ci[0]:.4f}, {ci[1]:.4f}]"
                lines.append(f"| {name} | {value:.4f} | {ci_text} |")
            lines += ["", f"**{self.kl_summary()}** ({pct} CI): the sum over a completion's tokens of "
                      "log π − log π_ref, the unit of `kl_budget`. k3 is heavy-tailed once KL ≳ 1; TRL's logged `kl` is "
                      "the per-token mean."]
            if self.metadata.get("kl_note"):
                lines += ["", f"Note: {self.metadata['kl_note']}"]
        lines += [
            "",
            f"{self.num_prompts} prompts, {self.num_samples_policy} policy and {self.num_samples_reference} reference "
            f"samples per prompt; {'exact all-subsets estimator' if not biased else 'exact all-subsets estimator (except †)'}, "
            "ties count ½; CI: percentile bootstrap over prompts "
            f"({self.num_bootstrap} resamples).",
        ]
        described = self._describe_models()
        if described:
            lines += ["", described]
        return "\n".join(lines)

    def _describe_models(self) -> str | None:
        """One line naming the evaluated models and the sampling settings, from `metadata`."""
        md = self.metadata
        parts = []
        if md.get("policy") is not None:
            parts.append(f"policy: `{md['policy']}`")
        if md.get("reference") is not None:
            parts.append(f"reference: `{md['reference']}`")
        if "temperature" in md:
            def fmt(v):
                return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

            parts.append(f"sampling: temperature {fmt(md['temperature'])}, top_p {fmt(md.get('top_p', 1.0))}, "
                         f"top_k {md.get('top_k', 0)}")
        if md.get("max_new_tokens") is not None:
            parts.append(f"max_new_tokens {md['max_new_tokens']}")
        return ("Evaluated " + "; ".join(parts) + ".") if parts else None

    def plot(self, path: str | Path | None = None, ax=None, title: str | None = None):
        """Win rate vs N with CI bands: one line per N-family (Best-of-N, Worst-of-N: the rows of one name at several
        N, labelled by the procedures), one marker per other procedure at its N (standard at N = 1, a mixture at its largest N,
        labelled with `procedure.label`), and for each deployment a hollow marker per component (on its reward) and a
        star for the deployment's win rate at its largest N; saves to `path` if given.

        Needs matplotlib (`pip install trl-infalign[plot]`). Returns the matplotlib figure.
        """
        from .._plotting import pyplot

        plt = pyplot("EvaluationResult.plot", headless=ax is None and path is not None)
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(5.5, 4))
        else:
            fig = ax.figure
        lines: dict[str, list[tuple[InferenceProcedure, dict]]] = {}
        points: list[tuple[InferenceProcedure, dict]] = []
        for row in self.win_rates:
            proc = _row_procedure(row)
            family = _n_family(proc)
            if family is None:
                points.append((proc, row))
            else:
                lines.setdefault(family, []).append((proc, row))
        colors = iter(plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3", "C4"]) * 4)
        for members in lines.values():
            members = sorted(members, key=lambda m: m[0].n)
            color = next(colors)
            ns = [p.n for p, _ in members]
            rows = [r for _, r in members]
            label = members[0][0].label if len(members) == 1 else _family_label(members[-1][0])
            ax.plot(ns, [r["estimate"] for r in rows], "o-", color=color, label=label)
            if not _is_nan(rows[0]["ci_low"]):
                ax.fill_between(ns, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], color=color, alpha=0.2)
        for proc, r in points:
            yerr = None if _is_nan(r["ci_low"]) else [[r["estimate"] - r["ci_low"]], [r["ci_high"] - r["estimate"]]]
            color = "black" if proc.is_standard else next(colors)
            ax.errorbar([proc.n], [r["estimate"]], yerr=yerr, fmt="s" if proc.is_standard else "D", color=color,
                        capsize=3, label=proc.label + ("" if proc.unbiased else " (plug-in)"))
        for d in self.deployments:
            # components side by side around their N (log axis), the deployment's win rate as a star at its N
            for k, (c, r) in enumerate(d.components):
                yerr = None if _is_nan(r.ci_low) else [[r.estimate - r.ci_low], [r.ci_high - r.estimate]]
                x = c.procedure.n * 2 ** (0.08 * (k - (len(d.components) - 1) / 2))
                ax.errorbar([x], [r.estimate], yerr=yerr, fmt="v", color=next(colors), mfc="none", capsize=3,
                            label=c.label)
            yerr = None if _is_nan(d.ci_low) else [[d.objective - d.ci_low], [d.ci_high - d.objective]]
            ax.errorbar([d.deployment.n], [d.objective], yerr=yerr, fmt="*", ms=11, color=next(colors), capsize=3,
                        label="deployment" if len(self.deployments) == 1 else f"deployment {d.spec}")
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        from matplotlib.ticker import NullLocator, ScalarFormatter

        ticks = sorted({r["n"] for r in self.win_rates} | {c.procedure.n for d in self.deployments for c, _ in d.components})
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("N (samples per request)")
        ax.set_ylabel("win rate vs reference")
        if title is None and self.kl_k1 is not None:
            title = self.kl_summary(digits=3)
        if title:
            ax.set_title(title)
        ax.legend(fontsize="small" if self.deployments else None)
        if own:
            fig.tight_layout()
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=120)
            if own:
                plt.close(fig)
        return fig


def _ci_text(low, high) -> str:
    return "—" if _is_nan(low) else f"[{low:.4f}, {high:.4f}]"


def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _row_procedure(row: dict) -> InferenceProcedure:
    """The procedure of a `win_rates` row: from its `spec`, or (older rows) from `procedure` and `n`."""
    if row.get("spec"):
        return get_procedure(row["spec"])
    return _resolve_procedure(row["procedure"], row["n"])


def _row_spec(row: dict) -> str:
    try:
        return _row_procedure(row).spec
    except ValueError:
        return str(row.get("spec") or row.get("procedure"))


def _row_display(row: dict) -> str:
    """A row's name in the table: the bare name when (name, N) says it all ("bon" at N = 4, "standard"), else the
    full spec (a mixture, a user procedure with other parameters)."""
    proc = _row_procedure(row)
    return row["procedure"] if _n_family(proc) is not None or proc.spec == proc.name else f"`{proc.spec}`"


def _family_label(procedure: InferenceProcedure) -> str:
    """Legend of an N-family's line: the member's label with its N written as "N" ("Best-of-32" → "Best-of-N")."""
    label, count = re.subn(rf"(?<!\d){procedure.n}(?!\d)", "N", procedure.label, count=1)
    return label if count else f"{procedure.name} (N)"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)

