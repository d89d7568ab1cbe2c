"""Data validation, .npz I/O, and the log-linear model's exact nominal distribution."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from drdpo_theory.data import DataError, PreferenceData, load_npz
from drdpo_theory.model import LogLinearModel, make_model

RTOL = 1e-12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x=np.zeros((0, 2)), y=np.zeros(0)), "empty"),
        (dict(x=[[np.nan, 0.0]], y=[1]), "NaN or inf"),
        (dict(x=[[np.inf, 0.0]], y=[1]), "NaN or inf"),
        (dict(x=[[1.0, 0.0]], y=[2]), "must be 0 or 1"),
        (dict(x=[[1.0, 0.0]], y=[0.5]), "must be 0 or 1"),
        (dict(x=[[1.0, 0.0], [0.0, 1.0]], y=[1]), "shape mismatch"),
        (dict(x=[1.0, 0.0], y=[1]), "2 dimension"),
        (dict(x=[[1.0, 0.0]], y=[1], theta_ref=[0.0]), "theta_ref"),
        (dict(x=[[1.0, 0.0]], y=[1], weights=[-1.0]), "nonnegative"),
    ],
)
def test_bad_data_is_rejected_with_a_message(kwargs, message):
    with pytest.raises(DataError, match=message):
        PreferenceData(**kwargs)


def test_npz_roundtrip_and_errors(tmp_path):
    d = PreferenceData([[0.5, -0.5], [1.0, 0.0]], [1, 0], [0.25, 0.75], [0.1, 0.0])
    f = tmp_path / "d.npz"
    d.save_npz(f)
    back = load_npz(f)
    assert_allclose(back.x, d.x, rtol=RTOL)
    assert_allclose(back.weights, d.weights, rtol=RTOL)
    assert_allclose(back.theta_ref, d.theta_ref, rtol=RTOL)
    np.savez(tmp_path / "nox.npz", y=[1])
    with pytest.raises(DataError, match=r"missing key\(s\) \['x'\]"):
        load_npz(tmp_path / "nox.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="is a text file, not an .npz archive"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="no such file"):
        load_npz(tmp_path / "absent.npz")


def test_compress_merges_duplicates():
    d = PreferenceData([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], [1, 1, 1, 0])
    c, inv = d.compress()
    assert c.n == 3
    assert_allclose(c.weights.sum(), 1.0, rtol=RTOL)
    # each original row is represented by its compressed row, with the summed weight
    assert_allclose(c.x[inv], d.x, rtol=RTOL)
    assert np.array_equal(c.y[inv], d.y)
    assert_allclose(np.sort(c.weights), [0.25, 0.25, 0.5], rtol=RTOL)


def test_nominal_distribution_is_exact(small_model):
    m = small_model
    P = m.nominal()
    S, A, _ = m.phi.shape
    assert P.m == 2 * S * A * (A - 1)
    assert_allclose(P.p.sum(), 1.0, rtol=RTOL)
    # P(y=1 | s,a1,a2) = sigmoid(r(s,a1) - r(s,a2)) for every pair, checked by hand for one pair
    r = m.reward()
    j = np.flatnonzero((P.s == 1) & (P.a1 == 0) & (P.a2 == 2))
    probs = {int(P.y[k]): P.p[k] for k in j}
    pair = 1.0 / (S * A * (A - 1))
    assert_allclose(probs[1], pair / (1 + np.exp(-(r[1, 0] - r[1, 2]))), rtol=1e-12)
    assert_allclose(probs[0] + probs[1], pair, rtol=1e-12)
    # lambda_cov is the min eigenvalue of E[x x^T]
    M = sum(P.p[k] * np.outer(P.x[k], P.x[k]) for k in range(P.m))
    assert_allclose(P.lambda_cov(), np.linalg.eigvalsh(M)[0], rtol=1e-10)


def test_sampling_is_seeded_and_converges(small_model):
    P = small_model.nominal()
    a = P.sample(500, seed=3)
    b = P.sample(500, seed=3)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    idx = P.sample_indices(200_000, seed=1)
    assert np.abs(P.histogram(idx) - P.p).max() < 5e-3


def test_policy_and_expected_reward(small_model):
    m = small_model
    pi = m.policy(np.zeros(m.d))
    assert_allclose(pi, np.full(pi.shape, 1 / pi.shape[1]), rtol=RTOL)
    # the optimal KL-regularised policy pi* ∝ pi_ref exp(r/beta) is pi_{theta*}
    pistar = m.policy(m.theta_star)
    target = np.exp(m.reward() / m.beta)
    assert_allclose(pistar, target / target.sum(axis=1, keepdims=True), rtol=1e-12)
    assert m.expected_reward(m.theta_star) > m.expected_reward(np.zeros(m.d))


def test_model_validation():
    with pytest.raises(ValueError, match=r"\|\|phi\|\| <= 1"):
        LogLinearModel(phi=np.full((2, 2, 2), 1.0), beta=1.0, radius=1.0, theta_star=np.zeros(2))
    with pytest.raises(ValueError, match="beta"):
        make_model(beta=0.0)
    with pytest.raises(ValueError, match="ball"):
        make_model(radius=0.5, theta_star_norm=1.0)
