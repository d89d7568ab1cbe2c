"""Figures of the shift map (:mod:`drdpo_theory.experiments.shift_map`): regret heat maps.

No number is computed here that the summary table does not hold; the functions only pick, per
cell, the robust setting with the best mean regret and outline the cells where some setting beats
DPO with its bootstrap interval. Each writes ``<figdir>/<name>.png`` and ``.pdf`` (atomically).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["plot_regret_map", "plot_mechanism"]

_METRIC_TEXT = {
    "reward": "expected true reward",
    "reg_reward": "reward - β KL(π‖π_ref)",
    "dpo_loss": "DPO loss under the test distribution",
    "worst_kl": "worst-case KL-ball loss",
    "worst_w1": "worst-case W1-ball loss",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, figdir, name: str) -> list[Path]:
    from .io import save_figure

    out = []
    for ext in ("png", "pdf"):
        p = Path(figdir) / f"{name}.{ext}"
        save_figure(fig, p, dpi=130 if ext == "png" else None, bbox_inches="tight")
        out.append(p)
    _plt().close(fig)
    return out


def _n_text(n) -> str:
    return "n = ∞ (population)" if math.isinf(float(n)) else f"n = {int(n)}"


def plot_regret_map(summ: pd.DataFrame, figdir, name: str = "shift_map", metric: str = "reward") -> list[Path]:
    """Heat maps of the best robust regret, one panel per (shift type, n).

    Panel: x = angle between ``theta_1*`` and ``theta_2*`` (degrees); y = (norm ratio, test alpha)
    pairs, grouped by ratio. Colour: ``sign * delta_metric`` of the best robust setting in the cell
    (blue: robust better than DPO; red: worse; same scale on every panel). Black frame: some robust
    setting beats DPO with its whole bootstrap interval.
    """
    from .experiments.shift_map import METRICS, SHIFTS, _wins

    plt = _plt()
    sign = METRICS[metric]
    shifts = [s for s in SHIFTS if s in set(summ["shift"])]
    ns = sorted(summ["n"].astype(float).unique())
    angles = sorted(summ["angle"].unique())
    ratios = sorted(summ["ratio"].unique())
    alphas = sorted(summ["alpha"].unique())
    rows_y = [(r, a) for r in ratios for a in alphas]
    s = summ.assign(_score=sign * summ[f"delta_{metric}"], _win=_wins(summ, metric))
    cell = ["shift", "angle", "ratio", "n", "alpha"]
    best = s.groupby(cell)["_score"].max()
    win = s.groupby(cell)["_win"].any()
    vmax = float(np.nanmax(np.abs(best.to_numpy()))) if len(best) else 1.0
    vmax = vmax if vmax > 0 else 1.0
    fig, axes = plt.subplots(len(shifts), len(ns), figsize=(2.6 * len(ns) + 1.6, 0.24 * len(rows_y) * len(shifts) + 1.6),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    im = None
    for i, sh in enumerate(shifts):
        for j, n in enumerate(ns):
            ax = axes[i, j]
            Z = np.full((len(rows_y), len(angles)), np.nan)
            W = np.zeros_like(Z, dtype=bool)
            for yi, (r, a) in enumerate(rows_y):
                for xi, ang in enumerate(angles):
                    k = (sh, ang, r, n, a)
                    if k in best.index:
                        Z[yi, xi] = best[k]
                        W[yi, xi] = bool(win[k])
            im = ax.imshow(Z, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower",
                           extent=(-0.5, len(angles) - 0.5, -0.5, len(rows_y) - 0.5))
            for yi, xi in zip(*np.nonzero(W)):
                ax.add_patch(plt.Rectangle((xi - 0.5, yi - 0.5), 1, 1, fill=False, ec="black", lw=1.4))
            for k in range(1, len(ratios)):
                ax.axhline(k * len(alphas) - 0.5, color="0.3", lw=0.8)
            if i == 0:
                ax.set_title(_n_text(n), fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{sh}\n(ratio, test α)", fontsize=9)
                ax.set_yticks(range(len(rows_y)))
                ax.set_yticklabels([f"{r:g}, {a:g}" for r, a in rows_y], fontsize=5.5)
            if i == len(shifts) - 1:
                ax.set_xticks(range(len(angles)))
                ax.set_xticklabels([f"{a:g}" for a in angles], fontsize=7)
                ax.set_xlabel("angle(θ₁*, θ₂*) [degrees]", fontsize=8)
    n_win = int(win.sum())
    fig.suptitle(f"Robust minus DPO, {_METRIC_TEXT.get(metric, metric)} (best robust setting per cell; "
                 f"blue = robust better)\nFramed: robust beats DPO with its 95% interval ({n_win} of {len(win)} cells)",
                 fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6,
                 label=("+" if sign > 0 else "-") + f"(robust - DPO) {metric}")
    return _save(fig, figdir, name)


def plot_mechanism(mech: pd.DataFrame, figdir, name: str = "shift_map_mechanism") -> list[Path]:
    """First-order slope ``grad R_alpha . u_m`` (x) against the measured population regret in reward
    at the smallest radius (y), one colour per method: the two agree in sign off the axes."""
    plt = _plt()
    m = mech[np.isinf(mech["n"].astype(float)) & (mech.method != "shrink")].dropna(subset=["delta_reward"])
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for meth, g in m.groupby("method", sort=False):
        ax.scatter(g.slope_reward, g.delta_reward, s=12, label=meth, alpha=0.75)
    ax.axhline(0, color="0.4", lw=0.8)
    ax.axvline(0, color="0.4", lw=0.8)
    ax.set_xscale("symlog", linthresh=1e-2)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("first-order slope ∇R_α(θ_DPO)·u_m (reward units per unit radius)")
    ax.set_ylabel("measured robust - DPO reward (n = ∞)")
    from .experiments.shift_map import FAMILY_FIRST_ORDER, family_mechanism_agreement, mechanism_agreement

    a = mechanism_agreement(mech)
    agree = a["population_sign_agreement"]
    txt = "n/a" if agree is None else f"{agree:.0%}"
    title = (f"Population, smallest radius: sign of the first-order slope = sign of the\n"
             f"measured regret in {txt} of {a['population_cells']} cells (zero slopes/regrets excluded)")
    fam = family_mechanism_agreement(mech, tuple(x for x in FAMILY_FIRST_ORDER if x in set(m.method)))
    if fam:  # drdpo shift-map --family: the plain methods' count above, the members' here
        cells = sum(v["population_cells"] for v in fam.values())
        hits = sum((v["population_sign_agreement"] or 0.0) * v["population_cells"] for v in fam.values())
        title = title.replace("in ", "(KL/W methods) in ", 1) + (
            f";\nrobust family (χ², rDPO, cDPO, Dr.DPO): {hits / cells:.0%} of {cells} cells" if cells else "")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, figdir, name)
