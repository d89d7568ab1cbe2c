"""``drdpo shift``: preference shift in the log-linear world (train at alpha0, test over alpha).

Contract: ``drdpo shift [--quick] [--json] [--mixture {label,reward}] [--alpha0 A] [--out DIR]
[--figures DIR] [--jobs N]`` runs :mod:`drdpo_theory.experiments.shift` (table to
``results/shift/shift.csv``, figure ``figures/shift_reward_vs_alpha.png``; ``--mixture reward``:
``results/shift_reward/``, ``figures/shift_reward_vs_alpha_reward_mixture.png``; with ``--quick``:
``results/shift[_reward]_quick/`` and ``OUT/figures/`` with ``--out``, else ``figures/quick/``);
with ``--json`` the last stdout line is one JSON object: ``alphas`` and, per method, ``reward_mean`` / ``reward_se`` at each alpha.
``--family`` adds the robust family (chi2dpo, cvardpo, groupdpo, rdpo, cdpo, dr_dpo, exact and their
batch versions by SGD; label mixture only): tables to ``results/shift_family[_quick]/`` (``shift.csv``,
``family_table.csv``, ``family_table.md``), figure ``shift_family.png``, and the JSON also holds
``stated`` (the radii) and ``family_table``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from ._args import n_jobs as _n_jobs
from ._args import study_outputs as _study_outputs
from ..cli import EXIT_OK, CLIError


def _alpha(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"alpha0 must be in [0, 1], got {v}")
    return v


def register(sub) -> None:
    p = sub.add_parser("shift", help="preference shift: train on a reward mixture, test across mixtures",
                       description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small grid (< 3 minutes on 2 cores)")
    size.add_argument("--full", action="store_true", help="the full grid (the default; accepted for `drdpo reproduce --full`)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line (last line of stdout)")
    p.add_argument("--mixture", choices=["label", "reward"], default="label",
                   help="label: mixture of the two Bradley-Terry label distributions (default); reward: BT with r_alpha")
    p.add_argument("--alpha0", type=_alpha, default=0.5, help="training mixture weight (default 0.5)")
    p.add_argument("--family", action="store_true",
                   help="also the robust family (chi2dpo, cvardpo, groupdpo, rdpo, cdpo, dr_dpo: exact and batch SGD); "
                        "one figure (shift_family) and one table (family_table.md/.csv) compare all methods")
    p.add_argument("--out", default=None,
                   help="directory of the result CSV (default results/shift[_reward|_family][_quick] by --mixture, "
                        "--family and --quick)")
    p.add_argument("--figures", default=None,
                   help="directory of the figure (default figures; with --quick OUT/figures if --out is given, "
                        "else figures/quick; '' = none)")
    p.add_argument("--n-jobs", "--jobs", dest="jobs", type=int, default=1,
                   help="joblib processes over seeds (default 1; -1: all cores; capped at the CPU count)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiments.shift import ShiftConfig, run_shift, summarize_shift, with_family

    base = ShiftConfig.quick() if args.quick else ShiftConfig()
    family = bool(getattr(args, "family", False))
    try:
        if family and args.mixture != "label":
            raise ValueError("--family needs --mixture label (groupdpo's groups are the label mixture's two sources)")
        cfg = replace(base, mixture=args.mixture, alpha0=args.alpha0)
        if family:
            cfg = with_family(cfg)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    n_jobs = _n_jobs(args.jobs)
    default_out = ("results/shift" + ("_reward" if cfg.mixture == "reward" else "") + ("_family" if family else "")
                   + ("_quick" if args.quick else ""))
    tables = {"shift.csv": ("seed", "method", "alpha", "reward")}
    if family:
        tables["family_table.csv"] = ("method", "worst_reward_mean")
    out, figures = _study_outputs(args, "shift-family" if family else "shift", default_out, tables=tables)
    t0 = time.perf_counter()
    res = run_shift(cfg, out_dir=out or None, n_jobs=n_jobs, progress=not args.json)
    if family:
        import pandas as pd

        from ..experiments.shift import stated_line, summarize_family, write_family_table

        summary = summarize_family(res, cfg)
        if out:
            summary["tables"] = [str(p) for p in write_family_table(pd.DataFrame(summary["family_table"]), out)]
    else:
        summary = summarize_shift(res)
    if figures:
        from ..plots_approx import plot_shift_family, plot_shift_reward

        if family:
            paths = plot_shift_family(res, figures, name="shift_family",
                                      stated=stated_line(summary["stated"], cfg.alpha0))
        else:
            name = "shift_reward_vs_alpha" if cfg.mixture == "label" else "shift_reward_vs_alpha_reward_mixture"
            paths = plot_shift_reward(res, figures, name=name)
        summary["figures"] = [str(p) for p in paths]
    summary["seconds"] = time.perf_counter() - t0
    summary["quick"] = bool(args.quick)
    if out:
        from ..io import write_json

        write_json(f"{out}/summary.json", summary)  # atomic; what `drdpo reproduce --collect` commits
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"alphas {summary['alphas']} (training alpha0 = {summary['alpha0']}, {summary['mixture']} mixture)")
        for m, v in summary["methods"].items():
            print(f"{m:22s} reward " + " ".join(f"{r:.3f}" for r in v["reward_mean"])
                  + f"  worst {v['worst_alpha_reward_mean']:.3f}")
        print(f"{'reference':22s} reward " + " ".join(f"{r:.3f}" for r in summary["reference_reward"]))
        if family:
            from ..experiments.shift import family_table_markdown

            print(family_table_markdown(summary["family_table"]))
        print(f"seconds {summary['seconds']:.1f}")
    return EXIT_OK
