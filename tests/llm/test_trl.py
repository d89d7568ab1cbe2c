"""TRL integration: KLDPOTrainer / WDPOTrainer run, and compute the same loss as preference_loss."""

from __future__ import annotations


import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from drdpo_theory.llm.data import PreferenceCollator, load_preferences, tokenize_pair  # noqa: E402
from drdpo_theory.llm.logprobs import concatenated_logps  # noqa: E402
from drdpo_theory.llm.models import load_model  # noqa: E402
from drdpo_theory.llm.objectives import LossConfig, preference_loss  # noqa: E402
from drdpo_theory.llm.trl_adapter import TESTED_TRL_VERSION, KLDPOTrainer, WDPOTrainer  # noqa: E402
from tests.llm.conftest import tie_embeddings  # noqa: E402

pytestmark = [
    pytest.mark.llm,
    pytest.mark.skipif(
        trl.__version__ != TESTED_TRL_VERSION,
        reason=f"trl_adapter was checked against trl {TESTED_TRL_VERSION}; installed trl {trl.__version__}",
    ),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6  # same tokens, same reference, same loss code: float32 round-off
REF_RTOL = 1e-4  # sequence log-probs of ~-150 nats from differently padded float32 forwards
N_PAIRS = 8


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _trainer(cls, tmp_path, max_steps=2, eval_dataset=False, config=None, model_hook=None, **kw):
    model, tok = load_model("tiny-random")
    if model_hook is not None:
        model = model_hook(model)
    records = load_preferences("toy")[:N_PAIRS]
    args = trl.DPOConfig(**{
        **dict(
            output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
            beta=0.5, max_length=128, precompute_ref_log_probs=True, report_to=[], use_cpu=True,
            logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, per_device_eval_batch_size=4,
        ),
        **(config or {}),
    })
    ds = datasets.Dataset.from_list(records)
    trainer = cls(model=model, args=args, train_dataset=ds, eval_dataset=ds if eval_dataset else None,
                  processing_class=tok, **kw)
    return trainer, model, tok, records


@pytest.mark.parametrize(
    "cls, kw, key",
    [(KLDPOTrainer, {"tau": 0.5}, "kldpo/ess"), (WDPOTrainer, {"wdpo_impl": "finite-diff", "rho0": 0.01}, "wdpo/penalty")],
    ids=["kldpo", "wdpo"],
)
def test_trl_subclass_trains_two_steps(tmp_path, cls, kw, key):
    trainer, *_ = _trainer(cls, tmp_path, **kw)
    out = trainer.train()
    assert out.global_step == 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all(key in h for h in logs)


@pytest.mark.parametrize(
    "cls, kw",
    [(KLDPOTrainer, {"tau": 0.5}), (WDPOTrainer, {"wdpo_impl": "finite-diff", "rho0": 0.01})],
    ids=["kldpo", "wdpo"],
)
def test_trl_loss_equals_preference_loss_on_our_pipeline(tmp_path, cls, kw):
    """TRL's tokenisation + reference + compute_loss == our data module + concatenated_logps + preference_loss."""
    trainer, model, tok, records = _trainer(cls, tmp_path, **kw)
    rows = [trainer.train_dataset[i] for i in range(N_PAIRS)]
    ours = [tokenize_pair(tok, r, max_length=128, max_prompt_length=64, index=i) for i, r in enumerate(records)]
    for row, pair in zip(rows, ours):  # identical token ids
        assert row["prompt_ids"] == list(pair.prompt_ids)
        assert row["chosen_ids"] == list(pair.chosen_ids)
        assert row["rejected_ids"] == list(pair.rejected_ids)
    trl_batch = trainer.data_collator(rows)
    policy = trainer.model
    policy.train()

    batch = PreferenceCollator(tok.pad_token_id)(ours)
    inputs = {k: v for k, v in batch.items() if k != "index"}
    with torch.no_grad():
        ref_c, ref_r = concatenated_logps(policy, inputs)  # no step taken yet: policy == reference
    # TRL precomputes with its fused LM head in other batches (other padding): float32 agreement only
    torch.testing.assert_close(ref_c, trl_batch["ref_chosen_logps"], rtol=REF_RTOL, atol=0.0)
    torch.testing.assert_close(ref_r, trl_batch["ref_rejected_logps"], rtol=REF_RTOL, atol=0.0)
    ref_c, ref_r = trl_batch["ref_chosen_logps"], trl_batch["ref_rejected_logps"]  # same reference for both
    # move the policy away from the reference so that margins (and KLDPO weights) are not trivial
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    loss_trl = trainer.compute_loss(policy, trl_batch)
    cfg = LossConfig(method=cls._method, beta=0.5, **kw)
    loss_ours, metrics = preference_loss(policy, inputs, ref_c, ref_r, cfg)
    torch.testing.assert_close(loss_trl.detach(), loss_ours.detach(), rtol=LOSS_RTOL, atol=LOSS_ATOL)
    # the policy really differs from the reference (the implicit rewards are not ~0)
    assert abs(metrics["rewards/chosen"]) > 0.1 and abs(metrics["rewards/rejected"]) > 0.1, metrics


def test_trl_subclass_rejects_settings_that_change_the_loss(tmp_path):
    model, tok = load_model("tiny-random")
    args = trl.DPOConfig(output_dir=str(tmp_path), loss_type=["hinge"], report_to=[], use_cpu=True,
                         max_length=128, precompute_ref_log_probs=True)
    ds = datasets.Dataset.from_list(load_preferences("toy")[:4])
    with pytest.raises(ValueError, match=r"unsupported DPOConfig: loss_type=\['hinge'\]"):
        KLDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)


METHODS = [
    (KLDPOTrainer, {"tau": 0.5}),
    (WDPOTrainer, {"wdpo_impl": "finite-diff", "rho0": 0.01}),
    (WDPOTrainer, {"wdpo_impl": "double-backward", "rho0": 0.01}),
]
METHOD_IDS = ["kldpo", "wdpo-finite-diff", "wdpo-double-backward"]


@pytest.mark.parametrize("cls, kw", METHODS, ids=METHOD_IDS)
def test_trl_evaluate_reports_the_method_objective(tmp_path, cls, kw):
    """evaluate() runs for every method; eval_loss is the method's objective on the evaluation pairs.

    WDPO: eval_loss = eval_dpo_loss + eval_wdpo/penalty (the penalised objective; the
    embedding gradient is taken inside TRL's no_grad evaluation loop), and no parameter
    receives a gradient.
    """
    from drdpo_theory.llm.objectives import preference_eval

    trainer, model, *_ = _trainer(cls, tmp_path, eval_dataset=True, **kw)
    model.zero_grad(set_to_none=True)
    out = trainer.evaluate()
    assert all(p.grad is None for p in model.parameters())
    assert torch.isfinite(torch.tensor(out["eval_loss"]))
    # the same numbers by hand: both eval batches of 4 pairs, averaged (TRL averages batch losses)
    trainer.model.eval()
    losses = []
    for inputs in trainer.get_eval_dataloader():
        inputs = trainer._prepare_inputs(inputs)
        batch, rc, rr = trainer._batch_and_refs(inputs)
        loss, _ = preference_eval(trainer.model, batch, rc, rr, trainer.loss_config, logps_fn=trainer._logps_fn)
        losses.append(float(loss))
    torch.testing.assert_close(out["eval_loss"], sum(losses) / len(losses), rtol=1e-5, atol=0.0)
    if cls is WDPOTrainer:
        torch.testing.assert_close(out["eval_loss"], out["eval_dpo_loss"] + out["eval_wdpo/penalty"], rtol=1e-5, atol=0.0)
        assert out["eval_wdpo/penalty"] > 0


def _flat_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("chunks", [1, 2])
def test_trl_wdpo_training_step_runs_two_passes_with_the_surrogate_gradient(tmp_path, monkeypatch, chunks):
    """WDPOTrainer.training_step (two passes) accumulates what TRL's single backward of the surrogate would.

    Two micro-batches with gradient accumulation 2: the accumulated gradient equals that of
    TRL's own training_step on compute_loss (the single surrogate), and the returned loss is
    the penalised objective divided by the accumulation steps; with fd_pass2_chunks = 2 the
    second pass runs as two backward calls, also through accelerate.
    """
    kw = {"wdpo_impl": "finite-diff", "rho0": 0.01, "fd_step": 1e-2, "fd_pass2_chunks": chunks}
    trainer, model, *_ = _trainer(WDPOTrainer, tmp_path, config={"gradient_accumulation_steps": 2}, **kw)
    trainer.current_gradient_accumulation_steps = 2
    batches = [trainer._prepare_inputs(b) for b in list(trainer.get_train_dataloader())[:2]]
    calls = []
    orig = type(trainer.accelerator).backward
    monkeypatch.setattr(type(trainer.accelerator), "backward", lambda self, t, **k: (calls.append(1), orig(self, t, **k)))

    def accumulate(two_pass):
        monkeypatch.setattr(WDPOTrainer, "_two_pass", lambda self: two_pass)
        model.zero_grad(set_to_none=True)
        losses = [float(trainer.training_step(trainer.model, dict(b))) for b in batches]
        return _flat_grads(model), losses

    calls.clear()
    g_two, loss_two = accumulate(True)
    # per micro-batch: pass 1, then pass 2 in `chunks` pair chunks, every backward through accelerate
    assert len(calls) == 2 * (1 + chunks), len(calls)
    g_one, loss_one = accumulate(False)
    err = float((g_two - g_one).norm() / g_one.norm())
    assert err < 1e-4, err
    torch.testing.assert_close(torch.tensor(loss_two), torch.tensor(loss_one), rtol=1e-5, atol=0.0)


def test_trl_refuses_liger_kernel(tmp_path):
    model, tok = load_model("tiny-random")
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=128,
                         precompute_ref_log_probs=True, use_liger_kernel=True)
    ds = datasets.Dataset.from_list(load_preferences("toy")[:4])
    with pytest.raises(ValueError, match="use_liger_kernel=True .need False: the loss computes its own log-probs"):
        WDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)


@pytest.mark.parametrize("cls, kw", [(KLDPOTrainer, {"tau": 0.5}), (WDPOTrainer, {"wdpo_impl": "finite-diff", "rho0": 0.01})],
                         ids=["kldpo", "wdpo"])
def test_trl_full_logits_head_gives_the_fused_heads_loss_and_gradient(tmp_path, cls, kw):
    """lm_head="full" (the model's logits, as drdpo align) and the default fused head: same loss and
    training-step gradient to float32 rounding; a bad value is refused."""
    grads, losses = [], []
    for head in ("fused", "full"):
        trainer, model, *_ = _trainer(cls, tmp_path / head, lm_head=head, **kw)
        assert trainer._logps_fn.__name__ == {"fused": "fused_lm_head_logps", "full": "concatenated_logps"}[head]
        trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step reads it
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        model.zero_grad(set_to_none=True)
        losses.append(float(trainer.training_step(trainer.model, dict(batch))))
        grads.append(_flat_grads(model))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0.0)
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-4
    with pytest.raises(ValueError, match="lm_head must be one of"):
        _trainer(cls, tmp_path / "bad", lm_head="tiled", **kw)


def test_trl_lm_head_auto_is_full_on_cpu_and_for_peft(tmp_path):
    """The default lm_head="auto" resolves after TRL wraps the model: the model's own forward (head on the
    completion positions) on CPU and for a LoRA model; TRL's fused head for full fine-tuning on an accelerator."""
    from peft import LoraConfig

    from drdpo_theory.llm.trl_adapter import auto_lm_head

    trainer, *_ = _trainer(KLDPOTrainer, tmp_path / "full", tau=0.5)
    assert trainer.lm_head == "full" and trainer._logps_fn.__name__ == "concatenated_logps"
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer, *_ = _trainer(KLDPOTrainer, tmp_path / "lora", tau=0.5, peft_config=lora)
    assert trainer.lm_head == "full" and trainer._logps_fn.__name__ == "concatenated_logps"
    trainer, *_ = _trainer(KLDPOTrainer, tmp_path / "fused", tau=0.5, lm_head="fused")
    assert trainer.lm_head == "fused" and trainer._logps_fn.__name__ == "fused_lm_head_logps"
    assert [auto_lm_head(p, d) for p, d in [(False, "cpu"), (True, "cpu"), (True, "cuda"), (False, "cuda")]] == [
        "full", "full", "full", "fused"]


@pytest.mark.parametrize("head", ["fused", "full"])
def test_trl_tied_embedding_gradient_sparse_in_one_process_same_gradient(tmp_path, head):
    """One process, tied table: the adapter's trainers take the lookup gradient sparse (as drdpo align); the
    training-step gradient equals the dense one's and .grad stays dense. Untied or LoRA: off."""
    kw = {"wdpo_impl": "finite-diff", "rho0": 0.01, "fd_step": 1e-2, "lm_head": head}
    trainer, model, *_ = _trainer(WDPOTrainer, tmp_path / "untied", **kw)
    assert trainer.sparse_embedding_grad is False and model.get_input_embeddings().sparse is False
    grads = []
    for sparse in (True, False):
        trainer, model, *_ = _trainer(WDPOTrainer, tmp_path / f"tied-{sparse}", model_hook=tie_embeddings, **kw)
        emb = model.get_input_embeddings()
        assert trainer.sparse_embedding_grad is True and emb.sparse is True
        emb.sparse = sparse
        trainer.current_gradient_accumulation_steps = 1
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        model.zero_grad(set_to_none=True)
        trainer.training_step(trainer.model, dict(batch))
        assert emb.weight.grad.layout == torch.strided
        grads.append(_flat_grads(model))
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-5
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer, *_ = _trainer(KLDPOTrainer, tmp_path / "lora", tau=0.5, peft_config=lora, model_hook=tie_embeddings)
    assert trainer.sparse_embedding_grad is False
