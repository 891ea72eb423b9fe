r"""The optimal transform for any inference procedure, from the first-order condition (InfAlign, arXiv 2412.19792 §3).

For a procedure with win-rate functional W(g) (:mod:`trl_infalign.procedures`), the KL-regularised optimum
max_g W(g) − β·KL(g) over calibrated-space densities g satisfies

    g(c) = exp(Φ*(c)/β) / Z,        dΦ*/dc = k(c, G(c)) = Σ_j w_j f_j'(G(c)) f_j'(c) ≥ 0,        G' = g,

so Φ* is increasing, g is largest at c = 1 and log g(c) = log g(1) − ψ(c)/β with ψ(c) = ∫_c^1 k(s, G(s)) ds.  This is
a boundary-value problem in (M = 1 − G, ψ): M(1) = 0, ψ(1) = 0 and M(0) = 1.  It is solved by shooting on log g(1)
(Brent on the residual M(0) − 1, warm-started from the nearest β solved before), integrating in z = logit(c) —
log-spaced towards both ends, where BoN-N and WoN-N concentrate their weight within 1/N of c = 1 resp. c = 0 —
with DOP853 (rtol 1e-10) from z = 40 down to z = −40.  Both M and G = 1 − M, c and 1 − c are carried to full
precision, so N up to 10⁶ (and beyond) is as accurate as N = 4.

This module depends only on :mod:`procedures` and the quadrature helpers, so :mod:`transforms` (the ``optimal``
transform) and :mod:`theory` can both use it without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ._quadrature import _adaptive_grid, _segment_stats
from .procedures import InferenceProcedure, get_procedure

__all__ = ["OptimalSolution", "solve_optimal", "clear_caches"]

_Z_END = 40.0  # integrate z = logit(c) over [−40, 40]: c(1 − c) ≤ 4.3e-18 beyond
_LOG_G_CAP = 700.0


@dataclass(frozen=True)
class OptimalSolution:
    """The optimum for (procedure, β): log-density on `grid` (normalised, piecewise linear), its KL, log g(1)."""

    procedure: str
    beta: float
    grid: np.ndarray
    log_density: np.ndarray
    kl: float
    log_g_end: float  # log g where the shooting started: c = 1, or c = 0 for a mirrored (top-heavy) procedure

    def transform_values(self) -> np.ndarray:
        """Φ*(c) = β·log g(c) at `grid` (the ``optimal`` transform's table)."""
        return self.beta * self.log_density


def _expit_pair(z):
    """(c, 1 − c) for c = logit⁻¹(z), both to full precision."""
    if z >= 0:
        e = math.exp(-z)
        return 1.0 / (1.0 + e), e / (1.0 + e)
    e = math.exp(z)
    return e / (1.0 + e), 1.0 / (1.0 + e)


class _Orientation:
    """The shooting problem of a procedure, started from the end where its kernel is *not* concentrated.

    Shooting from c = 1 fixes log g(1); where the kernel lives within 1/N of c = 1 (BoN at large N) the residual
    then depends on log g(1) through a cancellation of two ~log N terms and is ill-conditioned (10⁶ per nat at
    N = 10⁶).  So such procedures are solved for the mirror g̃(c) = g(1 − c) instead — the same equations with
    c ↔ 1 − c, G ↔ 1 − G and Φ* decreasing (`sign` = +1), which shoots from c = 0 of the original."""

    def __init__(self, procedure: InferenceProcedure):
        self.procedure = procedure
        z = np.linspace(-_Z_END, _Z_END, 4001)
        c, omc = 1.0 / (1.0 + np.exp(-z)), 1.0 / (1.0 + np.exp(z))
        weight = procedure.first_variation(c, omc, c, omc) * c * omc  # the kernel at the reference, per unit z
        self.mirrored = bool(weight[z > 0].sum() > weight[z < 0].sum())
        self.sign = 1.0 if self.mirrored else -1.0
        slope = procedure.first_variation_at
        self.kernel = (lambda c, omc, G, M: slope(omc, c, M, G)) if self.mirrored else slope
        self.key = procedure.spec + (":mirrored" if self.mirrored else "")

    def bracket(self, beta: float) -> tuple[float, float]:
        """log g at the starting end: g increases (decreases, mirrored) with range ≤ R = :meth:`max_slope`, so
        g(1) ∈ [1, (R/β)/(1 − e^{−R/β})]; mirrored, g̃(1) = min g ∈ [e^{−R/β}·(R/β)/(e^{R/β} − 1)... , 1], bracketed
        loosely as log g̃(1) ∈ [−R/β − 1, 0.1]."""
        span = self.procedure.max_slope() / beta
        if not self.mirrored:
            return -0.1, (math.log(span) - math.log(-math.expm1(-span)) + 0.1 if span > 1e-12 else 0.1)
        return -span - 1.0, 0.1


def _shoot(orientation: _Orientation, log_g_end: float, beta: float, dense: bool = False):
    """Integrate (M, ψ, K = ∫_c^1 g log g) from c = 1 down to c = 0 in z = logit(c), with log g = log g(1) +
    sign·ψ/β and ψ' = −k (of the mirrored problem when `orientation.mirrored`).

    Returns (residual, solution): residual = 1 − M(0) ≥ 0 (too little mass), or −c₀ < 0 when M reaches 1 at c₀ > 0
    (too much)."""
    from scipy.integrate import solve_ivp

    scale = orientation.sign / beta
    kernel = orientation.kernel

    def rhs(z, y):
        c, omc = _expit_pair(z)
        M = min(max(y[0], 0.0), 1.0)
        ell = min(log_g_end + y[1] * scale, _LOG_G_CAP)
        g = math.exp(ell)
        w = c * omc  # dc/dz
        return [-g * w, -kernel(c, omc, 1.0 - M, M) * w, -g * ell * w]

    def full_mass(z, y):
        return y[0] - 1.0

    full_mass.terminal = True
    sol = solve_ivp(rhs, (_Z_END, -_Z_END), [0.0, 0.0, 0.0], method="DOP853", rtol=1e-10, atol=1e-14,
                    events=full_mass, dense_output=dense)
    if sol.t_events[0].size:
        return -_expit_pair(float(sol.t_events[0][0]))[0], sol
    return 1.0 - float(sol.y[0, -1]), sol


_LAST_ROOTS: dict[str, list[tuple[float, float]]] = {}


def _root_log_g_end(orientation: _Orientation, beta: float) -> float:
    """Brent on the shooting residual in log g at the starting end (:meth:`_Orientation.bracket`), warm-started
    from the nearest β solved before."""
    from scipy.optimize import brentq

    lo, hi = orientation.bracket(beta)

    def residual(l1):
        return _shoot(orientation, l1, beta)[0]

    history = _LAST_ROOTS.setdefault(orientation.key, [])
    r_lo = r_hi = None
    if history:
        lb = math.log(beta)
        prev_lb, prev_l1 = min(history, key=lambda item: abs(item[0] - lb))
        guess = min(max(prev_l1 if not orientation.mirrored else prev_l1 * math.exp(prev_lb - lb), lo), hi)
        step = 1e-3 * (1.0 + abs(guess)) + 0.5 * abs(lb - prev_lb) * (1.0 + abs(guess))
        r_g = residual(guess)
        if r_g == 0:
            return guess
        direction = 1.0 if r_g > 0 else -1.0  # too little mass: raise log g at the end
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
        raise RuntimeError(f"optimal transform: shooting bracket failed ({orientation.procedure.spec}, beta={beta}).")
    root = brentq(residual, lo, hi, xtol=1e-12, rtol=1e-15, maxiter=300)
    history.append((math.log(beta), root))
    if len(history) > 256:
        del history[: len(history) - 256]
    return root


@lru_cache(maxsize=256)
def _orientation(spec: str) -> _Orientation:
    return _Orientation(get_procedure(spec))


@lru_cache(maxsize=1024)
def _core(spec: str, beta: float) -> tuple[float, float]:
    """(log g at the shooting end, KL) of the optimum."""
    orientation = _orientation(spec)
    l1 = _root_log_g_end(orientation, beta)
    _, sol = _shoot(orientation, l1, beta)
    return l1, max(float(sol.y[2, -1]), 0.0)


def optimal_kl(procedure: "str | InferenceProcedure", beta: float) -> float:
    """KL(g*‖uniform) of the optimum at β (cheap: no grid).  Identity (g ∝ e^{c/β}) for plain sampling."""
    procedure = get_procedure(procedure)
    if procedure.is_standard:
        return _identity_solution(beta).kl
    return _core(procedure.spec, float(beta))[1]


def _identity_solution(beta: float, spec: str = "standard") -> OptimalSolution:
    grid, ell = _adaptive_grid(lambda c: c / beta)
    stats = _segment_stats(grid, ell)
    return OptimalSolution(spec, beta, grid, stats.log_density, stats.kl, float(stats.log_density[-1]))


@lru_cache(maxsize=512)
def _solve_cached(spec: str, beta: float) -> OptimalSolution:
    procedure = get_procedure(spec)
    if procedure.is_standard:  # Φ* = c exactly
        return _identity_solution(beta, spec)
    l1, kl = _core(spec, beta)
    orientation = _orientation(spec)
    _, sol = _shoot(orientation, l1, beta, dense=True)
    z_lo, z_hi = float(sol.t[-1]), float(sol.t[0])
    psi_end, scale = float(sol.y[1, -1]), orientation.sign / beta
    flip = -1.0 if orientation.mirrored else 1.0  # the mirror's z is −z

    def logf(c):
        c = np.asarray(c, dtype=np.float64)
        with np.errstate(divide="ignore"):
            z = flip * (np.log(c) - np.log1p(-c))
        out = np.empty_like(c)
        inside = (z >= z_lo) & (z <= z_hi)
        if inside.any():  # scipy's OdeSolution cannot be called on an empty array
            out[inside] = l1 + sol.sol(z[inside])[1] * scale
        out[z > z_hi] = l1
        out[z < z_lo] = l1 + psi_end * scale  # past the last step (an early stop leaves g ≈ 0 there)
        return out

    initial = 1.0 / (1.0 + np.exp(-flip * np.clip(sol.t, -_Z_END, _Z_END)))
    grid, ell = _adaptive_grid(logf, n0=513, tol=0.05, initial=initial)
    stats = _segment_stats(grid, ell)
    return OptimalSolution(spec, beta, grid, stats.log_density, kl, l1)


def solve_optimal(procedure: "str | InferenceProcedure", beta: float) -> OptimalSolution:
    r"""The optimal calibrated-space policy g* ∝ exp(Φ*/β) for `procedure` at KL coefficient `beta` (module
    docstring).  Cached on (procedure spec, β to 12 significant digits)."""
    procedure = get_procedure(procedure)
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}.")
    return _solve_cached(procedure.spec, float(f"{beta:.12g}"))


def clear_caches() -> None:
    """Forget every cached solution and shooting warm start."""
    _LAST_ROOTS.clear()
    _core.cache_clear()
    _orientation.cache_clear()
    _solve_cached.cache_clear()
