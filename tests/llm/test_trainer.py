"""The native trainer: learning, exact resume, NaN guard, reference cache, DDP, and the CLI."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("safetensors")

from drdpo_theory.llm.cli import register  # noqa: E402
from drdpo_theory.llm.data import PreferenceCollator, load_preferences, tokenize_preferences  # noqa: E402
from drdpo_theory.llm.models import load_model  # noqa: E402
from drdpo_theory.llm.trainer import (  # noqa: E402
    BASE_COLUMNS,
    NonFiniteError,
    TrainConfig,
    Trainer,
    cosine_with_warmup,
    latest_checkpoint,
    train,
)
from tests.llm.conftest import tie_embeddings  # noqa: E402

pytestmark = [pytest.mark.llm, pytest.mark.filterwarnings("ignore:WDPO double-backward needs")]

RESUME_RTOL, RESUME_ATOL = 0.0, 1e-7  # fp32, deterministic CPU kernels: resumed == uninterrupted
REF_RTOL, REF_ATOL = 1e-5, 1e-4  # reference log-probs of ~-150 nats under different padding
ACCUM_RTOL, ACCUM_ATOL = 1e-5, 1e-6  # 2x4 accumulated vs 1x8 batch: summation order only
DDP_RTOL, DDP_ATOL = 1e-4, 1e-5  # 2 ranks x 2 pairs vs 1 rank x 4 pairs: reduction order only
LEARN_MARGIN = 0.05  # mean loss of the last 5 steps must be this much below the first 5

METHODS = [
    {"method": "dpo"},
    {"method": "ipo", "beta": 0.5},
    {"method": "kldpo"},
    {"method": "wdpo", "wdpo_impl": "double-backward"},
    {"method": "wdpo", "wdpo_impl": "finite-diff"},
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest and avoids oversubscription on shared CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _setup(**kw):
    model, tok = load_model("tiny-random")
    pairs = tokenize_preferences(tok, load_preferences("toy"), max_length=128, max_prompt_length=64)
    base = dict(lr=1e-2, batch_size=4, max_steps=6, progress=False, beta=0.5, model_spec="tiny-random")
    base.update(kw)
    return TrainConfig(**base), model, tok, pairs


def _run(out, resume_from=None, on_step=None, **kw):
    cfg, model, tok, pairs = _setup(output_dir=str(out), **kw)
    return train(cfg, model, tok, pairs, resume_from=resume_from, on_step=on_step)


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- config


def test_config_fields_have_help_and_are_validated():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
    bad = [
        ({"method": "robust"}, "method must be one of"),
        ({"method": "rdpo"}, r"needs a flip rate eps in \[0, 0.5\)"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"max_steps": 0}, "max_steps must be an integer >= 1"),
        ({"max_prompt_length": 512, "max_length": 512}, "max_prompt_length must be < max_length"),
        ({"method": "kldpo", "kldpo_variant": "calibrated"}, "rho must be set"),
        ({"precision": "fp16"}, "precision must be one of"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**kw)


def test_cosine_with_warmup_schedule():
    W, S, r = 3, 13, 0.1
    m = [cosine_with_warmup(t, W, S, r) for t in range(S)]
    np.testing.assert_allclose(m[:W], [1 / 4, 2 / 4, 3 / 4], rtol=1e-12)
    assert m[W] == 1.0
    np.testing.assert_allclose(m[W + 5], r + (1 - r) * 0.5, rtol=1e-12)  # half way through the cosine
    np.testing.assert_allclose(cosine_with_warmup(S, W, S, r), r, rtol=1e-12)
    assert all(a >= b for a, b in zip(m[W:], m[W + 1:]))
    assert cosine_with_warmup(10, 0, 13, cosine=False) == 1.0


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("kw", METHODS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_training_decreases_the_loss(tmp_path, kw):
    res = _run(tmp_path, max_steps=30, checkpoint_every=0, **kw)
    assert len(res.losses) == 30 and all(np.isfinite(res.losses))
    first, last = np.mean(res.losses[:5]), np.mean(res.losses[-5:])
    assert last < first - LEARN_MARGIN, (first, last)
    rows = _rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert list(rows[0])[: len(BASE_COLUMNS)] == list(BASE_COLUMNS)
    expected = {"rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "dpo_loss"}
    if kw["method"] == "kldpo":
        expected |= {"kldpo/weight_min", "kldpo/weight_max", "kldpo/weight_mean", "kldpo/ess"}
    if kw["method"] == "wdpo":
        expected |= {"wdpo/penalty", "wdpo/grad_emb_norm"}
    assert expected <= set(rows[0]), set(rows[0])
    np.testing.assert_allclose([float(r["loss"]) for r in rows], res.losses, rtol=1e-12)


def test_lora_trains_only_adapters(tmp_path):
    res = _run(tmp_path, max_steps=30, lora=True, lora_r=4, lr=2e-2)
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5]) - LEARN_MARGIN
    from safetensors.torch import load_file

    names = list(load_file(str(res.checkpoint / "trainable.safetensors")))
    assert names and all("lora_" in n for n in names), names


@pytest.mark.parametrize("kw", [{"method": "dpo"}, {"method": "wdpo", "wdpo_impl": "finite-diff"}], ids=["dpo", "wdpo-fd"])
def test_bf16_mixed_runs(tmp_path, kw):
    res = _run(tmp_path, max_steps=3, precision="bf16-mixed", **kw)
    assert all(np.isfinite(res.losses))


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "kw",
    [
        {"method": "kldpo", "warmup_steps": 2},
        {"method": "wdpo", "wdpo_impl": "finite-diff"},
        {"method": "dpo", "lora": True, "reference": "model", "grad_accum": 2},
    ],
    ids=["kldpo-precompute", "wdpo-fd", "dpo-lora-refmodel-accum"],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, kw):
    full = _run(tmp_path / "full", checkpoint_every=3, **kw)
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000003"
    assert ckpt.is_dir()
    resumed = _run(tmp_path / "resumed", resume_from=ckpt, checkpoint_every=3, **kw)
    assert resumed.start_step == 3 and resumed.final_step == 6
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(full.losses[3:]), rtol=RESUME_RTOL, atol=RESUME_ATOL
    )
    from safetensors.torch import load_file

    a = load_file(str(full.checkpoint / "trainable.safetensors"))
    b = load_file(str(resumed.checkpoint / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=RESUME_RTOL, atol=RESUME_ATOL)


def test_keyboard_interrupt_saves_and_auto_resumes(tmp_path):
    full = _run(tmp_path / "full", method="kldpo")

    def stop(row):
        if row["step"] == 4:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    part = _run(out, on_step=stop, method="kldpo", checkpoint_every=0)
    assert part.interrupted and part.final_step == 4
    assert latest_checkpoint(out).name == "step-00000004"
    rest = _run(out, resume_from="auto", method="kldpo")
    torch.testing.assert_close(
        torch.tensor(rest.losses), torch.tensor(full.losses[4:]), rtol=RESUME_RTOL, atol=RESUME_ATOL
    )
    # metrics.csv holds every step once, in order, with the uninterrupted values
    losses = [float(r["loss"]) for r in _rows(out / "metrics.csv")]
    np.testing.assert_allclose(losses, full.losses, rtol=0, atol=RESUME_ATOL)


def test_resume_refuses_a_changed_objective(tmp_path):
    _run(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=r"cannot resume with a different configuration; changed: beta"):
        _run(tmp_path, resume_from="auto", max_steps=4, beta=0.1)


# --------------------------------------------------------------------------- NaN guard


def _poison(row):
    """on_step hook: after step 2 every embedding becomes NaN, so step 3's loss is NaN."""
    if row["step"] == 2:
        _poison.model.get_input_embeddings().weight.data[:] = float("nan")


@pytest.mark.parametrize("how", ["nan-weights", "huge-lr"])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, how):
    cfg, model, tok, pairs = _setup(output_dir=str(tmp_path), checkpoint_every=1)
    if how == "huge-lr":
        cfg = dataclasses.replace(cfg, lr=1e30)
        on_step = None
    else:
        _poison.model = model
        on_step = _poison
    with pytest.raises(NonFiniteError, match=r"non-finite (loss|gradient norm) at step \d+; training stopped") as err:
        train(cfg, model, tok, pairs, on_step=on_step)
    last = latest_checkpoint(tmp_path)
    assert last is not None and str(last) in str(err.value)
    if how == "nan-weights":
        assert "at step 3" in str(err.value) and last.name == "step-00000002"
    # the last good checkpoint loads into a fresh trainer and holds finite weights
    cfg2, model2, tok2, pairs2 = _setup(output_dir=str(tmp_path / "again"), checkpoint_every=1,
                                        lr=cfg.lr)
    trainer = Trainer(cfg2, model2, tok2, pairs2)
    trainer.load_checkpoint(last)
    assert trainer.step == int(last.name.split("-")[1])
    assert all(torch.isfinite(p).all() for p in trainer.params)
    assert not (tmp_path / "checkpoints" / f"step-{trainer.step + 1:08d}").exists()


# --------------------------------------------------------------------------- reference


def test_reference_cache_is_written_reused_and_correct(tmp_path):
    from drdpo_theory.llm.logprobs import concatenated_logps
    from safetensors.torch import load_file

    cfg, model, tok, pairs = _setup(output_dir=str(tmp_path), max_steps=1)
    with torch.no_grad():
        batch = PreferenceCollator(tok.pad_token_id)(pairs)
        want_c, want_r = concatenated_logps(model, {k: v for k, v in batch.items() if k != "index"})
    train(cfg, model, tok, pairs)
    cache = tmp_path / "ref_logps.safetensors"
    got = load_file(str(cache))
    torch.testing.assert_close(got["chosen"], want_c, rtol=REF_RTOL, atol=REF_ATOL)
    torch.testing.assert_close(got["rejected"], want_r, rtol=REF_RTOL, atol=REF_ATOL)
    mtime = cache.stat().st_mtime_ns
    _run(tmp_path, resume_from="auto", max_steps=2)
    assert cache.stat().st_mtime_ns == mtime  # reused, not recomputed


def test_frozen_reference_model_matches_precomputed(tmp_path):
    a = _run(tmp_path / "a", reference="precompute", method="kldpo")
    b = _run(tmp_path / "b", reference="model", method="kldpo")
    torch.testing.assert_close(torch.tensor(b.losses), torch.tensor(a.losses), rtol=REF_RTOL, atol=REF_ATOL)


def test_grad_accumulation_matches_the_large_batch(tmp_path):
    a = _run(tmp_path / "a", batch_size=4, grad_accum=2, max_steps=3)
    b = _run(tmp_path / "b", batch_size=8, grad_accum=1, max_steps=3)
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=ACCUM_RTOL, atol=ACCUM_ATOL)


# fp32 model: the two-pass WDPO gradient adds (1 - c) P1 and c P2 with c = 2 rho0 / h, so rounding
# differences from the surrogate's single backward scale with c (see tests/llm/test_wdpo.py)
TWO_PASS_ROUND = 10.0  # allowed |difference| = TWO_PASS_ROUND * eps(float32) * c * max|gradient|


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_train_step_accumulates_the_surrogate_gradient(tmp_path, lora):
    """WDPO finite-diff, 2 micro-batches: the trainer's two-pass gradient (preference_backward,
    loss_scale 1/2) equals the mean of the surrogate preference_loss gradients of the micro-batches
    (LoRA: frozen embedding table, adapters only)."""
    from drdpo_theory.llm.objectives import preference_loss

    cfg, model, tok, pairs = _setup(output_dir=str(tmp_path), method="wdpo", wdpo_impl="finite-diff", rho0=0.05,
                                    batch_size=2, grad_accum=2, max_grad_norm=0.0, lora=lora, lora_r=4)
    trainer = Trainer(cfg, model, tok, pairs)
    trainer.precompute_reference()
    expected = [torch.zeros_like(p) for p in trainer.params]
    c_max = 0.0
    for micro in range(cfg.grad_accum):
        batch = trainer._batch_at(micro)
        ref_c, ref_r = trainer._reference_logps(batch)
        trainer.model.zero_grad(set_to_none=True)
        loss, m = preference_loss(trainer.model, {k: v for k, v in batch.items() if k != "index"}, ref_c, ref_r,
                                  trainer.loss_cfg)
        (loss / cfg.grad_accum).backward()
        c_max = max(c_max, 2 * cfg.rho0 / m["wdpo/fd_h"])
        for e, p in zip(expected, trainer.params):
            e += p.grad
    seen = {}

    def record(opt, args, kwargs):
        seen["grads"] = [p.grad.clone() for p in trainer.params]

    trainer.optimizer.register_step_pre_hook(record)
    trainer.train_step()
    g_max = max(float(e.abs().max()) for e in expected)
    atol = TWO_PASS_ROUND * torch.finfo(torch.float32).eps * c_max * g_max
    for name, got, want in zip(trainer.param_names, seen["grads"], expected):
        torch.testing.assert_close(got, want, rtol=0.0, atol=atol, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------- DDP


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw, port",
    [({"method": "kldpo"}, 29517), ({"method": "wdpo", "wdpo_impl": "finite-diff", "rho0": 0.05}, 29518)],
    ids=["kldpo", "wdpo-fd-two-pass"],
)
def test_ddp_two_processes_match_one_process(tmp_path, kw, port):
    """torchrun, 2 CPU ranks x 2 pairs, gloo: same trajectory as 1 process x 4 pairs.

    KLDPO: weights from the gathered losses. WDPO finite-diff: the trainer's two-pass
    backward (first pass in no_sync) with the step from all-reduced norms."""
    pytest.importorskip("torch.distributed.run")
    single = _run(tmp_path / "single", max_steps=4, **kw)
    out = tmp_path / "ddp"
    flags = [a for k, v in kw.items() for a in ("--" + k.replace("_", "-"), str(v))]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
        "-m", "drdpo_theory.llm.cli", "align", "--model", "tiny-random", *flags,
        "--data", "toy", "--output", str(out), "--max-steps", "4", "--batch-size", "2", "--lr", "1e-2",
        "--beta", "0.5", "--max-length", "128", "--max-prompt-length", "64", "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(r["loss"]) for r in _rows(out / "metrics.csv")]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single.losses), rtol=DDP_RTOL, atol=DDP_ATOL)
    ckpt = latest_checkpoint(out)
    assert {p.name for p in ckpt.iterdir()} >= {"rng_rank0.safetensors", "rng_rank1.safetensors"}


# --------------------------------------------------------------------------- CLI


def _parse(argv):
    parser = argparse.ArgumentParser(prog="drdpo")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_align_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    args = _parse(["align", "--model", "tiny-random", "--method", "wdpo", "--wdpo-impl", "finite-diff",
                   "--data", "toy", "--output", str(out), "--max-steps", "3", "--checkpoint-every", "2",
                   "--lr", "1e-3", "--no-progress"])
    assert args.func(args) == 0
    rows = _rows(out / "metrics.csv")
    assert len(rows) == 3
    assert list(rows[0])[: len(BASE_COLUMNS)] == list(BASE_COLUMNS)
    assert {"wdpo/penalty", "rewards/margins", "rewards/accuracies"} <= set(rows[0])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert "metrics.csv" in capsys.readouterr().out
    # --resume continues to a larger max-steps
    args = _parse(["align", "--model", "tiny-random", "--method", "wdpo", "--wdpo-impl", "finite-diff",
                   "--data", "toy", "--output", str(out), "--max-steps", "4", "--lr", "1e-3", "--resume",
                   "--no-progress"])
    assert args.func(args) == 0
    assert [r["step"] for r in _rows(out / "metrics.csv")] == ["1", "2", "3", "4"]


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    cases = [
        (["--model", "tiny-random", "--data", str(bad)], f"{bad}:2: expected keys 'prompt', 'chosen', 'rejected'"),
        (["--model", "tiny-random", "--data", str(tmp_path / "none.jsonl")], "no such preference file"),
        (["--model", str(tmp_path / "missing"), "--data", "toy"], "no such model"),
        (["--model", "tiny-random", "--data", "toy", "--lr", "-1"], "lr must be a finite number > 0"),
    ]
    for extra, msg in cases:
        args = _parse(["align", "--method", "dpo", "--output", str(tmp_path / "o"), "--max-steps", "1", *extra])
        assert args.func(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("drdpo align: error: "), lines
        assert msg in lines[0], lines[0]
    # the same through a real process: one line on stderr, exit status 2, no traceback
    cmd = [sys.executable, "-m", "drdpo_theory.llm.cli", "align", "--method", "dpo", "--output",
           str(tmp_path / "o"), "--model", "tiny-random", "--data", str(bad)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"drdpo align: error: {bad}:2: expected keys 'prompt', 'chosen', "
                                                "'rejected'; got ['prompt', 'chosen'] (missing ['rejected']; 'prompt' may be "
                                                    "left out when 'chosen'/'rejected' hold the whole conversation)"]


def test_cli_module_does_not_import_torch():
    code = "import sys, drdpo_theory.llm.cli as c, argparse; p=argparse.ArgumentParser(); " \
           "c.register(p.add_subparsers()); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# --------------------------------------------------------------------------- tied embeddings


@pytest.mark.parametrize("kw", [
    {"method": "dpo"},
    {"method": "wdpo", "wdpo_impl": "finite-diff", "rho0": 0.05},
    {"method": "wdpo", "wdpo_impl": "double-backward", "rho0": 0.05},
], ids=["dpo", "wdpo-fd", "wdpo-db"])
def test_sparse_tied_embedding_gradient_equals_the_dense_one(exact_float64, llama_factory, batch_factory, kw):
    """The lookup term as a sparse tensor: the tied table's .grad is dense and the same, every estimator."""
    from drdpo_theory.llm.objectives import LossConfig, preference_backward
    from drdpo_theory.llm.trainer import sparse_tied_embedding_grad

    batch = batch_factory(n_pairs=3)
    cfg = LossConfig(beta=0.5, **kw)
    grads, c = [], 1.0
    for sparse in (False, True):
        model = tie_embeddings(llama_factory("eager", init_std=0.2))
        if sparse:
            assert sparse_tied_embedding_grad(model)
        assert model.get_input_embeddings().sparse is sparse
        _, m = preference_backward(model, batch, None, None, cfg)
        if "wdpo/fd_h" in m:  # two-pass: rounding of either sum is amplified by c = 2 rho0 / h (as above)
            c = max(c, 2 * cfg.rho0 / m["wdpo/fd_h"])
        g = model.get_input_embeddings().weight.grad
        assert g is not None and g.layout == torch.strided  # dense: what the optimizer and clipping need
        assert float(g.abs().sum()) > 0
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    g_max = max(float(g.abs().max()) for g in grads[0].values())
    atol = TWO_PASS_ROUND * torch.finfo(torch.float64).eps * c * g_max
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0.0, atol=atol, msg=lambda m: f"{n}: {m}")


def test_sparse_embedding_gradient_only_for_tied_trained_tables(llama_factory):
    from drdpo_theory.llm.trainer import sparse_tied_embedding_grad

    untied = llama_factory("eager")
    assert not sparse_tied_embedding_grad(untied) and not untied.get_input_embeddings().sparse
    frozen = tie_embeddings(llama_factory("eager"))
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert not sparse_tied_embedding_grad(frozen) and not frozen.get_input_embeddings().sparse


def test_trainer_with_tied_embeddings_matches_the_dense_gradient_run(tmp_path, monkeypatch):
    """3 DPO steps on a tied model: sparse lookup gradient (the default, one process) and the dense one give
    the same losses and weights (summation order only); LoRA (frozen table) leaves it off."""
    import drdpo_theory.llm.trainer as T

    def run(out, sparse):
        cfg, model, tok, pairs = _setup(output_dir=str(out), method="dpo", max_steps=3)
        if not sparse:
            monkeypatch.setattr(T, "sparse_tied_embedding_grad", lambda m: False)
        trainer = Trainer(cfg, tie_embeddings(model), tok, pairs)
        monkeypatch.undo()
        assert trainer.sparse_embedding_grad is sparse
        trainer.fit()
        return trainer

    a, b = run(tmp_path / "sparse", True), run(tmp_path / "dense", False)
    rows_a, rows_b = _rows(tmp_path / "sparse" / "metrics.csv"), _rows(tmp_path / "dense" / "metrics.csv")
    torch.testing.assert_close(torch.tensor([float(r["loss"]) for r in rows_a]),
                               torch.tensor([float(r["loss"]) for r in rows_b]), rtol=ACCUM_RTOL, atol=ACCUM_ATOL)
    # Adam divides by sqrt(v): a near-zero gradient entry turns summation-order noise into a visible step
    for (n, p), q in zip(a.base.named_parameters(), b.base.parameters()):
        torch.testing.assert_close(p, q, rtol=DDP_RTOL, atol=DDP_ATOL, msg=lambda m: f"{n}: {m}")
    cfg, model, tok, pairs = _setup(output_dir=str(tmp_path / "lora"), lora=True, lora_r=4)
    assert Trainer(cfg, tie_embeddings(model), tok, pairs).sparse_embedding_grad is False
