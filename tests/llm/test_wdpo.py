"""WDPO estimators on a tiny random Llama (drdpo_theory.llm.objectives / attention).

Checks, in float64 (with the ``exact_float64`` fixture, since upstream Llama computes
RMSNorm and the eager softmax in float32):
* the penalty value equals an explicit per-pair computation (separate forwards);
* the double-backward gradient equals a central finite difference of the loss value;
* the finite-difference estimator matches the double-backward gradient (cosine >= 0.99,
  and first-order convergence in the step), and both reduce to DPO at rho0 = 0;
* finite-diff runs with SDPA; double-backward on SDPA switches to eager with a warning;
* both penalties ("rows": the two rows as two inputs; "tuple": the prompt one shared input),
  value and gradient of every estimator, equal an independent pair-by-pair double backward
  built from the pieces of z, with right padding and with the prompt at other offsets.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from numpy.testing import assert_allclose
from torch.testing import assert_close

pytest.importorskip("transformers")

from drdpo_theory.llm.attention import attention_implementation, ensure_double_backward_attention  # noqa: E402
from drdpo_theory.llm.logprobs import concatenated_logps  # noqa: E402
from drdpo_theory.llm.losses import dpo_loss  # noqa: E402
from drdpo_theory.llm.objectives import LossConfig, preference_backward, preference_eval, preference_loss  # noqa: E402

pytestmark = pytest.mark.llm

BETA = 0.5
RHO0 = 0.05
RTOL = 1e-10
ATOL = 1e-12
RTOL_EXACT = 1e-12  # same computation, different code path
COS_MIN = 0.99


def _refs(n_pairs, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_pairs, dtype=torch.float64, generator=g), torch.randn(n_pairs, dtype=torch.float64, generator=g)


def _flat_grad(model, batch, refs, cfg):
    model.zero_grad(set_to_none=True)
    loss, metrics = preference_loss(model, batch, refs[0], refs[1], cfg)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return grad, loss.detach(), metrics


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_penalty_value_matches_per_pair_computation(exact_float64, llama_factory, batch_factory):
    model, batch = llama_factory(), batch_factory(n_pairs=3)
    b = 3
    refs = _refs(b)
    cfg = LossConfig(method="wdpo", beta=BETA, rho0=RHO0)
    loss, metrics = preference_loss(model, batch, refs[0], refs[1], cfg)
    # explicit: pair i alone in its own forward, gradient of l_i w.r.t. its own embeddings
    sq, losses = [], []
    for i in range(b):
        rows = torch.tensor([i, b + i])
        sub = {k: v[rows] for k, v in batch.items()}
        e = model.get_input_embeddings()(sub["input_ids"]).detach().requires_grad_(True)
        pc, pr = concatenated_logps(model, sub, inputs_embeds=e)
        l_i = dpo_loss(pc, pr, refs[0][i : i + 1], refs[1][i : i + 1], BETA)
        (g_i,) = torch.autograd.grad(l_i.sum(), e)
        sq.append(float(g_i.pow(2).sum()))  # chosen and rejected rows summed
        losses.append(float(l_i.detach()))
    mean_l, mean_sq = sum(losses) / b, sum(sq) / b
    assert_allclose(metrics["wdpo/penalty"], RHO0 * mean_sq, rtol=RTOL)
    assert_allclose(metrics["dpo_loss"], mean_l, rtol=RTOL)
    assert_allclose(float(loss.detach()), mean_l + RHO0 * mean_sq, rtol=RTOL)
    assert_allclose(metrics["wdpo/grad_emb_norm"], mean_sq**0.5, rtol=RTOL)
    # the penalty must matter in this instance, or the gradient tests below prove little
    assert metrics["wdpo/penalty"] > 0.1 * metrics["dpo_loss"]


def test_double_backward_gradient_matches_central_difference(exact_float64, llama_factory, batch_factory):
    model, batch = llama_factory(), batch_factory(n_pairs=2)
    refs = _refs(2)
    cfg = LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_impl="double-backward")
    grad, _, _ = _flat_grad(model, batch, refs, cfg)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(11)
    u = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params]  # includes the embedding table
    u_flat = torch.cat([v.flatten() for v in u])
    eps = 1e-5

    def value_at(t):
        with torch.no_grad():
            for p, v in zip(params, u):
                p.add_(t * v)
        loss, _ = preference_loss(model, batch, refs[0], refs[1], cfg)
        with torch.no_grad():
            for p, v in zip(params, u):
                p.sub_(t * v)
        return float(loss.detach())

    fd = (value_at(eps) - value_at(-eps)) / (2 * eps)
    assert_allclose(float(grad @ u_flat), fd, rtol=1e-6)
    # the penalty's share of this directional derivative is not negligible
    g_dpo, _, _ = _flat_grad(model, batch, refs, LossConfig(method="dpo", beta=BETA))
    assert abs(float((grad - g_dpo) @ u_flat)) > 0.1 * abs(float(g_dpo @ u_flat))


def test_finite_diff_matches_double_backward(exact_float64, llama_factory, batch_factory):
    model, batch = llama_factory(), batch_factory(n_pairs=3)
    refs = _refs(3)
    g_dpo, _, _ = _flat_grad(model, batch, refs, LossConfig(method="dpo", beta=BETA))
    g_db, loss_db, _ = _flat_grad(model, batch, refs, LossConfig(method="wdpo", beta=BETA, rho0=RHO0))
    g_fd, loss_fd, m_fd = _flat_grad(
        model, batch, refs, LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_impl="finite-diff")
    )
    assert _cos(g_fd, g_db) >= COS_MIN
    # the penalty parts alone (the DPO part would make the cosine trivially high)
    assert _cos(g_fd - g_dpo, g_db - g_dpo) >= COS_MIN
    assert_close(g_fd, g_db, rtol=1e-5, atol=1e-6 * float(g_db.abs().max()))
    assert_close(loss_fd, loss_db, rtol=RTOL_EXACT, atol=ATOL)  # same value by construction
    assert m_fd["wdpo/fd_h"] > 0
    # first-order convergence: the error shrinks ~10x when the step shrinks 10x
    errs = []
    for step in (1e-2, 1e-3):
        g, _, _ = _flat_grad(
            model, batch, refs, LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_impl="finite-diff", fd_step=step)
        )
        errs.append(float((g - g_db).norm() / (g_db - g_dpo).norm()))
    assert 5.0 < errs[0] / errs[1] < 20.0


def test_finite_diff_float32_default_step(llama_factory, batch_factory):
    """Default step sqrt(eps_float32) ~ 3.5e-4: the penalty gradient is within a few percent."""
    model, batch = llama_factory(dtype=torch.float32), batch_factory(n_pairs=3)
    refs = tuple(r.float() for r in _refs(3))
    g_dpo, _, _ = _flat_grad(model, batch, refs, LossConfig(method="dpo", beta=BETA))
    g_db, _, _ = _flat_grad(model, batch, refs, LossConfig(method="wdpo", beta=BETA, rho0=RHO0))
    g_fd, _, _ = _flat_grad(model, batch, refs, LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_impl="finite-diff"))
    assert _cos(g_fd - g_dpo, g_db - g_dpo) >= COS_MIN
    assert float((g_fd - g_db).norm() / (g_db - g_dpo).norm()) < 0.05  # scale too, not only direction


@pytest.mark.parametrize("impl", ["double-backward", "finite-diff"])
def test_rho0_zero_is_dpo(impl, llama_factory, batch_factory):
    model, batch = llama_factory(), batch_factory(n_pairs=3)
    refs = _refs(3)
    g_dpo, loss_dpo, _ = _flat_grad(model, batch, refs, LossConfig(method="dpo", beta=BETA))
    g, loss, m = _flat_grad(model, batch, refs, LossConfig(method="wdpo", beta=BETA, rho0=0.0, wdpo_impl=impl))
    assert_close(g, g_dpo, rtol=RTOL_EXACT, atol=ATOL)
    assert_close(loss, loss_dpo, rtol=RTOL_EXACT, atol=ATOL)
    assert m["wdpo/penalty"] == 0.0 and m["wdpo/grad_emb_norm"] > 0


def test_finite_diff_runs_with_sdpa(llama_factory, batch_factory):
    batch, refs = batch_factory(n_pairs=3), _refs(3)
    cfg = LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_impl="finite-diff", fd_step=1e-4)
    sdpa = llama_factory("sdpa")
    g_sdpa, _, _ = _flat_grad(sdpa, batch, refs, cfg)
    assert attention_implementation(sdpa) == "sdpa"  # no switch for finite differences
    g_eager, _, _ = _flat_grad(llama_factory("eager"), batch, refs, cfg)  # same weights (seed)
    assert _cos(g_sdpa, g_eager) >= 0.999


def test_double_backward_on_sdpa_switches_to_eager_with_one_warning(llama_factory, batch_factory):
    batch, refs = batch_factory(n_pairs=2), _refs(2)
    model = llama_factory("sdpa")
    # without the switch, torch cannot differentiate the fused CPU attention twice
    e = model.get_input_embeddings()(batch["input_ids"])
    pc, pr = concatenated_logps(model, batch, inputs_embeds=e)
    (g,) = torch.autograd.grad(dpo_loss(pc, pr, *refs, BETA).sum(), e, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for .*scaled_dot_product"):
        g.pow(2).sum().backward()
    model.zero_grad(set_to_none=True)

    cfg = LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_impl="double-backward")
    with pytest.warns(UserWarning, match="switched the model from attn_implementation='sdpa' to 'eager'"):
        grad, loss, _ = _flat_grad(model, batch, refs, cfg)
    assert attention_implementation(model) == "eager"
    assert torch.isfinite(grad).all() and torch.isfinite(loss)
    g_eager, _, _ = _flat_grad(llama_factory("eager"), batch, refs, cfg)
    assert_close(grad, g_eager, rtol=1e-9, atol=1e-12)
    with warnings.catch_warnings():  # warned once: the model is eager now
        warnings.simplefilter("error")
        _flat_grad(model, batch, refs, cfg)
        assert ensure_double_backward_attention(model) is False


def test_ensure_double_backward_ignores_plain_modules():
    assert ensure_double_backward_attention(torch.nn.Linear(2, 2)) is False


# --------------------------------------------------------------------------- preference_backward

# The two-pass gradient adds (1 - c) P1 and c P2 (c = 2 rho0 / h, up to ~1e8 at the float64
# default step), so rounding differences from the surrogate's single backward scale with c:
# allowed |difference| = TWO_PASS_ROUND * eps(float64) * c * max|gradient|.
TWO_PASS_ROUND = 10.0
LOSS_SCALE = 0.25


def _two_pass_vs_surrogate(model, batch, refs, cfg):
    """(surrogate gradient, two-pass gradient, surrogate loss/metrics, two-pass loss/metrics).

    The two-pass call runs on top of an existing .grad (as in gradient accumulation) and
    with a loss scale; both are taken out again before comparing.
    """
    g_sur, loss_sur, m_sur = _flat_grad(model, batch, refs, cfg)
    gen = torch.Generator().manual_seed(17)
    params = [p for p in model.parameters() if p.requires_grad]
    prev = [0.1 * torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
    for p, v in zip(params, prev):
        p.grad = v.clone()
    loss, m = preference_backward(model, batch, refs[0], refs[1], cfg, loss_scale=LOSS_SCALE)
    got = torch.cat([(p.grad - v).flatten() for p, v in zip(params, prev)]) / LOSS_SCALE
    return g_sur, got, (loss_sur, m_sur), (loss, m)


@pytest.mark.parametrize("penalty", ["rows", "tuple"])
@pytest.mark.parametrize("table", ["trained", "frozen", "tied", "tied-padding-idx"])
@pytest.mark.parametrize("fd_step", [None, 1e-4], ids=["default-step", "step-1e-4"])
def test_preference_backward_two_pass_equals_surrogate_gradient(exact_float64, llama_factory, batch_factory, fd_step, table, penalty,
                                                                 monkeypatch):
    """Pass 2 adds the lookup's table gradient by hand (one process, a trained table: untied, tied to the head, with
    a padding_idx the surrogate's autograd leaves out); frozen: no table gradient at all."""
    model, batch = llama_factory(), batch_factory(n_pairs=3)
    emb = model.get_input_embeddings()
    if table == "frozen":  # LoRA-like: the embeddings are a leaf, no gradient to the table
        emb.weight.requires_grad_(False)
    if table.startswith("tied"):
        model.lm_head.weight = emb.weight
    if table == "tied-padding-idx":
        emb.padding_idx = int(batch["input_ids"][0, 1])  # a prompt token: autograd leaves its table row out
    import drdpo_theory.llm.objectives as O

    added = []
    orig = O._add_lookup_grad
    monkeypatch.setattr(O, "_add_lookup_grad", lambda *a: (added.append(1), orig(*a)))
    refs = _refs(3)
    cfg = LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_impl="finite-diff", fd_step=fd_step, wdpo_penalty=penalty)
    g_sur, got, (loss_sur, m_sur), (loss, m) = _two_pass_vs_surrogate(model, batch, refs, cfg)
    assert len(added) == (0 if table == "frozen" else 1)
    c = 2 * RHO0 / m["wdpo/fd_h"]
    assert c > 1.0  # the cancellation regime (1 - c < 0), as in practice
    atol = TWO_PASS_ROUND * torch.finfo(torch.float64).eps * c * float(g_sur.abs().max())
    assert_close(got, g_sur, rtol=0.0, atol=atol)
    assert not loss.requires_grad
    assert_close(loss, loss_sur, rtol=RTOL_EXACT, atol=ATOL)
    assert m.keys() == m_sur.keys()
    for k in m:
        assert_allclose(m[k], m_sur[k], rtol=RTOL_EXACT, atol=ATOL, err_msg=k)


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="dpo"),
        dict(method="ipo"),
        dict(method="kldpo", kldpo_variant="calibrated", rho=0.3),
        dict(method="wdpo", wdpo_impl="double-backward", rho0=RHO0),
        dict(method="wdpo", wdpo_impl="finite-diff", rho0=0.0),
    ],
    ids=["dpo", "ipo", "kldpo", "wdpo-double-backward", "wdpo-fd-rho0-0"],
)
def test_preference_backward_single_pass_methods_equal_loss_backward(llama_factory, batch_factory, kw):
    model, batch = llama_factory(), batch_factory(n_pairs=3)
    refs = _refs(3)
    cfg = LossConfig(beta=BETA, **kw)
    g_sur, got, (loss_sur, m_sur), (loss, m) = _two_pass_vs_surrogate(model, batch, refs, cfg)
    assert_close(got, g_sur, rtol=RTOL_EXACT, atol=ATOL)  # same backward, scaled
    assert_close(loss, loss_sur, rtol=RTOL_EXACT, atol=ATOL)
    assert m == m_sur


class _SavedTensorMeter:
    """Bytes of the tensors autograd currently holds for backward, and their peak."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        return _Saved(t, self)

    @staticmethod
    def unpack(s):
        return s.t


class _Saved:
    def __init__(self, t, meter):
        self.t, self.meter, self.n = t, meter, t.numel() * t.element_size()
        meter.live += self.n
        meter.peak = max(meter.peak, meter.live)

    def __del__(self):
        self.meter.live -= self.n


def _saved_peak(fn):
    meter = _SavedTensorMeter()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        fn()
    assert meter.live == 0  # every graph was freed
    return meter.peak


def test_two_pass_holds_one_graph_at_a_time(llama_factory, batch_factory):
    """Saved-for-backward memory: two-pass ~ DPO; the single surrogate holds both graphs."""
    model, batch = llama_factory("sdpa", dtype=torch.float32), batch_factory(n_pairs=3)
    refs = tuple(r.float() for r in _refs(3))
    fd = LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_impl="finite-diff")

    def surrogate():
        loss, _ = preference_loss(model, batch, refs[0], refs[1], fd)
        loss.backward()

    dpo = _saved_peak(lambda: preference_backward(model, batch, refs[0], refs[1], LossConfig(method="dpo", beta=BETA)))
    two_pass = _saved_peak(lambda: preference_backward(model, batch, refs[0], refs[1], fd))
    single = _saved_peak(surrogate)
    assert two_pass <= 1.05 * dpo, (two_pass, dpo)
    assert single >= 1.8 * dpo, (single, dpo)


# --------------------------------------------------------------------------- dropout

DROPOUT = 0.1


def _dropout_model(kind, llama_factory):
    """Tiny float32 Llama in train mode with dropout 0.1 in attention, or in LoRA adapters."""
    model = llama_factory("eager", dtype=torch.float32)
    if kind == "attention":
        for layer in model.model.layers:  # LlamaAttention reads this at every forward in train mode
            layer.self_attn.attention_dropout = DROPOUT
    else:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=DROPOUT, target_modules=["q_proj", "v_proj", "up_proj"],
            init_lora_weights="gaussian",  # B != 0, so every adapter has a gradient
        ))
    return model.train()


def _seeded_grad(model, batch, refs, cfg, two_pass, seed=123):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks for every estimator's (first) forward
    if two_pass:
        preference_backward(model, batch, refs[0], refs[1], cfg)
    else:
        loss, _ = preference_loss(model, batch, refs[0], refs[1], cfg)
        loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]), torch.get_rng_state()


@pytest.mark.parametrize("kind", ["attention", "lora"])
def test_finite_diff_passes_share_dropout_masks(kind, llama_factory, batch_factory, monkeypatch):
    """Dropout kept: both finite-difference passes draw pass 1's masks, so the estimate matches double backward.

    Without restoring the RNG state (control) the two passes see different masks and the
    difference of gradients is noise: the cosine collapses to ~0 (measured -0.25..0.03).
    """
    from drdpo_theory.llm import objectives

    model, batch = _dropout_model(kind, llama_factory), batch_factory(n_pairs=3)
    refs = tuple(r.float() for r in _refs(3))
    g_dpo, rng_dpo = _seeded_grad(model, batch, refs, LossConfig(method="dpo", beta=BETA), False)
    g_db, _ = _seeded_grad(model, batch, refs, LossConfig(method="wdpo", beta=BETA, rho0=RHO0), False)
    fd = LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_impl="finite-diff")
    assert float((g_db - g_dpo).norm()) > float(g_dpo.norm())  # the penalty dominates: a strict check
    for two_pass in (True, False):  # preference_backward's two passes and the single surrogate
        g_fd, rng_after = _seeded_grad(model, batch, refs, fd, two_pass)
        assert _cos(g_fd, g_db) >= COS_MIN, two_pass
        assert _cos(g_fd - g_dpo, g_db - g_dpo) >= COS_MIN, two_pass
        # the RNG continues as after one forward (the state DPO leaves), not after two
        assert torch.equal(rng_after, rng_dpo), two_pass
    monkeypatch.setattr(objectives._RNGState, "restore", lambda self: None)  # control: fresh masks in pass 2
    g_bad, _ = _seeded_grad(model, batch, refs, fd, True)
    assert _cos(g_bad - g_dpo, g_db - g_dpo) < 0.5


# --------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("frozen_table", [False, True], ids=["table-trained", "table-frozen"])
@pytest.mark.parametrize(
    "impl, two_pass, reentrant",
    [
        ("finite-diff", True, True),  # the two passes use only backward(): reentrant checkpointing works
        ("finite-diff", True, False),
        ("finite-diff", False, False),  # autograd.grad to the embeddings: non-reentrant checkpointing only
        ("double-backward", False, False),
    ],
    ids=["fd-two-pass-reentrant", "fd-two-pass", "fd-surrogate", "double-backward"],
)
def test_gradient_checkpointing_gives_the_same_gradient(llama_factory, batch_factory, impl, two_pass, reentrant, frozen_table):
    """HF gradient checkpointing recomputes the decoder layers in backward; the embedding hook is unaffected."""
    batch, refs = batch_factory(n_pairs=3), _refs(3)
    cfg = LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_impl=impl)
    grads = []
    for checkpointing in (False, True):
        model = llama_factory().train()
        if frozen_table:
            model.get_input_embeddings().weight.requires_grad_(False)
        if checkpointing:  # transformers >= 5.x name; gradient_checkpointing_enable before (deprecated after)
            kw = {"use_reentrant": reentrant}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        if two_pass:
            preference_backward(model, batch, refs[0], refs[1], cfg)
        else:
            preference_loss(model, batch, refs[0], refs[1], cfg)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert_close(grads[1], grads[0], rtol=RTOL_EXACT, atol=ATOL)


def test_double_backward_refused_under_deepspeed_names_finite_diff(llama_factory, batch_factory):
    """Engines detected by their class (DeepSpeedEngine lives in the ``deepspeed`` package): a clear error, no crash."""
    from drdpo_theory.llm.objectives import _engine

    class FakeDeepSpeedEngine(torch.nn.Module):  # stands for deepspeed.runtime.engine.DeepSpeedEngine
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    FakeDeepSpeedEngine.__module__ = "deepspeed.runtime.engine"
    model, batch, refs = FakeDeepSpeedEngine(llama_factory()), batch_factory(n_pairs=2), _refs(2)
    assert _engine(model) == "deepspeed" and _engine(model.module) == "plain"
    cfg = LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_impl="double-backward")
    with pytest.raises(ValueError, match=r"not supported under deepspeed.*use wdpo_impl='finite-diff'"):
        preference_loss(model, batch, refs[0], refs[1], cfg)
    # finite-diff runs there, through the parameter-hook weighting of pass 1, and equals the plain two passes
    fd = LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_impl="finite-diff", fd_step=1e-4)
    got = []
    for net in (model, model.module):
        net.zero_grad(set_to_none=True)
        for p in net.parameters():  # an earlier micro-batch's gradient, as in accumulation
            p.grad = torch.full_like(p, 0.01)
        preference_backward(net, batch, refs[0], refs[1], fd, loss_scale=0.5)
        got.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert_close(got[0], got[1], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- rows or tuple
#
# For z = (s, a_w, a_l) the prompt s is one input shared by both rows: its gradient is the sum
# of the two rows' prompt gradients. The reference below builds every pair's rows from its own
# embedding pieces (one tensor s for the prompt with "tuple", one per row with "rows"), takes
# autograd.grad with create_graph with respect to those pieces, and differentiates
# l_i + rho0 ||grad||^2 again: an independent double backward, pair by pair.


def _prompt_positions(am_row, lm_row):
    """Real tokens before the first answer token (a plain loop: independent of prompt_alignment)."""
    first = next(t for t in range(len(lm_row)) if int(lm_row[t]))
    return [t for t in range(first) if int(am_row[t])]


def _reference_objective(model, batch, refs, rho0, penalty):
    """(J = mean_i [l_i + rho0 sq_i] attached to the parameters, [sq_i], [l_i]) pair by pair."""
    emb = model.get_input_embeddings()
    n_rows, t = batch["input_ids"].shape
    b = n_rows // 2
    total, sqs, losses = 0.0, [], []
    for i in range(b):
        rows = [i, b + i]
        sub = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "loss_mask")}
        ids = sub["input_ids"]
        spans = [_prompt_positions(sub["attention_mask"][r], sub["loss_mask"][r]) for r in range(2)]
        assert ids[0, spans[0]].tolist() == ids[1, spans[1]].tolist()  # one prompt per pair
        shared = emb(ids[0, spans[0]])  # (P, D), attached to the table
        pieces, rows_e = [shared] if penalty == "tuple" else [], []
        for r in range(2):
            s_r = shared if penalty == "tuple" else emb(ids[r, spans[r]])
            other = [p for p in range(t) if p not in spans[r]]
            a_r = emb(ids[r, other])
            pieces += [a_r] if penalty == "tuple" else [s_r, a_r]
            e_r = torch.zeros(t, s_r.shape[-1], dtype=s_r.dtype)
            e_r = e_r.index_copy(0, torch.tensor(spans[r]), s_r).index_copy(0, torch.tensor(other), a_r)
            rows_e.append(e_r)
        pc, pr = concatenated_logps(model, sub, inputs_embeds=torch.stack(rows_e))
        l_i = dpo_loss(pc, pr, refs[0][i : i + 1], refs[1][i : i + 1], BETA).sum()
        grads = torch.autograd.grad(l_i, pieces, create_graph=True)
        sq = sum(g.pow(2).sum() for g in grads)
        total = total + l_i + rho0 * sq
        sqs.append(float(sq.detach()))
        losses.append(float(l_i.detach()))
    return total / b, sqs, losses


def _reference_grad(model, batch, refs, rho0, penalty):
    model.zero_grad(set_to_none=True)
    j, sqs, losses = _reference_objective(model, batch, refs, rho0, penalty)
    j.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]), float(j.detach()), sqs, losses


def _mixed_padding(batch, shift=2):
    """Chosen rows left-padded by ``shift`` tokens, rejected rows right-padded: the shared prompt sits
    at different positions in the two rows of a pair."""
    n, t = batch["input_ids"].shape
    b = n // 2
    out = {}
    for k in ("input_ids", "attention_mask", "loss_mask"):
        x = torch.zeros(n, t + shift, dtype=batch[k].dtype)
        x[:b, shift:] = batch[k][:b]
        x[b:, :t] = batch[k][b:]
        out[k] = x
    return out


def _two_pass_grad(model, batch, refs, cfg):
    model.zero_grad(set_to_none=True)
    loss, m = preference_backward(model, batch, refs[0], refs[1], cfg)
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]), loss, m


@pytest.mark.parametrize("layout", ["right-padded", "mixed-padding"])
@pytest.mark.parametrize("penalty", ["rows", "tuple"])
def test_penalty_and_gradient_match_independent_double_backward(exact_float64, llama_factory, batch_factory, penalty, layout):
    model, batch = llama_factory(), batch_factory(n_pairs=3)
    if layout == "mixed-padding":
        batch = _mixed_padding(batch)
    refs = _refs(3)
    g_ref, j_ref, sqs, losses = _reference_grad(model, batch, refs, RHO0, penalty)
    g_dpo, _, _ = _flat_grad(model, batch, refs, LossConfig(method="dpo", beta=BETA))
    assert float((g_ref - g_dpo).norm()) > 0.1 * float(g_dpo.norm())  # the penalty matters here

    kw = dict(method="wdpo", beta=BETA, rho0=RHO0, wdpo_penalty=penalty)
    g_db, loss_db, m_db = _flat_grad(model, batch, refs, LossConfig(wdpo_impl="double-backward", **kw))
    assert_allclose(m_db["wdpo/penalty"], RHO0 * sum(sqs) / 3, rtol=RTOL)
    assert_allclose(m_db["dpo_loss"], sum(losses) / 3, rtol=RTOL)
    assert_allclose(float(loss_db), j_ref, rtol=RTOL)
    assert_allclose(m_db["wdpo/grad_emb_norm"], (sum(sqs) / 3) ** 0.5, rtol=RTOL)
    assert_close(g_db, g_ref, rtol=1e-9, atol=1e-12 * float(g_ref.abs().max()))

    fd = LossConfig(wdpo_impl="finite-diff", **kw)
    for name, (g_fd, loss_fd, m_fd) in {
        "surrogate": _flat_grad(model, batch, refs, fd), "two-pass": _two_pass_grad(model, batch, refs, fd),
    }.items():
        assert_allclose(float(loss_fd), j_ref, rtol=RTOL, err_msg=name)
        assert_allclose(m_fd["wdpo/penalty"], RHO0 * sum(sqs) / 3, rtol=RTOL, err_msg=name)
        assert _cos(g_fd - g_dpo, g_ref - g_dpo) >= COS_MIN, name
        assert_close(g_fd, g_ref, rtol=1e-5, atol=1e-6 * float(g_ref.abs().max()), msg=name)


def test_rows_and_tuple_differ_on_the_tiny_model(exact_float64, llama_factory, batch_factory):
    """The two penalties are different functions: per-pair values and penalty gradients differ."""
    model, batch = llama_factory(), batch_factory(n_pairs=3)
    refs = _refs(3)
    g_dpo, _, _ = _flat_grad(model, batch, refs, LossConfig(method="dpo", beta=BETA))
    g_rows, _, sq_rows, _ = _reference_grad(model, batch, refs, RHO0, "rows")
    g_tup, _, sq_tup, _ = _reference_grad(model, batch, refs, RHO0, "tuple")
    rel = [abs(a - b) / a for a, b in zip(sq_rows, sq_tup)]
    assert max(rel) > 0.05, rel
    assert _cos(g_rows - g_dpo, g_tup - g_dpo) < 0.999
    # the library agrees on the difference (both values from one preference_loss each)
    vals = {}
    for penalty in ("rows", "tuple"):
        _, m = preference_loss(model, batch, refs[0], refs[1], LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_penalty=penalty))
        vals[penalty] = m["wdpo/penalty"]
    assert_allclose(vals["tuple"] - vals["rows"], RHO0 * (sum(sq_tup) - sum(sq_rows)) / 3, rtol=1e-8)


def test_tuple_penalty_in_eval_and_config(exact_float64, llama_factory, batch_factory):
    model, batch = llama_factory(), _mixed_padding(batch_factory(n_pairs=3))
    refs = _refs(3)
    cfg = LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_penalty="tuple")
    loss, m = preference_loss(model, batch, refs[0], refs[1], cfg)
    with torch.no_grad():
        loss_e, m_e = preference_eval(model, batch, refs[0], refs[1], cfg)
    assert_allclose(float(loss_e), float(loss.detach()), rtol=RTOL_EXACT)
    assert_allclose(m_e["wdpo/penalty"], m["wdpo/penalty"], rtol=RTOL_EXACT)
    assert LossConfig().wdpo_penalty == "rows"
    from drdpo_theory.llm.trainer import TrainConfig  # drdpo align / llm-shift pass the field through

    assert TrainConfig(method="wdpo", wdpo_penalty="tuple").loss_config().wdpo_penalty == "tuple"
    assert TrainConfig().wdpo_penalty == "rows"
    with pytest.raises(ValueError, match="wdpo_penalty must be one of"):
        TrainConfig(method="wdpo", wdpo_penalty="prompt")
    with pytest.raises(ValueError, match="wdpo_penalty must be one of"):
        LossConfig(method="wdpo", wdpo_penalty="prompt")
    # a pair whose rows do not share their prompt is refused, not silently misaligned
    bad = {k: v.clone() for k, v in batch.items()}
    bad["input_ids"][0, 2] = bad["input_ids"][0, 2] % 63 + 1  # chosen row 0's first prompt token (ids 1..63) changed
    with pytest.raises(ValueError, match="one prompt per pair"):
        preference_loss(model, bad, refs[0], refs[1], cfg)


# --------------------------------------------------------------------------- pass 2 in pair chunks


def _two_pass_grad(model, batch, refs, cfg):
    model.zero_grad(set_to_none=True)
    loss, m = preference_backward(model, batch, refs[0], refs[1], cfg)
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]), loss, m


@pytest.mark.parametrize("penalty", ["rows", "tuple"])
def test_pass2_chunks_give_the_one_chunk_gradient(exact_float64, llama_factory, batch_factory, penalty, monkeypatch):
    """Pass 2's loss is a sum over pairs: 2 or 3 chunks (uneven: 5 pairs) give the 1-chunk gradient,
    loss and metrics to rounding, with pair weights; the forwards see the chunks' rows."""
    from drdpo_theory.llm import objectives

    model, batch = llama_factory(), batch_factory(n_pairs=5)
    batch = dict(batch, weight=torch.tensor([1.0, 0.5, 2.0, 0.0, 1.5], dtype=torch.float64))
    refs = _refs(5)
    rows = []
    real = objectives._embed_forward

    def spy(model, batch, logps_fn, **kw):
        rows.append(int(batch["input_ids"].shape[0]))
        return real(model, batch, logps_fn, **kw)

    monkeypatch.setattr(objectives, "_embed_forward", spy)
    got = {}
    for k in (1, 2, 3):
        rows.clear()
        cfg = LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_impl="finite-diff", wdpo_penalty=penalty,
                         fd_pass2_chunks=k)
        got[k] = _two_pass_grad(model, batch, refs, cfg)
        assert rows == [10] + [2 * len(c) for c in torch.arange(5).chunk(k)], (k, rows)
    g1, loss1, m1 = got[1]
    assert float(g1.abs().max()) > 0
    # the chunks only change the order of pass 2's float64 sums, whose rounding the finite-difference
    # coefficient c = 2 rho0 / h (~1e6 here) amplifies: the bound of the two-pass test above
    c = 2 * RHO0 / m1["wdpo/fd_h"]
    atol = TWO_PASS_ROUND * torch.finfo(torch.float64).eps * c * float(g1.abs().max())
    for k in (2, 3):
        g, loss, m = got[k]
        assert_close(g, g1, rtol=0.0, atol=atol)
        assert_close(loss, loss1, rtol=RTOL_EXACT, atol=ATOL)
        assert m.keys() == m1.keys()


def test_pass2_runs_one_chunk_with_dropout_or_a_sharded_engine(llama_factory, batch_factory, monkeypatch):
    from drdpo_theory.llm import objectives

    model = llama_factory("eager", dtype=torch.float32).train()
    cfg = LossConfig(method="wdpo", beta=BETA, rho0=RHO0, wdpo_impl="finite-diff", fd_pass2_chunks=4)
    assert objectives._pass2_chunks(model, cfg, 6) == 4
    assert objectives._pass2_chunks(model, cfg, 3) == 3  # never more chunks than pairs
    model.model.layers[0].self_attn.attention_dropout = 0.1  # pass 1's masks are replayed for the whole batch
    assert objectives._pass2_chunks(model, cfg, 6) == 1
    assert objectives._pass2_chunks(model.eval(), cfg, 6) == 4  # no masks drawn in eval mode
    model.model.layers[0].self_attn.attention_dropout = 0.0
    monkeypatch.setattr(objectives, "_engine", lambda m: "fsdp2")
    assert objectives._pass2_chunks(model.train(), cfg, 6) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_pass2_chunks_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="fd_pass2_chunks"):
        LossConfig(method="wdpo", fd_pass2_chunks=bad)


@pytest.mark.parametrize("layout", ["right-padded", "mixed-padding"])
def test_pair_losses_and_penalties_match_independent_reference(exact_float64, llama_factory, batch_factory, layout):
    """The per-pair values llm-shift calibrates radii with equal the independent per-pair double backward."""
    from drdpo_theory.llm.objectives import pair_losses_and_penalties

    model, batch = llama_factory(), batch_factory(n_pairs=3)
    if layout == "mixed-padding":
        batch = _mixed_padding(batch)
    refs = _refs(3)
    l, sq = pair_losses_and_penalties(model, batch, refs[0], refs[1], BETA)
    assert not l.requires_grad and all(p.grad is None for p in model.parameters())
    for penalty in ("rows", "tuple"):
        _, sqs, losses = _reference_objective(model, batch, refs, RHO0, penalty)
        assert_allclose(sq[penalty].numpy(), [float(s) for s in sqs], rtol=RTOL)
        assert_allclose(l.numpy(), losses, rtol=RTOL)
    if layout == "mixed-padding":
        assert float((sq["rows"] - sq["tuple"]).abs().max()) > 1e-3 * float(sq["rows"].abs().max())
