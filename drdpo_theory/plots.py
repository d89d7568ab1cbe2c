"""Figures of the sample-complexity study (matplotlib; PNG for viewing and PDF for papers).

Every function takes the tidy tables of :mod:`drdpo_theory.experiments.sample_complexity`
(``rows``, ``summary``, ``fits``, ``bounds``) and writes ``<figdir>/<name>.png`` and ``.pdf``.
No number is computed here that the tables do not hold, except the guide lines (``c n^{-a}``
anchored at the first plotted median) and the reference ``sqrt(d/n)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["error_vs_n", "excess_vs_n", "radius_dependence", "beta_dependence", "make_all"]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, figdir: Path, name: str) -> list[Path]:
    from .io import save_figure

    out = []
    for ext in ("png", "pdf"):
        p = Path(figdir) / f"{name}.{ext}"
        save_figure(fig, p, dpi=150 if ext == "png" else None, bbox_inches="tight")  # atomic
        out.append(p)
    _plt().close(fig)
    return out


def _label(method: str) -> str:
    from .experiments.sample_complexity import METHOD_LABELS

    return METHOD_LABELS.get(method, method)


def _radius_text(method: str, r: float) -> str:
    from .experiments.sample_complexity import RADIUS_NAME

    name = {"rho": "ρ", "eps": "ε"}.get(RADIUS_NAME.get(method, ""), "")
    return "" if method == "dpo" else f"{name}={r:.3g}"


def _slope_text(fit) -> str:
    if fit is None or not np.isfinite(fit.get("slope", np.nan)):
        return "slope n/a"
    return f"slope {fit['slope']:.2f} [{fit['slope_lo']:.2f}, {fit['slope_hi']:.2f}]"


def _pick(df, **kw):
    m = np.ones(len(df), bool)
    for k, v in kw.items():
        m &= np.isclose(df[k].to_numpy(float), v) if isinstance(v, float) else (df[k] == v).to_numpy()
    return df[m]


def _guides(ax, n, y0, slopes=(-0.5, -0.25), styles=(":", "-.")):
    n = np.asarray(n, float)
    for a, ls in zip(slopes, styles):
        frac = "1/2" if a == -0.5 else ("1/4" if a == -0.25 else ("1" if a == -1 else f"{-a:g}"))
        ax.plot(n, y0 * (n / n[0]) ** a, ls, color="0.45", lw=1.0, label=f"guide $n^{{-{frac}}}$")


def error_vs_n(summary: pd.DataFrame, fits: pd.DataFrame, main_radius: dict, figdir, delta: float, d: int,
               diameter: float, beta: float, name: str = "sample_complexity_error") -> list[Path]:
    """Parameter error ``||theta_n - theta_pop||`` vs ``n`` (log-log), one panel per method at its main radius:
    median, band (10% to (1-delta) quantile), the (1-delta) bound (instance constants), the bound with
    the paper's constants (docs/theory.md section 2), ``n^{-1/2}`` and ``n^{-1/4}`` guides, ``sqrt(d/n)``,
    the fitted slope."""
    plt = _plt()
    methods = [m for m in main_radius if len(_pick(summary, study="main", method=m))]
    ncol = 2
    nrow = math.ceil(len(methods) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(11, 4.3 * nrow), squeeze=False)
    for ax, method in zip(axes.flat, methods):
        r = float(main_radius[method])
        s = _pick(summary, study="main", method=method, radius=r, beta=float(beta)).sort_values("n")
        f = _pick(fits, study="main", method=method, radius=r, beta=float(beta))
        fit = f.iloc[0].to_dict() if len(f) else None
        n = s["n"].to_numpy(float)
        ax.fill_between(n, s["q10_error"], s["quantile_error"], color=_COLORS[0], alpha=0.18,
                        label=f"10%–{100 * (1 - delta):.0f}% quantile")
        ax.plot(n, s["quantile_error"], "-", color=_COLORS[0], lw=0.8, alpha=0.7)
        ax.plot(n, s["median_error"], "o-", color=_COLORS[0], label="median error (fitted slope in the title)")
        b = s["bound"].to_numpy(float)
        fin = np.isfinite(b)
        if fin.any():
            ax.plot(n[fin], b[fin], "-", color="k", lw=2, label=f"bound, prob. ≥ {1 - delta:g} (instance constants)")
        bp = s["bound_paper"].to_numpy(float)
        top = diameter * 4
        if np.isfinite(bp).any():
            ax.plot(n[np.isfinite(bp)], np.minimum(bp[np.isfinite(bp)], top * 0.95), "--", color="0.3", lw=1.2,
                    label=f"bound with the paper's constants (≥ {np.nanmin(bp):.3g}, clipped)")
        if not fin.any():
            ax.text(0.97, 0.72, "bound = ∞ at every n shown:\nno certified dual lower bound lam_lo\n"
                    "(exp-moment factor too large)" if method == "kldpo" else "bound = ∞ at every n shown",
                    transform=ax.transAxes, fontsize=8, color="k", ha="right", va="top",
                    bbox=dict(facecolor="white", edgecolor="0.7", alpha=0.9))
        ax.axhline(diameter, color="0.6", lw=0.8)
        ax.text(n[0], diameter * 1.08, "diameter 2B (a bound above is vacuous)", fontsize=7, color="0.4")
        med = s["median_error"].to_numpy(float)
        if len(med) and med[0] > 0:
            _guides(ax, n, med[0])
        ax.plot(n, np.sqrt(d / n), color="#2ca02c", lw=1, alpha=0.8, label="parametric $\\sqrt{d/n}$ (C = 1)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        lo = np.nanmin(s["q10_error"].to_numpy(float)[s["q10_error"].to_numpy(float) > 0]) if (s["q10_error"] > 0).any() else 1e-3
        ax.set_ylim(lo * 0.5, top)
        ax.set_xlabel("sample size n (preference pairs)")
        ax.set_ylabel("‖θ_n − θ_pop‖₂ (parameter units)")
        pc = " — COLLAPSED (θ_pop = θ_ref)" if bool(s["pop_collapsed"].any()) else ""
        ax.set_title(f"{_label(method)} {_radius_text(method, r)}{pc}\n{_slope_text(fit)} (bootstrap 95% CI)",
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            key = lab.split(" (≥")[0]
            if key not in handles:
                handles[key], labels[key] = h, lab.split(" (≥")[0] + (" (clipped at the top)" if "paper's constants" in lab else "")
    fig.suptitle(f"Empirical vs population robust optimum (β={beta:g}, d={d}, δ={delta:g})", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(list(handles.values()), list(labels.values()), loc="lower center", ncol=4, fontsize=8, frameon=False)
    return _save(fig, Path(figdir), name)


def excess_vs_n(summary: pd.DataFrame, bounds: pd.DataFrame, main_radius: dict, figdir, delta: float, beta: float,
                name: str = "sample_complexity_excess") -> list[Path]:
    """Excess robust loss ``L(theta_n; P°) - L(theta_pop; P°)`` vs ``n`` with the excess bound and guides."""
    plt = _plt()
    methods = [m for m in main_radius if len(_pick(summary, study="main", method=m))]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.3))
    for i, method in enumerate(methods):
        r = float(main_radius[method])
        s = _pick(summary, study="main", method=method, radius=r, beta=float(beta)).sort_values("n")
        n = s["n"].to_numpy(float)
        col = _COLORS[i % len(_COLORS)]
        med = np.maximum(s["median_objective_gap"].to_numpy(float), 1e-16)
        q = np.maximum(s["quantile_objective_gap"].to_numpy(float), 1e-16)
        ax[0].plot(n, med, "o-", color=col, label=f"{_label(method)} {_radius_text(method, r)} median")
        ax[0].plot(n, q, "--", color=col, lw=0.9, alpha=0.8)
        b = _pick(bounds, method=method, radius=r, beta=float(beta)).sort_values("n")
        ex = b["excess"].to_numpy(float)
        if np.isfinite(ex).any():
            ax[1].plot(b["n"].to_numpy(float)[np.isfinite(ex)], ex[np.isfinite(ex)], "-", color=col,
                       label=f"{_label(method)}: excess bound")
            ax[1].plot(n, q, "o", color=col, ms=3)
    for a in ax:
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("sample size n (preference pairs)")
        a.set_ylabel("L(θ_n; P°) − L(θ_pop; P°) (nats)")
        a.grid(True, which="both", alpha=0.25)
    s0 = _pick(summary, study="main", method=methods[0], radius=float(main_radius[methods[0]]), beta=float(beta))
    s0 = s0.sort_values("n")
    n0 = s0["n"].to_numpy(float)
    y0 = max(float(s0["median_objective_gap"].iloc[0]), 1e-12)
    _guides(ax[0], n0, y0, slopes=(-1.0, -0.5), styles=(":", "-."))
    ax[0].set_title(f"measured excess robust loss (dashed: {100 * (1 - delta):.0f}% quantile)", fontsize=10)
    ax[1].set_title(f"excess bound (prob. ≥ {1 - delta:g}) vs measured quantile (dots)", fontsize=10)
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(figdir), name)


def _radius_takeaway(main: pd.DataFrame, fits: pd.DataFrame, beta: float) -> str:
    """One line from the fits: the range of fitted slopes over the non-collapsed radii vs the paper's -1/4."""
    rows = []
    for (method, r), s in main[main.method != "dpo"].groupby(["method", "radius"]):
        if bool(s["pop_collapsed"].any()):
            continue
        f = _pick(fits, study="main", method=method, radius=float(r), beta=float(beta))
        if len(f) and np.isfinite(f["slope"].iloc[0]):
            rows.append(f.iloc[0])
    if not rows:
        return "median parameter error vs n for every radius"
    sl = [float(x["slope"]) for x in rows]
    hi = max(float(x["slope_hi"]) for x in rows)
    verdict = "every 95% CI lies below the paper's −1/4" if hi < -0.25 else "not every 95% CI excludes the paper's −1/4"
    return (f"Fitted slopes {max(sl):.2f} to {min(sl):.2f} at every non-collapsed radius ({verdict}); "
            "above the collapse radius the robust optimum is θ_ref")


def radius_dependence(summary: pd.DataFrame, fits: pd.DataFrame, figdir, beta: float,
                      name: str = "sample_complexity_radius") -> list[Path]:
    """Median error vs ``n`` for every radius of each robust method, fitted slope in the legend.

    A collapsed radius (population optimum ``theta_pop = theta_ref``) has no rate to show: it is not
    drawn as data but listed in the legend (with the share of seeds whose empirical optimum also
    collapsed at the largest ``n``). Legends sit below the panels, outside the data."""
    from matplotlib.lines import Line2D

    plt = _plt()
    main = _pick(summary, study="main", beta=float(beta))
    methods = [m for m in main["method"].unique() if m != "dpo"]
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(4.6 * max(1, len(methods)), 4.4), squeeze=False)
    for ax, method in zip(axes.flat, methods):
        sm = main[main.method == method]
        extra = []
        thr = float("nan")
        for i, r in enumerate(sorted(sm["radius"].unique())):
            s = sm[np.isclose(sm.radius, r)].sort_values("n")
            n = s["n"].to_numpy(float)
            med = s["median_error"].to_numpy(float)
            f = _pick(fits, study="main", method=method, radius=float(r), beta=float(beta))
            thr = float(s["collapse_threshold"].iloc[0])
            if bool(s["pop_collapsed"].any()):
                sym = _radius_text(method, r).split("=")[0]
                above = f" > {sym}_c" if np.isfinite(thr) else ""
                extra.append(Line2D([], [], ls="none", marker="x", color="0.45", ms=6,
                                    label=f"{_radius_text(method, r)}{above}: COLLAPSED (θ_pop = θ_ref), not drawn;\n"
                                          f"{100 * s['collapsed_frac'].iloc[-1]:.0f}% of seeds collapse at n = {n[-1]:.3g}"))
            else:
                ok = med > 0
                lab = f"{_radius_text(method, r)} ({_slope_text(f.iloc[0].to_dict() if len(f) else None)})"
                ax.plot(n[ok], med[ok], "o-", color=_COLORS[i % len(_COLORS)], label=lab)
        sym = {"kldpo": "ρ_c", "wdpo-w1": "ε_c", "wdpo-w2": "ε_c"}.get(method, "collapse radius")
        txt = f"collapse radius {sym} = {thr:.3g}" if np.isfinite(thr) else "collapse radius: detected by the solver"
        ax.set_title(f"{_label(method)}\n{txt}", fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sample size n (preference pairs)")
        ax.set_ylabel("median ‖θ_n − θ_pop‖₂ (parameter units)")
        handles, labels = ax.get_legend_handles_labels()
        handles += extra
        labels += [h.get_label() for h in extra]
        ax.legend(handles, labels, fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
        ax.grid(True, which="both", alpha=0.25)
    fig.suptitle(_radius_takeaway(main, fits, beta), fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(figdir), name)


def beta_dependence(summary: pd.DataFrame, fits: pd.DataFrame, figdir, name: str = "sample_complexity_beta") -> list[Path]:
    """Median error and the bound vs ``n`` for each ``beta`` (radii at a fixed fraction of the collapse threshold)."""
    plt = _plt()
    sb = summary[summary.study == "beta"]
    if not len(sb):
        return []
    methods = list(sb["method"].unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 4.2), squeeze=False)
    for ax, method in zip(axes.flat, methods):
        sm = sb[sb.method == method]
        for i, beta in enumerate(sorted(sm["beta"].unique())):
            s = sm[np.isclose(sm.beta, beta)].sort_values("n")
            r = float(s["radius"].iloc[0])
            f = _pick(fits, study="beta", method=method, beta=float(beta))
            col = _COLORS[i % len(_COLORS)]
            n = s["n"].to_numpy(float)
            ax.plot(n, s["median_error"], "o-", color=col,
                    label=f"β={beta:g} {_radius_text(method, r)} ({_slope_text(f.iloc[0].to_dict() if len(f) else None)})")
            b = s["bound"].to_numpy(float)
            if np.isfinite(b).any():
                ax.plot(n[np.isfinite(b)], b[np.isfinite(b)], "-", color=col, lw=1.6, alpha=0.6)
        ax.set_title(f"{_label(method)}: β dependence\n(thin: bound, instance constants)", fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sample size n")
        ax.set_ylabel("median ‖θ_n − θ_pop‖₂")
        ax.legend(fontsize=6.5)
        ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    return _save(fig, Path(figdir), name)


def make_all(result, figdir) -> list[Path]:
    """All four figures of a :class:`~drdpo_theory.experiments.sample_complexity.StudyResult`."""
    g = result.grid
    inst = g.instance
    out = []
    out += error_vs_n(result.summary, result.fits, g.main_radius, figdir, g.delta, inst.d, 2 * inst.radius, inst.beta)
    out += excess_vs_n(result.summary, result.bounds, g.main_radius, figdir, g.delta, inst.beta)
    out += radius_dependence(result.summary, result.fits, figdir, inst.beta)
    out += beta_dependence(result.summary, result.fits, figdir)
    return out
