"""Tests of trl_infalign.calibration: exactness against a slow reference, invariances, and error messages."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from trl_infalign.calibration import (
    CalibrationError,
    calibrate,
    pad_reference_rewards,
    reference_centre,
    reference_quantile,
)


def slow_calibrate(rewards, rows):
    """The definition, in exact rational arithmetic: (#{ref < r} + ½ #{ref = r}) / K."""
    out = []
    for r, refs in zip(rewards, rows):
        less = sum(1 for x in refs if x < r)
        equal = sum(1 for x in refs if x == r)
        out.append(float(Fraction(2 * less + equal, 2 * len(refs))))
    return out


def ragged(rng, B, k_max, low=0, high=8, dtype=float):
    lengths = rng.integers(1, k_max + 1, size=B)
    return [list(rng.integers(low, high, size=int(k)).astype(dtype)) for k in lengths]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_definition_dense_with_ties(dtype):
    rng = np.random.default_rng(0)
    B, K = 500, 37
    ref = rng.integers(0, 6, size=(B, K)).astype(np.float64)  # many ties
    r = rng.integers(-1, 7, size=B).astype(np.float64)
    c = calibrate(torch.tensor(r, dtype=dtype), torch.tensor(ref, dtype=dtype))
    assert c.dtype == dtype and c.shape == (B,)
    expected = torch.tensor(slow_calibrate(r, ref.tolist()), dtype=torch.float64).to(dtype)
    assert torch.equal(c, expected)
    # the ties really happened, and half-counting them matters
    assert (c * K * 2 % 2 == 1).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_elements", [None, 7, 1000])
def test_matches_definition_ragged_masked(dtype, chunk_elements):
    rng = np.random.default_rng(1)
    rows = ragged(rng, 300, 20)
    r = rng.integers(-1, 9, size=len(rows)).astype(np.float64)
    values, mask = pad_reference_rewards(rows, dtype=dtype)
    assert values.dtype == dtype and mask.dtype == torch.bool
    assert mask.sum().item() == sum(len(row) for row in rows)
    # garbage in padded slots (including NaN/inf) must be ignored
    values = values.masked_fill(~mask, float("nan"))
    values[:, -1] = torch.where(mask[:, -1], values[:, -1], torch.tensor(float("inf"), dtype=dtype))
    c = calibrate(torch.tensor(r, dtype=dtype), values, mask, chunk_elements=chunk_elements)
    expected = torch.tensor(slow_calibrate(r, rows), dtype=torch.float64).to(dtype)
    assert torch.equal(c, expected)
    # a ragged list is padded internally with the same result (Python floats -> float64)
    c_list = calibrate(r.tolist(), rows)
    assert c_list.dtype == torch.float64
    assert torch.equal(c_list, torch.tensor(slow_calibrate(r, rows), dtype=torch.float64))


def test_continuous_values_and_negative_zero():
    rng = np.random.default_rng(2)
    B, K = 200, 64
    ref = rng.standard_normal((B, K))
    r = np.concatenate([ref[:100, 3], rng.standard_normal(100)])  # half the rewards equal one reference
    c = calibrate(torch.tensor(r), torch.tensor(ref))
    assert torch.equal(c, torch.tensor(slow_calibrate(r, ref.tolist())))
    # +0.0 and -0.0 are equal: a tie
    c0 = calibrate(torch.tensor([0.0]), torch.tensor([[-0.0, 1.0]]))
    assert c0.item() == 0.25


def test_huge_and_tiny_values_are_exact():
    ref = torch.tensor([[-1.7e308, 1.7e308, 5e-324, -5e-324, 0.0, 1.0]], dtype=torch.float64).repeat(6, 1)
    r = ref[0].clone()
    c = calibrate(r, ref)
    assert torch.equal(c, torch.tensor(slow_calibrate(r.tolist(), ref.tolist()), dtype=torch.float64))


def test_integer_inputs_and_int_extremes():
    big = torch.iinfo(torch.int64).max
    ref = torch.tensor([[big, -big, 0, 3], [1, 2, 3, 4]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    r = torch.tensor([big, 2])
    c = calibrate(r, ref, mask)
    assert c.dtype == torch.float32
    assert c.tolist() == pytest.approx([(2 + 0.5) / 3, (1 + 0.5) / 2])


def test_numpy_input_and_output_dtype_rules():
    ref = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    assert calibrate(np.array([2.0], dtype=np.float32), ref).dtype == torch.float32
    assert calibrate(torch.tensor([2.0], dtype=torch.float64), torch.tensor(ref)).dtype == torch.float64
    assert calibrate(torch.tensor([2.0], dtype=torch.bfloat16), torch.tensor(ref)).dtype == torch.float32
    assert calibrate(torch.tensor([2.0]), torch.tensor(ref)).item() == 0.5


def test_empty_batch():
    c = calibrate(torch.empty(0), torch.empty(0, 4))
    assert c.shape == (0,)


def test_monotone_transformation_invariance():
    rng = np.random.default_rng(3)
    B, K = 400, 33
    ref = rng.integers(0, 10, size=(B, K)).astype(np.float64) + rng.standard_normal((B, 1))
    r = rng.integers(0, 10, size=B).astype(np.float64) + ref[:, :1].ravel() * 0
    r = np.where(rng.random(B) < 0.5, ref[:, 0], r)
    base = calibrate(torch.tensor(r), torch.tensor(ref))

    def f(x):  # strictly increasing, with a per-prompt scale and offset
        scale = np.arange(1, B + 1)[:, None] * 0.1
        return np.tanh(x / 20.0) * scale + 3.0 * np.arange(B)[:, None]

    transformed = calibrate(torch.tensor(f(r[:, None]).ravel()), torch.tensor(f(ref)))
    assert torch.equal(base, transformed)
    # a decreasing map flips c -> 1 - c
    flipped = calibrate(torch.tensor(-r), torch.tensor(-ref))
    assert torch.allclose(flipped, 1.0 - base, atol=1e-15)


def test_reference_samples_are_uniform_mid_ranks():
    rng = np.random.default_rng(4)
    B, K = 50, 40
    ref = torch.tensor(rng.integers(0, 5, size=(B, K)), dtype=torch.float64)  # heavy ties
    # score every reference sample against its own row's set (including itself)
    r = ref.reshape(-1)
    c = calibrate(r, ref.repeat_interleave(K, dim=0)).reshape(B, K)
    assert torch.allclose(c.mean(dim=1), torch.full((B,), 0.5, dtype=torch.float64), atol=1e-15, rtol=0)
    # distinct values: exactly the mid-ranks (2j - 1) / (2K)
    distinct = torch.tensor(rng.permutation(K), dtype=torch.float64)[None].repeat(3, 1)
    c = calibrate(distinct.reshape(-1), distinct.repeat_interleave(K, dim=0)).reshape(3, K)
    expected = (2 * distinct + 1) / (2 * K)
    assert torch.equal(c, expected)


def test_large_batch_matches_chunked_and_sorted():
    g = torch.Generator().manual_seed(5)
    B, K = 20_000, 16
    ref = torch.randint(0, 9, (B, K), generator=g).float()
    r = torch.randint(0, 9, (B,), generator=g).float()
    c = calibrate(r, ref)
    s = ref.sort(dim=1).values
    lo = torch.searchsorted(s, r[:, None], side="left").squeeze(1)
    hi = torch.searchsorted(s, r[:, None], side="right").squeeze(1)
    assert torch.equal(c, (lo + hi).float() / (2 * K))
    assert torch.equal(c, calibrate(r, ref, chunk_elements=100))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(6)
    rows = ragged(rng, 1000, 50, high=20)
    r = torch.tensor(rng.integers(0, 20, size=len(rows)), dtype=torch.float32)
    values, mask = pad_reference_rewards(rows, dtype=torch.float32)
    cpu = calibrate(r, values, mask)
    gpu = calibrate(r.cuda(), values.cuda(), mask.cuda())
    assert gpu.device.type == "cuda"
    assert torch.equal(cpu, gpu.cpu())


# ---------------------------------------------------------------------------------------------------------------------
# errors
def _raises(match_rows, *args, **kwargs):
    with pytest.raises(CalibrationError) as info:
        calibrate(*args, **kwargs)
    for needle in match_rows:
        assert needle in str(info.value), str(info.value)
    return str(info.value)


def test_nonfinite_reward_raises_naming_row():
    ref = torch.zeros(5, 3)
    r = torch.tensor([0.0, 1.0, 2.0, float("nan"), 0.0])
    msg = _raises(["row 3", "nonfinite='nan'"], r, ref)
    assert "nan" in msg
    r = torch.tensor([0.0, float("inf"), 2.0, float("-inf"), 0.0])
    _raises(["rows 1", "3"], r, ref)


def test_nonfinite_nan_mode_gives_nan_rows():
    ref = torch.tensor([[0.0, 1.0]] * 4)
    r = torch.tensor([0.5, float("nan"), float("inf"), 1.0])
    c = calibrate(r, ref, nonfinite="nan")
    assert c[0].item() == 0.5 and c[3].item() == 0.75
    assert math.isnan(c[1].item()) and math.isnan(c[2].item())


def test_nonfinite_reference_raises_naming_row_and_fix():
    ref = torch.zeros(4, 3, dtype=torch.float64)
    ref[2, 1] = float("nan")
    msg = _raises(["row 2", "reference 1", "Rebuild or clean the reference rewards"], torch.zeros(4), ref)
    ref[2, 1] = 0.0
    ref[0, 0] = float("-inf")
    _raises(["row 0"], torch.zeros(4), ref, nonfinite="nan")  # references always raise
    # a finite row whose sum overflows is fine (the fast check is verified exactly)
    ref[0, 0] = 1.7e308
    ref[0, 1] = 1.7e308
    assert calibrate(torch.zeros(4, dtype=torch.float64), ref)[0].item() == pytest.approx(1 / 6)
    assert "reference" in msg


def test_masked_nonfinite_references_are_ignored():
    ref = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
    mask = torch.tensor([[True, False], [False, True]])
    assert calibrate(torch.tensor([1.0, 3.0]), ref, mask).tolist() == [0.5, 1.0]


def test_row_without_references_raises():
    values, mask = pad_reference_rewards([[1.0, 2.0], [], [3.0]])
    msg = _raises(["row 1", "K = 0"], torch.zeros(3), values, mask)
    assert "0 valid" in msg
    _raises(["row 1"], [0.0, 0.0, 0.0], [[1.0, 2.0], [], [3.0]])


def test_min_references():
    rows = [[1.0, 2.0, 3.0], [1.0], [1.0, 2.0], [4.0, 5.0, 6.0]]
    msg = _raises(["rows 1 (1 valid), 2 (2 valid)", "min_references=3"], [0.0] * 4, rows, min_references=3)
    assert "Too few" in msg
    assert calibrate([0.0] * 4, rows, min_references=1).shape == (4,)
    with pytest.raises(CalibrationError, match="min_references"):
        calibrate([0.0], [[1.0]], min_references=0)


def test_shape_errors():
    _raises(["3 rewards", "2 rows"], torch.zeros(3), torch.zeros(2, 4))
    _raises(["1-D"], torch.zeros(3, 1), torch.zeros(3, 4))
    _raises(["2-D"], torch.zeros(3), torch.zeros(3))
    _raises(["ref_mask"], torch.zeros(3), torch.zeros(3, 4), torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(CalibrationError, match="nonfinite"):
        calibrate(torch.zeros(1), torch.zeros(1, 1), nonfinite="skip")


def test_many_bad_rows_are_summarised():
    ref = torch.zeros(30, 2)
    r = torch.full((30,), float("nan"))
    msg = _raises(["rows 0 (reward nan), 1 (reward nan)", "9 (reward nan) (and 20 more)"], r, ref)
    assert "row 29" not in msg


def test_pad_reference_rewards():
    values, mask = pad_reference_rewards([[1, 2, 3], (4.5,), np.array([6.0, 7.0]), torch.tensor([8.0])])
    assert values.shape == (4, 3) and values.dtype == torch.float64
    assert mask.tolist() == [[True, True, True], [True, False, False], [True, True, False], [True, False, False]]
    assert values[mask].tolist() == [1, 2, 3, 4.5, 6, 7, 8]
    assert values[~mask].eq(0).all()
    with pytest.raises(CalibrationError, match="row 1"):
        pad_reference_rewards([[1.0], ["a", "b"]])
    with pytest.raises(CalibrationError, match="row 0"):
        pad_reference_rewards([[[1.0, 2.0]]])
    values, mask = pad_reference_rewards([])
    assert values.shape == (0, 0)


def test_reference_quantile_and_centre():
    rows = [[3.0, 1.0, 2.0], [10.0], [4.0, 1.0, 2.0, 3.0]]
    values, mask = pad_reference_rewards(rows)
    for q in (0.0, 0.25, 0.5, 0.9, 1.0):
        got = reference_quantile(values, mask, q)
        expected = [np.quantile(row, q) for row in rows]
        assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert reference_centre(values, mask, "mean").tolist() == pytest.approx([2.0, 10.0, 2.5])
    assert reference_centre(rows, None, "median").tolist() == pytest.approx([2.0, 10.0, 2.5])
    with pytest.raises(CalibrationError, match="centre"):
        reference_centre(values, mask, "mode")


def test_mixed_precision_compares_at_lower_precision():
    """A float32 reward of 0.3 ties a float64 reference of 0.3 (float32(0.3) > 0.3 would otherwise win)."""
    values, mask = pad_reference_rewards([[0.1, 0.3], [0.0, 1.2, 1.2], [0.4]])  # float64
    rewards = torch.tensor([0.3, 1.2, -0.5], dtype=torch.float32)
    c = calibrate(rewards, values, mask)
    assert c.dtype == torch.float64
    assert c.tolist() == [0.75, 2 / 3, 0.0]
    # float64 references beyond float32's range still order correctly and are not "non-finite"
    huge = torch.tensor([[1e300, -1e300, 0.0]], dtype=torch.float64)
    assert calibrate(torch.tensor([1.0]), huge).item() == pytest.approx(2 / 3)
    # both float64: exact float64 comparison
    assert calibrate(torch.tensor([0.3 + 1e-16], dtype=torch.float64), torch.tensor([[0.3]], dtype=torch.float64)).item() == 1.0


# ---------------------------------------------------------------------------------------------------------- array rows
@pytest.mark.parametrize("ragged", [False, True], ids=["equal-length", "ragged"])
def test_array_rows_give_bit_identical_rewards_to_list_rows(ragged):
    """The trainer's reward step takes reference rows as Python lists (TRL's rows), numpy arrays (a dataset in numpy /
    Arrow format) or a pre-built matrix (:meth:`RewardCalibration.reference_matrix`): c and Φ(c) are bit-identical.
    float32 arrays widen exactly to the float64 of their Python floats; ties with the raw rewards are kept."""
    from datasets import Dataset

    from trl_infalign.calibrated_reward import RewardCalibration
    from trl_infalign.transforms import get_transform

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 9, size=64) if ragged else np.full(64, 8)
    rows32 = [rng.normal(size=n).astype(np.float32) for n in lengths]
    lists = [[float(v) for v in row] for row in rows32]
    raw = torch.tensor([row[i % len(row)] if i % 3 == 0 else rng.normal() for i, row in enumerate(lists)],
                       dtype=torch.float64)  # every third raw reward ties a reference
    calibration = RewardCalibration(get_transform("bon:t=4"))
    reference = calibration.calibrate(raw, lists)
    arrow = Dataset.from_dict({"ref_rewards": lists}).with_format("numpy")["ref_rewards"]
    for rows in (rows32, [row.astype(np.float64) for row in rows32], list(arrow), [tuple(r) for r in lists]):
        for batch in (calibration.calibrate(raw, rows), calibration.calibrate(raw, matrix=calibration.reference_matrix(rows))):
            assert torch.equal(batch.calibrated, reference.calibrated)
            assert torch.equal(calibration.transformed(batch), calibration.transformed(reference))
    per_reward = [{"helpful": list(r), "harmless": [0.0] * len(r)} for r in lists]
    keyed = RewardCalibration(get_transform("bon:t=4"), key="helpful").calibrate(raw, per_reward)
    assert torch.equal(keyed.calibrated, reference.calibrated)
    assert torch.equal(reference.calibrated, calibrate(raw, pad_reference_rewards(lists)[0], pad_reference_rewards(lists)[1]))
