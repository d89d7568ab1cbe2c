"""Preference pairs for the torch backend: loading, validation, tokenisation, collation.

Records follow TRL's explicit-prompt preference format: every record has the keys
``prompt``, ``chosen`` and ``rejected``, each either

* a non-empty string (*standard* format: the model sees ``prompt + chosen``), or
* a non-empty list of chat messages ``{"role": str, "content": str}`` (*conversational*
  format: ``prompt`` holds the conversation so far, ``chosen``/``rejected`` the assistant
  turn(s)).

A record is one sample ``z = (s, a1, a2, y=1)`` of THEORY.md section 1 with ``a1`` the
chosen answer. Tokenisation follows TRL's ``DPOTrainer``:

* **standard**: ``tok(prompt)`` and ``tok(prompt + answer + eos_token)`` with the
  tokenizer's own special tokens (``add_special_tokens=True``: e.g. a leading BOS for
  Llama-style tokenizers); no separator is inserted between prompt and answer.
* **conversational with a chat template**:
  ``tok(apply_chat_template(prompt, add_generation_prompt=True))`` and
  ``tok(apply_chat_template(prompt + answer))``, without extra special tokens (the template
  holds them).
* **conversational, tokenizer without a chat template** (fallback, :data:`FALLBACK_FORMAT`):
  every prompt message becomes ``"{role}: {content}\\n"``, followed by ``"assistant: "``;
  the answer is the content of its messages joined by ``"\\n"``; then as the standard format.

The answer tokens are what follows the common prefix of the prompt and prompt+answer token
sequences (TRL 1.x does the same), so a prompt masked by ``loss_mask`` is exactly the
tokenised prompt whenever the tokenizer does not merge across the boundary.

Truncation (TRL's ``keep_end`` for prompts, ``keep_start`` for answers): the prompt keeps its
last ``max_prompt_length`` tokens, then ``prompt + answer`` keeps its first ``max_length``
tokens. ``max_prompt_length < max_length`` guarantees at least one answer token.

The collator pads chosen and rejected sequences to a common length ``T`` (right padding) and
stacks them as ``2B`` rows, chosen rows first, with ``loss_mask`` 1 exactly on answer tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

__all__ = [
    "FALLBACK_FORMAT",
    "PREFERENCE_KEYS",
    "PreferenceDataError",
    "PreferenceCollator",
    "TokenizedPair",
    "fingerprint_pairs",
    "load_preferences",
    "tokenize_pair",
    "tokenize_preferences",
    "toy_dataset_path",
    "validate_record",
]

PREFERENCE_KEYS: tuple[str, ...] = ("prompt", "chosen", "rejected")
"""Keys every preference record must have (TRL explicit-prompt format)."""

FALLBACK_FORMAT = "{role}: {content}\n"
"""Rendering of one chat message when the tokenizer has no chat template."""

FALLBACK_GENERATION_PROMPT = "assistant: "
"""Text appended after a rendered prompt when the tokenizer has no chat template."""


class PreferenceDataError(ValueError):
    """A preference file or record does not have the expected structure.

    The message starts with ``<file>:<line>:`` (1-based line) for JSONL input and
    ``<source>[<row>]:`` (0-based row) for in-memory datasets.
    """


def toy_dataset_path() -> Path:
    """Path of the shipped toy preference file ``drdpo_theory/data/toy_preferences.jsonl``.

    Returns
    -------
    pathlib.Path
        Location of the file inside the installed package.
    """
    return Path(str(resources.files("drdpo_theory") / "data" / "toy_preferences.jsonl"))


def _check_field(value: Any, key: str, where: str) -> None:
    """Raise :class:`PreferenceDataError` unless ``value`` is a valid prompt/answer field."""
    if isinstance(value, str):
        if not value.strip():
            raise PreferenceDataError(f"{where}: expected a non-empty string for {key!r}; got {value!r}")
        return
    if isinstance(value, list):
        if not value:
            raise PreferenceDataError(f"{where}: expected a non-empty list of messages for {key!r}; got []")
        for j, msg in enumerate(value):
            if not isinstance(msg, Mapping) or not {"role", "content"} <= set(msg):
                raise PreferenceDataError(
                    f"{where}: expected {key}[{j}] to be a message {{'role': str, 'content': str}}; "
                    f"got {msg!r}"
                )
            if not isinstance(msg["role"], str) or not isinstance(msg["content"], str):
                raise PreferenceDataError(
                    f"{where}: expected string 'role' and 'content' in {key}[{j}]; got {dict(msg)!r}"
                )
            if not msg["content"].strip():
                raise PreferenceDataError(f"{where}: expected non-empty 'content' in {key}[{j}]; got {msg['content']!r}")
        return
    raise PreferenceDataError(
        f"{where}: expected a string or a list of chat messages for {key!r}; got {type(value).__name__}"
    )


def validate_record(record: Any, where: str) -> dict[str, Any]:
    """Check one preference record and return it restricted to :data:`PREFERENCE_KEYS`.

    Parameters
    ----------
    record : Any
        A decoded JSON object or a dataset row.
    where : str
        Location used as the message prefix, e.g. ``"toy.jsonl:7"``.

    Returns
    -------
    dict
        ``{"prompt": ..., "chosen": ..., "rejected": ...}``.

    Raises
    ------
    PreferenceDataError
        If keys are missing, a field is empty, has the wrong type, or the record mixes the
        string and the message formats.
    """
    if not isinstance(record, Mapping):
        raise PreferenceDataError(
            f"{where}: expected a JSON object with keys 'prompt', 'chosen', 'rejected'; "
            f"got {type(record).__name__}"
        )
    missing = [k for k in PREFERENCE_KEYS if k not in record]
    if missing:
        raise PreferenceDataError(
            f"{where}: expected keys 'prompt', 'chosen', 'rejected'; got {list(record)!r} "
            f"(missing {missing!r})"
        )
    for key in PREFERENCE_KEYS:
        _check_field(record[key], key, where)
    kinds = {key: isinstance(record[key], str) for key in PREFERENCE_KEYS}
    if len(set(kinds.values())) > 1:
        raise PreferenceDataError(
            f"{where}: expected 'prompt', 'chosen', 'rejected' all strings or all message lists; "
            f"got {', '.join(k + (': string' if v else ': messages') for k, v in kinds.items())}"
        )
    return {key: record[key] for key in PREFERENCE_KEYS}


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read and validate a JSONL file, one record per non-blank line."""
    if not path.is_file():
        raise PreferenceDataError(f"{path}: no such preference file")
    records = []
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PreferenceDataError(
                    f"{where}: expected one JSON object per line; invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            records.append(validate_record(obj, where))
    if not records:
        raise PreferenceDataError(f"{path}: expected at least one preference record; the file is empty")
    return records


def load_preferences(source: Any) -> list[dict[str, Any]]:
    """Load and validate preference pairs.

    Parameters
    ----------
    source : str, os.PathLike, datasets.Dataset or sequence of mappings
        A JSONL path, the literal ``"toy"`` for the shipped toy file
        (:func:`toy_dataset_path`), a ``datasets.Dataset`` (or any sequence of rows)
        with columns ``prompt``, ``chosen``, ``rejected``.

    Returns
    -------
    list of dict
        Validated records, in file order.

    Raises
    ------
    PreferenceDataError
        On a missing file, invalid JSON, missing keys, empty or mistyped fields; the message
        names the file and the 1-based line number (or the dataset row).
    """
    if isinstance(source, (str, Path)) or hasattr(source, "__fspath__"):
        path = toy_dataset_path() if str(source) == "toy" else Path(source)
        return _load_jsonl(path)
    if isinstance(source, Iterable):
        name = type(source).__name__
        records = [validate_record(row, f"{name}[{i}]") for i, row in enumerate(source)]
        if not records:
            raise PreferenceDataError(f"{name}: expected at least one preference record; got none")
        return records
    raise PreferenceDataError(f"expected a JSONL path, 'toy' or a dataset of records; got {type(source).__name__}")


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair.

    Attributes
    ----------
    prompt_ids : tuple of int
        Prompt tokens (after truncation), shared by both answers.
    chosen_ids, rejected_ids : tuple of int
        Answer tokens (after truncation); never empty.
    index : int
        Position of the pair in the dataset (keys the cached reference log-probs).
    """

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    index: int


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render_fallback(messages: Sequence[Mapping[str, str]]) -> str:
    return "".join(FALLBACK_FORMAT.format(role=m["role"], content=m["content"]) for m in messages)


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _texts(tokenizer: Any, record: Mapping[str, Any]) -> tuple[str, str, str, bool]:
    """Return ``(prompt_text, full_chosen_text, full_rejected_text, add_special_tokens)``."""
    prompt = record["prompt"]
    eos = tokenizer.eos_token or ""
    if isinstance(prompt, str):
        chosen, rejected = record["chosen"], record["rejected"]
        return prompt, prompt + chosen + eos, prompt + rejected + eos, True
    if _has_chat_template(tokenizer):
        prompt_text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        full = [
            tokenizer.apply_chat_template(list(prompt) + list(record[key]), tokenize=False)
            for key in ("chosen", "rejected")
        ]
        return prompt_text, full[0], full[1], False
    prompt_text = _render_fallback(prompt) + FALLBACK_GENERATION_PROMPT
    chosen = "\n".join(m["content"] for m in record["chosen"])
    rejected = "\n".join(m["content"] for m in record["rejected"])
    return prompt_text, prompt_text + chosen + eos, prompt_text + rejected + eos, True


def tokenize_pair(
    tokenizer: Any,
    record: Mapping[str, Any],
    max_length: int,
    max_prompt_length: int,
    index: int = 0,
) -> TokenizedPair:
    """Tokenise one validated record (see the module docstring for the exact format).

    As in TRL's ``DPOTrainer``, the prompt and the two full texts (prompt + answer) are
    tokenised separately and the answer tokens are those after the longest common prefix of
    the three token sequences (so tokens merging across the prompt/answer boundary are
    handled as at inference).

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        Tokenizer of the policy.
    record : mapping
        Output of :func:`validate_record`.
    max_length : int
        Maximum length of ``prompt + answer`` in tokens.
    max_prompt_length : int
        Maximum prompt length in tokens; must be smaller than ``max_length``.
    index : int, optional
        Dataset position stored in the result.

    Returns
    -------
    TokenizedPair
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length < max_length; got max_prompt_length={max_prompt_length}, "
            f"max_length={max_length}"
        )
    prompt_text, chosen_text, rejected_text, special = _texts(tokenizer, record)
    prompt_ids = _encode(tokenizer, prompt_text, special)
    full_c, full_r = _encode(tokenizer, chosen_text, special), _encode(tokenizer, rejected_text, special)
    n_prompt = min(_common_prefix(prompt_ids, full_c), _common_prefix(prompt_ids, full_r))
    prompt_ids = prompt_ids[:n_prompt][-max_prompt_length:]  # keep_end: the prompt's last tokens matter most
    budget = max_length - len(prompt_ids)
    answers = [full_c[n_prompt:][:budget], full_r[n_prompt:][:budget]]  # keep_start
    for name, ids in zip(("chosen", "rejected"), answers):
        if not ids:
            raise PreferenceDataError(f"record {index}: {name!r} answer tokenises to no tokens")
    return TokenizedPair(tuple(prompt_ids), tuple(answers[0]), tuple(answers[1]), index)


def tokenize_preferences(
    tokenizer: Any, records: Sequence[Mapping[str, Any]], max_length: int, max_prompt_length: int
) -> list[TokenizedPair]:
    """Tokenise every record with :func:`tokenize_pair`; ``index`` is the list position."""
    return [tokenize_pair(tokenizer, r, max_length, max_prompt_length, index=i) for i, r in enumerate(records)]


def fingerprint_pairs(pairs: Sequence[TokenizedPair]) -> str:
    """SHA-256 of the token ids of ``pairs`` (keys the on-disk reference log-prob cache)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.index, p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()


class PreferenceCollator:
    """Stack tokenised pairs into the batch dict consumed by ``logprobs.concatenated_logps``.

    Parameters
    ----------
    pad_token_id : int
        Id written into padding positions (masked out by ``attention_mask``).

    Notes
    -----
    For ``B`` pairs the output holds, with ``T`` the longest ``prompt + answer``:

    * ``input_ids`` ``(2B, T)`` long: rows ``0..B-1`` chosen, ``B..2B-1`` rejected, right-padded;
    * ``attention_mask`` ``(2B, T)`` long: 1 on real tokens;
    * ``loss_mask`` ``(2B, T)`` long: 1 on answer tokens only (aligned with ``input_ids``;
      the next-token shift happens in ``concatenated_logps``);
    * ``index`` ``(B,)`` long: dataset positions of the pairs.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, pairs: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
        rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
        T = max(len(pr) + len(a) for pr, a in rows)
        n = len(rows)  # 2B
        input_ids = torch.full((n, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, T), dtype=torch.long)
        loss_mask = torch.zeros((n, T), dtype=torch.long)
        for r, (prompt, answer) in enumerate(rows):
            L, P = len(prompt) + len(answer), len(prompt)
            input_ids[r, :L] = torch.tensor(prompt + answer, dtype=torch.long)
            attention_mask[r, :L] = 1
            loss_mask[r, P:L] = 1
        index = torch.tensor([p.index for p in pairs], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask, "index": index}
