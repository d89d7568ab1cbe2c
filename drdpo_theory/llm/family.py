r"""Torch losses of the robust preference-optimisation family (docs/theory_family.md).

With :math:`\ell_i = -\log\sigma(h_i)` the DPO loss of pair i, :math:`h_i = \beta[(\log\pi -
\log\pi_{ref})(a_1) - (\log\pi - \log\pi_{ref})(a_2)]` and p the nominal weights of the batch:

* ``rdpo`` (Chowdhury et al. 2024, known flip rate :math:`\epsilon`), per pair:
  :math:`[(1-\epsilon)\ell(h) - \epsilon\ell(-h)]/(1-2\epsilon) = \ell(h) - \epsilon h/(1-2\epsilon)`;
* ``cdpo`` (label smoothing), per pair: :math:`(1-\epsilon)\ell(h) + \epsilon\ell(-h)`;
* ``chi2dpo``: :math:`\sup\{E_q\ell : \sum_i (q_i-p_i)^2/p_i \le \rho\}`;
* ``cvardpo``: :math:`\mathrm{CVaR}_\alpha = \sup\{E_q\ell : q \le p/\alpha\}`;
* ``groupdpo``: :math:`\max_g` of the p-weighted mean loss of group g (groups present in the batch);
* ``dr_dpo`` (Dr.DPO, Wu et al. 2024): :math:`-\beta'\log E_p e^{-\ell/\beta'}`.

The four batch-level members are computed, like the calibrated KLDPO weights, on the losses of
the whole (all-gathered) batch by the package's exact numpy inner solvers
(``drdpo_theory.solvers.family.chi2_inner``, ``cvar_inner``, ``group_inner``) and returned as
detached per-pair multipliers :math:`m_i = N q^*_i` with :math:`\frac1N\sum_i m_i\ell_i =
E_{q^*}\ell`, the batch's robust value. By Danskin's theorem the gradient of that mean is the
gradient of the robust batch objective (for Dr.DPO :math:`q \propto p\,e^{-\ell/\beta'}` is its
exact gradient weighting; the value is returned exactly).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from drdpo_theory.llm import distributed as _dist

__all__ = ["BATCH_MEMBERS", "FAMILY_METHODS", "PAIR_MEMBERS", "family_multipliers", "flip_loss"]

PAIR_MEMBERS = ("rdpo", "cdpo")
"""Members whose loss is a per-pair function of the margin."""

BATCH_MEMBERS = ("chi2dpo", "cvardpo", "groupdpo", "dr_dpo")
"""Members whose loss is a functional of the batch's loss distribution."""

FAMILY_METHODS = PAIR_MEMBERS + BATCH_MEMBERS


def flip_loss(margin: torch.Tensor, method: str, eps: float) -> torch.Tensor:
    r"""Per-pair rDPO / cDPO loss of the scaled margin h (shape (B,) -> (B,)).

    ``softplus(-h) = -log sigmoid(h)`` is the stable DPO loss; ``softplus(h) = softplus(-h) + h``.
    """
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps!r}")
    l_pos, l_neg = F.softplus(-margin), F.softplus(margin)  # l(h), l(-h)
    if method == "rdpo":
        return ((1.0 - eps) * l_pos - eps * l_neg) / (1.0 - 2.0 * eps)
    if method == "cdpo":
        return (1.0 - eps) * l_pos + eps * l_neg
    raise ValueError(f"method must be 'rdpo' or 'cdpo', got {method!r}")


def family_multipliers(
    losses: torch.Tensor,
    method: str,
    *,
    rho: float | None = None,
    alpha: float | None = None,
    beta_prime: float | None = None,
    groups: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    gather: bool = True,
) -> tuple[torch.Tensor, float, dict[str, float]]:
    r"""Detached multipliers m (B,) of a batch-level member and the batch's robust value.

    Parameters
    ----------
    losses : torch.Tensor, shape (B,)
        This rank's per-pair DPO losses.
    method : {"chi2dpo", "cvardpo", "groupdpo", "dr_dpo"}
    rho, alpha, beta_prime : float
        chi2 radius (>= 0), CVaR level in (0, 1], Dr.DPO temperature (> 0).
    groups : torch.Tensor of int, shape (B,), optional
        Group labels (``groupdpo``; required there).
    weights : torch.Tensor, shape (B,), optional
        Nominal pair weights v >= 0 (None: all 1); the nominal distribution is p = v / sum v over
        the gathered batch.
    gather : bool
        Use the losses of every rank (``all_gather``), so the multipliers are the global ones.

    Returns
    -------
    m : torch.Tensor, shape (B,)
        Detached; ``(m * losses).mean()`` over the global batch equals ``value`` and its gradient
        is the robust objective's (Danskin). Dtype of ``losses`` (float32 at least).
    value : float
        The robust batch value (chi2 / CVaR worst case, worst group, Dr.DPO soft-min).
    info : dict
        Diagnostics: ``eta`` (chi2/CVaR), ``worst_group`` (groupdpo).
    """
    from drdpo_theory.solvers.family import chi2_inner, cvar_inner, group_inner

    if method not in BATCH_MEMBERS:
        raise ValueError(f"method must be one of {BATCH_MEMBERS}, got {method!r}")
    local = losses.detach().to(torch.float64)
    cols = [local, torch.ones_like(local) if weights is None else weights.detach().to(local)]
    if method == "groupdpo":
        if groups is None:
            raise ValueError("groupdpo needs integer group labels per pair (the data's 'group' field)")
        cols.append(groups.detach().to(local))
    stacked = torch.stack(cols, dim=1)  # (B, k): losses, weights (, groups) travel together
    if gather and _dist.is_distributed():
        parts = _dist.all_gather_detached(stacked)
        offset = sum(p.shape[0] for p in parts[: _dist.rank()])
        stacked = torch.cat(parts)
    else:
        offset = 0
    arr = stacked.cpu().numpy()
    l, v = arr[:, 0], arr[:, 1]
    n = l.size
    if not v.sum() > 0:
        raise ValueError("every pair of the batch has weight 0")
    p = v / v.sum()
    info: dict[str, float] = {}
    if method == "chi2dpo":
        if rho is None or not rho >= 0:
            raise ValueError(f"chi2dpo needs a radius rho >= 0, got {rho!r}")
        inner = chi2_inner(l, p, float(rho))
        q, value = inner.q, inner.value
        info["eta"] = float(inner.eta)
    elif method == "cvardpo":
        if alpha is None or not 0.0 < alpha <= 1.0:
            raise ValueError(f"cvardpo needs a level alpha in (0, 1], got {alpha!r}")
        inner = cvar_inner(l, p, float(alpha))
        q, value = inner.q, inner.value
        info["eta"] = float(inner.eta)
    elif method == "groupdpo":
        g = arr[:, 2].astype(np.int64)
        present = p > 0
        inner = group_inner(l[present], p[present] / p[present].sum(), g[present])
        q = np.zeros(n)
        q[present] = inner.q
        value = inner.value
        info["worst_group"] = float(np.unique(g[present])[inner.worst])
    else:
        if beta_prime is None or not beta_prime > 0:
            raise ValueError(f"dr_dpo needs beta_prime > 0, got {beta_prime!r}")
        supp = p > 0
        lo = float(l[supp].min())
        e = p * np.exp(-np.maximum(l - lo, 0.0) / beta_prime)  # exponents <= 0: no overflow
        value = lo - beta_prime * math.log(float(e.sum()))
        q = e / e.sum()
    m = torch.as_tensor(q * n, dtype=losses.dtype if losses.dtype == torch.float64 else torch.float32)
    m = m.to(losses.device)[offset : offset + losses.shape[0]]
    return m, float(value), info
