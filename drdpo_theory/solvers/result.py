"""The frozen result object every exact solver returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .worst_case import WorstCase

__all__ = ["SolverResult", "SolverError", "OPTIMAL", "INACCURATE", "FAILED", "CERTIFIED_GAP"]

#: Status strings. Only ``OPTIMAL`` means the duality gap was certified <= ``CERTIFIED_GAP``.
OPTIMAL = "optimal"
INACCURATE = "inaccurate"
FAILED = "failed"
#: The gap below which a solution is reported optimal (absolute, on the objective value).
CERTIFIED_GAP = 1e-7


class SolverError(RuntimeError):
    """A solver could not produce any solution."""


@dataclass(frozen=True)
class SolverResult:
    """Solution of one robust DPO problem.

    Attributes
    ----------
    method : ``"dpo"``, ``"kldpo"`` or ``"wdpo"``.
    theta : (d,) the minimiser.
    objective : robust objective ``L(theta; P)`` evaluated at ``theta`` (upper bound on the optimum).
    lower_bound : certified lower bound on the optimal value (``objective - duality_gap``).
    duality_gap : ``objective - lower_bound`` >= 0: a certificate ``L(theta) - L* <= duality_gap``.
    lam : optimal dual variable of the radius constraint (KL: lambda of the exp-tilt;
        Wasserstein: the transport-cost multiplier); ``None`` for DPO.
    weights : worst-case probabilities, or ``None``. Shape depends on the problem:

        * DPO: ``(n,)``, the data weights (no adversary);
        * KL: ``(n,)``, ``q*`` on the data tuples;
        * finite-support Wasserstein: ``(m,)`` on the support points (``m = info["support_size"]``:
          the data's distinct tuples, plus their label flips when ``kappa`` is finite), the column
          sums of ``plan``; ``worst_case.points``/``labels`` name the points that carry mass;
        * continuous-support W1: ``None`` (the support is R^d; see ``worst_case``).
    plan : (m, m) ``scipy.sparse.csr_array`` worst-case transport plan on the support
        (finite-support Wasserstein: row ``j`` carries the data mass of support point ``j``),
        else ``None``.
    worst_case : :class:`~drdpo_theory.solvers.worst_case.WorstCase`: the worst-case distribution
        as arrays, ``points`` (K, d), ``labels`` (K,), ``masses`` (K,) summing to 1, ``index`` (K,)
        (the data tuple or support point of each atom), and, for continuous W1 when the supremum
        is not attained (``attained`` False), the budget ``far_budget`` spent at infinity, the
        value ``far_gain`` it adds and its direction (``mass_at_infinity`` is 0: a vanishing mass
        carries that budget). ``None`` for a failed solve, and for DPO/KL results of the
        per-method functions (:func:`~drdpo_theory.solvers.solve` fills it from their per-tuple
        ``weights``: DPO the data distribution, KL ``q*``).
    status : ``"optimal"`` (gap certified <= 1e-7), ``"inaccurate"`` or ``"failed"``.
    solver : which solver certified (e.g. ``"native-newton"``, ``"cvxpy-CLARABEL"``).
    seconds : wall time.
    collapsed : True when the robust optimum is ``theta_ref`` because the radius passed the
        collapse threshold.
    info : solver-specific extras (iterations, thresholds, ...).
    """

    method: str
    theta: NDArray[np.float64]
    objective: float
    lower_bound: float
    duality_gap: float
    lam: float | None
    weights: NDArray[np.float64] | None
    status: str
    solver: str
    seconds: float
    collapsed: bool = False
    plan: Any = None
    info: dict = field(default_factory=dict)
    worst_case: WorstCase | None = None

    @property
    def optimal(self) -> bool:
        """True iff the status is optimal (duality gap certified)."""
        return self.status == OPTIMAL

    def to_json_dict(self) -> dict:
        """The CLI's JSON object: theta, objective, duality_gap, status, solver, seconds, the worst case
        (``worst_case``: :meth:`WorstCase.to_json_dict`) and the scalar extras of ``info``."""
        out = {
            "method": self.method,
            "theta": [float(t) for t in self.theta],
            "objective": _json_float(self.objective),
            "lower_bound": _json_float(self.lower_bound),
            "duality_gap": _json_float(self.duality_gap),
            "lam": _json_float(self.lam),
            "status": self.status,
            "solver": self.solver,
            "seconds": float(self.seconds),
            "collapsed": bool(self.collapsed),
        }
        if self.worst_case is not None:
            out["worst_case"] = self.worst_case.to_json_dict()
        for k, v in self.info.items():
            if isinstance(v, float):
                out.setdefault(k, _json_float(v))
            elif isinstance(v, (bool, int, str)) or v is None:
                out.setdefault(k, v)
        return out


def _json_float(v) -> float | str | None:
    """Strict JSON has no inf/nan: inf -> "inf" / "-inf" (e.g. lam at rho = 0), nan -> null."""
    if v is None:
        return None
    v = float(v)
    if np.isnan(v):
        return None
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def status_from_gap(gap: float, tol: float = CERTIFIED_GAP) -> str:
    """``optimal`` iff the certified gap is finite and <= ``tol``."""
    return OPTIMAL if np.isfinite(gap) and gap <= tol else INACCURATE


def asdict_result(r: SolverResult) -> dict:
    """Plain dict of a result (arrays kept)."""
    return asdict(r)
