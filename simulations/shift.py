"""Preference shift: grid -> drdpo_theory.experiments.shift -> CSV + figure.

Usage: python simulations/shift.py [--quick] [--mixture {label,reward}] [--family] [--jobs N]
Writes results/shift/shift.csv (per-seed cells cached in results/shift/cells/) and
figures/shift_reward_vs_alpha.{png,pdf} (``--quick``: results/shift_quick/ and figures/quick/, never
the committed full-run figures); prints the per-method rewards as JSON. ``--family`` (label mixture)
adds the robust family: results/shift_family[_quick]/ (shift.csv, family_table.csv/.md) and
shift_family.{png,pdf}, the side-by-side figure.
"""

import argparse
import json
from dataclasses import replace

import pandas as pd

from drdpo_theory.experiments.shift import (ShiftConfig, run_shift, stated_line, summarize_family, summarize_shift,
                                            with_family, write_family_table)
from drdpo_theory.experiments.sweep import resolve_n_jobs
from drdpo_theory.plots_approx import plot_shift_family, plot_shift_reward

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mixture", choices=["label", "reward"], default="label")
    ap.add_argument("--family", action="store_true", help="also the robust family (label mixture only)")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    if a.family and a.mixture != "label":
        ap.error("--family needs --mixture label (groupdpo's groups are the label sources)")
    cfg = replace(ShiftConfig.quick() if a.quick else ShiftConfig(), mixture=a.mixture)
    cfg = with_family(cfg) if a.family else cfg
    out = ("results/shift" if a.mixture == "label" else "results/shift_reward") + ("_family" if a.family else "") \
        + ("_quick" if a.quick else "")
    n_jobs, notice = resolve_n_jobs(a.jobs)  # >= 1 or -1, capped at the CPU count
    if notice:
        print(f"note: {notice}")
    res = run_shift(cfg, out_dir=out, n_jobs=n_jobs)
    figdir = "figures/quick" if a.quick else "figures"
    if a.family:
        summary = summarize_family(res, cfg)
        write_family_table(pd.DataFrame(summary["family_table"]), out)
        plot_shift_family(res, figdir, name="shift_family", stated=stated_line(summary["stated"], cfg.alpha0))
    else:
        summary = summarize_shift(res)
        name = "shift_reward_vs_alpha" if a.mixture == "label" else "shift_reward_vs_alpha_reward_mixture"
        plot_shift_reward(res, figdir, name=name)
    print(json.dumps(summary, indent=1))
