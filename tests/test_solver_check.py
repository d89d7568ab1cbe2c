"""The embedded solver certification run (what `drdpo solver-check` prints) certifies everything."""

import json

from drdpo_theory.cli import main
from drdpo_theory.experiments.solver_check import INSTANCES, PROBLEMS, run_solver_check, summarise

OBJ_RTOL = 1e-7
THETA_ATOL = 1e-5


def test_every_solver_certified_and_native_matches_cvxpy():
    df = run_solver_check(progress=False)
    assert len(df) == 3 * len(PROBLEMS)
    assert (df.native_status == "optimal").all(), df[df.native_status != "optimal"]
    assert (df.cvxpy_status == "optimal").all(), df[df.cvxpy_status != "optimal"]
    assert df.obj_rel_diff.max() <= OBJ_RTOL
    assert df.theta_max_diff.max() <= THETA_ATOL
    # the "active ball" instance really has the constraint active for DPO
    assert df[(df.instance == "d3 active ball") & (df.problem == "dpo")].ball_active.all()
    s = summarise(df)
    assert s["certified"] == s["runs"] == 2 * len(df)
    # continuous W1 with finite kappa is solved natively (trust region), never by the cvxpy fallback
    finite_kappa = df[df.problem.str.startswith("wdpo W1") & ~df.problem.str.contains("kappa=inf")]
    assert len(finite_kappa) == 2 * len(INSTANCES)
    assert (finite_kappa.native_solver == "native-trust-region").all(), finite_kappa.native_solver
    assert s["native_fallbacks"] == 0


def test_solver_check_cli_json(tmp_path, capsys):
    code = main(["solver-check", "--out", str(tmp_path), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    summary = json.loads(out[-1])
    assert summary["certified"] == summary["runs"]
    assert (tmp_path / "solver_check.csv").exists()
