"""Exact solvers of DPO, KLDPO, WDPO and the robust family (chi2dpo, cvardpo, groupdpo, rdpo, cdpo;
dr_dpo locally) on the log-linear class, behind one ``solve`` entry.

Every solver returns a frozen :class:`~drdpo_theory.solvers.result.SolverResult` whose
``duality_gap`` is a certified upper bound on ``objective - optimum``; ``status == "optimal"``
only when that gap is <= 1e-7 (dr_dpo is not convex: its status is ``"local"`` at best).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from ..data import PreferenceData
from ._common import single_blas_thread
from .result import CERTIFIED_GAP, FAILED, INACCURATE, OPTIMAL, SolverError, SolverResult
from .worst_case import WorstCase, from_tuple_weights

__all__ = ["solve", "SolverResult", "SolverError", "OPTIMAL", "INACCURATE", "FAILED", "CERTIFIED_GAP", "METHODS",
           "MAX_MARGIN", "check_margin_scale", "WorstCase"]

METHODS = ("dpo", "kldpo", "wdpo", "chi2dpo", "cvardpo", "groupdpo", "rdpo", "cdpo", "dr_dpo")


#: Largest admissible margin scale ``beta (B + ||theta_ref||) max_i ||x_i||``. Losses grow like the
#: margins, and float64 rounds a sum of losses near 1e8 at ~1e-8: beyond it no duality gap of
#: ``CERTIFIED_GAP`` = 1e-7 can be certified, and far beyond it the losses overflow.
MAX_MARGIN = 1e8


def check_margin_scale(data: PreferenceData, beta: float, radius: float) -> None:
    """Raise ``ValueError`` (saying what to rescale) if the margins can exceed :data:`MAX_MARGIN`.

    ``|beta (theta - theta_ref).x_i| <= beta (B + ||theta_ref||) ||x_i||`` on the ball ``||theta|| <= B``.
    """
    if not isinstance(data, PreferenceData):
        return  # the solver's own check names the type
    try:
        b, r = float(beta), float(radius)
    except (TypeError, ValueError):
        return  # the solver's own check reports it
    if not (math.isfinite(b) and math.isfinite(r) and b > 0 and r > 0):
        return
    s = float(np.max(np.abs(data.x)))
    xmax = s * float(np.max(np.linalg.norm(data.x / s, axis=1))) if s > 0 else 0.0  # scaled: no overflow
    scale = b * (r + float(np.linalg.norm(data.theta_ref))) * xmax
    if scale > MAX_MARGIN:
        raise ValueError(
            f"{data.source}: margins beta*(theta - theta_ref).x can reach {scale:.3g} (beta={b:g}, B={r:g}, "
            f"max ||x_i|| = {xmax:.3g}), beyond {MAX_MARGIN:g} where float64 cannot certify a gap of "
            f"{CERTIFIED_GAP:g}; rescale x (the theory assumes ||x|| <= 2) or lower beta or B"
        )


def _with_tuple_worst_case(fn):
    """Results whose ``weights`` live on the data tuples, (n,), get the ``worst_case`` they describe.

    Solvers with another support (Wasserstein) build their own ``worst_case``; this covers the
    per-tuple reweightings (DPO: the data itself; KL: ``q*``) without each solver repeating it.
    """

    @functools.wraps(fn)
    def wrapper(method, data, *args, **kwargs):
        res = fn(method, data, *args, **kwargs)
        w = res.weights
        if res.worst_case is None and res.plan is None and w is not None and np.shape(w) == (data.n,):
            res = dataclasses.replace(res, worst_case=from_tuple_weights(data.x, data.y, w))
        return res

    return wrapper


@_with_tuple_worst_case
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
    alpha: float | None = None,
    groups=None,
    beta_prime: float | None = None,
    solver: str = "native",
) -> SolverResult:
    """Solve one robust DPO problem exactly.

    Parameters
    ----------
    method : "dpo" | "kldpo" | "wdpo" | "chi2dpo" | "cvardpo" | "groupdpo" | "rdpo" | "cdpo" | "dr_dpo"
        (the family members: ``family.py``, docs/theory_family.md).
    data : weighted preference data (``x`` (n,d), ``y`` (n,), ``weights``, ``theta_ref``).
    beta : DPO temperature, > 0.
    radius : B, the parameter ball ``||theta||_2 <= B``.
    rho : KL radius (kldpo) or chi2 radius (chi2dpo).
    eps : Wasserstein radius (wdpo); cost ``||x - x'||_2 + kappa [y != y']`` raised to ``p``;
        flip rate (rdpo, [0, 1/2)) or label smoothing (cdpo, [0, 1/2]).
    alpha : CVaR level in (0, 1] (cvardpo).
    groups : (n,) integer group labels (groupdpo).
    beta_prime : Dr.DPO temperature > 0 (dr_dpo).
    kappa : label-flip cost (``inf``: labels never move).
    p : 1 (continuous support unless ``support`` is given) or 2 (finite support).
    support : a ``wasserstein.FiniteSupport`` (finite-support WDPO), or None.
    solver : "native" (default; falls back to cvxpy where no native path exists, said in
        ``info``) or "cvxpy".

    Returns
    -------
    SolverResult
        frozen; ``theta`` (d,) the minimiser, ``objective`` the exact robust value there,
        ``lower_bound`` and ``duality_gap`` (a certified bound on ``objective - optimum``),
        ``status`` (``"optimal"`` iff the gap is <= ``CERTIFIED_GAP`` = 1e-7; test ``.optimal``),
        ``lam`` the dual variable of the radius (None for dpo), ``weights``/``plan``/``worst_case``
        the worst-case distribution (see :class:`SolverResult` for their shapes), ``collapsed``,
        ``solver``, ``seconds`` and ``info``.

    Raises
    ------
    ValueError
        for invalid arguments or data whose scale float64 cannot certify (:data:`MAX_MARGIN`).
    TypeError
        if ``data`` is not a :class:`~drdpo_theory.data.PreferenceData`.
    SolverError
        if no solver produced any answer.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if solver not in ("native", "cvxpy"):
        raise ValueError(f"unknown solver {solver!r}; expected 'native' or 'cvxpy'")
    check_margin_scale(data, beta, radius)
    if method in ("chi2dpo", "cvardpo", "groupdpo", "rdpo", "cdpo", "dr_dpo"):
        from .family import solve_family

        if method != "chi2dpo" and rho is not None:
            raise ValueError(f"rho does not apply to {method}")
        if method not in ("rdpo", "cdpo") and eps is not None:
            raise ValueError(f"eps does not apply to {method}")
        return solve_family(method, data, beta, radius, rho=rho, alpha=alpha, eps=eps, groups=groups,
                            beta_prime=beta_prime, solver=solver)
    if alpha is not None or groups is not None or beta_prime is not None:
        raise ValueError(f"alpha, groups and beta_prime do not apply to {method}")
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
