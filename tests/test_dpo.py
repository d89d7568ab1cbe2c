"""Exact DPO (ball-constrained logistic MLE): certificates, native vs cvxpy, brute force."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from drdpo_theory.solvers import solve
from drdpo_theory.solvers._common import ball_fw_gap, weighted_loss
from drdpo_theory.solvers.dpo import dpo_gradient

from tests.helpers import random_data

GAP = 1e-7
OBJ_RTOL = 1e-7
THETA_ATOL = 1e-5


@pytest.mark.parametrize("seed, radius, tr_norm, weighted", [(0, 5.0, 0.0, False), (1, 0.2, 0.0, False),
                                                            (2, 1.0, 0.5, True), (3, 0.3, 0.25, True)])
def test_native_and_cvxpy_agree_with_certificates(seed, radius, tr_norm, weighted):
    data = random_data(seed, n=60, d=3, theta_ref_norm=tr_norm, weighted=weighted)
    a = solve("dpo", data, 1.3, radius, solver="native")
    b = solve("dpo", data, 1.3, radius, solver="cvxpy")
    for r in (a, b):
        assert r.status == "optimal", r
        assert r.duality_gap <= GAP
        assert_allclose(r.objective - r.lower_bound, r.duality_gap, rtol=1e-9, atol=1e-15)
        assert np.linalg.norm(r.theta) <= radius * (1 + 1e-12)
    assert_allclose(a.objective, b.objective, rtol=OBJ_RTOL)
    assert_allclose(a.theta, b.theta, atol=THETA_ATOL)


def test_active_ball_constraint_is_active():
    data = random_data(1, n=60, d=3)
    r = solve("dpo", data, 1.3, 0.2)
    assert_allclose(np.linalg.norm(r.theta), 0.2, rtol=1e-10)


def test_brute_force_d2():
    data = random_data(5, n=5, d=2, theta_ref_norm=0.2)
    B, beta = 1.0, 2.0
    r = solve("dpo", data, beta, B)
    grid = np.linspace(-B, B, 801)
    T = np.array([(a, b) for a in grid for b in grid if a * a + b * b <= B * B])
    vals = np.array([weighted_loss(t, data, beta) for t in T])
    # the grid cannot beat the certified optimum, and its best point is close to it
    assert vals.min() >= r.objective - 1e-12
    assert vals.min() - r.objective < 1e-4


def test_certificate_detects_a_bad_point():
    data = random_data(2, n=30, d=3)
    r = solve("dpo", data, 1.0, 1.0)
    bad = r.theta + 0.05
    gap = ball_fw_gap(dpo_gradient(bad, data, 1.0), bad, 1.0)
    assert gap >= weighted_loss(bad, data, 1.0) - r.objective > 0


def test_permutation_invariance_and_compression():
    data = random_data(4, n=50, d=3)
    perm = np.random.default_rng(0).permutation(data.n)
    from drdpo_theory.data import PreferenceData

    shuffled = PreferenceData(data.x[perm], data.y[perm], None, data.theta_ref)
    dup = PreferenceData(np.vstack([data.x, data.x]), np.concatenate([data.y, data.y]), None, data.theta_ref)
    a, b, c = (solve("dpo", d_, 1.0, 3.0) for d_ in (data, shuffled, dup.compress()[0]))
    assert_allclose(b.theta, a.theta, atol=1e-10)
    assert_allclose(c.theta, a.theta, atol=1e-10)
