"""``drdpo reproduce``: run every study, resume after an interrupt, end with a short report.

Each study is one ``drdpo`` subcommand run with ``--json`` in a subprocess (so one failing study
cannot corrupt another); its last JSON line is stored in ``OUT/<study>.json``. A rerun skips the
studies whose JSON is already on disk (``--force`` reruns them); each study resumes its own
partial work (sweeps skip finished cells, training resumes from checkpoints).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from ..cli import EXIT_OK, CLIError

#: (name, argv after `drdpo`, what the paper says, which figure)
STUDIES = [
    ("solver-check", ["solver-check"],
     "exact minimax solvers (KL: exp-cone dual; W1: Shafieezadeh-Abadeh et al. convex program)",
     "-"),
    ("sample-complexity", ["sample-complexity"],
     "||theta_n - theta_pop|| = O(n^{-1/4}) for WDPO and KLDPO (log-linear policies)",
     "figures/sample_complexity_error.png"),
    ("gradients", ["gradients"],
     "scalable approximations of the minimax gradients (KLDPO weights, WDPO gradient penalty)",
     "figures/gradients_cosine_vs_tau.png"),
    ("shift", ["shift"],
     "robust DPO keeps reward under preference shift (log-linear world)",
     "figures/shift_reward_vs_alpha.png"),
    ("shift-map", ["shift-map"],
     "where robustness pays: regret of exact robust DPO vs DPO over shift type, reward angle, n and radius",
     "figures/shift_map.png"),
    ("llm-shift", ["llm-shift"],
     "robust DPO keeps alignment under preference shift (LLM, emotion-style rewards)",
     "figures/llm_shift.png"),
]


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="run every study (quick by default) and print the report",
                       description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", default=True, help="quick mode of every study (default)")
    mode.add_argument("--full", action="store_true",
                      help="full grids, and the real SmolLM2 run of llm-shift (about an hour or more on 2 cores)")
    p.add_argument("--out", default="results/reproduce", help="where study summaries go, in a quick/ or full/ subfolder (default results/reproduce)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these studies (" + ", ".join(s[0] for s in STUDIES) + "); with --collect: these "
                        "summaries (also bench, or one of bench-solvers, bench-train-step, bench-vs-trl)")
    p.add_argument("--force", action="store_true", help="rerun studies whose summary is already on disk")
    docs = p.add_argument_group("committed summaries (docs/results/) and paper_repro.md; no study is run")
    docs.add_argument("--collect", action="store_true",
                      help="copy the small summaries of the full runs (results/, written by the full study "
                           "commands) to docs/results/ for committing")
    docs.add_argument("--report", action="store_true",
                      help="rewrite the generated blocks of paper_repro.md from docs/results/")
    docs.add_argument("--check", action="store_true",
                      help="with --report: change nothing, exit 1 if paper_repro.md differs from the generated text")
    docs.add_argument("--redraw", action="store_true",
                      help="redraw the committed figures in figures/ from the committed tables in docs/results/")
    p.set_defaults(func=run)


def _check_only(args) -> None:
    """``--only`` names: studies to run, or (with ``--collect``) summaries to collect; exit 2 otherwise."""
    from .. import report as R

    if not args.only:
        return
    known = [s[0] for s in STUDIES]
    if args.collect:
        known = sorted(set(known) | set(R.STUDY_FILES) | {"bench"})
    bad = [o for o in args.only if o not in known]
    if bad:
        raise CLIError(f"--only: unknown {'name' if len(bad) == 1 else 'names'} {', '.join(bad)}; "
                       f"choose from {', '.join(known)}")


def _docs(args) -> int:
    from .. import report as R

    if args.check and not args.report:
        raise CLIError("--check goes with --report (drdpo reproduce --report --check)")
    if args.collect:
        only = args.only or []
        R.collect([s for s in R.STUDY_FILES if any(s == o or s.startswith(o + "-") for o in only)] or None)
    if args.redraw:
        for path in R.regenerate_figures():
            if str(path).endswith(".png"):
                print(f"figure {path}")
    if args.report:
        if args.check:
            stale = R.check_documents()
            if stale:
                print(f"out of date: {', '.join(stale)} differs from the text generated from {R.RESULTS_DIR}/; "
                      f"run `drdpo reproduce --report`")
                return 1
            print(f"up to date: {', '.join(map(str, R.DOCUMENTS))} matches {R.RESULTS_DIR}/")
        else:
            changed = R.write_documents()
            print(f"rewrote {', '.join(changed)}" if changed else "unchanged: every generated block is up to date")
    return EXIT_OK


def study_args(name: str, full: bool) -> list[str]:
    """Mode flags of one study. Quick runs write figures to figures/quick/ (not committed), so
    they never overwrite the committed figures of the full runs."""
    if name == "solver-check":
        return []
    if name == "llm-shift":
        if full:
            return ["--model", "smollm2", "--out", "runs/llm_shift", "--figure", "figures/llm_shift.png"]
        return ["--quick", "--out", "results/llm_shift_quick", "--figure", "figures/quick/llm_shift.png"]
    return [] if full else ["--quick", "--figures", "figures/quick"]  # the default grid is the full one


def _run_study(name: str, argv: list[str], log_path: Path) -> dict:
    cmd = [sys.executable, "-m", "drdpo_theory.cli", *argv, "--json"]
    last = ""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.strip():
                last = line.strip()
        code = proc.wait()
    if code != 0:
        raise CLIError(f"study '{name}' failed with exit code {code}; see {log_path}")
    try:
        return json.loads(last)
    except json.JSONDecodeError:
        raise CLIError(f"study '{name}' did not end with a JSON line; see {log_path}") from None


def run(args) -> int:
    _check_only(args)
    if args.collect or args.report or args.redraw or args.check:
        return _docs(args)
    from tqdm import tqdm

    from ..io import read_json, write_json
    from ._args import claim_output_dir, output_dir

    output_dir(args.out, "--out")
    claim_output_dir(args.out, "reproduce")
    out = Path(args.out) / ("full" if args.full else "quick")
    out.mkdir(parents=True, exist_ok=True)
    studies = [s for s in STUDIES if not args.only or s[0] in args.only]
    mode = "--full" if args.full else "--quick"
    summaries: dict[str, dict] = {}
    t0 = time.perf_counter()
    bar = tqdm(studies, desc="reproduce", unit="study")
    for name, argv, _, _ in bar:
        bar.set_postfix_str(name)
        path = out / f"{name}.json"
        old = None if args.force else read_json(path)
        if isinstance(old, dict):  # a summary that does not parse (torn, foreign) is rerun
            summaries[name] = old
            tqdm.write(f"[skip] {name}: summary on disk ({path})")
            continue
        extra = study_args(name, args.full)
        t = time.perf_counter()
        summary = _run_study(name, argv + extra, out / f"{name}.log")
        summary["_seconds"] = time.perf_counter() - t
        write_json(path, summary)  # atomic: a kill never leaves a torn summary to be trusted
        summaries[name] = summary
        tqdm.write(f"[done] {name} in {summary['_seconds']:.0f} s")
    print(f"\nreproduce ({mode[2:]}) finished in {time.perf_counter() - t0:.0f} s; summaries in {out}/\n")
    print(report(summaries, quick_figures=not args.full))
    return EXIT_OK


def report(summaries: dict[str, dict], quick_figures: bool = True) -> str:
    """One block per claim: paper says / we measured / figure."""
    lines = []
    for name, _, claim, fig in STUDIES:
        if name not in summaries:
            continue
        s = {k: v for k, v in summaries[name].items() if not k.startswith("_")}
        if not quick_figures or fig == "-":
            shown = fig
        else:
            shown = fig.replace("figures/", "figures/quick/", 1)
        measured = _headline(name, s) or _summarise(s)
        lines.append(f"* {name}\n    paper says : {claim}\n    we measured: {measured}\n    figure     : {shown}")
    return "\n".join(lines)


def _headline(name: str, s: dict) -> str | None:
    """The few numbers each study's claim rests on (None: fall back to the generic summary)."""
    try:
        if name == "sample-complexity":
            parts = []
            for method, v in s.items():
                if isinstance(v, dict) and "slope" in v:
                    lo, hi = v["slope_ci"]
                    bound = "bound holds" if v.get("bound_holds") else "BOUND VIOLATED"
                    if v.get("bound_vacuous_at_all_n"):
                        bound += " (vacuous)"
                    parts.append(f"{method} slope {v['slope']:.2f} [{lo:.2f}, {hi:.2f}], {bound}")
            return "; ".join(parts) or None
        if name == "shift":
            w = s["worst_alpha_reward"]
            return "worst-case reward over alpha: " + ", ".join(f"{k} {v:.3f}" for k, v in w.items())
        if name == "shift-map":
            per = {sh: len(v.get("reward", [])) for sh, v in s["regions"].items()}
            m = s.get("mechanism", {})
            line = (f"robust > DPO in expected reward (with its interval) in {sum(per.values())} of "
                    f"{s['cells_per_shift'] * len(per)} cells (" + ", ".join(f"{k} {v}" for k, v in per.items()) + ")")
            if "population_sign_agreement" in m:
                line += (f"; first-order criterion right in {100 * m['population_sign_agreement']:.1f}% of "
                         f"{m['population_cells']} population cells")
            return line
        if name == "llm-shift":
            alphas = s["alphas"]
            cells = [f"{m} " + "/".join(f"{x:+.2f}" for x in v["mean"]) for m, v in s["methods"].items()]
            line = f"{s['model']}, mean r_alpha at alpha = {'/'.join(f'{a:g}' for a in alphas)}: " + "; ".join(cells)
            if s.get("smoke_test") or s.get("model") == "tiny-random":
                line = ("PIPELINE SMOKE TEST only (tiny random model: every policy alike by construction, "
                        "not a robustness result): " + line)
            return line
    except (KeyError, TypeError, ValueError):
        return None
    return None


def _summarise(s: dict, limit: int = 400) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v[:6]) + (", ..." if len(v) > 6 else "") + "]"
        return str(v)

    text = "; ".join(f"{k}={fmt(v)}" for k, v in s.items())
    return text if len(text) <= limit else text[: limit - 3] + "..."
