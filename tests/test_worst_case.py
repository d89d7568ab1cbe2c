"""``SolverResult.worst_case``: the worst-case distribution as arrays, checked against the objective.

Every worst case must be feasible (its transport cost / support as documented) and must attain the
robust value: ``E_{Q*} l(theta) + far_gain == objective`` (the objective comes from the dual, the
worst case from the primal side, so the identity is a real check). The continuous-W1 limit at
infinity is checked through explicit approximating distributions ``Q_delta``.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from numpy.testing import assert_allclose

from drdpo_theory.cli import main
from drdpo_theory.losses import dpo_loss
from drdpo_theory.solvers import solve
from drdpo_theory.solvers.wasserstein import FiniteSupport, transport_cost, wdpo_inner_continuous
from drdpo_theory.solvers.worst_case import WorstCase, from_flip_fractions
from tests.helpers import random_data

BETA, RADIUS = 1.3, 2.0
#: value identities between primal (worst case) and dual (objective): both exact up to rounding
ATOL_VALUE = 1e-10
#: masses are probabilities built from the data weights
ATOL_MASS = 1e-12


def _check_distribution(wc: WorstCase, d: int):
    k = wc.size
    assert wc.points.shape == (k, d) and wc.labels.shape == (k,) and wc.masses.shape == (k,) and wc.index.shape == (k,)
    assert np.all(wc.masses > 0)
    assert set(np.unique(wc.labels)) <= {0, 1}
    assert_allclose(wc.masses.sum(), 1.0, rtol=0, atol=ATOL_MASS)
    assert wc.mass_at_infinity == 0.0


def _flip_cost(wc: WorstCase, data, kappa):
    """Transport cost of the atoms from the data: an atom differs from its source tuple only by its label."""
    assert_allclose(wc.points, data.x[wc.index], rtol=0, atol=0)
    flipped = wc.labels != data.y[wc.index]
    return kappa * float(wc.masses[flipped].sum()) if flipped.any() else 0.0


def test_w1_kappa_inf_worst_case_is_data_plus_budget_at_infinity():
    """kappa = inf: Q* = P in the limit, the whole budget eps goes to infinity, gain eps beta ||theta - theta_ref||."""
    data = random_data(11, n=25, d=3, theta_ref_norm=0.4, weighted=True)
    eps = 0.03  # below eps_c: theta != theta_ref
    res = solve("wdpo", data, BETA, RADIUS, eps=eps)
    assert res.optimal and not res.collapsed
    wc = res.worst_case
    _check_distribution(wc, data.d)
    assert not wc.attained
    assert_allclose(wc.masses, data.weights[wc.index], rtol=0, atol=ATOL_MASS)
    assert _flip_cost(wc, data, math.inf) == 0.0
    a = res.theta - data.theta_ref
    assert_allclose(wc.far_budget, eps, rtol=0, atol=0)
    assert_allclose(wc.far_gain, eps * BETA * np.linalg.norm(a), rtol=1e-14)
    assert_allclose(wc.far_direction, a / np.linalg.norm(a), rtol=1e-14)
    closed_form = data.weights @ dpo_loss(res.theta, data.x, data.y, BETA, data.theta_ref) + wc.far_gain
    assert_allclose(wc.expected_loss(res.theta, BETA, data.theta_ref), closed_form, rtol=0, atol=ATOL_VALUE)
    assert_allclose(res.objective, closed_form, rtol=0, atol=ATOL_VALUE)


@pytest.mark.parametrize("kappa, eps", [(0.3, 0.02), (0.5, 0.01)])
def test_w1_finite_kappa_worst_case_flips_and_attains_value(kappa, eps):
    data = random_data(12, n=20, d=2, theta_ref_norm=0.2)  # (kappa, eps) below collapse, partial flips
    res = solve("wdpo", data, BETA, RADIUS, eps=eps, kappa=kappa)
    assert res.optimal
    wc = res.worst_case
    _check_distribution(wc, data.d)
    flip_cost = _flip_cost(wc, data, kappa)
    assert flip_cost > 0  # the budget buys label flips
    # the budget: flips plus what goes to infinity never exceeds eps (equality when the dual lam > 0)
    assert flip_cost + wc.far_budget <= eps + 1e-12
    if res.lam > 0:
        assert_allclose(flip_cost + wc.far_budget, eps, rtol=0, atol=1e-12)
    assert_allclose(wc.expected_loss(res.theta, BETA, data.theta_ref), res.objective, rtol=0, atol=ATOL_VALUE)
    # the same tuples as the mass per data tuple: each tuple's kept + flipped mass is its weight
    per_tuple = np.bincount(wc.index, weights=wc.masses, minlength=data.n)
    assert_allclose(per_tuple, data.weights, rtol=0, atol=ATOL_MASS)


def test_w1_not_attained_is_the_limit_of_explicit_distributions():
    """Q_delta (mass delta moved far_budget/delta along the ascent) costs what the limit costs and tends to the value."""
    data = random_data(13, n=15, d=3, theta_ref_norm=0.3)
    eps, kappa = 0.04, 0.05  # cheap flips: every profitable flip is bought and budget is left over
    theta = np.array([0.9, -0.4, 0.7])
    inner = wdpo_inner_continuous(theta, data, BETA, eps, kappa)
    wc = from_flip_fractions(theta, data, BETA, inner.flip_fraction, inner.far_budget)
    assert not wc.attained and wc.far_budget > 0
    assert np.any(wc.labels != data.y[wc.index])  # flips and a budget at infinity together
    errors = []
    for delta in [1e-3, 1e-4, 1e-5]:
        q = wc.approximate(delta)
        assert q.attained and q.size == wc.size + 1
        _check_distribution(q, data.d)
        # explicit coupling: atom k of q comes from data tuple q.index[k]; cost ||dx|| + kappa [label changed]
        src = q.index
        cost = np.linalg.norm(q.points - data.x[src], axis=1) + np.where(q.labels != data.y[src], kappa, 0.0)
        assert_allclose(q.masses @ cost, kappa * (data.weights @ inner.flip_fraction) + wc.far_budget, rtol=1e-9)
        assert q.masses @ cost <= eps * (1 + 1e-9)
        value = q.expected_loss(theta, BETA, data.theta_ref)
        assert value <= inner.value + 1e-12  # feasible, so below the supremum
        errors.append(inner.value - value)
    # error O(delta): shrinks tenfold with delta
    assert_allclose(np.array(errors[:-1]) / np.array(errors[1:]), 10.0, rtol=0.05)
    assert wc.approximate(1e-6) is not wc and from_flip_fractions(data.theta_ref, data, BETA, inner.flip_fraction,
                                                                    0.0).approximate(1e-3).attained


@pytest.mark.parametrize("p, kappa", [(2, math.inf), (2, 0.5), (1, 1.0)])
def test_finite_support_weights_have_the_support_shape(p, kappa):
    data = random_data(14, n=12, d=2, theta_ref_norm=0.2)
    eps = 0.3
    support = FiniteSupport.from_data(data, flips=not math.isinf(kappa))
    res = solve("wdpo", data, BETA, RADIUS, eps=eps, kappa=kappa, p=p, support=support)
    assert res.optimal
    m = support.m
    assert res.weights.shape == (m,) and res.info["support_size"] == m and res.plan.shape == (m, m)
    wc = res.worst_case
    _check_distribution(wc, data.d)
    assert wc.attained and wc.far_budget == 0.0 and wc.far_gain == 0.0
    assert_allclose(wc.masses, res.weights[wc.index], rtol=0, atol=0)
    assert_allclose(wc.points, support.x[wc.index], rtol=0, atol=0)
    assert_allclose(wc.labels, support.y[wc.index], rtol=0, atol=0)
    assert_allclose(res.weights[np.setdiff1d(np.arange(m), wc.index)], 0.0, rtol=0, atol=0)
    plan = res.plan.toarray()
    assert_allclose(plan.sum(axis=0), res.weights, rtol=0, atol=ATOL_MASS)
    assert_allclose(plan.sum(axis=1), support.histogram(data), rtol=0, atol=ATOL_MASS)
    cost = transport_cost(support.x, support.y, support.x, support.y, kappa, p)  # inf: a forbidden label flip
    assert np.all(np.isfinite(cost[plan > 0]))
    budget = float(plan[plan > 0] @ cost[plan > 0])
    assert budget <= eps**p * (1 + 1e-9)
    assert_allclose(wc.expected_loss(res.theta, BETA, data.theta_ref), res.objective, rtol=0, atol=1e-9)


@pytest.mark.parametrize("method, kw", [("dpo", {}), ("kldpo", {"rho": 0.2})])
def test_per_tuple_methods_get_worst_case_from_weights(method, kw):
    data = random_data(15, n=30, d=3, theta_ref_norm=0.2, weighted=True)
    res = solve(method, data, BETA, RADIUS, **kw)
    assert res.optimal
    wc = res.worst_case
    _check_distribution(wc, data.d)
    assert res.weights.shape == (data.n,)
    assert_allclose(wc.masses, res.weights[wc.index], rtol=0, atol=0)
    assert_allclose(wc.points, data.x[wc.index], rtol=0, atol=0)
    if method == "dpo":
        assert_allclose(wc.masses, data.weights, rtol=0, atol=ATOL_MASS)
    # KL: sup over q of E_q l is attained at q*, so E_{q*} l is the objective
    assert_allclose(wc.expected_loss(res.theta, BETA, data.theta_ref), res.objective, rtol=0, atol=1e-9)


def test_worst_case_shape_validation():
    with pytest.raises(ValueError, match="inconsistent shapes"):
        WorstCase(np.zeros((2, 3)), np.zeros(3, np.int64), np.full(2, 0.5), np.arange(2))


def test_cli_json_carries_the_worst_case(tmp_path, capsys):
    data = random_data(16, n=10, d=2, theta_ref_norm=0.1)
    f = tmp_path / "d.npz"
    data.save_npz(f)
    code = main(["solve", "--method", "wdpo", "--data", str(f), "--beta", str(BETA), "--radius", str(RADIUS),
                 "--eps", "0.02", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    obj = json.loads(out.strip().splitlines()[-1])
    ref = solve("wdpo", data, BETA, RADIUS, eps=0.02).worst_case
    got = obj["worst_case"]
    assert_allclose(np.array(got["points"]), ref.points, rtol=0, atol=0)
    assert_allclose(got["masses"], ref.masses, rtol=0, atol=0)
    assert got["labels"] == ref.labels.tolist() and got["index"] == ref.index.tolist()
    assert got["attained"] is False and got["mass_at_infinity"] == 0.0
    assert_allclose(got["far_budget"], 0.02, rtol=0, atol=0)
    assert_allclose(got["far_gain"], ref.far_gain, rtol=0, atol=0)


def test_package_exports_the_main_api_lazily():
    code = (
        "import sys, drdpo_theory as D;"
        "assert 'drdpo_theory.solvers' not in sys.modules, 'solvers imported eagerly';"
        "from drdpo_theory import solve, make_model, PreferenceData, SolverResult, WorstCase, load_npz;"
        "import drdpo_theory.solvers as S, drdpo_theory.model as M, drdpo_theory.data as Dt;"
        "assert solve is S.solve and make_model is M.make_model and PreferenceData is Dt.PreferenceData;"
        "assert SolverResult is S.SolverResult and load_npz is Dt.load_npz;"
        "assert 'Returns' in solve.__doc__ and 'SolverResult' in solve.__doc__;"
        "assert set(D.__all__) >= {'solve', 'make_model', 'PreferenceData', 'SolverResult'};"
        "r = solve('dpo', make_model(seed=0).nominal().sample(50, seed=1), 1.0, 2.0);"
        "assert isinstance(r, SolverResult) and r.optimal;"
        "import pytest;"
        "pytest.raises(AttributeError, getattr, D, 'no_such_name')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
