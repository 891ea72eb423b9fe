"""`trl-infalign theory`: calibrated-space predictions of KL and win rates for any inference procedure (notes §2).

Examples::

    trl-infalign theory --transform bon:t=10 --procedure bon --n 4 --kl 0.5 --json
    trl-infalign theory --transform optimal --procedure won --n 4 --beta 0.1
    trl-infalign theory --best-t --procedure bon --n 4 --kl 0.5 --json
    trl-infalign theory --transform bon:t=10 --procedure bon --n 4 --kl 0.5 --plot frontier.png
    trl-infalign theory --transform optimal --procedure "mixture:0.5*standard+0.25*bon:n=4+0.25*bon:n=16" --kl 0.5
"""

from __future__ import annotations

import argparse
import json
import sys

from . import nonnegative_float, positive_float, positive_int, procedure_spec, resolve_procedure


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transform", default=None,
                        help="Transform spec (bon:t=10, won:t=5, identity, log, optimal, ...). Required unless --best-t.")
    parser.add_argument("--procedure", type=procedure_spec, default="bon",
                        help="Inference procedure: standard, bon, won (N from --n), a spec such as bon:n=8, or a "
                        "mixture such as 'mixture:0.5*standard+0.5*bon:n=16' (default: bon).")
    parser.add_argument("--n", type=positive_int, default=None, help="N of a bare bon / won (default: 4).")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--kl", type=positive_float, default=None, help="KL budget KL(pi || pi_ref) in nats.")
    budget.add_argument("--beta", type=positive_float, default=None, help="KL coefficient beta.")
    parser.add_argument("--best-t", action="store_true",
                        help="Best t of the procedure's exp family (bon: exp(t c), won: -exp(-t c)) at --kl "
                        "(or, with --beta, maximising win rate - beta * KL).")
    parser.add_argument("--family", choices=("bon", "won"), default=None, help="Exp family for --best-t.")
    parser.add_argument("--min-beta", type=nonnegative_float, default=None,
                        help="--best-t: floor on the normalised KL coefficient beta / span(Phi) (default 0.01; 0 "
                        "disables it). Members below it drift in training.")
    parser.add_argument("--t-max", type=positive_float, default=None,
                        help="--best-t: upper end of the t search (default min(700, 60 * max(1, N/4)^2)).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="Also draw win-rate-vs-KL frontiers (given transform, identity, exp family at best t, "
                        "optimal) to this file (needs matplotlib).")
    parser.set_defaults(_theory_parser=parser)


def _fail(message: str, code: int) -> int:
    print(f"trl-infalign theory: error: {message}", file=sys.stderr)
    return code


def _compute(args) -> dict:
    from .. import theory

    procedure = resolve_procedure(args.procedure, args.n)
    n = procedure.n
    if args.best_t:
        import warnings

        limits = {"min_beta": theory.DEFAULT_MIN_BETA if args.min_beta is None else args.min_beta,
                  "t_max": args.t_max}
        with warnings.catch_warnings(record=True) as caught:  # printed as one line each, JSON stays on stdout
            warnings.simplefilter("always", UserWarning)
            if args.kl is not None:
                best = theory.best_t(procedure, kl=args.kl, family=args.family, **limits)
            else:
                best = theory.best_t_for_beta(procedure, beta=args.beta, family=args.family, details=True, **limits)
        for warning in caught:
            print(f"trl-infalign theory: warning: {warning.message}", file=sys.stderr)
        pol = theory.policy(best.transform, best.beta)
        out = {"t": best.t, "transform": best.transform, "family": best.family,
               "normalised_beta": best.normalised_beta, "on_bound": best.on_bound, "bound": best.bound,
               "t_range": list(best.t_range), "min_beta": best.min_beta,
               "unconstrained": None if best.unconstrained is None else dict(
                   zip(("t", "win_rate" if args.kl is not None else "objective"), best.unconstrained))}
    elif args.transform.strip() == "optimal":
        from ..transforms import get_transform

        pol = theory.optimal_policy(procedure, beta=args.beta, kl=args.kl)
        out = {"transform": get_transform("optimal", procedure=procedure, beta=float(f"{pol.beta:.6g}")).spec}
    else:
        from ..transforms import get_transform

        transform = get_transform(args.transform)
        beta = args.beta if args.kl is None else theory.beta_for_kl(transform, args.kl)
        pol = theory.policy(transform.spec, beta)
        out = {"transform": transform.spec}
    summary = pol.summary(procedure)
    out.update({"procedure": procedure.short_name or procedure.spec,
                "spec": summary.pop("procedure"), "n": n, **summary})
    return out


def _plot(args, result: dict) -> str:
    from .. import theory

    procedure = resolve_procedure(args.procedure, args.n)
    transforms = []
    if args.transform and args.transform.strip() != "optimal":
        transforms.append(result["transform"])
    if "identity" not in transforms:
        transforms.append("identity")
    if not procedure.is_standard:
        try:
            spec = (result["transform"] if args.best_t
                    else theory.best_t(procedure, kl=result["kl"], family=args.family).transform)
            if spec not in transforms:
                transforms.append(spec)
        except ValueError:
            pass
    transforms.append("optimal")
    kls = [k for k in theory.DEFAULT_KLS]
    theory.plot_frontiers(procedure, None, transforms, kls=kls, path=args.plot)
    return args.plot


def _print_table(result: dict) -> None:
    rows = [(key, f"{value:.6g}" if isinstance(value, float) else str(value)) for key, value in result.items()]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency, but keep a plain fallback
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
        return
    table = Table(title="Calibrated-space prediction (InfAlign, arXiv 2412.19792)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def run(args) -> int:
    parser = getattr(args, "_theory_parser", None)

    def usage_error(message: str) -> int:
        if parser is not None:
            parser.error(message)  # exits with code 2
        return _fail(message, 2)

    if args.best_t:
        if args.kl is None and args.beta is None:
            return usage_error("--best-t needs --kl (or --beta)")
        if args.transform is not None:
            return usage_error("--best-t picks the transform itself: drop --transform")
    elif args.min_beta is not None or args.t_max is not None:
        return usage_error("--min-beta and --t-max only apply with --best-t")
    else:
        if args.transform is None:
            return usage_error("--transform is required (or use --best-t)")
        if args.kl is None and args.beta is None:
            return usage_error("exactly one of --kl or --beta is required")

    from ..transforms import TransformError

    try:
        result = _compute(args)
    except TransformError as error:
        return _fail(str(error), 2)
    except ValueError as error:
        return _fail(str(error), 2)
    if args.plot:
        try:
            _plot(args, result)
        except ImportError as error:
            return _fail(str(error), 1)
        result["plot"] = args.plot
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return 0
