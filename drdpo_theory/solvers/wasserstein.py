"""Wasserstein distributionally robust DPO (WDPO) on the log-linear class: exact solvers.

docs/theory.md section 3.2 (WDPO) and docs/theory_wasserstein.md (every derivation used here).
The robust objective at ``theta`` is

.. math:: L_W(\\theta; P) = \\sup_{Q:\\ W_p(Q, P) \\le \\varepsilon} E_Q\\, \\ell(z; \\theta),

with ``P = sum_i w_i delta_{(x_i, y_i)}`` and the transport cost (the project's choice, explicit in
every API below)

.. math:: c\\bigl((x, y), (x', y')\\bigr) = \\|x - x'\\|_2 + \\kappa\\,[y \\ne y'],
          \\qquad \\kappa \\in [0, \\infty]

(``kappa = inf``: labels never flip). ``W_p`` uses the cost ``c^p``; the ball is
``W_p(Q, P) <= eps``, i.e. a transport budget ``E_pi c^p <= eps^p``.

Two adversaries are solved exactly:

* **continuous support**, ``p = 1``: ``x`` may move anywhere in R^d. With the margin
  ``t_i = ytil_i beta (theta - theta_ref).x_i`` (the flip gain: ``l(x_i, 1-y_i) = l_i + t_i``) and
  ``lam0 = beta ||theta - theta_ref||`` (the Lipschitz constant of ``l`` in ``x``),

  .. math:: L_W(\\theta) = \\min_{\\lambda \\ge \\lambda_0}\\ \\lambda\\varepsilon
            + \\sum_i w_i \\bigl[\\ell_i + (t_i - \\lambda\\kappa)_+\\bigr]

  (Shafieezadeh-Abadeh, Mohajerin Esfahani, Kuhn 2015); ``kappa = inf`` gives
  ``sum_i w_i l_i + eps beta ||theta - theta_ref||``;
* **finite support** ``z_1..z_m`` (:class:`FiniteSupport`), ``p`` in {1, 2}: an LP over transport
  plans whose dual is one-dimensional,

  .. math:: L_W(\\theta) = \\min_{\\lambda \\ge 0}\\ \\lambda\\varepsilon^p
            + \\sum_j q_j \\max_k \\bigl[\\ell(z_k; \\theta) - \\lambda c(z_j, z_k)^p\\bigr].

Certificates: ``objective`` is the exact robust value at the returned ``theta``;
``lower_bound`` comes from a feasible adversary (flip fractions / transport plan, from the
solver's dual variables or the exact inner problem) through the convex minorant
``theta' -> E_{Q} l(theta')`` and ``_common.ball_fw_gap``: see docs/theory_wasserstein.md, section 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray
from scipy import sparse

from ..data import PreferenceData
from ..losses import dpo_grad, dpo_loss, signed_labels
from ._common import (
    logistic_loss_and_sigma,
    single_blas_thread,
    Timer,
    ball_fw_gap,
    weighted_min_lower_bound,
    check_common,
    check_radius,
    curvature_floor,
    solve_cvxpy,
    weighted_grad,
    weighted_grad_hess,
    weighted_loss,
)
from ._newton import newton_ball
from .result import CERTIFIED_GAP, FAILED, SolverError, SolverResult, status_from_gap
from .worst_case import from_flip_fractions, from_tuple_weights

__all__ = [
    "FiniteSupport",
    "WInner",
    "WInnerFinite",
    "transport_cost",
    "w1_collapse_threshold",
    "wdpo_inner_continuous",
    "wdpo_inner_finite",
    "wdpo_objective",
    "wdpo_gradient",
    "solve_wdpo_continuous_native",
    "solve_wdpo_continuous_cvxpy",
    "solve_wdpo_finite",
    "solve_wdpo",
]

#: Cutting planes stop when no constraint of the full finite-support dual is violated by more than this.
CUT_TOL = 1e-8


# ----------------------------------------------------------------------------------------------
# validation and the transport cost
# ----------------------------------------------------------------------------------------------


def _check_p(p) -> int:
    if p not in (1, 2) or isinstance(p, bool):
        raise ValueError(f"p must be 1 or 2 (the order of the Wasserstein distance W_p), got {p!r}")
    return int(p)


def _check_eps_kappa(eps, kappa) -> tuple[float, float]:
    eps = check_radius("eps", eps)
    if math.isinf(eps):
        raise ValueError("eps must be finite")
    kappa = check_radius("kappa", kappa)
    return eps, kappa


def transport_cost(x1, y1, x2, y2, kappa: float = math.inf, p: int = 1) -> NDArray[np.float64]:
    """Pairwise transport cost ``c^p`` with ``c = ||x - x'||_2 + kappa [y != y']``.

    Parameters
    ----------
    x1 : (a, d), y1 : (a,), x2 : (b, d), y2 : (b,).
    kappa : label-flip cost, >= 0 or ``inf`` (then label changes cost ``inf``).
    p : 1 or 2.

    Returns
    -------
    (a, b) array of ``c((x1_j, y1_j), (x2_k, y2_k))^p`` (``inf`` where labels differ and kappa is inf).
    """
    p = _check_p(p)
    kappa = check_radius("kappa", kappa)
    x1 = np.asarray(x1, float)
    x2 = np.asarray(x2, float)
    # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b can cancel badly; the direct difference is exact enough
    # and blocks keep memory at a*b*d floats per block.
    out = np.empty((x1.shape[0], x2.shape[0]))
    step = max(1, int(2**22 // max(1, x2.shape[0] * x2.shape[1])))
    for a in range(0, x1.shape[0], step):
        diff = x1[a : a + step, None, :] - x2[None, :, :]  # (blk, b, d)
        out[a : a + step] = np.sqrt(np.einsum("jkd,jkd->jk", diff, diff))
    flip = np.asarray(y1)[:, None] != np.asarray(y2)[None, :]
    if math.isinf(kappa):
        out[flip] = np.inf
    else:
        out[flip] += kappa
    return out**p if p == 2 else out


def w1_collapse_threshold(data: PreferenceData) -> float:
    """``eps_c = ||sum_i w_i ytil_i x_i||_2 / 2``: the W1 (continuous support) collapse radius.

    For ``kappa = inf`` (and, identically, any ``kappa >= max_i ||x_i||``, see
    docs/theory_wasserstein.md section 2) and ``theta_ref`` strictly inside the ball, the robust
    optimum is ``theta_ref`` iff ``eps >= eps_c``: the gradient of the mean loss at ``theta_ref`` is
    ``-(beta/2) sum_i w_i ytil_i x_i`` (``sigma(0) = 1/2``) and the subdifferential of
    ``eps beta ||theta - theta_ref||`` there is the ball of radius ``eps beta``.
    For smaller finite ``kappa`` the collapse radius is at most ``eps_c``.
    """
    return float(np.linalg.norm((data.weights * signed_labels(data.y)) @ data.x)) / 2.0


# ----------------------------------------------------------------------------------------------
# continuous support, p = 1: the inner supremum
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WInner:
    """Exact inner supremum of W1-WDPO with continuous support at a fixed ``theta``.

    Attributes
    ----------
    value : ``sup_{W_1(Q, P) <= eps} E_Q l`` (exact).
    lam : optimal dual variable ``lam*`` of the transport budget (>= ``lam0``).
    lam0 : ``beta ||theta - theta_ref||``, the Lipschitz constant of ``l`` in ``x``.
    flip_fraction : (n,) ``alpha_i``: the worst case moves mass ``w_i alpha_i`` of tuple ``i`` to
        ``(x_i, 1 - y_i)`` (cost ``kappa`` per unit).
    far_budget : ``nu = eps - kappa sum_i w_i alpha_i >= 0``: the rest of the budget, which the
        adversary spends moving a vanishing mass ever farther along ``-ytil_i (theta - theta_ref)``;
        its gain tends to ``lam0 * nu``.
    attained : False when the supremum is only reached in that limit (``nu > 0`` and ``lam0 > 0``).
    mean_loss : ``sum_i w_i l_i`` (the nominal value).
    kappa, eps : the cost parameters used.
    """

    value: float
    lam: float
    lam0: float
    flip_fraction: NDArray[np.float64]
    far_budget: float
    attained: bool
    mean_loss: float
    kappa: float
    eps: float

    @property
    def description(self) -> str:
        """A one-line description of the worst case."""
        flipped = float(np.sum(self.flip_fraction > 0))
        s = f"flips {flipped:.0f} tuple(s) (cost kappa={self.kappa:g} each)"
        if self.far_budget > 0 and self.lam0 > 0:
            s += (f"; budget {self.far_budget:.4g} moves vanishing mass to infinity along "
                  f"-ytil (theta - theta_ref) (supremum not attained)")
        return s


def _margins_losses(theta, x, y, beta, theta_ref):
    """``t = ytil beta (theta - theta_ref).x`` and ``l = log(1 + exp(-t))``, both (n,)."""
    a = np.asarray(theta, float) - theta_ref
    t = signed_labels(y) * (beta * (np.asarray(x, float) @ a))
    return t, logistic_loss_and_sigma(t, sigma=False)[0]


def _flip_threshold(t, w, cap: float) -> float:
    """``t_(k)``: the margins sorted in decreasing order (ties by index), ``k`` the first position whose
    cumulative weight exceeds ``cap``; ``-inf`` when the total weight does not.

    Only the largest margins are sorted (``np.argpartition``, then a stable sort of those), more of
    them while their weight does not exceed ``cap``: O(n) instead of a full O(n log n) sort, with the
    same partial sums in the same order as the full sort.
    """
    n = len(t)
    if not (cap < math.inf) or n == 0:
        return -math.inf
    wmax = float(w.max())
    # at least cap / max(w) margins are needed; start with 4x that (uniform weights: enough)
    K = n if wmax <= 0 else int(min(n, 4.0 * cap / wmax + 256))
    while True:
        if K >= n:
            top = np.arange(n)
        else:
            top = np.sort(np.argpartition(-t, K - 1)[:K])
        order = top[np.argsort(-t[top], kind="stable")]
        cum = np.cumsum(w[order])
        k = int(np.searchsorted(cum, cap, side="right"))  # first position with cum > cap
        if k < len(order):
            return float(t[order[k]])
        if K >= n:
            return -math.inf
        K = min(n, 4 * K)


def wdpo_inner_continuous(theta, data: PreferenceData, beta: float, eps: float, kappa: float = math.inf) -> WInner:
    """Exact ``sup_{W_1(Q, P_data) <= eps} E_Q l(z; theta)`` over distributions on R^d x {0, 1}.

    Cost ``c = ||x - x'||_2 + kappa [y != y']``. By strong duality (docs/theory_wasserstein.md,
    section 1), with ``t_i = ytil_i beta (theta - theta_ref).x_i`` and ``lam0 = beta ||theta - theta_ref||``,

    .. math:: \\sup = \\min_{\\lambda \\ge \\lambda_0} g(\\lambda),\\quad
              g(\\lambda) = \\lambda\\varepsilon + \\sum_i w_i\\bigl[\\ell_i + (t_i - \\lambda\\kappa)_+\\bigr],

    piecewise linear and convex in ``lam`` with breakpoints ``t_i / kappa``; its minimiser is found
    exactly by sorting the margins. The supremum is attained only when the budget is spent on label
    flips (or ``theta = theta_ref``); otherwise the remainder moves vanishing mass to infinity along
    ``-ytil_i (theta - theta_ref)`` and the value is a limit (see :class:`WInner`).

    Parameters
    ----------
    theta : (d,). data : n weighted tuples. beta > 0. eps >= 0 (radius). kappa >= 0 or inf.
    """
    eps, kappa = _check_eps_kappa(eps, kappa)
    theta = np.asarray(theta, float)
    w = data.weights
    t, l = _margins_losses(theta, data.x, data.y, beta, data.theta_ref)
    mean_loss = float(w @ l)
    lam0 = beta * float(np.linalg.norm(theta - data.theta_ref))
    alpha = np.zeros(data.n)
    if math.isinf(kappa):
        return WInner(mean_loss + eps * lam0, lam0, lam0, alpha, eps, eps == 0 or lam0 == 0, mean_loss, kappa, eps)
    # g'(lam) = eps - kappa * W(lam kappa), W(tau) = sum_{t_i > tau} w_i (non-increasing in tau):
    # the optimal tau = lam kappa is the smallest tau >= lam0 kappa with kappa W(tau) <= eps.
    cap = math.inf if kappa == 0 else eps / kappa  # flip mass the budget can pay for
    # W(t_(k)) <= cum[k-1] <= cap; W(tau) > cap below t_(k) (t sorted decreasingly, k first with cum > cap)
    tau_star = _flip_threshold(t, w, cap)
    tau0 = lam0 * kappa
    if kappa > 0 and tau_star > tau0:
        tau, lam = float(tau_star), float(tau_star) / kappa
    else:
        tau, lam = tau0, lam0
    strict = t > tau
    alpha[strict] = 1.0
    value = lam * eps + mean_loss + float(w @ np.maximum(t - tau, 0.0))
    used = float(w[strict].sum())
    if lam > lam0:
        # complementary slackness: the budget is used by flips; the ties t_i = tau share the rest
        # (flipping a tie gains exactly its cost lam*kappa, so any split is optimal; this one is feasible).
        rem = cap - used
        for i in np.flatnonzero(t == tau):
            if rem <= 0:
                break
            frac = min(1.0, rem / w[i]) if w[i] > 0 else 0.0
            alpha[i] = frac
            rem -= frac * w[i]
    far = max(0.0, eps - kappa * float(w @ alpha))
    attained = far == 0 or lam0 == 0
    return WInner(value, lam, lam0, alpha, far, attained, mean_loss, kappa, eps)


def _continuous_subgradient(theta, data, beta, inner: WInner) -> NDArray[np.float64]:
    """A subgradient of the continuous W1 robust objective (Danskin at the worst case; section 3 of the doc).

    ``g = sum_i w_i [grad l_i + alpha_i beta ytil_i x_i] + nu beta (theta - theta_ref)/||.||``; at
    ``theta = theta_ref`` the last term is ``nu beta v``, ``||v|| <= 1``, chosen to minimise ``||g||``.
    """
    w = data.weights
    g0 = w @ dpo_grad(theta, data.x, data.y, beta, data.theta_ref) + beta * ((w * inner.flip_fraction) @ data.u)
    return _add_norm_term(g0, np.asarray(theta, float) - data.theta_ref, beta * inner.far_budget)


def _add_norm_term(g0, a, c):
    """``g0 + c a/||a||`` (``a != 0``) or the least-norm element of ``g0 + c * unit ball`` (``a = 0``)."""
    r = float(np.linalg.norm(a))
    if r > 0:
        return g0 + c * a / r
    ng = float(np.linalg.norm(g0))
    if ng == 0 or c >= ng:
        return np.zeros_like(g0)
    return g0 * (1.0 - c / ng)


# ----------------------------------------------------------------------------------------------
# finite support: the support, the inner LP and its exact 1-D dual
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FiniteSupport:
    """Points ``z_1..z_m`` the finite-support adversary may move mass to.

    Attributes
    ----------
    x : (m, d) feature differences. y : (m,) labels in {0, 1}. Tuples must be distinct.
    """

    x: NDArray[np.float64]
    y: NDArray[np.int64]

    def __post_init__(self) -> None:
        x = np.asarray(self.x, float)
        y = np.asarray(self.y)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"support x must have shape (m >= 1, d), got {x.shape}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"support y must have shape ({x.shape[0]},), got {y.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("support x contains NaN or inf")
        if np.any((y != 0) & (y != 1)):
            raise ValueError("support labels y must be 0 or 1")
        y = y.astype(np.int64)
        key = np.concatenate([x, y[:, None].astype(float)], axis=1)
        if np.unique(key, axis=0).shape[0] != x.shape[0]:
            raise ValueError("support tuples must be distinct (merge duplicates first)")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    @property
    def m(self) -> int:
        """Number of support points."""
        return int(self.x.shape[0])

    @property
    def d(self) -> int:
        return int(self.x.shape[1])

    @classmethod
    def from_data(cls, data: PreferenceData, flips: bool = True) -> "FiniteSupport":
        """The distinct data tuples, plus each one's label flip ``(x_i, 1 - y_i)`` when ``flips``."""
        x, y = data.x, data.y
        if flips:
            x = np.concatenate([x, x])
            y = np.concatenate([y, 1 - y])
        key = np.concatenate([x, y[:, None].astype(float)], axis=1)
        uniq = np.unique(key, axis=0)
        return cls(uniq[:, :-1], uniq[:, -1].astype(np.int64))

    @classmethod
    def from_nominal(cls, nominal, flips: bool = False) -> "FiniteSupport":
        """The support of a :class:`~drdpo_theory.model.NominalDistribution` (plus label flips if asked)."""
        return cls.from_data(PreferenceData(nominal.x, nominal.y, nominal.p, nominal.theta_ref), flips=flips)

    def index_of(self, x, y) -> NDArray[np.int64]:
        """Support index of each tuple ``(x_i, y_i)``, (n,); ``ValueError`` if one is not in the support."""
        x = np.asarray(x, float)
        y = np.asarray(y)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"x must have shape (n, {self.d}), got {x.shape}")
        keys = np.concatenate(
            [np.concatenate([self.x, self.y[:, None].astype(float)], axis=1),
             np.concatenate([x, y[:, None].astype(float)], axis=1)]
        )
        _, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        group_to_support = np.full(inv.max() + 1, -1, dtype=np.int64)
        group_to_support[inv[: self.m]] = np.arange(self.m)
        idx = group_to_support[inv[self.m :]]
        if np.any(idx < 0):
            i = int(np.flatnonzero(idx < 0)[0])
            raise ValueError(f"data tuple {i} (x={x[i]}, y={y[i]}) is not a support point")
        return idx

    def histogram(self, data: PreferenceData) -> NDArray[np.float64]:
        """``q`` (m,): the data weights summed on the support points."""
        return np.bincount(self.index_of(data.x, data.y), weights=data.weights, minlength=self.m)

    def flip_index(self) -> NDArray[np.int64]:
        """(m,) index of ``(x_j, 1 - y_j)`` in the support, or -1."""
        keys = {(self.x[j].tobytes(), int(self.y[j])): j for j in range(self.m)}
        return np.array([keys.get((self.x[j].tobytes(), 1 - int(self.y[j])), -1) for j in range(self.m)], np.int64)

    def cost(self, rows, p: int, kappa: float) -> NDArray[np.float64]:
        """``c(z_j, z_k)^p`` for ``j`` in ``rows``, all ``k``: (len(rows), m)."""
        rows = np.asarray(rows, dtype=np.int64)
        return transport_cost(self.x[rows], self.y[rows], self.x, self.y, kappa, p)


@dataclass(frozen=True)
class WInnerFinite:
    """Exact inner supremum of finite-support WDPO at a fixed ``theta``.

    Attributes
    ----------
    value : ``min_{lam >= 0} lam eps^p + sum_j q_j max_k (l_k - lam c_jk^p)`` (the exact dual value).
    primal_value : ``sum_jk plan_jk l_k`` of the returned plan (equals ``value`` up to rounding).
    lam : optimal dual variable of the budget ``sum plan * c^p <= eps^p``.
    plan : (m, m) ``scipy.sparse.csr_array``, the worst-case transport plan: row ``j`` carries
        ``q_j``; every row goes to one target except at most one row split between two.
    weights : (m,) worst-case distribution on the support (column sums of ``plan``).
    q : (m,) the data histogram on the support.
    budget : ``sum plan * c^p`` (<= ``eps^p``; equal when ``lam > 0``).
    losses : (m,) ``l(z_k; theta)``.
    support : the support.
    iterations : evaluations of the 1-D dual.
    """

    value: float
    primal_value: float
    lam: float
    plan: sparse.csr_array
    weights: NDArray[np.float64]
    q: NDArray[np.float64]
    budget: float
    losses: NDArray[np.float64]
    support: FiniteSupport
    iterations: int


class _CostRows:
    """Costs ``C`` (|J|, m) of the data rows ``J`` to every support point, with each row's sort order.

    The order does not depend on ``theta``, so it is computed once per solve.
    """

    def __init__(self, C):
        self.C = C
        self.order = np.argsort(C, axis=1, kind="stable")  # (|J|, m): inf (forbidden) moves last
        self.C_sorted = np.take_along_axis(C, self.order, axis=1)


class _RowEnvelope:
    """``sum_j q_j max_k (l_k - lam C_jk)`` for fixed losses ``l``, on each row's Pareto candidates.

    A column ``k`` can be a row maximiser for some ``lam >= 0`` only if no column has a larger loss
    at a cost no larger (docs/theory_wasserstein.md, section 4): in the row's cost order these are
    the running-maximum records of ``l``. They are gathered into padded (|J|, K) arrays (K = the
    largest record count, typically ~ log m), so each evaluation costs O(|J| K).
    Evaluation returns the value and both one-sided slopes in ``lam`` (exact, with a tie tolerance
    of ``1e-12 (1 + |max|)`` per row so that floating-point breakpoints are recognised).
    """

    def __init__(self, losses, q_rows, rows_cost: _CostRows):
        self.q = q_rows
        Ls = losses[rows_cost.order]  # (|J|, m) losses in each row's cost order
        Ls[~np.isfinite(rows_cost.C_sorted)] = -np.inf
        prev = np.maximum.accumulate(Ls, axis=1)
        rec = np.empty_like(Ls, dtype=bool)
        rec[:, 0] = True  # the cheapest column (cost 0: the row's own point)
        rec[:, 1:] = Ls[:, 1:] > prev[:, :-1]  # strictly better loss than every cheaper column
        counts = rec.sum(axis=1)
        K = int(counts.max())
        jj, cc = np.nonzero(rec)
        pos = np.cumsum(rec, axis=1)[jj, cc] - 1  # rank of each record within its row
        self.k = np.zeros((len(q_rows), K), dtype=np.int64)  # support index of candidate
        self.L = np.full((len(q_rows), K), -np.inf)  # padding never wins
        self.C = np.zeros((len(q_rows), K))
        self.k[jj, pos] = rows_cost.order[jj, cc]
        self.L[jj, pos] = Ls[jj, cc]
        self.C[jj, pos] = rows_cost.C_sorted[jj, cc]

    def rows_at(self, lam):
        M = self.L - lam * self.C  # (|J|, K)
        mx = M.max(axis=1)
        tie = M >= (mx - 1e-12 * (1.0 + np.abs(mx)))[:, None]
        cmin = np.where(tie, self.C, np.inf).min(axis=1)
        cmax = np.where(tie, self.C, -np.inf).max(axis=1)
        r = np.arange(self.C.shape[0])
        kmin = self.k[r, np.argmax(tie & (self.C == cmin[:, None]), axis=1)]
        kmax = self.k[r, np.argmax(tie & (self.C == cmax[:, None]), axis=1)]
        return mx, cmin, cmax, kmin, kmax

    def evaluate(self, lam, e):
        M = self.L - lam * self.C
        mx = M.max(axis=1)
        tie = M >= (mx - 1e-12 * (1.0 + np.abs(mx)))[:, None]
        cmin = np.where(tie, self.C, np.inf).min(axis=1)
        cmax = np.where(tie, self.C, -np.inf).max(axis=1)
        return lam * e + float(self.q @ mx), e - float(self.q @ cmin), e - float(self.q @ cmax)

    def lam_upper(self):
        """A ``lam`` beyond which every row's max is at a zero-cost column (slope = e)."""
        ok = np.isfinite(self.L)
        z = np.where(ok & (self.C == 0), self.L, -np.inf).max(axis=1)  # the row's own point has cost 0
        pos = ok & (self.C > 0)
        with np.errstate(invalid="ignore"):
            ratio = np.where(pos, (self.L - z[:, None]) / np.where(pos, self.C, 1.0), -np.inf)
        return max(0.0, float(ratio.max())) if ratio.size else 0.0

    def violations(self, lam, s):
        """``max(l_k - lam C_jk) - s_j`` per row and the top candidates: (V (|J|, K), k (|J|, K))."""
        return self.L - lam * self.C - s[:, None], self.k


def _solve_pl_dual(env: _RowEnvelope, e: float, max_iter: int = 500):
    """Minimise the convex piecewise-linear ``g(lam) = lam e + env(lam)`` on ``lam >= 0`` exactly.

    Newton's method for piecewise-linear functions: keep a point ``lo`` with right slope < 0 and a
    point ``hi`` with left slope > 0, jump to the intersection of their supporting lines, and stop
    when the new point has ``left slope <= 0 <= right slope`` or lies on both lines (then it is the
    breakpoint between them). Each step discovers a new linear piece, so it terminates.
    Returns ``(lam, value, evaluations)``.
    """
    stol = 1e-13 * (1.0 + abs(e) + float(env.q @ env.C.max(axis=1)) if env.C.size else 1.0)
    v0, _, s0 = env.evaluate(0.0, e)
    if s0 >= -stol:
        return 0.0, v0, 1
    lh = env.lam_upper()
    vh, sh, _ = env.evaluate(lh, e)
    if sh <= stol:
        return lh, vh, 2
    l0 = 0.0
    best = (l0, v0) if v0 <= vh else (lh, vh)
    for it in range(3, max_iter + 3):
        lam = (vh - v0 + s0 * l0 - sh * lh) / (s0 - sh)
        lam = min(max(lam, l0), lh)
        v, sL, sR = env.evaluate(lam, e)
        if v < best[1]:
            best = (lam, v)
        line = v0 + s0 * (lam - l0)
        if (sL <= stol and sR >= -stol) or v <= line + 1e-13 * (1.0 + abs(line)):
            return lam, v, it
        if sR < 0:
            l0, v0, s0 = lam, v, sR
        else:
            lh, vh, sh = lam, v, sL
        if lh - l0 <= 1e-15 * (1.0 + lh):
            break
    return best[0], best[1], max_iter


def _finite_setup(data, kappa, support):
    """The support (default: the data's distinct tuples, plus label flips when kappa is finite),
    the data histogram ``q`` on it and the rows with mass."""
    if support is None:
        support = FiniteSupport.from_data(data, flips=not math.isinf(kappa))
    if support.d != data.d:
        raise ValueError(f"support has d={support.d} but data has d={data.d}")
    q = support.histogram(data)
    rows = np.flatnonzero(q > 0)
    return support, q, rows


def _inner_finite_core(losses, q, rows, rows_cost: _CostRows, e, support):
    """Solve the 1-D dual and build the worst-case plan (docs/theory_wasserstein.md, section 4)."""
    env = _RowEnvelope(losses, q[rows], rows_cost)
    lam, value, its = _solve_pl_dual(env, e)
    _, cmin, cmax, kmin, kmax = env.rows_at(lam)
    qr = q[rows]
    frac = np.zeros(len(rows))  # fraction of row j moved to kmax_j instead of kmin_j
    if lam > 0:
        extra = e - float(qr @ cmin)  # budget to fill (complementary slackness)
        delta = qr * (cmax - cmin)
        order = np.flatnonzero(delta > 0)
        cum = np.cumsum(delta[order])
        full = cum <= extra
        frac[order[full]] = 1.0
        k = int(full.sum())
        if k < len(order) and extra > 0:
            prev = cum[k - 1] if k > 0 else 0.0
            frac[order[k]] = min(1.0, max(0.0, (extra - prev) / delta[order[k]]))
    m = support.m
    r_idx = np.concatenate([rows, rows])
    c_idx = np.concatenate([kmin, kmax])
    vals = np.concatenate([qr * (1 - frac), qr * frac])
    keep = vals > 0
    plan = sparse.coo_array((vals[keep], (r_idx[keep], c_idx[keep])), shape=(m, m)).tocsr()
    weights = np.asarray(plan.sum(axis=0)).reshape(-1)
    costs = np.concatenate([cmin, cmax])[keep]
    budget = float(vals[keep] @ costs)
    primal = float(weights @ losses)
    return WInnerFinite(value, primal, lam, plan, weights, q, budget, losses, support, its)


def wdpo_inner_finite(
    theta, data: PreferenceData, beta: float, eps: float, p: int = 1, kappa: float = math.inf,
    support: FiniteSupport | None = None,
) -> WInnerFinite:
    """Exact ``sup_{W_p(Q, P_data) <= eps, supp Q in support} E_Q l(z; theta)``.

    The LP over plans ``pi`` (m, m): ``max sum_jk pi_jk l(z_k)`` s.t. ``sum_k pi_jk = q_j``,
    ``sum_jk pi_jk c_jk^p <= eps^p``, ``pi >= 0``, with ``c = ||x - x'|| + kappa [y != y']``. Its dual
    ``min_{lam >= 0} lam eps^p + sum_j q_j max_k (l_k - lam c_jk^p)`` is convex piecewise linear in
    ``lam`` and is minimised exactly (:func:`_solve_pl_dual`); the plan sends each row to its
    maximiser, one row splitting between two targets to use the budget exactly when ``lam > 0``.

    Parameters
    ----------
    theta : (d,). data : tuples, each of which must be a support point. p : 1 or 2.
    kappa : label-flip cost (>= 0 or inf). support : default ``FiniteSupport.from_data(data,
        flips=kappa < inf)``.
    """
    eps, kappa = _check_eps_kappa(eps, kappa)
    p = _check_p(p)
    support, q, rows = _finite_setup(data, kappa, support)
    losses = dpo_loss(theta, support.x, support.y, beta, data.theta_ref)
    return _inner_finite_core(losses, q, rows, _CostRows(support.cost(rows, p, kappa)), eps**p, support)


def _support_weighted_grad(theta, support, theta_ref, beta, weights):
    return weights @ dpo_grad(theta, support.x, support.y, beta, theta_ref)


# ----------------------------------------------------------------------------------------------
# objective and gradient
# ----------------------------------------------------------------------------------------------


def wdpo_objective(theta, data: PreferenceData, beta: float, eps: float, kappa: float = math.inf,
                   p: int = 1, support: FiniteSupport | None = None) -> float:
    """Robust value ``L_W(theta)``: continuous support if ``p = 1`` and ``support is None``, else finite.

    Cost ``c = ||x - x'||_2 + kappa [y != y']``; for ``p = 2`` without a support, the support is
    ``FiniteSupport.from_data(data, flips=kappa < inf)``.
    """
    p = _check_p(p)
    if p == 1 and support is None:
        return wdpo_inner_continuous(theta, data, beta, eps, kappa).value
    return wdpo_inner_finite(theta, data, beta, eps, p, kappa, support).value


def wdpo_gradient(theta, data: PreferenceData, beta: float, eps: float, kappa: float = math.inf,
                  p: int = 1, support: FiniteSupport | None = None) -> NDArray[np.float64]:
    """A (sub)gradient of :func:`wdpo_objective` (Danskin at the worst case), (d,).

    Continuous support: ``sum_i w_i [grad l_i + alpha_i beta ytil_i x_i] + nu beta (theta -
    theta_ref)/||theta - theta_ref||`` (``kappa = inf``: ``grad mean loss + eps beta (theta -
    theta_ref)/||.||``); at ``theta = theta_ref`` the least-norm subgradient. Finite support:
    ``sum_k weights_k grad l(z_k)`` with the worst-case weights. It is the gradient wherever the
    objective is differentiable (generic ``theta``).
    """
    p = _check_p(p)
    theta = np.asarray(theta, float)
    if p == 1 and support is None:
        return _continuous_subgradient(theta, data, beta, wdpo_inner_continuous(theta, data, beta, eps, kappa))
    inner = wdpo_inner_finite(theta, data, beta, eps, p, kappa, support)
    return _support_weighted_grad(theta, inner.support, data.theta_ref, beta, inner.weights)


# ----------------------------------------------------------------------------------------------
# certificates (docs/theory_wasserstein.md, section 5)
# ----------------------------------------------------------------------------------------------


def _norm_model(data, beta, b, c):
    """``F(theta) = sum_i w_i l_i + b.(theta - theta_ref) + c ||theta - theta_ref||`` with grad and Hessian."""
    tr = data.theta_ref

    def fun(theta):
        a = theta - tr
        return weighted_loss(theta, data, beta) + float(b @ a) + c * float(np.linalg.norm(a))

    def grad(theta):
        return _add_norm_term(weighted_grad(theta, data, beta) + b, theta - tr, c)

    def grad_hess(theta):
        g, H = weighted_grad_hess(theta, data, beta)
        a = theta - tr
        r = float(np.linalg.norm(a))
        g = g + b
        if r > 0 and c > 0:
            g = g + c * a / r
            H = H + (c / r) * (np.eye(len(a)) - np.outer(a, a) / r**2)
        return g, H

    return fun, grad, grad_hess


def _lower_bound_norm_model(theta, data, beta, radius, b, c, mu, refine_above: float = 1e-8):
    """Certified lower bound on ``min_{||t|| <= B} F(t)`` for the model of :func:`_norm_model`.

    ``F`` is convex with ``F(t) >= F(s) + g.(t - s) + (mu/2)||t - s||^2`` for any subgradient ``g``
    at ``s`` (``mu`` from the loss part), so ``min F >= F(s) - ball_fw_gap(g, s, B, mu)``. Evaluated at
    ``s = theta`` and at ``s = theta_ref`` (with the subgradients of :func:`_subgradients_at_ref`,
    which certify a collapsed optimum, ``theta_ref`` inside the ball or on its sphere); when the
    bound is looser than ``refine_above``, ``F`` is minimised by Newton from ``theta`` and bounded at
    that point too. The largest bound is returned.
    """
    fun, grad, grad_hess = _norm_model(data, beta, b, c)
    tr = data.theta_ref
    theta = np.asarray(theta, float)
    best = -math.inf
    f_theta = fun(theta)
    if np.linalg.norm(theta) <= radius * (1 + 1e-12):
        g = grad(theta)
        best = f_theta - ball_fw_gap(g, theta, radius, mu)
        if f_theta - best > refine_above and np.linalg.norm(theta - tr) > 0:
            best = max(best, _local_curvature_bound(theta, data, beta, f_theta, g))
    if f_theta - best > refine_above and np.linalg.norm(tr) <= radius * (1 + 1e-12):
        g0 = weighted_grad(tr, data, beta) + b
        f_ref = fun(tr)
        for g in _subgradients_at_ref(g0, c, tr, radius):
            best = max(best, f_ref - ball_fw_gap(g, tr, radius, mu))
    if f_theta - best > refine_above and np.linalg.norm(theta - tr) > 0:
        # loose (theta not yet the minimiser of this model, or mu ~ 0): minimise the model itself by
        # Newton from theta, keeping away from theta_ref where it is not smooth, and bound there
        rmin = 1e-14 * max(1.0, radius)

        def guarded(v):
            return math.inf if np.linalg.norm(v - tr) <= rmin else fun(v)

        res = newton_ball(guarded, grad_hess, theta, data.d, radius, max_iter=100, tol=1e-15)
        if np.isfinite(res.f):
            best = max(best, res.f - ball_fw_gap(grad(res.v), res.v, radius, mu))
    return best


def _local_curvature_bound(theta, data, beta, f_theta, g, max_tries: int = 6) -> float:
    """``F(theta) - ||g||^2 / (2 mu_R)``: a lower bound on ``inf_{R^d} F`` from the curvature near ``theta``.

    ``F`` = (smooth part with Hessian ``beta^2 sum_i w_i s(t_i) x_i x_i^T``, ``s = sigma sigma(-.)``) +
    (a linear term) + ``c ||t - theta_ref||``, ``g`` a subgradient at ``theta``. On the ball
    ``B_R(theta)`` every ``|t_i| <= |t_i(theta)| + beta ||x_i|| R``, so ``mu_R = beta^2 lambda_min(sum_i
    w_i s(|t_i(theta)| + beta ||x_i|| R) x_i x_i^T)`` bounds the curvature there and ``F >= q :=
    F(theta) + g.(t - theta) + (mu_R/2)||t - theta||^2`` on it. If ``R >= 2 ||g|| / mu_R``, a point
    outside ``B_R`` has ``F >= F(theta)`` by convexity (on the sphere of ``B_R``, ``q >= F(theta)``),
    so ``inf F >= min q = F(theta) - ||g||^2/(2 mu_R)`` (docs/theory_wasserstein.md, section 5). The
    global curvature floor of ``curvature_floor`` uses ``R`` = the whole parameter ball and is tiny for
    large ``beta B``; this one is of the size of the Hessian at the solution. ``-inf`` if no ``R`` of
    the ``max_tries`` tried (``4x`` apart) is consistent.
    """
    gn = float(np.linalg.norm(g))
    if gn == 0:
        return f_theta
    t = np.abs(beta * (data.x @ (np.asarray(theta, float) - data.theta_ref)))  # |t_i| (n,)
    xn = beta * np.sqrt(np.einsum("ij,ij->i", data.x, data.x))  # beta ||x_i|| (n,)
    xT = data.x.T
    # any R is valid (checked below); a small positive first R usually passes at once near a minimiser
    # (||g|| tiny), where starting at R = 0 always took a second try
    R = 1e-4 * max(1.0, float(np.linalg.norm(np.asarray(theta, float) - data.theta_ref)))
    for _ in range(max_tries):
        e = np.exp(-(t + xn * R))  # sigma(s) sigma(-s) = e / (1 + e)^2 at s = |t_i| + beta ||x_i|| R >= 0
        cw = data.weights * (e / ((1.0 + e) * (1.0 + e)))
        mu_R = beta**2 * float(np.linalg.eigvalsh((xT * cw) @ data.x)[0]) * (1 - 1e-9)
        if mu_R <= 0:
            return -math.inf
        need = 2.0 * gn / mu_R
        if R >= need:
            return f_theta - gn * gn / (2.0 * mu_R)
        R = 4.0 * need
    return -math.inf


def _subgradients_at_ref(g0, c, theta_ref, radius):
    """Subgradients ``g0 + c v`` (``||v|| <= 1``) of the norm model at ``theta_ref`` to certify with.

    The least-norm one certifies a collapsed optimum with ``theta_ref`` inside the ball. With
    ``theta_ref`` on the sphere the ball's normal cone ``{eta theta_ref, eta >= 0}`` also enters the
    optimality condition: the subgradient aligned with ``-eta theta_ref`` (``eta`` minimising
    ``||g0 + eta theta_ref||``) has Frank-Wolfe gap ``eta ||theta_ref|| (B - ||theta_ref||) = 0``,
    so it certifies ``theta_ref`` whenever ``min_eta ||g0 + eta theta_ref|| <= c``
    (docs/theory_wasserstein.md, section 2).
    """
    out = [_add_norm_term(g0, np.zeros_like(g0), c)]
    nref = float(np.linalg.norm(theta_ref))
    if nref > 0 and nref >= radius * (1 - 1e-9):
        eta = max(0.0, -float(g0 @ theta_ref) / nref**2)
        r = g0 + eta * theta_ref  # the part of g0 the normal cone cannot absorb
        nr = float(np.linalg.norm(r))
        out.append(-eta * theta_ref if nr <= c else g0 - c * r / nr)
    return out


def _lower_bound_continuous(theta, data, beta, radius, eps, kappa, alpha, mu):
    """Lower bound on the continuous W1-WDPO optimum from flip fractions ``alpha`` (any in [0,1]^n).

    ``alpha`` is scaled so that ``kappa sum w alpha <= eps``; with ``nu = eps - kappa sum w alpha``,
    ``L_W(t) >= sum_i w_i (l_i(t) + alpha_i t_i(t)) + nu beta ||t - theta_ref||`` for every ``t``
    (a feasible adversary), and the right side is a norm model with ``b = beta sum_i w_i alpha_i u_i``.
    """
    w = data.weights
    alpha = np.clip(np.asarray(alpha, float), 0.0, 1.0)
    if math.isinf(kappa):
        alpha = np.zeros(data.n)
    spent = kappa * float(w @ alpha) if 0 < kappa < math.inf else 0.0
    if spent > eps:
        alpha = alpha * (eps / spent)
        spent = eps
    nu = max(0.0, eps - spent)
    b = beta * ((w * alpha * signed_labels(data.y)) @ data.x)  # beta sum_i w_i alpha_i u_i
    return _lower_bound_norm_model(theta, data, beta, radius, b, beta * nu, mu)


def _lower_bound_plan(theta, support, theta_ref, beta, radius, weights):
    """Lower bound on the finite-support optimum from the column sums ``weights`` of a feasible plan.

    ``L_W(t) >= sum_k weights_k l(z_k; t) =: h(t)`` for every ``t``, and ``min h >= h(theta) -
    ball_fw_gap(grad h(theta), theta, B, mu_h)`` with ``mu_h`` the curvature floor of ``h``, refined
    by solving ``min h`` with Newton when that bound is loose (``_common.weighted_min_lower_bound``).
    """
    sdata = PreferenceData(support.x, support.y, None, theta_ref)
    return weighted_min_lower_bound(sdata, beta, radius, weights, theta)


# ----------------------------------------------------------------------------------------------
# continuous support solvers
# ----------------------------------------------------------------------------------------------


def _check_all(data, beta, radius, eps, kappa, p=1):
    check_common(data, beta, radius)
    eps, kappa = _check_eps_kappa(eps, kappa)
    return eps, kappa, _check_p(p)


def _continuous_result(theta, data, beta, radius, eps, kappa, solver, seconds, info, alpha_candidates=(),
                       snap=True, polish=False, snap_first=False):
    """Exact value, certificate and worst case at ``theta`` (``alpha_candidates``: flip fractions, (n,)).

    ``snap``: a ``theta`` within ``1e-6 B`` of ``theta_ref`` is also certified at ``theta_ref`` itself,
    and the better certificate is returned. ``polish`` (finite ``kappa``): the flip fractions of
    :func:`_polish_flip_fraction` at ``theta`` are tried first. ``snap_first`` (finite ``kappa``, a solver
    that stopped near ``theta_ref`` on its way to a collapsed optimum): ``theta_ref`` within ``1e-3 B``
    is certified first and returned if certified (the certificate at such a ``theta``, near the kink of
    the norm term, is the expensive one)."""
    theta = np.asarray(theta, float)
    nt = np.linalg.norm(theta)
    if nt > radius:
        theta = theta * (radius / nt)
    dist_ref = float(np.linalg.norm(theta - data.theta_ref))
    if snap_first and math.isfinite(kappa) and 0 < dist_ref <= 1e-3 * max(1.0, radius):
        snapped = _continuous_result(data.theta_ref, data, beta, radius, eps, kappa, solver, seconds, info,
                                     snap=False)
        if snapped.duality_gap <= CERTIFIED_GAP:
            snapped.info["snapped_to_theta_ref"] = True
            return snapped
    inner = wdpo_inner_continuous(theta, data, beta, eps, kappa)
    if polish and math.isfinite(kappa):
        alpha_candidates = (_polish_flip_fraction(theta, data, beta, radius, eps, kappa, inner), *alpha_candidates)
    mu = curvature_floor(data, beta, radius)
    if math.isfinite(kappa) and not np.any(theta - data.theta_ref):  # at theta_ref: every tuple ties
        alpha_candidates = (*alpha_candidates, _polish_flip_fraction(theta, data, beta, radius, eps, kappa))
    lb = -math.inf
    for alpha in (*alpha_candidates, inner.flip_fraction):  # the solver's candidates are the tight ones
        lb = max(lb, _lower_bound_continuous(theta, data, beta, radius, eps, kappa, alpha, mu))
        if inner.value - lb <= 1e-2 * CERTIFIED_GAP:
            break
    gap = max(0.0, inner.value - lb)
    tr = data.theta_ref
    # kappa = inf: the exact collapse test (section 2) decides whether theta_ref is *the* optimum
    inf_collapse = math.isinf(kappa) and _kappa_inf_collapses(
        weighted_grad(tr, data, beta), eps * beta, tr, radius)
    dist_ref = float(np.linalg.norm(theta - tr))
    # a solver stopping near theta_ref: 1e-6 B is its tolerance; up to 1e-3 B is tried when uncertified
    near_ref = 0 < dist_ref <= (1e-6 if gap <= CERTIFIED_GAP else 1e-3) * max(1.0, radius)
    if snap and gap > 0 and (inf_collapse or (near_ref and (not math.isinf(kappa) or gap > CERTIFIED_GAP))):
        # a solver's collapsed solution is theta_ref up to its tolerance (kappa = inf: theta_ref passed
        # the exact test, so it is the optimum however far the solver stopped from it)
        snapped = _continuous_result(tr, data, beta, radius, eps, kappa, solver, seconds, info,
                                     alpha_candidates, snap=False)
        if snapped.duality_gap <= gap:
            snapped.info["snapped_to_theta_ref"] = True
            return snapped
    info = {
        "eps_c": w1_collapse_threshold(data), "kappa": kappa, "p": 1, "eps": eps, "support": "continuous",
        "flip_fraction": inner.flip_fraction, "far_budget": inner.far_budget, "attained": inner.attained,
        "worst_case": inner.description, "mu": mu, **info,
    }
    # collapsed: theta_ref returned and optimal (kappa = inf: by the exact test, not only within the gap)
    at_ref = bool(np.linalg.norm(theta - tr) <= 1e-12 * max(1.0, radius))
    collapsed = at_ref and (inf_collapse if math.isinf(kappa) else gap <= CERTIFIED_GAP)
    return SolverResult(
        method="wdpo", theta=theta, objective=inner.value, lower_bound=inner.value - gap, duality_gap=gap,
        lam=inner.lam, weights=None, status=status_from_gap(gap), solver=solver, seconds=seconds,
        collapsed=collapsed, plan=None, info=info,
        worst_case=from_flip_fractions(theta, data, beta, inner.flip_fraction, inner.far_budget),
    )


# ----------------------------------------------------------------------------------------------
# continuous support, native for any kappa: trust-region Newton with exact flip terms
# (docs/theory_wasserstein.md, section 8)
# ----------------------------------------------------------------------------------------------
#: Trust-region Newton for continuous W1 with finite kappa (docs/theory_wasserstein.md, section 8).
#: At most this many flip terms are kept exact (smoothed by the inner barrier path) per outer step.
TR_MAX_WINDOW = 2048
#: ... for up to TR_WINDOW_N tuples; beyond, the cap grows like sqrt(n) (the region a window of fixed size
#: allows shrinks like 1/n, the distance a warm start leaves like 1/sqrt(n)).
TR_WINDOW_N = 100_000


#: After this many consecutive good steps (ratio > 0.75) whose region the window capped, the cap doubles,
#: up to TR_WINDOW_GROWTH_MAX times its start (a long valley, e.g. kappa = 0.5 at n = 1e5: 25 steps of 0.004).
TR_WINDOW_RUN = 3
TR_WINDOW_GROWTH_MAX = 8


def _max_window(n: int) -> int:
    """How many flip terms the trust model keeps exact at most, for ``n`` tuples."""
    return max(TR_MAX_WINDOW, int(TR_MAX_WINDOW * math.sqrt(n / TR_WINDOW_N)))
#: Outer steps stop when the model decrease falls below this (absolute, on the objective).
TR_TOL = 1e-12
#: ... or right after an accepted step (actual decrease >= 0.75 x promised) that promised at most this: the
#: next model decrease would be of the order of its square (Newton's local rate), so the last outer step,
#: one more pass over the data, only confirms. The certificate decides; if it fails, the solver resumes
#: with ``early = 0`` before any fallback.
TR_EARLY = 1e-10
#: ... or, on the full data, near theta_ref (within TR_APEX max(1, B), where the certificate also tries
#: theta_ref) when the window caps the region: the crawl to a collapsed optimum (resumed if not certified).
TR_APEX = 1e-3
#: The inner barrier path ends at this mu (its centre is then within ~ (2 m + 4) mu of the model optimum).
TR_MU_FINAL = 1e-12
#: The inner barrier parameter is divided by this per stage.
TR_SHRINK = 10.0
#: The inner path of an outer step ends at mu = TR_MU_END_FACTOR * min(step^2, last promised decrease)
#: (but TR_MU_FINAL): the barrier's bias, about 4 mu, stays a few percent of the decrease at stake.
TR_MU_END_FACTOR = 1e-2
#: Each inner stage but the last is centred to a Newton decrement of TR_CENTRING * mu (a decrement of 1 in the
#: units of the barrier problem divided by mu; tighter centring cost ~30% more Newton steps for the same path).
TR_CENTRING = 1.0
#: ... and the last one to TR_CENTRING_LAST * mu_end (at least 1e-16): the barrier's own bias, ~ mu_end per
#: active hinge, dwarfs a tighter centre (which took up to 20 more Newton steps).
TR_CENTRING_LAST = 1e-3


class _TrustModel:
    """The outer step's model of the joint objective around ``v = (theta, lam)``, in ``y = v + Delta``.

    .. math:: m(y) = g_L\\cdot\\Delta_\\theta + \\tfrac12 \\Delta_\\theta^T H_L \\Delta_\\theta
              + \\varepsilon\\Delta_\\lambda + c_A\\cdot\\Delta
              + \\sum_{i \\in W} w_i (s_i + z_i\\cdot\\Delta)_+

    (``L = sum_i w_i l_i`` by its second-order expansion, the flip terms exact: those of the window
    ``W`` as hinges, those above it linear through ``c_A = sum_{i in A} w_i z_i``, ``z_i = (beta u_i,
    -kappa)``), minimised over the cone ``lam' >= beta ||theta' - theta_ref||``, the trust region
    ``||Delta|| <= r`` and the ball (exactly, by ``newton_ball``) along a barrier path in ``mu``.
    """

    def __init__(self, v, gL, HL, eps, Zw, sw, ww, cA, beta, theta_ref, r):
        d = len(theta_ref)
        self.v, self.gL, self.HL, self.eps = v, gL, HL, eps
        self.Zw, self.sw, self.ww, self.cA = Zw, sw, ww, cA
        self.beta, self.tr, self.r2 = beta, theta_ref, r * r
        self.d = d
        self.mu = 1.0
        # the smooth part in Delta: c.Delta + Delta^T Q Delta / 2, Q = diag(HL, 0)
        self.c = np.array(cA, float)
        self.c[:d] += gL
        self.c[d] += eps
        self.Q = np.zeros((d + 1, d + 1))
        self.Q[:d, :d] = HL
        self.ZwT = np.ascontiguousarray(Zw.T)  # (d + 1, |W|)
        self.b2 = beta * beta
        # the cone constraint lam^2 - beta^2 ||a||^2 has the constant Hessian diag(-2 beta^2, ..., 2)
        self.hc = np.full(d + 1, -2.0 * self.b2)
        self.hc[d] = 2.0

    def exact(self, y) -> float:
        """``m(y)`` without barriers (the model decrease is measured with it)."""
        D = y - self.v
        val = float(self.c @ D + 0.5 * (D @ (self.Q @ D)))
        return val + float(self.ww @ np.maximum(self.sw + self.Zw @ D, 0.0))

    def fun(self, y) -> float:
        d = self.d
        D = y - self.v
        a = y[:d] - self.tr
        lam = float(y[d])
        cone = lam * lam - self.b2 * float(a @ a)
        room = self.r2 - float(D @ D)
        if not (lam > 0 and cone > 0 and room > 0):
            return math.inf
        val = float(self.c @ D + 0.5 * (D @ (self.Q @ D)))
        if len(self.ww):
            val += float(self.ww @ _hinge_barrier(self.sw + self.Zw @ D, self.mu, value_only=True))
        return val - self.mu * (math.log(cone) + math.log(room))

    def grad_hess(self, y):
        d, mu = self.d, self.mu
        D = y - self.v
        a = y[:d] - self.tr
        QD = self.Q @ D
        g = self.c + QD
        H = self.Q.copy()
        if len(self.ww):
            al, h2 = _hinge_barrier_derivatives(self.sw + self.Zw @ D, mu)
            g += self.ZwT @ (self.ww * al)
            H += (self.ZwT * (self.ww * h2)) @ self.Zw
        # cone barrier -mu log(lam^2 - beta^2 ||a||^2) and trust-region barrier -mu log(r^2 - ||Delta||^2)
        lam = float(y[d])
        cone = lam * lam - self.b2 * float(a @ a)
        gc = np.empty(d + 1)
        gc[:d] = (-2.0 * self.b2) * a
        gc[d] = 2.0 * lam
        room = self.r2 - float(D @ D)
        gr = -2.0 * D
        g -= (mu / cone) * gc + (mu / room) * gr
        H += (mu / (cone * cone)) * np.outer(gc, gc) + (mu / (room * room)) * np.outer(gr, gr)
        H.flat[:: d + 2] += (2.0 * mu / room) - (mu / cone) * self.hc
        return g, H


def _hinge_barrier(s, mu, value_only=False):
    """The barrier form of ``s_+``: ``h(s) = min_{xi > max(s, 0)} xi - mu log xi - mu log(xi - s)``.

    Closed form (section 8): ``xi = (s + 2 mu + q)/2``, ``q = sqrt(s^2 + 4 mu^2)``; returns ``h`` (up to
    the constant ``-mu log mu``), ``alpha = h' = mu/(xi - s)`` in (0, 1) and ``h'' = alpha (1 - alpha)/q``,
    all shaped like ``s``. ``q + s`` and ``q - s`` are formed without cancellation
    (``(q + s)(q - s) = 4 mu^2``): ``xi = mu + s_+ + 2 mu^2 / (q + |s|)``.
    """
    q = np.sqrt(s * s + 4.0 * mu * mu)
    small = (2.0 * mu * mu) / (q + np.abs(s))  # (q - |s|)/2 without cancellation
    small += np.maximum(s, 0.0)
    small -= mu * np.log(2.0 * mu + q)
    h = small + mu  # xi - mu log(2 mu + q)
    if value_only:
        return h
    alpha, h2 = _hinge_barrier_derivatives(s, mu)
    return h, alpha, h2


def _hinge_barrier_derivatives(s, mu):
    """``h'(s) = alpha = (q + s)/(q + s + 2 mu)`` and ``h''(s) = alpha (1 - alpha)/q`` of :func:`_hinge_barrier`
    (``1 - alpha = 2 mu/(q + s + 2 mu)``, without cancellation when ``alpha ~ 1``)."""
    q = np.sqrt(s * s + 4.0 * mu * mu)
    big = q + np.abs(s)
    qps = np.where(s >= 0, big, (4.0 * mu * mu) / big)  # q + s without cancellation
    den = 1.0 / (qps + 2.0 * mu)
    alpha = qps * den
    return alpha, alpha * ((2.0 * mu) * den) / q


def _solve_trust_model(model: _TrustModel, radius: float, mu0: float, mu_end: float = TR_MU_FINAL):
    """Minimise the model along the barrier path ``mu = mu0, mu0/TR_SHRINK, ..., mu_end``.

    Each stage is centred by Newton (``_newton.newton_ball``, exact ball) from the centre predicted by
    linear extrapolation of the last two (the path is ``y(mu) = y* + O(mu)``). Returns ``(y, iterations)``.
    """
    d = model.d
    y = model.v.copy()
    a = y[:d] - model.tr
    lam_min = model.beta * float(np.linalg.norm(a))
    # strictly inside the cone (a centre at mu lies about mu/eps inside) and the trust region
    r = math.sqrt(model.r2)
    y[d] = max(y[d], lam_min + min(0.25 * r, 10.0 * mu0 / max(model.eps, 1e-12)))
    if (y[d] - model.v[d]) ** 2 >= model.r2:
        y[d] = model.v[d] + 0.5 * r
    its, mu, prev = 0, mu0, None
    while True:
        model.mu = mu
        last = mu <= mu_end * (1 + 1e-9)
        tol = TR_CENTRING * mu if not last else max(1e-16, TR_CENTRING_LAST * mu)
        res = newton_ball(model.fun, model.grad_hess, y, d, radius, max_iter=50, tol=tol)
        its += res.iterations
        exact = _model_crossover(model, res.v, radius)
        if exact is not None:
            return exact, its
        if last:
            return res.v, its
        new_mu = max(mu / TR_SHRINK, mu_end)
        y = res.v
        if prev is not None:  # predictor: linear in mu along the path, if still strictly feasible
            cand = res.v + (res.v - prev) * (mu - new_mu) / (prev_mu - mu)
            if np.linalg.norm(cand[:d]) <= radius and math.isfinite(model.fun(cand)):
                y = cand
        prev, prev_mu, mu = res.v, mu, new_mu


#: Crossover from the barrier path: hinges whose barrier slope alpha lies in (a, 1 - a) are taken to sit at
#: their kinks, the others on their linear pieces; each a here is tried in turn (alpha is within ~mu/|s| of
#: 0 or 1 away from the kink, so a smaller a takes hinges farther from their kinks into the kink set).
TR_CROSS_ALPHAS = (0.1, 1e-2, 1e-3)
#: ... and the candidate is the model's minimiser when the KKT conditions hold to these tolerances: kink
#: multipliers in [-1e-9, 1 + 1e-9], every other hinge on its side up to TR_CROSS_TOL (1 + max|s|).
TR_CROSS_TOL = 1e-10
#: Active-set corrections of the sets per threshold.
TR_CROSS_ITERS = 4
#: No crossover while the barrier centre uses more than this fraction of the region (squared radius):
#: the region is then active at the model's minimiser, which the KKT system above ignores.
TR_CROSS_ROOM = 0.8


def _model_crossover(model: _TrustModel, y, radius: float):
    """The exact minimiser of the trust model, if the barrier centre ``y`` has identified its pieces, else None.

    The hinges with barrier slope ``alpha_i = h'(s_i)`` strictly inside (a, 1 - a) form the kink set ``K``,
    those above it the set ``P`` (linear, ``s_i + z_i.Delta >= 0``), for each ``a`` of ``TR_CROSS_ALPHAS``.
    With the cone, the trust region and the ball inactive, the minimiser solves the KKT system (section 8)

    .. math:: Q\\Delta + \\sum_{i\\in K} w_i\\alpha_i z_i = -(c + \\sum_{i\\in P} w_i z_i),\\qquad
              z_i\\cdot\\Delta = -s_i\\ (i \\in K),

    and it is the model's minimiser (convexity) when ``alpha_K`` lies in [0, 1], every hinge of ``P``
    (of neither set) stays non-negative (non-positive), and the point lies strictly inside the cone,
    the region and the ball; each is checked. When a check on the sets fails they are corrected as in a
    primal-dual active-set method (at most ``TR_CROSS_ITERS`` times per threshold). The barrier path then stops: its last stages, whose
    Newton steps are damped hard by the hinges' curvature ``~ 1/mu`` at the kinks, are skipped.
    """
    d = model.d
    if not len(model.ww):
        return None
    D0 = y - model.v
    if float(D0 @ D0) > TR_CROSS_ROOM * model.r2:
        return None  # the region is (about to be) active: the barrier path handles it
    s = model.sw + model.Zw @ D0
    al, _ = _hinge_barrier_derivatives(s, model.mu)
    tol = TR_CROSS_TOL * (1.0 + float(np.abs(model.sw).max()))
    seen = set()
    for lim in TR_CROSS_ALPHAS:
        kink = (al > lim) & (al < 1.0 - lim)
        pos = al >= 1.0 - lim
        for _ in range(TR_CROSS_ITERS):
            K = np.flatnonzero(kink)
            key = (len(K), int(K.sum()), int(np.count_nonzero(pos)))
            if key in seen or len(K) == 0 or len(K) > 4 * (d + 1):
                break
            seen.add(key)
            ZK = model.Zw[K]
            m = d + 1 + len(K)
            M = np.zeros((m, m))
            M[: d + 1, : d + 1] = model.Q
            M[: d + 1, d + 1 :] = ZK.T * model.ww[K]
            M[d + 1 :, : d + 1] = ZK
            rhs = np.concatenate([-(model.c + (model.ww * pos) @ model.Zw), -model.sw[K]])
            sol = np.linalg.lstsq(M, rhs, rcond=None)[0]
            if not np.all(np.isfinite(sol)) or float(np.abs(M @ sol - rhs).max()) > 1e-9 * (1.0 + float(np.abs(rhs).max())):
                break
            D, aK = sol[: d + 1], sol[d + 1 :]
            s_new = model.sw + model.Zw @ D
            low, high = aK < -1e-9, aK > 1.0 + 1e-9
            up = ~(pos | kink) & (s_new > tol)  # should be off, is on: to the kink set
            down = pos & (s_new < -tol)  # should be on, is off: to the kink set
            if not (low.any() or high.any() or up.any() or down.any()):
                y_new = model.v + D
                a = y_new[:d] - model.tr
                if (y_new[d] > model.beta * float(np.linalg.norm(a)) and float(D @ D) < model.r2
                        and float(np.linalg.norm(y_new[:d])) < radius):
                    return y_new
                return None  # the model's constraints are active at its unconstrained solution
            # primal-dual active-set update: multipliers out of [0, 1] leave the kink set on their side,
            # hinges on the wrong side join it
            kink[K[low | high]] = False
            pos[K[high]] = True
            kink |= up | down
            pos &= ~down
    return None


def _trust_region_w1(data: PreferenceData, beta: float, radius: float, eps: float, kappa: float, theta0,
                     max_outer: int = 50, tol: float = TR_TOL, confirm: bool = True, early: float = 0.0,
                     apex: bool = False):
    """Trust-region Newton on ``min_{theta, lam} lam eps + sum_i w_i [l_i + (t_i - lam kappa)_+]``
    s.t. ``lam >= beta ||theta - theta_ref||``, ``||theta|| <= B`` (section 8).

    Each outer step costs one pass over the data (loss, gradient and Hessian of ``L``); the flip terms
    that can change sign within the trust region (the window, at most :func:`_max_window` of them) stay exact
    in the model, so the step is a Newton step for the nonsmooth objective. Steps are accepted by
    the ratio of actual to predicted decrease. ``confirm``: before stopping on a promised decrease
    ``<= tol``, re-solve the model along the full barrier path (whose bias might hide a decrease);
    a warm start needs no such confirmation. ``early`` > 0: stop right after an accepted step (ratio
    > 0.75) that promised at most ``early`` (``TR_EARLY``). ``apex``: stop once an accepted step, its region
    capped by the window, lands within ``TR_APEX max(1, B)`` of ``theta_ref`` (collapsed optima are
    approached in ever shorter steps: every margin and ``lam kappa`` tend to 0 there, all flip terms
    crowd into the window; the certificate tries ``theta_ref`` itself from that distance).
    Returns ``(theta, lam, outer, inner, message)``.
    """
    d, w, tr = data.d, data.weights, data.theta_ref
    max_window = base_window = _max_window(data.n)
    capped, capped_run = False, 0
    apex_tol = TR_APEX * max(1.0, radius) if apex else -1.0
    UT = np.empty((d, data.n))  # beta u_i as columns: the sums over the data are (d, n) products
    np.multiply(data.x.T, beta * signed_labels(data.y), out=UT)
    flips = math.isfinite(kappa)  # kappa = inf: no flip terms, the model is smooth but for the cone
    k = kappa if flips else 0.0
    with np.errstate(divide="ignore"):  # z_i = 0 (x_i = 0, kappa = 0): a constant term, never in the window
        inv_z = 1.0 / np.sqrt(np.einsum("ji,ji->i", UT, UT) + k**2)  # 1/||z_i||, z_i = (beta u_i, -kappa)
    theta = np.asarray(theta0, float).copy()
    nt = float(np.linalg.norm(theta))
    if nt > radius:
        theta *= radius / nt

    def parts(theta, lam):
        """Margins t, e = exp(-|t|), the objective and the flip terms' arguments s at (theta, lam)."""
        t = (theta - tr) @ UT
        e = np.abs(t)
        np.negative(e, out=e)
        np.exp(e, out=e)
        loss = np.log1p(e)
        loss += np.maximum(-t, 0.0)
        if not flips:
            return t, e, lam * eps + float(w @ loss), None
        s = t - lam * kappa
        loss += np.maximum(s, 0.0)
        return t, e, lam * eps + float(w @ loss), s

    # lam: just above the inner problem's optimum at theta (section 1: the threshold of the sorted margins)
    t = (theta - tr) @ UT
    lam0 = beta * float(np.linalg.norm(theta - tr))
    lam_star = lam0
    if flips and kappa > 0:
        lam_star = max(lam0, _flip_threshold(t, w, eps / kappa) / kappa)
    lam = lam_star + 1e-3 * (1.0 + lam0)
    t, e, phi, s = parts(theta, lam)
    r, inner_its, message, last_step, last_pred = 1.0, 0, "max_outer reached", math.inf, math.inf
    for outer in range(1, max_outer + 1):
        rec = 1.0 + e
        np.reciprocal(rec, out=rec)
        ws = e * rec  # sigma(-|t|)
        c = ws * rec  # sigma(t) sigma(-t) = e/(1 + e)^2
        np.copyto(ws, rec, where=t < 0)  # sigma(-t)
        ws *= w
        gL = -(UT @ ws)
        c *= w
        HL = (UT * c) @ UT.T
        v = np.concatenate([theta, [lam]])
        if flips:
            with np.errstate(invalid="ignore"):  # z_i = 0 and s_i = 0: nan, in neither set below
                ratio = np.abs(s) * inv_z  # how far each flip term is from its kink, in step length
            inside = ratio <= r
            capped = np.count_nonzero(inside) > max_window
            if capped:  # keep the window small: shrink the region
                r = float(np.partition(ratio, max_window)[max_window]) * (1 - 1e-12)
                inside = ratio <= r
            win = np.flatnonzero(inside)
            wa = w * ((s > 0) & (ratio > r))  # the flip terms above the window: linear in the model
            cA = np.concatenate([UT @ wa, [-kappa * float(wa.sum())]])
            Zw = np.empty((len(win), d + 1))
            Zw[:, :d] = UT[:, win].T
            Zw[:, d] = -kappa
            sw, ww = s[win], w[win]
        else:
            cA, Zw, sw, ww = np.zeros(d + 1), np.zeros((0, d + 1)), np.zeros(0), np.zeros(0)
        model = _TrustModel(v, gL, HL, eps, Zw, sw, ww, cA, beta, tr, r)
        # the path starts at a mu of the size of the expected step (the last one, near the solution)
        # and ends at one small against the decrease at stake: far from the solution the step needs
        # no more accuracy (the ratio test guards it); near it, mu_end reaches TR_MU_FINAL
        size = min(r, last_step)
        mu0 = max(1e-2 * size, 10 * TR_MU_FINAL)
        mu_end = max(TR_MU_FINAL, TR_MU_END_FACTOR * min(size * size, last_pred))
        y, its = _solve_trust_model(model, radius, mu0, mu_end)
        inner_its += its
        pred = model.exact(v) - model.exact(y)
        if confirm and pred <= tol and mu_end > TR_MU_FINAL:  # the barrier's bias may hide a small decrease
            y, its = _solve_trust_model(model, radius, mu0, TR_MU_FINAL)
            inner_its += its
            pred = model.exact(v) - model.exact(y)
        if pred < -tol:  # the inner path did not find the model's minimiser: a smaller region
            r /= 4.0
            if r < 1e-15:
                message = "trust region collapsed"
                break
            continue
        if pred <= tol:
            message = f"model decrease {pred:.3g} <= {tol:g}"
            break
        t_new, e_new, phi_new, s_new = parts(y[:d], y[d])
        rho = (phi - phi_new) / pred
        step = float(np.linalg.norm(y - v))
        if rho > 0.1:
            theta, lam, t, e, phi, s = y[:d].copy(), float(y[d]), t_new, e_new, phi_new, s_new
            last_step, last_pred = step, pred
            if rho > 0.75 and pred <= early:
                message = f"accepted a step promising {pred:.3g} <= {early:g}"
                break
            # a run of good steps all limited by the window: a larger window (longer steps, dearer models)
            capped_run = capped_run + 1 if (capped and rho > 0.75) else 0
            if capped_run >= TR_WINDOW_RUN and max_window < TR_WINDOW_GROWTH_MAX * base_window:
                max_window, capped_run = 2 * max_window, 0
            if capped and float(np.linalg.norm(theta - tr)) <= apex_tol:
                message = f"near theta_ref (<= {apex_tol:.3g}) with the region capped by the window"
                break
        if rho < 0.25:
            r = step / 4.0
        elif rho > 0.75 and step > 0.5 * r:
            r *= 4.0
        elif rho > 0.75:
            # converging (the step stopped inside the region): Newton's next step is much shorter,
            # and a smaller region keeps the window, hence the model, small
            r = max(4.0 * step, 1e-12)
        if r < 1e-15:
            message = "trust region collapsed"
            break
    return theta, lam, outer, inner_its, message


#: Margins within this distance (relative to ``1 + |tau|``) of the flip threshold ``tau = lam* kappa``
#: are treated as ties whose flip fractions the polish re-solves (a superset of the true ties is safe:
#: every alpha in [0, 1]^n within the budget is a valid adversary).
TIE_TOL = 1e-7
#: At most this many groups of tied (identical) tuples, the nearest to tau, are re-solved.
MAX_TIES = 200


def _polish_flip_fraction(theta, data: PreferenceData, beta: float, radius: float, eps: float, kappa: float,
                          inner: WInner | None = None):
    """Flip fractions making ``theta`` a minimiser of the certificate's model ``F`` (section 8), or None.

    At a saddle point the tuples with ``t_i > tau`` flip (``alpha_i = 1``), those below stay, and the
    fractions of the ties ``t_i = tau`` (up to ``d + 1`` of them at a kink of the objective) together
    with the far budget ``nu`` and the ball multiplier ``eta`` solve the linear system
    ``grad F(theta) + eta theta = 0``, ``kappa sum_i w_i alpha_i + nu = eps`` with bounds
    ``alpha in [0, 1]``, ``nu, eta >= 0``. Solved in the least-squares sense (bounded-variable least
    squares, the budget row weighted heavily); the certificate accepts any result since every such
    ``alpha`` is a feasible adversary. ``inner``: :func:`wdpo_inner_continuous` at ``theta``, if known.
    """
    from scipy.optimize import lsq_linear

    tr, w = data.theta_ref, data.weights
    a = np.asarray(theta, float) - tr
    r = float(np.linalg.norm(a))
    if not math.isfinite(kappa):
        return None
    if r == 0:
        # theta = theta_ref: every margin is 0 = tau (lam* = 0), so every tuple ties; alpha = 1/2 for all
        # cancels the mean-loss gradient -(beta/2) sum_i w_i u_i exactly, if the budget allows
        # (kappa/2 <= eps; with kappa = 0 always), else scaled into it (section 8)
        spend = 0.5 * kappa * float(w.sum())
        return np.full(data.n, 0.5 if spend <= eps else 0.5 * eps / spend)
    ytil = signed_labels(data.y)
    t = ytil * (beta * (data.x @ a))
    if inner is None:
        inner = wdpo_inner_continuous(theta, data, beta, eps, kappa)
    tau = inner.lam * kappa
    dist = np.abs(t - tau)
    ties = np.flatnonzero(dist <= TIE_TOL * (1.0 + abs(tau)))
    # identical tuples tie together and share one fraction (discrete data holds many copies)
    groups, inv = np.unique(ytil[ties, None] * data.x[ties], axis=0, return_inverse=True)  # (G, d), (|T|,)
    inv = inv.reshape(-1)
    wg = np.bincount(inv, weights=w[ties], minlength=len(groups))  # (G,)
    if len(groups) > MAX_TIES:
        dg = np.zeros(len(groups))
        dg[inv] = dist[ties]
        kept = np.sort(np.argsort(dg)[:MAX_TIES])
        remap = np.full(len(groups), -1)
        remap[kept] = np.arange(len(kept))
        member = remap[inv] >= 0
        ties, inv, groups, wg = ties[member], remap[inv[member]], groups[kept], wg[kept]
    above = t > tau
    above[ties] = False
    g_base = weighted_grad(theta, data, beta) + beta * ((w * above * ytil) @ data.x)  # (d,)
    # complementary slackness: the far budget nu may be positive only when lam* = lam0 (otherwise a
    # nu > 0 with the ball's eta can also zero the gradient, at a smaller value F(theta) < L_W(theta))
    # (lam* - lam0 of the order of theta's error counts as equal: the cone is active there)
    nu_free = inner.lam - inner.lam0 <= 1e-6 * (1.0 + inner.lam0)
    cols = [beta * wg[:, None] * groups]  # one fraction per group of tied copies
    lower, upper = [np.zeros(len(groups))], [np.ones(len(groups))]
    budget = [kappa * wg]
    if nu_free:  # nu: the norm term's direction a/r
        cols.append((beta * a / r)[None, :])
        lower.append([0.0])
        upper.append([np.inf])
        budget.append([1.0])
    theta = np.asarray(theta, float)
    if np.linalg.norm(theta) >= radius * (1 - 1e-9):  # ball active: normal cone eta theta
        cols.append(theta[None, :])
        lower.append([0.0])
        upper.append([np.inf])
        budget.append([0.0])
    A = np.concatenate(cols).T  # (d, k)
    if A.shape[1] == 0:
        return above.astype(float)
    budget = np.concatenate(budget)
    M = 1e3 * (1.0 + float(np.abs(A).max()))
    A_aug = np.vstack([A, M * budget])
    b_aug = np.concatenate([-g_base, [M * (eps - kappa * float(w[above].sum()))]])
    sol = lsq_linear(A_aug, b_aug, bounds=(np.concatenate(lower), np.concatenate(upper)), method="bvls",
                     tol=1e-14)
    alpha = above.astype(float)
    alpha[ties] = np.clip(sol.x[: len(groups)], 0.0, 1.0)[inv]
    return alpha


#: Above ``2 * TR_SUBSAMPLE`` tuples, the trust-region method is first run on a seeded subsample of
#: this size (a warm start; the answer and its certificate come from the full data), then on nested
#: subsamples TR_SUBSAMPLE_GROWTH times larger while they hold less than half the data. The statistical
#: distance of a warm start is ~1/sqrt(size) and each full-data step is limited by the window: at n = 1e5,
#: d = 8 (4096, then 32768) left 3-5 full-data outer steps over 6 seeds where one 4096 subsample left 5-8.
TR_SUBSAMPLE = 4096
TR_SUBSAMPLE_GROWTH = 8
#: The subsample's trust-region iteration stops when the model promises less than this.
TR_SUBSAMPLE_TOL = 1e-5
#: ... or right after an accepted step that promised at most this (the next step would be of the order of
#: the subsample's statistical error; the model solve that tests TR_SUBSAMPLE_TOL is saved).
TR_SUBSAMPLE_EARLY = 1e-4


def _trust_region_solve(data: PreferenceData, beta: float, radius: float, eps: float, kappa: float):
    """Warm start (DPO, then nested subsamples for large ``n``) and :func:`_trust_region_w1` on the data.

    Returns ``(theta (d,), alpha, info)``; ``alpha`` (n,): extra flip fractions for the certificate, or
    None (the certificate polishes its own at ``theta``, :func:`_polish_flip_fraction`).
    """
    from .dpo import solve_dpo_native

    info = {}
    stages = []  # nested seeded subsamples of TR_SUBSAMPLE * TR_SUBSAMPLE_GROWTH^k tuples, each < n / 2
    m = TR_SUBSAMPLE
    if data.n > 2 * m:
        perm = np.random.default_rng(0).permutation(data.n)
        while data.n > 2 * m:
            idx = np.sort(perm[:m])
            ws = data.weights[idx]
            if ws.sum() > 0:
                stages.append(PreferenceData(data.x[idx], data.y[idx], ws / ws.sum(), data.theta_ref))
            m *= TR_SUBSAMPLE_GROWTH
    # a warm start only: capped, since solve_dpo_native runs to max_iter when the ball is active
    theta = solve_dpo_native(stages[0] if stages else data, beta, radius, max_iter=12).theta
    for start in stages:
        # a warm start: its statistical distance to the full-data optimum dwarfs TR_SUBSAMPLE_TOL
        theta, _, outer, inner, _ = _trust_region_w1(start, beta, radius, eps, kappa, theta, tol=TR_SUBSAMPLE_TOL,
                                                     confirm=False, early=TR_SUBSAMPLE_EARLY)
        info.update(subsample=start.n, subsample_outer=info.get("subsample_outer", 0) + outer,
                    subsample_inner=info.get("subsample_inner", 0) + inner)
    theta, lam, outer, inner, message = _trust_region_w1(data, beta, radius, eps, kappa, theta, early=TR_EARLY,
                                                         apex=True)
    info.update(iterations=outer, inner_iterations=inner, message=message)
    return theta, None, info
@single_blas_thread
def solve_wdpo_continuous_native(
    data: PreferenceData, beta: float, radius: float, eps: float, kappa: float = math.inf, max_iter: int = 200,
    fallback: bool = True,
) -> SolverResult:
    """W1-WDPO with continuous support, any ``kappa``, in numpy; certified, with a cvxpy fallback.

    .. math:: \\min_{\\|\\theta\\| \\le B,\\ \\lambda \\ge \\beta\\|\\theta - \\theta_{ref}\\|}\\
              \\lambda\\varepsilon + \\sum_i w_i\\bigl[\\ell_i(\\theta) + (t_i(\\theta) - \\lambda\\kappa)_+\\bigr]

    (``kappa = inf``: ``f(theta) = sum_i w_i l_i + eps beta ||theta - theta_ref||``; ``kappa >=
    max_i ||x_i||`` is the same problem, docs/theory_wasserstein.md section 2.)

    * ``kappa = inf``. Collapse: ``theta_ref`` is optimal iff ``0`` is in the subdifferential there
      (with ``theta_ref`` inside the ball iff ``eps >= eps_c``, :func:`w1_collapse_threshold`; on the
      sphere the ball's normal cone is included); then ``theta_ref`` is returned with
      ``collapsed=True``. Otherwise ``f`` is smooth near its minimiser and Newton
      (``_newton.newton_ball``) starts at the DPO solution, rejecting trial points at ``theta_ref``.
    * finite ``kappa`` (and ``kappa = inf`` when Newton does not certify, e.g. just below the
      collapse radius where the minimiser is close to the kink at ``theta_ref``): the trust-region
      Newton method of section 8 (:func:`_trust_region_w1`), warm-started on nested subsamples for large
      ``n``; the certificate uses the flip fractions of the ties re-solved at the returned ``theta``.

    Every answer is certified in numpy (section 5). When no native answer reaches ``CERTIFIED_GAP``
    and ``fallback`` is true, :func:`solve_wdpo_continuous_cvxpy` solves the problem; the result then
    says so in ``solver`` (``"fallback-cvxpy-..."``) and ``info["fallback"]``.
    """
    eps, kappa, _ = _check_all(data, beta, radius, eps, kappa)
    kappa_in = kappa
    if math.isfinite(kappa) and data.n and kappa >= float(np.linalg.norm(data.x, axis=1).max()):
        kappa = math.inf  # flips never pay (section 2): the kappa = inf problem, solved by Newton
    with Timer() as tm:
        tries = []
        res = None
        if math.isinf(kappa):
            theta, info = _newton_kappa_inf(data, beta, radius, eps, max_iter)
            res = _continuous_result(theta, data, beta, radius, eps, kappa, "native-newton", tm.elapsed, info)
            tries.append(f"native-newton: gap {res.duality_gap:.3g} ({info.get('message')})")
        if res is None or not res.optimal:
            theta, alpha, info = _trust_region_solve(data, beta, radius, eps, kappa)
            res_tr = _continuous_result(theta, data, beta, radius, eps, kappa, "native-trust-region", tm.elapsed,
                                        info, (alpha,) if alpha is not None else (), polish=True,
                                        snap_first=str(info.get("message", "")).startswith("near theta_ref"))
            tries.append(f"native-trust-region: gap {res_tr.duality_gap:.3g} ({info.get('message')})")
            if not res_tr.optimal and str(info.get("message", "")).startswith(("accepted a step", "near theta_ref")):
                # stopped early (TR_EARLY, TR_APEX) but not certified: resume to the model-decrease test
                theta, _, outer, inner, message = _trust_region_w1(data, beta, radius, eps, kappa, res_tr.theta)
                info = {**info, "resumed_iterations": outer, "resumed_inner_iterations": inner, "message": message}
                res_re = _continuous_result(theta, data, beta, radius, eps, kappa, "native-trust-region", tm.elapsed,
                                            info, polish=True)
                tries.append(f"native-trust-region resumed: gap {res_re.duality_gap:.3g} ({message})")
                if res_re.duality_gap < res_tr.duality_gap:
                    res_tr = res_re
            if res is None or res_tr.duality_gap < res.duality_gap:
                res = res_tr
        if not res.optimal and fallback:
            cvx = solve_wdpo_continuous_cvxpy(data, beta, radius, eps, kappa)
            tries.append(f"{cvx.solver}: gap {cvx.duality_gap:.3g}")
            if cvx.duality_gap < res.duality_gap:
                res = replace(cvx, solver=f"fallback-{cvx.solver}",
                              info={**cvx.info, "fallback": "native solver not certified; solved by cvxpy"})
    info = {**res.info, "attempts": "; ".join(tries)}
    if kappa_in != kappa:
        info["kappa"] = kappa_in
        info["note"] = f"kappa = {kappa_in:g} >= max ||x_i||: label flips never pay, solved as kappa = inf"
    return replace(res, seconds=tm.seconds, info=info)


def _newton_kappa_inf(data, beta, radius, eps, max_iter):
    """``kappa = inf``: ``theta_ref`` if the collapse test passes, else Newton from the DPO solution.

    Returns ``(theta, info)``.
    """
    from .dpo import solve_dpo_native

    comp, _ = data.compress()
    c = eps * beta
    tr = data.theta_ref
    fun, _, grad_hess = _norm_model(comp, beta, np.zeros(data.d), c)
    g0 = weighted_grad(tr, comp, beta)
    info = {"eps_c": w1_collapse_threshold(data), "collapse_test": "0 in subdifferential at theta_ref"}
    if _kappa_inf_collapses(g0, c, tr, radius):
        info.update(iterations=0, message="collapsed: 0 is in the subdifferential at theta_ref")
        return tr.copy(), info
    # a warm start only: capped, since solve_dpo_native runs to max_iter when the ball is active
    start = solve_dpo_native(comp, beta, radius, max_iter=12).theta
    if np.linalg.norm(start - tr) <= 1e-12:
        start = tr - 1e-3 * radius * g0 / np.linalg.norm(g0)
    rmin = 1e-14 * max(1.0, radius)

    def guarded(v):  # f is not smooth at theta_ref, which is not optimal here: keep away
        return math.inf if np.linalg.norm(v - tr) <= rmin else fun(v)

    # tol: a Newton decrement of 1e-15 is f's rounding level (with the default 1e-20 the
    # iteration can accept null steps on the sphere until max_iter)
    res = newton_ball(guarded, grad_hess, start, data.d, radius, max_iter=max_iter, tol=1e-15)
    info.update(iterations=res.iterations, message=res.message)
    return res.v, info


def _kappa_inf_collapses(g0, c, theta_ref, radius) -> bool:
    """The exact collapse test for ``kappa = inf``: ``0 in g0 + c * unit ball + N(theta_ref)``.

    ``g0`` (d,) is the gradient of the mean loss at ``theta_ref`` and ``c = eps beta``; the ball's
    normal cone ``N = {eta theta_ref, eta >= 0}`` enters when ``theta_ref`` is on the sphere
    (docs/theory_wasserstein.md, section 2).
    """
    nref = float(np.linalg.norm(theta_ref))
    eta = 0.0
    if nref > 0 and nref >= radius * (1 - 1e-9):
        eta = max(0.0, -float(g0 @ theta_ref) / nref**2)
    # rounding tolerance: at eps = eps_c exactly both sides agree only up to a few ulps
    return float(np.linalg.norm(g0 + eta * theta_ref)) <= c * (1 + 1e-12) + 1e-15


def solve_wdpo_continuous_cvxpy(
    data: PreferenceData, beta: float, radius: float, eps: float, kappa: float = math.inf
) -> SolverResult:
    """W1-WDPO with continuous support and any ``kappa`` as an exponential-cone program.

    .. math:: \\min_{\\theta, \\lambda, \\xi}\\ \\lambda\\varepsilon + \\sum_i w_i\\bigl[\\ell_i(\\theta) + \\xi_i\\bigr]
              \\ \\text{s.t.}\\ \\xi_i \\ge 0,\\ \\xi_i \\ge t_i(\\theta) - \\lambda\\kappa,\\
              \\beta\\|\\theta - \\theta_{ref}\\| \\le \\lambda,\\ \\|\\theta\\| \\le B,

    which is the program of docs/theory.md section 3.2 (``s_i >= l_i``, ``s_i >= l_i^flip - lam kappa``) with ``s_i = l_i + xi_i``
    (``l_i^flip = l_i + t_i``, ``t_i`` linear in ``theta``): ``n`` exponential cones instead of ``2n``.
    ``kappa = inf``: ``min sum_i w_i l_i + eps beta ||theta - theta_ref||``. The certificate uses the
    solver's multipliers of ``xi_i >= t_i - lam kappa`` as flip fractions (section 5 of the doc).
    """
    import cvxpy as cp

    eps, kappa, _ = _check_all(data, beta, radius, eps, kappa)
    with Timer() as tm:
        comp, inverse = data.compress()
        w, U, tr = comp.weights, comp.u, comp.theta_ref
        theta = cp.Variable(comp.d)
        margin = beta * (U @ theta - U @ tr)  # t_i, affine in theta
        loss = w @ cp.logistic(-margin)
        cons = [cp.norm(theta, 2) <= radius]
        flip_con = None
        if math.isinf(kappa):
            objective = loss + eps * beta * cp.norm(theta - tr, 2)
        else:
            lam = cp.Variable(nonneg=True)
            xi = cp.Variable(comp.n, nonneg=True)
            flip_con = xi >= margin - kappa * lam
            cons += [flip_con, beta * cp.norm(theta - tr, 2) <= lam]
            objective = lam * eps + loss + w @ xi
        prob = cp.Problem(cp.Minimize(objective), cons)
        try:
            name, status, tried = solve_cvxpy(prob)
        except SolverError as exc:
            return SolverResult("wdpo", tr.copy(), math.nan, math.nan, math.inf, None, None, FAILED, "cvxpy",
                                tm.elapsed, info={"message": str(exc), "kappa": kappa, "p": 1})
        th = np.asarray(theta.value, float)
        cands = []
        if flip_con is not None and flip_con.dual_value is not None:
            dual = np.asarray(flip_con.dual_value, float).reshape(-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                cands.append(np.where(w > 0, dual / w, 0.0)[inverse])  # per original tuple
    info = {"cvxpy_status": status, "attempts": "; ".join(tried), "solver_value": float(prob.value)}
    return _continuous_result(th, data, beta, radius, eps, kappa, f"cvxpy-{name}", tm.seconds, info, cands)


# ----------------------------------------------------------------------------------------------
# finite support solver: cutting planes on the dual LP
# ----------------------------------------------------------------------------------------------


def _restricted_problem(support, theta_ref, beta, radius, e, rows_q, cut_j, cut_k, cut_c, lam_max):
    """The dual restricted to the cuts ``(j, k)``: variables theta, lam, s (per row), L (per used column)."""
    import cvxpy as cp

    cols, kpos = np.unique(cut_k, return_inverse=True)
    nrows = len(rows_q)
    ncut = len(cut_j)
    U = signed_labels(support.y[cols])[:, None] * support.x[cols]  # (|cols|, d)
    theta = cp.Variable(support.d)
    lam = cp.Variable(nonneg=True)
    s = cp.Variable(nrows)
    L = cp.Variable(len(cols))
    Sj = sparse.csr_matrix((np.ones(ncut), (np.arange(ncut), cut_j)), shape=(ncut, nrows))
    Sk = sparse.csr_matrix((np.ones(ncut), (np.arange(ncut), kpos)), shape=(ncut, len(cols)))
    cut_con = Sj @ s - Sk @ L + cut_c * lam >= 0  # s_j >= l_k - lam c_jk^p
    cons = [
        L >= cp.logistic(-beta * (U @ theta - U @ theta_ref)),
        cut_con,
        cp.norm(theta, 2) <= radius,
        lam <= lam_max,  # valid: some optimal lam is <= max l / min positive cost (doc, section 6)
    ]
    prob = cp.Problem(cp.Minimize(e * lam + rows_q @ s), cons)
    return prob, theta, lam, cut_con


@single_blas_thread
def solve_wdpo_finite(
    data: PreferenceData, beta: float, radius: float, eps: float, p: int = 1, kappa: float = math.inf,
    support: FiniteSupport | None = None, max_rounds: int = 50, cuts_per_row: int = 3,
) -> SolverResult:
    """Finite-support WDPO (``W_p``, ``p`` in {1, 2}) by cutting planes on the joint dual.

    .. math:: \\min_{\\|\\theta\\| \\le B,\\ \\lambda \\ge 0,\\ s}\\ \\lambda\\varepsilon^p + \\sum_j q_j s_j
              \\quad\\text{s.t.}\\quad s_j \\ge \\ell(z_k; \\theta) - \\lambda c(z_j, z_k)^p\\ \\ \\forall j, k,

    cost ``c = ||x - x'||_2 + kappa [y != y']``, ``q`` the data histogram on ``support`` (default
    ``FiniteSupport.from_data(data, flips=kappa < inf)``). Start with the pairs ``(j, j)``,
    ``(j, flip j)`` and the worst-case targets at the DPO solution; solve the restricted exp-cone
    program (Clarabel); add the ``cuts_per_row`` most violated pairs of each row; stop when no pair is
    violated by more than ``CUT_TOL = 1e-8``. ``objective`` is the exact robust value at the returned
    ``theta`` (:func:`wdpo_inner_finite`); ``lower_bound`` comes from the restricted problem's
    multipliers (a feasible transport plan) and the exact worst-case plan (section 5 of the doc).
    ``info["restricted_value"]`` is the restricted optimum reported by the conic solver (a lower
    bound up to that solver's tolerance).
    """
    from .dpo import solve_dpo_native

    eps, kappa, p = _check_all(data, beta, radius, eps, kappa, p)
    with Timer() as tm:
        support, q, rows = _finite_setup(data, kappa, support)
        rq = q[rows]
        e = eps**p
        tr = data.theta_ref
        C = support.cost(rows, p, kappa)  # (|J|, m)
        rows_cost = _CostRows(C)
        finite = np.isfinite(C)
        pos = C[finite & (C > 0)]
        # every loss on the ball is <= log(1 + exp(beta max||x|| (B + ||theta_ref||)))
        l_bound = float(np.logaddexp(0.0, beta * np.linalg.norm(support.x, axis=1).max()
                                     * (radius + float(np.linalg.norm(tr)))))
        lam_max = 2.0 * l_bound / pos.min() + 1.0 if pos.size else 1.0

        # initial cuts: (j, j), (j, flip j), and the worst-case targets at the DPO solution
        flip = support.flip_index()[rows]
        cj = [np.arange(len(rows))]
        ck = [rows]
        ok = (flip >= 0)
        ok[ok] = np.isfinite(C[np.flatnonzero(ok), flip[ok]])
        cj.append(np.flatnonzero(ok))
        ck.append(flip[ok])
        theta0 = solve_dpo_native(data.compress()[0], beta, radius, max_iter=12).theta  # warm start only
        l0 = dpo_loss(theta0, support.x, support.y, beta, tr)
        inner0 = _inner_finite_core(l0, q, rows, rows_cost, e, support)
        P0 = inner0.plan.tocoo()
        rowpos = np.full(support.m, -1)
        rowpos[rows] = np.arange(len(rows))
        cj.append(rowpos[P0.row])
        ck.append(P0.col)
        pairs = np.unique(np.stack([np.concatenate(cj), np.concatenate(ck)], axis=1), axis=0)
        cut_j, cut_k = pairs[:, 0], pairs[:, 1]

        rounds, tried_all = 0, []
        theta_hat = theta0
        cut_con = None
        restricted_value = -math.inf
        max_viol = math.inf
        for rounds in range(1, max_rounds + 1):
            prob, theta_v, lam_v, cut_con = _restricted_problem(
                support, tr, beta, radius, e, rq, cut_j, cut_k, C[cut_j, cut_k], lam_max)
            try:
                name, status, tried = solve_cvxpy(prob)
            except SolverError as exc:
                return SolverResult("wdpo", theta_hat, math.nan, math.nan, math.inf, None, None, FAILED, "cvxpy",
                                    tm.elapsed, info={"message": str(exc), "rounds": rounds, "kappa": kappa, "p": p})
            tried_all.append(tried[-1])
            restricted_value = float(prob.value)
            theta_hat = np.asarray(theta_v.value, float)
            nt = np.linalg.norm(theta_hat)
            if nt > radius:
                theta_hat *= radius / nt
            lam_hat = max(0.0, float(lam_v.value))
            lk = dpo_loss(theta_hat, support.x, support.y, beta, tr)
            Mcut = lk[cut_k] - lam_hat * C[cut_j, cut_k]
            smax = np.full(len(rows), -np.inf)
            np.maximum.at(smax, cut_j, Mcut)
            # violations of the full constraint set: only each row's Pareto candidates can be the
            # most violated (section 4 of the doc), so the check runs on those
            V, K_idx = _RowEnvelope(lk, rq, rows_cost).violations(lam_hat, smax)
            max_viol = float(V.max())
            kk = min(cuts_per_row, V.shape[1])
            top = np.argpartition(-V, kk - 1, axis=1)[:, :kk]  # (|J|, kk)
            vt = np.take_along_axis(V, top, axis=1)
            jj, tt = np.nonzero(vt > CUT_TOL)
            new_j, new_k = [jj], [K_idx[jj, top[jj, tt]]]
            if max_viol <= CUT_TOL:
                break
            add = np.stack([np.concatenate(new_j), np.concatenate(new_k)], axis=1)
            pairs = np.unique(np.concatenate([pairs, add]), axis=0)
            cut_j, cut_k = pairs[:, 0], pairs[:, 1]

        # certificate
        lk = dpo_loss(theta_hat, support.x, support.y, beta, tr)
        inner = _inner_finite_core(lk, q, rows, rows_cost, e, support)
        lb = _lower_bound_plan(theta_hat, support, tr, beta, radius, inner.weights)
        if cut_con is not None and cut_con.dual_value is not None:
            pi = np.maximum(np.asarray(cut_con.dual_value, float).reshape(-1), 0.0)
            rs = np.bincount(cut_j, weights=pi, minlength=len(rows))
            ok = rs > 0
            pi = np.where(ok[cut_j], pi * (rq[cut_j] / np.where(ok[cut_j], rs[cut_j], 1.0)), 0.0)
            # rows without multipliers stay in place (cost 0)
            stay = np.where(~ok, rq, 0.0)
            cost = float(pi @ C[cut_j, cut_k])
            if cost > e:  # mix with the identity plan (cost 0) to restore the budget
                frac = e / cost
                pi *= frac
                stay = stay + (1 - frac) * np.where(ok, rq, 0.0)
            wts = np.bincount(cut_k, weights=pi, minlength=support.m)
            wts[rows] += stay
            lb = max(lb, _lower_bound_plan(theta_hat, support, tr, beta, radius, wts))
    gap = max(0.0, inner.value - lb)
    info = {
        "kappa": kappa, "p": p, "eps": eps, "support": "finite", "support_size": support.m,
        "rows": int(len(rows)), "rounds": rounds, "cuts": int(len(cut_j)), "max_violation": max_viol,
        "restricted_value": restricted_value, "primal_value": inner.primal_value, "budget": inner.budget,
        "cvxpy_attempts": "; ".join(tried_all), "eps_c": w1_collapse_threshold(data) if p == 1 else None,
    }
    collapsed = bool(np.linalg.norm(theta_hat - tr) <= 1e-9 * max(1.0, radius))
    return SolverResult(
        method="wdpo", theta=theta_hat, objective=inner.value, lower_bound=inner.value - gap, duality_gap=gap,
        lam=inner.lam, weights=inner.weights, status=status_from_gap(gap), solver=f"cutting-planes-cvxpy-{name}",
        seconds=tm.seconds, collapsed=collapsed, plan=inner.plan, info=info,
        worst_case=from_tuple_weights(support.x, support.y, inner.weights),
    )


# ----------------------------------------------------------------------------------------------
# the entry point
# ----------------------------------------------------------------------------------------------


def solve_wdpo(
    data: PreferenceData, beta: float, radius: float, eps: float, kappa: float = math.inf, p: int = 1,
    support: FiniteSupport | None = None, solver: str = "native",
) -> SolverResult:
    """Wasserstein DPO: ``min_{||theta|| <= B} sup_{W_p(Q, P_data) <= eps} E_Q l(z; theta)``.

    Transport cost ``c((x, y), (x', y')) = ||x - x'||_2 + kappa [y != y']`` (``kappa = inf``: labels
    never flip). Which problem is solved:

    * ``p = 1`` and ``support is None``: continuous support (``x`` may move anywhere in R^d),
      docs/theory_wasserstein.md section 1 / Shafieezadeh-Abadeh et al. (2015). ``solver="native"``:
      :func:`solve_wdpo_continuous_native` (any ``kappa``; falls back to cvxpy, and says so in
      ``solver``, when it cannot certify); ``"cvxpy"``: :func:`solve_wdpo_continuous_cvxpy`.
    * ``p = 2`` or a ``support`` given: the adversary may move mass only to the support points
      (default ``FiniteSupport.from_data(data, flips=kappa < inf)``): :func:`solve_wdpo_finite`.

    Returns a :class:`SolverResult` with ``method="wdpo"``, ``lam`` the transport multiplier,
    ``worst_case`` the worst-case distribution as arrays (points, labels, masses; on the continuous
    support also the budget sent to infinity when the supremum is not attained), ``weights`` (m,)
    and ``plan`` (m, m) on a finite support of m points (``info["flip_fraction"]`` (n,) on the
    continuous one) and a certified ``duality_gap`` (status optimal iff <= 1e-7).
    """
    eps, kappa, p = _check_all(data, beta, radius, eps, kappa, p)
    if solver not in ("native", "cvxpy"):
        raise ValueError(f"unknown solver {solver!r}; expected 'native' or 'cvxpy'")
    if eps == 0 and kappa > 0 and solver == "native" and not (p == 1 and support is None):
        # the cost is a metric when kappa > 0, so the ball of radius 0 is {P}: WDPO is DPO exactly
        from dataclasses import replace

        from .dpo import solve_dpo_native

        res = solve_dpo_native(data, beta, radius)
        return replace(res, method="wdpo", worst_case=from_tuple_weights(data.x, data.y, data.weights),
                       info={**res.info, "kappa": kappa, "p": p,
                             "note": "eps = 0 with kappa > 0: the Wasserstein ball is {P}, so WDPO = DPO"})
    if p == 1 and support is None:
        if solver == "native":
            return solve_wdpo_continuous_native(data, beta, radius, eps, kappa)
        return solve_wdpo_continuous_cvxpy(data, beta, radius, eps, kappa)
    res = solve_wdpo_finite(data, beta, radius, eps, p, kappa, support)
    if solver == "native":
        res.info["note"] = "finite support is solved by cutting planes with cvxpy (Clarabel)"
    return res
