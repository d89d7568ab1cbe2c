"""Per-sample DPO losses: hand-computed values, stability, gradients by finite differences."""

import numpy as np
from numpy.testing import assert_allclose

from drdpo_theory.losses import (
    dpo_curvature,
    dpo_grad,
    dpo_loss,
    dpo_loss_bound,
    dpo_loss_from_margins,
    log_sigmoid,
    margins,
)

RTOL = 1e-12
FD_RTOL = 1e-7


def test_hand_computed_values():
    theta = np.array([1.0, -2.0])
    x = np.array([[0.5, 0.25], [0.0, 1.0]])
    y = np.array([1, 0])
    # h = (0.5 - 0.5, -2) = (0, -2); beta = 0.5:
    # sample 0: y=1, t = 0 -> log 2; sample 1: y=0, t = -beta*h = +1 -> log(1 + e^-1)
    expected = np.array([np.log(2.0), np.log1p(np.exp(-1.0))])
    assert_allclose(dpo_loss(theta, x, y, 0.5), expected, rtol=RTOL)
    # the same through margins with a reference offset: theta - theta_ref must be what matters
    tr = np.array([0.3, 0.1])
    assert_allclose(dpo_loss(theta + tr, x, y, 0.5, tr), expected, rtol=RTOL)
    assert_allclose(margins(theta + tr, x, tr), [0.0, -2.0], rtol=RTOL, atol=1e-15)


def test_stable_for_huge_margins():
    h = np.array([1e4, -1e4])
    out = dpo_loss_from_margins(h, np.array([1, 1]), beta=1.0)
    assert np.all(np.isfinite(out))
    assert_allclose(out, [0.0, 1e4], rtol=RTOL, atol=1e-300)
    assert_allclose(log_sigmoid(np.array([-800.0])), [-800.0], rtol=RTOL)


def test_gradient_and_curvature_match_finite_differences():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(6, 3))
    y = rng.integers(0, 2, size=6)
    theta, tr, beta = rng.standard_normal(3), rng.standard_normal(3) * 0.1, 1.7
    g = dpo_grad(theta, x, y, beta, tr)
    h = 1e-6
    for j in range(3):
        e = np.zeros(3)
        e[j] = h
        fd = (dpo_loss(theta + e, x, y, beta, tr) - dpo_loss(theta - e, x, y, beta, tr)) / (2 * h)
        assert_allclose(g[:, j], fd, rtol=FD_RTOL, atol=1e-9)
    # curvature: d/dtheta of grad along x_i gives w_i x_i x_i^T
    w = dpo_curvature(theta, x, y, beta, tr)
    v = rng.standard_normal(3)
    fd = (dpo_grad(theta + h * v, x, y, beta, tr) - dpo_grad(theta - h * v, x, y, beta, tr)) / (2 * h)
    assert_allclose(fd, (w * (x @ v))[:, None] * x, rtol=1e-6, atol=1e-9)


def test_loss_bound():
    assert_allclose(dpo_loss_bound(0.5, 1.0), np.log1p(np.exp(2.0)), rtol=RTOL)
    # attained at ||theta - theta_ref|| = 2B with x of norm 2 aligned against the label
    B, beta = 1.0, 0.5
    theta, tr = np.array([B, 0.0]), np.array([-B, 0.0])
    x = np.array([[-2.0, 0.0]])
    assert_allclose(dpo_loss(theta, x, np.array([1]), beta, tr), [dpo_loss_bound(beta, B)], rtol=RTOL)
