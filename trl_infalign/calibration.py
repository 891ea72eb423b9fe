r"""Calibration of rewards against per-prompt reference rewards (InfAlign, arXiv 2412.19792, §3).

For a prompt x with K reference-policy rewards R_x = {r_1, …, r_K} (one per sample y_k ~ π_ref), the calibrated
reward of a response with raw reward r is its mid-rank among the references:

    c = (#{k : r_k < r} + ½ · #{k : r_k = r}) / K          ∈ [0, 1]

Under π_ref, c is (up to the K-sample discretisation) Uniform[0, 1], and E_π[c] is the standard win rate of π against
π_ref with ties counted ½.  Any strictly increasing change of the reward model (scale, offset, per-prompt or not)
leaves c unchanged.

Implementation
--------------
:func:`calibrate` is fully vectorised: for each chunk of rows it evaluates Σ_k sign(r − r_k) with one broadcast
subtraction and a row sum, and uses

    #{r_k < r} + ½ #{r_k = r} = (K + Σ_k sign(r − r_k)) / 2 .

This is exact, not an approximation: for IEEE floats with gradual underflow (the default on CPU and CUDA) a − b is 0
iff a == b and otherwise carries the sign of a − b (an overflow gives ±inf, whose sign is still right); integer inputs
use explicit comparisons instead.  Invalid (padded) reference slots are zeroed per chunk (multiplying by the
mask cast to the value dtype, which is far faster than `torch.where` on CPU) and their known contribution
sign(r − 0) is subtracted; the same chunk's row sums flag any NaN/±inf (in a valid slot, or padding garbage), and
only flagged rows are re-checked exactly and, if the problem was in padding, recomputed with `torch.where`.  The
counts are integers, exact in the accumulation dtype, and c is one correctly rounded division.  In
`benchmarks/calibration.py --quick` (1 thread) this is 9–44× faster than `torch.sort` + `torch.searchsorted`
(O(K log K) per row against O(K)) for B ≥ 10^4 or K ≥ 128 (about 1.4× at B = 1000, K = 16, where
fixed per-call overhead dominates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "CalibrationError",
    "calibrate",
    "pad_reference_rewards",
    "reference_quantile",
    "reference_centre",
    "select_reference_rewards",
    "reference_reward_names",
]

#: Elements (rows × K) processed per chunk on CPU (bounds the temporaries to a few MiB; fastest on 2 cores).
CPU_CHUNK_ELEMENTS = 1 << 20
#: Elements per chunk on accelerators (bounds the temporary to ~256 MiB in float32).
DEVICE_CHUNK_ELEMENTS = 1 << 26

_MAX_REPORT = 10
_REBUILD_HINT = (
    "Rebuild or clean the reference rewards (`trl_infalign.build_reference_rewards(...)` or `trl-infalign "
    "build-reference ...`; `trl_infalign.validate_reference_rewards(dataset)` lists every bad row)"
)


class CalibrationError(ValueError):
    """Invalid input to :func:`calibrate` / :func:`pad_reference_rewards`; the message names the offending rows."""


# ---------------------------------------------------------------------------------------------------------------------
# helpers
def _rows_text(rows: Sequence[int], extra: Sequence[Any] | None = None) -> str:
    rows = [int(r) for r in rows]
    shown = rows[:_MAX_REPORT]
    if extra is None:
        text = ", ".join(str(r) for r in shown)
    else:
        text = ", ".join(f"{r} ({e})" for r, e in zip(shown, extra))
    if len(rows) > len(shown):
        text += f" (and {len(rows) - len(shown)} more)"
    return ("row " if len(rows) == 1 else "rows ") + text


def _is_ragged_rows(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and (
        len(value) == 0 or all(isinstance(row, (list, tuple, np.ndarray, torch.Tensor)) for row in value)
    )


def pad_reference_rewards(
    rows: Sequence[Sequence[float]], device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a ragged list of per-prompt reference rewards into `(values, mask)` tensors of shape (B, K_max).

    `values` has dtype `dtype` (float64 by default: Python floats convert losslessly) with padded slots set to 0;
    `mask` is bool, True where a value is real.  Rows may be lists, tuples, 1-D numpy arrays or tensors; an empty row
    gives an all-False mask row (which :func:`calibrate` rejects, naming the row).  Values are not checked for
    finiteness here — :func:`calibrate` does that.
    """
    if isinstance(rows, (np.ndarray, torch.Tensor)) and np.ndim(rows) == 2:
        values = torch.as_tensor(rows, dtype=dtype, device=device)
        return values, torch.ones(values.shape, dtype=torch.bool, device=values.device)
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise CalibrationError(
            f"pad_reference_rewards expects a list of per-prompt reward lists, got {type(rows).__name__}."
        )
    flat: list[np.ndarray] = []
    lengths = np.empty(len(rows), dtype=np.int64)
    bad: list[int] = []
    for i, row in enumerate(rows):
        if isinstance(row, torch.Tensor):
            row = row.detach().cpu().numpy()
        try:
            arr = np.asarray(row, dtype=np.float64)
        except (TypeError, ValueError):
            bad.append(i)
            continue
        if arr.ndim != 1:
            bad.append(i)
            continue
        flat.append(arr)
        lengths[i] = arr.size
    if bad:
        raise CalibrationError(
            f"Reference rewards {_rows_text(bad)} are not flat lists of numbers. Each row must be the list of K "
            f"reward values of that prompt's reference samples. {_REBUILD_HINT}."
        )
    k_max = int(lengths.max()) if len(rows) else 0
    mask_np = np.arange(k_max)[None, :] < lengths[:, None]
    values_np = np.zeros((len(rows), k_max), dtype=np.float64)
    if flat:
        values_np[mask_np] = np.concatenate(flat)
    values = torch.as_tensor(values_np, device=device).to(dtype)
    return values, torch.as_tensor(mask_np, device=values.device)


def _as_tensor(value: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value if device is None else value.to(device)
    try:
        arr = np.asarray(value)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise TypeError
    except (TypeError, ValueError):
        raise CalibrationError(f"`{name}` must be a tensor, numpy array or list of numbers, got {type(value).__name__}.")
    if arr.dtype == np.float64 or arr.dtype == np.float32 or np.issubdtype(arr.dtype, np.integer):
        return torch.as_tensor(arr, device=device)
    return torch.as_tensor(arr.astype(np.float64), device=device)


def _reference_tensors(
    ref_rewards: Any, ref_mask: Any, device: torch.device | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values, mask or None) on `device`; pads ragged lists.  Shape checks only."""
    if _is_ragged_rows(ref_rewards) and not isinstance(ref_rewards, (np.ndarray, torch.Tensor)):
        lengths = {len(row) for row in ref_rewards}
        if len(lengths) > 1 or len(ref_rewards) == 0 or ref_mask is not None or 0 in lengths:
            values, mask = pad_reference_rewards(ref_rewards, device=device)
            if ref_mask is not None:
                given = _as_tensor(ref_mask, "ref_mask", values.device)
                if given.shape != mask.shape:
                    raise CalibrationError(
                        f"`ref_mask` has shape {tuple(given.shape)} but the padded reference rewards have shape "
                        f"{tuple(mask.shape)}."
                    )
                mask = mask & (given != 0)
            return values, mask
    values = _as_tensor(ref_rewards, "ref_rewards", device)
    if values.ndim != 2:
        raise CalibrationError(
            f"`ref_rewards` must be 2-D (B prompts × K references), got shape {tuple(values.shape)}. For a single "
            "prompt use `ref_rewards[None]`; for rows of different length pass a list of lists or use "
            "`pad_reference_rewards`."
        )
    mask = None
    if ref_mask is not None:
        mask = _as_tensor(ref_mask, "ref_mask", values.device)
        if mask.shape != values.shape:
            raise CalibrationError(
                f"`ref_mask` has shape {tuple(mask.shape)} but `ref_rewards` has shape {tuple(values.shape)}; they "
                "must match (True = valid reference reward)."
            )
        if mask.dtype != torch.bool:
            mask = mask != 0
    return values, mask


def _check_references(
    values: torch.Tensor, mask: torch.Tensor | None, min_references: int, row_ids: list[int] | None = None
) -> torch.Tensor:
    """Validate finiteness and counts; return the number of valid references per row (int64).

    `row_ids` maps the rows of `values` to the caller's row numbers (for error messages about a subset)."""
    if values.is_floating_point():
        bad = ~torch.isfinite(values)
        if mask is not None:
            bad &= mask
        bad_rows = bad.any(dim=1)
        if bool(bad_rows.any()):
            local = bad_rows.nonzero().flatten().tolist()
            cols = [int(bad[r].nonzero()[0, 0]) for r in local[:_MAX_REPORT]]
            extra = [f"reference {k} is {values[r, k].item()}" for r, k in zip(local, cols)]
            rows = local if row_ids is None else [row_ids[i] for i in local]
            raise CalibrationError(
                f"Non-finite reference rewards (NaN/±inf) in {_rows_text(rows, extra)}. Calibration needs finite "
                f"reference rewards. {_REBUILD_HINT}, or mask the bad entries out with `ref_mask`."
            )
    return _count_references(values, mask, min_references)


def _count_references(
    values: torch.Tensor, mask: torch.Tensor | None, min_references: int, count: torch.Tensor | None = None
) -> torch.Tensor:
    """Number of valid references per row (int64); raises for rows with fewer than `min_references`."""
    if count is None:
        count = (
            mask.sum(dim=1, dtype=torch.int64)
            if mask is not None
            else torch.full((values.shape[0],), values.shape[1], dtype=torch.int64, device=values.device)
        )
    short = count < min_references
    if bool(short.any()):
        rows = short.nonzero().flatten().tolist()
        counts = count[rows[:_MAX_REPORT]].tolist()
        what = "No valid reference rewards (K = 0)" if all(c == 0 for c in counts) else "Too few reference rewards"
        raise CalibrationError(
            f"{what} in {_rows_text(rows, [f'{c} valid' for c in counts])}: every prompt needs at least "
            f"min_references={min_references} valid reference rewards to be calibrated against. {_REBUILD_HINT} with "
            "more samples per prompt, drop these prompts, or lower min_references."
        )
    return count


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Comparison dtype: the *least* precise floating dtype among the floating inputs (a float32 reward of 0.3 must
    tie a float64 reference of 0.3), promoted to at least float32; integers only if every input is an integer."""
    floats = [t.dtype for t in tensors if t.dtype.is_floating_point]
    if floats:
        dtype = min(floats, key=lambda d: torch.finfo(d).bits)
    else:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    if dtype in (torch.float16, torch.bfloat16):  # sign sums in half precision are not exact beyond 2^11 / 2^8
        dtype = torch.float32
    if dtype == torch.bool:
        dtype = torch.int64
    return dtype


# ---------------------------------------------------------------------------------------------------------------------
# per-reward reference columns
def reference_reward_names(row: Any) -> list[str] | None:
    """The reward names of one per-reward reference row ``{name: [K floats]}``; None for a plain list row."""
    return list(row) if isinstance(row, dict) else None


def select_reference_rewards(rows: Sequence[Any], key: str | None = None, *, column: str = "ref_rewards",
                             first_row: int = 0) -> list:
    """One reward's reference rewards, row by row, from a reference column.

    A reference column holds per prompt either a plain list of K rewards (one reward, or several combined with their
    weights) or, for per-reward references, ``{name: [K floats]}`` (an Arrow struct of lists; a JSON object in JSONL).
    With `key` the entry `key` of every row is returned; without it, plain rows pass through and a row with a single
    entry gives that entry. `first_row` numbers the rows in error messages (the dataset row of ``rows[0]``).

    Raises:
        CalibrationError: a per-reward row without `key` (naming the row and the rewards it holds), several entries
            and no `key`, or a plain row where `key` was asked for.
    """
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            if key is None:
                if len(row) != 1:
                    raise CalibrationError(
                        f"Column {column!r} holds per-reward reference rewards (row {first_row + i} has "
                        f"{sorted(row)}): say which reward to calibrate, e.g. key={sorted(row)[0]!r}, or name the "
                        "reward in the procedure spec ('bon:n=4@name')."
                    )
                row = next(iter(row.values()))
            elif key not in row or row[key] is None:
                raise CalibrationError(
                    f"Column {column!r} has no reference rewards for reward {key!r} at row {first_row + i} (it holds "
                    f"{sorted(k for k, v in row.items() if v is not None)}). Rebuild the references with every reward "
                    f"function (`build_reference_rewards(..., per_reward=True)`), or check the reward's name."
                )
            else:
                row = row[key]
        elif key is not None:
            raise CalibrationError(
                f"Column {column!r} holds one list of reference rewards per prompt (row {first_row + i}), but the "
                f"rewards of {key!r} were asked for: build per-reward references (`build_reference_rewards(..., "
                "per_reward=True)` or `trl-infalign build-reference --per_reward`) so that each reward has its own."
            )
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# calibration
def calibrate(
    rewards: Any,
    ref_rewards: Any,
    ref_mask: Any = None,
    *,
    nonfinite: str = "raise",
    min_references: int = 1,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    r"""Calibrated rewards c = (#{ref < r} + ½·#{ref = r}) / K, one per row.

    Args:
        rewards: shape (B,) — the raw reward of each response (tensor, numpy array or list).
        ref_rewards: shape (B, K) — row i holds the reference rewards of response i's prompt (tensor or numpy), or a
            ragged list of lists (padded with a mask, see :func:`pad_reference_rewards`).
        ref_mask: optional bool (B, K), True = valid reference; K in the formula is the row's number of valid ones.
        nonfinite: ``"raise"`` (default) raises :class:`CalibrationError` on a NaN/±inf reward; ``"nan"`` returns
            c = NaN for that row instead (TRL treats a NaN reward as unscorable: that completion gets no advantage).
            Non-finite *reference* rewards always raise.
        min_references: rows with fewer valid references raise (naming the rows and their counts).
        chunk_elements: rows × K processed per step (memory bound); default 2^20 on CPU, 2^26 on accelerators.

    Returns:
        float tensor (B,) on `rewards`' device (a tensor `rewards` decides the device; otherwise `ref_rewards`'),
        float64 if `rewards` or `ref_rewards` is float64, else float32.  Identical on CPU and CUDA.

    Mixed precision: values are compared in the least precise floating dtype of the two inputs (float16/bfloat16
    count as float32), so a float32 reward of 0.3 ties a float64 reference of 0.3 instead of beating it by
    float32 rounding.  Float64 references beyond the float32 range then compare as ±inf, which still orders them
    correctly against every finite float32 reward.

    Raises:
        CalibrationError: wrong ndim, B mismatch, non-finite values, rows with fewer than `min_references` refs.
    """
    if nonfinite not in ("raise", "nan"):
        raise CalibrationError(f"nonfinite must be 'raise' or 'nan', got {nonfinite!r}.")
    if isinstance(min_references, bool) or int(min_references) != min_references or min_references < 1:
        raise CalibrationError(f"min_references must be an integer >= 1, got {min_references!r}.")
    min_references = int(min_references)

    device = rewards.device if isinstance(rewards, torch.Tensor) else None
    if device is None and isinstance(ref_rewards, torch.Tensor):
        device = ref_rewards.device
    r = _as_tensor(rewards, "rewards", device)
    if r.ndim != 1:
        raise CalibrationError(
            f"`rewards` must be 1-D (one reward per response), got shape {tuple(r.shape)}. "
            + ("Use `rewards.reshape(-1)` if this is a column vector." if r.ndim == 2 and 1 in r.shape[1:] else "")
        )
    values, mask = _reference_tensors(ref_rewards, ref_mask, r.device)
    if values.shape[0] != r.shape[0]:
        raise CalibrationError(
            f"Shape mismatch: {r.shape[0]} rewards but {values.shape[0]} rows of reference rewards. Row i of "
            "`ref_rewards` must hold the references of response i's prompt (repeat a prompt's row for each of its "
            "completions, e.g. `ref_rewards.repeat_interleave(num_generations, 0)`)."
        )
    out_dtype = torch.float64 if torch.float64 in (r.dtype, values.dtype) else torch.float32
    B, K = values.shape
    if B == 0:
        return torch.empty(0, dtype=out_dtype, device=r.device)
    if mask is None or not _compute_dtype(r, values).is_floating_point:
        count = _count_references(values, mask, min_references)
    else:
        count = None  # counted inside the chunk loop (float sums of the mask: much faster than bool sums)

    finite = torch.isfinite(r) if r.is_floating_point() else torch.ones_like(r, dtype=torch.bool)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        if nonfinite == "raise":
            extra = [f"reward {r[i].item()}" for i in rows[:_MAX_REPORT]]
            raise CalibrationError(
                f"Non-finite reward (NaN/±inf) at {_rows_text(rows, extra)}. Fix the reward function for these "
                "responses, or pass nonfinite='nan' to calibrate them to NaN (unscorable)."
            )
        r = torch.where(finite, r, torch.zeros((), dtype=r.dtype, device=r.device))

    dtype = _compute_dtype(r, values)
    original_values = values
    r = r.to(dtype)
    values = values.to(dtype)
    floating = dtype.is_floating_point
    # Σ sign is an integer in [−K, K]: exact in float32 up to 2^24.
    if floating:
        sum_dtype = dtype if (dtype == torch.float64 or K < (1 << 24)) else torch.float64
    else:
        sum_dtype = torch.int64
    if chunk_elements is None:
        chunk_elements = CPU_CHUNK_ELEMENTS if r.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    rows_per_chunk = max(1, int(chunk_elements) // max(K, 1))
    signs = torch.empty(B, dtype=sum_dtype, device=r.device)
    row_sums = torch.empty(B, dtype=dtype, device=r.device) if floating else None
    zero = torch.zeros((), dtype=dtype, device=r.device)
    mask_u8 = mask.view(torch.uint8) if mask is not None else None  # uint8 -> float casts are much faster than bool
    counts_f = torch.empty(B, dtype=sum_dtype, device=r.device) if (floating and mask is not None) else None

    def chunk_signs(refs: torch.Tensor, rc: torch.Tensor, out: torch.Tensor) -> None:
        torch.sum(torch.sign(rc - refs), dim=1, dtype=sum_dtype, out=out)

    for start in range(0, B, rows_per_chunk):
        stop = min(B, start + rows_per_chunk)
        refs = values[start:stop]
        rc = r[start:stop, None]
        if floating:
            if mask is not None:  # padded slots -> 0 (their sign(r − 0) is subtracted below); NaN/inf garbage -> NaN
                valid = mask_u8[start:stop].to(dtype)
                torch.sum(valid, dim=1, dtype=sum_dtype, out=counts_f[start:stop])  # exact: integers < 2^24
                refs = refs * valid
            chunk_signs(refs, rc, signs[start:stop])
            # a NaN/±inf reference (or padding garbage) makes the row sum non-finite: re-checked exactly below
            torch.sum(refs, dim=1, out=row_sums[start:stop])
        else:  # integers: compare instead of subtracting (a subtraction could overflow)
            if mask is not None:
                refs = torch.where(mask[start:stop], refs, zero)
            signs[start:stop] = (refs < rc).sum(dim=1) - (refs > rc).sum(dim=1)
    if count is None:
        count = _count_references(values, mask, min_references, count=counts_f.to(torch.int64))
    if floating:
        suspicious = ~torch.isfinite(row_sums)
        if bool(suspicious.any()):  # rare: exact check of the flagged rows (a finite row can also overflow its sum)
            rows = suspicious.nonzero().flatten()
            _check_references(original_values[rows], None if mask is None else mask[rows], 1, row_ids=rows.tolist())
            if mask is not None:  # valid values are finite: only padding garbage was hit; redo these rows exactly
                refs = torch.where(mask[rows], values[rows], zero)
                chunk_signs(refs, r[rows, None], flagged := torch.empty(rows.numel(), dtype=sum_dtype, device=r.device))
                signs[rows] = flagged
    if mask is not None:
        padded = (K - count).to(sum_dtype)
        signs = signs - padded * torch.sign(r).to(sum_dtype)
    # K_valid + Σ_valid sign(r − ref) = 2·#{ref < r} + #{ref = r}
    numerator = (signs + count.to(sum_dtype)).to(out_dtype)
    c = numerator / (2 * count).to(out_dtype)
    if nonfinite == "nan" and not bool(finite.all()):
        c = torch.where(finite, c, torch.full((), math.nan, dtype=out_dtype, device=c.device))
    return c


# ---------------------------------------------------------------------------------------------------------------------
# per-prompt summaries of the reference rewards (used by the `lsc` transform)
def _valid_references(ref_rewards: Any, ref_mask: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(values as float64 for float64 input else float32, mask, valid count per row); raises on bad references."""
    device = ref_rewards.device if isinstance(ref_rewards, torch.Tensor) else None
    values, mask = _reference_tensors(ref_rewards, ref_mask, device)
    count = _check_references(values, mask, 1)
    return values.to(torch.float64 if values.dtype == torch.float64 else torch.float32), mask, count


def reference_quantile(ref_rewards: Any, ref_mask: Any = None, q: float = 0.5) -> torch.Tensor:
    """Per-row q-quantile of the valid reference rewards (linear interpolation, as `numpy.quantile`'s default).

    Returns a float tensor (B,) (float64 for float64 input, else float32).  Raises :class:`CalibrationError` for
    non-finite references or rows without valid references.
    """
    q = float(q)
    if not 0.0 <= q <= 1.0:
        raise CalibrationError(f"q must be in [0, 1], got {q!r}.")
    values, mask, count = _valid_references(ref_rewards, ref_mask)
    dtype = values.dtype
    if mask is not None:
        values = torch.where(mask, values, torch.tensor(math.inf, dtype=dtype, device=values.device))
    ordered = values.sort(dim=1).values
    pos = q * (count - 1).to(torch.float64)
    lo = pos.floor().to(torch.int64)
    hi = torch.minimum(lo + 1, count - 1)
    frac = (pos - lo.to(torch.float64)).to(dtype)
    v_lo = ordered.gather(1, lo[:, None]).squeeze(1)
    v_hi = ordered.gather(1, hi[:, None]).squeeze(1)
    return v_lo + frac * (v_hi - v_lo)


def reference_centre(ref_rewards: Any, ref_mask: Any = None, centre: str | float = "mean") -> torch.Tensor:
    """Per-row centre of the valid reference rewards: ``"mean"``, ``"median"``, or a quantile level in [0, 1]."""
    if isinstance(centre, str) and centre == "median":
        return reference_quantile(ref_rewards, ref_mask, 0.5)
    if not isinstance(centre, str):
        return reference_quantile(ref_rewards, ref_mask, float(centre))
    if centre != "mean":
        raise CalibrationError(f"centre must be 'mean', 'median' or a quantile level in [0, 1], got {centre!r}.")
    values, mask, count = _valid_references(ref_rewards, ref_mask)
    dtype = values.dtype
    if mask is not None:
        values = torch.where(mask, values, torch.zeros((), dtype=dtype, device=values.device))
    return values.sum(dim=1) / count.to(dtype)
