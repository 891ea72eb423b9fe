r"""Piecewise-exponential quadrature in calibrated space (shared by :mod:`theory`, :mod:`procedures` and
:mod:`optimal`; no dependency on either).

A density on c ∈ [0, 1] is a log-density `ell` on a grid, linear between grid points, so every integral of g, g·c
and g·log g is exact per segment; :func:`_adaptive_grid` refines a grid until log g changes by ≤ 0.1 between
neighbours and bends by ≤ 2e-4 (within 40 nats of its max); :func:`_order_statistic_tail` integrates the BoN/WoN
order-statistic functionals accurately at any N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


_TAIL = 40.0  # nats below the max of log g that still matter (e^-40 ≈ 4e-18)
_TOL = 0.1  # max change of log g between neighbouring grid points (within the tail)
_CURVATURE_TOL = 2e-4  # max |second difference| of log g (interpolation error ≈ 1/8 of it)
_BASE_POINTS = 1025
_MAX_POINTS = 300_000


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
