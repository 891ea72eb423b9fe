"""The optimal-transform solver of trl-infalign 0.1, kept as an independent reference for tests.

It solves only BoN-N and WoN-N (WoN through the mirror g̃(c) = g(1 − c)), integrating the first-order condition
in c (not logit c) from c = 1:  G' = g = exp(log g(1) + sign·ψ/β),  ψ' = N² c^{N−1} G^{N−1},  K' = g log g,
with Brent on the shooting residual G(0).  Accurate for N ≲ 100; the library's general solver
(`trl_infalign.optimal`) replaces it for any procedure and any N.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.integrate import solve_ivp
from scipy.optimize import brentq


def shoot(log_g1: float, n: int, beta: float, sign: float, dense: bool = False):
    nn, p, inv_beta = float(n * n), n - 1, sign / beta

    def rhs(c, y):
        G = min(max(y[0], 0.0), 1.0)
        ell = log_g1 + y[1] * inv_beta
        g = math.exp(min(ell, 60.0))
        return [g, nn * c**p * G**p, g * ell]

    def hit_zero(c, y):
        return y[0]

    hit_zero.terminal = True
    sol = solve_ivp(rhs, (1.0, 0.0), [1.0, 0.0, 0.0], method="DOP853", rtol=1e-9, atol=1e-12, events=hit_zero,
                    dense_output=dense)
    if sol.t_events[0].size:
        return -float(sol.t_events[0][0]), sol
    return float(sol.y[0, -1]), sol


def optimum(procedure: str, n: int, beta: float):
    """(log g as a function of c, KL) of the BoN-N / WoN-N optimum at β."""
    sign = 1.0 if procedure == "bon" else -1.0
    if sign > 0:
        lo, hi = -0.1, math.log(n * n / beta) - math.log(-math.expm1(-n * n / beta)) + 0.1
    else:
        lo, hi = -n / beta - 1.0, 0.1
    root = brentq(lambda l1: shoot(l1, n, beta, sign)[0], lo, hi, xtol=1e-9, rtol=1e-13, maxiter=300)
    _, sol = shoot(root, n, beta, sign, dense=True)

    def log_g(c):
        c = np.asarray(c, dtype=np.float64)
        return root + sign * sol.sol(c if sign > 0 else 1.0 - c)[1] / beta

    return log_g, -float(sol.y[2, -1])
