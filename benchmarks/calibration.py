"""Throughput of trl_infalign.calibrate against baselines, all measured in the same run.

    python benchmarks/calibration.py [--quick] [--sizes 1000,10000] [--ks 16,128] [--device cpu|cuda]
                                     [--output benchmarks/results]

Methods (responses/s = rows of (reward, K reference rewards) calibrated per second; best of several repeats):
  calibrate          trl_infalign.calibrate, dense (B, K) float32 references
  calibrate+mask     the same with a ragged mask (~10% of the slots padded)
  torch sort+search  torch.sort per row + torch.searchsorted left/right (the other vectorised algorithm)
  numpy searchsorted np.sort(axis=1) + one np.searchsorted per row (a Python loop over rows); measured on at most
                     --baseline-rows rows, throughput is per row
  python loop        the definition in pure Python on at most --python-rows rows (throughput per row, measured on
                     that many rows and labelled so)

Every method's output is checked to equal `calibrate`'s on the rows it ran.  Combinations with B·K above
--max-elements are skipped (memory cap).  `--quick` runs a subset in well under a minute on 2 CPU cores.
Writes `calibration.json` in the output directory (results are not meant to be committed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trl_infalign.calibration import calibrate


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: str, min_total: float = 0.2, min_repeats: int = 3, max_repeats: int = 50) -> float:
    fn()  # warm-up
    _sync(device)
    best, total, n = float("inf"), 0.0, 0
    while n < min_repeats or (total < min_total and n < max_repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        elapsed = time.perf_counter() - start
        best, total, n = min(best, elapsed), total + elapsed, n + 1
    return best


def torch_sort_searchsorted(r: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    s = ref.sort(dim=1).values
    rr = r[:, None].contiguous()
    lo = torch.searchsorted(s, rr, side="left").squeeze(1)
    hi = torch.searchsorted(s, rr, side="right").squeeze(1)
    return (lo + hi).to(torch.float32) / (2 * ref.shape[1])


def numpy_searchsorted(r: np.ndarray, ref: np.ndarray) -> np.ndarray:
    s = np.sort(ref, axis=1)
    out = np.empty(r.shape[0], dtype=np.float64)
    for i in range(r.shape[0]):
        row = s[i]
        out[i] = np.searchsorted(row, r[i], "left") + np.searchsorted(row, r[i], "right")
    return (out / (2 * ref.shape[1])).astype(np.float32)


def python_loop(r: list, ref: list) -> list:
    out = []
    for x, row in zip(r, ref):
        less = equal = 0
        for v in row:
            if v < x:
                less += 1
            elif v == x:
                equal += 1
        out.append((less + 0.5 * equal) / len(row))
    return out


def parse_ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="Comma-separated batch sizes B (default 1e3,1e4,1e5,1e6).")
    parser.add_argument("--ks", default=None, help="Comma-separated reference counts K (default 16,128,1024).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output", default="benchmarks/results", help="Directory for calibration.json.")
    parser.add_argument("--quick", action="store_true", help="A subset that runs in < 1 minute on 2 CPU cores.")
    parser.add_argument("--max-elements", type=float, default=2.7e8,
                        help="Skip combinations with B*K above this (memory cap; default 2.7e8 ≈ 1 GiB float32).")
    parser.add_argument("--baseline-rows", type=int, default=None,
                        help="Rows for the numpy per-row searchsorted baseline (default 20000; quick 2000).")
    parser.add_argument("--python-rows", type=int, default=None,
                        help="Rows for the pure-Python loop (default 2000; quick 300).")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    sizes = parse_ints(args.sizes) if args.sizes else ([1000, 10000, 100000] if args.quick else
                                                       [1000, 10000, 100000, 1000000])
    ks = parse_ints(args.ks) if args.ks else [16, 128, 1024]
    baseline_rows = args.baseline_rows or (2000 if args.quick else 20000)
    python_rows = args.python_rows or (300 if args.quick else 2000)
    max_elements = min(args.max_elements, 2.0e7) if args.quick else args.max_elements
    min_total = 0.05 if args.quick else 0.3
    device = args.device

    gen = torch.Generator().manual_seed(args.seed)
    results, skipped = [], []
    header = (f"{'B':>8} {'K':>5}  {'calibrate':>11} {'+mask':>11} {'torch sort':>11} {'numpy ss':>11} "
              f"{'python':>11}  {'vs sort':>7} {'vs numpy':>8} {'vs python':>9}")
    print(f"calibrate throughput (responses/s), device={device}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}")
    print(header)
    print("-" * len(header))
    for K in ks:
        for B in sizes:
            if B * K > max_elements:
                skipped.append({"B": B, "K": K, "reason": f"B*K={B * K:.3g} > max_elements={max_elements:.3g}"})
                continue
            # integer-valued float32 rewards: realistic reward-model resolution and plenty of ties
            ref = torch.randint(-50, 50, (B, K), generator=gen).to(torch.float32)
            r = torch.randint(-50, 50, (B,), generator=gen).to(torch.float32)
            mask = torch.rand(B, K, generator=gen) > 0.1
            mask[:, 0] = True
            ref_d, r_d, mask_d = ref.to(device), r.to(device), mask.to(device)

            row = {"B": B, "K": K, "device": device}
            expected = calibrate(r_d, ref_d).cpu()
            t = best_time(lambda: calibrate(r_d, ref_d), device, min_total)
            row["calibrate"] = B / t
            t = best_time(lambda: calibrate(r_d, ref_d, mask_d), device, min_total)
            row["calibrate_masked"] = B / t
            masked_ref = [ref[i][mask[i]].tolist() for i in range(min(B, python_rows))]
            check = calibrate(r[: len(masked_ref)].tolist(), masked_ref).to(torch.float32)
            assert torch.equal(calibrate(r_d, ref_d, mask_d)[: len(masked_ref)].cpu(), check), "masked mismatch"

            sorted_out = torch_sort_searchsorted(r_d, ref_d)
            assert torch.equal(sorted_out.cpu(), expected), "torch sort+searchsorted disagrees with calibrate"
            t = best_time(lambda: torch_sort_searchsorted(r_d, ref_d), device, min_total)
            row["torch_sort_searchsorted"] = B / t

            nb = min(B, baseline_rows)
            r_np, ref_np = r[:nb].numpy(), ref[:nb].numpy()
            assert np.array_equal(numpy_searchsorted(r_np, ref_np), expected[:nb].numpy()), "numpy disagrees"
            t = best_time(lambda: numpy_searchsorted(r_np, ref_np), "cpu", min_total, min_repeats=1, max_repeats=3)
            row["numpy_searchsorted"] = nb / t
            row["numpy_rows_measured"] = nb

            npy = min(B, python_rows)
            r_py, ref_py = r[:npy].tolist(), ref[:npy].tolist()
            assert np.allclose(python_loop(r_py, ref_py), expected[:npy].numpy(), rtol=0, atol=0), "python disagrees"
            t = best_time(lambda: python_loop(r_py, ref_py), "cpu", min_total, min_repeats=1, max_repeats=3)
            row["python_loop"] = npy / t
            row["python_rows_measured"] = npy

            row["speedup_vs_torch_sort"] = row["calibrate"] / row["torch_sort_searchsorted"]
            row["speedup_vs_numpy"] = row["calibrate"] / row["numpy_searchsorted"]
            row["speedup_vs_python"] = row["calibrate"] / row["python_loop"]
            results.append(row)
            print(f"{B:>8} {K:>5}  {row['calibrate']:>11.3g} {row['calibrate_masked']:>11.3g} "
                  f"{row['torch_sort_searchsorted']:>11.3g} {row['numpy_searchsorted']:>11.3g} "
                  f"{row['python_loop']:>11.3g}  {row['speedup_vs_torch_sort']:>6.3g}x "
                  f"{row['speedup_vs_numpy']:>7.3g}x {row['speedup_vs_python']:>8.3g}x", flush=True)
            del ref, r, mask, ref_d, r_d, mask_d
    for s in skipped:
        print(f"skipped B={s['B']} K={s['K']}: {s['reason']}")
    if load_before and load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average was {load_before[0]:.1f} on {os.cpu_count()} CPUs at the start: other processes "
              "were competing for the cores, timings are noisy.")
    print(f"numpy per-row baseline measured on ≤{baseline_rows} rows, python loop on ≤{python_rows} rows "
          "(per-row throughput; both scale linearly in B).")

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
        "platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": device,
        "cuda_device": torch.cuda.get_device_name() if device == "cuda" else None,
        "quick": args.quick, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "units": "responses per second (best of repeats)",
        "loadavg_before": load_before, "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    path = out_dir / "calibration.json"
    path.write_text(json.dumps({"meta": meta, "results": results, "skipped": skipped}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
