r"""Exact predictions and fits for deployments over several rewards, on shared reference atoms (InfAlign, arXiv
2412.19792; notes §9).

A deployment serves components j (weight w_j, primitive procedure P_j, reward r_j; :mod:`trl_infalign.deployment`).
Its win rate is Σ_j w_j W_j, W_j being P_j's win rate on r_j against P_j run on the reference.  Every reference
completion of a prompt is scored by every reward, so prompt x's K reference completions are K *shared atoms*: atom k
carries one value v_rk per reward r.  For any reward shape Φ (a function of the atom's rewards, or of their per-reward
calibrations c_rk = (#{l: v_rl < v_rk} + ½ #{l: v_rl = v_rk}) / K), the KL-regularised optimum reweights the atoms,

    p_k ∝ exp(Φ(v_1k, v_2k, …) / β),

and everything is exact for that discrete reference: KL_x = Σ_k p_k log(K p_k), and each W_j follows from the
marginal of r_j under p against the reference's (uniform over the atoms) with the single-reward tie formula

    W_j,x = Σ_v [f_j(F(v)) − f_j(F(v⁻))] · ½ [f_j(H(v⁻)) + f_j(H(v))],

v over the prompt's distinct values of r_j, F the tilted and H the reference CDF of r_j, f_j P_j's output-CDF map
(:func:`trl_infalign.diagnose._win_rates`, which this module calls on each reward's sorted atoms).  One global β,
root-found so that the prompt-averaged KL equals the budget, as the trainer uses.

The joint law of (c_1, c_2, …) under π_ref decides which Φ is best, and only the reference rewards show it: there is
no data-free calibrated-space theory for several rewards.  :func:`fit_deployment` therefore fits CTRL's Φ on the
training set's references, and :func:`diagnose_deployment` (``trl-infalign diagnose --procedure
"mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"``) compares reward shapes:

raw_sum          Σ_r W_r v_r (W_r = Σ_{j: r_j = r} w_j, the deployment's weight of reward r).
calibrated_sum   c of Σ_r v_r, the identity: one calibration of the unweighted sum (the package with one reward).
normalized_sum   Σ_r W_r (v_r − mean_r)/std_r, mean and std (ddof 0) of the prompt's K references of r (GDPO-like);
                 a reward constant on a prompt contributes 0 there.
identity         Σ_r W_r c_r.
best_t           Σ_r W_r Φ_r(c_r), Φ_r = exp(t_r c) for a reward served by BoN/standard, −exp(−t_r c) for WoN
                 (both tried for a reward served by both), the t_r searched jointly (log-t grid, then Nelder–Mead).
optimal          the best *separable* Φ = Σ_r W_r Φ_r(c_r) with every Φ_r non-decreasing, tabulated at the reward's
                 observed mid-ranks: projected L-BFGS on the increments of Φ_r (≥ 0) from best_t, with the exact
                 gradient (implicit in β at the budget); so it is ≥ best_t.
per_prompt_optimum  the unconstrained optimum, a free Φ per atom (each prompt on its own; an upper bound no
                 reward shape reaches).

Gradient (notes §9).  With λ = 1/β, prompt weights ω̄_x and φ_xk = ∂J/∂p_xk, the first variation (Σ_j w_j times
Σ_{v ≥ v_k} f'(F(v)) h(v) − Σ_{v > v_k} f'(F(v⁻)) h(v) on r_j, h = ½[f(H(v⁻)) + f(H(v))] the reference side):

    dJ/dΦ_xk |_KL        = ω̄_x λ p_xk [(φ_xk − E_x φ) − (C̄ / V̄)(Φ_xk − E_x Φ)],
                           C̄ = Σ_x ω̄_x Cov_x(φ, Φ), V̄ = Σ_x ω̄_x Var_x(Φ)     (β implicit: the KL stays at the budget)
    d(J − βKL)/dΦ_xk |_β = ω̄_x λ p_xk [(φ_xk − E_x φ) − (Φ_xk − E_x Φ)]           (when β is given instead of the KL)
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .deployment import Deployment, RewardTransforms, get_deployment, parse_reward_transforms
from .diagnose import (
    T_MIN,
    _Atoms,
    _finite_or_none,
    _quantiles,
    _reference_matrix,
    _row_mean_std,
    _shift,
    _tilt_at_budget,
    _unreachable,
    _win_rates,
)
from .procedures import ProcedureError
from .transforms import EXP_FAMILIES, TabulatedTransform, TransformError

__all__ = [
    "DEPLOYMENT_METHODS",
    "DeploymentFit",
    "DeploymentDiagnosis",
    "fit_deployment",
    "diagnose_deployment",
    "two_reward_example",
]

#: Built-in multi-reward method names, in report order (any per-reward transform spec also works).
DEPLOYMENT_METHODS = ("raw_sum", "calibrated_sum", "normalized_sum", "identity", "best_t", "optimal",
                      "per_prompt_optimum")
_OPTIMAL_MAXITER = 200
#: best_t: points per decade of t of the joint grid that seeds Nelder–Mead.
_GRID_POINTS_PER_DECADE = 3


# ----------------------------------------------------------------------------------------------------------------
# the shared atoms
# ----------------------------------------------------------------------------------------------------------------
def _midrank_order(values: np.ndarray, mask: np.ndarray, weight: np.ndarray) -> tuple[_Atoms, np.ndarray]:
    """(atoms sorted by value, order: sorted position → original atom index)."""
    order = np.argsort(np.where(mask, values, np.inf), axis=1, kind="stable")
    count = mask.sum(axis=1)
    ordered = np.take_along_axis(np.where(mask, values, np.inf), order, axis=1)
    sorted_mask = np.arange(values.shape[1])[None, :] < count[:, None]
    return _Atoms(ordered, sorted_mask, count, weight), order


@dataclass
class _Joint:
    """Each row: one prompt's K reference completions, each scored by every reward (original order, padding last).
    Per reward: its atoms sorted by value (for the win rates), the order, and the mid-ranks c in original order."""

    rewards: tuple
    values: dict  # reward -> (B, K) original order, padding 0
    mask: np.ndarray  # (B, K)
    weight: np.ndarray = None  # (B,)
    count: np.ndarray = field(init=False)
    atoms: dict = field(init=False)
    order: dict = field(init=False)
    c: dict = field(init=False)

    def __post_init__(self):
        if self.weight is None:
            self.weight = np.ones(self.mask.shape[0])
        self.count = self.mask.sum(axis=1)
        self.atoms, self.order, self.c = {}, {}, {}
        for r in self.rewards:
            self.atoms[r], self.order[r] = _midrank_order(self.values[r], self.mask, self.weight)
            self.c[r] = self.unsort(r, self.atoms[r].c)

    def sort(self, r, x: np.ndarray) -> np.ndarray:
        return np.take_along_axis(x, self.order[r], axis=1)

    def unsort(self, r, x: np.ndarray) -> np.ndarray:
        out = np.zeros_like(x)
        np.put_along_axis(out, self.order[r], x, axis=1)
        return out

    def midranks(self, values: np.ndarray) -> np.ndarray:
        """Mid-ranks of another per-atom quantity among its prompt's atoms, original order."""
        atoms, order = _midrank_order(values, self.mask, self.weight)
        out = np.zeros_like(atoms.c)
        np.put_along_axis(out, order, atoms.c, axis=1)
        return out

    def max_kl(self) -> float:
        """mean_x log K_x: the KL of all mass on one atom (reachable when one atom has the largest Φ)."""
        return float(np.dot(np.log(self.count), self.weight) / self.weight.sum())

    def subsample(self, divisor: int, rng: np.random.Generator) -> "_Joint":
        """The same prompts with max(2, K_x // divisor) of their atoms drawn without replacement (every reward keeps
        the same completions)."""
        from .diagnose import _subsample_index

        index, mask = _subsample_index(self.count, divisor, rng)
        values = {r: np.where(mask, np.take_along_axis(self.values[r], index, axis=1), 0.0) for r in self.rewards}
        return _Joint(self.rewards, values, mask, self.weight)


def _as_rows(rows: Any) -> Any:
    """Arrays/tensors of rows → list of rows (so a 2-D array and a list of lists take the same path)."""
    import torch

    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu().numpy()
    if isinstance(rows, np.ndarray):
        return list(rows) if rows.ndim == 2 else rows
    if not isinstance(rows, (list, tuple, Mapping, str, bytes)) and hasattr(rows, "__iter__"):
        return list(rows)  # e.g. a `datasets` Column
    return rows


def _reward_rows(references: Any, deployment: Deployment, column: str) -> dict:
    """{reward: rows} for the deployment's rewards, from {reward: rows}, the per-reward column's rows [{name: [K]}]
    or, for a deployment with one reward, plain rows; errors name the unknown rewards, or the reward and the row."""
    from .calibration import CalibrationError, select_reference_rewards

    rewards = deployment.rewards
    references = references if isinstance(references, Mapping) else _as_rows(references)
    if isinstance(references, Mapping):
        known = list(references)
    elif not isinstance(references, (list, tuple)):
        raise ValueError(f"reference rewards: expected {{reward: rows}} or a list of per-reward rows ({{name: [K "
                         f"floats]}}), got {type(references).__name__}.")
    elif not references:
        raise ValueError(f"column {column!r} has no rows: the fit needs at least one prompt's reference rewards.")
    elif not isinstance(references[0], Mapping):  # plain rows: the one reward
        if len(rewards) != 1:
            raise ValueError(
                f"column {column!r} holds one list of reference rewards per prompt, but the deployment judges "
                f"{len(rewards)} rewards {list(rewards)}: build per-reward references ({{name: [K floats]}}; "
                "`build_reference_rewards(..., per_reward=True)`).")
        return {rewards[0]: references}
    else:
        known = list(dict.fromkeys(name for row in references if isinstance(row, Mapping) for name in row))
    if rewards == (None,):  # a deployment without '@': the references' only reward
        if len(known) != 1:
            raise ValueError(f"the reference rewards hold several rewards {known}: name the one to judge in the "
                             "procedure spec ('bon:n=4@name'), or one per component.")
        rewards_in = {None: known[0]}
    else:
        unknown = [r for r in rewards if r not in known]
        if unknown:
            raise ProcedureError(
                f"Deployment {deployment.spec!r} names reward(s) {unknown}, but the reference rewards hold {known}: "
                "use those names after '@' (the reward functions' names as TRL derives them), or rebuild the "
                "references with those reward functions.")
        rewards_in = {r: r for r in rewards}
    if isinstance(references, Mapping):
        return {r: _as_rows(references[name]) for r, name in rewards_in.items()}
    try:
        return {r: select_reference_rewards(references, name, column=column) for r, name in rewards_in.items()}
    except CalibrationError as error:
        raise ValueError(str(error)) from None


def _prepare(references: Any, deployment: "str | Deployment", column: str = "ref_rewards") -> tuple[_Joint, Deployment]:
    """The shared atoms of the deployment's rewards, after checking that each row has the same K for every reward."""
    deployment = get_deployment(deployment)
    if None in deployment.rewards and len(deployment.rewards) > 1:
        raise ProcedureError(f"Deployment {deployment.spec!r}: with several rewards every component needs '@name'.")
    rows = _reward_rows(references, deployment, column)
    rewards = deployment.rewards
    matrices = {r: _reference_matrix(rows[r], column if r is None else f"{column}[{r!r}]") for r in rewards}
    first = rewards[0]
    num = {r: m[0].shape[0] for r, m in matrices.items()}
    if len(set(num.values())) > 1:
        raise ValueError(f"the rewards' reference columns have different numbers of rows {num}: each row is one "
                         "prompt, scored by every reward.")
    lengths = {r: m[1].sum(axis=1) for r, m in matrices.items()}
    for r in rewards[1:]:
        bad = np.nonzero(lengths[r] != lengths[first])[0]
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"row {i}: reward {r!r} has {int(lengths[r][i])} reference rewards but {first!r} has "
                f"{int(lengths[first][i])}{f' (and {bad.size - 1} more rows)' if bad.size > 1 else ''}: the "
                "rewards must score the same K reference completions of each prompt (entry k of every reward is "
                "completion k).")
    mask = matrices[first][1]  # valid entries come first in every row, so equal counts mean equal masks
    width = mask.shape[1]
    values = {r: np.pad(v, ((0, 0), (0, width - v.shape[1])))[:, :width] for r, (v, _) in matrices.items()}
    return _Joint(rewards, values, mask), deployment


# ----------------------------------------------------------------------------------------------------------------
# tilt, win rates and their gradient
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _JointFit:
    lam: float
    p: np.ndarray
    kl: np.ndarray  # per row
    wins: dict  # component metric key -> per-row win rate
    objective: float  # Σ_j w_j mean_x W_j,x
    kl_mean: float


def _wmean(x: np.ndarray, weight: np.ndarray) -> float:
    return float(np.dot(x, weight) / weight.sum())


def _fit_joint(phi: np.ndarray, joint: _Joint, deployment: Deployment, kl: float | None, what: str,
               lam: float | None = None) -> _JointFit:
    """The tilt p ∝ exp(Φ/β) on the shared atoms, one global β (λ = 1/β) at the KL budget unless `lam` is
    given."""
    phi = _shift(phi, joint)
    lam, p, kl_x = _tilt_at_budget(phi, joint, kl, what, lam)
    wins = {c.metric_key: _win_rates(joint.sort(c.reward, p), joint.atoms[c.reward], c.procedure)
            for c in deployment.components}
    objective = float(sum(c.weight * _wmean(wins[c.metric_key], joint.weight) for c in deployment.components))
    return _JointFit(lam, p, kl_x, wins, objective, _wmean(kl_x, joint.weight))


def _first_variation(p_sorted: np.ndarray, atoms: _Atoms, procedure) -> np.ndarray:
    """∂W/∂p per sorted position for a (mixture of) primitive procedure(s):
    Σ_{v ≥ v_k} f'(F(v)) h(v) − Σ_{v > v_k} f'(F(v⁻)) h(v), h = ½[f(H(v⁻)) + f(H(v))] the reference side; 0 in
    padding."""
    head_incl = np.minimum(np.cumsum(p_sorted, axis=1), 1.0)
    head_excl = np.zeros_like(head_incl)
    head_excl[:, 1:] = head_incl[:, :-1]
    tail_incl = np.minimum(np.cumsum(p_sorted[:, ::-1], axis=1)[:, ::-1], 1.0)
    tail_excl = np.zeros_like(tail_incl)
    tail_excl[:, :-1] = tail_incl[:, 1:]
    total = np.zeros_like(p_sorted)
    with np.errstate(divide="ignore", under="ignore", invalid="ignore", over="ignore"):
        for weight, part in procedure.components():
            h = atoms.reference_side(part)
            at_v = part.output_cdf_derivative(np.take_along_axis(head_incl, atoms.last, axis=1),
                                              np.take_along_axis(tail_excl, atoms.last, axis=1))
            below_v = part.output_cdf_derivative(np.take_along_axis(head_excl, atoms.first, axis=1),
                                                 np.take_along_axis(tail_incl, atoms.first, axis=1))
            a = np.where(atoms.is_last, at_v * h, 0.0)
            b = np.where(atoms.is_last, below_v * h, 0.0)
            ra = np.cumsum(a[:, ::-1], axis=1)[:, ::-1]
            rb = np.cumsum(b[:, ::-1], axis=1)[:, ::-1]
            grad = np.take_along_axis(ra, atoms.first, axis=1) - (np.take_along_axis(rb, atoms.last, axis=1)
                                                                  - np.take_along_axis(b, atoms.last, axis=1))
            total = total + weight * np.where(atoms.mask, grad, 0.0)
    return total


def _phi_gradient(phi: np.ndarray, fit: _JointFit, joint: _Joint, deployment: Deployment,
                  fixed_beta: bool) -> np.ndarray:
    """dJ/dΦ per atom at the KL budget (β implicit), or d(J − βKL)/dΦ at a fixed β (module docstring)."""
    varphi = np.zeros_like(fit.p)
    for c in deployment.components:
        grad = _first_variation(joint.sort(c.reward, fit.p), joint.atoms[c.reward], c.procedure)
        varphi += c.weight * joint.unsort(c.reward, grad)
    p, lam = fit.p, fit.lam
    phi = np.where(joint.mask, phi, 0.0)
    wbar = joint.weight / joint.weight.sum()
    centred_phi = phi - np.sum(p * phi, axis=1, keepdims=True)
    centred_var = varphi - np.sum(p * varphi, axis=1, keepdims=True)
    if fixed_beta:
        ratio = 1.0
    else:
        cov = np.dot(wbar, np.sum(p * centred_var * centred_phi, axis=1))
        var = np.dot(wbar, np.sum(p * centred_phi**2, axis=1))
        ratio = cov / var if var > 0 else 0.0
    return np.where(joint.mask, wbar[:, None] * lam * p * (centred_var - ratio * centred_phi), 0.0)


# ----------------------------------------------------------------------------------------------------------------
# reward shapes
# ----------------------------------------------------------------------------------------------------------------
def _phi_of_transforms(transforms: RewardTransforms, joint: _Joint) -> np.ndarray:
    with np.errstate(over="ignore"):
        phi = transforms.phi({r: joint.c[r] for r in joint.rewards})
    return np.where(joint.mask, phi, 0.0)


def _t_max(deployment: Deployment, reward) -> float:
    n = deployment.procedure_for(reward).n
    return float(min(700.0, 60.0 * max(1.0, n / 4.0)))


def _families(deployment: Deployment, reward) -> tuple[str, ...]:
    return tuple(deployment.procedure_for(reward).families)


def _exp_transforms(deployment: Deployment, families: Mapping, t: Mapping) -> RewardTransforms:
    return RewardTransforms({r: f"{families[r]}:t={t[r]:.6g}" for r in deployment.rewards}, deployment.reward_weights)


def _exp_phi(joint: _Joint, deployment: Deployment, families: Mapping, log_t: Sequence[float]) -> np.ndarray:
    """Σ_r W_r Φ_r(c_r), Φ_r = exp(t_r c) (bon) or −exp(−t_r c) (won), unnormalised."""
    phi = np.zeros(joint.mask.shape)
    with np.errstate(over="ignore"):
        for r, lt in zip(deployment.rewards, log_t):
            phi = phi + deployment.reward_weight(r) * _family_phi(families[r], math.exp(lt), joint.c[r])
    return np.where(joint.mask, phi, 0.0)


def _family_phi(family: str, t: float, c: np.ndarray) -> np.ndarray:
    return np.exp(t * c) if family == "bon" else -np.exp(-t * c)


def _score(fit: _JointFit, beta: float | None) -> float:
    """What the search maximises: the win rate at the KL budget, or win rate − β·KL at a fixed β."""
    return fit.objective if beta is None else fit.objective - beta * fit.kl_mean


def _search_t(joint: _Joint, deployment: Deployment, kl: float | None, beta: float | None
              ) -> tuple[dict, dict, list[str]]:
    """Jointly best t per reward ({reward: family}, {reward: t}, notes): per family combination, a grid on log t
    (3 points per decade; every combination when ≤ 400 points, else coordinate sweeps), then bounded Nelder–Mead
    from the best grid point.  The score is the win rate at the KL budget, or win rate − β·KL at a fixed β."""
    from scipy.optimize import minimize

    rewards = deployment.rewards
    lam = None if beta is None else 1.0 / beta
    bounds = [(math.log(T_MIN), math.log(_t_max(deployment, r))) for r in rewards]
    grids = [np.linspace(lo, hi, int(math.ceil(_GRID_POINTS_PER_DECADE * (hi - lo) / math.log(10))) + 1)
             for lo, hi in bounds]
    best = None
    for combo in itertools.product(*(_families(deployment, r) for r in rewards)):
        families = dict(zip(rewards, combo))
        cache: dict[tuple, float] = {}

        def value(log_t) -> float:
            key = tuple(round(float(x), 12) for x in log_t)
            if key not in cache:
                try:
                    fit = _fit_joint(_exp_phi(joint, deployment, families, key), joint, deployment, kl, "best_t",
                                     lam=lam)
                    cache[key] = _score(fit, beta)
                except ValueError:
                    cache[key] = -math.inf
            return cache[key]

        if math.prod(len(g) for g in grids) <= 400:
            start = max(itertools.product(*grids), key=value)
        else:  # coordinate sweeps on the grid from the diagonal's best point
            diagonal = [tuple(float(g[min(i, len(g) - 1)]) for g in grids) for i in range(max(map(len, grids)))]
            point = list(max(diagonal, key=value))
            for _ in range(6):
                moved = False
                for i, g in enumerate(grids):
                    candidate = max(g, key=lambda x: value(point[:i] + [float(x)] + point[i + 1:]))
                    if value(point[:i] + [float(candidate)] + point[i + 1:]) > value(point):
                        point[i], moved = float(candidate), True
                if not moved:
                    break
            start = tuple(point)
        step = [0.5 * (g[1] - g[0]) if len(g) > 1 else 0.1 for g in grids]
        simplex = [list(start)] + [[x + (step[i] if i == j else 0.0) * (1 if x + step[i] <= bounds[i][1] else -1)
                                    for i, x in enumerate(start)] for j in range(len(start))]
        res = minimize(lambda x: -value(np.clip(x, [b[0] for b in bounds], [b[1] for b in bounds])), np.array(start),
                       method="Nelder-Mead", bounds=bounds,
                       options={"initial_simplex": np.array(simplex), "xatol": 1e-4, "fatol": 1e-10, "maxiter": 400})
        point = np.clip(res.x, [b[0] for b in bounds], [b[1] for b in bounds]) if -res.fun > value(start) else start
        t = {r: float(f"{math.exp(x):.6g}") for r, x in zip(rewards, point)}
        score = value([math.log(t[r]) for r in rewards])
        if best is None or score > best[0]:
            best = (score, families, t)
    _, families, t = best
    notes = []
    for (lo, hi), r in zip(bounds, rewards):
        x = math.log(t[r])
        if x - lo < 0.05 or hi - x < 0.05:
            side = "lower" if x - lo < 0.05 else "upper"
            notes.append(f"best_t: t = {t[r]:g} for reward {r!r} is on the {side} bound of the search range "
                         f"[{T_MIN:g}, {math.exp(hi):g}]; the best exp-family member may lie beyond it.")
    return families, t, notes


def _maximize(fun, x0: np.ndarray, nonnegative: bool, maxiter: int = _OPTIMAL_MAXITER, memory: int = 10,
              ftol: float = 1e-9) -> np.ndarray:
    """argmax of a smooth `fun(x) -> (value, gradient)` by L-BFGS (two-loop recursion), projected onto x ≥ 0 when
    `nonnegative` (the direction is restricted to the free coordinates, those not held at 0 by an outward
    gradient; Armijo backtracking along the projected path).  Vector operations only: scipy's L-BFGS-B makes LAPACK
    calls that are slow under OpenBLAS threading on a loaded machine (scipy issue #22438).  Accepted steps only
    increase `fun`; returns the last accepted point."""
    project = (lambda x: np.maximum(x, 0.0)) if nonnegative else (lambda x: x)
    x = project(np.asarray(x0, dtype=np.float64))
    f, g = fun(x)
    history: list[tuple[np.ndarray, np.ndarray, float]] = []
    quiet = 0
    for _ in range(maxiter):
        free = ~((x <= 0.0) & (g < 0.0)) if nonnegative else np.ones(x.shape, dtype=bool)
        q = np.where(free, g, 0.0)
        if not np.any(q):
            break
        alphas = []
        for s_, y_, rho in reversed(history):
            a = rho * float(np.dot(s_, q))
            q = q - a * y_
            alphas.append(a)
        if history:
            s_, y_, _ = history[-1]
            q = q * (float(np.dot(s_, y_)) / float(np.dot(y_, y_)))
        else:
            q = q / max(float(np.max(np.abs(q))), 1e-300) * max(float(np.max(np.abs(x))), 1.0) * 1e-2
        for (s_, y_, rho), a in zip(history, reversed(alphas)):
            q = q + s_ * (a - rho * float(np.dot(y_, q)))
        direction = np.where(free, q, 0.0)  # ascent direction
        if float(np.dot(direction, g)) <= 0.0:
            history.clear()
            direction = np.where(free, g, 0.0) / max(float(np.max(np.abs(g))), 1e-300) * 1e-2
        step, accepted = 1.0, False
        while step > 1e-10:
            x_new = project(x + step * direction)
            f_new, g_new = fun(x_new)
            if f_new >= f + 1e-4 * float(np.dot(g, x_new - x)) and f_new > -math.inf:
                accepted = True
                break
            step *= 0.5
        if not accepted:
            break
        s_, y_ = x_new - x, g - g_new  # for maximisation: the curvature of −fun
        sy = float(np.dot(s_, y_))
        if sy > 1e-16 * float(np.dot(y_, y_)):
            history.append((s_, y_, 1.0 / sy))
            history = history[-memory:]
        quiet = quiet + 1 if f_new - f <= ftol * max(1.0, abs(f)) else 0
        x, f, g = x_new, f_new, g_new
        if quiet >= 3:
            break
    return x


def _node_index(joint: _Joint) -> tuple[dict, dict]:
    """Per reward: the sorted distinct mid-ranks observed (the nodes of a tabulated Φ_r) and each atom's node."""
    nodes, index = {}, {}
    for r in joint.rewards:
        nodes[r] = np.unique(joint.c[r][joint.mask])
        index[r] = np.where(joint.mask, np.searchsorted(nodes[r], joint.c[r]), 0)
    return nodes, index


def _optimal_separable(joint: _Joint, deployment: Deployment, kl: float | None, beta: float | None,
                       start: RewardTransforms) -> tuple[RewardTransforms, _JointFit]:
    """The best Φ = Σ_r W_r Φ_r(c_r), Φ_r non-decreasing and tabulated at the reward's observed mid-ranks: L-BFGS-B
    on the increments d_r ≥ 0 of Φ_r between nodes, started from `start` (so the result is at least as good)."""
    rewards = deployment.rewards
    weights = deployment.reward_weights
    nodes, index = _node_index(joint)
    lam_fixed = None if beta is None else 1.0 / beta
    init = {r: start.transforms[r].phi(nodes[r]) for r in rewards}
    if any(np.any(np.diff(v) < 0) for v in init.values()):
        init = {r: nodes[r].copy() for r in rewards}  # a decreasing start: use the identity
    scale = 1.0
    if beta is None:  # scale Φ so that λ = 1 at the start (the objective does not depend on Φ's scale)
        phi0 = sum(weights[r] * init[r][index[r]] for r in rewards)
        scale = _fit_joint(np.where(joint.mask, phi0, 0.0), joint, deployment, kl, "optimal").lam
    sizes = [len(nodes[r]) - 1 for r in rewards]
    splits = np.cumsum(sizes)[:-1]
    d0 = np.concatenate([np.maximum(np.diff(init[r]), 0.0) * scale for r in rewards])

    def tables(d: np.ndarray) -> dict:
        return {r: np.concatenate([[0.0], np.cumsum(part)]) for r, part in zip(rewards, np.split(d, splits))}

    def phi_of(d: np.ndarray) -> np.ndarray:
        tab = tables(d)
        return np.where(joint.mask, sum(weights[r] * tab[r][index[r]] for r in rewards), 0.0)

    def objective(d: np.ndarray) -> tuple[float, np.ndarray]:
        phi = phi_of(d)
        try:
            fit = _fit_joint(phi, joint, deployment, kl, "optimal", lam=lam_fixed)
        except ValueError:
            return -math.inf, np.zeros_like(d)
        g_phi = _phi_gradient(phi, fit, joint, deployment, fixed_beta=beta is not None)
        grads = []
        for r in rewards:
            per_node = np.bincount(index[r][joint.mask], weights=g_phi[joint.mask], minlength=len(nodes[r]))
            grads.append(weights[r] * np.cumsum(per_node[::-1])[::-1][1:])
        return _score(fit, beta), np.concatenate(grads)

    d = _maximize(objective, d0, nonnegative=True) if d0.size else d0
    best = {"d": d if objective(d)[0] >= objective(d0)[0] else d0}
    tab = tables(best["d"])
    unit = 1.0 / scale  # back to the units of the start's Φ (β reported for these tables)
    transforms = RewardTransforms(
        {r: TabulatedTransform(nodes[r], tab[r] * unit, name="tabulated") if len(nodes[r]) > 1 else
         TabulatedTransform([0.0, 1.0], [0.0, 0.0]) for r in rewards}, weights)
    fit = _fit_joint(_phi_of_transforms(transforms, joint), joint, deployment, kl, "optimal", lam=lam_fixed)
    return transforms, fit


def _per_prompt_optimum(joint: _Joint, deployment: Deployment, kl: float, start_phi: np.ndarray) -> _JointFit:
    """Upper bound: a free Φ per atom (L-BFGS from `start_phi`), one global β at the budget."""
    mask = joint.mask
    lam0 = _fit_joint(start_phi, joint, deployment, kl, "per_prompt_optimum").lam
    x0 = (start_phi * lam0)[mask]
    def objective(x: np.ndarray):
        phi = np.zeros(mask.shape)
        phi[mask] = x
        try:
            fit = _fit_joint(phi, joint, deployment, kl, "per_prompt_optimum")
        except ValueError:
            return -math.inf, np.zeros_like(x)
        return fit.objective, _phi_gradient(phi, fit, joint, deployment, fixed_beta=False)[mask]

    best = {"x": _maximize(objective, x0, nonnegative=False)}
    phi = np.zeros(mask.shape)
    phi[mask] = best["x"]
    return _fit_joint(phi, joint, deployment, kl, "per_prompt_optimum")


# ----------------------------------------------------------------------------------------------------------------
# fit_deployment
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DeploymentFit:
    """CTRL's reward shape for a deployment, fitted exactly on the shared reference atoms (:func:`fit_deployment`).

    `transforms`: Φ = Σ_r W_r Φ_r(c_r) (a :class:`~trl_infalign.deployment.RewardTransforms`); `beta`: the KL
    coefficient in the units of this unnormalised Φ; `kl`: the prompt-averaged KL(π*‖π_ref) on the atoms;
    `objective`: the predicted deployment win rate Σ_j w_j W_j; `win_rates`: {component metric_key: W_j}; `t`:
    {reward: t} for exp-family transforms (None for the others); `families`: {reward: "bon" | "won" | None}."""

    transforms: RewardTransforms
    beta: float
    kl: float
    objective: float
    win_rates: dict
    t: dict
    families: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _finite_or_none({"transform": self.transforms.spec, "beta": self.beta, "kl": self.kl,
                                "objective": self.objective, "win_rates": dict(self.win_rates),
                                "t": dict(self.t)})


def _fit_to_result(transforms: RewardTransforms, fit: _JointFit, joint: _Joint) -> DeploymentFit:
    t = {r: (float(tr.params["t"]) if tr.name in EXP_FAMILIES else None) for r, tr in transforms.transforms.items()}
    fams = {r: (tr.name if tr.name in EXP_FAMILIES else None) for r, tr in transforms.transforms.items()}
    wins = {key: _wmean(w, joint.weight) for key, w in fit.wins.items()}
    return DeploymentFit(transforms=transforms, beta=1.0 / fit.lam, kl=fit.kl_mean, objective=fit.objective,
                         win_rates=wins, t=t, families=fams)


def _check_budget(kl: float | None, beta: float | None) -> tuple[float | None, float | None]:
    if (kl is None) == (beta is None):
        raise ValueError("fit_deployment: give exactly one of kl= (the KL budget, nats) or beta= (the KL "
                         "coefficient, in the units of the unnormalised Φ).")
    name, value = ("kl", kl) if kl is not None else ("beta", beta)
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return (value, None) if kl is not None else (None, value)


def _transforms_of_spec(spec: str, deployment: Deployment) -> RewardTransforms:
    try:
        parsed = parse_reward_transforms(spec)
        if None in parsed and deployment.rewards != (None,):
            parsed = {r: parsed[None] for r in deployment.rewards}
        unknown = [r for r in parsed if r not in deployment.rewards]
        if unknown:
            raise TransformError(f"transform {spec!r} names reward(s) {unknown}; the deployment's rewards are "
                                 f"{list(deployment.rewards)}.")
        transforms = RewardTransforms(parsed, deployment.reward_weights)
    except (TransformError, ProcedureError) as error:
        raise ValueError(str(error)) from None
    raw = [t.spec for t in transforms.transforms.values() if t.requires_raw_rewards]
    if raw:
        raise ValueError(f"transform(s) {raw} shape raw rewards: fit_deployment fits calibrated transforms (identity, "
                         "bon:t=…, won:t=…, log, optimal); use transform='auto' or 'optimal'.")
    return transforms


def _fit(joint: _Joint, deployment: Deployment, kl: float | None, beta: float | None, transform: Any,
         notes: list[str]) -> tuple[DeploymentFit, _JointFit]:
    lam = None if beta is None else 1.0 / beta
    if isinstance(transform, RewardTransforms):
        transforms = transform
    elif transform in ("auto", "optimal"):
        families, t, found = _search_t(joint, deployment, kl, beta)
        notes.extend(found)
        transforms = _exp_transforms(deployment, families, t)
        if transform == "optimal":
            transforms, fit = _optimal_separable(joint, deployment, kl, beta, transforms)
            return _fit_to_result(transforms, fit, joint), fit
    elif isinstance(transform, str):
        transforms = _transforms_of_spec(transform, deployment)
    else:
        raise ValueError(f"transform must be 'auto', 'optimal', a transform spec or a RewardTransforms, got "
                         f"{type(transform).__name__}.")
    fit = _fit_joint(_phi_of_transforms(transforms, joint), joint, deployment, kl, f"transform {transforms.spec!r}",
                     lam=lam)
    return _fit_to_result(transforms, fit, joint), fit


def fit_deployment(references: Any, deployment: "str | Deployment", *, kl: float | None = None,
                   beta: float | None = None, transform: Any = "auto", column: str = "ref_rewards") -> DeploymentFit:
    r"""CTRL's reward shape Φ = Σ_r W_r Φ_r(c_r) for a deployment, fitted exactly on the training set's reference
    rewards (notes §9; InfAlign, arXiv 2412.19792).

    Args:
        references: {reward name: rows}, rows one list of K floats per prompt, aligned across rewards (entry k of row
            i is the same reference completion scored by each reward; K may vary across prompts, not across rewards
            within a row), or the per-reward column's rows ([{name: [K floats]}, ...]).  A deployment with one reward
            also takes plain rows.
        deployment: a :class:`~trl_infalign.deployment.Deployment` or spec,
            ``"mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"``.
        kl, beta: exactly one.  With `kl`, β is root-found so that the tilted atoms' KL(π*‖π_ref), averaged over
            prompts, equals `kl`, and `auto`/`optimal` maximise the deployment win rate there; with `beta` (in the
            units of the unnormalised Φ) they maximise win rate − β·KL.
        transform: ``"auto"`` — per reward an exp family (exp(t_r c) for BoN/standard, −exp(−t_r c) for WoN; both
            families tried for a reward served by both), the t_r searched jointly; a per-reward spec
            (``"bon:t=3@helpful+won:t=5@harmless"``, or one spec for every reward) — only β is fitted; or
            ``"optimal"`` — the best separable Φ with every Φ_r non-decreasing, as tabulated transforms at the
            reward's observed mid-ranks (constant beyond the outermost ones), ≥ the auto result (module docstring).
        column: names the column in error messages.

    Per prompt the K shared completions are reweighted, p_k ∝ exp(Φ(c_1k, c_2k, …)/β), c_rk the mid-rank of
    completion k's reward r among the prompt's K references of r; each W_j is exact for that discrete reference
    (:mod:`trl_infalign.diagnose_deployment`).

    Returns:
        :class:`DeploymentFit` (transforms, beta, kl, objective, win_rates {component metric_key: W_j}, t).
    """
    kl, beta = _check_budget(kl, beta)
    joint, deployment = _prepare(references, deployment, column)
    if kl is not None and not kl < joint.max_kl() * (1.0 - 1e-9):
        raise _unreachable(kl, joint.max_kl(), int(joint.count.max()))
    notes: list[str] = []
    result, _ = _fit(joint, deployment, kl, beta, transform, notes)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return result


# ----------------------------------------------------------------------------------------------------------------
# diagnose for several rewards
# ----------------------------------------------------------------------------------------------------------------
_FIXED_SHAPES = {"raw_sum": "Σ W_r·r_r", "calibrated_sum": "c(Σ r_r)", "normalized_sum": "Σ W_r·z_r",
                 "per_prompt_optimum": "free Φ per atom"}


def _normalized(joint: _Joint, r) -> np.ndarray:
    """(v − mean)/std per prompt with the reference mean and std (ddof 0); 0 where the prompt's rewards are equal."""
    mean, std = _row_mean_std(joint.values[r], joint.mask)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        z = (joint.values[r] - mean[:, None]) / np.where(std > 0, std, 1.0)[:, None]
    return np.where(joint.mask & (std > 0)[:, None], z, 0.0)


def _summary(fit: _JointFit, joint: _Joint, transform: str, beta: float | None = None) -> dict:
    wins = {key: _wmean(w, joint.weight) for key, w in fit.wins.items()}
    return {"transform": transform, "objective": fit.objective, "win_rate": fit.objective,
            "beta": float(1.0 / fit.lam if beta is None else beta), "kl": fit.kl_mean, "win_rates": wins}


def _deployment_method(name: str, joint: _Joint, deployment: Deployment, kl: float, notes: list[str],
                       cache: dict) -> dict:
    weights = deployment.reward_weights
    rewards = deployment.rewards
    if name in ("best_t", "optimal", "per_prompt_optimum"):
        if "best_t" not in cache:
            families, t, found = _search_t(joint, deployment, kl, None)
            transforms = _exp_transforms(deployment, families, t)
            fit = _fit_joint(_phi_of_transforms(transforms, joint), joint, deployment, kl, "best_t")
            cache["best_t"] = (transforms, fit, families, t, found)
        transforms, fit, families, t, found = cache["best_t"]
        if name == "best_t":
            notes.extend(found)
            # β of Φ = Σ W_r Φ_r itself (unnormalised, as the trainer takes it)
            out = _summary(fit, joint, transforms.spec)
            out.update({"t": dict(t), "families": dict(families)})
            return out
        if "optimal" not in cache:
            cache["optimal"] = _optimal_separable(joint, deployment, kl, None, transforms)
        transforms, fit = cache["optimal"]
        if name == "optimal":
            return _summary(fit, joint, transforms.spec)
        phi = _phi_of_transforms(transforms, joint)
        return _summary(_per_prompt_optimum(joint, deployment, kl, phi), joint, _FIXED_SHAPES[name])
    if name == "raw_sum":
        phi = sum(weights[r] * joint.values[r] for r in rewards)
    elif name == "calibrated_sum":
        phi = joint.midranks(sum(joint.values[r] for r in rewards))
    elif name == "normalized_sum":
        phi = sum(weights[r] * _normalized(joint, r) for r in rewards)
    else:
        transforms = _transforms_of_spec(name, deployment)
        fit = _fit_joint(_phi_of_transforms(transforms, joint), joint, deployment, kl,
                         f"transform {transforms.spec!r}")
        return _summary(fit, joint, transforms.spec)
    fit = _fit_joint(np.where(joint.mask, phi, 0.0), joint, deployment, kl, name)
    return _summary(fit, joint, _FIXED_SHAPES[name])


def _run_methods(joint: _Joint, deployment: Deployment, kl: float, methods: Sequence[str], notes: list[str]) -> dict:
    cache: dict = {}
    results = {}
    for name in methods:
        try:
            results[name] = _deployment_method(name, joint, deployment, kl, notes, cache)
        except ValueError as error:
            if len(methods) == 1:
                raise
            results[name] = {"error": str(error)}
            notes.append(f"{name}: {error}")
    return results


def _heterogeneity(joint: _Joint) -> dict:
    out: dict = {"ref_std": {}, "rank_correlation": {}}
    for r in joint.rewards:
        _, std = _row_mean_std(joint.values[r], joint.mask)
        q = _quantiles(std)
        q["p90_p10_ratio"] = q["p90"] / q["p10"] if q["p10"] > 0 else None
        out["ref_std"][str(r)] = q
    k = joint.count.astype(np.float64)
    for a, b in itertools.combinations(joint.rewards, 2):
        ca, cb = (np.where(joint.mask, joint.c[x] - 0.5, 0.0) for x in (a, b))  # E c = ½ exactly per prompt
        da = np.sum(ca * ca, axis=1) / k
        db = np.sum(cb * cb, axis=1) / k
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = np.sum(ca * cb, axis=1) / k / np.sqrt(da * db)
        rho = rho[np.isfinite(rho)]
        if rho.size:
            q = _quantiles(rho)
            q["mean"] = float(np.mean(rho))
            out["rank_correlation"][f"{a}~{b}"] = q
    return out


@dataclass
class DeploymentDiagnosis:
    """What each reward shape buys for a deployment over several rewards at the KL budget, exact on the shared
    reference atoms (:mod:`trl_infalign.diagnose_deployment`).

    `methods` maps a method name to {transform, objective, win_rate (= objective), beta, kl, win_rates {component
    metric_key: W_j}} plus `t`/`families` ({reward: …}) for best_t; `components` lists the deployment's components
    (key, weight, procedure, reward); `k_sensitivity` (when computed) the predictions at fewer references."""

    procedure: str
    spec: str
    n: int
    kl: float
    num_prompts: int
    K: int
    K_min: int
    max_kl: float
    rewards: list
    reward_weights: dict
    components: list
    methods: dict
    heterogeneity: dict
    warnings: list
    k_sensitivity: list | None = None
    _joint: Any = field(default=None, repr=False, compare=False)
    _deployment: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """JSON-ready dict (non-finite numbers become None)."""
        out = {
            "procedure": self.procedure, "spec": self.spec, "n": self.n, "kl": self.kl,
            "num_prompts": self.num_prompts, "K": self.K, "K_min": self.K_min, "max_kl": self.max_kl,
            "rewards": list(self.rewards), "reward_weights": dict(self.reward_weights),
            "components": [dict(c) for c in self.components], "methods": self.methods,
            "heterogeneity": self.heterogeneity, "warnings": list(self.warnings),
        }
        if self.k_sensitivity is not None:
            from .diagnose import _k_sensitivity_summary

            out["k_sensitivity"] = self.k_sensitivity
            out["k_sensitivity_summary"] = _k_sensitivity_summary(self.k_sensitivity)
        return _finite_or_none(out)

    def to_markdown(self) -> str:
        """A Markdown report: the methods table with each component's win rate, then heterogeneity and warnings."""
        from .diagnose import _k_sensitivity_line

        raw = self.methods.get("raw_sum")
        raw = raw if raw is not None and "error" not in raw else None
        keys = [c["key"] for c in self.components]
        labels = [f"{c['label']} ({c['weight']:.3g})" for c in self.components]
        k_text = str(self.K) if self.K == self.K_min else f"{self.K_min}–{self.K}"
        lines = [
            f"Predicted at KL {self.kl:g} nats (one global β per method) from {self.num_prompts} prompts × K = "
            f"{k_text} reference completions, each scored by {', '.join(map(str, self.rewards))}; deployment "
            f"{self.spec}.", "",
            "| method | transform | β | KL | deployment win | " + " | ".join(labels) + " |"
            + (" Δ vs raw_sum |" if raw else ""),
            "|---|---|---:|---:|---:|" + "---:|" * len(keys) + ("---:|" if raw else ""),
        ]
        for name, m in self.methods.items():
            if "error" in m:
                lines.append(f"| {name} | — | — | — | {m['error']} |" + " |" * len(keys) + (" |" if raw else ""))
                continue
            row = (f"| {name} | `{m['transform']}` | {m['beta']:.4g} | {m['kl']:.4f} | {m['objective']:.4f} | "
                   + " | ".join(f"{m['win_rates'][k]:.4f}" for k in keys) + " |")
            if raw:
                row += f" {m['objective'] - raw['objective']:+.4f} |"
            lines.append(row)
        lines += ["", "Heterogeneity:"]
        for r, s in self.heterogeneity["ref_std"].items():
            ratio = "—" if s["p90_p10_ratio"] is None else f"{s['p90_p10_ratio']:.3g}"
            lines.append(f"- {r}: per-prompt reference std p10 {s['p10']:.4g}, p50 {s['p50']:.4g}, p90 {s['p90']:.4g}; "
                         f"p90/p10 {ratio}")
        for pair, q in self.heterogeneity["rank_correlation"].items():
            lines.append(f"- rank correlation {pair.replace('~', ' vs ')} within prompts: mean {q['mean']:+.3f} "
                         f"(p10 {q['p10']:+.3f}, p90 {q['p90']:+.3f})")
        if self.k_sensitivity is not None:
            lines.append(f"- {_k_sensitivity_line(self.k_sensitivity)}")
        for note in self.warnings:
            lines.append(f"- warning: {note}")
        return "\n".join(lines)


def _check_methods(methods: Sequence[str] | None, deployment: Deployment) -> list[str]:
    methods = list(DEPLOYMENT_METHODS if methods is None else methods)
    if not methods:
        raise ValueError(f"methods is empty: pass some of {', '.join(DEPLOYMENT_METHODS)} (or transform specs).")
    for name in methods:
        if name not in DEPLOYMENT_METHODS:
            try:
                _transforms_of_spec(name, deployment)
            except ValueError as error:
                raise ValueError(f"unknown method {name!r} for a deployment over several rewards: expected one of "
                                 f"{', '.join(DEPLOYMENT_METHODS)} or a per-reward transform spec such as "
                                 f"'bon:t=3@helpful+won:t=5@harmless' ({error})") from None
    return methods


def diagnose_deployment(references: Any, deployment: "str | Deployment", kl: float = 0.5,
                        methods: Sequence[str] | None = None, *, column: str = "ref_rewards",
                        k_sensitivity: bool = False, k_repeats: int = 4, seed: int = 0) -> DeploymentDiagnosis:
    r"""Predict each reward shape's deployment win rate Σ_j w_j W_j (and every W_j) at a KL budget, exactly on the
    shared reference atoms (module docstring; notes §9).

    Args:
        references: {reward: rows} or the per-reward column's rows ([{name: [K floats]}, ...]); see
            :func:`fit_deployment`.  :func:`trl_infalign.diagnose.diagnose` loads them from files and datasets.
        deployment: a spec naming rewards, ``"mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"``.
        kl: the prompt-averaged KL budget (nats), < mean_x log K_x.
        methods: names from :data:`DEPLOYMENT_METHODS` (default: all) and/or per-reward transform specs.
        k_sensitivity: also predict from K/2 and K/4 references per prompt (`k_repeats` random subsamples each,
            seeded by `seed`): :attr:`DeploymentDiagnosis.k_sensitivity`.
    """
    from .diagnose import _k_sensitivity

    kl = float(kl)
    if not (math.isfinite(kl) and kl > 0):
        raise ValueError(f"KL budget must be a finite number > 0, got {kl!r}.")
    joint, deployment = _prepare(references, deployment, column)
    methods = _check_methods(methods, deployment)
    max_kl = joint.max_kl()
    if not kl < max_kl * (1.0 - 1e-9):
        raise _unreachable(kl, max_kl, int(joint.count.max()))
    notes: list[str] = []
    n = deployment.n
    if n > 1:
        top = 1.0 - np.exp(n * np.log1p(-1.0 / joint.count))
        if float(np.mean(top)) > 0.5:
            notes.append(f"N = {n} is large for K = {int(np.median(joint.count))} reference completions per prompt: "
                         f"the reference's best (worst) of N is its top (bottom) sample with probability "
                         f"{np.mean(top):.0%}, so every method's win rate is near ½ on this discrete reference. Use K "
                         "well above N (≥ 4N).")
    results = _run_methods(joint, deployment, kl, methods, notes)
    sensitivity = None
    if k_sensitivity:
        def run_level(divisor: int, rng: np.random.Generator) -> dict:
            return _run_methods(joint.subsample(divisor, rng), deployment, kl, methods, [])

        sensitivity = _k_sensitivity(results, int(joint.count.max()), run_level, k_repeats, seed)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    components = [{"key": c.metric_key, "weight": c.weight, "procedure": c.procedure.spec, "reward": c.reward,
                   "label": c.label} for c in deployment.components]
    return DeploymentDiagnosis(
        procedure=deployment.spec, spec=deployment.spec, n=n, kl=kl, num_prompts=int(joint.mask.shape[0]),
        K=int(joint.count.max()), K_min=int(joint.count.min()), max_kl=max_kl, rewards=list(deployment.rewards),
        reward_weights={str(r): w for r, w in deployment.reward_weights.items()}, components=components,
        methods=results, heterogeneity=_heterogeneity(joint), warnings=notes, k_sensitivity=sensitivity,
        _joint=joint, _deployment=deployment)


# ----------------------------------------------------------------------------------------------------------------
# the worked example
# ----------------------------------------------------------------------------------------------------------------
def two_reward_example(num_prompts: int = 12, k: int = 64, *, seed: int = 0, scale_spread: float = 100.0,
                       correlation: float = -0.6, names: tuple[str, str] = ("helpful", "harmless")) -> dict:
    """Synthetic per-reward references for the worked example of docs/diagnose.md (notes §9): per prompt, K
    completions whose two rewards are jointly Gaussian with `correlation` (they pull against each other); each
    reward's per-prompt scale is 10^u, u uniform so that scales spread `scale_spread`× across prompts, with a random
    per-prompt offset. Returns {name: rows}."""
    rng = np.random.default_rng(seed)
    z = rng.multivariate_normal([0.0, 0.0], [[1.0, correlation], [correlation, 1.0]], size=(num_prompts, k))
    half = 0.5 * math.log10(scale_spread)
    out = {}
    for i, name in enumerate(names):
        scale = 10.0 ** rng.uniform(-half, half, size=(num_prompts, 1))
        offset = 3.0 * rng.normal(size=(num_prompts, 1))
        out[name] = (offset + scale * z[:, :, i]).tolist()
    return out
