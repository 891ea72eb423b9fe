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


@pytest.mark.parametrize("name,good,bad", [
    ("positive_int", [("3", 3)], [("x", "expected an integer, got 'x'"), ("0", "expected an integer >= 1, got '0'")]),
    ("positive_float", [("0.5", 0.5)], [("x", "expected a number, got 'x'"),
                                        ("inf", "expected a finite number > 0, got 'inf'"),
                                        ("0", "expected a finite number > 0, got '0'")]),
    ("nonnegative_float", [("0", 0.0)], [("x", "expected a number >= 0, got 'x'"),
                                         ("nan", "expected a finite number >= 0, got 'nan'"),
                                         ("-1", "expected a finite number >= 0, got '-1'")]),
    ("top_p_value", [("1", 1.0)], [("x", "expected a number in (0, 1], got 'x'"),
                                   ("0", "expected a number in (0, 1] (1 = no nucleus truncation), got '0'")]),
    ("top_k_value", [("0", 0)], [("1.5", "expected an integer >= 0, got '1.5'"),
                                 ("-1", "expected an integer >= 0 (0 = no top-k truncation), got '-1'")]),
])
def test_cli_number_types(name, good, bad):
    """The CLI's number types (one factory, `commands.number_type`): values, and errors that say what was expected."""
    import argparse

    from trl_infalign import commands

    parse = getattr(commands, name)
    assert parse.__name__ == name
    for text, value in good:
        assert parse(text) == value and type(parse(text)) is type(value)
    for text, message in bad:
        with pytest.raises(argparse.ArgumentTypeError) as error:
            parse(text)
        assert str(error.value) == message
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--x", type=parse)
    with pytest.raises(argparse.ArgumentError, match="expected"):
        parser.parse_args(["--x", bad[-1][0]])
