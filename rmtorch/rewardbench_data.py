"""RewardBench data: its rows read and checked (every message names the file, row, field and fix) into
`rmtorch.rewardbench.Prompt`s, and their completions tokenized as training tokenizes.

Formatting is training's own (`rmtorch.formatting.tokenize_response`): the prompt as a user turn and each completion
as the assistant turn through the chat template, or prompt + completion + EOS as plain text when the tokenizer
has no template. Every completion of a prompt records the tokens it shares with the prompt, so
`compute_rewards` (with packing) runs the prompt once for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rmtorch.files import PairDataError, Rows
from rmtorch.formatting import bos_to_keep, common_prefix_length, cut_prompt, prompt_ids, tokenize_response
from rmtorch.pairs import RowCounts
from rmtorch.rewardbench import BENCHMARKS, FIELDS, PUBLISHED_ROWS, TIES, TIES_ID, Prompt

# --------------------------------------------------------------------------------------------------- rows


@dataclass(kw_only=True)
class DataReport(RowCounts):
    """What reading and tokenizing did to the rows; nothing is left out without a count here.
    `truncated`: rows whose prompt was cut from the left (keep_end)."""

    source: str
    rows_scored: int = 0

    def summary(self) -> str:
        return self.counts_summary(
            f"{self.rows_scored}/{self.rows_in} rows scored", "with their prompt cut from the left (keep_end)"
        )


def _other(benchmark: str) -> str:
    return "rewardbench2" if benchmark == "rewardbench" else "rewardbench"


def _check_strings(value, where: str, name: str, benchmark: str) -> list[str]:
    """A v1 string field as a one-item list, a v2 list field as it is; raise PairDataError naming the fix."""
    if benchmark == "rewardbench":
        if isinstance(value, list):
            raise PairDataError(
                f"{where}, field '{name}': a list, as in RewardBench 2 data; v1 rows hold one string. "
                "Use --benchmark rewardbench2 for this file."
            )
        if not isinstance(value, str):
            raise PairDataError(f"{where}, field '{name}': expected a string, got {type(value).__name__}.")
        return [value]
    if isinstance(value, str):
        raise PairDataError(
            f"{where}, field '{name}': a string, as in RewardBench v1 data; RewardBench 2 rows hold a list of "
            "completions. Use --benchmark rewardbench for this file."
        )
    if not isinstance(value, list) or not value or not all(isinstance(text, str) for text in value):
        raise PairDataError(f"{where}, field '{name}': expected a non-empty list of strings, got {value!r:.80}.")
    return value


def _subset(value, where: str, benchmark: str) -> str:
    """The subset's published name; RewardBench 2 names match ignoring case (its own runner finds Ties so)."""
    for name in PUBLISHED_ROWS[benchmark]:
        if value == name or (benchmark == "rewardbench2" and str(value).lower() == name.lower()):
            return name
    other = _other(benchmark)
    hint = ""
    if any(str(value).lower() == name.lower() for name in PUBLISHED_ROWS[other]):
        hint = f" It is a {BENCHMARKS[other]} subset: use --benchmark {other}."
    raise PairDataError(
        f"{where}, field 'subset': unknown subset {value!r}; {BENCHMARKS[benchmark]} has "
        f"{', '.join(PUBLISHED_ROWS[benchmark])}.{hint} Fix the value or remove the row."
    )


def read_prompt(row: dict, benchmark: str, source: str, number: int) -> Prompt:
    """Check row `number` of `source` as a row of `benchmark` ('rewardbench' or 'rewardbench2'); return it as a
    Prompt. Raises PairDataError naming the file, row and field, and the fix."""
    where = f"{source}, row {number}"
    for name in FIELDS[benchmark]:
        if row.get(name) is None:
            other = _other(benchmark)
            fix = (
                f"these look like {BENCHMARKS[other]} rows: use --benchmark {other}"
                if all(row.get(f) is not None for f in FIELDS[other])
                else "fill it in or remove the row"
            )
            raise PairDataError(
                f"{where}, field '{name}': missing. {BENCHMARKS[benchmark]} rows need "
                f"{', '.join(FIELDS[benchmark])}; {fix}."
            )
    if not isinstance(row["prompt"], str):
        raise PairDataError(f"{where}, field 'prompt': expected a string, got {type(row['prompt']).__name__}.")
    chosen = _check_strings(row["chosen"], where, "chosen", benchmark)
    rejected = _check_strings(row["rejected"], where, "rejected", benchmark)
    subset = _subset(row["subset"], where, benchmark)
    if benchmark == "rewardbench2":
        _check_v2_counts(row, where, subset, chosen, rejected)
    return Prompt(number, row["id"], subset, row["prompt"], chosen + rejected, len(chosen))


def _check_v2_counts(row: dict, where: str, subset: str, chosen: list[str], rejected: list[str]) -> None:
    num_correct = row["num_correct"]
    if isinstance(num_correct, bool) or not isinstance(num_correct, int) or num_correct != len(chosen):
        raise PairDataError(
            f"{where}, field 'num_correct': {num_correct!r}, but 'chosen' holds {len(chosen)} completions. "
            "num_correct counts the chosen (correct) completions; fix the row or remove it."
        )
    total = row.get("total_completions")
    if total is not None and total != len(chosen) + len(rejected):
        raise PairDataError(
            f"{where}, field 'total_completions': {total!r}, but 'chosen' and 'rejected' hold "
            f"{len(chosen) + len(rejected)} completions together. Fix the row or remove it."
        )
    if subset != TIES and len(chosen) != 1:
        raise PairDataError(
            f"{where}, field 'chosen': {len(chosen)} completions; outside Ties RewardBench 2 scores best-of-N "
            "with exactly one chosen completion. Fix the row or remove it."
        )
    if subset == TIES and not (isinstance(row["id"], str) and TIES_ID.fullmatch(row["id"])):
        raise PairDataError(
            f"{where}, field 'id': {row['id']!r}; a Ties row's id is 'ref:N' or 'tied:N' (the reference and the "
            "tied version of question N), which its score pairs up. Fix the id or remove the row."
        )


def read_prompts(rows: Rows, benchmark: str, on_bad_row: str = "error") -> tuple[list[Prompt], DataReport]:
    """Every usable row of `rows` as a Prompt, and the report counting the rest.

    on_bad_row "error" raises PairDataError at the first bad row; "skip" skips and counts it (a second Ties row
    with an id already seen counts as bad: the Ties score pairs rows by id).
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {', '.join(BENCHMARKS)}, got {benchmark!r}.")
    report = DataReport(source=rows.source, rows_in=len(rows) + len(rows.bad_rows))
    for message in rows.bad_rows:
        report.skip(message)
    prompts, ties_ids = [], {}
    for row, number in zip(rows, rows.numbers):
        try:
            prompt = read_prompt(row, benchmark, rows.source, number)
            if prompt.subset == TIES and prompt.id in ties_ids:
                raise PairDataError(
                    f"{rows.source}, row {number}, field 'id': {prompt.id!r} is also the id of row "
                    f"{ties_ids[prompt.id]}; the Ties score pairs rows by id, so each must be unique. Remove the "
                    "duplicate."
                )
        except PairDataError as err:
            if on_bad_row == "error":
                raise
            report.skip(str(err))
            continue
        if prompt.subset == TIES:
            ties_ids[prompt.id] = number
        prompts.append(prompt)
    if not prompts:
        raise PairDataError(f"{rows.source}: no usable {BENCHMARKS[benchmark]} rows ({report.summary()}).")
    return prompts, report


# --------------------------------------------------------------------------------------------- tokenizing


@dataclass
class TokenizedPrompts:
    """The prompts kept and their completions' token ids, flat: prompt i owns sequences[starts[i]:starts[i+1]]."""

    prompts: list[Prompt]
    sequences: list[list[int]]
    prompt_lengths: list[int]  # tokens each sequence shares with the other completions of its prompt
    starts: list[int]

    def per_prompt(self, rewards: Sequence[float]) -> list[list[float]]:
        """Flat rewards (one per sequence) cut into one list per prompt."""
        return [list(rewards[a:b]) for a, b in zip(self.starts, self.starts[1:])]


def completion_ids(tokenizer, prompt: str, completions: Sequence[str]) -> tuple[list[list[int]], int]:
    """Training's token ids of every completion of `prompt`, and how many leading tokens they all share with it.

    With a chat template the prompt is a user turn and each completion the assistant turn; without one, plain
    text (prompt + completion, EOS appended). A token merged across the boundary belongs to the completion.
    """
    if getattr(tokenizer, "chat_template", None):
        turn = [{"role": "user", "content": prompt}]
        sequences = [tokenize_response(tokenizer, turn, [{"role": "assistant", "content": c}]) for c in completions]
        shared = prompt_ids(tokenizer, turn)
    else:
        sequences = [tokenize_response(tokenizer, prompt, c) for c in completions]
        shared = prompt_ids(tokenizer, prompt)
    return sequences, min(min(common_prefix_length(shared, ids), len(ids) - 1) for ids in sequences)


def tokenize_prompts(
    prompts: Sequence[Prompt], tokenizer, report: DataReport, max_length: int | None = None, truncation: str = "drop"
) -> TokenizedPrompts:
    """Token ids of every completion. A row longer than max_length is dropped ("drop"), or its prompt is cut
    from the left so every completion fits whole ("keep_end"; dropped when a completion alone is too long).
    Both are counted in `report`."""
    bos_id = bos_to_keep(tokenizer)
    kept, sequences, prompt_lengths, starts = [], [], [], [0]
    for prompt in prompts:
        ids, shared = completion_ids(tokenizer, prompt.prompt, prompt.completions)
        if max_length is not None and max(len(s) for s in ids) > max_length:
            cut = cut_prompt(ids, shared, max_length, bos_id) if truncation == "keep_end" else None
            if cut is None:
                report.dropped_too_long += 1
                continue
            ids, shared = cut.sequences, cut.prompt_length
            report.truncated += 1
        kept.append(prompt)
        sequences += ids
        prompt_lengths += [shared] * len(ids)
        starts.append(len(sequences))
    report.rows_scored = len(kept)
    if not kept:
        raise PairDataError(
            f"{report.source}: every row is longer than max_length={max_length} tokens ({report.summary()}). "
            "Raise --max_length or use --truncation keep_end."
        )
    return TokenizedPrompts(kept, sequences, prompt_lengths, starts)
