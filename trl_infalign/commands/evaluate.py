"""`trl-infalign evaluate`: win rates under inference procedures (standard / BoN-N / WoN-N / mixtures / registered
procedures) and KL of a policy against its reference.

    trl-infalign evaluate --model ctrl-out --ref-model sft --reward-model rm --dataset prompts.jsonl \\
        --num-prompts 256 --num-samples 32 --n 1 2 4 8 16 32 --output eval/
    trl-infalign evaluate --scored scored.json --n 1 2 4 8 --output eval/     # samples scored elsewhere (vLLM, ...)
    trl-infalign evaluate --scored scored.json --procedures standard 'mixture:0.5*standard+0.5*bon:n=4' --output eval/
    accelerate launch --multi_gpu --num_processes 8 -m trl_infalign.cli evaluate ...   # prompts sharded
    trl-infalign evaluate --model ctrl-out --ref-model sft --reward-model rms/helpful --reward-model rms/harmless \
        --dataset prompts.jsonl --procedures 'mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless' --output eval/

`--scored` takes `{"policy_rewards": [[...], ...], "reference_rewards": [[...], ...]}` (one row per prompt, null for a
missing sample), optionally with `"policy_logps"` / `"reference_logps"` (log π and log π_ref of the policy samples, each
summed over the completion's tokens) for the KL. Writes `evaluation.json`, `evaluation.md` and `win_rate_vs_n.png` to
`--output` and prints the table; the KL is reported per completion, in nats (k1 with its CI is the headline).
`--procedures` takes `standard`, `bon`, `won` (bare `bon` / `won` are evaluated at every `--n`) and full procedure
specs evaluated once at their own N (`bon:n=8`, `won:n=16`, `mixture:0.7*standard+0.3*bon:n=8`, registered names;
quote specs containing `*`). Win rates needing more samples than there are per prompt are dropped with a `warning:`
line on stderr naming them. A deployment that names rewards (`...@helpful`) judges each component on the
`--reward-model` of that name (its path's last segment) alone and reports Σ_j w_j W_j; with `--scored`, give each
reward's matrices as `"policy_rewards_by_reward": {"helpful": [[...]], ...}` and `"reference_rewards_by_reward"`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

from . import positive_float, positive_int, top_k_value, top_p_value


def procedure_spec(text: str) -> str:
    """argparse type: an inference-procedure spec (`standard`, `bon`, `bon:n=8`, `mixture:...`, a registered name) or
    a deployment that names rewards (`mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless`)."""
    from ..deployment import get_deployment, is_multi_reward_spec
    from ..procedures import ProcedureError, get_procedure

    try:
        get_deployment(text) if is_multi_reward_spec(text) else get_procedure(text)
    except ProcedureError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text.strip()


def reward_model_name(path: str) -> str:
    """The name TRL gives the reward model loaded from `path` (its last segment), which deployments name after '@'."""
    return str(path).rstrip("/").split("/")[-1]


def add_parser(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("models (sample and score here)")
    src.add_argument("--model", help="Policy to evaluate: local path or hub id.")
    src.add_argument("--ref-model", help="Reference policy (usually the SFT model); must share the policy's tokenizer.")
    src.add_argument(
        "--reward-model", action="append", dest="reward_models", metavar="PATH",
        help="Sequence-classification reward model; repeat for several (combined with --reward-weights). A deployment "
             "in --procedures names each by its path's last segment ('.../rm-helpful' is @rm-helpful).",
    )
    src.add_argument("--reward-weights", type=float, nargs="+", default=None, help="One weight per --reward-model.")
    src.add_argument("--dataset", help="A .json/.jsonl/.parquet/.csv file, a `save_to_disk` directory, or a hub name.")
    src.add_argument("--dataset-config", default=None)
    src.add_argument("--split", default="test", help="Split (default: test; a local file is read as one split).")
    src.add_argument("--prompt-column", default="prompt")
    src.add_argument("--num-prompts", type=positive_int, default=None, help="Use the first k prompts.")
    src.add_argument("--num-samples", "-m", type=positive_int, default=32, help="m samples per prompt and model.")
    src.add_argument("--max-new-tokens", type=positive_int, default=64)
    src.add_argument("--batch-size", type=positive_int, default=32, help="Completions per generate call.")
    src.add_argument("--temperature", type=positive_float, default=1.0,
                     help="Sampling temperature for both models (default 1: sample the policy itself; the KL assumes it).")
    src.add_argument("--top-p", type=top_p_value, default=1.0, help="Nucleus sampling for both models (default 1: off).")
    src.add_argument("--top-k", type=top_k_value, default=0, help="Top-k sampling for both models (default 0: off).")
    parser.add_argument("--scored", metavar="FILE.json", help="Already-scored samples instead of models (see above).")
    parser.add_argument("--n", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16, 32], dest="ns",
                        help="N values; N above the samples per prompt is dropped with a warning on stderr.")
    parser.add_argument(
        "--procedures", nargs="+", type=procedure_spec, default=["standard", "bon", "won"], metavar="SPEC",
        help="Inference procedures (default: standard bon won). Bare bon / won are evaluated at every --n; full specs "
             "once at their own N: bon:n=8, won:n=16, 'mixture:0.5*standard+0.5*bon:n=4' (quote it), registered names; "
             "deployments that name rewards, 'mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless', judge each component "
             "on its own --reward-model.",
    )
    parser.add_argument("--num-bootstrap", type=int, default=1000)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="Output directory.")
    parser.add_argument("--per-prompt", action="store_true", help="Also store per-prompt win rates in the JSON.")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


_BY_REWARD = ("policy_rewards_by_reward", "reference_rewards_by_reward")


def _load_scored(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    per_reward = all(k in data for k in _BY_REWARD)
    missing = [k for k in ("policy_rewards", "reference_rewards") if k not in data]
    if missing and not per_reward:
        raise SystemExit(f"error: {path} lacks {missing}: expected {{\"policy_rewards\": [[...]], \"reference_rewards\": [[...]]}}.")

    def matrix(rows, key):
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
            raise SystemExit(f"error: {path}: {key} must be a non-empty list of per-prompt lists.")
        width = max(len(r) for r in rows)
        return [[math.nan if v is None else float(v) for v in r] + [math.nan] * (width - len(r)) for r in rows]

    out = {k: matrix(data[k], k) for k in ("policy_rewards", "reference_rewards", "policy_logps", "reference_logps") if k in data}
    for key in _BY_REWARD:
        if key in data:
            if not isinstance(data[key], dict) or not data[key]:
                raise SystemExit(f"error: {path}: {key} must be an object {{reward name: [[...], ...]}}, one matrix "
                                 "per reward function.")
            out[key] = {name: matrix(rows, f"{key}[{name!r}]") for name, rows in data[key].items()}
    return out


def _report_warnings(caught, is_main: bool) -> None:
    """Print our SkippedNWarning / sampling warnings as `warning: ...` lines on stderr; re-emit everything else."""
    from ..evaluation import SkippedNWarning

    for w in caught:
        if issubclass(w.category, SkippedNWarning) or str(w.message).startswith("evaluate_policy:"):
            if is_main:
                print(f"warning: {w.message}", file=sys.stderr, flush=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import SkippedNWarning, evaluate_policy, evaluate_scored

    output = Path(args.output)
    if args.scored:
        if args.model or args.ref_model or args.reward_models or args.dataset:
            raise SystemExit("error: --scored replaces --model/--ref-model/--reward-model/--dataset: give one or the other.")
        sampling = [flag for flag, value, default in (("--temperature", args.temperature, 1.0), ("--top-p", args.top_p, 1.0),
                                                      ("--top-k", args.top_k, 0)) if value != default]
        if sampling:
            raise SystemExit(f"error: --temperature/--top-p/--top-k set how --model and --ref-model are sampled; with "
                             f"--scored the samples were drawn elsewhere: drop {', '.join(sampling)}.")
        data = _load_scored(args.scored)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SkippedNWarning)
            try:
                result = evaluate_scored(
                    data.get("policy_rewards"), data.get("reference_rewards"), args.ns, args.procedures,
                    data.get("policy_logps"), data.get("reference_logps"), num_bootstrap=args.num_bootstrap,
                    confidence=args.confidence, seed=args.seed, metadata={"scored": str(args.scored)},
                    policy_rewards_by_reward=data.get(_BY_REWARD[0]), reference_rewards_by_reward=data.get(_BY_REWARD[1]),
                )
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
        _report_warnings(caught, True)
        is_main = True
    else:
        missing = [flag for flag, v in (("--model", args.model), ("--ref-model", args.ref_model),
                                        ("--reward-model", args.reward_models), ("--dataset", args.dataset)) if not v]
        if missing:
            raise SystemExit(f"error: missing {', '.join(missing)} (or pass --scored FILE.json).")
        from ..sampling import resolve_process_state
        from .build_reference import load_prompts

        from ..evaluation import plan_procedures, split_by_samples
        from ..evaluation.planning import bind_deployment, deployment_min_samples, split_deployments

        state = resolve_process_state()
        ordinary, deployments = split_deployments(args.procedures)
        # `rms/harmless/` is `rms/harmless`: loaded without the slash, TRL's name (the last segment) is "harmless"
        args.reward_models = [p.rstrip("/") or p for p in args.reward_models]
        names = [reward_model_name(p) for p in args.reward_models]
        try:  # before any model is loaded: a misnamed reward fails in seconds, not after the sampling
            for d in deployments:
                bind_deployment(d, names)
        except ValueError as e:
            raise SystemExit(f"error: --procedures {d.spec}: {e}") from None
        plans = plan_procedures(ordinary, args.ns) if ordinary else []
        kept, dropped = split_by_samples(plans, args.num_samples)
        kept_d = [d for d in deployments if deployment_min_samples(d) <= args.num_samples]
        dropped_d = [d for d in deployments if d not in kept_d]
        dropped_ns = sorted({p.n for p in dropped if p.n is not None})
        dropped_specs = [p.procedure.spec for p in dropped if p.n is None] + [d.spec for d in dropped_d]
        what = " and ".join(
            ([f"--n {' '.join(map(str, dropped_ns))}"] if dropped_ns else [])
            + ([f"--procedures {' '.join(dropped_specs)}"] if dropped_specs else [])
        )
        need = max([p.procedure.min_samples for p in dropped] + [deployment_min_samples(d) for d in dropped_d] + [0])
        if (dropped or dropped_d) and not kept and not kept_d:
            raise SystemExit(
                f"error: nothing to evaluate: {what} need more than --num-samples {args.num_samples} samples per prompt "
                f"(a procedure drawing N samples per request needs at least N). Pass --num-samples {need} (or more), or "
                "lower --n."
            )
        if (dropped or dropped_d) and state.is_main_process:
            # Said up front (sampling can take hours), in CLI terms; the API's warning is then not repeated.
            print(f"warning: skipping {what}: --num-samples {args.num_samples} gives only {args.num_samples} samples "
                  f"per prompt and a procedure drawing N samples per request needs at least N (evaluating "
                  f"{', '.join([p.procedure.spec for p in kept] + [d.spec for d in kept_d])}). Pass --num-samples "
                  f"{need} (or more) to evaluate them.",
                  file=sys.stderr, flush=True)
        dataset = load_prompts(args.dataset, args.split, args.dataset_config)
        if args.prompt_column not in dataset.column_names:
            raise SystemExit(f"error: no column {args.prompt_column!r} in {args.dataset} (columns: {dataset.column_names}).")
        if args.num_prompts is not None:
            dataset = dataset.select(range(min(args.num_prompts, len(dataset))))
        if args.prompt_column != "prompt":
            dataset = dataset.remove_columns([c for c in ["prompt"] if c in dataset.column_names])
            dataset = dataset.rename_column(args.prompt_column, "prompt")
        with warnings.catch_warnings(record=True) as caught:
            result = evaluate_policy(
                args.model, args.ref_model, list(args.reward_models), dataset, reward_weights=args.reward_weights,
                num_samples=args.num_samples, ns=sorted({p.n for p in kept if p.n is not None}),
                procedures=[p.procedure for p in kept] + kept_d,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                batch_size=args.batch_size, num_bootstrap=args.num_bootstrap, confidence=args.confidence,
                seed=args.seed, accelerator=state, progress=not args.no_progress, policy_name=str(args.model),
            )
        _report_warnings(caught, state.is_main_process)
        result.metadata["dataset"] = args.dataset
        result.metadata["ns_requested"] = sorted(set(args.ns))
        result.metadata["ns_skipped"] = dropped_ns
        result.metadata["procedures_skipped"] = [p.procedure.spec for p in dropped] + [d.spec for d in dropped_d]
        is_main = state.is_main_process
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        result.to_json(output / "evaluation.json", per_prompt=args.per_prompt)
        table = result.to_markdown()
        (output / "evaluation.md").write_text("# Inference-time win rates\n\n" + table + "\n")
        if not args.no_plot:
            try:
                result.plot(output / "win_rate_vs_n.png")
            except ImportError as e:
                print(f"(no plot: {e})")
        print(table, flush=True)
        print(f"\nWrote {output / 'evaluation.json'}, {output / 'evaluation.md'}"
              + ("" if args.no_plot else f", {output / 'win_rate_vs_n.png'}"), flush=True)
    return 0
