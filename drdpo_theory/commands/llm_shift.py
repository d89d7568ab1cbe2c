"""``drdpo llm-shift``: DPO vs KLDPO vs WDPO on a real causal LM under reward-mixture shift.

Contract: ``drdpo llm-shift [--quick] [--preset {vader,emotion}] [--model {smollm2,tiny-random,PATH}]
--out DIR [--kl-radii R,..] [--penalty-fractions F,..] [--workers N] [options] [--json]``. Samples completions on the shipped train prompts, labels pairs with
the mixture r_alpha0 of two lexicon objectives (``--preset vader``, the default: VADER positivity vs
calm; ``--preset emotion``: NRC joy vs anger shares), trains each method from the same start, and
reports the mean r_alpha on the test prompts for every alpha with bootstrap 95% intervals, and the
objectives' correlation on the initial policy's train pool. Every stage is cached under ``--out``
and skipped on a rerun. With ``--json`` the last stdout line is one JSON object ``{"model",
"alpha0", "alphas", "objectives", "objective_conflict", "methods": {name: {"mean", "lo", "hi",
"diff_vs_dpo"}}, "smoke_test", "out", "seconds"}``; ``smoke_test`` is true for the tiny random
model of ``--quick``, a pipeline smoke test whose policies are alike by construction (the figure
and the table say so). Exit 2 with one line on bad input, including an ``--out`` that is a file or
not writable and a ``--figure``/``--table``/``--results-json`` that is a folder or unwritable.
"""

from __future__ import annotations

import json

from ._args import claim_output_dir as _claim, output_dir as _output_dir, output_file as _output_file
from ._args import ints as _ints, names as _names, number as _float, numbers as _floats
from ..cli import EXIT_OK, CLIError


def register(sub) -> None:
    p = sub.add_parser(
        "llm-shift",
        help="real-LLM preference-shift experiment: DPO vs KLDPO vs WDPO (offline)",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1] + " See docs/llm_shift.md.",
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke preset: tiny random model, 6 train / 4 test prompts, 2 steps (seconds)")
    p.add_argument("--model", help="'smollm2' (default), 'tiny-random' (default with --quick) or a local model path")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (stages are cached and resumed here)")
    p.add_argument("--preset", choices=["vader", "emotion"],
                   help="objective pair: vader = positivity,calm (default), emotion = joy,anger (NRC lexicon shares); "
                   "see docs/llm_shift.md")
    p.add_argument("--objectives", type=_names,
                   help="two objectives r_1,r_2 instead of a --preset (positivity, calm, brevity, or an NRC emotion: "
                   "anger, anticipation, disgust, fear, joy, sadness, surprise, trust)")
    p.add_argument("--alpha0", type=_float, help="training mixture weight in [0, 1] (default 0.5)")
    p.add_argument("--alphas", type=_floats, help="test mixture weights, comma-separated (default 0,0.1,...,1)")
    p.add_argument("--n-train", type=int, help="train prompts (default 96; the shipped set has 200)")
    p.add_argument("--n-test", type=int, help="test prompts (default 100)")
    p.add_argument("--k", type=int, help="completions per train prompt (default 4)")
    p.add_argument("--pairs-per-prompt", type=int,
                   help="preference pairs m per train prompt, 2m <= k: j-th best vs j-th worst sample, j < m (default 1)")
    p.add_argument("--eval-samples", type=int, help="completions per test prompt and policy (default 1)")
    p.add_argument("--max-new-tokens", type=int, help="max new tokens per completion (default 24)")
    p.add_argument("--temperature", type=_float, help="sampling temperature (default 1.0)")
    p.add_argument("--methods", type=_names, help="comma-separated subset of dpo,ipo,kldpo,wdpo (default dpo,kldpo,wdpo)")
    p.add_argument("--beta", type=_float, help="DPO temperature beta (default 0.1)")
    p.add_argument("--tau", type=_floats, dest="taus", help="KLDPO temperature(s) tau, comma-separated (one run each)")
    p.add_argument("--rho0", type=_floats, dest="rho0s", help="WDPO penalty coefficient(s) rho0, comma-separated (one run each)")
    p.add_argument("--kl-radii", type=_floats, dest="kl_radii",
                   help="KL radii rho, comma-separated: calibrate the KLDPO taus at the DPO solution instead of --tau "
                   "(tau = the KL dual temperature of the seed-one DPO policy's training losses at radius rho; "
                   "docs/llm_shift.md)")
    p.add_argument("--penalty-fractions", type=_floats, dest="penalty_fractions",
                   help="fractions f, comma-separated: calibrate the WDPO rho0s at the DPO solution instead of --rho0 "
                   "(the rows penalty there = f x the mean DPO loss; both --wdpo-penalty norms use it)")
    p.add_argument("--wdpo-impl", choices=["finite-diff", "double-backward"], help="WDPO gradient (default finite-diff)")
    p.add_argument("--wdpo-penalty", type=_names, dest="wdpo_penalties",
                   help="WDPO gradient norm(s), comma-separated, one run per rho0 each: rows (default; runs wdpo-rho<r>) "
                   "and/or tuple (the prompt one shared input; runs wdpo-tuple-rho<r>)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 24)")
    p.add_argument("--batch-size", type=int, help="pairs per step (default 8)")
    p.add_argument("--lr", type=_float, help="peak learning rate (default 1e-3)")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default 16)")
    p.add_argument("--seeds", type=_ints, help="training/eval seeds, comma-separated (default 0)")
    p.add_argument("--n-boot", type=int, help="bootstrap resamples (default 2000)")
    p.add_argument("--figure", help="figure path (PNG, a PDF next to it; default OUT/llm_shift.png)")
    p.add_argument("--table", help="also write the markdown results table here")
    p.add_argument("--results-json", dest="json_out", help="also write results.json here")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (the real preset: 1)")
    p.add_argument("--workers", type=int,
                   help="training runs at once, one process each (default 1); results do not depend on it")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line (last line of stdout)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..llm.shift.pipeline import ShiftConfig, run_shift
    from ..llm.shift.rewards import REWARD_PRESETS

    if args.preset is not None and args.objectives is not None:
        raise CLIError("give --preset or --objectives, not both (--preset emotion is --objectives joy,anger)")
    if args.preset is not None:
        args.objectives = REWARD_PRESETS[args.preset]
    if args.kl_radii is not None and args.taus is not None:
        raise CLIError("give --tau or --kl-radii (taus calibrated at the DPO solution), not both")
    if args.penalty_fractions is not None and args.rho0s is not None:
        raise CLIError("give --rho0 or --penalty-fractions (rho0s calibrated at the DPO solution), not both")
    if args.workers is not None and args.workers < 1:
        raise CLIError(f"--workers must be an integer >= 1; got {args.workers}")

    overrides = {
        k: getattr(args, k)
        for k in ("model", "objectives", "alpha0", "alphas", "n_train", "n_test", "k", "pairs_per_prompt", "eval_samples",
                  "max_new_tokens", "temperature", "methods", "beta", "taus", "rho0s", "wdpo_impl", "wdpo_penalties", "steps",
                  "batch_size", "lr", "lora_r", "seeds", "n_boot", "figure", "table", "json_out", "threads",
                  "kl_radii", "penalty_fractions", "workers")
    }
    overrides["out"] = args.out
    if args.full:
        overrides["lora"] = False
    if args.no_progress:
        overrides["progress"] = False
    _output_dir(args.out, "--out")
    for flag, value in (("--figure", args.figure), ("--table", args.table), ("--results-json", args.json_out)):
        if value is not None:
            _output_file(value, flag)
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be an integer >= 1; got {args.threads}")
    _claim(args.out, "llm-shift")
    log = (lambda msg: print(msg, flush=True))
    try:
        cfg = ShiftConfig.preset("quick" if args.quick else "real", **overrides)
        result = run_shift(cfg, log=log)
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from None
    s = result.summary
    if args.json:
        methods = {
            name: {"mean": e["mean"], "lo": e["lo"], "hi": e["hi"], "diff_vs_dpo": e["diff"]}
            for name, e in s["policies"].items()
        }
        print(json.dumps({"model": s["model"], "objectives": s["objectives"],
                          "objective_conflict": s.get("objective_conflict"), "alpha0": s["alpha0"],
                          "alphas": s["alphas"], "methods": methods, "smoke_test": bool(s.get("smoke_test")),
                          "out": str(result.out),
                          "stages_run": result.stages_run, "seconds": round(result.seconds, 2)}))
    else:
        print((result.out / "results.md").read_text(), end="")
        if s.get("smoke_test"):
            from ..llm.shift.pipeline import SMOKE_NOTE

            print(SMOKE_NOTE)
        print(f"stages run: {', '.join(result.stages_run) or 'none (all cached)'}; {result.seconds:.1f} s; "
              f"outputs in {result.out}")
    return EXIT_OK
