"""Tiny random models and preference batches for the torch-backend tests (no hub access)."""

from __future__ import annotations

import pytest
import torch

VOCAB = 64


def make_tiny_llama(attn: str = "eager", dtype: torch.dtype = torch.float64, seed: int = 0, init_std: float | None = None):
    """A 2-layer random Llama (vocab 64, hidden 32, 4 heads, 2 kv heads) built from a config."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attn_implementation=attn,
    )
    model = transformers.LlamaForCausalLM(config).to(dtype)
    if init_std is not None:  # optional larger init (default: the config's 0.02)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, init_std)
    return model


def tie_embeddings(model):
    """Tie the model's LM head to its input-embedding table, in place (SmolLM2, Llama-3.2-1B and Qwen2.5 are tied)."""
    model.lm_head.weight = model.get_input_embeddings().weight
    model.config.tie_word_embeddings = True
    return model


def make_batch(n_pairs: int = 3, prompt_len: int = 4, max_answer: int = 5, seed: int = 1):
    """Right-padded preference batch: rows 0..B-1 chosen, B..2B-1 rejected.

    Each pair shares its prompt; answer lengths vary in [2, max_answer] so that padding
    and the loss mask are exercised.
    """
    g = torch.Generator().manual_seed(seed)
    t = prompt_len + max_answer
    ids = torch.zeros(2 * n_pairs, t, dtype=torch.long)
    am = torch.zeros(2 * n_pairs, t, dtype=torch.long)
    lm = torch.zeros(2 * n_pairs, t, dtype=torch.long)
    for i in range(n_pairs):
        prompt = torch.randint(1, VOCAB, (prompt_len,), generator=g)
        for row in (i, n_pairs + i):
            n_ans = int(torch.randint(2, max_answer + 1, (1,), generator=g))
            ans = torch.randint(1, VOCAB, (n_ans,), generator=g)
            ids[row, :prompt_len] = prompt
            ids[row, prompt_len : prompt_len + n_ans] = ans
            am[row, : prompt_len + n_ans] = 1
            lm[row, prompt_len : prompt_len + n_ans] = 1
    return {"input_ids": ids, "attention_mask": am, "loss_mask": lm}


def _rmsnorm_forward_keep_dtype(self, hidden_states):
    # LlamaRMSNorm, computed in the input dtype when it is float64 (upstream: float32)
    if hidden_states.dtype != torch.float64:
        return _ORIG["rms"](self, hidden_states)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _eager_attention_keep_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # upstream eager_attention_forward with the softmax in the query dtype (upstream: float32)
    if query.dtype != torch.float64:
        return _ORIG["eager"](module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    from transformers.models.llama.modeling_llama import repeat_kv

    key_states = repeat_kv(key, module.num_key_value_groups)  # (N, H, T, Dh)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # (N, H, T, T)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = torch.softmax(attn_weights, dim=-1)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()  # (N, T, H, Dh)
    return attn_output, attn_weights


_ORIG: dict = {}


@pytest.fixture
def exact_float64(monkeypatch):
    """Make float64 Llama models compute in float64 throughout.

    Upstream LlamaRMSNorm and the eager softmax upcast to float32 and cast back, so a
    ``.double()`` model only has float32 accuracy and finite-difference gradient checks in
    float64 fail at the 1e-2 level. This fixture patches both (for float64 inputs only)
    for the duration of one test.
    """
    mod = pytest.importorskip("transformers.models.llama.modeling_llama")
    _ORIG.setdefault("rms", mod.LlamaRMSNorm.forward)
    _ORIG.setdefault("eager", mod.eager_attention_forward)
    monkeypatch.setattr(mod.LlamaRMSNorm, "forward", _rmsnorm_forward_keep_dtype)
    monkeypatch.setattr(mod, "eager_attention_forward", _eager_attention_keep_dtype)
    yield


@pytest.fixture
def tiny_llama():
    return make_tiny_llama("eager")


@pytest.fixture
def tiny_batch():
    return make_batch()


@pytest.fixture
def llama_factory():
    """``make_tiny_llama(attn="eager", dtype=float64, seed=0, init_std=None)``."""
    return make_tiny_llama


@pytest.fixture
def batch_factory():
    """``make_batch(n_pairs=3, prompt_len=4, max_answer=5, seed=1)``."""
    return make_batch
