"""Process reward models: a reward per reasoning step. Step-labelled rows → token ids with the position of each step's
end, the loss at those positions, batches, scoring and the step metrics.

A row is TRL's stepwise-supervision layout: `prompt` (a string), `completions` (the steps, a list of strings; or one
string holding them, split at the step separator) and `labels` (one per step: true/false, or a number).

Token ids equal TRL's PRMTrainer (the last release that had it): the prompt tokenized without special tokens, after
the BOS id when the tokenizer has one; each step tokenized on its own without special tokens and followed by the
separator's ids (`tokenizer.encode(separator)`, "\\n" by default); nothing appended at the end. A step's label sits
on the last token of its separator, which is where its reward is read: the model sees the prompt and every step up
to and including that one. Steps are found again by token id (the separator's ids), so training, the scorer and the
server agree on where a step ends; a step whose own ids contain the separator's is refused.

The model keeps rmtorch's reward head (one output per token, `num_labels=1`): true/false labels train with binary
cross-entropy on that output (a logit), numbers with the squared error. TRL trained a 2-class token classifier with
cross-entropy; for two classes softmax cross-entropy equals binary cross-entropy on the logit difference l1 - l0, so
one output is the same model with one parameter vector fewer (docs/design.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rmtorch.batching import micro_batches, pack_groups, pad_sequences
from rmtorch.config import run_text_options
from rmtorch.files import PairDataError, Rows, write_json, write_jsonl
from rmtorch.pairs import ColumnSet, RowCounts, _kind, as_rows

STEP_COLUMNS = ("completions", "labels")  # a file with both holds step-labelled rows
AGGREGATIONS = ("min", "last", "mean", "product")  # a row's reward from its step rewards
DEFAULT_SEPARATOR = "\n"  # TRL's step_separator


def is_step_data(rows: Rows) -> bool:
    """Whether rows hold step-labelled completions (`completions` and `labels` columns)."""
    return all(name in rows.column_names for name in STEP_COLUMNS)


# -------------------------------------------------------------------------------------------- validation


def split_steps(completion: str, separator: str) -> list[str]:
    """The steps of one completion string that marks them with `separator` (a trailing separator ends the last)."""
    steps = completion.split(separator)
    return steps[:-1] if len(steps) > 1 and steps[-1] == "" else steps


def _label(value, where: str, i: int) -> float | bool:
    number = isinstance(value, (int, float)) and math.isfinite(value)
    if not number:
        raise PairDataError(
            f"{where}, field 'labels', item {i}: a step label must be true/false or a finite number, got {value!r}."
        )
    return value


def validate_step_row(row: dict, where: str, separator: str, labelled: bool = True) -> dict:
    """Check one step-labelled row and return {prompt, steps, labels}; labels keep their kind (bool or number).
    labelled=False (scoring): no labels. Raises PairDataError naming `where` (file and row), the field and the fix."""
    prompt, completions, labels = row.get("prompt"), row.get("completions"), row.get("labels")
    if not isinstance(prompt, str):
        raise PairDataError(
            f"{where}, field 'prompt': expected a string, got {_kind(prompt)}. Step-labelled rows take text prompts "
            "(render a conversation with the chat template first)."
        )
    steps = split_steps(completions, separator) if isinstance(completions, str) else completions
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise PairDataError(
            f"{where}, field 'completions': expected a non-empty list of step strings (or one string whose steps "
            f"the separator {separator!r} marks), got {completions!r:.80}."
        )
    if labelled and (not isinstance(labels, list) or len(labels) != len(steps)):
        raise PairDataError(
            f"{where}, field 'labels': expected a list of {len(steps)} labels (one per step), got {labels!r:.80}."
        )
    for i, step in enumerate(steps):
        if not step.strip():
            raise PairDataError(f"{where}, field 'completions', step {i}: the step is empty. Remove it and its label.")
        if separator in step:
            raise PairDataError(
                f"{where}, field 'completions', step {i}: the step holds the step separator {separator!r}, which "
                "would mark a step end inside it. Split it into two steps, or choose another --step_separator."
            )
    return {"prompt": prompt, "steps": steps, "labels": [_label(v, where, i) for i, v in enumerate(labels or [])]}


# -------------------------------------------------------------------------------------------- token ids


def separator_ends(ids: Sequence[int], separator_ids: Sequence[int], start: int = 0) -> list[int]:
    """Positions (from `start` on) of the last token of each occurrence of `separator_ids` in `ids`: the step ends,
    found by token id."""
    n = len(separator_ids)
    ends, position = [], start
    while position + n <= len(ids):
        if list(ids[position : position + n]) == list(separator_ids):
            ends.append(position + n - 1)
            position += n
        else:
            position += 1
    return ends


def step_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's ids as TRL's PRMTrainer made them: no special tokens, after the BOS id when the tokenizer has one."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def tokenize_steps_row(tokenizer, prompt: str, steps: Sequence[str], separator_ids: list[int], where: str = "row"):
    """(ids, prompt length, step ends) of one row: prompt ids, then each step's ids followed by the separator's."""
    ids = step_prompt_ids(tokenizer, prompt)
    prompt_length, ends = len(ids), []
    for step in steps:
        ids += list(tokenizer(step, add_special_tokens=False)["input_ids"]) + separator_ids
        ends.append(len(ids) - 1)
    found = separator_ends(ids, separator_ids, start=prompt_length)
    if found != ends:  # a step's own tokens hold the separator's ids: its end is not where the ids say
        step = next((i for i, (a, b) in enumerate(zip(found, ends)) if a != b), len(ends) - 1)
        raise PairDataError(
            f"{where}, field 'completions', step {step}: the step's tokens hold the separator's ids {separator_ids}, "
            "so steps could not be found again by token id. Choose another --step_separator."
        )
    return ids, prompt_length, ends


def separator_ids_of(tokenizer, separator: str) -> list[int]:
    """The separator's ids (TRL: `tokenizer.encode(separator, add_special_tokens=False)`); never empty."""
    ids = list(tokenizer.encode(separator, add_special_tokens=False))
    if not ids:
        raise ValueError(f"The step separator {separator!r} tokenizes to no tokens; choose a visible separator.")
    return ids


# ----------------------------------------------------------------------------------------------- the set


@dataclass(kw_only=True)
class StepReport(RowCounts):
    """What tokenize_steps did; nothing is dropped without a count here."""

    rows_out: int = 0
    steps_out: int = 0
    label_kind: str = "binary"  # "binary" (true/false: BCE) or "number" (squared error)

    def summary(self) -> str:  # step rows are dropped, never cut: `truncated` stays 0
        return self.counts_summary(
            f"{self.rows_out}/{self.rows_in} rows kept ({self.steps_out} labelled steps, {self.label_kind})"
        )


class StepSet(ColumnSet):
    """Tokenized step-labelled rows, one container from file to batch. Columns are lists of equal length:

    ids: token ids; prompt_length: the prompt's tokens (BOS included); step_ends: each step's label position (the
    last token of its separator); labels: one float per step (true = 1.0); trained: which steps the loss reads (all,
    or the last with last_step_only); row: the row in its source. `steps[i]` is the i-th row as a dict.
    """

    def __init__(self, columns: dict[str, list], source: str, report: StepReport):
        super().__init__(columns, source)
        self.report = report

    @property
    def label_kind(self) -> str:
        return self.report.label_kind

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.columns["ids"]]


def _label_kind(rows: Rows, source: str) -> str:
    """ "binary" when every label is true/false, "number" when every label is a number; a mix is refused."""
    kinds = {}
    for index, row in enumerate(rows):
        for value in row.get("labels") or []:
            if isinstance(value, (int, float)):  # anything else is validate_step_row's to name
                kinds.setdefault("binary" if isinstance(value, bool) else "number", rows.numbers[index])
    if len(kinds) > 1:
        raise PairDataError(
            f"{source}: row {kinds['binary']} has true/false step labels and row {kinds['number']} numbers. Use one "
            "kind in a file: true/false trains with binary cross-entropy, numbers with the squared error."
        )
    return next(iter(kinds), "binary")


def tokenize_steps(
    data,
    tokenizer,
    separator: str = DEFAULT_SEPARATOR,
    max_length: int | None = None,
    on_bad_row: str = "error",
    last_step_only: bool = False,
    source: str | None = None,
) -> StepSet:
    """Validate and tokenize step-labelled rows into a `StepSet` (TRL PRMTrainer's ids and label positions).

    max_length: a longer row is dropped and counted (cutting it would lose the labels of its last steps silently).
    last_step_only: the loss reads only each row's last step (TRL's train_on_last_step_only); evaluation reads all.
    on_bad_row: "error" raises PairDataError naming file, row and field; "skip" skips and counts.
    """
    rows = as_rows(data, source, on_bad_row)
    source = source or rows.source
    separator_ids = separator_ids_of(tokenizer, separator)
    report = StepReport(rows_in=len(rows) + len(rows.bad_rows), label_kind=_label_kind(rows, source))
    for message in rows.bad_rows:
        report.skip(message)
    out: dict[str, list] = {"ids": [], "prompt_length": [], "step_ends": [], "labels": [], "trained": [], "row": []}
    for index, row in enumerate(rows):
        where = f"{source}, row {rows.numbers[index]}"
        try:
            checked = validate_step_row(row, where, separator)
            ids, prompt_length, ends = tokenize_steps_row(
                tokenizer, checked["prompt"], checked["steps"], separator_ids, where
            )
        except PairDataError as err:
            if on_bad_row == "error":
                raise
            report.skip(str(err))
            continue
        if max_length is not None and len(ids) > max_length:
            report.dropped_too_long += 1
            continue
        out["ids"].append(ids)
        out["prompt_length"].append(prompt_length)
        out["step_ends"].append(ends)
        out["labels"].append([float(v) for v in checked["labels"]])
        out["trained"].append([not last_step_only or i == len(ends) - 1 for i in range(len(ends))])
        out["row"].append(rows.numbers[index])
        report.steps_out += len(ends)
    report.rows_out = len(out["ids"])
    if report.rows_out == 0:
        raise PairDataError(f"{source}: no usable rows left ({report.summary()}). Fix the rows or raise max_length.")
    return StepSet(out, source, report)


# --------------------------------------------------------------------------------------------------- batches


def step_batch(
    sequences: Sequence[Sequence[int]], step_ends: Sequence[Sequence[int]], packing: bool, pad_token_id: int
):
    """Model inputs for rows and their step ends, and `step_index`: where the head is read, step after step, row
    after row. Packed: one padding-free row, `step_index` (K,) positions in it; padded: (N, T) right-padded,
    `step_index` (K, 2) (row, position) pairs."""
    if packing:
        batch = pack_groups([[ids] for ids in sequences])
        starts = [int(last) - len(ids) + 1 for last, ids in zip(batch.pop("last_index"), sequences)]
        batch["step_index"] = torch.tensor([s + e for s, ends in zip(starts, step_ends) for e in ends])
        return batch
    input_ids, attention_mask = pad_sequences(sequences, pad_token_id)
    index = [(row, e) for row, ends in enumerate(step_ends) for e in ends]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "step_index": torch.tensor(index).view(-1, 2)}


@dataclass
class StepCollator:
    """Batch of step-labelled rows → one forward (packed or padded, see `step_batch`) with `step_labels` (K,) and
    `step_trained` (K,) bool, in step_index order, and the set's `label_kind` (which loss)."""

    packing: bool = True
    pad_token_id: int = 0
    label_kind: str = "binary"

    def __call__(self, examples: list[dict]) -> dict:
        batch = step_batch(
            [e["ids"] for e in examples], [e["step_ends"] for e in examples], self.packing, self.pad_token_id
        )
        batch["step_labels"] = torch.tensor([v for e in examples for v in e["labels"]], dtype=torch.float)
        batch["step_trained"] = torch.tensor([t for e in examples for t in e["trained"]], dtype=torch.bool)
        batch["label_kind"] = self.label_kind
        return batch


def step_model_inputs(batch: dict) -> dict:
    """The keyword arguments RewardModel takes from a step batch."""
    keys = ("input_ids", "attention_mask", "position_ids", "attention_blocks", "step_index")
    return {key: batch[key] for key in keys if key in batch}


# ------------------------------------------------------------------------------------------------------ loss


def step_loss(
    step_rewards: torch.Tensor, labels: torch.Tensor, trained: torch.Tensor, label_kind: str
) -> torch.Tensor:
    """Mean over the trained steps: binary cross-entropy with logits (true/false labels) or squared error (numbers).
    Over (K,) fp32 step rewards; TRL's 2-class token classification gives the same value on l1 - l0."""
    rewards, labels = step_rewards[trained].float(), labels[trained].float()
    if label_kind == "binary":
        return F.binary_cross_entropy_with_logits(rewards, labels)
    return F.mse_loss(rewards, labels)


def step_correct(step_rewards: torch.Tensor, labels: torch.Tensor, label_kind: str) -> torch.Tensor:
    """(K,) whether each step is on the right side: logit > 0 for true (binary); value > 0.5 iff label > 0.5."""
    threshold = 0.0 if label_kind == "binary" else 0.5
    return (step_rewards > threshold) == (labels > 0.5)


# ----------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def compute_step_rewards(
    reward_model: nn.Module,
    sequences: Sequence[Sequence[int]],
    step_ends: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    packing: bool = True,
    max_tokens_per_batch: int = 16384,
    autocast_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Each row's (S_i,) fp32 step rewards: the head read at its step ends, one forward per micro-batch of rows up to
    `max_tokens_per_batch` tokens (packed, or padded). Every row gets what it gets alone. The model runs in eval mode
    and gets its modes back. Every process of a distributed run computes the same plan (and all rows)."""
    if any(len(ids) == 0 for ids in sequences):
        raise ValueError("compute_step_rewards got an empty token sequence; every row needs at least one token.")
    results: list[torch.Tensor | None] = [None] * len(sequences)
    device = next(reward_model.parameters()).device
    modes = [(module, module.training) for module in reward_model.modules()]
    reward_model.eval()
    try:
        for rows in micro_batches([len(ids) for ids in sequences], max_tokens_per_batch, padded=not packing):
            batch = step_batch([sequences[i] for i in rows], [step_ends[i] for i in rows], packing, pad_token_id)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.autocast(
                device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
            ):
                rewards = reward_model(**inputs).float().cpu()
            for i, part in zip(rows, rewards.split([len(step_ends[i]) for i in rows])):
                results[i] = part
    finally:
        for module, mode in modes:
            module.training = mode
    return results


@dataclass
class StepScores:
    """What `RewardScorer.score_steps` returns: each row's step rewards and a reward per row by the aggregation."""

    step_rewards: list[torch.Tensor]  # N tensors of (S_i,) fp32: the head at each step's separator
    rewards: torch.Tensor  # (N,) fp32
    num_tokens: torch.Tensor  # (N,) int64


def score_steps(
    scorer, prompts, completions, separator: str = DEFAULT_SEPARATOR, aggregation: str = "min"
) -> StepScores:
    """Step rewards of (prompt, completion) rows with a RewardScorer's model and batching (its torch engine): each
    completion is a list of steps or one string split at `separator`, formatted as training formats step rows; the
    steps' ends are found by the separator's token ids and the head is read there, every row in one forward."""
    if scorer.reward_model is None:
        raise ValueError("score_steps runs on the torch engine; build the scorer with engine='torch'.")
    if len(prompts) != len(completions):
        raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions; pass one prompt per row.")
    from rmtorch.model import lock_of

    sequences, ends = [], []
    with lock_of(scorer.tokenizer):
        separator_ids = separator_ids_of(scorer.tokenizer, separator)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            checked = validate_step_row({"prompt": prompt, "completions": completion, "labels": None}, f"Row {row}",
                                        separator, labelled=False)  # fmt: skip
            ids, _, row_ends = tokenize_steps_row(
                scorer.tokenizer, prompt, checked["steps"], separator_ids, f"Row {row}"
            )
            sequences.append(ids)
            ends.append(row_ends)
    too_long = [
        row for row, ids in enumerate(sequences) if scorer.max_length is not None and len(ids) > scorer.max_length
    ]
    if too_long:  # cutting a row would lose its first or last steps: refuse rather than score part of it
        raise ValueError(
            f"Rows {too_long[:10]} are longer than max_length={scorer.max_length} tokens; score them with a larger "
            "max_length or fewer steps."
        )
    engine = scorer.engine
    with lock_of(scorer.model):
        step_rewards = compute_step_rewards(
            scorer.reward_model, sequences, ends, pad_token_id=engine.pad_token_id, packing=engine.packing,
            max_tokens_per_batch=engine.max_tokens_per_batch, autocast_dtype=engine.autocast_dtype,
        )  # fmt: skip
    num_tokens = torch.tensor([len(ids) for ids in sequences], dtype=torch.long)
    return StepScores(step_rewards, aggregate(step_rewards, aggregation), num_tokens)


def aggregate(step_rewards: list[torch.Tensor], how: str = "min") -> torch.Tensor:
    """(N,) row rewards from each row's step rewards: min, last, mean (of the raw step rewards), or product (of the
    steps' sigmoid probabilities: the chance every step is right, for a model trained on true/false labels). A row
    with no step gets NaN."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {how!r}.")
    nan = torch.tensor(float("nan"))
    ops = {
        "min": lambda r: r.min(), "last": lambda r: r[-1], "mean": lambda r: r.mean(),
        "product": lambda r: torch.sigmoid(r.double()).prod().float(),
    }  # fmt: skip
    return torch.stack([ops[how](r) if len(r) else nan for r in step_rewards]).float()


# ---------------------------------------------------------------------------------------------- evaluation


def first_error(flags: Sequence[bool]) -> int:
    """Index of the first false flag, or -1 when all are true."""
    return next((i for i, ok in enumerate(flags) if not ok), -1)


def step_report(steps: StepSet, step_rewards: list[torch.Tensor]) -> tuple[dict, list[dict]]:
    """(report, per-row scores) of a StepSet: step accuracy (every labelled step weighs the same, the majority
    label's share beside it as the baseline), accuracy on true and on false steps, the loss, and for true/false
    labels first-error-step accuracy (the first step predicted false is the first labelled false, or none is
    predicted false where none is labelled so)."""
    kind = steps.label_kind
    rewards = torch.cat(step_rewards)
    labels = torch.tensor([v for row in steps["labels"] for v in row])
    correct = step_correct(rewards, labels, kind)
    positive = labels > 0.5
    loss = step_loss(rewards, labels, torch.ones_like(positive), kind).item()
    report = {
        "num_rows": len(steps), "num_steps": len(labels), "step_accuracy": correct.float().mean().item(),
        "majority_baseline": max(positive.float().mean().item(), 1 - positive.float().mean().item()),
        "accuracy_true_steps": correct[positive].float().mean().item() if positive.any() else math.nan,
        "accuracy_false_steps": correct[~positive].float().mean().item() if (~positive).any() else math.nan,
        "loss": loss, "mean_step_reward": rewards.mean().item(),
    }  # fmt: skip
    scores = []
    first_hits = []
    for row, row_rewards, row_labels in zip(steps["row"], step_rewards, steps["labels"]):
        predicted = [bool(r > (0.0 if kind == "binary" else 0.5)) for r in row_rewards.tolist()]
        truth = [v > 0.5 for v in row_labels]
        first_hits.append(first_error(predicted) == first_error(truth))
        scores.append({"row": row, "step_rewards": row_rewards.tolist(), "labels": row_labels})
    if kind == "binary":
        report["first_error_accuracy"] = sum(first_hits) / len(first_hits)
    return report, scores


def format_step_report(report: dict) -> str:
    """The step report as console lines (evaluate.py; training prints the same numbers)."""
    lines = [
        f"steps: {report['num_steps']} of {report['num_rows']} rows",
        f"step accuracy   {report['step_accuracy']:.4f}  (majority baseline {report['majority_baseline']:.4f})",
        f"on true steps   {report['accuracy_true_steps']:.4f}   on false steps {report['accuracy_false_steps']:.4f}",
    ]
    if "first_error_accuracy" in report:
        lines.append(f"first-error-step accuracy {report['first_error_accuracy']:.4f}")
    lines.append(f"loss {report['loss']:.4f}  mean step reward {report['mean_step_reward']:.4f}")
    return "\n".join(lines)


def run_step_options(model: str | None) -> dict:
    """{"objective", "step_separator"} as a train.py run used them (MODEL/config.yaml), those it recorded; empty for
    anything that is not a run directory. evaluate.py, score.py and rmtorch.serve take their step defaults here."""
    return run_text_options(model, ("objective", "step_separator"))


def write_step_report(report: dict, scores: list[dict], report_dir: str | Path) -> None:
    """report_dir/metrics.json (the report) and scores.jsonl (a line a row: its row in the data file, step rewards
    and labels)."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / "metrics.json", report)
    write_jsonl(report_dir / "scores.jsonl", scores)
