"""Where does robustness pay? A map of robust-minus-DPO regret over preference shifts (log-linear).

Set-up (derivations and the mechanism in docs/shift_map.md). Two true reward directions
``theta_1*``, ``theta_2*`` with ``||theta_1*|| = reward_norm``, ``||theta_2*|| = ratio * reward_norm``
at angle ``angle`` (0 to 180 degrees) share the prompts, answers and features of
:func:`~drdpo_theory.model.make_model`. Training data: ``n`` i.i.d. tuples (``n = inf``: the exact
population, weighted) from the training distribution of a shift type at ``alpha0``; testing at every
``alpha`` in ``alphas``. Shift types (``r_k = beta (theta_k* - theta_ref).phi``,
``r_alpha = alpha r_1 + (1 - alpha) r_2``):

* ``label``: label mixture, ``P_alpha(y=1) = alpha sigma(h_1) + (1 - alpha) sigma(h_2)``; test reward ``r_alpha``.
* ``reward``: reward mixture, ``P_alpha(y=1) = sigma(h_alpha)`` (Bradley-Terry with ``r_alpha``); test reward ``r_alpha``.
* ``prompt``: covariate shift. Prompts are split into two groups; group A is labelled with ``r_1``,
  group B with ``r_2`` (``P(y | s, a1, a2)`` never changes); the prompt distribution puts mass
  ``alpha`` on A and ``1 - alpha`` on B (uniform inside a group); test reward ``r_1`` on A and
  ``r_2`` on B under that prompt distribution.
* ``noise``: training labels of the label mixture at ``alpha0`` flipped with probability
  ``noise_rate``; tested on the clean label mixture ``P_alpha`` with reward ``r_alpha``.
* ``adversarial``: training as ``label`` (the same draws); the test distribution is
  ``(1 - alpha) P + alpha Q*`` with ``Q*`` the worst case of the KL ball ``KL(Q||P) <= adv_rho``
  around the training population ``P`` against the population DPO solution, so every test
  distribution lies inside that ball (KL is convex). The true reward stays ``r_alpha0``; its
  expectation is taken under the test distribution's prompt marginal.

Methods (fit on each training set, exact on the finite support): ``dpo``; ``kldpo`` with
``rho = f * rho_c`` and ``wdpo`` (W1, continuous support, ``kappa = inf``) with ``eps = f * eps_c``
for each ``f`` in ``radius_fracs`` (``rho_c``, ``eps_c``: the training set's collapse radii); and
the paper's approximations with their hyper-parameters calibrated at the DPO solution, minimised
in full batch (no SGD noise): ``kldpo_tau`` minimises ``tau log sum_i w_i exp(l_i / tau)`` with
``tau = lam*(rho)`` at ``theta_DPO``; ``wdpo_rho0`` minimises ``sum_i w_i l_i + rho0 sum_i w_i
||grad_x l_i||^2`` with ``rho0`` matched (gradient rule) to the W2 radius ``f * eps_c^{W2}``.

Robust family (opt-in, ``drdpo shift-map --family``, :func:`with_family`; docs/shift_map.md section 5):
``chi2dpo`` (``rho = f rho_c``), ``cvardpo`` (``alpha = 1 - f (1 - alpha_c)``), ``cdpo`` (``eps = f/2``,
it collapses at 1/2), ``rdpo`` (``eps = f/2``), ``dr_dpo`` (``beta' = 1/f``), exact (Dr.DPO: local), and
``groupdpo`` with the two prompt groups (no radius: one fit reported at every ``f``). Their
first-order directions (chi2dpo, cdpo, rdpo, dr_dpo) join :func:`robust_directions`; cvardpo and
groupdpo have none (:data:`FAMILY_NO_FIRST_ORDER`).

Metrics at every test alpha (exact): ``reward`` (expected true reward of ``pi_theta``),
``reg_reward`` (``reward - beta KL(pi_theta || pi_ref)``, the KL-regularised objective whose
maximiser DPO estimates; the KL averaged over the test prompts), ``dpo_loss`` (DPO loss under the test distribution), ``worst_kl`` (worst-case loss over the KL ball
of radius ``eval_rho`` around the test distribution) and ``worst_w1`` (over the W1 ball of radius
``eval_eps``, ``kappa = inf``: ``dpo_loss + eval_eps beta ||theta - theta_ref||``). Regret
(the issue's "robust minus DPO"): ``delta_reward = reward_robust - reward_DPO`` (> 0: robust pays)
and ``delta_<loss> = loss_robust - loss_DPO`` (< 0: robust pays), paired over the same training
draw, with percentile bootstrap intervals over the draws.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import PreferenceData
from ..losses import dpo_loss, sigmoid
from ..model import LogLinearModel, make_model

__all__ = ["SHIFTS", "METHODS", "FAMILY_METHODS", "FAMILY_FIRST_ORDER", "FAMILY_NO_FIRST_ORDER", "METRICS",
           "with_family", "family_params", "draw_method_slopes", "ShiftMapConfig", "MapWorld", "make_map_world", "fit_methods",
           "evaluate_thetas", "run_cell", "run_shift_map", "summarize_regret", "regions", "best_settings",
           "first_order_prediction", "draw_shrink_slopes", "mechanism_check", "mechanism_agreement",
           "reward_gradient", "robust_directions", "summarize_shift_map", "compact_summary",
           "family_mechanism_agreement", "wins_by_method"]

#: shift type -> training distribution it shares (the adversarial test reuses the label-mixture draws)
SHIFTS = {"label": "label", "reward": "reward", "prompt": "prompt", "noise": "noise", "adversarial": "label"}
#: robust method -> description (``dpo`` is the baseline of every regret)
METHODS = {
    "kldpo": "KLDPO (exact), rho = f rho_c",
    "wdpo": "WDPO W1 (exact, kappa = inf), eps = f eps_c",
    "kldpo_tau": "KLDPO tilt, tau = lam*(rho) at the DPO solution (full batch)",
    "wdpo_rho0": "WDPO squared penalty, rho0 matched to eps = f eps_c^W2 at the DPO solution (full batch)",
}
#: the robust family (opt-in: ``drdpo shift-map --family``, :func:`with_family`): method -> description
#: of its setting at radius fraction ``f`` (docs/shift_map.md, "The robust family in the map")
FAMILY_METHODS = {
    "chi2dpo": "chi2-DPO (exact), rho = f rho_c^chi2",
    "cvardpo": "CVaR-DPO (exact), alpha = 1 - f (1 - alpha_c)",
    "groupdpo": "group DPO (exact), groups = the two prompt groups (no radius: the same fit at every f)",
    "rdpo": "rDPO (exact), flip rate eps = f / 2 (no collapse; eps -> 1/2 is the end of its range)",
    "cdpo": "cDPO (exact), label smoothing eps = f eps_c = f / 2",
    "dr_dpo": "Dr.DPO (local solver from DPO), beta' = 1 / f",
}
#: members with a first-order small-radius direction (the others are left out of the mechanism's agreement)
FAMILY_FIRST_ORDER = ("chi2dpo", "rdpo", "cdpo", "dr_dpo")
#: members without one, and why (stated in the summary)
FAMILY_NO_FIRST_ORDER = {
    "cvardpo": "CVaR is not smooth in its level: CVaR_alpha = E l + (1 - alpha)(E l - min l)/alpha holds only while "
               "1 - alpha is below the mass of the smallest loss (one tuple: 1/n of a sample, about 1% of the "
               "population), below the map's 1 - alpha = f (1 - alpha_c) almost everywhere; beyond, the slope "
               "changes at every tuple the level passes (piecewise linear, no expansion)",
    "groupdpo": "no radius: the worst group is a fixed objective (a kink where group losses tie)",
}
#: metric -> +1 if larger is better for the policy, -1 if smaller is better
METRICS = {"reward": +1, "reg_reward": +1, "dpo_loss": -1, "worst_kl": -1, "worst_w1": -1}
_TRAIN_CODE = {"label": 1, "reward": 2, "prompt": 3, "noise": 4}


def _floats(values) -> tuple:
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class ShiftMapConfig:
    """Grid of the shift map (``quick()`` shrinks it to a seconds-long smoke test)."""

    model_seed: int = 0
    """seed of the features (``make_model``) and of the direction of ``theta_2*``."""
    n_prompts: int = 4
    """prompts (an even number: the prompt shift splits them into two equal groups)."""
    n_answers: int = 4
    d: int = 4
    beta: float = 1.0
    radius: float = 4.0
    """B, the parameter ball ``||theta|| <= B`` of every method."""
    reward_norm: float = 2.0
    """``||theta_1*||``; ``||theta_2*|| = ratio * reward_norm`` (both must be <= radius)."""
    angles: tuple = (0.0, 30.0, 60.0, 90.0, 120.0, 150.0, 180.0)
    """angles between ``theta_1*`` and ``theta_2*`` in degrees."""
    ratios: tuple = (0.5, 1.0, 2.0)
    """``||theta_2*|| / ||theta_1*||``."""
    ns: tuple = (20.0, 50.0, 200.0, 1000.0, math.inf)
    """training-set sizes; ``inf``: the exact training population (one deterministic draw)."""
    shifts: tuple = tuple(SHIFTS)
    alpha0: float = 0.5
    alphas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    seeds: tuple = tuple(range(12))
    """training draws per finite ``n`` (the bootstrap resamples them)."""
    radius_fracs: tuple = (0.1, 0.5)
    """``f``: radius as a fraction of the training set's collapse radius."""
    methods: tuple = tuple(METHODS)
    noise_rate: float = 0.2
    adv_rho: float = 0.05
    """KL radius of the ball in which the adversarial test distribution is chosen."""
    eval_rho: float = 0.05
    """KL radius of the ``worst_kl`` metric."""
    eval_eps: float = 0.05
    """W1 radius of the ``worst_w1`` metric."""
    n_boot: int = 2000
    ci: float = 0.95
    boot_seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "angles", _floats(self.angles))
        object.__setattr__(self, "ratios", _floats(self.ratios))
        object.__setattr__(self, "ns", _floats(self.ns))
        object.__setattr__(self, "alphas", _floats(self.alphas))
        object.__setattr__(self, "radius_fracs", _floats(self.radius_fracs))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "shifts", tuple(self.shifts))
        object.__setattr__(self, "methods", tuple(self.methods))
        if self.n_prompts < 2 or self.n_prompts % 2:
            raise ValueError(f"n_prompts must be an even number >= 2 (two prompt groups), got {self.n_prompts}")
        if any(not 0.0 <= a <= 180.0 for a in self.angles):
            raise ValueError(f"angles must be in [0, 180] degrees, got {self.angles}")
        if any(r <= 0 for r in self.ratios):
            raise ValueError(f"ratios must be > 0, got {self.ratios}")
        if max(self.ratios, default=1.0) * self.reward_norm > self.radius or self.reward_norm > self.radius:
            raise ValueError(f"reward norms up to {max(self.ratios) * self.reward_norm:g} exceed the ball B={self.radius:g}; "
                             "lower reward_norm or the ratios, or raise radius")
        if any(not (n >= 1) for n in self.ns):
            raise ValueError(f"ns must be >= 1 (or inf for the population), got {self.ns}")
        if any(float(n) != math.inf and float(n) != int(n) for n in self.ns):
            raise ValueError(f"finite ns must be integers, got {self.ns}")
        unknown = set(self.shifts) - set(SHIFTS)
        if unknown or not self.shifts:
            raise ValueError(f"unknown shifts {sorted(unknown)}; expected some of {list(SHIFTS)}")
        unknown = set(self.methods) - set(METHODS) - set(FAMILY_METHODS)
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {list(METHODS) + list(FAMILY_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must not repeat, got {self.methods}")
        if any(not 0.0 <= a <= 1.0 for a in self.alphas) or not 0.0 <= self.alpha0 <= 1.0:
            raise ValueError("alpha0 and alphas must be in [0, 1]")
        if any(f <= 0 for f in self.radius_fracs) or not self.radius_fracs:
            raise ValueError(f"radius_fracs must be > 0, got {self.radius_fracs}")
        if self.has_family and any(f >= 1 for f in self.radius_fracs):
            raise ValueError(f"radius_fracs must be in (0, 1) with the robust family (rdpo's flip rate f/2 < 1/2, "
                             f"cvardpo's alpha = 1 - f (1 - alpha_c) > alpha_c), got {self.radius_fracs}")
        if not 0.0 <= self.noise_rate < 0.5:
            raise ValueError(f"noise_rate must be in [0, 0.5), got {self.noise_rate}")
        if min(self.adv_rho, self.eval_rho, self.eval_eps) < 0:
            raise ValueError("adv_rho, eval_rho and eval_eps must be >= 0")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if not 0.0 < self.ci < 1.0 or self.n_boot < 1:
            raise ValueError("ci must be in (0, 1) and n_boot >= 1")

    @property
    def has_family(self) -> bool:
        """Whether any robust-family member is in ``methods``."""
        return any(m in FAMILY_METHODS for m in self.methods)

    @classmethod
    def quick(cls, family: bool = False) -> "ShiftMapConfig":
        """A seconds-long smoke test (still every shift type and every method; ``family``: plus the
        robust family, :func:`with_family`)."""
        cfg = cls(angles=(0.0, 180.0), ratios=(2.0,), ns=(20.0, math.inf), alphas=(0.0, 0.5, 1.0),
                  seeds=(0, 1, 2, 3), radius_fracs=(0.3,), n_boot=500)
        return with_family(cfg) if family else cfg

    def cell_key(self) -> str:
        """Hash of everything that determines a cell's rows except the cell's own grid values."""
        d = asdict(self)
        for k in ("angles", "ratios", "ns", "shifts", "n_boot", "ci", "boot_seed"):
            d.pop(k)
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def train_types(self) -> tuple:
        """Training distributions needed by ``shifts``, in the order of :data:`SHIFTS`."""
        need = {SHIFTS[s] for s in self.shifts}
        return tuple(t for t in _TRAIN_CODE if t in need)


def with_family(cfg: ShiftMapConfig) -> ShiftMapConfig:
    """``cfg`` with every robust-family member added after its own methods (``drdpo shift-map --family``)."""
    from dataclasses import replace

    return replace(cfg, methods=tuple(cfg.methods) + tuple(m for m in FAMILY_METHODS if m not in cfg.methods))


# ----------------------------------------------------------------------------------------------
# the world
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MapWorld:
    """Features, the two reward directions, the ordered pairs and the prompt groups.

    ``s, a1, a2``: (m,) the ordered pairs ``a1 != a2``; ``x``: (m, d) their feature differences.
    ``group_a``: (S,) bool, the prompts labelled by ``r_1`` in the prompt shift.
    """

    model: LogLinearModel
    theta1: np.ndarray
    theta2: np.ndarray
    s: np.ndarray
    a1: np.ndarray
    a2: np.ndarray
    group_a: np.ndarray
    alpha0: float
    noise_rate: float
    adv_rho: float

    @property
    def x(self) -> np.ndarray:
        return self.model.phi[self.s, self.a1] - self.model.phi[self.s, self.a2]

    @property
    def beta(self) -> float:
        return self.model.beta

    def theta_alpha(self, alpha: float) -> np.ndarray:
        return alpha * self.theta1 + (1.0 - alpha) * self.theta2

    def _bt(self, theta_star) -> np.ndarray:
        """``sigma(r(a1) - r(a2))`` for reward ``beta (theta_star - theta_ref).phi``, (m,)."""
        return sigmoid(self.beta * self.x @ (np.asarray(theta_star) - self.model.theta_ref))

    def prompt_weights(self, shift: str, alpha: float) -> np.ndarray:
        """(S,) prompt distribution of the ``shift`` distribution at ``alpha`` (not ``adversarial``)."""
        if shift == "prompt":
            ga = self.group_a.astype(float)
            return alpha * ga / ga.sum() + (1.0 - alpha) * (1.0 - ga) / (1.0 - ga).sum()
        return self.model.prompt_probs

    def p_one(self, shift: str, alpha: float) -> np.ndarray:
        """``P(y = 1 | pair)`` of the ``shift`` distribution at ``alpha``, (m,) (``noise``: the noisy labels)."""
        if shift == "reward":
            return self._bt(self.theta_alpha(alpha))
        if shift == "prompt":
            return np.where(self.group_a[self.s], self._bt(self.theta1), self._bt(self.theta2))
        p = alpha * self._bt(self.theta1) + (1.0 - alpha) * self._bt(self.theta2)
        if shift == "noise":
            return self.noise_rate + (1.0 - 2.0 * self.noise_rate) * p
        return p  # label (and the base of adversarial)

    def tuple_probs(self, shift: str, alpha: float) -> np.ndarray:
        """(2m,) probabilities of the tuples ``(pair, y=1)`` then ``(pair, y=0)``."""
        A = self.model.phi.shape[1]
        pair = self.prompt_weights(shift, alpha)[self.s] / (A * (A - 1))
        p1 = self.p_one(shift, alpha)
        return np.concatenate([pair * p1, pair * (1.0 - p1)])

    def support(self, w: np.ndarray, source: str) -> PreferenceData:
        """Weighted data on the tuples with ``w > 0`` (``w``: (2m,))."""
        m = len(self.s)
        X = np.concatenate([self.x, self.x])
        Y = np.concatenate([np.ones(m, np.int64), np.zeros(m, np.int64)])
        keep = w > 0
        return PreferenceData(X[keep], Y[keep], w[keep], self.model.theta_ref, source=source)

    def train_probs(self, train: str) -> np.ndarray:
        """(2m,) tuple probabilities of the training distribution ``train`` (at ``alpha0``)."""
        return self.tuple_probs(train, self.alpha0)

    def draw(self, train: str, n: float, seed: int) -> PreferenceData:
        """``n`` i.i.d. training tuples as their histogram on the support (weights = counts / n);
        ``n = inf``: the training population itself. The solvers see the same objective either way."""
        w, source = self._draw_weights(train, n, seed)
        return self.support(w, source)

    def _draw_weights(self, train: str, n: float, seed: int) -> tuple[np.ndarray, str]:
        p = self.train_probs(train)
        if math.isinf(n):
            return p, f"population({train})"
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(int(n), p / p.sum())
        return counts / float(n), f"sample({train}, n={int(n)})"

    def draw_with_groups(self, train: str, n: float, seed: int) -> tuple[PreferenceData, np.ndarray]:
        """:meth:`draw` and the prompt group of each kept tuple, (n_kept,) int (0: group A, 1: group B):
        ``groupdpo``'s groups, defined in every shift type (the prompt shift's two prompt groups)."""
        w, source = self._draw_weights(train, n, seed)
        g = np.where(self.group_a[self.s], 0, 1).astype(np.int64)
        return self.support(w, source), np.concatenate([g, g])[w > 0]

    def adversary(self) -> np.ndarray:
        """(2m,) ``Q*``: the KL worst case (radius ``adv_rho``) around the label-mixture training
        population against that population's DPO solution."""
        from ..solvers.dpo import solve_dpo
        from ..solvers.kl import kl_inner

        key = "_adversary"
        if key not in self.model._cache:
            p = self.train_probs("label")
            pop = self.support(p, "population(label)")
            th = solve_dpo(pop, self.beta, self.model.radius).theta
            inner = kl_inner(dpo_loss(th, pop.x, pop.y, self.beta, pop.theta_ref), pop.weights, self.adv_rho)
            q = np.zeros_like(p)
            q[p > 0] = inner.q
            self.model._cache[key] = q
        return self.model._cache[key]

    def test(self, shift: str, alpha: float):
        """``(probs (2m,), prompt_weights (S,), reward (S, A))`` of the test distribution at ``alpha``."""
        if shift == "adversarial":
            p = self.train_probs("label")
            w = (1.0 - alpha) * p + alpha * self.adversary()
            S = self.model.phi.shape[0]
            pw = np.bincount(np.concatenate([self.s, self.s]), weights=w, minlength=S)
            return w, pw, self.model.reward(self.theta_alpha(self.alpha0))
        test_shift = "label" if shift == "noise" else shift
        w = self.tuple_probs(test_shift, alpha)
        pw = self.prompt_weights(test_shift, alpha)
        if shift == "prompt":
            R = np.where(self.group_a[:, None], self.model.reward(self.theta1), self.model.reward(self.theta2))
        else:
            R = self.model.reward(self.theta_alpha(alpha))
        return w, pw, R


def make_map_world(cfg: ShiftMapConfig, angle: float, ratio: float) -> MapWorld:
    """Features and ``theta_1*`` from ``make_model(model_seed)``; ``theta_2*`` at ``angle`` degrees
    from it (in the plane of ``theta_1*`` and a seeded orthogonal direction), norm ``ratio * reward_norm``."""
    base = make_model(n_prompts=cfg.n_prompts, n_answers=cfg.n_answers, d=cfg.d, beta=cfg.beta,
                      radius=cfg.radius, theta_star_norm=cfg.reward_norm, seed=cfg.model_seed)
    t1 = base.theta_star
    rng = np.random.default_rng(cfg.model_seed + 777)
    o = rng.standard_normal(cfg.d)
    o -= (o @ t1) / (t1 @ t1) * t1  # Gram-Schmidt: o orthogonal to theta_1*
    o /= np.linalg.norm(o)
    ang = math.radians(angle)
    t2 = ratio * (math.cos(ang) * t1 + math.sin(ang) * np.linalg.norm(t1) * o)
    S, A, _ = base.phi.shape
    s, a1, a2 = np.meshgrid(np.arange(S), np.arange(A), np.arange(A), indexing="ij")
    keep = a1 != a2
    group_a = np.arange(S) < S // 2
    return MapWorld(base, t1, t2, s[keep], a1[keep], a2[keep], group_a, cfg.alpha0, cfg.noise_rate, cfg.adv_rho)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def _minimize_ball(fun_grad, theta0, radius: float, tol: float = 1e-7) -> tuple[np.ndarray, str]:
    """Minimise a smooth ``f`` (``fun_grad(theta) -> (f, grad)``) over ``||theta|| <= radius`` by
    SLSQP from ``theta0``. Returns ``(theta, status)``: ``"optimal"`` when the projected gradient
    (the KKT residual of the ball) is below ``tol``, else ``"inaccurate: ..."``."""
    from scipy.optimize import minimize

    x0 = np.asarray(theta0, float)
    x0 = x0 * min(1.0, radius / max(float(np.linalg.norm(x0)), 1e-300))
    cons = {"type": "ineq", "fun": lambda t: radius**2 - t @ t, "jac": lambda t: -2.0 * t}
    r = minimize(fun_grad, x0, jac=True, method="SLSQP", constraints=[cons],
                 options={"ftol": 1e-15, "maxiter": 1000})
    th = r.x
    g = fun_grad(th)[1]
    nrm = float(np.linalg.norm(th))
    if nrm >= radius * (1 - 1e-7) and g @ th < 0:  # ball active: only the tangential part must vanish
        g = g - (g @ th) / nrm**2 * th
    kkt = float(np.linalg.norm(g))
    return th, "optimal" if kkt <= tol else f"inaccurate: kkt {kkt:.2e} ({r.message})"


def _tilt_objective(data: PreferenceData, beta: float, tau: float):
    """``F(theta) = tau log sum_i w_i exp(l_i / tau)`` and its gradient ``sum_i q_i grad l_i``."""
    from ..losses import dpo_grad

    def fg(theta):
        l = dpo_loss(theta, data.x, data.y, beta, data.theta_ref)
        z = l / tau
        zm = z.max()  # log-sum-exp shifted by the max: no overflow for small tau
        e = data.weights * np.exp(z - zm)
        q = e / e.sum()
        return tau * (zm + math.log(e.sum())), q @ dpo_grad(theta, data.x, data.y, beta, data.theta_ref)

    return fg


def _penalty_objective(data: PreferenceData, beta: float, rho0: float):
    """The authors' squared-penalty WDPO objective in x-space and its gradient."""
    from .. import approx as A

    def fg(theta):
        return (A.wdpo_sq_penalty(theta, data, beta, rho0, "x"),
                A.wdpo_grad_sq_penalty(theta, data, beta, rho0, "x"))

    return fg


def family_params(data: PreferenceData, frac: float, groups=None, members=tuple(FAMILY_METHODS)) -> dict[str, dict]:
    """Each robust-family member's keyword arguments (:func:`drdpo_theory.solvers.family.solve_family`)
    at radius fraction ``frac`` on ``data``: chi2dpo ``rho = frac rho_c`` (its collapse radius; when 0 is
    outside the hull of the ``u_i``, ``rho_c = inf`` and the scale is ``mu^T Sigma^+ mu``, the threshold
    without ``q >= 0``, as KLDPO falls back to its small-``rho`` threshold); cvardpo ``alpha = 1 - frac
    (1 - alpha_c)``; cdpo ``eps = frac / 2`` (it collapses exactly at ``eps = 1/2``); rdpo ``eps = frac / 2``
    (no collapse); dr_dpo ``beta' = 1 / frac``; groupdpo ``groups`` (the prompt groups, no radius)."""
    from ..solvers.family import chi2_collapse_threshold, cvar_collapse_threshold
    from ..solvers.kl import kl_collapse_small_rho

    out: dict[str, dict] = {}
    if "chi2dpo" in members:
        rho_c = chi2_collapse_threshold(data)
        if math.isinf(rho_c):
            rho_c = 2.0 * kl_collapse_small_rho(data)  # mu^T Sigma^+ mu
        out["chi2dpo"] = {"rho": frac * rho_c}
    if "cvardpo" in members:
        out["cvardpo"] = {"alpha": 1.0 - frac * (1.0 - cvar_collapse_threshold(data))}
    if "groupdpo" in members:
        if groups is None:
            raise ValueError("groupdpo needs the prompt group of every tuple (MapWorld.draw_with_groups)")
        out["groupdpo"] = {"groups": np.asarray(groups)}
    if "rdpo" in members:
        out["rdpo"] = {"eps": 0.5 * frac}
    if "cdpo" in members:
        out["cdpo"] = {"eps": 0.5 * frac}
    if "dr_dpo" in members:
        out["dr_dpo"] = {"beta_prime": 1.0 / frac}
    return out


def _family_radius(member: str, kw: dict) -> float:
    """The ``radius`` column of a family fit: its own parameter (groupdpo: NaN, it has none)."""
    return math.nan if member == "groupdpo" else float(next(iter(kw.values())))


def fit_methods(data: PreferenceData, cfg: ShiftMapConfig, groups=None) -> list[dict]:
    """Fit DPO and every (method, radius fraction) of ``cfg`` on ``data``.

    Returns one dict per fit: ``method``, ``frac`` (0 for DPO), ``theta`` (d,), ``radius`` (the
    ``rho``/``eps`` used; ``tau`` or ``rho0`` for the approximations; the family's ``rho``, ``alpha``,
    ``eps``, ``beta'``, NaN for groupdpo: :func:`family_params`) and ``status``. ``groups``: the prompt
    group of each tuple of ``data`` (groupdpo only).
    """
    from ..approx import w2_collapse_radius
    from ..calibration import rho0_for_eps, tau_for_rho
    from ..solvers.dpo import solve_dpo
    from ..solvers.kl import kl_collapse_small_rho, kl_collapse_threshold, solve_kldpo
    from ..solvers.wasserstein import solve_wdpo, w1_collapse_threshold

    beta, B = cfg.beta, cfg.radius
    r_dpo = solve_dpo(data, beta, B)
    th_dpo = r_dpo.theta
    fits = [dict(method="dpo", frac=0.0, theta=th_dpo, radius=0.0, status=r_dpo.status)]
    need = set(cfg.methods)
    rho_c = kl_collapse_threshold(data) if need & {"kldpo", "kldpo_tau"} else math.nan
    if math.isinf(rho_c):  # 0 outside the hull of the u_i (separable sample): no collapse; use the
        rho_c = kl_collapse_small_rho(data)  # small-rho approximation mu' Sigma^+ mu / 2 as the scale
    eps_c = w1_collapse_threshold(data) if "wdpo" in need else math.nan
    eps2_c = w2_collapse_radius(data) if "wdpo_rho0" in need else math.nan
    ref = data.theta_ref
    family_cache: dict = {}
    for f in cfg.radius_fracs:
        for m in cfg.methods:
            if m == "kldpo":
                rho = f * rho_c
                r = solve_kldpo(data, beta, B, rho)
                fits.append(dict(method=m, frac=f, theta=r.theta, radius=rho, status=r.status))
            elif m == "wdpo":
                eps = f * eps_c
                r = solve_wdpo(data, beta, B, eps, kappa=math.inf, p=1)
                fits.append(dict(method=m, frac=f, theta=r.theta, radius=eps, status=r.status))
            elif m == "kldpo_tau":
                tau = tau_for_rho(th_dpo, data, beta, f * rho_c)
                if math.isinf(tau):  # rho = 0: the tilt is the plain mean, i.e. DPO
                    th, st = th_dpo.copy(), r_dpo.status
                else:
                    if not tau > 0:  # the worst case is a point mass: the tilt's limit is min max_i l_i
                        tau = 1e-3
                    th, st = _minimize_ball(_tilt_objective(data, beta, tau), th_dpo, B)
                fits.append(dict(method=m, frac=f, theta=th, radius=tau, status=st))
            elif m == "wdpo_rho0":
                rho0 = rho0_for_eps(th_dpo, data, beta, f * eps2_c, "gradient", space="x")
                if math.isinf(rho0):  # DPO solution at theta_ref: the penalty is zero there
                    th, st = ref.copy(), "optimal"
                else:
                    th, st = _minimize_ball(_penalty_objective(data, beta, rho0), th_dpo, B)
                fits.append(dict(method=m, frac=f, theta=th, radius=rho0, status=st))
            elif m in FAMILY_METHODS:
                fits.append(_fit_member(data, cfg, m, f, groups, family_cache))
    return fits


def _fit_member(data: PreferenceData, cfg: ShiftMapConfig, member: str, f: float, groups, cache: dict) -> dict:
    """One family member at fraction ``f`` (groupdpo, which has no radius, is solved once per data set)."""
    from ..solvers.family import solve_family

    if member == "groupdpo" and "groupdpo" in cache:
        return dict(cache["groupdpo"], frac=f)
    kw = family_params(data, f, groups, members=(member,))[member]
    r = solve_family(member, data, cfg.beta, cfg.radius, **kw)
    fit = dict(method=member, frac=f, theta=r.theta, radius=_family_radius(member, kw), status=r.status)
    if member == "groupdpo":
        cache["groupdpo"] = fit
    return fit


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def _test_sets(world: MapWorld, shift: str, alphas) -> list:
    """Per alpha: ``(support data, prompt weights, reward matrix)``."""
    out = []
    for a in alphas:
        w, pw, R = world.test(shift, a)
        out.append((world.support(w, f"test({shift}, alpha={a:g})"), pw, R))
    return out


def evaluate_thetas(world: MapWorld, thetas: np.ndarray, tests: list, cfg: ShiftMapConfig) -> np.ndarray:
    """Metrics of each ``theta`` (rows of ``thetas``, (k, d)) on each test set: (k, len(tests), 5)
    with columns ``reward, reg_reward, dpo_loss, worst_kl, worst_w1`` (see the module docstring)."""
    from ..solvers.kl import kl_inner

    thetas = np.atleast_2d(np.asarray(thetas, float))
    beta = world.beta
    model = world.model
    out = np.empty((len(thetas), len(tests), len(METRICS)))
    log_ref = np.log(model.policy(model.theta_ref))  # (S, A)
    for i, th in enumerate(thetas):
        pi = model.policy(th)  # (S, A)
        kl = (pi * (np.log(np.maximum(pi, 1e-300)) - log_ref)).sum(axis=1)  # (S,) KL(pi_theta || pi_ref)
        vnorm = float(np.linalg.norm(th - model.theta_ref))
        for j, (data, pw, R) in enumerate(tests):
            l = dpo_loss(th, data.x, data.y, beta, data.theta_ref)
            mean = float(data.weights @ l)
            reward = float(pw @ (pi * R).sum(axis=1))
            out[i, j, 0] = reward
            out[i, j, 1] = reward - beta * float(pw @ kl)  # the KL-regularised objective DPO targets
            out[i, j, 2] = mean
            out[i, j, 3] = float(kl_inner(l, data.weights, cfg.eval_rho).value) if cfg.eval_rho > 0 else mean
            out[i, j, 4] = mean + cfg.eval_eps * beta * vnorm
    return out


def _draw_seed(cfg: ShiftMapConfig, train: str, angle: float, ratio: float, n: float, seed: int) -> int:
    """A seed fixed by the cell's values (not its position in the grid or the worker that runs it)."""
    ss = np.random.SeedSequence([cfg.model_seed, _TRAIN_CODE[train], int(round(angle * 1000)),
                                 int(round(ratio * 1000)), 0 if math.isinf(n) else int(n),
                                 int(seed) + 1])
    return int(ss.generate_state(1)[0])


def run_cell(cfg: ShiftMapConfig, train: str, angle: float, ratio: float, n: float) -> pd.DataFrame:
    """Every draw, fit and test metric of one ``(training distribution, angle, ratio, n)`` cell.

    One row per ``(shift, seed, method, frac, alpha)`` for the shifts that train on ``train``;
    ``n = inf`` has the single draw ``seed = -1`` (the population).
    """
    world = make_map_world(cfg, angle, ratio)
    shifts = [s for s in cfg.shifts if SHIFTS[s] == train]
    tests = {s: _test_sets(world, s, cfg.alphas) for s in shifts}
    seeds = (-1,) if math.isinf(n) else cfg.seeds
    rows = []
    for seed in seeds:
        data, groups = world.draw_with_groups(train, n, _draw_seed(cfg, train, angle, ratio, n, seed))
        fits = fit_methods(data, cfg, groups)
        thetas = np.array([f["theta"] for f in fits])
        for s in shifts:
            met = evaluate_thetas(world, thetas, tests[s], cfg)
            for i, f in enumerate(fits):
                tn = float(np.linalg.norm(f["theta"] - world.model.theta_ref))
                for j, a in enumerate(cfg.alphas):
                    rows.append((s, angle, ratio, n, seed, f["method"], f["frac"], a, *met[i, j],
                                 tn, f["radius"], f["status"]))
    return pd.DataFrame(rows, columns=["shift", "angle", "ratio", "n", "seed", "method", "frac", "alpha",
                                       *METRICS, "theta_norm", "radius", "status"])


def _cell_rows(cfg: ShiftMapConfig, train: str, n: float) -> int:
    shifts = sum(SHIFTS[s] == train for s in cfg.shifts)
    seeds = 1 if math.isinf(n) else len(cfg.seeds)
    return shifts * seeds * (1 + len(cfg.methods) * len(cfg.radius_fracs)) * len(cfg.alphas)


def _grid(cfg: ShiftMapConfig) -> list[tuple]:
    return [(t, a, r, n) for t in cfg.train_types() for a in cfg.angles for r in cfg.ratios for n in cfg.ns]


def _cell_name(cfg: ShiftMapConfig, t, a, r, n) -> str:
    nn = "inf" if math.isinf(n) else str(int(n))
    return f"{t}_a{a:g}_r{r:g}_n{nn}_{cfg.cell_key()}.csv"


def run_shift_map(cfg: ShiftMapConfig, out_dir: str | Path | None = None, n_jobs: int = 1,
                  progress: bool = True) -> pd.DataFrame:
    """All rows of the map (see :func:`run_cell`), in grid order for every ``n_jobs``.

    ``out_dir``: each cell cached in ``out_dir/cells/`` (atomic CSV plus completion marker; a
    torn, empty, unmarked or short cell is recomputed), so an interrupted run resumes.
    ``n_jobs``: joblib processes over cells (>= 1 or -1, capped at the CPU count). Draws are seeded
    by the cell's values, so the rows do not depend on ``n_jobs`` or on the order cells run in.
    """
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    from ..io import read_cell, write_cell
    from .sweep import resolve_n_jobs

    n_jobs, _ = resolve_n_jobs(n_jobs)
    out = None if out_dir is None else Path(out_dir)
    grid = _grid(cfg)

    def cell(t, a, r, n):
        path = None if out is None else out / "cells" / _cell_name(cfg, t, a, r, n)
        if path is not None:
            df = read_cell(path, columns=("shift", "method", "alpha", "reward"))
            if df is not None and len(df) == _cell_rows(cfg, t, n):
                return df
        df = run_cell(cfg, t, a, r, n)
        if path is not None:
            write_cell(df, path)
        return df

    it = tqdm(grid, desc="shift-map cells", disable=not progress)
    if n_jobs == 1:
        dfs = [cell(*g) for g in it]
    else:
        dfs = Parallel(n_jobs=n_jobs)(delayed(cell)(*g) for g in it)  # returned in grid order
    res = pd.concat(dfs, ignore_index=True)
    res["n"] = res["n"].astype(float)
    res["status"] = res["status"].astype(str)
    order = {s: i for i, s in enumerate(SHIFTS)}
    res["_o"] = res["shift"].map(order)
    res = res.sort_values(["_o", "angle", "ratio", "n"], kind="stable").drop(columns="_o").reset_index(drop=True)
    return res


# ----------------------------------------------------------------------------------------------
# regret, intervals, regions
# ----------------------------------------------------------------------------------------------
_GROUP = ["shift", "angle", "ratio", "n", "method", "frac", "alpha"]


def summarize_regret(res: pd.DataFrame, cfg: ShiftMapConfig) -> pd.DataFrame:
    """Paired regret of every robust setting against DPO on the same draw, with bootstrap intervals.

    One row per ``(shift, angle, ratio, n, method, frac, alpha)``: for each metric ``M``,
    ``delta_M`` (mean over draws of robust minus DPO), ``delta_M_lo``/``_hi`` (percentile bootstrap
    interval of that mean at level ``cfg.ci``, resampling the draws with one fixed set of
    resamples; ``n = inf``: the exact value, a zero-width interval), ``dpo_M``/``robust_M`` (means),
    ``theta_norm``/``dpo_theta_norm`` (mean ``||theta - theta_ref||``) and ``draws``.
    """
    key = ["shift", "angle", "ratio", "n", "seed", "alpha"]
    cols = list(METRICS) + ["theta_norm"]
    dpo = res[res.method == "dpo"].set_index(key)[cols]
    rob = res[res.method != "dpo"].reset_index(drop=True)
    base = dpo.reindex(pd.MultiIndex.from_frame(rob[key])).to_numpy()  # (rows, metrics + 1)
    if np.isnan(base).any():
        raise ValueError("some robust rows have no DPO row on the same draw")
    d = rob[_GROUP].copy()
    for k, m in enumerate(METRICS):
        d[f"delta_{m}"] = rob[m].to_numpy() - base[:, k]
        d[f"dpo_{m}"] = base[:, k]
        d[f"robust_{m}"] = rob[m].to_numpy()
    d["theta_norm"] = rob["theta_norm"].to_numpy()
    d["dpo_theta_norm"] = base[:, -1]
    gid = d.groupby(_GROUP, sort=False).ngroup().to_numpy()
    G = int(gid.max()) + 1
    order = np.argsort(gid, kind="stable")  # rows of group g: contiguous, in draw order
    counts = np.bincount(gid, minlength=G)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    first = order[starts]
    summ = d.iloc[first][_GROUP].reset_index(drop=True)
    num = d.drop(columns=_GROUP)
    sums = np.zeros((G, num.shape[1]))
    np.add.at(sums, gid, num.to_numpy())
    means = sums / counts[:, None]
    for j, c in enumerate(num.columns):
        summ[c] = means[:, j]
    summ["draws"] = counts
    lo_q, hi_q = (1 - cfg.ci) / 2, 1 - (1 - cfg.ci) / 2
    for m in METRICS:
        summ[f"delta_{m}_lo"] = summ[f"delta_{m}"]
        summ[f"delta_{m}_hi"] = summ[f"delta_{m}"]
    for size in np.unique(counts):
        if size < 2:
            continue  # one draw (the population): exact value, zero-width interval
        rng = np.random.default_rng([cfg.boot_seed, int(size)])
        boot = rng.integers(0, size, size=(cfg.n_boot, size))
        gs = np.flatnonzero(counts == size)
        rows = order[starts[gs][:, None] + np.arange(size)]  # (groups, size) row numbers of d
        for m in METRICS:
            vals = d[f"delta_{m}"].to_numpy()[rows]  # (groups, draws)
            lo, hi = np.empty(len(gs)), np.empty(len(gs))
            for c0 in range(0, len(gs), 256):  # (256, n_boot, draws) at a time
                bm = vals[c0:c0 + 256][:, boot].mean(axis=-1)
                lo[c0:c0 + 256] = np.quantile(bm, lo_q, axis=1)
                hi[c0:c0 + 256] = np.quantile(bm, hi_q, axis=1)
            summ.loc[gs, f"delta_{m}_lo"] = lo
            summ.loc[gs, f"delta_{m}_hi"] = hi
    return summ


#: a regret counts as a win only beyond this (absolute): ties such as two collapsed optima are not wins
WIN_TOL = 1e-9


def _wins(summ: pd.DataFrame, metric: str) -> pd.Series:
    """Rows where robust beats DPO on ``metric`` with its whole interval (beyond :data:`WIN_TOL`)."""
    if METRICS[metric] > 0:
        return summ[f"delta_{metric}_lo"] > WIN_TOL
    return summ[f"delta_{metric}_hi"] < -WIN_TOL


def best_settings(summ: pd.DataFrame, metric: str = "reward") -> pd.DataFrame:
    """Per ``(shift, angle, ratio, n, alpha)``: the robust setting (method, frac) with the best mean
    regret on ``metric``, its interval, and ``wins`` (the interval excludes 0 in robust's favour)
    and ``n_winning`` (how many settings win there)."""
    sign = METRICS[metric]
    cell = ["shift", "angle", "ratio", "n", "alpha"]
    s = summ.assign(_score=sign * summ[f"delta_{metric}"], _win=_wins(summ, metric))
    idx = s.groupby(cell, sort=False)["_score"].idxmax()
    best = s.loc[idx, cell + ["method", "frac", f"delta_{metric}", f"delta_{metric}_lo", f"delta_{metric}_hi",
                              f"dpo_{metric}", f"robust_{metric}", "_win"]].rename(columns={"_win": "wins"})
    best["n_winning"] = s.groupby(cell, sort=False)["_win"].sum().to_numpy()
    return best.reset_index(drop=True)


def regions(summ: pd.DataFrame) -> dict:
    """Per shift type, per metric: the cells ``(angle, ratio, n, alpha)`` where some robust setting
    beats DPO with its bootstrap interval (possibly none), each with its best winning setting."""
    out: dict = {}
    for shift in [s for s in SHIFTS if s in set(summ["shift"])]:
        out[shift] = {}
        sub = summ[summ["shift"] == shift]
        for m in METRICS:
            w = sub[_wins(sub, m)]
            cells = []
            if len(w):
                sign = METRICS[m]
                w = w.assign(_score=sign * w[f"delta_{m}"])
                for key, g in w.groupby(["angle", "ratio", "n", "alpha"], sort=True):
                    b = g.loc[g["_score"].idxmax()]
                    cells.append({"angle": float(key[0]), "ratio": float(key[1]), "n": _n_json(key[2]),
                                  "alpha": float(key[3]), "method": str(b["method"]), "frac": float(b["frac"]),
                                  "delta": float(b[f"delta_{m}"]), "lo": float(b[f"delta_{m}_lo"]),
                                  "hi": float(b[f"delta_{m}_hi"]), "settings": int(len(g))})
            out[shift][m] = cells
    return out


def _n_json(n) -> float | str:
    return "inf" if math.isinf(float(n)) else int(n)


# ----------------------------------------------------------------------------------------------
# mechanism: first-order predictions at the population (docs/shift_map.md)
# ----------------------------------------------------------------------------------------------
def reward_gradient(model: LogLinearModel, theta, prompt_weights, R) -> np.ndarray:
    """``grad_theta E_{s ~ w, a ~ pi_theta} R(s, a) = sum_s w_s Cov_{pi_theta(.|s)}(phi, R(s, .))``, (d,)."""
    pi = model.policy(theta)  # (S, A)
    phi = model.phi  # (S, A, d)
    mphi = np.einsum("sa,sad->sd", pi, phi)  # (S, d)
    mr = (pi * R).sum(axis=1)  # (S,)
    cov = np.einsum("sa,sad,sa->sd", pi, phi - mphi[:, None, :], R - mr[:, None])  # (S, d)
    return np.asarray(prompt_weights) @ cov


def _dpo_hessian(theta, data: PreferenceData, beta: float) -> np.ndarray:
    t = beta * (data.u @ (np.asarray(theta) - data.theta_ref))
    c = data.weights * beta**2 * sigmoid(t) * sigmoid(-t)
    return (data.x * c[:, None]).T @ data.x


def robust_directions(data: PreferenceData, beta: float, theta_hat, radius: float | None = None) -> dict:
    """First-order motion of each robust optimum away from the DPO optimum ``theta_hat``.

    ``u_m = -H^{-1} grad P_m(theta_hat)``, ``H`` the DPO Hessian, where the robust objective is
    ``L + r P_m + o(r)`` in its small parameter ``r`` (docs/shift_map.md section 2):
    ``wdpo``: ``P = beta ||theta - theta_ref||`` (``r = eps``); ``kldpo``: ``P = sqrt(2 Var_w l)``
    (``r = sqrt(rho)``); ``kldpo_tau``: ``P = Var_w(l) / 2`` (``r = 1/tau``); ``wdpo_rho0``:
    ``P = sum_i w_i ||grad_x l_i||^2`` (``r = rho0``). The robust family (docs/shift_map.md, "The
    robust family in the map"): ``chi2dpo``: ``P = sqrt(Var_w l)`` (``r = sqrt(rho)``); ``cdpo``:
    ``P = E_w t`` (``r = eps``); ``rdpo``: ``P = -E_w t`` (``r = eps / (1 - 2 eps)``); ``dr_dpo``:
    ``P = -Var_w(l) / 2`` (``r = 1/beta'``); ``t = beta u.(theta - theta_ref)`` the margin. Also
    ``shrink``: ``-(theta_hat - theta_ref)``.

    ``radius``: the ball ``B``; when given and ``theta_hat`` lies on the sphere with a positive
    multiplier ``nu`` (``grad L = -2 nu theta_hat``), the optimum stays on the sphere and moves along
    the solution of ``(H + 2 nu I) u + 2 dnu theta_hat = -grad P``, ``theta_hat . u = 0``. Without it
    ``theta_hat`` is taken as interior.
    """
    from .. import approx as A
    from ..losses import dpo_grad

    th = np.asarray(theta_hat, float)
    v = th - data.theta_ref
    H = _dpo_hessian(th, data, beta)
    l = dpo_loss(th, data.x, data.y, beta, data.theta_ref)
    g = dpo_grad(th, data.x, data.y, beta, data.theta_ref)  # (n, d)
    w = data.weights
    cov_lg = ((l - w @ l) * w) @ g  # Cov_w(l, grad l), (d,)
    var = float(w @ (l - w @ l) ** 2)
    nv = float(np.linalg.norm(v))
    grads = {
        "wdpo": beta * v / nv if nv > 0 else np.zeros_like(v),
        "kldpo": math.sqrt(2.0) * cov_lg / math.sqrt(var) if var > 0 else np.zeros_like(v),
        "kldpo_tau": cov_lg,
        "wdpo_rho0": A.penalty_moment_grad(th, data, beta, "x"),
        "chi2dpo": cov_lg / math.sqrt(var) if var > 0 else np.zeros_like(v),
        "cdpo": beta * (w @ data.u),
        "rdpo": -beta * (w @ data.u),
        "dr_dpo": -cov_lg,
    }
    gL = w @ g
    nu = -float(gL @ th) / (2.0 * float(th @ th)) if float(th @ th) > 0 else 0.0
    on_sphere = radius is not None and float(np.linalg.norm(th)) >= radius * (1 - 1e-6) and nu > 1e-10
    if on_sphere:  # bordered KKT system: the ball stays active, u tangent to the sphere
        d = len(th)
        K = np.zeros((d + 1, d + 1))
        K[:d, :d] = H + 2.0 * nu * np.eye(d)
        K[:d, d] = th
        K[d, :d] = th
        out = {m: np.linalg.solve(K, np.concatenate([-gm, [0.0]]))[:d] for m, gm in grads.items()}
    else:
        out = {m: -np.linalg.solve(H, gm) for m, gm in grads.items()}
    out["shrink"] = -v
    return out


def first_order_prediction(cfg: ShiftMapConfig, shift: str, angle: float, ratio: float) -> pd.DataFrame:
    """Predicted sign of the population regret at a small radius (docs/shift_map.md section 2).

    One row per ``(method, alpha)`` (methods of ``cfg`` plus ``shrink``): ``slope_reward =
    grad R_alpha(theta_hat) . u_m`` (> 0: a small radius raises the expected reward) and
    ``slope_dpo_loss = grad L_alpha(theta_hat) . u_m`` (< 0: it lowers the test DPO loss), at the
    population DPO optimum ``theta_hat`` of the shift's training distribution.
    """
    from ..losses import dpo_grad
    from ..solvers.dpo import solve_dpo

    world = make_map_world(cfg, angle, ratio)
    data = world.draw(SHIFTS[shift], math.inf, 0)
    th = solve_dpo(data, cfg.beta, cfg.radius).theta
    dirs = robust_directions(data, cfg.beta, th)
    rows = []
    for a in cfg.alphas:
        w, pw, R = world.test(shift, a)
        test = world.support(w, "test")
        gR = reward_gradient(world.model, th, pw, R)
        gL = test.weights @ dpo_grad(th, test.x, test.y, cfg.beta, test.theta_ref)
        for m in (*[m for m in cfg.methods if m in dirs], "shrink"):  # cvardpo, groupdpo: no direction
            rows.append(dict(shift=shift, angle=angle, ratio=ratio, method=m, alpha=a,
                             slope_reward=float(gR @ dirs[m]), slope_dpo_loss=float(gL @ dirs[m]),
                             dpo_theta_norm=float(np.linalg.norm(th - world.model.theta_ref))))
    return pd.DataFrame(rows)


def draw_shrink_slopes(cfg: ShiftMapConfig, shift: str, angle: float, ratio: float, n: float) -> pd.DataFrame:
    """The shrinkage criterion per training draw, averaged (docs/shift_map.md section 3).

    For each draw of :func:`run_cell` (same seeds), ``theta_n`` = its DPO solution and
    ``s_alpha(theta_n) = -grad R_alpha(theta_n) . (theta_n - theta_ref)``, the first-order change of
    the expected reward when ``theta_n`` is shrunk toward ``theta_ref``. One row per alpha:
    ``slope_reward`` (mean over draws), ``slope_reward_pos`` (fraction of draws with ``s > 0``).
    """
    from ..solvers.dpo import solve_dpo

    world = make_map_world(cfg, angle, ratio)
    train = SHIFTS[shift]
    seeds = (-1,) if math.isinf(n) else cfg.seeds
    tests = [world.test(shift, a) for a in cfg.alphas]
    S = np.empty((len(seeds), len(cfg.alphas)))
    for k, seed in enumerate(seeds):
        data = world.draw(train, n, _draw_seed(cfg, train, angle, ratio, n, seed))
        th = solve_dpo(data, cfg.beta, cfg.radius).theta
        v = th - world.model.theta_ref
        for j, (_, pw, R) in enumerate(tests):
            S[k, j] = -float(reward_gradient(world.model, th, pw, R) @ v)
    return pd.DataFrame({"shift": shift, "angle": angle, "ratio": ratio, "n": float(n), "alpha": list(cfg.alphas),
                         "slope_reward": S.mean(axis=0), "slope_reward_pos": (S > 0).mean(axis=0)})


def draw_method_slopes(cfg: ShiftMapConfig, shift: str, angle: float, ratio: float, n: float,
                       methods=FAMILY_FIRST_ORDER) -> pd.DataFrame:
    """Each method's own first-order slope per training draw, averaged (the family's finite-``n`` check).

    For each draw of :func:`run_cell` (same seeds): ``theta_n`` = its DPO solution, ``u_m(theta_n)`` from
    :func:`robust_directions` on the draw (with the ball: a sample DPO solution may lie on the sphere)
    and ``s = grad R_alpha(theta_n) . u_m``. One row per ``(method, alpha)``: ``slope_reward`` (mean over
    draws), ``slope_reward_pos`` (fraction of draws with ``s > 0``); ``method = measured_method``.
    """
    from ..solvers.dpo import solve_dpo

    world = make_map_world(cfg, angle, ratio)
    train = SHIFTS[shift]
    seeds = (-1,) if math.isinf(n) else cfg.seeds
    tests = [world.test(shift, a) for a in cfg.alphas]
    S = np.empty((len(methods), len(seeds), len(cfg.alphas)))
    for k, seed in enumerate(seeds):
        data = world.draw(train, n, _draw_seed(cfg, train, angle, ratio, n, seed))
        th = solve_dpo(data, cfg.beta, cfg.radius).theta
        dirs = robust_directions(data, cfg.beta, th, radius=cfg.radius)
        for j, (_, pw, R) in enumerate(tests):
            gR = reward_gradient(world.model, th, pw, R)
            for i, m in enumerate(methods):
                S[i, k, j] = float(gR @ dirs[m])
    rows = [dict(shift=shift, angle=angle, ratio=ratio, n=float(n), alpha=a, method=m, measured_method=m,
                 slope_reward=float(S[i, :, j].mean()), slope_reward_pos=float((S[i, :, j] > 0).mean()))
            for i, m in enumerate(methods) for j, a in enumerate(cfg.alphas)]
    return pd.DataFrame(rows)


def mechanism_check(cfg: ShiftMapConfig, summ: pd.DataFrame) -> pd.DataFrame:
    """First-order predictions next to the measured regret at the smallest radius.

    ``n = inf``: one row per ``(shift, angle, ratio, method, alpha)`` with the method's own
    population slope (:func:`first_order_prediction`; ``method = "shrink"`` for ``-(theta - theta_ref)``).
    Finite ``n``: ``method = "shrink"`` rows with the draw-averaged shrinkage slope
    (:func:`draw_shrink_slopes`) compared with each method's measured mean regret (``measured_method``).
    Columns ``delta_reward`` / ``delta_reward_lo`` / ``delta_reward_hi`` (measured, ``frac = min(radius_fracs)``)
    and ``agree_reward`` (same sign as the slope). Robust family (opt-in): the members of
    :data:`FAMILY_FIRST_ORDER` have their own population slope at ``n = inf`` and their draw-averaged own
    slope (:func:`draw_method_slopes`, not the shrinkage slope: rDPO and Dr.DPO do not shrink) at
    finite ``n``; cvardpo and groupdpo have no row (:data:`FAMILY_NO_FIRST_ORDER`).
    """
    f0 = min(cfg.radius_fracs)
    small = summ[np.isclose(summ["frac"], f0)]
    cols = ["shift", "angle", "ratio", "n", "method", "alpha", "delta_reward", "delta_reward_lo", "delta_reward_hi",
            "delta_dpo_loss"]
    meas = small[cols]
    parts = []
    for sh in cfg.shifts:
        for a in cfg.angles:
            for r in cfg.ratios:
                for n in cfg.ns:
                    if math.isinf(n):
                        p = first_order_prediction(cfg, sh, a, r)
                        p["n"] = math.inf
                        p["measured_method"] = p["method"]
                    else:
                        plain = [m for m in cfg.methods if m in METHODS]
                        fam = tuple(m for m in cfg.methods if m in FAMILY_FIRST_ORDER)
                        ps = []
                        if plain:
                            d = draw_shrink_slopes(cfg, sh, a, r, n)
                            ps += [d.assign(method="shrink", measured_method=m) for m in plain]
                        if fam:
                            ps.append(draw_method_slopes(cfg, sh, a, r, n, fam))
                        if not ps:
                            continue
                        p = pd.concat(ps, ignore_index=True)
                    parts.append(p)
    pred = pd.concat(parts, ignore_index=True)
    out = pred.merge(meas.rename(columns={"method": "measured_method"}),
                     on=["shift", "angle", "ratio", "n", "measured_method", "alpha"], how="left")
    out["agree_reward"] = np.sign(out["slope_reward"]) == np.sign(out["delta_reward"])
    return out


def summarize_shift_map(cfg: ShiftMapConfig, summ: pd.DataFrame, mech: pd.DataFrame | None = None) -> dict:
    """JSON-able summary: ``regions`` per shift type (first), win counts (``wins``; ``wins_by_n``: per
    training-set size), ``cells_per_shift`` (cells ``(angle, ratio, n, alpha)`` of one shift type),
    the mechanism checks and the grid."""
    reg = regions(summ)
    wins = {s: {m: len(v) for m, v in d.items()} for s, d in reg.items()}
    by_n: dict = {}
    for s, d in reg.items():
        by_n[s] = {}
        for m, cells in d.items():
            cnt = {str(_n_json(n)): 0 for n in sorted(summ["n"].astype(float).unique())}
            for c in cells:
                cnt[str(c["n"])] += 1
            by_n[s][m] = cnt
    out = {"regions": reg, "wins": wins, "wins_by_n": by_n}
    cells = summ.groupby(["shift", "angle", "ratio", "n", "alpha"]).ngroups
    out["cells_per_shift"] = int(cells // max(1, summ["shift"].nunique()))
    if mech is not None:
        out["mechanism"] = mechanism_agreement(mech)
        out["mechanism"]["radius_frac"] = float(min(cfg.radius_fracs))
        if cfg.has_family:
            out["mechanism"]["family"] = family_mechanism_agreement(
                mech, tuple(m for m in cfg.methods if m in FAMILY_FIRST_ORDER))
            out["mechanism"]["family_excluded"] = {m: why for m, why in FAMILY_NO_FIRST_ORDER.items()
                                                   if m in cfg.methods}
    if cfg.has_family:
        out["family"] = {"settings": {m: FAMILY_METHODS[m] for m in cfg.methods if m in FAMILY_METHODS},
                         "wins_by_method": {k: wins_by_method(summ, k) for k in ("reward", "reg_reward", "dpo_loss")}}
    out["grid"] = {"angles": list(cfg.angles), "ratios": list(cfg.ratios),
                   "ns": [_n_json(n) for n in cfg.ns], "alphas": list(cfg.alphas), "alpha0": cfg.alpha0,
                   "shifts": list(cfg.shifts), "methods": list(cfg.methods), "radius_fracs": list(cfg.radius_fracs),
                   "draws": len(cfg.seeds), "ci": cfg.ci, "n_boot": cfg.n_boot}
    return out


def mechanism_agreement(mech: pd.DataFrame, rel: float = 1e-3) -> dict:
    """How often the predicted sign matches the measured regret (docs/shift_map.md sections 2-3).

    ``population``: method-specific slopes at ``n = inf``, cells with ``|slope| > rel * max|slope|``
    and a nonzero regret. ``finite_n_significant``: draw-averaged shrinkage slopes at finite ``n``,
    only where the measured regret's interval excludes 0.
    """
    m = mech.dropna(subset=["delta_reward"])
    m = m[m["measured_method"].isin(list(METHODS))]  # the family: family_mechanism_agreement
    pop = m[np.isinf(m["n"].astype(float)) & (m.method != "shrink")]
    pop = pop[(np.abs(pop.slope_reward) > rel * max(1e-12, float(np.max(np.abs(pop.slope_reward.to_numpy()), initial=0.0))))
              & (np.abs(pop.delta_reward) > WIN_TOL)]
    fin = m[~np.isinf(m["n"].astype(float))]
    sig = fin[(fin.delta_reward_lo > WIN_TOL) | (fin.delta_reward_hi < -WIN_TOL)]
    return {
        "population_sign_agreement": float(pop.agree_reward.mean()) if len(pop) else None,
        "population_cells": int(len(pop)),
        "finite_n_sign_agreement_significant": float(sig.agree_reward.mean()) if len(sig) else None,
        "finite_n_significant_cells": int(len(sig)),
        "finite_n_sign_agreement_all": float(fin.agree_reward.mean()) if len(fin) else None,
    }


def family_mechanism_agreement(mech: pd.DataFrame, members=FAMILY_FIRST_ORDER, rel: float = 1e-3) -> dict:
    """:func:`mechanism_agreement` per robust-family member with a first-order direction, each on its
    own slopes (population: its slope at the population DPO optimum; finite ``n``: its draw-averaged
    slope, :func:`draw_method_slopes`), ``rel`` relative to the member's own largest slope."""
    out = {}
    m = mech.dropna(subset=["delta_reward"])
    for mem in members:
        g = m[m["measured_method"] == mem]
        if not len(g):
            continue
        pop = g[np.isinf(g["n"].astype(float))]
        scale = max(1e-12, float(np.max(np.abs(pop.slope_reward.to_numpy()), initial=0.0)))
        pop = pop[(np.abs(pop.slope_reward) > rel * scale) & (np.abs(pop.delta_reward) > WIN_TOL)]
        fin = g[~np.isinf(g["n"].astype(float))]
        sig = fin[(fin.delta_reward_lo > WIN_TOL) | (fin.delta_reward_hi < -WIN_TOL)]
        out[mem] = {
            "population_sign_agreement": float(pop.agree_reward.mean()) if len(pop) else None,
            "population_cells": int(len(pop)),
            "finite_n_sign_agreement_significant": float(sig.agree_reward.mean()) if len(sig) else None,
            "finite_n_significant_cells": int(len(sig)),
            "finite_n_sign_agreement_all": float(fin.agree_reward.mean()) if len(fin) else None,
        }
    return out


def wins_by_method(summ: pd.DataFrame, metric: str = "reward") -> dict:
    """Per shift type, per robust method: the cells ``(angle, ratio, n, alpha)`` where that method (at
    some radius fraction) beats DPO with its interval on ``metric`` (a cell counts for every winning method)."""
    out: dict = {}
    w = summ[_wins(summ, metric)]
    methods = list(dict.fromkeys(summ["method"]))
    for shift in [s for s in SHIFTS if s in set(summ["shift"])]:
        sub = w[w["shift"] == shift]
        out[shift] = {m: int(sub[sub.method == m].groupby(["angle", "ratio", "n", "alpha"]).ngroups) for m in methods}
    return out


def compact_summary(summary: dict, metrics=("reward",)) -> dict:
    """The summary of :func:`summarize_shift_map` with ``regions`` kept only for ``metrics`` (the
    other metrics keep their counts in ``wins``/``wins_by_n``): small enough to commit."""
    out = dict(summary)
    out["regions"] = {s: {m: v for m, v in d.items() if m in metrics} for s, d in summary["regions"].items()}
    out["regions_metrics"] = list(metrics)
    return out
