"""``drdpo solve``: one exact DPO / KLDPO / WDPO / robust-family problem from an ``.npz`` file.

Contract: ``drdpo solve --method {dpo,kldpo,wdpo,chi2dpo,cvardpo,groupdpo,rdpo,cdpo,dr_dpo} --data FILE.npz
--beta BETA --radius B [--rho RHO] [--eps EPS --kappa KAPPA --p P] [--alpha ALPHA] [--beta-prime BP]
[--solver {native,cvxpy}] --json``. With ``--json``
the last stdout line is one JSON object with ``theta``, ``objective``, ``duality_gap``, ``status``,
``solver``, ``seconds``, ``worst_case`` (the worst-case distribution as arrays) and extras. Exit 2 on
bad input (one line on stderr), 3 when the answer is not certified. ``--kappa``/``--p`` (wdpo),
``--rho`` (kldpo, chi2dpo), ``--eps`` (wdpo, rdpo, cdpo), ``--alpha`` (cvardpo) and ``--beta-prime``
(dr_dpo) are refused for other methods rather than ignored. groupdpo reads an integer ``groups`` (n,)
array from the same ``.npz``. dr_dpo is not convex: its answer is a local solution (status ``local``,
exit 0 when first-order stationary; docs/theory_family.md).
"""

from __future__ import annotations

import json
import math
import warnings

from ._args import number as _float
from ..cli import EXIT_OK, EXIT_SOLVER, CLIError


def register(sub) -> None:
    p = sub.add_parser(
        "solve",
        help="solve one exact DPO/KLDPO/WDPO problem on the log-linear class",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1] + " The data file holds x (n,d) = "
        "phi(s,a1)-phi(s,a2), y (n,) in {0,1}, optional theta_ref (d,) and weights (n,).",
    )
    p.add_argument("--method", required=True,
                   choices=["dpo", "kldpo", "wdpo", "chi2dpo", "cvardpo", "groupdpo", "rdpo", "cdpo", "dr_dpo"],
                   help="objective to minimise (the robust family: docs/theory_family.md)")
    p.add_argument("--data", required=True, metavar="FILE.npz", help="data: x (n,d), y (n,), [theta_ref (d,)], [weights (n,)]")
    p.add_argument("--beta", required=True, type=_float, help="DPO temperature beta > 0")
    p.add_argument("--radius", required=True, type=_float, metavar="B", help="parameter ball ||theta|| <= B")
    p.add_argument("--rho", type=_float, help="KL radius (kldpo) or chi2 radius (chi2dpo), >= 0")
    p.add_argument("--eps", type=_float, help="Wasserstein radius (wdpo); flip rate in [0, 1/2) (rdpo); "
                                              "label smoothing in [0, 1/2] (cdpo)")
    p.add_argument("--alpha", type=_float, help="CVaR level in (0, 1] (cvardpo; 1 = DPO)")
    p.add_argument("--beta-prime", dest="beta_prime", type=_float, help="Dr.DPO temperature beta' > 0 (dr_dpo)")
    p.add_argument("--kappa", type=_float, default=None,
                   help="label-flip transport cost (wdpo; 'inf' = labels never flip; default inf)")
    p.add_argument("--p", type=int, default=None, choices=[1, 2],
                   help="Wasserstein order: 1 = continuous support (default), 2 = finite support "
                        "(the data's distinct tuples, plus label flips when kappa is finite)")
    p.add_argument("--solver", choices=["native", "cvxpy"], default="native",
                   help="native (default; cvxpy where no native path exists) or cvxpy")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line (last line of stdout)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data import DataError, load_npz
    from ..solvers import SolverError, solve

    _check_method_flags(args)
    for flag in ("kappa", "p"):  # silently ignoring them would solve another problem than asked
        if args.method != "wdpo" and getattr(args, flag) is not None:
            raise CLIError(f"--{flag} applies to wdpo only (method is {args.method}); drop it or use --method wdpo")
    kappa = math.inf if args.kappa is None else args.kappa
    p = 1 if args.p is None else args.p
    try:
        # numpy/cvxpy warnings would add lines to stderr: they are kept and reported with the
        # result instead (the duality gap, not the absence of warnings, certifies the answer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = load_npz(args.data)
            groups = _load_groups(args.data, data.n) if args.method == "groupdpo" else None
            result = solve(args.method, data, args.beta, args.radius, rho=args.rho, eps=args.eps,
                           kappa=kappa, p=p, alpha=args.alpha, groups=groups, beta_prime=args.beta_prime,
                           solver=args.solver)
    except (DataError, ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None
    except SolverError as exc:
        if args.json:
            print(json.dumps({"theta": None, "objective": None, "duality_gap": None, "status": "failed",
                              "solver": args.solver, "seconds": None, "message": str(exc)}))
        else:
            print(f"solver failed: {exc}")
        return EXIT_SOLVER
    notes = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    if args.json:
        out = result.to_json_dict()
        for key in ("group_weights", "group_losses"):  # groupdpo: one entry per group (sorted labels)
            if isinstance(result.info.get(key), list):
                out[key] = result.info[key]
        if notes:
            out["warnings"] = notes
        print(json.dumps(out))
    else:
        print(f"method      {result.method}")
        print(f"theta       {[round(float(t), 8) for t in result.theta]}")
        print(f"objective   {result.objective:.12g}")
        if result.status == "local":  # dr_dpo: not convex, no certificate
            print(f"duality gap none (not convex: a local solution, stationarity "
                  f"{result.info.get('stationarity', float('nan')):.3g})")
        else:
            print(f"duality gap {result.duality_gap:.3g}")
        if result.lam is not None:
            print(f"lam         {result.lam:.8g}")
        if result.collapsed:
            print("collapsed   yes (radius above the collapse threshold: theta = theta_ref)")
        wc = result.worst_case
        if wc is not None:
            line = f"{wc.size} atom(s) with positive mass"
            if not wc.attained:
                line += (f"; supremum not attained: budget {wc.far_budget:.6g} sent to infinity by a vanishing "
                         f"mass (mass at infinity 0), adding {wc.far_gain:.6g}")
            print(f"worst case  {line} (--json lists the points)")
        for note in notes:
            print(f"warning     {' '.join(note.split())}")
        print(f"status      {result.status}  ({result.solver}, {result.seconds:.3f} s)")
    local_ok = result.method == "dr_dpo" and result.status == "local"  # non-convex: a stationary point
    return EXIT_OK if result.optimal or local_ok else EXIT_SOLVER


#: which methods take each radius flag, and what it is for them
_FLAG_METHODS = {
    "rho": (("kldpo", "chi2dpo"), "RHO (the KL / chi2 radius, >= 0)"),
    "eps": (("wdpo", "rdpo", "cdpo"), "EPS (the Wasserstein radius / flip rate / label smoothing)"),
    "alpha": (("cvardpo",), "ALPHA (the CVaR level, in (0, 1])"),
    "beta_prime": (("dr_dpo",), "BP (the Dr.DPO temperature, > 0)"),
}


def _check_method_flags(args) -> None:
    """Each method's radius flag is required, and refused for the methods it does not apply to."""
    for flag, (methods, what) in _FLAG_METHODS.items():
        opt = "--" + flag.replace("_", "-")
        value = getattr(args, flag, None)
        if args.method in methods and value is None:
            raise CLIError(f"--method {args.method} needs {opt} {what}")
        if args.method not in methods and value is not None:
            raise CLIError(f"{opt} applies to {'/'.join(methods)} only (method is {args.method}); drop it")


def _load_groups(path, n: int):
    """The integer ``groups`` (n,) array of a groupdpo ``.npz`` (one group label per pair)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as f:
        if "groups" not in f.files:
            raise CLIError(f"{path}: --method groupdpo needs an integer 'groups' array of shape ({n},) "
                           f"in the .npz (one group label per pair); found {sorted(f.files)}")
        g = f["groups"]
    if g.dtype.kind not in "biu":
        raise CLIError(f"{path}: 'groups' must be an integer array, got dtype {g.dtype}")
    if g.shape != (n,):
        raise CLIError(f"{path}: 'groups' must have shape ({n},) like y, got {g.shape}")
    return g
