"""The worst-case distribution of a robust DPO problem, as arrays (``SolverResult.worst_case``).

A worst case is a finite distribution ``Q* = sum_k masses_k delta_{(points_k, labels_k)}``. For
continuous-support W1 with a finite budget left after label flips, the supremum is not attained:
it is the limit of distributions ``Q_delta`` that move a mass ``delta -> 0`` a distance
``far_budget / delta`` along the loss's steepest ascent (docs/theory_wasserstein.md, section 1).
:class:`WorstCase` then holds the atoms of the limit (the mass sent to infinity is 0) and
states the budget spent at infinity and the value it adds; :meth:`WorstCase.approximate` returns
an explicit ``Q_delta``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..losses import dpo_loss, signed_labels

__all__ = ["WorstCase", "from_tuple_weights", "from_flip_fractions"]


@dataclass(frozen=True)
class WorstCase:
    """A worst-case distribution ``Q*`` (atoms with positive mass, plus a limit at infinity).

    .. math:: Q^* = \\sum_{k=1}^{K} \\mathrm{masses}_k\\,\\delta_{(\\mathrm{points}_k,\\ \\mathrm{labels}_k)},
              \\qquad \\sup_Q E_Q \\ell = E_{Q^*}\\ell + \\mathrm{far\\_gain}.

    Attributes
    ----------
    points : (K, d) float, the feature differences ``x`` of the atoms.
    labels : (K,) int in {0, 1}, the atoms' labels ``y``.
    masses : (K,) float > 0, summing to 1.
    index : (K,) int, where each atom comes from: the data tuple whose mass it carries
        (continuous W1, KL; a tuple split by a partial label flip gives two atoms with the same
        index), or the support point it is (finite-support Wasserstein: ``index`` into
        ``SolverResult.weights``, ``masses = weights[index]``).
    attained : False when the supremum is a limit that no distribution attains.
    mass_at_infinity : the mass at infinity in that limit: always 0.0 (a vanishing mass
        ``delta`` carries the budget ``far_budget``); stated so that ``masses`` summing to 1 is
        not mistaken for "nothing is sent to infinity".
    far_budget : transport budget spent at infinity (``nu``; 0.0 when attained).
    far_gain : value the limit adds to ``E_{Q*} l``: ``lam0 * far_budget`` with
        ``lam0 = beta ||theta - theta_ref||`` (0.0 when attained).
    far_direction : (d,) unit vector ``(theta - theta_ref) / ||theta - theta_ref||``, or None when
        attained: an atom with label ``y`` moved along ``-ytil(y) far_direction`` (``ytil = 2y - 1``)
        raises its loss at rate ``lam0`` per unit distance.
    """

    points: NDArray[np.float64]
    labels: NDArray[np.int64]
    masses: NDArray[np.float64]
    index: NDArray[np.int64]
    attained: bool = True
    mass_at_infinity: float = 0.0
    far_budget: float = 0.0
    far_gain: float = 0.0
    far_direction: NDArray[np.float64] | None = None

    def __post_init__(self) -> None:
        k = self.masses.shape[0]
        if self.points.ndim != 2 or self.points.shape[0] != k or self.labels.shape != (k,) or self.index.shape != (k,):
            raise ValueError(f"worst case: inconsistent shapes points {self.points.shape}, labels "
                             f"{self.labels.shape}, masses {self.masses.shape}, index {self.index.shape}")

    @property
    def size(self) -> int:
        """Number of atoms ``K``."""
        return int(self.masses.shape[0])

    def expected_loss(self, theta, beta: float, theta_ref) -> float:
        """``E_{Q*} l(z; theta) + far_gain``: the robust value when ``theta`` is the solution's theta."""
        losses = dpo_loss(np.asarray(theta, float), self.points, self.labels, beta, np.asarray(theta_ref, float))
        return float(self.masses @ losses) + self.far_gain

    def approximate(self, delta: float) -> "WorstCase":
        """An attained ``Q_delta``: mass ``delta`` of the heaviest atom moved ``far_budget/delta`` far.

        Its transport cost from the data equals that of the limit, and ``E_{Q_delta} l`` tends to
        the robust value as ``delta -> 0`` (error ``O(delta)``). Returns ``self`` when attained.
        """
        if self.attained or self.far_budget == 0:
            return self
        k0 = int(np.argmax(self.masses))
        if not 0 < delta <= self.masses[k0]:
            raise ValueError(f"delta must be in (0, {self.masses[k0]:.6g}] (the heaviest atom's mass), got {delta!r}")
        ytil = float(signed_labels(self.labels[k0 : k0 + 1])[0])
        far_point = self.points[k0] - ytil * (self.far_budget / delta) * self.far_direction
        masses = self.masses.copy()
        masses[k0] -= delta
        return WorstCase(
            points=np.vstack([self.points, far_point[None, :]]),
            labels=np.append(self.labels, self.labels[k0]),
            masses=np.append(masses, delta),
            index=np.append(self.index, self.index[k0]),
        )

    def to_json_dict(self) -> dict:
        """Plain lists for the CLI's JSON output."""
        return {
            "points": self.points.tolist(),
            "labels": [int(v) for v in self.labels],
            "masses": [float(v) for v in self.masses],
            "index": [int(v) for v in self.index],
            "attained": bool(self.attained),
            "mass_at_infinity": float(self.mass_at_infinity),
            "far_budget": float(self.far_budget),
            "far_gain": float(self.far_gain),
            "far_direction": None if self.far_direction is None else [float(v) for v in self.far_direction],
        }


def from_tuple_weights(x, y, weights) -> WorstCase:
    """The distribution ``sum_k weights_k delta_{(x_k, y_k)}`` (KL's ``q*``, a finite support's column sums).

    ``x`` (m, d), ``y`` (m,), ``weights`` (m,); atoms of zero weight are dropped, ``index`` keeps
    the rows' positions.
    """
    w = np.asarray(weights, float)
    keep = np.flatnonzero(w > 0)
    return WorstCase(np.asarray(x, float)[keep], np.asarray(y, np.int64)[keep], w[keep], keep.astype(np.int64))


def from_flip_fractions(theta, data, beta: float, flip_fraction, far_budget: float) -> WorstCase:
    """Continuous-support W1 worst case from the flip fractions ``alpha`` (n,) and the far budget ``nu``.

    Tuple ``i`` keeps mass ``w_i (1 - alpha_i)`` at ``(x_i, y_i)`` and moves ``w_i alpha_i`` to
    ``(x_i, 1 - y_i)``; when ``nu > 0`` and ``theta != theta_ref`` the rest of the budget goes to
    infinity along ``-ytil (theta - theta_ref)`` (not attained, gain ``beta ||theta - theta_ref|| nu``).
    """
    a = np.asarray(theta, float) - data.theta_ref
    lam0 = beta * float(np.linalg.norm(a))
    alpha = np.asarray(flip_fraction, float)
    w = data.weights
    idx = np.arange(data.n, dtype=np.int64)
    cand_w = np.concatenate([w * (1.0 - alpha), w * alpha])  # (2n,): kept, flipped
    keep = cand_w > 0
    points = np.concatenate([data.x, data.x])[keep]
    labels = np.concatenate([data.y, 1 - data.y])[keep]
    index = np.concatenate([idx, idx])[keep]
    if far_budget > 0 and lam0 > 0:
        return WorstCase(points, labels, cand_w[keep], index, attained=False, far_budget=float(far_budget),
                         far_gain=lam0 * float(far_budget), far_direction=a / np.linalg.norm(a))
    return WorstCase(points, labels, cand_w[keep], index)
