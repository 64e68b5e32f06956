"""Preference data: loading, validation, chat templates, tokenization and collation.

Formats accepted (one per dataset, checked per row):
- standard:        prompt / chosen / rejected strings
- implicit prompt: chosen / rejected strings (the prompt is inside each)
- conversational:  prompt / chosen / rejected message lists (prompt optional)
- pre-tokenized:   chosen_ids / rejected_ids lists of token ids
plus an optional numeric margin column.

Tokenization follows TRL 1.16's RewardTrainer (../shared/trl_spec.md §1) so that token ids are identical:
standard text gets the EOS string appended and is tokenized with the tokenizer's own special tokens;
conversations go through `apply_chat_template` with nothing appended.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow
import torch

ROLES = ("system", "user", "assistant", "tool")
LEGACY_ID_COLUMNS = {"chosen_input_ids": "chosen_ids", "rejected_input_ids": "rejected_ids"}


class PairDataError(ValueError):
    """A preference row or file that cannot be used, with its location and what to do."""


@dataclass
class TokenizeReport:
    """What tokenize_pairs did to the rows it was given; nothing is dropped without a count here."""

    rows_in: int = 0
    pairs_out: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    skipped_bad: int = 0
    bad_rows: list[str] = field(default_factory=list)  # messages of skipped rows (first 20)

    def summary(self) -> str:
        text = f"{self.pairs_out}/{self.rows_in} pairs kept"
        if self.dropped_too_long:
            text += f", {self.dropped_too_long} dropped as longer than max_length"
        if self.truncated:
            text += f", {self.truncated} truncated from the left (keep_end)"
        if self.skipped_bad:
            text += f", {self.skipped_bad} bad rows skipped"
        return text


# ----------------------------------------------------------------------------------------------- loading


def load_pairs(path: str | Path) -> datasets.Dataset:
    """Read preference rows from JSONL, JSON (a list of objects), Parquet, or a saved `datasets` directory.

    The file path is kept in `dataset.info.description` so later errors can name it.
    """
    path = Path(path)
    if not path.exists():
        raise PairDataError(f"{path}: no such file. Pass an existing JSONL, JSON or Parquet file, or a saved datasets directory.")
    if path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            raise PairDataError(f"{path} is a directory but not a saved `datasets` dataset (no dataset_info.json). Pass a file, or a directory written by Dataset.save_to_disk.")
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise PairDataError(f"{path} holds a DatasetDict with splits {list(loaded)}; pass the split's own directory, e.g. {path / next(iter(loaded))}.")
        dataset = loaded
    elif path.suffix == ".parquet":
        dataset = datasets.Dataset.from_parquet(str(path))
    elif path.suffix in (".jsonl", ".json"):
        rows = _read_json_rows(path)
        try:
            dataset = datasets.Dataset.from_list(rows)
        except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as err:
            raise _type_conflict(path, rows, err) from None
    else:
        raise PairDataError(f"{path}: unknown file type {path.suffix!r}. Use .jsonl, .json, .parquet or a saved datasets directory.")
    if len(dataset) == 0:
        raise PairDataError(f"{path} holds no rows. Give it at least one prompt/chosen/rejected pair.")
    layout = detect_layout(dataset.column_names)
    if layout != "pairs":
        dataset = datasets.Dataset.from_list([LAYOUT_ADAPTERS[layout](row) for row in dataset])
    dataset.info.description = str(path)
    return dataset


# Other public layouts, converted to conversational prompt/chosen/rejected on load (files stay untouched).
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant", "observation": "tool", "function_call": "assistant"}


def from_sharegpt(row: dict) -> dict:
    """LLaMA-Factory preference layout: conversations [{from, value}], chosen/rejected {from: gpt, value}."""
    prompt = [{"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]} for m in row["conversations"]]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}],
    }


def from_llmbar(row: dict) -> dict:
    """LLMBar / MT-Bench judgments: input, output_1, output_2, label ("1" or "2" names the better output)."""
    label = str(row["label"])
    if label not in ("1", "2"):
        raise PairDataError(f"LLMBar row: label must be 1 or 2, got {row['label']!r}.")
    better, worse = ("output_1", "output_2") if label == "1" else ("output_2", "output_1")
    return {
        "prompt": [{"role": "user", "content": row["input"]}],
        "chosen": [{"role": "assistant", "content": row[better]}],
        "rejected": [{"role": "assistant", "content": row[worse]}],
    }


LAYOUT_ADAPTERS = {"sharegpt": from_sharegpt, "llmbar": from_llmbar}


def detect_layout(columns: list[str]) -> str:
    """'sharegpt', 'llmbar', or 'pairs' (rmtorch's own prompt/chosen/rejected or *_ids columns)."""
    if {"conversations", "chosen", "rejected"} <= set(columns):
        return "sharegpt"
    if {"input", "output_1", "output_2", "label"} <= set(columns):
        return "llmbar"
    return "pairs"


def _read_json_rows(path: Path) -> list[dict]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise PairDataError(f"{path}, line {line}: bytes that are not UTF-8 (at byte {err.start}). Re-encode the file as UTF-8.") from None
    if not text.strip():
        raise PairDataError(f"{path} is empty. Give it at least one prompt/chosen/rejected pair.")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise PairDataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}).") from None
        if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
            rows = next(iter(rows.values()))  # {"train": [...]} style
        if not isinstance(rows, list):
            raise PairDataError(f"{path}: a .json file must hold a list of objects; for one object per line use .jsonl.")
    else:
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PairDataError(f"{path}, line {line_no}: malformed JSON ({err.msg} at column {err.colno}). Each line must be one JSON object.") from None
    for row_index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise PairDataError(f"{path}, row {row_index}: expected a JSON object with chosen/rejected fields, got {type(row).__name__}.")
    return rows


def _kind(value) -> str:
    """A JSON value's shape in words: 'a string', 'a number', 'a list of objects', ..."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        plurals = {"a string": "strings", "a number": "numbers", "an object": "objects", "true/false": "true/false"}
        items = sorted({plurals.get(_kind(item), "lists") for item in value if item is not None})
        return "a list of " + " and ".join(items) if items else "an empty list"
    return type(value).__name__


def _type_conflict(path: Path, rows: list[dict], err: Exception) -> PairDataError:
    """Arrow needs one type per column; name the first row whose field differs from the earlier rows."""
    first_seen: dict[str, tuple[int, str]] = {}
    for row_index, row in enumerate(rows):
        for name, value in row.items():
            if value is None:
                continue
            kind = _kind(value)
            seen = first_seen.setdefault(name, (row_index, kind))
            if seen[1] != kind:
                return PairDataError(
                    f"{path}, row {row_index}, field '{name}': {kind} here but {seen[1]} in row {seen[0]}. "
                    f"A field must have the same type in every row (e.g. all strings, or all message lists); fix or remove row {row_index}."
                )
    return PairDataError(f"{path}: the rows cannot be read as one table ({err}). Give each field the same type in every row.")


# -------------------------------------------------------------------------------------------- validation


def _is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict)


def _check_messages(value, where: str, name: str, must_end_with_assistant: bool):
    if not isinstance(value, list) or not value:
        raise PairDataError(f"{where}, field '{name}': expected a non-empty list of messages, got {value!r:.80}.")
    for i, message in enumerate(value):
        # A key missing in one row of a file arrives as None (Arrow fills it), so None counts as missing.
        if not isinstance(message, dict) or message.get("role") is None or "content" not in message:
            raise PairDataError(f"{where}, field '{name}', message {i}: each message needs 'role' and 'content' keys, got {message!r:.80}.")
        if message["role"] not in ROLES:
            raise PairDataError(f"{where}, field '{name}', message {i}: unknown role {message['role']!r}; use one of {', '.join(ROLES)}.")
        if message["content"] is not None and not isinstance(message["content"], (str, list)):
            raise PairDataError(f"{where}, field '{name}', message {i}: 'content' must be text, got {type(message['content']).__name__}.")
    if must_end_with_assistant:
        last = value[-1]
        if last["role"] != "assistant":
            raise PairDataError(f"{where}, field '{name}': the conversation must end with an assistant turn (the response to score), but it ends with {last['role']!r}.")
        if not last["content"] or (isinstance(last["content"], str) and not last["content"].strip()):
            raise PairDataError(f"{where}, field '{name}': the assistant response is empty. Remove the row or fill it in.")


def _check_text(value, where: str, name: str):
    if not isinstance(value, str):
        raise PairDataError(f"{where}, field '{name}': expected a string, got {type(value).__name__} ({value!r:.60}).")


def validate_row(row: dict, where: str, margin_column: str | None = "margin", vocab_size: int | None = None) -> dict:
    """Check one row and return it in canonical form: {kind, prompt, chosen, rejected[, margin]} or ids.

    kind is "text", "messages" or "ids". Raises PairDataError naming `where` (file and row) and the field.
    """
    for old, new in (("input_ids_chosen", "chosen_ids"), ("input_ids_rejected", "rejected_ids")):
        if old in row:
            raise PairDataError(f"{where}: column '{old}' is an old TRL name; rename it to '{new}'.")
    row = {LEGACY_ID_COLUMNS.get(k, k): v for k, v in row.items()}
    out: dict = {}
    if "chosen_ids" in row or "rejected_ids" in row:
        for name in ("chosen_ids", "rejected_ids"):
            ids = row.get(name)
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise PairDataError(f"{where}, field '{name}': expected a non-empty list of integer token ids, got {ids!r:.80}.")
            if vocab_size is not None:
                bad = [t for t in ids if not 0 <= t < vocab_size]
                if bad:
                    raise PairDataError(f"{where}, field '{name}': token id {bad[0]} is outside the tokenizer's vocabulary (0..{vocab_size - 1}). Were these ids made with another tokenizer?")
        out.update(kind="ids", chosen=row["chosen_ids"], rejected=row["rejected_ids"])
    else:
        for name in ("chosen", "rejected"):
            if name not in row or row[name] is None:
                raise PairDataError(f"{where}: missing field '{name}'. Each row needs 'chosen' and 'rejected' (and optionally 'prompt').")
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        if _is_messages(chosen) or _is_messages(rejected) or _is_messages(prompt):
            if prompt is not None:
                _check_messages(prompt, where, "prompt", must_end_with_assistant=False)
            _check_messages(chosen, where, "chosen", must_end_with_assistant=True)
            _check_messages(rejected, where, "rejected", must_end_with_assistant=True)
            out.update(kind="messages", prompt=prompt or [], chosen=chosen, rejected=rejected)
            for name in ("tools", "chat_template_kwargs"):
                if row.get(name) is not None:
                    out[name] = json.loads(row[name]) if isinstance(row[name], str) else row[name]
        else:
            if prompt is not None:
                _check_text(prompt, where, "prompt")
            _check_text(chosen, where, "chosen")
            _check_text(rejected, where, "rejected")
            for name, text in (("chosen", chosen), ("rejected", rejected)):
                if not text.strip():
                    raise PairDataError(f"{where}, field '{name}': the response is empty or whitespace only. Remove the row or fill it in.")
            out.update(kind="text", prompt=prompt or "", chosen=chosen, rejected=rejected)
    if out["chosen"] == out["rejected"]:
        raise PairDataError(f"{where}: 'chosen' and 'rejected' are identical, so the pair carries no preference. Remove the row.")
    if margin_column is not None and margin_column in row:
        margin = row[margin_column]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or abs(margin) > torch.finfo(torch.float32).max:
            raise PairDataError(f"{where}, field '{margin_column}': the margin must be a finite number (float32 range), got {margin!r}. Fix the value or remove the row.")
        out["margin"] = float(margin)
    return out


# ---------------------------------------------------------------------------------------- tokenization


def _chat_ids(tokenizer, messages: list[dict], tools=None, chat_template_kwargs=None) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True, **(chat_template_kwargs or {}))
    return list(encoded["input_ids"])


def tokenize_response(tokenizer, prompt, response) -> list[int]:
    """Token ids of prompt + response, formatted exactly as training formats them (TRL §1.3-1.5).

    `prompt`/`response` are both strings (EOS appended unless present, tokenizer's special tokens added) or
    both message lists (chat template, nothing appended). Training and rmtorch.score both call this, so a
    model is always scored on the format it was trained on.
    """
    if isinstance(response, str):
        if tokenizer.eos_token and not response.endswith(tokenizer.eos_token):
            response = response + tokenizer.eos_token
        return list(tokenizer(text=(prompt or "") + response)["input_ids"])
    return _chat_ids(tokenizer, list(prompt or []) + list(response))


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Tokens two sequences share at the start: the prompt of a chosen/rejected pair."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def keep_end(ids: list[int], max_length: int, keep_first: bool) -> list[int]:
    """Cut tokens from the left (after a leading BOS, kept) so the sequence ends intact."""
    if len(ids) <= max_length:
        return ids
    if keep_first:
        return ids[:1] + ids[len(ids) - (max_length - 1):]
    return ids[len(ids) - max_length:]


def tokenize_pairs(
    dataset,
    tokenizer,
    max_length: int | None = None,
    truncation: str = "drop",
    on_bad_row: str = "error",
    margin_column: str | None = "margin",
    source: str | None = None,
    return_report: bool = False,
    keep_columns: list[str] | tuple[str, ...] = (),
):
    """Validate and tokenize preference rows into a `datasets.Dataset` of `chosen_ids`, `rejected_ids` (, `margin`).

    truncation: "drop" removes pairs where either side exceeds max_length (TRL's rule; counted in the
    report), "keep_end" cuts the shared prompt from the left so both responses survive; a pair whose
    response alone does not fit is dropped and counted.
    on_bad_row: "error" raises PairDataError naming file, row and field; "skip" skips and counts.
    keep_columns: raw columns (e.g. "category") carried through unchanged, aligned with the kept pairs.
    Returns the dataset, or (dataset, TokenizeReport) with return_report=True.
    """
    if truncation not in ("drop", "keep_end"):
        raise ValueError(f"truncation must be 'drop' or 'keep_end', got {truncation!r}.")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}.")
    if isinstance(dataset, (str, Path)):
        dataset = load_pairs(dataset)
    rows = dataset.to_list() if isinstance(dataset, datasets.Dataset) else list(dataset)
    if source is None and isinstance(dataset, datasets.Dataset):
        source = dataset.info.description or None
    source = source or "dataset"
    bos_id = tokenizer.bos_token_id
    report = TokenizeReport(rows_in=len(rows))
    columns: dict[str, list] = {"chosen_ids": [], "rejected_ids": []}
    margins: list[float] = []
    missing = [name for name in keep_columns if rows and name not in rows[0]]
    if missing:
        raise ValueError(f"{source}: keep_columns {missing} are not columns of the data (it has {sorted(rows[0])}).")
    kept: dict[str, list] = {name: [] for name in keep_columns}
    for row_index, row in enumerate(rows):
        where = f"{source}, row {row_index}"
        try:
            pair = validate_row(row, where, margin_column=margin_column, vocab_size=len(tokenizer))
            chosen_ids, rejected_ids = _tokenize_pair(tokenizer, pair, where)
        except PairDataError as err:
            if on_bad_row == "error":
                raise
            report.skipped_bad += 1
            if len(report.bad_rows) < 20:
                report.bad_rows.append(str(err))
            continue
        if max_length is not None and max(len(chosen_ids), len(rejected_ids)) > max_length:
            if truncation == "drop":
                report.dropped_too_long += 1
                continue
            prompt_length = common_prefix_length(chosen_ids, rejected_ids)
            keep_first = bos_id is not None and chosen_ids[0] == bos_id
            longest_response = max(len(chosen_ids), len(rejected_ids)) - prompt_length
            if longest_response + int(keep_first) > max_length:
                report.dropped_too_long += 1  # the response itself does not fit: cutting it would change what is judged
                continue
            # Cut the same prompt tokens from both sides, so the pair still shares one prompt (and the
            # shared-prompt forward still applies); the shorter side may end up below max_length.
            overflow = max(len(chosen_ids), len(rejected_ids)) - max_length
            start = int(keep_first)
            chosen_ids = chosen_ids[:start] + chosen_ids[start + overflow:]
            rejected_ids = rejected_ids[:start] + rejected_ids[start + overflow:]
            report.truncated += 1
        columns["chosen_ids"].append(chosen_ids)
        columns["rejected_ids"].append(rejected_ids)
        if "margin" in pair:
            margins.append(pair["margin"])
        for name in keep_columns:
            kept[name].append(row.get(name))  # a row without it (list input) carries None
    if margins:
        if len(margins) != len(columns["chosen_ids"]):
            raise PairDataError(f"{source}: column '{margin_column}' is set on some rows but missing on others; give every row a margin or none.")
        columns["margin"] = margins
    report.pairs_out = len(columns["chosen_ids"])
    if report.pairs_out == 0:
        raise PairDataError(f"{source}: no usable pairs left ({report.summary()}). {_empty_hint(report, max_length)}")
    features = datasets.Features(
        {
            "chosen_ids": datasets.Sequence(datasets.Value("int32")),
            "rejected_ids": datasets.Sequence(datasets.Value("int32")),
            **({"margin": datasets.Value("float32")} if margins else {}),
        }
    )
    tokenized = datasets.Dataset.from_dict(columns, features=features)
    for name, values in kept.items():
        tokenized = tokenized.add_column(name, values)
    return (tokenized, report) if return_report else tokenized


def _empty_hint(report: TokenizeReport, max_length) -> str:
    if report.dropped_too_long:
        return f"Raise max_length (now {max_length}) or use truncation='keep_end'."
    return "Fix the rows listed above or check the file's columns."


def _tokenize_pair(tokenizer, pair: dict, where: str) -> tuple[list[int], list[int]]:
    if pair["kind"] == "ids":
        return list(pair["chosen"]), list(pair["rejected"])
    if pair["kind"] == "messages":
        if not getattr(tokenizer, "chat_template", None):
            raise PairDataError(f"{where}: the data is conversational (message lists) but the tokenizer has no chat template. Use a chat model's tokenizer, set tokenizer.chat_template, or give the rows as strings.")
        tools, kwargs = pair.get("tools"), pair.get("chat_template_kwargs")
        return (
            _chat_ids(tokenizer, pair["prompt"] + pair["chosen"], tools, kwargs),
            _chat_ids(tokenizer, pair["prompt"] + pair["rejected"], tools, kwargs),
        )
    return tokenize_response(tokenizer, pair["prompt"], pair["chosen"]), tokenize_response(tokenizer, pair["prompt"], pair["rejected"])


# ------------------------------------------------------------------------------------------- collation


def pad_sequences(sequences: list[list[int]], pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
    """(N, T) int64 ids and attention mask padded to the longest sequence (rounded up to a multiple if asked)."""
    length = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if padding_side == "right" else slice(length - len(seq), length)
        input_ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


@dataclass
class PairCollator:
    """Batch of B pairs → one (2B, T) forward: rows 0..B-1 chosen, rows B..2B-1 rejected (as TRL)."""

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        input_ids, attention_mask = pad_sequences(sequences, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float)
        return batch
