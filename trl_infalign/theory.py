r"""Calibrated-space model of CTRL / InfAlign (arXiv 2412.19792, §3-4; notes §2).

After calibration the reward of a response is its reference-policy CDF value c ∈ [0, 1], uniform under π_ref.
The KL-regularised RL optimum for a transform Φ and KL coefficient β is

    π*(y|x) ∝ π_ref(y|x) exp(Φ(c(x, y)) / β),

so in calibrated space the aligned policy is the density g(c) = exp(Φ(c)/β) / ∫₀¹ exp(Φ/β) on [0, 1] (CDF G), and

    KL(π*‖π_ref)  = ∫ g log g dc
    standard win  = ∫ g(c) c dc                                    (one sample of π vs one of π_ref)
    BoN-N win     = ∫ N G^{N-1} g(c) c^N dc                        (best of N vs best of N)
    WoN-N win     = ∫ N (1-G)^{N-1} g(c) (1 - (1-c)^N) dc          (worst of N vs worst of N)

Everything here is float64 numpy/scipy.  Densities are stored as log-densities on a grid of [0, 1] and treated as
*piecewise exponential* (log g linear between grid points), so every integral of g, g·c and g·log g is exact per
segment; grids are refined adaptively wherever log g changes by more than 0.1 between neighbours, or bends (second
difference > 2e-4), within 40 nats of its maximum (down to float resolution), which keeps sharply concentrated policies (t = 30, β = 1e-3) accurate and
finite.  The BoN/WoN win rates are integrated by parts (W = 1 − ∫ N c^{N−1} G^N dc, resp. its WoN mirror) in the
distance u from the winning end, on pieces cut until the integrand is resolved (it lives on u ≲ 1/(N(1 + g(1))) at
large N), with 4-point Gauss-Legendre nodes and the exact piecewise-exponential CDF G (:func:`_order_statistic_tail`).

The KL-regularised optimum over *all* densities (:func:`optimal_policy`) solves the first-order condition of
max_g W(g) − β KL(g); for BoN it is an ODE boundary-value problem, solved by shooting (see :func:`optimal_policy`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from . import optimal as _optimal
from ._quadrature import _BASE_POINTS, _Stats, _adaptive_grid, _segment_stats
from .procedures import PROCEDURES, BestOfN, InferenceProcedure, WorstOfN, get_procedure
from .transforms import EXP_FAMILIES, OptimalTransform, get_transform

if TYPE_CHECKING:  # pragma: no cover
    from .transforms import Transform

__all__ = [
    "PROCEDURES",
    "CalibratedPolicy",
    "BestT",
    "FrontierPoint",
    "policy",
    "kl_divergence",
    "win_rate",
    "beta_for_kl",
    "best_t",
    "best_t_for_beta",
    "t_range",
    "optimal_policy",
    "frontier",
    "plot_frontiers",
    "DEFAULT_KLS",
    "clear_caches",
]

#: Default KL grid of :func:`frontier`: 25 values in (0, 3].
DEFAULT_KLS = tuple(float(k) for k in np.linspace(0.12, 3.0, 25))



# ----------------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------------
def _procedure(procedure: "str | InferenceProcedure", n: int | None = None) -> InferenceProcedure:
    """The :class:`~trl_infalign.procedures.InferenceProcedure` of a spec ("bon:n=4", "mixture:…") or of the old
    (name, n) pair ("bon", 4).  Raises ValueError for an unknown procedure or a bad n."""
    return get_procedure(procedure, n)


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}.")
    return beta


def _resolve(transform: "str | Transform") -> "Transform":
    return get_transform(transform)


def _spec_of(transform: Any) -> str:
    return transform if isinstance(transform, str) else str(getattr(transform, "spec", transform))


# ----------------------------------------------------------------------------------------------------------------
# policies
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CalibratedPolicy:
    r"""A policy in calibrated space: density g on c ∈ [0, 1] (π_ref is the uniform density).

    `log_density` holds log g at `grid` points, normalised so that ∫ exp(log_density) dc = 1 with log g linear
    between grid points.  `beta` is the KL coefficient that produced it (None for e.g. the exact BoN-N policy) and
    `transform` its transform spec.  See arXiv 2412.19792 §3 and notes §2.
    """

    grid: np.ndarray
    log_density: np.ndarray
    beta: float | None = None
    transform: str | None = None
    _stats: _Stats | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.grid = np.asarray(self.grid, dtype=np.float64)
        self.log_density = np.asarray(self.log_density, dtype=np.float64)
        if self.grid.ndim != 1 or self.grid.shape != self.log_density.shape or self.grid.size < 2:
            raise ValueError("grid and log_density must be 1-D arrays of the same length >= 2.")
        if self.grid[0] != 0.0 or self.grid[-1] != 1.0 or np.any(np.diff(self.grid) <= 0):
            raise ValueError("grid must increase strictly from 0 to 1.")

    @property
    def stats(self) -> _Stats:
        if self._stats is None:
            self._stats = _segment_stats(self.grid, self.log_density)
        return self._stats

    @classmethod
    def from_log_density(
        cls, grid: np.ndarray, log_density_unnormalised: np.ndarray, beta: float | None = None,
        transform: str | None = None,
    ) -> "CalibratedPolicy":
        """Normalise an unnormalised log-density: log g = ℓ − log ∫ exp(ℓ) (piecewise-exponential quadrature)."""
        grid = np.asarray(grid, dtype=np.float64)
        ell = np.asarray(log_density_unnormalised, dtype=np.float64)
        stats = _segment_stats(grid, ell)
        pol = cls(grid, stats.log_density, beta=beta, transform=transform)
        pol._stats = stats
        return pol

    @classmethod
    def bon_policy(cls, n: int) -> "CalibratedPolicy":
        """The exact Best-of-N policy: g(c) = N c^{N−1} (CDF c^N); KL = log N − (N−1)/N (Beirami et al. 2401.01879)."""
        n = BestOfN(n).n
        if n == 1:
            return cls.from_log_density(np.linspace(0.0, 1.0, 3), np.zeros(3), transform=None)

        def logf(c):
            with np.errstate(divide="ignore"):
                return math.log(n) + (n - 1) * np.log(c)

        grid, ell = _adaptive_grid(logf)
        return cls.from_log_density(grid, ell, transform=f"bon-policy:n={n}")

    def density(self) -> np.ndarray:
        """g(c) at `grid`."""
        return np.exp(self.log_density)

    def cdf(self) -> np.ndarray:
        """G(c) = ∫₀^c g at `grid`."""
        return self.stats.cdf.copy()

    def kl(self) -> float:
        """KL(π‖π_ref) = ∫₀¹ g log g dc (nats)."""
        return self.stats.kl

    def standard_win_rate(self) -> float:
        """P(one sample of π beats one of π_ref) = ∫ g(c) c dc (ties ½)."""
        s = self.stats
        return float(np.sum(s.seg_mass * s.seg_mean))

    def win_rate(self, procedure: "str | InferenceProcedure" = "standard", n: int | None = None) -> float:
        """Inference-time win rate against π_ref run through the same procedure (notes §2, arXiv 2412.19792 §3):
        W = ∫ f(c) d f(G(c)) for output-CDF map f (standard: ∫ g c; bon: ∫ c^N d(G^N); won: ∫ (1 − (1−c)^N)
        d(1 − (1−G)^N)); a mixture's is Σ_j w_j W_j (:mod:`trl_infalign.procedures`).  `procedure` is a spec
        ("bon:n=4", "mixture:0.5*standard+0.5*bon:n=8") or the old pair ("bon", 4)."""
        return _procedure(procedure, n).calibrated_win_rate(self)

    def summary(self, procedure: "str | InferenceProcedure" = "bon", n: int | None = None) -> dict:
        """KL and win rates as a dict (what the CLI prints): `win_rate` is the procedure's; `bon_win_rate` /
        `won_win_rate` are Best-of-N / Worst-of-N at the procedure's N when N > 1."""
        proc = _procedure(procedure, n)
        out = {"procedure": proc.spec, "beta": self.beta, "kl": self.kl(), "win_rate": proc.calibrated_win_rate(self),
               "standard_win_rate": self.standard_win_rate()}
        if proc.n > 1:
            out["bon_win_rate"] = BestOfN(proc.n).calibrated_win_rate(self)
            out["won_win_rate"] = WorstOfN(proc.n).calibrated_win_rate(self)
        return out


_POLICY_CACHE: "OrderedDict[tuple, CalibratedPolicy]" = OrderedDict()
_POLICY_CACHE_SIZE = 2048


def _policy_from_logf(logf, beta, spec) -> CalibratedPolicy:
    grid, ell = _adaptive_grid(logf)
    return CalibratedPolicy.from_log_density(grid, ell, beta=beta, transform=spec)


def policy(transform: "str | Transform", beta: float) -> CalibratedPolicy:
    r"""The KL-regularised optimum of transform Φ at KL coefficient β in calibrated space:

        g(c) = exp(Φ(c)/β) / ∫₀¹ exp(Φ/β)        (arXiv 2412.19792 eq. for π* ∝ π_ref e^{Φ(c)/β}; notes §2)

    `transform` is a :class:`~trl_infalign.transforms.Transform` or a spec string ("bon:t=10", "identity", ...).
    Results for string specs are cached.
    """
    beta = _check_beta(beta)
    key = (transform, beta) if isinstance(transform, str) else None
    if key is not None and key in _POLICY_CACHE:
        _POLICY_CACHE.move_to_end(key)
        return _POLICY_CACHE[key]
    tr = _resolve(transform)
    phi = tr.phi  # raises ValueError for transforms without a calibrated-space form (lsc)
    pol = _policy_from_logf(lambda c: phi(c) / beta, beta, tr.spec)
    if key is not None:
        _POLICY_CACHE[key] = pol
        if len(_POLICY_CACHE) > _POLICY_CACHE_SIZE:
            _POLICY_CACHE.popitem(last=False)
    return pol


def kl_divergence(transform: "str | Transform", beta: float) -> float:
    """KL(π*‖π_ref) = ∫ g log g with g ∝ exp(Φ(c)/β) (notes §2)."""
    return policy(transform, beta).kl()


def win_rate(transform: "str | Transform", beta: float, procedure: "str | InferenceProcedure" = "standard",
             n: int | None = None) -> float:
    """Win rate of g ∝ exp(Φ/β) under `procedure` (:meth:`CalibratedPolicy.win_rate`)."""
    return policy(transform, beta).win_rate(procedure, n)


def _solve_log_beta(
    kl_of_log_beta, kl: float, start: float, what: str, lo_limit: float, hi_limit: float, factor: float = 10.0,
    xtol: float = 1e-10,
) -> float:
    """Root of KL(log β) = kl for a KL that decreases in β; brackets by steps of `factor` from `start`."""
    from scipy.optimize import brentq

    lo = hi = start
    k_lo = k_hi = kl_of_log_beta(start)
    step = math.log(factor)
    while k_lo < kl:  # need smaller beta
        hi, k_hi = lo, k_lo
        lo -= step
        step *= 2.0
        if lo < lo_limit:
            raise ValueError(
                f"KL budget {kl:g} is unreachable for {what}: its KL only reaches ≈ {k_lo:.4g} as beta → 0."
            )
        k_lo = kl_of_log_beta(lo)
    while k_hi > kl:  # need larger beta
        lo, k_lo = hi, k_hi
        hi += step
        step *= 2.0
        if hi > hi_limit:
            raise ValueError(f"KL budget {kl:g} is too small for {what} (KL ≈ {k_hi:.3g} at the largest beta).")
        k_hi = kl_of_log_beta(hi)
    if k_lo == kl:
        return math.exp(lo)
    if k_hi == kl:
        return math.exp(hi)
    return math.exp(brentq(lambda lb: kl_of_log_beta(lb) - kl, lo, hi, xtol=xtol, rtol=1e-12, maxiter=200))


def beta_for_kl(transform: "str | Transform", kl: float) -> float:
    r"""The β at which g ∝ exp(Φ(c)/β) has KL(π*‖π_ref) = `kl` (notes §2; CTRL's `kl_budget`, arXiv 2412.19792).

    KL decreases monotonically in β (β → ∞: π_ref, KL 0; β → 0: mass at argmax Φ), so this root-finds in log β.
    Raises ValueError if `kl` ≤ 0, if Φ is constant, or if the KL budget exceeds what the transform can reach.
    """
    kl = float(kl)
    if not (math.isfinite(kl) and kl > 0):
        raise ValueError(f"KL budget must be a finite number > 0, got {kl!r}.")
    tr = _resolve(transform)
    phi_values = np.asarray(tr.phi(np.linspace(0.0, 1.0, _BASE_POINTS)), dtype=np.float64)
    scale = float(np.ptp(phi_values))
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"transform {tr.spec!r} is constant on [0, 1]: its policy is π_ref (KL 0) at every beta.")
    phi = tr.phi
    key_spec = transform if isinstance(transform, str) else None

    def kl_at(log_beta: float) -> float:
        beta = math.exp(log_beta)
        if key_spec is not None:
            return policy(key_spec, beta).kl()
        return _policy_from_logf(lambda c: phi(c) / beta, beta, tr.spec).kl()

    start = math.log(scale)
    return _solve_log_beta(kl_at, kl, start, f"transform {tr.spec!r}", start - 35 * math.log(10), start + 30 * math.log(10))


# ----------------------------------------------------------------------------------------------------------------
# exp families
# ----------------------------------------------------------------------------------------------------------------
#: Exp-family t search range of :func:`best_t` for N ≤ 4 (it grows with N: :func:`t_range`).
T_RANGE = (0.01, 60.0)
#: Largest t the `bon` / `won` transforms accept (transforms.py: exp(t) must be finite in float64).
T_CAP = 700.0
#: Default floor on the normalised KL coefficient β / span(Φ) of :func:`best_t` and :func:`best_t_for_beta`.
DEFAULT_MIN_BETA = 0.01
_TIE = 1e-9  # win rates closer than this are ties, broken towards the smaller t (flatter Φ, larger β / span)


@dataclass
class BestT:
    """Best member Φ = exp(t·c) (bon family) or −exp(−t·c) (won family) of an exp family at a KL budget.

    `normalised_beta` = β / span(Φ) is the KL coefficient of Φ rescaled to [0, 1] (what the trainer uses);
    `t_range` is the t interval searched and `min_beta` the floor on `normalised_beta`.  `on_bound` is True when the
    answer sits on a limit of the search, `bound` names it: "t_min", "t_max" (the range, see :func:`t_range`) or
    "min_beta" (the floor) — a better member exists beyond it.  When the floor excludes a better member,
    `unconstrained` = (t, win rate) of the best excluded one on the search grid (a lower bound on what the floor
    costs), else None.
    """

    t: float
    beta: float
    kl: float
    win_rate: float
    standard_win_rate: float
    family: str
    normalised_beta: float = float("nan")
    on_bound: bool = False
    bound: str | None = None
    t_range: tuple[float, float] = T_RANGE
    min_beta: float = DEFAULT_MIN_BETA
    unconstrained: tuple[float, float] | None = None

    @property
    def transform(self) -> str:
        return _family_spec(self.family, self.t)


def _family_spec(family: str, t: float) -> str:
    return f"{family}:t={float(t):.6g}"


def _family_span(family: str, t: float) -> float:
    """max Φ − min Φ over [0, 1]: e^t − 1 for exp(t·c), 1 − e^{−t} for −exp(−t·c)."""
    return EXP_FAMILIES[family].span(t)


def _families(procedure: InferenceProcedure, family: str | None) -> tuple[str, ...]:
    """The exp families to search: the one asked for, else the procedure's own (both for a BoN + WoN mixture)."""
    if family is not None:
        if family not in EXP_FAMILIES:
            raise ValueError(f"family must be 'bon' or 'won', got {family!r}.")
        return (family,)
    return procedure.families


def _check_min_beta(min_beta: float) -> float:
    value = float(min_beta)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"min_beta must be a finite number >= 0 (0 disables the floor), got {min_beta!r}.")
    return value


def t_range(procedure: "str | InferenceProcedure", n: int | None = None) -> tuple[float, float]:
    r"""The exp-family t interval :func:`best_t` and :func:`best_t_for_beta` search: [0.01, min(700, 60·max(1, N/4)²)].

    The best t grows faster than N (BoN-N at KL 0.5: t* ≈ 4.6, 12.6, 34, 104, 396, 2 250 for N = 2 … 64; WoN-N:
    t* ≈ 2.5 N), because at large N the win rate is decided within u = 1 − c ≲ 1/N of the top.  The range is capped
    at t = 700, the largest t the `bon`/`won` transforms accept (exp(t) must be finite), so for BoN beyond N ≈ 32
    (KL 0.5) the answer sits on the cap and :func:`best_t` warns.  `standard` counts as N = 1, a mixture as its
    largest N.
    """
    n_eff = _procedure(procedure, n).n
    return (T_RANGE[0], min(T_CAP, T_RANGE[1] * max(1.0, n_eff / 4.0) ** 2))


def _search_log_t(evaluate, t_lo: float, t_hi: float, min_beta: float
                  ) -> tuple[float, str | None, tuple[float, float] | None]:
    r"""Maximise a win rate over log t ∈ [log t_lo, log t_hi] subject to normalised β ≥ `min_beta`.

    `evaluate(log t)` returns (win rate, normalised β) and raises ValueError where the member is infeasible (KL
    unreachable).  Coarse grid (≈ 2.2 points per unit of log t), then bounded Brent on the bracket around the best
    feasible grid point; a neighbour that breaks the floor is replaced by the floor's edge (Brent on log β/span).
    Win rates within 1e-9 of the best are ties, broken towards the smaller t.  Returns (t, bound, better): bound is
    None, "t_min", "t_max" or "min_beta" when the maximiser sits (within 1e-3 in log t) on that limit, or "min_beta"
    when the floor excludes a grid member that wins more; better = (objective, t) of the best such member or None.
    """
    from scipy.optimize import brentq, minimize_scalar

    lo_lt, hi_lt = math.log(t_lo), math.log(t_hi)
    log_ts = np.linspace(lo_lt, hi_lt, max(9, int(math.ceil(2.2 * (hi_lt - lo_lt))) + 1))
    cache: dict[float, tuple[float, float]] = {}

    def value(lt: float) -> tuple[float, float]:
        if lt not in cache:
            try:
                cache[lt] = evaluate(lt)
            except ValueError:
                cache[lt] = (-np.inf, 0.0)
        return cache[lt]

    def margin(lt: float) -> float:  # ≥ 0 where the floor holds (1e-6 relative slack for the 6-digit t)
        beta_n = value(lt)[1]
        return math.log(beta_n / min_beta) + 1e-6 if beta_n > 0 else -np.inf

    def feasible(lt: float) -> bool:
        return np.isfinite(value(lt)[0]) and (min_beta <= 0 or margin(lt) >= 0)

    ok = np.array([feasible(float(lt)) for lt in log_ts])
    if not ok.any():
        floor = f" with beta / span(Phi) >= min_beta={min_beta:g}" if min_beta > 0 else ""
        raise ValueError(f"no member of the exp family reaches the KL budget{floor} for t in [{t_lo:g}, {t_hi:g}]"
                         + ("; lower min_beta (0 disables the floor) or the KL budget." if floor else "."))
    wins = np.where(ok, [value(float(lt))[0] for lt in log_ts], -np.inf)
    i = int(np.argmax(wins))
    i = int(np.nonzero(wins >= wins[i] - _TIE)[0][0])
    edges = []
    for j in (i - 1, i + 1):
        if j < 0 or j >= log_ts.size:
            edges.append((float(log_ts[i]), "t_min" if j < 0 else "t_max"))
        elif ok[j]:
            edges.append((float(log_ts[j]), None))
        else:  # the floor (or feasibility) breaks between log_ts[i] and log_ts[j]: find the edge
            a, b = float(log_ts[i]), float(log_ts[j])
            if min_beta > 0 and np.isfinite(value(b)[0]):
                edge = brentq(margin, a, b, xtol=1e-10)
                edge = edge if feasible(edge) else a + (edge - a) * (1 - 1e-9)
                edges.append((edge, "min_beta" if feasible(edge) else None))
            else:
                edges.append((a, None))
    (left, left_kind), (right, right_kind) = edges
    best_lt, best_w = float(log_ts[i]), wins[i]
    if right > left:
        res = minimize_scalar(lambda lt: -value(lt)[0] if feasible(lt) else np.inf, bounds=(left, right),
                              method="bounded", options={"xatol": 1e-4})
        if feasible(float(res.x)) and -res.fun > best_w + _TIE:
            best_lt, best_w = float(res.x), -res.fun
        for edge, kind in ((left, left_kind), (right, right_kind)):  # Brent never lands exactly on an edge
            if kind is not None and abs(best_lt - edge) < 1e-3 and feasible(edge) and value(edge)[0] >= best_w - _TIE:
                best_lt, best_w = edge, value(edge)[0]
    bound = None
    for edge, kind in ((left, left_kind), (right, right_kind)):
        if kind is not None and abs(best_lt - edge) < 1e-3:
            bound = kind
    if bound is None and abs(best_lt - lo_lt) < 1e-3:
        bound = "t_min"
    if bound is None and abs(best_lt - hi_lt) < 1e-3:
        bound = "t_max"
    # the floor also binds when it excludes a better member elsewhere (the objective need not be unimodal)
    excluded = [(value(float(lt))[0], math.exp(lt)) for lt, good in zip(log_ts, ok)
                if not good and np.isfinite(value(float(lt))[0])]
    better = max(excluded, default=None)
    if better is not None and better[0] > best_w + _TIE:
        bound = bound if bound == "min_beta" else ("min_beta" if bound is None else bound)
    else:
        better = None
    return math.exp(best_lt), bound, better


def _bound_advice(caller: str, bound: str, family: str, procedure: InferenceProcedure, where: str, t: float,
                  t_hi: float, min_beta: float, better: tuple[float, float] | None, what: str = "win rate") -> str:
    """The UserWarning text of :func:`best_t` / :func:`best_t_for_beta` when the answer sits on a limit."""
    head = f"{caller}: the best {family} exp-family t for {procedure.label} at {where} "
    if bound == "t_min":
        return head + (f"sits on the lower end of the t range (t = {t:.6g}); the t → 0 limit is the identity "
                       "transform: use transform='identity'.")
    if bound == "t_max":
        if t_hi >= T_CAP:
            return head + (f"sits on t = {t:.6g}, the largest t the {family} transform accepts (exp(t) must be "
                           f"finite); the {what} still grows beyond it. Use it as is (its prediction is exact), or a "
                           "transform without the cap.")
        return head + (f"sits on the upper end t = {t:.6g} of the t range; the {what} still grows beyond it: pass a "
                       f"larger t_max= (at most {T_CAP:g}).")
    cost = "" if better is None else f" (t = {better[0]:.6g} would reach {what} {better[1]:.6f})"
    return head + (f"is limited by the floor min_beta={min_beta:g} on beta / span(Phi) (t = {t:.6g}): larger t wins "
                   f"more{cost} but needs a normalised beta the optimiser cannot hold (KL drift). Accept it, "
                   f"{'lower the KL budget' if caller == 'best_t' else 'raise beta'}, or pass a smaller min_beta (0 "
                   "disables the floor).")


def best_t(procedure: "str | InferenceProcedure", n: int | None = None, kl: float | None = None,
           family: str | None = None, *, min_beta: float = DEFAULT_MIN_BETA, t_max: float | None = None) -> BestT:
    r"""Best exp-family transform at a KL budget (arXiv 2412.19792 §4: CTRL's BoN/WoN transforms).

    `procedure` is a spec ("bon:n=4", "mixture:0.5*standard+0.5*bon:n=8", or the old pair ``"bon", 4``).
    family "bon": Φ_t(c) = exp(t·c); "won": Φ_t(c) = −exp(−t·c).  The default family is the procedure's own ("bon" for
    bon, "won" for won; a mixture of both searches both and keeps the better) and "bon" for `standard` — where the identity transform is exactly optimal (the t → 0 limit
    of the bon family, so the answer sits on the lower end of the range).  For each t, β_t is solved so that
    KL(g_t) = `kl` with g_t ∝ exp(Φ_t/β_t), and the procedure's win rate (:meth:`CalibratedPolicy.win_rate`) is
    maximised over log t ∈ [log 0.01, log t_max], t_max = min(700, 60·max(1, N/4)²) by default (:func:`t_range`)
    — coarse grid, then bounded Brent.

    β floor: only members with normalised β = β_t / span(Φ_t) ≥ `min_beta` are considered (span = e^t − 1 for bon,
    1 − e^{−t} for won).  The trainer trains on Φ rescaled to [0, 1] at KL coefficient β / span, so the policy's
    log-density spans up to 1 / (β / span) nats over [0, 1] and a reward difference of β / span changes it by one
    nat.  The default 0.01 (≤ 100 nats; reward differences of 1 % of the range resolved) keeps the members CTRL
    trains faithfully — measured: WoN-4 at KL 0.5 (β / span ≈ 0.013) ended at KL 0.547 — and excludes those that
    drift (β / span ≈ 8e-4 at KL 0.75 ended at KL 1.03).  It never binds for BoN-N up to KL 1 (there β / span > 0.1).
    `min_beta=0` disables it.

    When the answer sits on a limit (range end or floor), `on_bound` / `bound` say so and a UserWarning names the
    limit, N, the KL budget and what to do.  Raises ValueError (naming the argument) for bad input, and when no
    member reaches the budget under the floor.  Cached on (procedure, kl, family, min_beta, t_max).
    """
    proc = _procedure(procedure, n)
    if kl is None:
        raise ValueError("best_t needs kl= (the KL budget).")
    kl_value = float(kl)
    if not (math.isfinite(kl_value) and kl_value > 0):
        raise ValueError(f"kl (the KL budget) must be a finite number > 0, got {kl!r}.")
    min_beta = _check_min_beta(min_beta)
    t_hi = _check_t_max(t_max, proc)
    results = []
    for fam in _families(proc, family):
        try:
            results.append(_best_t_cached(proc.spec, round(kl_value, 12), fam, min_beta, t_hi))
        except ValueError:
            if len(_families(proc, family)) == 1:
                raise
    if not results:
        raise ValueError(f"no exp-family member reaches the KL budget {kl_value:g} for {proc.label}.")
    result = max(results, key=lambda r: r.win_rate)
    if result.on_bound:
        import warnings

        warnings.warn(_bound_advice("best_t", result.bound, result.family, proc, f"KL {kl_value:g}", result.t, t_hi,
                                    min_beta, result.unconstrained), UserWarning, stacklevel=2)
    return result


def _check_t_max(t_max: float | None, procedure: InferenceProcedure) -> float:
    if t_max is None:
        return t_range(procedure)[1]
    value = float(t_max)
    if not (math.isfinite(value) and T_RANGE[0] < value <= T_CAP):
        raise ValueError(f"t_max must be a number in ({T_RANGE[0]:g}, {T_CAP:g}], got {t_max!r}.")
    return value


@lru_cache(maxsize=256)
def _best_t_cached(procedure: str, kl: float, family: str, min_beta: float, t_hi: float) -> BestT:
    procedure = _procedure(procedure)

    def evaluate(lt: float) -> tuple[float, float]:
        t = math.exp(lt)
        spec = _family_spec(family, t)
        beta = beta_for_kl(spec, kl)
        return policy(spec, beta).win_rate(procedure), beta / _family_span(family, t)

    t, bound, better = _search_log_t(evaluate, T_RANGE[0], t_hi, min_beta)
    spec = _family_spec(family, t)
    t = float(spec.split("=", 1)[1])
    beta = beta_for_kl(spec, kl)
    pol = policy(spec, beta)
    return BestT(t=t, beta=beta, kl=pol.kl(), win_rate=pol.win_rate(procedure),
                 standard_win_rate=pol.standard_win_rate(), family=family,
                 normalised_beta=beta / _family_span(family, t), on_bound=bound is not None, bound=bound,
                 t_range=(T_RANGE[0], t_hi), min_beta=min_beta,
                 unconstrained=None if better is None else (float(f"{better[1]:.6g}"), better[0]))


def best_t_for_beta(procedure: "str | InferenceProcedure", n: int | None = None, beta: float | None = None,
                    family: str | None = None, *, min_beta: float = DEFAULT_MIN_BETA, t_max: float | None = None,
                    details: bool = False) -> "float | BestT":
    r"""Best exp-family t at a *fixed* KL coefficient β (when the trainer's β is given instead of a KL budget).

    With β fixed the scale of Φ = exp(t·c) matters, so t is chosen to maximise the same KL-regularised objective the
    optimal transform maximises: W_procedure(g_t) − β·KL(g_t), g_t ∝ exp(Φ_t(c)/β) (notes §2, arXiv 2412.19792 §3),
    over log t ∈ [log 0.01, log t_max] (:func:`t_range`), restricted to β / span(Φ_t) ≥ `min_beta` (see
    :func:`best_t`: span grows with t, so the floor is t ≤ log(1 + β/min_beta) for bon and, when β < min_beta,
    t ≤ −log(1 − β/min_beta) for won).  Warns (UserWarning) when the answer sits on a limit or the floor excludes
    a better member.  Returns t, or with ``details=True`` a :class:`BestT` (its `kl` is the KL at this β; its
    `unconstrained` holds (t, objective) of the best member the floor excluded).
    """
    proc = _procedure(procedure, n)
    if beta is None:
        raise ValueError("best_t_for_beta needs beta= (the KL coefficient).")
    beta = _check_beta(beta)
    min_beta = _check_min_beta(min_beta)
    t_hi = _check_t_max(t_max, proc)
    found = []
    for fam in _families(proc, family):
        t, bound, better = _best_t_for_beta_cached(proc.spec, float(f"{beta:.12g}"), fam, min_beta, t_hi)
        pol = policy(_family_spec(fam, t), beta)
        found.append((pol.win_rate(proc) - beta * pol.kl(), fam, t, bound, better, pol))
    _, family, t, bound, better, pol = max(found, key=lambda item: item[0])
    if bound is not None:
        import warnings

        warnings.warn(_bound_advice("best_t_for_beta", bound, family, proc, f"beta {beta:g}", t, t_hi,
                                    min_beta, better, what="win rate − beta·KL"), UserWarning, stacklevel=2)
    if not details:
        return t
    return BestT(t=t, beta=beta, kl=pol.kl(), win_rate=pol.win_rate(proc),
                 standard_win_rate=pol.standard_win_rate(), family=family,
                 normalised_beta=beta / _family_span(family, t), on_bound=bound is not None, bound=bound,
                 t_range=(T_RANGE[0], t_hi), min_beta=min_beta, unconstrained=better)


@lru_cache(maxsize=256)
def _best_t_for_beta_cached(procedure: str, beta: float, family: str, min_beta: float, t_hi: float
                            ) -> tuple[float, str | None, tuple[float, float] | None]:
    procedure = _procedure(procedure)

    def evaluate(lt: float) -> tuple[float, float]:
        t = math.exp(lt)
        pol = policy(_family_spec(family, t), beta)
        return pol.win_rate(procedure) - beta * pol.kl(), beta / _family_span(family, t)

    t, bound, better = _search_log_t(evaluate, T_RANGE[0], t_hi, min_beta)
    return float(f"{t:.6g}"), bound, None if better is None else (float(f"{better[1]:.6g}"), better[0])


# ----------------------------------------------------------------------------------------------------------------
# the KL-regularised optimum over all densities
# ----------------------------------------------------------------------------------------------------------------
def optimal_policy(procedure: "str | InferenceProcedure", n: int | None = None, beta: float | None = None,
                   kl: float | None = None) -> CalibratedPolicy:
    r"""The KL-regularised optimum over all densities: argmax_g W_procedure(g) − β·KL(g) (notes §2; InfAlign,
    arXiv 2412.19792 §3, "optimal transform"), for any inference procedure (a spec such as "bon:n=4" or
    "mixture:0.5*standard+0.5*bon:n=16", or the old pair ``"bon", 4``).

    The first-order condition gives g ∝ exp(Φ*(c)/β) with dΦ*/dc = Σ_j w_j f_j'(G(c)) f_j'(c) (f_j the output-CDF
    maps of the procedure's components: :meth:`~trl_infalign.procedures.InferenceProcedure.first_variation`):
      standard: Φ*(c) = c (the identity transform, g ∝ e^{c/β});
      BoN-N: Φ*(c) = ∫₀^c N² u^{N−1} G(u)^{N−1} du;  WoN-N: Φ*(c) = ∫₀^c N² (1−u)^{N−1} (1−G(u))^{N−1} du.
    Together with G' = g this is a boundary-value problem, solved by shooting in z = logit(c) (accurate up to
    N = 10⁶; :mod:`trl_infalign.optimal`).  Give exactly one of `beta` or `kl`; with `kl` the β reaching that KL is
    root-found in log β.  The result has `beta` set and Φ* = β·log g, so ``get_transform(pol.transform)``
    reproduces it.  Cached on (procedure, β to 12 digits).
    """
    proc = _procedure(procedure, n)
    if (beta is None) == (kl is None):
        raise ValueError("optimal_policy: give exactly one of beta= or kl=.")
    if kl is not None:
        beta = _beta_for_optimal_kl(proc.spec, round(float(kl), 12))
    beta = float(f"{_check_beta(beta):.12g}")
    return _optimal_policy_cached(proc.spec, beta)


def _optimal_transform_spec(procedure: InferenceProcedure, beta: float) -> str:
    return OptimalTransform.spec_for(procedure, beta)


@lru_cache(maxsize=512)
def _optimal_policy_cached(procedure: str, beta: float) -> CalibratedPolicy:
    solution = _optimal.solve_optimal(procedure, beta)
    return CalibratedPolicy.from_log_density(solution.grid, solution.log_density, beta=beta,
                                             transform=_optimal_transform_spec(_procedure(procedure), beta))


def _optimal_kl(procedure: str, beta: float) -> float:
    return _optimal.optimal_kl(procedure, float(f"{beta:.12g}"))


_OPTIMAL_KL_SOLVED: dict[str, list[tuple[float, float]]] = {}


@lru_cache(maxsize=512)
def _beta_for_optimal_kl(procedure: str, kl: float) -> float:
    if not (math.isfinite(kl) and kl > 0):
        raise ValueError(f"KL budget must be a finite number > 0, got {kl!r}.")
    proc = _procedure(procedure)
    if proc.is_standard:
        return beta_for_kl("identity", kl)

    def kl_at(log_beta: float) -> float:
        return _optimal_kl(procedure, math.exp(log_beta))

    solved = _OPTIMAL_KL_SOLVED.setdefault(procedure, [])
    if solved:  # warm start: log β of the nearest KL already solved
        start, factor = min(solved, key=lambda item: abs(math.log(item[0]) - math.log(kl)))[1], 1.5
    else:
        start, factor = math.log(0.1), 10.0
    try:
        beta = _solve_log_beta(kl_at, kl, start, f"the optimal {proc.label} policy", math.log(1e-6), math.log(1e4),
                               factor=factor, xtol=1e-8)
    except ValueError as error:
        if "unreachable" not in str(error):
            raise
        reach = kl_at(math.log(1e-6))
        raise ValueError(
            f"KL budget {kl:g} is unreachable for the optimal {proc.label} policy: the optimum never spends that "
            f"much KL (at beta = 1e-6 it uses {reach:.4g} nats and already wins with probability "
            f"{optimal_policy(proc, beta=1e-6).win_rate(proc):.6f}; more KL buys nothing). Give beta= instead, or "
            "a smaller KL budget."
        ) from None
    solved.append((kl, math.log(beta)))
    return float(f"{beta:.12g}")


# ----------------------------------------------------------------------------------------------------------------
# frontiers and plots
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FrontierPoint:
    """One point of a win-rate-vs-KL frontier."""

    transform: str
    beta: float
    kl: float
    win_rate: float
    standard_win_rate: float


def _is_optimal(transform: Any) -> bool:
    return isinstance(transform, str) and transform.strip() == "optimal"


def _optimal_sweep(procedure: str, kl_max: float, ratio: float = 0.6) -> tuple[list[float], list[float]]:
    """(β, KL) of the optimum on a geometric β grid from 30 down until KL exceeds `kl_max` (or β < 1e-6)."""
    betas, values = [], []
    beta = 30.0
    while beta >= 1e-6:
        b = float(f"{beta:.12g}")
        betas.append(b)
        values.append(_optimal_kl(procedure, b))
        if values[-1] > kl_max * 1.05:
            break
        beta *= ratio
    return betas, values


def _optimal_at_kls(procedure: InferenceProcedure, kls: Sequence[float]) -> list[CalibratedPolicy]:
    """Optimal policies near each requested KL, cheaply: a geometric β sweep (warm-started shooting) gives KL(β);
    log β is interpolated (monotone PCHIP) at each KL, corrected by one Newton step, and the optimum solved there.
    The returned policies' KLs match the requested ones to ~1e-5 (exact values reported); unreachable KLs are skipped."""
    from scipy.interpolate import PchipInterpolator

    kls = [float(k) for k in kls if k > 0]
    if not kls:
        return []
    if procedure.is_standard:
        return [optimal_policy(procedure, kl=k) for k in kls]
    betas, values = _optimal_sweep(procedure.spec, max(kls))
    order = np.argsort(values)
    kl_sorted = np.asarray(values)[order]
    keep = np.concatenate([[True], np.diff(kl_sorted) > 0])
    log_beta = PchipInterpolator(kl_sorted[keep], np.log(np.asarray(betas)[order][keep]))
    out = []
    for k in kls:
        if not (kl_sorted[0] <= k <= kl_sorted[-1]):
            try:  # outside the sweep: fall back on the exact KL solve (raises if unreachable)
                out.append(optimal_policy(procedure, kl=k))
            except ValueError:
                pass
            continue
        lb = float(log_beta(k))  # one Newton step on KL(log β) with the interpolant's slope
        kl_here = _optimal_kl(procedure.spec, math.exp(lb))
        slope = float(log_beta.derivative()(k))
        lb = min(max(lb + slope * (k - kl_here), math.log(1e-6)), math.log(1e4))
        out.append(optimal_policy(procedure, beta=math.exp(lb)))
    return out


def frontier(
    transforms: "str | Transform | Iterable[str | Transform]", procedure: "str | InferenceProcedure" = "bon",
    n: int | None = None,
    kls: Sequence[float] | None = None, betas: Sequence[float] | None = None,
) -> list[FrontierPoint]:
    r"""Win rate vs KL curves: for each transform and each KL budget (or β), the policy g ∝ exp(Φ/β) and its
    (KL, procedure win rate, standard win rate) (notes §2; arXiv 2412.19792 Fig. 2-3).

    "optimal" is a pseudo-transform: :func:`optimal_policy` for (procedure, n) at each β, or at each KL (via a β
    sweep and interpolation, so its points' KLs match `kls` to ~1e-5; the exact KL is reported).  KL budgets a
    transform cannot reach are skipped.  Default `kls`: 25 values in (0, 3] (:data:`DEFAULT_KLS`).
    """
    procedure = _procedure(procedure, n)
    if isinstance(transforms, str) or not isinstance(transforms, Iterable):
        transforms = [transforms]
    if kls is not None and betas is not None:
        raise ValueError("frontier: give kls= or betas=, not both.")
    if kls is None and betas is None:
        kls = DEFAULT_KLS
    points: list[FrontierPoint] = []
    for tr in transforms:
        if _is_optimal(tr):
            label = "optimal"
            if betas is not None:
                pols = [optimal_policy(procedure, beta=b) for b in betas]
            else:
                pols = _optimal_at_kls(procedure, kls)
        else:
            resolved = _resolve(tr)
            label = resolved.spec
            key = tr if isinstance(tr, str) else resolved
            if betas is not None:
                pols = [policy(key, b) for b in betas]
            else:
                pols = []
                for k in kls:
                    try:
                        pols.append(policy(key, beta_for_kl(key, k)))
                    except ValueError:
                        continue
        for p in pols:
            points.append(FrontierPoint(transform=label, beta=float(p.beta), kl=p.kl(),
                                        win_rate=p.win_rate(procedure), standard_win_rate=p.standard_win_rate()))
    return points


def plot_frontiers(
    procedure: "str | InferenceProcedure", n: int | None, transforms: "Iterable[str | Transform]",
    kls: Sequence[float] | None = None,
    path: str | None = None, ax=None,
):
    """Plot win rate vs KL(π‖π_ref) for each transform (and "optimal") with :func:`frontier`; returns the Axes.

    Saves to `path` when given.  Needs matplotlib (``pip install trl-infalign[plot]``).
    """
    procedure = _procedure(procedure, n)
    from ._plotting import pyplot

    plt = pyplot("plot_frontiers", headless=ax is None and path is not None)
    if isinstance(transforms, str):
        transforms = [transforms]
    own_fig = ax is None
    if own_fig:
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
    else:
        fig = ax.figure
    kl_grid = list(DEFAULT_KLS if kls is None else kls)
    for tr in transforms:
        if _is_optimal(tr) and not procedure.is_standard:
            # the optimal curve is drawn at the points of a β sweep (no per-KL β solve: much faster)
            betas, values = _optimal_sweep(procedure.spec, max(kl_grid), ratio=0.7)
            lo, hi = min(kl_grid), max(kl_grid)
            chosen = [b for b, k in zip(betas, values) if 0.8 * lo <= k <= 1.05 * hi]
            pts = sorted(frontier([tr], procedure, betas=chosen), key=lambda p: p.kl)
        else:
            pts = frontier([tr], procedure, kls=kl_grid)
        if not pts:
            continue
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if pts[0].transform == "optimal" else {}
        ax.plot([p.kl for p in pts], [p.win_rate for p in pts], marker="o", markersize=2.5, label=pts[0].transform,
                **style)
    ax.set_xlabel("KL(π ‖ π_ref) [nats]")
    import textwrap

    label = procedure.label
    ax.set_ylabel(f"{label} win rate vs π_ref" if len(label) <= 28 else "win rate vs π_ref (procedure above)")
    ax.set_title("\n".join(textwrap.wrap(f"Calibrated-space frontiers: {label}", 60)), fontsize=10)
    from ._plotting import finish_axes

    return finish_axes(fig, ax, path, own_fig)


def clear_caches() -> None:
    """Forget every cached policy, β solve and shooting warm start (for benchmarks and memory)."""
    _POLICY_CACHE.clear()
    _optimal.clear_caches()
    _OPTIMAL_KL_SOLVED.clear()
    for cached in (_best_t_cached, _best_t_for_beta_cached, _optimal_policy_cached,
                   _beta_for_optimal_kl):
        cached.cache_clear()
