"""`trl-infalign` command line: one sub-command per module in `trl_infalign.commands`.

Each command module defines `add_parser(subparsers)` and `run(args) -> int`; modules are imported only when
their command runs, so `trl-infalign theory` never imports torch-heavy training code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "theory": ("trl_infalign.commands.theory", "Predict KL and BoN/WoN win rates of a transform in calibrated space."),
    "build-reference": (
        "trl_infalign.commands.build_reference",
        "Sample K reference completions per prompt, score them, and add a `ref_rewards` column.",
    ),
    "evaluate": (
        "trl_infalign.commands.evaluate",
        "Measure standard / BoN-N / WoN-N win rates and KL of a policy against its reference.",
    ),
    "diagnose": (
        "trl_infalign.commands.diagnose",
        "Predict each method's KL and win rates at a KL budget from a dataset's reference rewards alone.",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-infalign", description="InfAlign / CTRL for Hugging Face TRL.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if name == command:
            module = importlib.import_module(module_name)
            module.add_parser(subparsers.add_parser(name, help=help_text, description=help_text))
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if command is None:
        parser.print_help()
        return 0 if not argv else 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as error:
        # Bad input (a missing column or file, an invalid value, no network, a missing extra): say what and how to fix it, without a
        # traceback. TRL_INFALIGN_DEBUG=1 shows the traceback.
        if os.environ.get("TRL_INFALIGN_DEBUG"):
            raise
        print(f"trl-infalign {command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
