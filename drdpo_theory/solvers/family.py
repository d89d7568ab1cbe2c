"""Exact solvers for the robust preference-optimisation family on the log-linear class.

Derivations, certificates and collapse thresholds: docs/theory_family.md. Notation:
``w = data.weights`` (the data distribution ``p``), ``u_i = ytil_i x_i``, the margin
``t_i = beta u_i.(theta - theta_ref)`` (``beta`` times the signed reward margin), the DPO loss
``l_i = log(1 + e^{-t_i})`` and the parameter ball ``Theta = {||theta|| <= B}``.

Members (objective at ``theta``; all convex except dr_dpo):

- ``chi2dpo``: ``sup {E_q l : q in simplex, sum_i (q_i - w_i)^2 / w_i <= rho}``
  ``= inf_eta eta + sqrt(1 + rho) sqrt(E_w (l - eta)_+^2)``.
- ``cvardpo``: ``CVaR_alpha = sup {E_q l : q in simplex, q <= w / alpha} = inf_eta eta + E_w (l - eta)_+ / alpha``.
- ``groupdpo``: ``max_g L_g``, ``L_g = sum_{i in g} w_i l_i / w(g)`` (Ramesh et al. 2024).
- ``rdpo``: ``E_w [(1-eps) l(t) - eps l(-t)] / (1 - 2 eps) = E_w [l(t) - eps t / (1-2eps)]``
  (Chowdhury et al. 2024, known flip rate ``eps``).
- ``cdpo``: ``E_w [(1-eps) l(t) + eps l(-t)] = E_w [l(t) + eps t]`` (label smoothing).
- ``dr_dpo``: ``-beta' log E_w exp(-l / beta')`` (Wu et al. 2024, Dr.DPO); not convex.

Every convex member has a native path and a cvxpy path, both certified like KLDPO: ``objective``
is an upper bound on the robust value at ``theta`` (a dual value or the exact value) and
``lower_bound = min_Theta E_q l`` bounded from below in numpy (``_common.weighted_min_lower_bound``)
for a ``q`` feasible in the member's uncertainty set (weak duality: ``min_Theta E_q l <= L*``); rdpo
and cdpo are smooth convex ERMs whose lower bound is the strongly convex quadratic minorant on the
ball (refined by Newton). ``status == "optimal"`` only when the gap is <= ``CERTIFIED_GAP``.

Native paths: chi2dpo is Newton on the jointly convex ``C^1`` dual ``G(theta, eta)`` with ``eta``
reset to its exact 1-D minimiser after each step (as KLDPO resets ``lam``); cvardpo and groupdpo are
nonsmooth minimax problems, solved by Newton on an entropic smoothing with temperature ``tau``
driven to 0 (continuation) until the certificate closes; rdpo and cdpo are Newton on a smooth
convex ERM. dr_dpo is not convex: a modified-Newton local solver whose status is ``local`` (a
first-order stationary point, never ``optimal``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..data import PreferenceData
from ._common import (
    Timer,
    ball_fw_gap,
    check_common,
    check_radius,
    curvature_floor,
    project_ball as _project_ball,
    single_blas_thread,
    solve_cvxpy,
    solve_cvxpy_certified,
    weighted_min_lower_bound,
)
from ._newton import _subproblem, newton_ball
from .result import CERTIFIED_GAP, FAILED, INACCURATE, SolverError, SolverResult, status_from_gap

__all__ = [
    "FAMILY_METHODS",
    "LOCAL",
    "Chi2Inner",
    "CVaRInner",
    "GroupInner",
    "chi2_divergence",
    "chi2_inner",
    "cvar_inner",
    "group_inner",
    "check_groups",
    "chi2dpo_objective",
    "cvardpo_objective",
    "groupdpo_objective",
    "rdpo_objective",
    "cdpo_objective",
    "dr_dpo_objective",
    "chi2_collapse_threshold",
    "cvar_collapse_threshold",
    "group_collapse",
    "CDPO_COLLAPSE_EPS",
    "solve_chi2dpo",
    "solve_cvardpo",
    "solve_groupdpo",
    "solve_rdpo",
    "solve_cdpo",
    "solve_dr_dpo",
    "solve_family",
]

FAMILY_METHODS = ("chi2dpo", "cvardpo", "groupdpo", "rdpo", "cdpo", "dr_dpo")
#: Status of a non-convex solve that reached a first-order stationary point (never ``optimal``).
LOCAL = "local"
#: cdpo: ``theta_ref`` is optimal at ``eps = 1/2`` for every data set (docs/theory_family.md).
CDPO_COLLAPSE_EPS = 0.5
#: dr_dpo is reported ``local`` when the ball-stationarity measure is below this.
STATIONARY_TOL = 1e-8


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _check_losses_weights(losses, weights, where: str):
    l = np.asarray(losses, dtype=float)
    if l.ndim != 1 or l.size == 0:
        raise ValueError(f"{where}: losses must be a nonempty 1-D array, got shape {l.shape}")
    if not np.all(np.isfinite(l)):
        raise ValueError(f"{where}: losses must be finite")
    w = np.asarray(weights, dtype=float)
    if w.shape != l.shape:
        raise ValueError(f"{where}: weights must have shape {l.shape} like the losses, got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{where}: weights must be finite and nonnegative")
    if not abs(w.sum() - 1.0) <= 1e-9:
        raise ValueError(f"{where}: weights must sum to 1 (a probability vector), got sum {w.sum()!r}")
    return l, w / w.sum()


def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha (the CVaR level) must be a number in (0, 1], got {alpha!r}") from None
    if not (0.0 < a <= 1.0):
        raise ValueError(f"alpha (the CVaR level) must be in (0, 1], got {alpha!r}")
    return a


def _check_eps(eps, method: str) -> float:
    e = check_radius("eps", eps)
    if method == "rdpo" and not e < 0.5:
        raise ValueError(f"rdpo needs the flip rate eps in [0, 1/2), got {eps!r} (the loss divides by 1 - 2 eps)")
    if method == "cdpo" and not e <= 0.5:
        raise ValueError(f"cdpo needs the label-smoothing eps in [0, 1/2], got {eps!r}")
    return e


def _check_beta_prime(beta_prime) -> float:
    try:
        b = float(beta_prime)
    except (TypeError, ValueError):
        raise ValueError(f"beta_prime (the Dr.DPO temperature) must be a number > 0, got {beta_prime!r}") from None
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"beta_prime (the Dr.DPO temperature) must be a finite number > 0, got {beta_prime!r}")
    return b


def check_groups(groups, n: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Validate an integer group label per tuple; returns ``(labels (G,), index (n,) in 0..G-1)``."""
    if groups is None:
        raise ValueError("groupdpo needs groups: an integer array of shape (n,), one group label per pair")
    g = np.asarray(groups)
    if g.dtype.kind == "f":
        if not np.all(np.isfinite(g)) or np.any(g != np.round(g)):
            raise ValueError("groups must be integer labels (got non-integer floats)")
        g = g.astype(np.int64)
    if g.dtype.kind not in "biu":
        raise ValueError(f"groups must be an integer array, got dtype {g.dtype}")
    if g.shape != (n,):
        raise ValueError(f"groups must have shape ({n},) (one label per pair), got {g.shape}")
    labels, index = np.unique(g, return_inverse=True)
    return labels.astype(np.int64), index.reshape(-1).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Per-sample pieces on the log-linear class
# ----------------------------------------------------------------------------------------------


class _Model:
    """Per-sample quantities at ``theta`` (cached for the last ``theta``): margins ``t``, losses
    ``l = log(1 + e^{-t})``, ``a`` with ``grad l_i = a_i u_i`` and ``c`` with ``hess l_i = c_i u_i u_i^T``."""

    def __init__(self, data: PreferenceData, beta: float):
        self.data, self.beta = data, beta
        self.u = data.u
        self.w = data.weights
        self.tr = data.theta_ref
        self.d = data.d
        self._key = None

    def parts(self, theta):
        theta = np.asarray(theta, float)
        key = theta.tobytes()
        if key != self._key:
            t = self.beta * (self.u @ (theta - self.tr))
            e = np.exp(-np.abs(t))  # in (0, 1]: no overflow
            l = np.maximum(-t, 0.0) + np.log1p(e)  # stable log(1 + e^{-t})
            sm = np.where(t >= 0, e, 1.0) / (1.0 + e)  # sigma(-t)
            a = -self.beta * sm
            c = self.beta**2 * e / (1.0 + e) ** 2
            self._key, self._val = key, (t, l, a, c)
        return self._val

    def losses(self, theta):
        return self.parts(theta)[1]

    def grad(self, theta, q):
        """``sum_i q_i grad l_i`` (d,)."""
        _, _, a, _ = self.parts(theta)
        return self.u.T @ (q * a)


# ----------------------------------------------------------------------------------------------
# Inner worst cases at fixed losses
# ----------------------------------------------------------------------------------------------


def chi2_divergence(q: ArrayLike, w: ArrayLike) -> float:
    """``sum_i (q_i - w_i)^2 / w_i`` (``inf`` if ``q`` puts mass where ``w = 0``)."""
    q = np.asarray(q, float)
    w = np.asarray(w, float)
    pos = w > 0
    if np.any(q[~pos] != 0):
        return math.inf
    return float(np.sum((q[pos] - w[pos]) ** 2 / w[pos]))


@dataclass(frozen=True)
class Chi2Inner:
    """``sup {E_q l : q in simplex, chi2(q||w) <= rho}`` at fixed losses.

    value : the dual value ``eta* + sqrt(1+rho) ||(l - eta*)_+||_{2,w}`` (= ``E_q l`` to rounding).
    q : (n,) the worst case ``q_i = w_i (l_i - eta*)_+ / E_w (l - eta*)_+``.
    eta : the optimal ``eta*`` (``-inf`` at ``rho = 0``).
    lam : multiplier of the chi2 constraint, ``||(l - eta*)_+||_{2,w} / (2 sqrt(1+rho))``.
    chi2 : ``chi2(q||w)`` (``= rho`` when the constraint binds).
    active : False in the regime ``(1+rho) w(A) > 1`` where ``q`` = ``w`` on the top losses ``A``.
    """

    value: float
    q: NDArray[np.float64]
    eta: float
    lam: float
    chi2: float
    active: bool


def chi2_inner(losses: ArrayLike, weights: ArrayLike, rho: float) -> Chi2Inner:
    """Worst-case expected loss over the chi2 ball, exact by sorting (docs/theory_family.md, chi2).

    .. math:: \\sup_{q\\in\\Delta,\\ \\sum_i (q_i-w_i)^2/w_i \\le \\rho} q\\cdot\\ell
              = \\inf_\\eta\\ \\varphi(\\eta),\\quad
              \\varphi(\\eta) = \\eta + \\sqrt{1+\\rho}\\,\\sqrt{\\textstyle\\sum_i w_i(\\ell_i-\\eta)_+^2}.

    ``phi`` is convex and, on each interval between consecutive sorted losses, equals
    ``eta + c sqrt(P (V + (m - eta)^2))`` (``P, m, V``: weight, mean and variance of the losses above
    ``eta``, ``c^2 = 1 + rho``), minimised at ``eta = m - sqrt(V / (c^2 P - 1))`` when ``c^2 P > 1``.
    The minimiser of each piece, clipped to its interval, is a candidate; the best one is exact.

    Parameters
    ----------
    losses : (n,) finite. weights : (n,) probability vector. rho : radius >= 0.
    """
    rho = check_radius("rho", rho)
    l, w = _check_losses_weights(losses, weights, "chi2_inner")
    if rho == 0.0:
        return Chi2Inner(float(w @ l), w.copy(), -math.inf, math.inf, 0.0, True)
    c2 = 1.0 + rho
    c = math.sqrt(c2)
    supp = np.flatnonzero(w > 0)
    ls, ws = l[supp], w[supp]
    order = np.argsort(-ls, kind="stable")
    lsort, wsort = ls[order], ws[order]
    M = float(lsort[0])
    b = lsort - M  # <= 0: shift by the max
    ends = np.flatnonzero(np.r_[lsort[1:] != lsort[:-1], True])  # last index of each tie group
    P = np.cumsum(wsort)[ends]
    S1 = np.cumsum(wsort * b)[ends]
    S2 = np.cumsum(wsort * b * b)[ends]
    m = S1 / P
    V = np.maximum(S2 / P - m * m, 0.0)
    top = b[ends]  # upper end of each piece
    nxt = np.r_[b[ends[:-1] + 1], -np.inf]  # lower end
    den = c2 * P - 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = np.where(den > 0, m - np.sqrt(V / np.where(den > 0, den, 1.0)), -np.inf)
    eta = np.clip(eta, nxt, top)
    eta = np.where(np.isfinite(eta), eta, top)  # last piece: den = rho > 0 always; guard only
    phi = eta + c * np.sqrt(np.maximum(P * (V + (m - eta) ** 2), 0.0))
    j = int(np.argmin(phi))
    q = np.zeros_like(w)
    if j == 0 and den[0] >= 0:  # (1 + rho) w(A) >= 1: all the mass on the largest losses
        A = supp[lsort[0] == ls]
        q[A] = w[A] / w[A].sum()
        return Chi2Inner(M, q, M, 0.0, chi2_divergence(q, w), bool(den[0] == 0))
    # refine on the selected set S with two-pass moments (no cancellation)
    k = ends[j] + 1
    bs, wsS = b[:k], wsort[:k]
    PS = float(wsS.sum())
    mS = float(wsS @ bs) / PS
    VS = float(wsS @ (bs - mS) ** 2) / PS
    dS = c2 * PS - 1.0
    eta_s = mS - math.sqrt(VS / dS) if dS > 0 else float(nxt[j])
    eta_s = float(min(max(eta_s, nxt[j]), top[j]))
    e = np.maximum(b - eta_s, 0.0)
    N = math.sqrt(float(wsort @ (e * e)))
    value = M + eta_s + c * N
    se = float(wsort @ e)
    if se <= 0:  # cannot happen off the top regime; guard
        A = supp[lsort[0] == ls]
        q[A] = w[A] / w[A].sum()
        return Chi2Inner(M, q, M, 0.0, chi2_divergence(q, w), False)
    qs = wsort * e / se
    q[supp[order]] = qs
    return Chi2Inner(float(value), q, M + eta_s, N / (2.0 * c), chi2_divergence(q, w), True)


@dataclass(frozen=True)
class CVaRInner:
    """``CVaR_alpha`` of the losses under ``w``: value, worst case ``q`` (``q <= w/alpha``) and
    ``eta`` (the value at risk, the minimiser of ``eta + E_w (l - eta)_+ / alpha``)."""

    value: float
    q: NDArray[np.float64]
    eta: float


def cvar_inner(losses: ArrayLike, weights: ArrayLike, alpha: float) -> CVaRInner:
    """``sup {E_q l : q in simplex, q <= w / alpha} = inf_eta eta + E_w (l - eta)_+ / alpha`` (exact).

    The worst case fills the capacities ``w_i / alpha`` from the largest loss down until the mass
    is 1; ``eta`` is the loss where the mass runs out. ``alpha = 1`` gives the mean.
    """
    alpha = _check_alpha(alpha)
    l, w = _check_losses_weights(losses, weights, "cvar_inner")
    order = np.argsort(-l, kind="stable")
    cap = w[order] / alpha
    cum = np.cumsum(cap)
    k = int(np.searchsorted(cum, 1.0 - 1e-15))  # first index where the capacity reaches 1
    k = min(k, l.size - 1)
    qs = np.zeros_like(cap)
    qs[:k] = cap[:k]
    qs[k] = max(0.0, 1.0 - (cum[k - 1] if k > 0 else 0.0))
    q = np.zeros_like(w)
    q[order] = qs
    eta = float(l[order[k]])
    value = eta + float(w @ np.maximum(l - eta, 0.0)) / alpha
    return CVaRInner(float(value), q, eta)


@dataclass(frozen=True)
class GroupInner:
    """``max_g L_g`` with ``L_g = sum_{i in g} w_i l_i / w(g)``.

    value : the maximum. group_losses : (G,). group_weights : (G,) the worst case over groups
    (the indicator of the first maximising group). q : (n,) the per-pair distribution
    ``q_i = pi_{g(i)} w_i / w(g(i))``. worst : index of the worst group.
    """

    value: float
    group_losses: NDArray[np.float64]
    group_weights: NDArray[np.float64]
    q: NDArray[np.float64]
    worst: int


class _Groups:
    """Group bookkeeping: ``index`` (n,) in 0..G-1, ``mass`` (G,) = w(g), the (G, n) sparse averaging
    matrix ``A`` with ``(A l)_g = L_g``."""

    def __init__(self, groups, w):
        from scipy.sparse import csr_matrix

        self.labels, self.index = check_groups(groups, w.size)
        self.G = int(self.labels.size)
        self.mass = np.bincount(self.index, weights=w, minlength=self.G)
        if np.any(self.mass <= 0):
            bad = [int(g) for g in self.labels[self.mass <= 0]]
            raise ValueError(f"groups {bad} have zero total weight; every group needs a pair with weight > 0")
        n = w.size
        self.A = csr_matrix((w / self.mass[self.index], (self.index, np.arange(n))), shape=(self.G, n))

    def per_pair(self, pi):
        """Per-pair weights ``pi_{g(i)} w_i / w(g(i))`` of a distribution ``pi`` over groups."""
        return np.asarray(self.A.T @ np.asarray(pi, float)).reshape(-1)


def group_inner(losses: ArrayLike, weights: ArrayLike, groups) -> GroupInner:
    """The worst group's weighted mean loss (exact). ``groups``: (n,) integer labels."""
    l, w = _check_losses_weights(losses, weights, "group_inner")
    Gs = _Groups(groups, w)
    return _group_inner(l, Gs)


def _group_inner(l, Gs: _Groups) -> GroupInner:
    L = Gs.A @ l
    g = int(np.argmax(L))
    pi = np.zeros(Gs.G)
    pi[g] = 1.0
    return GroupInner(float(L[g]), L, pi, Gs.per_pair(pi), g)


# ----------------------------------------------------------------------------------------------
# Objectives at theta
# ----------------------------------------------------------------------------------------------


def _check_theta(theta, data):
    theta = np.asarray(theta, float)
    if theta.shape != (data.d,):
        raise ValueError(f"theta must have shape ({data.d},), got {theta.shape}")
    return theta


def chi2dpo_objective(theta, data: PreferenceData, beta: float, rho: float) -> float:
    """The chi2-robust DPO loss at ``theta`` (:func:`chi2_inner` of the DPO losses)."""
    return chi2_inner(_Model(data, beta).losses(_check_theta(theta, data)), data.weights, rho).value


def cvardpo_objective(theta, data: PreferenceData, beta: float, alpha: float) -> float:
    """``CVaR_alpha`` of the DPO losses at ``theta``."""
    return cvar_inner(_Model(data, beta).losses(_check_theta(theta, data)), data.weights, alpha).value


def groupdpo_objective(theta, data: PreferenceData, beta: float, groups) -> float:
    """The worst group's weighted mean DPO loss at ``theta``."""
    return group_inner(_Model(data, beta).losses(_check_theta(theta, data)), data.weights, groups).value


def rdpo_objective(theta, data: PreferenceData, beta: float, eps: float) -> float:
    """``E_w [(1-eps) l(t) - eps l(-t)] / (1-2eps)`` at ``theta`` (computed as ``E_w [l(t) - eps t/(1-2eps)]``,
    equal since ``l(-t) = l(t) + t``)."""
    eps = _check_eps(eps, "rdpo")
    t, l, _, _ = _Model(data, beta).parts(_check_theta(theta, data))
    return float(data.weights @ (l - eps / (1.0 - 2.0 * eps) * t))


def cdpo_objective(theta, data: PreferenceData, beta: float, eps: float) -> float:
    """``E_w [(1-eps) l(t) + eps l(-t)] = E_w [l(t) + eps t]`` at ``theta``."""
    eps = _check_eps(eps, "cdpo")
    t, l, _, _ = _Model(data, beta).parts(_check_theta(theta, data))
    return float(data.weights @ (l + eps * t))


def dr_dpo_objective(theta, data: PreferenceData, beta: float, beta_prime: float) -> float:
    """Dr.DPO ``-beta' log sum_i w_i exp(-l_i / beta')`` at ``theta`` (shifted by the smallest loss)."""
    bp = _check_beta_prime(beta_prime)
    l = _Model(data, beta).losses(_check_theta(theta, data))
    return _dr_value(l, data.weights, bp)[0]


def _dr_value(l, w, bp):
    supp = w > 0
    m = float(l[supp].min())
    e = w * np.exp(-np.maximum(l - m, 0.0) / bp)  # exponents <= 0 (zero-weight pairs below m: clipped)
    Z = float(e.sum())
    return m - bp * math.log(Z), e / Z


# ----------------------------------------------------------------------------------------------
# Collapse thresholds (docs/theory_family.md: each member's subgradient condition at theta_ref)
# ----------------------------------------------------------------------------------------------


def chi2_collapse_threshold(data: PreferenceData, return_q: bool = False):
    """``rho_c = min {chi2(q||w) : q in simplex, E_q u = 0}``: ``theta_ref`` (inside the ball) is a
    chi2dpo optimum iff ``rho >= rho_c`` (``inf`` when 0 is outside the hull of the ``u_i``).

    Solved through its concave dual ``max_{a, b} 1 + 2a - E_w (1 + a + b.u)_+^2`` (semismooth
    Newton); at the optimum ``q_i = w_i (1 + a + b.u_i)_+`` and ``rho_c = a``. Without the sign
    constraint the answer is ``mu^T Sigma^+ mu`` (``mu``, ``Sigma``: mean and covariance of ``u``),
    which is exact whenever ``1 - (u_i - mu).Sigma^+ mu >= 0`` for all ``i``.
    """
    from .kl import _zero_in_hull

    w = data.weights
    supp = w > 0
    u, ws = data.u[supp], w[supp]
    if float(np.abs(ws @ u).max()) == 0.0:
        out = (0.0, w.copy())
        return out if return_q else out[0]
    if not _zero_in_hull(u):
        return (math.inf, None) if return_q else math.inf
    U = np.hstack([np.ones((u.shape[0], 1)), u])

    def D(z):
        cz = np.maximum(1.0 + U @ z, 0.0)
        return 1.0 + 2.0 * z[0] - float(ws @ (cz * cz)), cz

    z = np.zeros(U.shape[1])
    f, cz = D(z)
    for _ in range(200):
        g = -2.0 * (U.T @ (ws * cz))
        g[0] += 2.0
        act = cz > 0
        H = 2.0 * (U[act] * ws[act, None]).T @ U[act]  # minus the generalised Hessian
        step = np.linalg.lstsq(H + 1e-15 * np.trace(H) * np.eye(H.shape[0]), g, rcond=None)[0]
        dec = float(g @ step)
        if dec <= 1e-28:
            break
        t = 1.0
        while t > 1e-14:
            fn, cn = D(z + t * step)
            if fn >= f + 1e-4 * t * dec:
                break
            t *= 0.5
        else:
            break
        z, f, cz = z + t * step, fn, cn
    q = np.zeros_like(w)
    q[supp] = ws * cz
    q /= q.sum()
    rho_c = max(0.0, chi2_divergence(q, w))
    return (rho_c, q) if return_q else rho_c


def cvar_collapse_threshold(data: PreferenceData, return_q: bool = False):
    """``alpha_c = max {alpha : some q in simplex with q <= w / alpha has E_q u = 0}``: ``theta_ref``
    (inside the ball) is a cvardpo optimum iff ``alpha <= alpha_c`` (``0`` when 0 is outside the hull
    of the ``u_i``; ``1`` iff ``E_w u = 0``).

    With ``z = alpha q`` this is one LP with box bounds and ``d`` equality rows (HiGHS; ~1.7 s at
    n = 2e4 on a loaded machine): ``alpha_c = max {sum_i z_i : 0 <= z_i <= w_i, sum_i z_i u_i = 0}``,
    ``q_c = z / sum z``. Its dual is ``min_b E_w (1 + b.u)_+``; the solver first screens with the
    minimum over one ray of ``b`` (``_cvar_collapse_upper``) and solves the LP only when needed.
    """
    from scipy.optimize import linprog

    w, u = data.weights, data.u
    res = linprog(-np.ones(data.n), A_eq=u.T, b_eq=np.zeros(data.d), bounds=np.column_stack([np.zeros_like(w), w]),
                  method="highs")
    if res.status != 0 or not -res.fun > 0:
        return (0.0, None) if return_q else 0.0
    z = np.clip(res.x, 0.0, w)
    alpha_c = float(min(1.0, z.sum()))
    q = z / z.sum()
    return (alpha_c, q) if return_q else alpha_c


def _chi2_collapse_lower(data: PreferenceData) -> float:
    """``mu^T Sigma^+ mu <= rho_c`` (the threshold without ``q >= 0``): a free screen before the LP."""
    w, u = data.weights, data.u
    mu = w @ u
    C = (u - mu).T @ ((u - mu) * w[:, None])
    return float(mu @ np.linalg.pinv(C, rcond=1e-12) @ mu) * (1.0 - 1e-9)


def _cvar_collapse_upper(data: PreferenceData) -> float:
    """An upper bound on ``alpha_c = min_b E_w (1 + b.u)_+``: the exact minimum over the ray
    ``b = -s Sigma^+ mu``, ``s >= 0`` (convex piecewise linear in ``s``, minimised at a breakpoint)."""
    w, u = data.weights, data.u
    mu = w @ u
    C = (u - mu).T @ ((u - mu) * w[:, None])
    v = u @ (np.linalg.pinv(C, rcond=1e-12) @ mu)  # E_w (1 - s v)_+
    pos = v > 0
    if not np.any(pos):
        return 1.0
    # breakpoints s_k = 1/v_k in increasing order (v decreasing); at s_k the pairs with s v_i < 1 are
    # those with v_i <= 0 and the positive v_j after k in that order: suffix sums, O(n log n)
    order = np.argsort(-v[pos])
    vp, wp = v[pos][order], w[pos][order]
    W0, V0 = float(w[~pos].sum()), float(w[~pos] @ v[~pos])
    Wsuf = np.r_[np.cumsum(wp[::-1])[::-1][1:], 0.0]
    Vsuf = np.r_[np.cumsum((wp * vp)[::-1])[::-1][1:], 0.0]
    vals = W0 + Wsuf - (1.0 / vp) * (V0 + Vsuf)
    return float(min(1.0, vals.min())) * (1.0 + 1e-9) + 1e-12


def group_collapse(data: PreferenceData, groups, return_weights: bool = False):
    """Whether ``theta_ref`` (inside the ball) is a groupdpo optimum: iff 0 is in the convex hull of
    the group means ``mu_g = E_{w|g} u`` (an LP over group weights ``pi``); no radius is involved.
    ``return_weights``: also the ``pi`` (G,) with ``sum_g pi_g mu_g = 0`` (``None`` when none)."""
    from .kl import _zero_in_hull
    from scipy.optimize import linprog

    Gs = _Groups(groups, data.weights)
    mu = Gs.A @ data.u  # (G, d)
    ok = _zero_in_hull(mu)
    pi = None
    if ok:
        G, d = mu.shape
        res = linprog(np.zeros(G), A_eq=np.vstack([mu.T, np.ones((1, G))]), b_eq=np.append(np.zeros(d), 1.0),
                      bounds=(0, None), method="highs")
        pi = np.maximum(res.x, 0.0) / np.maximum(res.x, 0.0).sum() if res.status == 0 else None
    return (ok, pi) if return_weights else ok


# ----------------------------------------------------------------------------------------------
# Certificates
# ----------------------------------------------------------------------------------------------


@dataclass
class _Cert:
    upper: float
    lower: float
    gap: float
    lam: float | None
    weights: NDArray[np.float64] | None
    info: dict = field(default_factory=dict)


def _feasible_chi2(q, w, rho):
    """Mix ``q`` toward ``w`` until ``chi2(q||w) <= rho`` (``chi2((1-t)q + t w) = (1-t)^2 chi2(q)``)."""
    q = np.where(w > 0, np.maximum(np.asarray(q, float), 0.0), 0.0)
    if q.sum() <= 0:
        return w.copy()
    q = q / q.sum()
    for _ in range(5):
        c = chi2_divergence(q, w)
        if c <= rho:
            return q
        t = 1.0 - math.sqrt(rho / c) * (1.0 - 1e-12)
        q = (1.0 - t) * q + t * w
    return w.copy()


def _feasible_cvar(q, w, alpha):
    """Mix ``q`` toward ``w`` until ``q <= w / alpha`` (``w`` itself is feasible)."""
    q = np.where(w > 0, np.maximum(np.asarray(q, float), 0.0), 0.0)
    if q.sum() <= 0:
        return w.copy()
    q = q / q.sum()
    cap = w / alpha
    over = q > cap
    if not np.any(over):
        return q
    t = float(np.max((q[over] - cap[over]) / (q[over] - w[over])))
    t = min(1.0, t * (1 + 1e-12) + 1e-15)
    q = (1.0 - t) * q + t * w
    return np.minimum(q, cap) if np.all(q <= cap * (1 + 1e-15)) else w.copy()


def _lower_from(data, beta, radius, theta, cands, feasible, upper=math.inf):
    """The best lower bound ``min_Theta E_q l >= ...`` over the candidates ``q`` (made feasible first),
    in order; stops once the gap to ``upper`` is below ``CERTIFIED_GAP`` (each bound may cost a
    Newton solve, and the first candidate is the one expected to be tight)."""
    best_lb, best_q = -math.inf, None
    for cand in cands:
        if cand is None:
            continue
        q = feasible(cand)
        lb = weighted_min_lower_bound(data, beta, radius, q, theta)
        if lb > best_lb:
            best_lb, best_q = lb, q
        if upper - best_lb <= CERTIFIED_GAP:
            break
    return best_lb, best_q


def _chi2_cert(theta, M: _Model, radius, rho, extra_q=()) -> _Cert:
    inner = chi2_inner(M.losses(theta), M.w, rho)
    lb, _ = _lower_from(M.data, M.beta, radius, theta, (inner.q, *extra_q),
                        lambda q: _feasible_chi2(q, M.w, rho), inner.value)
    lower = min(lb, inner.value)
    return _Cert(inner.value, lower, inner.value - lower, inner.lam, inner.q, {"eta": inner.eta})


def _cvar_cert(theta, M: _Model, radius, alpha, extra_q=()) -> _Cert:
    inner = cvar_inner(M.losses(theta), M.w, alpha)
    lb, _ = _lower_from(M.data, M.beta, radius, theta, (*extra_q, inner.q),
                        lambda q: _feasible_cvar(q, M.w, alpha), inner.value)
    lower = min(lb, inner.value)
    return _Cert(inner.value, lower, inner.value - lower, None, inner.q, {"eta": inner.eta})


def _group_cert(theta, M: _Model, radius, Gs: _Groups, extra_pi=()) -> _Cert:
    inner = _group_inner(M.losses(theta), Gs)
    best_lb, best_pi = -math.inf, inner.group_weights
    for pi in (*extra_pi, inner.group_weights):
        if pi is None:
            continue
        pi = np.maximum(np.asarray(pi, float), 0.0)
        if pi.sum() <= 0:
            continue
        pi = pi / pi.sum()
        lb = weighted_min_lower_bound(M.data, M.beta, radius, Gs.per_pair(pi), theta)
        if lb > best_lb:
            best_lb, best_pi = lb, pi
        if inner.value - best_lb <= CERTIFIED_GAP:
            break
    lower = min(best_lb, inner.value)
    info = {"n_groups": Gs.G, "worst_group": int(Gs.labels[inner.worst]),
            "group_weights": [float(p) for p in best_pi], "group_losses": [float(v) for v in inner.group_losses]}
    return _Cert(inner.value, lower, inner.value - lower, None, Gs.per_pair(best_pi), info)


def _result(method, theta, cert: _Cert, solver, seconds, info, collapsed=False, status=None) -> SolverResult:
    return SolverResult(
        method=method, theta=theta, objective=float(cert.upper), lower_bound=float(cert.lower),
        duality_gap=float(cert.gap), lam=None if cert.lam is None else float(cert.lam), weights=cert.weights,
        status=status or status_from_gap(cert.gap), solver=solver, seconds=seconds, collapsed=collapsed,
        info={**cert.info, **info},
    )


def _mark_collapse(r: SolverResult, collapsed: bool, **info) -> SolverResult:
    """The cone program's answer with ``collapsed`` set from the member's threshold (as the native
    path reports it; the cone program itself returns a point within its tolerance of ``theta_ref``)."""
    return SolverResult(**{**r.__dict__, "collapsed": bool(collapsed), "info": {**r.info, **info}})


def _dpo_as(method, data, beta, radius, solver, message, lam=None) -> SolverResult:
    """A member that reduces to DPO at this radius: relabel the DPO result."""
    from .dpo import solve_dpo_cvxpy, solve_dpo_native

    r = solve_dpo_native(data, beta, radius) if solver == "native" else solve_dpo_cvxpy(data, beta, radius)
    info = dict(r.info)
    info["message"] = message
    return SolverResult(method=method, theta=r.theta, objective=r.objective, lower_bound=r.lower_bound,
                        duality_gap=r.duality_gap, lam=lam, weights=data.weights.copy(), status=r.status,
                        solver=r.solver, seconds=r.seconds, info=info)


def _ref_interior(data, radius) -> bool:
    return float(np.linalg.norm(data.theta_ref)) < radius * (1.0 - 1e-12)


def _dpo_start(M: _Model, radius):
    """The DPO solution (a warm start only)."""
    def fun(t):
        return float(M.w @ M.losses(t))

    def gh(t):
        _, _, a, c = M.parts(t)
        return M.u.T @ (M.w * a), (M.u * (M.w * c)[:, None]).T @ M.u

    return newton_ball(fun, gh, M.tr.copy(), M.d, radius, max_iter=50, tol=1e-14).v


def _newton_reset(fun, grad_hess, reset, v0, d, radius, max_iter=100, tol=1e-20):
    """Newton with the exact ball constraint on ``v = (theta, xi)``; after each accepted step the
    extra block ``xi`` is reset to its exact minimiser ``reset(theta)`` (can only lower ``fun``), so the
    ``theta`` part is Newton's method on the reduced function (as ``kl._newton_kldpo``).
    Returns ``(v, iterations, converged, message)``."""
    v = np.asarray(v0, float).copy()
    f = fun(v)
    for it in range(1, max_iter + 1):
        try:
            g, H = grad_hess(v)
        except FloatingPointError as exc:
            return v, it, False, f"derivatives undefined ({exc})"
        step, _ = _subproblem(H, g, v, d, radius)
        dec = -float(g @ step)
        if not np.isfinite(dec):
            return v, it, False, "non-finite Newton step"
        if dec <= tol:
            return v, it, True, "Newton decrement below tol"
        t = 1.0
        while True:
            vn = v + t * step
            nt = np.linalg.norm(vn[:d])
            if nt > radius:
                vn[:d] *= radius / nt
            fn = fun(vn)
            if np.isfinite(fn) and fn <= f - 1e-4 * t * dec:
                break
            t *= 0.5
            if t < 1e-16:
                return v, it, dec < 1e-9, f"line search stalled (decrement {dec:.3g})"
        if fn >= f and dec < 1e-12:
            return vn, it, True, f"no representable decrease (decrement {dec:.3g})"
        vn[d:] = reset(vn[:d])
        v, f = vn, min(fn, fun(vn))
    return v, max_iter, False, "max_iter reached"


# ----------------------------------------------------------------------------------------------
# The cvxpy paths
# ----------------------------------------------------------------------------------------------


def _cvxpy_certified(method, data, radius, build, certify, tm, info):
    """Solve the conic program ``build()`` -> ``(problem, theta_var, dual_candidates_fn)`` with each
    of ``CONIC_ATTEMPTS`` in turn, certifying every answer in numpy with ``certify(theta, extra)``;
    stops at the first certified one and returns the best (``_common.solve_cvxpy_certified``)."""
    prob, theta, duals = build()

    def evaluate():
        if theta.value is None:
            return None
        th = _project_ball(theta.value, radius)
        return certify(th, duals()), th

    state, status, tried = solve_cvxpy_certified(prob, evaluate)
    info.update(cvxpy_status=status, attempts="; ".join(tried))
    if "cert" not in state:
        info["message"] = "no solver returned a solution"
        return SolverResult(method, data.theta_ref.copy(), math.nan, math.nan, math.inf, None, None, FAILED,
                            "cvxpy", tm.elapsed, info=info)
    cert = state["cert"]
    info["message"] = ("certified" if cert.gap <= CERTIFIED_GAP else
                       f"not certified: best gap {cert.gap:.3g} (attempts: {'; '.join(tried)})")
    status = status_from_gap(cert.gap) if cert.gap <= CERTIFIED_GAP else INACCURATE
    return _result(method, state["theta"], cert, f"cvxpy-{state['solver']}", tm.elapsed, info, status=status)


def _conic_losses(cp, data, beta):
    """Variables ``theta`` (d,), ``s`` (n,) and the constraint ``s_i >= l_i(theta)`` (exp cone)."""
    theta = cp.Variable(data.d)
    s = cp.Variable(data.n)
    u = data.u
    loss_con = s >= cp.logistic(-beta * (u @ theta) + beta * (u @ data.theta_ref))
    return theta, s, loss_con


def _dual_q(loss_con, n):
    if loss_con.dual_value is None:
        return []
    q = np.maximum(np.asarray(loss_con.dual_value, float).reshape(-1), 0.0)
    return [q / q.sum()] if q.size == n and q.sum() > 0 else []


# ----------------------------------------------------------------------------------------------
# chi2dpo
# ----------------------------------------------------------------------------------------------


class _Chi2Joint:
    """``G(theta, eta) = eta + c sqrt(sum_i w_i (l_i(theta) - eta)_+^2)``, ``c = sqrt(1 + rho)``:
    jointly convex and ``C^1`` (docs/theory_family.md); its Hessian below is exact off the kinks
    ``l_i = eta`` (semismooth Newton)."""

    def __init__(self, M: _Model, rho: float):
        self.M, self.rho, self.c = M, rho, math.sqrt(1.0 + rho)
        self.d = M.d

    def fun(self, v):
        e = np.maximum(self.M.losses(v[: self.d]) - v[self.d], 0.0)
        return float(v[self.d] + self.c * math.sqrt(float(self.M.w @ (e * e))))

    def reset(self, theta):
        return np.array([chi2_inner(self.M.losses(theta), self.M.w, self.rho).eta])

    def grad_hess(self, v):
        d, M, c = self.d, self.M, self.c
        _, l, a, cc = M.parts(v[:d])
        e = np.maximum(l - v[d], 0.0)
        N = math.sqrt(float(M.w @ (e * e)))
        if not N > 0:
            raise FloatingPointError("all losses <= eta (the top regime)")
        act = e > 0
        we = M.w * act
        q = c * M.w * e / N
        u = M.u
        gbar = u.T @ (q * a)
        Q = float(q.sum())
        g = np.append(gbar, 1.0 - Q)
        H = np.empty((d + 1, d + 1))
        k = c / N
        H[:d, :d] = (u * (k * we * a * a + q * cc)[:, None]).T @ u - np.outer(gbar, gbar) / (c * N)
        H[:d, d] = H[d, :d] = -k * (u.T @ (we * a)) + gbar * Q / (c * N)
        H[d, d] = k * float(we.sum()) - Q * Q / (c * N)
        return g, H


@single_blas_thread
def solve_chi2dpo(data: PreferenceData, beta: float, radius: float, rho: float, solver: str = "native",
                  max_iter: int = 100) -> SolverResult:
    """chi2dpo ``min_{||theta|| <= B} sup {E_q l : chi2(q||w) <= rho}`` (docs/theory_family.md, chi2).

    Native: (1) ``rho = 0``: DPO. (2) ``theta_ref`` inside the ball and ``rho >= rho_c``
    (:func:`chi2_collapse_threshold`): ``theta_ref``, certified by the minimal-chi2 ``q_c`` with
    ``E_{q_c} u = 0``. (3) ``rho >= 1/max w - 1``: the worst case may sit on the largest losses alone
    (``G`` nonsmooth at the optimum): the cone program. (4) Newton on ``(theta, eta)`` with ``eta``
    reset to :func:`chi2_inner`'s ``eta*`` after each step, from the DPO solution; the cone program
    if the certificate does not close. ``lam``: the chi2 multiplier; ``weights``: ``q*``;
    ``info['eta']``: ``eta*``.
    """
    check_common(data, beta, radius)
    rho = check_radius("rho", rho)
    if solver not in ("native", "cvxpy"):
        raise ValueError(f"unknown solver {solver!r}; expected 'native' or 'cvxpy'")
    if rho == 0.0:
        return _dpo_as("chi2dpo", data, beta, radius, solver, "rho = 0: chi2dpo is DPO", lam=math.inf)
    if solver == "cvxpy":
        r = _chi2dpo_cvxpy(data, beta, radius, rho)
        if not (_ref_interior(data, radius) and rho >= _chi2_collapse_lower(data)):
            return r
        rho_c = chi2_collapse_threshold(data)
        return _mark_collapse(r, rho >= rho_c, rho_c=rho_c)
    M = _Model(data, beta)
    with Timer() as tm:
        info = {}
        if _ref_interior(data, radius) and rho >= _chi2_collapse_lower(data):
            rho_c, q_c = chi2_collapse_threshold(data, return_q=True)
            info["rho_c"] = rho_c
            if rho >= rho_c:
                theta = data.theta_ref.copy()
                cert = _chi2_cert(theta, M, radius, rho, extra_q=(q_c,))
                if cert.gap <= CERTIFIED_GAP:
                    info.update(path="collapse", iterations=0,
                                message=f"rho = {rho:.6g} >= rho_c = {rho_c:.6g}: theta_ref is optimal")
                    return _result("chi2dpo", theta, cert, "native-collapse", tm.elapsed, info, collapsed=True)
        msg = ""
        if rho < 1.0 / float(data.weights.max()) - 1.0:
            J = _Chi2Joint(M, rho)
            th0 = _dpo_start(M, radius)
            v0 = np.append(th0, J.reset(th0))
            try:
                v, iters, _, message = _newton_reset(J.fun, J.grad_hess, J.reset, v0, data.d, radius, max_iter)
            except FloatingPointError as exc:
                v, iters, message = v0, 0, str(exc)
            theta = _project_ball(v[: data.d], radius)
            cert = _chi2_cert(theta, M, radius, rho)
            info.update(iterations=iters, path="newton", message=message)
            if cert.gap <= CERTIFIED_GAP:
                return _result("chi2dpo", theta, cert, "native-newton", tm.elapsed, info)
            msg = f"Newton not certified (gap {cert.gap:.3g}, {message}); "
        else:
            msg = "rho >= 1/max w - 1: the worst case may sit on the largest losses alone; "
        r = _chi2dpo_cvxpy(data, beta, radius, rho)
        info.update(r.info)
        info["path"] = "cvxpy fallback"
        info["message"] = msg + "solved by the cone program. " + str(r.info.get("message", ""))
        return SolverResult(**{**r.__dict__, "info": info, "seconds": tm.elapsed})


def _chi2dpo_cvxpy(data, beta, radius, rho) -> SolverResult:
    """``min eta + sqrt(1+rho) ||sqrt(w) * e||_2`` s.t. ``e >= s - eta``, ``e >= 0``, ``s >= l(theta)``,
    ``||theta|| <= B`` (second-order and exponential cones); the multipliers of ``s >= l`` are a
    candidate ``q`` for the certificate."""
    import cvxpy as cp

    M = _Model(data, beta)
    with Timer() as tm:
        def build():
            theta, s, loss_con = _conic_losses(cp, data, beta)
            eta = cp.Variable()
            e = cp.Variable(data.n, nonneg=True)
            obj = eta + math.sqrt(1.0 + rho) * cp.norm(cp.multiply(np.sqrt(data.weights), e), 2)
            prob = cp.Problem(cp.Minimize(obj), [loss_con, e >= s - eta, cp.norm(theta, 2) <= radius])
            return prob, theta, lambda: _dual_q(loss_con, data.n)

        return _cvxpy_certified("chi2dpo", data, radius, build,
                                lambda th, extra: _chi2_cert(th, M, radius, rho, extra_q=extra), tm, {})


# ----------------------------------------------------------------------------------------------
# Entropic smoothing with continuation (cvardpo, groupdpo)
# ----------------------------------------------------------------------------------------------

#: temperatures of the continuation, from coarse to fine; the certificate is checked from 1e-5 on.
TAU_SCHEDULE = tuple(10.0 ** -k for k in range(1, 13))
#: the continuation stops once the certified gap is below this (tighter than ``CERTIFIED_GAP`` so that
#: ``theta`` is accurate too: on these nonsmooth problems a gap of 1e-8 still leaves ~1e-4 in theta).
SMOOTHING_TARGET_GAP = 1e-11


class _CVaRSmooth:
    """``G_tau(theta, eta) = eta + (tau/alpha) sum_i w_i softplus((l_i - eta)/tau)`` >= the CVaR
    dual, jointly convex and smooth; ``G_tau - CVaR <= tau log 2 / alpha``."""

    def __init__(self, M: _Model, alpha: float, tau: float):
        self.M, self.alpha, self.tau, self.d = M, alpha, tau, M.d

    def fun(self, v):
        l = self.M.losses(v[: self.d])
        z = (l - v[self.d]) / self.tau
        return float(v[self.d] + self.tau / self.alpha * float(self.M.w @ np.logaddexp(0.0, z)))

    def q(self, theta, eta):
        from scipy.special import expit

        return self.M.w * expit((self.M.losses(theta) - eta) / self.tau) / self.alpha

    def reset(self, theta):
        """``eta*_tau(theta)``: the root of ``f(eta) = sum_i w_i sigma((l_i - eta)/tau) - alpha`` (decreasing).

        A bracket of width ``~100 tau`` around the previous root (widened 4x until ``f`` changes
        sign), then Brent's method on the pairs within ``40 tau`` of the bracket only: outside it
        ``sigma`` is 0 or 1 to 4e-18, so those pairs enter as a constant (one pass over the data per
        reset instead of one per evaluation).
        """
        from scipy.optimize import brentq
        from scipy.special import expit

        l, w, a, tau = self.M.losses(theta), self.M.w, self.alpha, self.tau

        def f_full(eta):
            return float(w @ expit((l - eta) / tau)) - a

        g_lo = float(l.min()) - tau * 45.0  # f > 0 there for every alpha < 1 (sigma(45) > 1 - 1e-19)
        g_hi = float(l.max()) + tau * (math.log(1.0 / a) + 45.0)  # f < 0 there
        eta0 = getattr(self, "_eta", None)
        if eta0 is None or not g_lo < eta0 < g_hi:
            eta0 = float(cvar_inner(l, w, a).eta)
        width = 50.0 * tau
        while True:
            lo, hi = max(g_lo, eta0 - width), min(g_hi, eta0 + width)
            if (lo == g_lo or f_full(lo) > 0) and (hi == g_hi or f_full(hi) < 0):
                break
            width *= 4.0
        win = (l > lo - 40.0 * tau) & (l < hi + 40.0 * tau)
        lw, ww = l[win], w[win]
        const = float(w[l >= hi + 40.0 * tau].sum()) - a

        def f(eta):
            return float(ww @ expit((lw - eta) / tau)) + const

        flo, fhi = f(lo), f(hi)
        if flo <= 0:
            eta = lo
        elif fhi >= 0:
            eta = hi
        else:
            eta = brentq(f, lo, hi, xtol=1e-300, rtol=1e-15, maxiter=500)
        self._eta = eta
        return np.array([eta])

    def grad_hess(self, v):
        from scipy.special import expit

        d, M = self.d, self.M
        _, l, a, cc = M.parts(v[:d])
        z = (l - v[d]) / self.tau
        s = expit(z)
        k = s * expit(-z) / self.tau
        wa = M.w / self.alpha
        u = M.u
        g = np.append(u.T @ (wa * s * a), 1.0 - float(wa @ s))
        H = np.empty((d + 1, d + 1))
        H[:d, :d] = (u * (wa * (s * cc + k * a * a))[:, None]).T @ u
        H[:d, d] = H[d, :d] = -(u.T @ (wa * k * a))
        H[d, d] = float(wa @ k)
        return g, H


class _GroupSmooth:
    """``G_tau(theta) = tau log sum_g (1/G) exp(L_g(theta)/tau)``: smooth, convex,
    ``max_g L_g - tau log G <= G_tau <= max_g L_g``."""

    def __init__(self, M: _Model, Gs: _Groups, tau: float):
        self.M, self.Gs, self.tau, self.d = M, Gs, tau, M.d

    def pi(self, theta):
        L = self.Gs.A @ self.M.losses(theta)
        e = np.exp((L - L.max()) / self.tau)
        return e / e.sum(), L

    def fun(self, theta):
        L = self.Gs.A @ self.M.losses(theta)
        Lm = float(L.max())
        return Lm + self.tau * math.log(float(np.mean(np.exp((L - Lm) / self.tau))))

    def grad_hess(self, theta):
        _, l, a, cc = self.M.parts(theta)
        pi, _ = self.pi(theta)
        u = self.M.u
        gL = np.asarray(self.Gs.A @ (u * a[:, None]))  # (G, d): grad L_g
        gbar = pi @ gL
        wq = self.Gs.per_pair(pi)
        H = (u * (wq * cc)[:, None]).T @ u + ((gL * pi[:, None]).T @ gL - np.outer(gbar, gbar)) / self.tau
        return gbar, H


# ----------------------------------------------------------------------------------------------
# cvardpo
# ----------------------------------------------------------------------------------------------


def _best_stage(best, certify, stage):
    """Certify one continuation stage ``(cheap_gap, theta, tau, q)`` and keep the better of it and ``best``
    (``(cert, theta, tau)``). The cheap gap ``U - E_q l(theta)`` is a lower bound on the stage's
    certified gap (``min_Theta E_q l <= E_q l(theta)``), so stages are certified only when it is small."""
    _, theta, tau, q = stage
    cert = certify(theta, q)
    if best is None or cert.gap < best[0].gap:
        return cert, theta, tau
    return best



def _finish_smoothing(method, stages, certify, run, info, tm, cone) -> SolverResult:
    """Certify the continuation stages of a smoothed native solver and return its result.

    ``stages`` yields ``(cheap_gap, theta, tau, q)`` for the stages with ``tau <= 1e-5``; a stage is
    certified (``certify(theta, q)``) only when its cheap gap, a lower bound on the certified one, is
    below ``SMOOTHING_TARGET_GAP``, and the loop stops at the first stage certified that tightly;
    otherwise the stage with the smallest cheap gap is certified. ``run`` holds the Newton
    ``iterations`` and last ``message`` the stages accumulated; ``cone()`` solves the cone program
    when no stage certifies to ``CERTIFIED_GAP``.
    """
    best, seen = None, []
    for stage in stages:
        seen.append(stage)
        if stage[0] <= SMOOTHING_TARGET_GAP:  # gap >= cheap gap: certify only then
            best = _best_stage(best, certify, stage)
            if best[0].gap <= SMOOTHING_TARGET_GAP:
                break
    if best is None or best[0].gap > CERTIFIED_GAP:
        best = _best_stage(best, certify, min(seen, key=lambda st: st[0]))
    cert, theta, tau = best
    info.update(iterations=run["iterations"], path="smoothing", tau=tau, message=run["message"])
    if cert.gap <= CERTIFIED_GAP:
        return _result(method, theta, cert, "native-smoothing-newton", tm.elapsed, info)
    r = cone()
    info.update(r.info)
    info["path"] = "cvxpy fallback"
    info["message"] = (f"smoothing not certified (gap {cert.gap:.3g}); solved by the cone program. "
                       + str(r.info.get("message", "")))
    return SolverResult(**{**r.__dict__, "info": info, "seconds": tm.elapsed})


@single_blas_thread
def solve_cvardpo(data: PreferenceData, beta: float, radius: float, alpha: float, solver: str = "native",
                  max_iter: int = 60) -> SolverResult:
    """cvardpo ``min_{||theta|| <= B} CVaR_alpha(l(theta))`` (docs/theory_family.md, CVaR).

    Native: (1) ``alpha = 1``: DPO. (2) ``theta_ref`` inside the ball and ``alpha <= alpha_c``
    (:func:`cvar_collapse_threshold`): ``theta_ref``, certified by the LP's ``q_c``. (3) Newton on the
    smoothed dual ``G_tau(theta, eta)`` (``eta`` reset to its exact minimiser) for ``tau`` = 1e-1,
    1e-2, ... from the DPO solution, each stage warm-started at the last; from ``tau = 1e-5`` on, a
    stage whose cheap gap ``CVaR(theta) - E_q l(theta)`` (a lower bound on its certified gap) is below
    ``SMOOTHING_TARGET_GAP`` is certified with the smoothed worst case
    ``q_i = w_i sigma((l_i - eta)/tau)/alpha`` (made exactly feasible) and returned; else the stage with
    the smallest cheap gap is certified; the cone program if that is not <= 1e-7.
    ``weights``: the exact worst case at ``theta``; ``info['eta']``: the value at risk.
    """
    check_common(data, beta, radius)
    alpha = _check_alpha(alpha)
    if solver not in ("native", "cvxpy"):
        raise ValueError(f"unknown solver {solver!r}; expected 'native' or 'cvxpy'")
    if alpha == 1.0:
        return _dpo_as("cvardpo", data, beta, radius, solver, "alpha = 1: CVaR is the mean, cvardpo is DPO")
    if solver == "cvxpy":
        r = _cvardpo_cvxpy(data, beta, radius, alpha)
        if not (_ref_interior(data, radius) and alpha <= _cvar_collapse_upper(data)):
            return r
        alpha_c = cvar_collapse_threshold(data)
        return _mark_collapse(r, alpha <= alpha_c, alpha_c=alpha_c)
    M = _Model(data, beta)
    with Timer() as tm:
        info = {}
        if _ref_interior(data, radius) and alpha <= _cvar_collapse_upper(data):
            alpha_c, q_c = cvar_collapse_threshold(data, return_q=True)
            info["alpha_c"] = alpha_c
            if alpha <= alpha_c and q_c is not None:
                theta = data.theta_ref.copy()
                cert = _cvar_cert(theta, M, radius, alpha, extra_q=(q_c,))
                if cert.gap <= CERTIFIED_GAP:
                    info.update(path="collapse", iterations=0,
                                message=f"alpha = {alpha:.6g} <= alpha_c = {alpha_c:.6g}: theta_ref is optimal")
                    return _result("cvardpo", theta, cert, "native-collapse", tm.elapsed, info, collapsed=True)
        run = {"iterations": 0, "message": ""}

        def stages():
            theta = _dpo_start(M, radius)
            for tau in TAU_SCHEDULE:
                S = _CVaRSmooth(M, alpha, tau)
                v0 = np.append(theta, S.reset(theta))
                v, iters, _, run["message"] = _newton_reset(S.fun, S.grad_hess, S.reset, v0, data.d, radius, max_iter)
                run["iterations"] += iters
                theta = _project_ball(v[: data.d], radius)
                if tau > 1e-5:
                    continue
                q_tau = _feasible_cvar(S.q(theta, v[-1]), M.w, alpha)
                l = M.losses(theta)
                yield cvar_inner(l, M.w, alpha).value - float(q_tau @ l), theta, tau, q_tau  # U - E_q l(theta)

        return _finish_smoothing(
            "cvardpo", stages(), lambda th, q: _cvar_cert(th, M, radius, alpha, extra_q=(q,)), run, info, tm,
            lambda: _cvardpo_cvxpy(data, beta, radius, alpha),
        )


def _cvardpo_cvxpy(data, beta, radius, alpha) -> SolverResult:
    """``min eta + (1/alpha) w.e`` s.t. ``e >= s - eta``, ``e >= 0``, ``s >= l(theta)``, ``||theta|| <= B``."""
    import cvxpy as cp

    M = _Model(data, beta)
    with Timer() as tm:
        def build():
            theta, s, loss_con = _conic_losses(cp, data, beta)
            eta = cp.Variable()
            e = cp.Variable(data.n, nonneg=True)
            prob = cp.Problem(cp.Minimize(eta + (data.weights / alpha) @ e),
                              [loss_con, e >= s - eta, cp.norm(theta, 2) <= radius])
            return prob, theta, lambda: _dual_q(loss_con, data.n)

        return _cvxpy_certified("cvardpo", data, radius, build,
                                lambda th, extra: _cvar_cert(th, M, radius, alpha, extra_q=extra), tm, {})


# ----------------------------------------------------------------------------------------------
# groupdpo
# ----------------------------------------------------------------------------------------------


@single_blas_thread
def solve_groupdpo(data: PreferenceData, beta: float, radius: float, groups, solver: str = "native",
                   max_iter: int = 60) -> SolverResult:
    """groupdpo ``min_{||theta|| <= B} max_g L_g(theta)`` (docs/theory_family.md, group).

    Native: (1) one group: weighted DPO. (2) ``theta_ref`` inside the ball and 0 in the hull of the
    group means of ``u`` (:func:`group_collapse`): ``theta_ref``. (3) Newton on the log-sum-exp
    smoothing ``tau log mean_g exp(L_g / tau)`` for ``tau`` = 1e-1, 1e-2, ...; from ``tau = 1e-5`` on
    stages are certified with the softmax group weights ``pi`` as for :func:`solve_cvardpo` (cheap gap
    ``max_g L_g - pi.L``); the cone program if no stage certifies.
    ``weights``: the per-pair worst case ``pi_{g(i)} w_i / w(g(i))``; ``info``: ``group_weights``
    (``pi``, (G,)), ``group_losses``, ``worst_group``, ``n_groups``.
    """
    check_common(data, beta, radius)
    if solver not in ("native", "cvxpy"):
        raise ValueError(f"unknown solver {solver!r}; expected 'native' or 'cvxpy'")
    Gs = _Groups(groups, data.weights)
    if Gs.G == 1:
        r = _dpo_as("groupdpo", data, beta, radius, solver, "one group: groupdpo is (weighted) DPO")
        r.info.update(n_groups=1, worst_group=int(Gs.labels[0]), group_weights=[1.0])
        return r
    if solver == "cvxpy":
        r = _groupdpo_cvxpy(data, beta, radius, Gs)
        if not _ref_interior(data, radius):
            return r
        ok = group_collapse(data, groups)
        return _mark_collapse(r, ok, ref_in_hull=bool(ok))
    M = _Model(data, beta)
    with Timer() as tm:
        info = {}
        if _ref_interior(data, radius):
            ok, pi_c = group_collapse(data, groups, return_weights=True)
            info["ref_in_hull"] = bool(ok)
            if ok and pi_c is not None:
                theta = data.theta_ref.copy()
                cert = _group_cert(theta, M, radius, Gs, extra_pi=(pi_c,))
                if cert.gap <= CERTIFIED_GAP:
                    info.update(path="collapse", iterations=0,
                                message="0 is in the hull of the group means of u: theta_ref is optimal")
                    return _result("groupdpo", theta, cert, "native-collapse", tm.elapsed, info, collapsed=True)
        run = {"iterations": 0, "message": ""}

        def stages():
            theta = _dpo_start(M, radius)
            for tau in TAU_SCHEDULE:
                S = _GroupSmooth(M, Gs, tau)
                res = newton_ball(S.fun, S.grad_hess, theta, data.d, radius, max_iter=max_iter)
                run["iterations"] += res.iterations
                theta, run["message"] = _project_ball(res.v, radius), res.message
                if tau > 1e-5:
                    continue
                pi, L = S.pi(theta)
                yield float(L.max() - pi @ L), theta, tau, pi  # max L - pi.L

        return _finish_smoothing(
            "groupdpo", stages(), lambda th, p: _group_cert(th, M, radius, Gs, extra_pi=(p,)), run, info, tm,
            lambda: _groupdpo_cvxpy(data, beta, radius, Gs),
        )


def _groupdpo_cvxpy(data, beta, radius, Gs: _Groups) -> SolverResult:
    """``min t`` s.t. ``t >= A s`` (the group means), ``s >= l(theta)``, ``||theta|| <= B``; the
    multipliers of ``t >= A s`` are a candidate group distribution for the certificate."""
    import cvxpy as cp

    M = _Model(data, beta)
    with Timer() as tm:
        def build():
            theta, s, loss_con = _conic_losses(cp, data, beta)
            t = cp.Variable()
            gcon = Gs.A @ s <= t
            prob = cp.Problem(cp.Minimize(t), [loss_con, gcon, cp.norm(theta, 2) <= radius])

            def duals():
                if gcon.dual_value is None:
                    return []
                return [np.maximum(np.asarray(gcon.dual_value, float).reshape(-1), 0.0)]

            return prob, theta, duals

        return _cvxpy_certified("groupdpo", data, radius, build,
                                lambda th, extra: _group_cert(th, M, radius, Gs, extra_pi=extra), tm, {})


# ----------------------------------------------------------------------------------------------
# rdpo and cdpo: DPO plus a linear term in the margins
# ----------------------------------------------------------------------------------------------


class _Tilted:
    """``F(theta) = sum_i w_i [l(t_i) + k t_i]``: rdpo (``k = -eps/(1-2eps)``) and cdpo (``k = eps``).
    Same Hessian as DPO (the extra term is linear), so DPO's curvature floor holds."""

    def __init__(self, M: _Model, k: float):
        self.M, self.k = M, k

    def fun(self, theta):
        t, l, _, _ = self.M.parts(theta)
        return float(self.M.w @ (l + self.k * t))

    def grad_hess(self, theta):
        M = self.M
        _, _, a, c = M.parts(theta)
        g = M.u.T @ (M.w * (a + self.k * M.beta))
        H = (M.u * (M.w * c)[:, None]).T @ M.u
        return g, H


def _tilted_cert(theta, T: _Tilted, radius, mu) -> _Cert:
    """Lower bound ``F(s) - ball_fw_gap(grad F(s), s, B, mu)`` at ``s = theta`` and, when that is
    looser than 1e-8, at the Newton solution from ``theta``."""
    f = T.fun(theta)
    g, _ = T.grad_hess(theta)
    lb = f - ball_fw_gap(g, theta, radius, mu)
    if f - lb > 1e-8:
        res = newton_ball(T.fun, T.grad_hess, theta, T.M.d, radius, max_iter=100)
        g2, _ = T.grad_hess(res.v)
        lb = max(lb, T.fun(res.v) - ball_fw_gap(g2, res.v, radius, mu))
    lower = min(lb, f)
    return _Cert(f, lower, f - lower, None, None, {})


def _solve_tilted(method, data, beta, radius, eps, solver, max_iter=200) -> SolverResult:
    check_common(data, beta, radius)
    eps = _check_eps(eps, method)
    if solver not in ("native", "cvxpy"):
        raise ValueError(f"unknown solver {solver!r}; expected 'native' or 'cvxpy'")
    if eps == 0.0:
        r = _dpo_as(method, data, beta, radius, solver, f"eps = 0: {method} is DPO")
        return SolverResult(**{**r.__dict__, "weights": None})
    k = -eps / (1.0 - 2.0 * eps) if method == "rdpo" else eps
    M = _Model(data, beta)
    T = _Tilted(M, k)
    mu = curvature_floor(data, beta, radius)
    collapsed = method == "cdpo" and eps >= CDPO_COLLAPSE_EPS
    info = {"k": k}
    with Timer() as tm:
        if solver == "native":
            res = newton_ball(T.fun, T.grad_hess, data.theta_ref.copy(), data.d, radius, max_iter=max_iter)
            theta = _project_ball(res.v, radius)
            cert = _tilted_cert(theta, T, radius, mu)
            info.update(iterations=res.iterations, message=res.message)
            return _result(method, theta, cert, "native-newton", tm.elapsed, info, collapsed=collapsed)
        import cvxpy as cp

        theta = cp.Variable(data.d)
        u = data.u
        t = beta * (u @ theta) - beta * (u @ data.theta_ref)
        prob = cp.Problem(cp.Minimize(data.weights @ cp.logistic(-t) + k * (data.weights @ t)),
                          [cp.norm(theta, 2) <= radius])
        try:
            name, status, tried = solve_cvxpy(prob)
        except SolverError as exc:
            return SolverResult(method, data.theta_ref.copy(), math.nan, math.nan, math.inf, None, None, FAILED,
                                "cvxpy", tm.elapsed, info={"message": str(exc)})
        th = _project_ball(np.asarray(theta.value, float), radius)
        cert = _tilted_cert(th, T, radius, mu)
        info.update(cvxpy_status=status, attempts="; ".join(tried))
    return _result(method, th, cert, f"cvxpy-{name}", tm.seconds, info, collapsed=collapsed)


@single_blas_thread
def solve_rdpo(data: PreferenceData, beta: float, radius: float, eps: float, solver: str = "native") -> SolverResult:
    """rdpo (Chowdhury et al. 2024, known flip rate ``eps`` in [0, 1/2)):
    ``min_{||theta|| <= B} E_w [(1-eps) l(t) - eps l(-t)] / (1-2eps) = E_w [l(t) - eps t / (1-2eps)]``.
    Convex (DPO plus a linear term); Newton with the exact ball constraint (native) or one
    exponential-cone program; certified by the quadratic minorant on the ball. No worst case
    (``weights = None``)."""
    return _solve_tilted("rdpo", data, beta, radius, eps, solver)


@single_blas_thread
def solve_cdpo(data: PreferenceData, beta: float, radius: float, eps: float, solver: str = "native") -> SolverResult:
    """cdpo (label smoothing ``eps`` in [0, 1/2]): ``min_{||theta|| <= B} E_w [(1-eps) l(t) + eps l(-t)]
    = E_w [l(t) + eps t]``. At ``eps = 1/2`` the loss is even in ``t`` and ``theta_ref`` is optimal
    (``collapsed``). Solved and certified as :func:`solve_rdpo`."""
    return _solve_tilted("cdpo", data, beta, radius, eps, solver)


# ----------------------------------------------------------------------------------------------
# dr_dpo (non-convex: local)
# ----------------------------------------------------------------------------------------------


@single_blas_thread
def solve_dr_dpo(data: PreferenceData, beta: float, radius: float, beta_prime: float, solver: str = "native",
                 max_iter: int = 200) -> SolverResult:
    """Dr.DPO (Wu et al. 2024) ``min_{||theta|| <= B} -beta' log sum_i w_i exp(-l_i(theta)/beta')``.

    Not convex (a soft minimum of convex losses), so no certificate of global optimality exists
    here: modified Newton (the Hessian ``sum_i pi_i hess l_i - Cov_pi(grad l)/beta'``,
    ``pi ∝ w e^{-l/beta'}``, shifted to be positive definite) with the exact ball constraint, from the
    DPO solution. ``status`` is ``"local"`` when the ball-stationarity measure
    ``g.theta + B||g||`` (0 exactly at a KKT point) is <= 1e-8, else ``"inaccurate"``; never
    ``"optimal"``. ``lower_bound`` and ``duality_gap`` are NaN; ``weights`` is None (Dr.DPO down-weights,
    it has no worst case); ``info``: ``pair_weights`` (the softmin weights ``pi``, (n,)),
    ``stationarity``, ``min_hessian_eig`` (of the true Hessian at the answer).
    """
    check_common(data, beta, radius)
    bp = _check_beta_prime(beta_prime)
    if solver != "native":
        raise ValueError("dr_dpo is not convex: it has no cvxpy path; use solver='native' (a local solver)")
    M = _Model(data, beta)
    w = data.weights

    def fun(theta):
        return _dr_value(M.losses(theta), w, bp)[0]

    def true_grad_hess(theta):
        _, l, a, c = M.parts(theta)
        _, pi = _dr_value(l, w, bp)
        u = M.u
        g = u.T @ (pi * a)
        H = (u * (pi * (c - a * a / bp))[:, None]).T @ u + np.outer(g, g) / bp
        return g, H

    def modified(theta):
        g, H = true_grad_hess(theta)
        ev = np.linalg.eigvalsh(H)
        floor = 1e-10 * max(1.0, float(np.abs(ev).max()))
        if ev[0] < floor:
            H = H + (floor - ev[0]) * np.eye(H.shape[0])
        return g, H

    with Timer() as tm:
        th0 = _dpo_start(M, radius)
        res = newton_ball(fun, modified, th0, data.d, radius, max_iter=max_iter)
        theta = _project_ball(res.v, radius)
        g, H = true_grad_hess(theta)
        stat = float(g @ theta + radius * np.linalg.norm(g))
        value, pi = _dr_value(M.losses(theta), w, bp)
    info = {"iterations": res.iterations, "message": res.message, "stationarity": max(stat, 0.0),
            "min_hessian_eig": float(np.linalg.eigvalsh(H)[0]), "beta_prime": bp}
    status = LOCAL if stat <= STATIONARY_TOL else INACCURATE
    info["pair_weights"] = pi  # the softmin reweighting, not a worst case: kept out of ``weights``
    return SolverResult(method="dr_dpo", theta=theta, objective=float(value), lower_bound=math.nan,
                        duality_gap=math.nan, lam=None, weights=None, status=status, solver="native-local-newton",
                        seconds=tm.seconds, info=info)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def solve_family(method: str, data: PreferenceData, beta: float, radius: float, *, rho=None, alpha=None,
                 eps=None, groups=None, beta_prime=None, solver: str = "native") -> SolverResult:
    """One family member by name; raises ``ValueError`` (one line) for a missing or misplaced parameter."""
    need = {"chi2dpo": "rho", "cvardpo": "alpha", "groupdpo": "groups", "rdpo": "eps", "cdpo": "eps",
            "dr_dpo": "beta_prime"}
    if method not in need:
        raise ValueError(f"unknown family method {method!r}; expected one of {FAMILY_METHODS}")
    given = {"rho": rho, "alpha": alpha, "eps": eps, "groups": groups, "beta_prime": beta_prime}
    if given[need[method]] is None:
        raise ValueError(f"{method} needs {need[method]}")
    extra = [k for k, v in given.items() if v is not None and k != need[method]]
    if extra:
        raise ValueError(f"{', '.join(extra)} does not apply to {method} (it takes {need[method]})")
    if method == "chi2dpo":
        return solve_chi2dpo(data, beta, radius, rho, solver=solver)
    if method == "cvardpo":
        return solve_cvardpo(data, beta, radius, alpha, solver=solver)
    if method == "groupdpo":
        return solve_groupdpo(data, beta, radius, groups, solver=solver)
    if method == "rdpo":
        return solve_rdpo(data, beta, radius, eps, solver=solver)
    if method == "cdpo":
        return solve_cdpo(data, beta, radius, eps, solver=solver)
    return solve_dr_dpo(data, beta, radius, beta_prime, solver=solver)
