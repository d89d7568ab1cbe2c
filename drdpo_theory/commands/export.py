"""``drdpo export``: turn a training checkpoint into folders that transformers / peft load.

Contract: ``drdpo export CHECKPOINT_DIR OUT [--merge-lora]``. ``CHECKPOINT_DIR`` is a
``drdpo align`` checkpoint (``OUTPUT/checkpoints/step-*``). Writes ``OUT`` exactly as a finished
run writes ``OUTPUT/final``: a Hugging Face model folder for full fine-tuning, a PEFT adapter
folder for LoRA runs (``--merge-lora`` also writes ``OUT-merged``, the adapters merged into the
base). The base model is rebuilt from the spec recorded in the checkpoint (offline). Exit 2 with
one line on bad input (not a checkpoint, corrupt files, ``OUT`` a file, ``--merge-lora`` on a
full fine-tuning checkpoint).
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a drdpo align checkpoint as a Hugging Face model or PEFT adapter folder",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a checkpoint folder OUTPUT/checkpoints/step-XXXXXXXX")
    p.add_argument("out", metavar="OUT", help="folder to write (replaced if it exists)")
    p.add_argument("--merge-lora", action="store_true", help="LoRA checkpoints: also write OUT-merged (merged weights)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..cli import CLIError

    from ..io import OutputPathError, check_output_dir

    try:
        out = check_output_dir(args.out, "OUT")
    except OutputPathError as exc:
        raise CLIError(str(exc)) from None
    try:
        from ..llm.export import ExportError, export_checkpoint
        from ..llm.models import ModelLoadError
        from ..llm.trainer import CheckpointError
    except ImportError as exc:
        raise CLIError(f"export needs the llm extra (pip install 'drdpo-theory[llm]'): {exc}") from None
    try:
        written = export_checkpoint(args.checkpoint, out, merge=args.merge_lora)
    except (ExportError, CheckpointError, ModelLoadError) as exc:
        raise CLIError(" ".join(str(exc).split())) from None
    except PermissionError as exc:
        raise CLIError(f"permission denied: {exc.filename or exc}") from None
    for p in written:
        print(p)
    print(f"drdpo export: wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
