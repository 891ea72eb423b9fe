r"""Deployments that serve different procedures on different rewards (InfAlign, arXiv 2412.19792; notes §9).

A deployment is a request-level mixture of components j, each a primitive inference procedure P_j (standard, bon,
won, a user map) judged — and selected — on one reward r_j:

    mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless

serves half the requests Best-of-4 on the `helpful` reward and pits the other half against a Worst-of-4 attacker on
the `harmless` reward. A component without ``@`` uses the only reward; a spec without ``@`` anywhere is an ordinary
procedure (:func:`trl_infalign.procedures.get_procedure`), trained on the one (weighted-sum) reward exactly as before.

Its win rate is the weighted sum Σ_j w_j W_j, W_j being P_j's win rate on r_j against P_j run on the reference. CTRL
calibrates each reward on its own, c_r = (#{ref_r < r} + ½ #{ref_r = r}) / K among the prompt's K reference
completions scored by r, and trains on

    Φ(c) = Σ_r W_r Φ_r(c_r),        W_r = Σ_{j : r_j = r} w_j,

with a per-reward transform Φ_r, e.g. ``bon:t=3@helpful+won:t=5@harmless``. The KL-regularised optimum is
π_ref·exp(Φ/β)/Z with β in the units of this unnormalised Φ. Unlike one reward, the best Φ_r depend on the joint law
of (c_1, c_2, …) under π_ref, which only the reference rewards themselves show: `trl_infalign.diagnose` fits them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .procedures import InferenceProcedure, Mixture, ProcedureError, get_procedure
from .transforms import Transform, TransformError, get_transform

__all__ = [
    "Deployment",
    "DeploymentComponent",
    "RewardTransforms",
    "get_deployment",
    "parse_reward_transforms",
    "is_multi_reward_spec",
]

#: A reward's name in specs: what TRL derives from a model path's last segment or a callable's ``__name__``.
REWARD_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_TERM = re.compile(r"\s*(.+?)@([^+@]*?)\s*(?:\+|$)")


def is_multi_reward_spec(spec) -> bool:
    """Whether a procedure or transform spec names rewards (``...@name``)."""
    return isinstance(spec, str) and "@" in spec


def _check_reward_name(name: str, spec: str) -> str:
    name = name.strip()
    if not REWARD_NAME.fullmatch(name):
        raise ProcedureError(
            f"Malformed spec {spec!r}: {name!r} is not a reward name (after '@' comes the reward function's name as "
            "TRL derives it: a callable's __name__ or a model path's last segment; letters, digits, '_', '.', '-')."
        )
    return name


def _split_terms(spec: str, body: str, kind: str) -> list[tuple[str, str]]:
    """``"a@x+b@y"`` → [("a", "x"), ("b", "y")]: splits at each ``@name`` followed by ``+`` or the end, so a term's
    own spec may contain ``+`` (a transform's inner mixture, ``optimal:procedure=mixture:…``)."""
    terms, position = [], 0
    while position < len(body):
        match = _TERM.match(body, position)
        if match is None or not match.group(2).strip():
            raise ProcedureError(
                f"Malformed {kind} spec {spec!r}: every term must end with '@reward' (bad part "
                f"{body[position:]!r}); e.g. 'mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless'."
            )
        terms.append((match.group(1), _check_reward_name(match.group(2), spec)))
        position = match.end()
    return terms


@dataclass(frozen=True)
class DeploymentComponent:
    """One component of a deployment: with probability `weight` a request is served by `procedure` on `reward`
    (None: the only reward)."""

    weight: float
    procedure: InferenceProcedure
    reward: str | None

    @property
    def spec(self) -> str:
        at = f"@{self.reward}" if self.reward is not None else ""
        return f"{self.procedure.spec}{at}"

    @property
    def metric_key(self) -> str:
        """``bon@4_win_rate/helpful``: the component's win-rate key in metric dicts."""
        return self.procedure.metric_key + (f"/{self.reward}" if self.reward is not None else "")

    @property
    def label(self) -> str:
        return self.procedure.label + (f" on {self.reward}" if self.reward is not None else "")


class Deployment:
    """A request-level mixture of (procedure, reward) components (module docstring). Build one with
    :func:`get_deployment`."""

    def __init__(self, components: Sequence[DeploymentComponent]):
        parts: dict[tuple[str, str | None], list] = {}
        for c in components:
            for inner_weight, primitive in c.procedure.components():
                entry = parts.setdefault((primitive.spec, c.reward), [0.0, primitive])
                entry[0] += c.weight * inner_weight
        if not parts:
            raise ProcedureError("A deployment needs at least one component, e.g. 'bon:n=4@helpful'.")
        # One mixture of every component validates the weights (finite, > 0, summing to 1) with the usual message.
        Mixture([(w, p) for w, p in parts.values()])
        self._components = tuple(DeploymentComponent(float(w), p, r) for (_, r), (w, p) in parts.items())

    # -- structure ----------------------------------------------------------------------------------------------------
    @property
    def components(self) -> tuple[DeploymentComponent, ...]:
        return self._components

    @property
    def rewards(self) -> tuple[str | None, ...]:
        """The rewards the deployment judges on, in order of first appearance ((None,) for an unnamed one)."""
        return tuple(dict.fromkeys(c.reward for c in self._components))

    @property
    def is_multi_reward(self) -> bool:
        """True when components name their rewards (one or several): each named reward is calibrated on its own."""
        return any(c.reward is not None for c in self._components)

    def reward_weight(self, reward: str | None) -> float:
        """W_r: the summed weight of the components judged on `reward`."""
        self._check_reward(reward)
        return float(sum(c.weight for c in self._components if c.reward == reward))

    @property
    def reward_weights(self) -> dict[str | None, float]:
        return {r: self.reward_weight(r) for r in self.rewards}

    def procedure_for(self, reward: str | None) -> InferenceProcedure:
        """The procedure served on `reward`: its components' mixture, weights renormalised by W_r."""
        self._check_reward(reward)
        mine = [(c.weight, c.procedure) for c in self._components if c.reward == reward]
        total = sum(w for w, _ in mine)
        return mine[0][1] if len(mine) == 1 else Mixture([(w / total, p) for w, p in mine])

    @property
    def procedure(self) -> InferenceProcedure:
        """Every component's procedure as one reward-free mixture (for N, the exp families and the old code paths
        that see one procedure); the deployment itself for a single unnamed reward."""
        parts = [(c.weight, c.procedure) for c in self._components]
        return parts[0][1] if len(parts) == 1 else Mixture(parts)

    @property
    def n(self) -> int:
        return max(c.procedure.n for c in self._components)

    def _check_reward(self, reward: str | None) -> None:
        if reward not in self.rewards:
            raise ProcedureError(
                f"Deployment {self.spec!r} judges no component on reward {reward!r}; its rewards are "
                f"{[r for r in self.rewards]}."
            )

    def bind(self, reward_names: Sequence[str]) -> "Deployment":
        """Check the named rewards against the run's reward functions' names; an unnamed single-reward deployment
        is returned as is (it trains on the functions' weighted sum)."""
        names = list(reward_names)
        if not self.is_multi_reward:
            return self
        if None in self.rewards:  # a component without '@' uses the only reward
            unnamed = [c.procedure.spec for c in self._components if c.reward is None]
            if len(names) != 1:
                raise ProcedureError(
                    f"Deployment {self.spec!r}: component(s) {unnamed} name no reward, and there are "
                    f"{len(names)} reward functions ({names}): add '@name' to each."
                )
            return Deployment([DeploymentComponent(c.weight, c.procedure, c.reward or names[0])
                               for c in self._components]).bind(names)
        unknown = [r for r in self.rewards if r not in names]
        if unknown:
            raise ProcedureError(
                f"Deployment {self.spec!r} names reward(s) {unknown}, but the reward functions are named "
                f"{names}. Use those names after '@' (a callable's __name__, a model path's last segment), or rename "
                "a callable (e.g. functools.wraps / setting __name__)."
            )
        unused = [n for n in names if n not in self.rewards]
        if unused:
            raise ProcedureError(
                f"Reward function(s) {unused} are not named by the deployment {self.spec!r}: each reward function "
                "must serve a component ('...@name'). Add a component for it, or drop it from reward_funcs."
            )
        return self

    # -- names ----------------------------------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """Canonical, round-trippable spec: ``get_deployment(d.spec) == d``."""
        if not self.is_multi_reward:
            return self.procedure.spec
        if len(self._components) == 1:
            return self._components[0].spec
        return "mixture:" + "+".join(f"{c.weight:.6g}*{c.spec}" for c in self._components)

    @property
    def label(self) -> str:
        if len(self._components) == 1:
            return self._components[0].label
        return " + ".join(f"{c.weight:.6g}·{c.label}" for c in self._components)

    @property
    def description(self) -> str:
        if not self.is_multi_reward:
            return self.procedure.description
        return "a deployment serving " + "; ".join(
            f"{100 * c.weight:.3g}% of requests by {c.procedure.description}, judged on the {c.reward} reward"
            for c in self._components)

    def __repr__(self) -> str:
        return f"Deployment({self.spec!r})"

    def __str__(self) -> str:
        return self.spec

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Deployment) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash(("Deployment", self.spec))

    # -- estimates ------------------------------------------------------------------------------------------------------
    def pooled_win_rates(self, calibrated: Mapping[str | None, torch.Tensor]) -> dict[str, float]:
        """Each component's running win rate from the batch's calibrated rewards of its reward (pooled over prompts,
        :meth:`InferenceProcedure.pooled_calibrated_win_rate`), keyed by :attr:`DeploymentComponent.metric_key`,
        plus ``deployment_win_rate`` = Σ_j w_j W_j."""
        rates = {c.metric_key: c.procedure.pooled_calibrated_win_rate(calibrated[c.reward]) for c in self._components}
        rates["deployment_win_rate"] = float(sum(c.weight * rates[c.metric_key] for c in self._components))
        return rates


def get_deployment(spec: "str | Deployment | InferenceProcedure", n: int | None = None) -> Deployment:
    """The deployment of a spec. Without ``@`` it is the procedure of :func:`get_procedure` (`n` as there) on the
    one reward; with ``@``, ``"bon:n=4@helpful"`` or ``"mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"`` (a bare
    ``bon@helpful`` takes `n`)."""
    if isinstance(spec, Deployment):
        return spec
    if not is_multi_reward_spec(spec):
        return Deployment([DeploymentComponent(1.0, get_procedure(spec, n), None)])
    text = spec.strip()
    name, colon, rest = text.partition(":")
    mixture = name.strip() == "mixture" and colon
    components = []
    for term in (rest if mixture else text).split("+"):
        inner, at, reward = term.rpartition("@")
        inner, reward = (inner, _check_reward_name(reward, text)) if at else (term, None)
        if mixture:
            weight, star, inner = inner.partition("*")
            try:
                weight = float(weight) if star else math.nan
            except ValueError:
                weight = math.nan
            if not star or not math.isfinite(weight):
                raise ProcedureError(
                    f"Malformed deployment spec {spec!r}: each term must look like 'weight*procedure@reward' (bad "
                    f"term {inner!r}); e.g. 'mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless'."
                )
        else:
            weight = 1.0
        inner = inner.strip()
        if inner.startswith("mixture"):
            raise ProcedureError(f"Malformed deployment spec {spec!r}: a term cannot be a mixture spec.")
        bare = ":" not in inner
        components.append(DeploymentComponent(weight, get_procedure(inner, n if bare else None), reward))
    return Deployment(components)


def parse_reward_transforms(spec: str) -> dict[str | None, str]:
    """``"bon:t=3@helpful+won:t=5@harmless"`` → {"helpful": "bon:t=3", "harmless": "won:t=5"}; a spec without
    ``@`` → {None: spec} (the same transform for the one reward)."""
    if not is_multi_reward_spec(spec):
        return {None: spec}
    found: dict[str | None, str] = {}
    for inner, reward in _split_terms(spec, spec.strip(), "transform"):
        if reward in found:
            raise TransformError(f"Transform spec {spec!r} gives reward {reward!r} twice.")
        found[reward] = inner.strip()
    return found


class RewardTransforms:
    r"""Φ(c) = Σ_r W_r Φ_r(c_r): one transform per reward, weighted by the deployment's W_r (module docstring).

    `transforms` maps reward name (None: the only reward) to a transform or spec; `weights` maps them to W_r."""

    def __init__(self, transforms: Mapping[str | None, "str | Transform"], weights: Mapping[str | None, float]):
        missing = [r for r in weights if r not in transforms]
        extra = [r for r in transforms if r not in weights]
        if missing or extra:
            raise TransformError(
                (f"No transform for reward(s) {missing}" if missing else f"Transforms for unknown reward(s) {extra}")
                + f": give one per reward of the deployment ({list(weights)}), e.g. 'bon:t=3@helpful+won:t=5@harmless'."
            )
        self.transforms = {r: get_transform(transforms[r]) for r in weights}
        self.weights = {r: float(w) for r, w in weights.items()}
        raw = [r for r, t in self.transforms.items() if t.requires_raw_rewards]
        if raw and len(self.transforms) > 1:
            raise TransformError(
                f"Transform(s) {[self.transforms[r].spec for r in raw]} shape raw rewards; with several rewards each "
                "reward's transform must be a function of its calibrated reward (identity, bon:t=…, won:t=…, log, ...)."
            )

    @classmethod
    def from_spec(cls, spec: str, deployment: Deployment) -> "RewardTransforms":
        """Per-reward transforms from a spec for `deployment`; a spec without ``@`` applies to every reward."""
        parsed = parse_reward_transforms(spec)
        if None in parsed:
            parsed = {r: parsed[None] for r in deployment.rewards}
        return cls(parsed, deployment.reward_weights)

    @property
    def spec(self) -> str:
        if list(self.transforms) == [None]:
            return self.transforms[None].spec
        return "+".join(f"{t.spec}@{r}" for r, t in self.transforms.items())

    @property
    def t(self) -> dict[str | None, float | None]:
        return {r: tr.params.get("t") for r, tr in self.transforms.items()}

    #: A sum of functions of calibrated rewards (raw-reward shapes are refused with several rewards).
    requires_raw_rewards = False
    name = "per_reward"

    @property
    def params(self) -> dict:
        """``{"t": {reward: t}}``, as a transform's params read in model cards."""
        return {"t": self.t}

    def bounds(self) -> tuple[float, float]:
        """(min, max) of Φ over c ∈ [0, 1]^R: Σ_r W_r min Φ_r and Σ_r W_r max Φ_r (each c_r ranges on its own)."""
        grid = np.linspace(0.0, 1.0, 2049)
        low = high = 0.0
        for r, t in self.transforms.items():
            values = t.phi(grid)
            low += self.weights[r] * float(np.min(values))
            high += self.weights[r] * float(np.max(values))
        return low, high

    def phi(self, calibrated: Mapping[str | None, np.ndarray]) -> np.ndarray:
        """Φ on numpy calibrated rewards, one array per reward."""
        return sum(self.weights[r] * t.phi(np.asarray(calibrated[r], dtype=np.float64)) for r, t in self.transforms.items())

    def __call__(self, calibrated: Mapping[str | None, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[r] * t(calibrated[r]) for r, t in self.transforms.items())

    def __repr__(self) -> str:
        return f"RewardTransforms({self.spec!r}, weights={self.weights})"
