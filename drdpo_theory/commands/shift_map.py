"""``drdpo shift-map``: where robust DPO beats DPO under preference shift, and why (log-linear).

Contract: ``drdpo shift-map [--quick] [--json] [--out DIR] [--figures DIR] [--n-jobs N]`` runs
:mod:`drdpo_theory.experiments.shift_map` over angle, norm ratio, n, radius and shift type (label
mixture, reward mixture, prompt shift, label noise, adversarial test inside the KL ball), resuming
from the cells in ``OUT/cells/``. Tables to ``results/shift_map/`` (``--quick``:
``results/shift_map_quick/``): ``shift_map_summary.csv`` (regret robust minus DPO with bootstrap
intervals per setting), ``shift_map_best.csv`` (best robust setting per cell),
``shift_map_mechanism.csv`` (first-order predictions vs the measured regret), ``shift_map.json``
and ``shift_map_compact.json`` (regions of the reward only: the committed summary). Figures ``shift_map.png`` (reward regret heat maps, winning cells framed),
``shift_map_reg_reward.png``, ``shift_map_loss.png`` and ``shift_map_mechanism.png`` in ``figures/`` (``--quick``: ``OUT/figures/`` with ``--out``, else
``figures/quick/``, never over the committed figures). With ``--json`` the last stdout line is one
JSON object whose ``regions`` holds, per shift type and metric, the cells where robust > DPO with
its interval (possibly empty). The derivation is in docs/shift_map.md.

``--family`` (opt-in) adds the robust family (chi2dpo, cvardpo, groupdpo, rdpo, cdpo, dr_dpo; settings
per radius fraction in :data:`~drdpo_theory.experiments.shift_map.FAMILY_METHODS`) to the methods and
their first-order directions to the mechanism. Its tables go to ``results/shift_map_family/``
(``--quick``: ``results/shift_map_family_quick/``), its figures are named ``shift_map_family*`` (in
``figures/``, ``--quick``: ``figures/quick/``), so it never touches the plain map's outputs; the summary
gains ``family`` (settings, wins per method) and ``mechanism.family`` (agreement per member).
"""

from __future__ import annotations

import json
import time

from ._args import n_jobs as _n_jobs
from ._args import study_outputs as _study_outputs
from ..cli import EXIT_OK

#: tables of the study and the columns that identify them (a foreign file of that name is refused)
TABLES = {
    "shift_map_summary.csv": ("shift", "angle", "ratio", "n", "method", "frac", "alpha", "delta_reward"),
    "shift_map_best.csv": ("shift", "angle", "ratio", "n", "alpha", "method", "wins"),
    "shift_map_mechanism.csv": ("shift", "angle", "ratio", "method", "alpha", "slope_reward"),
}


def register(sub) -> None:
    p = sub.add_parser("shift-map", help="map of robust-minus-DPO regret over preference shifts (log-linear)",
                       description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke test: 2 angles, 1 ratio, n = 20 and inf (seconds)")
    size.add_argument("--full", action="store_true", help="the full grid (the default; 420 cells, about 30 min with --n-jobs 2 on 2 shared cores; accepted for `drdpo reproduce --full`)")
    p.add_argument("--family", action="store_true",
                   help="add the robust family (chi2dpo, cvardpo, groupdpo, rdpo, cdpo, dr_dpo) to the map; "
                        "outputs in results/shift_map_family[_quick] and figures shift_map_family*")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line (last line of stdout)")
    p.add_argument("--out", default=None,
                   help="directory of the tables and cached cells (default results/shift_map[_quick])")
    p.add_argument("--figures", default=None,
                   help="directory of the figures (default figures; with --quick OUT/figures if --out is given, "
                        "else figures/quick; '' = none)")
    p.add_argument("--n-jobs", "--jobs", dest="jobs", type=int, default=1,
                   help="joblib processes over cells (default 1; -1: all cores; capped at the CPU count); "
                        "results do not depend on it")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiments.shift_map import (ShiftMapConfig, best_settings, compact_summary, mechanism_check,
                                         run_shift_map, summarize_regret, summarize_shift_map, with_family)
    from ..io import write_csv, write_json

    family = bool(getattr(args, "family", False))
    cfg = ShiftMapConfig.quick(family=family) if args.quick else ShiftMapConfig()
    if family and not args.quick:
        cfg = with_family(cfg)
    n_jobs = _n_jobs(args.jobs)
    stem = "shift_map_family" if family else "shift_map"
    default_out = f"results/{stem}_quick" if args.quick else f"results/{stem}"
    out, figures = _study_outputs(args, "shift-map", default_out, tables=TABLES)
    t0 = time.perf_counter()
    res = run_shift_map(cfg, out_dir=out or None, n_jobs=n_jobs, progress=not args.json)
    summ = summarize_regret(res, cfg)
    best = best_settings(summ, "reward")
    mech = mechanism_check(cfg, summ)
    summary = summarize_shift_map(cfg, summ, mech)
    if family:  # dr_dpo is nonconvex: its solver certifies a local minimum ("local"), never "optimal"
        local = (res.method == "dr_dpo") & (res.status == "local")
        summary["fits_not_optimal"] = int(((res.status != "optimal") & ~local).sum() // max(1, len(cfg.alphas)))
        summary["fits_local"] = int(local.sum() // max(1, len(cfg.alphas)))
    else:
        summary["fits_not_optimal"] = int((res.status != "optimal").sum() // max(1, len(cfg.alphas)))
    if out:
        write_csv(summ, f"{out}/shift_map_summary.csv")
        write_csv(best, f"{out}/shift_map_best.csv")
        write_csv(mech, f"{out}/shift_map_mechanism.csv")
    if figures:
        from ..plots_shift_map import plot_mechanism, plot_regret_map

        paths = plot_regret_map(summ, figures, name=stem, metric="reward")
        paths += plot_regret_map(summ, figures, name=f"{stem}_reg_reward", metric="reg_reward")
        paths += plot_regret_map(summ, figures, name=f"{stem}_loss", metric="dpo_loss")
        paths += plot_mechanism(mech, figures, name=f"{stem}_mechanism")
        summary["figures"] = [str(p) for p in paths]
    summary["seconds"] = time.perf_counter() - t0
    summary["quick"] = bool(args.quick)
    if out:
        write_json(f"{out}/shift_map.json", summary)
        write_json(f"{out}/shift_map_compact.json", compact_summary(summary))  # reward regions only
    if args.json:
        print(json.dumps(summary))
    else:
        for shift, d in summary["regions"].items():
            print(f"{shift:12s} " + "  ".join(f"{m}: {len(v)} cells" for m, v in d.items()))
        mech_s = summary.get("mechanism", {})
        print(f"first-order sign agreement, reward, smallest radius: population "
              f"{mech_s.get('population_sign_agreement')} ({mech_s.get('population_cells')} cells); finite n, "
              f"significant regrets {mech_s.get('finite_n_sign_agreement_significant')} "
              f"({mech_s.get('finite_n_significant_cells')} cells)")
        if family:
            for shift, d in summary["family"]["wins_by_method"]["reward"].items():
                print(f"{shift:12s} reward wins per method: " + ", ".join(f"{m} {k}" for m, k in d.items()))
            for m, a in mech_s.get("family", {}).items():
                print(f"  {m}: population sign agreement {a['population_sign_agreement']} "
                      f"({a['population_cells']} cells); finite n, significant "
                      f"{a['finite_n_sign_agreement_significant']} ({a['finite_n_significant_cells']} cells)")
            for m, why in mech_s.get("family_excluded", {}).items():
                print(f"  {m}: no first-order direction ({why})")
        print(f"seconds {summary['seconds']:.1f}")
    return EXIT_OK
