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
           "METHODS"]

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

    def __post_init__(self):
        if self.mixture not in ("label", "reward"):
            raise ValueError(f"mixture must be 'label' or 'reward', got {self.mixture!r}")
        if not 0.0 <= self.alpha0 <= 1.0:
            raise ValueError(f"alpha0 must be in [0, 1], got {self.alpha0}")
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {list(METHODS)}")
        if not 0.0 < self.radius_frac:
            raise ValueError("radius_frac must be > 0")

    @classmethod
    def quick(cls) -> "ShiftConfig":
        return cls(n_train=500, seeds=(0, 1, 2, 3), sgd_steps=2000)

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:10]


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

    def sample(self, alpha: float, n: int, seed: int) -> PreferenceData:
        """``n`` i.i.d. tuples from ``P_alpha`` (weights ``1/n``)."""
        rng = np.random.default_rng(seed)
        j = rng.choice(len(self.pair_prob), size=n, p=self.pair_prob)
        y = (rng.random(n) < self.p_one(alpha)[j]).astype(np.int64)
        return PreferenceData(self.x[j], y, None, self.model.theta_ref, source=f"sample(P_alpha({alpha:g}), n={n})")


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


def train_methods(data: PreferenceData, cfg: ShiftConfig, seed: int) -> tuple[dict, dict]:
    """Fit every method of ``cfg.methods`` on ``data``; returns ``(thetas, info)``.

    ``info`` holds the radii, ``tau``/``rho0`` used and each exact solver's status.
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
    return thetas, info


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
    data = world.sample(cfg.alpha0, cfg.n_train, seed)
    thetas, info = train_methods(data, cfg, seed)
    parts = []
    for m, th in thetas.items():
        df = evaluate(world, th, cfg.alphas)
        df.insert(0, "method", m)
        df.insert(0, "seed", seed)
        df["theta_norm"] = float(np.linalg.norm(th))
        for k, v in info.items():
            df[k] = v
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
