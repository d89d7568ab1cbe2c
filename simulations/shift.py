"""Preference shift: grid -> drdpo_theory.experiments.shift -> CSV + figure.

Usage: python simulations/shift.py [--quick] [--mixture {label,reward}] [--jobs N]
Writes results/shift/shift.csv (per-seed cells cached in results/shift/cells/) and
figures/shift_reward_vs_alpha.{png,pdf} (``--quick``: results/shift_quick/ and figures/quick/, never
the committed full-run figures); prints the per-method rewards as JSON.
"""

import argparse
import json
from dataclasses import replace

from drdpo_theory.experiments.shift import ShiftConfig, run_shift, summarize_shift
from drdpo_theory.experiments.sweep import resolve_n_jobs
from drdpo_theory.plots_approx import plot_shift_reward

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mixture", choices=["label", "reward"], default="label")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    cfg = replace(ShiftConfig.quick() if a.quick else ShiftConfig(), mixture=a.mixture)
    out = ("results/shift" if a.mixture == "label" else "results/shift_reward") + ("_quick" if a.quick else "")
    n_jobs, notice = resolve_n_jobs(a.jobs)  # >= 1 or -1, capped at the CPU count
    if notice:
        print(f"note: {notice}")
    res = run_shift(cfg, out_dir=out, n_jobs=n_jobs)
    name = "shift_reward_vs_alpha" if a.mixture == "label" else "shift_reward_vs_alpha_reward_mixture"
    plot_shift_reward(res, "figures/quick" if a.quick else "figures", name=name)
    print(json.dumps(summarize_shift(res), indent=1))
