"""Preference data sets on the log-linear class: validation, weights and ``.npz`` I/O.

A data set is a list of tuples ``z_i = (x_i, y_i)`` with ``x_i = phi(s_i, a1_i) - phi(s_i, a2_i)``
in R^d and ``y_i`` in {0, 1}, with probability weights ``w_i`` (``1/n`` for an empirical sample,
``P°(z_i)`` for the nominal distribution), plus the reference parameter ``theta_ref``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from .losses import signed_features

__all__ = ["DataError", "PreferenceData", "load_npz"]


class DataError(ValueError):
    """Invalid input data; the message says what was expected and where."""


#: Largest accepted feature entry ``|x_ij|``: beyond it ``||x||^2`` (and the margins) overflow float64.
MAX_ABS_FEATURE = 1e150


def _as_float_array(name: str, value, ndim: int, where: str) -> NDArray[np.float64]:
    raw = np.asarray(value)
    if np.iscomplexobj(raw):  # float() of a complex array silently drops the imaginary part
        raise DataError(f"{where}: '{name}' is complex (dtype {raw.dtype}); it must be real: "
                        f"pass its real part if the imaginary part is meant to be zero")
    if raw.dtype.kind not in "biuf":  # strings, objects, dates: refuse rather than guess
        raise DataError(f"{where}: '{name}' must be a real numeric array, got dtype {raw.dtype}")
    try:
        arr = np.asarray(raw, dtype=float)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{where}: '{name}' must be numeric ({exc})") from None
    if arr.ndim != ndim:
        raise DataError(f"{where}: '{name}' must have {ndim} dimension(s), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise DataError(f"{where}: '{name}' contains NaN or inf (first at index {tuple(int(i) for i in bad)})")
    big = np.abs(arr) > MAX_ABS_FEATURE
    if np.any(big):
        first = np.argwhere(big)[0]
        raise DataError(
            f"{where}: '{name}' has entries of magnitude up to {np.abs(arr).max():.3g} (first at index "
            f"{tuple(int(i) for i in first)}), beyond {MAX_ABS_FEATURE:g} where float64 overflows; rescale it"
            + (" (the theory assumes ||phi|| <= 1, so ||x|| <= 2)" if name == "x" else "")
        )
    return arr


@dataclass(frozen=True)
class PreferenceData:
    """Weighted preference data ``{(x_i, y_i, w_i)}`` and the reference parameter.

    Attributes
    ----------
    x : (n, d) float, feature differences.
    y : (n,) int in {0, 1}.
    weights : (n,) float, nonnegative, summing to 1 (default ``1/n``).
    theta_ref : (d,) float (default zeros).
    source : where the data came from (for error messages).
    """

    x: NDArray[np.float64]
    y: NDArray[np.int64]
    weights: NDArray[np.float64] | None = None
    theta_ref: NDArray[np.float64] | None = None
    source: str = field(default="<data>", compare=False)

    def __post_init__(self) -> None:
        where = self.source
        x = _as_float_array("x", self.x, 2, where)
        n, d = x.shape
        if n == 0:
            raise DataError(f"{where}: empty data set (x has 0 rows); need at least one preference pair")
        if d == 0:
            raise DataError(f"{where}: 'x' has 0 columns; need at least one feature")
        y_raw = _as_float_array("y", self.y, 1, where)
        if y_raw.shape[0] != n:
            raise DataError(f"{where}: shape mismatch: x has {n} rows but y has {y_raw.shape[0]} entries")
        bad = np.flatnonzero((y_raw != 0) & (y_raw != 1))
        if bad.size:
            raise DataError(
                f"{where}: labels 'y' must be 0 or 1; y[{bad[0]}] = {y_raw[bad[0]]!r} ({bad.size} bad entries)"
            )
        if self.weights is None:
            w = np.full(n, 1.0 / n)
        else:
            w = _as_float_array("weights", self.weights, 1, where)
            if w.shape[0] != n:
                raise DataError(f"{where}: shape mismatch: x has {n} rows but weights has {w.shape[0]}")
            if np.any(w < 0):
                raise DataError(f"{where}: weights must be nonnegative (min {w.min()!r})")
            total = w.sum()
            if not total > 0:
                raise DataError(f"{where}: weights sum to {total!r}; need a positive total")
            w = w / total
        if self.theta_ref is None:
            tr = np.zeros(d)
        else:
            tr = _as_float_array("theta_ref", self.theta_ref, 1, where)
            if tr.shape[0] != d:
                raise DataError(f"{where}: shape mismatch: x has d={d} columns but theta_ref has {tr.shape[0]}")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y_raw.astype(np.int64))
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "theta_ref", tr)

    @property
    def n(self) -> int:
        """Number of tuples."""
        return int(self.x.shape[0])

    @property
    def d(self) -> int:
        """Feature dimension."""
        return int(self.x.shape[1])

    @property
    def u(self) -> NDArray[np.float64]:
        """Signed features ``ytil_i x_i``, (n, d)."""
        return signed_features(self.x, self.y)

    def check_feature_norm(self, bound: float = 2.0, tol: float = 1e-9) -> None:
        """Raise ``DataError`` if some ``||x_i|| > bound`` (the theory assumes ``||phi|| <= 1``)."""
        norms = np.linalg.norm(self.x, axis=1)
        i = int(np.argmax(norms))
        if norms[i] > bound + tol:
            raise DataError(f"{self.source}: ||x[{i}]|| = {norms[i]:.6g} exceeds {bound} (needs ||phi|| <= 1)")

    def with_weights(self, weights) -> "PreferenceData":
        """Same tuples, other weights."""
        return PreferenceData(self.x, self.y, weights, self.theta_ref, self.source)

    def compress(self) -> tuple["PreferenceData", NDArray[np.int64]]:
        """Merge identical tuples, summing their weights.

        Returns the compressed data and ``inverse`` (n,) with ``compressed[inverse[i]] == self[i]``.
        Every objective here depends on the data only through the weighted empirical measure, so
        solving on the compressed data gives the same optimum (tested).
        """
        key = np.concatenate([self.x, self.y[:, None].astype(float)], axis=1)
        uniq, inverse = np.unique(key, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        w = np.bincount(inverse, weights=self.weights, minlength=uniq.shape[0])
        out = PreferenceData(uniq[:, :-1], uniq[:, -1].astype(np.int64), w, self.theta_ref, self.source)
        return out, inverse

    def save_npz(self, path: str | Path) -> None:
        """Write ``x``, ``y``, ``theta_ref`` (and ``weights``) to ``path`` (the CLI's format)."""
        np.savez(path, x=self.x, y=self.y, theta_ref=self.theta_ref, weights=self.weights)


#: How to write a file ``load_npz`` reads (quoted in its error messages).
_NPZ_HOWTO = "write one with numpy.savez(path, x=x, y=y[, theta_ref=..., weights=...])"


def load_npz(path: str | Path) -> PreferenceData:
    """Load the CLI's ``.npz`` format: ``x`` (n, d), ``y`` (n,), optional ``theta_ref`` (d,), ``weights`` (n,).

    The file must be a NumPy ``.npz`` archive (a zip file, as written by ``numpy.savez``) of plain
    numeric arrays; pickled object arrays are refused (never unpickled).

    Raises
    ------
    DataError
        with the file name, what is wrong and how to write a valid file, for every malformed input
        (missing file, directory, empty file, a single-array ``.npy``, text or other non-zip content,
        a corrupt archive, object arrays, missing keys, bad shapes or values).
    """
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise DataError(f"{where}: no such file")
    if path.is_dir():
        raise DataError(f"{where}: is a directory, not an .npz file; {_NPZ_HOWTO}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
    except OSError as exc:
        raise DataError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise DataError(f"{where}: the file is empty; {_NPZ_HOWTO}")
    if head == b"\x93NUMPY":  # np.load returns a bare array for .npy, not the archive we need
        raise DataError(f"{where}: is a single-array .npy file, not an .npz archive of named arrays; {_NPZ_HOWTO}")
    if not head.startswith(b"PK"):  # every zip archive (hence every .npz) starts with "PK"
        what = "is a text file" if _looks_like_text(path) else "has no zip header"
        raise DataError(f"{where}: {what}, not an .npz archive; {_NPZ_HOWTO}")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            arrays = {}
            for k in names:
                try:
                    arrays[k] = f[k]
                except ValueError as exc:
                    if "allow_pickle" in str(exc) or "pickled" in str(exc):
                        raise DataError(f"{where}: array '{k}' holds Python objects (pickled), which are not "
                                        f"loaded; store plain numeric arrays") from None
                    raise
    except DataError:
        raise
    except Exception as exc:  # zipfile/np.load raise several types for a corrupt archive
        raise DataError(f"{where}: corrupt or truncated .npz archive ({type(exc).__name__}: {exc}); "
                        f"{_NPZ_HOWTO}") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(
            f"{where}: missing key(s) {missing}; expected 'x' (n,d) and 'y' (n,), optional 'theta_ref' (d,), "
            f"'weights' (n,); found {sorted(arrays)}"
        )
    return PreferenceData(
        arrays["x"], arrays["y"], arrays.get("weights"), arrays.get("theta_ref"), source=where
    )


def _looks_like_text(path: Path, nbytes: int = 4096) -> bool:
    """True if the first ``nbytes`` of ``path`` decode as UTF-8 without NUL bytes."""
    with open(path, "rb") as fh:
        chunk = fh.read(nbytes)
    if b"\x00" in chunk:
        return False
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(chunk) - 3  # a multi-byte character cut at the chunk's end
    return True
