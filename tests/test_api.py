"""The public API: every exported name resolves, and the CLI lists its commands."""

import pytest

import trl_infalign
from trl_infalign.cli import COMMANDS, main


def test_every_exported_name_resolves():
    missing = [name for name in trl_infalign.__all__ if getattr(trl_infalign, name, None) is None]
    assert not missing
    from trl_infalign import CTRLConfig, CTRLTrainer  # noqa: F401  (the README's import line)

    assert issubclass(trl_infalign.CTRLTrainer, __import__("trl").RLOOTrainer)
    assert issubclass(trl_infalign.CTRLConfig, __import__("trl").RLOOConfig)


def test_cli_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    with pytest.raises(SystemExit) as exit_info:  # argparse: "invalid choice", exit code 2
        main(["no-such-command"])
    assert exit_info.value.code == 2


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    code = main(["evaluate", "--scored", str(tmp_path / "missing.json"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("trl-infalign evaluate: error:") and "missing.json" in err and "Traceback" not in err
