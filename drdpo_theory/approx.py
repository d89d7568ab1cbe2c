"""The paper's scalable gradient approximations of KLDPO / WDPO and their exact counterparts.

docs/theory.md section 5. On an LLM the minimax gradients are not available, so the paper trains with
approximations. On the log-linear class (docs/theory.md section 2) the exact answer is known, so each
approximation here is a pure function ``(theta, batch, hyper-parameters) -> gradient (d,)`` that
can be compared with the exact Danskin gradient.

Notation (shapes in brackets): ``batch`` is a :class:`~drdpo_theory.data.PreferenceData` with
``x`` (n, d), ``y`` (n,), ``weights`` ``p`` (n,) summing to 1 (``1/n`` for a mini-batch: every
"mean" below is the ``p``-weighted mean), ``theta_ref`` (d,). ``u_i = ytil_i x_i``,
``v = theta - theta_ref``, ``t_i = beta v.u_i``, ``l_i = log(1 + exp(-t_i))`` and

.. math:: \\nabla_\\theta \\ell_i = -\\beta\\,\\sigma(-t_i)\\,u_i .

KLDPO (the authors' code; docs/theory.md section 5)
    ``w_i = min(exp((l_i - mean_j l_j)/tau), 10)`` (detached, *not* normalised) and gradient
    ``mean_i w_i grad l_i`` (:func:`kldpo_grad_clamped`); the normalised variant uses the tilt
    ``q_i ∝ p_i exp(l_i/tau)`` (:func:`kldpo_grad_softmax`), which is the exact worst case when
    ``tau = lam*(rho)``; the calibrated variant solves the 1-D dual for ``lam*`` on the batch
    (:func:`kldpo_grad_calibrated`, via :func:`~drdpo_theory.solvers.kl.kl_inner`).

WDPO
    ``z = (phi(s,a1), phi(s,a2))`` (both answers' features; the LLM's input embeddings). The
    loss depends on ``z`` only through ``x = phi1 - phi2``, so

    .. math:: \\nabla_{\\phi_1}\\ell = -\\nabla_{\\phi_2}\\ell = \\nabla_x \\ell
              = -\\tilde y\\,\\beta\\,\\sigma(-\\tilde y \\beta h)\\,(\\theta - \\theta_{ref})

    and ``||grad_z l||^2 = 2 ||grad_x l||^2``. ``space="z"`` (default, as in the authors' code)
    uses ``grad_z``; ``space="x"`` uses ``grad_x``, the gradient in the space where this
    project's transport cost ``||x - x'||`` lives (docs/theory.md section 3.2). Since ``l`` depends on
    ``z`` only through ``x`` and the cheapest ``z``-move realising ``Delta x`` costs
    ``||Delta x||/sqrt(2)``, a ``W_p`` ball of radius ``eps_z`` in ``z`` is a ball of radius
    ``sqrt(2) eps_z`` in ``x`` (:func:`eps_x_from_z`).

    * squared gradient penalty (authors): ``mean_i [l_i + rho0 ||grad_z l_i||^2]``
      (:func:`wdpo_sq_penalty`, gradient in closed form in :func:`wdpo_sq_penalty_grad`);
    * Gao-Chen-Kleywegt first-order form ``mean l + eps sqrt(mean ||grad_z l||^2)``
      (:func:`first_order_value`, :func:`first_order_grad`);
    * one-step adversarial perturbation ``z' = z + eta grad_z l`` and gradient
      ``mean_i grad_theta l(z'_i; theta)`` with ``z'`` detached (:func:`wdpo_grad_adversarial`):
      no double backward. With ``eta = eps / sqrt(mean ||grad_z l||^2)`` it is a finite difference
      of the first-order form's gradient; with ``eta = 2 rho0`` of the squared penalty's.

Exact counterparts (ground truth)
    :func:`kldpo_grad_exact` (the core solver's Danskin gradient), :func:`wdpo_grad_exact`
    (``p = 1``: the core solver; ``p = 2`` continuous support: :func:`w2_inner_continuous`,
    implemented here because the core solver's continuous-support path is ``p = 1``).

Closed forms used below (``a_i = beta sigma(-t_i)``, ``c = 2`` for ``space="z"``, 1 for ``"x"``):

.. math::

    \\|\\nabla_z \\ell_i\\|^2 = c\\, a_i^2 \\|v\\|^2, \\qquad
    G(\\theta) := \\textstyle\\sum_i p_i \\|\\nabla_z \\ell_i\\|^2 = c\\, S\\, \\|v\\|^2,\\quad
    S = \\sum_i p_i a_i^2,

    \\nabla_\\theta G = c\\bigl(\\|v\\|^2 \\nabla S + 2 S v\\bigr),\\qquad
    \\nabla S = -2\\beta^3 \\textstyle\\sum_i p_i\\, \\sigma(-t_i)^2 \\sigma(t_i)\\, u_i .

So the mean squared penalty is ``rho0 G`` with gradient ``rho0 grad G``, and the first-order form's
penalty ``eps sqrt(G)`` has gradient ``eps grad G / (2 sqrt G)`` (finite-difference checked in
``tests/test_approx.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .data import PreferenceData
from .losses import dpo_grad, dpo_loss, sigmoid, signed_labels

__all__ = [
    "KL_WEIGHT_CLAMP",
    "SPACES",
    "eps_x_from_z",
    "batch_losses",
    "dpo_grad_batch",
    "kl_tilt_weights",
    "kldpo_grad_clamped",
    "kldpo_grad_softmax",
    "kldpo_grad_calibrated",
    "kldpo_grad_exact",
    "grad_z",
    "grad_z_sqnorm",
    "penalty_moment",
    "penalty_moment_grad",
    "wdpo_sq_penalty",
    "wdpo_sq_penalty_grad",
    "wdpo_grad_sq_penalty",
    "first_order_value",
    "first_order_grad",
    "wdpo_grad_first_order",
    "wdpo_grad_adversarial",
    "W2Inner",
    "w2_inner_continuous",
    "w2_value_continuous",
    "w2_gradient_continuous",
    "solve_w2_continuous",
    "w2_collapse_radius",
    "wdpo_grad_exact",
    "cosine",
    "rel_error",
]

#: The authors' clamp on the unnormalised KLDPO weights ``exp((l_i - mean l)/tau)``.
KL_WEIGHT_CLAMP = 10.0
#: ``"z"``: gradients w.r.t. both answers' features (authors); ``"x"``: w.r.t. ``x = phi1 - phi2``.
SPACES = ("z", "x")


def _space_factor(space: str) -> float:
    """``c`` with ``||grad_space l||^2 = c ||grad_x l||^2``."""
    if space == "z":
        return 2.0
    if space == "x":
        return 1.0
    raise ValueError(f"space must be 'z' (both answers' features) or 'x' (phi1 - phi2), got {space!r}")


def eps_x_from_z(eps_z: float) -> float:
    """A ``W_p`` radius in ``z = (phi1, phi2)`` equals ``sqrt(2) eps_z`` in ``x = phi1 - phi2``."""
    return math.sqrt(2.0) * float(eps_z)


def _check_batch(batch) -> PreferenceData:
    if not isinstance(batch, PreferenceData):
        raise TypeError(f"batch must be a PreferenceData, got {type(batch).__name__}")
    return batch


def _positive(name: str, value: float) -> float:
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _nonneg(name: str, value: float) -> float:
    v = float(value)
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def batch_losses(theta, batch: PreferenceData, beta: float) -> NDArray[np.float64]:
    """Per-pair DPO losses ``l_i``, (n,)."""
    return dpo_loss(theta, batch.x, batch.y, beta, batch.theta_ref)


def _margins_t(theta, batch: PreferenceData, beta: float) -> NDArray[np.float64]:
    """``t_i = ytil_i beta (theta - theta_ref).x_i`` (n,): ``l_i = softplus(-t_i)``."""
    v = np.asarray(theta, float) - batch.theta_ref
    return beta * (batch.u @ v)


def dpo_grad_batch(theta, batch: PreferenceData, beta: float) -> NDArray[np.float64]:
    """DPO mini-batch gradient ``sum_i p_i grad l_i``, (d,)."""
    _check_batch(batch)
    return batch.weights @ dpo_grad(theta, batch.x, batch.y, beta, batch.theta_ref)


# ----------------------------------------------------------------------------------------------
# KLDPO
# ----------------------------------------------------------------------------------------------


def kl_tilt_weights(losses, weights, tau: float, *, normalise: bool, clamp: float | None = KL_WEIGHT_CLAMP):
    """Exponential-tilt weights of the KLDPO approximations, (n,).

    ``normalise=False`` (authors): ``w_i = min(exp((l_i - sum_j p_j l_j)/tau), clamp)``, used as
    ``sum_i p_i w_i grad l_i`` (for a uniform batch: ``mean_i w_i grad l_i``); they do not sum to 1.
    ``normalise=True``: ``q_i = p_i exp(l_i/tau) / sum_j p_j exp(l_j/tau)`` (returned as
    ``q_i / p_i`` so that both variants are applied the same way; ``clamp`` is ignored).
    """
    tau = _positive("tau", tau)
    l = np.asarray(losses, float)
    p = np.asarray(weights, float)
    if normalise:
        s = l / tau
        s = s - s.max()  # shift before exp: the softmax is invariant, exp cannot overflow
        e = np.exp(s)
        return e / (p @ e)
    w = np.exp((l - p @ l) / tau)
    if clamp is not None:
        w = np.minimum(w, clamp)
    return w


def kldpo_grad_clamped(theta, batch: PreferenceData, beta: float, tau: float,
                       clamp: float | None = KL_WEIGHT_CLAMP) -> NDArray[np.float64]:
    """The authors' KLDPO gradient: ``mean_i min(exp((l_i - mean l)/tau), 10) grad l_i``, (d,).

    Weights are detached (no gradient through them) and not normalised, so the norm is inflated
    by ``mean_i w_i >= 1`` (Jensen, when the clamp does not bind) relative to the normalised tilt.
    """
    _check_batch(batch)
    l = batch_losses(theta, batch, beta)
    w = kl_tilt_weights(l, batch.weights, tau, normalise=False, clamp=clamp)
    return (batch.weights * w) @ dpo_grad(theta, batch.x, batch.y, beta, batch.theta_ref)


def kldpo_grad_softmax(theta, batch: PreferenceData, beta: float, tau: float) -> NDArray[np.float64]:
    """Normalised KLDPO gradient ``sum_i q_i grad l_i``, ``q ∝ p exp(l/tau)``, (d,).

    Equals the exact Danskin gradient of ``L_KL`` on the batch when ``tau = lam*(rho)`` at ``theta``.
    """
    _check_batch(batch)
    l = batch_losses(theta, batch, beta)
    q = batch.weights * kl_tilt_weights(l, batch.weights, tau, normalise=True)
    return q @ dpo_grad(theta, batch.x, batch.y, beta, batch.theta_ref)


def kldpo_grad_calibrated(theta, batch: PreferenceData, beta: float, rho: float) -> NDArray[np.float64]:
    """KLDPO gradient with ``lam*`` solved on the batch (no tau): ``sum_i q*_i grad l_i``, (d,).

    ``q*`` is the worst case in ``{Q : KL(Q || P_batch) <= rho}`` from the 1-D dual
    (:func:`~drdpo_theory.solvers.kl.kl_inner`): exact for the batch's own empirical measure, a
    biased estimate of the full-data gradient for small batches.
    """
    from .solvers.kl import kl_inner

    _check_batch(batch)
    _nonneg("rho", rho)
    l = batch_losses(theta, batch, beta)
    inner = kl_inner(l, batch.weights, rho)
    return np.asarray(inner.q, float) @ dpo_grad(theta, batch.x, batch.y, beta, batch.theta_ref)


def kldpo_grad_exact(theta, data: PreferenceData, beta: float, rho: float) -> NDArray[np.float64]:
    """Exact Danskin gradient of ``L_KL(theta; data)`` from the core solver, (d,)."""
    from .solvers.kl import kldpo_gradient

    return np.asarray(kldpo_gradient(np.asarray(theta, float), data, beta, rho), float)


# ----------------------------------------------------------------------------------------------
# WDPO: gradients with respect to the features
# ----------------------------------------------------------------------------------------------


def grad_z(theta, batch: PreferenceData, beta: float, space: str = "z") -> NDArray[np.float64]:
    """Per-pair feature gradients.

    ``space="x"``: ``grad_x l_i = -ytil_i beta sigma(-t_i) v``, shape (n, d).
    ``space="z"``: ``(grad_{phi1} l_i, grad_{phi2} l_i) = (grad_x l_i, -grad_x l_i)``, shape (n, 2, d).
    """
    _space_factor(space)
    v = np.asarray(theta, float) - batch.theta_ref
    t = _margins_t(theta, batch, beta)
    gx = (-signed_labels(batch.y) * beta * sigmoid(-t))[:, None] * v[None, :]  # (n, d)
    if space == "x":
        return gx
    return np.stack([gx, -gx], axis=1)  # (n, 2, d)


def grad_z_sqnorm(theta, batch: PreferenceData, beta: float, space: str = "z") -> NDArray[np.float64]:
    """``||grad_z l_i||^2 = c beta^2 sigma(-t_i)^2 ||v||^2`` (c = 2 for z, 1 for x), shape (n,)."""
    c = _space_factor(space)
    v = np.asarray(theta, float) - batch.theta_ref
    a = beta * sigmoid(-_margins_t(theta, batch, beta))
    return c * a**2 * float(v @ v)


def penalty_moment(theta, batch: PreferenceData, beta: float, space: str = "z") -> float:
    """``G(theta) = sum_i p_i ||grad_z l_i||^2`` (the mean squared feature-gradient norm)."""
    return float(batch.weights @ grad_z_sqnorm(theta, batch, beta, space))


def penalty_moment_grad(theta, batch: PreferenceData, beta: float, space: str = "z") -> NDArray[np.float64]:
    """``grad_theta G = c (||v||^2 grad S + 2 S v)`` with ``S = sum_i p_i beta^2 sigma(-t_i)^2``, (d,).

    ``grad S = -2 beta^3 sum_i p_i sigma(-t_i)^2 sigma(t_i) u_i`` (chain rule through
    ``dsigma(-t)/dt = -sigma(-t) sigma(t)`` and ``dt_i/dtheta = beta u_i``).
    """
    c = _space_factor(space)
    p = batch.weights
    v = np.asarray(theta, float) - batch.theta_ref
    t = _margins_t(theta, batch, beta)
    sm, sp = sigmoid(-t), sigmoid(t)
    S = beta**2 * float(p @ sm**2)
    grad_S = -2.0 * beta**3 * ((p * sm**2 * sp) @ batch.u)
    return c * (float(v @ v) * grad_S + 2.0 * S * v)


def wdpo_sq_penalty(theta, batch: PreferenceData, beta: float, rho0: float, space: str = "z") -> float:
    """The authors' penalised WDPO loss ``sum_i p_i [l_i + rho0 ||grad_z l_i||^2]`` (a value)."""
    _nonneg("rho0", rho0)
    return float(batch.weights @ batch_losses(theta, batch, beta)) + rho0 * penalty_moment(theta, batch, beta, space)


def wdpo_sq_penalty_grad(theta, batch: PreferenceData, beta: float, rho0: float, space: str = "z"):
    """Gradient in theta of the penalty alone, ``rho0 grad G`` (closed form; the double backward), (d,)."""
    _nonneg("rho0", rho0)
    return rho0 * penalty_moment_grad(theta, batch, beta, space)


def wdpo_grad_sq_penalty(theta, batch: PreferenceData, beta: float, rho0: float, space: str = "z"):
    """Gradient of the authors' penalised WDPO loss: DPO gradient + ``rho0 grad G``, (d,)."""
    _check_batch(batch)
    return dpo_grad_batch(theta, batch, beta) + wdpo_sq_penalty_grad(theta, batch, beta, rho0, space)


def first_order_value(theta, batch: PreferenceData, beta: float, eps: float, space: str = "z") -> float:
    """Gao-Chen-Kleywegt first-order W2 robust value ``sum_i p_i l_i + eps sqrt(G)``."""
    _nonneg("eps", eps)
    _check_batch(batch)
    return float(batch.weights @ batch_losses(theta, batch, beta)) + eps * math.sqrt(
        penalty_moment(theta, batch, beta, space))


def first_order_grad(theta, batch: PreferenceData, beta: float, eps: float, space: str = "z"):
    """Gradient of the first-order penalty ``eps sqrt(G)`` alone: ``eps grad G / (2 sqrt G)``, (d,).

    At ``theta = theta_ref`` (``G = 0``) the penalty ``eps sqrt(c S) ||v||`` has a kink; the
    returned element of the subdifferential is 0 there.
    """
    _nonneg("eps", eps)
    G = penalty_moment(theta, batch, beta, space)
    if G <= 0.0:
        return np.zeros(batch.d)
    return eps * penalty_moment_grad(theta, batch, beta, space) / (2.0 * math.sqrt(G))


def wdpo_grad_first_order(theta, batch: PreferenceData, beta: float, eps: float, space: str = "z"):
    """Gradient of the first-order form ``mean l + eps sqrt(G)`` (DPO gradient + penalty), (d,)."""
    _check_batch(batch)
    return dpo_grad_batch(theta, batch, beta) + first_order_grad(theta, batch, beta, eps, space)


def wdpo_grad_adversarial(theta, batch: PreferenceData, beta: float, *, eps: float | None = None,
                          rho0: float | None = None, space: str = "z") -> NDArray[np.float64]:
    """One-step adversarial WDPO gradient: ``sum_i p_i grad_theta l(z_i + eta grad_z l_i; theta)``, (d,).

    The perturbation is detached (computed once, then held fixed): one extra forward-backward,
    no double backward. Step size ``eta``: pass exactly one of

    * ``eps``: ``eta = eps / sqrt(G)``, the first-order worst case of the ``W_2(eps)`` ball in
      ``space`` (every pair moves along its gradient, total cost ``eps``);
    * ``rho0``: ``eta = 2 rho0``; then the result is a finite difference of the squared penalty's
      gradient (``grad_theta l(z + eta g) = grad l + (eta/2) grad ||g||^2 + O(eta^2)``).

    In ``space="z"`` the move ``phi1 += eta g_x``, ``phi2 -= eta g_x`` changes ``x`` by ``2 eta g_x``.
    """
    _check_batch(batch)
    if (eps is None) == (rho0 is None):
        raise ValueError("pass exactly one of eps (W2 radius) or rho0 (squared-penalty weight)")
    c = _space_factor(space)
    if eps is not None:
        _nonneg("eps", eps)
        G = penalty_moment(theta, batch, beta, space)
        eta = 0.0 if G <= 0 else eps / math.sqrt(G)
    else:
        eta = 2.0 * _nonneg("rho0", rho0)
    gx = grad_z(theta, batch, beta, "x")  # (n, d)
    x_adv = batch.x + (c * eta) * gx  # z-space: Delta x = Delta phi1 - Delta phi2 = 2 eta g_x
    return batch.weights @ dpo_grad(theta, x_adv, batch.y, beta, batch.theta_ref)


# ----------------------------------------------------------------------------------------------
# Exact W2 robust value on a continuous support (kappa = inf), and its Danskin gradient
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class W2Inner:
    """Worst case of ``sup {E_Q l : W_2(Q, P) <= eps}`` with cost ``||x - x'||_2``, labels fixed.

    Attributes
    ----------
    value : the robust value (dual value ``lam eps^2 + sum_i p_i phi_i(lam)``).
    lam : optimal dual variable (``inf`` when ``eps = 0`` or ``theta = theta_ref``).
    r : (n,) distance each pair moves, ``sum_i p_i r_i^2 = eps^2`` (up to the tolerance).
    x_adv : (n, d) worst-case features ``x_i - ytil_i r_i v/||v||``.
    budget_used : ``sum_i p_i r_i^2`` (diagnostic; equals ``eps^2`` at the optimum).
    """

    value: float
    lam: float
    r: NDArray[np.float64]
    x_adv: NDArray[np.float64]
    budget_used: float


def _bisect(f, lo, hi, iters=200):
    """Vectorised bisection for a sign change of ``f`` with ``f(lo) > 0 >= f(hi)`` elementwise."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        pos = f(mid) > 0
        lo = np.where(pos, mid, lo)
        hi = np.where(pos, hi, mid)
        if np.all(hi - lo <= 1e-15 * np.maximum(1.0, np.abs(lo))):
            break
    return 0.5 * (lo + hi)


def _logit(p):
    return np.log(p) - np.log1p(-p)


def _best_shift(t, k):
    """``argmax_{s >= -t} softplus(s) - k (s + t)^2`` for arrays ``t`` (n,) and scalar ``k > 0``.

    With ``s = L r - t`` (``L = beta ||v||``, ``k = lam / L^2``) this is the per-pair inner sup of the
    W2 dual. Stationary points solve ``F(s) = sigma(s) - 2k (s + t) = 0`` on ``[-t, 1/(2k) - t]``
    (``F > 0`` at the left end, ``< 0`` at the right). ``F' = sigma(1 - sigma) - 2k``: for
    ``k >= 1/8`` F is decreasing (one root, the maximiser); otherwise F decreases, increases, then
    decreases, with turning points ``s_-, s_+ = -+ log((1 + w)/(1 - w))``, ``w = sqrt(1 - 8k)``,
    and the maximisers are the roots in the two decreasing pieces: both are found by bisection
    and the better one kept.
    """
    t = np.asarray(t, float)
    lo = -t
    hi = 1.0 / (2.0 * k) - t

    def F(s):
        return sigmoid(s) - 2.0 * k * (s + t)

    def g(s):
        return np.logaddexp(0.0, s) - k * (s + t) ** 2

    if k >= 0.125:
        return _bisect(F, lo, hi)
    w = math.sqrt(1.0 - 8.0 * k)
    s_plus = float(np.log1p(w) - np.log1p(-w))
    s_minus = -s_plus
    # left decreasing piece [lo, min(hi, s_-)]: a root iff F changes sign there
    a_hi = np.minimum(hi, s_minus)
    left_ok = (a_hi > lo) & (F(a_hi) <= 0)
    s_left = _bisect(F, lo, np.where(left_ok, a_hi, hi))
    # right decreasing piece [max(lo, s_+), hi]
    b_lo = np.maximum(lo, s_plus)
    right_ok = (b_lo < hi) & (F(b_lo) > 0)
    s_right = _bisect(F, np.where(right_ok, b_lo, lo), hi)
    cand_l = np.where(left_ok, g(s_left), -np.inf)
    cand_r = np.where(right_ok, g(s_right), -np.inf)
    # if neither piece holds a sign change the unique root is in the increasing piece's
    # complement handled above; fall back to a plain bisection on [lo, hi] (F(lo) > 0 > F(hi)).
    none = ~left_ok & ~right_ok
    s_any = _bisect(F, lo, hi) if np.any(none) else lo
    s = np.where(cand_l >= cand_r, s_left, s_right)
    return np.where(none, s_any, s)


def w2_inner_continuous(theta, data: PreferenceData, beta: float, eps: float, tol: float = 1e-13) -> W2Inner:
    """Exact ``sup {E_Q l : W_2(Q, P) <= eps}``, cost ``||x - x'||_2``, labels fixed, ``x'`` anywhere in R^d.

    Strong duality (Gao & Kleywegt 2016; Blanchet & Murthy 2019) gives

    .. math:: \\inf_{\\lambda \\ge 0} \\lambda\\varepsilon^2 + \\sum_i p_i \\sup_{x'}\\bigl[\\ell(x', y_i; \\theta)
              - \\lambda \\|x' - x_i\\|^2\\bigr].

    ``l`` depends on ``x'`` only through ``ytil v.x'``, so the best move has direction
    ``-ytil_i v/||v||`` and length ``r_i``: ``phi_i(lam) = sup_{r>=0} softplus(L r - t_i) - lam r^2``,
    ``L = beta ||v||`` (solved exactly per pair by :func:`_best_shift`). The dual is convex in
    ``lam`` with (super)gradient ``eps^2 - sum_i p_i r_i(lam)^2``, nonincreasing ``r_i(lam)`` and
    ``lam* <= L/(2 eps)`` (since ``r_i <= L/(2 lam)``); ``lam*`` is found by bisection in ``log lam``.
    Not the core solver's W2 (that one is on a finite support); see docs/approximations.md.
    """
    _check_batch(data)
    eps = _nonneg("eps", eps)
    theta = np.asarray(theta, float)
    v = theta - data.theta_ref
    nv = float(np.linalg.norm(v))
    l = batch_losses(theta, data, beta)
    p = data.weights
    if eps == 0.0 or nv == 0.0:
        # no move helps (eps = 0) or the loss is constant in x (v = 0)
        return W2Inner(float(p @ l), math.inf, np.zeros(data.n), data.x.copy(), 0.0)
    L = beta * nv
    t = _margins_t(theta, data, beta)

    def radii(lam):
        s = _best_shift(t, lam / L**2)
        return (s + t) / L

    lam_hi = L / (2.0 * eps)
    lo, hi = math.log(lam_hi) - 60.0, math.log(lam_hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        used = float(p @ radii(math.exp(mid)) ** 2)
        if used > eps**2:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    lam = math.exp(hi)
    r = radii(lam)
    value_dual = lam * eps**2 + float(p @ (np.logaddexp(0.0, L * r - t) - lam * r**2))
    x_adv = data.x - (signed_labels(data.y) * r)[:, None] * (v / nv)[None, :]
    return W2Inner(value_dual, lam, r, x_adv, float(p @ r**2))


def w2_value_continuous(theta, data: PreferenceData, beta: float, eps: float) -> float:
    """The exact continuous-support W2 robust value (see :func:`w2_inner_continuous`)."""
    return w2_inner_continuous(theta, data, beta, eps).value


def w2_gradient_continuous(theta, data: PreferenceData, beta: float, eps: float) -> NDArray[np.float64]:
    """Danskin gradient ``sum_i p_i grad_theta l(x_adv_i, y_i; theta)`` of the W2 robust value, (d,).

    Valid where the worst case is unique (the generic case); at ``theta = theta_ref`` the value has
    a kink and the DPO gradient is returned.
    """
    inner = w2_inner_continuous(theta, data, beta, eps)
    return data.weights @ dpo_grad(theta, inner.x_adv, data.y, beta, data.theta_ref)


def solve_w2_continuous(data: PreferenceData, beta: float, radius: float, eps: float, theta0=None,
                        max_iter: int = 500, gtol: float = 1e-10):
    """``min_{||theta|| <= B} sup_{W_2(Q,P) <= eps} E_Q l`` (continuous support, labels fixed).

    The objective is convex (a supremum of convex functions); minimised by L-BFGS-B on theta with
    the Danskin gradient, started at the DPO optimum. Returns a
    :class:`~drdpo_theory.solvers.result.SolverResult` (``method="wdpo"``, ``info["p"] = 2``,
    ``info["support"] = "continuous"``); ``duality_gap`` is the Frank-Wolfe gap on the ball, a
    certificate only when the objective is differentiable at the answer (reported, not assumed).
    """
    from scipy.optimize import minimize

    from .solvers._common import Timer, ball_fw_gap, check_common
    from .solvers.dpo import solve_dpo
    from .solvers.result import SolverResult, status_from_gap

    check_common(data, beta, radius)
    eps = _nonneg("eps", eps)
    eps_c = w2_collapse_radius(data)
    if eps >= eps_c and np.linalg.norm(data.theta_ref) < radius:
        # theta_ref is optimal: the one-sided derivative of the value along any unit delta is
        # (beta/2)(eps - delta.mean u) >= 0 (see w2_collapse_radius); certified, gap 0.
        val = w2_value_continuous(data.theta_ref, data, beta, eps)
        return SolverResult(
            method="wdpo", theta=data.theta_ref.copy(), objective=val, lower_bound=val, duality_gap=0.0,
            lam=math.inf, weights=None, status=status_from_gap(0.0), solver="approx-collapse-w2", seconds=0.0,
            collapsed=True, info={"p": 2, "support": "continuous", "kappa": math.inf, "eps_c": eps_c},
        )
    with Timer() as tm:
        x0 = solve_dpo(data, beta, radius).theta if theta0 is None else np.asarray(theta0, float)

        def fg(th):
            inner = w2_inner_continuous(th, data, beta, eps)
            g = data.weights @ dpo_grad(th, inner.x_adv, data.y, beta, data.theta_ref)
            return inner.value, g

        res = minimize(fg, x0, jac=True, method="L-BFGS-B",
                       options={"maxiter": max_iter, "gtol": gtol, "ftol": 1e-15})
        th = np.asarray(res.x, float)
        if np.linalg.norm(th) > radius:  # the ball binds: projected gradient steps, then report
            th *= radius / np.linalg.norm(th)
        val, g = fg(th)
    gap = ball_fw_gap(g, th, radius)
    return SolverResult(
        method="wdpo", theta=th, objective=val, lower_bound=val - gap, duality_gap=gap,
        lam=w2_inner_continuous(th, data, beta, eps).lam, weights=None, status=status_from_gap(gap),
        solver="approx-lbfgs-w2", seconds=tm.seconds,
        info={"p": 2, "support": "continuous", "kappa": math.inf, "iterations": int(res.nit),
              "grad_norm": float(np.linalg.norm(g)), "message": str(res.message)},
    )


def w2_collapse_radius(data: PreferenceData) -> float:
    """Collapse radius of continuous-support W2-WDPO (kappa = inf): ``eps_c = ||sum_i p_i ytil_i x_i||``.

    At ``v = theta - theta_ref = 0`` every loss is ``log 2`` and flat in ``x``. Along a unit
    direction ``delta``, ``l(x') = log 2 - (t beta/2) ytil delta.x' + O(t^2)`` uniformly on the
    ball, and the best ``W_2(eps)`` move shifts every ``x_i`` by ``eps`` along ``-ytil_i delta``, so the
    one-sided derivative of the robust value is ``(beta/2)(eps - delta.mean u)``. The (convex)
    value is minimised at ``theta_ref`` iff this is ``>= 0`` for every ``delta``, i.e.
    ``eps >= ||mean u||``: twice the W1 radius ``||mean u||/2`` (W1 pays ``eps beta ||v||``, W2 only
    ``eps beta sigma(0) ||v||`` to first order). Gao's first-order form has the same threshold; the
    authors' squared penalty (quadratic in ``v``) never collapses.
    """
    return float(np.linalg.norm(data.weights @ data.u))


def wdpo_grad_exact(theta, data: PreferenceData, beta: float, eps: float, p: int = 2) -> NDArray[np.float64]:
    """Exact WDPO gradient (continuous support, kappa = inf).

    ``p = 2``: :func:`w2_gradient_continuous`; ``p = 1``: the core solver's
    :func:`~drdpo_theory.solvers.wasserstein.wdpo_gradient` (``mean grad l + eps beta v/||v||``).
    """
    if p == 2:
        return w2_gradient_continuous(theta, data, beta, eps)
    if p == 1:
        from .solvers.wasserstein import wdpo_gradient

        return np.asarray(wdpo_gradient(np.asarray(theta, float), data, beta, eps, math.inf, 1, None), float)
    raise ValueError(f"p must be 1 or 2, got {p!r}")


# ----------------------------------------------------------------------------------------------
# comparison metrics
# ----------------------------------------------------------------------------------------------


def cosine(g, g_ref) -> float:
    """Cosine similarity ``g.g_ref / (||g|| ||g_ref||)`` (nan if either is 0)."""
    g, g_ref = np.asarray(g, float), np.asarray(g_ref, float)
    den = float(np.linalg.norm(g) * np.linalg.norm(g_ref))
    return float(g @ g_ref) / den if den > 0 else float("nan")


def rel_error(g, g_ref) -> float:
    """Relative norm error ``||g - g_ref|| / ||g_ref||`` (nan if ``g_ref = 0``)."""
    g, g_ref = np.asarray(g, float), np.asarray(g_ref, float)
    den = float(np.linalg.norm(g_ref))
    return float(np.linalg.norm(g - g_ref)) / den if den > 0 else float("nan")
