"""Figures of the approximation and preference-shift studies (from the tidy tables; no math here
beyond the log-log slope fit, which is :func:`~drdpo_theory.experiments.gradients.fit_loglog_slope`).

Each function takes the table(s), writes ``<out_dir>/<name>.png`` and ``.pdf`` and returns the paths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["plot_kl_cosine_tau", "plot_kl_lam_path", "plot_value_error", "plot_sgd_endpoints",
           "plot_shift_reward", "plot_all_gradients"]


def _save(fig, out_dir, name) -> list[Path]:
    from .io import save_figure

    out = Path(out_dir)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    save_figure(fig, paths[0], dpi=130, bbox_inches="tight")  # atomic: temp file + os.replace
    save_figure(fig, paths[1], bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kl_cosine_tau(kl_tau: pd.DataFrame, out_dir="figures", name="gradients_cosine_vs_tau") -> list[Path]:
    """Cosine to the exact KLDPO gradient and norm ratio vs ``tau / lam*`` (lam* marked), one line
    per ``rho / rho_c``; median over instances and points, band = min..max."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.85, kl_tau.rho_frac.nunique()))
    for est, ls in (("kl_clamped", "-"), ("kl_softmax", "--")):
        sub = kl_tau[kl_tau.estimator == est]
        for c, (frac, g) in zip(colors, sub.groupby("rho_frac")):
            agg = g.groupby("tau_mult").agg(cmed=("cosine", "median"), cmin=("cosine", "min"), cmax=("cosine", "max"),
                                            nmed=("norm_ratio", "median"), nmin=("norm_ratio", "min"),
                                            nmax=("norm_ratio", "max"))
            lab = f"{'clamped (authors)' if est == 'kl_clamped' else 'normalised'}, rho/rho_c={frac:g}"
            axes[0].plot(agg.index, agg.cmed, ls, color=c, label=lab)
            if est == "kl_clamped":
                axes[0].fill_between(agg.index, agg.cmin, agg.cmax, color=c, alpha=0.12)
            axes[1].plot(agg.index, agg.nmed, ls, color=c, label=lab)
            if est == "kl_clamped":
                axes[1].fill_between(agg.index, agg.nmin, agg.nmax, color=c, alpha=0.12)
    for ax in axes:
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=0.8, ls=":")
        ax.set_xlabel(r"$\tau / \lambda^*(\rho)$ (dimensionless; dotted: $\tau = \lambda^*$)")
    axes[0].set_ylabel("cosine to exact KLDPO gradient")
    axes[0].set_title("direction (median, band: min..max over points)")
    axes[1].set_yscale("log")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_ylabel(r"$\|g\| / \|g_{exact}\|$")
    axes[1].set_title("norm ratio")
    axes[1].legend(fontsize=7, ncol=1, loc="upper right")
    return _save(fig, out_dir, name)


def plot_kl_lam_path(kl_path: pd.DataFrame, out_dir="figures", name="gradients_lam_path") -> list[Path]:
    """``lam*(theta_k)`` along exact gradient descent, and the cosine of the normalised estimator with
    tau frozen at the end point's / the first step's ``lam*``."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.85, kl_path.rho_frac.nunique()))
    for c, (frac, g) in zip(colors, kl_path.groupby("rho_frac")):
        for inst, gi in g.groupby("instance"):
            lab = f"rho/rho_c={frac:g}" if inst == g.instance.min() else None
            axes[0].plot(gi.step, gi.lam_star, color=c, label=lab)
            axes[1].plot(gi.step, gi.cos_softmax_tau_end, color=c, label=lab)
            if "cos_softmax_tau_start" in gi:
                axes[1].plot(gi.step, gi.cos_softmax_tau_start, color=c, ls=":")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("gradient-descent step (exact KLDPO gradient, full data)")
    axes[0].set_ylabel(r"$\lambda^*(\theta_k)$ (loss units)")
    axes[0].set_title(r"the right $\tau$ moves during training")
    axes[0].legend(fontsize=8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("gradient-descent step")
    axes[1].set_ylabel("cosine to exact gradient")
    axes[1].set_title(r"normalised weights, $\tau$ frozen at end (solid) / step 1 (dotted)")
    return _save(fig, out_dir, name)


def plot_value_error(value_error: pd.DataFrame, out_dir="figures", name="gradients_value_error") -> list[Path]:
    """Exact continuous W2 value minus Gao's first-order value vs eps, log-log, fitted slope per case."""
    from .experiments.gradients import fit_loglog_slope

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    slopes = []
    for (inst, pt), g in value_error.groupby(["instance", "point"]):
        slope, c = fit_loglog_slope(g.eps, g.error)
        slopes.append(slope)
        ax.plot(g.eps, g.error, "o-", ms=3, lw=0.8, alpha=0.7, label=f"inst {inst}, {pt}: slope {slope:.3f}")
    e = np.geomspace(value_error.eps.min(), value_error.eps.max(), 10)
    ref = value_error.error.median() * (e / value_error.eps.median()) ** 2
    ax.plot(e, ref, "k--", lw=1, label="slope 2 reference")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"W2 radius $\varepsilon$ (feature units, x-space)")
    ax.set_ylabel("exact W2 value - first-order value (loss units)")
    ax.set_title(f"first-order W2 underestimates; mean slope {np.mean(slopes):.3f}")
    ax.legend(fontsize=6, ncol=1)
    return _save(fig, out_dir, name)


def plot_sgd_endpoints(sgd: pd.DataFrame, out_dir="figures", name="gradients_sgd_endpoints") -> list[Path]:
    """``||theta_SGD - theta_exact||`` per estimator (mean ± sd over instances x seeds), with each
    estimator's noise-free fixed-point error and the DPO SGD noise floor."""
    plt = _plt()
    order = list(dict.fromkeys(sgd.estimator))
    agg = sgd.groupby("estimator").agg(m=("err", "mean"), s=("err", "std"), fp=("fixed_point_err", "mean"),
                                       fam=("family", "first")).reindex(order)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    colors = {"dpo": "gray", "kl": "tab:blue", "w2": "tab:orange"}
    xs = np.arange(len(agg))
    ax.bar(xs, agg.m, yerr=agg.s.fillna(0), color=[colors[f] for f in agg.fam], alpha=0.8, capsize=3,
           label="SGD end point (mean ± sd)")
    ax.scatter(xs, np.maximum(agg.fp, 1e-8), marker="x", color="k", zorder=3, label="full-batch fixed point (floored at 1e-8)")
    floor = agg.loc["dpo", "m"] if "dpo" in agg.index else None
    if floor is not None:
        ax.axhline(floor, color="gray", ls="--", lw=1, label="DPO SGD noise floor")
    ax.set_xticks(xs, agg.index, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(r"$\|\theta_{SGD} - \theta^*_{exact}\|$ (parameter units)")
    ax.set_title("end point of seeded SGD vs the exact optimum of the problem each estimator targets")
    ax.legend(fontsize=8)
    return _save(fig, out_dir, name)


def plot_shift_reward(shift: pd.DataFrame, out_dir="figures", name="shift_reward_vs_alpha") -> list[Path]:
    """Expected true reward ``E r_alpha`` of each method's policy vs alpha (mean ± s.e. over seeds),
    training alpha marked; the DPO loss under ``P_alpha`` in a second panel."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    alpha0 = float(shift.alpha0.iloc[0])
    for m, g in shift[shift.method != "reference"].groupby("method", sort=False):
        by = g.groupby("alpha")
        ls = "--" if m.endswith("_sgd") else "-"
        for ax, col in zip(axes, ("reward", "dpo_loss")):
            mean, se = by[col].mean(), by[col].std(ddof=1) / np.sqrt(by[col].count())
            ax.errorbar(mean.index, mean.values, yerr=se.values, ls=ls, marker="o", ms=3, capsize=2, label=m)
    ref = shift[shift.method == "reference"].sort_values("alpha")
    axes[0].plot(ref.alpha, ref.reward, "k:", label=r"reference $\pi_{\theta^*_\alpha}$")
    for ax in axes:
        ax.axvline(alpha0, color="k", lw=0.8, ls="-.")
        ax.set_xlabel(r"test mixture $\alpha$ (training $\alpha_0$ dash-dotted)")
    axes[0].set_ylabel(r"expected true reward $E\,r_\alpha$ (reward units)")
    axes[0].set_title(f"preference shift ({shift.mixture.iloc[0]} mixture)")
    axes[1].set_ylabel(r"DPO loss under $P_\alpha$ (nats)")
    axes[0].legend(fontsize=7)
    return _save(fig, out_dir, name)


def plot_all_gradients(res: dict, out_dir="figures") -> list[Path]:
    """Every figure of the gradient study that its tables allow."""
    paths: list[Path] = []
    if "kl_tau" in res:
        paths += plot_kl_cosine_tau(res["kl_tau"], out_dir)
    if "kl_path" in res:
        paths += plot_kl_lam_path(res["kl_path"], out_dir)
    if "value_error" in res:
        paths += plot_value_error(res["value_error"], out_dir)
    if "sgd" in res:
        paths += plot_sgd_endpoints(res["sgd"], out_dir)
    return paths
