"""Preference shift in the log-linear world: train on a mixture of two rewards, test on others.

Two true reward directions ``theta_1*, theta_2*`` (equal norms, at angle ``angle_deg``) define two
Bradley-Terry annotator populations on the same prompts and answers. For ``alpha in [0, 1]``:

* **label mixture** (``mixture="label"``, the default): an annotator is from population 1 with
  probability ``alpha``, so
  ``P_alpha(y = 1 | s, a1, a2) = alpha sigma(r_1(a1) - r_1(a2)) + (1 - alpha) sigma(r_2(a1) - r_2(a2))``.
  This is *not* a Bradley-Terry model for any single reward (misspecified for DPO).
* **reward mixture** (``mixture="reward"``): one population with reward ``r_alpha``:
  ``P_alpha(y = 1) = sigma(r_alpha(a1) - r_alpha(a2))`` (well specified).

In both cases the test reward is ``r_alpha = alpha r_1 + (1 - alpha) r_2``, i.e.
``theta_alpha* = alpha theta_1* + (1 - alpha) theta_2*`` in :meth:`LogLinearModel.expected_reward`
(the expected true reward of a learned policy is therefore linear in alpha, for both mixtures).

Training data: ``n_train`` i.i.d. tuples from ``P_alpha0``. Methods: exact DPO, KLDPO, WDPO (W1,
continuous support, core solver) and W2-WDPO (continuous support, :func:`~drdpo_theory.approx.solve_w2_continuous`)
at radii ``radius_frac`` times each training set's collapse radius, and SGD with the paper's
approximate gradients (``tau`` and ``rho0`` calibrated at the DPO solution, the value a user can
compute before training). Evaluation at every alpha: expected true reward ``E r_alpha`` of
``pi_theta``, preference accuracy and DPO loss under ``P_alpha`` (exact, on the finite support).

**Robust family** (``drdpo shift --family``, :func:`with_family`; label mixture only): the members
of :mod:`drdpo_theory.solvers.family` solved exactly on the same training sets (:data:`FAMILY_METHODS`):
chi2dpo at ``rho = radius_frac rho_c`` (its collapse radius), cvardpo at ``alpha = 1 - radius_frac
(1 - alpha_c)`` (``alpha = 1`` is DPO, ``alpha_c`` collapses), groupdpo with two groups, the **label
source** (group 1: the label was drawn from population 1, reward ``r_1``; group 2: from population 2),
rdpo with flip rate ``family_eps``, cdpo with label smoothing ``family_eps``, dr_dpo with ``beta'``
(its local solution), and each one's batch version trained by the same SGD
(:func:`drdpo_theory.experiments.gradients.family_grad` on the mini-batch), plus group DPO with the
online exponentiated-gradient group weights of Ramesh et al. (``group_eg_sgd``, step ``group_step``). The label source is
drawn from its posterior given the pair and the label, from a generator of its own
(:meth:`ShiftWorld.sample_with_source`), so the training sets are those of the other methods.
Family rows carry ``theta_0..theta_{d-1}``, ``objective`` (the exact solver's value, NaN for SGD)
and ``robust_objective`` (the member's exact objective on the training set at that theta).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import approx as A
from ..calibration import collapse_radii, rho0_for_eps, tau_for_rho
from ..data import PreferenceData
from ..io import read_cell, write_cell, write_csv
from ..losses import dpo_loss, sigmoid
from ..model import LogLinearModel, make_model
from .gradients import run_sgd

__all__ = ["ShiftConfig", "ShiftWorld", "make_world", "train_methods", "evaluate", "run_shift", "summarize_shift",
           "METHODS", "FAMILY_METHODS", "MEMBER_OF", "with_family", "family_table", "family_table_markdown",
           "write_family_table", "summarize_family"]

#: method name -> (kind, description)
METHODS = {
    "dpo": ("exact", "DPO (exact)"),
    "kldpo": ("exact", "KLDPO (exact)"),
    "wdpo_w1": ("exact", "WDPO W1 (exact)"),
    "wdpo_w2": ("exact", "WDPO W2 (exact, continuous)"),
    "dpo_sgd": ("sgd", "DPO (SGD)"),
    "kl_clamped_sgd": ("sgd", "KLDPO authors' weights (SGD)"),
    "kl_calibrated_sgd": ("sgd", "KLDPO batch dual (SGD)"),
    "w2_sq_penalty_sgd": ("sgd", "WDPO squared penalty (SGD)"),
    "w2_adversarial_sgd": ("sgd", "WDPO one-step adversarial (SGD)"),
}

#: the robust family (``drdpo shift --family``): method name -> (kind, description)
FAMILY_METHODS = {
    "chi2dpo": ("exact", "chi2-DPO (exact)"),
    "cvardpo": ("exact", "CVaR-DPO (exact)"),
    "groupdpo": ("exact", "group DPO, groups = label source (exact)"),
    "rdpo": ("exact", "rDPO (exact)"),
    "cdpo": ("exact", "cDPO (exact)"),
    "dr_dpo": ("local", "Dr.DPO (local solver)"),
    "chi2_batch_sgd": ("sgd", "chi2-DPO batch worst case (SGD)"),
    "cvar_batch_sgd": ("sgd", "CVaR-DPO batch worst case (SGD)"),
    "group_batch_sgd": ("sgd", "group DPO batch worst group (SGD)"),
    "group_eg_sgd": ("sgd", "group DPO online EG weights (SGD)"),
    "rdpo_sgd": ("sgd", "rDPO (SGD)"),
    "cdpo_sgd": ("sgd", "cDPO (SGD)"),
    "dr_dpo_batch_sgd": ("sgd", "Dr.DPO batch soft-min (SGD)"),
}

#: family method -> the member of :mod:`drdpo_theory.solvers.family` whose objective it minimises
MEMBER_OF = {"chi2dpo": "chi2dpo", "cvardpo": "cvardpo", "groupdpo": "groupdpo", "rdpo": "rdpo", "cdpo": "cdpo",
             "dr_dpo": "dr_dpo", "chi2_batch_sgd": "chi2dpo", "cvar_batch_sgd": "cvardpo",
             "group_batch_sgd": "groupdpo", "group_eg_sgd": "groupdpo", "rdpo_sgd": "rdpo", "cdpo_sgd": "cdpo", "dr_dpo_batch_sgd": "dr_dpo"}


@dataclass(frozen=True)
class ShiftConfig:
    """Grid of the shift study (``quick()`` shrinks it)."""

    model_seed: int = 0
    """seed of the features (``make_model``) and of the two reward directions."""
    n_prompts: int = 4
    n_answers: int = 4
    d: int = 4
    beta: float = 1.0
    radius: float = 4.0
    reward_norm: float = 2.0
    """``||theta_1*|| = ||theta_2*||``."""
    angle_deg: float = 90.0
    """angle between ``theta_1*`` and ``theta_2*``."""
    mixture: str = "label"
    """``"label"`` (mixture of the two BT label distributions) or ``"reward"`` (BT with ``r_alpha``)."""
    alpha0: float = 0.5
    """training mixture weight."""
    alphas: tuple = tuple(round(float(a), 12) for a in np.linspace(0.0, 1.0, 11))
    n_train: int = 1000
    seeds: tuple = tuple(range(10))
    radius_frac: float = 0.5
    """``rho / rho_c`` and ``eps / eps_c`` on each training set."""
    methods: tuple = tuple(METHODS)
    sgd_steps: int = 3000
    sgd_batch: int = 64
    sgd_eta0: float = 4.0
    family_eps: float = 0.1
    """family: rdpo's flip rate and cdpo's label smoothing."""
    beta_prime: float = 1.0
    """family: Dr.DPO's temperature ``beta'``."""
    group_step: float = 0.01
    """family: the EG step of group DPO's online group weights (``group_eg_sgd``; the torch trainer's default)."""

    def __post_init__(self):
        if self.mixture not in ("label", "reward"):
            raise ValueError(f"mixture must be 'label' or 'reward', got {self.mixture!r}")
        if not 0.0 <= self.alpha0 <= 1.0:
            raise ValueError(f"alpha0 must be in [0, 1], got {self.alpha0}")
        unknown = set(self.methods) - set(METHODS) - set(FAMILY_METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {list(METHODS) + list(FAMILY_METHODS)}")
        if not 0.0 < self.radius_frac:
            raise ValueError("radius_frac must be > 0")
        if self.has_family:
            if self.mixture != "label" and {"groupdpo", "group_batch_sgd", "group_eg_sgd"} & set(self.methods):
                raise ValueError("groupdpo's groups are the label sources of the label mixture; "
                                 "the reward mixture has one source (use --mixture label)")
            if not self.radius_frac <= 1.0:
                raise ValueError(f"radius_frac must be in (0, 1] with the family (cvardpo's alpha = 1 - "
                                 f"radius_frac (1 - alpha_c)), got {self.radius_frac}")
            if not 0.0 <= self.family_eps < 0.5:
                raise ValueError(f"family_eps must be in [0, 0.5), got {self.family_eps}")
            if not self.beta_prime > 0:
                raise ValueError(f"beta_prime must be > 0, got {self.beta_prime}")
            if not (math.isfinite(self.group_step) and self.group_step > 0):
                raise ValueError(f"group_step must be a finite number > 0, got {self.group_step}")

    @property
    def has_family(self) -> bool:
        """Whether any robust-family method is in ``methods``."""
        return any(m in FAMILY_METHODS for m in self.methods)

    @classmethod
    def quick(cls) -> "ShiftConfig":
        return cls(n_train=500, seeds=(0, 1, 2, 3), sgd_steps=2000)

    def key(self) -> str:
        """Short hash naming the cached cells; the family fields count only when a family method is
        run (so the other runs' cells kept their names)."""
        d = asdict(self)
        if not self.has_family:
            for k in ("family_eps", "beta_prime", "group_step"):
                d.pop(k)
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def with_family(cfg: ShiftConfig) -> ShiftConfig:
    """``cfg`` with every robust-family method added after its own methods (``drdpo shift --family``)."""
    from dataclasses import replace

    return replace(cfg, methods=tuple(cfg.methods) + tuple(m for m in FAMILY_METHODS if m not in cfg.methods))


@dataclass(frozen=True)
class ShiftWorld:
    """Features, the two reward directions and the pair distribution."""

    model: LogLinearModel
    theta1: np.ndarray
    theta2: np.ndarray
    mixture: str
    s: np.ndarray
    a1: np.ndarray
    a2: np.ndarray
    pair_prob: np.ndarray
    """(m,) probability of each ordered pair ``(s, a1 != a2)``."""

    @property
    def x(self) -> np.ndarray:
        """(m, d) feature differences of the pairs."""
        return self.model.phi[self.s, self.a1] - self.model.phi[self.s, self.a2]

    def theta_alpha(self, alpha: float) -> np.ndarray:
        """``alpha theta_1* + (1 - alpha) theta_2*`` (the reward ``r_alpha``)."""
        return alpha * self.theta1 + (1.0 - alpha) * self.theta2

    def p_one(self, alpha: float) -> np.ndarray:
        """``P_alpha(y = 1 | pair)``, (m,)."""
        b = self.model.beta
        x, tr = self.x, self.model.theta_ref
        if self.mixture == "reward":
            return sigmoid(b * x @ (self.theta_alpha(alpha) - tr))
        return alpha * sigmoid(b * x @ (self.theta1 - tr)) + (1 - alpha) * sigmoid(b * x @ (self.theta2 - tr))

    def population(self, alpha: float) -> PreferenceData:
        """``P_alpha`` on its finite support (each pair with ``y = 1`` and ``y = 0``) as weighted data."""
        p1 = self.p_one(alpha)
        X = np.concatenate([self.x, self.x])
        Y = np.concatenate([np.ones(len(p1), np.int64), np.zeros(len(p1), np.int64)])
        W = np.concatenate([self.pair_prob * p1, self.pair_prob * (1 - p1)])
        return PreferenceData(X, Y, W, self.model.theta_ref, source=f"P_alpha({alpha:g})")

    def _draw(self, alpha: float, n: int, seed: int):
        rng = np.random.default_rng(seed)
        j = rng.choice(len(self.pair_prob), size=n, p=self.pair_prob)
        y = (rng.random(n) < self.p_one(alpha)[j]).astype(np.int64)
        return j, y

    def sample(self, alpha: float, n: int, seed: int) -> PreferenceData:
        """``n`` i.i.d. tuples from ``P_alpha`` (weights ``1/n``)."""
        j, y = self._draw(alpha, n, seed)
        return PreferenceData(self.x[j], y, None, self.model.theta_ref, source=f"sample(P_alpha({alpha:g}), n={n})")

    def sample_with_source(self, alpha: float, n: int, seed: int) -> tuple[PreferenceData, np.ndarray]:
        """:meth:`sample` (the same tuples) and each label's source, (n,) in {1, 2}: the population
        (reward ``r_1`` or ``r_2``) whose annotator gave it (label mixture only).

        Drawn from its posterior given the pair and the label, ``P(source 1 | pair, y) = alpha
        P_1(y | pair) / P_alpha(y | pair)``, with a generator of its own (seeded ``(seed, 1)``):
        ``(pair, y, source)`` is then distributed as "pick a population with probability alpha, then
        its Bradley-Terry label", and the tuples are exactly those of :meth:`sample`.
        """
        if self.mixture != "label":
            raise ValueError("the label source exists for the label mixture only")
        j, y = self._draw(alpha, n, seed)
        b, tr = self.model.beta, self.model.theta_ref
        p1 = sigmoid(b * self.x[j] @ (self.theta1 - tr))
        p = self.p_one(alpha)[j]
        like1 = np.where(y == 1, p1, 1.0 - p1)
        like = np.where(y == 1, p, 1.0 - p)
        post1 = np.divide(alpha * like1, like, out=np.full(n, float(alpha)), where=like > 0)
        src = np.where(np.random.default_rng([seed, 1]).random(n) < post1, 1, 2).astype(np.int64)
        data = PreferenceData(self.x[j], y, None, self.model.theta_ref, source=f"sample(P_alpha({alpha:g}), n={n})")
        return data, src


def make_world(cfg: ShiftConfig) -> ShiftWorld:
    """Features from ``make_model(seed)``; ``theta_1*`` its theta*, ``theta_2*`` at ``angle_deg`` from it."""
    base = make_model(n_prompts=cfg.n_prompts, n_answers=cfg.n_answers, d=cfg.d, beta=cfg.beta,
                      radius=cfg.radius, theta_star_norm=cfg.reward_norm, seed=cfg.model_seed)
    t1 = base.theta_star
    rng = np.random.default_rng(cfg.model_seed + 777)
    o = rng.standard_normal(cfg.d)
    o -= (o @ t1) / (t1 @ t1) * t1  # Gram-Schmidt: o orthogonal to theta_1*
    o *= cfg.reward_norm / np.linalg.norm(o)
    ang = math.radians(cfg.angle_deg)
    t2 = math.cos(ang) * t1 + math.sin(ang) * o
    S, Aa, _ = base.phi.shape
    s, a1, a2 = np.meshgrid(np.arange(S), np.arange(Aa), np.arange(Aa), indexing="ij")
    keep = a1 != a2
    s, a1, a2 = s[keep], a1[keep], a2[keep]
    pair_prob = base.prompt_probs[s] / (Aa * (Aa - 1))
    return ShiftWorld(base, t1, t2, cfg.mixture, s, a1, a2, pair_prob)


def train_methods(data: PreferenceData, cfg: ShiftConfig, seed: int, groups=None) -> tuple[dict, dict]:
    """Fit every method of ``cfg.methods`` on ``data``; returns ``(thetas, info)``.

    ``info`` holds the radii, ``tau``/``rho0`` used and each exact solver's status; with family
    methods also their parameters (``rho_chi2``, ``alpha_cvar``, ``eps_rdpo``, ``eps_cdpo``,
    ``beta_prime``, ``group1_share``) and, under ``"_objectives"`` and ``"_params"``, each exact family
    solver's objective and each member's keyword arguments (popped by the caller before ``info`` becomes columns).
    ``groups``: (n,) label sources of ``data`` (groupdpo).
    """
    from ..solvers.dpo import solve_dpo
    from ..solvers.kl import solve_kldpo
    from ..solvers.wasserstein import solve_wdpo

    beta, B = cfg.beta, cfg.radius
    radii = collapse_radii(data)
    rho = cfg.radius_frac * radii["kl_rho_c"]
    eps1 = cfg.radius_frac * radii["w1_eps_c"]
    eps2 = cfg.radius_frac * radii["w2_eps_c"]
    r_dpo = solve_dpo(data, beta, B)
    th_dpo = r_dpo.theta
    tau = tau_for_rho(th_dpo, data, beta, rho)
    rho0 = rho0_for_eps(th_dpo, data, beta, eps2, "gradient", space="x")
    info = {"rho": rho, "eps_w1": eps1, "eps_w2": eps2, "tau": tau, "rho0": rho0}
    thetas: dict = {}
    sgd = dict(steps=cfg.sgd_steps, batch_size=cfg.sgd_batch, eta0=cfg.sgd_eta0, seed=seed)
    for m in cfg.methods:
        if m == "dpo":
            thetas[m], info["status_dpo"] = th_dpo, r_dpo.status
        elif m == "kldpo":
            r = solve_kldpo(data, beta, B, rho)
            thetas[m], info["status_kldpo"] = r.theta, r.status
        elif m == "wdpo_w1":
            r = solve_wdpo(data, beta, B, eps1, kappa=math.inf, p=1)
            thetas[m], info["status_wdpo_w1"] = r.theta, r.status
        elif m == "wdpo_w2":
            r = A.solve_w2_continuous(data, beta, B, eps2, theta0=th_dpo)
            thetas[m], info["status_wdpo_w2"] = r.theta, r.status
        elif m == "dpo_sgd":
            thetas[m] = run_sgd(lambda th, b: A.dpo_grad_batch(th, b, beta), data, B, **sgd)
        elif m == "kl_clamped_sgd":
            thetas[m] = run_sgd(lambda th, b: A.kldpo_grad_clamped(th, b, beta, tau), data, B, **sgd)
        elif m == "kl_calibrated_sgd":
            thetas[m] = run_sgd(lambda th, b: A.kldpo_grad_calibrated(th, b, beta, rho), data, B, **sgd)
        elif m == "w2_sq_penalty_sgd":
            thetas[m] = run_sgd(lambda th, b: A.wdpo_grad_sq_penalty(th, b, beta, rho0, "x"), data, B, **sgd)
        elif m == "w2_adversarial_sgd":
            thetas[m] = run_sgd(lambda th, b: A.wdpo_grad_adversarial(th, b, beta, eps=eps2, space="x"), data, B, **sgd)
    if cfg.has_family:
        _train_family(data, cfg, groups, thetas, info, sgd)
    return thetas, info


def family_member_params(data: PreferenceData, cfg: ShiftConfig, groups) -> dict[str, dict]:
    """Each member's parameters on this training set (:func:`~drdpo_theory.experiments.gradients.family_params`
    with ``cfg.radius_frac``, ``cfg.family_eps``, ``cfg.beta_prime``; groups = label sources)."""
    from .gradients import family_params

    return family_params(data, groups, cfg.radius_frac, cfg.family_eps, cfg.beta_prime)


def _train_family(data, cfg: ShiftConfig, groups, thetas: dict, info: dict, sgd: dict) -> None:
    from ..solvers import solve
    from .gradients import GroupEG, family_grad

    if groups is None and {"groupdpo", "group_batch_sgd", "group_eg_sgd"} & set(cfg.methods):
        raise ValueError("groupdpo needs the label sources as groups (ShiftWorld.sample_with_source)")
    params = family_member_params(data, cfg, np.zeros(data.n, np.int64) if groups is None else groups)
    info.update(rho_chi2=params["chi2dpo"]["rho"], alpha_cvar=params["cvardpo"]["alpha"], group_step=cfg.group_step,
                eps_rdpo=params["rdpo"]["eps"], eps_cdpo=params["cdpo"]["eps"],
                beta_prime=params["dr_dpo"]["beta_prime"],
                group1_share=float(np.mean(groups == 1)) if groups is not None else float("nan"))
    objectives = info.setdefault("_objectives", {})
    info["_params"] = params
    beta, B = cfg.beta, cfg.radius
    for m in cfg.methods:
        if m not in FAMILY_METHODS:
            continue
        member, kw = MEMBER_OF[m], params[MEMBER_OF[m]]
        if m == member:  # exact (dr_dpo: local)
            r = solve(member, data, beta, B, **kw)
            thetas[m], info[f"status_{m}"] = r.theta, r.status
            objectives[m] = float(r.objective)
        elif m == "group_eg_sgd":  # online EG group weights, one state for the run
            eg = GroupEG(kw["groups"], cfg.group_step)
            thetas[m] = run_sgd(lambda th, b, i, eg=eg, g=kw["groups"]: eg.grad(th, b, beta, g[i]), data, B,
                                pass_index=True, **sgd)
            info["group_eg_q1"] = float(eg.q[0])  # the final weight of source 1
        else:
            def grad(th, b, i, member=member, kw=kw):
                extra = {"groups": kw["groups"][i]} if member == "groupdpo" else {}
                return family_grad(member, th, b, beta, **{**kw, **extra})

            thetas[m] = run_sgd(grad, data, B, pass_index=True, **sgd)


def evaluate(world: ShiftWorld, theta, alphas) -> pd.DataFrame:
    """Expected true reward ``E r_alpha``, accuracy and DPO loss under ``P_alpha`` for each alpha.

    Accuracy counts a tuple as correct when ``ytil (theta - theta_ref).x > 0`` (ties count 1/2).
    """
    theta = np.asarray(theta, float)
    beta = world.model.beta
    rows = []
    for a in alphas:
        pop = world.population(a)
        h = pop.u @ (theta - pop.theta_ref)
        acc = float(pop.weights @ np.where(h > 0, 1.0, np.where(h == 0, 0.5, 0.0)))
        rows.append(dict(alpha=float(a), reward=world.model.expected_reward(theta, world.theta_alpha(a)),
                         accuracy=acc, dpo_loss=float(pop.weights @ dpo_loss(theta, pop.x, pop.y, beta, pop.theta_ref))))
    return pd.DataFrame(rows)


def _seed_cell(cfg: ShiftConfig, world: ShiftWorld, seed: int) -> pd.DataFrame:
    groups = None
    if cfg.has_family and cfg.mixture == "label":
        data, groups = world.sample_with_source(cfg.alpha0, cfg.n_train, seed)  # the same tuples as sample()
    else:
        data = world.sample(cfg.alpha0, cfg.n_train, seed)
    thetas, info = train_methods(data, cfg, seed, groups=groups)
    objectives = info.pop("_objectives", {})
    params = info.pop("_params", {})
    parts = []
    for m in cfg.methods:
        th = thetas[m]
        df = evaluate(world, th, cfg.alphas)
        df.insert(0, "method", m)
        df.insert(0, "seed", seed)
        df["theta_norm"] = float(np.linalg.norm(th))
        for k, v in info.items():
            df[k] = v
        if cfg.has_family:  # the family runs also record theta and each member's robust objective
            from .gradients import family_objective

            for j, v in enumerate(th):
                df[f"theta_{j}"] = float(v)
            df["objective"] = objectives.get(m, float("nan"))
            member = MEMBER_OF.get(m)
            df["robust_objective"] = (family_objective(member, th, data, cfg.beta, **params[member])
                                      if member else float("nan"))
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def run_shift(cfg: ShiftConfig, out_dir: str | Path | None = None, n_jobs: int = 1,
              progress: bool = True) -> pd.DataFrame:
    """Tidy table: one row per (seed, method, alpha), plus the reference rows ``method="reference"``
    (``pi_{theta_alpha*}``, the KL-regularised optimal policy of ``r_alpha``, evaluated at its own alpha).

    ``out_dir``: per-seed cells cached in ``out_dir/cells/`` (resume; a torn, empty or unmarked
    cell is recomputed) and ``out_dir/shift.csv`` (written atomically). ``n_jobs``: joblib
    processes over seeds (>= 1 or -1, capped at the CPU count); rows are in seed order for every ``n_jobs``.
    """
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    from .sweep import resolve_n_jobs

    n_jobs, _ = resolve_n_jobs(n_jobs)

    world = make_world(cfg)
    out = None if out_dir is None else Path(out_dir)

    expected = len(cfg.methods) * len(cfg.alphas)  # rows of one seed's cell

    def cell(seed):
        path = None if out is None else out / "cells" / f"seed{seed}_{cfg.key()}.csv"
        if path is not None:  # resume: only a complete cell (marker, hash, row count) is reused
            df = read_cell(path, columns=("seed", "method", "alpha", "reward"))
            if df is not None and len(df) == expected:
                return df
        df = _seed_cell(cfg, world, seed)
        if path is not None:
            write_cell(df, path)  # atomic CSV, then its completion marker
        return df

    seeds = tqdm(cfg.seeds, desc="shift", disable=not progress)
    dfs = [cell(s) for s in seeds] if n_jobs == 1 else Parallel(n_jobs=n_jobs)(delayed(cell)(s) for s in seeds)
    ref = []
    for a in cfg.alphas:
        r = evaluate(world, world.theta_alpha(a), [a])
        r.insert(0, "method", "reference")
        r.insert(0, "seed", -1)
        ref.append(r)
    res = pd.concat(dfs + ref, ignore_index=True)
    res["alpha0"] = cfg.alpha0
    res["mixture"] = cfg.mixture
    if out is not None:
        write_csv(res, out / "shift.csv")
    return res


def summarize_shift(res: pd.DataFrame) -> dict:
    """Per method: mean and standard error (over seeds) of the reward at each alpha, the worst-case
    reward over alpha, and the accuracy at the training alpha."""
    out: dict = {"alphas": sorted(float(a) for a in res.alpha.unique())}
    out["alpha0"] = float(res.alpha0.iloc[0])
    out["mixture"] = str(res.mixture.iloc[0])
    methods = {}
    for m, g in res[res.method != "reference"].groupby("method", sort=False):
        by = g.groupby("alpha")
        mean, se = by.reward.mean(), by.reward.std(ddof=1) / np.sqrt(by.reward.count())
        worst = g.groupby("seed").reward.min()
        methods[m] = {
            "reward_mean": [float(v) for v in mean.values],
            "reward_se": [float(v) if np.isfinite(v) else 0.0 for v in se.values],
            "worst_alpha_reward_mean": float(worst.mean()),
            "accuracy_at_alpha0": float(g[np.isclose(g.alpha, out["alpha0"])].accuracy.mean()),
        }
    out["methods"] = methods
    ref = res[res.method == "reference"].sort_values("alpha")
    out["reference_reward"] = [float(v) for v in ref.reward.values]
    # headline first (reports truncate long lines): the worst reward over alpha per method
    head = {"worst_alpha_reward": {m: v["worst_alpha_reward_mean"] for m, v in methods.items()}}
    return {**head, **out}


# ----------------------------------------------------------------------------------------------
# the robust family side by side (drdpo shift --family)
# ----------------------------------------------------------------------------------------------

#: the columns of the family table (family_table.csv; the markdown table shows a formatted subset)
FAMILY_TABLE_COLUMNS = ("method", "kind", "description", "parameter", "parameter_value",
                        "reward_alpha0_mean", "reward_alpha0_se", "reward_alpha_half_mean", "reward_alpha_half_se",
                        "reward_alpha1_mean", "reward_alpha1_se", "worst_reward_mean", "worst_reward_se",
                        "accuracy_at_train_alpha", "theta_norm_mean", "robust_objective_mean", "status")


def _kind(m: str) -> str:
    return {**METHODS, **FAMILY_METHODS}.get(m, ("?", m))[0]


def _parameter(m: str, g: pd.DataFrame, frac: float | None) -> tuple[str, float]:
    """The stated radius of method ``m`` (text) and its value on the training sets (mean over seeds)."""
    f = "f" if frac is None else f"{frac:g}"
    first = g.groupby("seed").first()

    def mean(col):
        return float(first[col].mean()) if col in first else float("nan")

    if m in ("dpo", "dpo_sgd"):
        return "-", float("nan")
    if m in ("kldpo", "kl_calibrated_sgd"):
        return f"KL rho = {f} rho_c", mean("rho")
    if m == "kl_clamped_sgd":
        return f"tau = lam*(rho = {f} rho_c) at theta_DPO", mean("tau")
    if m == "wdpo_w1":
        return f"W1 eps = {f} eps_c", mean("eps_w1")
    if m in ("wdpo_w2", "w2_adversarial_sgd"):
        return f"W2 eps = {f} eps_c", mean("eps_w2")
    if m == "w2_sq_penalty_sgd":
        return f"rho0 for W2 eps = {f} eps_c at theta_DPO", mean("rho0")
    member = MEMBER_OF.get(m)
    if member == "chi2dpo":
        return f"chi2 rho = {f} rho_c", mean("rho_chi2")
    if member == "cvardpo":
        return f"alpha = 1 - {f} (1 - alpha_c)", mean("alpha_cvar")
    if m == "group_eg_sgd":
        step = mean("group_step")
        return (f"2 groups = label source, EG step {step:g} (value: final weight of source 1)",
                mean("group_eg_q1"))
    if member == "groupdpo":
        return "2 groups = label source (value: share of source 1)", mean("group1_share")
    if member == "rdpo":
        return "flip rate eps", mean("eps_rdpo")
    if member == "cdpo":
        return "label smoothing eps", mean("eps_cdpo")
    if member == "dr_dpo":
        return "beta'", mean("beta_prime")
    return "?", float("nan")


def family_table(res: pd.DataFrame, radius_frac: float | None = None) -> pd.DataFrame:
    """One row per method of a shift run: its stated radius, the expected true reward at alpha = 0,
    0.5, 1 and its worst case over alpha (per seed, then mean and standard error over seeds, as
    :func:`summarize_shift`), the accuracy at the training alpha, the mean robust objective of the
    family rows and the exact solvers' statuses (``optimal 10/10``)."""
    rows = []
    a0 = float(res.alpha0.iloc[0])
    for m, g in res[res.method != "reference"].groupby("method", sort=False):
        n = g.seed.nunique()
        by = g.groupby("alpha").reward
        mean, se = by.mean(), by.std(ddof=1) / np.sqrt(by.count())
        worst = g.groupby("seed").reward.min()

        def at(a, s):
            i = int(np.argmin(np.abs(mean.index.to_numpy() - a)))
            return float((mean if s == "mean" else se).iloc[i])

        text, value = _parameter(m, g, radius_frac)
        status = ""
        col = f"status_{m}"
        if col in g and g[col].notna().any():
            st = g.groupby("seed")[col].first().astype(str)
            status = ", ".join(f"{k} {v}/{n}" for k, v in st.value_counts().sort_index().items())
        rows.append(dict(method=m, kind=_kind(m), description={**METHODS, **FAMILY_METHODS}.get(m, ("", m))[1],
                         parameter=text, parameter_value=value,
                         reward_alpha0_mean=at(0.0, "mean"), reward_alpha0_se=at(0.0, "se"),
                         reward_alpha_half_mean=at(0.5, "mean"), reward_alpha_half_se=at(0.5, "se"),
                         reward_alpha1_mean=at(1.0, "mean"), reward_alpha1_se=at(1.0, "se"),
                         worst_reward_mean=float(worst.mean()),
                         worst_reward_se=float(worst.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
                         accuracy_at_train_alpha=float(g[np.isclose(g.alpha, a0)].accuracy.mean()),
                         theta_norm_mean=float(g.groupby("seed").theta_norm.first().mean()),
                         robust_objective_mean=float(g.groupby("seed").robust_objective.first().mean())
                         if "robust_objective" in g else float("nan"),
                         status=status))
    return pd.DataFrame(rows, columns=list(FAMILY_TABLE_COLUMNS))


def _pm(m, s) -> str:
    return f"{m:.3f} ± {s:.3f}" if np.isfinite(s) else f"{m:.3f}"


def family_table_markdown(table: pd.DataFrame | list, n_seeds: int | None = None) -> str:
    """The family table as markdown: method, stated radius (value), reward at alpha = 0 / 0.5 / 1 and
    the worst case over alpha (mean ± s.e. over seeds), mean ``||theta||`` (the ball is ``||theta|| <= B``),
    exact solver status."""
    t = pd.DataFrame(table)
    lines = ["| method | radius (mean value over seeds) | reward at alpha = 0 | alpha = 0.5 | alpha = 1 | "
             "worst over alpha | mean ‖theta‖ | solver |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for _, r in t.iterrows():
        v = r.parameter_value
        par = r.parameter if r.parameter == "-" or not np.isfinite(v) else f"{r.parameter} ({v:.3g})"
        lines.append(f"| {r.description} | {par} | {_pm(r.reward_alpha0_mean, r.reward_alpha0_se)} | "
                     f"{_pm(r.reward_alpha_half_mean, r.reward_alpha_half_se)} | "
                     f"{_pm(r.reward_alpha1_mean, r.reward_alpha1_se)} | "
                     f"**{_pm(r.worst_reward_mean, r.worst_reward_se)}** | {r.theta_norm_mean:.2f} | "
                     f"{r.status if isinstance(r.status, str) and r.status else '-'} |")
    return "\n".join(lines)


def write_family_table(table: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """``family_table.csv`` and ``family_table.md`` in ``out_dir`` (atomic writes)."""
    from ..io import write_text

    out = Path(out_dir)
    return [write_csv(table, out / "family_table.csv"),
            write_text(out / "family_table.md", family_table_markdown(table) + "\n")]


def summarize_family(res: pd.DataFrame, cfg: ShiftConfig) -> dict:
    """:func:`summarize_shift` plus the stated parameters and the family table (``family_table``: a
    list of rows, what paper_repro.md's robust-family block is generated from)."""
    base = summarize_shift(res)
    table = family_table(res, cfg.radius_frac)
    stated = {"radius_frac": cfg.radius_frac, "family_eps": cfg.family_eps, "beta_prime": cfg.beta_prime,
              "group_step": cfg.group_step,
              "beta": cfg.beta, "ball_radius": cfg.radius,
              "n_train": cfg.n_train, "seeds": len(cfg.seeds), "sgd_steps": cfg.sgd_steps, "sgd_batch": cfg.sgd_batch,
              "groups": "label source (1: label from reward 1, 2: from reward 2)"}
    rows = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
            for r in table.to_dict(orient="records")]
    head = {"worst_alpha_reward": base.pop("worst_alpha_reward")}  # headline first (reports truncate)
    return {**head, **base, "stated": stated, "family_table": rows}


def stated_line(stated: dict, alpha0: float | None = None) -> str:
    """The radii of a family run in one line (the figure's subtitle), from ``summary["stated"]``."""
    f = stated.get("radius_frac")
    line = (f"radii: KL, χ², W1, W2 at {f:g} × each training set's collapse radius; CVaR α = 1 − {f:g}(1 − α_c); "
            f"rDPO flip rate = cDPO smoothing ε = {stated.get('family_eps'):g}; Dr.DPO β′ = {stated.get('beta_prime'):g}; "
            f"group DPO: 2 groups = label source (EG step {stated.get('group_step', float('nan')):g}); "
            f"n = {stated.get('n_train')} pairs per seed")
    return line + (f", trained at α₀ = {alpha0:g}" if alpha0 is not None else "")
