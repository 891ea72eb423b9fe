r"""Inference-time procedures: how the aligned model is deployed (InfAlign, arXiv 2412.19792, §3).

An inference procedure turns samples of a policy into the response a user sees.  In calibrated space (c ∈ [0, 1] is
the reference-CDF value of a response, uniform under π_ref) a *primitive* procedure is described by its output-CDF
map f: if one sample of the policy has calibrated CDF G, the procedure's output has CDF f(G):

    standard            f(G) = G                       one plain sample
    bon:n=N             f(G) = G^N                     Best-of-N (keep the highest-reward of N samples)
    won:n=N             f(G) = 1 − (1 − G)^N           Worst-of-N (e.g. a jailbreaker keeping the worst of N)

Its win rate against the reference run through the same procedure (whose output has CDF f(c)) is

    W(g) = ∫₀¹ f(c) d f(G(c)) = 1 − ∫₀¹ f(G(s)) f'(s) ds,

and the KL-regularised optimum max_g W(g) − β·KL(g) satisfies the first-order condition g ∝ exp(Φ*(c)/β) with

    Φ*(c) = δW/δg(c) + const = ∫₀^c f'(G(s)) f'(s) ds          (the slope of Φ* is `first_variation`).

A request-level **mixture** serves each request with procedure j with probability w_j (Σ w_j = 1) and compares the
policy's output with the reference's under the same procedure: W = Σ_j w_j W_j and Φ*' = Σ_j w_j f_j'(G) f_j'(c).
Spec: ``"mixture:0.7*standard+0.2*bon:n=8+0.1*bon:n=32"``.

A user-defined procedure is registered by its output-CDF map (:func:`register_procedure`)::

    register_procedure("bon_of_bon", lambda G, n=2, m=2: G ** (n * m),     # spec "bon_of_bon:n=3,m=4"
                       samples=lambda n=2, m=2: n * m)                      # samples one request draws

Sample estimators (:meth:`InferenceProcedure.per_prompt_win_rates`): bon, won, standard and procedures given as a
polynomial in G are estimated without bias by the exact all-subsets U-statistic (a polynomial f = Σ_k a_k G^k is a
signed mixture of max-of-k); any other f uses the plug-in estimator (the empirical CDF through f), whose bias is
O(1/m) for m samples per prompt.  Mixtures sum their components' estimators.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ._registry import registrar
from ._quadrature import _GL_NODES, _GL_WEIGHTS, _mass_inside, _order_statistic_tail

__all__ = [
    "InferenceProcedure",
    "Standard",
    "BestOfN",
    "WorstOfN",
    "Mixture",
    "CDFMapProcedure",
    "ProcedureError",
    "register_procedure",
    "get_procedure",
    "available_procedures",
    "PROCEDURES",
]

#: The built-in primitive procedure names (``mixture`` combines them).
PROCEDURES = ("standard", "bon", "won")


class ProcedureError(ValueError):
    """Unknown procedure, malformed spec or invalid procedure parameter."""


# ---------------------------------------------------------------------------------------------------------------------
# helpers
def _log_comb(n: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """log C(n, r) elementwise (float64), −inf where r < 0 or r > n."""
    n, r = torch.broadcast_tensors(n.double(), r.double())
    valid = (r >= 0) & (r <= n)
    n_ = torch.where(valid, n, torch.zeros_like(n))
    r_ = torch.where(valid, r, torch.zeros_like(r))
    out = torch.lgamma(n_ + 1) - torch.lgamma(r_ + 1) - torch.lgamma(n_ - r_ + 1)
    return torch.where(valid, out, torch.full_like(out, -math.inf))


def _subset_extreme_weights(num_valid: torch.Tensor, width: int, n: int, largest: bool) -> torch.Tensor:
    """P(the max (`largest`) / min of a uniformly random n-subset of a row's k valid sorted values is the j-th
    smallest): C(j−1, n−1)/C(k, n) resp. C(k−j, n−1)/C(k, n); (P, width) float64, zero for j > k."""
    k = num_valid.double().unsqueeze(1)
    j = torch.arange(1, width + 1, dtype=torch.float64).unsqueeze(0)
    top = (j - 1) if largest else (k - j)
    logw = _log_comb(top, torch.tensor(float(n - 1))) - _log_comb(k, torch.tensor(float(n)))
    logw = torch.where(j <= k, logw, torch.full_like(logw, -math.inf))
    w = torch.exp(logw - logw.max(dim=1, keepdim=True).values)
    return w / w.sum(dim=1, keepdim=True)


def _log_pair(x: np.ndarray, one_minus_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log x, log(1 − x)) accurate at both ends, from x and 1 − x given separately."""
    x, omx = np.asarray(x, dtype=np.float64), np.asarray(one_minus_x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_x = np.where(x > 0.5, np.log1p(-omx), np.log(x))
        log_omx = np.where(x > 0.5, np.log(omx), np.log1p(-x))
    return log_x, log_omx


def _format_number(value: float) -> str:
    return f"{float(value):.6g}"


def _parse_value(text: str) -> Any:
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_params(spec: str, rest: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in rest.replace(";", ",").split(","):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key or not value.strip():
            raise ProcedureError(
                f"Malformed procedure spec {spec!r}: parameters must look like 'name:k=v,k2=v2' (bad item {item!r})."
            )
        if key in params:
            raise ProcedureError(f"Malformed procedure spec {spec!r}: parameter {key!r} given twice.")
        params[key] = _parse_value(value)
    return params


def _check_n(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) or not math.isfinite(value) or (
        int(value) != value or int(value) < 1
    ):
        raise ProcedureError(f"{where}: n must be an integer >= 1, got {value!r}.")
    return int(value)


# ---------------------------------------------------------------------------------------------------------------------
# base class
class InferenceProcedure:
    r"""A deployment: how samples of the policy become the response a user sees (module docstring has the math).

    Subclasses implement either :meth:`output_cdf` and :meth:`output_cdf_derivative` (a primitive: one map f) or
    :meth:`components` (a mixture of primitives).  Everything else — the calibrated-space win rate, the slope of the
    optimal transform, the sample estimators and the names used in logs and model cards — follows from those.
    """

    name: str = "procedure"

    # -- identity ---------------------------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Any]:
        return {}

    @property
    def spec(self) -> str:
        """Canonical, round-trippable spec: ``get_procedure(p.spec) == p``."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())

    @property
    def n(self) -> int:
        """Samples drawn per request (the largest over the components)."""
        return 1

    @property
    def short_name(self) -> str | None:
        """The registry name when (name, n) alone rebuilds the procedure (``get_procedure(name, n)``: standard,
        bon, won), else None — the old (inference_procedure, inference_n) form used in configs and JSON."""
        return self.name if self.spec in (self.name, f"{self.name}:n={self.n}") else None

    @property
    def label(self) -> str:
        """Human-readable name, e.g. "Best-of-4"."""
        return self.spec

    @property
    def description(self) -> str:
        """One sentence for model cards."""
        return f"the inference procedure {self.spec}"

    @property
    def quick_start(self) -> tuple[int, str] | None:
        """(num_return_sequences, comment) for a model card's usage snippet when serving needs several samples."""
        return None

    @property
    def metric_key(self) -> str:
        """Key of its win rate in flat metric dicts: ``standard_win_rate``, ``bon@4_win_rate``, ..."""
        return f"{self.spec.replace(':', '@').replace(',', ';')}_win_rate"

    @property
    def is_standard(self) -> bool:
        """True when every request's output is distributed as one plain sample (f(G) = G for every component):
        then Φ*(c) = c, the identity, is exactly optimal.  Decided by the map, not by `n`."""
        components = self.components()
        if len(components) == 1 and components[0][1] is self:
            return self._serves_one_sample()
        return all(p.is_standard for _, p in components)

    def _serves_one_sample(self) -> bool:
        """A primitive's f is the identity (checked on a grid; `n == 1` when it has no `output_cdf`)."""
        grid = np.linspace(0.0, 1.0, 1025)
        try:
            values = np.asarray(self.output_cdf(grid, 1.0 - grid), dtype=np.float64)
        except NotImplementedError:
            return self.n == 1
        return values.shape == grid.shape and bool(np.max(np.abs(values - grid)) <= 1e-12)

    @property
    def samples_known(self) -> bool:
        """False when the number of samples drawn per request is unknown (a user map registered without
        `samples=` that is neither the identity nor given as a polynomial); :attr:`n` is then 1 only nominally."""
        return all(p.samples_known for _, p in self.components() if p is not self)

    @property
    def families(self) -> tuple[str, ...]:
        """Exp transform families ("bon": e^{tc}, "won": −e^{−tc}) worth searching for this procedure's best t."""
        return ("bon", "won")

    #: True when :meth:`per_prompt_win_rates` is an unbiased estimator (else the plug-in, bias O(1/m)).
    unbiased: bool = False

    def components(self) -> tuple[tuple[float, "InferenceProcedure"], ...]:
        """(weight, primitive procedure) pairs, weights summing to 1; a primitive is its own single component."""
        return ((1.0, self),)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __str__(self) -> str:
        return self.spec

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InferenceProcedure) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash(("InferenceProcedure", self.spec))

    # -- primitive interface ----------------------------------------------------------------------------------------
    def output_cdf(self, G: np.ndarray, one_minus_G: np.ndarray | None = None) -> np.ndarray:
        """f(G): CDF of the procedure's output when one sample has CDF G (primitives only)."""
        raise NotImplementedError(f"{type(self).__name__} is a mixture: use components().")

    def output_cdf_derivative(self, G: np.ndarray, one_minus_G: np.ndarray | None = None) -> np.ndarray:
        """f'(G) (primitives only).  `one_minus_G`, when given, is 1 − G to full precision near G = 1."""
        raise NotImplementedError(f"{type(self).__name__} is a mixture: use components().")

    def rank_weights(self, num_valid: torch.Tensor, width: int) -> torch.Tensor:
        """Probability that the procedure's output is the j-th smallest of a row's k valid samples, (P, width).

        Default: the plug-in f(j/k) − f((j−1)/k) (the empirical CDF through f; bias O(1/k))."""
        k = num_valid.double().unsqueeze(1)
        j = torch.arange(1, width + 1, dtype=torch.float64).unsqueeze(0)
        hi = torch.clamp(j / k, max=1.0).numpy()
        lo = torch.clamp((j - 1) / k, max=1.0).numpy()
        w = torch.from_numpy(self.output_cdf(hi, 1.0 - hi) - self.output_cdf(lo, 1.0 - lo))
        return torch.where(j <= k, w.clamp(min=0.0), torch.zeros_like(w))

    @property
    def min_samples(self) -> int:
        """Samples per prompt and side the sample estimators need."""
        return self.n

    # -- calibrated-space theory ------------------------------------------------------------------------------------
    def calibrated_win_rate(self, policy) -> float:
        r"""W(g) for a calibrated-space policy (anything with `grid`, `log_density` and `standard_win_rate()`, e.g.
        :class:`trl_infalign.theory.CalibratedPolicy`): 1 − ∫₀¹ f(G(s)) f'(s) ds."""
        grid, ell = np.asarray(policy.grid, dtype=np.float64), np.asarray(policy.log_density, dtype=np.float64)

        def integrand(s, G, one_minus_G):
            return self.output_cdf(G, one_minus_G) * self.output_cdf_derivative(s, 1.0 - s)

        return float(np.clip(1.0 - _integrate_against_cdf(grid, ell, integrand), 0.0, 1.0))

    def first_variation(self, c: np.ndarray, one_minus_c: np.ndarray, G: np.ndarray,
                        one_minus_G: np.ndarray) -> np.ndarray:
        r"""Slope of the optimal transform, dΦ*/dc = Σ_j w_j f_j'(G(c)) f_j'(c) ≥ 0 (the first-order condition of
        max_g W(g) − β KL(g); arXiv 2412.19792 §3).  Arguments come in pairs (x, 1 − x) for precision at the ends."""
        total = 0.0
        for w, p in self.components():
            total = total + w * p.output_cdf_derivative(G, one_minus_G) * p.output_cdf_derivative(c, one_minus_c)
        return np.asarray(total, dtype=np.float64)

    def first_variation_at(self, c: float, one_minus_c: float, G: float, one_minus_G: float) -> float:
        """:meth:`first_variation` at one point, as a float (the optimal solver's ODE calls it at every step)."""
        return sum(w * p.output_cdf_derivative_at(G, one_minus_G) * p.output_cdf_derivative_at(c, one_minus_c)
                   for w, p in self.components())

    def output_cdf_derivative_at(self, G: float, one_minus_G: float) -> float:
        """f'(G) at one point, as a float."""
        return float(self.output_cdf_derivative(np.array([G]), np.array([one_minus_G]))[0])

    def max_slope(self) -> float:
        """An upper bound on ∫₀¹ dΦ*/dc (the range of Φ*): Σ_j w_j sup f_j' (used to bracket the optimum)."""
        grid = np.linspace(0.0, 1.0, 2049)
        return float(sum(w * np.max(p.output_cdf_derivative(grid, 1.0 - grid)) for w, p in self.components()))

    # -- sample estimators ------------------------------------------------------------------------------------------
    def per_prompt_win_rates(self, policy_rewards: torch.Tensor, reference_rewards: torch.Tensor) -> torch.Tensor:
        """Win probability of each prompt (P,), float64: P(X_π > X_ref) + ½ P(X_π = X_ref) with X each side's output.

        Inputs are (P, m) float64 tensors, NaN = missing.  Raises ValueError when a row has fewer valid samples
        than the procedure needs (:attr:`min_samples`)."""
        sides = []
        for name, t in (("policy_rewards", policy_rewards), ("reference_rewards", reference_rewards)):
            valid = ~torch.isnan(t)
            k = valid.sum(dim=1)
            need = self.min_samples
            if (k < need).any():
                row = int((k < need).nonzero()[0])
                raise ValueError(
                    f"{name} has only {int(k[row])} valid samples for prompt {row} (and {int((k < need).sum())} "
                    f"prompts in all with fewer than {need}), but {self.label} needs at least {need} samples per "
                    "prompt: draw more samples (m >= N) or lower N."
                )
            # NaN (missing) sorts last as +inf with weight 0; finite values never tie with it.
            values = torch.sort(torch.where(valid, t, torch.full_like(t, math.inf)), dim=1).values
            sides.append((values, self.rank_weights(k, t.shape[1])))
        (av, aw), (bv, bw) = sides
        cum = torch.cat([torch.zeros(bw.shape[0], 1, dtype=torch.float64), torch.cumsum(bw, dim=1)], dim=1)
        below = torch.searchsorted(bv.contiguous(), av.contiguous(), side="left")
        at_or_below = torch.searchsorted(bv.contiguous(), av.contiguous(), side="right")
        p_less, p_leq = cum.gather(1, below), cum.gather(1, at_or_below)
        win = p_less + 0.5 * (p_leq - p_less)
        return (aw * torch.where(torch.isinf(av), torch.zeros_like(win), win)).sum(dim=1).clamp(0.0, 1.0)

    def pooled_calibrated_win_rate(self, calibrated: torch.Tensor) -> float:
        """Win rate from calibrated rewards pooled over prompts (the trainer's running metric): the reference's
        output has the exact CDF f(c), the policy's output is weighted by :meth:`rank_weights`.  NaN if too few."""
        c = calibrated[torch.isfinite(calibrated)].double().sort().values.cpu()
        if c.numel() < self.min_samples:
            return math.nan
        total = 0.0
        for w, p in self.components():
            weights = p.rank_weights(torch.tensor([c.numel()]), c.numel())[0]
            cn = c.numpy()
            total += w * float((weights * torch.from_numpy(p.output_cdf(cn, 1.0 - cn))).sum())
        return total


def _integrate_against_cdf(grid: np.ndarray, ell: np.ndarray, integrand: Callable, pieces: int = 8) -> float:
    """∫₀¹ h(s, G(s), 1 − G(s)) ds for the piecewise-exponential density exp(ell) on `grid` (G exact inside each
    segment): `pieces` sub-pieces per segment, 4 Gauss-Legendre nodes each."""
    h, a = np.diff(grid), ell[:-1]
    with np.errstate(invalid="ignore"):
        d = np.diff(ell)
    mass = _mass_inside(h, a, d, np.ones_like(h))
    total = float(mass.sum())
    above = (total - np.cumsum(mass)) / total  # mass above each segment's right end
    frac = (np.arange(pieces)[:, None] + 0.5 * (_GL_NODES[None, :] + 1.0)) / pieces  # (pieces, 4) in (0, 1)
    s = frac.reshape(-1)
    seg = np.repeat(np.arange(h.size), s.size)
    ss = np.tile(s, h.size)
    inside = _mass_inside(h[seg], a[seg], d[seg], ss) / total
    seg_mass = mass[seg] / total
    one_minus_G = np.clip(above[seg] + (seg_mass - inside), 0.0, 1.0)
    G = np.clip(1.0 - one_minus_G, 0.0, 1.0)
    x = grid[seg] + h[seg] * ss
    weights = np.tile(np.repeat(0.5 * _GL_WEIGHTS[None, :] / pieces, pieces, axis=0).reshape(-1), h.size) * h[seg]
    return float(np.sum(weights * integrand(x, G, one_minus_G)))


# ---------------------------------------------------------------------------------------------------------------------
# built-ins
class Standard(InferenceProcedure):
    """One plain sample: f(G) = G.  W = ∫ g(c) c dc, the standard win rate; Φ*(c) = c (identity)."""

    name = "standard"
    unbiased = True
    families = ("bon",)

    @property
    def label(self) -> str:
        return "standard"

    @property
    def description(self) -> str:
        return "plain sampling (one sample; the standard win rate against the reference)"

    @property
    def metric_key(self) -> str:
        return "standard_win_rate"

    def output_cdf(self, G, one_minus_G=None):
        return np.asarray(G, dtype=np.float64)

    def output_cdf_derivative(self, G, one_minus_G=None):
        return np.ones_like(np.asarray(G, dtype=np.float64))

    def output_cdf_derivative_at(self, G, one_minus_G):
        return 1.0

    def rank_weights(self, num_valid, width):
        return _subset_extreme_weights(num_valid, width, 1, largest=True)

    def _serves_one_sample(self) -> bool:
        return True

    def calibrated_win_rate(self, policy) -> float:
        return float(policy.standard_win_rate())


class _OrderStatistic(InferenceProcedure):
    """Shared by Best-of-N and Worst-of-N: the max (min) of N samples."""

    largest: bool = True
    unbiased = True

    def __init__(self, n: int = 4):
        self._n = _check_n(n, f"procedure {self.name!r}")

    @property
    def params(self) -> dict[str, Any]:
        return {"n": self._n}

    @property
    def n(self) -> int:
        return self._n

    @property
    def families(self) -> tuple[str, ...]:
        return (self.name,)

    def _serves_one_sample(self) -> bool:
        return self._n == 1

    @property
    def metric_key(self) -> str:
        return f"{self.name}@{self._n}_win_rate"

    def rank_weights(self, num_valid, width):
        return _subset_extreme_weights(num_valid, width, self._n, largest=self.largest)

    def _powers(self, G, one_minus_G):
        """(log of the base raised to N in f, log of the other one) — log G and log(1 − G) for BoN, mirrored for WoN."""
        G = np.asarray(G, dtype=np.float64)
        omg = 1.0 - G if one_minus_G is None else np.asarray(one_minus_G, dtype=np.float64)
        log_g, log_omg = _log_pair(G, omg)
        return (log_g, log_omg) if self.largest else (log_omg, log_g)

    def output_cdf_derivative(self, G, one_minus_G=None):
        base, _ = self._powers(G, one_minus_G)
        if self._n == 1:
            return np.ones_like(base)
        with np.errstate(under="ignore"):
            return self._n * np.exp((self._n - 1) * base)

    def output_cdf_derivative_at(self, G, one_minus_G):
        if self._n == 1:
            return 1.0
        x, omx = (G, one_minus_G) if self.largest else (one_minus_G, G)
        if x <= 0.0:
            return 0.0
        log_x = math.log1p(-omx) if x > 0.5 else math.log(x)
        return self._n * math.exp((self._n - 1) * log_x)

    def calibrated_win_rate(self, policy) -> float:
        if self._n == 1:
            return float(policy.standard_win_rate())
        grid, ell = np.asarray(policy.grid), np.asarray(policy.log_density)
        if self.largest:  # W_bon = 1 − ∫ N c^{N−1} G^N dc, integrated in u = 1 − c from the winning end
            return float(np.clip(1.0 - _order_statistic_tail(1.0 - grid[::-1], ell[::-1], self._n), 0.0, 1.0))
        return float(np.clip(_order_statistic_tail(grid, ell, self._n), 0.0, 1.0))  # W_won = ∫ N(1−c)^{N−1}(1−G)^N


class BestOfN(_OrderStatistic):
    """Best-of-N: keep the highest-reward of N samples, f(G) = G^N (Beirami et al. 2401.01879)."""

    name = "bon"
    largest = True

    @property
    def label(self) -> str:
        return f"Best-of-{self._n}"

    @property
    def description(self) -> str:
        return f"Best-of-{self._n} sampling (keep the highest-reward of {self._n} samples)"

    @property
    def quick_start(self):
        if self._n == 1:
            return None
        return self._n, (f"Aligned for Best-of-{self._n}: sample {self._n} completions and keep the one your reward "
                         "model prefers.")

    def output_cdf(self, G, one_minus_G=None):
        base, _ = self._powers(G, one_minus_G)
        with np.errstate(under="ignore"):
            return np.exp(self._n * base)


class WorstOfN(_OrderStatistic):
    """Worst-of-N: the lowest-reward of N samples (a jailbreaker keeping the worst), f(G) = 1 − (1 − G)^N."""

    name = "won"
    largest = False

    @property
    def label(self) -> str:
        return f"Worst-of-{self._n}"

    @property
    def description(self) -> str:
        return f"Worst-of-{self._n} robustness (e.g. a jailbreak attacker keeping the worst of {self._n} samples)"

    def output_cdf(self, G, one_minus_G=None):
        base, _ = self._powers(G, one_minus_G)
        with np.errstate(under="ignore"):
            return -np.expm1(self._n * base)


def _check_grid() -> np.ndarray:
    """Where a user map is checked: 65 537 equispaced points of [0, 1] plus 1e-k and 1 − 1e-k (k = 3..15), where
    Best-of-N / Worst-of-N at large N live."""
    ends = 10.0 ** -np.arange(3, 16, dtype=np.float64)
    return np.unique(np.concatenate([np.linspace(0.0, 1.0, 65537), ends, 1.0 - ends]))


_CHECK_GRID = _check_grid()


def _check_samples(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) or not math.isfinite(value) or (
        int(value) != value or int(value) < 1
    ):
        raise ProcedureError(
            f"{where}: samples (the number of samples one request draws) must be an integer >= 1, got {value!r}."
        )
    return int(value)


class CDFMapProcedure(InferenceProcedure):
    r"""A user-defined primitive procedure given by its output-CDF map f(G) (:func:`register_procedure`).

    f must be non-decreasing on [0, 1] with f(0) = 0 and f(1) = 1 (checked on 65 537 points and near both ends;
    the error says where it fails).  `derivative` gives f' (else central differences); it is checked against central
    differences of f wherever those converge.  `polynomial` gives the coefficients a_0..a_d of f(G) = Σ a_k G^k,
    which makes the sample estimator unbiased (needs m ≥ d samples per prompt), else it is the plug-in estimator
    with bias O(1/m).

    `samples` is the number of samples one request draws (an integer ≥ 1).  Without it: d for a polynomial of degree
    d (a procedure keeping one of k samples by rank has an output CDF of degree ≤ k), 1 for the identity map, and
    otherwise *unknown* (:attr:`samples_known` is False, :attr:`n` is 1 only nominally, a UserWarning says so and
    the trainer configs refuse the procedure).
    """

    def __init__(self, name: str, output_cdf: Callable | None, params: dict[str, Any], *,
                 derivative: Callable | None = None, polynomial: Sequence[float] | None = None,
                 samples: int | None = None, label: str | None = None, description: str | None = None):
        self.name = name
        self._params = dict(params)
        self._f = output_cdf
        self._derivative = derivative
        self._poly = None if polynomial is None else np.asarray(polynomial, dtype=np.float64)
        if self._poly is not None:
            if self._poly.ndim != 1 or self._poly.size < 2 or abs(self._poly[0]) > 1e-12 or abs(self._poly.sum() - 1) > 1e-9:
                raise ProcedureError(
                    f"procedure {self.spec!r}: polynomial coefficients a_0..a_d of f(G) = Σ a_k G^k must have a_0 = 0 "
                    f"and sum to 1 (f(0) = 0, f(1) = 1), got {self._poly.tolist()}."
                )
        if self._f is None and self._poly is None:
            raise ProcedureError(f"procedure {name!r}: give output_cdf= or polynomial=.")
        self._label = label
        self._description = description
        self._identity = self._validate()
        self._samples = self._resolve_samples(samples)

    def _resolve_samples(self, samples: Any) -> int | None:
        degree = None if self._poly is None else int(np.max(np.nonzero(self._poly)[0]))
        if samples is not None:
            samples = _check_samples(samples, f"procedure {self.spec!r}")
            if degree is not None and samples < degree:
                raise ProcedureError(
                    f"procedure {self.spec!r}: samples={samples}, but its polynomial has degree {degree}; a procedure "
                    f"that keeps one of k samples by rank has an output CDF of degree <= k: give samples >= {degree}."
                )
            if samples == 1 and not self._identity:
                raise ProcedureError(
                    f"procedure {self.spec!r}: samples=1, but output_cdf is not the identity f(G) = G (a request that "
                    "draws one sample serves it, so its output has CDF G): give the number of samples a request draws."
                )
            return samples
        if degree is not None:
            return degree
        if self._identity:
            return 1
        warnings.warn(
            f"procedure {self.spec!r} was registered without samples=, and its output_cdf is neither the identity nor "
            "given as a polynomial, so the number of samples one request draws is unknown (n is reported as 1 "
            f"nominally). Register it with samples=<int> or samples=lambda **params: ... "
            f"(register_procedure({self.name!r}, f, samples=...)).",
            UserWarning,
            stacklevel=5,
        )
        return None

    def _validate(self) -> bool:
        """Check f (and f' when given) densely; returns whether f is the identity."""
        grid = _CHECK_GRID
        try:
            values = np.asarray(self.output_cdf(grid), dtype=np.float64)
        except Exception as error:  # noqa: BLE001 - the user's function
            raise ProcedureError(f"procedure {self.spec!r}: output_cdf failed on a grid of [0, 1]: {error}") from error
        if values.shape != grid.shape or not np.all(np.isfinite(values)):
            raise ProcedureError(f"procedure {self.spec!r}: output_cdf must return finite values of the input's shape.")
        wrong_ends = [f"f({x:g}) = {v:.6g}" for x, v, want in ((0, values[0], 0.0), (1, values[-1], 1.0))
                      if abs(v - want) > 1e-9]
        if wrong_ends:
            raise ProcedureError(
                f"procedure {self.spec!r}: output_cdf must increase from f(0) = 0 to f(1) = 1 (it is the CDF of the "
                f"procedure's output when one sample has CDF G); got {' and '.join(wrong_ends)}."
            )
        steps = np.diff(values)
        down = np.nonzero(steps < -1e-12)[0]
        if down.size:
            i, worst = int(down[0]), int(down[np.argmin(steps[down])])
            raise ProcedureError(
                f"procedure {self.spec!r}: output_cdf must be non-decreasing on [0, 1] (it is the CDF of the "
                f"procedure's output when one sample has CDF G), but it decreases between G = {grid[i]:.9g} and "
                f"G = {grid[i + 1]:.9g} (f = {values[i]:.9g} → {values[i + 1]:.9g}); {down.size} of {steps.size} "
                f"checked intervals decrease, the most between G = {grid[worst]:.9g} and {grid[worst + 1]:.9g} "
                f"(by {-steps[worst]:.3g})."
            )
        if self._derivative is not None:
            self._check_derivative()
        return bool(np.max(np.abs(values - grid)) <= 1e-12)

    def _check_derivative(self) -> None:
        """f' from `derivative=` against central differences of f, at points where those converge (the differences
        at steps h and h/2 agree to 1e-6); non-negative everywhere."""
        grid = _CHECK_GRID
        try:
            given = np.asarray(self.output_cdf_derivative(grid), dtype=np.float64)
        except Exception as error:  # noqa: BLE001 - the user's function
            raise ProcedureError(f"procedure {self.spec!r}: derivative failed on a grid of [0, 1]: {error}") from error
        if given.shape != grid.shape or not np.all(np.isfinite(given)):
            raise ProcedureError(f"procedure {self.spec!r}: derivative must return finite values of the input's shape.")
        negative = np.nonzero(given < -1e-9 * (1.0 + np.abs(given)))[0]
        if negative.size:
            i = int(negative[0])
            raise ProcedureError(
                f"procedure {self.spec!r}: derivative= must be >= 0 (f is non-decreasing), but f'({grid[i]:.9g}) = "
                f"{given[i]:.6g}. Fix derivative= or drop it (central differences of output_cdf are used then)."
            )
        x = np.concatenate([np.linspace(0.0, 1.0, 2049)[1:-1], 10.0 ** -np.arange(3, 9), 1.0 - 10.0 ** -np.arange(3, 9)])
        h = np.minimum(1e-5, 0.25 * np.minimum(x, 1.0 - x))
        f = self.output_cdf
        fd1 = (f(x + h) - f(x - h)) / (2 * h)
        fd2 = (f(x + h / 2) - f(x - h / 2)) / h
        at = np.asarray(self.output_cdf_derivative(x), dtype=np.float64)
        converged = np.abs(fd1 - fd2) <= 1e-6 * (1.0 + np.abs(fd2))
        bad = converged & (np.abs(at - fd2) > 1e-4 * (1.0 + np.abs(fd2)) + 10 * np.abs(fd1 - fd2))
        if bad.any():
            idx = np.nonzero(bad)[0]
            i = int(idx[np.argmax(np.abs(at - fd2)[idx])])
            raise ProcedureError(
                f"procedure {self.spec!r}: derivative= disagrees with output_cdf: at G = {x[i]:.6g} it gives "
                f"f'(G) = {at[i]:.6g}, but central differences of output_cdf give {fd2[i]:.6g} ({idx.size} of "
                f"{int(converged.sum())} checked points disagree). derivative(G, **params) must be df/dG with the same "
                "parameters: fix it, or drop it (central differences of output_cdf are used then)."
            )

    def _serves_one_sample(self) -> bool:
        return self._identity

    @property
    def samples_known(self) -> bool:
        return self._samples is not None

    @property
    def params(self) -> dict[str, Any]:
        return self._params

    @property
    def n(self) -> int:
        return 1 if self._samples is None else self._samples

    @property
    def unbiased(self) -> bool:
        return self._poly is not None

    @property
    def label(self) -> str:
        return self._label or self.spec

    @property
    def description(self) -> str:
        return self._description or f"the user-defined inference procedure {self.spec}"

    def output_cdf(self, G, one_minus_G=None):
        G = np.asarray(G, dtype=np.float64)
        if self._f is not None:
            return np.asarray(self._f(G, **self._params), dtype=np.float64)
        return np.polynomial.polynomial.polyval(G, self._poly)

    def output_cdf_derivative(self, G, one_minus_G=None):
        G = np.asarray(G, dtype=np.float64)
        if self._derivative is not None:
            return np.asarray(self._derivative(G, **self._params), dtype=np.float64)
        if self._poly is not None:
            return np.polynomial.polynomial.polyval(G, np.polynomial.polynomial.polyder(self._poly))
        step = 1e-6
        hi, lo = np.minimum(G + step, 1.0), np.maximum(G - step, 0.0)
        return np.maximum((self.output_cdf(hi) - self.output_cdf(lo)) / (hi - lo), 0.0)

    def rank_weights(self, num_valid, width):
        if self._poly is None:
            return super().rank_weights(num_valid, width)
        total = torch.zeros(num_valid.numel(), width, dtype=torch.float64)
        for k, a in enumerate(self._poly):
            if k and a:
                total = total + float(a) * _subset_extreme_weights(num_valid, width, k, largest=True)
        return total

    @property
    def min_samples(self) -> int:
        return self._poly.size - 1 if self._poly is not None else 1


class Mixture(InferenceProcedure):
    r"""Request-level mixture: each request is served with procedure j with probability w_j (Σ w_j = 1), and
    the policy's output is compared with the reference's under the same procedure, so W = Σ_j w_j W_j.

    Spec ``"mixture:0.7*standard+0.2*bon:n=8+0.1*bon:n=32"``; a component may be any non-mixture spec."""

    name = "mixture"

    def __init__(self, components: Sequence[tuple[float, InferenceProcedure]]):
        parts = []
        for weight, proc in components:
            proc = get_procedure(proc)
            for w_inner, primitive in proc.components():
                parts.append((float(weight) * w_inner, primitive))
        if not parts:
            raise ProcedureError("A mixture needs at least one component, e.g. 'mixture:0.5*standard+0.5*bon:n=4'.")
        weights = np.array([w for w, _ in parts])
        if np.any(~np.isfinite(weights)) or np.any(weights <= 0):
            raise ProcedureError(f"Mixture weights must be finite and > 0, got {weights.tolist()}.")
        if abs(weights.sum() - 1.0) > 1e-6:
            raise ProcedureError(
                f"Mixture weights must sum to 1 (each is the probability a request is served that way), got "
                f"{' + '.join(_format_number(w) for w in weights)} = {weights.sum():.6g}: rescale them."
            )
        merged: dict[str, list] = {}
        for w, p in parts:  # the same primitive twice is one component with the summed weight
            merged.setdefault(p.spec, [0.0, p])[0] += w / weights.sum()
        self._components = tuple((w, p) for w, p in merged.values())

    def components(self):
        return self._components

    @property
    def unbiased(self) -> bool:
        return all(p.unbiased for _, p in self._components)

    @property
    def min_samples(self) -> int:
        return max(p.min_samples for _, p in self._components)

    def calibrated_win_rate(self, policy) -> float:
        """Σ_j w_j W_j(g)."""
        return float(sum(w * p.calibrated_win_rate(policy) for w, p in self._components))

    def per_prompt_win_rates(self, policy_rewards, reference_rewards):
        """Σ_j w_j (component j's per-prompt estimate): unbiased when every component's is."""
        return sum(w * p.per_prompt_win_rates(policy_rewards, reference_rewards) for w, p in self._components)

    @property
    def spec(self) -> str:
        return "mixture:" + "+".join(f"{_format_number(w)}*{p.spec}" for w, p in self._components)

    @property
    def n(self) -> int:
        return max(p.n for _, p in self._components)

    @property
    def label(self) -> str:
        return " + ".join(f"{_format_number(w)}·{p.label}" for w, p in self._components)

    @property
    def description(self) -> str:
        return "a request-level mixture: " + "; ".join(
            f"{100 * w:.3g}% of requests served by {p.description}" for w, p in self._components)

    @property
    def quick_start(self):
        starts = [p.quick_start for _, p in self._components if p.quick_start is not None]
        if not starts:
            return None
        n = max(k for k, _ in starts)
        return n, (f"Aligned for {self.label}: serve each request with its procedure, e.g. sample {n} completions "
                   "and keep the one your reward model prefers.")

    @property
    def metric_key(self) -> str:
        inner = "+".join(f"{_format_number(w)}*{p.metric_key[: -len('_win_rate')]}" for w, p in self._components)
        return f"mixture({inner})_win_rate"

    @property
    def families(self) -> tuple[str, ...]:
        found = []
        for _, p in self._components:
            if not p.is_standard:
                found += [f for f in p.families if f not in found]
        return tuple(found) or ("bon",)


# ---------------------------------------------------------------------------------------------------------------------
# registry
_REGISTRY: dict[str, Callable[..., InferenceProcedure]] = {}


def register_procedure(name: str, output_cdf: Callable | None = None, *, derivative: Callable | None = None,
                       polynomial: Callable | Sequence[float] | None = None, samples: Callable | int | None = None,
                       label: str | None = None, description: str | None = None):
    r"""Register an inference procedure under `name` (spec ``"name"`` or ``"name:k=v,..."``).

    Two forms:

    - ``register_procedure("bon_of_bon", lambda G, n=2, m=2: G ** (n * m), samples=lambda n=2, m=2: n * m)``: a
      primitive given by its output-CDF map f(G; params) (keyword parameters become spec parameters).
      `samples(**params)` (or an int ≥ 1) = samples drawn per request: give it unless f is a polynomial given by
      `polynomial=` (then it is the degree) or the identity (1) — otherwise the number is unknown, a UserWarning says
      so and the trainer configs refuse the procedure.  Optional `derivative(G, **params)` = f'(G) (checked against
      central differences of f); `polynomial(**params)` (or a sequence) = coefficients a_0..a_d of f(G) = Σ a_k G^k,
      which makes the sample estimator unbiased.  f must be non-decreasing with f(0) = 0 and f(1) = 1: it is
      checked densely when a procedure is built, and at registration when every parameter has a default, so a bad
      map is never registered.
    - as a class decorator, ``@register_procedure("name")`` on an :class:`InferenceProcedure` subclass (or a factory
      ``(**params) -> InferenceProcedure``).

    Registering a name twice raises ValueError.  Returns the registered object (the decorator form returns a decorator).
    """
    if not isinstance(name, str) or not name or any(ch in name for ch in ":,;=*+@ ()"):
        raise ProcedureError(f"Procedure names must be non-empty strings without ':,;=*+@() ' or spaces, got {name!r}.")

    add = registrar(_REGISTRY, name, "procedure", InferenceProcedure)
    if output_cdf is None and polynomial is None:
        return add
    if samples is not None and not callable(samples):
        samples = _check_samples(samples, f"register_procedure({name!r})")
    built: dict[tuple, CDFMapProcedure] = {}  # the checks run once per parameter set

    def factory(**params):
        key = tuple(sorted(params.items()))
        try:
            if key in built:
                return built[key]
        except TypeError:  # an unhashable parameter value: build it anew
            key = None

        def value_of(x):
            return x(**params) if callable(x) else x

        procedure = CDFMapProcedure(name, output_cdf, params, derivative=derivative,
                                    polynomial=value_of(polynomial), samples=value_of(samples), label=label,
                                    description=description)
        if key is not None and len(built) < 256:
            built[key] = procedure
        return procedure

    source = output_cdf if output_cdf is not None else polynomial
    declared = list(inspect.signature(source).parameters.values())[1 if output_cdf is not None else 0:] if (
        callable(source)) else []
    factory.parameters = [p.name for p in declared]
    if all(p.default is not inspect.Parameter.empty for p in declared):
        factory()  # check the map at its defaults before it is registered (raises ProcedureError)
    return add(factory)


def _takes_n(factory: Callable) -> bool:
    """Whether a registered procedure has an `n` parameter (then a bare name takes the configs' `inference_n`)."""
    if hasattr(factory, "parameters"):
        return "n" in factory.parameters
    try:
        return "n" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def available_procedures() -> list[str]:
    """Registered procedure names, built-ins first (standard, bon, won), then in registration order."""
    return list(_REGISTRY)


def _parse_mixture(spec: str, rest: str) -> Mixture:
    terms = [t for t in rest.split("+")]
    components = []
    for term in terms:
        weight, star, inner = term.partition("*")
        if not star or not inner.strip():
            raise ProcedureError(
                f"Malformed mixture spec {spec!r}: each term must look like 'weight*procedure' (bad term {term!r}); "
                "e.g. 'mixture:0.7*standard+0.2*bon:n=8+0.1*bon:n=32'."
            )
        try:
            w = float(weight)
        except ValueError:
            raise ProcedureError(f"Malformed mixture spec {spec!r}: weight {weight!r} is not a number.") from None
        if inner.strip().startswith("mixture"):
            raise ProcedureError(f"Malformed mixture spec {spec!r}: a mixture cannot contain a mixture spec.")
        components.append((w, get_procedure(inner.strip())))
    return Mixture(components)


def get_procedure(spec: "str | InferenceProcedure", n: int | None = None) -> InferenceProcedure:
    """The procedure of a spec: ``"standard"``, ``"bon:n=4"``, ``"won:n=8"``, ``"mixture:0.5*standard+0.5*bon:n=4"``
    or a registered name.  The old form ``get_procedure("bon", n=4)`` (the `inference_n` of the configs) still
    works for every procedure with an `n` parameter (bon, won, a user map ``f(G, n=…)``); `n` is ignored by the
    others (``standard``) and must agree with a spec's own ``n=``.  Instances pass through."""
    if isinstance(spec, InferenceProcedure):
        if n is not None and spec.n != n and not spec.is_standard and "n" in spec.params:
            raise ProcedureError(f"procedure {spec.spec!r} has n={spec.n}, but n={n} was also given.")
        return spec
    if not isinstance(spec, str):
        raise ProcedureError(f"A procedure must be a spec string or an InferenceProcedure, got {type(spec).__name__}.")
    text = spec.strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if name == "mixture":
        return _parse_mixture(text, rest)
    if name not in _REGISTRY:
        raise ProcedureError(
            f"Unknown inference procedure {name!r}. Available: {', '.join(available_procedures())} (a mixture is "
            "'mixture:0.7*standard+0.3*bon:n=8'). Register your own with trl_infalign.register_procedure(name, f)."
        )
    params = _parse_params(text, rest) if rest.strip() else {}
    if n is not None and _takes_n(_REGISTRY[name]):
        n = _check_n(n, f"procedure {text!r}")
        if "n" in params and params["n"] != n:
            raise ProcedureError(f"procedure {text!r} has n={params['n']}, but n={n} was also given: give one.")
        params["n"] = n
    try:
        procedure = _REGISTRY[name](**params)
    except TypeError as error:
        raise ProcedureError(f"Invalid parameters for procedure {text!r}: {error}") from None
    if not isinstance(procedure, InferenceProcedure):
        raise ProcedureError(f"The factory registered as {name!r} returned {type(procedure).__name__}.")
    return procedure


register_procedure("standard")(Standard)
register_procedure("bon")(BestOfN)
register_procedure("won")(WorstOfN)
