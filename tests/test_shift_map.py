"""Shift map: the world, the regret table, the mechanism's predictions against the quick map, the CLI.

The mechanism (docs/shift_map.md) is tested against the map it explains: (1) exact: the expected
reward is linear in alpha, so the regret is too, and a loss at both ends rules out a gain between;
(2) first order: the sign of ``grad R_alpha . u_m`` at the population DPO optimum is the sign of the
population regret at a small radius, and ``u_m`` is the measured motion of the exact optimum;
(3) finite n: the draw-averaged shrinkage slope has the sign of every significant regret.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose

from drdpo_theory.cli import main
from drdpo_theory.experiments import shift_map as M
from drdpo_theory.solvers.kl import kl_divergence

RTOL = 1e-10
ATOL = 1e-12


@pytest.fixture(scope="module")
def quick():
    cfg = M.ShiftMapConfig.quick()
    res = M.run_shift_map(cfg, progress=False)
    summ = M.summarize_regret(res, cfg)
    mech = M.mechanism_check(cfg, summ)
    return cfg, res, summ, mech


def test_world_geometry_and_distributions():
    cfg = M.ShiftMapConfig.quick()
    w = M.make_map_world(cfg, 135.0, 2.0)
    t1, t2 = w.theta1, w.theta2
    assert_allclose(np.linalg.norm(t2) / np.linalg.norm(t1), 2.0, rtol=RTOL)
    assert_allclose(t1 @ t2 / (np.linalg.norm(t1) * np.linalg.norm(t2)), math.cos(math.radians(135.0)), rtol=RTOL)
    for shift in ("label", "reward", "prompt", "noise"):
        for a in (0.0, 0.3, 1.0):
            assert_allclose(w.tuple_probs(shift, a).sum(), 1.0, rtol=RTOL)
    # prompt shift: P(y | pair) never changes, only the prompt marginal
    assert_allclose(w.p_one("prompt", 0.1), w.p_one("prompt", 0.9), atol=ATOL)
    pw = w.prompt_weights("prompt", 0.8)
    assert_allclose(pw[w.group_a].sum(), 0.8, rtol=RTOL)
    # label noise: flips with probability noise_rate
    assert_allclose(w.p_one("noise", 0.5), 0.2 + 0.6 * w.p_one("label", 0.5), atol=ATOL)
    # adversarial test distributions stay inside the KL ball around the training population
    p = w.train_probs("label")
    for a in (0.5, 1.0):
        q = w.test("adversarial", a)[0]
        assert kl_divergence(q, p) <= cfg.adv_rho * (1 + 1e-9)
    assert_allclose(kl_divergence(w.test("adversarial", 1.0)[0], p), cfg.adv_rho, rtol=1e-8)  # the ball binds


def test_draw_is_the_sample_histogram():
    cfg = M.ShiftMapConfig.quick()
    w = M.make_map_world(cfg, 90.0, 1.0)
    d = w.draw("label", 37, seed=5)
    assert_allclose(d.weights.sum(), 1.0, rtol=RTOL)
    assert_allclose(d.weights * 37, np.round(d.weights * 37), atol=1e-9)  # counts / n
    pop = w.draw("label", math.inf, seed=0)
    assert_allclose(pop.weights, w.train_probs("label")[w.train_probs("label") > 0], rtol=RTOL)


def test_reward_gradient_matches_finite_differences():
    cfg = M.ShiftMapConfig.quick()
    w = M.make_map_world(cfg, 45.0, 2.0)
    theta = np.array([0.3, -0.7, 0.2, 0.5])
    _, pw, R = w.test("prompt", 0.3)
    g = M.reward_gradient(w.model, theta, pw, R)
    h = 1e-6
    fd = np.array([(float(pw @ (w.model.policy(theta + h * e) * R).sum(1))
                    - float(pw @ (w.model.policy(theta - h * e) * R).sum(1))) / (2 * h) for e in np.eye(4)])
    assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


def test_gradient_of_the_kl_regularised_reward():
    """docs/shift_map.md: grad [R_alpha - beta E_s KL(pi_theta || pi_ref)] = beta C(theta) (theta_alpha* - theta)."""
    cfg = M.ShiftMapConfig.quick()
    w = M.make_map_world(cfg, 120.0, 2.0)
    model, beta = w.model, cfg.beta
    theta, ts = np.array([0.4, 0.1, -0.6, 0.3]), w.theta_alpha(0.3)
    pw = model.prompt_probs
    R = model.reward(ts)
    log_ref = np.log(model.policy(model.theta_ref))

    def reg(th):
        pi = model.policy(th)
        return float(pw @ ((pi * R).sum(1) - beta * (pi * (np.log(pi) - log_ref)).sum(1)))

    pi = model.policy(theta)
    mphi = np.einsum("sa,sad->sd", pi, model.phi)
    C = np.einsum("s,sa,sad,sae->de", pw, pi, model.phi - mphi[:, None], model.phi - mphi[:, None])
    h = 1e-6
    fd = np.array([(reg(theta + h * e) - reg(theta - h * e)) / (2 * h) for e in np.eye(4)])
    assert_allclose(fd, beta * C @ (ts - theta), rtol=1e-6, atol=1e-9)


def test_first_order_directions_are_the_motion_of_the_exact_optima():
    from drdpo_theory.solvers.dpo import solve_dpo
    from drdpo_theory.solvers.kl import solve_kldpo
    from drdpo_theory.solvers.wasserstein import solve_wdpo

    cfg = M.ShiftMapConfig.quick()
    data = M.make_map_world(cfg, 90.0, 2.0).draw("label", math.inf, 0)
    th = solve_dpo(data, cfg.beta, cfg.radius).theta
    u = M.robust_directions(data, cfg.beta, th)
    eps = 1e-6  # difference quotient: O(eps) bias, solver error ~1e-9 / eps
    th_w = solve_wdpo(data, cfg.beta, cfg.radius, eps, kappa=math.inf, p=1).theta
    assert_allclose((th_w - th) / eps, u["wdpo"], rtol=1e-3)
    rho = 1e-10  # theta moves like sqrt(rho)
    th_k = solve_kldpo(data, cfg.beta, cfg.radius, rho).theta
    assert_allclose((th_k - th) / math.sqrt(rho), u["kldpo"], rtol=2e-3)


def test_regret_is_linear_in_alpha_so_no_gain_between_two_losses(quick):
    """Exact part of the mechanism: E r_alpha is linear in alpha for every shift type."""
    cfg, res, summ, _ = quick
    assert cfg.alphas == (0.0, 0.5, 1.0)
    for metric in ("reward", "reg_reward"):
        wide = summ.pivot_table(index=["shift", "angle", "ratio", "n", "method", "frac"], columns="alpha",
                                values=f"delta_{metric}")
        assert_allclose(wide[0.5], 0.5 * (wide[0.0] + wide[1.0]), rtol=1e-9, atol=1e-12)
        lose_both = (wide[0.0] <= 0) & (wide[1.0] <= 0)
        assert (wide[0.5][lose_both] <= 1e-12).all()


def test_population_regret_follows_the_first_order_prediction(quick):
    cfg, _, summ, mech = quick
    agree = M.mechanism_agreement(mech)
    assert agree["population_cells"] >= 100
    assert agree["population_sign_agreement"] == 1.0
    pop = summ[np.isinf(summ.n) & (summ["shift"] == "label")].set_index(["angle", "method", "alpha"])
    # aligned rewards: every robust method loses reward at every alpha (shrinking never helps) ...
    assert (pop.loc[0.0].delta_reward < 0).all()
    # ... opposite rewards of unequal norm (ratio cos(angle) = -2 < -1): robust wins at the weaker
    # reward's end (alpha = 1, theta_1*) and loses at the other, as docs/shift_map.md predicts
    at180 = pop.loc[180.0]
    assert (at180.xs(1.0, level="alpha").delta_reward > 0).all()
    assert (at180.xs(0.0, level="alpha").delta_reward < 0).all()


def test_finite_n_regret_follows_the_draw_averaged_shrinkage_slope(quick):
    _, _, _, mech = quick
    agree = M.mechanism_agreement(mech)
    assert agree["finite_n_significant_cells"] >= 20
    assert agree["finite_n_sign_agreement_significant"] == 1.0


def test_small_n_robustness_lowers_the_test_loss_not_the_reward_when_aligned(quick):
    """Variance reduction: at n = 20 with aligned rewards the robust fit has a lower DPO loss on the
    training distribution (significantly) while its reward stays below DPO's at every alpha
    (shrinking an aligned estimate costs reward)."""
    _, _, summ, _ = quick
    s = summ[(summ.n == 20) & (summ.angle == 0.0) & (summ["shift"] == "label") & (summ.method == "wdpo")]
    assert (s[s.alpha == 0.5].delta_dpo_loss_hi < 0).all()  # on the training distribution
    assert (s.delta_reward < 0).all()
    assert (s.theta_norm < s.dpo_theta_norm).all()


def test_bootstrap_intervals(quick):
    cfg, _, summ, _ = quick
    fin = summ[~np.isinf(summ.n)]
    for m in M.METRICS:
        assert (fin[f"delta_{m}_lo"] <= fin[f"delta_{m}"] + ATOL).all()
        assert (fin[f"delta_{m}"] <= fin[f"delta_{m}_hi"] + ATOL).all()
    pop = summ[np.isinf(summ.n)]
    assert_allclose(pop.delta_reward_lo, pop.delta_reward, atol=0)
    assert (fin.draws == len(cfg.seeds)).all() and (pop.draws == 1).all()


def test_regions_and_best_settings(quick):
    _, _, summ, _ = quick
    reg = M.regions(summ)
    assert set(reg) == set(M.SHIFTS)
    for shift, d in reg.items():
        assert set(d) == set(M.METRICS)
        for c in d["reward"]:
            assert c["lo"] > 0 and c["delta"] >= c["lo"]
    best = M.best_settings(summ)
    assert len(best) == summ.groupby(["shift", "angle", "ratio", "n", "alpha"]).ngroups
    assert best.wins.sum() == sum(len(d["reward"]) for d in reg.values())


def test_resume_and_n_jobs_do_not_change_rows(tmp_path, monkeypatch):
    cfg = M.ShiftMapConfig(angles=(90.0,), ratios=(1.0,), ns=(20.0, math.inf), shifts=("label", "prompt"),
                           alphas=(0.0, 1.0), seeds=(0, 1), radius_fracs=(0.3,), methods=("wdpo", "kldpo_tau"))
    a = M.run_shift_map(cfg, out_dir=tmp_path / "a", n_jobs=1, progress=False)
    b = M.run_shift_map(cfg, out_dir=tmp_path / "b", n_jobs=2, progress=False)
    pd.testing.assert_frame_equal(a, b)
    cells = sorted((tmp_path / "a" / "cells").glob("*.csv"))
    assert len(cells) == 4
    cells[0].write_text(cells[0].read_text()[:50])  # torn cell: recomputed
    calls = []
    orig = M.run_cell
    monkeypatch.setattr(M, "run_cell", lambda *args: calls.append(args) or orig(*args))
    c = M.run_shift_map(cfg, out_dir=tmp_path / "a", n_jobs=1, progress=False)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(a, c)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown shifts"):
        M.ShiftMapConfig(shifts=("label", "drift"))
    with pytest.raises(ValueError, match="exceed the ball"):
        M.ShiftMapConfig(ratios=(3.0,))
    with pytest.raises(ValueError, match="angles"):
        M.ShiftMapConfig(angles=(200.0,))
    with pytest.raises(ValueError, match="even"):
        M.ShiftMapConfig(n_prompts=3)


def test_cli_quick_json_regions_and_figures(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sm"
    assert main(["shift-map", "--quick", "--json", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(line)
    assert set(summary["regions"]) == set(M.SHIFTS)
    assert all(isinstance(v, list) for d in summary["regions"].values() for v in d.values())
    assert (out / "figures" / "shift_map.png").is_file() and (out / "figures" / "shift_map.pdf").is_file()
    for name in ("shift_map_summary.csv", "shift_map_best.csv", "shift_map_mechanism.csv", "shift_map.json"):
        assert (out / name).is_file()
    assert summary["mechanism"]["population_sign_agreement"] == 1.0
    # without --out: tables in results/shift_map_quick, figures in figures/quick (never the committed ones)
    assert main(["shift-map", "--quick", "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["regions"] == summary["regions"]
    assert (tmp_path / "results" / "shift_map_quick" / "shift_map_summary.csv").is_file()
    assert (tmp_path / "figures" / "quick" / "shift_map.png").is_file()
    assert not (tmp_path / "figures" / "shift_map.png").exists()


def test_cli_refuses_bad_n_jobs_and_foreign_tables(tmp_path, capsys):
    assert main(["shift-map", "--quick", "--n-jobs", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--n-jobs" in capsys.readouterr().err
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "shift_map_summary.csv").write_text("a,b\n1,2\n")
    assert main(["shift-map", "--quick", "--out", str(d)]) == 2
    assert "did not write" in capsys.readouterr().err
