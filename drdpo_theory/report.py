"""Committed full-run summaries -> the numbers of paper_repro.md (``drdpo reproduce --report``).

``results/`` is not committed (it holds caches and per-cell rows). The small summary files of the
full runs that paper_repro.md quotes are copied to ``docs/results/`` by ``drdpo reproduce
--collect`` (tables rounded to 6 significant digits, columns the report and figures need) and
committed. :func:`render_blocks` turns them into the text of every generated block, and
:func:`update_document` rewrites the blocks of a markdown file between the markers

    <!-- BEGIN generated:NAME -->
    ...
    <!-- END generated:NAME -->

leaving everything else alone. ``drdpo reproduce --report --check`` fails when the committed
document differs from the generated one (tests/test_report.py runs the same check), so every
number inside a block is the committed data's. A study whose summary is not committed renders as
"not regenerated in this checkout".
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import report_approx as _approx
from . import report_bench as _bench

__all__ = ["RESULTS_DIR", "DOCUMENTS", "STUDY_FILES", "collect", "render_blocks", "update_document",
           "check_documents", "write_documents", "regenerate_figures", "NOT_REGENERATED"]

#: where the committed summaries live (relative to the repository root)
RESULTS_DIR = Path("docs/results")
#: the documents whose generated blocks come from RESULTS_DIR
DOCUMENTS = (Path("paper_repro.md"), Path("docs/sample_complexity_results.md"), Path("docs/approximations.md"),
             Path("docs/llm_shift.md"))
#: the marker every unverified number carries
NOT_REGENERATED = _bench.NOT_REGENERATED

_SIG = "%.6g"

#: study -> (source folder under results/ or runs/, [(file, columns kept or None = all)], command)
STUDY_FILES: dict[str, tuple[str, list[tuple[str, list[str] | None]], str]] = {
    "solver-check": ("results/solver_check", [("solver_check.csv", None)], "drdpo solver-check --json"),
    "sample-complexity": ("results/sample_complexity",
                          [("headline.json", None), ("fits.csv", None), ("summary.csv", None), ("bounds.csv", None)],
                          "drdpo sample-complexity --n-jobs 2 --json"),
    "gradients": ("results/gradients",
                  [("summary.json", None),
                   ("kl_tau.csv", ["instance", "rho_frac", "point", "tau_mult", "estimator", "cosine", "norm_ratio",
                                   "clamp_frac", "mean_w"]),
                   ("kl_path.csv", None), ("value_error.csv", None), ("sgd.csv", None), ("w_radius.csv", None),
                   ("batch.csv", None), ("beta.csv", None)],
                  "drdpo gradients --n-jobs 2 --json"),
    "shift": ("results/shift", [("summary.json", None), ("shift.csv", None)], "drdpo shift --n-jobs 2 --json"),
    "shift-reward": ("results/shift_reward", [("summary.json", None), ("shift.csv", None)],
                     "drdpo shift --mixture reward --n-jobs 2 --json"),
    "shift-family": ("results/shift_family",
                     [("summary.json", None), ("family_table.csv", None),
                      ("shift.csv", ["seed", "method", "alpha", "reward", "theta_norm", "alpha0"])],  # the figure's
                     "drdpo shift --family --n-jobs 2 --json"),
    "gradients-family": ("results/gradients_family",
                         [("summary.json", None),
                          ("family_batch.csv", ["instance", "point", "batch_size", "member", "bias", "mc_se", "mean_cos"]),
                          ("family_sgd.csv", ["instance", "sgd_seed", "member", "status", "err", "excess", "dpo_err"])],
                         "drdpo gradients --family --n-jobs 2 --json"),
    "llm-shift": ("results/llm_shift", [("results.json", None)],
                  "drdpo llm-shift --model smollm2 --out runs/llm_shift --results-json results/llm_shift/results.json"),
    "llm-shift-seeds01": ("results/llm_shift", [("seeds01_results.json", None)],
                          "drdpo llm-shift --model smollm2 --out runs/llm_shift --seeds 0,1 "
                          "--results-json results/llm_shift/seeds01_results.json"),
    "llm-shift-sweep": ("results/llm_shift", [("sweep_results.json", None)],
                        "drdpo llm-shift --model smollm2 --out runs/llm_shift --tau 0.1,1 --rho0 0.005,0.05 "
                        "--results-json results/llm_shift/sweep_results.json"),
    "llm-shift-emotion": ("results/llm_shift", [("emotion_results.json", None)],
                          "drdpo llm-shift --model smollm2 --preset emotion --out runs/llm_shift_emotion --n-train 200 --k 4 --"
                          "pairs-per-prompt 2 --eval-samples 2 --steps 38 --seeds 0,1,2 --methods dpo,kldpo,wdpo --kl-radii 0.0"
                          "5,0.5 --penalty-fractions 0.1,1 --wdpo-penalty rows,tuple --workers 2 --figure figures/llm_shift_emo"
                          "tion.png --table results/llm_shift/emotion_table.md --results-json results/llm_shift/emotion_results.json --json"),
    "shift-map": ("results/shift_map", [("shift_map_compact.json", None),
                                        ("shift_map_best.csv", ["shift", "angle", "ratio", "n", "alpha", "method", "frac",
                                                                "delta_reward", "delta_reward_lo", "delta_reward_hi",
                                                                "wins"])],
                  "drdpo shift-map --n-jobs 2 --json"),
    "shift-map-family": ("results/shift_map_family", [("shift_map_compact.json", None)],
                         "drdpo shift-map --family --n-jobs 2 --json"),
    # benchmarks (drdpo_theory.report_bench): each script writes one JSON with --json
    **{name: ("results/bench", [(file, None)], cmd) for name, (file, cmd) in _bench.BENCH.items()},
}

_DEST = {"llm-shift-seeds01": "llm-shift", "llm-shift-sweep": "llm-shift", "llm-shift-emotion": "llm-shift", "shift-family": "family",
         **{name: "bench" for name in _bench.BENCH}}


#: a source file committed under another name (the shift map's compact summary is its shift_map.json)
_DEST_NAME = {"shift_map_compact.json": "shift_map.json"}


def _dest(study: str) -> str:
    return _DEST.get(study, study)


# ----------------------------------------------------------------------------- collect
def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _round_floats(obj, digits: int = 6):
    """``obj`` with every float rounded to ``digits`` significant digits (lists and dicts recursively)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, list):
        return [_round_floats(v, digits) for v in obj]
    if isinstance(obj, dict):
        return {k: _round_floats(v, digits) for k, v in obj.items()}
    return obj


def _slim_json(study: str, name: str, obj):
    """Drop what is bulky and not a number the docs quote (llm-shift: per-stage configs)."""
    if study == "llm-shift-emotion" and isinstance(obj, dict):  # 6 significant digits (as the collected CSVs)
        return _round_floats({k: v for k, v in obj.items() if k not in ("config",)})
    if study.startswith("llm-shift") and isinstance(obj, dict):
        return {k: v for k, v in obj.items() if k not in ("config",)}
    if study == "shift-map-family" and isinstance(obj, dict):
        # the cell-by-cell regions (hundreds of family wins) stay in results/; their counts are in "wins"
        return {k: v for k, v in obj.items() if k != "regions"}
    if study == "shift-family" and isinstance(obj, dict):  # both are in family_table.csv and shift.csv next to it
        return {k: v for k, v in obj.items() if k not in ("methods", "family_table")}
    return obj


def collect(studies=None, root: str | Path = ".", dest: str | Path | None = None, log=print) -> dict:
    """Copy the summaries of the full runs from ``results/`` to ``docs/results/<study>/`` (CSV
    rounded to 6 significant digits), computing ``summary.json`` where a study only left tables,
    and record what was collected, when and from which commit in ``docs/results/manifest.json``.
    A study whose full-run files are missing is skipped (and said so). Returns the manifest."""
    from .io import read_json, write_json, write_text

    root = Path(root)
    dest = root / (dest or RESULTS_DIR)
    manifest_path = dest / "manifest.json"
    manifest = read_json(manifest_path)
    manifest = manifest if isinstance(manifest, dict) else {}
    for study in studies or STUDY_FILES:
        src_dir, files, command = STUDY_FILES[study]
        src = root / src_dir
        missing = [f for f, _ in files if not (src / f).is_file() and f != "summary.json"]
        if missing:
            log(f"[skip] {study}: no full-run {', '.join(missing)} in {src_dir}/")
            continue
        out = dest / _dest(study)
        for name, cols in files:
            p = src / name
            to = out / _DEST_NAME.get(name, name)
            if name.endswith(".csv"):
                df = pd.read_csv(p)
                if cols:
                    df = df[[c for c in cols if c in df.columns]]
                write_text(to, df.to_csv(index=False, lineterminator="\n", float_format=_SIG))
            elif name == "summary.json" and not p.is_file():
                write_json(to, _computed_summary(study, src))
            else:
                write_json(to, _slim_json(study, name, json.loads(p.read_text())))
        if study == "solver-check":
            from .experiments.solver_check import summarise

            write_json(out / "summary.json", summarise(pd.read_csv(src / "solver_check.csv")))
        manifest[study] = {"command": command, "collected": time.strftime("%Y-%m-%d", time.gmtime()),
                           "commit": _git_commit(root),
                           "files": [f"{_dest(study)}/{_DEST_NAME.get(f, f)}" for f, _ in files]}
        log(f"[done] {study} -> {out}/")
    write_json(manifest_path, dict(sorted(manifest.items())))
    return manifest


def _computed_summary(study: str, src: Path) -> dict:
    """``summary.json`` of a study that wrote only tables (runs older than the summary file)."""
    if study == "gradients":
        from .experiments.gradients import TABLES, summarize

        return summarize({k: pd.read_csv(src / f"{k}.csv") for k in TABLES if (src / f"{k}.csv").is_file()})
    if study.startswith("shift"):
        from .experiments.shift import summarize_shift

        return summarize_shift(pd.read_csv(src / "shift.csv"))
    raise FileNotFoundError(f"{src}/summary.json")


# ----------------------------------------------------------------------------- loading
class _Results:
    """Lazy reader of the committed summaries (``None`` when a file is not committed)."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self._cache: dict = {}

    def json(self, rel: str):
        if rel not in self._cache:
            p = self.base / rel
            self._cache[rel] = json.loads(p.read_text()) if p.is_file() else None
        return self._cache[rel]

    def csv(self, rel: str):
        if rel not in self._cache:
            p = self.base / rel
            self._cache[rel] = pd.read_csv(p) if p.is_file() else None
        return self._cache[rel]

    def manifest(self, study: str) -> dict:
        m = self.json("manifest.json") or {}
        return m.get(study, {})


def _f(v, fmt=".3f") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return "∞" if v == "inf" else v
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return format(v, fmt)


def _src(r: _Results, study: str, file: str) -> str:
    m = r.manifest(study)
    when = f" (collected {m['collected']} at commit {m['commit']})" if m.get("commit") else ""
    return f"`docs/results/{_dest(study)}/{file}`{when}"


def _missing(study: str) -> str:
    cmd = STUDY_FILES[study][2]
    return (f"*{NOT_REGENERATED}*: no committed summary of the full run (`{cmd}`, then "
            f"`drdpo reproduce --collect`).")


# ----------------------------------------------------------------------------- blocks
_METHOD = {"dpo": "DPO", "kldpo": "KLDPO", "wdpo-w1": "WDPO-W1", "wdpo-w2": "WDPO-W2"}
_RADIUS = {"dpo": "-", "kldpo": "rho", "wdpo-w1": "eps", "wdpo-w2": "eps"}


def _sc_main(r: _Results):
    head = r.json("sample-complexity/headline.json")
    summ = r.csv("sample-complexity/summary.csv")
    if head is None or summ is None:
        return None
    meta = head.get("_meta", {})
    grid = meta.get("grid", {})
    inst = grid.get("instance", {})
    beta = float(inst.get("beta", 2.0))
    rows = []
    for m, h in head.items():
        if m.startswith("_"):
            continue
        s = summ[(summ.study == "main") & (summ.method == m) & np.isclose(summ.radius, h["radius"])
                 & np.isclose(summ.beta, beta)].sort_values("n")
        rows.append((m, h, s))
    return head, rows, grid, inst


def _first_nonvacuous_n(s: pd.DataFrame, diameter: float):
    b = s["bound"].to_numpy(float)
    n = s["n"].to_numpy(float)
    ok = np.isfinite(b) & (b < diameter)
    return None if not ok.any() else int(n[ok][0])


def block_sample_complexity(r: _Results) -> str:
    got = _sc_main(r)
    if got is None:
        return _missing("sample-complexity")
    head, rows, grid, inst = got
    diameter = 2 * float(inst.get("radius", 2.0))
    nmax = max(int(s["n"].max()) for _, _, s in rows if len(s))
    q = 100 * (1 - float(grid.get("delta", 0.1)))
    out = [f"Measured slopes at the main radii (least squares of log median error on log n, bootstrap 95% CI "
           f"over seeds; {_src(r, 'sample-complexity', 'headline.json')}):", "",
           f"| method | radius | slope | 95% CI | bound holds | bound at n = {nmax:g} | {q:.0f}% quantile at n = {nmax:g} "
           f"| bound < diameter 2B from n = | min bound / quantile |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, h, s in rows:
        rad = "-" if m == "dpo" else f"{_RADIUS[m]} = {h['radius']:g}"
        lo, hi = h["slope_ci"]
        holds = {True: "yes", False: "**no**", None: "n/a"}[h["bound_holds"]]
        if h.get("bound_at_max_n") == "inf":
            holds += " (bound = ∞: vacuous)"
        qmax = s["quantile_error"].iloc[-1] if len(s) else None
        nv = _first_nonvacuous_n(s, diameter) if len(s) else None
        out.append(f"| {_METHOD.get(m, m)} | {rad} | {_f(h['slope'])} | [{_f(lo)}, {_f(hi)}] | {holds} | "
                   f"{_f(h['bound_at_max_n'], '.3g')} | {_f(qmax, '.2g')} | {'never' if nv is None else f'{nv:g}'} | "
                   f"{_f(h.get('min_bound_over_quantile'), '.1f')} |")
    fits = r.csv("sample-complexity/fits.csv")
    if fits is not None:
        main_r = {m: h["radius"] for m, h, _ in rows}
        other, coll = [], []
        f = fits[fits.study == "main"]
        for _, x in f.sort_values(["method", "radius"]).iterrows():
            if x.method in main_r and np.isclose(x.radius, main_r[x.method]):
                continue
            name = f"{_METHOD.get(x.method, x.method)} {_RADIUS.get(x.method, '')} = {x.radius:g}"
            if bool(x.pop_collapsed):
                thr = x.collapse_threshold
                coll.append(name + (f" (> {_RADIUS[x.method]}_c = {thr:.3g})" if np.isfinite(thr) else ""))
            else:
                other.append(f"{name}: {x.slope:.3f} [{x.slope_lo:.3f}, {x.slope_hi:.3f}]")
        if other:
            out += ["", "Other radii: " + "; ".join(other) + "."]
        if coll:
            out += ["Collapsed (theta_pop = theta_ref, no slope fitted): " + "; ".join(coll) + "."]
        ok = f[~f.pop_collapsed.astype(bool)]
        is_main = np.array([m in main_r and np.isclose(rad, main_r[m]) for m, rad in zip(ok.method, ok.radius)], bool)
        if "gap_slope" in ok and is_main.any():
            gm, go = ok[is_main].gap_slope, ok[~is_main].gap_slope
            out += [f"Excess robust loss `L(theta_n;P°) - L(theta_pop;P°)`: slope {gm.max():.2f} to {gm.min():.2f} at the "
                    f"main radii" + (f", {go.max():.2f} to {go.min():.2f} at the other non-collapsed radii" if len(go) else "")
                    + " (fast rate `1/n`)."]
        b = fits[fits.study == "beta"]
        if len(b):
            out += [f"Beta study (beta in {{{', '.join(f'{v:g}' for v in sorted(b.beta.unique()))}}}): slopes "
                    f"{b.slope.min():.2f} to {b.slope.max():.2f}."]
    return "\n".join(out)


_NEUTRAL = {"kl_calibrated": "KL batch dual", "kl_clamped": "KL clamped", "kl_softmax": "KL normalised",
            "w2_adversarial": "W2 one-step adversarial", "w2_first_order": "W2 first-order",
            "w2_sq_penalty": "W2 sq. penalty (gradient rule)", "w2_sq_penalty_value": "W2 sq. penalty (value rule)"}


def _est(name: str) -> str:
    """Reader-facing estimator name (the figure's tick labels)."""
    from .plots_approx import ESTIMATOR_LABELS

    extra = {"w2_sq_penalty_value": "W2 sq. penalty, ρ₀ by the value rule"}
    return ESTIMATOR_LABELS.get(name, extra.get(name, name))


def block_approximations(r: _Results) -> str:
    s = r.json("gradients/summary.json")
    if s is None:
        return _missing("gradients")
    out = [f"From {_src(r, 'gradients', 'summary.json')} and the tables next to it:", ""]
    kt = r.csv("gradients/kl_tau.csv")
    if kt is not None:
        at = kt[np.isclose(kt.tau_mult, 1.0) & (kt.estimator == "kl_clamped")]
        cl = kt[kt.estimator == "kl_clamped"]
        out.append(f"* KLDPO weights at tau = lam*: cosine to the exact gradient >= {s['cos_at_lam_star']:.16f} "
                   f"(clamped), >= {s['cos_at_lam_star_softmax']:.16f} (normalised); clamped norm "
                   f"{at.norm_ratio.min():.3f}-{at.norm_ratio.max():.3f}x the exact one. Over tau / lam* in "
                   f"[{cl.tau_mult.min():.4g}, {cl.tau_mult.max():.4g}]: norm ratio {cl.norm_ratio.min():.3f}-"
                   f"{cl.norm_ratio.max():.3g}x, cosine down to {cl.cosine.min():.3f}.")
    if "lam_star_path_ratio_max" in s:
        line = f"* lam* moves by up to {s['lam_star_path_ratio_max']:.2f}x along exact gradient descent"
        if "cos_softmax_fixed_tau_start_min_along_path" in s:
            line += (f"; with tau frozen at step 1 the normalised direction's cosine falls to "
                     f"{s['cos_softmax_fixed_tau_start_min_along_path']:.2f} (frozen at the end point: "
                     f"{s['cos_softmax_fixed_tau_end_min_along_path']:.2f}) while the exact gradient is >= 1% of "
                     f"its first-step norm")
        out.append(line + ".")
    if "first_order_slope" in s:
        lo, hi = s["first_order_slope_range"]
        out.append(f"* Gao's first-order W2 value vs the exact continuous W2 value: error slope "
                   f"{s['first_order_slope']:.4f} in eps (range {lo:.4f}-{hi:.4f}); underestimates everywhere: "
                   f"{'yes' if s.get('first_order_underestimates') else 'no'}.")
    if "w2_cosine_min" in s:
        out.append("* W2 gradients, smallest cosine to the exact W2 gradient over the radii (docs/approximations.md, "
                   "finding 6): " + "; ".join(f"{_NEUTRAL.get(k, k)} {v:.4f}"
                                              for k, v in sorted(s["w2_cosine_min"].items()) if k != "dpo") + ".")
    if "batch_bias_smallest_batch" in s:
        out.append(f"* Relative mini-batch bias at b = {s['batch_size_smallest']} (finding 4): "
                   + "; ".join(f"{_NEUTRAL.get(k, k)} {v:.3f}" for k, v in sorted(s["batch_bias_smallest_batch"].items())
                               if k != "dpo") + ".")
    if "sgd_endpoint_error" in s:
        out += ["", "SGD end points, `||theta_SGD - theta_exact||` (mean ± sd over instances x seeds):", "",
                "| estimator | end-point error |", "| --- | --- |"]
        sd = s.get("sgd_endpoint_error_sd", {})
        for k, v in s["sgd_endpoint_error"].items():
            out.append(f"| {_est(k)} (`{k}`) | {v:.3f} ± {sd.get(k, 0.0):.3f} |")
    return "\n".join(out)


_SHIFT_LABELS = {"dpo": "DPO (exact)", "kldpo": "KLDPO (exact)", "wdpo_w1": "WDPO W1 (exact)",
                 "wdpo_w2": "WDPO W2 (exact, continuous)", "dpo_sgd": "DPO (SGD)",
                 "kl_clamped_sgd": "KLDPO authors' weights (SGD)", "kl_calibrated_sgd": "KLDPO batch dual (SGD)",
                 "w2_sq_penalty_sgd": "WDPO squared penalty (SGD)", "w2_adversarial_sgd": "WDPO one-step adversarial (SGD)"}


def _alpha_idx(alphas, targets=(0.0, 0.5, 1.0)):
    return [int(np.argmin(np.abs(np.asarray(alphas) - t))) for t in targets]


def block_shift(r: _Results) -> str:
    s = r.json("shift/summary.json")
    if s is None:
        return _missing("shift")
    idx = _alpha_idx(s["alphas"])
    cols = " | ".join(f"alpha = {s['alphas'][i]:g}" for i in idx)
    out = [f"Mean reward (label mixture, trained at alpha0 = {s['alpha0']:g}; {_src(r, 'shift', 'summary.json')}), "
           f"max s.e. {max(max(v['reward_se']) for v in s['methods'].values()):.3f}:", "",
           f"| method | {cols} | worst over alpha |", "| --- | --- | --- | --- | --- |"]
    for m, v in s["methods"].items():
        out.append(f"| {_SHIFT_LABELS.get(m, m)} | " + " | ".join(f"{v['reward_mean'][i]:.3f}" for i in idx)
                   + f" | {v['worst_alpha_reward_mean']:.3f} |")
    ref = s.get("reference_reward")
    if ref:
        out.append("| reference `pi_{theta_alpha*}` | " + " | ".join(f"{ref[i]:.3f}" for i in idx) + " | |")
    sr = r.json("shift-reward/summary.json")
    if sr is not None:
        j = _alpha_idx(sr["alphas"])
        parts = [f"{_SHIFT_LABELS.get(m, m)} " + " / ".join(f"{v['reward_mean'][i]:.3f}" for i in j)
                 for m, v in sr["methods"].items() if not m.endswith("_sgd")]
        out += ["", "Reward mixture (`--mixture reward`), reward at alpha = 0 / 0.5 / 1: " + "; ".join(parts)
                + f" ({_src(r, 'shift-reward', 'summary.json')})."]
    else:
        out += ["", "Reward mixture: " + _missing("shift-reward")]
    return "\n".join(out)


def _llm_label(name: str) -> str:
    if name.startswith("kldpo-tau"):
        return f"KLDPO (tau = {name[len('kldpo-tau'):]})"
    if name.startswith("wdpo-tuple-rho"):
        return f"WDPO tuple (rho0 = {name[len('wdpo-tuple-rho'):]})"
    if name.startswith("wdpo-rho"):
        return f"WDPO (rho0 = {name[len('wdpo-rho'):]})"
    return {"reference": "initial policy", "dpo": "DPO", "ipo": "IPO"}.get(name, name)


def _llm_best(r: _Results):
    for study, rel in (("llm-shift-sweep", "llm-shift/sweep_results.json"), ("llm-shift", "llm-shift/results.json")):
        s = r.json(rel)
        if s is not None:
            return study, rel, s
    return None


def block_llm_shift(r: _Results) -> str:
    got = _llm_best(r)
    if got is None:
        return _missing("llm-shift")
    study, rel, s = got
    idx = _alpha_idx(s["alphas"])
    a0 = s["alpha0"]
    head = " | ".join(f"alpha = {s['alphas'][i]:g}" + (" (train)" if abs(s["alphas"][i] - a0) < 1e-9 else "") for i in idx)
    secs = sum((s.get("timings_s") or {}).values()) if isinstance(s.get("timings_s"), dict) else None
    out = [f"Mean `r_alpha` in standard-deviation units with 95% bootstrap intervals over "
           f"{s.get('n_test_prompts', '?')} test prompts, seed{'s' if len(s.get('seeds', [])) > 1 else ''} "
           f"{', '.join(map(str, s.get('seeds', [])))} "
           f"(`docs/results/{rel}`" + (f"; stage times add up to {secs:.0f} s" if secs else "") + "):", "",
           f"| policy | {head} |", "| --- | --- | --- | --- |"]
    for name, e in s["policies"].items():
        out.append(f"| {_llm_label(name)} | " + " | ".join(
            f"{e['mean'][i]:+.3f} [{e['lo'][i]:+.3f}, {e['hi'][i]:+.3f}]" for i in idx) + " |")
    return "\n".join(out)


def _emotion_radius(name: str, cal: dict | None) -> str:
    """The calibration rule behind a run's radius ("KL rho = 0.05", "penalty 1 x DPO loss"), or ""."""
    if not cal:
        return ""
    if name.startswith("kldpo-tau"):
        tau = float(name[len("kldpo-tau"):])
        hit = [e for e in cal.get("kl", []) if abs(e["tau"] - tau) <= 1e-12 * max(1.0, tau)]
        return f"KL rho = {hit[0]['rho']:g}" if hit else ""
    if name.startswith("wdpo-"):
        rho0 = float(name.rsplit("rho", 1)[1])
        hit = [e for e in cal.get("wdpo", []) if abs(e["rho0"] - rho0) <= 1e-12 * max(1.0, rho0)]
        return f"penalty {hit[0]['fraction']:g} x DPO loss" if hit else ""
    return ""


def _emotion_sig(s: dict, level: str = "seeds") -> list[tuple[str, list[float], list[float]]]:
    """Per robust run: (name, alphas significantly above DPO, alphas significantly below), by the
    seed-and-prompt interval where there are several seeds (else, or with ``level="prompts"``, the
    prompt interval, which holds the training seeds fixed)."""
    from .llm.shift.pipeline import paired_significance

    return paired_significance(s, two_level=level != "prompts")


def _alpha_span(al: list[float]) -> str:
    return f"[{min(al):g}, {max(al):g}]"


def block_llm_shift_emotion(r: _Results) -> str:
    rel = "llm-shift/emotion_results.json"
    s = r.json(rel)
    if s is None:
        return _missing("llm-shift-emotion")
    idx = _alpha_idx(s["alphas"])
    a0 = s["alpha0"]
    cal = s.get("calibration") or {}
    c = s.get("objective_conflict") or {}
    o1, o2 = s["objectives"]
    seeds = s.get("seeds", [])
    secs = sum((s.get("timings_s") or {}).values())
    head = " | ".join(f"alpha = {s['alphas'][i]:g}" + (" (train)" if abs(s["alphas"][i] - a0) < 1e-9 else "") for i in idx)
    out = [f"{s['model']}, objectives r_1 = {o1}, r_2 = {o2} (NRC lexicon shares; r_alpha = alpha z_{o1} + "
           f"(1 - alpha) z_{o2}), alpha0 = {a0:g}: {s['n_pairs']} training pairs from {s['n_train_prompts']} prompts, "
           f"seeds {', '.join(map(str, seeds))}, {s['n_test_prompts']} test prompts x {s['eval_samples']} samples "
           f"(`docs/results/{rel}`; the stages' CPU time adds up to {secs / 3600:.1f} h).", ""]
    if c:
        out += [f"Conflict on the initial policy's samples: Pearson r({o1}, {o2}) = {c['pearson']:+.2f} over "
                f"{c['n_samples']} samples; the two objectives rank the {c['n_pairs']} training pairs oppositely in "
                f"{100 * c['pairs_opposite']:.0f}% and at least one ties in {100 * c['pairs_one_tied']:.0f}%.", ""]
    if cal:
        out += [f"Radii calibrated at the DPO solution (`{cal['policy']}`, mean training DPO loss "
                f"{cal['mean_loss']:.3f}, per-pair losses {cal['loss_min']:.3f}-{cal['loss_max']:.3f}; mean "
                f"||grad_z l||^2 {cal['mean_sq_norm']['rows']:.1f} rows / {cal['mean_sq_norm']['tuple']:.1f} tuple): "
                + "; ".join([f"KL rho = {e['rho']:g} -> tau = {e['tau']:g} (weights {e['weight_min']:.2f}-"
                             f"{e['weight_max']:.2f}, ESS {e['ess']:.0f} of {cal['n_pairs']})" for e in cal.get("kl", [])]
                            + [f"penalty {e['fraction']:g} x DPO loss -> rho0 = {e['rho0']:g} (tuple penalty there "
                               f"{e['penalty_tuple']:.3f})" for e in cal.get("wdpo", [])]) + ".", ""]
    out += ["Mean `r_alpha` (standard-deviation units of the train pool) with 95% bootstrap intervals over test prompts:",
            "", f"| policy | radius rule | {head} |", "| --- | --- | --- | --- | --- |"]
    for name, e in s["policies"].items():
        out.append(f"| {_llm_label(name)} | {_emotion_radius(name, cal) or '-'} | " + " | ".join(
            f"{e['mean'][i]:+.3f} [{e['lo'][i]:+.3f}, {e['hi'][i]:+.3f}]" for i in idx) + " |")
    out += ["", "Paired difference to DPO (same test prompts and sampling seeds), mean over seeds with the 95% "
            "interval of the two-level bootstrap (seeds and prompts), and the per-seed means:", "",
            f"| policy | {head} | per seed at alpha = 0 / 0.5 / 1 |", "| --- | --- | --- | --- | --- |"]
    for name, e in s["policies"].items():
        d = e.get("diff")
        if name in ("reference", "dpo") or not d:
            continue
        lo, hi = d.get("seed_prompt_lo", d["lo"]), d.get("seed_prompt_hi", d["hi"])
        ps = d.get("per_seed") or []
        out.append(f"| {_llm_label(name)} | " + " | ".join(
            f"{d['mean'][i]:+.3f} [{lo[i]:+.3f}, {hi[i]:+.3f}]" for i in idx) + " | "
            + "; ".join(" / ".join(f"{row[i]:+.2f}" for i in idx) for row in ps) + " |")
    sig = _emotion_sig(s)
    above = [(n, a) for n, a, _ in sig if a]
    below = [(n, b) for n, _, b in sig if b]
    out += ["", "Significant (interval excludes 0): "
            + ("; ".join(f"{_llm_label(n)} above DPO at alpha in {_alpha_span(a)}" for n, a in above) or "no robust run above DPO at any alpha")
            + "; " + ("; ".join(f"{_llm_label(n)} below DPO at alpha in {_alpha_span(b)}" for n, b in below)
                      or "no robust run below DPO at any alpha") + "."]
    return "\n".join(out)


def _row_llm_emotion(r: _Results) -> str | None:
    s = r.json("llm-shift/emotion_results.json")
    if s is None:
        return None
    sig = _emotion_sig(s)
    above = [(n, a) for n, a, _ in sig if a]
    below = [(n, b) for n, _, b in sig if b]
    c = s.get("objective_conflict") or {}
    cal = s.get("calibration") or {}
    if above:
        verdict = ("robust training pays here (two-level bootstrap over seeds and prompts): " + "; ".join(
            f"{_llm_label(n)} ({_emotion_radius(n, cal)}) above DPO at alpha in {_alpha_span(a)}" for n, a in above))
    else:
        verdict = (f"robust training does not pay here: none of the {len(sig)} robust runs is significantly above DPO "
                   f"at any test alpha (two-level bootstrap over seeds and prompts)")
    kl_radii = ", ".join(f"{e['rho']:g}" for e in cal.get("kl", []))
    fractions = ", ".join(f"{e['fraction']:g}" for e in cal.get("wdpo", []))
    cond = (f"{s['model']}, NRC {s['objectives'][0]} vs {s['objectives'][1]} (r = {c.get('pearson', float('nan')):+.2f}; "
            f"{100 * c.get('pairs_opposite', float('nan')):.0f}% of pairs ranked oppositely), {s['n_pairs']} pairs, "
            f"seeds {', '.join(map(str, s.get('seeds', [])))}, radii calibrated at the DPO solution "
            f"(KL rho {kl_radii}; WDPO penalty {fractions} x DPO loss; rows and tuple norms)")
    tail = ("; " + "; ".join(f"{_llm_label(n)} below DPO at alpha in {_alpha_span(b)}" for n, b in below)) if below else ""
    robust = [(n, e) for n, e in s["policies"].items() if n not in ("reference", "dpo") and e.get("diff")]
    if robust:
        n_best, i_best = max(((n, i) for n, e in robust for i in range(len(s["alphas"]))),
                             key=lambda t: dict(robust)[t[0]]["diff"]["mean"][t[1]])
        tail += (f"; largest point estimate above DPO {dict(robust)[n_best]['diff']['mean'][i_best]:+.3f} "
                 f"({_llm_label(n_best)} at alpha = {s['alphas'][i_best]:g})")
    by_prompts = _emotion_sig(s, "prompts")
    fixed = [(n, b) for n, _, b in by_prompts if b]
    fixed_up = [(n, a) for n, a, _ in by_prompts if a]
    if len(s.get("seeds", [])) > 1:
        tail += ("; with the training seeds held fixed (interval over prompts only): "
                 + ("; ".join(f"{_llm_label(n)} above DPO at alpha in {_alpha_span(a)}" for n, a in fixed_up) + "; "
                    if fixed_up else "")
                 + ("; ".join(f"{_llm_label(n)} below DPO at alpha in {_alpha_span(b)}" for n, b in fixed)
                    or "no run below DPO"))
    return (f"| 10 | robustness under preference shift (LLM) | WDPO/KLDPO keep alignment under shift | "
            f"{verdict}{tail}. Conditions: {cond} | "
            f"`{STUDY_FILES['llm-shift-emotion'][2]}` | "
            f"`figures/llm_shift_emotion.png` |")


def _summary_rows(r: _Results) -> list[str]:
    rows = []
    sc = r.json("solver-check/summary.json")
    if sc is not None:
        rows.append(f"| 1 | exact robust solvers | KLDPO = exp-cone dual; W1-WDPO = convex program | "
                    f"{sc['certified']}/{sc['runs']} runs (native and cvxpy) certified optimal, max certified gap "
                    f"{sc['max_gap']:.1e}, native vs cvxpy objective within {sc['max_obj_rel_diff']:.1e} relative, "
                    f"theta within {sc['max_theta_diff']:.1e} | `{STUDY_FILES['solver-check'][2]}` | "
                    f"`docs/results/solver-check/summary.json` |")
    else:
        rows.append(f"| 1 | exact robust solvers | KLDPO = exp-cone dual; W1-WDPO = convex program | "
                    f"{NOT_REGENERATED} | `drdpo solver-check --json` | - |")
    rows.append(_bench.row_solvers(r))
    got = _sc_main(r)
    if got is not None:
        head, srows, grid, inst = got
        diameter = 2 * float(inst.get("radius", 2.0))
        h = dict((m, (hh, s)) for m, hh, s in srows)

        def sl(m):
            hh = h[m][0]
            return f"{hh['slope']:.3f} [{hh['slope_ci'][0]:.3f}, {hh['slope_ci'][1]:.3f}]"

        nv = [n for m in ("wdpo-w1", "wdpo-w2") if m in h for n in [_first_nonvacuous_n(h[m][1], diameter)] if n]
        holds = all(h[m][0]["bound_holds"] for m in ("wdpo-w1", "wdpo-w2") if m in h)
        cmd = f"`{STUDY_FILES['sample-complexity'][2]}`"
        fig = "`figures/sample_complexity_error.png`"
        if "wdpo-w1" in h and "wdpo-w2" in h:
            rows.append(f"| 3 | sample complexity, WDPO | `O(n^{{-1/4}})` parameter error | slope {sl('wdpo-w1')} "
                        f"(W1, eps = {h['wdpo-w1'][0]['radius']:g}); {sl('wdpo-w2')} (W2, eps = "
                        f"{h['wdpo-w2'][0]['radius']:g}); bound {'holds' if holds else 'VIOLATED'}"
                        + (f" (vacuous below n ~ {min(nv):g})" if nv else "") + f" | {cmd} | {fig} |")
        if "kldpo" in h:
            kb = h["kldpo"][0]
            inf = kb.get("bound_at_max_n") == "inf"
            rows.append(f"| 4 | sample complexity, KLDPO | `O(n^{{-1/4}})` with factor `exp(L_max/lam_lo)` | slope "
                        f"{sl('kldpo')} (rho = {kb['radius']:g})"
                        + ("; the paper-style bound is infinite on this instance (lam_lo cannot be certified)" if inf else "")
                        + " | same | same |")
        if "dpo" in h:
            rows.append(f"| 5 | DPO baseline | - | slope {sl('dpo')}: every method follows the parametric "
                        f"`n^{{-1/2}}` | same | same |")
    else:
        rows.append(f"| 3-5 | sample complexity | `O(n^{{-1/4}})` | {NOT_REGENERATED} | "
                    f"`{STUDY_FILES['sample-complexity'][2]}` | - |")
    g = r.json("gradients/summary.json")
    kt = r.csv("gradients/kl_tau.csv")
    gcmd = f"`{STUDY_FILES['gradients'][2]}`"
    if g is not None and kt is not None:
        at = kt[np.isclose(kt.tau_mult, 1.0) & (kt.estimator == "kl_clamped")]
        cl = kt[kt.estimator == "kl_clamped"]
        mults = sorted(cl.tau_mult.unique())
        rows.append(f"| 6 | KLDPO approximation (authors' weights) | tau stands in for lam* | at tau = lam*: direction "
                    f"exact (cosine 1 - {max(1 - g['cos_at_lam_star'], 1e-16):.0e}), norm {at.norm_ratio.min():.3f}-"
                    f"{at.norm_ratio.max():.2f}x; off lam* (x{mults[0]:.4g}..{mults[-1]:.4g}): norm "
                    f"{cl.norm_ratio.min():.2f}-{cl.norm_ratio.max():.3g}x, cosine down to {cl.cosine.min():.3f}; "
                    f"lam* moves {g['lam_star_path_ratio_max']:.1f}x during training | {gcmd} | "
                    f"`figures/gradients_cosine_vs_tau.png`, `figures/gradients_lam_path.png` |")
        rows.append(f"| 7 | WDPO first-order approximation | `E l + eps sqrt(E ||grad_z l||^2)` | underestimates the "
                    f"exact W2 value, error slope {g['first_order_slope']:.4f} (O(eps^2)) | same | "
                    f"`figures/gradients_value_error.png` |")
        e = g["sgd_endpoint_error"]
        bad = [k for k in ("kl_clamped_dpo_tau", "w2_sq_penalty_dpo") if k in e]
        good = [v for k, v in e.items() if k not in bad and k != "dpo"]
        if bad and good:
            rows.append(f"| 8 | SGD with approximate gradients | - | end point error vs exact optimum: tau or rho0 "
                        f"calibrated at the DPO solution {' (KL) / '.join(f'{e[k]:.2f}' for k in bad)} (W2 penalty) vs "
                        f"{min(good):.2f}-{max(good):.2f} calibrated at the optimum or recalibrated | same | "
                        f"`figures/gradients_sgd_endpoints.png` |")
    else:
        rows.append(f"| 6-8 | gradient approximations | - | {NOT_REGENERATED} | {gcmd} | - |")
    rows.append(_row_robustness_loglinear(r))
    got = _llm_best(r)
    emotion = _row_llm_emotion(r)
    if emotion is not None:
        rows.append(emotion)
    elif got is not None:
        study, rel, s = got
        idx = _alpha_idx(s["alphas"])
        pol = s["policies"]
        best = [max((n for n in pol if n != "reference"), key=lambda n: pol[n]["mean"][i]) for i in idx]
        dpo_best = all(b == "dpo" for b in best)
        d = pol.get("dpo")
        txt = ("DPO has the highest mean reward at alpha = 0 / 0.5 / 1 ("
               + " / ".join(f"{d['mean'][i]:+.2f}" for i in idx) + ")") if dpo_best and d else (
            "highest mean reward at alpha = 0 / 0.5 / 1: " + " / ".join(_llm_label(b) for b in best))
        sig = []
        for n, e in pol.items():
            dd = e.get("diff")
            if n == "reference" or not dd:
                continue
            below = [a for a, hi in zip(s["alphas"], dd["hi"]) if hi < 0]
            above = [a for a, lo in zip(s["alphas"], dd["lo"]) if lo > 0]
            if above:
                sig.append(f"{_llm_label(n)} significantly above DPO at alpha in [{min(above):g}, {max(above):g}]")
            elif below:
                sig.append(f"{_llm_label(n)} significantly below DPO at alpha in [{min(below):g}, {max(below):g}]")
            else:
                sig.append(f"{_llm_label(n)} within noise of DPO at every alpha")
        secs = sum((s.get("timings_s") or {}).values()) if isinstance(s.get("timings_s"), dict) else None
        rows.append(f"| 10 | robustness under preference shift (LLM) | WDPO/KLDPO keep alignment under shift | "
                    f"{s['model']}, alpha0 = {s['alpha0']:g}, seed{'s' if len(s.get('seeds', [])) > 1 else ''} "
                    f"{', '.join(map(str, s.get('seeds', [])))}: {txt}; "
                    + "; ".join(sig) + (f"; {secs / 60:.0f} min of stages" if secs else "")
                    + f" | `{STUDY_FILES[study][2]}` | "
                    f"`figures/{'llm_shift_sweep' if study == 'llm-shift-sweep' else 'llm_shift'}.png` |")
    else:
        rows.append(f"| 10 | robustness under preference shift (LLM) | WDPO/KLDPO keep alignment under shift | "
                    f"{NOT_REGENERATED} (numbers quoted in the next table and section 10) | `drdpo llm-shift --model smollm2 --out runs/llm_shift` | "
                    f"`figures/llm_shift.png` |")
    rows += [_bench.row_train_step(r), _bench.row_vs_trl(r)]
    return rows


# ----------------------------------------------------------------------------- the shift map (row 9, section 9b)
def _shift_map_numbers(r: _Results) -> dict | None:
    """The numbers section 9b and row 9 quote, from the committed shift-map summary (None: not committed)."""
    d = r.json("shift-map/shift_map.json")
    best = r.csv("shift-map/shift_map_best.csv")
    if d is None or best is None:
        return None
    shifts = d["grid"]["shifts"]
    regions = [(sh, x) for sh in shifts for x in d["regions"].get(sh, {}).get("reward", [])]
    pop = [(sh, x) for sh, x in regions if str(x["n"]) == "inf"]
    cells = d["cells_per_shift"] * len(shifts)
    wins_n = d["wins_by_n"]
    ns = [str(n) for n in d["grid"]["ns"]]

    def share(metric: str, n: str, only=None) -> float:
        use = [sh for sh in shifts if only is None or sh == only]
        return sum(wins_n[sh][metric][n] for sh in use) / (len(use) * d["cells_per_shift"] / len(ns))

    pb = best[best["n"].astype(str) == "inf"].delta_reward
    m = d["mechanism"]
    return {
        "cells": cells, "wins": len(regions), "per_shift": {sh: len(d["regions"].get(sh, {}).get("reward", []))
                                                            for sh in shifts},
        "wins_120": sum(x["angle"] >= 120 for _, x in regions),
        "pop_wins": len(pop), "pop_angles": sorted({x["angle"] for _, x in pop}),
        "pop_best": max((x["delta"] for _, x in pop), default=float("nan")),
        "adversarial": len(d["regions"].get("adversarial", {}).get("reward", [])),
        "agree_pop": (round(m["population_sign_agreement"] * m["population_cells"]), m["population_cells"]),
        "agree_fin": (m["finite_n_sign_agreement_significant"], m["finite_n_significant_cells"]),
        "pop_median": float(pb.median()), "pop_worst": float(pb.min()),
        "n_small": ns[0], "loss_small": share("dpo_loss", ns[0]), "reg_small": share("reg_reward", ns[0]),
        "loss_pop": share("dpo_loss", ns[-1]), "reg_pop": share("reg_reward", ns[-1]),
        "adv_small": share("dpo_loss", ns[0], "adversarial"), "adv_pop": share("dpo_loss", ns[-1], "adversarial"),
        "seconds": d.get("seconds"),
    }


def block_shift_map(r: _Results) -> str:
    """Section 9b's measured verdict (the reasoning around it is prose; these are its numbers)."""
    k = _shift_map_numbers(r)
    if k is None:
        return _missing("shift-map")
    per = ", ".join(f"{sh} {v}" for sh, v in k["per_shift"].items())
    ang = ", ".join(f"{a:g}" for a in k["pop_angles"]) or "none"
    return "\n".join([
        f"Measured ({_src(r, 'shift-map', 'shift_map.json')} and `shift_map_best.csv`):", "",
        f"* expected true reward: robust DPO beats DPO with its interval in **{k['wins']} of {k['cells']}** cells "
        f"({per}); {k['wins_120']} of the {k['wins']} at angles of 120 degrees or more; at the population "
        f"{k['pop_wins']} cells (angles {ang} degrees; best regret {_f(k['pop_best'], '+.3f')}); "
        f"under the adversarial test {k['adversarial']};",
        f"* the first-order criterion of docs/shift_map.md section 2 predicts the sign of the measured regret in "
        f"{k['agree_pop'][0]} of {k['agree_pop'][1]} population cells and in {100 * k['agree_fin'][0]:.2f}% of the "
        f"{k['agree_fin'][1]} significant finite-`n` regrets;",
        f"* the best robust setting per population cell: median regret {k['pop_median']:+.3f}, worst "
        f"{k['pop_worst']:+.3f};",
        f"* test DPO loss / KL-regularised reward: robust wins in {100 * k['loss_small']:.0f}% / "
        f"{100 * k['reg_small']:.0f}% of the cells at `n = {k['n_small']}`, {100 * k['loss_pop']:.0f}% / "
        f"{100 * k['reg_pop']:.0f}% at the population; loss under the adversarial test: "
        f"{100 * k['adv_small']:.0f}% at `n = {k['n_small']}`, {100 * k['adv_pop']:.0f}% at the population.",
    ])


def block_family(r: _Results) -> str:
    """The robust family side by side (``drdpo shift --family``): the family table of the committed
    full run (``docs/results/family/family_table.csv``), its stated radii and the measured verdict."""
    from .experiments.shift import family_table_markdown

    s, t = r.json("family/summary.json"), r.csv("family/family_table.csv")
    if s is None or t is None:
        return _missing("shift-family")
    st = s.get("stated", {})
    out = [f"Label-mixture shift trained at alpha0 = {s['alpha0']:g}, {st.get('seeds', '?')} seeds x n = "
           f"{st.get('n_train', '?')} pairs, ball `||theta|| <= {_f(st.get('ball_radius'), 'g')}`, beta = "
           f"{_f(st.get('beta'), 'g')}; SGD: {st.get('sgd_steps', '?')} steps of batch {st.get('sgd_batch', '?')}. "
           f"Radii: KL, chi2, W1 and W2 at {_f(st.get('radius_frac'), 'g')} x each training set's collapse radius, "
           f"CVaR level `alpha = 1 - {_f(st.get('radius_frac'), 'g')} (1 - alpha_c)`, rDPO flip rate = cDPO smoothing "
           f"eps = {_f(st.get('family_eps'), 'g')}, Dr.DPO beta' = {_f(st.get('beta_prime'), 'g')}, group DPO's two "
           f"groups = the label's source. Expected true reward of each policy, mean ± s.e. over seeds; worst over "
           f"alpha = per-seed minimum, then mean ± s.e. ({_src(r, 'shift-family', 'family_table.csv')}):", "",
           family_table_markdown(t)]
    w = t.set_index("method")
    if "dpo" in w.index:
        dpo = float(w.loc["dpo", "worst_reward_mean"])
        rob = w.drop([m for m in ("dpo", "dpo_sgd") if m in w.index])
        above = rob[rob.worst_reward_mean >= dpo]
        below = rob[rob.worst_reward_mean < dpo]
        line = (f"Worst case over alpha: {len(below)} of {len(rob)} robust methods (exact or SGD) fall below DPO's "
                f"{dpo:.3f} ({below.worst_reward_mean.min():.3f}-{below.worst_reward_mean.max():.3f})")
        if len(above):
            nd = float(w.loc["dpo", "theta_norm_mean"])
            line += ("; above it: " + ", ".join(f"{w.loc[m, 'description']} {w.loc[m, 'worst_reward_mean']:.3f} "
                                                f"(mean ||theta|| {w.loc[m, 'theta_norm_mean']:.2f})" for m in above.index)
                     + f", against DPO's ||theta|| {nd:.2f}")
            if (above.theta_norm_mean > nd).all() and (rob[rob.theta_norm_mean < nd].worst_reward_mean < dpo).all():
                line += (": every method above DPO moves farther from theta_ref than DPO, every method that stays "
                         "closer to it (shrinks) is below")
        B = st.get("ball_radius")
        on_ball = [m for m in rob.index if B and rob.loc[m, "theta_norm_mean"] >= B - 1e-2]
        if on_ball:
            line += (". On the ball `||theta|| = B = " + f"{B:g}` (the constraint binds, so B sets their reward): "
                     + ", ".join(str(w.loc[m, "description"]) for m in on_ball))
        ref = s.get("reference_reward")
        if ref:
            line += (f". The expected reward is not KL-regularised: the reference `pi_{{theta_alpha*}}` (the KL-regularised "
                     f"optimum for r_alpha) has {ref[0]:.3f} / {ref[-1]:.3f} at alpha = 0 / 1, and a policy farther "
                     f"from pi_ref can exceed it")
        out += ["", line + "."]
        pairs = [(e, a) for a, e in (("chi2_batch_sgd", "chi2dpo"), ("cvar_batch_sgd", "cvardpo"),
                                     ("group_batch_sgd", "groupdpo"), ("group_eg_sgd", "groupdpo"), ("rdpo_sgd", "rdpo"),
                                     ("cdpo_sgd", "cdpo"), ("dr_dpo_batch_sgd", "dr_dpo"))
                 if a in w.index and e in w.index]
        if pairs:
            out += ["", "Batch version (SGD) minus exact solver, worst-case reward: " + "; ".join(
                f"{w.loc[a, 'description']} {w.loc[a, 'worst_reward_mean'] - w.loc[e, 'worst_reward_mean']:+.3f} (||theta|| "
                f"{w.loc[e, 'theta_norm_mean']:.2f} -> {w.loc[a, 'theta_norm_mean']:.2f})" for e, a in pairs) + "."]
    if isinstance(s.get("seconds"), (int, float)):
        out += ["", f"Wall time of the committed run (as recorded in its summary; shared 2-core machine, `nice`): "
                    f"{s['seconds'] / 60:.1f} min."]
    g = r.json("gradients-family/summary.json")
    if g is not None and "family_batch_bias_smallest_batch" in g:
        fb = r.csv("gradients-family/family_batch.csv")
        bmax = int(fb.batch_size.max()) if fb is not None else None
        se = g.get("family_batch_mc_se_smallest_batch", {})
        sd = g.get("family_sgd_endpoint_error_sd", {})
        gs = g.get("stated", {})
        par = (f"chi2/CVaR at {_f(gs.get('radius_frac'), 'g')} of each collapse threshold, rDPO/cDPO eps = "
               f"{_f(gs.get('family_eps'), 'g')}, Dr.DPO beta' = {_f(gs.get('beta_prime'), 'g')}, "
               f"group DPO's groups = the {gs.get('groups', '?')}"
               + (f" (groupdpo_eg: online EG weights, step {gs['group_step']:g})" if "group_step" in gs else "")) \
            if gs else "parameters not recorded"
        out += ["", f"Gradient level (`{STUDY_FILES['gradients-family'][2]}`: P° of the gradient study's "
                    f"{gs.get('instances', '')} instances, {par}; "
                    f"{_src(r, 'gradients-family', 'summary.json')}): relative bias `||E g_b - g*|| / ||g*||` of the "
                    f"batch gradient at b = {g['family_batch_size_smallest']} (Monte-Carlo s.e.) "
                    + "; ".join(f"{m} {v:.3f} ({se.get(m, float('nan')):.3f})"
                                for m, v in g["family_batch_bias_smallest_batch"].items())
                    + (f"; at b = {bmax}: " + "; ".join(f"{m} {v:.3f}" for m, v in
                                                        g.get("family_batch_bias_largest_batch", {}).items())
                       if bmax else "")
                    + ". SGD with the batch gradient, `||theta_SGD - theta_exact||` (mean ± sd): "
                    + "; ".join(f"{m} {v:.3f} ± {sd.get(m, 0.0):.3f}" for m, v in g["family_sgd_endpoint_error"].items())
                    + f" (DPO's SGD error on the same batches: {g['family_sgd_dpo_floor']:.3f})."]
    return "\n".join(out)


_MAP_LABEL = {"kldpo": "KLDPO (exact)", "wdpo": "WDPO W1 (exact)", "kldpo_tau": "KLDPO tilt (tau at DPO)",
              "wdpo_rho0": "WDPO squared penalty (rho0 at DPO)", "chi2dpo": "chi2-DPO", "cvardpo": "CVaR-DPO",
              "groupdpo": "group DPO (prompt groups)", "rdpo": "rDPO", "cdpo": "cDPO", "dr_dpo": "Dr.DPO"}


def block_shift_map_family(r: _Results) -> str:
    """The robust family in the shift map: wins per method and shift, and the first-order agreement."""
    d = r.json("shift-map-family/shift_map.json")
    if d is None:
        return _missing("shift-map-family")
    g, fam = d["grid"], d["family"]
    shifts, methods = g["shifts"], g["methods"]
    w = fam["wins_by_method"]
    cells = d["cells_per_shift"]
    out = [f"{len(methods)} robust methods x {len(shifts)} shift types, {cells} cells `(angle, ratio, n, alpha)` per "
           f"shift, radius fractions {', '.join(f'{f:g}' for f in g['radius_fracs'])}, {g['draws']} training draws "
           f"per cell ({_src(r, 'shift-map-family', 'shift_map.json')}; {d['seconds'] / 60:.0f} min). A cell counts "
           f"as a win of a method when one of its settings beats DPO with its {100 * g['ci']:.0f}% interval; entries: "
           f"wins in expected true reward / KL-regularised reward / test DPO loss:", "",
           "| method | setting | " + " | ".join(shifts) + " |", "|---|---|" + "---|" * len(shifts)]
    for m in methods:
        setting = fam["settings"].get(m, "as in the plain map")
        setting = setting.split(", ", 1)[1] if ", " in setting else setting
        out.append(f"| {_MAP_LABEL.get(m, m)} | {setting} | " + " | ".join(
            f"{w['reward'][sh][m]} / {w['reg_reward'][sh][m]} / {w['dpo_loss'][sh][m]}" for sh in shifts) + " |")
    mech = d["mechanism"].get("family", {})
    if mech:
        out += ["", "First-order criterion (docs/shift_map.md section 5) against the measured regret, per member: " + "; ".join(
            f"{_MAP_LABEL.get(m, m)} sign right in {round(v['population_sign_agreement'] * v['population_cells'])} of "
            f"{v['population_cells']} population cells and {100 * v['finite_n_sign_agreement_significant']:.1f}% of "
            f"{v['finite_n_significant_cells']} significant finite-`n` regrets" for m, v in mech.items())
            + "; not applicable: " + ", ".join(_MAP_LABEL.get(m, m) for m in d["mechanism"].get("family_excluded", {}))
            + " (no small-radius expansion)."]
    out += ["", f"Fits: {d['fits_not_optimal']} exact fits not certified optimal (kept; their status is in the cell tables), "
                f"{d.get('fits_local', 0)} Dr.DPO local-solver fits."]
    return "\n".join(out)


def _row_robustness_loglinear(r: _Results) -> str:
    """Row 9: the verdict with its conditions (shift map), and the label-mixture study's worst case."""
    k = _shift_map_numbers(r)
    sh = r.json("shift/summary.json")
    parts = []
    if k is not None:
        a, n = k["agree_pop"]
        iff = ("robust DPO raises the expected true reward iff the DPO estimate points against the test reward "
               f"(first-order criterion, docs/shift_map.md; sign right in {a} of {n} population cells): "
               if a >= 0.99 * n else "")
        parts.append(f"{iff}measured in {k['wins']} of {k['cells']} cells of the shift map ({k['wins_120']} at angles "
                     f">= 120 degrees between the two rewards, {k['pop_wins']} at the population, {k['adversarial']} "
                     f"under the adversarial test); robust training lowers the test DPO loss in "
                     f"{100 * k['loss_small']:.0f}% of the cells at n = {k['n_small']}")
    if sh is not None:
        w = sh["worst_alpha_reward"]
        rob = {kk: v for kk, v in w.items() if kk not in ("dpo", "dpo_sgd")}
        lose = all(w["dpo"] > v for v in rob.values())
        parts.append(("label-mixture study: every robust method has a lower worst-case reward than DPO" if lose
                      else "label-mixture study: some robust method beats DPO's worst-case reward")
                     + f" ({w['dpo']:.3f} vs {min(rob.values()):.3f}-{max(rob.values()):.3f})")
    if not parts:
        return (f"| 9 | robustness under preference shift (log-linear) | robust DPO keeps reward | {NOT_REGENERATED} "
                f"| `{STUDY_FILES['shift-map'][2]}` | - |")
    cmds = " and ".join(f"`{STUDY_FILES[s][2]}`" for s, v in (("shift-map", k), ("shift", sh)) if v is not None)
    return (f"| 9 | robustness under preference shift (log-linear) | robust DPO keeps reward when preferences shift | "
            f"{'; '.join(parts)} | {cmds} | `figures/shift_map.png`, `figures/shift_reward_vs_alpha.png` |")


def _wall_times(r: _Results) -> str:
    got = []
    for study, rel, key in (("sample-complexity", "sample-complexity/headline.json", ("_meta", "seconds")),
                            ("gradients", "gradients/summary.json", ("seconds",)),
                            ("shift", "shift/summary.json", ("seconds",)),
                            ("shift-reward", "shift-reward/summary.json", ("seconds",))):
        v = r.json(rel)
        for k in key:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            got.append(f"{study} {v / 60:.1f} min")
    return ("Wall time of the committed full runs (as recorded in their summaries; shared 2-core machine, run "
            "with `nice`): " + ", ".join(got) + ".") if got else ""


def block_summary(r: _Results) -> str:
    lines = ["| # | claim | paper says | we measured | command | figure or summary |",
             "| --- | --- | --- | --- | --- | --- |"] + _summary_rows(r)
    wt = _wall_times(r)
    return "\n".join(lines + (["", wt] if wt else []))


BLOCKS: dict[str, Callable[[_Results], str]] = {
    "summary": block_summary,
    "sample-complexity": block_sample_complexity,
    "approximations": block_approximations,
    "shift": block_shift,
    "llm-shift": block_llm_shift,
    "llm-shift-emotion": block_llm_shift_emotion,
    "shift-map": block_shift_map,
    "shift-map-family": block_shift_map_family,
    "family": block_family,
    "bench-solvers": _bench.block_solvers,
    "bench-train-step": _bench.block_train_step,
    "bench-vs-trl": _bench.block_vs_trl,
    "bench-vs-trl-rounds": lambda r: _bench.block_vs_trl(r, "bench-vs-trl-rounds"),
    **_approx.BLOCKS,  # docs/approximations.md
}


def render_blocks(results_dir: str | Path = RESULTS_DIR) -> dict[str, str]:
    """The text of every generated block, from the committed summaries in ``results_dir``."""
    r = _Results(Path(results_dir))
    return {name: fn(r) for name, fn in BLOCKS.items()}


_BLOCK = re.compile(r"(<!-- BEGIN generated:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- END generated:(?P=name) -->)",
                    re.S)


def update_document(text: str, blocks: dict[str, str]) -> str:
    """``text`` with the body of every ``<!-- BEGIN generated:NAME -->`` block replaced by ``blocks[NAME]``.
    A block whose name has no generator is an error (a typo would otherwise freeze stale numbers)."""
    def sub(m):
        name = m.group("name")
        if name not in blocks:
            raise KeyError(f"unknown generated block {name!r} (known: {', '.join(blocks)})")
        return m.group(1) + blocks[name].rstrip("\n") + "\n" + m.group(4)

    return _BLOCK.sub(sub, text)


def check_documents(root: str | Path = ".", results_dir: str | Path | None = None) -> list[str]:
    """Documents whose committed text differs from the generated one (empty: all up to date)."""
    root = Path(root)
    blocks = render_blocks(root / (results_dir or RESULTS_DIR))
    stale = []
    for doc in DOCUMENTS:
        text = (root / doc).read_text(encoding="utf-8")
        if update_document(text, blocks) != text:
            stale.append(str(doc))
    return stale


def write_documents(root: str | Path = ".", results_dir: str | Path | None = None) -> list[str]:
    """Rewrite the generated blocks of every document in place (atomically); returns the changed ones."""
    from .io import write_text

    root = Path(root)
    blocks = render_blocks(root / (results_dir or RESULTS_DIR))
    changed = []
    for doc in DOCUMENTS:
        text = (root / doc).read_text(encoding="utf-8")
        new = update_document(text, blocks)
        if new != text:
            write_text(root / doc, new)
            changed.append(str(doc))
    return changed


# ----------------------------------------------------------------------------- LLM tables of the docs
_LLM_SECTIONS = {"llm_shift": ("### Main run", [0]), "llm_shift_seeds01": ("### Two training seeds", [0, 1]),
                 "llm_shift_sweep": ("### Radius sweep", [0])}


def _llm_name(label: str) -> str:
    m = re.match(r"(KLDPO|WDPO) \((tau|rho0)=([\d.]+)\)", label.strip())
    if m:
        return f"{m.group(1).lower()}-{'tau' if m.group(2) == 'tau' else 'rho'}{m.group(3)}"  # the pipeline's run names
    return {"initial policy": "reference", "DPO": "dpo", "IPO": "ipo"}.get(label.strip(), label.strip())


def _md_table(lines: list[str]) -> tuple[list[float], dict[str, list[tuple[float, float, float]]]]:
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    alphas = [float(re.search(r"alpha=([\d.]+)", c).group(1)) for c in head[1:]]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        vals = [tuple(float(x) for x in re.findall(r"[+-]?\d+\.\d+", c)) for c in cells[1:]]
        rows[cells[0]] = vals
    return alphas, rows


def llm_tables_from_docs(doc: str | Path = "docs/llm_shift.md") -> dict[str, dict]:
    """The LLM-shift summaries as far as docs/llm_shift.md tabulates them (5 alphas per run: mean
    [95% interval] and the paired difference to DPO), for redrawing the figures when the run's
    results.json is not committed. Each summary carries a ``provenance`` line saying so."""
    text = Path(doc).read_text(encoding="utf-8")
    out = {}
    for fig, (head, seeds) in _LLM_SECTIONS.items():
        if head not in text:
            continue
        sec = text[text.index(head):]
        sec = sec[: sec.find("\n### ", 1)] if "\n### " in sec[1:] else sec
        tables, cur = [], []
        for line in sec.splitlines():
            if line.startswith("|"):
                cur.append(line)
            elif cur:
                tables.append(cur)
                cur = []
        if cur:
            tables.append(cur)
        tables = [t for t in tables if "alpha=" in t[0]]
        if len(tables) < 2:
            continue
        alphas, pol = _md_table(tables[0])
        _, diff = _md_table(tables[1])
        policies = {}
        for label, vals in pol.items():
            name = _llm_name(label)
            d = diff.get(f"{label} - DPO")
            policies[name] = {"mean": [v[0] for v in vals], "lo": [v[1] for v in vals], "hi": [v[2] for v in vals],
                              "diff": None if d is None else {"mean": [v[0] for v in d], "lo": [v[1] for v in d],
                                                              "hi": [v[2] for v in d]}}
        out[fig] = {"model": "smollm2", "objectives": ["positivity", "calm"], "alpha0": 0.5, "alphas": alphas,
                    "seeds": seeds, "n_test_prompts": 100, "policies": policies,
                    "provenance": f"points: the {len(alphas)} alphas tabulated in docs/llm_shift.md ({head[4:]}); "
                                  f"{NOT_REGENERATED}"}
    return out


# ----------------------------------------------------------------------------- figures
def regenerate_figures(root: str | Path = ".", results_dir: str | Path | None = None,
                       figdir: str | Path = "figures", log=print) -> list[Path]:
    """Redraw the committed figures from the committed tables (no study is rerun). A study whose
    tables are not committed is skipped and said so."""
    root = Path(root)
    base = root / (results_dir or RESULTS_DIR)
    figdir = root / figdir
    r = _Results(base)
    out: list[Path] = []
    got = _sc_main(r)
    fits, bounds = r.csv("sample-complexity/fits.csv"), r.csv("sample-complexity/bounds.csv")
    if got is not None and fits is not None and bounds is not None:
        from . import plots

        head, _, grid, inst = got
        summ = r.csv("sample-complexity/summary.csv")
        main_radius = grid["main_radius"]
        out += plots.error_vs_n(summ, fits, main_radius, figdir, grid["delta"], inst["d"], 2 * inst["radius"], inst["beta"])
        out += plots.excess_vs_n(summ, bounds, main_radius, figdir, grid["delta"], inst["beta"])
        out += plots.radius_dependence(summ, fits, figdir, inst["beta"])
        out += plots.beta_dependence(summ, fits, figdir)
    else:
        log("[skip] sample-complexity figures: tables not committed")
    tables = {k: r.csv(f"gradients/{k}.csv") for k in ("kl_tau", "kl_path", "value_error", "sgd")}
    tables = {k: v for k, v in tables.items() if v is not None}
    if tables:
        from .plots_approx import plot_all_gradients

        out += plot_all_gradients(tables, figdir)
    else:
        log("[skip] gradients figures: tables not committed")
    from .plots_approx import plot_shift_reward

    for study, name in (("shift", "shift_reward_vs_alpha"), ("shift-reward", "shift_reward_vs_alpha_reward_mixture")):
        df = r.csv(f"{study}/shift.csv")
        if df is not None:
            out += plot_shift_reward(df, figdir, name=name)
        else:
            log(f"[skip] {name}: table not committed")
    fam, fam_s = r.csv("family/shift.csv"), r.json("family/summary.json")
    if fam is not None:  # the robust family side by side (drdpo shift --family)
        from .experiments.shift import stated_line
        from .plots_approx import plot_shift_family

        stated = stated_line(fam_s["stated"], fam_s.get("alpha0")) if fam_s and "stated" in fam_s else ""
        out += plot_shift_family(fam, figdir, name="shift_family", stated=stated)
    else:
        log("[skip] shift_family: table not committed")
    gfam = {k: r.csv(f"gradients-family/{k}.csv") for k in ("family_batch", "family_sgd")}
    gfam = {k: v for k, v in gfam.items() if v is not None}
    if gfam:  # drdpo gradients --family
        from .plots_approx import plot_family_gradients

        out += plot_family_gradients(gfam, figdir)
    else:
        log("[skip] gradients_family: tables not committed")
    from .llm.shift.pipeline import plot_shift

    from_docs = None
    for rel, name in (("llm-shift/results.json", "llm_shift"), ("llm-shift/seeds01_results.json", "llm_shift_seeds01"),
                      ("llm-shift/sweep_results.json", "llm_shift_sweep"),
                      ("llm-shift/emotion_results.json", "llm_shift_emotion")):
        s = r.json(rel)
        if s is None and name == "llm_shift_emotion":
            log(f"[skip] {name}: {rel} not committed")
        elif s is None:
            from_docs = llm_tables_from_docs(root / "docs/llm_shift.md") if from_docs is None else from_docs
            s = from_docs.get(name)
            log(f"[docs] {name}: {rel} not committed; drawn from the tables of docs/llm_shift.md"
                if s else f"[skip] {name}: {rel} not committed")
        if s is not None:
            out += plot_shift(s, figdir / f"{name}.png")
    return out
