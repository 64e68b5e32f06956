"""Groups of ranked responses: validation, tokenization and batching, into one `GroupSet`.

Formats accepted (one per dataset, checked per row):
- group:        `prompt` (a string or messages) + `responses` (strings, or message lists ending with the assistant
                turn) + `ranks` (1 = best; equal ranks are ties) or `scores` (higher is better; equal scores tie)
- UltraFeedback: `instruction` (or `prompt`) + `completions`, each {"response": text, "fine-grained_score": number}
                (the mean of the four aspect ratings; `overall_score`, the critique's 1-10, is not read)

Responses are formatted as `rmtorch.pairs` formats a pair's (EOS after text, the chat template for messages), and a
group is packed as one row [prompt, response 1, response 2, ...] with the prompt computed once (`GroupCollator`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rmtorch.batching import pack_groups
from rmtorch.files import PairDataError, Rows
from rmtorch.formatting import bos_to_keep, chat_ids, common_prefix_length, cut_prompt, prompt_ids, tokenize_response
from rmtorch.group_loss import comparisons
from rmtorch.model import compute_rewards
from rmtorch.pairs import ColumnSet, TokenizeReport, _check_text, _is_messages, _kind, as_rows, check_messages

GROUP_COLUMNS = ("responses", "completions")  # a file with either column holds groups, not pairs
ULTRAFEEDBACK_SCORE = "fine-grained_score"


@dataclass(kw_only=True)
class GroupReport(TokenizeReport):
    """What tokenize_groups did; `pairs_out` counts the ordered pairs the kept groups imply."""

    groups_out: int = 0
    responses_out: int = 0

    def summary(self) -> str:
        kept = f"{self.groups_out}/{self.rows_in} groups kept ({self.responses_out} responses, {self.pairs_out} pairs)"
        cut = f"truncated from the left (keep_end, {self.truncated_prompt_tokens} prompt tokens cut)"
        return self.counts_summary(kept, cut)


class GroupSet(ColumnSet):
    """Tokenized groups, one container from file to batch. Columns are lists of equal length:

    ids: each group's token-id sequences; prompt_length: the tokens all of them share as the prompt; scores: one
    label per response, higher is better (ranks are stored negated); row: the group's row in its source; plus raw
    columns carried through (e.g. category). `groups[i]` is the i-th group as a dict.
    """

    def __init__(self, columns: dict[str, list], source: str, report: GroupReport):
        super().__init__(columns, source)
        self.report = report

    def lengths(self) -> list[int]:
        """Tokens in the longest sequence of each group (prompt and template included)."""
        return [max(len(seq) for seq in group) for group in self.columns["ids"]]

    def sequences(self) -> tuple[list[list[int]], list[int]]:
        """(every response's sequence, group after group; their prompt lengths): what the scoring path takes."""
        sequences = [seq for group in self.columns["ids"] for seq in group]
        prompt_lengths = [p for group, p in zip(self.columns["ids"], self.columns["prompt_length"]) for _ in group]
        return sequences, prompt_lengths


def is_group_data(rows: Rows) -> bool:
    """Whether rows hold groups of responses (a `responses` or `completions` column) rather than pairs."""
    return any(name in rows.column_names for name in GROUP_COLUMNS)


# -------------------------------------------------------------------------------------------- validation


def from_ultrafeedback(row: dict, where: str) -> dict:
    """An UltraFeedback row as a group row: the instruction as a user turn, each completion's response as an
    assistant turn, its fine-grained score as its score."""
    instruction = row.get("instruction", row.get("prompt"))
    _check_text(instruction, where, "instruction")
    completions = row["completions"]
    if not isinstance(completions, list):
        raise PairDataError(f"{where}, field 'completions': expected a list of objects, got {_kind(completions)}.")
    responses, scores = [], []
    for i, completion in enumerate(completions):
        if not isinstance(completion, dict) or "response" not in completion:
            raise PairDataError(
                f"{where}, field 'completions', item {i}: expected an object with 'response' and "
                f"'{ULTRAFEEDBACK_SCORE}', got {completion!r:.80}."
            )
        responses.append([{"role": "assistant", "content": completion["response"]}])
        scores.append(completion.get(ULTRAFEEDBACK_SCORE))
    return {"prompt": [{"role": "user", "content": instruction}], "responses": responses, "scores": scores}


def _labels(row: dict, where: str, count: int) -> list[float]:
    """The responses' labels as scores, higher better: `scores` as given, or `ranks` negated."""
    names = [name for name in ("ranks", "scores") if row.get(name) is not None]
    if len(names) != 1:
        got = "both" if names else "neither"
        raise PairDataError(
            f"{where}: a group needs 'ranks' (1 = best) or 'scores' (higher is better), one per response; got {got}."
        )
    name, values = names[0], row[names[0]]
    if not isinstance(values, list) or len(values) != count:
        raise PairDataError(
            f"{where}, field '{name}': expected a list of {count} numbers (one per response), got {values!r:.80}."
        )
    for i, value in enumerate(values):
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or (name == "ranks" and (value != int(value) or value < 1)):
            need = "a whole number >= 1 (1 = best)" if name == "ranks" else "a finite number"
            raise PairDataError(f"{where}, field '{name}', item {i}: must be {need}, got {value!r}.")
    return [float(v) for v in values] if name == "scores" else [-float(v) for v in values]


def validate_group(row: dict, where: str, allow_ties: bool = False) -> dict:
    """Check one group row (or UltraFeedback row) and return {kind, prompt, responses, scores}; kind is "text" or
    "messages". Raises PairDataError naming `where` (file and row), the field and the fix."""
    if "completions" in row:
        row = from_ultrafeedback(row, where)
    prompt, responses = row.get("prompt"), row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise PairDataError(
            f"{where}, field 'responses': expected a list of at least 2 responses to rank, got {responses!r:.80}."
        )
    scores = _labels(row, where, len(responses))
    if _is_messages(prompt) or any(isinstance(r, list) for r in responses):
        if prompt is not None:
            check_messages(prompt, where, "prompt", must_end_with_assistant=False)
        for i, response in enumerate(responses):
            check_messages(response, where, f"responses[{i}]", must_end_with_assistant=True)
        kind, prompt = "messages", prompt or []
    else:
        _check_text(prompt, where, "prompt")
        for i, response in enumerate(responses):
            _check_text(response, where, f"responses[{i}]")
            if not response.strip():
                raise PairDataError(
                    f"{where}, field 'responses[{i}]': the response is empty or whitespace only. Remove it."
                )
        kind = "text"
    for i, response in enumerate(responses):
        if response in responses[:i]:
            raise PairDataError(
                f"{where}, field 'responses': responses {responses.index(response)} and {i} are identical; keep one."
            )
    if not allow_ties and len(set(scores)) == 1:
        raise PairDataError(
            f"{where}: every response has the same rank or score, so the group carries no preference. Remove the "
            "row, or train with --tie_nu to learn from ties."
        )
    return {"kind": kind, "prompt": prompt, "responses": responses, "scores": scores}


def _tokenize_group(tokenizer, group: dict, where: str) -> tuple[list[list[int]], int]:
    """(each response's ids, the prompt length all share), with pairs' formatting rules."""
    if group["kind"] == "messages":
        if not getattr(tokenizer, "chat_template", None):
            raise PairDataError(
                f"{where}: the group is conversational (message lists) but the tokenizer has no chat template."
            )
        try:
            ids = [chat_ids(tokenizer, group["prompt"] + response) for response in group["responses"]]
            prompt_only = prompt_ids(tokenizer, group["prompt"])
        except Exception as err:  # a template's own error (jinja): give it the row's location
            raise PairDataError(
                f"{where}: the chat template failed on this row ({type(err).__name__}: {err})."
            ) from None
    else:
        ids = [tokenize_response(tokenizer, group["prompt"], response) for response in group["responses"]]
        prompt_only = prompt_ids(tokenizer, group["prompt"])
    prompt_length = min([common_prefix_length(prompt_only, seq) for seq in ids] + [len(seq) - 1 for seq in ids])
    return ids, prompt_length


def tokenize_groups(
    data,
    tokenizer,
    max_length: int | None = None,
    truncation: str = "drop",
    on_bad_row: str = "error",
    allow_ties: bool = False,
    source: str | None = None,
    keep_columns: Sequence[str] = (),
) -> GroupSet:
    """Validate and tokenize group rows into a `GroupSet` (ids, prompt_length, scores, row, and `keep_columns`).

    truncation: "drop" removes groups with a sequence over max_length (counted); "keep_end" cuts the shared prompt
    from the left so every response stays whole (a group whose response alone does not fit is dropped, counted).
    on_bad_row: "error" raises PairDataError naming file, row and field; "skip" skips and counts. allow_ties: keep
    groups whose responses all tie (only a tie-aware loss learns from them).
    """
    rows = as_rows(data, source, on_bad_row)
    source = source or rows.source
    report = GroupReport(rows_in=len(rows) + len(rows.bad_rows))
    for message in rows.bad_rows:
        report.skip(message)
    out: dict[str, list] = {"ids": [], "prompt_length": [], "scores": [], "row": [], **{k: [] for k in keep_columns}}
    bos_id = bos_to_keep(tokenizer)
    for index, row in enumerate(rows):
        where = f"{source}, row {rows.numbers[index]}"
        try:
            group = validate_group(row, where, allow_ties)
            ids, prompt_length = _tokenize_group(tokenizer, group, where)
        except PairDataError as err:
            if on_bad_row == "error":
                raise
            report.skip(str(err))
            continue
        if max_length is not None and max(len(seq) for seq in ids) > max_length:
            if truncation == "drop":
                report.dropped_too_long += 1
                continue
            cut = cut_prompt(ids, prompt_length, max_length, bos_id)
            if cut is None:
                report.dropped_too_long += 1
                continue
            report.truncated += 1
            report.truncated_prompt_tokens += cut.cut
            ids, prompt_length = cut.sequences, cut.prompt_length
        out["ids"].append(ids)
        out["prompt_length"].append(prompt_length)
        out["scores"].append(group["scores"])
        out["row"].append(rows.numbers[index])
        for name in keep_columns:
            out[name].append(row.get(name))
        report.responses_out += len(ids)
        report.pairs_out += sum(a > b for a in group["scores"] for b in group["scores"])
    report.groups_out = len(out["ids"])
    if report.groups_out == 0:
        raise PairDataError(f"{source}: no usable groups left ({report.summary()}). Fix the rows or raise max_length.")
    return GroupSet(out, source, report)


def shared_groups(a: GroupSet, b: GroupSet) -> int:
    """How many groups of `b` also occur in `a` (same token ids): a held-out leak when a trains and b evaluates."""
    seen = {tuple(map(tuple, group)) for group in a["ids"]}
    return sum(tuple(map(tuple, group)) in seen for group in b["ids"])


# --------------------------------------------------------------------------------------------------- batches


@dataclass
class GroupCollator:
    """Batch of groups → one packed row, each group laid out as [prompt, response 1, response 2, ...] with the prompt
    computed once; rewards come out in group order. Adds the labels' `comparisons` (ordered pairs, ties,
    Plackett-Luce stages) as index tensors into those rewards."""

    def __call__(self, examples: list[dict]) -> dict:
        batch = pack_groups([e["ids"] for e in examples], prompt_lengths=[e["prompt_length"] for e in examples])
        return {**batch, **comparisons([e["scores"] for e in examples])}


def check_ties(pairs, tie_nu: float | None) -> None:
    """A pair set's `tie` column (kept from the file) must hold true/false, and tied pairs need a tie model. A row
    without it (null: JSONL rows that leave the key out) is untied, so only tied rows need to say so."""
    if "tie" not in pairs.column_names:
        return
    for row, tie in zip(pairs["row"], pairs["tie"]):
        if tie is not None and not isinstance(tie, bool):
            raise PairDataError(f"{pairs.source}, row {row}, field 'tie': must be true or false, got {tie!r}.")
    tied = [row for row, tie in zip(pairs["row"], pairs["tie"]) if tie]
    if tied and tie_nu is None:
        raise PairDataError(
            f"{pairs.source}, rows {tied[:10]}: {len(tied)} pairs are labelled tie: true, which the Bradley-Terry "
            "loss cannot learn from. Train with --tie_nu (Davidson's tie model, e.g. --tie_nu 1), or remove those "
            "rows."
        )


def score_groups(reward_model, groups: GroupSet, **options) -> torch.Tensor:
    """(M,) rewards of every response of a GroupSet, group after group, through `rmtorch.model.compute_rewards` (each
    group's prompt computed once when packing). `options` go to compute_rewards."""
    return compute_rewards(reward_model, *groups.sequences(), **options)
