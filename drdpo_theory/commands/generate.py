"""``drdpo generate``: sample completions from an exported model, offline.

Contract: ``drdpo generate --model DIR --prompts F --out G.jsonl [--max-new-tokens N]
[--temperature T] [--seed S] [--samples K] [--system TEXT]``. ``DIR`` is a model folder
(``OUTPUT/final`` of a full fine-tuning run, ``OUTPUT/final-merged``, any local Hugging Face
folder) or a PEFT adapter folder (``OUTPUT/final`` of a LoRA run; its base model is the one
recorded at export, or ``--base``). ``F`` holds prompts: JSONL/JSON records with a string
``prompt`` (other keys ignored), or a ``.txt`` file with one prompt per line. Each prompt is
sent as a user turn through the tokenizer's chat template with its generation prompt, the
sampling code of ``drdpo llm-shift``. ``G.jsonl`` gets one row per completion: ``prompt_id``,
``sample``, ``prompt``, ``completion``, ``n_tokens``, ``finished``; it is written atomically.
Exit 2 with one line on bad input.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ._args import number as _float


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample completions from an exported model or adapter folder (offline)",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model folder or PEFT adapter folder (OUTPUT/final)")
    p.add_argument("--prompts", required=True, metavar="F", help="prompts: .jsonl/.json with a 'prompt' string, or .txt lines")
    p.add_argument("--out", required=True, metavar="G.jsonl", help="output JSONL (replaced)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per completion (default: %(default)s)")
    p.add_argument("--temperature", type=_float, default=1.0, help="sampling temperature > 0 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--samples", type=int, default=1, help="completions per prompt (default: %(default)s)")
    p.add_argument("--system", default=None, help="optional system message before each prompt")
    p.add_argument("--base", default=None, help="base model spec of an adapter folder (default: the recorded one)")
    p.add_argument("--batch", type=int, default=16, help="sequences per generation batch (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def read_prompts(path: Path) -> list[str]:
    """Prompt strings of ``path`` (.jsonl/.json records with a string 'prompt', or .txt lines)."""
    from ..cli import CLIError

    if not path.is_file():
        raise CLIError(f"--prompts {path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CLIError(f"--prompts {path}: expected UTF-8 text (byte {exc.start} is not)") from None
    if path.suffix.lower() == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        if path.suffix.lower() == ".json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CLIError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(rows, list):
                raise CLIError(f"{path}: expected a JSON array of records with a 'prompt' string")
            located = [(f"{path}[row {i}]", r) for i, r in enumerate(rows)]
        else:
            located = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    located.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise CLIError(f"{path}:{lineno}: expected one JSON object per line ({exc.msg})") from None
        prompts = []
        for where, r in located:
            p = r.get("prompt") if isinstance(r, dict) else None
            if not isinstance(p, str) or not p.strip():
                raise CLIError(f"{where}: expected a record with a non-empty string 'prompt'")
            prompts.append(p)
    if not prompts:
        raise CLIError(f"--prompts {path}: no prompts")
    return prompts


def run(args) -> int:
    from ..cli import CLIError

    if args.max_new_tokens < 1 or args.samples < 1 or args.batch < 1:
        raise CLIError("--max-new-tokens, --samples and --batch must be >= 1")
    if not args.temperature > 0:
        raise CLIError(f"--temperature must be > 0; got {args.temperature}")
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {out} is a folder; expected a .jsonl file path")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise CLIError(f"--out {out}: folder {out.parent} does not exist or is not writable")
    prompts = read_prompts(Path(args.prompts))
    try:
        from ..llm.export import ExportError, load_exported
        from ..llm.models import ModelLoadError
        from ..llm.shift.pipeline import generate_completions
        from ..llm.shift.prompts import Prompt
    except ImportError as exc:
        raise CLIError(f"generate needs the llm extra (pip install 'drdpo-theory[llm]'): {exc}") from None
    try:
        model, tok = load_exported(args.model, base=args.base)
    except (ExportError, ModelLoadError) as exc:
        raise CLIError(" ".join(str(exc).split())) from None
    if not getattr(tok, "chat_template", None):
        raise CLIError(f"--model {args.model}: its tokenizer has no chat template; expected an instruction/chat model")
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        tmp.unlink()
    rows = generate_completions(
        model, tok, [Prompt(i, p, "test") for i, p in enumerate(prompts)], args.samples, tmp,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, gen_batch=args.batch,
        seed=args.seed, desc="generate", progress=not args.no_progress, system=args.system,
    )
    os.replace(tmp, out)
    print(f"drdpo generate: {len(rows)} completions of {len(prompts)} prompts -> {out}", file=sys.stderr)
    return 0
