"""`trl-infalign diagnose`: predict what each alignment method buys at a KL budget from reference rewards alone.

Examples::

    trl-infalign diagnose --dataset ref-out/ --procedure bon --n 4 --kl 0.5            # build-reference's output
    trl-infalign diagnose --dataset data.jsonl --column ref_rewards --procedure bon --n 4 --kl 0.5 --json
    trl-infalign diagnose --dataset data.parquet --procedure won --n 8 --kl 1 --plot diagnose.png
    trl-infalign diagnose --dataset data.jsonl --methods raw_reward identity bon:t=10 --kl 0.5

Every method's optimum is π_ref reweighted by exp(Φ/β) on each prompt's K reference samples, with one global β
root-found to the KL budget; KL and win rates are exact for that discrete reference (docs/diagnose.md).
"""

from __future__ import annotations

import argparse
import json

from . import positive_float, positive_int, procedure_spec, resolve_procedure


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True,
                        help="A .jsonl/.json/.parquet file or a `save_to_disk` directory (e.g. the output of "
                        "`trl-infalign build-reference`) with one list of reference rewards per prompt.")
    parser.add_argument("--column", default="ref_rewards", help="Reference-rewards column (default: ref_rewards).")
    parser.add_argument("--split", default=None, help="Split of a saved DatasetDict.")
    parser.add_argument("--procedure", type=procedure_spec, default="bon",
                        help="Inference procedure: standard, bon, won (N from --n), a spec such as bon:n=8, or a "
                        "mixture such as 'mixture:0.5*standard+0.5*bon:n=16' (default: bon).")
    parser.add_argument("--n", type=positive_int, default=None, help="N of a bare bon / won (default: 4).")
    parser.add_argument("--kl", type=positive_float, default=0.5,
                        help="KL budget in nats, averaged over prompts (default: 0.5; below log K).")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="raw_reward identity best_t optimal lsc par vbon (default: all) and/or transform specs "
                        "such as bon:t=10.")
    parser.add_argument("--lsc-centre", default="mean", help="r_ref(x) of lsc: mean, median or a quantile in [0, 1].")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="Also draw win rate vs KL for each method, the budget marked (needs matplotlib).")


def _centre(text: str):
    if text in ("mean", "median"):
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--lsc-centre must be mean, median or a quantile level in [0, 1], got {text!r}.") from None


def run(args: argparse.Namespace) -> int:
    import warnings

    from ..diagnose import diagnose

    with warnings.catch_warnings(record=True):  # the notes are in the result (and printed below)
        warnings.simplefilter("always")
        result = diagnose(args.dataset, procedure=resolve_procedure(args.procedure, args.n), kl=args.kl,
                          methods=args.methods,
                          column=args.column, split=args.split, lsc_centre=_centre(args.lsc_centre))
    out = result.to_dict()
    out["dataset"] = str(args.dataset)
    out["column"] = args.column
    if args.plot:
        result.plot(args.plot)
        out["plot"] = args.plot
    if args.json:
        print(json.dumps(out))
    else:
        print(result.to_markdown())
        if args.plot:
            print(f"\nPlot: {args.plot}")
    return 0
