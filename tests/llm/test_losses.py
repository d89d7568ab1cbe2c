"""Per-pair losses, sequence log-probs and KLDPO weights (drdpo_theory.llm.losses/logprobs).

Checks: hand-computed values; gradcheck; the torch loss on a log-linear "LM" equals the
numpy log-linear DPO loss (docs/theory.md section 2); calibrated KLDPO weights equal the exact
KL worst case computed independently with scipy brentq; Danskin's gradient of the robust
batch loss; sequence log-probs of a tiny Llama vs a per-row computation.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from scipy.optimize import brentq
from scipy.special import logsumexp, softmax
from torch.testing import assert_close

from drdpo_theory.llm.logprobs import ScoredPositions, concatenated_logps, sequence_logps
from drdpo_theory.llm.losses import (
    dpo_loss,
    effective_sample_size,
    ipo_loss,
    kl_dual_temperature,
    kldpo_weights,
    reward_margins,
)
from drdpo_theory.llm.objectives import LossConfig, preference_loss

pytestmark = pytest.mark.llm

RTOL = 1e-12
ATOL = 1e-12
RTOL_FD = 1e-6  # central finite differences in float64 with step 1e-5


def t64(*v):
    return torch.tensor(v, dtype=torch.float64)


# ---------------------------------------------------------------------------------------
# hand-computed values
# ---------------------------------------------------------------------------------------
# pair 1: h = (-1 + 1.5) - (-2 + 1.5) = 1,  beta h = 0.5,  l = log(1 + e^{-0.5})
# pair 2: h = (-3 + 2) - (-1 + 2) = -2,     beta h = -1,   l = log(1 + e)
# pair 3: all zero, h = 0,                                 l = log 2
PC, PR, RC, RR = t64(-1.0, -3.0, 0.0), t64(-2.0, -1.0, 0.0), t64(-1.5, -2.0, 0.0), t64(-1.5, -2.0, 0.0)
BETA = 0.5


def test_reward_margins_hand_values():
    assert_close(reward_margins(PC, PR, RC, RR, BETA), t64(0.5, -1.0, 0.0), rtol=RTOL, atol=ATOL)


def test_dpo_loss_hand_values():
    expected = t64(0.4740769841801067, 1.3132616875182228, 0.6931471805599453)
    assert_close(dpo_loss(PC, PR, RC, RR, BETA), expected, rtol=RTOL, atol=ATOL)


def test_dpo_loss_stable_for_large_margins():
    # beta h = -1000: l = 1000 exactly in float64 (a naive log(1+exp(1000)) overflows)
    l = dpo_loss(t64(-2000.0), t64(0.0), t64(0.0), t64(0.0), 0.5)
    assert_close(l, t64(1000.0), rtol=RTOL, atol=ATOL)
    assert_close(dpo_loss(t64(2000.0), t64(0.0), t64(0.0), t64(0.0), 0.5), t64(0.0), rtol=0, atol=1e-300)


def test_ipo_loss_hand_values():
    # (h - 1/(2 beta))^2 = (h - 1)^2 for h = 1, -2, 0
    assert_close(ipo_loss(PC, PR, RC, RR, BETA), t64(0.0, 9.0, 1.0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("loss_fn", [dpo_loss, ipo_loss])
def test_losses_gradcheck(loss_fn):
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *a: loss_fn(*a, 0.7), args)


# ---------------------------------------------------------------------------------------
# log-linear policy as a causal "LM": sequence [s, a], logits at position 0 = theta.phi(s, .)
# ---------------------------------------------------------------------------------------
class LogLinearLM(torch.nn.Module):
    """pi_theta(a|s) = softmax_a(theta.phi(s, a)) (docs/theory.md section 2) in the HF calling convention."""

    def __init__(self, phi: torch.Tensor, theta: torch.Tensor):
        super().__init__()
        self.register_buffer("phi", phi)  # (V, V, d): features phi(s, a) for every token pair
        self.theta = torch.nn.Parameter(theta.clone())  # (d,)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        logits = self.phi[input_ids] @ self.theta  # (N, T, V): next-token logits after token s
        return SimpleNamespace(logits=logits)


def _log_linear_problem(n=6, vocab=5, d=3, seed=0):
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(vocab, vocab, d))
    phi /= np.maximum(1.0, np.linalg.norm(phi, axis=-1, keepdims=True))  # ||phi|| <= 1
    theta, theta_ref = rng.normal(size=d), rng.normal(size=d) * 0.3
    s = rng.integers(0, vocab, n)
    a1 = rng.integers(0, vocab, n)
    a2 = (a1 + rng.integers(1, vocab, n)) % vocab  # a2 != a1
    y = rng.integers(0, 2, n)
    x = phi[s, a1] - phi[s, a2]  # (n, d)
    # the batch puts the preferred answer first: chosen = a1 if y = 1 else a2
    chosen = np.where(y == 1, a1, a2)
    rejected = np.where(y == 1, a2, a1)
    ids = torch.tensor(np.concatenate([np.stack([s, chosen], 1), np.stack([s, rejected], 1)]))  # (2n, 2)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "loss_mask": torch.tensor([[0, 1]] * (2 * n)),
    }
    phi_t = torch.tensor(phi)
    return SimpleNamespace(
        phi=phi_t, theta=theta, theta_ref=theta_ref, x=x, y=y, batch=batch,
        model=LogLinearLM(phi_t, torch.tensor(theta)), ref=LogLinearLM(phi_t, torch.tensor(theta_ref)),
    )


def _numpy_dpo(theta, x, y, beta, theta_ref):
    """Numpy log-linear DPO loss (drdpo_theory.losses) or its closed form if absent."""
    try:
        from drdpo_theory.losses import dpo_loss as np_dpo_loss
    except ImportError:  # closed form, docs/theory.md section 2
        ytil = 2 * y - 1
        return np.logaddexp(0.0, -ytil * beta * (x @ (theta - theta_ref)))
    return np_dpo_loss(theta, x, y, beta, theta_ref=theta_ref)


def test_log_linear_margin_is_theta_dot_x():
    p = _log_linear_problem()
    pc, pr = concatenated_logps(p.model, p.batch)
    rc, rr = concatenated_logps(p.ref, p.batch)
    ytil = 2 * p.y - 1
    expected = ytil * (p.x @ (p.theta - p.theta_ref))  # (theta - theta_ref).x, signed by the label
    assert_allclose(((pc - rc) - (pr - rr)).detach().numpy(), expected, rtol=RTOL, atol=ATOL)


def test_log_linear_dpo_loss_and_gradient_match_numpy():
    p = _log_linear_problem()
    beta = 0.8
    pc, pr = concatenated_logps(p.model, p.batch)
    with torch.no_grad():
        rc, rr = concatenated_logps(p.ref, p.batch)
    l = dpo_loss(pc, pr, rc, rr, beta)
    assert_allclose(l.detach().numpy(), _numpy_dpo(p.theta, p.x, p.y, beta, p.theta_ref), rtol=RTOL, atol=ATOL)
    (grad,) = torch.autograd.grad(l.mean(), p.model.theta)
    # closed form: grad_theta l_i = -beta ytil_i sigma(-ytil_i beta h_i) x_i
    ytil = 2 * p.y - 1
    t = ytil * beta * (p.x @ (p.theta - p.theta_ref))
    expected = (-beta * ytil / (1 + np.exp(t)))[:, None] * p.x
    assert_allclose(grad.numpy(), expected.mean(0), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------
# KLDPO weights
# ---------------------------------------------------------------------------------------
def kl_worst_case_brentq(l: np.ndarray, rho: float):
    """Independent exact KL worst case: root of KL(softmax(l/lam) || uniform) = rho by brentq."""
    n = l.size

    def kl_minus_rho(log_lam):
        a = l / math.exp(log_lam)
        log_q = a - logsumexp(a)  # log-space: q underflows to 0 for small lam
        return float(np.sum(np.exp(log_q) * (log_q + math.log(n)))) - rho

    spread = l.max() - l.min()
    log_lam = brentq(kl_minus_rho, math.log(spread * 1e-3), math.log(spread * 1e6), xtol=1e-15, rtol=1e-15)
    lam = math.exp(log_lam)
    return lam, softmax(l / lam)


LOSSES = np.array([0.3, 1.7, 0.9, 2.4, 0.05, 1.1])


@pytest.mark.parametrize("rho", [0.01, 0.1, 0.5, 1.2])
def test_calibrated_weights_are_exact_kl_worst_case(rho):
    lam_ref, q_ref = kl_worst_case_brentq(LOSSES, rho)
    w, lam = kldpo_weights(torch.tensor(LOSSES), variant="calibrated", rho=rho, return_temperature=True)
    n = LOSSES.size
    assert_allclose(lam, lam_ref, rtol=1e-10)
    assert_allclose(w.numpy() / n, q_ref, rtol=1e-10, atol=1e-14)
    q = w.numpy() / n
    assert_allclose(q.sum(), 1.0, rtol=RTOL)
    assert_allclose(np.sum(q * np.log(q * n)), rho, rtol=1e-9)  # the KL constraint is active
    # strong duality: E_q l = lam rho + lam log mean exp(l / lam)
    dual = lam * rho + lam * (logsumexp(LOSSES / lam) - math.log(n))
    assert_allclose(q @ LOSSES, dual, rtol=1e-10)


def test_calibrated_weights_inactive_constraint_and_ties():
    # two maximal losses out of 5: KL at lam -> 0 is log(5/2) ~ 0.916; rho above it -> 5/2 on each max
    l = torch.tensor([1.0, 3.0, 0.5, 3.0, 2.0], dtype=torch.float64)
    w, lam = kldpo_weights(l, variant="calibrated", rho=1.0, return_temperature=True)
    assert lam == 0.0
    assert_close(w, t64(0.0, 2.5, 0.0, 2.5, 0.0), rtol=RTOL, atol=ATOL)
    # just below the threshold the constraint is active and the weights stay spread
    lam_ref, q_ref = kl_worst_case_brentq(l.numpy(), 0.9)
    assert_close(kldpo_weights(l, variant="calibrated", rho=0.9).numpy() / 5, q_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("l, rho", [([0.7, 0.7, 0.7], 0.3), ([0.2, 1.5, 0.9], 0.0)])
def test_calibrated_weights_uniform_limits(l, rho):
    # all-equal losses (any rho) or rho = 0: lam* = inf and every weight is 1
    w, lam = kldpo_weights(torch.tensor(l, dtype=torch.float64), variant="calibrated", rho=rho, return_temperature=True)
    assert math.isinf(lam)
    assert_close(w, torch.ones(3, dtype=torch.float64), rtol=RTOL, atol=ATOL)


def test_normalized_with_tau_lam_star_equals_calibrated():
    l = torch.tensor(LOSSES)
    rho = 0.3
    lam = kl_dual_temperature(l, rho)
    w_cal = kldpo_weights(l, variant="calibrated", rho=rho)
    w_norm = kldpo_weights(l, variant="normalized", tau=lam)
    assert_close(w_norm, w_cal, rtol=RTOL, atol=ATOL)
    assert_close(w_norm.mean(), torch.tensor(1.0, dtype=torch.float64), rtol=RTOL, atol=ATOL)


def test_normalized_and_clamped_hand_values():
    l = t64(0.0, 1.0, 2.0, 3.0)
    # normalized, tau = 1: 4 e^{l_i} / sum_j e^{l_j}
    assert_close(
        kldpo_weights(l, tau=1.0, variant="normalized"),
        t64(0.12823441312033995, 0.3485772749681303, 0.9475312723596406, 2.5756570395518894),
        rtol=RTOL, atol=ATOL,
    )
    # clamped, tau = 1: exp(l_i - 1.5) = e^{-1.5}, e^{-0.5}, e^{0.5}, e^{1.5}; clamp at 2 cuts the last
    expected = t64(0.22313016014842982, 0.6065306597126334, 1.6487212707001282, 4.4816890703380645)
    assert_close(kldpo_weights(l, tau=1.0, variant="clamped", clamp=None), expected, rtol=RTOL, atol=ATOL)
    expected[3] = 2.0
    assert_close(kldpo_weights(l, tau=1.0, variant="clamped", clamp=2.0), expected, rtol=RTOL, atol=ATOL)
    # the authors' default clamp 10 binds for a large spread: exp(20 - 10) > 10
    w = kldpo_weights(t64(0.0, 20.0), tau=1.0, variant="clamped")
    assert_close(w, t64(math.exp(-10.0), 10.0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("variant, kw", [("clamped", {"tau": 0.7}), ("normalized", {"tau": 0.7}), ("calibrated", {"rho": 0.2})])
def test_weights_detached_and_permutation_equivariant(variant, kw):
    l = torch.tensor(LOSSES, requires_grad=True)
    w = kldpo_weights(l, variant=variant, **kw)
    assert not w.requires_grad
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert_close(kldpo_weights(l.detach()[perm], variant=variant, **kw), w[perm], rtol=1e-10, atol=1e-13)


def test_weights_validation():
    l = torch.tensor(LOSSES)
    with pytest.raises(ValueError, match="tau"):
        kldpo_weights(l, variant="clamped")
    with pytest.raises(ValueError, match="rho"):
        kldpo_weights(l, variant="calibrated")
    with pytest.raises(ValueError, match="variant"):
        kldpo_weights(l, tau=1.0, variant="softmax")


def test_effective_sample_size():
    assert_allclose(effective_sample_size(torch.ones(4)), 4.0, rtol=RTOL)
    assert_allclose(effective_sample_size(t64(0.0, 4.0, 0.0, 0.0)), 1.0, rtol=RTOL)


def test_kldpo_calibrated_gradient_is_danskin_gradient_of_robust_loss():
    """grad of preference_loss(kldpo, calibrated) = grad of sup_{KL(q||u)<=rho} sum q_i l_i(theta)."""
    p = _log_linear_problem(n=8, seed=3)
    beta, rho = 1.5, 0.2
    with torch.no_grad():
        ref_c, ref_r = concatenated_logps(p.ref, p.batch)
    cfg = LossConfig(method="kldpo", beta=beta, kldpo_variant="calibrated", rho=rho)
    loss, metrics = preference_loss(p.model, p.batch, ref_c, ref_r, cfg)
    loss.backward()

    def robust_value(theta):  # independent: numpy losses + brentq worst case
        l = _numpy_dpo(theta, p.x, p.y, beta, p.theta_ref)
        _, q = kl_worst_case_brentq(l, rho)
        return q @ l

    eps = 1e-5
    fd = np.array([
        (robust_value(p.theta + eps * e) - robust_value(p.theta - eps * e)) / (2 * eps)
        for e in np.eye(p.theta.size)
    ])
    assert_allclose(p.model.theta.grad.numpy(), fd, rtol=RTOL_FD, atol=1e-9)
    assert_allclose(metrics["loss"], robust_value(p.theta), rtol=1e-10)
    assert_allclose(metrics["kldpo/weight_mean"], 1.0, rtol=1e-12)


# ---------------------------------------------------------------------------------------
# preference_loss reductions and config validation
# ---------------------------------------------------------------------------------------
def test_preference_loss_reductions_on_log_linear():
    p = _log_linear_problem()
    with torch.no_grad():
        rc, rr = concatenated_logps(p.ref, p.batch)
        pc, pr = concatenated_logps(p.model, p.batch)
    l_dpo = dpo_loss(pc, pr, rc, rr, 0.5)
    loss, m = preference_loss(p.model, p.batch, rc, rr, LossConfig(method="dpo", beta=0.5))
    assert_close(loss.detach(), l_dpo.mean(), rtol=RTOL, atol=ATOL)
    assert_allclose(m["rewards/margins"], float(reward_margins(pc, pr, rc, rr, 0.5).mean()), rtol=RTOL)
    assert_allclose(m["rewards/accuracies"], float((reward_margins(pc, pr, rc, rr, 0.5) > 0).double().mean()), rtol=RTOL)
    loss, _ = preference_loss(p.model, p.batch, rc, rr, LossConfig(method="ipo", beta=0.5))
    assert_close(loss.detach(), ipo_loss(pc, pr, rc, rr, 0.5).mean(), rtol=RTOL, atol=ATOL)
    cfg = LossConfig(method="kldpo", beta=0.5, kldpo_variant="clamped", tau=0.3, clamp=10.0)
    loss, m = preference_loss(p.model, p.batch, rc, rr, cfg)
    w = torch.exp((l_dpo - l_dpo.mean()) / 0.3).clamp(max=10.0)
    assert_close(loss.detach(), (w * l_dpo).mean(), rtol=RTOL, atol=ATOL)
    assert_allclose([m["kldpo/weight_min"], m["kldpo/weight_max"]], [float(w.min()), float(w.max())], rtol=RTOL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "robust"}, "method"),
        ({"beta": 0.0}, "beta"),
        ({"method": "kldpo", "kldpo_variant": "calibrated"}, "rho"),
        ({"kldpo_variant": "exp"}, "kldpo_variant"),
        ({"tau": -1.0}, "tau"),
        ({"wdpo_impl": "hvp"}, "wdpo_impl"),
        ({"rho0": -0.1}, "rho0"),
        ({"fd_step": 0.0}, "fd_step"),
        ({"clamp": 0.0}, "clamp"),
    ],
)
def test_loss_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


def test_loss_config_every_field_has_help():
    helps = LossConfig.help()
    assert set(helps) == {"method", "beta", "kldpo_variant", "tau", "rho", "clamp", "wdpo_impl", "rho0", "fd_step",
                          "wdpo_penalty", "fd_pass2_chunks", "alpha", "eps", "beta_prime", "group_weights", "group_step", "group_init"}
    assert all(len(h) > 20 for h in helps.values())


# ---------------------------------------------------------------------------------------
# sequence log-probs of a tiny Llama
# ---------------------------------------------------------------------------------------
def test_sequence_logps_match_per_row_unpadded(exact_float64, llama_factory, batch_factory):
    model = llama_factory("eager")
    batch = batch_factory(n_pairs=3)
    got = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row : row + 1, :n]  # the row alone, no padding
        logits = model(input_ids=ids).logits[0].log_softmax(-1)  # (n, V)
        expected = sum(
            logits[j - 1, ids[0, j]] for j in range(1, n) if batch["loss_mask"][row, j] == 1
        )
        assert_close(got[row], expected, rtol=1e-10, atol=1e-10)
    # inputs_embeds path gives the same numbers
    e = model.get_input_embeddings()(batch["input_ids"])
    got_e = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], inputs_embeds=e)
    assert_close(got_e, got, rtol=RTOL, atol=ATOL)
    c, r = concatenated_logps(model, batch)
    assert_close(torch.cat([c, r]), got, rtol=RTOL, atol=ATOL)


def _full_logits_logps(model, ids, am, lm):
    """Independent reference: the model's (N, T, V) logits, log_softmax, summed over the mask."""
    logp = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits.log_softmax(-1)
    tok = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # (N, T-1)
    return (tok * lm[:, 1:].to(tok.dtype)).sum(-1)


@pytest.mark.parametrize("lora", [False, True])
def test_head_scores_only_answer_positions_same_values_and_gradients(exact_float64, llama_factory, batch_factory, lora):
    model = llama_factory("eager")
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    batch = batch_factory(n_pairs=3)
    ids, am = batch["input_ids"], batch["attention_mask"]
    lm = batch["loss_mask"].to(torch.float64)
    lm[1] = 0.0  # a row without answer tokens
    lm[2, 5] = 0.5  # a weighted token
    scored = lm[:, 1:] != 0
    seen = []
    head = model.get_output_embeddings()
    hnd = head.register_forward_hook(lambda mod, args, out: seen.append((tuple(args[0].shape), tuple(out.shape))))
    got = sequence_logps(model, ids, am, lm)
    hnd.remove()
    # the head ran once, on the K scored positions only
    assert seen == [((int(scored.sum()), 32), (int(scored.sum()), 64))]
    params = [p for p in model.parameters() if p.requires_grad]
    w = torch.linspace(0.5, 2.0, ids.shape[0], dtype=torch.float64)
    g_got = torch.autograd.grad((got * w).sum(), params)
    want = _full_logits_logps(model, ids, am, lm)
    g_want = torch.autograd.grad((want * w).sum(), params)
    assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got[1] == 0.0
    for a, b in zip(g_got, g_want):
        assert_close(a, b, rtol=1e-10, atol=1e-12)
    # TRL's mean-logit statistic over the answer tokens, from the (N, T, V) logits
    logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].mean(-1)
    m = lm[:, 1:]
    assert_close(got.logit_stats[:, 0], (logits * m).sum(-1).float(), rtol=1e-5, atol=1e-6)
    assert_close(got.logit_stats[:, 1], m.sum(-1).float())


def test_head_not_hooked_when_called_on_other_shapes(exact_float64, llama_factory, batch_factory):
    """A model that calls its head on flattened hidden states keeps the full-logits path (same values)."""
    model = llama_factory("eager")
    batch = batch_factory(n_pairs=2)
    ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]

    class Flat(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kw):
            h = self.inner.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                 **kw).last_hidden_state
            n, t, d = h.shape
            return SimpleNamespace(logits=self.inner.lm_head(h.reshape(n * t, d)).view(n, t, -1))

    wrapped = Flat(model)
    sel = torch.nn.functional.pad(lm[:, 1:] != 0, (0, 1))
    with ScoredPositions(wrapped, sel) as probe:
        wrapped(input_ids=ids, attention_mask=am)
    assert not probe.fired
    assert_close(sequence_logps(wrapped, ids, am, lm), _full_logits_logps(model, ids, am, lm), rtol=1e-12, atol=1e-12)


def test_head_with_no_answer_tokens_gives_zero_and_a_gradient_path(llama_factory, batch_factory):
    model = llama_factory("eager", dtype=torch.float32)
    batch = batch_factory(n_pairs=2)
    got = sequence_logps(model, batch["input_ids"], batch["attention_mask"], torch.zeros_like(batch["loss_mask"]))
    assert torch.equal(got, torch.zeros(4))
    got.sum().backward()  # connected to the model: an all-masked micro-batch backpropagates zeros
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_llm_package_import_is_light_and_independent_of_solvers():
    """``import drdpo_theory.llm`` loads no torch; the loss modules never load the solvers."""
    import subprocess
    import sys

    code = (
        "import sys, drdpo_theory.llm; assert 'torch' not in sys.modules, 'torch imported';"
        "import drdpo_theory.llm.objectives, drdpo_theory.llm.losses, drdpo_theory.llm.logprobs;"
        "import drdpo_theory.llm.attention, drdpo_theory.llm.distributed;"
        "bad = [m for m in sys.modules if m.startswith('drdpo_theory.solvers')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- WDPO rows / tuple pieces


def _hand_layout():
    """B = 2 pairs, T = 7, hand-written masks: pair 0 chosen left-padded (prompt at 2..4), rejected
    right-padded (prompt at 0..2); pair 1 both right-padded (prompt 2 tokens at 0..1)."""
    am = torch.tensor([
        [0, 0, 1, 1, 1, 1, 1],  # pair 0 chosen: pad pad p p p a a
        [1, 1, 1, 1, 1, 0, 0],  # pair 1 chosen: p p a a a pad pad
        [1, 1, 1, 1, 0, 0, 0],  # pair 0 rejected: p p p a pad pad pad
        [1, 1, 1, 0, 0, 0, 0],  # pair 1 rejected: p p a pad ...
    ])
    lm = torch.tensor([
        [0, 0, 0, 0, 0, 1, 1],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0],
    ])
    ids = torch.tensor([
        [0, 0, 7, 8, 9, 3, 4],
        [5, 6, 1, 2, 3, 0, 0],
        [7, 8, 9, 2, 0, 0, 0],
        [5, 6, 9, 0, 0, 0, 0],
    ])
    prompt_pos = {0: ([2, 3, 4], [0, 1, 2]), 1: ([0, 1], [0, 1])}  # pair -> (chosen, rejected) positions
    return am, lm, ids, prompt_pos


def test_prompt_alignment_hand_layout():
    from drdpo_theory.llm.losses import prompt_alignment

    am, lm, ids, pos = _hand_layout()
    index, valid = prompt_alignment(am, lm, ids)
    assert valid.tolist() == [[True] * 3 + [False] * 4, [True] * 2 + [False] * 5]
    for i, (pc, pr) in pos.items():
        assert index[i, : len(pc)].tolist() == pc
        assert index[2 + i, : len(pr)].tolist() == pr
    bad = ids.clone()
    bad[2, 1] = 42  # pair 0's rejected prompt differs from its chosen prompt
    with pytest.raises(ValueError, match="different prompt tokens"):
        prompt_alignment(am, lm, bad)
    lm2 = lm.clone()
    lm2[2, 2] = 1  # pair 0's rejected prompt one token shorter
    with pytest.raises(ValueError, match=r"pair\(s\) \[0\] have prompts of \[3\] and \[2\] tokens"):
        prompt_alignment(am, lm2)


def test_tuple_cross_and_direction_by_hand():
    """Against explicit sums over the hand-listed prompt positions."""
    from drdpo_theory.llm.losses import prompt_alignment, wdpo_tuple_cross, wdpo_tuple_direction

    am, lm, ids, pos = _hand_layout()
    g = torch.randn(4, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    index, valid = prompt_alignment(am, lm, ids)
    cross = wdpo_tuple_cross(g, index, valid)
    d = wdpo_tuple_direction(g, index, valid)
    for i, (pc, pr) in pos.items():
        c, r = i, 2 + i
        expected_cross = sum(float(g[c, a] @ g[r, b]) for a, b in zip(pc, pr))
        assert_allclose(float(cross[i]), expected_cross, rtol=1e-13)
        # tuple squared norm: ||g_c,s + g_r,s||^2 + the non-prompt parts of both rows
        others_c = [t for t in range(7) if t not in pc]
        others_r = [t for t in range(7) if t not in pr]
        tuple_sq = (sum(float((g[c, a] + g[r, b]).pow(2).sum()) for a, b in zip(pc, pr))
                    + float(g[c, others_c].pow(2).sum()) + float(g[r, others_r].pow(2).sum()))
        rows_sq = float(g[c].pow(2).sum() + g[r].pow(2).sum())
        assert_allclose(rows_sq + 2 * float(cross[i]), tuple_sq, rtol=1e-13)
        # the direction: the prompt gradient g_c,s + g_r,s on both rows' prompt tokens, g elsewhere
        for a, b in zip(pc, pr):
            assert torch.equal(d[c, a], d[r, b])
            assert_close(d[c, a], g[c, a] + g[r, b], rtol=1e-15, atol=0)
        assert torch.equal(d[c, others_c], g[c, others_c]) and torch.equal(d[r, others_r], g[r, others_r])
        # sum over the rows of <g, d> is the tuple squared norm (what the finite difference differentiates)
        assert_allclose(float((g[c] * d[c]).sum() + (g[r] * d[r]).sum()), tuple_sq, rtol=1e-13)
