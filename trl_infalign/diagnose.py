r"""Predict what each alignment method buys at a KL budget from a dataset's reference rewards alone, before training
(InfAlign / CTRL, Balashankar et al., arXiv 2412.19792; notes §8).

The reweighting identity
------------------------
For any reward shape Φ_x (raw reward, calibrated reward, a transform of it, a raw-reward baseline), the optimum of
KL-regularised RL with coefficient β is a reweighting of the reference policy,

    π*(y|x) ∝ π_ref(y|x) · exp(Φ_x(y) / β).

Take prompt x's K reference samples (rewards r_1..r_K, each of weight 1/K; tied rewards are separate atoms) as an
empirical π_ref.  Then π* puts weight p_k ∝ exp(Φ_x(r_k)/β) on atom k, and everything below is *exact* for that
discrete π_ref — no sampling, no quadrature:

    KL_x            = Σ_k p_k log(K p_k)                    (≤ log K: all mass on one atom)
    standard win_x  = P(X > Y) + ½ P(X = Y) = Σ_k p_k c_k,   X ~ π*_x, Y ~ ref_x (reward values),
                      c_k = (#{j: r_j < r_k} + ½ #{j: r_j = r_k}) / K   (the calibrated reward, mid-rank)
    BoN-N win_x     = Σ_v [F(v)^N − F(v⁻)^N] · ½ [H(v⁻)^N + H(v)^N]        (best of N vs best of N)
    WoN-N win_x     = the same with the CDFs of the minimum, 1 − (1 − F)^N   (worst of N vs worst of N)
    any procedure   = Σ_v [f(F(v)) − f(F(v⁻))] · ½ [f(H(v⁻)) + f(H(v))] for its output-CDF map f
                      (:mod:`trl_infalign.procedures`); a mixture's is Σ_j w_j of its components'

where v runs over prompt x's distinct reward values, F is π*_x's CDF and H the reference's (F(v⁻) = mass below v;
ties count ½).  The prediction is the average over prompts.  Every method uses **one global β**, as the trainer does,
root-found so that the prompt-averaged KL equals the budget (mean_x KL_x is increasing in 1/β, with derivative
mean_x Var_{p_x}(Φ_x)/β², so a safeguarded Newton iteration converges in a few steps).

Methods
-------
raw_reward   Φ_x(r) = r: raw-reward RLHF.  In calibrated space this is the per-prompt transform Φ_x(c) = Q_x(c) (the
             prompt's reference quantile function): a prompt with a sharper reward model gets more of the KL budget.
identity     Φ = c: calibration alone (InfAlign's baseline; optimal for the standard win rate).
best_t       Φ = exp(t·c) (BoN, standard) or −exp(−t·c) (WoN), t maximising the averaged win rate at the budget.
optimal      Φ* of :func:`trl_infalign.theory.optimal_policy` (procedure, N, kl=budget) applied to c, β re-solved.
lsc          log σ(r − r_ref(x)), r_ref the prompt's reference mean (Wang et al. 2024, arXiv 2402.00742).
par          mean_k σ(r − r_ref,k) (PAR, Fu et al. 2025, "Reward Shaping to Mitigate Reward Hacking in RLHF").
vbon         log c (vBoN, Amini et al. 2024, "Variational Best-of-N alignment"); its paper β = 1/(N−1), at which the
             continuum policy is exactly Best-of-N — reported beside the budget's β.

Calibrated methods depend on a prompt's rewards only through its tie pattern, so prompts with the same pattern (all
distinct rewards and the same K, the usual case) are computed once.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .procedures import BestOfN, InferenceProcedure, Standard, WorstOfN, get_procedure
from .transforms import EXP_FAMILIES

__all__ = ["METHODS", "DiagnosisResult", "diagnose", "load_reference_rewards", "fit_deployment", "DeploymentFit",
           "DeploymentDiagnosis", "diagnose_deployment", "DEPLOYMENT_METHODS", "two_reward_example"]

#: Built-in method names, in report order.  Any transform spec ("bon:t=10", "log", "lsc:centre=median") also works.
METHODS = ("raw_reward", "identity", "best_t", "optimal", "lsc", "par", "vbon")
#: exp-family t search: [T_MIN, min(700, 60·max(1, N/4))] on a log grid (the best t grows with N, notes §8).
T_MIN = 0.01
_T_POINTS_PER_DECADE = 5
_CALIBRATED = ("identity", "best_t", "optimal", "vbon")


# ----------------------------------------------------------------------------------------------------------------
# loading and validation
# ----------------------------------------------------------------------------------------------------------------
def _missing_column(column: str, where: str, columns: Sequence[str]) -> ValueError:
    found = ", ".join(map(str, columns)) or "none"
    return ValueError(
        f"column {column!r} not found in {where} (columns: {found}): pass the reference-rewards column with "
        f"--column NAME (column= in Python), or build one with `trl-infalign build-reference`."
    )


def _column_of_records(records: Any, column: str, where: str) -> list:
    if isinstance(records, dict):
        if column not in records:
            raise _missing_column(column, where, list(records))
        return list(records[column])
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{where}: expected JSON objects (one per prompt) with a {column!r} list of rewards.")
    if not records:
        return []
    missing = [i for i, r in enumerate(records) if column not in r]
    if missing:
        if len(missing) == len(records):
            raise _missing_column(column, where, list(records[0]))
        raise ValueError(f"{where}: rows {missing[:10]} have no {column!r} field: every row needs its reference "
                         "rewards.")
    return [r[column] for r in records]


def _read_json_lines(path: Path) -> list:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg}).") from None
    return records


def load_reference_rewards(source: Any, column: str = "ref_rewards", split: str | None = None) -> list:
    """The per-prompt reference rewards (a list of K-lists) from a path, a `datasets.Dataset`/`DatasetDict` or a
    dict of columns.  Paths: ``.jsonl``/``.json`` (records or a dict of columns), ``.parquet``, a `save_to_disk`
    directory (e.g. the output of ``trl-infalign build-reference``) or a directory holding ``ref_rewards.jsonl``.
    Arrays and lists pass through unchanged.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = str(path)
        if path.is_dir():
            if any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
                from datasets import load_from_disk

                return load_reference_rewards(load_from_disk(str(path)), column, split)
            if (path / "ref_rewards.jsonl").is_file():
                return _column_of_records(_read_json_lines(path / "ref_rewards.jsonl"), column, where)
            raise ValueError(f"{where} is neither a `save_to_disk` dataset directory nor holds ref_rewards.jsonl.")
        if not path.is_file():
            raise FileNotFoundError(f"--dataset {where}: no such file or directory.")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _column_of_records(_read_json_lines(path), column, where)
        if suffix == ".json":
            try:
                with open(path) as f:
                    data = json.load(f)
            except json.JSONDecodeError:
                data = _read_json_lines(path)  # JSON lines saved as .json
            return _column_of_records(data, column, where)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            if column not in names:
                raise _missing_column(column, where, names)
            return pq.read_table(path, columns=[column]).column(column).to_pylist()
        raise ValueError(f"unsupported dataset file {where}: use .jsonl, .json, .parquet or a `save_to_disk` "
                         "directory.")
    datasets = sys.modules.get("datasets")  # a Dataset argument means datasets is imported; don't import it otherwise
    Dataset = getattr(datasets, "Dataset", None)
    DatasetDict = getattr(datasets, "DatasetDict", None)
    if DatasetDict is not None and isinstance(source, DatasetDict):
        if split is None:
            if len(source) != 1:
                raise ValueError(f"the dataset has splits {list(source)}: pass split= (--split) to pick one.")
            split = next(iter(source))
        if split not in source:
            raise ValueError(f"split {split!r} not in the dataset (splits: {list(source)}): pass --split.")
        source = source[split]
    if Dataset is not None and isinstance(source, Dataset):
        if column not in source.column_names:
            raise _missing_column(column, "the dataset", source.column_names)
        return source[column]
    if isinstance(source, dict):
        return _column_of_records(source, column, "the given dict")
    return source


def _reference_matrix(rows: Any, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(values (B, K_max) float64 with padding 0, mask) after checking: ≥ 1 row, finite values, K ≥ 2 per row."""
    import torch

    from .calibration import CalibrationError, _rows_text, pad_reference_rewards

    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu().numpy()
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        values = np.asarray(rows, dtype=np.float64)
        mask = np.ones(values.shape, dtype=bool)
    else:
        try:
            values_t, mask_t = pad_reference_rewards(list(rows) if not isinstance(rows, list) else rows)
        except CalibrationError as error:
            raise ValueError(f"column {column!r}: {error}") from None
        values, mask = values_t.numpy(), mask_t.numpy()
    if values.shape[0] == 0:
        raise ValueError(f"column {column!r} has no rows: diagnose needs at least one prompt's reference rewards.")
    bad = ~np.isfinite(values) & mask
    if bad.any():
        local = np.nonzero(bad.any(axis=1))[0]
        extra = [f"reference {int(np.argmax(bad[r]))} is {values[r, np.argmax(bad[r])]}" for r in local[:10]]
        raise ValueError(
            f"column {column!r}: non-finite reference rewards (NaN/±inf/null) in {_rows_text(local, extra)}: fix the "
            "reward model for these samples or drop them (`trl-infalign build-reference --nonfinite skip` drops "
            "non-finite rewards)."
        )
    count = mask.sum(axis=1)
    short = np.nonzero(count < 2)[0]
    if short.size:
        raise ValueError(
            f"column {column!r}: {_rows_text(short, [f'{int(count[r])} valid' for r in short[:10]])} "
            f"{'has' if short.size == 1 else 'have'} fewer than 2 reference rewards: diagnose needs K >= 2 per prompt "
            "(one atom has KL 0 at every beta). Drop these rows or rebuild with more samples "
            "(`trl-infalign build-reference --num-samples 16`)."
        )
    return np.where(mask, values, 0.0), mask


# ----------------------------------------------------------------------------------------------------------------
# the discrete reference distribution of every prompt
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Atoms:
    """Each row: one prompt's K reference rewards sorted ascending (padding last), with its tie groups."""

    values: np.ndarray  # (B, K) sorted, padding +inf
    mask: np.ndarray  # (B, K) bool
    count: np.ndarray  # (B,) int
    weight: np.ndarray  # (B,) prompts this row stands for
    c: np.ndarray = field(init=False)  # mid-rank of each atom (0 in padding)
    first: np.ndarray = field(init=False)  # index of the first atom of each atom's tie group
    last: np.ndarray = field(init=False)  # index of its last atom
    is_last: np.ndarray = field(init=False)  # one position per distinct value

    def __post_init__(self):
        B, K = self.values.shape
        idx = np.broadcast_to(np.arange(K), (B, K))
        v, mask = self.values, self.mask
        new = np.ones((B, K), dtype=bool)
        new[:, 1:] = v[:, 1:] != v[:, :-1]
        is_first = new & mask
        end = np.ones((B, K), dtype=bool)
        end[:, :-1] = v[:, :-1] != v[:, 1:]
        self.is_last = end & mask
        self.first = np.maximum.accumulate(np.where(is_first, idx, 0), axis=1)
        self.last = np.minimum.accumulate(np.where(self.is_last, idx, K - 1)[:, ::-1], axis=1)[:, ::-1]
        self.c = np.where(mask, (self.first + self.last + 1) / (2.0 * self.count[:, None]), 0.0)
        self._reference_side: dict = {}

    @classmethod
    def from_matrix(cls, values: np.ndarray, mask: np.ndarray, weight: np.ndarray | None = None) -> "_Atoms":
        count = mask.sum(axis=1)
        ordered = np.sort(np.where(mask, values, np.inf), axis=1)
        sorted_mask = np.arange(values.shape[1])[None, :] < count[:, None]
        w = np.ones(values.shape[0]) if weight is None else np.asarray(weight, dtype=np.float64)
        return cls(ordered, sorted_mask, count, w)

    def patterns(self) -> tuple["_Atoms", np.ndarray]:
        """Rows with the same tie pattern (hence the same c) merged: (atoms on c, inverse index into them)."""
        key = np.where(self.mask, self.c, -1.0)
        unique, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
        mask = unique >= 0
        atoms = _Atoms.from_matrix(np.where(mask, unique, 0.0), mask, counts.astype(np.float64))
        return atoms, inverse.reshape(-1)

    def reference_side(self, procedure: InferenceProcedure) -> np.ndarray:
        """½ [f(H(v⁻)) + f(H(v))] per position: the reference's tie-split CDF of a primitive procedure's output at
        each value (f its output-CDF map; H(v⁻) = #below/K and H(v) = #at-or-below/K, complements exact)."""
        key = procedure.spec
        if key not in self._reference_side:
            count = self.count[:, None].astype(np.float64)
            lt, le = self.first / count, (self.last + 1) / count
            mid = 0.5 * (procedure.output_cdf(lt, (count - self.first) / count)
                         + procedure.output_cdf(le, (count - self.last - 1) / count))
            self._reference_side[key] = np.where(self.is_last, mid, 0.0)
        return self._reference_side[key]

    def max_kl(self) -> np.ndarray:
        """Per-row sup of KL over β: log(K / #atoms in the top tie group)."""
        top = np.take_along_axis(self.first, (self.count - 1)[:, None], axis=1)[:, 0]
        return np.log(self.count / (self.count - top))


def _mean(values: np.ndarray, weight: np.ndarray) -> float:
    return float(np.dot(values, weight) / weight.sum())


# ----------------------------------------------------------------------------------------------------------------
# tilting, β solve, win rates
# ----------------------------------------------------------------------------------------------------------------
def _shift(phi: np.ndarray, atoms: _Atoms) -> np.ndarray:
    """Φ − max_x Φ per row (the policy is unchanged), padding 0; rejects non-finite Φ."""
    phi = np.where(atoms.mask, phi, -np.inf)
    if not np.isfinite(phi[atoms.mask]).all():
        raise ValueError("the transform gives non-finite values on these rewards.")
    return np.where(atoms.mask, phi - phi.max(axis=1, keepdims=True), 0.0)


def _tilt(phi: np.ndarray, atoms: _Atoms, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """p ∝ exp(λΦ) per row for shifted Φ (max 0, so 1 ≤ Z ≤ K): (p, KL_x, E_p Φ, Var_p Φ)."""
    with np.errstate(under="ignore"):
        w = np.where(atoms.mask, np.exp(lam * phi), 0.0)
    z = w.sum(axis=1)
    p = w / z[:, None]
    mean = np.sum(p * phi, axis=1)
    var = np.sum(p * (phi - mean[:, None]) ** 2, axis=1)
    kl = np.maximum(lam * mean - np.log(z) + np.log(atoms.count), 0.0)  # Σ p log(K p), log p = λΦ − log Z
    return p, kl, mean, var


def _unreachable(kl: float, reach: float, k: int, what: str = "") -> ValueError:
    return ValueError(
        f"KL budget {kl:g} is unreachable{what}: reweighting each prompt's K reference samples reaches at most "
        f"{reach:.4g} nats on average (mean of log(K / #tied top rewards); log K = {math.log(k):.4g}). Pass a "
        "smaller --kl, or rebuild the reference rewards with more samples per prompt (--num-samples)."
    )


def _solve_lambda(phi: np.ndarray, atoms: _Atoms, kl: float, what: str) -> float:
    """λ = 1/β with weighted-mean KL = `kl` (safeguarded Newton on log λ; KL increases in λ)."""
    weight = atoms.weight
    top = np.sum(atoms.mask & (phi == 0.0), axis=1)  # atoms sharing the largest Φ (shifted to 0)
    reach = _mean(np.log(atoms.count / top), weight)
    if not kl < reach * (1.0 - 1e-9):
        raise _unreachable(kl, reach, int(atoms.count.max()), f" for {what}")

    def f(u: float) -> tuple[float, float]:
        lam = math.exp(u)
        _, kl_x, _, var = _tilt(phi, atoms, lam)
        return _mean(kl_x, weight) - kl, lam * lam * _mean(var, weight)

    var0 = _mean(_tilt(phi, atoms, 0.0)[3], weight)
    u = 0.5 * math.log(2.0 * kl / var0)  # small-λ expansion KL ≈ λ² Var/2
    value, slope = f(u)
    lo = hi = None
    step = math.log(4.0)
    while True:  # bracket
        if value < 0:
            lo = u
            if hi is not None:
                break
            u += step
        else:
            hi = u
            if lo is not None:
                break
            u -= step
        step *= 1.5
        if abs(u) > 800:  # pragma: no cover - excluded by the reach check
            raise ValueError(f"could not solve beta for KL budget {kl:g} ({what}).")
        value, slope = f(u)
    u = 0.5 * (lo + hi)
    for _ in range(100):
        value, slope = f(u)
        if abs(value) <= 1e-13 * max(kl, 1.0) or hi - lo < 1e-14:
            break
        if value < 0:
            lo = u
        else:
            hi = u
        newton = u - value / slope if slope > 0 else math.nan
        u = newton if lo < newton < hi else 0.5 * (lo + hi)
    return math.exp(u)


def _win_rates(p: np.ndarray, atoms: _Atoms, procedure: InferenceProcedure) -> np.ndarray:
    """Per-row exact win rate of the reweighted atoms `p` against the reference (module docstring): per primitive
    component, Σ_v [f(F(v)) − f(F(v⁻))] · ½ [f(H(v⁻)) + f(H(v))], with F and 1 − F both from cumulative sums (the
    tail from the top, so BoN at large N keeps its precision); weighted over a mixture's components."""
    head_incl = np.minimum(np.cumsum(p, axis=1), 1.0)  # mass ≤ v_k
    head_excl = np.zeros_like(head_incl)
    head_excl[:, 1:] = head_incl[:, :-1]  # mass < v_k
    tail_incl = np.minimum(np.cumsum(p[:, ::-1], axis=1)[:, ::-1], 1.0)  # mass ≥ v_k
    tail_excl = np.zeros_like(tail_incl)
    tail_excl[:, :-1] = tail_incl[:, 1:]  # mass > v_k
    at_v = (np.take_along_axis(head_incl, atoms.last, axis=1), np.take_along_axis(tail_excl, atoms.last, axis=1))
    below_v = (np.take_along_axis(head_excl, atoms.first, axis=1), np.take_along_axis(tail_incl, atoms.first, axis=1))
    total = 0.0
    with np.errstate(divide="ignore", under="ignore", invalid="ignore"):
        for weight, part in procedure.components():
            mass = part.output_cdf(*at_v) - part.output_cdf(*below_v)
            total = total + weight * np.sum(np.where(atoms.is_last, mass, 0.0) * atoms.reference_side(part), axis=1)
    return total


@dataclass
class _Fit:
    lam: float
    kl: np.ndarray  # per row
    win: np.ndarray
    standard: np.ndarray
    bon: np.ndarray | None
    won: np.ndarray | None


def _power_of_two_scale(phi: np.ndarray) -> float:
    """1, or the power of two that brings max |Φ| (Φ shifted, ≤ 0) into [½, 1) when it lies outside
    [1e-150, 1e150]: there Var_p(Φ) would overflow (rewards around 1e300) or underflow.  Scaling Φ by 2^e and λ by
    2^−e is exact in floating point, so the tilt is unchanged."""
    size = float(np.max(np.abs(phi))) if phi.size else 0.0
    if size == 0.0 or 1e-150 < size < 1e150:
        return 1.0
    return math.ldexp(1.0, -math.frexp(size)[1])


def _tilt_at_budget(phi: np.ndarray, atoms, kl: float, what: str, lam: float | None = None):
    """(λ, p, KL_x) of p ∝ exp(λΦ) per row for shifted Φ, λ root-found to the weighted-mean KL `kl` unless given;
    Φ is rescaled by a power of two when its magnitude would overflow its variance (:func:`_power_of_two_scale`)."""
    scale = _power_of_two_scale(phi)
    if scale != 1.0:
        phi = phi * scale
        lam = None if lam is None else lam / scale
    if lam is None:
        lam = _solve_lambda(phi, atoms, kl, what)
    p, kl_x, _, _ = _tilt(phi, atoms, lam)
    return lam * scale, p, kl_x


def _fit(phi: np.ndarray, atoms: _Atoms, kl: float, procedure: InferenceProcedure, what: str,
         all_procedures: bool = True, lam: float | None = None) -> _Fit:
    phi = _shift(phi, atoms)
    lam, p, kl_x = _tilt_at_budget(phi, atoms, kl, what, lam)
    win = _win_rates(p, atoms, procedure)
    standard = win if procedure.is_standard else _win_rates(p, atoms, Standard())
    bon = won = None
    if all_procedures and procedure.n > 1:  # BoN-N and WoN-N at the procedure's N, whatever it is
        bon = win if procedure == BestOfN(procedure.n) else _win_rates(p, atoms, BestOfN(procedure.n))
        won = win if procedure == WorstOfN(procedure.n) else _win_rates(p, atoms, WorstOfN(procedure.n))
    return _Fit(lam, kl_x, win, standard, bon, won)


# ----------------------------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Data:
    atoms: _Atoms  # per prompt, sorted by reward
    patterns: _Atoms  # per distinct tie pattern, on c
    inverse: np.ndarray  # prompt -> pattern
    procedure: InferenceProcedure
    lsc_centre: Any

    @property
    def n(self) -> int:
        return self.procedure.n

    def t_max(self) -> float:
        return float(min(700.0, 60.0 * max(1.0, self.n / 4.0)))


def _exp_family(c: np.ndarray, family: str, t: float) -> np.ndarray:
    """exp(t(c − 1)) = e^{−t}·exp(t c) for bon (bounded, same policy at β·e^{−t}); −exp(−t c) for won."""
    return EXP_FAMILIES[family].bounded(c, t)[0]


def _summary(fit: _Fit, atoms: _Atoms, beta: float, transform: str) -> dict:
    w = atoms.weight
    out = {"transform": transform, "beta": float(beta), "kl": _mean(fit.kl, w), "win_rate": _mean(fit.win, w),
           "standard_win_rate": _mean(fit.standard, w)}
    if fit.bon is not None:
        out["bon_win_rate"] = _mean(fit.bon, w)
        out["won_win_rate"] = _mean(fit.won, w)
    return out


def _best_t(data: _Data, kl: float, notes: list[str], all_procedures: bool = True) -> tuple[dict, _Fit]:
    """The best member of the procedure's exp family (of each, for a mixture of BoN and WoN: the better one)."""
    found = [_best_t_of_family(data, family, kl, all_procedures) for family in data.procedure.families]
    out, fit, note = max(found, key=lambda item: item[0]["win_rate"])
    if note:
        notes.append(note)
    return out, fit


def _best_t_of_family(data: _Data, family: str, kl: float, all_procedures: bool) -> tuple[dict, _Fit, str | None]:
    from scipy.optimize import minimize_scalar

    atoms, procedure = data.patterns, data.procedure
    t_max = data.t_max()
    cache: dict[float, float] = {}

    def objective(log_t: float) -> float:
        if log_t not in cache:
            phi = _exp_family(atoms.c, family, math.exp(log_t))
            fit = _fit(phi, atoms, kl, procedure, f"{family}:t={math.exp(log_t):.6g}", all_procedures=False)
            cache[log_t] = _mean(fit.win, atoms.weight)
        return cache[log_t]

    log_ts = np.linspace(math.log(T_MIN), math.log(t_max),
                         int(math.ceil(_T_POINTS_PER_DECADE * math.log10(t_max / T_MIN))) + 1)
    values = np.array([objective(float(lt)) for lt in log_ts])
    i = int(np.argmax(values))
    lo, hi = log_ts[max(i - 1, 0)], log_ts[min(i + 1, len(log_ts) - 1)]
    res = minimize_scalar(lambda lt: -objective(float(lt)), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-4})
    log_t = float(res.x) if -res.fun >= values[i] else float(log_ts[i])
    t = float(f"{math.exp(log_t):.6g}")
    spec = f"{family}:t={t:.6g}"
    on_bound = note = None
    if math.log(t) - math.log(T_MIN) < 0.05 and not procedure.is_standard:  # standard: identity (t → 0) is optimal
        on_bound = "lower"
    elif math.log(t_max) - math.log(t) < 0.05:
        on_bound = "upper"
    if on_bound:
        note = (f"best_t: t = {t:g} is on the {on_bound} bound of the search range [{T_MIN:g}, {t_max:g}]; the "
                "best exp-family member may lie beyond it.")
    fit = _fit(_exp_family(atoms.c, family, t), atoms, kl, procedure, spec, all_procedures)
    beta = EXP_FAMILIES[family].bounded(atoms.c[:1], t)[1] / fit.lam  # β of the family's Φ itself
    out = _summary(fit, atoms, beta, spec)
    out.update({"t": t, "family": family})
    return out, fit, note


def _vbon_spec(atoms: _Atoms) -> str:
    eps = 0.5 / float(atoms.count.max())  # the smallest possible mid-rank: log(max(c, eps)) = log c exactly
    return "log" if eps >= 1e-3 else f"log:eps={eps:.12g}"


def _raw_phi(name: str, spec: str, data: _Data) -> np.ndarray:
    atoms = data.atoms
    values = np.where(atoms.mask, atoms.values, 0.0)
    if name == "raw":
        return values
    if name == "lsc":
        import torch

        from .calibration import reference_centre
        from .transforms import get_transform

        centre = get_transform(spec).params["centre"]
        r_ref = reference_centre(torch.from_numpy(values), torch.from_numpy(atoms.mask), centre).numpy()
        return -np.logaddexp(0.0, -(values - r_ref[:, None]))  # log σ(r − r_ref), stable
    from .transforms import get_transform

    transform = get_transform(spec)
    if not hasattr(transform, "shaped"):
        raise ValueError(f"transform {spec!r} works on raw rewards but has no numpy `shaped(rewards, ref_rewards, "
                         "ref_mask)` form for diagnose.")
    return transform.shaped(values, values, atoms.mask)


def _method(name: str, data: _Data, kl: float, notes: list[str], all_procedures: bool = True) -> tuple[dict, _Fit]:
    """(summary, fit) of one method at one KL budget."""
    from .transforms import get_transform

    procedure, n = data.procedure, data.n
    if name == "best_t":
        return _best_t(data, kl, notes, all_procedures)
    if name == "optimal":
        from . import theory

        pol = theory.optimal_policy(procedure, kl=kl)
        transform = get_transform("optimal", procedure=procedure, beta=float(pol.beta))
        fit = _fit(transform.phi(data.patterns.c), data.patterns, kl, procedure, transform.spec, all_procedures)
        out = _summary(fit, data.patterns, 1.0 / fit.lam, transform.spec)
        out.update({"theory_beta": float(pol.beta), "continuum_win_rate": pol.win_rate(procedure)})
        return out, fit
    if name == "raw_reward":
        spec, kind = "raw", "raw"
    elif name == "identity":
        spec, kind = "identity", "calibrated"
    elif name == "vbon":
        spec, kind = _vbon_spec(data.patterns), "calibrated"
    elif name == "lsc":
        spec, kind = get_transform("lsc", centre=data.lsc_centre).spec, "raw"
    else:  # any transform spec
        transform = get_transform(name)
        spec, kind = transform.spec, ("raw" if transform.requires_raw_rewards else "calibrated")
    transform = get_transform(spec)
    if kind == "calibrated":
        atoms, phi = data.patterns, transform.phi(data.patterns.c)
    else:
        atoms, phi = data.atoms, _raw_phi(transform.name, spec, data)
    fit = _fit(phi, atoms, kl, procedure, f"transform {spec!r}", all_procedures)
    out = _summary(fit, atoms, 1.0 / fit.lam, spec)
    if name == "vbon" and n > 1:
        paper_beta = 1.0 / (n - 1)
        paper = _fit(phi, atoms, kl, procedure, spec, False, lam=1.0 / paper_beta)
        out.update({"paper_beta": paper_beta, "paper_kl": _mean(paper.kl, atoms.weight),
                    "paper_win_rate": _mean(paper.win, atoms.weight)})
    return out, fit


def _row_mean_std(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row mean and std (ddof 0) of the valid entries; the squares are taken relative to the row's largest
    deviation when they would overflow (rewards around 1e300)."""
    values = np.where(mask, values, 0.0)
    k = mask.sum(axis=1).astype(np.float64)
    mean = values.sum(axis=1) / k
    dev = np.where(mask, values - mean[:, None], 0.0)
    with np.errstate(over="ignore"):
        std = np.sqrt(np.sum(dev**2, axis=1) / k)
    bad = ~np.isfinite(std)
    if bad.any():
        size = np.max(np.abs(dev[bad]), axis=1)
        std[bad] = size * np.sqrt(np.sum((dev[bad] / size[:, None]) ** 2, axis=1) / k[bad])
    return mean, std


def _quantiles(x: np.ndarray) -> dict:
    p10, p50, p90 = (float(v) for v in np.quantile(x, [0.1, 0.5, 0.9]))
    return {"p10": p10, "p50": p50, "p90": p90}


def _heterogeneity(data: _Data, raw_fit: _Fit | None) -> dict:
    atoms = data.atoms
    mean, std = _row_mean_std(atoms.values, atoms.mask)
    scale = _quantiles(std)
    scale["p90_p10_ratio"] = scale["p90"] / scale["p10"] if scale["p10"] > 0 else None
    positive = std > 0
    scale["log_std_std"] = float(np.std(np.log(std[positive]))) if positive.sum() > 1 else 0.0
    out = {"ref_std": scale, "ref_mean_std": float(np.std(mean)), "num_constant_prompts": int((~positive).sum())}
    if raw_fit is not None:
        kl_x = raw_fit.kl
        spread = _quantiles(kl_x)
        top = np.sort(kl_x)[::-1][: max(1, int(math.ceil(0.1 * kl_x.size)))]
        spread.update({"max": float(kl_x.max()), "std": float(kl_x.std()),
                       "top10_share": float(top.sum() / kl_x.sum()) if kl_x.sum() > 0 else None})
        out["raw_reward_kl"] = spread
    return out


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
def _finite_or_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class DiagnosisResult:
    """What each method buys at the KL budget, predicted exactly from the reference rewards (see the module doc).

    `methods` maps a method name to {transform, beta, kl, win_rate, standard_win_rate[, bon_win_rate, won_win_rate]}
    plus `t`/`family` (best_t), `theory_beta`/`continuum_win_rate` (optimal) and `paper_beta`/`paper_kl`/
    `paper_win_rate` (vbon).  `heterogeneity` holds the per-prompt reference-scale spread and raw_reward's
    per-prompt KL spread at its β.
    """

    procedure: str
    n: int
    kl: float
    num_prompts: int
    spec: str
    K: int
    K_min: int
    max_kl: float
    methods: dict[str, dict]
    heterogeneity: dict
    warnings: list[str]
    k_sensitivity: list[dict] | None = None
    _data: _Data | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """JSON-ready dict (non-finite numbers become None); `k_sensitivity` only when it was computed."""
        out = {
            "procedure": self.procedure, "spec": self.spec, "n": self.n, "kl": self.kl, "num_prompts": self.num_prompts,
            "K": self.K,
            "K_min": self.K_min, "max_kl": self.max_kl, "methods": self.methods,
            "heterogeneity": self.heterogeneity, "warnings": list(self.warnings),
        }
        if self.k_sensitivity is not None:
            out["k_sensitivity"] = self.k_sensitivity
            out["k_sensitivity_summary"] = _k_sensitivity_summary(self.k_sensitivity)
        return _finite_or_none(out)

    def _win_name(self) -> str:
        return f"{get_procedure(self.spec).label} win"

    def to_markdown(self) -> str:
        """A Markdown report: the methods table, then heterogeneity and warnings."""
        raw = self.methods.get("raw_reward")
        raw = raw if raw is not None and "error" not in raw else None  # Δ vs raw needs raw's win rate
        k_text = str(self.K) if self.K == self.K_min else f"{self.K_min}–{self.K}"
        lines = [
            f"Predicted at KL {self.kl:g} nats (one global β per method) from {self.num_prompts} prompts × K = "
            f"{k_text} reference rewards; procedure {self.spec}, N = {self.n}.", "",
            f"| method | transform | β | KL | {self._win_name()} | standard win |" + (" Δ vs raw |" if raw else ""),
            "|---|---|---:|---:|---:|---:|" + ("---:|" if raw else ""),
        ]
        for name, m in self.methods.items():
            if "error" in m:
                lines.append(f"| {name} | — | — | — | {m['error']} | |" + (" |" if raw else ""))
                continue
            row = (f"| {name} | `{m['transform']}` | {m['beta']:.4g} | {m['kl']:.4f} | {m['win_rate']:.4f} | "
                   f"{m['standard_win_rate']:.4f} |")
            if raw:
                row += f" {m['win_rate'] - raw['win_rate']:+.4f} |"
            lines.append(row)
        h = self.heterogeneity
        s = h["ref_std"]
        ratio = "—" if s["p90_p10_ratio"] is None else f"{s['p90_p10_ratio']:.3g}"
        lines += ["", "Heterogeneity (what calibration fixes):",
                  f"- per-prompt reference std: p10 {s['p10']:.4g}, p50 {s['p50']:.4g}, p90 {s['p90']:.4g}; "
                  f"p90/p10 {ratio}; std of log-scale {s['log_std_std']:.3g}"
                  + (f"; {h['num_constant_prompts']} prompts with all-equal rewards" if h["num_constant_prompts"]
                     else "")]
        if "raw_reward_kl" in h:
            k = h["raw_reward_kl"]
            share = "—" if k["top10_share"] is None else f"{100 * k['top10_share']:.0f}%"
            lines.append(f"- raw_reward's per-prompt KL at its β: p10 {k['p10']:.3g}, p50 {k['p50']:.3g}, p90 "
                         f"{k['p90']:.3g}, max {k['max']:.3g} (budget {self.kl:g}); the top 10% of prompts spend "
                         f"{share} of it")
        if self.k_sensitivity is not None:
            lines.append(f"- {_k_sensitivity_line(self.k_sensitivity)}")
        for note in self.warnings:
            lines.append(f"- warning: {note}")
        return "\n".join(lines)

    def curves(self, kls: Sequence[float] | None = None, methods: Sequence[str] | None = None) -> dict[str, list]:
        """{method: [(kl, win_rate), ...]} over a KL grid (default: 12 points up to ~2× the budget, below max_kl)."""
        if self._data is None:
            raise ValueError("this DiagnosisResult has no data attached (it was not made by diagnose()).")
        if kls is None:
            top = min(2.0 * self.kl, 0.95 * self.max_kl)
            kls = sorted(set(np.round(np.linspace(top / 12, top, 12), 6).tolist()) | {self.kl})
        out: dict[str, list] = {}
        for name in methods or [m for m in self.methods if "error" not in self.methods[m]]:
            points = []
            for k in kls:
                try:
                    summary = _method(name, self._data, float(k), [], all_procedures=False)[0]
                except ValueError:
                    continue
                points.append((summary["kl"], summary["win_rate"]))
            out[name] = points
        return out

    def plot(self, path: str | None = None, kls: Sequence[float] | None = None, ax=None):
        """Win rate vs KL for each method (the budget marked); saves to `path` when given.  Returns the Axes."""
        from ._plotting import pyplot

        plt = pyplot("DiagnosisResult.plot", headless=ax is None and path is not None)
        own = ax is None
        fig, ax = plt.subplots(figsize=(6.4, 4.6)) if own else (ax.figure, ax)
        for name, points in self.curves(kls).items():
            if points:
                style = {"color": "black", "linestyle": "--"} if name == "optimal" else {}
                ax.plot(*zip(*points), marker="o", markersize=2.5, label=name, **style)
        ax.axvline(self.kl, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"budget {self.kl:g}", (self.kl, ax.get_ylim()[0]), textcoords="offset points", xytext=(3, 3),
                    fontsize=8, color="grey")
        ax.set_xlabel("KL(π ‖ π_ref) [nats], mean over prompts")
        ax.set_ylabel(f"{self._win_name()} rate vs π_ref")
        ax.set_title(f"diagnose: {self.num_prompts} prompts × K={self.K}, one global β per method")
        from ._plotting import finish_axes

        return finish_axes(fig, ax, path, own)


def _subsample_index(count: np.ndarray, divisor: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(index (B, k') into each row's first count_x entries, mask): max(2, K_x // divisor) of them per row, drawn
    without replacement and kept in their original order."""
    keep = np.maximum(2, count // divisor)
    width = int(keep.max())
    index = np.zeros((count.size, width), dtype=np.int64)
    for i in range(count.size):
        index[i, : keep[i]] = np.sort(rng.choice(int(count[i]), size=int(keep[i]), replace=False))
    return index, np.arange(width)[None, :] < keep[:, None]


#: K-sensitivity: the divisors of K predicted from (K/2, K/4) and the default number of random subsamples of each.
K_SENSITIVITY_DIVISORS = (2, 4)
K_SENSITIVITY_REPEATS = 4


def _k_sensitivity(results: dict, k: int, run_level, repeats: int, seed: int) -> list[dict]:
    """[{"k": K, "methods": {name: {win_rate, kl}}} (= `results`), then for K/2 and K/4 the mean and the spread
    (sample std) over `repeats` random subsamples of each prompt's references (each prompt keeps max(2, K_x/d))].
    `run_level(divisor, rng)` reruns every method on one subsample."""
    repeats = int(repeats)
    if repeats < 1:
        raise ValueError(f"k_repeats must be an integer >= 1, got {repeats!r}.")

    def short(m: dict) -> dict:
        return {"error": m["error"]} if "error" in m else {"win_rate": m["win_rate"], "kl": m["kl"]}

    entries = [{"k": int(k), "methods": {name: short(m) for name, m in results.items()}}]
    rng = np.random.default_rng(seed)
    seen = {int(k)}
    for divisor in K_SENSITIVITY_DIVISORS:
        level = max(2, int(k) // divisor)
        if level in seen:
            continue
        seen.add(level)
        draws = []
        for _ in range(repeats):
            try:
                draws.append(run_level(divisor, rng))
            except ValueError as error:
                draws.append({name: {"error": str(error)} for name in results})
        methods = {}
        for name in results:
            ok = [d[name] for d in draws if name in d and "error" not in d[name]]
            if not ok:
                methods[name] = {"error": next((d[name]["error"] for d in draws if name in d), "not computed")}
                continue
            win = np.array([m["win_rate"] for m in ok])
            methods[name] = {"win_rate": float(win.mean()), "win_rate_std": float(win.std(ddof=1)) if win.size > 1
                             else 0.0, "kl": float(np.mean([m["kl"] for m in ok])), "repeats": len(ok)}
        entries.append({"k": level, "repeats": repeats, "methods": methods})
    return entries


def _k_sensitivity_summary(entries: list[dict]) -> dict | None:
    """The largest |win rate at K − mean win rate at K/2| over methods (points = 100×), and its method."""
    if len(entries) < 2:
        return None
    full, half = entries[0], entries[1]
    moves = {name: m["win_rate"] - half["methods"][name]["win_rate"] for name, m in full["methods"].items()
             if "error" not in m and "error" not in half["methods"].get(name, {"error": ""})}
    if not moves:
        return None
    name = max(moves, key=lambda k: abs(moves[k]))
    return {"k": full["k"], "half_k": half["k"], "method": name, "shift": float(moves[name]),
            "points": float(100 * abs(moves[name])),
            "spread": float(half["methods"][name].get("win_rate_std", 0.0))}


def _k_sensitivity_line(entries: list[dict]) -> str:
    s = _k_sensitivity_summary(entries)
    if s is None:
        return "K-sensitivity: not available (K too small to subsample, or every method failed at K/2)."
    return (f"K-sensitivity: from K = {s['half_k']} to K = {s['k']} references the predictions moved by up to "
            f"{s['points']:.2f} points ({s['method']}; subsample spread ±{100 * s['spread']:.2f}); more references "
            f"would move the prediction by ~{s['points']:.1f} points (if the change halves with each doubling of K).")


def _per_reward_rows(rows: Any, column: str) -> Any:
    """A per-reward column ({name: [K floats]} rows) with one reward: its plain rows; several: a clear error."""
    if isinstance(rows, (list, tuple)) and rows and isinstance(rows[0], dict):
        from .calibration import CalibrationError, select_reference_rewards

        try:
            return select_reference_rewards(rows, None, column=column)
        except CalibrationError as error:
            raise ValueError(str(error)) from None
    return rows


def _run_single(prepared: _Data, kl: float, methods: Sequence[str], notes: list[str]) -> tuple[dict, _Fit | None]:
    results: dict[str, dict] = {}
    raw_fit = None
    for name in methods:
        try:
            summary, fit = _method(name, prepared, kl, notes)
        except ValueError as error:
            if len(methods) == 1:
                raise
            results[name] = {"error": str(error)}
            notes.append(f"{name}: {error}")
            continue
        results[name] = summary
        if name == "raw_reward":
            raw_fit = fit
    return results, raw_fit


def _prepare_single(values: np.ndarray, mask: np.ndarray, procedure: InferenceProcedure, lsc_centre: Any) -> _Data:
    atoms = _Atoms.from_matrix(values, mask)
    patterns, inverse = atoms.patterns()
    return _Data(atoms, patterns, inverse, procedure, lsc_centre)


def diagnose(
    data: Any,
    procedure: "str | InferenceProcedure" = "bon",
    n: int | None = 4,
    kl: float = 0.5,
    methods: Sequence[str] | None = None,
    column: str = "ref_rewards",
    *,
    split: str | None = None,
    lsc_centre: str | float = "mean",
    k_sensitivity: bool = False,
    k_repeats: int = K_SENSITIVITY_REPEATS,
    seed: int = 0,
) -> "DiagnosisResult | DeploymentDiagnosis":
    r"""Predict KL and win rates of each alignment method at a KL budget from reference rewards alone.

    Args:
        data: per-prompt reference rewards — a (ragged) list of K-lists, a 2-D array/tensor, a `datasets.Dataset`
            (or `DatasetDict` with `split`), or a path (.jsonl/.json/.parquet, a `save_to_disk` directory such as
            `trl-infalign build-reference`'s output).  K ≥ 2 finite rewards per prompt.  A per-reward column
            ({name: [K floats]} per row) or a dict {reward: rows} serves a deployment over several rewards.
        procedure, n: inference procedure — "standard", "bon", "won" with N = `n` (forced to 1 for "standard"), or
            a spec with its own N ("bon:n=8", "mixture:0.5*standard+0.5*bon:n=16", :mod:`trl_infalign.procedures`).
            A spec naming rewards ("mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless") diagnoses that deployment
            on the shared reference atoms and returns a
            :class:`~trl_infalign.diagnose_deployment.DeploymentDiagnosis` (methods
            :data:`~trl_infalign.diagnose_deployment.DEPLOYMENT_METHODS`).
        kl: KL budget in nats, the prompt-averaged KL(π*‖π_ref) every method is given (< the discrete limit
            mean_x log(K_x / #top ties) ≤ log K).
        methods: names from :data:`METHODS` (default: all) and/or transform specs ("bon:t=10", "log", "par").
        column: the reference-rewards column of a dataset/file.
        lsc_centre: r_ref(x) of `lsc`: "mean", "median" or a quantile level.
        k_sensitivity: also predict from K/2 and K/4 references per prompt (`k_repeats` random subsamples each,
            seeded by `seed`) — ``result.k_sensitivity``, and ``k_sensitivity`` in the JSON.  Costs about
            2·`k_repeats` reruns of the methods on smaller data.

    π*_x ∝ π_ref,x·exp(Φ_x/β) on the K reference atoms, one global β per method root-found to the budget; KL and
    win rates are exact for the discrete reference (module docstring; InfAlign, arXiv 2412.19792; notes §8).
    """
    from .deployment import Deployment, is_multi_reward_spec

    if is_multi_reward_spec(procedure) or (isinstance(procedure, Deployment) and procedure.is_multi_reward):
        from .diagnose_deployment import diagnose_deployment

        references = data
        if not (isinstance(data, dict) and column not in data):  # else: already {reward: rows}
            references = load_reference_rewards(data, column, split)
        return diagnose_deployment(references, procedure, kl=kl, methods=methods, column=column,
                                   k_sensitivity=k_sensitivity, k_repeats=k_repeats, seed=seed)
    bare = isinstance(procedure, str) and ":" not in procedure
    procedure = get_procedure(procedure, n if bare else None)
    n = procedure.n
    kl = float(kl)
    if not (math.isfinite(kl) and kl > 0):
        raise ValueError(f"KL budget must be a finite number > 0, got {kl!r}.")
    methods = list(METHODS if methods is None else methods)
    if not methods:
        raise ValueError(f"methods is empty: pass some of {', '.join(METHODS)} (or transform specs).")
    from .transforms import TransformError, get_transform

    for name in methods:
        if name not in METHODS:
            try:
                get_transform(name)
            except TransformError as error:
                raise ValueError(f"unknown method {name!r}: expected one of {', '.join(METHODS)} or a transform "
                                 f"spec ({error})") from None

    if "lsc" in methods:
        try:
            get_transform("lsc", centre=lsc_centre)
        except TransformError as error:
            raise ValueError(f"lsc_centre={lsc_centre!r}: {error}") from None
    rows = _per_reward_rows(load_reference_rewards(data, column, split), column)
    values, mask = _reference_matrix(rows, column)
    prepared = _prepare_single(values, mask, procedure, lsc_centre)
    atoms = prepared.atoms
    max_kl = _mean(atoms.max_kl(), atoms.weight)
    if not kl < max_kl * (1.0 - 1e-9):
        raise _unreachable(kl, max_kl, int(atoms.count.max()))
    notes: list[str] = []
    if n > 1:  # the reference's best (worst) of N is then mostly its top (bottom) sample: little left to resolve
        top = 1.0 - np.exp(n * np.log1p(-1.0 / atoms.count))
        if float(np.mean(top)) > 0.5:
            notes.append(
                f"N = {n} is large for K = {int(np.median(atoms.count))} reference rewards per prompt: the reference's "
                f"best (worst) of N is its top (bottom) sample with probability {np.mean(top):.0%} (1 − (1 − 1/K)^N), "
                "so every method's win rate is "
                "near ½ on this discrete reference. Use K well above N (≥ 4N) reference samples.")
    constant = int(np.sum(atoms.max_kl() == 0))
    if constant:
        notes.append(f"{constant} prompts have all-equal reference rewards: they stay at the reference (KL 0, win ½).")
    results, raw_fit = _run_single(prepared, kl, methods, notes)
    if raw_fit is None:
        try:
            raw_fit = _method("raw_reward", prepared, kl, [], all_procedures=False)[1]
        except ValueError:
            raw_fit = None
    sensitivity = None
    if k_sensitivity:
        count = mask.sum(axis=1)

        def run_level(divisor: int, rng: np.random.Generator) -> dict:
            index, sub_mask = _subsample_index(count, divisor, rng)
            sub = np.where(sub_mask, np.take_along_axis(values, index, axis=1), 0.0)
            return _run_single(_prepare_single(sub, sub_mask, procedure, lsc_centre), kl, methods, [])[0]

        sensitivity = _k_sensitivity(results, int(atoms.count.max()), run_level, k_repeats, seed)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return DiagnosisResult(
        procedure=procedure.short_name or procedure.spec, spec=procedure.spec, n=n,
        kl=kl, num_prompts=int(values.shape[0]), K=int(atoms.count.max()),
        K_min=int(atoms.count.min()), max_kl=max_kl, methods=results,
        heterogeneity=_heterogeneity(prepared, raw_fit), warnings=notes, k_sensitivity=sensitivity, _data=prepared,
    )


_DEPLOYMENT_EXPORTS = ("DEPLOYMENT_METHODS", "DeploymentDiagnosis", "DeploymentFit", "diagnose_deployment",
                       "fit_deployment", "two_reward_example")


def __getattr__(name: str):  # re-exported lazily: trl_infalign.diagnose_deployment builds on the helpers above
    if name in _DEPLOYMENT_EXPORTS:
        from . import diagnose_deployment

        return getattr(diagnose_deployment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
