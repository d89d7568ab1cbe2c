"""Solver certification on embedded instances: every method, native vs cvxpy, side by side.

For each instance (a seeded log-linear model sampled at n tuples, with and without theta_ref, an
active and an inactive parameter ball) and each problem (DPO, KLDPO, WDPO continuous W1 with
kappa = inf and finite kappa, WDPO finite-support W2, and the convex robust-family members chi2dpo,
cvardpo, groupdpo, rdpo, cdpo, below and above their collapse thresholds where they have one), both
solvers are run and the table records the certified gaps, the objective and theta disagreement, and
the wall times. (dr_dpo is not convex: it has no cvxpy path and no certificate, so it is not here.)
Continuous W1 with finite kappa is solved natively by the trust-region method of
docs/theory_wasserstein.md section 8; a native answer that needed the cvxpy fallback is counted in
the summary (``native_fallbacks``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..model import make_model
from ..solvers import solve

def sign_groups(data):
    """groupdpo's groups on the embedded instances: the quadrant of ``(x_0, x_1)`` (up to 4 groups)."""
    return (data.x[:, 0] > 0).astype(int) + 2 * (data.x[:, 1] > 0).astype(int)


#: (name, solve kwargs); a callable value is called with the sampled data (groupdpo's groups)
PROBLEMS = [
    ("dpo", dict(method="dpo")),
    ("kldpo rho=0.05", dict(method="kldpo", rho=0.05)),
    ("kldpo rho=0.5", dict(method="kldpo", rho=0.5)),
    ("wdpo W1 eps=0.05 kappa=inf", dict(method="wdpo", eps=0.05, kappa=math.inf, p=1)),
    ("wdpo W1 eps=0.05 kappa=1", dict(method="wdpo", eps=0.05, kappa=1.0, p=1)),
    ("wdpo W1 eps=0.02 kappa=0.3", dict(method="wdpo", eps=0.02, kappa=0.3, p=1)),
    ("wdpo W2 eps=0.1 finite", dict(method="wdpo", eps=0.1, kappa=math.inf, p=2)),
    ("chi2dpo rho=0.01", dict(method="chi2dpo", rho=0.01)),
    ("chi2dpo rho=0.3 (collapsed)", dict(method="chi2dpo", rho=0.3)),
    ("cvardpo alpha=0.97", dict(method="cvardpo", alpha=0.97)),
    ("cvardpo alpha=0.5 (collapsed)", dict(method="cvardpo", alpha=0.5)),
    ("groupdpo quadrants of (x0, x1)", dict(method="groupdpo", groups=sign_groups)),
    ("rdpo eps=0.1", dict(method="rdpo", eps=0.1)),
    ("cdpo eps=0.1", dict(method="cdpo", eps=0.1)),
]

#: (name, model kwargs, n, ball radius B used by the solvers)
INSTANCES = [
    ("d4 ref0 inactive", dict(n_prompts=6, n_answers=4, d=4, seed=0), 500, 3.0),
    ("d4 ref!=0 inactive", dict(n_prompts=6, n_answers=4, d=4, seed=1, theta_ref=[0.2, -0.1, 0.0, 0.1]), 500, 3.0),
    ("d3 active ball", dict(n_prompts=5, n_answers=3, d=3, seed=2, theta_star_norm=1.5), 400, 0.25),
]


def run_solver_check(beta: float = 1.0, progress: bool = True) -> pd.DataFrame:
    """Run every problem on every instance with both solvers; one row per (instance, problem)."""
    from tqdm import tqdm

    rows = []
    cells = [(i, p) for i in INSTANCES for p in PROBLEMS]
    for (iname, mkw, n, B), (pname, kw) in tqdm(cells, desc="solver-check", disable=not progress):
        model = make_model(beta=beta, radius=max(B, 2.0), **mkw)
        data = model.nominal().sample(n, seed=0)
        kw = {k: (v(data) if callable(v) else v) for k, v in kw.items()}
        method = kw.pop("method")
        nat = solve(method, data, beta, B, solver="native", **kw)
        cvx = solve(method, data, beta, B, solver="cvxpy", **kw)
        rows.append(dict(
            instance=iname, problem=pname, n=n, B=B,
            native_solver=nat.solver, native_status=nat.status, native_gap=nat.duality_gap, native_s=nat.seconds,
            cvxpy_solver=cvx.solver, cvxpy_status=cvx.status, cvxpy_gap=cvx.duality_gap, cvxpy_s=cvx.seconds,
            obj_rel_diff=abs(nat.objective - cvx.objective) / max(abs(nat.objective), 1e-300),
            theta_max_diff=float(np.max(np.abs(nat.theta - cvx.theta))),
            collapsed=bool(nat.collapsed), ball_active=bool(np.linalg.norm(nat.theta) > B * (1 - 1e-8)),
        ))
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> dict:
    """Headline numbers: how many runs were certified, the worst gap and disagreement."""
    statuses = pd.concat([df.native_status, df.cvxpy_status])
    return {
        "runs": int(2 * len(df)),
        "certified": int((statuses == "optimal").sum()),
        "max_gap": float(max(df.native_gap.max(), df.cvxpy_gap.max())),
        "max_obj_rel_diff": float(df.obj_rel_diff.max()),
        "max_theta_diff": float(df.theta_max_diff.max()),
        "native_speedup_median": float((df.cvxpy_s / df.native_s).median()),
        "native_fallbacks": int(df.native_solver.str.startswith("fallback").sum()),
    }
