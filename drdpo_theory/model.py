"""Log-linear policy model, Bradley-Terry preferences and the exact nominal distribution P°.

docs/theory.md section 2. Finitely many prompts ``s`` and answers ``a`` with features
``phi(s, a)`` in R^d, ``||phi|| <= 1``; the policy is

.. math:: \\pi_\\theta(a|s) = \\frac{\\exp(\\theta\\cdot\\phi(s,a))}{\\sum_{a'}\\exp(\\theta\\cdot\\phi(s,a'))}.

Data: ``s ~ rho_S``, ``(a1, a2) ~ mu(.|s)`` (uniform over ordered pairs with ``a1 != a2``), and
``P(y=1 | s, a1, a2) = sigmoid(r*(s,a1) - r*(s,a2))`` with ``r*(s,a) = beta (theta* - theta_ref).phi(s,a)``.
The nominal distribution P° over tuples ``z = (s, a1, a2, y)`` is finite and explicit, so
population quantities (losses, optima, lambda_cov) are computed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from .data import PreferenceData
from .losses import sigmoid

__all__ = ["LogLinearModel", "NominalDistribution", "make_model"]


@dataclass(frozen=True)
class NominalDistribution:
    """The nominal distribution P° on its finite support of ``m`` tuples.

    Attributes
    ----------
    x : (m, d) feature differences of the support tuples.
    y : (m,) labels.
    p : (m,) probabilities P°(z_j), summing to 1 (all > 0).
    s, a1, a2 : (m,) prompt and answer indices of each tuple.
    theta_ref : (d,).
    """

    x: NDArray[np.float64]
    y: NDArray[np.int64]
    p: NDArray[np.float64]
    s: NDArray[np.int64]
    a1: NDArray[np.int64]
    a2: NDArray[np.int64]
    theta_ref: NDArray[np.float64]

    @property
    def m(self) -> int:
        """Support size."""
        return int(self.p.shape[0])

    def as_data(self) -> PreferenceData:
        """P° as weighted preference data (population objectives = weighted solvers)."""
        return PreferenceData(self.x, self.y, self.p, self.theta_ref, source="P°")

    def second_moment(self) -> NDArray[np.float64]:
        """``E_P°[x x^T]``, (d, d)."""
        return (self.x * self.p[:, None]).T @ self.x

    def lambda_cov(self) -> float:
        """Coverage constant: smallest eigenvalue of ``E_P°[x x^T]``."""
        return float(np.linalg.eigvalsh(self.second_moment())[0])

    def sample_indices(self, n: int, seed: int | np.random.Generator) -> NDArray[np.int64]:
        """``n`` i.i.d. support indices drawn from P°."""
        rng = np.random.default_rng(seed)
        return rng.choice(self.m, size=n, p=self.p)

    def sample(self, n: int, seed: int | np.random.Generator) -> PreferenceData:
        """An empirical data set of ``n`` i.i.d. tuples (weights ``1/n``)."""
        idx = self.sample_indices(n, seed)
        return PreferenceData(self.x[idx], self.y[idx], None, self.theta_ref, source=f"sample(n={n})")

    def histogram(self, idx: NDArray[np.int64]) -> NDArray[np.float64]:
        """Empirical frequencies of support indices ``idx`` over the support, (m,)."""
        return np.bincount(idx, minlength=self.m) / len(idx)


@dataclass(frozen=True)
class LogLinearModel:
    """A finite log-linear preference model.

    Attributes
    ----------
    phi : (S, A, d) features, ``||phi[s, a]|| <= 1``.
    beta : DPO temperature (> 0).
    radius : B, the parameter ball ``||theta|| <= B``.
    theta_star : (d,) true parameter: ``r* = beta (theta* - theta_ref).phi``.
    theta_ref : (d,) reference parameter (default zeros: uniform reference policy).
    prompt_probs : (S,) prompt distribution rho_S (default uniform).
    """

    phi: NDArray[np.float64]
    beta: float
    radius: float
    theta_star: NDArray[np.float64]
    theta_ref: NDArray[np.float64] = None  # type: ignore[assignment]
    prompt_probs: NDArray[np.float64] = None  # type: ignore[assignment]
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        phi = np.asarray(self.phi, dtype=float)
        if phi.ndim != 3 or phi.shape[1] < 2:
            raise ValueError(f"phi must have shape (S, A>=2, d), got {phi.shape}")
        norms = np.linalg.norm(phi, axis=2)
        if norms.max() > 1 + 1e-12:
            raise ValueError(f"features must satisfy ||phi|| <= 1; max norm {norms.max():.6g}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not self.radius > 0:
            raise ValueError(f"radius B must be > 0, got {self.radius}")
        d = phi.shape[2]
        ts = np.asarray(self.theta_star, dtype=float)
        tr = np.zeros(d) if self.theta_ref is None else np.asarray(self.theta_ref, dtype=float)
        for name, v in (("theta_star", ts), ("theta_ref", tr)):
            if v.shape != (d,):
                raise ValueError(f"{name} must have shape ({d},), got {v.shape}")
            if np.linalg.norm(v) > self.radius + 1e-12:
                raise ValueError(f"{name} must lie in the ball ||theta|| <= B={self.radius}")
        S = phi.shape[0]
        rp = np.full(S, 1.0 / S) if self.prompt_probs is None else np.asarray(self.prompt_probs, dtype=float)
        if rp.shape != (S,) or np.any(rp < 0) or not np.isclose(rp.sum(), 1.0):
            raise ValueError("prompt_probs must be a probability vector of length S")
        object.__setattr__(self, "phi", phi)
        object.__setattr__(self, "theta_star", ts)
        object.__setattr__(self, "theta_ref", tr)
        object.__setattr__(self, "prompt_probs", rp)

    @property
    def d(self) -> int:
        """Feature dimension."""
        return int(self.phi.shape[2])

    def policy(self, theta) -> NDArray[np.float64]:
        """``pi_theta(a|s)``, shape (S, A) (softmax over answers, computed stably)."""
        logits = self.phi @ np.asarray(theta, dtype=float)  # (S, A)
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def reward(self, theta_star=None) -> NDArray[np.float64]:
        """True reward ``r*(s, a) = beta (theta* - theta_ref).phi(s, a)``, (S, A)."""
        ts = self.theta_star if theta_star is None else np.asarray(theta_star, dtype=float)
        return self.beta * (self.phi @ (ts - self.theta_ref))

    def expected_reward(self, theta, theta_star=None) -> float:
        """``E_{s ~ rho_S, a ~ pi_theta(.|s)} r*(s, a)``."""
        return float(self.prompt_probs @ (self.policy(theta) * self.reward(theta_star)).sum(axis=1))

    def nominal(self, theta_star=None) -> NominalDistribution:
        """P° over all tuples ``(s, a1, a2, y)`` with ``a1 != a2``: ``rho_S(s) mu(a1,a2|s) P(y|s,a1,a2)``."""
        key = None if theta_star is None else tuple(np.asarray(theta_star, dtype=float))
        if key in self._cache:
            return self._cache[key]
        S, A, _ = self.phi.shape
        s, a1, a2 = np.meshgrid(np.arange(S), np.arange(A), np.arange(A), indexing="ij")
        keep = a1 != a2
        s, a1, a2 = s[keep], a1[keep], a2[keep]
        r = self.reward(theta_star)
        p1 = sigmoid(r[s, a1] - r[s, a2])  # P(y = 1 | s, a1, a2)
        pair_prob = self.prompt_probs[s] / (A * (A - 1))
        x = self.phi[s, a1] - self.phi[s, a2]
        # support: every pair twice, once with y = 1 and once with y = 0.
        X = np.concatenate([x, x])
        Y = np.concatenate([np.ones(len(s), np.int64), np.zeros(len(s), np.int64)])
        P = np.concatenate([pair_prob * p1, pair_prob * (1 - p1)])
        keep = P > 0
        nd = NominalDistribution(
            X[keep], Y[keep], P[keep] / P[keep].sum(),
            np.concatenate([s, s])[keep], np.concatenate([a1, a1])[keep], np.concatenate([a2, a2])[keep],
            self.theta_ref,
        )
        self._cache[key] = nd
        return nd


def make_model(
    n_prompts: int = 4,
    n_answers: int = 4,
    d: int = 4,
    beta: float = 1.0,
    radius: float = 2.0,
    theta_star_norm: float = 1.0,
    theta_ref=None,
    seed: int = 0,
) -> LogLinearModel:
    """A random instance: features uniform on the unit sphere scaled into the ball, seeded.

    Features are ``phi = g / ||g|| * U^{1/d}``-style draws (uniform in the unit ball), theta* is a
    random direction with norm ``theta_star_norm`` (must be <= radius).
    """
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n_prompts, n_answers, d))
    g /= np.linalg.norm(g, axis=2, keepdims=True)
    r = rng.uniform(0.3, 1.0, size=(n_prompts, n_answers, 1))
    phi = g * r
    ts = rng.standard_normal(d)
    ts *= theta_star_norm / np.linalg.norm(ts)
    return LogLinearModel(phi=phi, beta=beta, radius=radius, theta_star=ts, theta_ref=theta_ref)
