"""Preference pairs for the torch backend: loading, validation, tokenisation, collation.

Records follow TRL's preference formats. *Explicit prompt*: every record has the keys
``prompt``, ``chosen`` and ``rejected``. *Implicit prompt*: only ``chosen`` and
``rejected``, each holding the whole text or conversation; their longest common prefix
(characters for strings, whole messages for conversations; :func:`extract_prompt`) is the
prompt and the rest the answers. Each field is either

* a non-empty string (*standard* format: the model sees ``prompt + chosen``), or
* a non-empty list of chat messages ``{"role": str, "content": str}`` (*conversational*
  format: ``prompt`` holds the conversation so far, ``chosen``/``rejected`` the assistant
  turn(s)).

An optional numeric ``weight`` (finite, >= 0, not all zero) gives the pair's mass in the
nominal distribution ``p_i = weight_i / sum_j weight_j`` (default 1 for every pair), which
every objective honours (weighted DPO; KLDPO's ball around the weighted data). An optional
integer ``group`` labels the pair's group. A record is one sample ``z = (s, a1, a2, y=1)``
(docs/theory.md section 1) with ``a1`` the chosen answer.

Files (:func:`load_preferences`): JSONL (``.jsonl``/``.ndjson``, one object per line), a
JSON array (``.json``), parquet (``.parquet``), or a folder written by
``datasets.Dataset.save_to_disk``; UTF-8 with or without a byte-order mark. Every error
names the file and the 1-based line (JSONL) or the 0-based row (other formats). Tokenisation follows TRL's ``DPOTrainer``:

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

import codecs
import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

__all__ = [
    "FALLBACK_FORMAT",
    "PREFERENCE_KEYS",
    "DATA_SUFFIXES",
    "PreferenceDataError",
    "PreferenceCollator",
    "TokenizedPair",
    "extract_prompt",
    "fingerprint_pairs",
    "load_preferences",
    "pair_weights",
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


def extract_prompt(chosen: Any, rejected: Any, where: str) -> tuple[Any, Any, Any]:
    """Split an implicit-prompt pair into ``(prompt, chosen_answer, rejected_answer)``.

    As TRL's ``extract_prompt``: for conversations the prompt is the longest common prefix of
    whole messages; for strings the longest common character prefix, moved back by one when it
    ends just after a space, so that the answers keep their leading space (``"The sky is"``,
    ``" blue."``).

    Raises
    ------
    PreferenceDataError
        If the two share no prefix, or one is a prefix of the other (no answer left).
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str) and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    unit = "characters" if isinstance(chosen, str) else "messages"
    if n == 0:
        raise PreferenceDataError(
            f"{where}: no 'prompt' given and 'chosen'/'rejected' share no leading {unit}; "
            "expected an implicit-prompt pair (both hold the same conversation up to the answer) or an explicit 'prompt'"
        )
    if n >= len(chosen) or n >= len(rejected):
        raise PreferenceDataError(
            f"{where}: no 'prompt' given and one of 'chosen'/'rejected' is a prefix of the other, so it has no answer; "
            "expected two different answers after the shared prompt"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def _check_weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PreferenceDataError(f"{where}: expected 'weight' to be a finite number >= 0; got {value!r}")
    return float(value)


def validate_record(record: Any, where: str) -> dict[str, Any]:
    """Check one preference record and return it in the explicit-prompt layout.

    Parameters
    ----------
    record : Any
        A decoded JSON object or a dataset row, explicit (``prompt``, ``chosen``,
        ``rejected``) or implicit (``chosen``, ``rejected`` only) prompt.
    where : str
        Location used as the message prefix, e.g. ``"toy.jsonl:7"``.

    Returns
    -------
    dict
        ``{"prompt": ..., "chosen": ..., "rejected": ...}``, plus ``"weight"`` (float) and
        ``"group"`` (int) when the record has them.

    Raises
    ------
    PreferenceDataError
        If keys are missing, a field is empty, has the wrong type, the record mixes the
        string and the message formats, an implicit pair shares no prompt, or ``weight``
        is not a finite number >= 0.
    """
    if not isinstance(record, Mapping):
        raise PreferenceDataError(
            f"{where}: expected a JSON object with keys 'prompt', 'chosen', 'rejected'; "
            f"got {type(record).__name__}"
        )
    missing = [k for k in PREFERENCE_KEYS if k not in record or (k == "prompt" and record[k] is None)]
    if missing and missing != ["prompt"]:
        raise PreferenceDataError(
            f"{where}: expected keys 'prompt', 'chosen', 'rejected'; got {list(record)!r} "
            f"(missing {missing!r}; 'prompt' may be left out when 'chosen'/'rejected' hold the whole conversation)"
        )
    for key in PREFERENCE_KEYS[1:] if missing else PREFERENCE_KEYS:
        _check_field(record[key], key, where)
    if missing:  # implicit prompt
        if isinstance(record["chosen"], str) != isinstance(record["rejected"], str):
            raise PreferenceDataError(
                f"{where}: expected 'chosen' and 'rejected' both strings or both message lists; got a mix"
            )
        prompt, chosen, rejected = extract_prompt(record["chosen"], record["rejected"], where)
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    else:
        out = {key: record[key] for key in PREFERENCE_KEYS}
    kinds = {key: isinstance(out[key], str) for key in PREFERENCE_KEYS}
    if len(set(kinds.values())) > 1:
        raise PreferenceDataError(
            f"{where}: expected 'prompt', 'chosen', 'rejected' all strings or all message lists; "
            f"got {', '.join(k + (': string' if v else ': messages') for k, v in kinds.items())}"
        )
    if record.get("weight") is not None:
        out["weight"] = _check_weight(record["weight"], where)
    if record.get("group") is not None:
        g = record["group"]
        if isinstance(g, bool) or not isinstance(g, int) and not (isinstance(g, float) and g.is_integer()):
            raise PreferenceDataError(f"{where}: expected 'group' to be an integer; got {g!r}")
        out["group"] = int(g)
    return out


def _finish(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    if not records:
        raise PreferenceDataError(f"{name}: expected at least one preference record; the file is empty")
    if any("weight" in r for r in records) and sum(r.get("weight", 1.0) for r in records) <= 0:
        raise PreferenceDataError(f"{name}: every 'weight' is 0; expected at least one pair with weight > 0")
    return records


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read and validate a JSONL file, one record per non-blank line (UTF-8, optional BOM)."""
    records = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PreferenceDataError(
                    f"{where}: expected UTF-8 text; byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not "
                    "valid UTF-8 (re-save the file as UTF-8)"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PreferenceDataError(
                    f"{where}: expected one JSON object per line; invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            records.append(validate_record(obj, where))
    return _finish(records, str(path))


def _load_json_array(path: Path) -> list[dict[str, Any]]:
    """Read a ``.json`` file holding one array of records (UTF-8, optional BOM)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PreferenceDataError(f"{path}:{line}: expected UTF-8 text; byte 0x{raw[exc.start]:02x} is not valid UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PreferenceDataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("data"), list):
        obj = obj["data"]  # {"data": [...]}, as some exporters write
    if not isinstance(obj, list):
        raise PreferenceDataError(
            f"{path}: expected a JSON array of preference records (or JSONL, one object per line); "
            f"got a JSON {type(obj).__name__}"
        )
    return _finish([validate_record(r, f"{path}[row {i}]") for i, r in enumerate(obj)], str(path))


def _plain(value: Any) -> Any:
    """numpy/pyarrow values (arrays of message structs, numpy scalars) -> plain Python."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _load_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError subclasses for damaged files
        raise PreferenceDataError(f"{path}: expected a parquet file; cannot read it ({str(exc).splitlines()[0]})") from None
    return _finish([validate_record(_plain(r), f"{path}[row {i}]") for i, r in enumerate(rows)], str(path))


def _load_saved_dataset(path: Path) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise PreferenceDataError(f"{path}: reading a saved dataset folder needs the 'datasets' package") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # FileNotFoundError, or datasets' own errors for foreign folders
        raise PreferenceDataError(
            f"{path}: expected a folder written by datasets.Dataset.save_to_disk; cannot load it "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if len(splits) != 1:
            raise PreferenceDataError(
                f"{path}: a DatasetDict with splits {splits}; expected one split: pass {path}/<split> instead"
            )
        ds = ds[splits[0]]
    return _finish([validate_record(_plain(r), f"{path}[row {i}]") for i, r in enumerate(ds)], str(path))


DATA_SUFFIXES = {".jsonl": _load_jsonl, ".ndjson": _load_jsonl, ".json": _load_json_array, ".parquet": _load_parquet}
"""File suffix -> reader; a folder is read as a saved ``datasets.Dataset``."""


def load_preferences(source: Any) -> list[dict[str, Any]]:
    """Load and validate preference pairs.

    Parameters
    ----------
    source : str, os.PathLike, datasets.Dataset or sequence of mappings
        A ``.jsonl``/``.ndjson``, ``.json`` (array), ``.parquet`` file, a folder written by
        ``datasets.Dataset.save_to_disk``, the literal ``"toy"`` for the shipped toy file
        (:func:`toy_dataset_path`), or a ``datasets.Dataset`` (or any sequence of rows).
        Explicit- or implicit-prompt layout, strings or conversations (module docstring).

    Returns
    -------
    list of dict
        Validated records in the explicit-prompt layout, in file order; ``weight`` and
        ``group`` are kept when present.

    Raises
    ------
    PreferenceDataError
        On a missing or unreadable file, invalid JSON or UTF-8, missing keys, empty or
        mistyped fields; the message names the file and the 1-based line number (JSONL,
        JSON) or the 0-based row.
    """
    if isinstance(source, (str, Path)) or hasattr(source, "__fspath__"):
        path = toy_dataset_path() if str(source) == "toy" else Path(source)
        if path.is_dir():
            return _load_saved_dataset(path)
        if not path.exists():
            raise PreferenceDataError(f"{path}: no such preference file")
        if not path.is_file():
            raise PreferenceDataError(f"{path}: expected a preference file or a saved dataset folder")
        reader = DATA_SUFFIXES.get(path.suffix.lower(), _load_jsonl)
        try:
            return reader(path)
        except PermissionError:
            raise PreferenceDataError(f"{path}: permission denied") from None
    if isinstance(source, Iterable):
        name = type(source).__name__
        records = [validate_record(_plain(row), f"{name}[{i}]") for i, row in enumerate(source)]
        if not records:
            raise PreferenceDataError(f"{name}: expected at least one preference record; got none")
        return _finish(records, name)
    raise PreferenceDataError(f"expected a preference file, folder, 'toy' or a dataset of records; got {type(source).__name__}")


def pair_weights(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """The ``weight`` of every record (1.0 where absent)."""
    return [float(r.get("weight", 1.0)) for r in records]


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
    weight : float
        The record's ``weight`` (1.0 when absent): its unnormalised mass in the nominal
        distribution p.
    """

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    index: int
    weight: float = 1.0
    group: int = 0


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
    return TokenizedPair(
        tuple(prompt_ids), tuple(answers[0]), tuple(answers[1]), index,
        float(record.get("weight", 1.0)), int(record.get("group", 0)),
    )


def tokenize_preferences(
    tokenizer: Any, records: Sequence[Mapping[str, Any]], max_length: int, max_prompt_length: int
) -> list[TokenizedPair]:
    """Tokenise every record with :func:`tokenize_pair`; ``index`` is the list position."""
    return [tokenize_pair(tokenizer, r, max_length, max_prompt_length, index=i) for i, r in enumerate(records)]


def fingerprint_pairs(pairs: Sequence[TokenizedPair], weights: bool = False) -> str:
    """SHA-256 of the token ids of ``pairs`` (keys the on-disk reference log-prob cache).

    With ``weights=True`` the pair weights are hashed too (identifies the training data of a
    checkpoint; the reference log-probs do not depend on them).
    """
    h = hashlib.sha256()
    for p in pairs:
        item: list[Any] = [p.index, p.prompt_ids, p.chosen_ids, p.rejected_ids]
        if weights:
            item.append(p.weight)
        h.update(json.dumps(item).encode())
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
    * ``index`` ``(B,)`` long: dataset positions of the pairs;
    * ``weight`` ``(B,)`` float64: the pairs' unnormalised weights;
    * ``group`` ``(B,)`` long: the pairs' group labels (0 when the data has none).
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
        weight = torch.tensor([p.weight for p in pairs], dtype=torch.float64)
        group = torch.tensor([p.group for p in pairs], dtype=torch.long)
        return {
            "input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "index": index, "weight": weight, "group": group,
        }
