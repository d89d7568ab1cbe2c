"""``drdpo sample-complexity``: empirical vs population robust optima, with the bounds.

Contract: ``drdpo sample-complexity [--quick] [--out DIR] [--n-jobs K] [--json]``. Runs (or resumes:
finished cells in ``DIR/rows.csv`` are skipped) the sweep of
:mod:`drdpo_theory.experiments.sample_complexity`, writes the tables to ``DIR`` and the figures to
``figures/`` (a ``--quick`` run: ``DIR/figures/`` with ``--out``, else ``figures/quick/``, so it
never overwrites the committed full-run figures). Exit 2 with one line on a bad ``--n-jobs``, an
unusable ``--out``/``--figures`` or a foreign ``rows.csv`` in ``--out``. With ``--json`` the last
stdout line is one JSON object with, for each method
(``dpo``, ``kldpo``, ``wdpo-w1``, ``wdpo-w2``) at its main radius: ``slope`` (log-log slope of the
median error in ``n``), ``slope_ci`` ``[lo, hi]`` (bootstrap 95%) and ``bound_holds`` (the bound is
above the empirical (1-delta)-quantile of the error at every ``n``); plus ``"_meta"``.
"""

from __future__ import annotations

import argparse
import json
import math

from ._args import claim_output_dir as _claim, n_jobs as _n_jobs, output_dir as _output_dir
from ._args import quick_figures as _quick_figures
from ..cli import EXIT_OK, CLIError


def register(sub) -> None:
    p = sub.add_parser(
        "sample-complexity",
        help="sample-complexity study of DPO/KLDPO/WDPO: error vs n, slopes, bounds, figures",
        description="Measure ||theta_n - theta_pop|| against n for DPO, KLDPO and WDPO (W1 continuous, "
                    "W2 finite support) on a finite log-linear model, with exact population optima, "
                    "fitted log-log slopes (bootstrap CI) and the (1-delta) bounds with explicit constants. "
                    "Resumable: rerunning with the same --out skips finished cells.",
    )
    p.add_argument("--quick", action="store_true",
                   help="small grid (6 sample sizes, 12 seeds; < 3 min on 2 cores): what `make reproduce` runs")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="results folder (default results/sample_complexity, or results/sample_complexity_quick "
                        "with --quick)")
    p.add_argument("--figures", default=None, metavar="DIR",
                   help="figure folder (default figures/; with --quick: OUT/figures/ if --out is given, else figures/quick/)")
    p.add_argument("--n-jobs", type=int, default=2, metavar="K",
                   help="parallel workers (default 2; -1: all cores; capped at the CPU count)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line (last line of stdout)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds-long grid for tests
    p.set_defaults(func=run)


def _clean(obj):
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def run(args) -> int:
    import time

    from ..experiments import sample_complexity as sc
    from ..io import OutputPathError, write_json

    n_jobs = _n_jobs(args.n_jobs)
    t0 = time.perf_counter()
    if args.tiny:
        grid, default_out = sc.tiny_grid(), "results/sample_complexity_tiny"
    elif args.quick:
        grid, default_out = sc.quick_grid(), "results/sample_complexity_quick"
    else:
        grid, default_out = sc.default_grid(), "results/sample_complexity"
    out = args.out or default_out
    figdir = _quick_figures(args.out, args.figures, args.quick or args.tiny)
    _output_dir(out, "--out")
    if not args.no_figures:
        _output_dir(figdir, "--figures")
    _claim(out, "sample-complexity", tables={"summary.csv": ("method", "radius", "n"),
                                             "fits.csv": ("method", "radius", "slope"),
                                             "bounds.csv": ("method", "radius", "n")})
    try:
        result = sc.run_study(grid, out, n_jobs=n_jobs, progress=not args.json)
    except OutputPathError as exc:  # e.g. a rows.csv in --out that this study did not write
        raise CLIError(str(exc)) from None
    figs = []
    if not args.no_figures:
        from ..plots import make_all

        figs = [str(p) for p in make_all(result, figdir)]
    head = result.headline()
    seconds = time.perf_counter() - t0
    write_json(f"{out}/headline.json", _clean({**head, "_meta": {"seconds": seconds, "grid": sc.grid_dict(grid)}}))
    if args.json:
        meta = {"out": str(out), "figures": figs, "seconds": round(seconds, 2), "delta": grid.delta,
                "cells": int(len(result.rows)), "grid": "tiny" if args.tiny else ("quick" if args.quick else "default")}
        print(json.dumps(_clean({**head, "_meta": meta})))
    else:
        print(f"sample-complexity study: {len(result.rows)} cells, {seconds:.1f} s; tables in {out}/")
        print(f"{'method':10s} {'radius':>7s} {'slope':>7s} {'95% CI':>17s} {'bound holds':>11s} {'bound@max n':>11s}")
        for m, h in head.items():
            ci = h["slope_ci"]
            ci_s = "n/a" if ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
            sl = "n/a" if h["slope"] is None else f"{h['slope']:.3f}"
            print(f"{m:10s} {h['radius']:7.3g} {sl:>7s} {ci_s:>17s} {str(h['bound_holds']):>11s} "
                  f"{str(h['bound_at_max_n']):>11.11s}")
        for p in figs:
            if p.endswith(".png"):
                print(f"figure {p}")
    return EXIT_OK
