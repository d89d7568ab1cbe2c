r"""Preference objectives for causal LMs: DPO, IPO, KLDPO and WDPO (THEORY.md section 5).

:func:`preference_loss` returns a differentiable scalar whose ``.backward()`` gives the
method's gradient estimator, so a trainer (or a TRL ``compute_loss`` override) only calls
``backward``. :func:`preference_backward` runs that backward itself and accumulates the
same gradient; for WDPO finite-diff it does so in two passes (one graph alive at a time,
no separate embedding-gradient backward), which is what the native trainer uses. The
per-pair pieces live in :mod:`drdpo_theory.llm.losses`.

Reduction and data parallelism
------------------------------
The loss is the mean over this process's B pairs. DistributedDataParallel averages the
gradients of the R ranks, so with the same B on every rank the update is that of the mean
over all R*B pairs (the global mean). With unequal per-rank batches, multiply the loss by
``R * B / N_global`` so that the average of the local sums over N_global is the global
mean. KLDPO weights are computed on the gathered losses of all ranks
(:func:`~drdpo_theory.llm.losses.kldpo_weights`), so each rank's weighted mean is its
share of the global weighted mean.

WDPO
----
The per-pair objective is :math:`\ell_i + \rho_0 \|\nabla_{e}\ell_i\|^2` with e the
input embeddings of pair i (chosen and rejected rows; squared norms summed over both).
This is the authors' form of the first-order Wasserstein DRO expansion
:math:`\sup_{W_2\le\epsilon} E\ell \approx E\ell + \epsilon\sqrt{E\|\nabla_z\ell\|^2}`
(Gao, Chen, Kleywegt 2022). Two estimators of its parameter gradient:

``double-backward``
    exact: :math:`g = \nabla_e \sum_i\ell_i` with ``create_graph=True``, then backward of
    :math:`\frac1B\sum_i[\ell_i + \rho_0\|g_i\|^2]`. Needs eager attention
    (:func:`~drdpo_theory.llm.attention.ensure_double_backward_attention`).
``finite-diff``
    no double backward (fused SDPA kept): with :math:`g_i` detached and a step
    :math:`h > 0`,

    .. math:: \nabla_\theta\|g_i\|^2 = 2 D_\theta(\nabla_e \ell_i)^{\top} g_i
              \approx \frac{2}{h}\big[\nabla_\theta \ell_i(e_i + h g_i)
              - \nabla_\theta \ell_i(e_i)\big],

    so, with :math:`c = 2\rho_0/h`, backward of
    :math:`\frac1B\sum_i (1 - c)\,\ell_i(e) + c\,\ell_i(e + h g)` (e = e(theta) still
    attached to the embedding table in both terms) estimates the penalised gradient with
    O(h) error, at the cost of one extra forward-backward at the perturbed embeddings (all
    pairs in one batch). The step is one number for the whole batch,
    :math:`h = s\,\|e\|/\|g\|` with both norms over every pair of every rank (real tokens;
    one all-reduce of two numbers), s = ``fd_step``, default :math:`\sqrt{\epsilon_{mach}}`
    of the embedding dtype (of the autocast dtype when autocast is on): the batch
    perturbation :math:`h g` has norm s times that of the embeddings, scale-free and
    independent of how the batch is split across ranks. The step
    :math:`e \to e + h g` is also one gradient-ascent step, of length :math:`s\|e\|`, of
    the adversary in the Wasserstein inner sup.

    Why one step for the batch and not one per pair: the weight :math:`1 - c` of the
    gradient at the unperturbed point is then known after the first backward, so
    :func:`preference_backward` can run the estimator as two passes (forward-backward at
    e, which yields g and :math:`\nabla_\theta\sum_i\ell_i(e)` together, rescaled by
    :math:`1 - c`; then forward-backward at :math:`e + hg` weighted c), with one graph
    alive at a time. A per-pair step :math:`h_i` makes the weights :math:`1 - c_i`
    per pair, which needs per-pair parameter gradients or a second backward through the
    first graph.

Because pairs do not interact in a causal LM (each row attends only to itself),
:math:`\nabla_e\sum_j\ell_j` restricted to the rows of pair i is :math:`\nabla_e\ell_i`,
so one gradient of the batch sum gives every per-pair gradient, and both estimators
target the same quantity.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields
from typing import Mapping

import torch

from drdpo_theory.llm.attention import _unwrap, ensure_double_backward_attention
from drdpo_theory.llm.distributed import all_reduce_sum_detached
from drdpo_theory.llm.logprobs import concatenated_logps
from drdpo_theory.llm.losses import (
    KLDPO_VARIANTS,
    dpo_loss,
    effective_sample_size,
    implicit_rewards,
    ipo_loss,
    kldpo_weights,
)

__all__ = ["LossConfig", "preference_loss", "preference_backward", "METHODS", "WDPO_IMPLS"]

METHODS = ("dpo", "ipo", "kldpo", "wdpo")
WDPO_IMPLS = ("double-backward", "finite-diff")


@dataclass
class LossConfig:
    """Configuration of :func:`preference_loss`; every field is validated in ``__post_init__``."""

    method: str = field(
        default="dpo",
        metadata={"help": "Objective: 'dpo', 'ipo', 'kldpo' (KL-robust DPO) or 'wdpo' (Wasserstein-robust DPO)."},
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "KL-regularisation strength beta > 0 of DPO (for IPO: its tau, target margin 1/(2 beta))."},
    )
    kldpo_variant: str = field(
        default="clamped",
        metadata={
            "help": "KLDPO weights: 'clamped' (authors: exp((l-mean l)/tau) clamped at `clamp`), "
            "'normalized' (B*softmax(l/tau)) or 'calibrated' (exact KL-ball worst case of radius rho)."
        },
    )
    tau: float = field(
        default=1.0,
        metadata={"help": "KLDPO temperature tau > 0 for the 'clamped' and 'normalized' weights (stands in for lam*)."},
    )
    rho: float | None = field(
        default=None,
        metadata={"help": "KL radius rho >= 0 for kldpo_variant='calibrated' (required there, unused otherwise)."},
    )
    clamp: float | None = field(
        default=10.0,
        metadata={"help": "Upper clamp of the 'clamped' KLDPO weights (authors: 10); None disables it."},
    )
    wdpo_impl: str = field(
        default="double-backward",
        metadata={
            "help": "WDPO gradient: 'double-backward' (exact, create_graph, eager attention) or "
            "'finite-diff' (extra forward-backward at perturbed embeddings, fused attention kept)."
        },
    )
    rho0: float = field(
        default=0.01,
        metadata={"help": "WDPO penalty weight rho0 >= 0 on ||grad_emb l_i||^2 (0 gives DPO exactly)."},
    )
    fd_step: float | None = field(
        default=None,
        metadata={
            "help": "Relative finite-difference step for wdpo_impl='finite-diff': the embedding perturbation "
            "h*g of the batch has norm fd_step * ||e|| (h = fd_step ||e|| / ||g||, norms over the whole batch "
            "of every rank). None: sqrt(machine eps) "
            "of the embedding dtype, or of the autocast dtype when autocast is on "
            "(1.5e-8 float64, 3.5e-4 float32, 0.088 bfloat16)."
        },
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        if self.kldpo_variant not in KLDPO_VARIANTS:
            raise ValueError(f"kldpo_variant must be one of {KLDPO_VARIANTS}, got {self.kldpo_variant!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        if self.rho is not None and not self.rho >= 0:
            raise ValueError(f"rho must be >= 0, got {self.rho!r}")
        if self.method == "kldpo" and self.kldpo_variant == "calibrated" and self.rho is None:
            raise ValueError("kldpo_variant='calibrated' needs the KL radius rho (e.g. rho=0.1)")
        if self.clamp is not None and not self.clamp > 0:
            raise ValueError(f"clamp must be > 0 or None, got {self.clamp!r}")
        if self.wdpo_impl not in WDPO_IMPLS:
            raise ValueError(f"wdpo_impl must be one of {WDPO_IMPLS}, got {self.wdpo_impl!r}")
        if not self.rho0 >= 0:
            raise ValueError(f"rho0 must be >= 0, got {self.rho0!r}")
        if self.fd_step is not None and not self.fd_step > 0:
            raise ValueError(f"fd_step must be > 0 or None, got {self.fd_step!r}")

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (for CLIs)."""
        return {f.name: f.metadata["help"] for f in fields(cls)}


def _reward_metrics(pc, pr, rc, rr, beta) -> dict[str, float]:
    r_c, r_r = implicit_rewards(pc, pr, rc, rr, beta)
    m = (r_c - r_r).detach()
    return {
        "rewards/chosen": float(r_c.detach().mean()),
        "rewards/rejected": float(r_r.detach().mean()),
        "rewards/margins": float(m.mean()),
        "rewards/accuracies": float((m > 0).double().mean()),
        "logps/chosen": float(pc.detach().mean()),
        "logps/rejected": float(pr.detach().mean()),
    }


def _refs(ref_c, ref_r, like: torch.Tensor):
    # None: reference-free (log pi_ref = 0 for every sequence)
    ref_c = torch.zeros_like(like) if ref_c is None else ref_c.detach().to(like)
    ref_r = torch.zeros_like(like) if ref_r is None else ref_r.detach().to(like)
    return ref_c, ref_r


def _embed(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings (2B, T, D), attached to the embedding table (frozen table: a leaf)."""
    e = _unwrap(model).get_input_embeddings()(input_ids)
    if not e.requires_grad:  # frozen table (e.g. LoRA): differentiate w.r.t. e itself
        e = e.detach().requires_grad_(True)
    return e


def _pair_sq_norms(g: torch.Tensor) -> torch.Tensor:
    """||g_i||^2 per pair: (2B, T, D) -> (B,), chosen row i plus rejected row B+i."""
    sq = g.pow(2).sum(dim=(1, 2))  # (2B,)
    b = sq.shape[0] // 2
    return sq[:b] + sq[b:]


def _default_fd_step(e: torch.Tensor) -> float:
    """sqrt(machine eps) of the precision the forward runs in (the autocast dtype if active)."""
    dtype = e.dtype
    if torch.is_autocast_enabled(e.device.type):
        dtype = torch.get_autocast_dtype(e.device.type)
    return math.sqrt(torch.finfo(dtype).eps)


def _fd_coefficients(e: torch.Tensor, g: torch.Tensor, attention_mask: torch.Tensor, cfg: LossConfig, loss_dtype):
    """Finite-difference step h (0-dim, e's dtype: the step applied) and c = 2 rho0 / h (loss dtype).

    h = s ||e|| / ||g||, the norms over the real tokens of every pair of every rank (one
    all-reduce of two numbers), so the perturbation h g of the batch has norm s ||e||. With
    g = 0 everywhere, h = c = 0 (no penalty gradient). No host synchronisation.
    """
    step = cfg.fd_step if cfg.fd_step is not None else _default_fd_step(e)
    acc = torch.float64 if e.dtype == torch.float64 else torch.float32
    e_sq = (e.detach().to(acc).pow(2).sum(-1) * attention_mask.to(acc)).sum()  # real tokens only
    g_sq = g.detach().to(acc).pow(2).sum()
    stats = all_reduce_sum_detached(torch.stack([e_sq, g_sq]).double())
    e_sq, g_sq = stats[0], stats[1]
    pos = g_sq > 0
    h = torch.where(pos, step * (e_sq / torch.where(pos, g_sq, 1.0)).sqrt(), 0.0).to(e.dtype)
    hl = h.to(loss_dtype)  # c uses the same rounded step as the perturbation
    c = torch.where(hl > 0, 2.0 * cfg.rho0 / torch.where(hl > 0, hl, 1.0), 0.0)
    return h, c


def _wdpo_metrics(l: torch.Tensor, pair_sq: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    penalty = cfg.rho0 * pair_sq.mean()
    return penalty, {
        "dpo_loss": float(l.detach().mean()),
        "wdpo/penalty": float(penalty.detach()),
        "wdpo/grad_emb_norm": float(pair_sq.detach().mean().sqrt()),  # RMS over pairs of ||g_i||
    }


def _perturbed_losses(model, batch, e0: torch.Tensor, h: torch.Tensor, g: torch.Tensor, rc, rr, cfg: LossConfig):
    """DPO losses (B,) at the embeddings e0 + h g (g detached)."""
    pc2, pr2 = concatenated_logps(model, batch, inputs_embeds=e0 + h * g)
    return dpo_loss(pc2, pr2, rc, rr, cfg.beta)


def _wdpo(model, batch, ref_c, ref_r, cfg: LossConfig):
    e = _embed(model, batch["input_ids"])  # (2B, T, D)
    pc, pr = concatenated_logps(model, batch, inputs_embeds=e)
    rc, rr = _refs(ref_c, ref_r, pc)
    l = dpo_loss(pc, pr, rc, rr, cfg.beta)  # (B,)
    double = cfg.wdpo_impl == "double-backward" and cfg.rho0 > 0
    # g = grad_e sum_i l_i: per-pair blocks are grad_e l_i since pairs do not interact.
    (g,) = torch.autograd.grad(l.sum(), e, create_graph=double, retain_graph=True)  # (2B, T, D)
    pair_sq = _pair_sq_norms(g)  # (B,)
    penalty, metrics = _wdpo_metrics(l, pair_sq, cfg)
    if cfg.rho0 == 0:
        loss = l.mean()
    elif double:
        loss = l.mean() + penalty
    else:
        g = g.detach()
        h, c = _fd_coefficients(e, g, batch["attention_mask"], cfg, l.dtype)
        l2 = _perturbed_losses(model, batch, e, h, g, rc, rr, cfg)  # (B,) at the perturbed embeddings
        surrogate = ((1.0 - c) * l + c * l2).mean()
        # value = the exact penalised objective, gradient = the finite-difference estimate
        loss = surrogate + (l.mean() + penalty - surrogate).detach()
        metrics["wdpo/fd_h"] = float(h)
    metrics["loss"] = float(loss.detach())
    metrics.update(_reward_metrics(pc, pr, rc, rr, cfg.beta))
    return loss, metrics


def _no_sync(model: torch.nn.Module):
    """DDP: keep this backward's gradients local (no all-reduce); anything else: no-op."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def _no_autocast(t: torch.Tensor):
    """Backward passes run outside autocast (torch.amp guidance), also when called inside it."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(device_type=t.device.type, enabled=False)
    return contextlib.nullcontext()


def _wdpo_two_pass(model, batch, ref_c, ref_r, cfg: LossConfig, loss_scale: float):
    r"""WDPO finite-diff as two forward-backward passes, one graph alive at a time.

    Accumulates ``loss_scale`` times the gradient of the surrogate of :func:`_wdpo`,
    :math:`\frac1B\sum_i (1-c)\ell_i(e) + c\,\ell_i(e + hg)`:

    1. forward at e; one backward of :math:`\sum_i\ell_i(e)` to (e, parameters) gives g and
       :math:`P_1 = \nabla_\theta\sum_i\ell_i(e)` (graph 1 freed); h, c from g; add
       :math:`\text{loss\_scale}(1-c)/B\cdot P_1` to ``.grad``;
    2. forward at :math:`E(\text{ids}) + hg` (g detached; the embedding table E keeps its
       gradient path); backward of :math:`\text{loss\_scale}\,c/B\cdot\sum_i\ell_i(e+hg)`
       into ``.grad``.

    Under DDP pass 1 runs in ``no_sync`` and its gradient is added to ``.grad`` before pass
    2, whose backward all-reduces the sum: one gradient all-reduce per step, as for DPO.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with _no_sync(model):
        e = _embed(model, batch["input_ids"])  # (2B, T, D), attached to the table
        pc, pr = concatenated_logps(model, batch, inputs_embeds=e)
        rc, rr = _refs(ref_c, ref_r, pc)
        l = dpo_loss(pc, pr, rc, rr, cfg.beta)  # (B,)
        with _no_autocast(l):
            g, *p1 = torch.autograd.grad(l.sum(), [e] + params, allow_unused=True)
    g = g.detach()
    pair_sq = _pair_sq_norms(g)
    penalty, metrics = _wdpo_metrics(l, pair_sq, cfg)
    h, c = _fd_coefficients(e, g, batch["attention_mask"], cfg, l.dtype)
    del e  # only g (embedding-sized) stays alive into pass 2
    b = l.shape[0]
    with torch.no_grad():
        w1 = (1.0 - c) * (loss_scale / b)
        for p, gp in zip(params, p1):
            if gp is None:
                continue
            gp.mul_(w1)
            if p.grad is None:
                p.grad = gp
            else:
                p.grad.add_(gp)
    del p1
    e_table = _unwrap(model).get_input_embeddings()(batch["input_ids"])  # fresh lookup, graph 2
    l2 = _perturbed_losses(model, batch, e_table, h, g, rc, rr, cfg)
    with _no_autocast(l2):
        (l2.sum() * (c * (loss_scale / b))).backward()
    loss = (l.mean() + penalty).detach()
    metrics["wdpo/fd_h"] = float(h)
    metrics["loss"] = float(loss)
    metrics.update(_reward_metrics(pc, pr, rc, rr, cfg.beta))
    return loss, metrics


def preference_loss(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""The scalar training loss of ``cfg.method`` on one batch of B pairs.

    With :math:`\ell_i` the DPO loss of pair i (:func:`~drdpo_theory.llm.losses.dpo_loss`):

    * ``dpo``: :math:`\frac1B\sum_i \ell_i`; ``ipo``: the same with the IPO loss.
    * ``kldpo``: :math:`\frac1B\sum_i w_i\ell_i`, w detached
      (:func:`~drdpo_theory.llm.losses.kldpo_weights`, gathered over ranks); for the
      calibrated weights the gradient is Danskin's gradient of the KL-robust batch loss.
    * ``wdpo``: :math:`\frac1B\sum_i[\ell_i + \rho_0\|\nabla_e\ell_i\|^2]` with the
      gradient estimated by double backward or by finite differences (module docstring).
      The value is the exact penalised objective for both estimators.

    Parameters
    ----------
    model : torch.nn.Module
        Hugging Face causal LM (or a DDP / PEFT wrapper of one).
    batch : mapping
        ``input_ids``, ``attention_mask``, ``loss_mask`` of shape (2B, T), chosen rows
        then rejected rows (see :func:`~drdpo_theory.llm.logprobs.concatenated_logps`).
    ref_chosen_logps, ref_rejected_logps : torch.Tensor, shape (B,), or None
        Reference-policy sequence log-probs (detached here); None means 0
        (reference-free).
    cfg : LossConfig

    Returns
    -------
    loss : torch.Tensor, scalar
        Differentiable; ``loss.backward()`` accumulates the method's gradient estimate.
    metrics : dict of str to float
        ``loss``, ``dpo_loss`` (mean base loss), ``rewards/{chosen,rejected,margins,
        accuracies}``, ``logps/{chosen,rejected}``; KLDPO adds ``kldpo/weight_{min,max,
        mean}``, ``kldpo/ess`` (Kish effective sample size of this rank's weights, in
        [1, B]) and ``kldpo/temperature``; WDPO adds ``wdpo/penalty``
        (:math:`\rho_0\frac1B\sum_i\|g_i\|^2`), ``wdpo/grad_emb_norm`` (RMS of
        :math:`\|g_i\|`) and, for finite-diff, ``wdpo/fd_h`` (the step h).

    Notes
    -----
    With ``torch.distributed`` initialised, KLDPO (all-gather of the losses) and WDPO
    finite-diff (all-reduce of two norms) run collectives: every rank must call this.
    """
    if cfg.method == "wdpo":
        if cfg.wdpo_impl == "double-backward" and cfg.rho0 > 0:
            ensure_double_backward_attention(model)
        return _wdpo(model, batch, ref_chosen_logps, ref_rejected_logps, cfg)
    pc, pr = concatenated_logps(model, batch)
    rc, rr = _refs(ref_chosen_logps, ref_rejected_logps, pc)
    if cfg.method == "ipo":
        l = ipo_loss(pc, pr, rc, rr, cfg.beta)
    else:
        l = dpo_loss(pc, pr, rc, rr, cfg.beta)
    metrics: dict[str, float] = {"dpo_loss": float(l.detach().mean())}
    if cfg.method == "kldpo":
        w, temp = kldpo_weights(
            l, tau=cfg.tau, variant=cfg.kldpo_variant, rho=cfg.rho, clamp=cfg.clamp,
            gather=True, return_temperature=True,
        )
        loss = (w.to(l.dtype) * l).mean()
        metrics.update({
            "kldpo/weight_min": float(w.min()),
            "kldpo/weight_max": float(w.max()),
            "kldpo/weight_mean": float(w.mean()),
            "kldpo/ess": effective_sample_size(w),
            "kldpo/temperature": temp,
        })
    else:
        loss = l.mean()
    metrics["loss"] = float(loss.detach())
    metrics.update(_reward_metrics(pc, pr, rc, rr, cfg.beta))
    return loss, metrics


def preference_backward(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    cfg: LossConfig,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""Compute the loss of :func:`preference_loss` and accumulate ``loss_scale`` times its gradient.

    The gradient added to every parameter's ``.grad`` equals that of
    ``(preference_loss(...)[0] * loss_scale).backward()`` (up to rounding). For WDPO
    finite-diff with :math:`\rho_0 > 0` it is computed in two forward-backward passes with
    one graph alive at a time (:func:`_wdpo_two_pass`): no embedding-only backward and no
    second graph held during the first backward, so about 2x the DPO step time and the DPO
    step memory plus one embedding-sized tensor. Every other method: ``preference_loss``
    and one backward.

    Call it with forward-pass settings in force (autocast, DDP ``no_sync`` for
    accumulation micro-steps); the backward passes run with autocast disabled. Under DDP
    (model wrapped in ``DistributedDataParallel``) the two-pass WDPO all-reduces gradients
    once, in its second backward (its first runs in ``no_sync``).

    Parameters
    ----------
    model, batch, ref_chosen_logps, ref_rejected_logps, cfg
        As for :func:`preference_loss`.
    loss_scale : float
        Multiplier of the gradient (e.g. ``1 / grad_accum``); the returned loss is not
        scaled.

    Returns
    -------
    loss : torch.Tensor, scalar, detached
        The value of :func:`preference_loss`.
    metrics : dict of str to float
        As for :func:`preference_loss`.
    """
    if cfg.method == "wdpo" and cfg.wdpo_impl == "finite-diff" and cfg.rho0 > 0:
        return _wdpo_two_pass(model, batch, ref_chosen_logps, ref_rejected_logps, cfg, loss_scale)
    loss, metrics = preference_loss(model, batch, ref_chosen_logps, ref_rejected_logps, cfg)
    with _no_autocast(loss):
        (loss * loss_scale).backward()
    return loss.detach(), metrics
