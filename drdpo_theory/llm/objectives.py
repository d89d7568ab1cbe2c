r"""Preference objectives for causal LMs: DPO, IPO, KLDPO and WDPO (docs/theory.md section 5).

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
input embeddings of pair i (chosen and rejected rows; squared norms summed over both). With
``wdpo_penalty="tuple"`` the norm is that of the gradient in z = (s, a_w, a_l), the prompt s
one input shared by both rows: :math:`\|g_{c,s} + g_{r,s}\|^2 + \|g_{c,a}\|^2 + \|g_{r,a}\|^2`,
and the finite-difference direction is that gradient written on the rows (equal on the
prompt tokens of both); docs/llm_losses.md, "Rows or tuple".
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
    :math:`\frac1B\sum_i (1 - c)\,\ell_i(e) + c\,\ell_i(e + h g)` (e = e(theta) the
    embedding lookup, attached to the table in both terms) estimates the penalised gradient with
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

Engines
-------
The embeddings are never passed as ``inputs_embeds``: the model's forward runs with
``input_ids`` and a forward hook on the input-embedding module reads the lookup output e,
returns :math:`e + hg` in the perturbed forward and records :math:`\nabla_e` through a
tensor hook (:class:`_EmbeddingProbe`), so DDP, FSDP2 and DeepSpeed ZeRO-2/3 run their own
forward and gradient hooks unchanged. Parameter gradients come only from ``backward()``.
Double backward is refused outside a plain module and DDP (:data:`DOUBLE_BACKWARD_ENGINES`).
With dropout active, the two forwards of finite-diff draw the same masks (the RNG state of
the first forward is restored for the second, then advanced as after one forward).

Because pairs do not interact in a causal LM (each row attends only to itself),
:math:`\nabla_e\sum_j\ell_j` restricted to the rows of pair i is :math:`\nabla_e\ell_i`,
so one gradient of the batch sum gives every per-pair gradient, and both estimators
target the same quantity.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields
from typing import Callable, Mapping, Sequence

import torch

from drdpo_theory.llm.attention import _unwrap, ensure_double_backward_attention
from drdpo_theory.llm.distributed import all_reduce_sum_detached
from drdpo_theory.llm.family import (
    BATCH_MEMBERS,
    DEFAULT_GROUP_STEP,
    FAMILY_METHODS,
    GROUP_INITS,
    GROUP_WEIGHTS,
    family_multipliers,
    flip_loss,
)
from drdpo_theory.llm.logprobs import concatenated_logps
from drdpo_theory.llm.losses import (
    KLDPO_VARIANTS,
    WDPO_PENALTIES,
    dpo_loss,
    effective_sample_size,
    implicit_rewards,
    ipo_loss,
    kldpo_weights,
    prompt_alignment,
    wdpo_tuple_cross,
    wdpo_tuple_direction,
)

__all__ = ["LossConfig", "preference_loss", "pair_losses_and_penalties", "preference_backward", "preference_eval", "METHODS", "WDPO_IMPLS", "LogpsFn", "BackwardFn"]

METHODS = ("dpo", "ipo", "kldpo", "wdpo") + FAMILY_METHODS
WDPO_IMPLS = ("double-backward", "finite-diff")

#: ``logps_fn(model, batch) -> (chosen_logps (B,), rejected_logps (B,))``, one forward with ``input_ids``
LogpsFn = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], "tuple[torch.Tensor, torch.Tensor]"]
#: ``backward(t, final) -> float | None``: the engine's backward of scalar t; returns its loss-scale factor
BackwardFn = Callable[[torch.Tensor, bool], "float | None"]


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
    wdpo_penalty: str = field(
        default="rows",
        metadata={
            "help": "WDPO squared gradient norm: 'rows' (chosen and rejected rows as two inputs, ||g_c||^2 + "
            "||g_r||^2, the prompt counted in both) or 'tuple' (z = (s, a_w, a_l) with one shared prompt s: "
            "||g_c,s + g_r,s||^2 + ||g_c,a||^2 + ||g_r,a||^2, the squared norm of the gradient in z)."
        },
    )
    fd_pass2_chunks: int = field(
        default=1,
        metadata={
            "help": "Pair chunks of pass 2 of the two-pass finite-diff WDPO estimator (>= 1; default 1). Pass 2's "
            "loss is a sum over pairs, so chunking it is exact; it holds pass 1's parameter gradient, so its "
            "activations are what WDPO adds to DPO's peak memory, and K chunks cut them K-fold, at the price of "
            "K - 1 more forward-backward passes over the weights (on small batches, where a pass costs about the "
            "same whatever its size, that is K - 1 more passes of time). Used on plain and DDP models without "
            "active dropout (pass 1's masks are replayed for the whole batch); FSDP2 and DeepSpeed run one chunk."
        },
    )
    alpha: float | None = field(
        default=None,
        metadata={"help": "CVaR level alpha in (0, 1] of 'cvardpo' (the worst alpha-fraction of the weighted batch)."},
    )
    eps: float | None = field(
        default=None,
        metadata={"help": "Label-flip rate eps in [0, 0.5) of 'rdpo' (known noise rate) and 'cdpo' (label smoothing)."},
    )
    beta_prime: float = field(
        default=1.0,
        metadata={"help": "Dr.DPO temperature beta' > 0 of 'dr_dpo': -beta' log E_p exp(-l / beta')."},
    )
    group_weights: str = field(
        default="eg",
        metadata={"help": "Group weights of 'groupdpo': 'eg' (online exponentiated gradient of Ramesh et al. 2024, "
                  "state in a GroupEGState) or 'worst' (the exact worst group of each batch)."},
    )
    group_step: float = field(
        default=DEFAULT_GROUP_STEP,
        metadata={"help": "EG step eta_q > 0 of 'groupdpo' with group_weights='eg': q_g <- q_g exp(eta_q L_g)."},
    )
    group_init: str = field(
        default="uniform",
        metadata={"help": "Initial EG group weights: 'uniform' or 'proportional' (to the groups' nominal mass)."},
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
        if isinstance(self.fd_pass2_chunks, bool) or not isinstance(self.fd_pass2_chunks, int) or self.fd_pass2_chunks < 1:
            raise ValueError(f"fd_pass2_chunks must be an integer >= 1, got {self.fd_pass2_chunks!r}")
        if self.wdpo_penalty not in WDPO_PENALTIES:
            raise ValueError(f"wdpo_penalty must be one of {WDPO_PENALTIES}, got {self.wdpo_penalty!r}")
        if self.method == "chi2dpo" and self.rho is None:
            raise ValueError("method='chi2dpo' needs the chi2 radius rho (e.g. rho=0.5)")
        if self.method == "cvardpo" and not (self.alpha is not None and 0.0 < self.alpha <= 1.0):
            raise ValueError(f"method='cvardpo' needs a CVaR level alpha in (0, 1], got {self.alpha!r}")
        if self.method in ("rdpo", "cdpo") and not (self.eps is not None and 0.0 <= self.eps < 0.5):
            raise ValueError(f"method={self.method!r} needs a flip rate eps in [0, 0.5), got {self.eps!r}")
        if not (isinstance(self.beta_prime, (int, float)) and self.beta_prime > 0 and math.isfinite(self.beta_prime)):
            raise ValueError(f"beta_prime must be a finite number > 0, got {self.beta_prime!r}")
        if self.group_weights not in GROUP_WEIGHTS:
            raise ValueError(f"group_weights must be one of {GROUP_WEIGHTS}, got {self.group_weights!r}")
        if not (isinstance(self.group_step, (int, float)) and self.group_step > 0 and math.isfinite(self.group_step)):
            raise ValueError(f"group_step must be a finite number > 0, got {self.group_step!r}")
        if self.group_init not in GROUP_INITS:
            raise ValueError(f"group_init must be one of {GROUP_INITS}, got {self.group_init!r}")

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
        **_logit_metrics(pc, pr),
    }


def _logit_metrics(pc, pr) -> dict[str, float]:
    """TRL's ``logits/chosen`` / ``logits/rejected``: the mean logit over answer tokens and vocabulary.

    Present when the log-probs came from :func:`~drdpo_theory.llm.logprobs.concatenated_logps`
    (it attaches per-row sums and token counts); absent for other ``logps_fn`` (e.g. a fused head).
    """
    out = {}
    for name, t in (("logits/chosen", pc), ("logits/rejected", pr)):
        stats = getattr(t, "logit_stats", None)
        if stats is not None and float(stats[:, 1].sum()) > 0:
            out[name] = float(stats[:, 0].sum() / stats[:, 1].sum())
    return out


def _nominal(batch: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
    """Pair weights v (B,) of the nominal distribution from ``batch["weight"]`` (None: all 1).

    The trainer passes weights with mean 1 over the training set, so the batch mean of
    v_i x_i estimates sum_i p_i x_i without bias; every objective below weighs pair i by v_i.
    """
    v = batch.get("weight") if hasattr(batch, "get") else None
    if v is None:
        return None
    return v.detach().to(device=like.device, dtype=like.dtype)


def _wmean(x: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """(1/B) sum_i v_i x_i; the plain mean for v = None."""
    return x.mean() if v is None else (v * x).mean()


def _wsum(x: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    return x.sum() if v is None else (v * x).sum()


def _refs(ref_c, ref_r, like: torch.Tensor):
    # None: reference-free (log pi_ref = 0 for every sequence)
    ref_c = torch.zeros_like(like) if ref_c is None else ref_c.detach().to(like)
    ref_r = torch.zeros_like(like) if ref_r is None else ref_r.detach().to(like)
    return ref_c, ref_r


def _embedding_module(model: torch.nn.Module) -> torch.nn.Module:
    """The input-embedding module of a Hugging Face model under DDP / DeepSpeed / PEFT wrappers."""
    base = _unwrap(model)
    get = getattr(base, "get_input_embeddings", None)
    if not callable(get) or get() is None:
        raise TypeError(f"WDPO needs a model with get_input_embeddings(); got {type(base).__name__}")
    return get()


class _EmbeddingProbe:
    r"""Forward hook on the input-embedding module: read, perturb and differentiate e.

    The model's own forward runs unchanged with ``input_ids`` (so FSDP2 / DeepSpeed gather
    and shard the embedding table themselves); the hook sees the lookup output
    e (2B, T, D) and

    * ``delta`` given: returns :math:`e + \delta` (``delta`` detached, same shape);
    * ``leaf=True`` or a table without gradient (frozen, e.g. LoRA): returns e detached
      with ``requires_grad`` (a leaf), so that :math:`\nabla_e` exists;
    * ``capture_grad=True``: registers a tensor hook storing :math:`\nabla_e` of the next
      backward in ``self.grad`` (no ``autograd.grad`` on parameters needed).

    ``self.e`` is the tensor the model consumed (before ``delta``). Exactly one embedding
    call per forward is expected (a causal LM embeds its input once).
    """

    def __init__(self, model, delta=None, leaf=False, capture_grad=False):
        self.module = _embedding_module(model)
        self.delta, self.leaf, self.capture_grad = delta, leaf, capture_grad
        self.e = self.grad = None
        self.calls = 0

    def _hook(self, module, args, output):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("the input-embedding module ran twice in one forward; WDPO expects one lookup")
        e = output
        if self.leaf or (not e.requires_grad and (self.capture_grad or self.delta is None)):
            e = e.detach().requires_grad_(True)
        self.e = e
        if self.capture_grad:
            e.register_hook(self._store)
        if self.delta is not None:
            return e + self.delta.to(e.dtype)
        return e

    def _store(self, grad):
        self.grad = grad.detach()

    def __enter__(self):
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def _embed_forward(model, batch, logps_fn, **probe_kw):
    """Sequence log-probs (B,), (B,) from the engine's forward, with the embedding probe in place."""
    with _EmbeddingProbe(model, **probe_kw) as probe:
        pc, pr = logps_fn(model, batch)
    if probe.calls != 1:
        raise RuntimeError(f"expected one call of the input-embedding module in the forward, saw {probe.calls}")
    return pc, pr, probe


def _pair_sq_norms(g: torch.Tensor) -> torch.Tensor:
    """||g_i||^2 per pair: (2B, T, D) -> (B,), chosen row i plus rejected row B+i."""
    sq = g.pow(2).sum(dim=(1, 2))  # (2B,)
    b = sq.shape[0] // 2
    return sq[:b] + sq[b:]


def _penalty_sq_norms(g: torch.Tensor, batch: Mapping[str, torch.Tensor], cfg: LossConfig,
                      alignment=None) -> torch.Tensor:
    """Per-pair squared gradient norm of the penalty, (2B, T, D) -> (B,): rows or tuple (``cfg.wdpo_penalty``).

    ``"rows"``: :func:`_pair_sq_norms`. ``"tuple"``: plus twice the inner product of the two rows'
    gradients over the shared prompt tokens (:func:`~drdpo_theory.llm.losses.wdpo_tuple_cross`).
    """
    sq = _pair_sq_norms(g)
    if cfg.wdpo_penalty == "rows":
        return sq
    index, valid = _prompt_alignment(batch) if alignment is None else alignment
    return sq + 2.0 * wdpo_tuple_cross(g, index.to(g.device), valid.to(g.device))


def _prompt_alignment(batch: Mapping[str, torch.Tensor]):
    return prompt_alignment(batch["attention_mask"], batch["loss_mask"], batch.get("input_ids"))


def _fd_direction(g: torch.Tensor, batch: Mapping[str, torch.Tensor], cfg: LossConfig, alignment=None) -> torch.Tensor:
    """The finite-difference direction: g itself ("rows") or the tuple gradient on the rows ("tuple")."""
    if cfg.wdpo_penalty == "rows":
        return g
    index, valid = _prompt_alignment(batch) if alignment is None else alignment
    return wdpo_tuple_direction(g, index.to(g.device), valid.to(g.device))


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


def _wdpo_metrics(l: torch.Tensor, pair_sq: torch.Tensor, cfg: LossConfig, v: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    penalty = cfg.rho0 * _wmean(pair_sq, v)
    return penalty, {
        "dpo_loss": float(_wmean(l.detach(), v)),
        "wdpo/penalty": float(penalty.detach()),
        "wdpo/grad_emb_norm": float(pair_sq.detach().mean().sqrt()),  # RMS over pairs of ||g_i||
    }


def _engine(model: torch.nn.Module) -> str:
    """'deepspeed', 'fsdp2', 'fsdp1', 'ddp' or 'plain': how parameter gradients are reduced and stored."""
    if any(c.__module__.startswith("deepspeed") for c in type(model).__mro__):
        return "deepspeed"
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3 parameters under another wrapper
        return "deepspeed"
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return "ddp"
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # torch without distributed
        return "plain"
    if isinstance(model, FullyShardedDataParallel):
        return "fsdp1"
    if isinstance(_unwrap(model), FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules()):
        return "fsdp2"
    return "plain"


#: engines whose autograd graph can be differentiated twice (WDPO double-backward)
DOUBLE_BACKWARD_ENGINES = ("plain", "ddp")


def _check_double_backward_engine(model: torch.nn.Module) -> None:
    engine = _engine(model)
    if engine not in DOUBLE_BACKWARD_ENGINES:
        raise ValueError(
            f"WDPO wdpo_impl='double-backward' is not supported under {engine} (its gradient hooks and sharded "
            f"parameters do not survive create_graph=True); use wdpo_impl='finite-diff', which runs two ordinary "
            f"forward-backward passes under every engine (DDP, FSDP2, DeepSpeed ZeRO-2/3)."
        )


class _RNGState:
    """CPU and CUDA RNG states, so that both finite-difference passes draw the same dropout masks."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def pair_losses_and_penalties(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float,
    penalties: Sequence[str] = ("rows", "tuple"),
    *,
    logps_fn: LogpsFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Per-pair DPO losses :math:`\ell_i` and WDPO squared gradient norms, detached (no parameter gradient).

    One forward and one gradient to the input embeddings: ``sq[p][i]`` is the squared norm
    that the WDPO penalty :math:`\rho_0\,\frac1B\sum_i \|\nabla_z \ell_i\|^2` of
    :func:`preference_loss` uses for pair i with ``wdpo_penalty = p`` ("rows" or "tuple",
    docs/llm_losses.md). Used to calibrate radii at a trained policy (``drdpo llm-shift
    --kl-radii/--penalty-fractions``).

    Returns
    -------
    losses : torch.Tensor, shape (B,)
    sq : dict of str to torch.Tensor, shape (B,)
    """
    logps_fn = concatenated_logps if logps_fn is None else logps_fn
    with torch.enable_grad():
        pc, pr, probe = _embed_forward(model, batch, logps_fn, leaf=True)
        rc, rr = _refs(ref_chosen_logps, ref_rejected_logps, pc)
        l = dpo_loss(pc, pr, rc, rr, beta)
        (g,) = torch.autograd.grad(l.sum(), probe.e)  # per-pair blocks: pairs do not interact
    g = g.detach()
    sq = {}
    for pen in penalties:
        sq[pen] = _penalty_sq_norms(g, batch, LossConfig(method="wdpo", beta=beta, wdpo_penalty=pen)).detach()
    return l.detach(), sq


def _wdpo(model, batch, ref_c, ref_r, cfg: LossConfig, logps_fn):
    double = cfg.wdpo_impl == "double-backward" and cfg.rho0 > 0
    rng = _RNGState() if cfg.rho0 > 0 and not double else None
    pc, pr, probe = _embed_forward(model, batch, logps_fn)
    e = probe.e  # (2B, T, D), attached to the table (a leaf if the table is frozen)
    rc, rr = _refs(ref_c, ref_r, pc)
    l = dpo_loss(pc, pr, rc, rr, cfg.beta)  # (B,)
    v = _nominal(batch, l)
    # g = grad_e sum_i l_i: per-pair blocks are grad_e l_i since pairs do not interact.
    (g,) = torch.autograd.grad(l.sum(), e, create_graph=double, retain_graph=True)  # (2B, T, D)
    align = _prompt_alignment(batch) if cfg.wdpo_penalty == "tuple" else None
    pair_sq = _penalty_sq_norms(g, batch, cfg, align)  # (B,)
    penalty, metrics = _wdpo_metrics(l, pair_sq, cfg, v)
    if cfg.rho0 == 0:
        loss = _wmean(l, v)
    elif double:
        loss = _wmean(l, v) + penalty
    else:
        g = g.detach()
        if v is not None:  # pairs of weight 0 are not perturbed (as in the two-pass path): same step h
            g = g * (torch.cat([v, v]) > 0).to(g.dtype)[:, None, None]
        g = _fd_direction(g, batch, cfg, align)
        h, c = _fd_coefficients(e, g, batch["attention_mask"], cfg, l.dtype)
        advanced = _RNGState()
        rng.restore()  # the perturbed forward draws the same dropout masks
        pc2, pr2, _ = _embed_forward(model, batch, logps_fn, delta=h * g)  # at e + h g, table path kept
        advanced.restore()
        l2 = dpo_loss(pc2, pr2, rc, rr, cfg.beta)  # (B,) at the perturbed embeddings
        surrogate = _wmean((1.0 - c) * l + c * l2, v)
        # value = the exact penalised objective, gradient = the finite-difference estimate
        loss = surrogate + (_wmean(l, v) + penalty - surrogate).detach()
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


def _plain_backward(t: torch.Tensor, final: bool) -> None:
    t.backward()
    return None


class _GradInStore:
    r"""Pass-1 weighting for engines whose gradients land in ``p.grad`` (plain, DDP, FSDP2, FSDP1).

    ``begin`` moves the gradients accumulated so far aside; pass 1's backward then leaves
    :math:`P_1` alone in ``.grad`` (DDP: local, pass 1 runs in ``no_sync``; FSDP2: the
    reduce-scattered shard); ``finish(w)`` makes ``.grad = previous + w P_1``.
    """

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def begin(self):
        self.prev = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None

    def finish(self, w1):
        with torch.no_grad():
            for p, prev in zip(self.params, self.prev):
                if p.grad is None:
                    p.grad = prev
                    continue
                p.grad.mul_(w1.to(p.grad.dtype) if torch.is_tensor(w1) else w1)
                if prev is not None:
                    p.grad.add_(prev)
        self.prev = None

    def pass2(self):
        return contextlib.nullcontext()


class _GradByHooks:
    r"""Pass-1 weighting for engines that take gradients away during backward (DeepSpeed ZeRO).

    ZeRO-2/3 reduce each parameter's gradient into their partitions in post-accumulate
    hooks, so ``.grad`` cannot be rescaled afterwards. A tensor hook on every parameter
    (it runs before accumulation, hence before the engine's hooks) keeps :math:`P_1` and
    hands the engine zeros in pass 1; in pass 2 it adds :math:`w P_1` to the incoming
    gradient, so the engine reduces :math:`c P_2 + w P_1` once as one gradient.
    Cost: one parameter-sized buffer per rank between the passes (not sharded).
    """

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.p1: dict[int, torch.Tensor] = {}

    def begin(self):
        def keep(i):
            def hook(grad):
                self.p1[i] = grad.detach().clone() if i not in self.p1 else self.p1[i] + grad.detach()
                return torch.zeros_like(grad)
            return hook

        self.handles = [p.register_hook(keep(i)) for i, p in enumerate(self.params)]

    def finish(self, w1):
        for hnd in self.handles:
            hnd.remove()
        with torch.no_grad():
            for v in self.p1.values():
                v.mul_(w1.to(v.dtype) if torch.is_tensor(w1) else w1)

    @contextlib.contextmanager
    def pass2(self):
        def add(i):
            def hook(grad):
                extra = self.p1.pop(i, None)
                return grad if extra is None else grad + extra.to(grad.dtype)
            return hook

        handles = [p.register_hook(add(i)) for i, p in enumerate(self.params) if i in self.p1]
        try:
            yield
        finally:
            for hnd in handles:
                hnd.remove()
            if self.p1:  # a parameter pass 2 did not reach (unused in the forward): nothing to add to
                raise RuntimeError(f"{len(self.p1)} parameters had a pass-1 gradient but none in pass 2")


def _grad_store(model):
    return _GradByHooks(model) if _engine(model) == "deepspeed" else _GradInStore(model)


def _check_fsdp2_sync(model) -> None:
    """The two-pass estimator reads pass 1's reduce-scattered shard from ``.grad``: FSDP2 must sync."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            state = getattr(m, "_get_fsdp_state", lambda: None)()  # private in torch 2.13; skip if renamed
            group = getattr(state, "_fsdp_param_group", None)
            if group is not None and not getattr(group, "reduce_grads", True):
                raise RuntimeError(
                    "WDPO finite-diff under FSDP2 needs gradient sync in every backward "
                    "(set_requires_gradient_sync(True)): pass 1's gradient is rescaled in its reduced shard"
                )


def _dropout_active(model: torch.nn.Module) -> bool:
    """True when a forward in training mode draws random masks (dropout modules or attention dropout)."""
    if not model.training:
        return False
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        p = getattr(m, "attention_dropout", 0.0)
        if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
            return True
    return False


def _pass2_chunks(model: torch.nn.Module, cfg: LossConfig, b: int) -> int:
    """How many pair chunks pass 2 of :func:`_wdpo_two_pass` runs in (``cfg.fd_pass2_chunks``, see there)."""
    k = min(cfg.fd_pass2_chunks, b)
    if k <= 1 or _engine(model) not in ("plain", "ddp") or _dropout_active(model):
        return 1
    return k


def _pair_rows(batch: Mapping[str, torch.Tensor], idx: torch.Tensor, b: int):
    """The sub-batch of pairs ``idx``: rows ``idx`` (chosen) and ``b + idx`` (rejected) of every
    (2B, ...) tensor, entries ``idx`` of every (B, ...) tensor; returns it and the row index (2k,)."""
    rows = torch.cat([idx, idx + b])
    sub = {}
    for k, t in batch.items():
        if torch.is_tensor(t) and t.dim() >= 1 and t.shape[0] == 2 * b:
            sub[k] = t[rows.to(t.device)]
        elif torch.is_tensor(t) and t.dim() >= 1 and t.shape[0] == b:
            sub[k] = t[idx.to(t.device)]
        else:
            sub[k] = t
    return sub, rows


def _lookup_by_hand(model: torch.nn.Module) -> torch.nn.Embedding | None:
    r"""The trained ``nn.Embedding`` whose lookup gradient pass 2 of :func:`_wdpo_two_pass` adds by hand, or None.

    In pass 2 ``.grad`` already holds pass 1's gradient, so autograd accumulates every new
    term in place, except that the table's terms wait for each other: a tied table's head
    term (V, D) is computed first and held until the lookup term arrives at the very end
    of the backward (an untied one's lookup term is a dense (V, D) tensor built there).
    Cutting the lookup's gradient path (the probe's leaf) and adding
    :math:`\sum_{t: \text{id}_t = v} \partial/\partial e_t` to row v of ``W.grad`` afterwards
    (``index_add_``) removes that (V, D) buffer from pass 2's peak. One process only (a
    hand-made addition would bypass DDP's all-reduce and FSDP2's / ZeRO's sharding), and
    only for the plain lookup (no ``max_norm``, ``scale_grad_by_freq`` or subclass forward).
    """
    if _engine(model) != "plain":
        return None
    emb = _embedding_module(model)
    if not isinstance(emb, torch.nn.Embedding) or type(emb).forward is not torch.nn.Embedding.forward:
        return None
    if emb.max_norm is not None or emb.scale_grad_by_freq or not emb.weight.requires_grad:
        return None
    return emb


def _add_lookup_grad(emb: torch.nn.Embedding, input_ids: torch.Tensor, grad_e: torch.Tensor) -> None:
    """``emb.weight.grad[v] += sum of grad_e at the positions holding token v`` (padding_idx rows excluded)."""
    ids = input_ids.reshape(-1).to(emb.weight.device)
    rows = grad_e.reshape(ids.shape[0], -1)
    if emb.padding_idx is not None:
        keep = ids != emb.padding_idx
        ids, rows = ids[keep], rows[keep]
    with torch.no_grad():
        if emb.weight.grad is None:
            emb.weight.grad = torch.zeros_like(emb.weight)
        emb.weight.grad.index_add_(0, ids, rows.to(emb.weight.grad.dtype))


def _wdpo_two_pass(model, batch, ref_c, ref_r, cfg: LossConfig, loss_scale: float, logps_fn, backward):
    r"""WDPO finite-diff as two forward-backward passes, one graph alive at a time.

    Accumulates ``loss_scale`` times the gradient of the surrogate of :func:`_wdpo`,
    :math:`\frac1B\sum_i (1-c)\ell_i(e) + c\,\ell_i(e + hg)`:

    1. forward at e (the engine's own forward; the embedding output is probed by a forward
       hook); one ``backward`` of :math:`\text{loss\_scale}/B\cdot\sum_i\ell_i(e)` gives
       g (tensor hook on e) and :math:`P_1` (graph 1 freed); h, c from g; the engine's
       gradient becomes previous :math:`+ (1-c) P_1` (:class:`_GradInStore` or
       :class:`_GradByHooks`);
    2. forward at :math:`E(\text{ids}) + hg` (the hook adds the detached :math:`hg`, the
       embedding table keeps its gradient path; one process: the lookup's term is added to
       the table's ``.grad`` by hand, :func:`_lookup_by_hand`), with the RNG state of pass 1
       (same dropout masks); ``backward`` of :math:`\text{loss\_scale}\,c/B\cdot\sum_i\ell_i(e+hg)`,
       in ``cfg.fd_pass2_chunks`` pair chunks (:func:`_pass2_chunks`): pass 2 holds pass 1's
       gradient, so its activations are what the estimator adds to DPO's peak memory.

    ``backward(t, final)`` runs the engine's backward (``final`` is True for pass 2, the
    last backward of this micro-batch). Under DDP pass 1 runs in ``no_sync``: one gradient
    all-reduce per step, as for DPO. Under FSDP2 both passes reduce-scatter; under DeepSpeed
    pass 1 hands the engine zero gradients and pass 2 the combined one.
    """
    engine = _engine(model)
    if engine == "fsdp2":
        _check_fsdp2_sync(model)
        # a preceding no-grad forward (reference, eval) leaves the root's parameters gathered; a backward
        # started from that state did not reduce-scatter the root's gradients before pass 2 (measured:
        # embedding/norm/head gradients of pass 1 missing), so reshard first
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
    store = _grad_store(model)
    rng = _RNGState()
    store.begin()
    with _no_sync(model):
        pc, pr, probe = _embed_forward(model, batch, logps_fn, capture_grad=True)
        rc, rr = _refs(ref_c, ref_r, pc)
        l = dpo_loss(pc, pr, rc, rr, cfg.beta)  # (B,)
        v = _nominal(batch, l)
        b = l.shape[0]
        with _no_autocast(l):
            factor = backward(_wsum(l, v) * (loss_scale / b), False)
    e = probe.e.detach()
    g = probe.grad
    if g is None:
        raise RuntimeError("no gradient reached the input embeddings in pass 1 of WDPO finite-diff")
    scale = (loss_scale / b) * (1.0 if factor is None else float(factor))
    if scale != 1.0:
        g = g / scale  # grad_e sum_i v_i l_i (the backward carried loss_scale / B and the engine's loss scale)
    if v is not None:  # rows of pair i carry v_i: divide it out (pairs of weight 0 get g_i = 0)
        vr = torch.cat([v, v]).to(g.dtype)  # (2B,), chosen rows then rejected rows
        g = torch.where(vr[:, None, None] > 0, g / torch.where(vr > 0, vr, 1.0)[:, None, None], 0.0)
    align = _prompt_alignment(batch) if cfg.wdpo_penalty == "tuple" else None
    pair_sq = _penalty_sq_norms(g, batch, cfg, align)
    penalty, metrics = _wdpo_metrics(l.detach(), pair_sq, cfg, v)
    g = _fd_direction(g, batch, cfg, align)  # "tuple": equal on the shared prompt tokens of both rows
    h, c = _fd_coefficients(e, g, batch["attention_mask"], cfg, l.dtype)
    del e, probe  # only g (embedding-sized) stays alive into pass 2
    store.finish(1.0 - c)
    advanced = _RNGState()
    rng.restore()  # pass 2 draws the dropout masks of pass 1
    chunks = _pass2_chunks(model, cfg, b)
    lookup = _lookup_by_hand(model)
    by_hand = dict(leaf=True, capture_grad=True) if lookup is not None else {}  # the probe hands over grad_e
    with store.pass2():
        for j, idx in enumerate(torch.arange(b, device=l.device).chunk(chunks)):
            last = j == chunks - 1
            sub, rows = (batch, slice(None)) if chunks == 1 else _pair_rows(batch, idx, b)
            vj = v if v is None or chunks == 1 else v[idx]
            rcj, rrj = (rc, rr) if chunks == 1 else (rc[idx], rr[idx])
            # pass 2's loss is a sum over pairs: one chunk's backward adds that chunk's terms (DDP: no
            # all-reduce before the last chunk)
            with contextlib.nullcontext() if last else _no_sync(model):
                pc2, pr2, probe2 = _embed_forward(model, sub, logps_fn, delta=h * g[rows], **by_hand)
                l2 = dpo_loss(pc2, pr2, rcj, rrj, cfg.beta)
                with _no_autocast(l2):
                    backward(_wsum(l2, vj) * (c * (loss_scale / b)), last)
                if lookup is not None:
                    if probe2.grad is None:
                        raise RuntimeError("no gradient reached the input embeddings in pass 2 of WDPO finite-diff")
                    _add_lookup_grad(lookup, sub["input_ids"], probe2.grad)
            del pc2, pr2, l2, probe2
    advanced.restore()  # the RNG continues as after one forward
    loss = (_wmean(l.detach(), v) + penalty).detach()
    metrics["wdpo/fd_h"] = float(h)
    metrics["loss"] = float(loss)
    metrics.update(_reward_metrics(pc, pr, rc, rr, cfg.beta))
    return loss, metrics


def _family(batch, pc, pr, rc, rr, cfg: LossConfig, group_state=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The robust family's members (drdpo_theory.llm.family; docs/theory_family.md).

    ``group_state``: the :class:`~drdpo_theory.llm.family.GroupEGState` of ``groupdpo`` with
    ``group_weights='eg'`` (updated here once, unless it is a frozen view).
    """
    l = dpo_loss(pc, pr, rc, rr, cfg.beta)  # (B,)
    v = _nominal(batch, l)
    metrics: dict[str, float] = {"dpo_loss": float(_wmean(l.detach(), v))}
    if cfg.method in BATCH_MEMBERS:
        m, value, info = family_multipliers(
            l, cfg.method, rho=cfg.rho, alpha=cfg.alpha, beta_prime=cfg.beta_prime,
            groups=batch.get("group"), weights=v, group_weights=cfg.group_weights, group_state=group_state,
        )
        surrogate = (m.to(l.dtype) * l).mean()
        # value: the robust batch objective (exact); gradient: sum_i q*_i grad l_i (Danskin)
        loss = surrogate + (torch.as_tensor(value, dtype=l.dtype, device=l.device) - surrogate).detach()
        metrics[f"{cfg.method}/weight_max"] = float(m.max())
        metrics.update({f"{cfg.method}/{k}": float(x) for k, x in info.items()})
    else:
        r_c, r_r = implicit_rewards(pc, pr, rc, rr, cfg.beta)
        loss = _wmean(flip_loss(r_c - r_r, cfg.method, float(cfg.eps)), v)
    metrics["loss"] = float(loss.detach())
    metrics.update(_reward_metrics(pc, pr, rc, rr, cfg.beta))
    return loss, metrics


def preference_loss(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    cfg: LossConfig,
    *,
    logps_fn: LogpsFn | None = None,
    group_state=None,
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
    logps_fn : callable, optional
        ``logps_fn(model, batch) -> (chosen (B,), rejected (B,))`` sequence log-probs from
        one forward of the model with ``input_ids`` (default
        :func:`~drdpo_theory.llm.logprobs.concatenated_logps`; the TRL adapter passes TRL's
        fused LM head). WDPO reads and perturbs the input embeddings through a forward hook
        on the embedding module, so any forward that embeds ``input_ids`` once works.
    group_state : drdpo_theory.llm.family.GroupEGState, optional
        ``groupdpo`` with ``cfg.group_weights='eg'`` (required there): the online group weights,
        updated once by this call from the batch's group losses (docs/theory_family.md).
        :func:`preference_backward` passes it on; :func:`preference_eval` uses a frozen copy.

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
    logps_fn = concatenated_logps if logps_fn is None else logps_fn
    if cfg.method == "wdpo":
        if cfg.wdpo_impl == "double-backward" and cfg.rho0 > 0:
            _check_double_backward_engine(model)
            ensure_double_backward_attention(model)
        return _wdpo(model, batch, ref_chosen_logps, ref_rejected_logps, cfg, logps_fn)
    pc, pr = logps_fn(model, batch)
    rc, rr = _refs(ref_chosen_logps, ref_rejected_logps, pc)
    if cfg.method in FAMILY_METHODS:
        return _family(batch, pc, pr, rc, rr, cfg, group_state)
    if cfg.method == "ipo":
        l = ipo_loss(pc, pr, rc, rr, cfg.beta)
    else:
        l = dpo_loss(pc, pr, rc, rr, cfg.beta)
    v = _nominal(batch, l)
    metrics: dict[str, float] = {"dpo_loss": float(_wmean(l.detach(), v))}
    if cfg.method == "kldpo":
        # the ball is around the weighted data: the multipliers w already include v
        w, temp = kldpo_weights(
            l, tau=cfg.tau, variant=cfg.kldpo_variant, rho=cfg.rho, clamp=cfg.clamp,
            gather=True, return_temperature=True, weights=v,
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
        loss = _wmean(l, v)
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
    *,
    logps_fn: LogpsFn | None = None,
    backward: BackwardFn | None = None,
    group_state=None,
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
    accumulation micro-steps); the backward passes run with autocast disabled. The model
    may be a plain module, DDP, FSDP2 (``fully_shard``) or a DeepSpeed ZeRO-2/3 engine:
    the two-pass WDPO only calls the model's forward with ``input_ids`` and ordinary
    backward passes, and weights pass 1's gradient where the engine keeps it (DDP: one
    all-reduce, in the second backward, the first runs in ``no_sync``; FSDP2: on the
    reduce-scattered shards; DeepSpeed: through parameter hooks, see
    :class:`_GradByHooks`). With dropout active both passes draw the same masks.
    Gradient checkpointing (reentrant or not) is supported.

    Parameters
    ----------
    model, batch, ref_chosen_logps, ref_rejected_logps, cfg
        As for :func:`preference_loss`.
    loss_scale : float
        Multiplier of the gradient (e.g. ``1 / grad_accum``); the returned loss is not
        scaled.
    logps_fn : callable, optional
        As for :func:`preference_loss`.
    backward : callable, optional
        ``backward(t, final) -> float | None`` runs the engine's backward of the scalar t
        (default ``t.backward()``; the TRL adapter passes ``accelerator.backward``, and
        DeepSpeed's ``engine.backward`` without an optimizer step when ``final`` is False).
        ``final`` is True for the last backward of this call. It returns the factor by
        which the engine multiplied t before differentiating (a dynamic fp16 loss scale;
        None means 1), so that WDPO reads the true embedding gradient.

    Returns
    -------
    loss : torch.Tensor, scalar, detached
        The value of :func:`preference_loss`.
    metrics : dict of str to float
        As for :func:`preference_loss`.
    """
    logps_fn = concatenated_logps if logps_fn is None else logps_fn
    backward = _plain_backward if backward is None else backward
    if cfg.method == "wdpo" and cfg.wdpo_impl == "finite-diff" and cfg.rho0 > 0:
        return _wdpo_two_pass(model, batch, ref_chosen_logps, ref_rejected_logps, cfg, loss_scale, logps_fn, backward)
    loss, metrics = preference_loss(model, batch, ref_chosen_logps, ref_rejected_logps, cfg, logps_fn=logps_fn,
                                    group_state=group_state)
    with _no_autocast(loss):
        backward(loss * loss_scale, True)
    return loss.detach(), metrics


def preference_eval(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    cfg: LossConfig,
    *,
    logps_fn: LogpsFn | None = None,
    group_state=None,
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""The value of :func:`preference_loss` without parameter gradients (evaluation).

    DPO, IPO, KLDPO: one forward under ``torch.no_grad``. WDPO (either estimator): the
    penalised objective :math:`\frac1B\sum_i[\ell_i + \rho_0\|\nabla_e\ell_i\|^2]` needs
    the embedding gradient, so gradients are enabled for one forward whose embeddings are
    a leaf (the hook detaches them) and ``torch.autograd.grad`` is taken with respect to
    that leaf only: no parameter receives a gradient and no engine gradient hook fires.
    Safe to call inside ``torch.no_grad`` (TRL's evaluation loop).

    Returns
    -------
    loss : torch.Tensor, scalar, detached
    metrics : dict of str to float
        As for :func:`preference_loss` (WDPO without ``wdpo/fd_h``).
    """
    logps_fn = concatenated_logps if logps_fn is None else logps_fn
    if cfg.method != "wdpo":
        with torch.no_grad():
            loss, metrics = preference_loss(model, batch, ref_chosen_logps, ref_rejected_logps, cfg, logps_fn=logps_fn,
                                            group_state=None if group_state is None else group_state.frozen())
        return loss.detach(), metrics
    with torch.enable_grad():
        pc, pr, probe = _embed_forward(model, batch, logps_fn, leaf=True)
        rc, rr = _refs(ref_chosen_logps, ref_rejected_logps, pc)
        l = dpo_loss(pc, pr, rc, rr, cfg.beta)  # (B,)
        (g,) = torch.autograd.grad(l.sum(), probe.e)  # (2B, T, D): with respect to the leaf e only
    v = _nominal(batch, l)  # pair weights, as in preference_loss
    pair_sq = _penalty_sq_norms(g, batch, cfg)
    penalty, metrics = _wdpo_metrics(l.detach(), pair_sq, cfg, v)
    loss = (_wmean(l.detach(), v) + penalty).detach()
    metrics["loss"] = float(loss)
    metrics.update(_reward_metrics(pc, pr, rc, rr, cfg.beta))
    return loss, metrics
