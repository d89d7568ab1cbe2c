r"""Per-sequence log-probabilities of answer tokens under a causal LM.

For a row :math:`t_1..t_T` with answer mask :math:`m_1..m_T` (1 on answer tokens,
aligned with ``input_ids``), the sequence log-probability is

.. math:: \log\pi(a|s) = \sum_{j=2}^{T} m_j \log p_\theta(t_j \mid t_{<j}),

the logits at position j-1 predicting token j (the shift is done here). One forward of
the model over all rows.

Only the scored positions reach the LM head: a forward pre-hook on the model's output
embeddings (:class:`ScoredPositions`) hands it the hidden states of the K positions whose
next token is an answer token, so the head computes (K, V) logits instead of (N, T, V):
the prompt and padding positions cost neither the head's matmul nor the log-softmax's
memory (TRL scores only those positions too, on Triton devices). The model's own forward
runs unchanged otherwise, so DDP, FSDP2, DeepSpeed and PEFT wrappers see an ordinary call.
A model whose head is not called on the (N, T, D) hidden states falls back to the full
logits (same values).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from drdpo_theory.llm.attention import _unwrap

__all__ = ["sequence_logps", "concatenated_logps", "token_logps", "ScoredPositions"]


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Log-probability of each label under its logits.

    .. math:: \log p(y) = z_y - \log\sum_v e^{z_v}.

    Parameters
    ----------
    logits : torch.Tensor, shape (N, T, V)
    labels : torch.Tensor of int, shape (N, T)

    Returns
    -------
    torch.Tensor, shape (N, T)
        In float32 if the logits are half/bfloat16 (the log-sum-exp over a large vocab
        loses too much in 8 mantissa bits), else in the logits' dtype.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)  # (N, T)
    # gather minus logsumexp avoids materialising the full (N, T, V) log_softmax.
    return picked - torch.logsumexp(logits, dim=-1)


class ScoredPositions:
    r"""Context manager: the model's LM head sees only the hidden states at ``sel``.

    A forward pre-hook on ``model.get_output_embeddings()`` replaces its input
    :math:`H \in \mathbb{R}^{N\times T\times D}` by ``H[sel]`` (K, D), so the forward returns
    (K, V) logits, rows in row-major order of ``sel``. ``fired`` tells whether the head was
    called on an (N, T, D) input (else it was left alone: e.g. a model without output
    embeddings, or one that calls its head on another shape).

    Parameters
    ----------
    model : torch.nn.Module
        Hugging Face causal LM, or a DDP / DeepSpeed / PEFT wrapper of one.
    sel : torch.Tensor of bool, shape (N, T)
    """

    def __init__(self, model: torch.nn.Module, sel: torch.Tensor):
        self.sel = sel
        self.fired = False
        get = getattr(_unwrap(model), "get_output_embeddings", None)
        head = get() if callable(get) else None
        self.head = head if isinstance(head, torch.nn.Module) and not getattr(model, "_drdpo_full_logits", False) else None
        self.handle = None

    def _hook(self, module, args):
        h = args[0] if args else None
        if self.fired or not torch.is_tensor(h) or h.dim() != 3 or tuple(h.shape[:2]) != tuple(self.sel.shape):
            return None
        self.fired = True
        return (h[self.sel.to(h.device)],) + tuple(args[1:])

    def __enter__(self) -> "ScoredPositions":
        if self.head is not None:
            self.handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _model_logits(model, input_ids, attention_mask, inputs_embeds):
    # Positions from the mask make left padding correct too; for right padding they
    # coincide with arange(T) on real tokens.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (N, T)
    kwargs: dict[str, Any] = dict(
        attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    if inputs_embeds is not None:
        out = model(inputs_embeds=inputs_embeds, **kwargs)
    else:
        out = model(input_ids=input_ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out[0]


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Sum of answer-token log-probabilities per row, one forward.

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM called as ``model(input_ids=..., attention_mask=...,
        position_ids=..., use_cache=False)`` (or ``inputs_embeds=...``), returning an
        object with ``.logits`` of shape (N, T, V) (Hugging Face convention; a DDP or
        PEFT wrapper works too).
    input_ids : torch.Tensor of int, shape (N, T)
        Token ids; also the labels (shifted here).
    attention_mask : torch.Tensor, shape (N, T)
        1 on real tokens, 0 on padding.
    loss_mask : torch.Tensor, shape (N, T)
        1 on the answer tokens whose log-probabilities are summed, aligned with
        ``input_ids`` (position 0 is never scored: nothing predicts it).
    inputs_embeds : torch.Tensor, shape (N, T, D), optional
        Input embeddings to use instead of looking up ``input_ids`` (WDPO
        differentiates with respect to them). ``input_ids`` still gives the labels.

    Returns
    -------
    torch.Tensor, shape (N,)
        :math:`\sum_{j\ge2} m_j \log p(t_j|t_{<j})`; float32 for half-precision
        models, else the model dtype.
    """
    scored = loss_mask[:, 1:] != 0  # (N, T-1): position j scores token j+1
    sel = torch.nn.functional.pad(scored, (0, 1))  # (N, T): the hidden states the head needs
    k = int(scored.sum())
    with ScoredPositions(model, sel) as probe:
        logits = _model_logits(model, input_ids, attention_mask, inputs_embeds)
    if probe.fired and not (logits.dim() == 2 and logits.shape[0] == k):
        # the head ran on the scored rows but the model reshaped its output: score everything instead
        model._drdpo_full_logits = True
        return sequence_logps(model, input_ids, attention_mask, loss_mask, inputs_embeds)
    if probe.fired:  # (K, V): the scored positions, row-major, scattered back to (N, T-1) (zeros elsewhere)
        tok = token_logps(logits, input_ids[:, 1:][scored])  # (K,)
        logp = tok.new_zeros(scored.shape).masked_scatter(scored, tok)
        with torch.no_grad():
            mean_logit = logits.detach().float().mean(-1)  # (K,)
            mean_v = mean_logit.new_zeros(scored.shape).masked_scatter(scored, mean_logit)
    else:  # (N, T, V): the head was not hooked (no output embeddings, or called on another shape)
        logp = token_logps(logits[:, :-1, :], input_ids[:, 1:])  # (N, T-1): token j+1 given <= j
        with torch.no_grad():
            mean_v = logits[:, :-1, :].detach().float().mean(-1)  # (N, T-1)
    mask = loss_mask[:, 1:].to(logp.dtype)  # (N, T-1), aligned with the predicted tokens
    out = (logp * mask).sum(-1)
    with torch.no_grad():  # TRL's logits/chosen|rejected: mean logit over answer tokens and vocabulary
        m = mask.detach().float()
        out.logit_stats = torch.stack([(mean_v * m).sum(-1), m.sum(-1)], dim=-1)  # (N, 2): sum, count
    return out


def concatenated_logps(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    inputs_embeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected sequence log-probs from one forward over 2B rows.

    Parameters
    ----------
    model : torch.nn.Module
        As in :func:`sequence_logps`.
    batch : mapping
        ``input_ids``, ``attention_mask``, ``loss_mask``, each of shape (2B, T): rows
        0..B-1 are the chosen answers, rows B..2B-1 the rejected ones (pair i is rows
        i and B+i).
    inputs_embeds : torch.Tensor, shape (2B, T, D), optional
        Embeddings of ``batch["input_ids"]`` (see :func:`sequence_logps`).

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``(chosen_logps, rejected_logps)``, each of shape (B,).
    """
    input_ids = batch["input_ids"]
    n = input_ids.shape[0]
    if n % 2:
        raise ValueError(f"batch must hold 2B rows (chosen then rejected), got {n}")
    logps = sequence_logps(
        model, input_ids, batch["attention_mask"], batch["loss_mask"], inputs_embeds
    )
    chosen, rejected = logps[: n // 2], logps[n // 2 :]
    stats = getattr(logps, "logit_stats", None)
    if stats is not None:  # (2B, 2) per-row (sum of mean logits, answer tokens), for metrics only
        chosen.logit_stats, rejected.logit_stats = stats[: n // 2], stats[n // 2 :]
    return chosen, rejected
