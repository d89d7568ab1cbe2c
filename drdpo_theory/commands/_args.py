"""Argument types shared by the subcommands (argparse ``type=`` callables with clear messages)."""

from __future__ import annotations

import argparse
import math


def number(text: str) -> float:
    """A float; ``inf`` allowed, NaN refused."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(v):
        raise argparse.ArgumentTypeError("NaN is not allowed")
    return v


def numbers(text: str) -> tuple[float, ...]:
    """Comma-separated numbers, e.g. ``0,0.5,1``."""
    return tuple(number(t) for t in text.split(",") if t.strip())


def ints(text: str) -> tuple[int, ...]:
    """Comma-separated integers."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def n_jobs(value: int) -> int:
    """``--n-jobs`` checked (>= 1 or -1, else exit 2) and capped at the CPU count (one-line notice on stderr)."""
    import sys

    from ..cli import CLIError
    from ..experiments.sweep import resolve_n_jobs

    try:
        workers, notice = resolve_n_jobs(value)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    return workers


def output_dir(path, flag: str):
    """``path`` as a writable output folder (:func:`drdpo_theory.io.check_output_dir`), else exit 2."""
    from ..cli import CLIError
    from ..io import OutputPathError, check_output_dir

    try:
        return check_output_dir(path, flag)
    except OutputPathError as exc:
        raise CLIError(str(exc)) from None


def output_file(path, flag: str):
    """``path`` as a writable output file (:func:`drdpo_theory.io.check_output_file`), else exit 2."""
    from ..cli import CLIError
    from ..io import OutputPathError, check_output_file

    try:
        return check_output_file(path, flag)
    except OutputPathError as exc:
        raise CLIError(str(exc)) from None


def claim_output_dir(path, study: str, flag: str = "--out", tables: dict | None = None):
    """Mark ``path`` as ``study``'s folder (:func:`drdpo_theory.io.claim_output_dir`); another
    study's folder, or a table named in ``tables`` that the study did not write: exit 2."""
    from ..cli import CLIError
    from ..io import OutputPathError, check_foreign_tables, claim_output_dir as _claim

    try:
        check_foreign_tables(path, tables or {}, flag)
        return _claim(path, study, flag)
    except OutputPathError as exc:
        raise CLIError(str(exc)) from None


def quick_figures(out_given: str | None, figures: str | None, quick: bool, default_full: str = "figures") -> str:
    """Figure folder: ``figures`` if given; else for a quick run ``OUT/figures`` (with ``--out``) or
    ``figures/quick`` (not committed), so a quick run never overwrites the committed full-run figures."""
    import os

    if figures is not None:
        return figures
    if not quick:
        return default_full
    return os.path.join(out_given, "figures") if out_given else os.path.join("figures", "quick")


def study_outputs(args, study: str, default_out: str, tables: dict | None = None) -> tuple[str, str]:
    """The ``(out, figures)`` folders of a study command, checked and claimed (exit 2 otherwise).

    ``out`` is ``--out`` or ``default_out`` ("" keeps tables in memory only); ``figures`` follows
    :func:`quick_figures`. Both must be writable folders (:func:`output_dir`), and ``out`` becomes
    ``study``'s folder (:func:`claim_output_dir`, refusing ``tables`` the study did not write).
    """
    out = args.out if args.out is not None else default_out
    figures = quick_figures(args.out or None, args.figures, args.quick)
    if out:
        output_dir(out, "--out")
    if figures:
        output_dir(figures, "--figures")
    if out:
        claim_output_dir(out, study, tables=tables)
    return out, figures
