"""Per-sample DPO losses on the log-linear policy class (numpy, pure).

docs/theory.md section 2: with features ``x = phi(s, a1) - phi(s, a2)`` and signed label
``ytil = 2y - 1``, the implicit reward margin is ``h = (theta - theta_ref) . x`` and the DPO loss is

.. math::

    \\ell(z; \\theta) = \\log\\bigl(1 + e^{-\\tilde y \\beta h}\\bigr)
                    = -\\log \\sigma(\\tilde y \\beta h),

i.e. logistic regression on ``beta * x`` with offset ``theta_ref``. Every function here takes
arrays of shape ``(n, d)`` / ``(n,)`` and returns one value per sample: the caller reduces.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "signed_labels",
    "signed_features",
    "margins",
    "log_sigmoid",
    "sigmoid",
    "dpo_loss_from_margins",
    "dpo_loss",
    "dpo_grad",
    "dpo_curvature",
    "dpo_loss_bound",
]


def signed_labels(y: ArrayLike) -> NDArray[np.float64]:
    """``ytil = 2y - 1`` in {-1, +1}; shape ``(n,)``."""
    return 2.0 * np.asarray(y, dtype=float) - 1.0


def signed_features(x: ArrayLike, y: ArrayLike) -> NDArray[np.float64]:
    """``u_i = ytil_i x_i``, shape ``(n, d)``: the loss is ``log(1 + exp(-beta (theta - theta_ref).u))``."""
    return signed_labels(y)[:, None] * np.asarray(x, dtype=float)


def margins(theta: ArrayLike, x: ArrayLike, theta_ref: ArrayLike | None = None) -> NDArray[np.float64]:
    """Implicit reward margins ``h_i = (theta - theta_ref) . x_i``; ``x`` (n, d) -> (n,)."""
    theta = np.asarray(theta, dtype=float)
    if theta_ref is not None:
        theta = theta - np.asarray(theta_ref, dtype=float)
    return np.asarray(x, dtype=float) @ theta


def log_sigmoid(t: ArrayLike) -> NDArray[np.float64]:
    """``log sigma(t) = -log(1 + e^{-t})``, stable for large ``|t|``."""
    # logaddexp(0, -t) never overflows: it is max(0,-t) + log1p(exp(-|t|)).
    return -np.logaddexp(0.0, -np.asarray(t, dtype=float))


def sigmoid(t: ArrayLike) -> NDArray[np.float64]:
    """Stable logistic function."""
    t = np.asarray(t, dtype=float)
    # exp(log_sigmoid) avoids overflow of exp(-t) for very negative t.
    return np.exp(log_sigmoid(t))


def dpo_loss_from_margins(h: ArrayLike, y: ArrayLike, beta: float) -> NDArray[np.float64]:
    """DPO loss from margins: ``-y log sigma(beta h) - (1-y) log sigma(-beta h)``, (n,) -> (n,)."""
    return -log_sigmoid(signed_labels(y) * beta * np.asarray(h, dtype=float))


def dpo_loss(
    theta: ArrayLike, x: ArrayLike, y: ArrayLike, beta: float, theta_ref: ArrayLike | None = None
) -> NDArray[np.float64]:
    """Per-sample DPO loss on the log-linear class (docs/theory.md section 2, T2.1).

    Parameters
    ----------
    theta : (d,) policy parameter.
    x : (n, d) feature differences ``phi(s, a1) - phi(s, a2)``.
    y : (n,) labels in {0, 1} (1: a1 preferred).
    beta : KL-regularisation strength of DPO, > 0.
    theta_ref : (d,) reference parameter (default zeros).

    Returns
    -------
    (n,) array ``log(1 + exp(-ytil * beta * (theta - theta_ref).x))``.
    """
    return dpo_loss_from_margins(margins(theta, x, theta_ref), y, beta)


def dpo_grad(
    theta: ArrayLike, x: ArrayLike, y: ArrayLike, beta: float, theta_ref: ArrayLike | None = None
) -> NDArray[np.float64]:
    """Per-sample gradients ``grad_theta l_i = -beta ytil_i sigma(-ytil_i beta h_i) x_i``, shape (n, d)."""
    ytil = signed_labels(y)
    t = ytil * beta * margins(theta, x, theta_ref)
    return (-beta * ytil * sigmoid(-t))[:, None] * np.asarray(x, dtype=float)


def dpo_curvature(
    theta: ArrayLike, x: ArrayLike, y: ArrayLike, beta: float, theta_ref: ArrayLike | None = None
) -> NDArray[np.float64]:
    """Per-sample Hessian weights ``w_i``: ``hess l_i = w_i x_i x_i^T``, ``w_i = beta^2 sigma(t)sigma(-t)``, (n,)."""
    t = signed_labels(y) * beta * margins(theta, x, theta_ref)
    return beta**2 * sigmoid(t) * sigmoid(-t)


def dpo_loss_bound(beta: float, radius: float) -> float:
    """``L_max = log(1 + exp(4 beta B))``: the loss bound on ``||theta|| <= B``, ``||x|| <= 2``."""
    return float(np.logaddexp(0.0, 4.0 * beta * radius))
