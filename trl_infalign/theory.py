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

PROCEDURES = ("standard", "bon", "won")
#: Default KL grid of :func:`frontier`: 25 values in (0, 3].
DEFAULT_KLS = tuple(float(k) for k in np.linspace(0.12, 3.0, 25))

_TAIL = 40.0  # nats below the max of log g that still matter (e^-40 ≈ 4e-18)
_TOL = 0.1  # max change of log g between neighbouring grid points (within the tail)
_CURVATURE_TOL = 2e-4  # max |second difference| of log g (interpolation error ≈ 1/8 of it)
_BASE_POINTS = 1025
_MAX_POINTS = 300_000


# ----------------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------------
def _check_procedure(procedure: str, n: int) -> tuple[str, int]:
    if procedure not in PROCEDURES:
        raise ValueError(f"Unknown inference procedure {procedure!r}: expected one of {', '.join(PROCEDURES)}.")
    if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}.")
    return procedure, int(n)


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}.")
    return beta


def _resolve(transform: "str | Transform") -> "Transform":
    from .transforms import get_transform

    return get_transform(transform)


def _spec_of(transform: Any) -> str:
    return transform if isinstance(transform, str) else str(getattr(transform, "spec", transform))


# ----------------------------------------------------------------------------------------------------------------
# piecewise-exponential quadrature
# ----------------------------------------------------------------------------------------------------------------
def _psi(x: np.ndarray) -> np.ndarray:
    """∫₀¹ e^{-x u} du = (1 − e^{−x})/x for x ≥ 0 (1 at 0, 0 at +inf)."""
    out = np.empty_like(x)
    small = x < 1e-6
    xs = x[small]
    out[small] = 1.0 - xs / 2.0 + xs * xs / 6.0
    xl = x[~small]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        out[~small] = -np.expm1(-xl) / xl
    out[np.isinf(x)] = 0.0
    return out


def _chi(x: np.ndarray) -> np.ndarray:
    """∫₀¹ u e^{−x u} du = (1 − e^{−x}(1 + x))/x² for x ≥ 0 (1/2 at 0, 0 at +inf)."""
    out = np.empty_like(x)
    small = x < 1e-3
    xs = x[small]
    out[small] = 0.5 - xs / 3.0 + xs * xs / 8.0 - xs**3 / 30.0
    xl = x[~small]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        out[~small] = (-np.expm1(-xl) - xl * np.exp(-xl)) / (xl * xl)
    out[np.isinf(x)] = 0.0
    return out


@dataclass
class _Stats:
    shift: float  # max of the unnormalised log-density
    log_total: float  # log ∫ exp(ell − shift): log-density = ell − shift − log_total
    seg_mass: np.ndarray  # normalised mass of each segment
    seg_mean: np.ndarray  # mean c within each segment
    cdf: np.ndarray  # G at the grid points
    kl: float
    grid: np.ndarray
    log_density: np.ndarray  # normalised


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(4)
_PIECE_TOL = 0.25  # max drop of log[(1−u)^{N−1} (1−M)^N] across one quadrature piece (see _order_statistic_tail)
_TAIL_CUT = 60.0  # pieces whose integrand is below e^{−60}·N everywhere are dropped (they add < N·e^{−60})


def _order_statistic_tail(u: np.ndarray, ell: np.ndarray, n: int) -> float:
    r"""T = ∫₀¹ N (1−u)^{N−1} (1 − M(u))^N du for the piecewise-exponential density exp(ell) on the grid `u`
    (0 = u[0] < … < u[-1] = 1), M(u) = ∫₀^u exp(ell) its mass within u of the end u = 0.

    With u = 1 − c and M = 1 − G this is the BoN-N tail (W_bon = 1 − T); with u = c and M = G it is WoN-N
    (W_won = T).  The integrand e^L, L = log N + (N−1) log(1−u) + N log(1−M), is decreasing in u and, at large N,
    lives on u ≲ 1/(N (1 + g(end))) — often far inside the first grid segment.  So the segments are cut into pieces,
    repeatedly, until L drops by ≤ 0.25 across every piece where e^L > e^{−60}·N (dead pieces are dropped: they
    add < N·e^{−60}); each piece gets 4 Gauss-Legendre nodes, with M exact inside the segment.  Cost: the grid plus
    ≈ 4·(60 + 60)/0.25 nodes whatever N; accurate to ~1e-9 at every N (tests compare with adaptive ODE quadratures
    up to N = 10⁶).
    """
    h_all, a_all = np.diff(u), ell[:-1]
    with np.errstate(invalid="ignore"):
        d_all = np.diff(ell)  # NaN where both ends are −inf (no mass)
    mass = _mass_inside(h_all, a_all, d_all, np.ones_like(h_all))
    total = float(mass.sum())
    M = np.concatenate([[0.0], np.cumsum(mass)]) / total

    def log_weight(seg, s):  # L − log N at fraction s of segment `seg`
        inside = _mass_inside(h_all[seg], a_all[seg], d_all[seg], s) / total
        with np.errstate(divide="ignore", invalid="ignore"):
            return (n - 1) * np.log1p(-(u[seg] + h_all[seg] * s)) + n * np.log1p(-np.minimum(M[seg] + inside, 1.0))

    seg = np.arange(h_all.size)
    left, right = np.zeros(seg.size), np.ones(seg.size)  # pieces as fractions of their segment
    for _ in range(60):
        L_left, L_right = log_weight(seg, left), log_weight(seg, right)
        live = (L_left > -_TAIL_CUT) & (h_all[seg] > 0)
        seg, left, right, L_left, L_right = seg[live], left[live], right[live], L_left[live], L_right[live]
        drop = L_left - np.maximum(np.nan_to_num(L_right, nan=-np.inf), -_TAIL_CUT)
        split = drop > _PIECE_TOL
        if not split.any():
            break
        k = np.where(split, np.clip(np.ceil(drop / _PIECE_TOL), 2, 64), 1).astype(np.int64)
        first = np.repeat(np.cumsum(k) - k, k)
        j = (np.arange(k.sum()) - first).astype(np.float64)
        kk = np.repeat(k, k).astype(np.float64)
        width = np.repeat(right - left, k) / kk
        start = np.repeat(left, k) + j * width
        seg, left, right = np.repeat(seg, k), start, np.minimum(start + width, np.repeat(right, k))
    if seg.size == 0:
        return 0.0
    s = left[:, None] + (right - left)[:, None] * 0.5 * (_GL_NODES[None, :] + 1.0)
    seg2 = np.broadcast_to(seg[:, None], s.shape)
    with np.errstate(under="ignore"):
        integrand = n * np.exp(log_weight(seg2, s))
    weights = 0.5 * _GL_WEIGHTS[None, :] * (h_all[seg] * (right - left))[:, None]
    return float(np.sum(weights * integrand))


def _mass_inside(h, a, delta, s):
    """∫₀^{s·h} exp(a + δ v/h) dv: mass of a piecewise-exponential segment (log-density a → a + δ) up to fraction s."""
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        top = np.maximum(a, a + delta * s)
        xs = np.abs(delta) * s
        xs = np.where(np.isnan(xs), np.inf, xs)
        finite = np.isfinite(top)
        return np.where(finite, h * s * np.exp(np.where(finite, top, 0.0)) * _psi(xs), 0.0)


def _segment_stats(grid: np.ndarray, ell: np.ndarray) -> _Stats:
    """Exact integrals of the piecewise-exponential density exp(ell) (ell linear between grid points)."""
    finite_points = np.isfinite(ell)
    if not finite_points.any():
        raise ValueError("log-density is -inf everywhere.")
    shift = float(ell[finite_points].max())
    ell = ell - shift  # exact near the max even when |ell| ~ 1e29 (Φ = e^{60 c})
    a, b = ell[:-1], ell[1:]
    h = np.diff(grid)
    hi = np.maximum(a, b)
    finite = np.isfinite(hi)
    left_high = a >= b
    with np.errstate(invalid="ignore"):
        x = np.abs(b - a)
    x = np.where(finite, x, np.inf)
    x = np.where(np.isnan(x), 0.0, x)
    c_hi = np.where(left_high, grid[:-1], grid[1:])
    c_lo = np.where(left_high, grid[1:], grid[:-1])
    psi, chi = _psi(x), _chi(x)
    with np.errstate(under="ignore"):
        w = np.where(finite, h * np.exp(np.where(finite, hi, 0.0)), 0.0)
    raw = w * psi
    total = float(raw.sum())
    if not (total > 0 and math.isfinite(total)):
        raise ValueError("density is not normalisable.")
    log_total = math.log(total)
    mass = raw / total
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(psi > 0, c_hi + (c_lo - c_hi) * chi / np.where(psi > 0, psi, 1.0), 0.5 * (c_hi + c_lo))
    # ∫ g log g over a segment: h e^{hi-L} [(hi-L) ψ(x) − x χ(x)]
    hl = np.where(finite, hi - log_total, 0.0)
    with np.errstate(invalid="ignore"):
        xchi = np.where(np.isinf(x), 0.0, x * chi)
    kl = float(np.sum(np.where(w > 0, (w / total) * (hl * psi - xchi), 0.0)))
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    cdf = np.clip(cdf / cdf[-1], 0.0, 1.0)
    return _Stats(shift=shift, log_total=log_total, seg_mass=mass, seg_mean=mean, cdf=cdf, kl=max(kl, 0.0),
                  grid=grid, log_density=ell - log_total)


def _evaluate(logf, c: np.ndarray) -> np.ndarray:
    f = np.asarray(logf(c), dtype=np.float64)
    if f.shape != c.shape:
        f = np.broadcast_to(f, c.shape).astype(np.float64)
    if np.isnan(f).any() or np.isposinf(f).any():
        raise ValueError("log-density is NaN or +inf on [0, 1] (Φ(c)/β overflows?).")
    return f


def _adaptive_grid(logf, n0: int = _BASE_POINTS, tol: float = _TOL, initial: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Grid of [0, 1] on which the vectorised `logf` changes by ≤ tol between neighbours (within _TAIL of its max)."""
    c = np.linspace(0.0, 1.0, n0)
    if initial is not None:
        c = np.unique(np.clip(np.concatenate([c, np.asarray(initial, dtype=np.float64)]), 0.0, 1.0))
    f = _evaluate(logf, c)
    for _ in range(200):
        finite = np.isfinite(f)
        if not finite.any():
            raise ValueError("log-density is -inf everywhere on [0, 1].")
        top = float(f[finite].max())
        a, b = f[:-1], f[1:]
        hi = np.maximum(a, b)
        with np.errstate(invalid="ignore"):
            d = np.abs(b - a)
        d = np.where(np.isnan(d), 0.0, d)
        h = np.diff(c)
        min_width = np.maximum(8.0 * np.spacing(c[1:]), 1e-13)
        # also refine where log g bends: linear interpolation errs by ≈ |second difference| / 8
        with np.errstate(invalid="ignore"):
            d2 = np.abs(f[2:] - f[1:-1] - (f[1:-1] - f[:-2]) * (h[1:] / h[:-1]))
        d2 = np.where(np.isfinite(d2), d2, 0.0)
        bend = np.zeros_like(d)
        bend[1:] = d2
        bend[:-1] = np.maximum(bend[:-1], d2)
        need = (hi >= top - _TAIL) & ((d > tol) | (bend > _CURVATURE_TOL)) & (h > min_width)
        if not need.any() or c.size > _MAX_POINTS:
            break
        idx = np.nonzero(need)[0]
        k = np.clip(np.maximum(np.ceil(np.minimum(d[idx], 1e6) / tol),
                               np.ceil(np.sqrt(np.minimum(bend[idx], 1e6) / _CURVATURE_TOL))), 2, 16).astype(np.int64)
        reps = k - 1
        seg = np.repeat(idx, reps)
        j = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps) + 1
        new_c = c[seg] + h[seg] * j / np.repeat(k, reps)
        new_f = _evaluate(logf, new_c)
        c = np.concatenate([c, new_c])
        f = np.concatenate([f, new_f])
        order = np.argsort(c, kind="stable")
        c, f = c[order], f[order]
        keep = np.concatenate([[True], np.diff(c) > 0])
        c, f = c[keep], f[keep]
    return c, f


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
        _, n = _check_procedure("bon", n)
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

    def win_rate(self, procedure: str = "standard", n: int = 1) -> float:
        """Inference-time win rate against π_ref run through the same procedure (notes §2, arXiv 2412.19792 §3):

        standard: ∫ g c;  bon: ∫ N G^{N−1} g c^N = ∫ c^N d(G^N);  won: ∫ (1 − (1−c)^N) d(1 − (1−G)^N).
        """
        procedure, n = _check_procedure(procedure, n)
        if procedure == "standard" or n == 1:
            return self.standard_win_rate()
        # integrate by parts: W_bon = 1 − ∫ N c^{N−1} G^N dc;  W_won = ∫ N (1−c)^{N−1} (1−G)^N dc
        if procedure == "bon":
            return float(np.clip(1.0 - _order_statistic_tail(1.0 - self.grid[::-1], self.log_density[::-1], n), 0, 1))
        return float(np.clip(_order_statistic_tail(self.grid, self.log_density, n), 0.0, 1.0))

    def summary(self, procedure: str = "bon", n: int = 4) -> dict:
        """KL and win rates as a dict (what the CLI prints)."""
        out = {"beta": self.beta, "kl": self.kl(), "win_rate": self.win_rate(procedure, n),
               "standard_win_rate": self.standard_win_rate()}
        if n > 1:
            out["bon_win_rate"] = self.win_rate("bon", n)
            out["won_win_rate"] = self.win_rate("won", n)
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


def win_rate(transform: "str | Transform", beta: float, procedure: str = "standard", n: int = 1) -> float:
    """Win rate of g ∝ exp(Φ/β) under `procedure` (standard ∫gc; bon ∫NG^{N−1}gc^N; won ∫N(1−G)^{N−1}g(1−(1−c)^N))."""
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
    return math.expm1(t) if family == "bon" else -math.expm1(-t)


def _default_family(procedure: str, family: str | None) -> str:
    if family is not None:
        if family not in ("bon", "won"):
            raise ValueError(f"family must be 'bon' or 'won', got {family!r}.")
        return family
    return "won" if procedure == "won" else "bon"


def _check_min_beta(min_beta: float) -> float:
    value = float(min_beta)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"min_beta must be a finite number >= 0 (0 disables the floor), got {min_beta!r}.")
    return value


def t_range(procedure: str, n: int) -> tuple[float, float]:
    r"""The exp-family t interval :func:`best_t` and :func:`best_t_for_beta` search: [0.01, min(700, 60·max(1, N/4)²)].

    The best t grows faster than N (BoN-N at KL 0.5: t* ≈ 4.6, 12.6, 34, 104, 396, 2 250 for N = 2 … 64; WoN-N:
    t* ≈ 2.5 N), because at large N the win rate is decided within u = 1 − c ≲ 1/N of the top.  The range is capped
    at t = 700, the largest t the `bon`/`won` transforms accept (exp(t) must be finite), so for BoN beyond N ≈ 32
    (KL 0.5) the answer sits on the cap and :func:`best_t` warns.  `standard` counts as N = 1.
    """
    procedure, n = _check_procedure(procedure, n)
    n_eff = 1 if procedure == "standard" else n
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


def _bound_advice(caller: str, bound: str, family: str, procedure: str, n: int, where: str, t: float,
                  t_hi: float, min_beta: float, better: tuple[float, float] | None, what: str = "win rate") -> str:
    """The UserWarning text of :func:`best_t` / :func:`best_t_for_beta` when the answer sits on a limit."""
    head = f"{caller}: the best {family} exp-family t for {procedure}-{n} at {where} "
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


def best_t(procedure: str, n: int, kl: float, family: str | None = None, *,
           min_beta: float = DEFAULT_MIN_BETA, t_max: float | None = None) -> BestT:
    r"""Best exp-family transform at a KL budget (arXiv 2412.19792 §4: CTRL's BoN/WoN transforms).

    family "bon": Φ_t(c) = exp(t·c); "won": Φ_t(c) = −exp(−t·c).  The default family is the procedure's own ("bon" for
    bon, "won" for won) and "bon" for `standard` — where the identity transform is exactly optimal (the t → 0 limit
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
    member reaches the budget under the floor.  Cached on (procedure, n, kl, family, min_beta, t_max).
    """
    procedure, n = _check_procedure(procedure, n)
    family = _default_family(procedure, family)
    kl_value = float(kl)
    if not (math.isfinite(kl_value) and kl_value > 0):
        raise ValueError(f"kl (the KL budget) must be a finite number > 0, got {kl!r}.")
    min_beta = _check_min_beta(min_beta)
    t_hi = _check_t_max(t_max, procedure, n)
    result = _best_t_cached(procedure, n, round(kl_value, 12), family, min_beta, t_hi)
    if result.on_bound:
        import warnings

        warnings.warn(_bound_advice("best_t", result.bound, family, procedure, n, f"KL {kl_value:g}", result.t, t_hi,
                                    min_beta, result.unconstrained), UserWarning, stacklevel=2)
    return result


def _check_t_max(t_max: float | None, procedure: str, n: int) -> float:
    if t_max is None:
        return t_range(procedure, n)[1]
    value = float(t_max)
    if not (math.isfinite(value) and T_RANGE[0] < value <= T_CAP):
        raise ValueError(f"t_max must be a number in ({T_RANGE[0]:g}, {T_CAP:g}], got {t_max!r}.")
    return value


@lru_cache(maxsize=256)
def _best_t_cached(procedure: str, n: int, kl: float, family: str, min_beta: float, t_hi: float) -> BestT:
    def evaluate(lt: float) -> tuple[float, float]:
        t = math.exp(lt)
        spec = _family_spec(family, t)
        beta = beta_for_kl(spec, kl)
        return policy(spec, beta).win_rate(procedure, n), beta / _family_span(family, t)

    t, bound, better = _search_log_t(evaluate, T_RANGE[0], t_hi, min_beta)
    spec = _family_spec(family, t)
    t = float(spec.split("=", 1)[1])
    beta = beta_for_kl(spec, kl)
    pol = policy(spec, beta)
    return BestT(t=t, beta=beta, kl=pol.kl(), win_rate=pol.win_rate(procedure, n),
                 standard_win_rate=pol.standard_win_rate(), family=family,
                 normalised_beta=beta / _family_span(family, t), on_bound=bound is not None, bound=bound,
                 t_range=(T_RANGE[0], t_hi), min_beta=min_beta,
                 unconstrained=None if better is None else (float(f"{better[1]:.6g}"), better[0]))


def best_t_for_beta(procedure: str, n: int, beta: float, family: str | None = None, *,
                    min_beta: float = DEFAULT_MIN_BETA, t_max: float | None = None,
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
    procedure, n = _check_procedure(procedure, n)
    beta = _check_beta(beta)
    family = _default_family(procedure, family)
    min_beta = _check_min_beta(min_beta)
    t_hi = _check_t_max(t_max, procedure, n)
    t, bound, better = _best_t_for_beta_cached(procedure, n, float(f"{beta:.12g}"), family, min_beta, t_hi)
    if bound is not None:
        import warnings

        warnings.warn(_bound_advice("best_t_for_beta", bound, family, procedure, n, f"beta {beta:g}", t, t_hi,
                                    min_beta, better, what="win rate − beta·KL"), UserWarning, stacklevel=2)
    if not details:
        return t
    pol = policy(_family_spec(family, t), beta)
    return BestT(t=t, beta=beta, kl=pol.kl(), win_rate=pol.win_rate(procedure, n),
                 standard_win_rate=pol.standard_win_rate(), family=family,
                 normalised_beta=beta / _family_span(family, t), on_bound=bound is not None, bound=bound,
                 t_range=(T_RANGE[0], t_hi), min_beta=min_beta, unconstrained=better)


@lru_cache(maxsize=256)
def _best_t_for_beta_cached(procedure: str, n: int, beta: float, family: str, min_beta: float, t_hi: float
                            ) -> tuple[float, str | None, tuple[float, float] | None]:
    def evaluate(lt: float) -> tuple[float, float]:
        t = math.exp(lt)
        pol = policy(_family_spec(family, t), beta)
        return pol.win_rate(procedure, n) - beta * pol.kl(), beta / _family_span(family, t)

    t, bound, better = _search_log_t(evaluate, T_RANGE[0], t_hi, min_beta)
    return float(f"{t:.6g}"), bound, None if better is None else (float(f"{better[1]:.6g}"), better[0])


# ----------------------------------------------------------------------------------------------------------------
# the KL-regularised optimum over all densities
# ----------------------------------------------------------------------------------------------------------------
def _shoot(log_g1: float, n: int, beta: float, sign: float, dense: bool = False):
    """Integrate the first-order conditions backwards from c = 1 (G = 1, ψ = 0):

        G' = g = exp(log_g1 + sign·ψ/β),   ψ' = N² c^{N−1} G^{N−1},   K' = g log g.
    Returns (residual, solution): residual = G(0) (≥ 0: too little mass) or −c₀ if G hits 0 at c₀ > 0.
    """
    from scipy.integrate import solve_ivp

    nn = float(n * n)
    p = n - 1
    inv_beta = sign / beta

    def rhs(c, y):
        G = min(max(y[0], 0.0), 1.0)
        ell = log_g1 + y[1] * inv_beta
        g = math.exp(min(ell, 60.0))
        return [g, nn * c**p * G**p, g * ell]

    def hit_zero(c, y):
        return y[0]

    hit_zero.terminal = True
    sol = solve_ivp(rhs, (1.0, 0.0), [1.0, 0.0, 0.0], method="DOP853", rtol=1e-9, atol=1e-12,
                    events=hit_zero, dense_output=dense)
    if sol.t_events[0].size:
        return -float(sol.t_events[0][0]), sol
    return float(sol.y[0, -1]), sol


_LAST_ROOTS: dict[tuple[int, float], list[tuple[float, float]]] = {}


def _root_log_g1(n: int, beta: float, sign: float) -> float:
    """Solve the shooting residual G(0; log g(1)) = 0 (monotone decreasing in log g(1)) with Brent's method.

    Bracket: BoN (sign +1): g increasing so 1 ≤ g(1) ≤ (N²/β)/(1 − e^{−N²/β}); mirrored WoN (sign −1): g decreasing
    and Φ* has range ≤ N, so e^{−N/β} ≤ g(1) ≤ 1.  Warm-started from the nearest β already solved.
    """
    from scipy.optimize import brentq

    if sign > 0:
        lo = -0.1
        hi = math.log(n * n / beta) - math.log(-math.expm1(-n * n / beta)) + 0.1
    else:
        lo, hi = -n / beta - 1.0, 0.1

    def residual(l1):
        return _shoot(l1, n, beta, sign)[0]

    history = _LAST_ROOTS.setdefault((n, sign), [])
    r_lo = r_hi = None
    if history:
        lb = math.log(beta)
        prev_lb, prev_l1 = min(history, key=lambda item: abs(item[0] - lb))
        guess = prev_l1 if sign > 0 else prev_l1 * math.exp(prev_lb - lb)
        guess = min(max(guess, lo), hi)
        step = 1e-3 * (1.0 + abs(guess)) + abs(lb - prev_lb)
        r_g = residual(guess)
        if r_g == 0:
            return guess
        direction = 1.0 if r_g > 0 else -1.0  # too little mass: raise log g(1)
        a, r_a = guess, r_g
        for _ in range(60):
            b = min(max(a + direction * step, lo), hi)
            r_b = residual(b)
            if (r_b > 0) != (r_g > 0) or b in (lo, hi):
                break
            a, r_a = b, r_b
            step *= 4.0
        if (r_b > 0) != (r_g > 0) or r_b == 0:
            lo, hi, r_lo, r_hi = (a, b, r_a, r_b) if direction > 0 else (b, a, r_b, r_a)
    if r_lo is None:
        r_lo, r_hi = residual(lo), residual(hi)
    if not (r_lo >= 0 >= r_hi):
        raise RuntimeError(f"optimal_policy: shooting bracket failed (n={n}, beta={beta}).")
    root = brentq(residual, lo, hi, xtol=1e-7, rtol=1e-12, maxiter=300)
    history.append((math.log(beta), root))
    if len(history) > 256:
        del history[: len(history) - 256]
    return root


@lru_cache(maxsize=1024)
def _optimal_core(procedure: str, n: int, beta: float) -> tuple[float, float, float]:
    """(log g1, sign, KL) of the optimum."""
    if procedure == "standard" or n == 1:
        return (float("nan"), 0.0, _identity_policy(beta).kl())
    sign = 1.0 if procedure == "bon" else -1.0
    l1 = _root_log_g1(n, beta, sign)
    _, sol = _shoot(l1, n, beta, sign)
    return (l1, sign, max(-float(sol.y[2, -1]), 0.0))


def _identity_policy(beta: float) -> CalibratedPolicy:
    return _policy_from_logf(lambda c: c / beta, beta, "identity")


@lru_cache(maxsize=512)
def _optimal_policy_cached(procedure: str, n: int, beta: float) -> CalibratedPolicy:
    spec = f"optimal:procedure={procedure},n={n},beta={beta:.12g}"
    if procedure == "standard" or n == 1:
        pol = _identity_policy(beta)
        return CalibratedPolicy.from_log_density(pol.grid, pol.log_density, beta=beta, transform=spec)
    l1, sign, _ = _optimal_core(procedure, n, beta)
    _, sol = _shoot(l1, n, beta, sign, dense=True)
    # grid: the ODE steps, refined until log g changes by <= 0.1 between neighbours (c is the mirror for WoN)
    if sign > 0:
        def logf(c):
            return l1 + sol.sol(c)[1] / beta

        initial = sol.t
    else:
        def logf(c):
            return l1 - sol.sol(1.0 - c)[1] / beta

        initial = 1.0 - sol.t
    c, ell = _adaptive_grid(logf, n0=513, tol=0.05, initial=initial)
    return CalibratedPolicy.from_log_density(c, ell, beta=beta, transform=spec)


def optimal_policy(procedure: str, n: int, beta: float | None = None, kl: float | None = None) -> CalibratedPolicy:
    r"""The KL-regularised optimum over all densities: argmax_g W_procedure(g) − β·KL(g) (notes §2; InfAlign,
    arXiv 2412.19792 §3, "optimal transform").

    The first-order condition gives g ∝ exp(Φ*(c)/β) with Φ* = δW/δg:
      standard / N = 1: Φ*(c) = c (the identity transform, g ∝ e^{c/β});
      BoN-N: Φ*(c) = ∫₀^c N² u^{N−1} G(u)^{N−1} du  (W = 1 − ∫ N c^{N−1} G^N dc is concave in g: unique optimum);
      WoN-N: Φ*(c) = ∫₀^c N² (1−u)^{N−1} (1−G(u))^{N−1} du (the BoN problem for the mirror g̃(c) = g(1−c), minimised).
    Together with G' = g this is a 2-state ODE boundary-value problem (G(0) = 0, G(1) = 1), solved by shooting on
    log g(1) (DOP853, rtol 1e-9, Brent on the monotone residual G(0)).  Give exactly one of `beta` or `kl`; with
    `kl` the β reaching that KL is root-found in log β.  The result has `beta` set and Φ* = β·log g, so
    ``get_transform("optimal:procedure=bon,n=4,beta=0.1")`` reproduces it.  Cached on (procedure, n, β to 12 digits).
    """
    procedure, n = _check_procedure(procedure, n)
    if (beta is None) == (kl is None):
        raise ValueError("optimal_policy: give exactly one of beta= or kl=.")
    if kl is not None:
        beta = _beta_for_optimal_kl(procedure, n, round(float(kl), 12))
    beta = float(f"{_check_beta(beta):.12g}")
    return _optimal_policy_cached(procedure, n, beta)


_OPTIMAL_KL_SOLVED: dict[tuple[str, int], list[tuple[float, float]]] = {}


@lru_cache(maxsize=512)
def _beta_for_optimal_kl(procedure: str, n: int, kl: float) -> float:
    if not (math.isfinite(kl) and kl > 0):
        raise ValueError(f"KL budget must be a finite number > 0, got {kl!r}.")
    if procedure == "standard" or n == 1:
        return beta_for_kl(_IDENTITY, kl)

    def kl_at(log_beta: float) -> float:
        return _optimal_core(procedure, n, float(f"{math.exp(log_beta):.12g}"))[2]

    solved = _OPTIMAL_KL_SOLVED.setdefault((procedure, n), [])
    if solved:  # warm start: log β of the nearest KL already solved, shifted by the local slope if known
        start, factor = min(solved, key=lambda item: abs(math.log(item[0]) - math.log(kl)))[1], 1.5
    else:
        start, factor = math.log(0.1), 10.0
    beta = _solve_log_beta(kl_at, kl, start, f"the optimal {procedure}-{n} policy", math.log(1e-6), math.log(1e4),
                           factor=factor, xtol=1e-8)
    solved.append((kl, math.log(beta)))
    return float(f"{beta:.12g}")


class _Identity:
    """Internal Φ(c) = c, so the standard optimum does not depend on the transforms registry."""

    name = "identity"
    spec = "identity"
    params: dict = {}

    @staticmethod
    def phi(c):
        return np.asarray(c, dtype=np.float64)


_IDENTITY = _Identity()


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


def _optimal_sweep(procedure: str, n: int, kl_max: float, ratio: float = 0.6) -> tuple[list[float], list[float]]:
    """(β, KL) of the optimum on a geometric β grid from 30 down until KL exceeds `kl_max` (or β < 1e-6)."""
    betas, values = [], []
    beta = 30.0
    while beta >= 1e-6:
        b = float(f"{beta:.12g}")
        betas.append(b)
        values.append(_optimal_core(procedure, n, b)[2])
        if values[-1] > kl_max * 1.05:
            break
        beta *= ratio
    return betas, values


def _optimal_at_kls(procedure: str, n: int, kls: Sequence[float]) -> list[CalibratedPolicy]:
    """Optimal policies near each requested KL, cheaply: a geometric β sweep (warm-started shooting) gives KL(β);
    log β is interpolated (monotone PCHIP) at each KL, corrected by one Newton step, and the optimum solved there.
    The returned policies' KLs match the requested ones to ~1e-5 (exact values reported); unreachable KLs are skipped."""
    from scipy.interpolate import PchipInterpolator

    kls = [float(k) for k in kls if k > 0]
    if not kls:
        return []
    if procedure == "standard" or n == 1:
        return [optimal_policy(procedure, n, kl=k) for k in kls]
    betas, values = _optimal_sweep(procedure, n, max(kls))
    order = np.argsort(values)
    kl_sorted = np.asarray(values)[order]
    keep = np.concatenate([[True], np.diff(kl_sorted) > 0])
    log_beta = PchipInterpolator(kl_sorted[keep], np.log(np.asarray(betas)[order][keep]))
    out = []
    for k in kls:
        if not (kl_sorted[0] <= k <= kl_sorted[-1]):
            try:  # outside the sweep: fall back on the exact KL solve (raises if unreachable)
                out.append(optimal_policy(procedure, n, kl=k))
            except ValueError:
                pass
            continue
        lb = float(log_beta(k))  # one Newton step on KL(log β) with the interpolant's slope
        kl_here = _optimal_core(procedure, n, float(f"{math.exp(lb):.12g}"))[2]
        slope = float(log_beta.derivative()(k))
        lb = min(max(lb + slope * (k - kl_here), math.log(1e-6)), math.log(1e4))
        out.append(optimal_policy(procedure, n, beta=math.exp(lb)))
    return out


def frontier(
    transforms: "str | Transform | Iterable[str | Transform]", procedure: str = "bon", n: int = 4,
    kls: Sequence[float] | None = None, betas: Sequence[float] | None = None,
) -> list[FrontierPoint]:
    r"""Win rate vs KL curves: for each transform and each KL budget (or β), the policy g ∝ exp(Φ/β) and its
    (KL, procedure win rate, standard win rate) (notes §2; arXiv 2412.19792 Fig. 2-3).

    "optimal" is a pseudo-transform: :func:`optimal_policy` for (procedure, n) at each β, or at each KL (via a β
    sweep and interpolation, so its points' KLs match `kls` to ~1e-5; the exact KL is reported).  KL budgets a
    transform cannot reach are skipped.  Default `kls`: 25 values in (0, 3] (:data:`DEFAULT_KLS`).
    """
    procedure, n = _check_procedure(procedure, n)
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
                pols = [optimal_policy(procedure, n, beta=b) for b in betas]
            else:
                pols = _optimal_at_kls(procedure, n, kls)
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
                                        win_rate=p.win_rate(procedure, n), standard_win_rate=p.standard_win_rate()))
    return points


def plot_frontiers(
    procedure: str, n: int, transforms: "Iterable[str | Transform]", kls: Sequence[float] | None = None,
    path: str | None = None, ax=None,
):
    """Plot win rate vs KL(π‖π_ref) for each transform (and "optimal") with :func:`frontier`; returns the Axes.

    Saves to `path` when given.  Needs matplotlib (``pip install trl-infalign[plot]``).
    """
    procedure, n = _check_procedure(procedure, n)
    try:
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plot_frontiers needs matplotlib: pip install trl-infalign[plot]") from error
    if isinstance(transforms, str):
        transforms = [transforms]
    own_fig = ax is None
    if own_fig:
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
    else:
        fig = ax.figure
    kl_grid = list(DEFAULT_KLS if kls is None else kls)
    for tr in transforms:
        if _is_optimal(tr) and procedure != "standard" and n > 1:
            # the optimal curve is drawn at the points of a β sweep (no per-KL β solve: much faster)
            betas, values = _optimal_sweep(procedure, n, max(kl_grid), ratio=0.7)
            lo, hi = min(kl_grid), max(kl_grid)
            chosen = [b for b, k in zip(betas, values) if 0.8 * lo <= k <= 1.05 * hi]
            pts = sorted(frontier([tr], procedure, n, betas=chosen), key=lambda p: p.kl)
        else:
            pts = frontier([tr], procedure, n, kls=kl_grid)
        if not pts:
            continue
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if pts[0].transform == "optimal" else {}
        ax.plot([p.kl for p in pts], [p.win_rate for p in pts], marker="o", markersize=2.5, label=pts[0].transform,
                **style)
    name = {"standard": "standard win rate", "bon": f"Best-of-{n} win rate", "won": f"Worst-of-{n} win rate"}
    ax.set_xlabel("KL(π ‖ π_ref) [nats]")
    ax.set_ylabel(name[procedure] + " vs π_ref")
    ax.set_title(f"Calibrated-space frontiers: procedure={procedure}, N={n}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=130)
        if own_fig:
            plt.close(fig)
    return ax


def clear_caches() -> None:
    """Forget every cached policy, β solve and shooting warm start (for benchmarks and memory)."""
    _POLICY_CACHE.clear()
    _LAST_ROOTS.clear()
    _OPTIMAL_KL_SOLVED.clear()
    for cached in (_best_t_cached, _best_t_for_beta_cached, _optimal_core, _optimal_policy_cached,
                   _beta_for_optimal_kl):
        cached.cache_clear()
