r"""Per-pair preference losses on sequence log-probabilities, and the KLDPO weights.

Every loss is a pure function of four per-sequence log-probabilities of shape ``(B,)``
(policy chosen, policy rejected, reference chosen, reference rejected) and returns one
value per pair, shape ``(B,)``; the caller reduces (docs/theory.md section 1; docs/llm_losses.md, "Notation").

With :math:`\pi_c = \log\pi_\theta(a_w|s)`, :math:`\pi_r = \log\pi_\theta(a_l|s)` and
:math:`\rho_c, \rho_r` the same under :math:`\pi_{ref}`, the implicit reward margin is

.. math:: h = (\pi_c - \rho_c) - (\pi_r - \rho_r),

the quantity :math:`h_\theta(s, a_1, a_2)` of docs/theory.md section 1 with :math:`y = 1`
(the chosen answer is :math:`a_1`). For the log-linear policy of docs/theory.md section 2,
:math:`h = (\theta - \theta_{ref})\cdot x`.

:func:`kldpo_weights` gives the mini-batch weights of the paper's scalable KLDPO
(docs/theory.md sections 3.1 and 5): the authors' clamped exponential weights, their normalised
(softmax) form, and the exact worst-case weights of the KL ball on the batch.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from drdpo_theory.llm import distributed as _dist

__all__ = [
    "implicit_rewards",
    "reward_margins",
    "dpo_loss",
    "ipo_loss",
    "kl_dual_temperature",
    "kldpo_weights",
    "effective_sample_size",
    "WDPO_PENALTIES",
    "prompt_alignment",
    "wdpo_tuple_cross",
    "wdpo_tuple_direction",
]

KLDPOVariant = Literal["clamped", "normalized", "calibrated"]
KLDPO_VARIANTS = ("clamped", "normalized", "calibrated")
WDPO_PENALTIES = ("rows", "tuple")
"""What WDPO's squared gradient norm treats as the input (docs/llm_losses.md, "Rows or tuple"):
``"rows"`` the chosen and rejected rows as two inputs (the prompt counted twice, independently),
``"tuple"`` the preference tuple z = (s, a_w, a_l) with its prompt s one shared input."""


def implicit_rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Implicit DPO rewards of the chosen and rejected answers.

    .. math:: r_c = \beta(\pi_c - \rho_c), \qquad r_r = \beta(\pi_r - \rho_r).

    Parameters
    ----------
    policy_chosen_logps, policy_rejected_logps : torch.Tensor, shape (B,)
        Sequence log-probabilities :math:`\pi_c, \pi_r` under the policy.
    ref_chosen_logps, ref_rejected_logps : torch.Tensor, shape (B,)
        The same under the reference policy, :math:`\rho_c, \rho_r`.
    beta : float
        KL-regularisation strength :math:`\beta > 0`.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``(r_c, r_r)``, each of shape (B,), differentiable in the policy log-probs.
    """
    return (
        beta * (policy_chosen_logps - ref_chosen_logps),
        beta * (policy_rejected_logps - ref_rejected_logps),
    )


def reward_margins(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    r"""Scaled implicit reward margin :math:`\beta h`, shape (B,).

    .. math:: \beta h = \beta\big[(\pi_c - \rho_c) - (\pi_r - \rho_r)\big]
              = r_c - r_r.

    Parameters are as in :func:`implicit_rewards`. For the log-linear policy of
    docs/theory.md section 2 this is :math:`\beta(\theta - \theta_{ref})\cdot x`.
    """
    r_c, r_r = implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return r_c - r_r


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    r"""Per-pair DPO loss (docs/theory.md section 1 with :math:`y = 1`).

    .. math:: \ell = -\log\sigma(\beta h) = \log\big(1 + e^{-\beta h}\big),

    with :math:`h` the reward margin of :func:`reward_margins` (divided by beta).

    Parameters
    ----------
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps : torch.Tensor, shape (B,)
        Sequence log-probabilities (see :func:`implicit_rewards`).
    beta : float
        :math:`\beta > 0`.

    Returns
    -------
    torch.Tensor, shape (B,)
        :math:`\ell_i \ge 0`, not reduced.
    """
    m = reward_margins(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    # logsigmoid is the stable form: log(1+e^{-m}) = softplus(-m), no overflow for m << 0.
    return -F.logsigmoid(m)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    r"""Per-pair IPO loss (Azar et al. 2023, eq. 17, with :math:`\tau = \beta`).

    .. math:: \ell = \Big(h - \frac{1}{2\beta}\Big)^2,

    with :math:`h` the unscaled margin :math:`(\pi_c - \rho_c) - (\pi_r - \rho_r)`.
    The function uses the log-probs it is given (sums over answer tokens from
    :func:`drdpo_theory.llm.logprobs.sequence_logps`; TRL divides them by the answer
    length first, which a caller may do before calling this).

    Returns
    -------
    torch.Tensor, shape (B,)
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return (h - 1.0 / (2.0 * beta)) ** 2


def effective_sample_size(weights: torch.Tensor) -> float:
    r"""Kish effective sample size :math:`(\sum_i w_i)^2 / \sum_i w_i^2` of weights (B,).

    Equals B for equal weights and 1 when one weight carries all the mass.
    """
    w = weights.detach().double()
    return float(w.sum() ** 2 / (w**2).sum())


def _kl_to_uniform(t: float, z: np.ndarray) -> float:
    """KL(q_t || uniform) for q_t = softmax(t z), z of shape (N,)."""
    a = t * z
    a = a - a.max()
    lse = math.log(np.exp(a).sum())
    logq = a - lse
    return float((np.exp(logq) * logq).sum() + math.log(z.size))


def kl_dual_temperature(losses: torch.Tensor | np.ndarray, rho: float) -> float:
    r"""Optimal dual temperature :math:`\lambda^*` of the KL-DRO problem on a batch.

    Solves the one-dimensional convex dual of docs/theory.md section 3.1 (KLDPO) for the
    empirical distribution of the N losses,

    .. math:: \lambda^* = \arg\min_{\lambda > 0}\;
              \lambda\rho + \lambda \log \frac1N \sum_{i=1}^N e^{\ell_i/\lambda}.

    Its derivative is :math:`\rho - \mathrm{KL}(q_\lambda \| u)` with
    :math:`q_\lambda = \mathrm{softmax}(\ell/\lambda)` and u uniform, and
    :math:`\mathrm{KL}(q_\lambda\|u)` decreases from :math:`\log(N/k)` (k = number of
    losses equal to the maximum) at :math:`\lambda \to 0` to 0 at :math:`\lambda\to\infty`.
    Hence:

    * ``rho == 0`` or all losses equal: :math:`\lambda^* = \infty` (uniform weights);
    * ``rho >= log(N/k)``: the constraint is inactive, :math:`\lambda^* = 0` and the
      worst case puts mass 1/k on each maximal loss;
    * otherwise :math:`\lambda^*` is the unique root of
      :math:`\mathrm{KL}(q_\lambda\|u) = \rho`, found here by bisection on
      :math:`\log(1/\lambda)` in float64 to relative precision 1e-14.

    Parameters
    ----------
    losses : torch.Tensor or numpy.ndarray, shape (N,)
        The losses (detached internally).
    rho : float
        KL radius :math:`\rho \ge 0`.

    Returns
    -------
    float
        :math:`\lambda^* \in [0, \infty]`.
    """
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    if isinstance(losses, torch.Tensor):
        losses = losses.detach().to("cpu", torch.float64).numpy()
    l = np.asarray(losses, dtype=np.float64).ravel()
    n = l.size
    if n == 0:
        raise ValueError("losses is empty")
    if not np.all(np.isfinite(l)):
        raise ValueError("losses contain NaN or inf")
    l_max, l_min = float(l.max()), float(l.min())
    if rho == 0.0 or l_max == l_min:
        return math.inf
    k = int((l == l_max).sum())
    if rho >= math.log(n / k):
        return 0.0
    spread = l_max - l_min
    z = (l - l_max) / spread  # in [-1, 0]; q_t = softmax(t z) with t = spread / lam
    # KL(t) is increasing in t: bracket the root by doubling / halving, then bisect log t.
    t_lo, t_hi = 1.0, 1.0
    while _kl_to_uniform(t_lo, z) >= rho:
        t_lo /= 2.0
        if t_lo < 1e-300:  # rho below float resolution of KL: effectively lam = inf
            return math.inf
    while _kl_to_uniform(t_hi, z) < rho:
        t_hi *= 2.0
        if t_hi > 1e300:  # near-ties at the max: numerically the lam -> 0 limit
            return 0.0
    lo, hi = math.log(t_lo), math.log(t_hi)
    while hi - lo > 1e-14 * max(1.0, abs(hi)):
        mid = 0.5 * (lo + hi)
        if _kl_to_uniform(math.exp(mid), z) < rho:
            lo = mid
        else:
            hi = mid
    t_star = math.exp(0.5 * (lo + hi))
    return spread / t_star


def _worst_case_weights(l: torch.Tensor, lam: float) -> torch.Tensor:
    """N * q for q the KL worst case at temperature lam (lam in [0, inf]); l shape (N,)."""
    n = l.numel()
    if math.isinf(lam):
        return torch.ones_like(l)
    if lam == 0.0:
        top = (l == l.max()).to(l.dtype)
        return top * (n / top.sum())
    return torch.softmax(l / lam, dim=0) * n


def kldpo_weights(
    losses: torch.Tensor,
    tau: float | None = None,
    variant: KLDPOVariant = "clamped",
    rho: float | None = None,
    clamp: float | None = 10.0,
    gather: bool = True,
    return_temperature: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, float]:
    r"""Detached per-pair KLDPO weights; the KLDPO loss is ``(weights * losses).mean()``.

    With :math:`\ell_1..\ell_N` the losses of the (global) batch:

    ``"clamped"`` (the authors' code, docs/theory.md section 5)
        :math:`w_i = \min\{\exp((\ell_i - \bar\ell)/\tau),\ c\}`, :math:`\bar\ell`
        the batch mean, c = ``clamp``. Not normalised: the mean weight is >= 1 by
        Jensen (before clamping), which inflates the gradient norm.
    ``"normalized"``
        :math:`w_i = N\,\mathrm{softmax}(\ell/\tau)_i`, mean weight exactly 1, so that
        :math:`\frac1N\sum_i w_i\ell_i = E_{q}\ell` with :math:`q \propto e^{\ell/\tau}`,
        the worst case of a KL ball whose radius is set implicitly by :math:`\tau`.
    ``"calibrated"``
        :math:`w_i = N\,\mathrm{softmax}(\ell/\lambda^*)_i` with :math:`\lambda^*` from
        :func:`kl_dual_temperature` for radius ``rho``: the exact worst case
        :math:`q^* = \arg\max_{\mathrm{KL}(q\|u)\le\rho} \sum_i q_i\ell_i` on the batch
        (docs/theory.md section 3.1), so that by Danskin the weighted-mean gradient is the
        gradient of the robust batch loss. Limits: :math:`\lambda^* = \infty` gives
        ones; :math:`\lambda^* = 0` gives N/k on the k maximal losses.

    Parameters
    ----------
    losses : torch.Tensor, shape (B,)
        This rank's per-pair losses (detached internally; no gradient flows through
        the weights).
    tau : float, optional
        Temperature :math:`\tau > 0`; required for "clamped" and "normalized".
    variant : {"clamped", "normalized", "calibrated"}
    rho : float, optional
        KL radius :math:`\rho \ge 0`; required for "calibrated".
    clamp : float or None
        Upper clamp c of the "clamped" variant (None: no clamp). Ignored otherwise.
    gather : bool
        With ``torch.distributed`` initialised, compute the mean / softmax / dual on
        the losses of all ranks (``all_gather`` of the detached losses, variable B per
        rank allowed) and return the weights of this rank's rows. Without a process
        group (or ``gather=False``) the local batch is the whole batch.
    return_temperature : bool
        Also return the temperature used (tau, or :math:`\lambda^*`).
    weights : torch.Tensor, shape (B,), optional
        Nominal pair weights v >= 0 (the data's ``weight``; None: all 1). The ball is then
        around the weighted batch :math:`p \propto v` and the returned multipliers include v,
        so that ``(weights_out * losses).mean()`` is still the loss: "clamped"
        :math:`v_i\min\{e^{(\ell_i - \bar\ell_v)/\tau}, c\}` with the v-weighted mean
        :math:`\bar\ell_v`; "normalized" :math:`N q_i`, :math:`q \propto v e^{\ell/\tau}`;
        "calibrated" :math:`N q^*_i` with :math:`q^*` the exact worst case over
        :math:`\{q: KL(q\|p) \le \rho\}` (``drdpo_theory.solvers.kl.kl_inner``).

    Returns
    -------
    torch.Tensor, shape (B,)
        Detached weights, dtype float32 or float64 (float64 if the losses are).
    float, optional
        The temperature, when ``return_temperature``.
    """
    if variant not in KLDPO_VARIANTS:
        raise ValueError(f"variant must be one of {KLDPO_VARIANTS}, got {variant!r}")
    if variant in ("clamped", "normalized") and (tau is None or not tau > 0):
        raise ValueError(f"variant {variant!r} needs tau > 0, got tau={tau}")
    if variant == "calibrated" and (rho is None or not rho >= 0):
        raise ValueError(f"variant 'calibrated' needs rho >= 0, got rho={rho}")
    if losses.ndim != 1:
        raise ValueError(f"losses must have shape (B,), got {tuple(losses.shape)}")
    local = losses.detach()
    local = local.to(torch.float64 if local.dtype == torch.float64 else torch.float32)
    if weights is not None:
        wv = weights.detach().to(local)
        if wv.shape != local.shape:
            raise ValueError(f"weights must have the shape of losses {tuple(local.shape)}, got {tuple(wv.shape)}")
        local = torch.stack([local, wv], dim=1)  # (B, 2): losses and nominal weights travel together
    if gather and _dist.is_distributed():
        parts = _dist.all_gather_detached(local)
        offset = sum(p.shape[0] for p in parts[: _dist.rank()])
        all_l = torch.cat(parts)  # (N,) (or (N, 2)) = all ranks, rank order
    else:
        offset = 0
        all_l = local
    if weights is not None:
        all_l, all_v = all_l[:, 0], all_l[:, 1]
        n = all_l.numel()
        if not all_v.sum() > 0:
            w = torch.zeros_like(all_l)
            temp = float(tau) if tau is not None else math.inf
        elif variant == "clamped":
            mean_v = (all_v * all_l).sum() / all_v.sum()
            w = torch.exp((all_l - mean_v) / tau)
            if clamp is not None:
                w = w.clamp(max=clamp)
            w = all_v * w
            temp = float(tau)
        elif variant == "normalized":
            w = torch.softmax(all_l / tau + torch.log(all_v), dim=0) * n
            temp = float(tau)
        else:
            from drdpo_theory.solvers.kl import kl_inner

            l_np = all_l.cpu().double().numpy()
            v_np = all_v.cpu().double().numpy()
            inner = kl_inner(l_np, v_np / v_np.sum(), float(rho))
            w = torch.as_tensor(inner.q * n, dtype=all_l.dtype, device=all_l.device)
            temp = float(inner.lam)
        w = w[offset : offset + losses.shape[0]]
        return (w, temp) if return_temperature else w
    n = all_l.numel()
    if variant == "clamped":
        w = torch.exp((all_l - all_l.mean()) / tau)
        if clamp is not None:
            w = w.clamp(max=clamp)
        temp = float(tau)
    elif variant == "normalized":
        w = torch.softmax(all_l / tau, dim=0) * n
        temp = float(tau)
    else:
        temp = kl_dual_temperature(all_l, float(rho))
        w = _worst_case_weights(all_l, temp)
    w = w[offset : offset + local.shape[0]]
    return (w, temp) if return_temperature else w


# --------------------------------------------------------------------------- WDPO: rows or tuple


def prompt_alignment(
    attention_mask: torch.Tensor, loss_mask: torch.Tensor, input_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Positions of each pair's shared prompt tokens in its chosen and rejected rows.

    The prompt of a row is its real tokens (``attention_mask`` 1) before its first answer
    token (``loss_mask`` 1), so left padding, right padding and a prompt that starts at
    another offset in the two rows are all handled: the k-th prompt token of chosen row i is
    paired with the k-th prompt token of rejected row B+i.

    Parameters
    ----------
    attention_mask, loss_mask : torch.Tensor, shape (2B, T)
        Rows ``0..B-1`` chosen, ``B..2B-1`` rejected (the batch layout of
        :func:`drdpo_theory.llm.logprobs.concatenated_logps`).
    input_ids : torch.Tensor, shape (2B, T), optional
        When given, the two rows of every pair must hold the same prompt token ids.

    Returns
    -------
    index : torch.Tensor, shape (2B, T), long
        ``index[r, k]`` the position of the k-th prompt token of row r for ``k < n_r``
        (then the row's other positions, unused).
    valid : torch.Tensor, shape (B, T), bool
        ``valid[i, k]`` is True for ``k < n_i``, the prompt length of pair i.

    Raises
    ------
    ValueError
        If the two rows of a pair have prompts of different lengths or (with
        ``input_ids``) different tokens: they do not share one prompt.
    """
    if attention_mask.shape != loss_mask.shape or attention_mask.ndim != 2 or attention_mask.shape[0] % 2:
        raise ValueError(
            f"attention_mask and loss_mask must have the same shape (2B, T); got {tuple(attention_mask.shape)} "
            f"and {tuple(loss_mask.shape)}"
        )
    b = attention_mask.shape[0] // 2
    t = attention_mask.shape[1]
    prompt = (attention_mask > 0) & (loss_mask.long().cumsum(dim=1) == 0)  # (2B, T)
    n = prompt.sum(dim=1)  # (2B,)
    if not torch.equal(n[:b], n[b:]):
        bad = (n[:b] != n[b:]).nonzero().flatten().tolist()
        raise ValueError(
            f"wdpo_penalty='tuple' needs one prompt per pair, but the chosen and rejected rows of pair(s) {bad} "
            f"have prompts of {n[:b][bad].tolist()} and {n[b:][bad].tolist()} tokens"
        )
    pos = torch.arange(t, device=attention_mask.device)
    key = torch.where(prompt, pos, pos + t)  # prompt positions first, in order
    index = key.argsort(dim=1)  # (2B, T)
    valid = pos[None, :] < n[:b, None]  # (B, T)
    if input_ids is not None:
        ids = input_ids.gather(1, index)
        if not torch.equal(ids[:b][valid], ids[b:][valid]):
            raise ValueError(
                "wdpo_penalty='tuple' needs one prompt per pair, but the chosen and rejected rows of some pair "
                "hold different prompt tokens"
            )
    return index, valid


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, T, D) at positions index (N, T) -> (N, T, D)."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


def wdpo_tuple_cross(g: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    r"""Per pair :math:`\sum_k \langle g_{c,k}, g_{r,k}\rangle` over the shared prompt tokens k.

    With g the embedding gradient (2B, T, D) (chosen rows then rejected rows) and the
    alignment of :func:`prompt_alignment`, the tuple penalty of pair i is

    .. math:: \|g_{c,s} + g_{r,s}\|^2 + \|g_{c,a}\|^2 + \|g_{r,a}\|^2
              = \|g_c\|^2 + \|g_r\|^2 + 2\sum_k \langle g_{c,k}, g_{r,k}\rangle,

    (s: prompt tokens, a: the other tokens), i.e. the rows penalty plus twice this term.
    Differentiable in g (double backward).

    Returns
    -------
    torch.Tensor, shape (B,)
    """
    b = g.shape[0] // 2
    gc = _gather_rows(g[:b], index[:b])  # (B, T, D), prompt tokens first
    gr = _gather_rows(g[b:], index[b:])
    return ((gc * gr).sum(dim=-1) * valid.to(g.dtype)).sum(dim=-1)


def wdpo_tuple_direction(g: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    r"""The gradient with respect to the tuple z = (s, a_w, a_l), written on the 2B rows.

    At every prompt token of pair i both rows get :math:`g_{c,k} + g_{r,k}` (the gradient
    with respect to the one shared prompt embedding); answer and padding positions keep
    their row's gradient. Moving the rows by h times this tensor moves z by h times its
    gradient, with the prompt still shared.

    Returns
    -------
    torch.Tensor, shape (2B, T, D)
        :math:`\sum_{rows}\langle g, d\rangle` equals the tuple penalty
        (``||g_c||^2 + ||g_r||^2 + 2 wdpo_tuple_cross``).
    """
    b = g.shape[0] // 2
    v = valid.to(g.dtype)[:, :, None]
    gc = _gather_rows(g[:b], index[:b]) * v  # (B, T, D), zero beyond the prompt
    gr = _gather_rows(g[b:], index[b:]) * v
    extra = torch.zeros_like(g)
    d = g.shape[-1]
    extra[:b].scatter_add_(1, index[:b, :, None].expand(-1, -1, d), gr)  # chosen prompt += rejected's
    extra[b:].scatter_add_(1, index[b:, :, None].expand(-1, -1, d), gc)
    return g + extra
