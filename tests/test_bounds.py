"""Sample-complexity bounds: hand-computed constants, the localisation argument, and the bound against
measured (1-delta)-quantiles of ||theta_n - theta_pop|| (a real test: a bound below the quantile fails)."""

import math
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose

from drdpo_theory import bounds as bd
from drdpo_theory.experiments import sample_complexity as sc

RTOL = 1e-12
ATOL = 1e-14


def test_paper_constants_by_hand():
    # beta = 0.5, B = 1: 4 beta B = 2.
    beta, B, lam_cov = 0.5, 1.0, 0.2
    e2 = math.exp(2.0)
    c_B = e2 / (1 + e2) ** 2  # 7.389056 / 70.37626 = 0.1049936
    L_max = math.log(1 + e2)  # 2.1269280
    gamma = beta**2 * c_B * lam_cov  # 0.25 * 0.1049936 * 0.2 = 0.005249679
    assert_allclose(bd.curvature_constant(beta, B), c_B, rtol=RTOL)
    assert_allclose(bd.loss_bound(beta, B), L_max, rtol=RTOL)
    assert_allclose(bd.strong_convexity(beta, B, lam_cov), gamma, rtol=RTOL)
    assert_allclose(c_B, 0.10499358540350652, rtol=1e-12)
    c = bd.BoundConstants.paper(beta, B, d=2, lambda_cov=lam_cov)
    assert_allclose([c.tau, c.l_hi, c.gamma], [2.0, L_max, gamma], rtol=RTOL)
    assert_allclose(c.l_hi - c.l_lo, c.tau, rtol=RTOL)  # softplus(t) - softplus(-t) = t
    # n = 100, delta = 0.1: R_n = beta B 2 / 10 = 0.1; D_n = 0.2 + 2 sqrt(log 20 / 200)
    D = 0.2 + 2.0 * math.sqrt(math.log(20.0) / 200.0)  # 0.2 + 2 * 0.1223873 = 0.4447746
    assert_allclose(bd.rademacher_dpo(100, c), 0.1, rtol=RTOL)
    assert_allclose(bd.dpo_uniform_deviation(100, 0.1, c), D, rtol=RTOL)
    assert_allclose(bd.theorem_error_bound(100, 0.1, c), 2 * math.sqrt(D / gamma), rtol=RTOL)
    # the one-sided excess bound is 2 D_n - 2 R_n
    assert_allclose(bd.dpo_excess_bound(100, 0.1, c), 2 * D - 0.2, rtol=RTOL)
    # n(eps, delta) in closed form, and it is the first n meeting the bound
    a = 2 * beta * B * 2 + 2.0 * math.sqrt(math.log(20.0) / 2)
    n_star = math.ceil((4 * a / (gamma * 0.5**2)) ** 2)
    assert bd.theorem_sample_size(0.5, 0.1, c) == n_star
    assert bd.theorem_error_bound(n_star, 0.1, c) <= 0.5 < bd.theorem_error_bound(n_star - 1, 0.1, c) * (1 + 1e-12)
    assert_allclose(bd.sample_size(lambda n: bd.theorem_error_bound(n, 0.1, c), 0.5), n_star, rtol=0, atol=1)


def test_instance_constants_and_local_growth_by_hand():
    # two support points x1 = (1, 0), x2 = (0, 0.5) with p = (0.25, 0.75); beta = 1, B = 1, theta_ref = 0
    x = np.array([[1.0, 0.0], [0.0, 0.5]])
    p = np.array([0.25, 0.75])
    c = bd.BoundConstants.instance(x, p, 1.0, 1.0, np.zeros(2))
    assert_allclose(c.x_max, 1.0, rtol=RTOL)
    assert_allclose(c.x_rms, math.sqrt(0.25 * 1 + 0.75 * 0.25), rtol=RTOL)
    assert_allclose(c.lambda_cov, min(0.25, 0.75 * 0.25), rtol=RTOL)  # E xx^T = diag(0.25, 0.1875)
    s = lambda t: math.exp(t) / (1 + math.exp(t)) ** 2  # noqa: E731
    assert_allclose(c.gamma, 1.0 * s(1.0) * 0.1875, rtol=RTOL)  # tau = 1 * 1 * (1 + 0)
    # at theta_pop = (0.5, 0), r = 0.2: t1 = 0.5 + 0.2 = 0.7, t2 = 0 + 0.2 * 0.5 = 0.1
    g = bd.local_growth(0.2, x, p, 1.0, 1.0, np.array([0.5, 0.0]), np.zeros(2))
    assert_allclose(g, min(0.25 * s(0.7), 0.75 * s(0.1) * 0.25), rtol=RTOL)
    # r large: capped at (B + ||theta_ref||) ||x_j||
    g_big = bd.local_growth(10.0, x, p, 1.0, 1.0, np.array([0.5, 0.0]), np.zeros(2))
    assert_allclose(g_big, min(0.25 * s(1.0), 0.75 * s(0.5) * 0.25), rtol=RTOL)
    # localisation: growth constant gamma(r) = g0 everywhere -> one step sqrt(2 E / g0)
    assert_allclose(bd.localized_error_bound(0.01, lambda r: 0.02, 2.0), 1.0, rtol=RTOL)
    assert bd.localized_error_bound(0.01, lambda r: 0.02 + 0.1 * (r < 1.5), 2.0) < 1.0


def test_kl_bound_infinite_when_exp_factor_too_large():
    c = bd.BoundConstants.paper(1.0, 1.0, 2, 0.1)
    prof = bd.KLProfile(rho=0.05, lam_pop=0.5, value_pop=0.65, gap_pop=0.0, w_width=1.0,
                        lam_table=np.array([0.25, 0.4, 0.5, 100.0]), phi_lower=np.array([0.66, 0.651, 0.65, 5.7]))
    assert bd.kldpo_excess_bound(100, 0.1, c, prof, dpo_min=0.6) == math.inf
    # with a huge n and a big dual margin it becomes finite and decreases in n
    prof2 = bd.KLProfile(rho=0.05, lam_pop=0.5, value_pop=0.65, gap_pop=0.0, w_width=1.0,
                         lam_table=np.array([0.45, 0.5, 100.0]), phi_lower=np.array([1.2, 0.65, 5.7]))
    e1 = bd.kldpo_excess_bound(1e10, 0.1, c, prof2, dpo_min=0.6)
    e2 = bd.kldpo_excess_bound(1e12, 0.1, c, prof2, dpo_min=0.6)
    assert np.isfinite(e1) and e2 < e1


def test_psi_lower_is_monotone_and_floored():
    prof = bd.KLProfile(rho=0.1, lam_pop=1.0, value_pop=1.0, gap_pop=0.0, w_width=1.0,
                        lam_table=np.array([0.5, 1.0, 2.0]), phi_lower=np.array([1.2, 1.0, 1.05]))
    psi = prof.psi_lower(np.array([0.4, 0.5, 0.7, 1.5, 3.0]), dpo_min=0.6)
    # psi table = phi - lam rho = (1.15, 0.9, 0.85); beyond the table -> dpo_min
    assert_allclose(psi, [1.15, 1.15, 0.9, 0.85, 0.6], rtol=RTOL)


#: the instance of the bound check: the study's default, small grid
CHECK_NS = (300, 3000, 30000)
CHECK_SEEDS = 20
DELTA = 0.1


@pytest.mark.parametrize("method, radius", [("dpo", 0.0), ("wdpo-w1", 0.08), ("kldpo", 0.04), ("wdpo-w2", 0.15)])
def test_bound_above_measured_quantile(method, radius):
    inst = sc.Instance()
    seeds = CHECK_SEEDS if method != "wdpo-w2" else 8
    ns = CHECK_NS if method != "wdpo-w2" else CHECK_NS[1:]
    b = sc.bound_curve(inst, method, radius, ns, DELTA).set_index("n")
    pop = sc.population_solution(inst, method, radius)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in ns:
            errs = []
            for s in range(seeds):
                res = sc.solve_method(method, sc.empirical_data(inst, n, s), inst, radius)
                assert res.status == "optimal", (method, n, s, res.status)
                errs.append(np.linalg.norm(res.theta - pop.theta))
            q = np.quantile(errs, 1 - DELTA)
            bound = b.loc[n, "bound"]
            assert bound >= q, (method, n, bound, q)
            # the bound with the paper's constants is never below the instance-constant one
            if np.isfinite(b.loc[n, "bound_paper"]):
                assert b.loc[n, "bound_paper"] >= bound * (1 - 1e-9) or bound > 2 * inst.radius
    if method in ("dpo", "wdpo-w1", "wdpo-w2"):
        # finite, decreasing, and non-vacuous at the largest n: the check is not trivially passed
        vals = b["bound"].to_numpy()
        assert np.all(np.isfinite(vals)) and np.all(np.diff(vals) <= 1e-12)
        assert vals[-1] < 2 * inst.radius


def test_population_optimum_is_weighted_exact_solution():
    inst = sc.Instance()
    nom = inst.nominal()
    pop = sc.population_solution(inst, "dpo", 0.0)
    # the exact DPO population optimum of a well-specified model is theta* (inside the ball)
    assert_allclose(pop.theta, inst.model().theta_star, atol=1e-7)
    # a large sample approaches it
    res = sc.solve_method("dpo", sc.empirical_data(inst, 10**6, 0), inst, 0.0)
    assert np.linalg.norm(res.theta - pop.theta) < 0.02
    assert nom.lambda_cov() > 0
