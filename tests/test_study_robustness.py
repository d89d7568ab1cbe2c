"""The studies (sample-complexity, gradients, shift, llm-shift, reproduce, solver-check) against a
hostile user: torn caches, worker counts, bad --n-jobs, bad output paths, quick runs and committed files."""

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from pandas.testing import assert_frame_equal

from drdpo_theory.cli import main
from drdpo_theory.experiments import gradients as G
from drdpo_theory.experiments import shift as S
from drdpo_theory.experiments.sample_complexity import fit_slope
from drdpo_theory.experiments.sweep import load_rows, resolve_n_jobs, run_sweep
from drdpo_theory.io import OutputPathError

TINY_GRADIENTS = G.GradientStudyConfig(
    instances=(0,), n_prompts=3, n_answers=3, d=3, radius_fracs=(0.5,), tau_mults=(0.5, 1.0, 2.0), n_points=1,
    batch_sizes=(8,), n_batches=10, betas=(1.0,), value_eps=(1e-3, 1e-2), path_steps=5, sgd_steps=30,
    sgd_seeds=(0,), fixed_point_steps=30)
TINY_SHIFT = S.ShiftConfig(n_prompts=3, n_answers=3, d=3, n_train=100, seeds=(0, 1), alphas=(0.0, 0.5, 1.0),
                           methods=("dpo", "kldpo", "dpo_sgd"), sgd_steps=30)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _tear(path, keep_lines):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:keep_lines]) + lines[keep_lines][: len(lines[keep_lines]) // 2])


# ----------------------------------------------------------------------------- 1. torn caches
def test_gradients_torn_empty_and_unmarked_cells_are_recomputed(tmp_path):
    tables = ("kl_tau", "value_error")
    first = G.run_study(TINY_GRADIENTS, out_dir=tmp_path, tables=tables, progress=False)
    cells = sorted((tmp_path / "cells").glob("*.csv"))
    assert len(cells) == 2 and all(c.with_name(c.name + ".done").is_file() for c in cells)
    kl_cell = next(c for c in cells if c.name.startswith("kl_tau"))
    ve_cell = next(c for c in cells if c.name.startswith("value_error"))
    _tear(kl_cell, 3)  # a kill while the cell was written: 2 of its rows and half a line
    ve_cell.write_text("")  # an empty cell (formerly a traceback)
    again = G.run_study(TINY_GRADIENTS, out_dir=tmp_path, tables=tables, progress=False)
    for k in tables:
        assert_frame_equal(again[k], first[k])
        assert_frame_equal(pd.read_csv(tmp_path / f"{k}.csv"), first[k], check_dtype=False)
    # a complete-looking cell without its completion marker is not trusted either
    os.remove(kl_cell.with_name(kl_cell.name + ".done"))
    kl_cell.write_text(kl_cell.read_text().replace(",", ";"))  # and its content is foreign
    assert_frame_equal(G.run_study(TINY_GRADIENTS, out_dir=tmp_path, tables=tables, progress=False)["kl_tau"],
                       first["kl_tau"])


def test_shift_torn_cell_is_recomputed_and_table_is_complete(tmp_path):
    first = S.run_shift(TINY_SHIFT, out_dir=tmp_path, progress=False)
    n_rows = 2 * 3 * 3 + 3  # seeds x methods x alphas + the reference rows
    assert len(first) == n_rows
    cell = sorted((tmp_path / "cells").glob("seed1_*.csv"))[0]
    _tear(cell, 4)
    again = S.run_shift(TINY_SHIFT, out_dir=tmp_path, progress=False)
    assert len(again) == n_rows  # formerly: the torn cell's rows went missing, exit 0
    assert_frame_equal(again, first)
    assert len(pd.read_csv(tmp_path / "shift.csv")) == n_rows


def test_sweep_file_torn_in_its_header_restarts_and_foreign_file_is_refused(tmp_path):
    path = tmp_path / "rows.csv"
    cells = [{"k": i} for i in range(3)]
    path.write_text("k,val")  # the header itself was cut (no newline): nothing finished
    df = run_sweep(cells, _square, path, key=("k",), progress=False)
    assert list(df.k) == [0, 1, 2] and list(df.val) == [0, 1, 4]
    (tmp_path / "foreign.csv").write_text("a,b\n1,2\n")
    with pytest.raises(OutputPathError, match=r"foreign\.csv is not a sweep table"):
        run_sweep(cells, _square, tmp_path / "foreign.csv", key=("k",), progress=False)
    (tmp_path / "other.csv").write_text("a,_done\n1,1\n")
    with pytest.raises(OutputPathError, match=r"lacks the key column\(s\) \['k'\]"):
        load_rows(tmp_path / "other.csv", key=("k",))


def _square(cell):
    import time

    time.sleep(0.05 * (3 - cell["k"] % 4))  # early cells finish last
    return {"k": cell["k"], "val": cell["k"] ** 2}


# ----------------------------------------------------------------------------- 2. independent of n_jobs
def test_sweep_rows_come_back_in_grid_order_whatever_the_arrival_order(tmp_path):
    cells = [{"k": i} for i in range(8)]
    a = run_sweep(cells, _square, tmp_path / "a.csv", key=("k",), n_jobs=2, chunk_size=1, progress=False)
    assert list(a.k) == list(range(8))
    # a file written in another order (other workers, other run) gives the same table
    lines = (tmp_path / "a.csv").read_text().splitlines(keepends=True)
    (tmp_path / "b.csv").write_text(lines[0] + "".join(reversed(lines[1:])) + lines[1])  # + a duplicate row
    b = run_sweep(cells, _square, tmp_path / "b.csv", key=("k",), n_jobs=1, progress=False)
    assert_frame_equal(a, b)


def test_fit_slope_does_not_depend_on_row_order():
    rng = np.random.default_rng(0)
    ns = np.repeat([100, 1000, 10000], 12)
    df = pd.DataFrame({"n": ns, "seed": np.tile(np.arange(12), 3),
                       "error": ns ** -0.5 * np.exp(0.3 * rng.standard_normal(len(ns)))})
    ref = fit_slope(df, n_boot=200)
    for s in range(3):
        shuffled = fit_slope(df.sample(frac=1.0, random_state=s), n_boot=200)
        assert shuffled["slope"] == ref["slope"] and shuffled["slope_ci"] == ref["slope_ci"]
    assert ref["slope_ci"][0] < ref["slope"] < ref["slope_ci"][1]
    assert_allclose(ref["slope"], -0.5, atol=0.1)


@pytest.mark.slow
def test_sample_complexity_slope_cis_identical_for_one_and_two_workers(tmp_path, capsys):
    import json

    heads = []
    for jobs in ("1", "2"):
        out = tmp_path / f"j{jobs}"
        assert main(["sample-complexity", "--tiny", "--json", "--no-figures", "--out", str(out),
                     "--n-jobs", jobs]) == 0
        heads.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    for m in ("dpo", "kldpo", "wdpo-w1", "wdpo-w2"):
        assert heads[0][m]["slope_ci"] == heads[1][m]["slope_ci"], m


# ----------------------------------------------------------------------------- 3. --n-jobs
def test_resolve_n_jobs():
    assert resolve_n_jobs(1, cpus=2) == (1, None)
    assert resolve_n_jobs(-1, cpus=3) == (3, None)
    workers, notice = resolve_n_jobs(1000, cpus=2)
    assert workers == 2 and "--n-jobs 1000 is more than the 2 CPUs available; using 2" == notice
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="--n-jobs must be an integer >= 1, or -1"):
            resolve_n_jobs(bad)


@pytest.mark.parametrize("study", ["sample-complexity", "gradients", "shift"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_bad_n_jobs_exit_2_one_line(study, value, tmp_path, capsys):
    assert main([study, "--n-jobs", value, "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--n-jobs must be an integer >= 1, or -1", f"got {value}")
    assert not (tmp_path / "o").exists()


def test_too_many_jobs_capped_with_a_notice(tmp_path, capsys):
    from drdpo_theory.commands._args import n_jobs

    assert n_jobs(10**6) == resolve_n_jobs(-1)[0]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: --n-jobs 1000000 is more than the")


# ----------------------------------------------------------------------------- 4. paths
def _path_cases(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    return afile, [(str(afile), "is a file; expected a folder"),
                   (str(afile / "sub"), "is a file, so no folder can be made under it"),
                   ("/proc/drdpo-out", "is not writable")]


@pytest.mark.parametrize("study", ["sample-complexity", "gradients", "shift", "llm-shift", "reproduce",
                                   "solver-check"])
def test_unusable_out_exit_2_one_line(study, tmp_path, capsys):
    _, cases = _path_cases(tmp_path)
    for value, msg in cases:
        assert main([study, "--out", value]) == 2, value
        _one_line_error(capsys, "--out", msg)


@pytest.mark.parametrize("study", ["sample-complexity", "gradients", "shift"])
def test_unusable_figures_exit_2_one_line(study, tmp_path, capsys):
    _, cases = _path_cases(tmp_path)
    for value, msg in cases:
        assert main([study, "--out", str(tmp_path / "o"), "--figures", value]) == 2, value
        _one_line_error(capsys, "--figures", msg)


@pytest.mark.parametrize("flag", ["--figure", "--table", "--results-json"])
def test_llm_shift_unusable_output_files_exit_2(flag, tmp_path, capsys):
    afile, _ = _path_cases(tmp_path)
    for value, msg in [(str(tmp_path), "is a folder; expected a file path"),
                       (str(afile / "x.out"), "is a file, so no file can be made under it")]:
        assert main(["llm-shift", "--quick", "--out", str(tmp_path / "o"), flag, value]) == 2
        _one_line_error(capsys, flag, msg)


def test_foreign_rows_csv_and_other_studys_folder_exit_2(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "rows.csv").write_text("name,score\nalice,3\n")
    assert main(["sample-complexity", "--tiny", "--no-figures", "--n-jobs", "1", "--out", str(out)]) == 2
    _one_line_error(capsys, "rows.csv is not a sweep table", "use another --out")
    assert (out / "rows.csv").read_text() == "name,score\nalice,3\n"  # left as it was
    shift_out = tmp_path / "s"
    (shift_out).mkdir()
    (shift_out / ".drdpo-study").write_text("shift\n")
    assert main(["gradients", "--out", str(shift_out)]) == 2
    _one_line_error(capsys, "holds results of the 'shift' study, not 'gradients'")
    for study, table in (("shift", "shift.csv"), ("gradients", "kl_tau.csv"), ("sample-complexity", "fits.csv")):
        other = tmp_path / f"foreign-{study}"
        other.mkdir()
        (other / table).write_text("name,score\nalice,3\n")  # a user's file, not this study's table
        assert main([study, "--out", str(other), "--n-jobs", "1"]) == 2
        _one_line_error(capsys, f"holds a {table} that this study did not write")
        assert (other / table).read_text() == "name,score\nalice,3\n"


# ----------------------------------------------------------------------------- 5. quick runs
def test_quick_figure_folders():
    from drdpo_theory.commands._args import quick_figures

    assert quick_figures(None, None, quick=False) == "figures"
    assert quick_figures(None, None, quick=True) == os.path.join("figures", "quick")
    assert quick_figures("runs/x", None, quick=True) == os.path.join("runs/x", "figures")
    assert quick_figures("runs/x", "figs", quick=True) == "figs"


@pytest.fixture
def fake_plots(monkeypatch):
    """The figure functions replaced by stubs that write an empty ``<folder>/<name>.png`` (the
    figures themselves are tested elsewhere; here only where they go)."""
    from drdpo_theory import plots, plots_approx
    from drdpo_theory.io import write_text

    def stub(name):
        def fake(res, folder, *a, **kw):
            path = Path(folder) / f"{kw.get('name', name)}.png"
            write_text(path, "")
            return [path]
        return fake

    monkeypatch.setattr(plots, "make_all", stub("sample_complexity_error"))
    monkeypatch.setattr(plots_approx, "plot_all_gradients", stub("gradients_cosine_vs_tau"))
    monkeypatch.setattr(plots_approx, "plot_shift_reward", stub("shift_reward_vs_alpha"))


def _written(root):
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_quick_gradients_and_shift_never_write_committed_paths(tmp_path, monkeypatch, capsys, fake_plots):
    """In a scratch working folder, `--quick` with no --out/--figures writes only under results/
    and figures/quick/ (both ignored by git); with --out, the figures go under OUT/figures."""
    monkeypatch.setattr(G.GradientStudyConfig, "quick", classmethod(lambda cls: replace(TINY_GRADIENTS)))
    monkeypatch.setattr(S.ShiftConfig, "quick", classmethod(lambda cls: TINY_SHIFT))
    monkeypatch.chdir(tmp_path)
    assert main(["gradients", "--quick", "--json"]) == 0
    assert main(["shift", "--quick", "--json"]) == 0
    written = _written(tmp_path)
    assert all(w.startswith(("results/", "figures/quick/")) for w in written), written
    assert {"figures/quick/shift_reward_vs_alpha.png", "figures/quick/gradients_cosine_vs_tau.png",
            "results/gradients_quick/kl_tau.csv", "results/shift_quick/shift.csv"} <= written
    assert main(["shift", "--quick", "--json", "--out", "mine"]) == 0
    assert "mine/figures/shift_reward_vs_alpha.png" in _written(tmp_path)
    capsys.readouterr()


def test_quick_sample_complexity_default_paths(tmp_path, monkeypatch, capsys, fake_plots):
    from drdpo_theory.experiments import sample_complexity as sc

    g = sc.tiny_grid()
    small = replace(g, ns=(300, 3000), seeds=2, radii={"dpo": [0.0]}, main_radius={"dpo": 0.0})
    monkeypatch.setattr(sc, "tiny_grid", lambda: small)
    monkeypatch.chdir(tmp_path)
    assert main(["sample-complexity", "--tiny", "--json", "--n-jobs", "1"]) == 0
    written = _written(tmp_path)
    assert "figures/quick/sample_complexity_error.png" in written
    assert "results/sample_complexity_tiny/rows.csv" in written
    assert all(w.startswith(("results/", "figures/quick/")) for w in written), written
    capsys.readouterr()


# ----------------------------------------------------------------------------- 6. llm-shift smoke test
def test_quick_llm_shift_is_labelled_a_smoke_test(monkeypatch, tmp_path):
    from drdpo_theory.commands.reproduce import report
    from drdpo_theory.llm.shift import pipeline as PL

    assert PL.ShiftConfig.preset("quick", out=str(tmp_path)).smoke_test
    assert not PL.ShiftConfig.preset("real", out=str(tmp_path)).smoke_test
    pol = {"mean": [0.0, 0.0], "lo": [0.0, 0.0], "hi": [0.0, 0.0], "diff": None,
           "raw_mean": {"positivity": 0.0, "calm": 0.0, "n_tokens": 6.0}}
    summary = {"model": "tiny-random", "objectives": ["positivity", "calm"], "alpha0": 0.5, "alphas": [0.0, 1.0],
               "policies": {"dpo": pol}, "smoke_test": True}
    assert PL.markdown_table(summary).splitlines()[0] == f"**{PL.SMOKE_NOTE}**"
    assert "SMOKE" not in PL.markdown_table({**summary, "smoke_test": False})
    titles = []
    monkeypatch.setattr(PL, "save_figure", lambda fig, path, **kw: titles.append(fig._suptitle.get_text()))
    PL.plot_shift(summary, tmp_path / "f.png")
    assert titles and titles[0] == PL.SMOKE_NOTE
    text = report({"llm-shift": {"model": "tiny-random", "alphas": [0.0, 1.0], "smoke_test": True,
                                 "methods": {"dpo": {"mean": [0.0, 0.0]}}}})
    assert "PIPELINE SMOKE TEST only" in text


def test_quick_output_folders_are_ignored_by_git():
    """Everything a quick run or a test writes in the working tree (results/, figures/quick/, runs/)
    is ignored by git, so `git status` stays clean; the committed full-run figures are not ignored."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["results/gradients_quick/kl_tau.csv", "results/sample_complexity_quick/rows.csv",
             "figures/quick/shift_reward_vs_alpha.png", "runs/llm_shift_quick/results.json",
             "results/reproduce/quick/shift.json"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=root, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(paths)
    r = subprocess.run(["git", "check-ignore", "--no-index", "figures/shift_reward_vs_alpha.png"], cwd=root,
                       capture_output=True, text=True)
    assert r.returncode == 1  # not ignored: the full run's figure is committed
