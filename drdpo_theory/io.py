"""Crash-safe file output for the studies: atomic writes, verified cache cells, output-path checks.

Every table, cache cell, JSON summary and figure of the studies is written through this module:

* :func:`atomic_write` writes to a temporary file in the destination's folder, flushes and
  ``fsync``\\ s it, then ``os.replace``\\ s it over the destination. A reader (or a resumed run)
  sees either the old file or the complete new one, never a torn one, even after a SIGKILL.
* :func:`write_cell` / :func:`read_cell`: a cached cell is a CSV plus a ``.done`` marker that
  records its row count, columns and SHA-256. ``read_cell`` returns ``None`` for a missing,
  empty, torn, foreign or tampered cell, which the caller then recomputes.
* :func:`check_output_dir` / :func:`check_output_file`: refuse, before any work, an output path
  that is a file, sits under a file, or cannot be written (:class:`OutputPathError`, one line).
* :func:`claim_output_dir`: a folder holds the results of one study only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import pandas as pd

__all__ = [
    "OutputPathError", "atomic_write", "write_text", "write_json", "write_csv", "write_parquet",
    "save_figure", "write_cell", "read_cell", "read_json", "check_output_dir", "check_output_file",
    "claim_output_dir", "check_foreign_tables",
]


class OutputPathError(ValueError):
    """An output path that cannot be used (a file where a folder is expected, not writable, foreign)."""


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically.

    ``mode`` is ``"w"`` (text) or ``"wb"`` (bytes). On an exception the temporary file is removed
    and ``path`` is left as it was. The parent folder is created if missing.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        kw = {} if "b" in mode else {"encoding": encoding, "newline": ""}
        with os.fdopen(fd, mode, **kw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` (without its index) as CSV to ``path`` atomically."""
    return write_text(path, df.to_csv(index=False, lineterminator="\n"))


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` (without its index) as parquet to ``path`` atomically."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return write_bytes(path, buf.getvalue())


def save_figure(fig, path: str | Path, **savefig_kw) -> Path:
    """``fig.savefig`` to ``path`` atomically (the format is taken from the suffix of ``path``).

    PDFs carry no creation date, so rerunning a study that gives the same figure gives the same bytes.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt == "pdf":
        savefig_kw.setdefault("metadata", {"CreationDate": None})
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, **savefig_kw)
    return write_bytes(path, buf.getvalue())


def read_json(path: str | Path) -> Any | None:
    """The JSON in ``path``, or ``None`` when it is missing, empty or not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- verified cells
def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".done")


def write_cell(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a cache cell: the CSV atomically, then its ``.done`` marker (rows, columns, SHA-256).

    A kill between the two leaves a CSV without a marker, which :func:`read_cell` refuses.
    """
    path = Path(path)
    data = df.to_csv(index=False, lineterminator="\n").encode("utf-8")
    write_bytes(path, data)
    write_json(_marker(path), {"rows": int(len(df)), "columns": [str(c) for c in df.columns],
                               "sha256": hashlib.sha256(data).hexdigest()}, indent=None)
    return path


def read_cell(path: str | Path, columns=()) -> pd.DataFrame | None:
    """The cell at ``path`` if it is complete, else ``None`` (the caller recomputes it).

    Complete: the marker exists, the CSV's SHA-256 and row count match it, it has at least one
    row, and it holds every column in ``columns``.
    """
    path = Path(path)
    meta = read_json(_marker(path))
    if not isinstance(meta, dict) or not path.is_file():
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        return None
    try:
        df = pd.read_csv(io.BytesIO(data))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None
    if len(df) != meta.get("rows") or len(df) == 0 or any(c not in df.columns for c in columns):
        return None
    return df


# ----------------------------------------------------------------------------- path checks
def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a folder the caller may create and write; :class:`OutputPathError` otherwise.

    Refused: ``path`` is an existing file; a component above it is a file; the nearest existing
    folder cannot be written (probed by creating and removing a temporary file). Creates nothing.
    """
    path = Path(path)
    if str(path) == "":
        raise OutputPathError(f"{flag} is empty; expected a folder")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {path} is a file; expected a folder (give a folder path)")
    _check_writable_under(path, path.absolute(), flag, "folder")
    return path


def _check_writable_under(path: Path, target: Path, flag: str, what: str) -> None:
    """The nearest existing folder above ``target`` (or ``target`` itself) must be a writable folder."""
    base = _nearest_existing(target)
    if not base.is_dir():
        raise OutputPathError(f"{flag} {path}: {base} is a file, so no {what} can be made under it")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".drdpo-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(f"{flag} {path} is not writable ({base}: {exc.strerror or exc}); "
                              f"choose a {what} you can write") from None


def check_output_file(path: str | Path, flag: str) -> Path:
    """``path`` as a file the caller may write: not a folder, its folder writable (see :func:`check_output_dir`)."""
    path = Path(path)
    if str(path) == "" or path.name == "":
        raise OutputPathError(f"{flag} is empty; expected a file path")
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; expected a file path")
    _check_writable_under(path, path.absolute().parent, flag, "file")
    return path


STUDY_MARKER = ".drdpo-study"


def claim_output_dir(path: str | Path, study: str, flag: str = "--out") -> Path:
    """Mark ``path`` as the folder of ``study``; refuse a folder marked by another study.

    The marker ``path/.drdpo-study`` holds the study name; it is written on first use, so a
    folder shared by two studies (whose tables could overwrite each other) is refused.
    """
    path = Path(path)
    marker = path / STUDY_MARKER
    if marker.is_file():
        owner = marker.read_text(encoding="utf-8", errors="replace").strip()
        if owner != study:
            raise OutputPathError(f"{flag} {path} holds results of the '{owner}' study, not '{study}'; "
                                  "use another folder")
        return path
    write_text(marker, study + "\n")
    return path


def check_foreign_tables(folder: str | Path, tables: dict[str, Sequence[str]], flag: str = "--out") -> None:
    """Refuse to overwrite a table in ``folder`` that this study did not write.

    ``tables`` maps a file name to the columns its header must hold; an existing file of that
    name whose first line lacks them (or is not text) raises :class:`OutputPathError`.
    """
    for name, columns in tables.items():
        path = Path(folder) / name
        if not path.is_file() or path.stat().st_size == 0:
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                header = fh.readline().strip().split(",")
        except (UnicodeDecodeError, OSError):
            header = []
        missing = [c for c in columns if c not in header]
        if missing:
            raise OutputPathError(f"{flag} {folder} holds a {name} that this study did not write "
                                  f"(no column(s) {missing}); move it away or use another folder")
