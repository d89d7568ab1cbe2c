"""``drdpo gradients``: exact vs approximate robust gradients on the log-linear model, and calibration.

Contract: ``drdpo gradients [--quick] [--json] [--out DIR] [--figures DIR] [--jobs N]`` runs the
study of :mod:`drdpo_theory.experiments.gradients` (tables to ``results/gradients/``, figures to
``figures/``; with ``--quick``: tables to ``results/gradients_quick/``, figures to ``OUT/figures/``
with ``--out``, else ``figures/quick/``, never over the committed full-run figures); with ``--json`` the last stdout line is one JSON object with ``cos_at_lam_star``,
``first_order_slope``, ``sgd_endpoint_error`` (per estimator) and the other headline numbers.
``drdpo gradients --calibrate --data FILE.npz --beta BETA --radius B [--rho RHO] [--eps EPS]
[--space {z,x}] [--theta T1,T2,...] [--json]`` prints the calibration of tau / rho0 and the
collapse radii instead (:func:`drdpo_theory.calibration.calibrate`).
``drdpo gradients --family [--quick] [--json] [--out DIR] [--figures DIR] [--jobs N]`` runs the robust
family's tables instead (``family_batch``: each member's exact gradient against its mini-batch
version; ``family_sgd``: SGD with that version against the exact optimum) to
``results/gradients_family[_quick]/``, figure ``gradients_family.png``.
"""

from __future__ import annotations

import time

from ._args import n_jobs as _n_jobs, number as _float
from ._args import study_outputs as _study_outputs
from ..cli import EXIT_OK, CLIError, emit_summary


def register(sub) -> None:
    p = sub.add_parser(
        "gradients",
        help="exact vs approximate KLDPO/WDPO gradients (study), or --calibrate tau/rho0 for a data file",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small grid (< 3 minutes on 2 cores)")
    size.add_argument("--full", action="store_true", help="the full grid (the default; accepted for `drdpo reproduce --full`)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line (last line of stdout)")
    p.add_argument("--out", default=None,
                   help="directory of the result CSVs (default results/gradients, results/gradients_quick with --quick)")
    p.add_argument("--figures", default=None,
                   help="directory of the figures (default figures; with --quick OUT/figures if --out is given, "
                        "else figures/quick; '' = none)")
    p.add_argument("--n-jobs", "--jobs", dest="jobs", type=int, default=1,
                   help="joblib processes (default 1; -1: all cores; capped at the CPU count)")
    p.add_argument("--family", action="store_true",
                   help="the robust family's tables instead (chi2dpo, cvardpo, groupdpo, rdpo, cdpo, dr_dpo: exact "
                        "gradient vs its mini-batch version, and SGD end points); default out results/gradients_family")
    g = p.add_argument_group("calibration (with --calibrate)")
    g.add_argument("--calibrate", action="store_true", help="calibrate tau and rho0 on --data instead of the study")
    g.add_argument("--data", metavar="FILE.npz", help="data: x (n,d), y (n,), [theta_ref (d,)], [weights (n,)]")
    g.add_argument("--beta", type=_float, help="DPO temperature beta > 0")
    g.add_argument("--radius", type=_float, metavar="B", help="parameter ball ||theta|| <= B")
    g.add_argument("--rho", type=_float, help="KL radius: report tau = lam*(rho) at theta")
    g.add_argument("--eps", type=_float, help="W2 radius in --space: report rho0 (gradient and value rules)")
    g.add_argument("--space", choices=["z", "x"], default="z",
                   help="feature space of eps/rho0: z = both answers' features (authors, default), x = phi1 - phi2")
    g.add_argument("--theta", help="comma-separated theta at which to calibrate (default: the DPO solution)")
    p.set_defaults(func=run)


def _calibrate(args) -> int:
    import numpy as np

    from ..calibration import calibrate
    from ..data import DataError, load_npz

    missing = [f"--{k}" for k in ("data", "beta", "radius") if getattr(args, k) is None]
    if missing:
        raise CLIError(f"--calibrate needs {' '.join(missing)}")
    try:
        data = load_npz(args.data)
        theta = None
        if args.theta:
            theta = np.array([float(t) for t in args.theta.split(",")])
            if theta.shape != (data.d,):
                raise ValueError(f"--theta has {theta.size} entries but the data have d = {data.d}")
        out = calibrate(data, args.beta, args.radius, rho=args.rho, eps=args.eps, theta=theta, space=args.space)
    except (DataError, ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None
    emit_summary(out, args.json, width=14)
    return EXIT_OK


def run(args) -> int:
    if args.calibrate:
        return _calibrate(args)
    from ..experiments.gradients import FAMILY_TABLES, TABLES, GradientStudyConfig, run_study, summarize

    n_jobs = _n_jobs(args.jobs)
    family = bool(getattr(args, "family", False))
    names = tuple(FAMILY_TABLES if family else TABLES)
    default_out = "results/gradients" + ("_family" if family else "") + ("_quick" if args.quick else "")
    out, figures = _study_outputs(args, "gradients-family" if family else "gradients", default_out,
                                  tables={f"{name}.csv": ("instance",) for name in names})
    cfg = GradientStudyConfig.quick() if args.quick else GradientStudyConfig()
    t0 = time.perf_counter()
    res = run_study(cfg, out_dir=out or None, n_jobs=n_jobs, tables=names, progress=not args.json)
    summary = summarize(res)
    if figures:
        from ..plots_approx import plot_all_gradients

        summary["figures"] = [str(p) for p in plot_all_gradients(res, figures)]
    summary["seconds"] = time.perf_counter() - t0
    summary["quick"] = bool(args.quick)
    summary["config_key"] = cfg.key(family=family)
    if family:  # the stated parameters (experiments.gradients.family_params)
        summary["stated"] = {"radius_frac": cfg.sgd_frac, "family_eps": cfg.family_eps, "beta_prime": cfg.beta_prime,
                             "group_step": cfg.group_step,
                             "instances": len(cfg.instances), "groups": "prompts"}
    if out:
        from ..io import write_json

        write_json(f"{out}/summary.json", summary)  # atomic; what `drdpo reproduce --collect` commits
    emit_summary(summary, args.json)
    return EXIT_OK
