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

``groupdpo`` has two modes (``group_weights``):

* ``"worst"``: the exact worst group of each batch, as above (``group_inner``);
* ``"eg"`` (default): the online exponentiated-gradient group weights of Ramesh et al. 2024
  (group-robust preference optimisation), :class:`GroupEGState`. A weight vector q over the
  groups of the training data is kept across steps; each training loss call first updates
  :math:`q_g \leftarrow q_g\,e^{\eta_q L_g}` for the groups g present in the (gathered) batch,
  :math:`L_g` the p-weighted mean loss of group g there, and renormalises q; the loss is then
  :math:`\sum_{g\ present} q_g L_g / \sum_{g\ present} q_g` (q detached; equal to
  :math:`\sum_g q_g L_g` when every group is in the batch). Every rank computes the update from the
  same all-gathered batch, so every rank holds the same q.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

from drdpo_theory.llm import distributed as _dist

__all__ = [
    "BATCH_MEMBERS",
    "DEFAULT_GROUP_STEP",
    "FAMILY_METHODS",
    "GROUP_INITS",
    "GROUP_WEIGHTS",
    "GroupEGState",
    "PAIR_MEMBERS",
    "family_multipliers",
    "flip_loss",
]

PAIR_MEMBERS = ("rdpo", "cdpo")
"""Members whose loss is a per-pair function of the margin."""

BATCH_MEMBERS = ("chi2dpo", "cvardpo", "groupdpo", "dr_dpo")
"""Members whose loss is a functional of the batch's loss distribution."""

FAMILY_METHODS = PAIR_MEMBERS + BATCH_MEMBERS

GROUP_WEIGHTS = ("eg", "worst")
"""``groupdpo`` group weights: online exponentiated gradient (Ramesh et al. 2024) or the exact worst group per batch."""

GROUP_INITS = ("uniform", "proportional")
"""Initial EG weights: 1/G each, or proportional to each group's nominal mass in the training data."""

DEFAULT_GROUP_STEP = 0.01
"""Default EG step eta_q: the default of Ramesh et al.'s released code (``rdpo_exp_step_size``), also the
GroupDRO default of Sagawa et al. 2020. Per step q moves by a factor exp(eta_q (L_g - L_h)) between two groups,
about 1 + 0.01 (L_g - L_h) with DPO losses of order log 2: q follows a persistent gap between group losses over
hundreds of steps, not the noise of one batch."""

MAX_LOGGED_GROUPS = 16
"""``groupdpo/q_<label>`` metrics are logged for at most this many groups (``groupdpo/q_max`` always)."""


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
    group_weights: str = "worst",
    group_state: "GroupEGState | None" = None,
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
    group_weights : {"worst", "eg"}
        ``groupdpo`` only: the exact worst group of the batch, or the online exponentiated-gradient
        weights held (and, unless frozen, updated) by ``group_state``.
    group_state : GroupEGState, optional
        Required for ``group_weights="eg"``.

    Returns
    -------
    m : torch.Tensor, shape (B,)
        Detached; ``(m * losses).mean()`` over the global batch equals ``value`` and its gradient
        is the robust objective's (Danskin). Dtype of ``losses`` (float32 at least).
    value : float
        The robust batch value (chi2 / CVaR worst case, worst group, EG-weighted group mean, Dr.DPO
        soft-min).
    info : dict
        Diagnostics: ``eta`` (chi2/CVaR), ``worst_group`` (groupdpo worst), ``q_max`` and
        ``q_<label>`` (groupdpo eg, after the update).
    """
    from drdpo_theory.solvers.family import chi2_inner, cvar_inner, group_inner

    if method not in BATCH_MEMBERS:
        raise ValueError(f"method must be one of {BATCH_MEMBERS}, got {method!r}")
    if method == "groupdpo" and group_weights not in GROUP_WEIGHTS:
        raise ValueError(f"group_weights must be one of {GROUP_WEIGHTS}, got {group_weights!r}")
    if method == "groupdpo" and group_weights == "eg":
        if group_state is None:
            raise ValueError("groupdpo with group_weights='eg' needs the group-weight state (group_state=GroupEGState"
                             "...), or group_weights='worst'")
        return group_state.multipliers(losses, groups, weights=weights, gather=gather)
    if method == "groupdpo" and groups is None:
        raise ValueError("groupdpo needs integer group labels per pair (the data's 'group' field)")
    arr, offset = _gathered(losses, weights, groups if method == "groupdpo" else None, gather)
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
    return _local_multipliers(q * n, losses, offset), float(value), info


def _gathered(losses: torch.Tensor, weights: torch.Tensor | None, groups: torch.Tensor | None,
              gather: bool) -> tuple[np.ndarray, int]:
    """Columns (losses, weights[, groups]) of the (all-gathered) batch as float64 numpy, and this rank's offset."""
    local = losses.detach().to(torch.float64)
    cols = [local, torch.ones_like(local) if weights is None else weights.detach().to(local)]
    if groups is not None:
        cols.append(groups.detach().to(local))
    stacked = torch.stack(cols, dim=1)  # (B, k): losses, weights (, groups) travel together
    if gather and _dist.is_distributed():
        parts = _dist.all_gather_detached(stacked)
        offset = sum(p.shape[0] for p in parts[: _dist.rank()])
        stacked = torch.cat(parts)
    else:
        offset = 0
    return stacked.cpu().numpy(), offset


def _local_multipliers(m_all: np.ndarray, losses: torch.Tensor, offset: int) -> torch.Tensor:
    m = torch.as_tensor(m_all, dtype=losses.dtype if losses.dtype == torch.float64 else torch.float32)
    return m.to(losses.device)[offset : offset + losses.shape[0]]


class GroupEGState:
    r"""Online exponentiated-gradient group weights of ``groupdpo`` (Ramesh et al. 2024).

    Holds q, a distribution over the groups of the training data (``labels``, sorted), and the
    step :math:`\eta_q`. :meth:`multipliers` (one call per training loss evaluation, i.e. per
    micro-batch) computes on the (all-gathered) batch, with p the batch's nominal distribution and
    :math:`L_g = \sum_{i\in g} p_i\ell_i / \sum_{i\in g} p_i` for the groups present in it,

    1. :math:`q_g \leftarrow q_g\,e^{\eta_q L_g}` for present g (absent groups keep their weight),
       then :math:`q \leftarrow q / \sum_g q_g` (computed in the log domain: no overflow);
    2. the value :math:`\sum_{g\ present} q_g L_g / \sum_{g\ present} q_g` and the detached per-pair
       multipliers :math:`m_i = n\,(q_{g(i)}/Q)\,p_i/P_{g(i)}` whose mean with the losses is that value.

    A frozen view (:meth:`frozen`) computes step 2 with the current q and never updates it
    (evaluation). :meth:`state_dict` / :meth:`load_state_dict` round-trip q exactly (JSON floats).

    Parameters
    ----------
    labels : sequence of int
        The group labels of the training data (duplicates are dropped).
    step : float
        :math:`\eta_q > 0` (default :data:`DEFAULT_GROUP_STEP`).
    init : {"uniform", "proportional"}
        Initial q: 1/G each, or ``mass`` normalised.
    mass : sequence of float, optional
        Nominal mass of each label (same order as the sorted unique labels); needed for
        ``init="proportional"``.
    """

    def __init__(self, labels, step: float = DEFAULT_GROUP_STEP, init: str = "uniform", mass=None) -> None:
        raw = np.asarray(labels)
        if raw.ndim != 1 or raw.size == 0:
            raise ValueError("GroupEGState needs a non-empty 1-D sequence of integer group labels")
        if not (np.issubdtype(raw.dtype, np.integer) or (np.issubdtype(raw.dtype, np.floating)
                                                          and np.all(raw == np.round(raw)))):
            raise ValueError(f"group labels must be integers, got dtype {raw.dtype}")
        self.labels = np.unique(raw.astype(np.int64))
        if not (isinstance(step, (int, float)) and math.isfinite(step) and step > 0):
            raise ValueError(f"the EG group step must be a finite number > 0, got {step!r}")
        self.step = float(step)
        if init not in GROUP_INITS:
            raise ValueError(f"group init must be one of {GROUP_INITS}, got {init!r}")
        self.init = init
        g = self.labels.size
        if init == "uniform":
            self.q = np.full(g, 1.0 / g)
        else:
            w = None if mass is None else np.asarray(mass, dtype=np.float64)
            if w is None or w.shape != (g,) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
                raise ValueError(f"init='proportional' needs a nonnegative mass per group ({g} values, positive sum)")
            self.q = w / w.sum()
        self.updates = 0
        self.is_frozen = False

    @classmethod
    def from_data(cls, groups, weights=None, step: float = DEFAULT_GROUP_STEP, init: str = "uniform") -> "GroupEGState":
        """The state for training data with per-pair ``groups`` and nominal ``weights`` (None: all 1)."""
        g = np.asarray(groups)
        if g.ndim != 1 or g.size == 0:
            raise ValueError("GroupEGState.from_data needs one group label per training pair")
        w = np.ones(g.size) if weights is None else np.asarray(weights, dtype=np.float64)
        labels, inv = np.unique(g, return_inverse=True)
        return cls(labels, step=step, init=init, mass=np.bincount(inv.reshape(-1), weights=w, minlength=labels.size))

    @property
    def num_groups(self) -> int:
        return int(self.labels.size)

    def frozen(self) -> "GroupEGState":
        """A copy that computes with the current q and never updates it (evaluation)."""
        out = copy.copy(self)
        out.q = self.q.copy()
        out.is_frozen = True
        return out

    def state_dict(self) -> dict:
        """JSON-able state: labels, q (Python floats: exact round trip), step, init, number of updates."""
        return {"num_groups": self.num_groups, "labels": [int(x) for x in self.labels],
                "q": [float(x) for x in self.q], "step": self.step, "init": self.init, "updates": int(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        """Restore q and the update count; refuses a state of other groups or another step."""
        try:
            labels = [int(x) for x in state["labels"]]
            q = np.asarray(state["q"], dtype=np.float64)
            step, updates = float(state["step"]), int(state["updates"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed group-weight state ({type(exc).__name__}: {exc})") from None
        if labels != [int(x) for x in self.labels]:
            raise ValueError(f"group-weight state is for groups {labels}, this data has {self.labels.tolist()}")
        if step != self.step:
            raise ValueError(f"group-weight state has step {step!r}, this run {self.step!r}")
        if q.shape != self.q.shape or not np.all(np.isfinite(q)) or np.any(q < 0) or not abs(q.sum() - 1.0) < 1e-9:
            raise ValueError("group-weight state holds no distribution over the groups")
        self.q = q
        self.updates = updates

    def _index(self, g: np.ndarray) -> np.ndarray:
        g = g.astype(np.int64)
        idx = np.clip(np.searchsorted(self.labels, g), 0, self.labels.size - 1)
        unknown = g[self.labels[idx] != g]
        if unknown.size:
            raise ValueError(f"group label {int(unknown[0])} is not among the groups of the training data "
                             f"{self.labels.tolist()}")
        return idx

    def multipliers(self, losses: torch.Tensor, groups: torch.Tensor | None, weights: torch.Tensor | None = None,
                    gather: bool = True) -> tuple[torch.Tensor, float, dict[str, float]]:
        """EG update (unless frozen), then multipliers, value and info as :func:`family_multipliers`."""
        if groups is None:
            raise ValueError("groupdpo needs integer group labels per pair (the data's 'group' field)")
        arr, offset = _gathered(losses, weights, groups, gather)
        l, v = arr[:, 0], arr[:, 1]
        if not v.sum() > 0:
            raise ValueError("every pair of the batch has weight 0")
        p = v / v.sum()
        idx = self._index(arr[:, 2])
        mass = np.bincount(idx, weights=p, minlength=self.num_groups)  # P_g
        present = mass > 0
        group_loss = np.zeros(self.num_groups)
        group_loss[present] = np.bincount(idx, weights=p * l, minlength=self.num_groups)[present] / mass[present]
        if not self.is_frozen:
            with np.errstate(divide="ignore"):
                a = np.log(self.q) + self.step * np.where(present, group_loss, 0.0)
            e = np.exp(a - a.max())
            self.q = e / e.sum()
            self.updates += 1
        qp = np.where(present, self.q, 0.0)
        total = qp.sum()
        if not total > 0:  # every present group's weight underflowed to 0: weigh them by mass
            qp = np.where(present, mass, 0.0)
            total = qp.sum()
        pi = qp / total  # distribution over the present groups
        value = float(pi[present] @ group_loss[present])
        safe = np.where(present, mass, 1.0)
        q_pairs = pi[idx] * p / safe[idx]  # sums to 1 over the batch; 0 on pairs of weight 0
        info = {"q_max": float(self.q.max())}
        if self.num_groups <= MAX_LOGGED_GROUPS:
            info.update({f"q_{int(lab)}": float(x) for lab, x in zip(self.labels, self.q)})
        return _local_multipliers(q_pairs * l.size, losses, offset), value, info
