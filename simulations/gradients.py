"""Exact vs approximate robust gradients: grid -> drdpo_theory.experiments.gradients -> CSVs + figures.

Usage: python simulations/gradients.py [--quick] [--jobs N]
Writes results/gradients/*.csv (resumable: finished cells are cached in results/gradients/cells/)
and figures/gradients_*.{png,pdf}; prints the headline numbers as JSON.
"""

import argparse
import json

from drdpo_theory.experiments.gradients import GradientStudyConfig, run_study, summarize
from drdpo_theory.plots_approx import plot_all_gradients

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    cfg = GradientStudyConfig.quick() if a.quick else GradientStudyConfig()
    res = run_study(cfg, out_dir="results/gradients", n_jobs=a.jobs)
    plot_all_gradients(res, "figures")
    print(json.dumps(summarize(res), indent=1))
