"""Sample-complexity bounds for DPO, WDPO and KLDPO on the log-linear class, every constant explicit.

docs/theory.md section 4; the full derivations are in docs/theory_bounds.md (equation labels B1-B9 are
cited below). Everything here is deterministic arithmetic on numbers the caller computed from the
instance (``model.nominal()``) and from the exact population solutions; this module imports no
solver (dependencies point ``experiments -> solvers -> bounds -> model``).

The chain of every bound (docs/theory.md section 4):

1. *Excess-risk bound* ``E_n(delta)``: with probability ``>= 1 - delta`` over the sample,
   ``L(theta_n; P°) - L(theta_pop; P°) <= E_n`` (one function per objective:
   :func:`dpo_excess_bound` (also WDPO with continuous support and ``kappa = inf``),
   :func:`kldpo_excess_bound`, :func:`wdpo_finite_excess_bound`).
2. *Quadratic growth* of the population objective around its minimiser,
   ``L(theta; P°) - L(theta_pop; P°) >= gamma/2 ||theta - theta_pop||^2``, so
   ``||theta_n - theta_pop|| <= sqrt(2 E_n / gamma)`` (:func:`error_from_excess`). The paper's form
   ``2 sqrt(D_n/gamma)`` is the case ``E_n = 2 D_n`` (:func:`theorem_error_bound`).
3. ``gamma`` either global (``beta^2 c_B lambda_cov``, :func:`strong_convexity`) or localised
   around ``theta_pop`` (:func:`local_growth`, :func:`localized_error_bound`): both valid on the
   same event, the localised one is never larger.

Two sets of constants go through the same formulas (:class:`BoundConstants`):
``paper`` (``||x|| <= 2``, ``||theta - theta_ref|| <= 2B``, so ``|beta h| <= 4 beta B``,
``L_max = log(1 + e^{4 beta B})``, ``c_B = sigma(4 beta B) sigma(-4 beta B)``) and ``instance``
(the support's own ``max ||x||``, ``sqrt(E||x||^2)`` and ``||theta_ref||``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "BoundConstants",
    "softplus",
    "hessian_weight",
    "loss_bound",
    "curvature_constant",
    "strong_convexity",
    "rademacher_dpo",
    "dpo_uniform_deviation",
    "dpo_excess_bound",
    "theorem_error_bound",
    "theorem_sample_size",
    "error_from_excess",
    "local_growth",
    "localized_error_bound",
    "KLProfile",
    "kldpo_excess_bound",
    "wdpo_finite_excess_bound",
    "sample_size",
    "parametric_reference",
]


# ----------------------------------------------------------------------------------------------
# Elementary functions and the constants of docs/theory.md section 2
# ----------------------------------------------------------------------------------------------


def softplus(t: ArrayLike) -> NDArray[np.float64] | float:
    """``log(1 + e^t)``, stable; the DPO loss is ``softplus(-ytil beta h)``."""
    return np.logaddexp(0.0, t)


def hessian_weight(t: ArrayLike) -> NDArray[np.float64] | float:
    """``s(t) = sigma(t) sigma(-t) = e^t/(1+e^t)^2``: even, decreasing in ``|t|``, ``s(0) = 1/4``.

    Computed as ``exp(-|t| - 2 log(1 + e^{-|t|}))`` so it never overflows.
    """
    a = np.abs(np.asarray(t, dtype=float))
    return np.exp(-a - 2.0 * np.logaddexp(0.0, -a))


def loss_bound(beta: float, radius: float) -> float:
    """``L_max = log(1 + e^{4 beta B})`` (B1): ``0 <= l <= L_max`` on ``||theta|| <= B``, ``||x|| <= 2``."""
    return float(softplus(4.0 * beta * radius))


def curvature_constant(beta: float, radius: float) -> float:
    """``c_B = e^{4 beta B} / (1 + e^{4 beta B})^2 = s(4 beta B)`` (B2).

    The Hessian of ``l`` is ``beta^2 s(t) x x^T`` with ``t = ytil beta (theta - theta_ref).x`` and
    ``|t| <= beta ||theta - theta_ref|| ||x|| <= beta * 2B * 2 = 4 beta B``; ``s`` decreases in
    ``|t|``, so ``s(t) >= s(4 beta B) = c_B``.
    """
    return float(hessian_weight(4.0 * beta * radius))


def strong_convexity(beta: float, radius: float, lambda_cov: float) -> float:
    """``gamma = beta^2 c_B lambda_cov`` (B2): ``E_P l`` is gamma-strongly convex on the ball when
    ``E_P[x x^T] >= lambda_cov I``."""
    return float(beta**2 * curvature_constant(beta, radius) * lambda_cov)


@dataclass(frozen=True)
class BoundConstants:
    """The numbers every bound uses, with where they come from.

    Attributes
    ----------
    beta : DPO temperature.
    radius : B, the parameter ball ``||theta|| <= B``.
    d : dimension.
    x_max : bound on ``||x||`` over the support (paper: 2).
    x_rms : bound on ``sqrt(E_P° ||x||^2)`` (paper: 2); enters the Rademacher complexity.
    theta_ref_norm : bound on ``||theta_ref||`` (paper: B, i.e. ``||theta - theta_ref|| <= 2B``).
    lambda_cov : smallest eigenvalue of ``E_Q[x x^T]`` for the relevant ``Q`` (docs/theory.md section 2).
    label : "paper" or "instance".

    Derived: ``tau = beta x_max (B + theta_ref_norm)`` bounds every margin ``|t|``; the loss lies in
    ``[l_lo, l_hi] = [softplus(-tau), softplus(tau)]``, whose width is exactly ``tau``.
    """

    beta: float
    radius: float
    d: int
    x_max: float
    x_rms: float
    theta_ref_norm: float
    lambda_cov: float
    label: str = "instance"

    def __post_init__(self) -> None:
        for name in ("beta", "radius", "x_max", "x_rms"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not (np.isfinite(self.theta_ref_norm) and self.theta_ref_norm >= 0):
            raise ValueError(f"theta_ref_norm must be >= 0, got {self.theta_ref_norm!r}")
        if not (np.isfinite(self.lambda_cov) and self.lambda_cov >= 0):
            raise ValueError(f"lambda_cov must be >= 0, got {self.lambda_cov!r}")

    @classmethod
    def paper(cls, beta: float, radius: float, d: int, lambda_cov: float) -> "BoundConstants":
        """The paper's constants (docs/theory.md section 2): ``||x|| <= 2``, ``||theta_ref|| <= B``; only
        ``lambda_cov`` is measured."""
        return cls(beta, radius, d, 2.0, 2.0, radius, lambda_cov, "paper")

    @classmethod
    def instance(cls, x: ArrayLike, p: ArrayLike, beta: float, radius: float, theta_ref: ArrayLike,
                 q: ArrayLike | None = None) -> "BoundConstants":
        """Constants of a finite distribution: ``x`` (m, d) support, ``p`` (m,) probabilities.

        ``lambda_cov`` is ``lambda_min(E_q[x x^T])`` for ``q`` (default ``p``): pass the worst case
        ``Q*`` at the population optimum for the robust objectives (see :func:`local_growth`).
        """
        x = np.asarray(x, float)
        p = np.asarray(p, float)
        w = p if q is None else np.asarray(q, float)
        sq = np.einsum("ij,ij->i", x, x)
        lam_cov = float(np.linalg.eigvalsh((x * w[:, None]).T @ x)[0])
        return cls(beta, radius, x.shape[1], float(np.sqrt(sq.max())), float(np.sqrt(p @ sq)),
                   float(np.linalg.norm(theta_ref)), max(lam_cov, 0.0), "instance")

    @property
    def tau(self) -> float:
        """Margin bound ``beta x_max (B + ||theta_ref||)`` (paper: ``4 beta B``) = width of the loss range."""
        return self.beta * self.x_max * (self.radius + self.theta_ref_norm)

    @property
    def l_lo(self) -> float:
        """Smallest possible loss ``softplus(-tau)``."""
        return float(softplus(-self.tau))

    @property
    def l_hi(self) -> float:
        """Largest possible loss ``softplus(tau)`` (paper: ``L_max``)."""
        return float(softplus(self.tau))

    @property
    def gamma(self) -> float:
        """Global strong-convexity constant ``beta^2 s(tau) lambda_cov`` (paper: ``beta^2 c_B lambda_cov``)."""
        return float(self.beta**2 * hessian_weight(self.tau) * self.lambda_cov)

    @property
    def diameter(self) -> float:
        """``2B``: no error can exceed it (a bound above it is vacuous)."""
        return 2.0 * self.radius

    def with_lambda_cov(self, lambda_cov: float) -> "BoundConstants":
        return replace(self, lambda_cov=float(lambda_cov))


# ----------------------------------------------------------------------------------------------
# DPO and WDPO (continuous support, kappa = inf)
# ----------------------------------------------------------------------------------------------


def _hoeffding(width, n, delta):
    """One-sided Hoeffding/McDiarmid deviation ``width * sqrt(log(1/delta) / (2n))``."""
    return width * np.sqrt(np.log(1.0 / delta) / (2.0 * np.asarray(n, dtype=float)))


def rademacher_dpo(n: ArrayLike, c: BoundConstants) -> NDArray[np.float64]:
    """``R_n <= beta B x_rms / sqrt(n)`` (B3): Rademacher complexity of the DPO loss class.

    Contraction (softplus is 1-Lipschitz) reduces it to the linear class
    ``{u -> beta (theta - theta_ref).u}``, whose complexity is
    ``beta B E||sum_i sigma_i u_i|| / n <= beta B sqrt(E||x||^2) / sqrt(n)`` (the ``theta_ref`` part has
    mean zero).
    """
    return c.beta * c.radius * c.x_rms / np.sqrt(np.asarray(n, dtype=float))


def dpo_uniform_deviation(n: ArrayLike, delta: float, c: BoundConstants) -> NDArray[np.float64]:
    """``D_n = 2 R_n + tau sqrt(log(2/delta)/(2n))`` (B4): ``sup_Theta |E_{P_n} l - E_P° l| <= D_n``
    with probability ``>= 1 - delta`` (symmetrisation and McDiarmid on each side, ``delta/2`` each;
    changing one sample moves the supremum by at most ``tau/n``).

    Also the uniform deviation of WDPO with continuous support, ``p = 1``, ``kappa = inf``:
    ``L_W(theta; P) = E_P l + eps beta ||theta - theta_ref||`` and the norm term cancels.
    """
    return 2.0 * rademacher_dpo(n, c) + _hoeffding(c.tau, n, delta / 2.0)


def dpo_excess_bound(n: ArrayLike, delta: float, c: BoundConstants, fixed_width: float | None = None,
                     gap_pop: float = 0.0) -> NDArray[np.float64]:
    """Excess population loss of the empirical optimum (B5), probability ``>= 1 - delta``:

    .. math:: L(\\theta_n;P°) - L(\\theta_{pop};P°) \\le
              \\sup_\\Theta (P° - P_n)\\ell + (P_n - P°)\\ell(\\theta_{pop})
              \\le 2R_n + \\tau\\sqrt{\\tfrac{\\log(2/\\delta)}{2n}}
                + w\\sqrt{\\tfrac{\\log(2/\\delta)}{2n}} + \\mathrm{gap}_{pop}

    (the middle term ``L(theta_n;P_n) - L(theta_pop;P_n) <= 0`` is dropped). ``w`` is the width of
    ``l(.; theta_pop)`` on the support (default ``tau``); ``gap_pop`` the certified suboptimality
    of the computed population solution. With ``w = tau``, ``gap_pop = 0`` this is
    ``2 D_n - 2 R_n <= 2 D_n`` (docs/theory.md section 4).
    """
    w = c.tau if fixed_width is None else float(fixed_width)
    return (2.0 * rademacher_dpo(n, c) + _hoeffding(c.tau, n, delta / 2.0) + _hoeffding(w, n, delta / 2.0)
            + float(gap_pop))


def theorem_error_bound(n: ArrayLike, delta: float, c: BoundConstants) -> NDArray[np.float64]:
    """The paper's form (docs/theory.md section 4): ``||theta_n - theta_pop|| <= 2 sqrt(D_n / gamma)`` (B6)."""
    if c.gamma <= 0:
        return np.full(np.shape(n), np.inf)
    return 2.0 * np.sqrt(dpo_uniform_deviation(n, delta, c) / c.gamma)


def theorem_sample_size(epsilon: float, delta: float, c: BoundConstants) -> float:
    """``n(epsilon, delta)`` for :func:`theorem_error_bound` in closed form (B7).

    ``D_n = a / sqrt(n)`` with ``a = 2 beta B x_rms + tau sqrt(log(2/delta)/2)``, and
    ``2 sqrt(D_n/gamma) <= epsilon  <=>  n >= (4 a / (gamma epsilon^2))^2``.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    if c.gamma <= 0:
        return math.inf
    a = 2.0 * c.beta * c.radius * c.x_rms + c.tau * math.sqrt(math.log(2.0 / delta) / 2.0)
    return float(math.ceil((4.0 * a / (c.gamma * epsilon**2)) ** 2))


def error_from_excess(excess: ArrayLike, gamma: float) -> NDArray[np.float64]:
    """``sqrt(2 excess / gamma)`` (B6): quadratic growth turns an excess-loss bound into a parameter bound."""
    excess = np.asarray(excess, dtype=float)
    if gamma <= 0:
        return np.full(excess.shape, np.inf)
    return np.sqrt(2.0 * np.maximum(excess, 0.0) / gamma)


# ----------------------------------------------------------------------------------------------
# Localised quadratic growth
# ----------------------------------------------------------------------------------------------


def local_growth(r: float, x: ArrayLike, q: ArrayLike, beta: float, radius: float, theta_pop: ArrayLike,
                 theta_ref: ArrayLike) -> float:
    """Growth constant of ``E_q l`` on ``{||theta - theta_pop|| <= r} cap Theta`` (B8).

    .. math:: \\gamma(r) = \\beta^2 \\lambda_{min}\\Bigl(\\sum_j q_j\\, s(t_j(r))\\, x_j x_j^T\\Bigr),\\quad
              t_j(r) = \\beta\\min\\bigl(|(\\theta_{pop} - \\theta_{ref}).x_j| + r\\|x_j\\|,\\
                                      (B + \\|\\theta_{ref}\\|)\\|x_j\\|\\bigr),

    a lower bound on the Hessian ``beta^2 sum_j q_j s(t_j(theta)) x_j x_j^T`` at every such
    ``theta`` (``s`` decreases in ``|t|``). If ``theta_pop`` minimises ``E_q l`` over Theta and
    ``L(theta; P°) >= E_q l(theta)`` with equality at ``theta_pop`` (``q = P°`` for DPO/WDPO-W1; a
    saddle-point worst case ``Q*`` for KLDPO and finite-support WDPO), then
    ``L(theta) - L(theta_pop) >= gamma(r)/2 ||theta - theta_pop||^2`` there.
    """
    x = np.asarray(x, float)
    q = np.asarray(q, float)
    tp = np.asarray(theta_pop, float) - np.asarray(theta_ref, float)
    xn = np.linalg.norm(x, axis=1)
    tmax = beta * np.minimum(np.abs(x @ tp) + r * xn, (radius + float(np.linalg.norm(theta_ref))) * xn)
    M = (x * (q * hessian_weight(tmax))[:, None]).T @ x
    return max(0.0, float(beta**2 * np.linalg.eigvalsh(M)[0]))


def localized_error_bound(excess: float, growth, r0: float, max_iter: int = 100) -> float:
    """Fixed point of ``r <- min(r, sqrt(2 excess / gamma(r)))`` from ``r0`` (the diameter) (B8).

    On the event ``L(theta_n) - L(theta_pop) <= excess``: if ``||theta_n - theta_pop|| <= r_k``, the
    segment lies in the ``r_k``-ball, so growth ``gamma(r_k)`` holds along it and
    ``||theta_n - theta_pop|| <= sqrt(2 excess / gamma(r_k))``; every iterate is a valid bound on the
    same event and the sequence decreases.
    """
    if not np.isfinite(excess):
        return math.inf
    r = float(r0)
    for _ in range(max_iter):
        g = growth(r)
        r_new = min(r, math.sqrt(2.0 * max(excess, 0.0) / g) if g > 0 else math.inf)
        if r_new >= r * (1 - 1e-12):
            return r_new
        r = r_new
    return r


# ----------------------------------------------------------------------------------------------
# KLDPO
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KLProfile:
    """Population numbers the KLDPO bound needs (computed by the caller with exact solvers).

    Attributes
    ----------
    rho : KL radius.
    lam_pop : ``lam*`` at the population optimum (> 0).
    value_pop : ``F°(theta_pop, lam_pop)``, the population optimal value (an upper bound on it).
    gap_pop : certified ``value_pop - min``.
    w_width : width ``max_j w_j - min_j w_j`` of the worst-case likelihood ratio
        ``w_j = q*_j / P°_j = e^{l_j/lam}/E_P° e^{l/lam}`` at ``(theta_pop, lam_pop)`` on the support.
    lam_table : (K,) increasing ``lam`` values, covering ``[lam_lo candidates, tau/rho]``.
    phi_lower : (K,) certified lower bounds on ``phi(lam) = min_Theta F°(theta, lam)``,
        ``F°(theta, lam) = lam rho + lam log E_P° e^{l(theta)/lam}``.
    """

    rho: float
    lam_pop: float
    value_pop: float
    gap_pop: float
    w_width: float
    lam_table: NDArray[np.float64]
    phi_lower: NDArray[np.float64]

    def psi_lower(self, lam: NDArray[np.float64], dpo_min: float) -> NDArray[np.float64]:
        """Lower bound on ``psi(lam) = min_Theta lam log E_P° e^{l/lam} = phi(lam) - lam rho``.

        ``lam log E e^{l/lam}`` is nonincreasing in ``lam`` for every ``theta``, so ``psi`` is too:
        at ``lam`` use the table entry at the next ``lam_j >= lam``; beyond the table use
        ``psi(inf) = min_Theta E_P° l`` (``dpo_min``, Jensen: ``psi >= dpo_min`` everywhere).
        """
        lam = np.asarray(lam, float)
        psi_tab = self.phi_lower - self.lam_table * self.rho
        j = np.searchsorted(self.lam_table, lam * (1 - 1e-15), side="left")
        out = np.full(lam.shape, float(dpo_min))
        inside = j < len(self.lam_table)
        out[inside] = np.maximum(psi_tab[j[inside]], dpo_min)
        return out


def kldpo_excess_bound(n: float, delta: float, c: BoundConstants, prof: KLProfile, dpo_min: float,
                       grid_frac: float = 0.25, return_details: bool = False):
    """Excess population KL-robust loss of the empirical KLDPO optimum, probability ``>= 1 - delta`` (B9).

    Joint dual ``F_P(theta, lam) = lam rho + lam log E_P e^{l(theta)/lam}`` (jointly convex);
    ``L_KL(theta;P) = inf_{lam>0} F_P``. Events (``delta/2`` each):

    A. fixed point: ``F_n(theta_pop, lam_pop) - F°(theta_pop, lam_pop) = lam_pop log E_{P_n} w
       <= lam_pop (P_n - P°) w <= eps_A = lam_pop * w_width * sqrt(log(2/delta)/(2n))``.
    B. on a grid ``lam_lo = lam_0 < ... < lam_{K-1} = lam_hi = tau/rho`` (spacing ``h``), for every
       ``k`` (``delta/(2K)`` each): with ``g = e^{(l - l_hi)/lam} in [e^{-tau/lam}, 1]``, 
       ``(1/lam)``-Lipschitz in the margin,
       ``sup_Theta (P° - P_n) g <= eps_u = 2 beta B x_rms/(lam sqrt n) + (1 - e^{-tau/lam}) sqrt(log(2K/delta)/(2n))``,
       and since ``E_P° g >= a_min = exp((psi(lam) - l_hi)/lam)``,
       ``sup_Theta (F° - F_n)(., lam) <= dev(lam) = -lam log(1 - eps_u/a_min)``
       (the exp-moment factor: ``1/a_min <= e^{tau/lam}``; paper: ``e^{L_max/lam_lo}``).

    Localisation: ``lam_n >= lam_lo`` for the empirical optimum if
    ``phi(lam_lo) - dev(lam_lo) > value_pop + eps_A`` (then ``F_n`` on the slice ``lam = lam_lo``
    exceeds ``F_n(theta_pop, lam_pop)`` and joint convexity pushes every ``lam < lam_lo`` higher
    still); ``lam_n <= tau/rho`` holds for every distribution (``rho = KL(Q*||P) <= tau/lam*``).
    ``lam_n > 0`` makes ``d/dlam F_n(theta_n, lam_n) = 0``, and ``d^2/dlam^2 F = Var_Q(l)/lam^3 <=
    tau^2/(4 lam^3)``, so the nearest grid point costs at most ``tau^2 h^2/(32 lam_lo^3)``. Hence

    .. math:: L(\\theta_n;P°) - L(\\theta_{pop};P°) \\le \\max_k dev(\\lambda_k)
              + \\frac{\\tau^2h^2}{32\\lambda_{lo}^3} + \\varepsilon_A + \\mathrm{gap}_{pop}.

    ``lam_lo`` is chosen among ``prof.lam_table`` entries below ``lam_pop`` to minimise the bound
    (a deterministic function of ``n``: no data snooping); ``h`` makes the grid term
    ``grid_frac * eps_A``. Returns ``inf`` when no ``lam_lo`` localises (small ``n``).
    """
    n = float(n)
    tau, l_hi = c.tau, c.l_hi
    if not (prof.lam_pop > 0 and np.isfinite(prof.lam_pop)) or prof.rho <= 0:
        return (math.inf, {}) if return_details else math.inf
    lam_hi = tau / prof.rho
    eps_a = float(_hoeffding(prof.w_width, n, delta / 2.0)) * prof.lam_pop
    best, best_det = math.inf, {}
    for lam_lo, phi_lo in zip(prof.lam_table, prof.phi_lower):
        if not (0 < lam_lo < prof.lam_pop) or lam_lo >= lam_hi:
            continue
        grid_err_target = max(grid_frac * eps_a, 1e-300)
        h = math.sqrt(32.0 * lam_lo**3 * grid_err_target) / tau
        K = int(math.ceil((lam_hi - lam_lo) / h)) + 1
        if K > 5_000_000:
            continue
        lam = np.linspace(lam_lo, lam_hi, K)
        h_eff = (lam_hi - lam_lo) / (K - 1) if K > 1 else 0.0
        log_term = np.sqrt(np.log(2.0 * K / delta) / (2.0 * n))
        eps_u = 2.0 * c.beta * c.radius * c.x_rms / (lam * math.sqrt(n)) + (1.0 - np.exp(-tau / lam)) * log_term
        with np.errstate(over="ignore", divide="ignore"):
            a_min = np.exp((prof.psi_lower(lam, dpo_min) - l_hi) / lam)
            ratio = eps_u / a_min
        if np.any(ratio >= 1.0):
            continue
        dev = -lam * np.log1p(-ratio)
        if not phi_lo - dev[0] > prof.value_pop + eps_a:
            continue
        excess = float(dev.max() + tau**2 * h_eff**2 / (32.0 * lam_lo**3) + eps_a + prof.gap_pop)
        if excess < best:
            best = excess
            best_det = {"lam_lo": float(lam_lo), "lam_hi": lam_hi, "grid_points": K, "eps_A": eps_a,
                        "max_dev": float(dev.max()), "exp_factor": float(1.0 / a_min[0])}
    return (best, best_det) if return_details else best


# ----------------------------------------------------------------------------------------------
# WDPO on a finite support (p in {1, 2})
# ----------------------------------------------------------------------------------------------


def wdpo_finite_excess_bound(n: float, delta: float, c: BoundConstants, eps: float, p: int, cost_max: float,
                             fixed_width: float, gap_pop: float = 0.0, return_details: bool = False):
    """Excess population W_p-robust loss of the empirical finite-support WDPO optimum (B10).

    Dual ``F_P(theta, lam) = lam eps^p + sum_j P_j phi_j(theta, lam)``,
    ``phi_j = max_k [l(z_k; theta) - lam c_jk^p]`` (finite costs only), linear in ``P``, with
    ``phi_j in [l_lo, l_hi]``, ``beta x_max``-Lipschitz in ``theta`` and ``cost_max``-Lipschitz in
    ``lam``; ``lam* <= Lambda = tau/eps^p`` for every ``P`` (``F(0) <= l_hi``, ``F(lam) >= lam eps^p + l_lo``).
    Cover ``Theta x [0, Lambda]`` by ``N = (1 + 2B/r_t)^d ceil(Lambda/(2 r_l))`` points; Hoeffding on
    each with ``delta/(2N)``, and moving to the nearest point costs ``2 (beta x_max r_t + cost_max r_l)``:

    .. math:: E_n \\le \\min_{r_t, r_l}\\Bigl[2(\\beta x_{max} r_t + c_{max} r_l)
              + \\tau\\sqrt{\\tfrac{d\\log(1 + 2B/r_t) + \\log\\lceil\\Lambda/2r_l\\rceil + \\log(2/\\delta)}{2n}}\\Bigr]
              + w\\sqrt{\\tfrac{\\log(2/\\delta)}{2n}} + \\mathrm{gap}_{pop},

    ``w`` the width of ``phi(theta_pop, lam_pop)`` on the support (fixed-point Hoeffding). The radii
    are picked from a fixed grid (a deterministic function of ``n``).
    """
    n = float(n)
    tau = c.tau
    lam_max = tau / eps**p
    best, det = math.inf, {}
    for a in np.geomspace(0.05, 20.0, 25):
        r_t = a / (c.beta * c.x_max * math.sqrt(n))
        for b in np.geomspace(0.05, 20.0, 25):
            r_l = b / (max(cost_max, 1e-12) * math.sqrt(n))
            n_l = max(1.0, math.ceil(lam_max / (2.0 * r_l)))
            log_n = c.d * math.log1p(2.0 * c.radius / r_t) + math.log(n_l) + math.log(2.0 / delta)
            val = 2.0 * (c.beta * c.x_max * r_t + cost_max * r_l) + tau * math.sqrt(log_n / (2.0 * n))
            if val < best:
                best, det = val, {"r_theta": r_t, "r_lam": r_l, "log_cover": log_n - math.log(2.0 / delta)}
    total = best + float(_hoeffding(fixed_width, n, delta / 2.0)) + gap_pop
    return (total, det) if return_details else total


# ----------------------------------------------------------------------------------------------
# Sample size and the parametric reference
# ----------------------------------------------------------------------------------------------


def sample_size(error_bound, epsilon: float, n_max: float = 1e15) -> float:
    """Smallest ``n`` with ``error_bound(n) <= epsilon`` (bisection on ``log n``; ``error_bound``
    nonincreasing in ``n``); ``inf`` if even ``n_max`` does not reach it."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    if error_bound(n_max) > epsilon:
        return math.inf
    lo, hi = 1.0, float(n_max)
    if error_bound(lo) <= epsilon:
        return 1.0
    while hi - lo > 1:
        mid = math.floor(math.sqrt(lo * hi)) if hi / lo > 4 else math.floor((lo + hi) / 2)
        mid = min(max(mid, lo + 1), hi - 1) if hi - lo > 1 else mid
        if error_bound(mid) <= epsilon:
            hi = mid
        else:
            lo = mid
    return float(hi)


def parametric_reference(n: ArrayLike, d: int, C: float = 1.0) -> NDArray[np.float64]:
    """``C sqrt(d/n)``: the parametric rate (DRO-REBEL, arXiv 2509.19104) as a reference curve."""
    return C * np.sqrt(d / np.asarray(n, dtype=float))
