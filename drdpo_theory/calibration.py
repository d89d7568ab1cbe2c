"""Choosing the approximations' hyper-parameters from the robust radii (and back).

The paper's scalable algorithms (docs/theory.md section 5) are parametrised by a temperature ``tau``
(KLDPO) and a penalty weight ``rho0`` (WDPO), while the robust problems are parametrised by the
radii ``rho`` (KL) and ``eps`` (Wasserstein). This module gives the maps between them at a given
``theta`` and the collapse radii above which the robust optimum is ``theta_ref``.

KL: ``tau <-> rho``
    The worst case of ``sup {E_Q l : KL(Q||P) <= rho}`` is the tilt ``q ∝ p exp(l/lam*)``
    (docs/theory.md section 3.1), so ``tau = lam*(rho)`` (:func:`tau_for_rho`, the 1-D dual solved by
    :func:`~drdpo_theory.solvers.kl.kl_inner`). Conversely every ``tau > 0`` is the exact
    worst case of the radius ``rho(tau) = KL(q_tau || p)`` (:func:`rho_for_tau`, closed form): a
    tilt with temperature ``tau`` *is* KLDPO with that radius, at this ``theta`` only (``lam*``
    moves with ``theta``; see docs/approximations.md).

Wasserstein: ``eps -> rho0``
    With ``G(theta) = mean_i ||grad_z l_i||^2`` (:func:`~drdpo_theory.approx.penalty_moment`),
    Gao's first-order W2 objective is ``mean l + eps sqrt(G)`` and the authors' objective is
    ``mean l + rho0 G``. Two matching rules at the current ``theta``:

    * ``rule="gradient"`` (recommended): equal gradients,
      ``eps grad G / (2 sqrt G) = rho0 grad G``  =>  ``rho0 = eps / (2 sqrt(G))``;
    * ``rule="value"``: equal penalty values, ``eps sqrt(G) = rho0 G``  =>  ``rho0 = eps / sqrt(G)``
      (twice the gradient rule, so its gradient penalty is twice too strong).

    Training follows the gradient, so the gradient rule is the one that reproduces Gao's
    first-order WDPO step (exactly, at the theta where it is calibrated).

Collapse radii (the robust optimum is ``theta_ref`` at and above them; ``theta_ref`` inside the ball)
    * W1, continuous support, ``kappa = inf``: ``eps_c = ||mean_i ytil_i x_i|| / 2`` (docs/theory.md
      section 6; the subgradient condition of ``mean l + eps beta ||v||`` at ``v = 0``);
    * W2, continuous support, ``kappa = inf``: ``eps_c = ||mean_i ytil_i x_i||``
      (:func:`~drdpo_theory.approx.w2_collapse_radius`), the same for Gao's first-order form;
      the squared penalty never collapses (it is quadratic in ``v``);
    * KL: :func:`~drdpo_theory.solvers.kl.kl_collapse_threshold` (exact).
    Radii in ``z = (phi1, phi2)`` are ``1/sqrt(2)`` times those in ``x`` (``approx.eps_x_from_z``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .approx import batch_losses, penalty_moment, w2_collapse_radius
from .data import PreferenceData

__all__ = [
    "RHO0_RULES",
    "tau_for_rho",
    "rho_for_tau",
    "lam_star_curve",
    "rho0_for_eps",
    "eps_for_rho0",
    "collapse_radii",
    "calibrate",
]

#: Matching rules eps -> rho0 (see the module docstring).
RHO0_RULES = ("gradient", "value")


def tau_for_rho(theta, data: PreferenceData, beta: float, rho: float) -> float:
    """``lam*(rho)`` at ``theta``: the temperature whose tilt is the exact KL worst case.

    Returns 0 when the radius is so large that the worst case is a point mass on the largest loss
    (``lam* = 0``: no finite ``tau`` reproduces it, the tilt only approaches it as ``tau -> 0``).
    """
    from .solvers.kl import kl_inner

    l = batch_losses(theta, data, beta)
    return float(kl_inner(l, data.weights, float(rho)).lam)


def rho_for_tau(theta, data: PreferenceData, beta: float, tau: float) -> float:
    """``KL(q_tau || p)`` with ``q_tau ∝ p exp(l/tau)``: the KL radius for which ``tau = lam*``.

    .. math:: \\rho(\\tau) = \\sum_i q_i \\ell_i/\\tau - \\log \\sum_i p_i e^{\\ell_i/\\tau}.

    Decreasing in ``tau`` (from ``-log p(argmax l)`` at ``tau -> 0`` to 0 at ``tau -> inf``).
    """
    tau = float(tau)
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    l = batch_losses(theta, data, beta) / tau
    p = data.weights
    keep = p > 0
    l, p = l[keep], p[keep]
    m = l.max()
    e = p * np.exp(l - m)  # shifted by the max: no overflow for small tau
    Z = e.sum()
    q = e / Z
    log_z = m + math.log(Z)
    return max(0.0, float(q @ l) - log_z)


def lam_star_curve(theta, data: PreferenceData, beta: float, rhos) -> pd.DataFrame:
    """Table ``rho -> lam*(rho)`` at ``theta`` with the round trip ``rho(lam*)`` as a check.

    Columns: ``rho``, ``lam_star`` (= the tau to use), ``rho_roundtrip`` (``rho_for_tau(lam*)``,
    equal to ``rho`` where ``lam* > 0``), ``value`` (the KL robust value).
    """
    from .solvers.kl import kl_inner

    l = batch_losses(theta, data, beta)
    rows = []
    for rho in np.asarray(rhos, float):
        inner = kl_inner(l, data.weights, float(rho))
        lam = float(inner.lam)
        rows.append({
            "rho": float(rho), "lam_star": lam,
            "rho_roundtrip": rho_for_tau(theta, data, beta, lam) if lam > 0 else float("nan"),
            "value": float(inner.value),
        })
    return pd.DataFrame(rows)


def rho0_for_eps(theta, data: PreferenceData, beta: float, eps: float, rule: str = "gradient",
                 space: str = "z") -> float:
    """Penalty weight ``rho0`` of the squared gradient penalty matched to a W2 radius ``eps``.

    ``rule="gradient"``: ``eps / (2 sqrt(G))``; ``rule="value"``: ``eps / sqrt(G)``, with
    ``G = mean_i ||grad_z l_i||^2`` at ``theta`` in ``space`` (``eps`` is a radius in the same
    space). ``inf`` at ``theta = theta_ref`` (``G = 0``): calibrate at a theta away from the reference,
    e.g. the DPO solution.
    """
    if rule not in RHO0_RULES:
        raise ValueError(f"rule must be one of {RHO0_RULES}, got {rule!r}")
    eps = float(eps)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    G = penalty_moment(theta, data, beta, space)
    if G <= 0:
        return math.inf
    return eps / (2.0 * math.sqrt(G)) if rule == "gradient" else eps / math.sqrt(G)


def eps_for_rho0(theta, data: PreferenceData, beta: float, rho0: float, rule: str = "gradient",
                 space: str = "z") -> float:
    """Inverse of :func:`rho0_for_eps`: the W2 radius an authors' ``rho0`` stands for at ``theta``."""
    if rule not in RHO0_RULES:
        raise ValueError(f"rule must be one of {RHO0_RULES}, got {rule!r}")
    G = penalty_moment(theta, data, beta, space)
    s = math.sqrt(max(G, 0.0))
    return float(rho0) * (2.0 * s if rule == "gradient" else s)


def collapse_radii(data: PreferenceData) -> dict:
    """Radii at and above which the robust optimum is ``theta_ref`` (see the module docstring).

    Returns ``kl_rho_c`` (core solver), ``w1_eps_c`` (core solver; equals ``||mean u||/2``),
    ``w2_eps_c`` (continuous support, x-space) and ``w2_eps_c_z`` (the same radius in z-space).
    These do not depend on ``beta`` (only on the signs of the margins at ``theta_ref``).
    """
    from .solvers.kl import kl_collapse_threshold
    from .solvers.wasserstein import w1_collapse_threshold

    w2 = w2_collapse_radius(data)
    return {
        "kl_rho_c": float(kl_collapse_threshold(data)),
        "w1_eps_c": float(w1_collapse_threshold(data)),
        "w2_eps_c": w2,
        "w2_eps_c_z": w2 / math.sqrt(2.0),
    }


def calibrate(data: PreferenceData, beta: float, radius: float, rho: float | None = None,
              eps: float | None = None, theta=None, space: str = "z") -> dict:
    """Everything a user needs to set ``tau`` and ``rho0`` for a target radius, as a JSON-able dict.

    ``theta`` defaults to the DPO solution (where a fine-tuning run would be calibrated).
    ``eps`` is a radius in ``space``. Keys: ``theta``, ``theta_source``, ``collapse`` (see
    :func:`collapse_radii`), and with ``rho``: ``rho``, ``tau`` (= ``lam*``), ``rho_roundtrip``;
    with ``eps``: ``eps``, ``space``, ``G``, ``rho0_gradient``, ``rho0_value``.
    """
    from .solvers.dpo import solve_dpo

    if theta is None:
        theta = solve_dpo(data, beta, radius).theta
        src = "dpo"
    else:
        src = "given"
    theta = np.asarray(theta, float)
    out: dict = {"theta": [float(t) for t in theta], "theta_source": src, "beta": float(beta),
                 "collapse": collapse_radii(data)}
    if rho is not None:
        lam = tau_for_rho(theta, data, beta, rho)
        out.update({"rho": float(rho), "tau": lam,
                    "rho_roundtrip": rho_for_tau(theta, data, beta, lam) if lam > 0 else None})
    if eps is not None:
        out.update({
            "eps": float(eps), "space": space, "G": penalty_moment(theta, data, beta, space),
            "rho0_gradient": rho0_for_eps(theta, data, beta, eps, "gradient", space),
            "rho0_value": rho0_for_eps(theta, data, beta, eps, "value", space),
        })
    return out
