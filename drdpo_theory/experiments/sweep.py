"""A resumable, parallel sweep engine: one row per finished cell, appended to a CSV on disk.

Usage::

    df = run_sweep(cells, run_cell, "results/x/rows.csv", key=("method", "radius", "n", "seed"), n_jobs=2)

* ``cells`` is a list of dicts (picklable); ``func(cell) -> dict`` computes one row (a top-level,
  picklable function: it runs in joblib worker processes when ``n_jobs != 1``).
* Rows are appended to ``path`` as soon as their chunk finishes (one ``write`` + ``flush`` +
  ``fsync`` per chunk), with a final ``_done`` column; a rerun reads the file, skips every cell
  whose key is already there and computes only the rest. Interrupting (Ctrl-C, a kill, an
  exception in ``on_row``) loses at most the chunks in flight; a torn last line is dropped on read.
* The file is created atomically (header and first rows in one ``os.replace``), so it always
  starts with a complete header; a file whose header is not a sweep table of this ``key`` (a
  foreign ``rows.csv``) is refused with :class:`~drdpo_theory.io.OutputPathError`.
* Progress: a tqdm bar over cells.

The result is the tidy table of all finished rows (old and new), one row per cell, in the order
of ``cells`` (not the order in which workers finished), so everything computed from it (e.g. a
bootstrap over rows) is the same for every ``n_jobs``.
"""

from __future__ import annotations

import csv
import io
import math
import operator
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd

from ..io import OutputPathError, write_text

__all__ = ["cell_key", "load_rows", "run_sweep", "chunked", "resolve_n_jobs"]

DONE_COL = "_done"


def _norm(v) -> str:
    """Canonical text of a key value (floats to 12 significant digits, so CSV round trips match)."""
    if isinstance(v, bool):
        return str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return "nan"
    return format(f, ".12g")


def cell_key(cell: dict, key: Sequence[str]) -> tuple:
    """The identity of a cell: its ``key`` fields, canonicalised."""
    return tuple(_norm(cell[k]) for k in key)


def resolve_n_jobs(n_jobs: int, cpus: int | None = None) -> tuple[int, str | None]:
    """``(workers, notice)``: ``n_jobs`` checked and capped at the CPU count.

    ``n_jobs`` must be an integer >= 1 or -1 (all CPUs); anything else raises ``ValueError``.
    More workers than CPUs only cost memory and semaphores, so the value is capped at ``cpus``
    (default: the CPUs this process may use); ``notice`` is a one-line message when it was capped.
    """
    try:
        ok = not isinstance(n_jobs, bool) and operator.index(n_jobs) == n_jobs
    except TypeError:
        ok = False
    if not ok or n_jobs == 0 or n_jobs < -1:
        raise ValueError(f"--n-jobs must be an integer >= 1, or -1 for all CPUs; got {n_jobs!r}")
    n_jobs = int(n_jobs)
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
    cpus = max(1, int(cpus))
    if n_jobs == -1:
        return cpus, None
    if n_jobs > cpus:
        return cpus, f"--n-jobs {n_jobs} is more than the {cpus} CPUs available; using {cpus}"
    return n_jobs, None


def _header(path: Path) -> list[str] | None:
    """The header row, or None when the file has no complete first line (empty, or torn while the
    header was written by an older non-atomic writer): such a file holds no row and is started afresh."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        first = f.readline()
    if not first.endswith("\n") or not first.strip():
        return None
    return next(csv.reader([first]))


def _check_header(path: Path, header: list[str] | None, key: Sequence[str] = ()) -> None:
    missing = [] if header is None else [k for k in key if k not in header]
    if header is None or DONE_COL not in header or missing:
        what = f"lacks the key column(s) {missing}" if header and DONE_COL in header else \
            f"is not a sweep table (no '{DONE_COL}' column in its header)"
        raise OutputPathError(f"{path} {what}; it was not written by this study: move it away or use another --out")


def load_rows(path: str | Path, key: Sequence[str] = ()) -> pd.DataFrame:
    """All complete rows in ``path`` (empty frame if none); torn or partial lines are dropped.

    A non-empty file that is not a sweep table with the ``key`` columns raises
    :class:`~drdpo_theory.io.OutputPathError`.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame()
    header = _header(path)
    if header is None:  # no complete header line: nothing finished is in the file
        return pd.DataFrame()
    _check_header(path, header, key)
    df = pd.read_csv(path, on_bad_lines="skip", engine="python")
    df = df[pd.to_numeric(df[DONE_COL], errors="coerce") == 1]
    return df.drop(columns=[DONE_COL]).reset_index(drop=True)


def chunked(items: Sequence, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _run_chunk(func: Callable[[dict], dict], chunk: list[dict]) -> list[dict]:
    return [func(c) for c in chunk]


class _Appender:
    """Appends rows to a CSV with a fixed header (taken from the file or the first row)."""

    def __init__(self, path: Path):
        self.path = path
        self.header: list[str] | None = None
        if path.exists() and path.stat().st_size > 0:
            self.header = _header(path)

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        new_file = self.header is None
        if new_file:
            self.header = [k for k in rows[0] if k != DONE_COL] + [DONE_COL]
            writer.writerow(self.header)
        for r in rows:
            missing = [k for k in r if k not in self.header]
            if missing:
                raise ValueError(f"row has fields {missing} not in the file's header {self.header}; "
                                 f"use a new output file for a different table")
            writer.writerow(["" if r.get(k) is None else r.get(k, "") for k in self.header[:-1]] + [1])
        if new_file:  # header and first rows appear at once: the file never has a torn header
            write_text(self.path, buf.getvalue())
            return
        # ensure the previous content ends with a newline (a torn last line must not swallow ours)
        if not new_file and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    buf = io.StringIO("\n" + buf.getvalue())
        with open(self.path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())


def run_sweep(
    cells: Sequence[dict],
    func: Callable[[dict], dict],
    path: str | Path,
    key: Sequence[str],
    n_jobs: int = 1,
    chunk_size: int = 8,
    progress: bool = True,
    desc: str = "cells",
    on_row: Callable[[dict], None] | None = None,
) -> pd.DataFrame:
    """Run ``func`` on every cell not already in ``path``; append each row as it finishes.

    Parameters
    ----------
    cells : the grid, one dict per cell; every dict holds the ``key`` fields.
    func : ``cell -> row`` (a dict; it should repeat the key fields); top-level, picklable.
    path : CSV file (created if missing). Rows of earlier runs are kept and their cells skipped.
    key : the fields that identify a cell.
    n_jobs : joblib workers (1: in this process, in order; -1: all cores; capped at the CPU count).
    chunk_size : cells per joblib task (rows are written per finished task).
    on_row : called with every new row after it is on disk (tests use it to interrupt).

    Returns
    -------
    DataFrame of all finished rows in ``path`` restricted to the requested cells, one per cell
    (the first on disk if a cell appears twice), in the order of ``cells``.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    n_jobs, _ = resolve_n_jobs(n_jobs)
    done = load_rows(path, key)
    done_keys = set()
    if len(done):
        done_keys = {tuple(_norm(v) for v in row) for row in done[list(key)].itertuples(index=False)}
    seen = set()
    todo = []
    for c in cells:
        k = cell_key(c, key)
        if k in done_keys or k in seen:
            continue
        seen.add(k)
        todo.append(c)
    appender = _Appender(path)
    bar = tqdm(total=len(todo), desc=desc, disable=not progress or not todo, leave=False)
    try:
        chunks = list(chunked(todo, max(1, int(chunk_size))))
        if n_jobs == 1 or len(chunks) <= 1:
            results = (_run_chunk(func, ch) for ch in chunks)
        else:
            from joblib import Parallel, delayed

            results = Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
                delayed(_run_chunk)(func, ch) for ch in chunks
            )
        for rows in results:
            appender.append(rows)
            bar.update(len(rows))
            if on_row is not None:
                for r in rows:
                    on_row(r)
    finally:
        bar.close()
    all_rows = load_rows(path, key)
    if not len(all_rows):
        return all_rows
    order: dict[tuple, int] = {}
    for i, c in enumerate(cells):
        order.setdefault(cell_key(c, key), i)
    pos = pd.Series([order.get(tuple(_norm(v) for v in row), -1)
                     for row in all_rows[list(key)].itertuples(index=False)], index=all_rows.index)
    keep = (pos >= 0) & ~pos.duplicated(keep="first")
    # grid order, not arrival order: workers finish in any order, results must not depend on n_jobs
    return all_rows.loc[pos[keep].sort_values(kind="stable").index].reset_index(drop=True)
