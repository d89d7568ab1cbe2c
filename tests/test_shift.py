"""Preference-shift world: mixtures, exact evaluation, a small end-to-end run and the CLI."""

import json

import numpy as np
import pytest
from numpy.testing import assert_allclose

from drdpo_theory.cli import main
from drdpo_theory.experiments import shift as S
from drdpo_theory.losses import sigmoid

PROB_ATOL = 1e-12
LIN_RTOL = 1e-10


@pytest.fixture(scope="module")
def world():
    return S.make_world(S.ShiftConfig(n_prompts=3, n_answers=3, d=3))


def test_world_geometry(world):
    assert_allclose(np.linalg.norm(world.theta1), np.linalg.norm(world.theta2), rtol=1e-12)
    assert_allclose(world.theta1 @ world.theta2, 0.0, atol=1e-12)  # 90 degrees
    assert_allclose(world.pair_prob.sum(), 1.0, rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_label_mixture_probabilities(world, alpha):
    x, b = world.x, world.model.beta
    p1, p2 = sigmoid(b * x @ world.theta1), sigmoid(b * x @ world.theta2)
    assert_allclose(world.p_one(alpha), alpha * p1 + (1 - alpha) * p2, atol=PROB_ATOL)
    pop = world.population(alpha)
    assert_allclose(pop.weights.sum(), 1.0, rtol=1e-12)
    # the reward mixture agrees with the label mixture at the end points only
    rw = S.ShiftWorld(world.model, world.theta1, world.theta2, "reward", world.s, world.a1, world.a2, world.pair_prob)
    if alpha in (0.0, 1.0):
        assert_allclose(rw.p_one(alpha), world.p_one(alpha), atol=PROB_ATOL)
    else:
        assert np.abs(rw.p_one(alpha) - world.p_one(alpha)).max() > 1e-3


def test_evaluation_is_linear_in_alpha_and_matches_the_model(world):
    theta = np.array([0.5, -0.2, 0.8])
    df = S.evaluate(world, theta, [0.0, 0.5, 1.0])
    for col in ("reward", "accuracy", "dpo_loss"):  # label mixture: all three are linear in alpha
        assert_allclose(df[col][1], 0.5 * (df[col][0] + df[col][2]), rtol=LIN_RTOL)
    assert_allclose(df.reward[0], world.model.expected_reward(theta, world.theta2), rtol=1e-12)
    assert_allclose(df.reward[2], world.model.expected_reward(theta, world.theta1), rtol=1e-12)


def test_sampling_matches_the_population(world):
    data = world.sample(0.5, 20000, seed=0)
    pop = world.population(0.5)
    assert_allclose(np.mean(data.y), pop.weights @ pop.y, atol=0.015)


def test_small_run_end_to_end(tmp_path):
    cfg = S.ShiftConfig(n_prompts=3, n_answers=3, d=3, n_train=200, seeds=(0, 1), sgd_steps=200,
                        alphas=(0.0, 0.5, 1.0), methods=("dpo", "kldpo", "wdpo_w1", "kl_clamped_sgd"))
    res = S.run_shift(cfg, out_dir=tmp_path, progress=False)
    assert (tmp_path / "shift.csv").exists()
    assert set(res.method) == {"dpo", "kldpo", "wdpo_w1", "kl_clamped_sgd", "reference"}
    norms = res.groupby(["seed", "method"]).theta_norm.first()
    for seed in (0, 1):  # robust optima shrink toward theta_ref
        assert norms[(seed, "kldpo")] < norms[(seed, "dpo")]
        assert norms[(seed, "wdpo_w1")] < norms[(seed, "dpo")]
    s = S.summarize_shift(res)
    assert len(s["methods"]["dpo"]["reward_mean"]) == 3
    json.dumps(s)
    again = S.run_shift(cfg, out_dir=tmp_path, progress=False)  # resumed from the cached cells
    assert_allclose(again.reward, res.reward, rtol=1e-12)


def test_config_validation_and_cli_errors(capsys):
    with pytest.raises(ValueError, match="mixture"):
        S.ShiftConfig(mixture="both")
    with pytest.raises(ValueError, match="unknown methods"):
        S.ShiftConfig(methods=("dpo", "ppo"))
    with pytest.raises(SystemExit) as e:
        main(["shift", "--alpha0", "1.5"])
    assert e.value.code == 2
