"""Shift map with the robust family (``drdpo shift-map --family``): settings, directions, the CLI.

The first-order directions of chi2dpo, cDPO, rDPO and Dr.DPO (docs/shift_map.md, "The robust family
in the map") are checked against finite differences of each exact (Dr.DPO: local) solver's
``theta(r)`` at a small ``r``, at an interior population DPO optimum and at a sample DPO optimum on the
sphere (the bordered system); the expansions they rest on are checked on the losses; the quick family
map's population regrets follow the sign of each member's slope; the plain map is unchanged.
"""

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose

from drdpo_theory.cli import main
from drdpo_theory.experiments import shift_map as M
from drdpo_theory.losses import dpo_loss
from drdpo_theory.solvers import family as F
from drdpo_theory.solvers.dpo import solve_dpo

R_SMALL = 1e-4  # the first-order error is O(r): ~1e-4 relative here


def _exact_at(member: str, data, beta, B, r):
    """The member's exact optimum at small parameter ``r`` (its own parameter from ``r``)."""
    if member == "chi2dpo":
        return F.solve_chi2dpo(data, beta, B, r * r)  # r = sqrt(rho)
    if member == "cdpo":
        return F.solve_cdpo(data, beta, B, r)  # r = eps
    if member == "rdpo":
        return F.solve_rdpo(data, beta, B, r / (1.0 + 2.0 * r))  # r = eps / (1 - 2 eps)
    return F.solve_dr_dpo(data, beta, B, 1.0 / r)  # r = 1 / beta'


@pytest.mark.parametrize("member", M.FAMILY_FIRST_ORDER)
def test_family_direction_is_the_motion_of_the_exact_optimum_interior(member):
    cfg = M.ShiftMapConfig.quick()
    data = M.make_map_world(cfg, 90.0, 2.0).draw("label", math.inf, 0)
    th = solve_dpo(data, cfg.beta, cfg.radius).theta
    assert np.linalg.norm(th) < cfg.radius * 0.99  # interior
    u = M.robust_directions(data, cfg.beta, th)[member]
    assert np.linalg.norm(u) > 1e-3
    res = _exact_at(member, data, cfg.beta, cfg.radius, R_SMALL)
    assert res.status in ("optimal", "local")
    fd = (res.theta - th) / R_SMALL
    assert np.linalg.norm(fd - u) <= 1e-3 * np.linalg.norm(u)
    # the ball-aware form is the same at an interior point
    assert_allclose(M.robust_directions(data, cfg.beta, th, radius=cfg.radius)[member], u, rtol=1e-12)


@pytest.mark.parametrize("member", M.FAMILY_FIRST_ORDER)
def test_family_direction_on_the_sphere(member):
    """A separable sample: DPO runs to the sphere; the optimum moves along the sphere (bordered system)."""
    cfg = M.ShiftMapConfig.quick()
    w = M.make_map_world(cfg, 0.0, 2.0)
    data = w.draw("label", 20, 0)
    th = solve_dpo(data, cfg.beta, cfg.radius).theta
    assert_allclose(np.linalg.norm(th), cfg.radius, rtol=1e-7)
    u = M.robust_directions(data, cfg.beta, th, radius=cfg.radius)[member]
    assert abs(u @ th) <= 1e-9 * np.linalg.norm(u) * cfg.radius  # tangent
    res = _exact_at(member, data, cfg.beta, cfg.radius, R_SMALL)
    fd = (res.theta - th) / R_SMALL
    assert np.linalg.norm(fd - u) <= 2e-3 * np.linalg.norm(u)


def test_the_expansions_behind_the_directions():
    """chi2: sup over the ball = E l + sqrt(rho Var l) exactly at small rho; cDPO / rDPO: DPO plus
    -/+ a multiple of the mean margin, exactly; Dr.DPO: E l - Var l / (2 beta') + O(beta'^-2);
    CVaR: E l + (1 - alpha)(E l - min l) / alpha only while 1 - alpha is below the smallest loss's mass."""
    cfg = M.ShiftMapConfig.quick()
    data = M.make_map_world(cfg, 60.0, 2.0).draw("label", 50, 3)
    beta = cfg.beta
    th = np.array([0.5, -0.3, 0.8, 0.1])
    w = data.weights
    l = dpo_loss(th, data.x, data.y, beta, data.theta_ref)
    El, var = float(w @ l), float(w @ (l - w @ l) ** 2)
    t = beta * data.u @ (th - data.theta_ref)
    rho = 1e-6
    assert_allclose(F.chi2_inner(l, w, rho).value, El + math.sqrt(rho * var), rtol=1e-12)
    eps = 0.2
    assert_allclose(F.cdpo_objective(th, data, beta, eps), El + eps * float(w @ t), rtol=1e-12)
    assert_allclose(F.rdpo_objective(th, data, beta, eps), El - eps / (1 - 2 * eps) * float(w @ t), rtol=1e-10)
    for bp in (1e2, 1e3):
        err = F.dr_dpo_objective(th, data, beta, bp) - (El - var / (2 * bp))
        assert abs(err) <= 5.0 / bp**2
    i = int(np.argmin(l))
    a = 1.0 - 0.5 * w[i]
    assert_allclose(F.cvar_inner(l, w, a).value, El + (1 - a) * (El - l[i]) / a, rtol=1e-12)
    a = 1.0 - 3.0 * w[i]  # beyond the smallest loss's mass the formula fails
    assert F.cvar_inner(l, w, a).value < El + (1 - a) * (El - l[i]) / a - 1e-6


def test_family_settings_scale_with_the_fraction():
    from drdpo_theory.solvers.family import chi2_collapse_threshold, cvar_collapse_threshold

    cfg = M.with_family(M.ShiftMapConfig(angles=(90.0,), ratios=(1.0,), ns=(math.inf,), shifts=("prompt",),
                                         alphas=(0.0, 1.0), seeds=(0,), radius_fracs=(0.1, 0.5)))
    w = M.make_map_world(cfg, 90.0, 1.0)
    data, groups = w.draw_with_groups("prompt", math.inf, 0)
    fits = pd.DataFrame(M.fit_methods(data, cfg, groups))
    rho_c, alpha_c = chi2_collapse_threshold(data), cvar_collapse_threshold(data)
    for f in (0.1, 0.5):
        got = fits[fits.frac == f].set_index("method")
        assert_allclose(got.loc["chi2dpo", "radius"], f * rho_c, rtol=1e-12)
        assert_allclose(got.loc["cvardpo", "radius"], 1 - f * (1 - alpha_c), rtol=1e-12)
        assert_allclose(got.loc["cdpo", "radius"], f / 2, rtol=1e-12)
        assert_allclose(got.loc["rdpo", "radius"], f / 2, rtol=1e-12)
        assert_allclose(got.loc["dr_dpo", "radius"], 1 / f, rtol=1e-12)
        assert math.isnan(got.loc["groupdpo", "radius"])
        assert (got.status.isin(["optimal", "local"])).all()
        # the member's objective at its fit is below its objective at DPO's (it minimises it)
        dpo = fits[fits.method == "dpo"].theta.iloc[0]
        th = got.loc["cdpo", "theta"]
        assert F.cdpo_objective(th, data, cfg.beta, f / 2) <= F.cdpo_objective(dpo, data, cfg.beta, f / 2) + 1e-12
    # groupdpo has no radius: one fit, reported at every fraction
    g = fits[fits.method == "groupdpo"]
    assert_allclose(g.theta.iloc[0], g.theta.iloc[1], rtol=0, atol=0)
    # its groups are the prompt groups of the kept tuples
    expect = np.where(w.group_a[np.concatenate([w.s, w.s])], 0, 1)[w.train_probs("prompt") > 0]
    assert_allclose(groups, expect)
    assert_allclose(g.theta.iloc[0], F.solve_groupdpo(data, cfg.beta, cfg.radius, expect).theta, atol=1e-10)
    # larger fractions shrink chi2/cDPO toward theta_ref and push rDPO away
    norm = {(m, f): np.linalg.norm(t) for m, f, t in zip(fits.method, fits.frac, fits.theta)}
    n0 = norm[("dpo", 0.0)]
    assert norm[("chi2dpo", 0.5)] < norm[("chi2dpo", 0.1)] < n0
    assert norm[("cdpo", 0.5)] < norm[("cdpo", 0.1)] < n0
    assert norm[("rdpo", 0.5)] > norm[("rdpo", 0.1)] > n0


def test_plain_rows_and_cell_keys_do_not_change_with_the_family():
    plain = M.ShiftMapConfig()
    assert plain.cell_key() == "472e7dab54" and M.ShiftMapConfig.quick().cell_key() == "325a5aa5ea"  # as before --family
    assert not plain.has_family and M.ShiftMapConfig.quick(family=True).has_family
    cfg = M.ShiftMapConfig(angles=(150.0,), ratios=(2.0,), ns=(20.0,), shifts=("noise",), alphas=(0.0, 1.0),
                           seeds=(0, 1), radius_fracs=(0.3,))
    a = M.run_cell(cfg, "noise", 150.0, 2.0, 20.0)
    b = M.run_cell(M.with_family(cfg), "noise", 150.0, 2.0, 20.0)
    pd.testing.assert_frame_equal(a, b[b.method.isin(["dpo", *M.METHODS])].reset_index(drop=True))
    assert set(b.method) == {"dpo", *M.METHODS, *M.FAMILY_METHODS}


def test_family_config_validation():
    with pytest.raises(ValueError, match=r"\(0, 1\) with the robust family"):
        M.with_family(M.ShiftMapConfig(radius_fracs=(0.5, 1.0)))
    M.ShiftMapConfig(radius_fracs=(1.5,))  # fine without the family
    with pytest.raises(ValueError, match="unknown methods"):
        M.ShiftMapConfig(methods=("kldpo", "ipo"))
    with pytest.raises(ValueError, match="repeat"):
        M.ShiftMapConfig(methods=("kldpo", "kldpo"))


@pytest.fixture(scope="module")
def family_cli(tmp_path_factory):
    """``drdpo shift-map --family --quick --json`` in a fresh folder (default outputs)."""
    root = tmp_path_factory.mktemp("smf")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["shift-map", "--family", "--quick", "--json"])
    finally:
        os.chdir(cwd)
    return rc, json.loads(buf.getvalue().strip().splitlines()[-1]), root


def test_cli_family_quick_outputs_and_regions(family_cli):
    rc, summary, root = family_cli
    assert rc == 0
    assert set(summary["regions"]) == set(M.SHIFTS)
    assert summary["grid"]["methods"] == [*M.METHODS, *M.FAMILY_METHODS]
    assert summary["fits_not_optimal"] == 0 and summary["fits_local"] >= 1
    out = root / "results" / "shift_map_family_quick"
    for name in ("shift_map_summary.csv", "shift_map_best.csv", "shift_map_mechanism.csv", "shift_map.json"):
        assert (out / name).is_file()
    assert (root / "figures" / "quick" / "shift_map_family.png").is_file()
    assert (root / "figures" / "quick" / "shift_map_family_mechanism.png").is_file()
    assert not (root / "results" / "shift_map_quick").exists() and not (root / "results" / "shift_map").exists()
    assert not list((root / "figures").glob("*.png"))  # the committed folder is never written by --quick
    summ = pd.read_csv(out / "shift_map_summary.csv")
    assert set(M.FAMILY_METHODS) <= set(summ.method)
    # every region entry is a win with its interval, and the summary counts agree with the table
    for shift, d in summary["regions"].items():
        for c in d["reward"]:
            assert c["lo"] > 0
        by_m = summary["family"]["wins_by_method"]["reward"][shift]
        assert max(by_m.values()) <= len({(c["angle"], c["ratio"], c["n"], c["alpha"]) for c in d["reward"]})
    assert sum(len(d["reward"]) for d in summary["regions"].values()) >= 1


def test_cli_family_mechanism_per_member(family_cli):
    _, summary, root = family_cli
    mech = summary["mechanism"]
    assert set(mech["family"]) == set(M.FAMILY_FIRST_ORDER)
    assert set(mech["family_excluded"]) == {"cvardpo", "groupdpo"}
    for m, a in mech["family"].items():
        assert a["population_cells"] >= 20, m
        assert a["population_sign_agreement"] == 1.0, m
    # the plain methods' agreement is computed on their rows only (as without --family)
    assert mech["population_sign_agreement"] == 1.0
    tab = pd.read_csv(root / "results" / "shift_map_family_quick" / "shift_map_mechanism.csv")
    assert not set(tab.measured_method) & {"cvardpo", "groupdpo"}
    # an independent recount of one member's population agreement from the table
    g = tab[(tab.measured_method == "rdpo") & np.isinf(tab.n.astype(float))].dropna(subset=["delta_reward"])
    g = g[(g.slope_reward.abs() > 1e-3 * g.slope_reward.abs().max()) & (g.delta_reward.abs() > M.WIN_TOL)]
    assert len(g) == mech["family"]["rdpo"]["population_cells"]
    assert (np.sign(g.slope_reward) == np.sign(g.delta_reward)).all()
