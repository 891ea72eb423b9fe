"""Timing of the calibrated-space model (trl_infalign.theory): frontiers, the optimal transform, best t.

    python benchmarks/theory.py [--output benchmarks/results]

Prints a table and writes `theory.json` in the output directory.  Every timing is cold (caches cleared first).
Targets: a 50-point frontier and one optimal transform in < 1 s each.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from trl_infalign import theory


def quiet(fn, *args):
    """Call fn without printing its bound warnings (best_t at large N sits on t = 700 by design)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args)


def timed(fn, repeats=3):
    best, result = float("inf"), None
    for _ in range(repeats):
        theory.clear_caches()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results", help="Directory for theory.json.")
    parser.add_argument("--repeats", type=int, default=3, help="Best of this many cold runs.")
    args = parser.parse_args(argv)
    kls50 = np.linspace(0.06, 3.0, 50)
    cases = [
        ("frontier bon:t=10, bon N=4, 50 KLs", lambda: len(theory.frontier(["bon:t=10"], "bon", 4, kls=kls50)), 1.0),
        ("frontier won:t=5, won N=4, 50 KLs", lambda: len(theory.frontier(["won:t=5"], "won", 4, kls=kls50)), 1.0),
        ("frontier identity, 50 betas", lambda: len(theory.frontier(["identity"], "bon", 4,
                                                                     betas=np.logspace(-3, 1, 50))), 1.0),
        ("optimal_policy(bon, 4, beta=0.1)", lambda: theory.optimal_policy("bon", 4, beta=0.1).kl(), 1.0),
        ("optimal_policy(won, 4, beta=0.1)", lambda: theory.optimal_policy("won", 4, beta=0.1).kl(), 1.0),
        ("optimal_policy(bon, 32, beta=1e-3)", lambda: theory.optimal_policy("bon", 32, beta=1e-3).kl(), 1.0),
        ("optimal_policy(bon, 4, kl=0.5)", lambda: theory.optimal_policy("bon", 4, kl=0.5).beta, None),
        ("frontier optimal, bon N=4, 25 KLs", lambda: len(theory.frontier(["optimal"], "bon", 4)), None),
        ("best_t(bon, 4, kl=0.5)", lambda: theory.best_t("bon", 4, 0.5).t, None),
        ("best_t(won, 4, kl=0.5)", lambda: theory.best_t("won", 4, 0.5).t, None),
        ("best_t(bon, 10^4, kl=0.5)", lambda: quiet(theory.best_t, "bon", 10_000, 0.5).t, None),
        ("best_t(won, 10^4, kl=0.5)", lambda: quiet(theory.best_t, "won", 10_000, 0.5).t, None),
        ("win_rate(bon:t=700, bon N=10^6)", lambda: theory.policy("bon:t=700", 1e303).win_rate("bon", 10**6), None),
        ("beta_for_kl(bon:t=10, 0.5)", lambda: theory.beta_for_kl("bon:t=10", 0.5), None),
    ]
    rows = []
    for name, fn, target in cases:
        seconds, value = timed(fn, args.repeats)
        rows.append({"case": name, "seconds": seconds, "target_s": target, "result": value,
                     "ok": None if target is None else seconds < target})
    width = max(len(r["case"]) for r in rows)
    print(f"{'case':<{width}}  {'seconds':>9}  {'target':>7}  result")
    for r in rows:
        target = "-" if r["target_s"] is None else f"<{r['target_s']:g}s"
        print(f"{r['case']:<{width}}  {r['seconds']:9.4f}  {target:>7}  {r['result']:.6g}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "theory", "python": platform.python_version(), "machine": platform.machine(),
               "numpy": np.__version__, "rows": rows}
    (out / "theory.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {out / 'theory.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
