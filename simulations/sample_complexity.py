"""Sample-complexity study: the grid, then the package (no math here).

    python simulations/sample_complexity.py [--quick] [--n-jobs K]

is ``drdpo sample-complexity`` with the grid written out: results in results/sample_complexity/,
figures in figures/ (``--quick``: results/sample_complexity_quick/ and figures/quick/, never the
committed full-run figures). Edit the grid below to run another study (a new --out folder per grid).
"""

import argparse

from drdpo_theory.experiments.sample_complexity import Instance, StudyGrid, quick_grid, run_study
from drdpo_theory.experiments.sweep import resolve_n_jobs
from drdpo_theory.plots import make_all

GRID = StudyGrid(
    instance=Instance(n_prompts=4, n_answers=4, d=2, beta=2.0, radius=2.0, theta_star_norm=1.0, seed=0),
    ns=(100, 215, 464, 1000, 2154, 4642, 10000, 21544, 46416, 100000),
    seeds=50,
    radii={"dpo": [0.0], "kldpo": [0.01, 0.04, 0.4], "wdpo-w1": [0.02, 0.08, 0.4], "wdpo-w2": [0.05, 0.15, 0.3]},
    main_radius={"dpo": 0.0, "kldpo": 0.04, "wdpo-w1": 0.08, "wdpo-w2": 0.15},
    delta=0.1,
    betas=(1.0, 2.0, 4.0),
    beta_ns=(100, 1000, 10000, 100000),
    beta_seeds=20,
    beta_methods={"dpo": 0.0, "kldpo": 0.3, "wdpo-w1": 0.5},  # fractions of the collapse threshold
)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-jobs", type=int, default=2)
    args = ap.parse_args()
    grid = quick_grid() if args.quick else GRID
    out = "results/sample_complexity_quick" if args.quick else "results/sample_complexity"
    n_jobs, notice = resolve_n_jobs(args.n_jobs)  # >= 1 or -1, capped at the CPU count
    if notice:
        print(f"note: {notice}")
    result = run_study(grid, out, n_jobs=n_jobs)
    for path in make_all(result, "figures/quick" if args.quick else "figures"):
        print(path)
    print(result.fits.to_string(index=False))
