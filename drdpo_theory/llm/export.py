"""Export a trained policy as folders that transformers and peft load: ``OUTPUT/final``.

Two layouts, the ones TRL's ``save_model`` and torchtune's recipes write:

* **full fine-tuning**: a Hugging Face model folder (``config.json``, ``model.safetensors``,
  ``generation_config.json``, tokenizer files) that ``AutoModelForCausalLM.from_pretrained``
  and ``AutoTokenizer.from_pretrained`` load offline;
* **LoRA**: a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``,
  tokenizer files) that ``PeftModel.from_pretrained(base, folder)`` loads; with
  ``merge=True`` also ``<folder>-merged``, the adapters folded into the base weights
  (``merge_and_unload``), as a plain model folder.

Both carry ``drdpo_export.json``: the base model spec (``tiny-random``, ``smollm2`` or a path,
for :func:`load_exported`), the method and step. A GGUF-loaded base (SmolLM2) is written as an
ordinary safetensors folder: the GGUF loader already dequantised it and its quantisation flag
was dropped at load time (:mod:`drdpo_theory.llm.models`).

Every folder is written under a temporary name beside the target and renamed when complete, so
an interrupted export never leaves a half-written ``final/``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = [
    "EXPORT_INFO",
    "ExportError",
    "export_checkpoint",
    "export_policy",
    "is_adapter_folder",
    "load_exported",
    "merged_path",
]

EXPORT_INFO = "drdpo_export.json"
"""File in every exported folder: base model spec, method, step, LoRA settings."""


class ExportError(RuntimeError):
    """An export or a load of an exported folder failed (message names the folder)."""


def merged_path(out: str | os.PathLike) -> Path:
    """``OUT-merged``: where ``--merge-lora`` writes the merged model next to ``OUT``."""
    out = Path(out)
    return out.with_name(out.name + "-merged")


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a PEFT adapter (``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


def _atomic_dir(target: Path, write) -> Path:
    """Call ``write(tmp)`` on a fresh temporary folder, then swap it in as ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    old = target.with_name(f".old-{target.name}")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)
    return target


def _plain_model_for_saving(model: torch.nn.Module) -> torch.nn.Module:
    """Make a model safe for ``save_pretrained``: no gradient-checkpointing or stale GGUF keys."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for key in ("quantization_config", "gguf_file"):
            if hasattr(cfg, key):
                try:
                    delattr(cfg, key)
                except AttributeError:
                    pass
        if getattr(cfg, "use_cache", None) is False:
            cfg.use_cache = True  # training turns the KV cache off; generation wants it on
    return model


def _write_info(folder: Path, info: Mapping[str, Any]) -> None:
    (folder / EXPORT_INFO).write_text(json.dumps(dict(info), indent=1, sort_keys=True))


def _save_plain(model: torch.nn.Module, tokenizer: Any, folder: Path, info: Mapping[str, Any],
                state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    model = _plain_model_for_saving(model)
    kw: dict[str, Any] = {"safe_serialization": True}
    if state_dict is not None:
        kw["state_dict"] = dict(state_dict)
    model.save_pretrained(str(folder), **kw)
    if not (folder / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    _write_info(folder, {**info, "kind": "model"})


def export_policy(
    policy: torch.nn.Module,
    tokenizer: Any,
    out: str | os.PathLike,
    info: Mapping[str, Any] | None = None,
    merge: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> list[Path]:
    """Write ``policy`` (a transformers model or a peft ``PeftModel``) as loadable folder(s).

    Parameters
    ----------
    policy : transformers.PreTrainedModel or peft.PeftModel
        Unwrapped (no DDP/FSDP wrapper) policy on any device; weights are saved in their dtype.
    tokenizer : transformers.PreTrainedTokenizerBase
    out : path
        Target folder (replaced if it exists).
    info : mapping, optional
        Extra provenance for ``drdpo_export.json`` (``base_model`` spec, ``method``, ``step``).
    merge : bool
        LoRA only: also write ``out-merged`` with the adapters merged into the base weights.
    state_dict : mapping, optional
        Full-model weights to save instead of ``policy.state_dict()`` (sharded engines gather
        them first).

    Returns
    -------
    list of pathlib.Path
        The folders written (``out``, then ``out-merged`` when merged).
    """
    out = Path(out)
    info = dict(info or {})
    written: list[Path] = []
    is_peft = hasattr(policy, "peft_config") and hasattr(policy, "merge_and_unload")
    if not is_peft:
        if merge:
            raise ExportError(f"{out}: --merge-lora needs a LoRA run; this policy has no adapters")
        written.append(_atomic_dir(out, lambda tmp: _save_plain(policy, tokenizer, tmp, info, state_dict)))
        return written

    def write_adapter(tmp: Path) -> None:
        policy.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _write_info(tmp, {**info, "kind": "adapter"})

    written.append(_atomic_dir(out, write_adapter))
    if merge:
        merged = copy.deepcopy(policy).merge_and_unload()
        written.append(_atomic_dir(merged_path(out), lambda tmp: _save_plain(merged, tokenizer, tmp, {**info, "merged": True})))
        del merged
    return written


def _read_info(folder: Path) -> dict[str, Any]:
    path = folder / EXPORT_INFO
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: corrupt export record ({exc}); expected the JSON that drdpo export wrote") from None


def load_exported(folder: str | os.PathLike, dtype: str = "fp32", base: str | None = None) -> tuple[Any, Any]:
    """Load an exported folder: a plain model folder, or an adapter on its base model.

    Parameters
    ----------
    folder : path
        ``OUTPUT/final`` (model or adapter) or ``OUTPUT/final-merged``.
    dtype : {"fp32", "bf16"}
    base : str, optional
        Base model spec for an adapter folder; default: the one recorded at export
        (``drdpo_export.json``), else ``adapter_config.json``'s ``base_model_name_or_path``.

    Returns
    -------
    (model, tokenizer)
        The model in eval mode (a ``PeftModel`` for an adapter folder).
    """
    from drdpo_theory.llm.models import ModelLoadError, load_model

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such model folder")
    if not is_adapter_folder(folder):
        model, tok = load_model(str(folder), dtype=dtype)
        return model, tok
    from peft import PeftModel
    from transformers import AutoTokenizer

    spec = base or _read_info(folder).get("base_model")
    if not spec:
        try:
            spec = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (json.JSONDecodeError, UnicodeDecodeError):
            spec = None
    if not spec:
        raise ExportError(f"{folder}: adapter folder without a recorded base model; pass the base model spec")
    try:
        model, _ = load_model(spec, dtype=dtype)
    except ModelLoadError as exc:
        raise ExportError(f"{folder}: base model of the adapter: {exc}") from None
    model = PeftModel.from_pretrained(model, str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, merge: bool = False) -> list[Path]:
    """Export a trainer checkpoint (``OUTPUT/checkpoints/step-*``) like a finished run.

    Rebuilds the policy from the base model recorded in the checkpoint's configuration
    (LoRA adapters with the same settings), loads the trained weights and calls
    :func:`export_policy`.
    """
    from drdpo_theory.llm.trainer import CheckpointError, TrainConfig, build_policy, read_checkpoint_state

    checkpoint = Path(checkpoint)
    state = read_checkpoint_state(checkpoint)
    cfg_json = dict(state["config"])
    cfg_json["lora_target_modules"] = tuple(cfg_json.get("lora_target_modules", ()))
    known = {f for f in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{k: v for k, v in cfg_json.items() if k in known})
    if not cfg.model_spec:
        raise CheckpointError(f"{checkpoint}: the checkpoint does not record its base model")
    if merge and not cfg.lora:
        raise ExportError(f"{checkpoint}: --merge-lora needs a LoRA checkpoint; this run trained all weights")
    from drdpo_theory.llm.models import load_model

    model, tok = load_model(cfg.model_spec, dtype="bf16" if cfg.precision == "bf16" else "fp32")
    policy = build_policy(model, cfg)
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    if names != state["param_names"]:
        raise CheckpointError(f"{checkpoint}: trainable parameters differ from the rebuilt model's")
    from safetensors.torch import load_file

    try:
        weights = load_file(str(checkpoint / "trainable.safetensors"))
    except Exception as exc:  # safetensors raises its own error types on damaged files
        raise CheckpointError(f"{checkpoint / 'trainable.safetensors'}: corrupt checkpoint file ({exc})") from None
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(weights[n].to(params[n].dtype))
    info = {"base_model": cfg.model_spec, "method": cfg.method, "step": int(state["step"]), "source": str(checkpoint)}
    return export_policy(policy.eval(), tok, out, info=info, merge=merge)
