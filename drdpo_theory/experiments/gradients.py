"""Exact vs approximate robust gradients on the log-linear model (tidy pandas tables).

The paper trains LLMs with approximations of the KLDPO / WDPO minimax gradients (docs/theory.md
section 5, :mod:`drdpo_theory.approx`). On the log-linear class the exact gradients are known, so
this study measures how good the approximations are:

* :func:`kl_tau_table` — KLDPO estimators (authors' clamped weights, normalised tilt, batch-calibrated
  dual) against the exact Danskin gradient as functions of ``tau / lam*`` and ``rho / rho_c``;
* :func:`kl_path_table` — ``lam*`` along an exact training trajectory, and the cosine of a fixed
  ``tau`` along it (no single ``tau`` is right throughout training);
* :func:`batch_table` — mini-batch bias of every estimator (mean over batches vs the full-data gradient);
* :func:`beta_table` — the role of ``beta`` (a reparametrisation in this model: only ``beta(theta - theta_ref)`` matters);
* :func:`w_radius_table` — WDPO estimators (first-order form, squared penalty, one-step adversarial)
  against the exact continuous-support W2 gradient as functions of ``eps / eps_c``;
* :func:`value_error_table` — first-order W2 value vs the exact W2 value, and :func:`fit_loglog_slope`;
* :func:`sgd_table` — end points of seeded SGD with each estimator vs the exact robust optimum;
* :func:`family_batch_table` and :func:`family_sgd_table` (``drdpo gradients --family``) — the robust
  family (chi2dpo, cvardpo, groupdpo, rdpo, cdpo, dr_dpo; :mod:`drdpo_theory.solvers.family`): each
  member's exact gradient against its mini-batch version (:func:`family_grad` on a batch, the
  estimator of ``drdpo_theory.llm.family``), and SGD with that version against the exact optimum.

Every instance is a seeded :func:`~drdpo_theory.model.make_model` with its exact nominal
distribution P° as data (weights ``P°(z)``); mini-batches are i.i.d. draws from P° (uniform weights).
Radii are given as fractions of the collapse radii (:func:`~drdpo_theory.calibration.collapse_radii`),
so the same fractions mean the same thing on every instance. Wasserstein radii here are in
``x = phi1 - phi2`` (the project's transport cost), and every WDPO approximation is called with
``space="x"``; in the authors' ``z = (phi1, phi2)`` the radius is ``eps / sqrt(2)`` and ``rho0`` is half.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .. import approx as A
from ..calibration import collapse_radii, rho0_for_eps, tau_for_rho
from ..data import PreferenceData
from ..io import read_cell, write_cell, write_csv
from ..losses import dpo_grad
from ..model import make_model

__all__ = [
    "GradientStudyConfig",
    "Instance",
    "make_instance",
    "Estimator",
    "make_estimators",
    "run_sgd",
    "fixed_point",
    "kl_tau_table",
    "kl_path_table",
    "batch_table",
    "beta_table",
    "w_radius_table",
    "value_error_table",
    "fit_loglog_slope",
    "sgd_table",
    "FAMILY_MEMBERS",
    "family_weights",
    "family_grad",
    "family_objective",
    "family_params",
    "GroupEG",
    "family_batch_table",
    "family_sgd_table",
    "FAMILY_TABLES",
    "run_study",
    "summarize",
]


@dataclass(frozen=True)
class GradientStudyConfig:
    """Grid of the gradient study. Every field is a knob of one table; ``quick()`` shrinks them."""

    instances: tuple = (0, 1, 2)
    """model seeds (``make_model(seed=...)``)."""
    n_prompts: int = 4
    n_answers: int = 4
    d: int = 4
    beta: float = 1.0
    """DPO temperature."""
    radius: float = 4.0
    """parameter ball ``||theta|| <= B``."""
    theta_star_norm: float = 2.0
    """``||theta*||``: sets how informative the labels are."""
    radius_fracs: tuple = (0.1, 0.3, 0.6, 0.9)
    """KL radii ``rho / rho_c`` and W2 radii ``eps / eps_c`` (collapse radii of each instance)."""
    tau_mults: tuple = tuple(float(t) for t in np.geomspace(1 / 16, 16, 17))
    """``tau / lam*`` grid (includes 1)."""
    n_points: int = 3
    """random evaluation points per instance: ``theta_opt + point_scale ||theta_DPO|| e`` (e a random unit vector)."""
    point_scale: float = 0.5
    batch_sizes: tuple = (4, 16, 64, 256)
    n_batches: int = 2000
    """mini-batches per batch size (their mean gradient estimates the estimator's expectation)."""
    betas: tuple = (0.25, 0.5, 1.0, 2.0, 4.0)
    value_eps: tuple = tuple(float(e) for e in np.geomspace(1e-3, 1e-1, 9))
    """absolute W2 radii (x-space) for the value-error fit."""
    path_steps: int = 300
    """full-batch exact gradient-descent steps of the lam* path."""
    path_eta: float = 2.0
    sgd_steps: int = 4000
    sgd_batch: int = 64
    sgd_eta0: float = 4.0
    """step size ``eta_k = eta0 / sqrt(1 + k / (steps/10))``; iterates averaged over the second half."""
    sgd_seeds: tuple = (0, 1, 2)
    fixed_point_steps: int = 1500
    """full-batch gradient-descent steps (step ``sgd_eta0``) for each estimator's noise-free fixed point."""
    sgd_frac: float = 0.5
    """radius fraction (of the collapse radius) used for SGD and the batch study; for the family
    also chi2dpo's ``rho / rho_c`` and cvardpo's ``(1 - alpha) / (1 - alpha_c)``."""
    family_eps: float = 0.1
    """family tables: rdpo's flip rate and cdpo's label smoothing."""
    beta_prime: float = 1.0
    """family tables: Dr.DPO's temperature ``beta'``."""
    group_step: float = 0.01
    """family tables: the EG step of group DPO's online group weights (the torch trainer's default)."""

    @classmethod
    def quick(cls) -> "GradientStudyConfig":
        """A grid that runs in well under 3 minutes on 2 cores (``--quick``)."""
        return cls(instances=(0, 1), radius_fracs=(0.1, 0.5, 0.9),
                   tau_mults=tuple(float(t) for t in np.geomspace(1 / 16, 16, 9)), n_points=2,
                   batch_sizes=(4, 16, 64), n_batches=600, betas=(0.25, 1.0, 4.0),
                   value_eps=tuple(float(e) for e in np.geomspace(1e-3, 1e-1, 5)), path_steps=150,
                   sgd_steps=3000, sgd_seeds=(0, 1))

    def key(self, family: bool = False) -> str:
        """Short hash of the configuration (names the cached cells); the family fields count only
        for the family tables (``family=True``), so adding them left the other cells' names alone."""
        d = asdict(self)
        if not family:
            for k in _FAMILY_FIELDS:
                d.pop(k)
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


_FAMILY_FIELDS = ("family_eps", "beta_prime", "group_step")


@dataclass
class Instance:
    """One seeded model with its nominal data, exact optima and collapse radii."""

    seed: int
    data: PreferenceData
    beta: float
    radius: float
    theta_dpo: np.ndarray
    radii: dict
    points: dict = field(default_factory=dict)
    """name -> (d,) evaluation points."""
    groups: np.ndarray | None = None
    """(n,) prompt index of each tuple: the groups of groupdpo in the family tables."""


def make_instance(seed: int, cfg: GradientStudyConfig) -> Instance:
    """The model ``make_model(seed)``, its P° as weighted data, the DPO optimum and collapse radii."""
    from ..solvers.dpo import solve_dpo

    model = make_model(n_prompts=cfg.n_prompts, n_answers=cfg.n_answers, d=cfg.d, beta=cfg.beta,
                       radius=cfg.radius, theta_star_norm=cfg.theta_star_norm, seed=seed)
    data = model.nominal().as_data()
    th = solve_dpo(data, cfg.beta, cfg.radius).theta
    rng = np.random.default_rng(10_000 + seed)
    dirs = rng.standard_normal((cfg.n_points, data.d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    inst = Instance(seed, data, cfg.beta, cfg.radius, th, collapse_radii(data), groups=model.nominal().s.copy())
    inst.points = {"dpo": th}
    for k in range(cfg.n_points):
        inst.points[f"rand{k}"] = th * 0.5 + cfg.point_scale * np.linalg.norm(th) * dirs[k]
    return inst


# ----------------------------------------------------------------------------------------------
# estimators
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimator:
    """A gradient estimator ``fn(theta, batch) -> (d,)`` with the exact problem it approximates."""

    name: str
    family: str
    """``"dpo"``, ``"kl"`` or ``"w2"``: which exact optimum is its target."""
    fn: Callable
    params: dict = field(default_factory=dict)


def make_estimators(data: PreferenceData, beta: float, radius: float, rho: float, eps: float,
                    theta_kl: np.ndarray, theta_dpo: np.ndarray, theta_w2: np.ndarray | None = None,
                    families=("dpo", "kl", "w2")) -> list[Estimator]:
    """The estimators compared in the SGD study, with their hyper-parameters (docs/approximations.md):

    * ``kl_clamped`` / ``kl_softmax``: ``tau = lam*(rho)`` at the exact KLDPO optimum ``theta_kl``
      (oracle: the best single tau in hindsight); ``kl_clamped_dpo_tau``: ``tau = lam*(rho)`` at the
      DPO solution (what a user can compute before training);
    * ``kl_calibrated``: ``lam*`` solved on each batch (no tau);
    * ``w2_first_order`` (Gao) and ``w2_adversarial`` (one step, ``eta = eps/sqrt(G_batch)``): ``eps``;
    * ``w2_sq_penalty``: ``rho0 = eps / (2 sqrt(G))`` (gradient rule) at ``theta_w2`` (oracle; skipped
      when ``theta_w2`` is None); ``w2_sq_penalty_dpo``: the same rule at the DPO solution.
    """
    out = [Estimator("dpo", "dpo", lambda th, b: A.dpo_grad_batch(th, b, beta))]
    if "kl" in families:
        tau = tau_for_rho(theta_kl, data, beta, rho)
        tau_d = tau_for_rho(theta_dpo, data, beta, rho)
        out += [
            Estimator("kl_clamped", "kl", lambda th, b: A.kldpo_grad_clamped(th, b, beta, tau), {"tau": tau}),
            Estimator("kl_softmax", "kl", lambda th, b: A.kldpo_grad_softmax(th, b, beta, tau), {"tau": tau}),
            Estimator("kl_clamped_dpo_tau", "kl", lambda th, b: A.kldpo_grad_clamped(th, b, beta, tau_d),
                      {"tau": tau_d}),
            Estimator("kl_calibrated", "kl", lambda th, b: A.kldpo_grad_calibrated(th, b, beta, rho), {"rho": rho}),
        ]
    if "w2" in families:
        out += [
            Estimator("w2_first_order", "w2", lambda th, b: A.wdpo_grad_first_order(th, b, beta, eps, "x"), {"eps": eps}),
            Estimator("w2_adversarial", "w2", lambda th, b: A.wdpo_grad_adversarial(th, b, beta, eps=eps, space="x"),
                      {"eps": eps}),
        ]
        if theta_w2 is not None:
            r_o = rho0_for_eps(theta_w2, data, beta, eps, "gradient", space="x")
            out.append(Estimator("w2_sq_penalty", "w2", lambda th, b: A.wdpo_grad_sq_penalty(th, b, beta, r_o, "x"),
                                 {"rho0": r_o}))
        r_d = rho0_for_eps(theta_dpo, data, beta, eps, "gradient", space="x")
        out.append(Estimator("w2_sq_penalty_dpo", "w2", lambda th, b: A.wdpo_grad_sq_penalty(th, b, beta, r_d, "x"),
                             {"rho0": r_d}))
    return out


def _point_estimators(data: PreferenceData, beta: float, rho: float, eps: float, theta) -> list[Estimator]:
    """Estimators with ``tau`` and ``rho0`` calibrated on the full data at ``theta`` itself, so that on
    the full data each equals the exact gradient (KL) or the first-order one (W2): what is left on
    a mini-batch is the mini-batch effect alone."""
    tau = tau_for_rho(theta, data, beta, rho)
    rho0 = rho0_for_eps(theta, data, beta, eps, "gradient", space="x")
    return [
        Estimator("dpo", "dpo", lambda th, b: A.dpo_grad_batch(th, b, beta)),
        Estimator("kl_clamped", "kl", lambda th, b: A.kldpo_grad_clamped(th, b, beta, tau)),
        Estimator("kl_softmax", "kl", lambda th, b: A.kldpo_grad_softmax(th, b, beta, tau)),
        Estimator("kl_calibrated", "kl", lambda th, b: A.kldpo_grad_calibrated(th, b, beta, rho)),
        Estimator("w2_first_order", "w2", lambda th, b: A.wdpo_grad_first_order(th, b, beta, eps, "x")),
        Estimator("w2_sq_penalty", "w2", lambda th, b: A.wdpo_grad_sq_penalty(th, b, beta, rho0, "x")),
        Estimator("w2_adversarial", "w2", lambda th, b: A.wdpo_grad_adversarial(th, b, beta, eps=eps, space="x")),
    ]


def _batches(data: PreferenceData, size: int, count: int, seed: int) -> np.ndarray:
    """(count, size) i.i.d. indices drawn from ``data.weights`` (common random numbers across estimators)."""
    rng = np.random.default_rng(seed)
    return rng.choice(data.n, size=(count, size), p=data.weights)


def _batch(data: PreferenceData, idx) -> PreferenceData:
    return PreferenceData(data.x[idx], data.y[idx], None, data.theta_ref, source="batch")


def run_sgd(grad_fn: Callable, data: PreferenceData, radius: float, *, steps: int, batch_size: int,
            eta0: float, seed: int, theta0=None, pass_index: bool = False) -> np.ndarray:
    """Projected SGD on ``||theta|| <= B`` with i.i.d. mini-batches from ``data.weights``.

    ``theta_{k+1} = Proj(theta_k - eta_k grad_fn(theta_k, batch_k))``, ``eta_k = eta0 / sqrt(1 + 10 k / steps)``,
    started at ``theta_ref`` (or ``theta0``); returns the average of the iterates of the second half
    (Polyak-Ruppert). The batch sequence depends only on ``seed``, so estimators see the same batches.
    ``pass_index``: call ``grad_fn(theta, batch, idx)`` with the batch's indices into ``data`` (for
    per-tuple side information such as groups).
    """
    idx = _batches(data, batch_size, steps, seed)
    theta = (data.theta_ref if theta0 is None else np.asarray(theta0, float)).copy()
    avg = np.zeros_like(theta)
    n_avg = 0
    for k in range(steps):
        b = _batch(data, idx[k])
        g = grad_fn(theta, b, idx[k]) if pass_index else grad_fn(theta, b)
        theta = theta - eta0 / math.sqrt(1.0 + 10.0 * k / steps) * g
        nt = np.linalg.norm(theta)
        if nt > radius:
            theta *= radius / nt
        if k >= steps // 2:
            n_avg += 1
            avg += (theta - avg) / n_avg
    return avg


def fixed_point(grad_fn: Callable, data: PreferenceData, radius: float, *, steps: int, eta: float,
                theta0=None) -> np.ndarray:
    """Projected full-batch gradient descent ``theta <- Proj(theta - eta grad_fn(theta, data))`` from
    ``theta_ref``: the noise-free fixed point of an estimator on the full (weighted) data."""
    theta = (data.theta_ref if theta0 is None else np.asarray(theta0, float)).copy()
    for _ in range(steps):
        theta = theta - eta * grad_fn(theta, data)
        nt = np.linalg.norm(theta)
        if nt > radius:
            theta *= radius / nt
    return theta


# ----------------------------------------------------------------------------------------------
# KL tables
# ----------------------------------------------------------------------------------------------


def _kl_opt(inst: Instance, rho: float):
    from ..solvers.kl import solve_kldpo

    return solve_kldpo(inst.data, inst.beta, inst.radius, rho)


def kl_tau_table(inst: Instance, cfg: GradientStudyConfig) -> pd.DataFrame:
    """Cosine / relative error / norm ratio of the KLDPO estimators vs the exact gradient.

    Rows: one per (rho_frac, point, tau_mult, estimator). Evaluation points: ``theta_DPO`` and
    random points around ``theta_DPO/2`` (:func:`make_instance`). ``clamp_frac`` is the share of the
    P°-mass whose weight hits the clamp 10; ``mean_w`` the authors' norm inflation ``sum_i p_i w_i``.
    """
    data, beta = inst.data, inst.beta
    rows = []
    for frac in cfg.radius_fracs:
        rho = frac * inst.radii["kl_rho_c"]
        for pname, th in inst.points.items():
            g_ex = A.kldpo_grad_exact(th, data, beta, rho)
            lam = tau_for_rho(th, data, beta, rho)
            g_cal = A.kldpo_grad_calibrated(th, data, beta, rho)
            rows.append(dict(rho_frac=frac, rho=rho, point=pname, lam_star=lam, tau=lam, tau_mult=1.0,
                             estimator="kl_calibrated", cosine=A.cosine(g_cal, g_ex), rel_err=A.rel_error(g_cal, g_ex),
                             norm_ratio=_ratio(g_cal, g_ex), clamp_frac=0.0, mean_w=1.0))
            l = A.batch_losses(th, data, beta)
            for m in cfg.tau_mults:
                tau = m * lam
                w = A.kl_tilt_weights(l, data.weights, tau, normalise=False)
                for name, fn in (("kl_clamped", A.kldpo_grad_clamped), ("kl_softmax", A.kldpo_grad_softmax)):
                    g = fn(th, data, beta, tau)
                    rows.append(dict(rho_frac=frac, rho=rho, point=pname, lam_star=lam, tau=tau, tau_mult=m,
                                     estimator=name, cosine=A.cosine(g, g_ex), rel_err=A.rel_error(g, g_ex),
                                     norm_ratio=_ratio(g, g_ex),
                                     clamp_frac=float(data.weights @ (w >= A.KL_WEIGHT_CLAMP)),
                                     mean_w=float(data.weights @ w)))
    return _tag(pd.DataFrame(rows), inst)


def _ratio(g, g_ref) -> float:
    n = float(np.linalg.norm(g_ref))
    return float(np.linalg.norm(g)) / n if n > 0 else float("nan")


def _tag(df: pd.DataFrame, inst: Instance) -> pd.DataFrame:
    df.insert(0, "instance", inst.seed)
    return df


def kl_path_table(inst: Instance, cfg: GradientStudyConfig) -> pd.DataFrame:
    """``lam*(theta_k)`` along exact full-batch gradient descent on ``L_KL`` from ``theta_ref``.

    For each ``rho_frac`` and step ``k``: ``lam_star``, and the cosine to the exact gradient of the
    clamped and normalised estimators with ``tau`` frozen at ``lam*`` of the end point (the value a
    user calibrating at convergence would pick) and at ``lam*`` of step 1 (calibrating at the start).
    """
    data, beta = inst.data, inst.beta
    rows = []
    for frac in cfg.radius_fracs:
        rho = frac * inst.radii["kl_rho_c"]
        th = data.theta_ref.copy()
        traj = []
        for k in range(cfg.path_steps):
            th = th - cfg.path_eta * A.kldpo_grad_exact(th, data, beta, rho)
            nt = np.linalg.norm(th)
            if nt > inst.radius:
                th *= inst.radius / nt
            traj.append(th.copy())
        lams = [tau_for_rho(t, data, beta, rho) for t in traj]
        tau_end, tau_start = lams[-1], lams[0]
        keep = sorted(set(np.unique(np.geomspace(1, cfg.path_steps, 25).astype(int) - 1).tolist()))
        for k in keep:
            t = traj[k]
            g_ex = A.kldpo_grad_exact(t, data, beta, rho)
            row = dict(rho_frac=frac, rho=rho, step=k + 1, lam_star=lams[k], tau_end=tau_end, tau_start=tau_start,
                       grad_norm=float(np.linalg.norm(g_ex)))
            for tname, tau in (("end", tau_end), ("start", tau_start)):
                if tau > 0:
                    row[f"cos_clamped_tau_{tname}"] = A.cosine(A.kldpo_grad_clamped(t, data, beta, tau), g_ex)
                    row[f"cos_softmax_tau_{tname}"] = A.cosine(A.kldpo_grad_softmax(t, data, beta, tau), g_ex)
                    row[f"normratio_clamped_tau_{tname}"] = _ratio(A.kldpo_grad_clamped(t, data, beta, tau), g_ex)
            rows.append(row)
    return _tag(pd.DataFrame(rows), inst)


def beta_table(inst: Instance, cfg: GradientStudyConfig) -> pd.DataFrame:
    """KLDPO estimators across ``beta`` at a fixed ``theta`` (``theta_DPO`` of ``cfg.beta``).

    ``tau`` either recalibrated (``lam*`` at each beta) or frozen at ``lam*`` of ``cfg.beta``. In this
    model the losses depend on ``beta (theta - theta_ref)`` only, so a change of beta at fixed
    theta is a change of the margins' scale.
    """
    data = inst.data
    rows = []
    th = inst.points["rand0"] if "rand0" in inst.points else inst.theta_dpo
    rho = cfg.sgd_frac * inst.radii["kl_rho_c"]
    tau0 = tau_for_rho(th, data, cfg.beta, rho)
    for beta in cfg.betas:
        g_ex = A.kldpo_grad_exact(th, data, beta, rho)
        lam = tau_for_rho(th, data, beta, rho)
        l = A.batch_losses(th, data, beta)
        for tname, tau in (("lam_star", lam), ("frozen", tau0)):
            w = A.kl_tilt_weights(l, data.weights, tau, normalise=False)
            for name, fn in (("kl_clamped", A.kldpo_grad_clamped), ("kl_softmax", A.kldpo_grad_softmax)):
                g = fn(th, data, beta, tau)
                rows.append(dict(beta=beta, rho=rho, tau_rule=tname, tau=tau, lam_star=lam, estimator=name,
                                 cosine=A.cosine(g, g_ex), rel_err=A.rel_error(g, g_ex), norm_ratio=_ratio(g, g_ex),
                                 mean_w=float(data.weights @ w), loss_spread=float(np.sqrt(data.weights @ (l - data.weights @ l) ** 2))))
    return _tag(pd.DataFrame(rows), inst)


# ----------------------------------------------------------------------------------------------
# batch bias (KL and W2)
# ----------------------------------------------------------------------------------------------


def batch_table(inst: Instance, cfg: GradientStudyConfig) -> pd.DataFrame:
    """Mini-batch bias of each estimator at the random evaluation points.

    ``tau`` and ``rho0`` are calibrated on the full data at the evaluation point
    (:func:`_point_estimators`), so the full-data versions are exact (KL) or first-order (W2).
    For batch size ``b`` and ``cfg.n_batches`` i.i.d. batches: ``bias = ||mean_batches g_b - g*|| / ||g*||``
    (``g*``: the exact full-data gradient of the estimator's family; the mean over batches uses the
    DPO batch gradient as a control variate), ``mc_se`` its Monte-Carlo standard error (a bias
    below ~2 mc_se is not resolved), ``mean_cos`` the mean per-batch cosine and
    ``mean_norm_ratio`` the mean ``||g_b|| / ||g*||`` (noise included). The full-data bias of each
    estimator is 0 here by calibration, so ``bias`` is the mini-batch effect; for ``dpo`` it is 0.
    """
    data, beta = inst.data, inst.beta
    rho = cfg.sgd_frac * inst.radii["kl_rho_c"]
    eps = cfg.sgd_frac * inst.radii["w2_eps_c"]
    rows = []
    for pname, th in inst.points.items():
        if pname == "dpo":  # the DPO gradient vanishes there: relative errors are undefined
            continue
        exact = {"dpo": A.dpo_grad_batch(th, data, beta), "kl": A.kldpo_grad_exact(th, data, beta, rho),
                 "w2": A.wdpo_grad_exact(th, data, beta, eps, p=2)}
        ests = _point_estimators(data, beta, rho, eps, th)
        for b in cfg.batch_sizes:
            idx = _batches(data, b, cfg.n_batches, seed=1000 * inst.seed + b)
            batches = [_batch(data, i) for i in idx]
            G_dpo = np.array([A.dpo_grad_batch(th, bt, beta) for bt in batches])  # (n_batches, d)
            for est in ests:
                g_ref = exact[est.family]
                G = np.array([est.fn(th, bt) for bt in batches])  # (n_batches, d)
                # control variate: E g_b = E[g_b - g_dpo,b] + g_dpo (the DPO batch gradient is unbiased
                # and strongly correlated with g_b), so the bias is resolved with far fewer batches.
                D = G - G_dpo
                mean = D.mean(axis=0) + exact["dpo"]
                nref = float(np.linalg.norm(g_ref))
                rows.append(dict(point=pname, batch_size=b, estimator=est.name, family=est.family,
                                 bias=float(np.linalg.norm(mean - g_ref)) / nref,
                                 mc_se=float(np.linalg.norm(D.std(axis=0, ddof=1))) / math.sqrt(len(D)) / nref,
                                 mean_cos=float(np.mean([A.cosine(g, g_ref) for g in G])),
                                 mean_norm_ratio=float(np.mean(np.linalg.norm(G, axis=1))) / nref,
                                 cos_of_mean=A.cosine(mean, g_ref), rho=rho, eps=eps))
    return _tag(pd.DataFrame(rows), inst)


# ----------------------------------------------------------------------------------------------
# WDPO tables
# ----------------------------------------------------------------------------------------------


def w_radius_table(inst: Instance, cfg: GradientStudyConfig) -> pd.DataFrame:
    """WDPO estimators vs the exact continuous-support W2 gradient across ``eps / eps_c``.

    Estimators (full data, x-space): ``w2_first_order`` (Gao), ``w2_sq_penalty`` with ``rho0`` from
    the gradient rule at ``theta_DPO`` (calibrated once, used at every point), ``w2_sq_penalty_value``
    (value rule at ``theta_DPO``), ``w2_adversarial`` (one step, ``eta = eps / sqrt(G)``), and ``dpo``
    (the non-robust gradient, to show how far the robust one is from it).
    """
    data, beta = inst.data, inst.beta
    rows = []
    for frac in cfg.radius_fracs:
        eps = frac * inst.radii["w2_eps_c"]
        rho0_g = rho0_for_eps(inst.theta_dpo, data, beta, eps, "gradient", space="x")
        rho0_v = rho0_for_eps(inst.theta_dpo, data, beta, eps, "value", space="x")
        for pname, th in inst.points.items():
            g_ex = A.wdpo_grad_exact(th, data, beta, eps, p=2)
            cands = {
                "dpo": A.dpo_grad_batch(th, data, beta),
                "w2_first_order": A.wdpo_grad_first_order(th, data, beta, eps, "x"),
                "w2_sq_penalty": A.wdpo_grad_sq_penalty(th, data, beta, rho0_g, "x"),
                "w2_sq_penalty_value": A.wdpo_grad_sq_penalty(th, data, beta, rho0_v, "x"),
                "w2_adversarial": A.wdpo_grad_adversarial(th, data, beta, eps=eps, space="x"),
            }
            # cosine of the robust correction itself (g - g_dpo): the part the approximation must get right
            corr_ex = g_ex - cands["dpo"]
            for name, g in cands.items():
                rows.append(dict(eps_frac=frac, eps=eps, point=pname, estimator=name, cosine=A.cosine(g, g_ex),
                                 rel_err=A.rel_error(g, g_ex), norm_ratio=_ratio(g, g_ex),
                                 corr_cosine=A.cosine(g - cands["dpo"], corr_ex) if name != "dpo" else float("nan"),
                                 corr_rel_err=A.rel_error(g - cands["dpo"], corr_ex) if name != "dpo" else float("nan"),
                                 rho0=rho0_g if name == "w2_sq_penalty" else (rho0_v if name == "w2_sq_penalty_value" else float("nan"))))
    return _tag(pd.DataFrame(rows), inst)


def value_error_table(inst: Instance, cfg: GradientStudyConfig) -> pd.DataFrame:
    """Exact continuous-support W2 robust value vs Gao's first-order value, across ``eps``.

    ``error = exact - first_order`` (>= 0: the first-order form underestimates), at ``theta_DPO``
    and the random points. The first-order expansion is about moving ``x`` infinitesimally, so the
    comparison is with the continuous-support W2 value (on a finite support the increase is
    linear in ``eps^2`` for small ``eps``, not ``eps``).
    """
    data, beta = inst.data, inst.beta
    rows = []
    for pname, th in inst.points.items():
        base = float(data.weights @ A.batch_losses(th, data, beta))
        for eps in cfg.value_eps:
            ex = A.w2_value_continuous(th, data, beta, eps)
            fo = A.first_order_value(th, data, beta, eps, space="x")
            rows.append(dict(point=pname, eps=eps, exact=ex, first_order=fo, dpo_value=base, error=ex - fo,
                             rel_error=(ex - fo) / (ex - base) if ex > base else float("nan")))
    return _tag(pd.DataFrame(rows), inst)


def fit_loglog_slope(x, y) -> tuple[float, float]:
    """Least-squares fit ``log y = slope log x + c``; returns ``(slope, c)`` (``y > 0`` entries only)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = (x > 0) & (y > 0)
    if keep.sum() < 2:
        return float("nan"), float("nan")
    slope, c = np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)
    return float(slope), float(c)


# ----------------------------------------------------------------------------------------------
# SGD end points
# ----------------------------------------------------------------------------------------------


def sgd_table(inst: Instance, cfg: GradientStudyConfig) -> pd.DataFrame:
    """``||theta_SGD - theta_exact||`` for every estimator and SGD seed (same batches for all).

    Targets: DPO (``solve_dpo``), KLDPO at ``rho = sgd_frac rho_c`` (``solve_kldpo``), W2-WDPO at
    ``eps = sgd_frac eps_c`` (:func:`~drdpo_theory.approx.solve_w2_continuous`). ``excess`` is the
    exact robust objective of the end point minus the optimum. ``fixed_point_err`` is the error of
    the estimator's full-data fixed point (full-batch gradient descent, no noise): the part of
    ``err`` that more steps or larger batches would not remove. The ``dpo`` row is SGD's own error
    (noise and schedule) against the DPO optimum: the floor the robust rows should be compared with.
    """
    from ..solvers.dpo import solve_dpo
    from ..solvers.kl import kldpo_objective

    data, beta, B = inst.data, inst.beta, inst.radius
    rho = cfg.sgd_frac * inst.radii["kl_rho_c"]
    eps = cfg.sgd_frac * inst.radii["w2_eps_c"]
    r_dpo = solve_dpo(data, beta, B)
    r_kl = _kl_opt(inst, rho)
    r_w2 = A.solve_w2_continuous(data, beta, B, eps)
    targets = {"dpo": (r_dpo.theta, lambda t: float(data.weights @ A.batch_losses(t, data, beta)), r_dpo.objective),
               "kl": (r_kl.theta, lambda t: kldpo_objective(t, data, beta, rho), r_kl.objective),
               "w2": (r_w2.theta, lambda t: A.w2_value_continuous(t, data, beta, eps), r_w2.objective)}
    ests = make_estimators(data, beta, B, rho, eps, r_kl.theta, r_dpo.theta, r_w2.theta)
    full = {est.name: fixed_point(est.fn, data, B, steps=cfg.fixed_point_steps, eta=cfg.sgd_eta0) for est in ests}
    rows = []
    for seed in cfg.sgd_seeds:
        for est in ests:
            th = run_sgd(est.fn, data, B, steps=cfg.sgd_steps, batch_size=cfg.sgd_batch, eta0=cfg.sgd_eta0,
                         seed=1000 * inst.seed + seed)
            t_ex, f, f_opt = targets[est.family]
            rows.append(dict(sgd_seed=seed, estimator=est.name, family=est.family, rho=rho, eps=eps,
                             err=float(np.linalg.norm(th - t_ex)),
                             err_rel=float(np.linalg.norm(th - t_ex) / max(np.linalg.norm(t_ex - data.theta_ref), 1e-300)),
                             dist_to_dpo=float(np.linalg.norm(th - r_dpo.theta)),
                             target_dist_to_dpo=float(np.linalg.norm(t_ex - r_dpo.theta)),
                             excess=f(th) - f_opt, fixed_point_err=float(np.linalg.norm(full[est.name] - t_ex)),
                             **{f"param_{k}": v for k, v in est.params.items()}))
    return _tag(pd.DataFrame(rows), inst)


# ----------------------------------------------------------------------------------------------
# the robust family (chi2dpo, cvardpo, groupdpo, rdpo, cdpo, dr_dpo)
# ----------------------------------------------------------------------------------------------

#: the family members of :mod:`drdpo_theory.solvers.family`, in the order of its ``FAMILY_METHODS``
FAMILY_MEMBERS = ("chi2dpo", "cvardpo", "groupdpo", "rdpo", "cdpo", "dr_dpo")


def family_weights(method: str, losses, weights, *, rho: float | None = None, alpha: float | None = None,
                   groups=None, beta_prime: float | None = None) -> np.ndarray:
    """The distribution ``q`` (n,) whose ``sum_i q_i grad l_i`` is the member's gradient at these losses.

    chi2dpo / cvardpo: the exact worst case of the inner sup (``chi2_inner`` / ``cvar_inner``);
    groupdpo: ``q_i = w_i / w(g*)`` on the worst group ``g*`` among the groups present (``group_inner``);
    dr_dpo: the soft-min weights ``q ∝ w exp(-l / beta')``. These are the weights
    ``drdpo_theory.llm.family.family_multipliers`` returns as ``m = n q`` for a torch batch (Danskin's
    theorem: at a unique worst case the gradient of the robust value is the ``q``-weighted gradient).
    """
    from ..solvers.family import _dr_value, chi2_inner, cvar_inner, group_inner

    l = np.asarray(losses, float)
    w = np.asarray(weights, float)
    if method == "chi2dpo":
        return chi2_inner(l, w, rho).q
    if method == "cvardpo":
        return cvar_inner(l, w, alpha).q
    if method == "groupdpo":
        if groups is None:
            raise ValueError("groupdpo needs the (n,) group labels")
        return group_inner(l, w, np.asarray(groups)).q
    if method == "dr_dpo":
        if beta_prime is None or not beta_prime > 0:
            raise ValueError(f"dr_dpo needs beta_prime > 0, got {beta_prime!r}")
        return _dr_value(l, w, float(beta_prime))[1]
    raise ValueError(f"{method!r} has no weights; expected one of chi2dpo, cvardpo, groupdpo, dr_dpo")


def family_grad(method: str, theta, batch: PreferenceData, beta: float, *, rho: float | None = None,
                alpha: float | None = None, eps: float | None = None, groups=None,
                beta_prime: float | None = None) -> np.ndarray:
    """Gradient (d,) of the member's objective on ``batch`` (its weights as the nominal ``p``) at ``theta``.

    On the full data this is the exact gradient (chi2/CVaR/group: Danskin with the exact worst case;
    Dr.DPO: the soft-min weights; rdpo/cdpo: ``grad l - eps beta u / (1 - 2 eps)`` and
    ``grad l + eps beta u``, from ``l(-t) = l(t) + t``); on a mini-batch it is the member's batch
    version, the estimator the torch losses use: batch worst case (chi2/CVaR), worst group present in the
    batch (groupdpo), batch soft-min (Dr.DPO), all biased; rdpo/cdpo are per-pair, so unbiased.
    ``groups``: (n,) labels of the batch's tuples (groupdpo).
    """
    G = dpo_grad(theta, batch.x, batch.y, beta, batch.theta_ref)  # (n, d) per-pair grad l_i
    w = batch.weights
    if method in ("rdpo", "cdpo"):
        if eps is None:
            raise ValueError(f"{method} needs eps")
        c = -eps / (1.0 - 2.0 * eps) if method == "rdpo" else eps
        return w @ G + c * beta * (w @ batch.u)
    q = family_weights(method, A.batch_losses(theta, batch, beta), w, rho=rho, alpha=alpha, groups=groups,
                       beta_prime=beta_prime)
    return q @ G


class GroupEG:
    """Online exponentiated-gradient group weights of group DPO (Ramesh et al. 2024), in numpy: the
    update of ``drdpo_theory.llm.family.GroupEGState`` (the torch trainer's default for groupdpo).

    ``q`` is a distribution over ``labels`` kept across steps. :meth:`grad` on a batch with per-pair
    ``groups``: with ``L_g`` the batch's weighted mean loss of each group present, first
    ``q_g <- q_g exp(step L_g)`` for the present groups and renormalise; then the gradient of
    ``sum_{g present} q_g L_g / sum_{g present} q_g`` with ``q`` held fixed.
    """

    def __init__(self, labels, step: float = 0.01):
        self.labels = np.unique(np.asarray(labels, dtype=np.int64))
        if not (math.isfinite(step) and step > 0):
            raise ValueError(f"the EG step must be a finite number > 0, got {step!r}")
        self.step = float(step)
        self.q = np.full(self.labels.size, 1.0 / self.labels.size)

    def pair_weights(self, losses, weights, groups) -> np.ndarray:
        """EG update on these losses, then the per-pair distribution (n,) of the weighted group mean."""
        l, p = np.asarray(losses, float), np.asarray(weights, float)
        idx = np.searchsorted(self.labels, np.asarray(groups, dtype=np.int64))
        mass = np.bincount(idx, weights=p, minlength=self.labels.size)
        present = mass > 0
        L = np.zeros(self.labels.size)
        L[present] = np.bincount(idx, weights=p * l, minlength=self.labels.size)[present] / mass[present]
        a = np.log(self.q) + self.step * np.where(present, L, 0.0)
        e = np.exp(a - a.max())
        self.q = e / e.sum()
        pi = np.where(present, self.q, 0.0)
        pi = pi / pi.sum()
        return pi[idx] * p / np.where(present, mass, 1.0)[idx]

    def grad(self, theta, batch: PreferenceData, beta: float, groups) -> np.ndarray:
        q = self.pair_weights(A.batch_losses(theta, batch, beta), batch.weights, groups)
        return q @ dpo_grad(theta, batch.x, batch.y, beta, batch.theta_ref)


#: each member's parameter (the keyword of ``drdpo_theory.solvers.family.<method>_objective`` after beta)
FAMILY_PARAM = {"chi2dpo": "rho", "cvardpo": "alpha", "groupdpo": "groups", "rdpo": "eps", "cdpo": "eps",
                "dr_dpo": "beta_prime"}


def family_objective(method: str, theta, data: PreferenceData, beta: float, **params) -> float:
    """The member's exact objective at ``theta`` (``drdpo_theory.solvers.family.<method>_objective``)."""
    from ..solvers import family as F

    if method not in FAMILY_PARAM:
        raise ValueError(f"unknown family member {method!r}; expected one of {FAMILY_MEMBERS}")
    return getattr(F, f"{method}_objective")(theta, data, beta, params[FAMILY_PARAM[method]])


def family_params(data: PreferenceData, groups, frac: float, eps: float, beta_prime: float) -> dict[str, dict]:
    """Each member's parameters on ``data``, stated relative to its collapse threshold where one exists
    (docs/theory_family.md): chi2dpo ``rho = frac rho_c``; cvardpo ``alpha = 1 - frac (1 - alpha_c)``
    (``alpha = 1`` is DPO, ``alpha_c`` collapses to ``theta_ref``); groupdpo ``groups``; rdpo and cdpo
    ``eps``; dr_dpo ``beta'``. Returns member -> keyword arguments of :func:`family_grad` /
    :func:`drdpo_theory.solvers.solve`."""
    from ..solvers.family import chi2_collapse_threshold, cvar_collapse_threshold

    rho_c = chi2_collapse_threshold(data)
    if not math.isfinite(rho_c):
        raise ValueError("chi2dpo: 0 is outside the hull of the u_i (rho_c = inf); no radius fraction exists")
    alpha_c = cvar_collapse_threshold(data)
    return {"chi2dpo": {"rho": frac * rho_c}, "cvardpo": {"alpha": 1.0 - frac * (1.0 - alpha_c)},
            "groupdpo": {"groups": np.asarray(groups)}, "rdpo": {"eps": eps}, "cdpo": {"eps": eps},
            "dr_dpo": {"beta_prime": beta_prime}}


def _scalar_params(kw: dict) -> dict:
    return {f"param_{k}": float(v) for k, v in kw.items() if k != "groups"}


def family_batch_table(inst: Instance, cfg: GradientStudyConfig) -> pd.DataFrame:
    """Mini-batch bias of each member's batch version against its exact gradient.

    At every evaluation point, for batch size ``b`` and ``cfg.n_batches`` i.i.d. batches drawn from P°
    (the same batches for every member): ``bias = ||mean_batches g_b - g*|| / ||g*||`` with ``g*`` the
    exact full-data gradient (:func:`family_grad` on P°) and the DPO batch gradient as control
    variate (as :func:`batch_table`), ``mc_se`` its Monte-Carlo standard error, ``mean_cos`` the mean
    per-batch cosine. Parameters: :func:`family_params` with ``cfg.sgd_frac``; groupdpo's groups are
    the prompts. rdpo and cdpo are per-pair losses: their batch gradient is unbiased (bias within
    ~2 mc_se of 0), the check that the machinery adds no bias of its own. A (point, member) whose
    exact gradient is below 1e-9 (a stationary point) has no row.
    """
    data, beta = inst.data, inst.beta
    params = family_params(data, inst.groups, cfg.sgd_frac, cfg.family_eps, cfg.beta_prime)
    rows = []
    for pname, th in inst.points.items():
        g_dpo = A.dpo_grad_batch(th, data, beta)
        exact = {m: family_grad(m, th, data, beta, **params[m]) for m in FAMILY_MEMBERS}
        for b in cfg.batch_sizes:
            idx = _batches(data, b, cfg.n_batches, seed=2000 * inst.seed + b)
            batches = [_batch(data, i) for i in idx]
            G_dpo = np.array([A.dpo_grad_batch(th, bt, beta) for bt in batches])
            for m in FAMILY_MEMBERS:
                kw = dict(params[m])
                g_ref = exact[m]
                nref = float(np.linalg.norm(g_ref))
                if nref <= 1e-9:  # a stationary point of the member (groupdpo at theta_DPO on a well-specified
                    continue      # P°: every prompt's mean gradient vanishes): relative errors are undefined
                G = np.array([family_grad(m, th, bt, beta, **{**kw, **({"groups": inst.groups[i]} if m == "groupdpo" else {})})
                              for bt, i in zip(batches, idx)])
                D = G - G_dpo
                mean = D.mean(axis=0) + g_dpo
                rows.append(dict(point=pname, batch_size=b, member=m,
                                 bias=float(np.linalg.norm(mean - g_ref)) / nref,
                                 mc_se=float(np.linalg.norm(D.std(axis=0, ddof=1))) / math.sqrt(len(D)) / nref,
                                 mean_cos=float(np.mean([A.cosine(g, g_ref) for g in G])),
                                 cos_of_mean=A.cosine(mean, g_ref), exact_norm=nref, **_scalar_params(kw)))
    return _tag(pd.DataFrame(rows), inst)


def family_sgd_table(inst: Instance, cfg: GradientStudyConfig) -> pd.DataFrame:
    """SGD end points with each member's batch version (:func:`family_grad` on the batch) against the
    member's exact optimum (:func:`drdpo_theory.solvers.solve`; dr_dpo: its local solution).

    ``err = ||theta_SGD - theta_exact||``, ``excess`` = exact objective at the end point minus the
    solver's objective, ``dpo_err`` the DPO SGD error on the same batches (the noise floor, as the
    ``dpo`` row of :func:`sgd_table`), ``status`` the exact solver's status. ``groupdpo_eg``: group DPO
    trained with the online exponentiated-gradient group weights (:class:`GroupEG`, step ``cfg.group_step``)
    instead of the batch's worst group, against the same optimum.
    """
    from ..solvers import solve
    from ..solvers.dpo import solve_dpo

    data, beta, B = inst.data, inst.beta, inst.radius
    params = family_params(data, inst.groups, cfg.sgd_frac, cfg.family_eps, cfg.beta_prime)
    th_dpo = solve_dpo(data, beta, B).theta
    sgd = dict(steps=cfg.sgd_steps, batch_size=cfg.sgd_batch, eta0=cfg.sgd_eta0)
    rows = []
    dpo_err = {}
    for seed in cfg.sgd_seeds:
        th = run_sgd(lambda t, b: A.dpo_grad_batch(t, b, beta), data, B, seed=1000 * inst.seed + seed, **sgd)
        dpo_err[seed] = float(np.linalg.norm(th - th_dpo))
    for m in FAMILY_MEMBERS:
        kw = params[m]
        r = solve(m, data, beta, B, **kw)

        def grad(t, b, i, m=m, kw=kw):
            return family_grad(m, t, b, beta, **{**kw, **({"groups": kw["groups"][i]} if m == "groupdpo" else {})})

        variants = [(m, grad)]
        if m == "groupdpo":  # also the online EG weights of Ramesh et al. (stateful: one state per SGD run)
            variants.append(("groupdpo_eg", None))
        for name, fn in variants:
            for seed in cfg.sgd_seeds:
                if fn is None:
                    eg = GroupEG(kw["groups"], cfg.group_step)
                    fn_s = (lambda t, b, i, eg=eg, kw=kw: eg.grad(t, b, beta, kw["groups"][i]))
                else:
                    fn_s = fn
                th = run_sgd(fn_s, data, B, seed=1000 * inst.seed + seed, pass_index=True, **sgd)
                rows.append(dict(sgd_seed=seed, member=name, status=r.status, err=float(np.linalg.norm(th - r.theta)),
                                 excess=family_objective(m, th, data, beta, **kw) - r.objective,
                                 target_dist_to_dpo=float(np.linalg.norm(r.theta - th_dpo)), dpo_err=dpo_err[seed],
                                 **_scalar_params(kw)))
    return _tag(pd.DataFrame(rows), inst)


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------

TABLES: dict[str, Callable] = {
    "kl_tau": kl_tau_table,
    "kl_path": kl_path_table,
    "beta": beta_table,
    "batch": batch_table,
    "w_radius": w_radius_table,
    "value_error": value_error_table,
    "sgd": sgd_table,
}

#: the family tables (``drdpo gradients --family``; not part of the default study)
FAMILY_TABLES: dict[str, Callable] = {
    "family_batch": family_batch_table,
    "family_sgd": family_sgd_table,
}


def _cell(inst_seed: int, cfg: GradientStudyConfig, name: str, cache_dir: Path | None) -> pd.DataFrame:
    fam = name in FAMILY_TABLES
    path = None if cache_dir is None else cache_dir / f"{name}_i{inst_seed}_{cfg.key(family=fam)}.csv"
    if path is not None:  # resume: a complete cell (verified by its marker) is not recomputed
        df = read_cell(path, columns=("instance",))
        if df is not None:
            return df
    df = (FAMILY_TABLES if fam else TABLES)[name](make_instance(inst_seed, cfg), cfg)
    if path is not None:
        write_cell(df, path)  # atomic CSV, then its completion marker
    return df


def run_study(cfg: GradientStudyConfig, out_dir: str | Path | None = None, n_jobs: int = 1,
              tables=tuple(TABLES), progress: bool = True) -> dict[str, pd.DataFrame]:
    """Every table of the study, concatenated over instances (``tables``: names in :data:`TABLES`
    and/or :data:`FAMILY_TABLES`).

    ``out_dir``: if given, each (table, instance) cell is cached in ``out_dir/cells/`` (reruns skip
    finished cells; a torn, empty or unmarked cell is recomputed) and the tables are written
    atomically as ``out_dir/<table>.csv``. ``n_jobs``: joblib processes over cells (>= 1 or -1,
    capped at the CPU count); the tables are in cell order for every ``n_jobs``.
    """
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    from .sweep import resolve_n_jobs

    n_jobs, _ = resolve_n_jobs(n_jobs)
    out = None if out_dir is None else Path(out_dir)
    cache = None if out is None else out / "cells"
    unknown = set(tables) - set(TABLES) - set(FAMILY_TABLES)
    if unknown:
        raise ValueError(f"unknown tables {sorted(unknown)}; expected some of {list(TABLES) + list(FAMILY_TABLES)}")
    cells = [(name, s) for name in tables for s in cfg.instances]
    it = tqdm(cells, desc="gradients", disable=not progress)
    if n_jobs == 1:
        dfs = [_cell(s, cfg, name, cache) for name, s in it]
    else:
        dfs = Parallel(n_jobs=n_jobs)(delayed(_cell)(s, cfg, name, cache) for name, s in it)
    res: dict[str, pd.DataFrame] = {}
    for (name, _), df in zip(cells, dfs):
        res.setdefault(name, []).append(df)
    res = {k: pd.concat(v, ignore_index=True) for k, v in res.items()}
    if out is not None:
        for k, v in res.items():
            write_csv(v, out / f"{k}.csv")
    return res


def summarize(res: dict[str, pd.DataFrame]) -> dict:
    """The headline numbers (the CLI's JSON): see docs/approximations.md for their meaning."""
    s: dict = {}
    if "kl_tau" in res:
        t = res["kl_tau"]
        at = t[np.isclose(t.tau_mult, 1.0)]
        s["cos_at_lam_star"] = float(at[at.estimator == "kl_clamped"].cosine.min())
        s["cos_at_lam_star_softmax"] = float(at[at.estimator == "kl_softmax"].cosine.min())
        s["norm_ratio_clamped_at_lam_star_max"] = float(at[at.estimator == "kl_clamped"].norm_ratio.max())
        cl = t[t.estimator == "kl_clamped"]
        s["norm_ratio_clamped_range"] = [float(cl.norm_ratio.min()), float(cl.norm_ratio.max())]
        s["cos_clamped_min_over_tau"] = float(cl.cosine.min())
    if "kl_path" in res:
        p = res["kl_path"]
        s["lam_star_path_ratio_max"] = float((p.groupby(["instance", "rho_frac"]).lam_star.max()
                                              / p.groupby(["instance", "rho_frac"]).lam_star.min()).max())
        if "cos_softmax_tau_end" in p:
            # only steps where the exact gradient is still >= 1% of its first-step norm: near the
            # optimum the exact gradient vanishes and its direction is rounding noise
            g0 = p.groupby(["instance", "rho_frac"]).grad_norm.transform("first")
            live = p[p.grad_norm >= 0.01 * g0]
            s["cos_softmax_fixed_tau_end_min_along_path"] = float(live.cos_softmax_tau_end.min())
            s["cos_softmax_fixed_tau_start_min_along_path"] = float(live.cos_softmax_tau_start.min())
    if "value_error" in res:
        v = res["value_error"]
        slopes = [fit_loglog_slope(g.eps, g.error)[0] for _, g in v.groupby(["instance", "point"])]
        s["first_order_slope"] = float(np.mean(slopes))
        s["first_order_slope_range"] = [float(np.min(slopes)), float(np.max(slopes))]
        s["first_order_underestimates"] = bool((v.error >= -1e-12).all())
    if "w_radius" in res:
        w = res["w_radius"]
        s["w2_cosine_min"] = {k: float(g.cosine.min()) for k, g in w.groupby("estimator")}
    if "batch" in res:
        b = res["batch"]
        bmin = b.batch_size.min()
        s["batch_bias_smallest_batch"] = {k: float(g[g.batch_size == bmin].bias.mean())
                                          for k, g in b.groupby("estimator")}
        s["batch_size_smallest"] = int(bmin)
    if "sgd" in res:
        g = res["sgd"].groupby("estimator")
        s["sgd_endpoint_error"] = {k: float(v.err.mean()) for k, v in g}
        s["sgd_endpoint_error_sd"] = {k: float(v.err.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in g}
    if "family_batch" in res:
        b = res["family_batch"]
        bmin = b.batch_size.min()
        at = b[b.batch_size == bmin].groupby("member", sort=False)
        s["family_batch_size_smallest"] = int(bmin)
        s["family_batch_bias_smallest_batch"] = {k: float(g.bias.mean()) for k, g in at}
        s["family_batch_mc_se_smallest_batch"] = {k: float(g.mc_se.mean()) for k, g in at}
        s["family_batch_bias_largest_batch"] = {k: float(g.bias.mean()) for k, g in
                                               b[b.batch_size == b.batch_size.max()].groupby("member", sort=False)}
    if "family_sgd" in res:
        f = res["family_sgd"]
        g = f.groupby("member", sort=False)
        s["family_sgd_endpoint_error"] = {k: float(v.err.mean()) for k, v in g}
        s["family_sgd_endpoint_error_sd"] = {k: float(v.err.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in g}
        s["family_sgd_excess"] = {k: float(v.excess.mean()) for k, v in g}
        s["family_sgd_dpo_floor"] = float(f.drop_duplicates(["instance", "sgd_seed"]).dpo_err.mean())
    head = ("cos_at_lam_star", "first_order_slope", "sgd_endpoint_error",
            "family_batch_bias_smallest_batch", "family_sgd_endpoint_error")  # first: reports truncate
    return {**{k: s[k] for k in head if k in s}, **{k: v for k, v in s.items() if k not in head}}
