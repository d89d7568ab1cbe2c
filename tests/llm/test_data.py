"""Preference data: validation messages, chat templates, prompt masking, truncation, collation."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from drdpo_theory.llm.data import (  # noqa: E402
    PreferenceCollator,
    PreferenceDataError,
    load_preferences,
    tokenize_pair,
    tokenize_preferences,
    toy_dataset_path,
)
from drdpo_theory.llm.models import load_model  # noqa: E402

pytestmark = pytest.mark.llm

GOOD = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}
CHAT = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
    "chosen": [{"role": "assistant", "content": "Paris."}],
    "rejected": [{"role": "assistant", "content": "Rome."}],
}


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny-random")[1]


def _write(tmp_path, lines, name="toy.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


BAD_LINES = [
    ('{"prompt": "a", "chosen": "b"}', "expected keys 'prompt', 'chosen', 'rejected'; got ['prompt', 'chosen']"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"', "expected one JSON object per line; invalid JSON"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "expected a non-empty string for 'chosen'"),
    ('{"prompt": "   ", "chosen": "b", "rejected": "c"}', "expected a non-empty string for 'prompt'"),
    ('{"prompt": "a", "chosen": "b", "rejected": 3}', "expected a string or a list of chat messages for 'rejected'; got int"),
    ('{"prompt": [], "chosen": [], "rejected": []}', "expected a non-empty list of messages for 'prompt'"),
    ('{"prompt": [{"content": "hi"}], "chosen": [{"role": "assistant", "content": "x"}], '
     '"rejected": [{"role": "assistant", "content": "y"}]}', "expected prompt[0] to be a message"),
    ('{"prompt": "a", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "c"}',
     "all strings or all message lists"),
    ('["prompt", "chosen", "rejected"]', "expected a JSON object with keys 'prompt', 'chosen', 'rejected'; got list"),
]


@pytest.mark.parametrize("bad, expected", BAD_LINES, ids=[f"case{i}" for i in range(len(BAD_LINES))])
def test_malformed_line_names_file_line_and_expectation(tmp_path, bad, expected):
    good = json.dumps(GOOD)
    # a blank line counts for the line number but is otherwise skipped
    path = _write(tmp_path, [good, "", good, good, good, good, bad, good])
    with pytest.raises(PreferenceDataError) as err:
        load_preferences(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:7: "), msg
    assert expected in msg, msg


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PreferenceDataError, match="no such preference file"):
        load_preferences(tmp_path / "absent.jsonl")
    with pytest.raises(PreferenceDataError, match="expected at least one preference record"):
        load_preferences(_write(tmp_path, ["", "  "]))


def test_toy_dataset_and_dataset_input():
    records = load_preferences("toy")
    assert toy_dataset_path().is_file()
    assert len(records) == 40
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in records)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(records[:5])
    assert load_preferences(ds) == records[:5]
    bad = datasets.Dataset.from_list([GOOD, {"prompt": "a", "chosen": "b", "rejected": ""}])
    with pytest.raises(PreferenceDataError, match=r"^Dataset\[1\]: expected a non-empty string for 'rejected'"):
        load_preferences(bad)


def test_standard_format_tokens_and_prompt_mask(tok):
    records = load_preferences("toy")[:3]
    pairs = tokenize_preferences(tok, records, max_length=128, max_prompt_length=64)
    batch = PreferenceCollator(tok.pad_token_id)(pairs)
    B = len(pairs)
    assert batch["input_ids"].shape[0] == 2 * B
    for i, (rec, pair) in enumerate(zip(records, pairs)):
        prompt_ids = tok(rec["prompt"])["input_ids"]  # with the tokenizer's BOS
        assert prompt_ids[0] == tok.bos_token_id
        assert list(pair.prompt_ids) == prompt_ids
        for row, key, ans in ((i, "chosen", pair.chosen_ids), (B + i, "rejected", pair.rejected_ids)):
            P, L = len(prompt_ids), len(prompt_ids) + len(ans)
            assert tok.decode(ans) == rec[key] + tok.eos_token
            assert batch["input_ids"][row, :L].tolist() == prompt_ids + list(ans)
            # loss mask: 0 on the prompt, 1 on the answer, 0 on padding
            assert batch["loss_mask"][row, :P].sum() == 0
            assert batch["loss_mask"][row, P:L].tolist() == [1] * len(ans)
            assert batch["loss_mask"][row, L:].sum() == 0
            assert batch["attention_mask"][row].tolist() == [1] * L + [0] * (batch["input_ids"].shape[1] - L)
            assert (batch["input_ids"][row, L:] == tok.pad_token_id).all()
    assert batch["index"].tolist() == [0, 1, 2]


def test_chat_messages_use_the_chat_template(tok):
    pair = tokenize_pair(tok, load_preferences([CHAT])[0], max_length=256, max_prompt_length=128)
    prompt_text = tok.apply_chat_template(CHAT["prompt"], tokenize=False, add_generation_prompt=True)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert list(pair.prompt_ids) == tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert tok.decode(pair.chosen_ids) == "Paris.<|im_end|>\n"
    assert tok.decode(pair.rejected_ids) == "Rome.<|im_end|>\n"
    batch = PreferenceCollator(tok.pad_token_id)([pair])
    assert int(batch["loss_mask"][0].argmax()) == len(pair.prompt_ids)  # first answer token


def test_chat_messages_fallback_without_template(tok):
    plain = load_model("tiny-random")[1]
    plain.chat_template = None
    pair = tokenize_pair(plain, CHAT, max_length=256, max_prompt_length=128)
    assert plain.decode(pair.prompt_ids) == "<|bos|>system: Be brief.\nuser: Capital of France?\nassistant: "
    assert plain.decode(pair.chosen_ids) == "Paris.<|eos|>"


def test_truncation_keeps_prompt_end_and_answer_start(tok):
    rec = {"prompt": "x" * 50 + "END", "chosen": " " + "a" * 40, "rejected": " b"}
    pair = tokenize_pair(tok, rec, max_length=20, max_prompt_length=8)
    assert tok.decode(pair.prompt_ids) == "xxxxxEND"
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 20
    assert tok.decode(pair.chosen_ids) == " " + "a" * 11
    assert tok.decode(pair.rejected_ids) == " b<|eos|>"
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        tokenize_pair(tok, rec, max_length=8, max_prompt_length=8)
