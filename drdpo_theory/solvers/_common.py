"""Shared pieces of the exact solvers: validation, weighted DPO loss and its derivatives,
the Frank-Wolfe certificate on the parameter ball, and cvxpy solving with fallbacks."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

from ..data import PreferenceData
from ..losses import signed_labels
from .result import CERTIFIED_GAP, SolverError

__all__ = [
    "check_common",
    "single_blas_thread",
    "logistic_loss_and_sigma",
    "weighted_loss",
    "weighted_grad",
    "weighted_grad_hess",
    "ball_fw_gap",
    "weighted_min_lower_bound",
    "curvature_floor",
    "check_radius",
    "Timer",
    "solve_cvxpy",
]


def check_common(data: PreferenceData, beta: float, radius: float) -> None:
    """Validate the arguments shared by all solvers (clear ``ValueError`` messages)."""
    if not isinstance(data, PreferenceData):
        raise TypeError(f"data must be a PreferenceData, got {type(data).__name__}")
    if not (np.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"radius (the parameter ball B) must be a finite number > 0, got {radius!r}")
    nref = float(np.linalg.norm(data.theta_ref))
    if nref > radius * (1 + 1e-12):
        raise ValueError(f"theta_ref must lie in the parameter ball: ||theta_ref|| = {nref:.6g} > B = {radius}")


def check_radius(name: str, value: float) -> float:
    """A radius (rho, eps, kappa) must be a number >= 0 (kappa may be inf)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}") from None
    if math.isnan(v) or v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def logistic_loss_and_sigma(t, sigma: bool = True):
    """``l = log(1 + exp(-t))`` and ``sigma(-t)`` (or ``None`` unless ``sigma``) from one ``exp``, (n,) each.

    ``l = log1p(e) + max(-t, 0)`` and ``sigma(-t) = e / (1 + e)`` (``t >= 0``) or ``1 / (1 + e)`` (``t < 0``)
    with ``e = exp(-|t|)``: stable for large ``|t|`` and about 10x faster than ``np.logaddexp``.
    """
    t = np.asarray(t, float)
    e = np.exp(-np.abs(t))
    loss = np.log1p(e)
    loss += np.maximum(-t, 0.0)
    if not sigma:
        return loss, None
    r = 1.0 / (1.0 + e)
    return loss, np.where(t >= 0, e * r, r)


def _signed_margins(theta, data: PreferenceData, beta: float):
    """``ytil`` (n,) and ``t = ytil beta (theta - theta_ref).x`` (n,)."""
    ytil = signed_labels(data.y)
    return ytil, ytil * (beta * (data.x @ (np.asarray(theta, float) - data.theta_ref)))


def weighted_loss(theta, data: PreferenceData, beta: float) -> float:
    """``sum_i w_i l(z_i; theta)``."""
    _, t = _signed_margins(theta, data, beta)
    return float(data.weights @ logistic_loss_and_sigma(t, sigma=False)[0])


def weighted_grad(theta, data: PreferenceData, beta: float, weights=None):
    """Gradient (d,) of ``sum_i w_i l(z_i; theta)`` (:func:`weighted_grad_hess` without the Hessian)."""
    w = data.weights if weights is None else np.asarray(weights, float)
    ytil, t = _signed_margins(theta, data, beta)
    _, sm = logistic_loss_and_sigma(t)
    return -beta * ((w * ytil * sm) @ data.x)


def weighted_grad_hess(theta, data: PreferenceData, beta: float, weights=None):
    """Gradient (d,) and Hessian (d, d) of ``sum_i w_i l(z_i; theta)``.

    ``grad = -beta sum_i w_i ytil_i sigma(-t_i) x_i`` and ``hess = beta^2 sum_i w_i sigma(t_i) sigma(-t_i)
    x_i x_i^T`` (``losses.dpo_grad``, ``losses.dpo_curvature``), without the (n, d) per-sample gradients.
    """
    w = data.weights if weights is None else np.asarray(weights, float)
    ytil, t = _signed_margins(theta, data, beta)
    _, sm = logistic_loss_and_sigma(t)
    g = -beta * ((w * ytil * sm) @ data.x)
    c = (beta * beta) * (w * sm * (1.0 - sm))
    xT = data.x.T
    H = (xT * c) @ data.x
    return g, H


def ball_fw_gap(grad, theta, radius: float, mu: float = 0.0) -> float:
    r"""Certified suboptimality on the ball ``{||t|| <= B}`` from one (sub)gradient.

    If ``f(t) >= f(theta) + grad.(t - theta) + (mu/2)||t - theta||^2`` on the ball (``mu >= 0`` a
    valid strong-convexity constant there), then

    .. math:: f(\theta) - \min_{\|t\|\le B} f \le
              -\min_{\|t\| \le B}\bigl[g\cdot(t-\theta) + \tfrac{\mu}{2}\|t-\theta\|^2\bigr].

    ``mu = 0`` is the Frank-Wolfe gap ``g.theta + B||g||``. For ``mu > 0`` the quadratic is
    isotropic, so its minimiser over the ball is the projection of ``theta - g/mu`` (closed form).
    The result is the smaller (both are valid), floored at 0.
    """
    g = np.asarray(grad, float)
    theta = np.asarray(theta, float)
    fw = float(g @ theta + radius * np.linalg.norm(g))
    best = fw
    if mu > 0:
        t = theta - g / mu
        nt = np.linalg.norm(t)
        if nt > radius:
            t = t * (radius / nt)
        diff = t - theta
        best = min(fw, -float(g @ diff + 0.5 * mu * diff @ diff))
    return max(0.0, best)


def curvature_floor(data: PreferenceData, beta: float, radius: float, weights=None) -> float:
    """A valid strong-convexity constant of ``sum_i w_i l_i`` on ``{||theta|| <= B}``.

    ``hess = beta^2 sum_i w_i s(t_i) x_i x_i^T`` with ``s(t) = sigma(t)sigma(-t)`` decreasing in
    ``|t|`` and ``|t_i| <= beta ||x_i|| (B + ||theta_ref||)`` on the ball, so
    ``mu = beta^2 lambda_min(sum_i w_i s(t_i^max) x_i x_i^T)`` (docs/theory.md section 2: c_B; section 7, T2.3).
    """
    w = data.weights if weights is None else np.asarray(weights, float)
    tmax = beta * np.sqrt(np.einsum("ij,ij->i", data.x, data.x)) * (radius + np.linalg.norm(data.theta_ref))
    e = np.exp(-tmax)  # tmax >= 0: sigma(t) sigma(-t) = e / (1 + e)^2
    c = w * (e / ((1.0 + e) * (1.0 + e)))
    M = (data.x.T * c) @ data.x
    return max(0.0, float(beta**2 * np.linalg.eigvalsh(M)[0]) * (1 - 1e-9))


def weighted_min_lower_bound(data: PreferenceData, beta: float, radius: float, weights, theta,
                             refine_above: float = 1e-8) -> float:
    """A certified lower bound on ``min_{||t|| <= B} sum_i weights_i l(z_i; t)``.

    First the quadratic minorant at ``theta`` (``f(theta) - ball_fw_gap(...)``, free). When that
    bound is looser than ``refine_above`` (first order in the error of ``theta``, or ``mu ~ 0`` for
    large ``beta B``), the weighted DPO problem itself is solved by Newton from ``theta`` and the
    same minorant is taken at the Newton point, where the gradient vanishes and the bound is
    tight. Both are valid lower bounds; the larger is returned.
    """
    w = np.maximum(np.asarray(weights, float), 0.0)
    theta = np.asarray(theta, float)
    mu = curvature_floor(data, beta, radius, weights=w)

    def fun(t):
        return float(w @ logistic_loss_and_sigma(_signed_margins(t, data, beta)[1], sigma=False)[0])

    def bound_at(t):
        g, _ = weighted_grad_hess(t, data, beta, weights=w)
        return fun(t) - ball_fw_gap(g, t, radius, mu)

    f0 = fun(theta)
    best = bound_at(theta)
    if f0 - best > refine_above:
        from ._newton import newton_ball

        res = newton_ball(fun, lambda t: weighted_grad_hess(t, data, beta, weights=w), theta, data.d, radius,
                          max_iter=100)
        best = max(best, bound_at(res.v))
    return best


_THREADPOOLS = None


def single_blas_thread(fn):
    """Run ``fn`` with one BLAS thread.

    The solvers' heavy work is tall-skinny ``(n, d)`` products with small ``d``: BLAS threads gain
    nothing there, and when the cores are shared (pytest -n 2, joblib sweeps, a training run next
    door) OpenBLAS's spinning threads made a 1e5 x 8 matrix-vector product 25x slower (measured:
    4.1 ms vs 0.16 ms). The limit costs about 15 microseconds per call.
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _THREADPOOLS
        if _THREADPOOLS is None:
            from threadpoolctl import ThreadpoolController

            _THREADPOOLS = ThreadpoolController()
        with _THREADPOOLS.limit(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


class Timer:
    """Context manager measuring wall time in ``.seconds``."""

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        return False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0


#: Solver attempts for conic problems, in order (docs/theory.md section 6: Clarabel first, retry with a
#: shorter step fraction, then SCS).
CONIC_ATTEMPTS = (
    ("CLARABEL", dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, max_iter=500)),
    ("CLARABEL", dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, max_iter=1000, max_step_fraction=0.9)),
    ("SCS", dict(eps_abs=1e-9, eps_rel=1e-9, max_iters=200000)),
)


def solve_cvxpy(problem, attempts=CONIC_ATTEMPTS, accept=None):
    """Solve a cvxpy problem trying ``attempts`` in order.

    ``accept()`` (optional) is called after each solve that returned a solution and decides
    whether to stop (e.g. when the certified gap is small enough). Returns ``(solver_name,
    cvxpy_status, tried)``; raises :class:`SolverError` when every attempt failed.
    """
    import cvxpy as cp

    tried = []
    last = None
    for name, opts in attempts:
        label = name + ("(max_step_fraction=0.9)" if "max_step_fraction" in opts else "")
        try:
            with warnings.catch_warnings():
                # cvxpy warns "Solution may be inaccurate"; we certify every answer ourselves
                warnings.simplefilter("ignore", UserWarning)
                problem.solve(solver=name, **opts)
        except (cp.error.SolverError, ValueError, ArithmeticError) as exc:
            tried.append(f"{label}: {type(exc).__name__}")
            continue
        tried.append(f"{label}: {problem.status}")
        if problem.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            last = (label, problem.status)
            if accept is None or accept():
                return label, problem.status, tried
    if last is not None:
        return last[0], last[1], tried
    raise SolverError("all conic solvers failed: " + "; ".join(tried))


def project_ball(theta, radius):
    """A copy of ``theta`` scaled into the ball ``||theta||_2 <= radius`` (unchanged inside it)."""
    theta = np.asarray(theta, float).copy()
    nt = np.linalg.norm(theta)
    if nt > radius:
        theta *= radius / nt
    return theta


def solve_cvxpy_certified(problem, evaluate, gap_ok=CERTIFIED_GAP):
    """Solve ``problem`` with each of ``CONIC_ATTEMPTS`` in turn, certifying every answer in numpy.

    ``evaluate()`` returns ``(cert, theta)`` for the problem's current solution (``None`` when it
    has none); ``cert.gap`` is the certified duality gap. One attempt runs at a time, so the label of
    the certifying solver is known; the loop stops at the first answer with ``cert.gap <= gap_ok``.

    Returns
    -------
    best : dict
        ``{"cert", "theta", "solver"}`` of the smallest gap seen; empty when no attempt gave a solution.
    status : str or None
        cvxpy's status of the last solve.
    tried : list of str
        One entry per attempt (solver label and its status or error).
    """
    best: dict = {}
    label = ""

    def accept() -> bool:
        got = evaluate()
        if got is None:
            return False
        cert, theta = got
        if "cert" not in best or cert.gap < best["cert"].gap:
            best.update(cert=cert, theta=theta, solver=label)
        return cert.gap <= gap_ok

    tried, status = [], None
    for attempt in CONIC_ATTEMPTS:
        label = attempt[0] + ("(max_step_fraction=0.9)" if "max_step_fraction" in attempt[1] else "")
        try:
            _, status, t_ = solve_cvxpy(problem, attempts=(attempt,), accept=accept)
        except SolverError as exc:
            tried.append(str(exc).replace("all conic solvers failed: ", ""))
            continue
        tried += t_
        if best.get("cert") is not None and best["cert"].gap <= gap_ok:
            break
    return best, status, tried
