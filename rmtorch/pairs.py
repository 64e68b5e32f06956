"""Preference pairs: validation, tokenization (`rmtorch.formatting`'s rules) and truncation, into one `PairSet`.

Formats accepted (one per dataset, checked per row):
- standard:        prompt / chosen / rejected strings
- implicit prompt: chosen / rejected strings (the prompt is inside each)
- conversational:  prompt / chosen / rejected message lists (prompt optional)
- pre-tokenized:   chosen_ids / rejected_ids lists of token ids
plus a numeric `margin` column, used when present (as TRL does; `margin_column` names another).

Token ids equal TRL 1.16's RewardTrainer (rmtorch.formatting). Each pair also stores its prompt length (the tokens
chosen and rejected share as the prompt), found once here and used by truncation, packing and the scorer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rmtorch.files import PairDataError, Rows, read_rows
from rmtorch.formatting import bos_to_keep, chat_ids, common_prefix_length, cut_prompt, prompt_ids, tokenize_response

ROLES = ("system", "user", "assistant", "tool")
LEGACY_ID_COLUMNS = {"chosen_input_ids": "chosen_ids", "rejected_input_ids": "rejected_ids"}
MAX_BAD_ROW_MESSAGES = 20


@dataclass(kw_only=True)
class RowCounts:
    """Counts every reader keeps: rows in, rows dropped or cut, and the messages of skipped bad rows."""

    rows_in: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    skipped_bad: int = 0
    bad_rows: list[str] = field(default_factory=list)  # messages of skipped rows (the first 20)

    def skip(self, message: str) -> None:
        self.skipped_bad += 1
        if len(self.bad_rows) < MAX_BAD_ROW_MESSAGES:
            self.bad_rows.append(message)

    def counts_summary(self, kept: str, cut: str = "truncated from the left (keep_end)") -> str:
        """`kept`, then the rows dropped as too long, cut (`cut` says how) and skipped as bad, those that happened."""
        text = kept
        if self.dropped_too_long:
            text += f", {self.dropped_too_long} dropped as longer than max_length"
        if self.truncated:
            text += f", {self.truncated} {cut}"
        if self.skipped_bad:
            text += f", {self.skipped_bad} bad rows skipped"
        return text

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class TokenizeReport(RowCounts):
    """What tokenize_pairs did to the rows it was given; nothing is dropped without a count here."""

    pairs_out: int = 0
    truncated_prompt_tokens: int = 0  # prompt tokens cut by keep_end, all pairs together
    truncated_within_turn: int = 0  # conversations whose cut fell inside a turn (no whole turn was short enough)

    def summary(self) -> str:
        cut = f"truncated from the left (keep_end, {self.truncated_prompt_tokens} prompt tokens cut)"
        return self.counts_summary(f"{self.pairs_out}/{self.rows_in} pairs kept", cut)


class ColumnSet(torch.utils.data.Dataset):
    """Rows held as columns (lists of equal length): `data["name"]` is a column, `data[i]` the i-th row as a dict."""

    def __init__(self, columns: dict[str, list], source: str):
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{type(self).__name__} columns differ in length: {lengths}")
        self.columns, self.source = columns, source

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.columns[key]
        return {name: values[key] for name, values in self.columns.items()}

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)


class PairSet(ColumnSet):
    """Tokenized pairs, one container from file to batch. Columns are lists of equal length:

    chosen_ids, rejected_ids: token ids; prompt_length: tokens both share as the prompt (the first
    prompt_length ids of each are equal, and each keeps at least one token of its own); row: the pair's row
    number in its source; margin (optional); plus raw columns carried through (e.g. category, id).
    `pairs["chosen_ids"]` is a column, `pairs[i]` the i-th pair as a dict.
    """

    def __init__(self, columns: dict[str, list], source: str = "dataset", report: TokenizeReport | None = None):
        super().__init__(columns, source)
        self.report = report or TokenizeReport(
            rows_in=len(columns["chosen_ids"]), pairs_out=len(columns["chosen_ids"])
        )

    def select(self, indices: Sequence[int]) -> PairSet:
        return PairSet(
            {name: [values[i] for i in indices] for name, values in self.columns.items()}, self.source, self.report
        )

    def to_list(self) -> list[dict]:
        return [self[i] for i in range(len(self))]

    def lengths(self) -> list[int]:
        """Tokens in the longer sequence of each pair (prompt and template included)."""
        return [max(len(c), len(r)) for c, r in zip(self.columns["chosen_ids"], self.columns["rejected_ids"])]

    def response_lengths(self) -> tuple[list[int], list[int]]:
        """(chosen, rejected) tokens of each pair's responses alone: what follows the prompt_length they share."""
        prompts = self.columns["prompt_length"]
        return (
            [len(ids) - p for ids, p in zip(self.columns["chosen_ids"], prompts)],
            [len(ids) - p for ids, p in zip(self.columns["rejected_ids"], prompts)],
        )

    def sequences(self) -> tuple[list[list[int]], list[int]]:
        """(2N sequences, their prompt lengths): every chosen, then every rejected; what the scoring path takes."""
        prompt_lengths = self.columns["prompt_length"]
        return self.columns["chosen_ids"] + self.columns["rejected_ids"], prompt_lengths + prompt_lengths


# -------------------------------------------------------------------------------------------- validation


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


class _KindCheck:
    """A field read by rmtorch must keep one shape across rows: names the first row that differs."""

    def __init__(self, fields: Sequence[str]):
        self.fields = fields
        self.first_seen: dict[str, tuple[int, str]] = {}

    def __call__(self, row: dict, number: int, where: str) -> None:
        for name in self.fields:
            value = row.get(name)
            if value is None:
                continue
            kind = _kind(value)
            seen_row, seen_kind = self.first_seen.setdefault(name, (number, kind))
            if seen_kind != kind and not (seen_kind.startswith("a list") and kind == "an empty list"):
                raise PairDataError(
                    f"{where}, field '{name}': {kind} here but {seen_kind} in row {seen_row}. A field must have the "
                    f"same type in every row (e.g. all strings, or all message lists); fix or remove row {number}."
                )


def _is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict)


def check_messages(value, where: str, name: str, must_end_with_assistant: bool, allow_empty_response: bool = False):
    """Training's rule for one field's message list; PairDataError naming `where`, the field, the message and the fix.

    A non-empty list of {'role', 'content'} dicts with a role from ROLES and text content (or 'tool_calls').
    must_end_with_assistant: the list holds the response, so it ends with a non-empty assistant turn (empty
    allowed with allow_empty_response: the scorer scores empty RL completions). rmtorch.score checks rows with it.
    """
    if not isinstance(value, list) or not value:
        if not must_end_with_assistant:
            fix = f"Give at least one message, or leave '{name}' out."
        elif allow_empty_response:
            fix = "For an empty response give [{'role': 'assistant', 'content': ''}]."
        else:
            fix = "Give the conversation, ending with the assistant response, or remove the row."
        raise PairDataError(
            f"{where}, field '{name}': expected a non-empty list of messages, got {value!r:.80}. {fix}"
        )
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") is None:
            raise PairDataError(
                f"{where}, field '{name}', message {i}: each message needs 'role' and 'content' keys, got "
                f"{message!r:.80}."
            )
        if message["role"] not in ROLES:
            raise PairDataError(
                f"{where}, field '{name}', message {i}: unknown role {message['role']!r}; use one of "
                f"{', '.join(ROLES)}."
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise PairDataError(
                f"{where}, field '{name}', message {i}: 'content' must be text, got {type(content).__name__}."
            )
        last = i == len(value) - 1
        if content is None and not message.get("tool_calls") and not (last and must_end_with_assistant):
            raise PairDataError(
                f"{where}, field '{name}', message {i}: 'content' is missing or null. Give the text, "
                "or 'tool_calls' for an assistant message that calls a tool."
            )
    if must_end_with_assistant:
        last = value[-1]
        if last["role"] != "assistant":
            raise PairDataError(
                f"{where}, field '{name}': the conversation must end with an assistant turn (the response to score), "
                f"but it ends with {last['role']!r}."
            )
        content = last.get("content")
        empty = not content or (isinstance(content, str) and not content.strip())
        if empty and not last.get("tool_calls") and not allow_empty_response:
            raise PairDataError(
                f"{where}, field '{name}': the assistant response is empty. Remove the row or fill it in."
            )


def _check_text(value, where: str, name: str):
    if not isinstance(value, str):
        raise PairDataError(f"{where}, field '{name}': expected a string, got {type(value).__name__} ({value!r:.60}).")


def validate_row(
    row: dict,
    where: str,
    margin_column: str | None = "margin",
    vocab_size: int | None = None,
    margin_required: bool = False,
) -> dict:
    """Check one row and return it in canonical form: {kind, prompt, chosen, rejected[, margin]}.

    kind is "text", "messages" or "ids". margin_required: other rows have a margin, so this one needs one too.
    Raises PairDataError naming `where` (file and row) and the field.
    """
    for old, new in (("input_ids_chosen", "chosen_ids"), ("input_ids_rejected", "rejected_ids")):
        if old in row:
            raise PairDataError(f"{where}: column '{old}' is an old TRL name; rename it to '{new}'.")
    row = {LEGACY_ID_COLUMNS.get(k, k): v for k, v in row.items()}
    out: dict = {}
    if "chosen_ids" in row or "rejected_ids" in row:
        for name in ("chosen_ids", "rejected_ids"):
            ids = row.get(name)
            if (
                not isinstance(ids, list)
                or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
            ):
                raise PairDataError(
                    f"{where}, field '{name}': expected a non-empty list of integer token ids, got {ids!r:.80}."
                )
            bad = [t for t in ids if vocab_size is not None and not 0 <= t < vocab_size]
            if bad:
                raise PairDataError(
                    f"{where}, field '{name}': token id {bad[0]} is outside the tokenizer's vocabulary "
                    f"(0..{vocab_size - 1}). Were these ids made with another tokenizer?"
                )
        out.update(kind="ids", chosen=row["chosen_ids"], rejected=row["rejected_ids"])
    else:
        for name in ("chosen", "rejected"):
            if row.get(name) is None:
                raise PairDataError(
                    f"{where}: missing field '{name}'. Each row needs 'chosen' and 'rejected' (and optionally "
                    "'prompt')."
                )
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        if _is_messages(chosen) or _is_messages(rejected) or _is_messages(prompt):
            if prompt is not None:
                check_messages(prompt, where, "prompt", must_end_with_assistant=False)
            check_messages(chosen, where, "chosen", must_end_with_assistant=True)
            check_messages(rejected, where, "rejected", must_end_with_assistant=True)
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
                    raise PairDataError(
                        f"{where}, field '{name}': the response is empty or whitespace only. Remove the row or fill "
                        "it in."
                    )
            out.update(kind="text", prompt=prompt or "", chosen=chosen, rejected=rejected)
    if out["chosen"] == out["rejected"]:
        raise PairDataError(
            f"{where}: 'chosen' and 'rejected' are identical, so the pair carries no preference. Remove the row."
        )
    if margin_column is not None and (margin_column in row or margin_required):
        margin = row.get(margin_column)
        finite = isinstance(margin, (int, float)) and not isinstance(margin, bool) and math.isfinite(margin)
        if not finite or abs(margin) > torch.finfo(torch.float32).max:
            raise PairDataError(
                f"{where}, field '{margin_column}': the margin must be a finite number (float32 range), got "
                f"{margin!r}. "
                "Fix the value or remove the row."
            )
        out["margin"] = float(margin)
    return out


@dataclass
class _Tokenized:
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_length: int
    turn_starts: list[int] = field(default_factory=list)  # token positions where a prompt message begins (chat)
    conversation: bool = False


def _implicit_prompt(chosen: list[dict], rejected: list[dict]) -> list[dict]:
    """The messages both conversations share before their last turn: the prompt of an implicit-prompt row."""
    shared = []
    for a, b in zip(chosen[:-1], rejected[:-1]):
        if a != b:
            break
        shared.append(a)
    return shared


def _tokenize_pair(tokenizer, pair: dict, where: str) -> _Tokenized:
    if pair["kind"] == "ids":
        chosen_ids, rejected_ids = list(pair["chosen"]), list(pair["rejected"])
        shared = common_prefix_length(chosen_ids, rejected_ids)
        return _Tokenized(chosen_ids, rejected_ids, min(shared, len(chosen_ids) - 1, len(rejected_ids) - 1))
    if pair["kind"] == "messages":
        if not getattr(tokenizer, "chat_template", None):
            raise PairDataError(
                f"{where}: the data is conversational (message lists) but the tokenizer has no chat template. "
                "Use a chat model's tokenizer, set tokenizer.chat_template, or give the rows as strings."
            )
        tools, kwargs = pair.get("tools"), pair.get("chat_template_kwargs")
        prompt = pair["prompt"] or _implicit_prompt(pair["chosen"], pair["rejected"])
        try:
            chosen_ids = chat_ids(tokenizer, pair["prompt"] + pair["chosen"], tools, kwargs)
            rejected_ids = chat_ids(tokenizer, pair["prompt"] + pair["rejected"], tools, kwargs)
            prompt_only = prompt_ids(tokenizer, prompt, tools, kwargs)
            turn_starts = [len(chat_ids(tokenizer, prompt[:k], tools, kwargs)) for k in range(1, len(prompt))]
        except Exception as err:  # a template's own error (jinja): give it the row's location
            raise PairDataError(
                f"{where}: the chat template failed on this row ({type(err).__name__}: {err})."
            ) from None
    else:
        prompt_only = prompt_ids(tokenizer, pair["prompt"])
        chosen_ids = tokenize_response(tokenizer, pair["prompt"], pair["chosen"])
        rejected_ids = tokenize_response(tokenizer, pair["prompt"], pair["rejected"])
        turn_starts = []
        if not pair["prompt"]:  # implicit prompt: what both share is the prompt
            prompt_only = chosen_ids
    prompt_length = min(
        common_prefix_length(prompt_only, chosen_ids),
        common_prefix_length(prompt_only, rejected_ids),
        len(chosen_ids) - 1,
        len(rejected_ids) - 1,
    )  # fmt: skip
    starts = [s for s in turn_starts if 0 < s < prompt_length and chosen_ids[:s] == rejected_ids[:s]]
    return _Tokenized(chosen_ids, rejected_ids, prompt_length, starts, conversation=pair["kind"] == "messages")


def _truncate(tokenized: _Tokenized, max_length: int, bos_id: int | None, report: TokenizeReport) -> _Tokenized | None:
    """`--truncation keep_end`: `formatting.cut_prompt` on the pair, counted in `report` (dropped when a response
    alone does not fit)."""
    cut = cut_prompt(
        [tokenized.chosen_ids, tokenized.rejected_ids], tokenized.prompt_length, max_length, bos_id,
        tokenized.turn_starts,
    )  # fmt: skip
    if cut is None:
        report.dropped_too_long += 1
        return None
    report.truncated += 1
    report.truncated_prompt_tokens += cut.cut
    report.truncated_within_turn += int(tokenized.conversation and not cut.at_turn)
    return _Tokenized(*cut.sequences, cut.prompt_length)


# --------------------------------------------------------------------------------------- tokenization


def as_rows(data, source: str | None = None, on_bad_row: str = "error") -> Rows:
    """Rows from a path, a Rows object, a `datasets.Dataset` or a list of dicts."""
    if isinstance(data, Rows):
        return data
    if isinstance(data, (str, Path)):
        return read_rows(data, on_bad_row)
    if hasattr(data, "to_list") and hasattr(data, "info"):  # a datasets.Dataset
        return Rows(data.to_list(), source or data.info.description or "dataset")
    return Rows(list(data), source or "dataset")


def tokenize_pairs(
    data,
    tokenizer,
    max_length: int | None = None,
    truncation: str = "drop",
    on_bad_row: str = "error",
    margin_column: str | None = "margin",
    source: str | None = None,
    return_report: bool = False,
    keep_columns: Sequence[str] = (),
):
    """Validate and tokenize preference rows into a `PairSet` (chosen_ids, rejected_ids, prompt_length, row,
    margin when the data has one, and `keep_columns`).

    data: a file path, `Rows` (rmtorch.files.read_rows), a `datasets.Dataset` or a list of dicts.
    truncation: "drop" removes pairs where either side exceeds max_length (TRL's rule; counted in the
    report), "keep_end" cuts the shared prompt from the left so both responses survive whole (whole leading
    turns of a conversation when that is enough); a pair whose response alone does not fit is dropped, counted.
    on_bad_row: "error" raises PairDataError naming file, row and field; "skip" skips and counts.
    margin_column: the column holding a per-pair margin; "margin" is used when present (TRL's rule), another
    name must exist, None ignores margins.
    Returns the PairSet, or (PairSet, TokenizeReport) with return_report=True.
    """
    if truncation not in ("drop", "keep_end"):
        raise ValueError(f"truncation must be 'drop' or 'keep_end', got {truncation!r}.")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}.")
    rows = as_rows(data, source, on_bad_row)
    source = source or rows.source
    columns = rows.column_names
    if margin_column is not None and margin_column != "margin" and margin_column not in columns:
        raise PairDataError(
            f"{source}: no column '{margin_column}' (--margin_column) to read margins from; its columns are "
            f"{columns}. "
            "Fix the name, or leave --margin_column at 'margin' (used when present)."
        )
    missing = [name for name in keep_columns if name not in columns]
    if missing:
        raise ValueError(f"{source}: keep_columns {missing} are not columns of the data (it has {sorted(columns)}).")
    has_margin = margin_column is not None and margin_column in columns
    report = TokenizeReport(rows_in=len(rows) + len(rows.bad_rows))
    for message in rows.bad_rows:
        report.skip(message)
    out: dict[str, list] = {"chosen_ids": [], "rejected_ids": [], "prompt_length": [], "row": []}
    if has_margin:
        out["margin"] = []
    kept: dict[str, list] = {name: [] for name in keep_columns}
    kind_check = _KindCheck(["prompt", "chosen", "rejected", "chosen_ids", "rejected_ids", margin_column or "margin"])
    bos_id = bos_to_keep(tokenizer)
    for index, row in enumerate(rows):
        where = f"{source}, row {rows.numbers[index]}"
        try:
            kind_check(row, rows.numbers[index], where)
            pair = validate_row(row, where, margin_column, vocab_size=len(tokenizer), margin_required=has_margin)
            tokenized = _tokenize_pair(tokenizer, pair, where)
        except PairDataError as err:
            if on_bad_row == "error":
                raise
            report.skip(str(err))
            continue
        if max_length is not None and max(len(tokenized.chosen_ids), len(tokenized.rejected_ids)) > max_length:
            if truncation == "drop":
                report.dropped_too_long += 1
                continue
            tokenized = _truncate(tokenized, max_length, bos_id, report)
            if tokenized is None:
                continue
        out["chosen_ids"].append(tokenized.chosen_ids)
        out["rejected_ids"].append(tokenized.rejected_ids)
        out["prompt_length"].append(tokenized.prompt_length)
        out["row"].append(rows.numbers[index])
        if has_margin:
            out["margin"].append(pair["margin"])
        for name in keep_columns:
            kept[name].append(row.get(name))
    report.pairs_out = len(out["chosen_ids"])
    if report.pairs_out == 0:
        raise PairDataError(f"{source}: no usable pairs left ({report.summary()}). {_empty_hint(report, max_length)}")
    pairs = PairSet({**out, **kept}, source, report)
    return (pairs, report) if return_report else pairs


def _empty_hint(report: TokenizeReport, max_length) -> str:
    if report.dropped_too_long:
        return f"Raise max_length (now {max_length}) or use truncation='keep_end'."
    return "Fix the rows listed above or check the file's columns."


def shared_pairs(a: PairSet, b: PairSet) -> int:
    """How many pairs of `b` also occur in `a` (same chosen and rejected token ids): a held-out leak when a is
    the training set and b the eval set."""
    seen = {(tuple(c), tuple(r)) for c, r in zip(a["chosen_ids"], a["rejected_ids"])}
    return sum((tuple(c), tuple(r)) in seen for c, r in zip(b["chosen_ids"], b["rejected_ids"]))
