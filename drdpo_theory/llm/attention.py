"""Twice-differentiable attention for the WDPO double-backward penalty.

The WDPO penalty :math:`\\rho_0\\|\\nabla_e \\ell\\|^2` is differentiated with
``create_graph=True`` (docs/theory.md section 5), i.e. through the backward of attention.
Fused kernels have no such derivative: on CPU, torch raises
``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
implemented``, and flash-attention-2 / memory-efficient SDPA kernels on GPU likewise.
:func:`ensure_double_backward_attention` switches a Hugging Face model to the eager
(plain matmul + softmax) attention, which autograd differentiates twice, and warns.
The finite-difference WDPO estimator needs no such switch.
"""

from __future__ import annotations

import logging
import warnings

import torch

__all__ = ["attention_implementation", "ensure_double_backward_attention"]

logger = logging.getLogger(__name__)

#: attention implementations whose backward autograd can differentiate again
DOUBLE_BACKWARD_SAFE = ("eager",)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under DDP (``.module``) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The attention implementation of a Hugging Face model (``config._attn_implementation``).

    Returns None for a model without a Hugging Face config (a plain ``nn.Module``).
    """
    config = getattr(_unwrap(model), "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def ensure_double_backward_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` to eager attention if its attention is not twice differentiable.

    Uses ``model.set_attn_implementation("eager")`` when the model has it (transformers
    >= 4.56; it also updates sub-configs), else sets ``config._attn_implementation``,
    which Hugging Face attention layers read at every forward. Emits one
    :class:`UserWarning` (and a log record) when it switches; since the model is eager
    afterwards, later calls are silent no-ops.

    Parameters
    ----------
    model : torch.nn.Module
        A Hugging Face causal LM, possibly wrapped by DDP or PEFT. Models without a
        Hugging Face config are left alone (their attention is the caller's business).

    Returns
    -------
    bool
        True if the implementation was changed.
    """
    impl = attention_implementation(model)
    if impl is None or impl in DOUBLE_BACKWARD_SAFE:
        return False
    base = _unwrap(model)
    setter = getattr(base, "set_attn_implementation", None)
    if callable(setter):
        setter("eager")
    else:  # older transformers: the attention layers read the shared config at forward time
        base.config._attn_implementation = "eager"
    msg = (
        f"WDPO double-backward needs twice-differentiable attention; switched the model "
        f"from attn_implementation={impl!r} to 'eager' (slower, more memory). Use "
        f"wdpo_impl='finite-diff' to keep fused attention."
    )
    warnings.warn(msg, UserWarning, stacklevel=2)
    logger.warning(msg)
    return True
