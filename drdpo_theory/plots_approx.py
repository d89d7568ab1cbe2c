"""Figures of the approximation and preference-shift studies (from the tidy tables; no math here
beyond the log-log slope fit, which is :func:`~drdpo_theory.experiments.gradients.fit_loglog_slope`).

Each function takes the table(s), writes ``<out_dir>/<name>.png`` and ``.pdf`` and returns the paths.
Every figure carries its own message: labelled axes with units, the legend outside the data, the
symbols explained on the figure, and a one-line takeaway (computed from the table) as its title.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["plot_kl_cosine_tau", "plot_kl_lam_path", "plot_value_error", "plot_sgd_endpoints",
           "plot_shift_reward", "plot_shift_family", "plot_family_gradients", "plot_all_gradients",
           "ESTIMATOR_LABELS", "SHIFT_METHOD_LABELS", "FAMILY_METHOD_LABELS", "FAMILY_MEMBER_LABELS"]

#: reader-facing names of the gradient estimators of the SGD study (tick labels)
ESTIMATOR_LABELS = {
    "dpo": "DPO (non-robust)",
    "kl_clamped": "KL clamped, τ = λ* at optimum",
    "kl_softmax": "KL normalised, τ = λ* at optimum",
    "kl_clamped_dpo_tau": "KL clamped, τ = λ* at θ_DPO",
    "kl_calibrated": "KL batch dual (no τ)",
    "w2_first_order": "W2 first-order (Gao et al.)",
    "w2_adversarial": "W2 one-step adversarial",
    "w2_sq_penalty": "W2 sq. penalty, ρ₀ at optimum",
    "w2_sq_penalty_dpo": "W2 sq. penalty, ρ₀ at θ_DPO",
}

#: method -> (label, colour, line style, marker) in the preference-shift figure
SHIFT_METHOD_LABELS = {
    "dpo": ("DPO (exact)", "#1f4e99", "-", "o"),
    "kldpo": ("KLDPO (exact)", "#d95f02", "-", "s"),
    "wdpo_w1": ("WDPO W1 (exact)", "#1b9e77", "-", "^"),
    "wdpo_w2": ("WDPO W2 (exact, continuous)", "#7570b3", "-", "D"),
    "dpo_sgd": ("DPO (SGD)", "#6baed6", (0, (4, 3)), "x"),
    "kl_clamped_sgd": ("KLDPO authors' weights (SGD)", "#a6761d", (0, (4, 3)), "v"),
    "kl_calibrated_sgd": ("KLDPO batch dual (SGD)", "#e6ab02", (0, (1, 1.5)), "<"),
    "w2_sq_penalty_sgd": ("WDPO squared penalty (SGD)", "#e7298a", (0, (4, 3)), ">"),
    "w2_adversarial_sgd": ("WDPO one-step adversarial (SGD)", "#66a61e", (0, (1, 1.5)), "P"),
}

#: the robust family in the family shift figure: method -> (label, colour, line style, marker);
#: an exact solver and its batch version (SGD) share the colour, solid vs dashed
FAMILY_METHOD_LABELS = {
    "chi2dpo": ("χ²-DPO (exact)", "#e31a1c", "-", "h"),
    "cvardpo": ("CVaR-DPO (exact)", "#ff7f00", "-", "p"),
    "groupdpo": ("group DPO, groups = label source (exact)", "#6a3d9a", "-", "*"),
    "rdpo": ("rDPO (exact)", "#b15928", "-", "d"),
    "cdpo": ("cDPO (exact)", "#737373", "-", "X"),
    "dr_dpo": ("Dr.DPO (local solver)", "#17becf", "-", "8"),
    "chi2_batch_sgd": ("χ²-DPO batch worst case (SGD)", "#e31a1c", (0, (4, 3)), "h"),
    "cvar_batch_sgd": ("CVaR-DPO batch worst case (SGD)", "#ff7f00", (0, (4, 3)), "p"),
    "group_batch_sgd": ("group DPO batch worst group (SGD)", "#6a3d9a", (0, (4, 3)), "*"),
    "group_eg_sgd": ("group DPO online EG weights (SGD)", "#6a3d9a", (0, (1, 1.5)), "*"),
    "rdpo_sgd": ("rDPO (SGD)", "#b15928", (0, (4, 3)), "d"),
    "cdpo_sgd": ("cDPO (SGD)", "#737373", (0, (4, 3)), "X"),
    "dr_dpo_batch_sgd": ("Dr.DPO batch soft-min (SGD)", "#17becf", (0, (4, 3)), "8"),
}

#: family member -> (label, colour) in the gradient-study family figure
FAMILY_MEMBER_LABELS = {m: (FAMILY_METHOD_LABELS[m][0].replace(" (exact)", "").replace(" (local solver)", "")
                            .replace(", groups = label source", ""), FAMILY_METHOD_LABELS[m][1])
                        for m in ("chi2dpo", "cvardpo", "groupdpo", "rdpo", "cdpo", "dr_dpo")}
FAMILY_MEMBER_LABELS["groupdpo_eg"] = ("group DPO, EG weights", "#cab2d6")

#: distinct colours for the radius fractions rho/rho_c (qualitative, colour-blind safe)
_FRAC_COLORS = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00"]


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


def _frac_label(frac: float, sym: str = "ρ") -> str:
    return f"{sym} = {frac:g} {sym}_c"


def plot_kl_cosine_tau(kl_tau: pd.DataFrame, out_dir="figures", name="gradients_cosine_vs_tau") -> list[Path]:
    """Cosine to the exact KLDPO gradient (top row) and norm ratio (bottom row) vs ``tau / lam*``,
    one column per ``rho / rho_c`` (so the bands do not overlap); median over instances and points,
    band = min..max for the authors' clamped weights."""
    plt = _plt()
    fracs = sorted(kl_tau.rho_frac.unique())
    fig, axes = plt.subplots(2, len(fracs), figsize=(3.1 * len(fracs) + 0.6, 5.6), sharex=True, sharey="row",
                             squeeze=False)
    styles = {"kl_clamped": ("#0072b2", "-", "clamped weights (authors), median"),
              "kl_softmax": ("#d55e00", "--", "normalised weights, median")}
    n_cases = kl_tau.groupby(["instance", "point"]).ngroups
    for j, frac in enumerate(fracs):
        for est, (col, ls, lab) in styles.items():
            g = kl_tau[(kl_tau.estimator == est) & np.isclose(kl_tau.rho_frac, frac)]
            if not len(g):
                continue
            agg = g.groupby("tau_mult").agg(cmed=("cosine", "median"), cmin=("cosine", "min"), cmax=("cosine", "max"),
                                            nmed=("norm_ratio", "median"), nmin=("norm_ratio", "min"),
                                            nmax=("norm_ratio", "max"))
            axes[0, j].plot(agg.index, agg.cmed, ls, color=col, lw=1.6, label=lab)
            axes[1, j].plot(agg.index, agg.nmed, ls, color=col, lw=1.6, label=lab)
            if est == "kl_clamped":
                band = f"clamped: min..max over {n_cases} cases (instances x points)"
                axes[0, j].fill_between(agg.index, agg.cmin, agg.cmax, color=col, alpha=0.15, lw=0, label=band)
                axes[1, j].fill_between(agg.index, agg.nmin, agg.nmax, color=col, alpha=0.15, lw=0, label=band)
        axes[0, j].set_title(_frac_label(frac), fontsize=10)
        for i in range(2):
            ax = axes[i, j]
            ax.set_xscale("log")
            ax.axvline(1.0, color="k", lw=0.8, ls=":")
            ax.grid(True, which="major", alpha=0.25)
        axes[1, j].set_yscale("log")
        axes[1, j].axhline(1.0, color="k", lw=0.8)
        axes[1, j].set_xlabel(r"$\tau / \lambda^*$")
    axes[0, 0].set_ylabel("cosine to exact\nKLDPO gradient")
    axes[1, 0].set_ylabel(r"norm ratio $\|g\| / \|g_{exact}\|$")
    at = kl_tau[np.isclose(kl_tau.tau_mult, 1.0) & kl_tau.estimator.isin(["kl_clamped", "kl_softmax"])]
    cl = kl_tau[kl_tau.estimator == "kl_clamped"]
    fig.suptitle(f"At τ = λ* the weights give the exact direction (cosine ≥ 1 − {max(1 - at.cosine.min(), 1e-16):.0e}); "
                 f"off λ* the direction bends (cosine down to {cl.cosine.min():.2f}) "
                 f"and the norm is {cl.norm_ratio.min():.2g}–{cl.norm_ratio.max():.3g}x the exact one",
                 fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles.append(axes[0, 0].lines[0].__class__([], [], color="k", lw=0.8, ls=":"))
    labels.append("τ = λ*")
    fig.tight_layout(rect=(0, 0.10, 1, 1))
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.035), ncol=4, fontsize=8, frameon=False)
    fig.text(0.5, 0.01, "λ*(ρ): exact dual variable of the KL ball of radius ρ at the evaluation point; "
             "ρ_c: the KL radius above which the robust optimum collapses to θ_ref (per instance)",
             ha="center", fontsize=8, color="0.3")
    return _save(fig, out_dir, name)


def plot_kl_lam_path(kl_path: pd.DataFrame, out_dir="figures", name="gradients_lam_path") -> list[Path]:
    """Along exact full-batch gradient descent on the KLDPO loss: ``lam*(theta_k)`` (a), and the
    cosine to the exact gradient of the normalised estimator with tau frozen at the end point's
    ``lam*`` (b) or at the first step's (c); one colour per ``rho / rho_c``, median over instances,
    band min..max. Steps where the exact gradient is below 1% of its first-step norm are not drawn
    in (b, c): there its direction is rounding noise."""
    plt = _plt()
    fracs = sorted(kl_path.rho_frac.unique())
    n_inst = kl_path.instance.nunique()
    p = kl_path.copy()
    g0 = p.groupby(["instance", "rho_frac"]).grad_norm.transform("first")
    live = p.grad_norm >= 0.01 * g0
    cols = [c for c in ("cos_softmax_tau_end", "cos_softmax_tau_start") if c in p]
    fig, axes = plt.subplots(1, 1 + len(cols), figsize=(4.4 * (1 + len(cols)), 4.8), squeeze=False)
    axes = axes[0]
    for k, frac in enumerate(fracs):
        c = _FRAC_COLORS[k % len(_FRAC_COLORS)]
        g = p[np.isclose(p.rho_frac, frac)]
        agg = g.groupby("step").lam_star.agg(["median", "min", "max"])
        axes[0].plot(agg.index, agg["median"], "-", color=c, lw=1.8, label=_frac_label(frac))
        axes[0].fill_between(agg.index, agg["min"], agg["max"], color=c, alpha=0.18, lw=0)
        for ax, col in zip(axes[1:], cols):
            gl = g[live[g.index]]
            a = gl.groupby("step")[col].agg(["median", "min", "max"])
            ax.plot(a.index, a["median"], "-", color=c, lw=1.8, marker="o", ms=2.5)
            ax.fill_between(a.index, a["min"], a["max"], color=c, alpha=0.18, lw=0)
    axes[0].set_ylabel(r"$\lambda^*(\theta_k)$ (nats)")
    axes[0].set_title(r"(a) $\lambda^*$, the right $\tau$, moves", fontsize=10)
    titles = {"cos_softmax_tau_end": r"(b) $\tau$ frozen at $\lambda^*$ of the last step",
              "cos_softmax_tau_start": r"(c) $\tau$ frozen at $\lambda^*$ of step 1"}
    for ax, col in zip(axes[1:], cols):
        ax.set_title(titles[col], fontsize=10)
        ax.set_ylabel("cosine to exact gradient\n(normalised weights)")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_ylim(-1.05, 1.05)
    if len(cols) > 1:
        axes[2].sharey(axes[1])
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("gradient-descent step k (exact gradient, full data)")
        ax.grid(True, which="major", alpha=0.25)
    ratio = (p.groupby(["instance", "rho_frac"]).lam_star.max() / p.groupby(["instance", "rho_frac"]).lam_star.min()).max()
    head = f"λ* moves up to {ratio:.1f}x during training, so no single τ fits the whole path"
    if "cos_softmax_tau_start" in p:
        head += f" (τ from step 1: cosine down to {p[live].cos_softmax_tau_start.min():.2f})"
    fig.suptitle(head, fontsize=11)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.04), ncol=len(fracs), fontsize=9,
               frameon=False, title=f"KL radius (lines: median over {n_inst} instances; bands: min..max)",
               title_fontsize=8)
    fig.text(0.5, 0.005, "ρ_c: KL radius above which the robust optimum collapses to θ_ref; "
             "(b, c) omit steps where the exact gradient is < 1% of its step-1 norm (direction = rounding noise)",
             ha="center", fontsize=8, color="0.3")
    return _save(fig, out_dir, name)


def plot_value_error(value_error: pd.DataFrame, out_dir="figures", name="gradients_value_error") -> list[Path]:
    """Exact continuous W2 value minus Gao's first-order value vs eps, log-log: colour = instance,
    marker/line style = evaluation point; fitted slope per case in the legend."""
    from matplotlib.lines import Line2D

    from .experiments.gradients import fit_loglog_slope

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    insts = sorted(value_error.instance.unique())
    points = list(dict.fromkeys(value_error.point))
    markers = ["o", "s", "^", "D", "v", "P"]
    styles = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1))]
    slopes = []
    for (inst, pt), g in value_error.groupby(["instance", "point"]):
        g = g.sort_values("eps")
        slope, _ = fit_loglog_slope(g.eps, g.error)
        slopes.append(slope)
        i, k = insts.index(inst), points.index(pt)
        ax.plot(g.eps, g.error, ls=styles[k % len(styles)], marker=markers[k % len(markers)], ms=4, lw=1.0,
                color=_FRAC_COLORS[i % len(_FRAC_COLORS)], alpha=0.85, mfc="none")
    e = np.geomspace(value_error.eps.min(), value_error.eps.max(), 10)
    ref = value_error.error.median() * (e / value_error.eps.median()) ** 2
    ax.plot(e, ref, "k-", lw=2.2, alpha=0.35)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.25)
    ax.set_xlabel(r"W2 radius $\varepsilon$ (feature units, x-space)")
    ax.set_ylabel("exact W2 value − first-order value (nats)")
    ax.set_title(f"Gao's first-order W2 value underestimates the exact value by O(ε²):\n"
                 f"fitted log-log slope {np.mean(slopes):.4f} (range {min(slopes):.4f}–{max(slopes):.4f}, "
                 f"{len(slopes)} cases)", fontsize=10)
    handles = [Line2D([], [], color=_FRAC_COLORS[i % len(_FRAC_COLORS)], lw=2, label=f"instance {inst}")
               for i, inst in enumerate(insts)]
    handles += [Line2D([], [], color="0.3", ls=styles[k % len(styles)], marker=markers[k % len(markers)], mfc="none",
                       label=("point θ_DPO" if pt == "dpo" else f"random point {pt.replace('rand', '')}"))
                for k, pt in enumerate(points)]
    handles.append(Line2D([], [], color="k", lw=2.2, alpha=0.35, label="slope-2 reference"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, out_dir, name)


def plot_sgd_endpoints(sgd: pd.DataFrame, out_dir="figures", name="gradients_sgd_endpoints") -> list[Path]:
    """``||theta_SGD - theta_exact||`` per estimator (mean ± sd over instances x seeds), with each
    estimator's noise-free fixed-point error and the DPO SGD noise floor."""
    from matplotlib.patches import Patch

    plt = _plt()
    order = list(dict.fromkeys(sgd.estimator))
    agg = sgd.groupby("estimator").agg(m=("err", "mean"), s=("err", "std"), fp=("fixed_point_err", "mean"),
                                       fam=("family", "first")).reindex(order)
    fig, ax = plt.subplots(figsize=(10, 5.0))
    colors = {"dpo": "0.6", "kl": "#0072b2", "w2": "#e69f00"}
    xs = np.arange(len(agg))
    ax.bar(xs, agg.m, yerr=agg.s.fillna(0), color=[colors.get(f, "0.4") for f in agg.fam], alpha=0.85, capsize=3)
    ax.scatter(xs, np.maximum(agg.fp, 1e-8), marker="x", color="k", zorder=3, s=40)
    floor = agg.loc["dpo", "m"] if "dpo" in agg.index else None
    if floor is not None:
        ax.axhline(floor, color="0.3", ls="--", lw=1)
    ax.set_xticks(xs, [ESTIMATOR_LABELS.get(e, e) for e in agg.index], fontsize=8, rotation=30, ha="right",
                  rotation_mode="anchor")
    ax.set_yscale("log")
    ax.set_xlabel("gradient estimator used by SGD (after the comma: where τ or ρ₀ was calibrated)")
    ax.set_ylabel(r"$\|\theta_{SGD} - \theta^*_{exact}\|$ (parameter units)")
    bad = [e for e in ("kl_clamped_dpo_tau", "w2_sq_penalty_dpo") if e in agg.index]
    good = [e for e in agg.index if e not in bad and e != "dpo"]
    title = "SGD end point vs the exact optimum of the problem each estimator targets"
    if bad and good:
        worst = " / ".join(f"{agg.loc[e, 'm']:.2f}" for e in bad)
        title = (f"Calibrating τ / ρ₀ at θ_DPO leaves SGD {worst} "
                 f"from the robust optimum; every other estimator ends within {agg.loc[good, 'm'].max():.2f}")
    ax.set_title(title, fontsize=10)
    handles = [Patch(color=colors["dpo"], label="DPO (target: DPO optimum)"),
               Patch(color=colors["kl"], label="KLDPO estimators (target: exact KLDPO optimum)"),
               Patch(color=colors["w2"], label="WDPO-W2 estimators (target: exact W2 optimum)"),
               plt.Line2D([], [], color="k", lw=1, marker="|", ls="none", ms=10, label="error bar: ± sd over instances x seeds"),
               plt.Line2D([], [], color="k", marker="x", ls="none", label="full-batch fixed point (floored at 1e-8)"),
               plt.Line2D([], [], color="0.3", ls="--", label="DPO SGD noise floor")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(True, axis="y", which="major", alpha=0.25)
    fig.tight_layout()
    return _save(fig, out_dir, name)


def _shift_takeaway(shift: pd.DataFrame) -> str:
    """One line from the table: the worst-case (over alpha) reward of DPO vs the robust methods."""
    rob = shift[~shift.method.isin(["reference"])]
    worst = rob.groupby(["method", "seed"]).reward.min().groupby("method").mean()
    if "dpo" not in worst:
        return ""
    others = worst.drop([m for m in ("dpo", "dpo_sgd") if m in worst])
    if not len(others):
        return ""
    lo, hi = others.min(), others.max()
    if (worst["dpo"] > others).all():
        return (f"Robustness does not pay here: every robust method has a lower worst-case reward over α "
                f"than DPO ({lo:.3f}–{hi:.3f} vs {worst['dpo']:.3f})")
    best = others.idxmax()
    return (f"Worst-case reward over α: DPO {worst['dpo']:.3f}, best robust method "
            f"{SHIFT_METHOD_LABELS.get(best, (best,))[0]} {others.max():.3f}")


def plot_shift_reward(shift: pd.DataFrame, out_dir="figures", name="shift_reward_vs_alpha") -> list[Path]:
    """Expected true reward ``E r_alpha`` of each method's policy vs alpha (mean ± s.e. over seeds),
    training alpha marked; the DPO loss under ``P_alpha`` in a second panel; legend below the panels
    and the takeaway (worst-case reward over alpha) as the title."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    alpha0 = float(shift.alpha0.iloc[0])
    for m, g in shift[shift.method != "reference"].groupby("method", sort=False):
        lab, col, ls, mk = SHIFT_METHOD_LABELS.get(m, (m, None, "-", "o"))
        exact = not m.endswith("_sgd")
        by = g.groupby("alpha")
        for ax, y in zip(axes, ("reward", "dpo_loss")):
            mean, se = by[y].mean(), by[y].std(ddof=1) / np.sqrt(by[y].count())
            ax.errorbar(mean.index, mean.values, yerr=se.values, ls=ls, marker=mk, ms=4 if exact else 5,
                        lw=2.2 if exact else 1.3, capsize=2, color=col, mfc=col if exact else "none",
                        zorder=2 if exact else 3, label=lab)
    ref = shift[shift.method == "reference"].sort_values("alpha")
    if len(ref):
        axes[0].plot(ref.alpha, ref.reward, "k:", lw=1.8, label=r"reference: optimal policy $\pi_{\theta^*_\alpha}$ for each α")
    for ax in axes:
        ax.axvline(alpha0, color="k", lw=0.8, ls="-.", label=f"training mixture α₀ = {alpha0:g}")
        ax.set_xlabel(r"test mixture weight $\alpha$ (1 = all reward 1, 0 = all reward 2)")
        ax.grid(True, alpha=0.25)
    axes[0].set_ylabel(r"expected true reward $E\,r_\alpha$ (reward units)")
    axes[1].set_ylabel(r"DPO loss under $P_\alpha$ (nats; lower is better)")
    mixture = str(shift.mixture.iloc[0]) if "mixture" in shift else "label"
    n_seeds = shift[shift.method != "reference"].seed.nunique()
    fig.suptitle(f"Preference shift ({mixture} mixture), mean ± s.e. over {n_seeds} seeds\n"
                 + _shift_takeaway(shift), fontsize=10.5)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, out_dir, name)


def _family_style(m: str):
    return FAMILY_METHOD_LABELS.get(m) or SHIFT_METHOD_LABELS.get(m) or (m, "k", "-", "o")


def _family_takeaway(worst: pd.Series, norms: pd.Series | None = None) -> str:
    """One line from the worst-case rewards: how many robust methods fall below DPO, which are above
    it, and (with ``norms``, mean ``||theta||`` per method) whether those above moved away from theta_ref."""
    if "dpo" not in worst:
        return ""
    others = worst.drop([m for m in ("dpo", "dpo_sgd") if m in worst])
    below = others[others < worst["dpo"]]
    above = others[others >= worst["dpo"]]
    line = f"Worst-case reward over α: {len(below)} of {len(others)} robust methods fall below DPO ({worst['dpo']:.3f})"
    if len(above):
        names = sorted({_family_style(m)[0].split(" (")[0].split(" batch")[0] for m in above.index})
        line += f"; above it: {', '.join(names)}"
        if norms is not None and "dpo" in norms:
            line += (f", which move away from θ_ref (mean ‖θ‖ {norms[above.index].min():.2f}–{norms[above.index].max():.2f} "
                     f"vs DPO {norms['dpo']:.2f}; those below: {norms[below.index].min():.2f}–{norms[below.index].max():.2f})"
                     if len(below) else "")
    return line


def plot_shift_family(shift: pd.DataFrame, out_dir="figures", name="shift_family", stated: str = "") -> list[Path]:
    """DPO, KLDPO, WDPO (exact and approximate) and the robust family under the label-mixture shift.

    Left: expected true reward ``E r_alpha`` vs the test alpha (mean ± s.e. over seeds; exact solvers
    solid, SGD with approximate or batch gradients dashed/dotted, one colour per objective). Right: the
    worst-case reward over alpha (per seed, then mean ± s.e. over seeds), sorted, DPO's marked.
    ``stated``: a line with the radii (drawn under the title). Legend below the panels, takeaway as title.
    """
    import textwrap

    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 6.2), gridspec_kw={"width_ratios": [1.25, 1]})
    alpha0 = float(shift.alpha0.iloc[0])
    runs = shift[shift.method != "reference"]
    for m, g in runs.groupby("method", sort=False):
        lab, col, ls, mk = _family_style(m)
        exact = ls == "-"
        by = g.groupby("alpha").reward
        mean, se = by.mean(), by.std(ddof=1) / np.sqrt(by.count())
        ax.errorbar(mean.index, mean.values, yerr=se.fillna(0).values, ls=ls, marker=mk, ms=4.5, markevery=2,
                    lw=2.0 if exact else 1.3, capsize=1.5, color=col, mfc=col if exact else "none",
                    zorder=2 if exact else 3, label=lab)
    ref = shift[shift.method == "reference"].sort_values("alpha")
    if len(ref):
        ax.plot(ref.alpha, ref.reward, "k:", lw=1.8, label=r"reference: optimal policy $\pi_{\theta^*_\alpha}$ for each α")
    ax.axvline(alpha0, color="k", lw=0.8, ls="-.", label=f"training mixture α₀ = {alpha0:g}")
    ax.set_xlabel(r"test mixture weight $\alpha$ (1 = all labels from reward 1, 0 = all from reward 2)")
    ax.set_ylabel(r"expected true reward $E\,r_\alpha$ (reward units)")
    ax.grid(True, alpha=0.25)
    worst_seed = runs.groupby(["method", "seed"], sort=False).reward.min()
    worst = worst_seed.groupby("method", sort=False).mean()
    norms = runs.groupby(["method", "seed"], sort=False).theta_norm.first().groupby("method", sort=False).mean() \
        if "theta_norm" in runs else None
    wse = worst_seed.groupby("method", sort=False).std(ddof=1) / np.sqrt(worst_seed.groupby("method", sort=False).count())
    order = worst.sort_values().index
    for i, m in enumerate(order):
        lab, col, ls, mk = _family_style(m)
        exact = ls == "-"
        ax2.errorbar(worst[m], i, xerr=float(np.nan_to_num(wse[m])), marker=mk, ms=7, color=col,
                     mfc=col if exact else "none", capsize=2, ls="none")
    if "dpo" in worst:
        ax2.axvline(worst["dpo"], color="#1f4e99", lw=0.9, ls="--")
    ax2.set_yticks(range(len(order)))
    ax2.set_yticklabels([_family_style(m)[0] for m in order], fontsize=8)
    ax2.set_xlabel("worst-case expected reward over α ∈ [0, 1] (reward units)")
    ax2.grid(True, axis="x", alpha=0.25)
    ax2.set_title("filled: exact solver, hollow: SGD; dashed line: DPO (exact)", fontsize=8.5)
    n_seeds = runs.seed.nunique()
    fig.suptitle(f"Robust preference-optimisation family under the label-mixture shift, mean ± s.e. over {n_seeds} "
                 f"seeds\n{_family_takeaway(worst, norms)}" + (f"\n{textwrap.fill(stated, 150)}" if stated else ""),
                 fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=7.5, frameon=False)
    fig.tight_layout()
    return _save(fig, out_dir, name)


def plot_family_gradients(res: dict, out_dir="figures", name="gradients_family") -> list[Path]:
    """Left: relative mini-batch bias of each family member's batch gradient vs batch size (mean over
    instances and points, bars = mean Monte-Carlo s.e.). Right: SGD end-point error against the exact
    optimum (mean ± sd over instances and seeds) with DPO's SGD error as the noise floor."""
    plt = _plt()
    fb, fs = res.get("family_batch"), res.get("family_sgd")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax, ax2 = axes
    worst = None
    if fb is not None and len(fb):
        agg = fb.groupby(["member", "batch_size"], sort=False).agg(bias=("bias", "mean"), se=("mc_se", "mean"))
        for m, g in agg.groupby(level=0, sort=False):
            lab, col = FAMILY_MEMBER_LABELS.get(m, (m, None))
            b = g.index.get_level_values(1)
            ax.errorbar(b, g.bias, yerr=g.se, marker="o", ms=4, lw=1.6, capsize=2, color=col, label=lab)
        small = agg.xs(agg.index.get_level_values(1).min(), level=1).bias
        worst = small.idxmax()
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("mini-batch size b (pairs)")
        ax.set_ylabel("relative bias ‖E g_b − g*‖ / ‖g*‖ (dimensionless)")
        ax.grid(True, which="both", alpha=0.25)
    if fs is not None and len(fs):
        g = fs.groupby("member", sort=False).err
        mean, sd = g.mean(), g.std(ddof=1).fillna(0.0)
        x = np.arange(len(mean))
        for i, m in enumerate(mean.index):
            lab, col = FAMILY_MEMBER_LABELS.get(m, (m, None))
            ax2.errorbar(i, mean[m], yerr=sd[m], marker="o", ms=6, color=col, capsize=3, ls="none")
        floor = float(fs.drop_duplicates(["instance", "sgd_seed"]).dpo_err.mean())
        ax2.axhline(floor, color="0.3", ls="--", lw=1, label=f"DPO SGD noise floor ({floor:.3f})")
        ax2.set_xticks(x)
        ax2.set_xticklabels([FAMILY_MEMBER_LABELS.get(m, (m,))[0] for m in mean.index], rotation=30, ha="right",
                            fontsize=8)
        ax2.set_yscale("log")
        ax2.set_ylabel("‖θ_SGD − θ_exact‖ (parameter units)")
        ax2.set_xlabel("family member, SGD with its batch gradient (group DPO: batch worst group; EG: online weights)")
        ax2.grid(True, axis="y", which="both", alpha=0.25)
    title = "Robust family: batch gradients against the exact ones (group DPO: groups = prompts)"
    if worst is not None:
        b0 = int(fb.batch_size.min())
        title += (f"\nlargest bias at b = {b0}: {FAMILY_MEMBER_LABELS.get(worst, (worst,))[0]} "
                  f"({agg.xs(b0, level=1).bias[worst]:.2f}); rDPO/cDPO are per-pair losses, unbiased up to Monte-Carlo error")
    if fs is not None and {"groupdpo", "groupdpo_eg"} <= set(fs.member):
        e = fs.groupby("member").err.mean()
        title += (f"\nSGD end-point error, group DPO: batch worst group {e['groupdpo']:.3f}, online EG weights "
                  f"{e['groupdpo_eg']:.3f} (DPO's SGD noise floor {fs.drop_duplicates(['instance', 'sgd_seed']).dpo_err.mean():.3f})")
    fig.suptitle(title, fontsize=10)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    fig.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
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
    if "family_batch" in res or "family_sgd" in res:
        paths += plot_family_gradients(res, out_dir)
    return paths
