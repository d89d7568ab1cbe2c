"""Generated text of docs/approximations.md: the findings of the gradient study and the preference-shift finding.

Every number of docs/approximations.md that a study measured is either inside a block rendered here
from the committed full-run tables (``docs/results/gradients/*.csv``, ``summary.json``,
``docs/results/shift*/``; see :mod:`drdpo_theory.report`) or checked against them by
tests/test_docs_numbers.py. The qualitative words that depend on the data (a cosine that "turns
negative", a method that "loses at every alpha", the exceptions) are computed too, so a re-collected
study cannot leave the prose claiming what its numbers no longer show. A study whose tables are not
committed renders as *not regenerated in this checkout*.

Block names (``<!-- BEGIN generated:NAME -->``): ``approx-kl-tau`` (findings 1-2), ``approx-kl-path``
(3), ``approx-batch`` (4), ``approx-value-error`` (5), ``approx-w-radius`` (6), ``approx-sgd`` (7),
``approx-beta`` (8), ``approx-shift-finding`` (section 5) and ``approx-run-times`` (section 6). The
shift table itself is paper_repro.md's ``shift`` block.
"""

from __future__ import annotations

import math
import re
import textwrap

import numpy as np
import pandas as pd

__all__ = ["BLOCKS", "sig", "floor_to", "ceil_to", "alpha_phrase", "robust_methods"]

_G = "gradients/"


# ----------------------------------------------------------------------------- formatting
def sig(v: float, n: int = 2) -> str:
    """``v`` to ``n`` significant digits, positional (``0.0096``, ``25.9``), or ``4.4e-5`` below 1e-3."""
    v = float(v)
    if v == 0 or not math.isfinite(v):
        return format(v, "g")
    if abs(v) < 1e-3:
        m, e = f"{v:.{n - 1}e}".split("e")
        return f"{m}e{int(e)}"
    rounded = float(f"{v:.{n - 1}e}")
    return f"{rounded:.{max(0, n - 1 - math.floor(math.log10(abs(rounded))))}f}"


def floor_to(v: float, nd: int) -> str:
    """``v`` rounded down to ``nd`` decimals (for ">= v" claims)."""
    return f"{math.floor(float(v) * 10 ** nd + 1e-9) / 10 ** nd:.{nd}f}"


def ceil_to(v: float, nd: int) -> str:
    """``v`` rounded up to ``nd`` decimals (for "<= v" claims)."""
    return f"{math.ceil(float(v) * 10 ** nd - 1e-9) / 10 ** nd:.{nd}f}"


def _up1(x: float) -> str:
    """``x > 0`` rounded *up* to one significant digit (``3.3e-16`` -> ``4e-16``), for "1 - x" bounds."""
    e = math.floor(math.log10(x))
    m = math.ceil(x / 10 ** e - 1e-9)
    if m == 10:
        m, e = 1, e + 1
    return f"{m}e{e}" if e < -3 else sig(m * 10.0 ** e, 1)


def _pm(mean: float, sd: float) -> str:
    """``mean ± sd``, the mean to 2 significant digits and the sd to the mean's decimals."""
    m = sig(mean)
    nd = len(m.split(".")[1]) if "." in m else 0
    return f"{m} ± {sd:.{nd}f}"


def _rng(lo: float, hi: float, n: int = 2, sep: str = "-") -> str:
    a, b = sig(lo, n), sig(hi, n)
    return a if a == b else f"{a}{sep}{b}"


_NBSP = "\x00"
_MARKER = re.compile(r"^\s*([-+*>#]|\d+[.)]|=+$)(\s|$)")


def _wrap(text: str, indent: str = "") -> str:
    """``text`` wrapped at 100 columns like the rest of the document, never inside a code span and never
    with a continuation line that markdown would read as a list item, quote or heading."""
    parts = text.split("`")
    text = "`".join(p.replace(" ", _NBSP) if i % 2 else p for i, p in enumerate(parts))
    for width in range(100, 80, -1):
        lines = textwrap.fill(text, width=width, subsequent_indent=indent, break_long_words=False,
                              break_on_hyphens=False).split("\n")
        if not any(_MARKER.match(line) for line in lines[1:]):
            break
    return "\n".join(lines).replace(_NBSP, " ")


def _item(num: int, text: str) -> str:
    """One numbered list item."""
    return _wrap(f"{num}. {text}", indent="   ")


def _para(text: str) -> str:
    return _wrap(text)


def _frac(f: float) -> str:
    return f"{f:g}"


def _need(r, study: str, *files: str):
    """The committed tables, or ``None`` (the caller renders the missing-study line)."""
    out = [r.csv(f) if f.endswith(".csv") else r.json(f) for f in files]
    return None if any(x is None for x in out) else out


def _missing(num: int | None, title: str, study: str) -> str:
    from .report import _missing as miss

    return (_item(num, f"**{title}** {miss(study)}") if num is not None else _para(f"{title} {miss(study)}"))


# ----------------------------------------------------------------------------- findings 1-2 (kl_tau.csv)
def block_kl_tau(r) -> str:
    got = _need(r, "gradients", _G + "kl_tau.csv", _G + "summary.json")
    if got is None:
        return "\n".join([_missing(1, "tau = lam\\* and the KLDPO direction.", "gradients"),
                          _missing(2, "KLDPO weights off lam\\*.", "gradients")])
    kt, s = got
    at = kt[np.isclose(kt.tau_mult, 1.0)]
    cl_at, sm_at = at[at.estimator == "kl_clamped"], at[at.estimator == "kl_softmax"]
    n_inst, n_pt, n_rho = kt.instance.nunique(), kt.point.nunique(), kt.rho_frac.nunique()
    cos_sm = s.get("cos_at_lam_star_softmax", float(sm_at.cosine.min()))
    cos_cl = s.get("cos_at_lam_star", float(cl_at.cosine.min()))
    exact = sm_at.norm_ratio.round(6).eq(1).all()
    ratio = ("1 to the table's 6 digits" if exact
             else _rng(sm_at.norm_ratio.min(), sm_at.norm_ratio.max(), 4))
    clamp_at = float(cl_at.clamp_frac.max())
    one = (f"**tau = lam\\* {'reproduces' if cos_sm > 1 - 1e-9 and exact else 'approximates'} the exact KLDPO "
           f"direction.** The normalised tilt at `tau = lam*` "
           f"{'equals' if cos_sm > 1 - 1e-9 and exact else 'approximates'} the Danskin gradient: cosine "
           f">= 1 - {_up1(max(1 - cos_sm, 1e-17))} (`cos_at_lam_star_softmax` = {cos_sm!r}) and norm ratio "
           f"{ratio} over {n_inst} instances x {n_pt} points x {n_rho} radii. The authors' clamped weights at "
           f"`tau = lam*` have cosine >= 1 - {_up1(max(1 - cos_cl, 1e-17))} too (`cos_at_lam_star` = {cos_cl!r}): ")
    if clamp_at == 0:
        one += (f"for `rho < rho_c` the clamp (10) never binds at `tau = lam*` (clamp active on 0% of the mass "
                f"in all {len(cl_at)} cases: largest loss deviation / lam\\* < log 10), so the clamped weights "
                f"are a rescaling.")
    else:
        one += f"the clamp (10) binds at `tau = lam*` on up to {clamp_at:.0%} of the mass."
    cl, sm = kt[kt.estimator == "kl_clamped"], kt[kt.estimator == "kl_softmax"]
    lo_t, hi_t = float(cl.tau_mult.min()), float(cl.tau_mult.max())
    c_lo, c_hi = cl[np.isclose(cl.tau_mult, lo_t)], cl[np.isclose(cl.tau_mult, hi_t)]
    s_lo = sm[np.isclose(sm.tau_mult, lo_t)]
    rescale = np.allclose(cl_at.norm_ratio, cl_at.mean_w, rtol=1e-4)
    clamp_max = cl.groupby("tau_mult").clamp_frac.max()
    inv = f"lam\\*/{1 / lo_t:g}" if lo_t < 1 else f"{lo_t:g} lam*"
    helps = "helps" if c_lo.cosine.median() > s_lo.cosine.median() else "hurts"
    two = (f"**Unnormalised weights inflate the norm; a wrong tau bends the direction.** At `tau = lam*` the "
           f"clamped gradient is {sig(cl_at.norm_ratio.min(), 4)}-{sig(cl_at.norm_ratio.max(), 3)}x the exact "
           f"norm{' (the mean weight `sum p_i w_i`)' if rescale else ''}. Off `lam*` (tau/lam\\* in "
           f"[1/{1 / lo_t:g}, {hi_t:g}]): norm ratio {sig(cl.norm_ratio.min())}x-{sig(cl.norm_ratio.max(), 3)}x, "
           f"mean weight up to {sig(cl.mean_w.max())}, clamp active on up to {clamp_max.max():.0%} of the mass at "
           f"tau = {inv if np.isclose(clamp_max.idxmax(), lo_t) else f'{clamp_max.idxmax():g} lam*'}; cosine "
           f"falls to {sig(c_lo.cosine.median())} (median) / {sig(c_lo.cosine.min())} (worst point) at "
           f"tau = {inv} and to {sig(c_hi.cosine.median())} / {sig(c_hi.cosine.min())} at tau = {hi_t:g} lam\\* "
           f"(`docs/results/gradients/kl_tau.csv`, `figures/gradients_cosine_vs_tau.png`). The clamp {helps} the "
           f"direction for small tau (median cosine {c_lo.cosine.median():.3f} vs {s_lo.cosine.median():.3f} "
           f"normalised at tau = {inv}).")
    return "\n".join([_item(1, one), _item(2, two)])


# ----------------------------------------------------------------------------- finding 3 (kl_path.csv)
def block_kl_path(r) -> str:
    got = _need(r, "gradients", _G + "kl_path.csv")
    if got is None:
        return _missing(3, "No single tau matches throughout training.", "gradients")
    (p,) = got
    keys = ["instance", "rho_frac"]
    g = p.groupby(keys)
    ratio = g.lam_star.max() / g.lam_star.min()
    (i_max, f_max) = ratio.idxmax()
    case = p[(p.instance == i_max) & (p.rho_frac == f_max)].sort_values("step")
    g0 = g.grad_norm.transform("first")
    live = p[p.grad_norm >= 0.01 * g0].groupby(keys).agg(end=("cos_softmax_tau_end", "min"),
                                                        start=("cos_softmax_tau_start", "min"))
    fracs = sorted(p.rho_frac.unique())
    big = fracs[-1]
    small = live[live.index.get_level_values("rho_frac") < big]
    last = live[live.index.get_level_values("rho_frac") == big]
    r_last = ratio[ratio.index.get_level_values("rho_frac") == big]
    neg = (small.start < 0).all()
    text = (f"**No single tau matches throughout training.** Along exact full-batch gradient descent from "
            f"`theta_ref` (`kl_path.csv`, `figures/gradients_lam_path.png`) lam\\* moves by up to "
            f"{ratio.max():.1f}x (instance {i_max}, rho = {_frac(f_max)} rho_c: {case.lam_star.iloc[0]:.2f} -> "
            f"{case.lam_star.iloc[-1]:.2f}). With tau frozen at the end point's lam\\*, the normalised "
            f"direction's cosine early in training drops to {sig(small.end.min())}-{sig(small.end.max())} "
            f"(rho <= {_frac(fracs[-2])} rho_c; smallest cosine per run while the exact gradient is still >= 1% "
            f"of its initial norm); frozen at the first step's lam\\*, it ")
    if neg:
        text += (f"turns negative ({sig(small.start.max())} to {sig(small.start.min())}): those updates move "
                 f"away from the robust optimum.")
    else:
        text += f"drops to {sig(small.start.max())} to {sig(small.start.min())}."
    text += (f" At {_frac(big)} rho_c, where lam\\* moves least ({sig(r_last.min(), 3)}-{sig(r_last.max(), 3)}x), "
             f"the smallest cosines are {sig(last.end.min())} to {sig(last.end.max())} (end point's lam\\*) and "
             f"{sig(last.start.min())} to {sig(last.start.max())} (first step's). What fixes the end point is "
             f"only tau at the optimum (finding 7).")
    return _item(3, text)


# ----------------------------------------------------------------------------- finding 4 (batch.csv)
def block_batch(r) -> str:
    got = _need(r, "gradients", _G + "batch.csv")
    if got is None:
        return _missing(4, "Mini-batch bias (KL).", "gradients")
    (b,) = got
    bias = b.groupby(["estimator", "batch_size"]).bias.mean().unstack()
    se = b.groupby(["estimator", "batch_size"]).mc_se.mean()
    sizes = list(bias.columns)
    row = lambda e: " / ".join(sig(v) for v in bias.loc[e])  # noqa: E731
    kl_se = se[se.index.get_level_values(0).str.startswith("kl")].max()
    big = bias.loc["kl_clamped", sizes[-2:]]
    fo, sq = bias.loc["w2_first_order"], bias.loc["w2_sq_penalty"]
    text = (f"**Mini-batch bias (KL) is O(1/b) and not small for small batches.** With tau (or lam\\*) "
            f"calibrated on the full data at the evaluation point (so the full-data estimators are exact), the "
            f"bias of the mean mini-batch gradient, `||E g_b - g*||/||g*||` (control variate: the unbiased DPO "
            f"batch gradient; `batch.csv`), is for b = {' / '.join(str(int(s)) for s in sizes)}: "
            f"normalised {row('kl_softmax')}, batch-calibrated {row('kl_calibrated')}, clamped "
            f"{row('kl_clamped')} (mean Monte-Carlo s.e. <= {ceil_to(kl_se, 3)}). The clamped estimator keeps a "
            f"{big.min():.0%}-{big.max():.0%} bias at large b: its weights are centred on the *batch* mean loss, "
            f"so their scale depends on the batch. W2: one-step adversarial {row('w2_adversarial')}; first-order "
            f"{sig(fo.iloc[0])} -> {sig(fo.iloc[-1])}, squared penalty {sig(sq.iloc[0])} -> {sig(sq.iloc[-1])}, "
            f"i.e. the O(eps) first-order error (finding 5) dominates the batch effect.")
    return _item(4, text)


# ----------------------------------------------------------------------------- finding 5 (value_error.csv)
def block_value_error(r) -> str:
    got = _need(r, "gradients", _G + "value_error.csv", _G + "summary.json")
    if got is None:
        return _missing(5, "Gao's first-order W2 value.", "gradients")
    v, s = got
    slope = s["first_order_slope"]
    lo, hi = s["first_order_slope_range"]
    under = bool((v.error >= -1e-12).all())
    emax = float(v.eps.max())
    at = v[np.isclose(v.eps, emax)]
    wr = r.csv(_G + "w_radius.csv")
    frac = ""
    if wr is not None:
        epsc = (wr.eps / wr.eps_frac).groupby(wr.instance).first()
        q = emax / epsc
        frac = f" ({q.min():.2f}-{q.max():.2f} eps_c)"
    text = (f"**Gao's first-order W2 value {'underestimates' if under else 'misestimates'} with error "
            f"O(eps^{round(slope)}).** Against the exact continuous-support W2 value (not the finite-support "
            f"one: the expansion is about moving x infinitesimally, which a finite support cannot do), at "
            f"{v.point.nunique()} points x {v.instance.nunique()} instances and eps in [{v.eps.min():g}, {emax:g}] "
            f"(x-space): the error is {'positive everywhere' if under else 'of both signs'} and the fitted "
            f"log-log slope is **{slope:.4f}** (range {lo:.4f}-{hi:.4f}; `first_order_slope`; "
            f"`figures/gradients_value_error.png`). At eps = {emax:g}{frac} the error is {sig(at.error.min())} "
            f"to {sig(at.error.max())} nats, <= {ceil_to(100 * at.rel_error.max(), 1)}% of the robust increment.")
    return _item(5, text)


# ----------------------------------------------------------------------------- finding 6 (w_radius.csv)
def block_w_radius(r) -> str:
    got = _need(r, "gradients", _G + "w_radius.csv")
    if got is None:
        return _missing(6, "WDPO gradients.", "gradients")
    (w,) = got
    s = r.json(_G + "summary.json") or {}
    cmin = {**w.groupby("estimator").cosine.min().to_dict(), **s.get("w2_cosine_min", {})}
    fracs = sorted(w.eps_frac.unique())
    rel = w.groupby(["estimator", "eps_frac"]).rel_err.max()
    adv, fo = rel.loc["w2_adversarial"], rel.loc["w2_first_order"]
    sq, sqv = w[w.estimator == "w2_sq_penalty"], w[w.estimator == "w2_sq_penalty_value"]
    at_sq = sq.loc[sq.rel_err.idxmax(), "eps_frac"]
    at_sqv = sqv.loc[sqv.rel_err.idxmax(), "eps_frac"]
    grow = lambda x: "growing with eps" if x.is_monotonic_increasing else "not monotone in eps"  # noqa: E731
    corr = sq
    text = (f"**WDPO gradients.** Against the exact W2 gradient over eps in "
            f"{{{', '.join(_frac(f) for f in fracs)}}} eps_c (`w_radius.csv`): the one-step adversarial estimator "
            f"is nearly exact (cosine >= {floor_to(cmin['w2_adversarial'], 6)}, worst relative error "
            f"{sig(adv.iloc[0])} at {_frac(fracs[0])} eps_c to {sig(adv.iloc[-1])} at {_frac(fracs[-1])} eps_c); "
            f"Gao's first-order gradient has cosine >= {floor_to(cmin['w2_first_order'], 4)} but worst relative "
            f"error {100 * fo.iloc[0]:.1f}%-{100 * fo.iloc[-1]:.0f}% ({grow(fo)}); the squared penalty with `rho0` "
            f"calibrated once at `theta_DPO` (gradient rule) degrades away from that point: cosine down to "
            f"{sig(cmin['w2_sq_penalty'])}, relative error up to {100 * sq.rel_err.max():.0f}% at "
            f"{_frac(at_sq)} eps_c (the value rule: cosine down to {sig(cmin['w2_sq_penalty_value'])}, relative "
            f"error up to {100 * sqv.rel_err.max():.0f}%, at {_frac(at_sqv)} eps_c). Its robust correction has the "
            f"right *direction* (cosine >= {floor_to(corr.corr_cosine.min(), 4)} of `g - g_DPO`) but the wrong "
            f"*size* (up to {100 * corr.corr_rel_err.max():.0f}% off), because the matching rho0 changes with theta.")
    return _item(6, text)


# ----------------------------------------------------------------------------- finding 7 (sgd.csv)
_SGD_ORDER = [("dpo", "DPO (noise floor)"), ("kl_clamped", "KL clamped (oracle tau = lam\\* at the optimum)"),
              ("kl_softmax", "normalised (same tau)"),
              ("kl_clamped_dpo_tau", "**clamped with tau = lam\\* at theta_DPO"),
              ("kl_calibrated", "batch-calibrated"), ("w2_first_order", "W2 first-order"),
              ("w2_adversarial", "adversarial"),
              ("w2_sq_penalty", "squared penalty (oracle rho0 at the W2 optimum)"),
              ("w2_sq_penalty_dpo", "**squared penalty with rho0 at theta_DPO")]
_FP_NAMES = {"kl_clamped_dpo_tau": "KL, tau at DPO", "w2_sq_penalty_dpo": "W2 penalty, rho0 at DPO",
             "w2_first_order": "first-order", "w2_sq_penalty": "penalty, oracle", "w2_adversarial": "adversarial",
             "kl_clamped": "KL with oracle tau", "kl_softmax": "KL with oracle tau",
             "kl_calibrated": "batch-calibrated"}


def block_sgd(r) -> str:
    got = _need(r, "gradients", _G + "sgd.csv")
    if got is None:
        return _missing(7, "SGD end points.", "gradients")
    (sg,) = got
    g = sg.groupby("estimator")
    mean, sd = g.err.mean(), g.err.std(ddof=1)
    tnorm = (sg.err / sg.err_rel).groupby(sg.family).agg(["min", "max"])
    robust = tnorm.drop(index="dpo", errors="ignore")
    n_inst, n_seed = sg.instance.nunique(), sg.sgd_seed.nunique()
    parts = []
    for k, label in _SGD_ORDER:
        if k in mean.index:
            bold = label.startswith("**")
            parts.append(f"{label} {_pm(mean[k], sd[k])}{'**' if bold else ''}")
    fp = g.fixed_point_err.agg(["mean", "max"]).drop(index="dpo", errors="ignore")
    fp = fp.sort_values("mean", ascending=False)
    exact = fp[fp["max"] < 1e-6]
    fps = [f"{sig(row['mean'])} ({_FP_NAMES.get(k, k)})" for k, row in fp.iterrows() if k not in exact.index]
    if len(exact):
        names = dict.fromkeys(_FP_NAMES.get(k, k) for k in exact.index)
        fps.append(f"<= {_up1(exact['max'].max())} (" + ", ".join(names) + ")")
    cal = sg[sg.estimator == "kl_calibrated"]
    closer = float((cal.target_dist_to_dpo - cal.dist_to_dpo).mean())
    tau_opt = float(sg[sg.estimator == "kl_clamped"].param_tau.mean())
    tau_dpo = float(sg[sg.estimator == "kl_clamped_dpo_tau"].param_tau.mean())
    big = [k for k in ("kl_clamped_dpo_tau", "w2_sq_penalty_dpo") if k in fp.index]
    text = (f"**SGD end points** (`sgd.csv`, `figures/gradients_sgd_endpoints.png`; `||theta_SGD - theta_exact||`, "
            f"mean ± sd over {n_inst} instances x {n_seed} seeds; the robust targets are "
            f"{_rng(robust['min'].min(), robust['max'].max())} from `theta_ref`, DPO's "
            f"{sig(tnorm.loc['dpo', 'max']) if 'dpo' in tnorm.index else 'n/a'}): " + "; ".join(parts)
            + ". The noise-free full-batch fixed points explain the large ones: " + ", ".join(fps) + ".")
    if "kl_calibrated" in exact.index:
        text += (f" The batch-calibrated estimator has an exact fixed point but its mini-batch bias (b = 64, "
                 f"section 3) leaves it {sig(mean['kl_calibrated'])} away (it is less adversarial on a small "
                 f"batch: end point {sig(closer)} closer to DPO than the target).")
    if big:
        text += (f" Guidance: calibrate tau / rho0 where training ends, not at the DPO solution (the DPO-calibrated "
                 f"tau is {tau_dpo / tau_opt:.1f}x too large here, {tau_dpo:.2f} vs {tau_opt:.2f}), or recalibrate "
                 f"during training (the batch dual does this for KL, the first-order/adversarial estimators do it "
                 f"for W2).")
    return _item(7, text)


# ----------------------------------------------------------------------------- finding 8 (beta.csv)
def block_beta(r) -> str:
    got = _need(r, "gradients", _G + "beta.csv")
    if got is None:
        return _missing(8, "beta.", "gradients")
    (b,) = got
    betas = sorted(b.beta.unique())
    lo, hi = betas[0], betas[-1]
    inst = int(b.instance.min())
    lam = b[b.instance == inst].groupby("beta").lam_star.first()
    shown = [x for x in (lo, 1.0, hi) if x in lam.index]
    fr = b[b.tau_rule == "frozen"]
    c = fr.groupby("beta").cosine.agg(["min", "max"])
    text = (f"**beta.** In this model the losses depend on `beta (theta - theta_ref)` only, so at fixed "
            f"`beta theta` changing beta changes nothing. At a fixed theta, lam\\* scales with beta "
            f"({' -> '.join(sig(lam[x], 3) for x in shown)} for beta = {', '.join(f'{x:g}' for x in shown)} at "
            f"instance {inst}'s first random point), and a tau calibrated at beta = 1 has cosine "
            f"{sig(c.loc[lo, 'min'])}-{sig(c.loc[lo, 'max'])} at beta = {lo:g} and "
            f"{sig(c.loc[hi, 'min'])}-{sig(c.loc[hi, 'max'])} at beta = {hi:g} (`beta.csv`): tau must be "
            f"recalibrated whenever beta changes.")
    return _item(8, text)


# ----------------------------------------------------------------------------- section 5 (shift)
_NON_ROBUST = ("dpo", "dpo_sgd", "reference")
#: approximate method -> its exact counterpart
_EXACT_OF = {"kl_clamped_sgd": "kldpo", "kl_calibrated_sgd": "kldpo", "w2_sq_penalty_sgd": "wdpo_w2",
             "w2_adversarial_sgd": "wdpo_w2"}


def robust_methods(s: dict) -> list[str]:
    """The methods of a shift summary other than DPO (exact and SGD)."""
    return [m for m in s["methods"] if m not in _NON_ROBUST]


def alpha_phrase(alphas, grid=None) -> str:
    """``alpha = 1`` / ``alpha >= 0.8`` (all of ``grid`` from 0.8 on) / ``alpha in {0.2, 0.5}``."""
    a = sorted(float(x) for x in alphas)
    if len(a) == 1:
        return f"alpha = {a[0]:g}"
    if grid is not None and a == [float(x) for x in sorted(grid) if x >= a[0]]:
        return f"alpha >= {a[0]:g}"
    return f"alpha in {{{', '.join(f'{x:g}' for x in a)}}}"


def _label(m: str) -> str:
    from .report import _SHIFT_LABELS

    return _SHIFT_LABELS.get(m, m)


def shift_facts(s: dict, sh: pd.DataFrame) -> dict:
    """What the section-5 finding says about one shift study (summary + table)."""
    alphas = np.asarray(s["alphas"], dtype=float)
    rob = robust_methods(s)
    dpo = np.asarray(s["methods"]["dpo"]["reward_mean"])
    loss = sh.groupby(["method", "alpha"]).dpo_loss.mean().unstack()
    acc = sh[sh.method != "reference"].groupby(["method", "alpha"]).accuracy.mean().unstack()
    norm = sh.groupby("method").theta_norm.mean()
    worse_reward = [m for m in rob if (np.asarray(s["methods"][m]["reward_mean"]) < dpo).all()]
    loss_exc = {m: [a for a in loss.columns if loss.loc[m, a] <= loss.loc["dpo", a]] for m in rob
                if m in loss.index and np.isfinite(loss.loc[m]).all()}  # (a method without losses: no claim)
    between = {m: (lambda r, e: bool(((r - dpo) * (r - e) <= 0).all()))(
        np.asarray(s["methods"][m]["reward_mean"]), np.asarray(s["methods"][e]["reward_mean"]))
        for m, e in _EXACT_OF.items() if m in s["methods"] and e in s["methods"]}
    worst_at_end = all(int(np.argmin(v["reward_mean"])) in (0, len(alphas) - 1) for v in s["methods"].values())
    dpo_best_worst = s["methods"]["dpo"]["worst_alpha_reward_mean"] >= max(
        s["methods"][m]["worst_alpha_reward_mean"] for m in rob)
    return dict(alphas=[float(a) for a in alphas], rob=rob, worse_reward=worse_reward, loss_exc=loss_exc,
                between=between, worst_at_end=worst_at_end, dpo_best_worst=dpo_best_worst,
                norm_dpo=float(norm["dpo"]),
                norm_rob=(float(norm[rob].min()), float(norm[rob].max())),
                acc0=(float(min(v["accuracy_at_alpha0"] for v in s["methods"].values())),
                      float(max(v["accuracy_at_alpha0"] for v in s["methods"].values()))),
                acc_spread=float((acc.max() - acc.min()).max()))


def _loss_clause(f: dict) -> str:
    exc = {m: a for m, a in f["loss_exc"].items() if a}
    if not exc:
        return "has a higher DPO loss than DPO at *every* alpha"
    by: dict[str, list[str]] = {}
    for m, a in exc.items():
        by.setdefault(alpha_phrase(a, f["alphas"]), []).append(_label(m))
    return ("has a higher DPO loss than DPO at every alpha except "
            + "; ".join(f"at {ph} for {', '.join(ms)}" for ph, ms in by.items()))


def block_shift_finding(r) -> str:
    got = _need(r, "shift", "shift/summary.json", "shift/shift.csv")
    if got is None:
        return _missing(None, "Finding:", "shift")
    s, sh = got
    f = shift_facts(s, sh)
    all_worse = len(f["worse_reward"]) == len(f["rob"])
    head = ("**in this world robustness does not pay under the mixture shift.**" if all_worse and f["dpo_best_worst"]
            else "**robustness pays under the mixture shift only for "
                 + ", ".join(_label(m) for m in f["rob"] if m not in f["worse_reward"]) + ".**")
    who = "Every robust method" if all_worse else "The robust methods other than those"
    shrink = "shrinks" if f["norm_rob"][1] < f["norm_dpo"] else "does not always shrink"
    text = (f"Finding: {head} {who} {shrink} theta toward theta_ref (mean norm {f['norm_dpo']:.2f} for DPO vs "
            f"{f['norm_rob'][0]:.2f}-{f['norm_rob'][1]:.2f}), keeps nearly the same direction (the preference "
            f"accuracies of all methods within {ceil_to(f['acc_spread'], 3)} of each other at every alpha, "
            f"{f['acc0'][0]:.3f}-{f['acc0'][1]:.3f} at alpha0), and so loses reward at *every* alpha, including "
            f"the worst one; it also {_loss_clause(f)}.")
    if f["worst_at_end"]:
        text += (" The reward of a fixed policy is linear in alpha, so the worst case is at an end point, and "
                 + ("DPO wins there too." if f["dpo_best_worst"] else "DPO does not win there."))
    bet = f["between"]
    if bet:
        if all(bet.values()):
            text += (" The approximate KL/W2 methods calibrated at the DPO solution sit between DPO and their exact "
                     "counterparts at every alpha (they are less robust than the radius they were calibrated for: "
                     "findings 6-7).")
        else:
            text += (" Of the approximate KL/W2 methods calibrated at the DPO solution, "
                     + ", ".join(_label(m) for m, ok in bet.items() if ok)
                     + " sit between DPO and their exact counterparts at every alpha; "
                     + ", ".join(_label(m) for m, ok in bet.items() if not ok) + " do not.")
    sr_got = _need(r, "shift-reward", "shift-reward/summary.json", "shift-reward/shift.csv")
    if sr_got is None:
        from .report import _missing as miss

        text += " Reward mixture: " + miss("shift-reward")
    else:
        g = shift_facts(*sr_got)
        same = len(g["worse_reward"]) == len(g["rob"]) and g["dpo_best_worst"]
        text += (f" With the reward mixture (well-specified BT, `drdpo shift --mixture reward`) the reward picture "
                 f"is {'the same' if same else 'different'} (rewards above; mean norm {g['norm_dpo']:.2f} for DPO "
                 f"vs {g['norm_rob'][0]:.2f}-{g['norm_rob'][1]:.2f}), and every robust method "
                 + _loss_clause(g)
                 + " (`docs/results/shift-reward/`, `figures/shift_reward_vs_alpha_reward_mixture.png`).")
    return _para(text)


# ----------------------------------------------------------------------------- section 6 (run times)
def block_run_times(r) -> str:
    from .report import STUDY_FILES

    rows = ["| full run (collected in `docs/results/`) | what | wall time |", "| --- | --- | --- |"]
    what = {"gradients": "full grid above", "shift": "10 seeds, n = 1000, label mixture",
            "shift-reward": "the same, reward mixture"}
    for study in ("gradients", "shift", "shift-reward"):
        s = r.json(f"{study}/summary.json")
        cmd = (r.manifest(study).get("command") or STUDY_FILES[study][2])
        if s is None or "seconds" not in s:
            from .report import NOT_REGENERATED

            rows.append(f"| `{cmd}` | {what[study]} | *{NOT_REGENERATED}* |")
            continue
        sec = float(s["seconds"])
        rows.append(f"| `{cmd}` | {what[study]} | {sec:.0f} s (~{sec / 60:.1f} min) |")
    return "\n".join(rows)


BLOCKS = {
    "approx-kl-tau": block_kl_tau,
    "approx-kl-path": block_kl_path,
    "approx-batch": block_batch,
    "approx-value-error": block_value_error,
    "approx-w-radius": block_w_radius,
    "approx-sgd": block_sgd,
    "approx-beta": block_beta,
    "approx-shift-finding": block_shift_finding,
    "approx-run-times": block_run_times,
}
