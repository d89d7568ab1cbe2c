"""tau <-> rho, eps -> rho0 and the collapse radii; the `drdpo gradients --calibrate` CLI."""

import json
import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from drdpo_theory import approx as A
from drdpo_theory import calibration as C
from drdpo_theory.cli import main
from drdpo_theory.solvers.kl import kl_inner, solve_kldpo
from drdpo_theory.solvers.wasserstein import solve_wdpo

from tests.helpers import random_data

RT_RTOL = 1e-9  # round trips of 1-D maps solved to machine precision
GRAD_RTOL = 1e-10  # algebraic identities


@pytest.mark.parametrize("seed, weighted", [(0, False), (1, True)])
def test_tau_rho_round_trip(seed, weighted):
    data = random_data(seed, n=40, d=3, weighted=weighted)
    beta, theta = 1.0, np.array([0.8, -0.5, 0.3])
    for rho in (0.005, 0.05, 0.3):
        lam = C.tau_for_rho(theta, data, beta, rho)
        assert lam > 0
        assert_allclose(C.rho_for_tau(theta, data, beta, lam), rho, rtol=RT_RTOL)
    # rho(tau) is decreasing in tau
    taus = np.geomspace(0.05, 20, 12)
    rhos = [C.rho_for_tau(theta, data, beta, t) for t in taus]
    assert np.all(np.diff(rhos) < 0)
    curve = C.lam_star_curve(theta, data, beta, [0.01, 0.1])
    assert_allclose(curve.rho_roundtrip, curve.rho, rtol=RT_RTOL)
    assert np.all(np.diff(curve.lam_star) < 0)  # bigger ball, smaller lam*


def test_tau_is_zero_in_the_max_loss_regime():
    data = random_data(2, n=10, d=2)
    theta = np.array([1.0, -1.0])
    assert C.tau_for_rho(theta, data, 1.0, math.log(10) + 0.1) == 0.0
    with pytest.raises(ValueError, match="tau"):
        C.rho_for_tau(theta, data, 1.0, -1.0)


@pytest.mark.parametrize("space", ["z", "x"])
def test_rho0_rules(space):
    data = random_data(3, n=50, d=3, theta_ref_norm=0.3, weighted=True)
    beta, theta, eps = 1.2, np.array([0.6, 0.9, -0.4]), 0.05
    r_g = C.rho0_for_eps(theta, data, beta, eps, "gradient", space)
    r_v = C.rho0_for_eps(theta, data, beta, eps, "value", space)
    assert_allclose(r_v, 2 * r_g, rtol=GRAD_RTOL)
    # gradient rule: the squared-penalty gradient equals the first-order one at the calibration theta
    assert_allclose(A.wdpo_grad_sq_penalty(theta, data, beta, r_g, space),
                    A.wdpo_grad_first_order(theta, data, beta, eps, space), rtol=GRAD_RTOL)
    # value rule: the penalty values agree
    G = A.penalty_moment(theta, data, beta, space)
    assert_allclose(r_v * G, eps * math.sqrt(G), rtol=GRAD_RTOL)
    assert_allclose(C.eps_for_rho0(theta, data, beta, r_g, "gradient", space), eps, rtol=GRAD_RTOL)
    assert C.rho0_for_eps(data.theta_ref, data, beta, eps, "gradient", space) == math.inf
    with pytest.raises(ValueError, match="rule"):
        C.rho0_for_eps(theta, data, beta, eps, "median", space)


def test_collapse_radii_are_exact_thresholds():
    data = random_data(4, n=60, d=3)
    beta, B = 1.0, 3.0
    rad = C.collapse_radii(data)
    mu = np.linalg.norm(data.weights @ data.u)
    assert_allclose(rad["w1_eps_c"], mu / 2, rtol=GRAD_RTOL)
    assert_allclose(rad["w2_eps_c"], mu, rtol=GRAD_RTOL)
    assert_allclose(rad["w2_eps_c_z"] * math.sqrt(2), rad["w2_eps_c"], rtol=GRAD_RTOL)
    # the core solvers collapse just above and not just below
    for f, collapsed in ((1.02, True), (0.9, False)):
        rk = solve_kldpo(data, beta, B, f * rad["kl_rho_c"])
        rw = solve_wdpo(data, beta, B, f * rad["w1_eps_c"])
        assert (np.linalg.norm(rk.theta) < 1e-9) == collapsed
        assert (np.linalg.norm(rw.theta) < 1e-9) == collapsed


def test_calibrate_dict():
    data = random_data(5, n=40, d=3)
    out = C.calibrate(data, 1.0, 3.0, rho=0.01, eps=0.02, space="x")
    assert out["theta_source"] == "dpo"
    theta = np.array(out["theta"])
    assert_allclose(out["tau"], kl_inner(A.batch_losses(theta, data, 1.0), data.weights, 0.01).lam, rtol=0)
    assert_allclose(out["rho_roundtrip"], 0.01, rtol=RT_RTOL)
    assert_allclose(out["rho0_value"], 2 * out["rho0_gradient"], rtol=GRAD_RTOL)
    json.dumps(out)


def test_cli_calibrate(tmp_path, capsys):
    data = random_data(6, n=40, d=3)
    f = tmp_path / "d.npz"
    data.save_npz(f)
    rc = main(["gradients", "--calibrate", "--data", str(f), "--beta", "1", "--radius", "3", "--rho", "0.01",
               "--eps", "0.02", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"tau", "rho0_gradient", "rho0_value", "collapse"} <= set(out)
    assert out["space"] == "z"
    rc = main(["gradients", "--calibrate", "--data", str(f), "--beta", "1"])
    assert rc == 2
    assert "--radius" in capsys.readouterr().err
    rc = main(["gradients", "--calibrate", "--data", str(tmp_path / "missing.npz"), "--beta", "1", "--radius", "3"])
    assert rc == 2
