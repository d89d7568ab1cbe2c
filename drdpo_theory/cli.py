"""The ``drdpo`` command line: a thin layer that parses, calls the package and prints.

Subcommands live in ``drdpo_theory/commands/<name>.py``; each module defines
``register(subparsers)``, which adds its parser and sets ``func`` (``args -> exit code``).
Heavy imports (torch, cvxpy) happen inside ``func``, so ``drdpo --help`` stays fast.

Exit codes: 0 success; 2 bad input (a one-line message on stderr, never a traceback);
3 a solver failed or could not certify its answer; 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys

from . import __version__

EXIT_OK, EXIT_USAGE, EXIT_SOLVER, EXIT_INTERRUPT = 0, 2, 3, 130


class CLIError(Exception):
    """A user error: printed as one line to stderr, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (plus "see --help"), exit 2.

    argparse prints the whole usage block before the message; a user reading a log wants the
    message. Subparsers inherit the class (``add_subparsers`` defaults ``parser_class`` to it), so
    every ``drdpo`` subcommand reports the same way.
    """

    def error(self, message: str):
        message = " ".join(str(message).split())  # argparse messages may contain newlines
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def emit_summary(summary: dict, as_json: bool, width: int = 40) -> None:
    """Print a study summary: one JSON line (``--json``), or one ``key value`` line per entry."""
    if as_json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:{width}s} {v}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="drdpo",
        description="Distributionally robust DPO (WDPO, KLDPO): exact solvers, studies and LLM training.",
    )
    parser.add_argument("--version", action="version", version=f"drdpo-theory {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import commands

    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        importlib.import_module(f"{commands.__name__}.{mod.name}").register(sub)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    """``{name: parser}`` of the subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser, so the hint names its --help
        target = _subparsers(parser).get(getattr(args, "command", None), parser)
        target.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"drdpo {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"drdpo {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
