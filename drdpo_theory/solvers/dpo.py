"""Exact DPO on the log-linear class: norm-ball-constrained weighted logistic MLE.

.. math:: \\min_{\\|\\theta\\|_2 \\le B} \\sum_i w_i \\log\\bigl(1 + e^{-\\tilde y_i \\beta (\\theta - \\theta_{ref})\\cdot x_i}\\bigr)

(docs/theory.md sections 1-2). The certificate ``duality_gap`` is the gap of the strongly convex
quadratic minorant on the ball (``_common.ball_fw_gap``, docs/theory.md section 7): an upper bound on ``L(theta) - L*``.
"""

from __future__ import annotations

import numpy as np

from ..data import PreferenceData
from ._common import Timer, check_common, weighted_min_lower_bound, solve_cvxpy, weighted_grad_hess, weighted_loss, single_blas_thread
from ._newton import newton_ball
from .result import FAILED, SolverError, SolverResult, status_from_gap

__all__ = ["solve_dpo", "solve_dpo_native", "solve_dpo_cvxpy", "dpo_gradient"]


def dpo_gradient(theta, data: PreferenceData, beta: float) -> np.ndarray:
    """Gradient of the weighted DPO loss at ``theta``, (d,)."""
    return weighted_grad_hess(np.asarray(theta, float), data, beta)[0]


def _result(theta, data, beta, radius, solver, seconds, info) -> SolverResult:
    obj = weighted_loss(theta, data, beta)
    # certified lower bound on the optimum: the quadratic minorant at theta, refined by a Newton
    # solve from theta when that is loose (first order in theta's error when mu ~ 0, large beta B)
    gap = max(0.0, obj - weighted_min_lower_bound(data, beta, radius, data.weights, theta))
    return SolverResult(
        method="dpo", theta=theta, objective=obj, lower_bound=obj - gap, duality_gap=gap, lam=None,
        weights=data.weights.copy(), status=status_from_gap(gap), solver=solver, seconds=seconds, info=info,
    )


@single_blas_thread
def solve_dpo_native(
    data: PreferenceData, beta: float, radius: float, theta0=None, max_iter: int = 200
) -> SolverResult:
    """Newton's method with the exact ball constraint (see ``_newton.newton_ball``)."""
    check_common(data, beta, radius)
    with Timer() as tm:
        v0 = data.theta_ref.copy() if theta0 is None else np.asarray(theta0, float).copy()
        res = newton_ball(
            lambda v: weighted_loss(v, data, beta),
            lambda v: weighted_grad_hess(v, data, beta),
            v0, data.d, radius, max_iter=max_iter,
        )
    return _result(res.v, data, beta, radius, "native-newton", tm.seconds,
                   {"iterations": res.iterations, "message": res.message})


def solve_dpo_cvxpy(data: PreferenceData, beta: float, radius: float) -> SolverResult:
    """The same problem as an exponential-cone program in cvxpy (Clarabel, then fallbacks)."""
    import cvxpy as cp

    check_common(data, beta, radius)
    with Timer() as tm:
        theta = cp.Variable(data.d)
        u = data.u
        obj = data.weights @ cp.logistic(-beta * (u @ theta - u @ data.theta_ref))
        prob = cp.Problem(cp.Minimize(obj), [cp.norm(theta, 2) <= radius])
        try:
            name, status, tried = solve_cvxpy(prob)
        except SolverError as exc:
            return SolverResult("dpo", data.theta_ref.copy(), float("nan"), float("nan"), float("inf"), None,
                                None, FAILED, "cvxpy", tm.elapsed, info={"message": str(exc)})
    th = np.asarray(theta.value, float)
    if np.linalg.norm(th) > radius:
        th *= radius / np.linalg.norm(th)
    return _result(th, data, beta, radius, f"cvxpy-{name}", tm.seconds,
                   {"cvxpy_status": status, "attempts": "; ".join(tried)})


def solve_dpo(data: PreferenceData, beta: float, radius: float, solver: str = "native") -> SolverResult:
    """DPO (ERM) on the ball; ``solver`` in {"native", "cvxpy"}."""
    if solver == "native":
        return solve_dpo_native(data, beta, radius)
    if solver == "cvxpy":
        return solve_dpo_cvxpy(data, beta, radius)
    raise ValueError(f"unknown solver {solver!r}; expected 'native' or 'cvxpy'")
