"""TRL adapter trainers of the robust family: same loss and gradient as `drdpo align`, training, evaluation, groups.

For every member the trainer's ``compute_loss`` on TRL's batch (TRL tokenisation, collator and
fused LM head) is compared with the ``drdpo align`` objective (``TrainConfig(...).loss_config()``
through ``preference_loss`` on our own tokenisation, collator and log-probs) on the same model
and pairs: value and parameter gradient. ``GroupDPOTrainer`` carries the per-pair ``group``
column through TRL's column pruning and collator; its EG group weights are compared with a
separately built state, saved in TRL checkpoints and restored on resume.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from drdpo_theory.llm.data import PreferenceCollator, load_preferences, tokenize_pair  # noqa: E402
from drdpo_theory.llm.family import GroupEGState  # noqa: E402
from drdpo_theory.llm.logprobs import concatenated_logps  # noqa: E402
from drdpo_theory.llm.models import load_model  # noqa: E402
from drdpo_theory.llm.objectives import preference_eval, preference_loss  # noqa: E402
from drdpo_theory.llm.trainer import TrainConfig  # noqa: E402
from drdpo_theory.llm.trl_adapter import (  # noqa: E402
    GROUP_STATE_FILE,
    TESTED_TRL_VERSION,
    CDPOTrainer,
    Chi2DPOTrainer,
    CVaRDPOTrainer,
    DrDPOTrainer,
    GroupDPOTrainer,
    RDPOTrainer,
)

pytestmark = [
    pytest.mark.llm,
    pytest.mark.skipif(
        trl.__version__ != TESTED_TRL_VERSION,
        reason=f"trl_adapter was checked against trl {TESTED_TRL_VERSION}; installed trl {trl.__version__}",
    ),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6  # fused-head vs concatenated float32 log-probs: round-off only
GRAD_RTOL = 1e-4  # relative norm of the gradient difference (float32, two log-prob kernels)
BETA = 0.5
N_PAIRS = 8
GROUPS = [0, 1, 2, 0, 1, 2, 0, 1]  # three groups of sizes 3, 3, 2

# member -> (trainer class, keyword arguments = drdpo align options, a metric only that member logs)
MEMBERS = {
    "rdpo": (RDPOTrainer, {"eps": 0.2}, "dpo_loss"),
    "cdpo": (CDPOTrainer, {"eps": 0.2}, "dpo_loss"),
    "chi2dpo": (Chi2DPOTrainer, {"rho": 0.5}, "chi2dpo/eta"),
    "cvardpo": (CVaRDPOTrainer, {"alpha": 0.5}, "cvardpo/eta"),
    "groupdpo-eg": (GroupDPOTrainer, {"group_step": 2.0}, "groupdpo/q_max"),
    "groupdpo-worst": (GroupDPOTrainer, {"group_weights": "worst"}, "groupdpo/worst_group"),
    "dr_dpo": (DrDPOTrainer, {"beta_prime": 0.5}, "dr_dpo/weight_max"),
}


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _records(with_groups=True):
    records = load_preferences("toy")[:N_PAIRS]
    return [{**r, "group": g} for r, g in zip(records, GROUPS)] if with_groups else records


def _trainer(cls, tmp_path, kw, max_steps=2, eval_dataset=False, config=None, records=None):
    model, tok = load_model("tiny-random")
    records = _records() if records is None else records
    args = trl.DPOConfig(**{
        **dict(
            output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
            beta=BETA, max_length=128, precompute_ref_log_probs=True, report_to=[], use_cpu=True,
            logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, per_device_eval_batch_size=4,
        ),
        **(config or {}),
    })
    ds = datasets.Dataset.from_list(records)
    trainer = cls(model=model, args=args, train_dataset=ds, eval_dataset=ds if eval_dataset else None,
                  processing_class=tok, **kw)
    return trainer, model, tok, records


def _method(member):
    return member.split("-")[0]


def _align_loss_config(member, kw):
    """The objective `drdpo align --method M <flags>` trains with (TrainConfig -> LossConfig)."""
    return TrainConfig(method=_method(member), beta=BETA, model_spec="tiny-random", **kw).loss_config()


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("member", list(MEMBERS))
def test_trl_member_loss_and_gradient_equal_the_align_objective(tmp_path, member):
    cls, kw, _ = MEMBERS[member]
    trainer, model, tok, records = _trainer(cls, tmp_path, kw)
    rows = [trainer.train_dataset[i] for i in range(N_PAIRS)]
    trl_batch = trainer.data_collator(rows)
    ours = [tokenize_pair(tok, r, max_length=128, max_prompt_length=64, index=i) for i, r in enumerate(records)]
    for row, pair in zip(rows, ours):  # identical token ids
        assert row["prompt_ids"] == list(pair.prompt_ids)
        assert row["chosen_ids"] == list(pair.chosen_ids) and row["rejected_ids"] == list(pair.rejected_ids)
    batch = PreferenceCollator(tok.pad_token_id)(ours)
    inputs = {k: v for k, v in batch.items() if k != "index"}
    if _method(member) == "groupdpo":  # the group column survived TRL's pipeline, in order
        assert trl_batch["group"].tolist() == GROUPS == inputs["group"].tolist()
    else:
        assert "group" not in trl_batch
    ref_c, ref_r = trl_batch["ref_chosen_logps"], trl_batch["ref_rejected_logps"]
    policy = trainer.model
    policy.train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the reference: margins, weights and group losses are not trivial
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    cfg = _align_loss_config(member, kw)
    state = None
    if member == "groupdpo-eg":  # built here from the records, as drdpo align's Trainer does
        state = GroupEGState.from_data(GROUPS, step=kw["group_step"])
        np.testing.assert_array_equal(trainer.group_state.q, state.q)

    policy.zero_grad(set_to_none=True)
    loss_trl = trainer.compute_loss(policy, trl_batch)
    loss_trl.backward()
    g_trl = _grads(policy)
    policy.zero_grad(set_to_none=True)
    loss_ours, metrics = preference_loss(policy, inputs, ref_c, ref_r, cfg, group_state=state)
    loss_ours.backward()
    g_ours = _grads(policy)

    torch.testing.assert_close(loss_trl.detach(), loss_ours.detach(), rtol=LOSS_RTOL, atol=LOSS_ATOL)
    err = float((g_trl - g_ours).norm() / g_ours.norm())
    assert err < GRAD_RTOL, err
    # the member is exercised: its objective differs from plain DPO on this batch
    assert abs(float(loss_ours) - metrics["dpo_loss"]) > 1e-3, (float(loss_ours), metrics["dpo_loss"])
    if member == "groupdpo-eg":  # both states took the same EG step from the same group losses
        assert trainer.group_state.updates == state.updates == 1
        np.testing.assert_allclose(trainer.group_state.q, state.q, rtol=1e-6, atol=0.0)
        assert np.ptp(state.q) > 1e-3  # the step moved q away from uniform


@pytest.mark.parametrize("member", list(MEMBERS))
def test_trl_member_trains_logs_and_evaluates(tmp_path, member):
    """Two training steps log the member's metric; evaluate() reports its objective on the eval pairs.

    eval_loss is recomputed independently: our tokenisation and log-probs, preference_eval of
    the drdpo align objective on TRL's two eval batches (4 pairs each, in order), averaged.
    """
    cls, kw, key = MEMBERS[member]
    trainer, model, tok, records = _trainer(cls, tmp_path, kw, eval_dataset=True)
    out = trainer.train()
    assert out.global_step == 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(np.isfinite(h["loss"]) for h in logs)
    assert all(key in h for h in logs), logs[0].keys()
    if member == "groupdpo-eg":
        assert trainer.group_state.updates == 2
        for h in logs:  # the logged weights form a distribution over the three groups
            np.testing.assert_allclose(sum(h[f"groupdpo/q_{g}"] for g in (0, 1, 2)), 1.0, rtol=1e-12)
        np.testing.assert_allclose([logs[-1][f"groupdpo/q_{g}"] for g in (0, 1, 2)], trainer.group_state.q, rtol=1e-12)
        q_before = trainer.group_state.q.copy()

    model.zero_grad(set_to_none=True)
    res = trainer.evaluate()
    assert all(p.grad is None for p in model.parameters())
    policy = trainer.model
    policy.eval()
    cfg = _align_loss_config(member, kw)
    ours = [tokenize_pair(tok, r, max_length=128, max_prompt_length=64, index=i) for i, r in enumerate(records)]
    rows = [trainer.eval_dataset[i] for i in range(N_PAIRS)]
    values = []
    for lo in (0, 4):
        batch = PreferenceCollator(tok.pad_token_id)(ours[lo:lo + 4])
        inputs = {k: v for k, v in batch.items() if k != "index"}
        rc = torch.tensor([r["ref_chosen_logps"] for r in rows[lo:lo + 4]])
        rr = torch.tensor([r["ref_rejected_logps"] for r in rows[lo:lo + 4]])
        loss, _ = preference_eval(policy, inputs, rc, rr, cfg, group_state=trainer.group_state)
        values.append(float(loss))
    np.testing.assert_allclose(res["eval_loss"], np.mean(values), rtol=LOSS_RTOL, atol=LOSS_ATOL)
    if member == "groupdpo-eg":  # evaluation reads q and never updates it
        assert trainer.group_state.updates == 2
        np.testing.assert_array_equal(trainer.group_state.q, q_before)


def test_trl_groupdpo_needs_a_group_column(tmp_path):
    with pytest.raises(ValueError, match=r"GroupDPOTrainer needs an integer 'group' column in train_dataset"):
        _trainer(GroupDPOTrainer, tmp_path, {}, records=_records(with_groups=False))
    bad = [{**r, "group": 0.5} for r in _records(with_groups=False)]
    with pytest.raises(ValueError, match=r"train_dataset\['group'\] must hold one integer per pair; row 0 has 0.5"):
        _trainer(GroupDPOTrainer, tmp_path, {}, records=bad)
    # a collated batch that lost the column (custom collator) is refused by name
    trainer, *_ = _trainer(GroupDPOTrainer, tmp_path, {})
    rows = [{k: v for k, v in trainer.train_dataset[i].items() if k != "group"} for i in range(4)]
    with pytest.raises(ValueError, match="example 0 of the batch has no 'group' value"):
        trainer.data_collator(rows)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    batch.pop("group")
    with pytest.raises(ValueError, match="the batch has no 'group' tensor"):
        trainer.compute_loss(trainer.model, batch)


def test_trl_member_options_are_required_and_checked(tmp_path):
    with pytest.raises(ValueError, match="method='chi2dpo' needs the chi2 radius rho"):
        _trainer(Chi2DPOTrainer, tmp_path, {})
    with pytest.raises(ValueError, match="needs a flip rate eps"):
        _trainer(RDPOTrainer, tmp_path, {"eps": 0.5})
    with pytest.raises(ValueError, match="group_weights must be one of"):
        _trainer(GroupDPOTrainer, tmp_path, {"group_weights": "max"})
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 \(need 0"):
        _trainer(CDPOTrainer, tmp_path, {"eps": 0.1}, config={"label_smoothing": 0.1})


def test_trl_groupdpo_eg_state_is_checkpointed_and_resumed_exactly(tmp_path):
    """4 steps with a checkpoint at step 2, and 2 more steps resumed from it: the same q, bit for bit."""
    kw = {"group_step": 1.0}
    save = {"save_strategy": "steps", "save_steps": 2}
    full, *_ = _trainer(GroupDPOTrainer, tmp_path / "full", kw, max_steps=4, config=save)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    saved = json.loads((ckpt / GROUP_STATE_FILE).read_text())
    assert saved["updates"] == 2 and saved["num_groups"] == 3 and saved["labels"] == [0, 1, 2]
    assert full.group_state.updates == 4
    q_logged = [full.state.log_history[i] for i in range(len(full.state.log_history)) if "loss" in full.state.log_history[i]]
    np.testing.assert_array_equal(saved["q"], [q_logged[1][f"groupdpo/q_{g}"] for g in (0, 1, 2)])

    resumed, *_ = _trainer(GroupDPOTrainer, tmp_path / "resumed", kw, max_steps=4, config=save)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.group_state.updates == 4
    np.testing.assert_array_equal(resumed.group_state.q, full.group_state.q)

    other, *_ = _trainer(GroupDPOTrainer, tmp_path / "other", {"group_step": 0.5}, max_steps=4, config=save)
    with pytest.raises(ValueError, match="group-weight state has step 1.0, this run 0.5"):
        other.train(resume_from_checkpoint=str(ckpt))
