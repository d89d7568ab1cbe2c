"""The robust family side by side (issue 13, point 4): `drdpo shift --family` and `drdpo gradients --family`.

Every number is checked against an independent computation: the exact gradients against finite
differences of the solvers' objectives, the batch weights against the torch losses' multipliers,
the study's rows against `drdpo_theory.solvers.solve` called here with parameters computed here.
Measured (2 shared cores, under load): about 40 s in all.
"""

import json
import math
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose

from drdpo_theory.cli import main
from drdpo_theory.experiments import gradients as G
from drdpo_theory.experiments import shift as S
from drdpo_theory.losses import sigmoid
from drdpo_theory.solvers import family as F
from drdpo_theory.solvers import solve

ROOT = Path(__file__).resolve().parents[1]
EXACT = ("chi2dpo", "cvardpo", "groupdpo", "rdpo", "cdpo", "dr_dpo")
TINY = dict(n_prompts=3, n_answers=3, d=3, n_train=200, seeds=(0, 1), sgd_steps=200, alphas=(0.0, 0.5, 1.0))


@pytest.fixture(scope="module")
def instance():
    cfg = G.GradientStudyConfig(n_prompts=3, n_answers=3, d=3, n_points=2, batch_sizes=(4, 64), n_batches=400,
                                sgd_steps=400, sgd_seeds=(0,))
    return cfg, G.make_instance(1, cfg)


def _params(data, groups, frac=0.5, eps=0.1, bp=1.0):
    """The stated parameters, computed here from the solvers' collapse thresholds."""
    return {"chi2dpo": {"rho": frac * F.chi2_collapse_threshold(data)},
            "cvardpo": {"alpha": 1.0 - frac * (1.0 - F.cvar_collapse_threshold(data))},
            "groupdpo": {"groups": groups}, "rdpo": {"eps": eps}, "cdpo": {"eps": eps}, "dr_dpo": {"beta_prime": bp}}


OBJECTIVE = {"chi2dpo": lambda t, d, b, p: F.chi2dpo_objective(t, d, b, p["rho"]),
             "cvardpo": lambda t, d, b, p: F.cvardpo_objective(t, d, b, p["alpha"]),
             "groupdpo": lambda t, d, b, p: F.groupdpo_objective(t, d, b, p["groups"]),
             "rdpo": lambda t, d, b, p: F.rdpo_objective(t, d, b, p["eps"]),
             "cdpo": lambda t, d, b, p: F.cdpo_objective(t, d, b, p["eps"]),
             "dr_dpo": lambda t, d, b, p: F.dr_dpo_objective(t, d, b, p["beta_prime"])}


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("member", EXACT)
def test_exact_family_gradient_equals_finite_differences_of_the_solvers_objective(instance, member):
    cfg, inst = instance
    data = inst.data
    p = _params(data, inst.groups)[member]
    assert G.family_params(data, inst.groups, 0.5, 0.1, 1.0)[member].keys() == p.keys()
    theta = inst.points["rand0"]
    g = G.family_grad(member, theta, data, cfg.beta, **p)
    h = 1e-6
    fd = np.array([(OBJECTIVE[member](theta + h * e, data, cfg.beta, p) - OBJECTIVE[member](theta - h * e, data, cfg.beta, p))
                   / (2 * h) for e in np.eye(data.d)])
    assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
    assert_allclose(G.family_objective(member, theta, data, cfg.beta, **p), OBJECTIVE[member](theta, data, cfg.beta, p),
                    rtol=1e-14)


@pytest.mark.parametrize("member", ["chi2dpo", "cvardpo", "groupdpo", "dr_dpo"])
def test_batch_weights_are_the_torch_losses_multipliers(member):
    torch = pytest.importorskip("torch")
    from drdpo_theory.llm.family import family_multipliers

    rng = np.random.default_rng(3)
    l = rng.exponential(0.7, 32)
    groups = rng.integers(0, 3, 32)
    kw = {"chi2dpo": {"rho": 0.3}, "cvardpo": {"alpha": 0.4}, "groupdpo": {"groups": groups},
          "dr_dpo": {"beta_prime": 0.5}}[member]
    q = G.family_weights(member, l, np.full(32, 1 / 32), **kw)
    tkw = {k: (torch.as_tensor(v) if k == "groups" else v) for k, v in kw.items()}
    m, value, _ = family_multipliers(torch.as_tensor(l), member, gather=False, **tkw)
    assert_allclose(q * 32, m.numpy(), rtol=1e-12, atol=1e-12)
    want = -0.5 * math.log(np.mean(np.exp(-l / 0.5))) if member == "dr_dpo" else q @ l  # Dr.DPO: the soft-min
    assert_allclose(value, want, rtol=1e-12)


def test_family_batch_table_rdpo_cdpo_unbiased_robust_members_biased(instance):
    cfg, inst = instance
    t = G.family_batch_table(inst, cfg)
    assert set(t.member) == set(EXACT)
    small = t[t.batch_size == 4]
    for m in ("rdpo", "cdpo"):  # per-pair losses: the batch gradient is unbiased
        r = small[small.member == m]
        assert (r.bias < 4 * r.mc_se + 1e-12).all(), r[["bias", "mc_se"]]
    for m in ("chi2dpo", "cvardpo"):  # a worst case of 4 losses is not the worst case of the population
        r = small[small.member == m]
        assert (r.bias > 4 * r.mc_se).all(), r[["bias", "mc_se"]]
    big = t[t.batch_size == 64].groupby("member").bias.mean()
    for m in ("chi2dpo", "cvardpo", "dr_dpo"):  # the bias shrinks with the batch
        assert big[m] < small.groupby("member").bias.mean()[m]


def test_family_sgd_table_targets_are_the_certified_optima(instance):
    cfg, inst = instance
    t = G.family_sgd_table(inst, cfg)
    st = t.groupby("member").status.first()
    assert (st.drop("dr_dpo") == "optimal").all() and st["dr_dpo"] == "local"
    convex = t[t.member != "dr_dpo"]
    assert (convex.excess >= -1e-9).all()  # the exact optimum is a lower bound for every end point
    s = G.summarize({"family_sgd": t})
    assert set(s["family_sgd_endpoint_error"]) == set(EXACT) | {"groupdpo_eg"}  # + group DPO's online EG weights


# ----------------------------------------------------------------------------- the shift world
def test_label_source_has_the_mixture_distribution_and_keeps_the_tuples():
    w = S.make_world(S.ShiftConfig(n_prompts=3, n_answers=3, d=3))
    d0 = w.sample(0.3, 40000, seed=5)
    d1, src = w.sample_with_source(0.3, 40000, seed=5)
    assert_allclose(d1.x, d0.x, rtol=0, atol=0)
    assert np.array_equal(d1.y, d0.y)
    assert set(np.unique(src)) == {1, 2}
    assert abs(np.mean(src == 1) - 0.3) < 0.01
    b = w.model.beta  # given the source, the label follows that population's Bradley-Terry model
    for k, th in ((1, w.theta1), (2, w.theta2)):
        sel = src == k
        p = sigmoid(b * d1.x[sel] @ (th - w.model.theta_ref))
        assert abs(np.mean(d1.y[sel]) - np.mean(p)) < 4 * math.sqrt(np.mean(p * (1 - p)) / sel.sum())
    with pytest.raises(ValueError, match="label mixture"):
        S.ShiftWorld(w.model, w.theta1, w.theta2, "reward", w.s, w.a1, w.a2, w.pair_prob).sample_with_source(0.3, 10, 0)


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    cfg = S.with_family(S.ShiftConfig(**TINY))
    out = tmp_path_factory.mktemp("family")
    return cfg, S.run_shift(cfg, out_dir=out, progress=False), out


def test_family_rows_match_the_solvers(family_run):
    """Each exact family row's theta and objective are `drdpo_theory.solvers.solve`'s on that training set."""
    cfg, res, _ = family_run
    assert set(S.FAMILY_METHODS) <= set(res.method)
    world = S.make_world(cfg)
    thcols = [f"theta_{j}" for j in range(cfg.d)]
    for seed in cfg.seeds:
        data, src = world.sample_with_source(cfg.alpha0, cfg.n_train, seed)
        params = _params(data, src, cfg.radius_frac, cfg.family_eps, cfg.beta_prime)
        rows = res[res.seed == seed].groupby("method").first()
        for m in EXACT:
            r = solve(m, data, cfg.beta, cfg.radius, **params[m])
            row = rows.loc[m]
            theta = row[thcols].to_numpy(float)
            assert_allclose(row.objective, r.objective, rtol=1e-12)
            assert_allclose(theta, r.theta, atol=1e-10)
            # the member's objective at the reported theta is the solver's value
            assert_allclose(OBJECTIVE[m](theta, data, cfg.beta, params[m]), r.objective, rtol=1e-9)
            assert_allclose(row.robust_objective, r.objective, rtol=1e-9)
            assert row[f"status_{m}"] == r.status == ("local" if m == "dr_dpo" else "optimal")
            assert_allclose(row.theta_norm, np.linalg.norm(r.theta), rtol=1e-9)
        for m, member in S.MEMBER_OF.items():  # the SGD rows: objective of their end point, above the optimum
            if m == member:
                continue
            theta = rows.loc[m][thcols].to_numpy(float)
            val = OBJECTIVE[member](theta, data, cfg.beta, params[member])
            assert_allclose(rows.loc[m].robust_objective, val, rtol=1e-12)
            if member != "dr_dpo":
                assert val >= rows.loc[member].objective - 1e-9
        # the group shares are the label sources'
        assert_allclose(rows.loc["groupdpo"].group1_share, np.mean(src == 1))


def test_family_run_keeps_the_other_methods_rows(family_run):
    """Drawing the label source leaves the training sets alone: the base methods' rows are those of a
    run without the family (common methods, exact solvers and SGD alike)."""
    cfg, res, _ = family_run
    base = S.run_shift(S.ShiftConfig(**{**TINY, "methods": ("dpo", "kldpo", "wdpo_w1", "kl_clamped_sgd")}),
                       progress=False)
    for m in ("dpo", "kldpo", "wdpo_w1", "kl_clamped_sgd"):
        a = res[res.method == m].sort_values(["seed", "alpha"])
        b = base[base.method == m].sort_values(["seed", "alpha"])
        assert_allclose(a.reward.to_numpy(), b.reward.to_numpy(), rtol=1e-12)


def test_base_config_key_and_cells_are_unchanged():
    """The family fields do not enter the cell names of runs without the family (committed caches stay valid)."""
    cfg = S.ShiftConfig()
    assert not cfg.has_family
    assert cfg.key() == S.ShiftConfig(family_eps=0.2).key()
    assert S.with_family(cfg).key() != S.with_family(replace(cfg, family_eps=0.2)).key()
    g = G.GradientStudyConfig()
    assert g.key() == G.GradientStudyConfig(beta_prime=2.0).key()
    assert g.key(family=True) != G.GradientStudyConfig(beta_prime=2.0).key(family=True)


def test_family_table_and_figure_are_written(family_run, tmp_path):
    cfg, res, out = family_run
    s = S.summarize_family(res, cfg)
    json.dumps(s)
    table = pd.DataFrame(s["family_table"])
    assert list(table.method) == list(cfg.methods)
    # independent: the worst case over alpha is min(reward(0), reward(1)) per seed (reward is linear in alpha)
    for _, r in table.iterrows():
        g = res[res.method == r.method]
        per_seed = g.groupby("seed").reward.min()
        assert_allclose(r.worst_reward_mean, per_seed.mean(), rtol=1e-12)
        assert_allclose(r.worst_reward_se, per_seed.std(ddof=1) / np.sqrt(len(per_seed)), rtol=1e-12)
        assert_allclose(r.reward_alpha0_mean, g[g.alpha == 0.0].reward.mean(), rtol=1e-12)
    chi2 = table.set_index("method").loc["chi2dpo"]
    assert chi2.parameter == "chi2 rho = 0.5 rho_c"
    assert chi2.status == "optimal 2/2"
    paths = S.write_family_table(table, tmp_path)
    md = paths[1].read_text()
    assert md.count("\n") == len(table) + 2 and md.startswith("| method | radius")
    assert_allclose(pd.read_csv(paths[0]).worst_reward_mean, table.worst_reward_mean, rtol=1e-12)

    import matplotlib

    matplotlib.use("Agg")
    from drdpo_theory import io
    from drdpo_theory.plots_approx import plot_shift_family

    figs = {}
    real = io.save_figure

    def keep(fig, path, **kw):
        figs[Path(path).suffix] = fig
        return real(fig, path, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(io, "save_figure", keep)
        import matplotlib.pyplot as plt

        mp.setattr(plt, "close", lambda *a, **k: None)
        got = plot_shift_family(res, tmp_path / "figs", stated=S.stated_line(s["stated"], cfg.alpha0))
    assert [p.name for p in got] == ["shift_family.png", "shift_family.pdf"] and all(p.stat().st_size > 0 for p in got)
    fig = figs[".png"]
    assert "Worst-case reward over α" in fig._suptitle.get_text()
    axes = fig.axes
    assert all(ax.get_xlabel() for ax in axes) and axes[0].get_ylabel()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.canvas.draw()
    rend = fig.canvas.get_renderer()
    (legend,) = fig.legends
    assert not any(legend.get_window_extent(rend).overlaps(ax.get_window_extent(rend)) for ax in axes)
    from matplotlib.colors import to_hex

    styles = [(to_hex(line.get_color()), str(line.get_linestyle())) for line in axes[0].get_lines()
              if not line.get_label().startswith("_") and "training" not in line.get_label()]
    assert len(styles) == len(set(styles))
    plt.close(fig)


# ----------------------------------------------------------------------------- the commands
def _git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def test_shift_family_quick_cli_writes_table_and_figure_and_leaves_git_clean(monkeypatch, capsys):
    """`drdpo shift --family --quick` (grid shrunk here) writes under results/shift_family_quick/ and
    figures/quick/ only, both ignored by git: the quick run changes nothing git tracks."""
    monkeypatch.setattr(S.ShiftConfig, "quick", classmethod(lambda cls: cls(**TINY)))
    monkeypatch.chdir(ROOT)
    mine = ("figures/shift_family.png", "figures/shift_family.pdf", "docs/results/family/summary.json",
            "docs/results/family/family_table.csv", "docs/results/family/shift.csv")
    tracked = {p: os.stat(ROOT / p).st_mtime_ns for p in mine if (ROOT / p).is_file()}
    assert main(["shift", "--family", "--quick", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = s["figures"] + s["tables"] + ["results/shift_family_quick/summary.json", "results/shift_family_quick/shift.csv"]
    assert [Path(p).name for p in s["figures"]] == ["shift_family.png", "shift_family.pdf"]
    assert all(Path(p).parts[:2] == ("figures", "quick") for p in s["figures"])
    for p in written:
        assert (ROOT / p).is_file(), p
        assert _git("check-ignore", "-q", p).returncode == 0, f"{p} is not ignored by git"
    assert _git("status", "--porcelain", "--", *written).stdout == ""
    assert {p: os.stat(ROOT / p).st_mtime_ns for p in tracked} == tracked  # the full run's figure and summary untouched
    assert set(s["methods"]) == set(S.METHODS) | set(S.FAMILY_METHODS)


def test_shift_family_cli_refuses_the_reward_mixture(capsys):
    assert main(["shift", "--family", "--mixture", "reward", "--out", ""]) == 2
    assert "--family needs --mixture label" in capsys.readouterr().err


def test_gradients_family_cli(monkeypatch, tmp_path, capsys):
    small = G.GradientStudyConfig(instances=(0,), n_prompts=3, n_answers=3, d=3, n_points=1, batch_sizes=(4, 16),
                                  n_batches=100, sgd_steps=200, sgd_seeds=(0,))
    monkeypatch.setattr(G.GradientStudyConfig, "quick", classmethod(lambda cls: small))
    assert main(["gradients", "--family", "--quick", "--json", "--out", str(tmp_path)]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(s["family_batch_bias_smallest_batch"]) == set(EXACT)
    assert set(s["family_sgd_endpoint_error"]) == set(EXACT) | {"groupdpo_eg"}
    assert (tmp_path / "family_batch.csv").is_file() and (tmp_path / "family_sgd.csv").is_file()
    assert [Path(p).name for p in s["figures"]] == ["gradients_family.png", "gradients_family.pdf"]
    assert not (tmp_path / "kl_tau.csv").exists()  # --family runs the family tables only


def test_numpy_group_eg_equals_the_torch_trainers_state():
    """`GroupEG` (the log-linear SGD) and `llm.family.GroupEGState` (the torch trainer) take the same
    steps: same weights q after a sequence of batches, same per-pair multipliers."""
    torch = pytest.importorskip("torch")
    from drdpo_theory.llm.family import GroupEGState

    rng = np.random.default_rng(7)
    labels = np.array([3, 5, 9])
    ours, theirs = G.GroupEG(labels, step=0.3), GroupEGState(labels, step=0.3)
    for k in range(6):
        n = 12
        l = rng.exponential(0.8, n)
        g = rng.choice(labels[: 2 + (k % 2)], n)  # some batches miss a group
        w = np.full(n, 1 / n)
        q = ours.pair_weights(l, w, g)
        m, value, _ = theirs.multipliers(torch.as_tensor(l), torch.as_tensor(g), gather=False)
        assert_allclose(q * n, m.numpy(), rtol=1e-12, atol=1e-15)
        assert_allclose(q @ l, value, rtol=1e-12)
        assert_allclose(ours.q, theirs.q, rtol=1e-12)
