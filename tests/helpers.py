"""Test helpers shared by the theory-side tests."""

import numpy as np

from drdpo_theory.data import PreferenceData


def random_data(seed: int, n: int = 40, d: int = 3, theta_ref_norm: float = 0.0, weighted: bool = False):
    """A random data set with ||x|| <= 2 and optional theta_ref / non-uniform weights."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, d))
    x /= np.maximum(1.0, np.linalg.norm(x, axis=1, keepdims=True) / 2.0)
    y = rng.integers(0, 2, size=n)
    tr = None
    if theta_ref_norm:
        tr = rng.standard_normal(d)
        tr *= theta_ref_norm / np.linalg.norm(tr)
    w = rng.uniform(0.2, 1.0, size=n) if weighted else None
    return PreferenceData(x, y, w, tr, source=f"random(seed={seed})")


def bt_instance(n, d, seed, ref_norm=0.0, signal=6.0, uniform=False):
    """Random data: ``||x|| <= 1``, Bradley-Terry labels with a ``signal``-norm truth, random weights."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    x /= np.maximum(1.0, np.linalg.norm(x, axis=1))[:, None]
    ts = rng.standard_normal(d)
    ts *= signal / np.linalg.norm(ts)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-x @ ts))).astype(int)
    w = None if uniform else rng.random(n) + 0.05
    r = rng.standard_normal(d)
    return PreferenceData(x, y, w, ref_norm * r / np.linalg.norm(r))
