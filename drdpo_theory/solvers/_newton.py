"""Damped Newton method with an exact Euclidean-ball constraint on a block of the variables.

Problem: ``min f(v)`` over ``v = (theta, xi)``, ``theta`` in R^d with ``||theta|| <= B`` and
``xi`` in R^k with optional strict lower bounds ``xi > xi_lo`` (e.g. ``lam > 0``). ``f`` convex,
twice differentiable on the feasible set.

Each iteration solves the Newton subproblem with the ball constraint exactly,

.. math:: \\min_\\Delta\\ g^T\\Delta + \\tfrac12 \\Delta^T H \\Delta
          \\quad\\text{s.t.}\\quad \\|\\theta + \\Delta_\\theta\\| \\le B,

via its multiplier ``nu >= 0``: ``(H + nu E) Delta = -g - nu E v`` (``E`` selects the theta block),
with ``nu`` found by a 1-D root search on ``||theta + Delta_theta(nu)|| = B`` (monotone in nu);
then an Armijo backtracking line search along ``Delta`` (the feasible set is convex, so every
step size in [0, 1] keeps the ball constraint; steps are cut to keep ``xi > xi_lo``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import brentq

__all__ = ["NewtonResult", "newton_ball"]


@dataclass
class NewtonResult:
    v: np.ndarray
    f: float
    iterations: int
    converged: bool
    ball_multiplier: float
    message: str


def _solve(H: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(H, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(H, rhs, rcond=None)[0]


def _subproblem(H, g, v, d, B):
    """Exact minimiser of the quadratic model subject to ``||v[:d] + Delta[:d]|| <= B``."""
    n = len(v)
    # a tiny ridge keeps H solvable when the loss is flat in some direction.
    Hr = H + 1e-14 * max(1.0, np.abs(np.diag(H)).max()) * np.eye(n)
    step = _solve(Hr, -g)
    if np.linalg.norm(v[:d] + step[:d]) <= B:
        return step, 0.0
    E = np.zeros(n)
    E[:d] = 1.0

    def step_at(nu):
        return _solve(Hr + nu * np.diag(E), -g - nu * E * v)

    def excess(log_nu):
        s = step_at(np.exp(log_nu))
        return np.linalg.norm(v[:d] + s[:d]) - B

    lo, hi = -40.0, 0.0
    while excess(hi) > 0 and hi < 60:
        hi += 5.0
    if excess(hi) > 0:  # cannot reach the ball: project (should not happen for feasible v)
        s = step_at(np.exp(hi))
        return s, float(np.exp(hi))
    if excess(lo) <= 0:
        return step_at(np.exp(lo)), float(np.exp(lo))
    log_nu = brentq(excess, lo, hi, xtol=1e-13, rtol=1e-13)
    return step_at(np.exp(log_nu)), float(np.exp(log_nu))


def newton_ball(
    fun: Callable[[np.ndarray], float],
    grad_hess: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    v0: np.ndarray,
    d: int,
    radius: float,
    lower: np.ndarray | None = None,
    max_iter: int = 200,
    tol: float = 1e-20,
) -> NewtonResult:
    """Minimise a convex ``fun`` with ``||v[:d]|| <= radius`` and ``v[d:] > lower``.

    Parameters
    ----------
    fun : v -> f(v); may return ``inf`` outside its domain.
    grad_hess : v -> (gradient (n,), Hessian (n, n)).
    v0 : feasible start.
    d : size of the ball-constrained block (the first ``d`` entries).
    radius : B.
    lower : (n - d,) strict lower bounds of the remaining entries (``None``: unbounded).
    tol : stop when the Newton decrement ``-g.Delta`` falls below ``tol`` (absolute on f).
    """
    v = np.array(v0, dtype=float)
    if np.linalg.norm(v[:d]) > radius:
        v[:d] *= radius / np.linalg.norm(v[:d])
    f = fun(v)
    nu = 0.0
    for it in range(1, max_iter + 1):
        g, H = grad_hess(v)
        step, nu = _subproblem(H, g, v, d, radius)
        dec = -float(g @ step)
        if not np.isfinite(dec):
            return NewtonResult(v, f, it, False, nu, "non-finite Newton step")
        if dec <= tol:
            return NewtonResult(v, f, it, True, nu, "Newton decrement below tol")
        t = 1.0
        if lower is not None and len(lower):
            xi, dxi = v[d:], step[d:]
            neg = dxi < 0
            if np.any(neg):
                t = min(1.0, 0.99 * float(np.min((xi[neg] - lower[neg]) / -dxi[neg])))
        accepted = False
        while t > 1e-16:
            v_new = v + t * step
            if np.linalg.norm(v_new[:d]) > radius:  # round-off on the sphere
                v_new[:d] *= radius / np.linalg.norm(v_new[:d])
            f_new = fun(v_new)
            if np.isfinite(f_new) and f_new <= f - 1e-4 * t * dec:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            # no decrease representable in floating point: we are at the optimum to machine precision
            return NewtonResult(v, f, it, dec < 1e-9, nu, f"line search stalled (decrement {dec:.3g})")
        if f_new >= f and dec < 1e-12:
            # the step passed Armijo only through rounding (f - 1e-4 t dec == f): converged to
            # machine precision; without this check an active ball makes Newton cycle at dec ~ 1e-16
            return NewtonResult(v_new, f_new, it, True, nu, f"converged to rounding (decrement {dec:.3g})")
        v, f = v_new, f_new
    return NewtonResult(v, f, max_iter, False, nu, "max_iter reached")
