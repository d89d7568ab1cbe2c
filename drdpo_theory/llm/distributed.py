"""Minimal ``torch.distributed`` helpers used by the KLDPO weights and the WDPO step.

Only what the losses need: whether a process group is up, its size and rank, an
``all_gather`` of a detached tensor (KLDPO weights) and an ``all_reduce`` sum (the WDPO
finite-difference step).  No distribution layer beyond this: gradient
averaging is left to :class:`torch.nn.parallel.DistributedDataParallel` (or accelerate).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "all_gather_detached", "all_reduce_sum_detached"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 without distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group (0 without distributed)."""
    return dist.get_rank() if is_distributed() else 0


def all_gather_detached(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Gather a detached copy of ``tensor`` from every rank.

    Parameters
    ----------
    tensor : torch.Tensor, shape (n_r, *rest)
        This rank's tensor. The leading size ``n_r`` may differ across ranks (the
        tensors are padded to the largest ``n_r`` for the collective and trimmed after);
        the trailing shape ``rest``, the dtype and the device must be the same everywhere.

    Returns
    -------
    list of torch.Tensor
        ``world_size()`` tensors, entry ``r`` of shape ``(n_r, *rest)`` holding rank ``r``'s
        values, all detached (no gradient flows through the gather). Without distributed,
        ``[tensor.detach()]``.

    Notes
    -----
    Costs two collectives (sizes, then the padded data). With the NCCL backend the
    tensor must live on this rank's GPU; with gloo on CPU.
    """
    t = tensor.detach()
    if not is_distributed():
        return [t]
    ws = dist.get_world_size()
    n_local = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n_local) for _ in range(ws)]
    dist.all_gather(sizes, n_local)
    sizes_int = [int(s.item()) for s in sizes]
    n_max = max(sizes_int)
    if t.shape[0] < n_max:  # pad to equal shapes: all_gather needs them
        pad = t.new_zeros((n_max - t.shape[0], *t.shape[1:]))
        t_pad = torch.cat([t, pad], dim=0)
    else:
        t_pad = t.contiguous()
    out = [torch.empty_like(t_pad) for _ in range(ws)]
    dist.all_gather(out, t_pad)
    return [o[:n] for o, n in zip(out, sizes_int)]


def all_reduce_sum_detached(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of a detached copy of ``tensor`` over every rank (the tensor itself without distributed).

    Same shape, dtype and device on every rank (NCCL: this rank's GPU; gloo: CPU). One
    collective; every rank must call it.
    """
    t = tensor.detach()
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t
