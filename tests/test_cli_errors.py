"""Every ``drdpo`` subcommand reports argparse errors as one line on stderr (plus "see --help"), exit 2."""

import pytest

from drdpo_theory.cli import EXIT_USAGE, build_parser, main


def _subcommands():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(sub.choices)


SUBCOMMANDS = _subcommands()


def test_every_subcommand_is_covered():
    # the list is read from the parser; this guards against it silently coming back empty
    assert {"solve", "align", "shift", "gradients", "sample-complexity", "reproduce"} <= set(SUBCOMMANDS)


def _usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_unknown_option_is_one_line(command, capsys):
    code, out, err = _usage_error([command, "--no-such-option", "1"], capsys)
    assert code == EXIT_USAGE
    assert err.count("\n") == 1, err
    assert err.startswith(f"drdpo {command}: error: ")
    assert err.rstrip().endswith(f"(see 'drdpo {command} --help')")
    assert "usage:" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["solve", "--method", "dpo"], "the following arguments are required: --data, --beta, --radius"),
        (["solve", "--method", "ppo", "--data", "f", "--beta", "1", "--radius", "1"], "invalid choice: 'ppo'"),
        (["solve", "--method", "dpo", "--data", "f", "--beta", "abc", "--radius", "1"], "expected a number, got 'abc'"),
        (["solve", "--method", "dpo", "--data", "f", "--beta", "nan", "--radius", "1"], "NaN is not allowed"),
        (["no-such-command"], "invalid choice: 'no-such-command'"),
    ],
)
def test_argparse_messages_keep_their_content(argv, expect, capsys):
    code, out, err = _usage_error(argv, capsys)
    assert code == EXIT_USAGE
    assert err.count("\n") == 1, err
    assert expect in err
