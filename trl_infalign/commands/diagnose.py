"""`trl-infalign diagnose`: predict what each alignment method buys at a KL budget from reference rewards alone.

Examples::

    trl-infalign diagnose --dataset ref-out/ --procedure bon --n 4 --kl 0.5            # build-reference's output
    trl-infalign diagnose --dataset data.jsonl --column ref_rewards --procedure bon --n 4 --kl 0.5 --json
    trl-infalign diagnose --dataset data.parquet --procedure won --n 8 --kl 1 --plot diagnose.png
    trl-infalign diagnose --dataset data.jsonl --methods raw_reward identity bon:t=10 --kl 0.5
    trl-infalign diagnose --dataset ref-out/ --procedure "mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless" --kl 0.5

Every method's optimum is π_ref reweighted by exp(Φ/β) on each prompt's K reference samples, with one global β
root-found to the KL budget; KL and win rates are exact for that discrete reference (docs/diagnose.md). A procedure
naming rewards ("...@helpful") is a deployment over several rewards, diagnosed on the shared reference completions of a
per-reward column ({name: [K floats]} per row). By default the report also says how the predictions move with fewer
references (K/2, K/4: `k_sensitivity`); --no-k-sensitivity skips it.
"""

from __future__ import annotations

import argparse
import json

from . import positive_float, positive_int, procedure_spec, resolve_procedure


def procedure_or_deployment(text: str) -> str:
    """argparse type: a procedure spec, or a deployment spec naming rewards ('...@name'), checked at parse time."""
    from ..deployment import get_deployment, is_multi_reward_spec

    if not is_multi_reward_spec(text):
        return procedure_spec(text)
    try:
        get_deployment(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True,
                        help="A .jsonl/.json/.parquet file or a `save_to_disk` directory (e.g. the output of "
                        "`trl-infalign build-reference`) with one list of reference rewards per prompt.")
    parser.add_argument("--column", default="ref_rewards", help="Reference-rewards column (default: ref_rewards).")
    parser.add_argument("--split", default=None, help="Split of a saved DatasetDict.")
    parser.add_argument("--procedure", type=procedure_or_deployment, default="bon",
                        help="Inference procedure: standard, bon, won (N from --n), a spec such as bon:n=8, a "
                        "mixture such as 'mixture:0.5*standard+0.5*bon:n=16' (default: bon), or a deployment over "
                        "several rewards such as 'mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless' (needs a "
                        "per-reward column).")
    parser.add_argument("--n", type=positive_int, default=None, help="N of a bare bon / won (default: 4).")
    parser.add_argument("--kl", type=positive_float, default=0.5,
                        help="KL budget in nats, averaged over prompts (default: 0.5; below log K).")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="raw_reward identity best_t optimal lsc par vbon (default: all) and/or transform specs "
                        "such as bon:t=10; for a deployment over several rewards raw_sum calibrated_sum "
                        "normalized_sum identity best_t optimal per_prompt_optimum (default: all) and/or per-reward "
                        "specs such as bon:t=3@helpful+won:t=5@harmless.")
    parser.add_argument("--lsc-centre", default="mean", help="r_ref(x) of lsc: mean, median or a quantile in [0, 1].")
    parser.add_argument("--no-k-sensitivity", dest="k_sensitivity", action="store_false",
                        help="Skip the K-sensitivity check (by default every method is rerun on --k-repeats random "
                        "subsamples of K/2 and K/4 references per prompt: about 2·repeats more runs on smaller data).")
    parser.add_argument("--k-repeats", type=positive_int, default=4,
                        help="Random subsamples per smaller K in the K-sensitivity check (default: 4).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the K-sensitivity subsamples (default: 0).")
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

    from ..deployment import is_multi_reward_spec

    multi = is_multi_reward_spec(args.procedure)
    if multi and args.n is not None:
        raise ValueError(f"--n does not apply to the deployment {args.procedure!r}: each component has its own N "
                         "(bon:n=4@name); drop --n.")
    if multi and args.plot:
        raise ValueError("--plot is not available for a deployment over several rewards yet: drop --plot (the "
                         "table and --json hold every number).")
    procedure = args.procedure if multi else resolve_procedure(args.procedure, args.n)
    with warnings.catch_warnings(record=True):  # the notes are in the result (and printed below)
        warnings.simplefilter("always")
        result = diagnose(args.dataset, procedure=procedure, kl=args.kl,
                          methods=args.methods,
                          column=args.column, split=args.split, lsc_centre=_centre(args.lsc_centre),
                          k_sensitivity=args.k_sensitivity, k_repeats=args.k_repeats, seed=args.seed)
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
