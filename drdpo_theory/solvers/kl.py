"""Exact KLDPO on the log-linear class (docs/theory.md section 3.1; derivations in docs/theory_kl.md).

The robust objective is the worst expected DPO loss over a KL ball around the data distribution,

.. math::

    L_{KL}(\\theta; P) = \\sup_{Q:\\ KL(Q\\|P) \\le \\rho} E_Q\\,\\ell(z;\\theta)
                     = \\inf_{\\lambda > 0}\\ \\lambda\\rho + \\lambda \\log \\sum_i w_i e^{\\ell_i(\\theta)/\\lambda},

with ``P = sum_i w_i delta_{z_i}`` (``w = data.weights``), and KLDPO is ``min_{||theta|| <= B} L_KL``.

Contents
--------
- :func:`kl_inner`: the exact worst case at fixed losses (1-D dual in ``lam``, solved to machine
  precision), with the regimes ``rho = 0`` and ``lam* = 0``.
- :func:`kldpo_objective`, :func:`kldpo_gradient` (Danskin).
- :func:`kl_collapse_threshold`: the radius ``rho_c`` above which ``theta_ref`` is a robust optimum.
- :func:`solve_kldpo_native`: Newton with the exact ball constraint on the smooth jointly convex
  ``G(theta, lam)`` (the perspective of log-sum-exp), warm-started at the DPO solution.
- :func:`solve_kldpo_cvxpy`: the exponential-cone program.

Every solver returns a :class:`~drdpo_theory.solvers.result.SolverResult` whose ``duality_gap`` is a
certified upper bound on ``L_KL(theta) - min L_KL``: ``objective`` is a dual value (an upper bound on
``L_KL(theta)``), ``lower_bound = E_q l(theta) - (ball gap of E_q l)`` for a KL-feasible ``q``, which
is <= ``min_Theta E_q l`` <= the robust optimum (weak duality).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..data import PreferenceData
from ..losses import dpo_grad, dpo_loss, signed_labels
from ._common import CONIC_ATTEMPTS, Timer, weighted_min_lower_bound, check_common, check_radius, single_blas_thread, solve_cvxpy_certified
from ._common import project_ball as _project_ball
from ._newton import _subproblem, newton_ball
from .result import FAILED, INACCURATE, SolverError, SolverResult, status_from_gap

__all__ = [
    "KLInner",
    "kl_divergence",
    "kl_inner",
    "kl_inner_cvxpy",
    "kldpo_objective",
    "kldpo_gradient",
    "kl_collapse_threshold",
    "kl_collapse_small_rho",
    "solve_kldpo",
    "solve_kldpo_native",
    "solve_kldpo_cvxpy",
]


# ----------------------------------------------------------------------------------------------
# The inner worst case at fixed losses
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KLInner:
    """Exact worst case ``sup {E_q l : KL(q||w) <= rho}`` at fixed losses.

    Attributes
    ----------
    value : the supremum (computed as the dual value at ``lam``; equal to ``E_q l`` to rounding).
    lam : optimal dual variable ``lam* >= 0`` (``inf`` for ``rho = 0``; ``0`` in the regime where
        the worst case puts all its mass on the largest losses).
    q : (n,) worst-case distribution, ``q_i ∝ w_i exp(l_i / lam*)``; sums to 1.
    kl : ``KL(q || w)`` (``= rho`` when ``active``).
    active : True iff ``lam* > 0``, i.e. the KL constraint binds (``kl == rho`` to rounding).
    """

    value: float
    lam: float
    q: NDArray[np.float64]
    kl: float
    active: bool


def kl_divergence(q: ArrayLike, w: ArrayLike) -> float:
    """``KL(q || w) = sum_i q_i log(q_i / w_i)`` (``0 log 0 = 0``; ``inf`` if ``q`` is not ``<< w``)."""
    q = np.asarray(q, float)
    w = np.asarray(w, float)
    pos = q > 0
    if np.any(w[pos] <= 0):
        return math.inf
    return float(np.sum(q[pos] * (np.log(q[pos]) - np.log(w[pos]))))


def _check_weights(weights, n: int, where: str) -> NDArray[np.float64]:
    w = np.asarray(weights, dtype=float)
    if w.shape != (n,):
        raise ValueError(f"{where}: weights must have shape ({n},) like the losses, got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{where}: weights must be finite and nonnegative")
    total = w.sum()
    if not abs(total - 1.0) <= 1e-9:
        raise ValueError(f"{where}: weights must sum to 1 (a probability vector), got sum {total!r}")
    return w / total


def _expm1_minus_x(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """``e^x - 1 - x >= 0`` without cancellation for small ``|x|`` (Taylor series below 1e-2)."""
    small = np.abs(x) < 1e-2
    xs = x[small]
    out = np.expm1(x) - x
    # truncation error x^8/8! is below 1e-16 relative to x^2/2 for |x| < 1e-2
    out[small] = xs * xs * (0.5 + xs * (1 / 6 + xs * (1 / 24 + xs * (1 / 120 + xs * (1 / 720 + xs / 5040)))))
    return out


def _lse_tilt(a: NDArray[np.float64], w: NDArray[np.float64], s: float):
    """The exponential tilt ``q ∝ w e^{s a}`` of a probability vector ``w`` (``a <= 0``, ``max a = 0``).

    Returns ``(m, logZ_rel, q, kl, var)`` with ``log sum_i w_i e^{s a_i} = s m + logZ_rel``,
    ``kl = KL(q||w)`` and ``var = Var_q(a)`` (so ``dKL/ds = s Var_q(a)``). Two regimes:

    - ``s (max a - min a) > 1``: shift by the max (``m = 0``): every exponent is <= 0, so nothing
      overflows and ``Z >= w(argmax) > 0`` never underflows.
    - otherwise centre at ``abar = E_w a`` (``m = abar``, ``b = a - abar``): ``Z_rel = 1 + S`` with
      ``S = sum w (e^{sb} - 1 - sb) >= 0`` (a sum of nonnegative terms, no cancellation) and
      ``E_q b = sum w b (e^{sb} - 1) / Z_rel`` (terms of one sign). This keeps ``value``, ``q`` and
      ``KL`` accurate to rounding for tiny ``s`` (tiny ``rho``), where ``log sum w e^{sa}`` would round
      to 0 and ``KL = s E_q a - log Z`` would cancel completely.
    """
    if s * (0.0 - float(a.min())) > 1.0:
        e = w * np.exp(s * a)
        Z = e.sum()
        q = e / Z
        logZ = math.log(Z)
        abar = float(q @ a)
        kl = s * abar - logZ  # KL(q||w) = E_q[log q/w] = s E_q a - log Z
        var = float(q @ (a - abar) ** 2)
        return 0.0, logZ, q, max(kl, 0.0), var
    m = float(w @ a)
    b = a - m
    x = s * b
    em = np.expm1(x)
    S = float(w @ _expm1_minus_x(x))
    Zr = 1.0 + S
    q = w * (1.0 + em) / Zr
    q /= q.sum()
    Eb = float(w @ (b * em)) / Zr  # E_q b (every term b em >= 0)
    kl = s * Eb - math.log1p(S)
    var = max(float(q @ (b * b)) - Eb * Eb, 0.0)
    return m, math.log1p(S), q, max(kl, 0.0), var


def _root_s(a: NDArray[np.float64], w: NDArray[np.float64], rho: float, s0: float) -> float:
    """The ``s > 0`` with ``KL(q_s || w) = rho`` (``0 < rho < -log w(argmax a)``), or ``inf`` if it is
    beyond 1e250 (``rho`` within rounding of ``-log w(A)``).

    ``KL(q_s||w)`` increases from 0 to ``-log w(A)``; safeguarded Newton (``dKL/ds = s Var_q a``)
    inside a bracket ``[lo, hi]`` that every evaluation shrinks; bisection (or doubling while
    ``hi = inf``) whenever the Newton point leaves the bracket. Stops when the step or the bracket
    is below 1e-15 relative.
    """
    lo, hi = 0.0, math.inf
    s = s0
    for _ in range(500):
        _, _, _, kl, var = _lse_tilt(a, w, s)
        r = kl - rho
        if r == 0.0:
            return s
        if r < 0.0:
            lo = s
        else:
            hi = s
        dk = s * var
        s_new = s - r / dk if dk > 0 else math.nan
        if not (lo < s_new < hi):  # Newton left the bracket (or NaN): bisect / expand
            s_new = 2.0 * s if math.isinf(hi) else 0.5 * (lo + hi)
        if s_new > 1e250:
            return math.inf
        if abs(s_new - s) <= 1e-15 * s or (hi < math.inf and hi - lo <= 1e-15 * hi):
            return s_new
        s = s_new
    return s


def kl_inner(losses: ArrayLike, weights: ArrayLike, rho: float, lam_hint: float | None = None) -> KLInner:
    """Worst-case expected loss over the KL ball (exact, at fixed losses).

    .. math::

        \\sup_{q \\in \\Delta_n,\\ KL(q\\|w) \\le \\rho} \\sum_i q_i \\ell_i
        = \\inf_{\\lambda > 0}\\ \\varphi(\\lambda),\\qquad
        \\varphi(\\lambda) = \\lambda\\rho + \\lambda\\log\\sum_i w_i e^{\\ell_i/\\lambda}.

    ``phi'(lam) = rho - KL(q_lam || w)`` with ``q_lam ∝ w e^{l/lam}``; ``KL(q_lam||w)`` decreases from
    ``-log w(A)`` (``A`` = argmax set of ``l`` on ``w > 0``) at ``lam -> 0`` to 0 at ``lam -> inf``. Hence

    - ``rho = 0``: value ``sum_i w_i l_i``, ``q = w``, ``lam = inf``;
    - ``rho >= -log w(A)`` (includes all-equal losses): ``lam* = 0``, value ``max_A l``,
      ``q = w`` restricted to ``A`` and renormalised;
    - otherwise ``lam* = 1/s*`` with ``KL(q_{1/s*}||w) = rho``, found by safeguarded Newton on
      ``s = 1/lam`` (``KL`` is increasing in ``s``, ``dKL/ds = s Var_q(l)``) to 1e-15 relative.

    Parameters
    ----------
    losses : (n,) finite losses ``l_i``.
    weights : (n,) probability vector ``w`` (nonnegative, sums to 1).
    rho : KL radius, >= 0.
    lam_hint : optional starting value for ``lam*`` (warm start; the result does not depend on it).

    Returns
    -------
    KLInner
    """
    rho = check_radius("rho", rho)
    l = np.asarray(losses, dtype=float)
    if l.ndim != 1 or l.size == 0:
        raise ValueError(f"kl_inner: losses must be a nonempty 1-D array, got shape {l.shape}")
    if not np.all(np.isfinite(l)):
        raise ValueError("kl_inner: losses must be finite")
    w = _check_weights(weights, l.size, "kl_inner")
    supp = w > 0
    if rho == 0.0:
        return KLInner(float(w @ l), math.inf, w.copy(), 0.0, True)
    ls, ws = l[supp], w[supp]
    M = float(ls.max())
    a = ls - M  # <= 0, max 0: the log-sum-exp shift
    top = a == 0.0
    w_top = float(ws[top].sum())
    kl_max = -math.log(w_top)  # KL(q_lam || w) as lam -> 0
    q = np.zeros_like(w)
    if rho >= kl_max:  # lam* = 0: all the mass on the largest losses
        q[np.flatnonzero(supp)[top]] = ws[top] / w_top
        return KLInner(M, 0.0, q, kl_divergence(q, w), rho == kl_max)

    if lam_hint is not None and 0.0 < lam_hint < math.inf:
        s0 = 1.0 / lam_hint
    else:
        var = float(ws @ (a - ws @ a) ** 2)
        s0 = math.sqrt(2.0 * rho / var) if var > 0 else 1.0  # small-rho guess: KL ~ s^2 Var / 2
    s = _root_s(a, ws, rho, s0)
    if math.isinf(s):  # rho below -log w(A) by less than the rounding of KL: the lam* = 0 limit
        q[np.flatnonzero(supp)[top]] = ws[top] / w_top
        q = _make_feasible(q, w, rho)
        return KLInner(M, 0.0, q, kl_divergence(q, w), False)
    m, logZ_rel, qs, kl, _ = _lse_tilt(a, ws, s)
    lam = 1.0 / s
    q[supp] = qs
    # the dual value phi(lam*) = lam rho + lam log sum w e^{l/lam} (an upper bound; = E_q l to rounding)
    value = M + m + lam * (rho + logZ_rel)
    return KLInner(float(value), lam, q, kl, True)


def kl_inner_cvxpy(losses: ArrayLike, weights: ArrayLike, rho: float, solver: str = "CLARABEL") -> KLInner:
    """Independent check of :func:`kl_inner`: the primal as a conic program in likelihood ratios.

    With ``r_i = q_i / w_i`` (on ``w_i > 0``), ``KL(q||w) = sum_i w_i r_i log r_i``, so

    .. math:: \\max_{r \\ge 0}\\ \\sum_i w_i r_i \\ell_i \\quad\\text{s.t.}\\quad
              \\sum_i w_i\\,\\mathrm{rel\\_entr}(r_i, 1) \\le \\rho,\\quad \\sum_i w_i r_i = 1.

    This is the rescaling ``q = n p`` of docs/theory.md section 6 generalised to weights (``r = n p`` when
    ``w = 1/n``): the variables are O(1), which keeps Clarabel away from the ``rel_entr(p, 1/n)``
    failures. ``lam`` is the dual variable of the KL constraint.
    """
    import cvxpy as cp

    rho = check_radius("rho", rho)
    l = np.asarray(losses, dtype=float)
    w = _check_weights(weights, l.size, "kl_inner_cvxpy")
    supp = w > 0
    ls, ws = l[supp], w[supp]
    r = cp.Variable(ls.size, nonneg=True)
    kl_con = ws @ cp.rel_entr(r, np.ones(ls.size)) <= rho
    prob = cp.Problem(cp.Maximize(ws @ (cp.multiply(ls, r))), [kl_con, ws @ r == 1])
    opts = dict(CONIC_ATTEMPTS[0][1]) if solver == "CLARABEL" else {}
    prob.solve(solver=solver, **opts)
    if prob.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise SolverError(f"kl_inner_cvxpy: {solver} returned {prob.status}")
    q = np.zeros_like(w)
    q[supp] = np.maximum(r.value, 0.0) * ws
    q /= q.sum()
    lam = float(kl_con.dual_value)
    kl = kl_divergence(q, w)
    return KLInner(float(prob.value), lam, q, kl, lam > 1e-8)


# ----------------------------------------------------------------------------------------------
# Objective and gradient
# ----------------------------------------------------------------------------------------------


def _losses(theta, data: PreferenceData, beta: float) -> NDArray[np.float64]:
    return dpo_loss(np.asarray(theta, float), data.x, data.y, beta, data.theta_ref)


def kldpo_objective(theta: ArrayLike, data: PreferenceData, beta: float, rho: float) -> float:
    """``L_KL(theta; P)``: the exact worst-case expected DPO loss over ``{Q: KL(Q||P) <= rho}``.

    Parameters
    ----------
    theta : (d,). data : weighted data ``P``. beta : DPO temperature. rho : KL radius >= 0.
    """
    return kl_inner(_losses(theta, data, beta), data.weights, rho).value


def kldpo_gradient(theta: ArrayLike, data: PreferenceData, beta: float, rho: float) -> NDArray[np.float64]:
    """Danskin gradient ``sum_i q*_i grad l_i(theta)``, (d,), with ``q*`` from :func:`kl_inner`.

    The gradient when the worst case is unique (``lam* > 0``, or ``lam* = 0`` with a single largest
    loss); otherwise one subgradient (``q* = w`` restricted to the tied largest losses).
    """
    theta = np.asarray(theta, float)
    q = kl_inner(_losses(theta, data, beta), data.weights, rho).q
    return q @ dpo_grad(theta, data.x, data.y, beta, data.theta_ref)


# ----------------------------------------------------------------------------------------------
# Collapse threshold
# ----------------------------------------------------------------------------------------------


def _zero_in_hull(u: NDArray[np.float64]) -> bool:
    """LP feasibility (HiGHS): is there ``p >= 0``, ``sum p = 1``, ``u^T p = 0``?"""
    from scipy.optimize import linprog

    n, d = u.shape
    A = np.vstack([u.T, np.ones((1, n))])
    b = np.append(np.zeros(d), 1.0)
    res = linprog(np.zeros(n), A_eq=A, b_eq=b, bounds=(0, None), method="highs")
    return res.status == 0


def _i_projection(u: NDArray[np.float64], w: NDArray[np.float64], max_iter: int = 300):
    """``min {KL(q||w) : E_q u = 0}`` through its dual ``-min_eta log sum_i w_i exp(eta . u_i)``.

    Damped Newton on the cumulant generating function ``F(eta)`` (convex, smooth). Returns
    ``(rho_c, q)`` with ``q ∝ w exp(u eta*)`` the I-projection (``rho_c = KL(q||w) = -F(eta*)``), or
    ``(inf, None)`` when 0 is outside the convex hull of the ``u_i`` (``F`` unbounded below). If 0 is on
    the relative boundary of the hull, ``eta`` runs off to infinity along the face normal while
    ``F`` converges geometrically (one unit of margin per Newton step), so the value is still exact
    to rounding. Since ``KL(q||w) <= -log min_i w_i`` on the simplex, ``F < log min w - 1`` proves
    ``0 ∉ conv{u_i}``.
    """
    supp = w > 0
    us, ws = u[supp], w[supp]
    d = u.shape[1]
    scale = max(float(np.abs(us).max()), 1e-300)
    if float(np.abs(us).max()) == 0.0:
        return 0.0, w.copy()
    us = us / scale  # F(eta) with u/scale is F(scale*eta) with u: same infimum, better conditioning
    f_floor = math.log(float(ws.min())) - 1.0
    eta = np.zeros(d)

    def parts(eta):
        z = us @ eta
        m = float(z.max())
        e = ws * np.exp(z - m)  # shift by the max exponent: no overflow
        Z = e.sum()
        return m + math.log(Z), e / Z

    F, q = parts(eta)
    for _ in range(max_iter):
        g = us.T @ q  # E_q u
        H = (us * q[:, None]).T @ us - np.outer(g, g)  # Cov_q(u)
        evals, evecs = np.linalg.eigh(H)
        keep = evals > 1e-15 * max(float(evals[-1]), 1e-300)
        step = -(evecs[:, keep] @ ((evecs[:, keep].T @ g) / evals[keep]))  # pseudo-inverse Newton step
        dec = -float(g @ step)
        if dec <= 1e-30 or float(np.linalg.norm(g)) <= 1e-15:
            break
        t = 1.0
        while t > 1e-12:
            F_new, q_new = parts(eta + t * step)
            if F_new <= F - 1e-4 * t * dec:
                break
            t *= 0.5
        else:
            break  # no representable decrease: converged to rounding
        eta, F, q = eta + t * step, F_new, q_new
        if F < f_floor:
            return math.inf, None
    if F < f_floor:
        return math.inf, None
    if float(np.linalg.norm(us.T @ q)) > 1e-9 and not _zero_in_hull(us):
        # F is unbounded below along a direction of zero curvature (e.g. n <= d: eta.u_i equal for
        # all i), which the pseudo-inverse step never follows: the hull LP decides.
        return math.inf, None
    qf = np.zeros_like(w)
    qf[supp] = q
    return max(0.0, -F), qf


def _collapse(data: PreferenceData, radius: float | None):
    """``(rho_c, q_c)``: the collapse threshold and the I-projection certifying it.

    Interior ``theta_ref``: ``rho_c = min{KL(q||w) : E_q u = 0}``. ``theta_ref`` on the sphere
    ``||theta_ref|| = B`` (within 1e-12 relative): the normal cone adds ``{c theta_ref : c >= 0}``, so
    ``rho_c = min{KL(q||w) : E_q u in cone(theta_ref)}``: with ``r = theta_ref/||theta_ref||`` the
    minimiser of KL subject to ``E_q (u - (u.r) r) = 0`` alone is the answer if it has
    ``E_q u.r >= 0``; otherwise the half-space constraint binds and the interior threshold applies.
    """
    u, w = data.u, data.weights
    tr = data.theta_ref
    nr = float(np.linalg.norm(tr))
    if radius is not None and nr > 0 and nr >= radius * (1.0 - 1e-12):
        r = tr / nr
        ur = u @ r
        rho_p, q_p = _i_projection(u - ur[:, None] * r, w)
        if q_p is not None and float(q_p @ ur) >= 0.0:
            return rho_p, q_p
    return _i_projection(u, w)


def kl_collapse_threshold(data: PreferenceData, radius: float | None = None) -> float:
    """The radius ``rho_c`` above which ``theta_ref`` is a KLDPO optimum (``inf`` if never).

    At ``theta = theta_ref`` every loss equals ``log 2`` and ``grad l_i = -(beta/2) u_i``
    (``u_i = ytil_i x_i``), so ``∂L_KL(theta_ref) = {-(beta/2) E_q u : KL(q||w) <= rho}`` and, for
    ``theta_ref`` inside the ball, ``theta_ref`` is optimal iff some ``q`` in the KL ball has
    ``E_q u = 0``, i.e. iff ``rho >= rho_c`` with

    .. math:: \\rho_c = \\min\\{KL(q\\|w) : E_q u = 0\\}
                      = -\\min_{\\eta \\in R^d} \\log \\sum_i w_i e^{\\eta\\cdot u_i}

    (I-projection / Cramér duality; ``inf`` when 0 is not in the convex hull of the ``u_i``).
    ``rho_c`` does not depend on ``beta``. Small-``rho`` approximation: :func:`kl_collapse_small_rho`.

    Parameters
    ----------
    data : weighted preference data.
    radius : the ball radius ``B``; only used to detect ``||theta_ref|| = B``, where the normal cone
        of the ball lowers the threshold to ``min{KL(q||w) : E_q u = c theta_ref, c >= 0}``.
        ``None``: the interior threshold.
    """
    if not isinstance(data, PreferenceData):
        raise TypeError(f"data must be a PreferenceData, got {type(data).__name__}")
    return _collapse(data, radius)[0]


def kl_collapse_small_rho(data: PreferenceData) -> float:
    """Small-``rho`` approximation ``mu^T Sigma^+ mu / 2`` of :func:`kl_collapse_threshold`
    (``mu``, ``Sigma``: weighted mean and covariance of ``u_i = ytil_i x_i``; docs/theory.md section 6, docs/theory_kl.md section 4).
    Exact to second order in ``mu`` (the second-order expansion of the Cramér function at the mean)."""
    u, w = data.u, data.weights
    mu = w @ u
    C = (u - mu).T @ ((u - mu) * w[:, None])
    return float(0.5 * mu @ np.linalg.pinv(C, rcond=1e-12) @ mu)


# ----------------------------------------------------------------------------------------------
# The joint dual G(theta, lam) and its derivatives
# ----------------------------------------------------------------------------------------------


class _Joint:
    """``G(theta, lam) = lam rho + lam log sum_i w_i exp(l_i(theta)/lam)`` on data with ``w > 0``.

    ``G`` is the perspective of ``v -> log sum w e^v`` composed with the convex losses (nondecreasing
    outer function), hence jointly convex on ``lam > 0``; ``min_lam G(theta, .) = L_KL(theta)``.
    Derivatives (``q ∝ w e^{l/lam}``, ``g_i = grad l_i = a_i x_i``, ``hess l_i = c_i x_i x_i^T``,
    ``gbar = E_q g``, ``lbar = E_q l``)::

        dG/dtheta      = E_q g
        dG/dlam        = rho - KL(q||w)
        d2G/dtheta2    = E_q[c x x^T] + (E_q[g g^T] - gbar gbar^T) / lam
        d2G/dtheta dlam = -Cov_q(g, l) / lam^2
        d2G/dlam2      = Var_q(l) / lam^3
    """

    def __init__(self, data: PreferenceData, beta: float, rho: float):
        self.x, self.w, self.beta, self.rho = data.x, data.weights, beta, rho
        self.ytil = signed_labels(data.y)
        self.tr = data.theta_ref
        self.d = data.d
        self._key = None

    def _base(self, theta):
        """Per-sample quantities at ``theta`` from one ``exp`` (cached for the last ``theta``):
        ``t_i = ytil_i beta (theta - theta_ref).x_i``, loss ``l_i = log(1 + e^{-t_i})``,
        ``a_i`` (``grad l_i = a_i x_i``) and ``c_i`` (``hess l_i = c_i x_i x_i^T``)."""
        key = theta.tobytes()
        if key != self._key:
            t = self.ytil * self.beta * (self.x @ (theta - self.tr))
            e = np.exp(-np.abs(t))  # in (0, 1]: no overflow for any t
            l = np.maximum(-t, 0.0) + np.log1p(e)  # stable log(1 + e^{-t})
            sm = np.where(t >= 0, e, 1.0) / (1.0 + e)  # sigma(-t), stable on both sides
            a = -self.beta * self.ytil * sm
            c = self.beta**2 * e / (1.0 + e) ** 2  # beta^2 sigma(t) sigma(-t)
            self._key, self._val = key, (l, a, c)
        return self._val

    def fun(self, v) -> float:
        lam = v[self.d]
        if not lam > 0:
            return math.inf
        l = self._base(v[: self.d])[0]
        M = l.max()
        # shift by the max loss inside the log-sum-exp: every exponent <= 0
        return float(lam * self.rho + M + lam * math.log(self.w @ np.exp((l - M) / lam)))

    def lam_star(self, theta, lam_hint=None) -> float:
        """``argmin_lam G(theta, lam)`` (:func:`kl_inner`)."""
        return kl_inner(self._base(theta)[0], self.w, self.rho, lam_hint=lam_hint).lam

    def dpo_fun(self, theta) -> float:
        """``sum_i w_i l_i(theta)`` (the warm start's objective)."""
        return float(self.w @ self._base(theta)[0])

    def dpo_grad_hess(self, theta):
        """Gradient (d,) and Hessian (d, d) of ``sum_i w_i l_i(theta)``."""
        _, a, c = self._base(theta)
        return self.x.T @ (self.w * a), (self.x * (self.w * c)[:, None]).T @ self.x

    def grad_hess(self, v):
        d, lam = self.d, v[self.d]
        l, a, c = self._base(v[:d])
        M = l.max()
        e = self.w * np.exp((l - M) / lam)
        Z = e.sum()
        q = e / Z
        lbar = float(q @ l)
        dl = l - lbar
        gbar = self.x.T @ (q * a)
        kl = float(q @ ((l - M) / lam)) - math.log(Z)
        g = np.empty(d + 1)
        g[:d] = gbar
        g[d] = self.rho - kl
        H = np.empty((d + 1, d + 1))
        H[:d, :d] = (self.x * (q * (c + a * a / lam))[:, None]).T @ self.x - np.outer(gbar, gbar) / lam
        H[:d, d] = H[d, :d] = -(self.x.T @ (q * dl * a)) / lam**2
        H[d, d] = float(q @ (dl * dl)) / lam**3
        return g, H


def _dpo_warm_start(J: "_Joint", radius: float):
    """The DPO (``rho = 0``) solution by ``newton_ball``, to a decrement of 1e-14: a warm start only.

    (A decrement tolerance far below rounding makes ``newton_ball`` run to ``max_iter`` when the
    ball is active: there the decrement floors near 1e-16.)
    """
    return newton_ball(J.dpo_fun, J.dpo_grad_hess, J.tr.copy(), J.d, radius, max_iter=50, tol=1e-14)


def _newton_kldpo(J: "_Joint", theta0, lam0: float, radius: float, max_iter: int, tol: float = 1e-20):
    """Newton on ``G(theta, lam)`` with the exact ball constraint and a partial minimisation in ``lam``.

    Each iteration: the joint Newton step with ``||theta|| <= B`` enforced exactly in the subproblem
    (``_newton._subproblem``), an Armijo line search on ``G`` (the step may at most halve ``lam``),
    then ``lam <- lam*(theta)`` (exact 1-D minimisation, :func:`kl_inner` warm-started), which can
    only lower ``G``. Because ``dG/dlam = 0`` after the reset, the ``theta`` part of the joint step is
    the Newton step of the reduced function ``L_KL(theta) = min_lam G`` (its Hessian is the Schur
    complement), so the iteration is Newton's method on ``L_KL`` itself: monotone in ``L_KL`` and
    locally quadratic. Without the reset, plain joint Newton is drawn to the kink
    ``(theta_ref, lam -> 0)`` (docs/theory_kl.md section 3): its quadratic model asks for ``lam < 0``.

    Returns ``(v, iterations, converged, message)``.
    """
    d = J.d
    v = np.append(np.asarray(theta0, float), lam0)
    f = J.fun(v)
    for it in range(1, max_iter + 1):
        g, H = J.grad_hess(v)
        step, _ = _subproblem(H, g, v, d, radius)
        dec = -float(g @ step)
        if not np.isfinite(dec):
            return v, it, False, "non-finite Newton step"
        if dec <= tol:
            return v, it, True, "Newton decrement below tol"
        t = 1.0
        if step[d] < 0:  # keep lam > 0: at most halve it per step
            t = min(1.0, 0.5 * v[d] / -step[d])
        while True:
            vn = v + t * step
            nt = np.linalg.norm(vn[:d])
            if nt > radius:  # round-off on the sphere
                vn[:d] *= radius / nt
            fn = J.fun(vn)
            if np.isfinite(fn) and fn <= f - 1e-4 * t * dec:
                break
            t *= 0.5
            if t < 1e-16:  # no decrease representable: optimal to machine precision
                return v, it, dec < 1e-9, f"line search stalled (decrement {dec:.3g})"
        if fn >= f and dec < 1e-12:  # accepted only by rounding (ball active: dec floors near 1e-16)
            return v, it, True, f"no representable decrease (decrement {dec:.3g})"
        lam_new = J.lam_star(vn[:d], vn[d])
        if not (0.0 < lam_new < math.inf):
            return vn, it, False, f"lam*(theta) = {lam_new} during Newton (the lam* = 0 regime)"
        vn[d] = lam_new
        v, f = vn, min(fn, J.fun(vn))
    return v, max_iter, False, "max_iter reached"


# ----------------------------------------------------------------------------------------------
# Certificate
# ----------------------------------------------------------------------------------------------


def _make_feasible(q: NDArray[np.float64], w: NDArray[np.float64], rho: float) -> NDArray[np.float64]:
    """Mix ``q`` toward ``w`` until ``KL(q||w) <= rho`` (KL is convex: ``KL((1-t)q + t w) <= (1-t)KL(q)``)."""
    q = np.where(w > 0, np.maximum(q, 0.0), 0.0)
    q = q / q.sum()
    kl = kl_divergence(q, w)
    if kl <= rho:
        return q
    t = 1.0 - rho / kl * (1.0 - 1e-12) if kl > 0 else 1.0
    for _ in range(60):
        qt = (1.0 - t) * q + t * w
        if kl_divergence(qt, w) <= rho:
            return qt
        t = min(1.0, t + max(1e-15, 2 * (1 - t) * 1e-12, 2 * t))  # rounding: push further toward w
    return w.copy()


@dataclass
class _Certificate:
    upper: float
    lower: float
    gap: float
    inner: KLInner
    q: NDArray[np.float64]


def _certificate(theta, data: PreferenceData, beta: float, radius: float, rho: float,
                 upper_extra: float = math.inf, extra_q=(), lam_hint=None) -> _Certificate:
    """Upper bound ``U >= L_KL(theta) >= L*`` and lower bound ``Lb <= L*`` at ``theta``.

    ``U = kl_inner(...).value`` (a dual value; ``upper_extra`` may supply another dual value).
    For each KL-feasible ``q`` (the worst case at ``theta``, plus ``extra_q``, e.g. conic duals),
    ``f_q = E_q l`` is convex and ``min_Theta f_q <= L*``; its quadratic minorant on the ball
    (strong convexity ``mu = curvature_floor(weights=q)``) gives
    ``Lb = f_q(theta) - ball_fw_gap(grad f_q(theta), theta, B, mu) <= min_Theta f_q``, refined by a
    Newton solve of ``min_Theta f_q`` when looser than 1e-8 (``_common.weighted_min_lower_bound``).
    """
    l = _losses(theta, data, beta)
    inner = kl_inner(l, data.weights, rho, lam_hint=lam_hint)
    upper = min(inner.value, upper_extra)
    best_lb, best_q = -math.inf, inner.q
    for cand in (inner.q, *extra_q):
        if cand is None:
            continue
        q = _make_feasible(np.asarray(cand, float), data.weights, rho)
        lb = weighted_min_lower_bound(data, beta, radius, q, theta)
        if lb > best_lb:
            best_lb, best_q = lb, q
    lower = min(best_lb, upper)
    return _Certificate(upper, lower, upper - lower, inner, best_q)


def _result(theta, cert: _Certificate, solver: str, seconds: float, info: dict, collapsed=False,
            status=None) -> SolverResult:
    return SolverResult(
        method="kldpo", theta=theta, objective=float(cert.upper), lower_bound=float(cert.lower),
        duality_gap=float(cert.gap), lam=float(cert.inner.lam), weights=cert.inner.q,
        status=status or status_from_gap(cert.gap), solver=solver, seconds=seconds, collapsed=collapsed,
        info=info,
    )


def _check(data, beta, radius, rho) -> float:
    check_common(data, beta, radius)
    return check_radius("rho", rho)


def _rho0(data, beta, radius, solver):
    """``rho = 0``: KLDPO is DPO; re-label the DPO result (``lam = inf``, ``q = w``)."""
    from .dpo import solve_dpo_cvxpy, solve_dpo_native

    r = solve_dpo_native(data, beta, radius) if solver == "native" else solve_dpo_cvxpy(data, beta, radius)
    info = dict(r.info)
    info["message"] = "rho = 0: KLDPO is DPO (solved by the DPO solver)"
    return SolverResult(
        method="kldpo", theta=r.theta, objective=r.objective, lower_bound=r.lower_bound,
        duality_gap=r.duality_gap, lam=math.inf, weights=data.weights.copy(), status=r.status,
        solver=r.solver, seconds=r.seconds, info=info,
    )


# ----------------------------------------------------------------------------------------------
# Solvers
# ----------------------------------------------------------------------------------------------


@single_blas_thread
def solve_kldpo_native(data: PreferenceData, beta: float, radius: float, rho: float,
                       max_iter: int = 100) -> SolverResult:
    """KLDPO by Newton's method on the joint dual (exact to machine precision, certified).

    .. math:: \\min_{\\|\\theta\\| \\le B,\\ \\lambda > 0}\\ G(\\theta, \\lambda)
              = \\lambda\\rho + \\lambda\\log\\sum_i w_i e^{\\ell_i(\\theta)/\\lambda}.

    Steps: (1) ``rho = 0``: DPO. (2) ``rho >= rho_c`` (:func:`kl_collapse_threshold`, with the normal
    cone when ``||theta_ref|| = B``): return ``theta_ref`` with ``collapsed=True`` and the certificate
    of the I-projection ``q_c``. (3) ``rho >= -log max_i w_i``: ``lam*`` may be 0 (the minimax-of-max
    regime, where ``G`` is not smooth at the optimum): solve the exponential-cone program. (4) Else:
    damped Newton with the exact ball constraint on ``(theta, lam)`` (:func:`_newton_kldpo`),
    started at the DPO solution and ``lam*`` of :func:`kl_inner` there; falls back to the cone
    program if the certificate does not reach ``CERTIFIED_GAP``.

    Parameters
    ----------
    data : weighted preference data, ``x`` (n, d). beta : DPO temperature > 0.
    radius : ``B``, the parameter ball ``||theta|| <= B``. rho : KL radius >= 0.
    max_iter : Newton iterations.

    Returns
    -------
    SolverResult with ``lam = lam*`` and ``weights = q*`` (n,); ``info``: ``iterations``, ``rho_c``,
    ``message`` (and ``path``: which branch solved it).
    """
    rho = _check(data, beta, radius, rho)
    with Timer() as tm:
        if rho == 0.0:
            return _rho0(data, beta, radius, "native")
        rho_c, q_c = _collapse(data, radius)
        info = {"rho_c": rho_c}
        if rho >= rho_c:
            theta = data.theta_ref.copy()
            cert = _certificate(theta, data, beta, radius, rho, extra_q=(q_c,))
            if cert.gap <= 1e-7:
                info.update(iterations=0, path="collapse",
                            message=f"rho = {rho:.6g} >= rho_c = {rho_c:.6g}: theta_ref is optimal")
                return _result(theta, cert, "native-collapse", tm.elapsed, info, collapsed=True)
            info["collapse_warning"] = f"rho >= rho_c = {rho_c:.6g} but theta_ref not certified (gap {cert.gap:.3g})"
        if rho >= -math.log(float(data.weights.max())):
            r = solve_kldpo_cvxpy(data, beta, radius, rho)
            info.update(r.info)
            info["rho_c"] = rho_c
            info["path"] = "cvxpy (lam* may be 0)"
            info["message"] = (f"rho = {rho:.6g} >= -log max w = {-math.log(float(data.weights.max())):.6g}: "
                               f"lam* may be 0 (minimax of the largest losses); solved by the cone program. "
                               + str(r.info.get("message", "")))
            return SolverResult(**{**r.__dict__, "info": info, "seconds": tm.elapsed})
        supp = data.weights > 0
        dsub = data if supp.all() else PreferenceData(data.x[supp], data.y[supp], data.weights[supp],
                                                      data.theta_ref)
        J = _Joint(dsub, beta, rho)
        dpo = _dpo_warm_start(J, radius)
        lam0 = J.lam_star(dpo.v)
        msg = ""
        if lam0 > 0 and math.isfinite(lam0):
            v, iters, _, message = _newton_kldpo(J, dpo.v[: data.d], lam0, radius, max_iter)
            theta = _project_ball(v[: data.d], radius)
            cert = _certificate(theta, data, beta, radius, rho, upper_extra=J.fun(v), lam_hint=v[-1])
            info.update(iterations=iters, path="newton", message=message,
                        dpo_iterations=dpo.iterations)
            if cert.gap <= 1e-7:
                return _result(theta, cert, "native-newton", tm.elapsed, info)
            msg = f"Newton not certified (gap {cert.gap:.3g}, {message}); "
        else:
            msg = f"lam* = {lam0} at the DPO start; "
        r = solve_kldpo_cvxpy(data, beta, radius, rho)
        info.update(r.info)
        info["rho_c"] = rho_c
        info["path"] = "cvxpy fallback"
        info["message"] = msg + "fell back to the cone program. " + str(r.info.get("message", ""))
        return SolverResult(**{**r.__dict__, "info": info, "seconds": tm.elapsed})


def solve_kldpo_cvxpy(data: PreferenceData, beta: float, radius: float, rho: float) -> SolverResult:
    """KLDPO as an exponential-cone program (docs/theory_kl.md section 5), solved with cvxpy.

    .. math::

        \\min_{\\theta, \\lambda \\ge 0, t, s, v}\\ \\lambda\\rho + t \\quad\\text{s.t.}\\quad
        s_i \\ge \\log(1 + e^{-\\beta (\\theta - \\theta_{ref})\\cdot u_i}),\\
        v_i \\ge \\lambda e^{(s_i - t)/\\lambda}\\ (\\text{ExpCone}(s_i - t, \\lambda, v_i)),\\
        \\sum_i w_i v_i \\le \\lambda,\\ \\|\\theta\\|_2 \\le B.

    ``sum_i w_i lam e^{(s_i - t)/lam} <= lam`` is ``t >= lam log sum_i w_i e^{s_i/lam}``; at ``lam = 0``
    the cone's closure gives ``t >= max_i s_i`` (the ``lam* = 0`` regime). Solved with Clarabel, then
    Clarabel(max_step_fraction=0.9), then SCS (``_common.solve_cvxpy``), stopping at the first
    solution whose certificate (recomputed in numpy from ``theta``, as in the native solver, with
    the conic multipliers of ``s_i >= loss_i`` as an extra candidate ``q``) is <= 1e-7. Status is
    ``optimal`` only with that certificate.
    """
    import cvxpy as cp

    rho = _check(data, beta, radius, rho)
    with Timer() as tm:
        if rho == 0.0:
            return _rho0(data, beta, radius, "cvxpy")
        rho_c = kl_collapse_threshold(data, radius)
        info = {"rho_c": rho_c}
        supp = data.weights > 0
        dsub = data if supp.all() else PreferenceData(data.x[supp], data.y[supp], data.weights[supp],
                                                      data.theta_ref)
        n, d = dsub.n, dsub.d
        u = dsub.u
        theta = cp.Variable(d)
        lam = cp.Variable(nonneg=True)
        t = cp.Variable()
        s = cp.Variable(n)
        v = cp.Variable(n)
        # s_i >= l_i(theta) = logistic(-beta u_i.(theta - theta_ref))
        loss_con = s >= cp.logistic(-beta * (u @ theta) + beta * (u @ dsub.theta_ref))
        cons = [
            loss_con,
            cp.constraints.ExpCone(s - t, lam * np.ones(n), v),  # v_i >= lam exp((s_i - t)/lam)
            dsub.weights @ v <= lam,
            cp.norm(theta, 2) <= radius,
        ]
        prob = cp.Problem(cp.Minimize(lam * rho + t), cons)
        def evaluate():
            if theta.value is None:
                return None
            th = _project_ball(theta.value, radius)
            extra = []
            if loss_con.dual_value is not None:
                qd = np.zeros(data.n)
                qd[supp] = np.maximum(np.asarray(loss_con.dual_value, float).reshape(-1), 0.0)
                if qd.sum() > 0:
                    extra.append(qd / qd.sum())
            return _certificate(th, data, beta, radius, rho, extra_q=extra), th

        state, status, tried = solve_cvxpy_certified(prob, evaluate, gap_ok=1e-7)
        info.update(cvxpy_status=status, attempts="; ".join(tried), iterations=None,
                    lam_cvxpy=None if lam.value is None else float(lam.value))
        if "cert" not in state:
            info["message"] = "no solver returned a solution"
            return SolverResult("kldpo", data.theta_ref.copy(), math.nan, math.nan, math.inf, None, None,
                                FAILED, "cvxpy", tm.elapsed, info=info)
        cert = state["cert"]
        info["message"] = ("certified" if cert.gap <= 1e-7 else
                           f"not certified: best gap {cert.gap:.3g} (attempts: {'; '.join(tried)})")
    status = status_from_gap(cert.gap) if cert.gap <= 1e-7 else INACCURATE
    return _result(state["theta"], cert, f"cvxpy-{state['solver']}", tm.seconds, info,
                   collapsed=bool(rho >= rho_c), status=status)


def solve_kldpo(data: PreferenceData, beta: float, radius: float, rho: float,
                solver: str = "native") -> SolverResult:
    """KLDPO ``min_{||theta|| <= B} L_KL(theta; P)``; ``solver`` in {"native", "cvxpy"}."""
    if solver == "native":
        return solve_kldpo_native(data, beta, radius, rho)
    if solver == "cvxpy":
        return solve_kldpo_cvxpy(data, beta, radius, rho)
    raise ValueError(f"unknown solver {solver!r}; expected 'native' or 'cvxpy'")
