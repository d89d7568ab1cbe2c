"""Shift map: grid -> drdpo_theory.experiments.shift_map -> tables + figures.

Usage: python simulations/shift_map.py [--quick] [--family] [--jobs N]
Writes results/shift_map/ (cells cached in results/shift_map/cells/, so a rerun resumes):
shift_map_summary.csv, shift_map_best.csv, shift_map_mechanism.csv, shift_map.json; figures
figures/shift_map{,_reg_reward,_loss,_mechanism}.{png,pdf} (``--quick``: results/shift_map_quick/ and
figures/quick/, never the committed full-run figures). ``--family``: the robust family added,
results/shift_map_family[_quick]/ and figures shift_map_family*. Same as ``drdpo shift-map [--family]``.
"""

import argparse
import json

from drdpo_theory.experiments.shift_map import (ShiftMapConfig, best_settings, mechanism_check, run_shift_map,
                                                summarize_regret, summarize_shift_map, with_family)
from drdpo_theory.experiments.sweep import resolve_n_jobs
from drdpo_theory.io import claim_output_dir, write_csv, write_json
from drdpo_theory.plots_shift_map import plot_mechanism, plot_regret_map

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--family", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    cfg = ShiftMapConfig.quick() if a.quick else ShiftMapConfig()
    if a.family:
        cfg = with_family(cfg)
    stem = "shift_map_family" if a.family else "shift_map"
    out = f"results/{stem}" + ("_quick" if a.quick else "")
    figs = "figures/quick" if a.quick else "figures"
    n_jobs, notice = resolve_n_jobs(a.jobs)  # >= 1 or -1, capped at the CPU count
    if notice:
        print(f"note: {notice}")
    claim_output_dir(out, "shift-map")
    res = run_shift_map(cfg, out_dir=out, n_jobs=n_jobs)
    summ = summarize_regret(res, cfg)
    mech = mechanism_check(cfg, summ)
    write_csv(summ, f"{out}/shift_map_summary.csv")
    write_csv(best_settings(summ), f"{out}/shift_map_best.csv")
    write_csv(mech, f"{out}/shift_map_mechanism.csv")
    plot_regret_map(summ, figs, name=stem, metric="reward")
    plot_regret_map(summ, figs, name=f"{stem}_reg_reward", metric="reg_reward")
    plot_regret_map(summ, figs, name=f"{stem}_loss", metric="dpo_loss")
    plot_mechanism(mech, figs, name=f"{stem}_mechanism")
    summary = summarize_shift_map(cfg, summ, mech)
    write_json(f"{out}/shift_map.json", summary)
    print(json.dumps({k: summary[k] for k in ("wins", "mechanism")}, indent=1))
