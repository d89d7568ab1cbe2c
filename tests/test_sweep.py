"""Sweep engine (resumable, parallel, deterministic), collapse flags and the CLI contract."""

import importlib.util
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose

from drdpo_theory.cli import main
from drdpo_theory.experiments import sample_complexity as sc
from drdpo_theory.experiments.sweep import load_rows, run_sweep

ATOL = 0.0
RTOL = 0.0
KEY = ("a", "b")
CALLS = []


def fake_cell(cell):
    CALLS.append((cell["a"], cell["b"]))
    return {"a": cell["a"], "b": cell["b"], "value": cell["a"] * 10 + cell["b"], "seconds": 0.0}


def _cells():
    return [{"a": a, "b": b} for a in range(3) for b in (0.5, 1.5)]


class Stop(KeyboardInterrupt):
    pass


def test_interrupt_and_resume_loses_and_recomputes_nothing(tmp_path):
    path = tmp_path / "rows.csv"
    CALLS.clear()
    seen = []

    def stop_after_2(row):
        seen.append(row)
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        run_sweep(_cells(), fake_cell, path, KEY, n_jobs=1, chunk_size=1, progress=False, on_row=stop_after_2)
    assert len(load_rows(path)) == 2
    first = list(CALLS)
    CALLS.clear()
    df = run_sweep(_cells(), fake_cell, path, KEY, n_jobs=1, chunk_size=1, progress=False)
    assert len(CALLS) == 4 and not set(CALLS) & set(first)  # only the 4 unfinished cells ran
    assert len(df) == 6 and not df.duplicated(list(KEY)).any()
    assert_allclose(np.sort(df["value"].to_numpy()), np.sort([a * 10 + b for a in range(3) for b in (0.5, 1.5)]),
                    rtol=RTOL, atol=ATOL)
    CALLS.clear()
    run_sweep(_cells(), fake_cell, path, KEY, n_jobs=1, progress=False)
    assert CALLS == []  # a complete sweep recomputes nothing


def test_partial_grid_then_full_grid_and_torn_line(tmp_path):
    path = tmp_path / "rows.csv"
    CALLS.clear()
    run_sweep(_cells()[:3], fake_cell, path, KEY, n_jobs=1, progress=False)
    with open(path, "a") as f:  # a write torn by a kill
        f.write("2,1.5,999")
    assert len(load_rows(path)) == 3
    CALLS.clear()
    df = run_sweep(_cells(), fake_cell, path, KEY, n_jobs=2, chunk_size=1, progress=False)
    assert len(df) == 6 and 999 not in df["value"].to_numpy()
    assert len(load_rows(path)) == 6


def test_same_seed_same_rows():
    inst = sc.Instance()
    cell = {**sc.make_cells(inst, "main", {"kldpo": [0.04]}, [500], 1)[0]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = sc.run_cell(cell), sc.run_cell(dict(cell))
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    d1, d2 = sc.empirical_data(inst, 500, 3), sc.empirical_data(inst, 500, 3)
    assert_allclose(d1.weights, d2.weights, rtol=RTOL, atol=ATOL)
    assert not np.array_equal(sc.empirical_data(inst, 500, 4).weights, d1.weights) or d1.n != \
        sc.empirical_data(inst, 500, 4).n
    # common random numbers: the sample does not depend on the method
    assert_allclose(sc.empirical_data(inst, 500, 3).x, d1.x, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("method", ["kldpo", "wdpo-w1"])
def test_collapse_flagged_above_threshold(method):
    inst = sc.Instance()
    thr = sc.collapse_threshold(method, inst)
    assert 0 < thr < math.inf
    cells = sc.make_cells(inst, "main", {method: [0.5 * thr, 2.0 * thr]}, [20000, 100000], 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = pd.DataFrame([sc.run_cell(c) for c in cells])
    lo, hi = rows[rows.radius < thr], rows[rows.radius > thr]
    assert not lo["pop_collapsed"].any() and hi["pop_collapsed"].all()
    assert hi["collapsed"].all()  # at these n the empirical optimum collapses too
    assert_allclose(hi["error"].to_numpy(), 0.0, atol=1e-9)
    grid = sc.StudyGrid(instance=inst, ns=(20000, 100000), seeds=3, radii={method: [0.5 * thr, 2.0 * thr]},
                        main_radius={method: 0.5 * thr}, n_boot=50)
    bounds = pd.concat([sc.bound_curve(inst, method, r, grid.ns, grid.delta) for r in (0.5 * thr, 2.0 * thr)])
    summ, fits = sc.analyze(rows, grid, bounds)
    f_hi = fits[fits.radius > thr].iloc[0]
    assert f_hi["pop_collapsed"] and math.isnan(f_hi["slope"])  # not averaged into a rate
    assert summ[summ.radius > thr]["pop_collapsed"].all()


def test_cli_contract_tiny_grid(tmp_path, capsys):
    out, figs = tmp_path / "out", tmp_path / "figs"
    argv = ["sample-complexity", "--tiny", "--json", "--out", str(out), "--figures", str(figs), "--n-jobs", "1"]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    obj = json.loads(last)
    for m in sc.METHODS:
        assert set(obj[m]) >= {"slope", "slope_ci", "bound_holds"}
        assert isinstance(obj[m]["bound_holds"], bool)
        assert len(obj[m]["slope_ci"]) == 2
        lo, hi = obj[m]["slope_ci"]
        assert lo <= obj[m]["slope"] <= hi
        assert obj[m]["bound_holds"] is True
    assert (figs / "sample_complexity_error.png").exists() and (figs / "sample_complexity_error.pdf").exists()
    rows = pd.read_csv(out / "rows.csv")
    assert len(rows) == obj["_meta"]["cells"]
    # a rerun resumes: no new rows
    assert main(argv + ["--no-figures"]) == 0
    assert len(pd.read_csv(out / "rows.csv")) == len(rows)
    assert main(["sample-complexity", "--n-jobs", "0"]) == 2


def test_simulation_script_grid_is_the_default():
    path = Path(__file__).resolve().parents[1] / "simulations" / "sample_complexity.py"
    spec = importlib.util.spec_from_file_location("sim_sc", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.GRID == sc.default_grid()


def test_fit_slope_recovers_known_rate():
    rng = np.random.default_rng(0)
    ns = np.array([100, 1000, 10000, 100000])
    df = pd.DataFrame([{"n": n, "error": 3.0 * n ** -0.25 * np.exp(0.1 * rng.standard_normal())}
                       for n in ns for _ in range(40)])
    f = sc.fit_slope(df, n_boot=300)
    assert f["slope_ci"][0] <= -0.25 <= f["slope_ci"][1]
    assert abs(f["slope"] + 0.25) < 0.03
