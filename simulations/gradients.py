"""Exact vs approximate robust gradients: grid -> drdpo_theory.experiments.gradients -> CSVs + figures.

Usage: python simulations/gradients.py [--quick] [--family] [--jobs N]
Writes results/gradients/*.csv (resumable: finished cells are cached in results/gradients/cells/)
and figures/gradients_*.{png,pdf} (``--quick``: results/gradients_quick/ and figures/quick/, never the
committed full-run figures); prints the headline numbers as JSON. ``--family``: the robust family's
tables instead (family_batch, family_sgd) in results/gradients_family[_quick]/ and gradients_family.{png,pdf}.
"""

import argparse
import json

from drdpo_theory.experiments.gradients import FAMILY_TABLES, TABLES, GradientStudyConfig, run_study, summarize
from drdpo_theory.experiments.sweep import resolve_n_jobs
from drdpo_theory.plots_approx import plot_all_gradients

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--family", action="store_true", help="the robust family's tables instead")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    cfg = GradientStudyConfig.quick() if a.quick else GradientStudyConfig()
    n_jobs, notice = resolve_n_jobs(a.jobs)  # >= 1 or -1, capped at the CPU count
    if notice:
        print(f"note: {notice}")
    out = "results/gradients" + ("_family" if a.family else "") + ("_quick" if a.quick else "")
    res = run_study(cfg, out_dir=out, n_jobs=n_jobs, tables=tuple(FAMILY_TABLES if a.family else TABLES))
    plot_all_gradients(res, "figures/quick" if a.quick else "figures")
    print(json.dumps(summarize(res), indent=1))
