"""Approximate KLDPO/WDPO gradients vs exact ones: known cases, closed forms, finite differences."""

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy.optimize import minimize, minimize_scalar

from drdpo_theory import approx as A
from drdpo_theory.data import PreferenceData
from drdpo_theory.losses import dpo_loss
from drdpo_theory.solvers.kl import kl_collapse_threshold, kldpo_gradient

from tests.helpers import random_data

COS_ATOL = 1e-10  # cosine of the normalised tilt at tau = lam* (the brief's requirement)
GRAD_RTOL = 1e-8  # exact identities between gradient formulas
FD_RTOL = 1e-6  # central finite differences (step 1e-6) of smooth functions
FD_ATOL = 1e-9
VALUE_RTOL = 1e-9


def _theta(seed, d, scale=1.0):
    rng = np.random.default_rng(100 + seed)
    return scale * rng.standard_normal(d)


def _fd(f, theta, h=1e-6):
    return np.array([(f(theta + h * e) - f(theta - h * e)) / (2 * h) for e in np.eye(len(theta))])


def _lam_star_reference(losses, w, rho):
    """Independent 1-D dual: min_lam lam rho + lam log sum w exp(l/lam) (scipy, log-lam grid + Brent)."""
    def phi(loglam):
        lam = math.exp(loglam)
        m = losses.max()
        return lam * rho + m + lam * math.log(w @ np.exp((losses - m) / lam))

    grid = np.linspace(-12, 8, 400)
    k = int(np.argmin([phi(g) for g in grid]))
    res = minimize_scalar(phi, bracket=(grid[max(k - 1, 0)], grid[k], grid[min(k + 1, 399)]),
                          options={"xtol": 1e-14})
    return math.exp(res.x)


# ------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("seed, weighted, tr", [(0, False, 0.0), (1, True, 0.3), (2, False, 0.5), (3, True, 0.0)])
@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9])
def test_softmax_at_lam_star_is_the_exact_kl_gradient(seed, weighted, tr, frac):
    data = random_data(seed, n=50, d=3, theta_ref_norm=tr, weighted=weighted)
    beta, theta = 1.3, _theta(seed, 3)
    rho = frac * min(kl_collapse_threshold(data), 1.0)
    from drdpo_theory.calibration import tau_for_rho

    lam = tau_for_rho(theta, data, beta, rho)
    g_ex = kldpo_gradient(theta, data, beta, rho)
    g = A.kldpo_grad_softmax(theta, data, beta, lam)
    assert_allclose(A.cosine(g, g_ex), 1.0, rtol=0, atol=COS_ATOL)
    assert_allclose(g, g_ex, rtol=GRAD_RTOL, atol=1e-14)
    # the batch-calibrated variant on the full data is the exact gradient too
    assert_allclose(A.kldpo_grad_calibrated(theta, data, beta, rho), g_ex, rtol=GRAD_RTOL, atol=1e-14)


def test_softmax_against_an_independent_dual():
    """lam* from a scipy solve of the dual (not kl_inner) gives the same tilt as the core gradient."""
    data = random_data(4, n=30, d=2, weighted=True)
    beta, theta, rho = 2.0, np.array([0.7, -0.4]), 0.05
    l = dpo_loss(theta, data.x, data.y, beta)
    lam = _lam_star_reference(l, data.weights, rho)
    g = A.kldpo_grad_softmax(theta, data, beta, lam)
    assert_allclose(A.cosine(g, kldpo_gradient(theta, data, beta, rho)), 1.0, rtol=0, atol=1e-9)


def test_clamped_weights_only_rescale_when_the_clamp_does_not_bind():
    data = random_data(5, n=40, d=3, weighted=True)
    beta, theta = 1.0, _theta(5, 3)
    tau = 2.0
    l = A.batch_losses(theta, data, beta)
    w = A.kl_tilt_weights(l, data.weights, tau, normalise=False, clamp=None)
    assert w.max() < A.KL_WEIGHT_CLAMP  # the premise of this test
    g_c = A.kldpo_grad_clamped(theta, data, beta, tau)
    g_s = A.kldpo_grad_softmax(theta, data, beta, tau)
    # unnormalised = (sum_i p_i w_i) x normalised, and sum_i p_i w_i >= 1 (Jensen): the norm is inflated
    inflation = float(data.weights @ w)
    assert inflation >= 1.0
    assert_allclose(g_c, inflation * g_s, rtol=GRAD_RTOL)


def test_clamp_binds_and_changes_the_direction():
    data = random_data(6, n=40, d=3)
    beta, theta, tau = 3.0, _theta(6, 3, 2.0), 0.05
    l = A.batch_losses(theta, data, beta)
    w = A.kl_tilt_weights(l, data.weights, tau, normalise=False)
    assert w.max() == A.KL_WEIGHT_CLAMP
    w_raw = A.kl_tilt_weights(l, data.weights, tau, normalise=False, clamp=None)
    # hand computation of the authors' estimator
    g_hand = np.mean(np.minimum(np.exp((l - l.mean()) / tau), 10.0)[:, None]
                     * np.array([A.dpo_grad_batch(theta, PreferenceData(data.x[i:i + 1], data.y[i:i + 1]), beta)
                                 for i in range(data.n)]), axis=0)
    assert_allclose(A.kldpo_grad_clamped(theta, data, beta, tau), g_hand, rtol=GRAD_RTOL)
    assert A.cosine(A.kldpo_grad_clamped(theta, data, beta, tau), A.kldpo_grad_softmax(theta, data, beta, tau)) < 1 - 1e-6
    assert w_raw.max() > 10.0


def test_kl_weights_reject_bad_tau():
    with pytest.raises(ValueError, match="tau"):
        A.kl_tilt_weights(np.ones(3), np.ones(3) / 3, 0.0, normalise=True)


# ------------------------------------------------------------------------------------------- W


@pytest.mark.parametrize("space", ["z", "x"])
@pytest.mark.parametrize("seed", [0, 1])
def test_penalty_gradient_matches_finite_differences(space, seed):
    data = random_data(seed, n=30, d=3, theta_ref_norm=0.4, weighted=True)
    beta, theta, rho0 = 1.7, _theta(seed, 3), 0.3
    fd = _fd(lambda t: A.wdpo_sq_penalty(t, data, beta, rho0, space), theta)
    assert_allclose(A.wdpo_grad_sq_penalty(theta, data, beta, rho0, space), fd, rtol=FD_RTOL, atol=FD_ATOL)
    fd2 = _fd(lambda t: A.first_order_value(t, data, beta, 0.2, space), theta)
    assert_allclose(A.wdpo_grad_first_order(theta, data, beta, 0.2, space), fd2, rtol=FD_RTOL, atol=FD_ATOL)


def test_feature_gradient_matches_finite_differences_in_x_and_z():
    data = random_data(7, n=5, d=3, theta_ref_norm=0.2)
    beta, theta = 1.2, _theta(7, 3)
    gx = A.grad_z(theta, data, beta, "x")
    gz = A.grad_z(theta, data, beta, "z")
    h = 1e-6
    for i in range(data.n):
        for j in range(3):
            e = np.zeros(3)
            e[j] = h
            lp = dpo_loss(theta, data.x[i] + e, data.y[i:i + 1], beta, data.theta_ref)[0]
            lm = dpo_loss(theta, data.x[i] - e, data.y[i:i + 1], beta, data.theta_ref)[0]
            assert_allclose(gx[i, j], (lp - lm) / (2 * h), rtol=FD_RTOL, atol=FD_ATOL)
    # phi1 enters x with +, phi2 with -: grad_{phi1} = grad_x = -grad_{phi2}
    assert_allclose(gz[:, 0], gx, rtol=0, atol=0)
    assert_allclose(gz[:, 1], -gx, rtol=0, atol=0)
    assert_allclose(A.grad_z_sqnorm(theta, data, beta, "z"), 2 * (gx**2).sum(1), rtol=GRAD_RTOL)


def test_z_radius_is_sqrt2_x_radius():
    data = random_data(8, n=20, d=3)
    beta, theta, eps_z = 1.0, _theta(8, 3), 0.07
    assert_allclose(A.first_order_value(theta, data, beta, eps_z, "z"),
                    A.first_order_value(theta, data, beta, A.eps_x_from_z(eps_z), "x"), rtol=VALUE_RTOL)
    assert_allclose(A.wdpo_grad_adversarial(theta, data, beta, eps=eps_z, space="z"),
                    A.wdpo_grad_adversarial(theta, data, beta, eps=A.eps_x_from_z(eps_z), space="x"), rtol=GRAD_RTOL)


def test_eps_to_zero_recovers_dpo():
    data = random_data(9, n=30, d=3, theta_ref_norm=0.3)
    beta, theta = 1.4, _theta(9, 3)
    g_dpo = A.dpo_grad_batch(theta, data, beta)
    assert_allclose(A.wdpo_grad_first_order(theta, data, beta, 0.0), g_dpo, rtol=0, atol=0)
    assert_allclose(A.wdpo_grad_sq_penalty(theta, data, beta, 0.0), g_dpo, rtol=0, atol=0)
    assert_allclose(A.wdpo_grad_adversarial(theta, data, beta, eps=0.0), g_dpo, rtol=0, atol=0)
    assert_allclose(A.w2_gradient_continuous(theta, data, beta, 0.0), g_dpo, rtol=0, atol=0)
    for eps in (1e-4, 1e-5):  # the exact W2 gradient tends to the DPO one linearly in eps
        err = np.linalg.norm(A.w2_gradient_continuous(theta, data, beta, eps) - g_dpo)
        assert err <= 10 * eps * np.linalg.norm(g_dpo) + 1e-12
    # the KL estimators: rho -> 0 is lam* -> inf: uniform weights
    assert_allclose(A.kldpo_grad_softmax(theta, data, beta, 1e12), g_dpo, rtol=1e-9)
    assert_allclose(A.kldpo_grad_calibrated(theta, data, beta, 0.0), g_dpo, rtol=GRAD_RTOL)


def test_adversarial_step_is_a_finite_difference_of_the_penalties():
    data = random_data(10, n=30, d=3)
    beta, theta = 1.0, _theta(10, 3)
    errs_sq, errs_fo = [], []
    for r in (0.02, 0.01):
        errs_sq.append(np.linalg.norm(A.wdpo_grad_adversarial(theta, data, beta, rho0=r)
                                      - A.wdpo_grad_sq_penalty(theta, data, beta, r)))
        errs_fo.append(np.linalg.norm(A.wdpo_grad_adversarial(theta, data, beta, eps=r)
                                      - A.wdpo_grad_first_order(theta, data, beta, r)))
    # second order: halving the step divides the difference by ~4
    assert_allclose(errs_sq[0] / errs_sq[1], 4.0, rtol=0.05)
    assert_allclose(errs_fo[0] / errs_fo[1], 4.0, rtol=0.05)


def test_w2_value_against_brute_force_primal():
    data = random_data(11, n=6, d=2, theta_ref_norm=0.2, weighted=True)
    beta, theta, eps = 1.5, np.array([1.2, -0.8]), 0.4
    inner = A.w2_inner_continuous(theta, data, beta, eps)
    # primal over the move lengths r_i (along the worst direction), best of several starts
    v = theta - data.theta_ref
    L, t, p = beta * np.linalg.norm(v), beta * data.u @ v, data.weights
    best = -np.inf
    for s in range(8):
        r0 = np.abs(np.random.default_rng(s).normal(size=data.n)) * eps
        res = minimize(lambda r: -(p @ np.logaddexp(0, L * r - t)), r0, method="SLSQP",
                       bounds=[(0, None)] * data.n, constraints=[{"type": "ineq", "fun": lambda r: eps**2 - p @ r**2}],
                       options={"ftol": 1e-14, "maxiter": 500})
        best = max(best, -res.fun)
    assert_allclose(inner.value, best, rtol=1e-8)
    assert_allclose(inner.budget_used, eps**2, rtol=1e-8)
    # the worst-case features achieve the value (primal = dual)
    assert_allclose(p @ dpo_loss(theta, inner.x_adv, data.y, beta, data.theta_ref), inner.value, rtol=VALUE_RTOL)


def test_w2_gradient_matches_finite_differences():
    data = random_data(12, n=25, d=3, theta_ref_norm=0.3)
    beta, theta, eps = 1.0, _theta(12, 3), 0.3
    fd = _fd(lambda t: A.w2_value_continuous(t, data, beta, eps), theta)
    assert_allclose(A.w2_gradient_continuous(theta, data, beta, eps), fd, rtol=1e-5, atol=1e-8)


def test_first_order_value_underestimates_with_error_order_eps_squared():
    from drdpo_theory.experiments.gradients import fit_loglog_slope

    data = random_data(13, n=40, d=3)
    beta, theta = 1.0, _theta(13, 3)
    eps = np.geomspace(1e-3, 1e-1, 5)
    err = np.array([A.w2_value_continuous(theta, data, beta, e) - A.first_order_value(theta, data, beta, e, "x")
                    for e in eps])
    assert np.all(err > 0)
    slope, _ = fit_loglog_slope(eps, err)
    assert_allclose(slope, 2.0, atol=0.05)


def test_w2_collapse_and_solver():
    data = random_data(14, n=60, d=3)
    beta, B = 1.0, 3.0
    eps_c = A.w2_collapse_radius(data)
    assert_allclose(eps_c, np.linalg.norm(data.weights @ data.u), rtol=0)
    r_above = A.solve_w2_continuous(data, beta, B, eps_c * 1.01)
    assert r_above.collapsed and np.all(r_above.theta == data.theta_ref)
    # just above eps_c: theta_ref beats every small move (checked on the exact value, not the solver)
    v0 = A.w2_value_continuous(data.theta_ref, data, beta, eps_c * 1.01)
    rng = np.random.default_rng(0)
    for d in rng.standard_normal((5, 3)):
        assert A.w2_value_continuous(1e-3 * d / np.linalg.norm(d), data, beta, eps_c * 1.01) > v0
    # just below: moving along mean u lowers the value, and the solver leaves theta_ref
    mu = data.weights @ data.u
    assert A.w2_value_continuous(1e-3 * mu / np.linalg.norm(mu), data, beta, eps_c * 0.95) < \
        A.w2_value_continuous(data.theta_ref, data, beta, eps_c * 0.95)
    r = A.solve_w2_continuous(data, beta, B, eps_c * 0.5)
    assert not r.collapsed and np.linalg.norm(r.theta) > 0
    assert r.info["grad_norm"] < 1e-7
    # optimality: no random perturbation improves the value
    for d in rng.standard_normal((5, 3)):
        assert A.w2_value_continuous(r.theta + 1e-3 * d, data, beta, eps_c * 0.5) >= r.objective - 1e-12


def test_estimator_input_errors():
    data = random_data(15, n=5, d=2)
    with pytest.raises(ValueError, match="exactly one"):
        A.wdpo_grad_adversarial(np.zeros(2), data, 1.0)
    with pytest.raises(ValueError, match="space"):
        A.grad_z_sqnorm(np.zeros(2), data, 1.0, space="y")
    with pytest.raises(TypeError, match="PreferenceData"):
        A.dpo_grad_batch(np.zeros(2), np.zeros((3, 2)), 1.0)


def test_gradient_study_tables_small(tmp_path):
    """The study's tables on a tiny grid: the known cases hold inside the pipeline too."""
    from drdpo_theory.experiments import gradients as G

    cfg = G.GradientStudyConfig(instances=(0,), n_prompts=3, n_answers=3, d=3, radius_fracs=(0.5,),
                                tau_mults=(0.5, 1.0, 2.0), n_points=1, batch_sizes=(8,), n_batches=20,
                                betas=(1.0,), value_eps=(1e-3, 1e-2), path_steps=5, sgd_steps=50,
                                sgd_seeds=(0,), fixed_point_steps=50)
    res = G.run_study(cfg, out_dir=tmp_path, tables=("kl_tau", "value_error", "batch"), progress=False)
    t = res["kl_tau"]
    at = t[(t.tau_mult == 1.0) & (t.estimator == "kl_softmax")]
    assert_allclose(at.cosine, 1.0, rtol=0, atol=COS_ATOL)
    assert (t[t.estimator == "kl_clamped"].mean_w >= 1.0 - 1e-12).all() or (t.clamp_frac > 0).any()
    s = G.summarize(res)
    assert_allclose(s["first_order_slope"], 2.0, atol=0.05)
    assert s["first_order_underestimates"]
    b = res["batch"]
    assert_allclose(b[b.estimator == "dpo"].bias, 0.0, atol=1e-12)  # the unbiased estimator, by control variate
    assert (tmp_path / "kl_tau.csv").exists() and any((tmp_path / "cells").iterdir())
