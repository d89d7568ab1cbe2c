"""``drdpo solver-check``: certify every exact solver on embedded instances (native vs cvxpy)."""

from __future__ import annotations

import json
from pathlib import Path

from ..cli import EXIT_OK, EXIT_SOLVER


def register(sub) -> None:
    p = sub.add_parser("solver-check", help="run every exact solver on embedded instances, native vs cvxpy",
                       description=__doc__.split(": ", 1)[1])
    p.add_argument("--out", default="results/solver_check", help="directory for solver_check.csv")
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON summary object")
    p.set_defaults(func=run)


def run(args) -> int:
    import pandas as pd

    from ..experiments.solver_check import run_solver_check, summarise

    from ..io import write_csv
    from ._args import output_dir

    out = Path(output_dir(args.out, "--out"))  # a file, under a file, unwritable: exit 2 before the work
    df = run_solver_check()
    write_csv(df, out / "solver_check.csv")  # atomic
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df[["instance", "problem", "native_status", "native_gap", "cvxpy_solver", "cvxpy_status",
                  "cvxpy_gap", "obj_rel_diff", "theta_max_diff", "native_s", "cvxpy_s"]].to_string(
            index=False, float_format=lambda v: f"{v:.2e}"))
    s = summarise(df)
    print(f"\n{s['certified']}/{s['runs']} runs certified optimal; max gap {s['max_gap']:.1e}; "
          f"max objective disagreement {s['max_obj_rel_diff']:.1e}; table: {out / 'solver_check.csv'}")
    if args.json:
        print(json.dumps(s))
    return EXIT_OK if s["certified"] == s["runs"] else EXIT_SOLVER
