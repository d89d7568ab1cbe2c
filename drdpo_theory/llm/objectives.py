r"""Preference objectives for causal LMs: DPO, IPO, KLDPO and WDPO (THEORY.md section 5).

:func:`preference_loss` returns a differentiable scalar whose ``.backward()`` gives the
method's gradient estimator, so a trainer (or a TRL ``compute_loss`` override) only calls
``backward``. The per-pair pieces live in :mod:`drdpo_theory.llm.losses`.

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
    :math:`h_i > 0` per pair,

    .. math:: \nabla_\theta\|g_i\|^2 = 2 D_\theta(\nabla_e \ell_i)^{\top} g_i
              \approx \frac{2}{h_i}\big[\nabla_\theta \ell_i(e_i + h_i g_i)
              - \nabla_\theta \ell_i(e_i)\big],

    so backward of :math:`\frac1B\sum_i \ell_i(e_i) + \frac{2\rho_0}{h_i}
    [\ell_i(e_i+h_i g_i) - \ell_i(e_i)]` (e = e(theta) still attached to the embedding
    table in both terms) estimates the penalised gradient with O(h) error, at the cost of
    one extra forward-backward at the perturbed embeddings (all pairs in one batch). The
    step is :math:`h_i = s\,\|e_i\|/\|g_i\|` (s = ``fd_step``, default
    :math:`\sqrt{\epsilon_{mach}}` of the embedding dtype, or of the autocast dtype when
    autocast is on), i.e. the perturbation of pair
    i has norm s times the norm of its embeddings (real tokens): scale-free, and
    independent of how the batch is split across ranks. The step
    :math:`e_i \to e_i + h_i g_i` is also one normalised-gradient ascent step, of length
    :math:`s\|e_i\|`, of the adversary in the Wasserstein inner sup.

Because pairs do not interact in a causal LM (each row attends only to itself),
:math:`\nabla_e\sum_j\ell_j` restricted to the rows of pair i is :math:`\nabla_e\ell_i`,
so one gradient of the batch sum gives every per-pair gradient, and both estimators
target the same quantity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Mapping

import torch

from drdpo_theory.llm.attention import _unwrap, ensure_double_backward_attention
from drdpo_theory.llm.logprobs import concatenated_logps
from drdpo_theory.llm.losses import (
    KLDPO_VARIANTS,
    dpo_loss,
    effective_sample_size,
    implicit_rewards,
    ipo_loss,
    kldpo_weights,
)

__all__ = ["LossConfig", "preference_loss", "METHODS", "WDPO_IMPLS"]

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
            "of pair i has norm fd_step * ||e_i|| (step h_i = fd_step ||e_i|| / ||g_i||). None: sqrt(machine eps) "
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


def _wdpo(model, batch, ref_c, ref_r, cfg: LossConfig):
    e = _embed(model, batch["input_ids"])  # (2B, T, D)
    pc, pr = concatenated_logps(model, batch, inputs_embeds=e)
    rc, rr = _refs(ref_c, ref_r, pc)
    l = dpo_loss(pc, pr, rc, rr, cfg.beta)  # (B,)
    double = cfg.wdpo_impl == "double-backward" and cfg.rho0 > 0
    # g = grad_e sum_i l_i: per-pair blocks are grad_e l_i since pairs do not interact.
    (g,) = torch.autograd.grad(l.sum(), e, create_graph=double, retain_graph=True)  # (2B, T, D)
    pair_sq = _pair_sq_norms(g)  # (B,)
    penalty = cfg.rho0 * pair_sq.mean()
    metrics = {
        "dpo_loss": float(l.detach().mean()),
        "wdpo/penalty": float(penalty.detach()),
        "wdpo/grad_emb_norm": float(pair_sq.detach().mean().sqrt()),  # RMS over pairs of ||g_i||
    }
    if cfg.rho0 == 0:
        loss = l.mean()
    elif double:
        loss = l.mean() + penalty
    else:
        g = g.detach()
        step = cfg.fd_step if cfg.fd_step is not None else _default_fd_step(e)
        mask = batch["attention_mask"].unsqueeze(-1).to(e.dtype)  # (2B, T, 1)
        e_norm = _pair_sq_norms((e.detach() * mask).float()).sqrt()  # (B,) ||e_i|| over real tokens
        g_norm = pair_sq.detach().float().sqrt()  # (B,) ||g_i||
        # per-pair step h_i = step * ||e_i|| / ||g_i||, so ||h_i g_i|| = step * ||e_i||; pairs
        # with g_i = 0 (flat in e) get h_i = 0 and no penalty gradient.
        active = g_norm > 0  # (B,)
        h = torch.where(active, step * e_norm / g_norm.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        h = h.to(e.dtype)  # the step actually applied; 1/h below uses the same rounded value
        h_rows = torch.cat([h, h])[:, None, None]  # (2B, 1, 1)
        pc2, pr2 = concatenated_logps(model, batch, inputs_embeds=e + h_rows * g)
        l2 = dpo_loss(pc2, pr2, rc, rr, cfg.beta)  # (B,) at the perturbed embeddings
        h = h.to(l.dtype)
        inv_h = torch.where(active, 1.0 / torch.where(active, h, 1.0), 0.0)  # (B,)
        surrogate = (l + 2.0 * cfg.rho0 * inv_h * (l2 - l)).mean()
        # value = the exact penalised objective, gradient = the finite-difference estimate
        loss = surrogate + (l.mean() + penalty - surrogate).detach()
        metrics["wdpo/fd_h"] = float(h.mean())
    metrics["loss"] = float(loss.detach())
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
        :math:`\|g_i\|`) and, for finite-diff, ``wdpo/fd_h``.
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
