"""Exact solvers of DPO, KLDPO and WDPO on the log-linear class, behind one ``solve`` entry.

Every solver returns a frozen :class:`~drdpo_theory.solvers.result.SolverResult` whose
``duality_gap`` is a certified upper bound on ``objective - optimum``; ``status == "optimal"``
only when that gap is <= 1e-7.
"""

from __future__ import annotations

import math

from ..data import PreferenceData
from ._common import single_blas_thread
from .result import CERTIFIED_GAP, FAILED, INACCURATE, OPTIMAL, SolverError, SolverResult

__all__ = ["solve", "SolverResult", "SolverError", "OPTIMAL", "INACCURATE", "FAILED", "CERTIFIED_GAP", "METHODS"]

METHODS = ("dpo", "kldpo", "wdpo")


@single_blas_thread
def solve(
    method: str,
    data: PreferenceData,
    beta: float,
    radius: float,
    *,
    rho: float | None = None,
    eps: float | None = None,
    kappa: float = math.inf,
    p: int = 1,
    support=None,
    solver: str = "native",
) -> SolverResult:
    """Solve one robust DPO problem exactly.

    Parameters
    ----------
    method : "dpo" | "kldpo" | "wdpo".
    data : weighted preference data (``x`` (n,d), ``y`` (n,), ``weights``, ``theta_ref``).
    beta : DPO temperature, > 0.
    radius : B, the parameter ball ``||theta||_2 <= B``.
    rho : KL radius (kldpo).
    eps : Wasserstein radius (wdpo); cost ``||x - x'||_2 + kappa [y != y']`` raised to ``p``.
    kappa : label-flip cost (``inf``: labels never move).
    p : 1 (continuous support unless ``support`` is given) or 2 (finite support).
    support : a ``wasserstein.FiniteSupport`` (finite-support WDPO), or None.
    solver : "native" (default; falls back to cvxpy where no native path exists, said in
        ``info``) or "cvxpy".
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if solver not in ("native", "cvxpy"):
        raise ValueError(f"unknown solver {solver!r}; expected 'native' or 'cvxpy'")
    if method == "dpo":
        from .dpo import solve_dpo

        return solve_dpo(data, beta, radius, solver=solver)
    if method == "kldpo":
        if rho is None:
            raise ValueError("kldpo needs the KL radius rho")
        from .kl import solve_kldpo

        return solve_kldpo(data, beta, radius, rho, solver=solver)
    if eps is None:
        raise ValueError("wdpo needs the Wasserstein radius eps")
    from .wasserstein import solve_wdpo

    return solve_wdpo(data, beta, radius, eps, kappa=kappa, p=p, support=support, solver=solver)
