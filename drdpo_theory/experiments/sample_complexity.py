"""Sample-complexity study: empirical robust optima against exact population optima and the bounds.

For an instance (a finite log-linear model, :func:`drdpo_theory.model.make_model`) and each method

* ``dpo``      DPO (ERM), the baseline;
* ``kldpo``    KLDPO with KL radius ``rho``;
* ``wdpo-w1``  WDPO, continuous support, ``p = 1``, ``kappa = inf`` (labels never flip);
* ``wdpo-w2``  WDPO, ``p = 2``, finite support = the model's tuples (``FiniteSupport.from_nominal``),
  ``kappa = inf``,

the population optimum ``theta_pop`` is solved exactly on P° (``nominal().as_data()``: weighted
solvers), and each cell ``(method, radius, n, seed)`` draws ``n`` i.i.d. tuples from P° as a
multinomial histogram on the support (the cost of a solve does not grow with ``n``), solves the
empirical problem exactly and records ``||theta_n - theta_pop||`` and the excess robust loss
``L(theta_n; P°) - L(theta_pop; P°)``. The same ``(n, seed)`` gives the same sample for every method
and radius (common random numbers). The bound curves come from :mod:`drdpo_theory.bounds` with
constants computed from the instance (docs/theory_bounds.md).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from .. import bounds as bd
from ..data import PreferenceData
from ..io import write_csv, write_parquet
from ..losses import dpo_curvature, dpo_grad, dpo_loss
from ..model import LogLinearModel, NominalDistribution, make_model

__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "Instance",
    "StudyGrid",
    "quick_grid",
    "default_grid",
    "tiny_grid",
    "empirical_data",
    "solve_method",
    "robust_objective",
    "collapse_threshold",
    "population_solution",
    "run_cell",
    "make_cells",
    "kl_profile",
    "bound_curve",
    "summarize",
    "fit_slope",
    "analyze",
    "run_study",
    "KEY",
]

METHODS = ("dpo", "kldpo", "wdpo-w1", "wdpo-w2")
METHOD_LABELS = {
    "dpo": "DPO",
    "kldpo": "KLDPO",
    "wdpo-w1": "WDPO (W1, continuous, κ=∞)",
    "wdpo-w2": "WDPO (W2, finite support)",
}
RADIUS_NAME = {"dpo": "-", "kldpo": "rho", "wdpo-w1": "eps", "wdpo-w2": "eps"}
#: the fields that identify a cell of the sweep
KEY = ("study", "beta", "method", "radius", "n", "seed")


# ----------------------------------------------------------------------------------------------
# Instance and grids
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """A finite log-linear preference model (arguments of :func:`make_model`)."""

    n_prompts: int = 4
    n_answers: int = 4
    d: int = 2
    beta: float = 2.0
    radius: float = 2.0
    theta_star_norm: float = 1.0
    seed: int = 0

    def with_beta(self, beta: float) -> "Instance":
        return Instance(self.n_prompts, self.n_answers, self.d, float(beta), self.radius, self.theta_star_norm,
                        self.seed)

    def model(self) -> LogLinearModel:
        return _model(self)

    def nominal(self) -> NominalDistribution:
        return _model(self).nominal()


@lru_cache(maxsize=64)
def _model(inst: Instance) -> LogLinearModel:
    return make_model(n_prompts=inst.n_prompts, n_answers=inst.n_answers, d=inst.d, beta=inst.beta,
                      radius=inst.radius, theta_star_norm=inst.theta_star_norm, seed=inst.seed)


@lru_cache(maxsize=64)
def _support(inst: Instance):
    from ..solvers.wasserstein import FiniteSupport

    return FiniteSupport.from_nominal(inst.nominal())


@dataclass(frozen=True)
class StudyGrid:
    """What the study runs.

    Attributes
    ----------
    instance : the model (its ``beta`` is the main study's).
    ns : sample sizes.
    seeds : number of seeds per cell.
    radii : method -> radii (``dpo``: ``[0.0]``).
    main_radius : method -> the radius of the headline figure and the JSON summary.
    delta : the bound's failure probability; the empirical ``(1 - delta)``-quantile is compared with it.
    betas : the beta study's temperatures ( ``()``: no beta study).
    beta_ns, beta_seeds : its sample sizes and seeds.
    beta_methods : method -> radius as a fraction of the method's collapse threshold at that beta
        (``wdpo-w2``: an absolute ``eps``).
    n_boot : bootstrap resamples for the slope CI.
    """

    instance: Instance
    ns: tuple[int, ...]
    seeds: int
    radii: dict
    main_radius: dict
    delta: float = 0.1
    betas: tuple[float, ...] = ()
    beta_ns: tuple[int, ...] = ()
    beta_seeds: int = 0
    beta_methods: dict = field(default_factory=dict)
    n_boot: int = 1000


def _log_ns(lo: float, hi: float, k: int) -> tuple[int, ...]:
    return tuple(int(round(v)) for v in np.geomspace(lo, hi, k))


def default_grid() -> StudyGrid:
    """n = 10^2 .. 10^5 (10 values, log-spaced), 50 seeds, three radii per robust method (one above
    the collapse threshold for KLDPO and WDPO-W1), beta in {1, 2, 4}."""
    inst = Instance()
    return StudyGrid(
        instance=inst,
        ns=_log_ns(1e2, 1e5, 10),
        seeds=50,
        radii={"dpo": [0.0], "kldpo": [0.01, 0.04, 0.4], "wdpo-w1": [0.02, 0.08, 0.4],
               "wdpo-w2": [0.05, 0.15, 0.3]},
        main_radius={"dpo": 0.0, "kldpo": 0.04, "wdpo-w1": 0.08, "wdpo-w2": 0.15},
        delta=0.1,
        betas=(1.0, 2.0, 4.0),
        beta_ns=_log_ns(1e2, 1e5, 4),
        beta_seeds=20,
        beta_methods={"dpo": 0.0, "kldpo": 0.3, "wdpo-w1": 0.5},
    )


def quick_grid() -> StudyGrid:
    """The ``--quick`` grid (``make reproduce``): 6 sample sizes, 12 seeds, the main radii plus one
    collapsed radius, a small beta study."""
    g = default_grid()
    return StudyGrid(
        instance=g.instance,
        ns=_log_ns(1e2, 1e5, 6),
        seeds=12,
        radii={"dpo": [0.0], "kldpo": [0.04, 0.4], "wdpo-w1": [0.08, 0.4], "wdpo-w2": [0.15]},
        main_radius=g.main_radius,
        delta=g.delta,
        betas=(1.0, 4.0),
        beta_ns=_log_ns(1e2, 1e4, 3),
        beta_seeds=8,
        beta_methods={"dpo": 0.0, "kldpo": 0.3},
        n_boot=400,
    )


def tiny_grid() -> StudyGrid:
    """A seconds-long grid for tests of the CLI contract."""
    g = default_grid()
    return StudyGrid(
        instance=g.instance,
        ns=(300, 3000, 30000),
        seeds=3,
        radii={"dpo": [0.0], "kldpo": [0.04], "wdpo-w1": [0.08], "wdpo-w2": [0.15]},
        main_radius=g.main_radius,
        delta=g.delta,
        n_boot=100,
    )


# ----------------------------------------------------------------------------------------------
# Solving one cell
# ----------------------------------------------------------------------------------------------


def empirical_data(inst: Instance, n: int, seed: int) -> PreferenceData:
    """``n`` i.i.d. tuples from P° as weights on the support (multinomial counts / n; zero counts dropped).

    Seeded by ``(seed, n, inst.seed)`` only: every method and radius sees the same sample.
    """
    nom = inst.nominal()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(n), int(inst.seed)]))
    counts = rng.multinomial(int(n), nom.p)
    keep = counts > 0
    return PreferenceData(nom.x[keep], nom.y[keep], counts[keep] / n, nom.theta_ref, source=f"sample(n={n}, seed={seed})")


def solve_method(method: str, data: PreferenceData, inst: Instance, radius: float):
    """Solve one problem of the study exactly (:func:`drdpo_theory.solvers.solve`)."""
    from ..solvers import solve

    if method == "dpo":
        return solve("dpo", data, inst.beta, inst.radius)
    if method == "kldpo":
        return solve("kldpo", data, inst.beta, inst.radius, rho=radius)
    if method == "wdpo-w1":
        return solve("wdpo", data, inst.beta, inst.radius, eps=radius, kappa=math.inf, p=1)
    if method == "wdpo-w2":
        return solve("wdpo", data, inst.beta, inst.radius, eps=radius, kappa=math.inf, p=2, support=_support(inst))
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def robust_objective(method: str, theta, data: PreferenceData, inst: Instance, radius: float) -> float:
    """``L(theta; P)`` of the method (exact)."""
    if method == "dpo":
        return float(data.weights @ dpo_loss(theta, data.x, data.y, inst.beta, data.theta_ref))
    if method == "kldpo":
        from ..solvers.kl import kldpo_objective

        return float(kldpo_objective(theta, data, inst.beta, radius))
    from ..solvers.wasserstein import wdpo_objective

    if method == "wdpo-w1":
        return float(wdpo_objective(theta, data, inst.beta, radius, math.inf, 1, None))
    if method == "wdpo-w2":
        return float(wdpo_objective(theta, data, inst.beta, radius, math.inf, 2, _support(inst)))
    raise ValueError(f"unknown method {method!r}")


@lru_cache(maxsize=64)
def collapse_threshold(method: str, inst: Instance) -> float:
    """Radius above which ``theta_pop = theta_ref`` (``inf`` for DPO; ``nan`` where no formula exists)."""
    P = inst.nominal().as_data()
    if method == "kldpo":
        from ..solvers.kl import kl_collapse_threshold

        return float(kl_collapse_threshold(P, inst.radius))
    if method == "wdpo-w1":
        from ..solvers.wasserstein import w1_collapse_threshold

        return float(w1_collapse_threshold(P))
    if method == "dpo":
        return math.inf
    return math.nan


@lru_cache(maxsize=256)
def population_solution(inst: Instance, method: str, radius: float):
    """The exact population optimum on P° (weighted solver); cached per process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = solve_method(method, inst.nominal().as_data(), inst, radius)
    if res.status != "optimal":
        raise RuntimeError(f"population solve of {method} (radius {radius}) not certified: status {res.status}, "
                           f"gap {res.duality_gap:.3g}")
    return res


def _pop_collapsed(inst: Instance, method: str, radius: float) -> bool:
    res = population_solution(inst, method, radius)
    return bool(res.collapsed or np.linalg.norm(res.theta - inst.nominal().theta_ref) <= 1e-9)


def run_cell(cell: dict) -> dict:
    """One row of the sweep: solve the empirical problem of ``cell`` and compare with the population.

    ``cell`` holds the instance fields (``n_prompts, n_answers, d, beta, B, theta_star_norm,
    instance_seed``), ``study``, ``method``, ``radius``, ``n``, ``seed``.
    """
    inst = Instance(int(cell["n_prompts"]), int(cell["n_answers"]), int(cell["d"]), float(cell["beta"]),
                    float(cell["B"]), float(cell["theta_star_norm"]), int(cell["instance_seed"]))
    method, radius, n, seed = cell["method"], float(cell["radius"]), int(cell["n"]), int(cell["seed"])
    pop = population_solution(inst, method, radius)
    data = empirical_data(inst, n, seed)
    t0 = time.perf_counter()
    status, lam, collapsed, gap, err, obj_gap, solver = "failed", math.nan, False, math.nan, math.nan, math.nan, ""
    try:
        with warnings.catch_warnings():  # cvxpy's "solution may be inaccurate": the certificate decides
            warnings.simplefilter("ignore")
            res = solve_method(method, data, inst, radius)
        status, solver = res.status, res.solver
        lam = math.nan if res.lam is None else float(res.lam)
        collapsed, gap = bool(res.collapsed), float(res.duality_gap)
        err = float(np.linalg.norm(res.theta - pop.theta))
        obj_gap = robust_objective(method, res.theta, inst.nominal().as_data(), inst, radius) - float(pop.objective)
    except Exception as exc:  # a failed solve is a row with status "failed", not a lost sweep
        solver = f"{type(exc).__name__}: {exc}"[:200]
    seconds = time.perf_counter() - t0
    thr = collapse_threshold(method, inst)
    return {
        **{k: cell[k] for k in ("study", "n_prompts", "n_answers", "d", "beta", "B", "theta_star_norm", "instance_seed")},
        "method": method, "radius": radius, "n": n, "seed": seed,
        "error": err, "objective_gap": obj_gap, "lam": lam, "status": status, "duality_gap": gap,
        "collapsed": collapsed, "pop_collapsed": _pop_collapsed(inst, method, radius),
        "collapse_threshold": thr, "support_points": data.n, "solver": solver, "seconds": seconds,
    }


def make_cells(inst: Instance, study: str, method_radii: dict, ns, seeds: int) -> list[dict]:
    """The grid as a list of cell dicts (seed-major inside each ``(method, radius, n)``)."""
    base = {"study": study, "n_prompts": inst.n_prompts, "n_answers": inst.n_answers, "d": inst.d,
            "beta": inst.beta, "B": inst.radius, "theta_star_norm": inst.theta_star_norm,
            "instance_seed": inst.seed}
    cells = []
    for method, radii in method_radii.items():
        for r in radii:
            for n in ns:
                for s in range(seeds):
                    cells.append({**base, "method": method, "radius": float(r), "n": int(n), "seed": s})
    return cells


# ----------------------------------------------------------------------------------------------
# Bound curves for an instance
# ----------------------------------------------------------------------------------------------


def _kl_slice(inst: Instance, rho: float, lam: float, theta0):
    """Certified lower bound on ``phi(lam) = min_Theta lam rho + lam log E_P° e^{l/lam}`` and its minimiser."""
    from ..solvers._common import ball_fw_gap
    from ..solvers._newton import newton_ball

    nom = inst.nominal()
    x, y, p, tr, beta, B = nom.x, nom.y, nom.p, nom.theta_ref, inst.beta, inst.radius
    logp = np.log(p)

    def parts(theta):
        l = dpo_loss(theta, x, y, beta, tr)
        z = logp + l / lam
        zm = z.max()
        e = np.exp(z - zm)
        S = e.sum()
        return lam * rho + lam * (zm + math.log(S)), e / S

    def fun(theta):
        return parts(theta)[0]

    def grad_hess(theta):
        _, q = parts(theta)
        G = dpo_grad(theta, x, y, beta, tr)
        g = q @ G
        c = q * dpo_curvature(theta, x, y, beta, tr)
        H = (x * c[:, None]).T @ x + ((G * q[:, None]).T @ G - np.outer(g, g)) / lam
        return g, H

    res = newton_ball(fun, grad_hess, np.asarray(theta0, float), inst.d, B, max_iter=100, tol=1e-16)
    g, _ = grad_hess(res.v)
    return fun(res.v) - ball_fw_gap(g, res.v, B), res.v


@lru_cache(maxsize=64)
def kl_profile(inst: Instance, rho: float, n_table: int = 30) -> bd.KLProfile | None:
    """The population numbers of :func:`bounds.kldpo_excess_bound` (``None`` if ``lam_pop = 0``)."""
    pop = population_solution(inst, "kldpo", rho)
    nom = inst.nominal()
    if pop.lam is None or not pop.lam > 0 or pop.collapsed:
        return None
    lam_pop = float(pop.lam)
    c = bd.BoundConstants.instance(nom.x, nom.p, inst.beta, inst.radius, nom.theta_ref)
    lam_hi = c.tau / rho
    near = lam_pop * (1.0 - np.geomspace(0.5, 1e-4, 20))
    table = np.unique(np.concatenate([np.geomspace(0.05 * lam_pop, max(lam_hi, lam_pop) * 1.01, n_table), near]))
    phi = np.empty_like(table)
    theta = pop.theta.copy()
    for i in range(len(table) - 1, -1, -1):  # warm starts from large lam down
        phi[i], theta = _kl_slice(inst, rho, float(table[i]), theta)
    q = np.asarray(pop.weights, float)
    w = q / nom.p
    return bd.KLProfile(rho=rho, lam_pop=lam_pop, value_pop=float(pop.objective), gap_pop=float(pop.duality_gap),
                        w_width=float(w.max() - w.min()), lam_table=table, phi_lower=phi)


def _growth_measure(inst: Instance, method: str, radius: float):
    """``(x, q)``: the support and the distribution whose expected loss minorises the population
    objective with equality at ``theta_pop`` (P° for DPO/WDPO-W1, the worst case Q* otherwise), and
    the Frank-Wolfe gap of ``E_q l`` at ``theta_pop`` (0 = ``theta_pop`` minimises it: a saddle point)."""
    from ..solvers._common import ball_fw_gap

    nom = inst.nominal()
    pop = population_solution(inst, method, radius)
    if method in ("dpo", "wdpo-w1"):
        return nom.x, nom.y, nom.p, 0.0
    if method == "kldpo":
        x, y, q = nom.x, nom.y, np.asarray(pop.weights, float)
    else:
        sup = _support(inst)
        x, y = sup.x, sup.y
        q = _w2_saddle_measure(inst, radius, pop)
        if q is None:
            q = np.asarray(pop.weights, float)
    g = q @ dpo_grad(pop.theta, x, y, inst.beta, nom.theta_ref)
    return x, y, q, float(ball_fw_gap(g, pop.theta, inst.radius))


def _w2_saddle_measure(inst: Instance, radius: float, pop):
    """A worst case ``Q*`` of finite-support W2 at ``theta_pop`` that is a saddle point: among the
    optimal transport plans (value ``>= L(theta_pop) - 1e-9``, budget ``<= eps^2``, rows = P°), one whose
    target distribution ``w`` makes ``theta_pop`` optimal for ``E_w l`` (``sum_k w_k grad l_k`` in
    ``-N_Theta(theta_pop)``; interior: ``= 0``). An LP (HiGHS) minimising the gradient violation;
    ``None`` if it fails. The worst case the solver returns need not be a saddle one (the LP's optimal
    face is not a point)."""
    from scipy.optimize import linprog

    sup = _support(inst)
    nom = inst.nominal()
    theta = np.asarray(pop.theta, float)
    rows = sup.index_of(nom.x, nom.y)
    p = np.zeros(sup.m)
    p[rows] = nom.p
    C = sup.cost(np.arange(sup.m), 2, math.inf)
    J, K = np.nonzero(np.isfinite(C) & (p[:, None] > 0))
    l = dpo_loss(theta, sup.x, sup.y, inst.beta, nom.theta_ref)
    G = dpo_grad(theta, sup.x, sup.y, inst.beta, nom.theta_ref)  # (m, d)
    d = inst.d
    nv = len(J)
    from scipy import sparse

    # variables: plan entries (nv), slack t (1)
    A_eq = sparse.csr_array((np.ones(nv), (J, np.arange(nv))), shape=(sup.m, nv + 1))
    b_eq = p
    on_sphere = np.linalg.norm(theta) >= inst.radius * (1 - 1e-9)
    rows_ub, b_ub = [], []
    rows_ub.append(np.concatenate([C[J, K], [0.0]]))
    b_ub.append(radius**2)
    rows_ub.append(np.concatenate([-l[K], [0.0]]))
    b_ub.append(-(float(pop.objective) - 1e-9))
    if on_sphere:  # gradient must be -c theta/||theta||, c >= 0: project out the normal direction
        nrm = theta / np.linalg.norm(theta)
        Gt = G - (G @ nrm)[:, None] * nrm[None, :]
        rows_ub.append(np.concatenate([G[K] @ nrm, [0.0]]))  # grad . normal <= 0
        b_ub.append(0.0)
    else:
        Gt = G
    for i in range(d):
        rows_ub.append(np.concatenate([Gt[K, i], [-1.0]]))
        b_ub.append(0.0)
        rows_ub.append(np.concatenate([-Gt[K, i], [-1.0]]))
        b_ub.append(0.0)
    cobj = np.zeros(nv + 1)
    cobj[-1] = 1.0
    res = linprog(cobj, A_ub=np.array(rows_ub), b_ub=np.array(b_ub), A_eq=A_eq, b_eq=b_eq,
                  bounds=[(0, None)] * (nv + 1), method="highs")
    if res.status != 0:
        return None
    w = np.bincount(K, weights=res.x[:nv], minlength=sup.m)
    return w / w.sum()


def bound_curve(inst: Instance, method: str, radius: float, ns, delta: float) -> pd.DataFrame:
    """The bound on ``||theta_n - theta_pop||`` at each ``n`` (probability ``>= 1 - delta``).

    Columns: ``n``, ``excess`` (instance constants), ``bound`` (localised growth + the population
    solver allowance ``sqrt(2 gap_pop / gamma)``), ``bound_global`` (global instance gamma),
    ``bound_paper`` (the paper's constants, docs/theory.md section 2: ``||x|| <= 2``, ``4 beta B``, ``c_B``, ``lambda_cov`` of
    the growth measure), ``vacuous`` (``bound >= 2B``), ``gamma``, ``lambda_cov``, ``saddle_gap`` and
    method-specific details. Empty bound (NaN) when the argument does not apply (KLDPO with
    ``lam_pop = 0``, i.e. collapsed).
    """
    nom = inst.nominal()
    pop = population_solution(inst, method, radius)
    x, y, q, saddle_gap = _growth_measure(inst, method, radius)
    c = bd.BoundConstants.instance(nom.x, nom.p, inst.beta, inst.radius, nom.theta_ref)
    lam_cov = float(np.linalg.eigvalsh((x * q[:, None]).T @ x)[0])
    c_paper = bd.BoundConstants.paper(inst.beta, inst.radius, inst.d, max(lam_cov, 0.0))
    gap_pop = float(pop.duality_gap)

    def growth(r):
        return bd.local_growth(r, x, q, inst.beta, inst.radius, pop.theta, nom.theta_ref)

    gamma_global = growth(2 * inst.radius)
    allowance = math.sqrt(2 * gap_pop / gamma_global) if gamma_global > 0 else math.inf
    rows = []
    dpo_min = float(population_solution(inst, "dpo", 0.0).lower_bound)
    prof = kl_profile(inst, radius) if method == "kldpo" else None
    if method == "wdpo-w2":
        sup = _support(inst)
        C = sup.cost(np.arange(sup.m), 2, math.inf)
        cost_max = float(C[np.isfinite(C)].max())
        l_sup = dpo_loss(pop.theta, sup.x, sup.y, inst.beta, nom.theta_ref)
        lam_p = float(pop.lam or 0.0)
        phi = np.max(np.where(np.isfinite(C), l_sup[None, :] - lam_p * np.where(np.isfinite(C), C, 0.0), -np.inf), axis=1)
        w2_width = float(phi.max() - phi.min())
    for n in ns:
        det = {}
        if method in ("dpo", "wdpo-w1"):
            width = float(np.ptp(dpo_loss(pop.theta, nom.x, nom.y, inst.beta, nom.theta_ref)))
            ex = float(bd.dpo_excess_bound(n, delta, c, fixed_width=width, gap_pop=gap_pop))
            ex_p = float(bd.dpo_excess_bound(n, delta, c_paper, gap_pop=gap_pop))
            paper = float(bd.theorem_error_bound(n, delta, c_paper))
        elif method == "kldpo":
            if prof is None:
                ex = ex_p = paper = math.nan
            else:
                ex, det = bd.kldpo_excess_bound(n, delta, c, prof, dpo_min, return_details=True)
                ex_p = bd.kldpo_excess_bound(n, delta, c_paper, prof, dpo_min)
                paper = float(bd.error_from_excess(ex_p, c_paper.gamma))
        else:
            ex, det = bd.wdpo_finite_excess_bound(n, delta, c, radius, 2, cost_max, w2_width, gap_pop,
                                                  return_details=True)
            ex_p = bd.wdpo_finite_excess_bound(n, delta, c_paper, radius, 2, 16.0, c_paper.tau, gap_pop)
            paper = float(bd.error_from_excess(ex_p, c_paper.gamma))
        if np.isfinite(ex):
            local = bd.localized_error_bound(ex, growth, 2 * inst.radius) + allowance
            glob = float(bd.error_from_excess(ex, gamma_global)) + allowance
        elif np.isnan(ex):
            local = glob = math.nan
        else:
            local = glob = math.inf
        rows.append({"method": method, "radius": float(radius), "beta": inst.beta, "n": int(n), "delta": delta,
                     "excess": ex, "excess_paper": ex_p, "bound": local, "bound_global": glob, "bound_paper": paper,
                     "vacuous": bool(not local < 2 * inst.radius) if np.isfinite(local) else True,
                     "gamma_global": gamma_global, "lambda_cov": lam_cov, "saddle_gap": saddle_gap,
                     "gap_pop": gap_pop, "tau": c.tau, "lam_lo": det.get("lam_lo", math.nan),
                     "exp_factor": det.get("exp_factor", math.nan)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------


def summarize(df: pd.DataFrame, delta: float) -> pd.DataFrame:
    """Per ``(study, beta, method, radius, n)``: seeds, failures, median / 10% / ``(1-delta)`` quantile of
    the error and of the excess robust loss, collapse flags, median seconds. Failed solves are
    counted, not averaged in."""
    ok = df["status"].isin(["optimal", "inaccurate"]) & np.isfinite(df["error"])
    rows = []
    for keys, g in df.groupby(["study", "beta", "method", "radius", "n"], sort=True):
        gok = g[ok.loc[g.index]]
        e = gok["error"].to_numpy()
        og = gok["objective_gap"].to_numpy()
        rows.append({
            "study": keys[0], "beta": keys[1], "method": keys[2], "radius": keys[3], "n": keys[4],
            "seeds": len(g), "failed": int((~ok.loc[g.index]).sum()),
            "inaccurate": int((gok["status"] == "inaccurate").sum()),
            "median_error": float(np.median(e)) if len(e) else math.nan,
            "q10_error": float(np.quantile(e, 0.1)) if len(e) else math.nan,
            "quantile_error": float(np.quantile(e, 1 - delta)) if len(e) else math.nan,
            "median_objective_gap": float(np.median(og)) if len(og) else math.nan,
            "quantile_objective_gap": float(np.quantile(og, 1 - delta)) if len(og) else math.nan,
            "collapsed_frac": float(gok["collapsed"].astype(bool).mean()) if len(gok) else math.nan,
            "pop_collapsed": bool(g["pop_collapsed"].astype(bool).any()),
            "collapse_threshold": float(g["collapse_threshold"].iloc[0]),
            "median_seconds": float(g["seconds"].median()),
        })
    return pd.DataFrame(rows)


def fit_slope(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, column: str = "error") -> dict:
    """Least-squares slope of ``log median(column)`` against ``log n`` with a bootstrap 95% CI.

    ``df``: the rows of one ``(method, radius)`` (several ``n``, several seeds). The bootstrap
    resamples seeds with replacement within each ``n`` and refits. Cells whose median is 0 (e.g.
    both optima at ``theta_ref``) make the slope undefined: NaN. Rows are sorted by ``(n, seed)``
    first, so the bootstrap does not depend on the order of ``df`` (e.g. on how many workers wrote it).
    """
    df = df.sort_values([c for c in ("n", "seed") if c in df.columns], kind="stable")
    groups = [(n, g[column].to_numpy(float)) for n, g in df.groupby("n")]
    groups = [(n, v[np.isfinite(v)]) for n, v in groups]
    groups = [(n, v) for n, v in groups if len(v)]
    if len(groups) < 2:
        return {"slope": math.nan, "slope_ci": [math.nan, math.nan], "intercept": math.nan}
    logn = np.log([n for n, _ in groups])
    med = np.array([np.median(v) for _, v in groups])
    if np.any(med <= 0):
        return {"slope": math.nan, "slope_ci": [math.nan, math.nan], "intercept": math.nan}
    A = np.vstack([logn, np.ones_like(logn)]).T
    slope, intercept = np.linalg.lstsq(A, np.log(med), rcond=None)[0]
    rng = np.random.default_rng(seed)
    boot_meds = np.empty((n_boot, len(groups)))
    for j, (_, v) in enumerate(groups):
        idx = rng.integers(0, len(v), size=(n_boot, len(v)))
        boot_meds[:, j] = np.median(v[idx], axis=1)
    with np.errstate(divide="ignore"):
        Y = np.log(boot_meds)
    good = np.all(np.isfinite(Y), axis=1)
    coef = np.linalg.lstsq(A, Y[good].T, rcond=None)[0]
    lo, hi = np.quantile(coef[0], [0.025, 0.975]) if good.any() else (math.nan, math.nan)
    return {"slope": float(slope), "slope_ci": [float(lo), float(hi)], "intercept": float(intercept)}


def analyze(rows: pd.DataFrame, grid: StudyGrid, bounds: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(summary, fits)``: the per-cell summary joined with the bound curve, and one fit per
    ``(study, beta, method, radius)`` with ``bound_holds`` (bound >= empirical (1-delta)-quantile at
    every n) and ``bound_vacuous_all`` (the bound is >= 2B at every n)."""
    summ = summarize(rows, grid.delta)
    summ = summ.merge(bounds[["method", "radius", "beta", "n", "bound", "bound_global", "bound_paper", "vacuous"]],
                      on=["method", "radius", "beta", "n"], how="left")
    fits = []
    for (study, beta, method, radius), g in rows.groupby(["study", "beta", "method", "radius"], sort=True):
        ok = g[g["status"].isin(["optimal", "inaccurate"])]
        s = summ[(summ.study == study) & (summ.beta == beta) & (summ.method == method) & (summ.radius == radius)]
        pop_col = bool(s["pop_collapsed"].any())
        f = fit_slope(ok, n_boot=grid.n_boot) if not pop_col else {"slope": math.nan, "slope_ci": [math.nan, math.nan],
                                                                     "intercept": math.nan}
        fo = fit_slope(ok, n_boot=grid.n_boot, column="objective_gap") if not pop_col else {"slope": math.nan}
        b = s["bound"].to_numpy(float)
        qv = s["quantile_error"].to_numpy(float)
        has_bound = bool(np.all(np.isfinite(b) | np.isinf(b))) and len(b) and not np.all(np.isnan(b))
        holds = bool(has_bound and np.all(b >= qv)) if has_bound else None
        fits.append({"study": study, "beta": beta, "method": method, "radius": radius,
                     "slope": f["slope"], "slope_lo": f["slope_ci"][0], "slope_hi": f["slope_ci"][1],
                     "intercept": f["intercept"], "gap_slope": fo["slope"], "pop_collapsed": pop_col,
                     "collapse_threshold": float(s["collapse_threshold"].iloc[0]),
                     "bound_holds": holds,
                     "bound_vacuous_all": bool(np.all(s["vacuous"].astype(bool))) if len(s) else True,
                     "min_bound_ratio": float(np.nanmin(b / qv)) if has_bound and np.any(qv > 0) else math.nan,
                     "failed": int(s["failed"].sum()), "cells": int(s["seeds"].sum())})
    return summ, pd.DataFrame(fits)


@dataclass
class StudyResult:
    rows: pd.DataFrame
    summary: pd.DataFrame
    fits: pd.DataFrame
    bounds: pd.DataFrame
    grid: StudyGrid
    out: Path
    seconds: float

    def headline(self) -> dict:
        """For each method at its main radius: ``slope``, ``slope_ci``, ``bound_holds`` (and context)."""
        out = {}
        f = self.fits[self.fits.study == "main"]
        for method, r in self.grid.main_radius.items():
            row = f[(f.method == method) & np.isclose(f.radius, r)]
            if not len(row):
                continue
            row = row.iloc[0]
            b = self.bounds[(self.bounds.method == method) & np.isclose(self.bounds.radius, r)
                            & np.isclose(self.bounds.beta, self.grid.instance.beta)]
            out[method] = {
                "radius": float(r),
                "slope": _num(row.slope), "slope_ci": [_num(row.slope_lo), _num(row.slope_hi)],
                "bound_holds": None if row.bound_holds is None or (isinstance(row.bound_holds, float)
                                                                   and math.isnan(row.bound_holds))
                else bool(row.bound_holds),
                "bound_vacuous_at_all_n": bool(row.bound_vacuous_all),
                "min_bound_over_quantile": _num(row.min_bound_ratio),
                "bound_at_max_n": _num(b["bound"].iloc[-1]) if len(b) else None,
                "collapsed": bool(row.pop_collapsed),
                "failed_cells": int(row.failed),
            }
        return out


def _num(v):
    v = float(v)
    return None if math.isnan(v) else (v if math.isfinite(v) else ("inf" if v > 0 else "-inf"))


def run_study(grid: StudyGrid, out: str | Path, n_jobs: int = 1, progress: bool = True,
              on_row=None) -> StudyResult:
    """Run (or resume) the study: sweep rows to ``out/rows.csv``, then the tables
    ``summary.csv``, ``fits.csv``, ``bounds.csv`` (and ``rows.parquet``), each written atomically.
    The rows are in grid order whatever ``n_jobs`` is, so the results do not depend on it."""
    from .sweep import run_sweep

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inst = grid.instance
    cells = make_cells(inst, "main", grid.radii, grid.ns, grid.seeds)
    beta_radii = {}
    for beta in grid.betas:
        ib = inst.with_beta(beta)
        mr = {}
        for method, frac in grid.beta_methods.items():
            if method == "dpo":
                mr[method] = [0.0]
            elif method == "wdpo-w2":
                mr[method] = [float(frac)]
            else:
                mr[method] = [float(np.round(frac * collapse_threshold(method, ib), 6))]
        beta_radii[beta] = mr
        cells += make_cells(ib, "beta", mr, grid.beta_ns, grid.beta_seeds)
    rows = run_sweep(cells, run_cell, out / "rows.csv", KEY, n_jobs=n_jobs, progress=progress,
                     desc="sample-complexity", on_row=on_row)
    # bounds for every (beta, method, radius) in the grid
    blist = []
    for method, radii in grid.radii.items():
        for r in radii:
            blist.append(bound_curve(inst, method, float(r), grid.ns, grid.delta))
    for beta, mr in beta_radii.items():
        for method, radii in mr.items():
            for r in radii:
                if beta == inst.beta and method in grid.radii and any(np.isclose(r, grid.radii[method])):
                    continue
                blist.append(bound_curve(inst.with_beta(beta), method, float(r), grid.beta_ns, grid.delta))
    bounds = pd.concat(blist, ignore_index=True).drop_duplicates(["method", "radius", "beta", "n"])
    summary, fits = analyze(rows, grid, bounds)
    write_parquet(rows, out / "rows.parquet")
    write_csv(summary, out / "summary.csv")
    write_csv(fits, out / "fits.csv")
    write_csv(bounds, out / "bounds.csv")
    return StudyResult(rows, summary, fits, bounds, grid, out, time.perf_counter() - t0)


def grid_dict(grid: StudyGrid) -> dict:
    """The grid as plain data (recorded next to the results)."""
    d = asdict(grid)
    d["instance"] = asdict(grid.instance)
    return d
