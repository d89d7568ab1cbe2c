"""Tests of the exact KLDPO solvers (drdpo_theory.solvers.kl; derivations in docs/theory_kl.md).

Every check compares numbers: the inner worst case against a conic primal, the certified duality
gap, native Newton against the exponential-cone program, brute force on tiny instances, the
collapse threshold against its definition and its small-rho approximation, Danskin gradients
against finite differences, and the population (weighted, compressed) use.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from scipy.optimize import minimize, minimize_scalar

from drdpo_theory.data import PreferenceData
from drdpo_theory.losses import dpo_loss
from drdpo_theory.model import make_model
from drdpo_theory.solvers.dpo import solve_dpo_native
from drdpo_theory.solvers.kl import (
    _Joint,
    kl_collapse_small_rho,
    kl_collapse_threshold,
    kl_divergence,
    kl_inner,
    kl_inner_cvxpy,
    kldpo_gradient,
    kldpo_objective,
    solve_kldpo,
    solve_kldpo_cvxpy,
    solve_kldpo_native,
)
from drdpo_theory.solvers.result import CERTIFIED_GAP
from tests.helpers import bt_instance as _instance

#: kl_inner vs a conic primal (Clarabel's accuracy is ~1e-9 on these).
RTOL_INNER = 1e-6
ATOL_Q = 5e-6
#: exact identities computed in floating point (KL = rho, sum q = 1, value = E_q l).
RTOL_EXACT = 1e-10
ATOL_EXACT = 1e-12
#: native vs cvxpy (the brief's targets).
RTOL_OBJ = 1e-7
ATOL_THETA = 1e-5
#: brute force grid + local refinement vs the solver optimum.
ATOL_BRUTE = 1e-6
#: Danskin gradient vs central finite differences.
RTOL_FD = 1e-6
ATOL_FD = 1e-9

pytestmark = pytest.mark.filterwarnings("ignore:Solution may be inaccurate")


def _assert_certified(res, data, beta, radius, rho):
    """Status optimal, gap <= 1e-7, primal - dual = gap, objective = L_KL(theta), q feasible."""
    assert res.status == "optimal", (res.status, res.duality_gap, res.info)
    assert 0.0 <= res.duality_gap <= CERTIFIED_GAP
    assert_allclose(res.objective - res.lower_bound, res.duality_gap, rtol=0, atol=ATOL_EXACT)
    assert np.linalg.norm(res.theta) <= radius * (1 + 1e-12)
    assert_allclose(res.objective, kldpo_objective(res.theta, data, beta, rho), rtol=RTOL_EXACT)
    assert_allclose(res.weights.sum(), 1.0, rtol=0, atol=ATOL_EXACT)
    assert kl_divergence(res.weights, data.weights) <= rho * (1 + 1e-9) + 1e-14


# ----------------------------------------------------------------------------------------------
# The inner worst case
# ----------------------------------------------------------------------------------------------


def _random_losses(n, seed):
    rng = np.random.default_rng(seed)
    w = rng.random(n) + 0.02
    return rng.exponential(1.0, n), w / w.sum()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rho", [1e-3, 0.1, 0.8])
def test_kl_inner_matches_conic_primal(seed, rho):
    l, w = _random_losses(12, seed)
    ours = kl_inner(l, w, rho)
    ref = kl_inner_cvxpy(l, w, rho)
    assert_allclose(ours.value, ref.value, rtol=RTOL_INNER)
    assert_allclose(ours.q, ref.q, atol=ATOL_Q)
    assert_allclose(ours.lam, ref.lam, rtol=1e-4)  # a conic dual: less accurate than the primal
    # exact identities of the worst case
    assert ours.active
    assert_allclose(ours.q.sum(), 1.0, rtol=0, atol=ATOL_EXACT)
    assert_allclose(ours.kl, rho, rtol=RTOL_EXACT)
    assert_allclose(kl_divergence(ours.q, w), rho, rtol=RTOL_EXACT)
    assert_allclose(ours.value, ours.q @ l, rtol=RTOL_EXACT)  # dual value = primal value
    # q is the exponential tilt w e^{l/lam}
    tilt = w * np.exp((l - l.max()) / ours.lam)
    assert_allclose(ours.q, tilt / tilt.sum(), rtol=1e-12)


def test_kl_inner_rho_zero_is_weighted_mean():
    l, w = _random_losses(9, 1)
    r = kl_inner(l, w, 0.0)
    assert_allclose(r.value, w @ l, rtol=ATOL_EXACT)
    assert_allclose(r.q, w, rtol=0, atol=0)
    assert r.lam == math.inf and r.kl == 0.0


def test_kl_inner_tiny_rho_small_radius_expansion():
    # sup_{KL <= rho} E_q l = mean + sqrt(2 rho Var) + O(rho)
    l, w = _random_losses(15, 2)
    var = w @ (l - w @ l) ** 2
    for rho in (1e-6, 1e-8):
        r = kl_inner(l, w, rho)
        assert_allclose(r.value - w @ l, math.sqrt(2 * rho * var), rtol=10 * math.sqrt(rho))


def test_kl_inner_lam_zero_regime():
    w = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
    l = np.array([1.0, 3.0, 0.5, 3.0, 2.0])  # argmax set {1, 3}, w(A) = 0.35
    rho_star = -math.log(0.35)
    for rho in (rho_star, rho_star + 0.5, 10.0):
        r = kl_inner(l, w, rho)
        assert r.lam == 0.0
        assert_allclose(r.value, 3.0, rtol=0, atol=0)
        assert_allclose(r.q, [0, 0.2 / 0.35, 0, 0.15 / 0.35, 0], rtol=1e-15, atol=0)
        assert_allclose(r.kl, rho_star, rtol=RTOL_EXACT)
        assert r.kl <= rho * (1 + 1e-15)
    # just below the threshold: lam* > 0, KL = rho, value continuous
    r = kl_inner(l, w, rho_star * (1 - 1e-6))
    assert r.lam > 0 and r.active
    assert_allclose(r.kl, rho_star * (1 - 1e-6), rtol=RTOL_EXACT)
    assert 3.0 - 1e-4 < r.value <= 3.0 + 1e-15


def test_kl_inner_all_equal_losses():
    w = np.array([0.5, 0.3, 0.2])
    r = kl_inner(np.full(3, 0.7), w, 0.4)
    assert_allclose(r.value, 0.7, rtol=1e-15)
    assert_allclose(r.q, w, rtol=1e-15)
    assert r.lam == 0.0 and r.kl == 0.0


def test_kl_inner_zero_weights_are_ignored():
    l, w = _random_losses(8, 3)
    w0 = np.append(w, [0.0, 0.0])
    l0 = np.append(l, [50.0, -3.0])  # a huge loss with zero weight must not matter
    a, b = kl_inner(l, w, 0.3), kl_inner(l0, w0, 0.3)
    assert_allclose(b.value, a.value, rtol=1e-14)
    assert_allclose(b.q[:8], a.q, rtol=1e-12)
    assert np.all(b.q[8:] == 0.0)


def test_kl_inner_monotone_and_concave_in_rho():
    l, w = _random_losses(20, 4)
    rhos = np.linspace(0, 4.0, 81)
    vals = np.array([kl_inner(l, w, r).value for r in rhos])
    assert np.all(np.diff(vals) >= -1e-13)
    # the value is an infimum of affine functions of rho: concave
    assert np.all(vals[1:-1] >= 0.5 * (vals[:-2] + vals[2:]) - 1e-12)
    assert vals[-1] <= l.max() + 1e-15


def test_kl_inner_validates_inputs():
    with pytest.raises(ValueError, match="rho"):
        kl_inner([1.0, 2.0], [0.5, 0.5], -0.1)
    with pytest.raises(ValueError, match="rho"):
        kl_inner([1.0, 2.0], [0.5, 0.5], float("nan"))
    with pytest.raises(ValueError, match="sum to 1"):
        kl_inner([1.0, 2.0], [0.5, 0.6], 0.1)
    with pytest.raises(ValueError, match="shape"):
        kl_inner([1.0, 2.0], [1.0], 0.1)
    with pytest.raises(ValueError, match="finite"):
        kl_inner([1.0, np.inf], [0.5, 0.5], 0.1)


# ----------------------------------------------------------------------------------------------
# Joint dual G: analytic derivatives
# ----------------------------------------------------------------------------------------------


def test_joint_dual_gradient_and_hessian_match_finite_differences():
    data = _instance(25, 3, 5, ref_norm=0.3)
    J = _Joint(data, 1.3, 0.2)
    v = np.array([0.4, -0.7, 0.2, 0.35])
    g, H = J.grad_hess(v)
    h = 1e-6
    g_fd = np.array([(J.fun(v + h * e) - J.fun(v - h * e)) / (2 * h) for e in np.eye(4)])
    H_fd = np.array([(J.grad_hess(v + h * e)[0] - J.grad_hess(v - h * e)[0]) / (2 * h) for e in np.eye(4)])
    assert_allclose(g, g_fd, rtol=1e-6, atol=1e-9)
    assert_allclose(H, H_fd, rtol=1e-5, atol=1e-7)
    assert np.linalg.eigvalsh(H)[0] > -1e-12  # jointly convex
    # min over lam of G is L_KL
    lam = J.lam_star(v[:3])
    assert_allclose(J.fun(np.append(v[:3], lam)), kldpo_objective(v[:3], data, 1.3, 0.2), rtol=1e-13)


# ----------------------------------------------------------------------------------------------
# Solvers: certificates and agreement
# ----------------------------------------------------------------------------------------------

#: (seed, ref_norm, radius, rho, uniform): theta_ref != 0, an active ball (B = 0.5), weights.
CASES = [
    (0, 0.0, 5.0, 0.05, True),
    (1, 0.3, 5.0, 0.3, False),
    (2, 0.3, 0.5, 0.3, False),
    (3, 0.2, 0.5, 0.05, True),
    (4, 0.4, 1.0, 0.4, False),
]


@pytest.mark.parametrize("seed,ref_norm,radius,rho,uniform", CASES)
def test_native_and_cvxpy_certified_and_agree(seed, ref_norm, radius, rho, uniform):
    data = _instance(40, 3, seed, ref_norm=ref_norm, uniform=uniform)
    beta = 1.0
    assert rho < kl_collapse_threshold(data, radius)  # a nontrivial optimum
    a = solve_kldpo_native(data, beta, radius, rho)
    b = solve_kldpo_cvxpy(data, beta, radius, rho)
    _assert_certified(a, data, beta, radius, rho)
    _assert_certified(b, data, beta, radius, rho)
    assert a.solver == "native-newton" and b.solver.startswith("cvxpy-")
    assert_allclose(a.objective, b.objective, rtol=RTOL_OBJ)
    assert_allclose(a.theta, b.theta, rtol=0, atol=ATOL_THETA)
    assert not a.collapsed and not b.collapsed
    # each certified upper bound is above the other's lower bound (weak duality across solvers)
    assert a.objective >= b.lower_bound - 1e-12 and b.objective >= a.lower_bound - 1e-12
    # q* is the exponential tilt at the solution, KL = rho (constraint active)
    assert_allclose(kl_divergence(a.weights, data.weights), rho, rtol=1e-9)
    if radius == 0.5:
        assert_allclose(np.linalg.norm(a.theta), radius, rtol=1e-12)  # the ball binds


def test_solve_kldpo_dispatch_and_validation():
    data = _instance(10, 2, 0)
    r = solve_kldpo(data, 1.0, 2.0, 0.1)
    assert r.method == "kldpo" and r.solver.startswith("native")
    with pytest.raises(ValueError, match="unknown solver"):
        solve_kldpo(data, 1.0, 2.0, 0.1, solver="lbfgs")
    with pytest.raises(ValueError, match="rho"):
        solve_kldpo_native(data, 1.0, 2.0, -1.0)
    with pytest.raises(ValueError, match="beta"):
        solve_kldpo_native(data, 0.0, 2.0, 0.1)
    with pytest.raises(ValueError, match="radius"):
        solve_kldpo_cvxpy(data, 1.0, -2.0, 0.1)


def test_lam_zero_regime_goes_to_the_cone_program():
    # n = 5 uniform: -log max w = log 5; separable data so no collapse
    data = _instance(5, 2, 1, ref_norm=0.2, uniform=True)
    assert kl_collapse_threshold(data) == math.inf
    for rho in (1.7, 3.0):
        r = solve_kldpo_native(data, 1.0, 2.0, rho)
        _assert_certified(r, data, 1.0, 2.0, rho)
        assert "cvxpy" in r.info["path"] and r.lam == 0.0
        # lam* = 0: the robust loss is the largest loss, a minimax over the samples
        l = dpo_loss(r.theta, data.x, data.y, 1.0, data.theta_ref)
        assert_allclose(r.objective, l.max(), rtol=1e-14)


# ----------------------------------------------------------------------------------------------
# Brute force on tiny instances
# ----------------------------------------------------------------------------------------------


def _brute_force(data, beta, radius, rho):
    """Grid over the ball + local refinement, with kl_inner as the exact inner sup."""
    f = lambda th: kldpo_objective(th, data, beta, rho)  # noqa: E731
    if data.d == 1:
        grid = np.linspace(-radius, radius, 4001)
        vals = [f(np.array([t])) for t in grid]
        i = int(np.argmin(vals))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
        res = minimize_scalar(lambda t: f(np.array([t])), bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-12})
        return min(res.fun, vals[i])
    r = np.linspace(0, radius, 81)
    a = np.linspace(0, 2 * np.pi, 160, endpoint=False)
    pts = np.concatenate([[[0.0, 0.0]], (r[1:, None, None] * np.stack([np.cos(a), np.sin(a)], -1)).reshape(-1, 2)])
    vals = np.array([f(p) for p in pts])
    best = vals.min()
    polar = lambda ra: f(ra[0] * np.array([np.cos(ra[1]), np.sin(ra[1])]))  # noqa: E731
    for p in pts[np.argsort(vals)[:3]]:  # refine in polar coordinates, r in [0, B] (the ball exactly)
        res = minimize(polar, [np.linalg.norm(p), np.arctan2(p[1], p[0])], method="Nelder-Mead",
                       bounds=[(0, radius), (None, None)],
                       options={"xatol": 1e-11, "fatol": 1e-15, "maxiter": 4000})
        best = min(best, res.fun)
    return best


@pytest.mark.parametrize("d,seed,rho,radius", [(1, 0, 0.2, 3.0), (1, 1, 0.9, 1.0), (1, 2, 2.0, 3.0),
                                                 (2, 3, 0.1, 3.0), (2, 4, 0.5, 0.7), (2, 5, 1.8, 2.0)])
def test_brute_force_tiny(d, seed, rho, radius):
    data = _instance(5, d, seed, ref_norm=0.1, signal=2.0, uniform=seed % 2 == 0)
    r = solve_kldpo_native(data, 1.0, radius, rho)
    _assert_certified(r, data, 1.0, radius, rho)
    brute = _brute_force(data, 1.0, radius, rho)
    assert r.objective <= brute + 1e-10  # the solver is never beaten by the grid
    assert_allclose(brute, r.objective, rtol=0, atol=ATOL_BRUTE)


# ----------------------------------------------------------------------------------------------
# rho = 0 and the collapse threshold
# ----------------------------------------------------------------------------------------------


def test_rho_zero_is_dpo():
    data = _instance(30, 3, 7, ref_norm=0.3)
    dpo = solve_dpo_native(data, 1.2, 2.0)
    for solver in ("native", "cvxpy"):
        r = solve_kldpo(data, 1.2, 2.0, 0.0, solver=solver)
        assert r.status == "optimal" and r.lam == math.inf
        assert_allclose(r.weights, data.weights, rtol=0, atol=0)
        assert_allclose(r.objective, dpo.objective, rtol=1e-10)
        assert_allclose(r.theta, dpo.theta, atol=ATOL_THETA)
    # continuity at rho -> 0
    r = solve_kldpo_native(data, 1.2, 2.0, 1e-12)
    assert r.status == "optimal"
    assert_allclose(r.theta, dpo.theta, atol=1e-4)


def test_collapse_threshold_against_its_definition():
    """rho_c = min{KL(q||w): E_q u = 0}: compare the Newton dual with a conic primal."""
    import cvxpy as cp

    data = _instance(40, 3, 0, ref_norm=0.3)
    rho_c = kl_collapse_threshold(data)
    u, w = data.u, data.weights
    r = cp.Variable(data.n, nonneg=True)  # likelihood ratios q / w
    prob = cp.Problem(cp.Minimize(w @ cp.rel_entr(r, np.ones(data.n))), [u.T @ cp.multiply(w, r) == 0, w @ r == 1])
    prob.solve(solver="CLARABEL")
    assert_allclose(rho_c, prob.value, rtol=1e-7)
    # the normal cone of the sphere lowers the threshold: E_q u = c theta_ref, c >= 0
    bdata = _instance(40, 3, 1, ref_norm=1.0)
    rb, ri = kl_collapse_threshold(bdata, 1.0), kl_collapse_threshold(bdata)
    c = cp.Variable(nonneg=True)
    u, w = bdata.u, bdata.weights
    prob = cp.Problem(cp.Minimize(w @ cp.rel_entr(r, np.ones(bdata.n))),
                      [u.T @ cp.multiply(w, r) == c * bdata.theta_ref, w @ r == 1])
    prob.solve(solver="CLARABEL")
    assert_allclose(rb, prob.value, rtol=1e-7)
    assert rb < ri


def test_collapse_threshold_infinite_when_separable():
    x = np.array([[1.0, 0.2], [0.5, -0.3], [0.8, 0.9]])
    data = PreferenceData(x, np.ones(3, int))  # u_i = x_i all in the half-plane u_1 > 0
    assert kl_collapse_threshold(data) == math.inf


def test_collapse_threshold_small_rho_approximation():
    """rho_c ~ mu^T Sigma^{-1} mu / 2 as mu -> 0: relative error O(|mu|) in general (third cumulant),
    O(|mu|^2) for data symmetric about the mean."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((200, 3))
    m = rng.standard_normal(3)
    skewed = rng.exponential(size=(400, 3))
    skewed -= skewed.mean(axis=0)
    deltas = (0.1, 0.01, 0.001)
    for base, order in ((np.concatenate([z, -z]), 2), (skewed, 1)):
        errs = []
        for delta in deltas:
            data = PreferenceData(base + delta * m, np.ones(base.shape[0], int))
            exact, approx = kl_collapse_threshold(data), kl_collapse_small_rho(data)
            errs.append(abs(exact / approx - 1))
        slopes = np.diff(np.log(errs)) / np.diff(np.log(deltas))
        assert_allclose(slopes, order, atol=0.1)
        assert errs[-1] < 1e-3


@pytest.mark.parametrize("ref_norm,radius", [(0.3, 5.0), (1.0, 1.0)])  # interior and on the sphere
def test_collapse(ref_norm, radius):
    data = _instance(40, 3, 2, ref_norm=ref_norm)
    rho_c = kl_collapse_threshold(data, radius)
    for rho in (rho_c, 1.05 * rho_c, 3 * rho_c):
        a = solve_kldpo_native(data, 1.0, radius, rho)
        _assert_certified(a, data, 1.0, radius, rho)
        assert a.collapsed and a.info["path"] == "collapse"
        assert_allclose(a.theta, data.theta_ref, rtol=0, atol=0)
        assert_allclose(a.objective, math.log(2), rtol=1e-14)
    # the independent cone program agrees that theta_ref is optimal just above rho_c
    b = solve_kldpo_cvxpy(data, 1.0, radius, 1.05 * rho_c)
    assert b.status == "optimal" and b.collapsed
    assert_allclose(b.theta, data.theta_ref, atol=1e-5)
    # just below: a different optimum, certified, and the cone program agrees
    for f in (0.9, 0.99):
        a = solve_kldpo_native(data, 1.0, radius, f * rho_c)
        _assert_certified(a, data, 1.0, radius, f * rho_c)
        assert not a.collapsed
        assert np.linalg.norm(a.theta - data.theta_ref) > 1e-3
        assert a.objective < math.log(2) - 1e-7  # strictly better than theta_ref
    b = solve_kldpo_cvxpy(data, 1.0, radius, 0.9 * rho_c)
    assert b.status == "optimal" and not b.collapsed
    assert_allclose(b.theta, solve_kldpo_native(data, 1.0, radius, 0.9 * rho_c).theta, atol=ATOL_THETA)


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------


@st.composite
def _small_problem(draw):
    n = draw(st.integers(3, 12))
    d = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 10_000))
    uniform = draw(st.booleans())
    data = _instance(n, d, seed, ref_norm=draw(st.floats(0.0, 0.5)), signal=3.0, uniform=uniform)
    theta = np.random.default_rng(seed + 1).uniform(-1, 1, d)
    rhos = sorted(draw(st.lists(st.floats(0.0, 3.0), min_size=2, max_size=4)))
    return data, theta, rhos, seed


@settings(max_examples=25, deadline=None)
@given(_small_problem())
def test_properties_of_the_robust_value(problem):
    data, theta, rhos, seed = problem
    beta = 1.0
    losses = dpo_loss(theta, data.x, data.y, beta, data.theta_ref)
    nominal = data.weights @ losses
    vals = []
    perm = np.random.default_rng(seed).permutation(data.n)
    pdata = PreferenceData(data.x[perm], data.y[perm], data.weights[perm], data.theta_ref)
    for rho in rhos:
        r = kl_inner(losses, data.weights, rho)
        vals.append(r.value)
        assert r.value >= nominal - 1e-12 and r.value <= losses.max() + 1e-12
        assert_allclose(r.q.sum(), 1.0, rtol=0, atol=ATOL_EXACT)
        assert r.kl <= rho * (1 + 1e-9) + 1e-15
        if r.active and rho > 0:
            assert_allclose(r.kl, rho, rtol=1e-9, atol=1e-15)  # KL is a difference of O(s |l|) terms
        # invariance to permuting the samples (value and the permuted worst case)
        rp = kl_inner(losses[perm], data.weights[perm], rho)
        assert_allclose(rp.value, r.value, rtol=1e-13)
        assert_allclose(rp.q, r.q[perm], rtol=1e-9, atol=1e-15)
        assert_allclose(kldpo_objective(theta, pdata, beta, rho), r.value, rtol=1e-13)
    assert np.all(np.diff(vals) >= -1e-13)


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 1000), st.floats(0.02, 0.4))
def test_property_robust_optimum_monotone_and_permutation_invariant(seed, rho):
    data = _instance(15, 2, seed, ref_norm=0.2, signal=3.0)
    a = solve_kldpo_native(data, 1.0, 2.0, rho)
    b = solve_kldpo_native(data, 1.0, 2.0, 1.5 * rho)
    assert a.status == "optimal" and b.status == "optimal"
    assert b.objective >= a.objective - 2e-7  # the optimum is non-decreasing in rho
    assert a.objective >= solve_dpo_native(data, 1.0, 2.0).objective - 1e-7
    perm = np.random.default_rng(seed).permutation(data.n)
    p = solve_kldpo_native(PreferenceData(data.x[perm], data.y[perm], data.weights[perm], data.theta_ref),
                           1.0, 2.0, rho)
    assert_allclose(p.objective, a.objective, rtol=1e-10)
    assert_allclose(p.theta, a.theta, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Danskin gradient
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,rho", [(0, 0.05), (1, 0.4), (2, 1.5)])
def test_danskin_gradient_matches_finite_differences(seed, rho):
    data = _instance(30, 3, seed, ref_norm=0.3)
    theta = np.random.default_rng(seed).uniform(-1, 1, 3)
    g = kldpo_gradient(theta, data, 1.0, rho)
    h = 1e-5
    fd = np.array([(kldpo_objective(theta + h * e, data, 1.0, rho) - kldpo_objective(theta - h * e, data, 1.0, rho))
                   / (2 * h) for e in np.eye(3)])
    assert_allclose(g, fd, rtol=RTOL_FD, atol=ATOL_FD)


# ----------------------------------------------------------------------------------------------
# Population use: weighted and compressed data
# ----------------------------------------------------------------------------------------------


def test_population_weighted_data():
    model = make_model(n_prompts=5, n_answers=4, d=4, seed=3, theta_star_norm=1.5)
    pop = model.nominal().as_data()
    rho_c = kl_collapse_threshold(pop, model.radius)
    rho = 0.5 * rho_c
    a = solve_kldpo_native(pop, model.beta, model.radius, rho)
    b = solve_kldpo_cvxpy(pop, model.beta, model.radius, rho)
    _assert_certified(a, pop, model.beta, model.radius, rho)
    _assert_certified(b, pop, model.beta, model.radius, rho)
    assert_allclose(a.objective, b.objective, rtol=RTOL_OBJ)
    assert_allclose(a.theta, b.theta, atol=ATOL_THETA)


def test_compressed_data_gives_the_same_optimum():
    model = make_model(n_prompts=3, n_answers=3, d=3, seed=4, theta_star_norm=1.5)
    sample = model.nominal().sample(400, seed=5)  # many repeated tuples
    comp, inverse = sample.compress()
    assert comp.n < sample.n
    for rho in (0.02, 0.2):
        a = solve_kldpo_native(sample, model.beta, model.radius, rho)
        b = solve_kldpo_native(comp, model.beta, model.radius, rho)
        _assert_certified(a, sample, model.beta, model.radius, rho)
        _assert_certified(b, comp, model.beta, model.radius, rho)
        assert_allclose(a.objective, b.objective, rtol=1e-12)
        assert_allclose(a.theta, b.theta, atol=1e-8)
        assert a.collapsed == b.collapsed
        # the worst case of the compressed data is the aggregated worst case
        assert_allclose(np.bincount(inverse, weights=a.weights, minlength=comp.n), b.weights, atol=1e-10)
    assert_allclose(kl_collapse_threshold(sample), kl_collapse_threshold(comp), rtol=1e-10)


def test_zero_weight_tuples_do_not_change_the_optimum():
    data = _instance(20, 3, 9, ref_norm=0.2)
    w = np.append(data.weights, [0.0, 0.0])
    x = np.vstack([data.x, [[0.9, 0.1, 0.0], [-0.5, 0.5, 0.5]]])
    y = np.append(data.y, [0, 1])
    padded = PreferenceData(x, y, w, data.theta_ref)
    a = solve_kldpo_native(data, 1.0, 2.0, 0.1)
    b = solve_kldpo_native(padded, 1.0, 2.0, 0.1)
    assert b.status == "optimal"
    assert_allclose(b.objective, a.objective, rtol=1e-12)
    assert_allclose(b.theta, a.theta, atol=1e-9)
    assert np.all(b.weights[-2:] == 0.0)
