"""Ratings of named attributes (`train.py --objective regression`): validation, tokenization, batching, the loss,
the report and what the saved model's config says, around one `RatingSet`.

Format (HelpSteer's): `prompt` (a string or messages) + `response` (a string, or messages ending with the assistant
turn) + one number per attribute named by `--attributes`, e.g. helpfulness, correctness, coherence, complexity,
verbosity on 0-4. The model gets one output per attribute (num_labels = K, the names in `config.id2label`), so it
stays a standard AutoModelForSequenceClassification. Its config also holds `rmtorch_reward_weights` (the reward is
their weighted sum of the attributes) and, with `--normalize_targets`, `rmtorch_attribute_mean` / `_std`: the head
then predicts standardized attributes and `RewardModel` turns them back into the data's units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rmtorch.batching import pack_groups, pad_sequences
from rmtorch.config import run_text_options
from rmtorch.files import PairDataError, Rows, write_json, write_jsonl
from rmtorch.formatting import bos_to_keep, common_prefix_length, cut_prompt, prompt_ids, tokenize_response
from rmtorch.pairs import ColumnSet, RowCounts, _check_text, _is_messages, _kind, as_rows, check_messages


@dataclass(kw_only=True)
class RatingReport(RowCounts):
    """What tokenize_ratings did; nothing is dropped without a count here."""

    ratings_out: int = 0

    def summary(self) -> str:
        return self.counts_summary(f"{self.ratings_out}/{self.rows_in} rated responses kept")


class RatingSet(ColumnSet):
    """Tokenized rated responses. Columns: ids (prompt + response in training's format), prompt_length, targets (one
    number per attribute, in `attributes` order), row (the row in its source). `mean` and `std`: the training
    targets' scale per attribute (`target_scale`; 0 and 1 when not normalized), which the loss reads."""

    def __init__(self, columns: dict[str, list], source: str, attributes: list[str], report: RatingReport):
        super().__init__(columns, source)
        self.attributes, self.report = attributes, report
        self.mean, self.std = [0.0] * len(attributes), [1.0] * len(attributes)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.columns["ids"]]

    def sequences(self) -> tuple[list[list[int]], list[int]]:
        """(each row's sequence, its prompt length): what the scoring path takes."""
        return self.columns["ids"], self.columns["prompt_length"]

    def targets(self) -> torch.Tensor:
        return torch.tensor(self.columns["targets"], dtype=torch.float32).reshape(len(self), len(self.attributes))


# -------------------------------------------------------------------------------------------- validation


def validate_rating(row: dict, where: str, attributes: Sequence[str]) -> dict:
    """Check one row and return {prompt, response, targets}; PairDataError naming `where`, the field and the fix."""
    prompt, response = row.get("prompt"), row.get("response")
    if _is_messages(prompt) or isinstance(response, list):
        if prompt is not None:
            check_messages(prompt, where, "prompt", must_end_with_assistant=False)
        check_messages(response, where, "response", must_end_with_assistant=True)
    else:
        _check_text(prompt, where, "prompt")
        _check_text(response, where, "response")
        if not response.strip():
            raise PairDataError(
                f"{where}, field 'response': the response is empty or whitespace only. Remove the row."
            )
    targets = []
    for name in attributes:
        value = row.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            got = "nothing (the column is missing)" if name not in row else f"{_kind(value)} {value!r:.40}"
            raise PairDataError(
                f"{where}, field '{name}': the rating must be a finite number, got {got}. Fix the row (or, to train "
                "without it, leave the attribute out of --attributes)."
            )
        targets.append(float(value))
    return {"prompt": prompt, "response": response, "targets": targets}


def check_rating_rows(rows: Rows, attributes: Sequence[str], on_bad_row: str = "error") -> None:
    """Check rated rows before a model loads: every attribute needs its column whatever on_bad_row says (without it
    every row would be skipped), and with on_bad_row 'error' every row must pass `validate_rating`. tokenize_ratings
    checks them again and counts what 'skip' leaves out."""
    columns = rows.column_names
    for name in attributes:
        if name not in columns:
            where = rows.where(0) if len(rows) else rows.source
            raise PairDataError(
                f"{where}, field '{name}': the file has no '{name}' column, and the model rates "
                f"{', '.join(attributes)}, one column each. Add each row's '{name}' rating."
            )
    if on_bad_row == "error":
        for index, row in enumerate(rows):
            validate_rating(row, rows.where(index), attributes)


def tokenize_ratings(
    data,
    tokenizer,
    attributes: Sequence[str],
    max_length: int | None = None,
    truncation: str = "drop",
    on_bad_row: str = "error",
    source: str | None = None,
) -> RatingSet:
    """Validate and tokenize rated rows into a `RatingSet`, formatted as pairs' responses are (EOS after text, the
    chat template for messages). truncation and on_bad_row as `tokenize_pairs`' ("keep_end" cuts the prompt from
    the left, the response stays whole)."""
    rows = as_rows(data, source, on_bad_row)
    source = source or rows.source
    report = RatingReport(rows_in=len(rows) + len(rows.bad_rows))
    for message in rows.bad_rows:
        report.skip(message)
    out: dict[str, list] = {"ids": [], "prompt_length": [], "targets": [], "row": []}
    bos_id = bos_to_keep(tokenizer)
    for index, row in enumerate(rows):
        where = f"{source}, row {rows.numbers[index]}"
        try:
            rating = validate_rating(row, where, attributes)
            if isinstance(rating["response"], list) and not getattr(tokenizer, "chat_template", None):
                raise PairDataError(f"{where}: the row is conversational (message lists) but the tokenizer has no "
                                    "chat template.")  # fmt: skip
            try:
                ids = tokenize_response(tokenizer, rating["prompt"], rating["response"])
                prompt_only = prompt_ids(tokenizer, rating["prompt"])
            except Exception as err:  # a template's own error (jinja): give it the row's location
                raise PairDataError(
                    f"{where}: the chat template failed on this row ({type(err).__name__}: {err})."
                ) from None
        except PairDataError as err:
            if on_bad_row == "error":
                raise
            report.skip(str(err))
            continue
        prompt_length = min(common_prefix_length(prompt_only, ids), len(ids) - 1)
        if max_length is not None and len(ids) > max_length:
            cut = cut_prompt([ids], prompt_length, max_length, bos_id) if truncation == "keep_end" else None
            if cut is None:
                report.dropped_too_long += 1
                continue
            report.truncated += 1
            ids, prompt_length = cut.sequences[0], cut.prompt_length
        out["ids"].append(ids)
        out["prompt_length"].append(prompt_length)
        out["targets"].append(rating["targets"])
        out["row"].append(rows.numbers[index])
    report.ratings_out = len(out["ids"])
    if report.ratings_out == 0:
        raise PairDataError(f"{source}: no usable rows left ({report.summary()}). Fix the rows or raise max_length.")
    return RatingSet(out, source, list(attributes), report)


def shared_ratings(a: RatingSet, b: RatingSet) -> int:
    """How many rows of `b` also occur in `a` (same token ids): a held-out leak when a trains and b evaluates."""
    seen = {tuple(ids) for ids in a["ids"]}
    return sum(tuple(ids) in seen for ids in b["ids"])


# --------------------------------------------------------------------------------------------------- batches


@dataclass
class RatingCollator:
    """Batch of rated rows → one forward (a packed row of single sequences, or a padded batch) with `targets` (B, K)
    and the loss's `target_std` (K,).

    >>> batch = RatingCollator()([{"ids": [1, 2, 3], "targets": [4.0, 0.5]}, {"ids": [1, 5], "targets": [1.0, 2.0]}])
    >>> batch["input_ids"].tolist(), batch["last_index"].tolist(), batch["targets"].shape
    ([[1, 2, 3, 1, 5]], [2, 4], torch.Size([2, 2]))
    """

    packing: bool = True
    pad_token_id: int = 0
    target_std: Sequence[float] | None = None  # None: 1 for every attribute

    def __call__(self, examples: list[dict]) -> dict:
        if self.packing:
            batch = pack_groups([[e["ids"]] for e in examples])
        else:
            input_ids, attention_mask = pad_sequences([e["ids"] for e in examples], self.pad_token_id)
            batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        batch["targets"] = torch.tensor([e["targets"] for e in examples], dtype=torch.float32)  # (B, K)
        std = self.target_std if self.target_std is not None else [1.0] * batch["targets"].shape[1]
        batch["target_std"] = torch.tensor(std, dtype=torch.float32)  # (K,)
        return batch


# ---------------------------------------------------------------------------------------------- the loss


def target_scale(ratings: RatingSet, normalize: bool) -> tuple[list[float], list[float]]:
    """(mean, std) per attribute of the training targets with `normalize`, else (0, 1): the loss compares
    (prediction - target) / std, and a normalized head predicts (target - mean) / std."""
    k = len(ratings.attributes)
    if not normalize:
        return [0.0] * k, [1.0] * k
    targets = ratings.targets().double()
    mean, std = targets.mean(0), targets.std(0, correction=0)
    constant = [name for name, s in zip(ratings.attributes, std.tolist()) if s == 0]
    if constant:
        raise PairDataError(
            f"{ratings.source}: attribute(s) {constant} have the same rating in every training row, so they cannot be "
            "normalized (and carry nothing to learn). Leave them out of --attributes or set --normalize_targets false."
        )
    return mean.tolist(), std.tolist()


def regression_loss(
    predictions: torch.Tensor, targets: torch.Tensor, weights: Sequence[float], std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """sum_k w_k mean_i ((p_ik - y_ik) / std_k)^2 / sum_k w_k over (B, K) predictions and targets: the mean squared
    error of each attribute in standardized units (std 1: the data's units), weighted."""
    w = torch.tensor(weights, dtype=torch.float32, device=predictions.device)
    s = torch.as_tensor(std, dtype=torch.float32).to(predictions.device)
    per_attribute = (((predictions.float() - targets.to(predictions.device)) / s) ** 2).mean(0)  # (K,)
    return (per_attribute * w).sum() / w.sum()


def weighted_reward(attributes: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """(N, K) attribute values → (N,) rewards: sum_k weights[k] * attributes[:, k]."""
    return attributes.float() @ torch.tensor(weights, dtype=torch.float32, device=attributes.device)


def describe_attributes(
    config, attributes: Sequence[str], reward_weights: Sequence[float], mean: Sequence[float], std: Sequence[float]
) -> None:
    """Write into a (run-owned) model config what a rating model's readers need: the attribute names as labels
    (vLLM's /classify, transformers' regression head), the reward weights and, when normalized, the targets' scale."""
    config.id2label = dict(enumerate(attributes))
    config.label2id = {name: i for i, name in enumerate(attributes)}
    config.problem_type = "regression"
    config.rmtorch_reward_weights = list(reward_weights)
    if any(m != 0.0 for m in mean) or any(s != 1.0 for s in std):
        config.rmtorch_attribute_mean, config.rmtorch_attribute_std = list(mean), list(std)


def saved_target_scale(config, attributes: Sequence[str], model: str) -> tuple[list[float], list[float]]:
    """(mean, std) per attribute of the targets a rating model trained on, as `describe_attributes` saved them in its
    config ((0, 1) when not normalized): the loss on other rows divides by this std, as training's did. ValueError
    when the model's outputs are not `attributes`, in that order."""
    saved = getattr(config, "rmtorch_reward_weights", None) is not None  # a rating model: its outputs are named
    names = [config.id2label[i] for i in range(config.num_labels)] if saved else None
    if config.num_labels != len(attributes) or (names is not None and names != list(attributes)):
        outputs = ", ".join(names) if names else f"{config.num_labels} unnamed output(s)"
        fix = f"give --attributes {','.join(names)}" if names else "give one attribute per output"
        raise ValueError(f"{model} rates {outputs}, but --attributes names {', '.join(attributes)}: {fix}.")
    mean = getattr(config, "rmtorch_attribute_mean", None) or [0.0] * len(attributes)
    std = getattr(config, "rmtorch_attribute_std", None) or [1.0] * len(attributes)
    return [float(m) for m in mean], [float(s) for s in std]


# --------------------------------------------------------------------------------------------------- report


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson's r, None when either side is constant (r undefined)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denominator = (a.square().sum() * b.square().sum()).sqrt()
    return float((a * b).sum() / denominator) if denominator > 0 else None


def rating_report(ratings: RatingSet, predictions: torch.Tensor, weights: Sequence[float]) -> tuple[dict, list[dict]]:
    """(report, per-row scores) of (N, K) predictions in the data's units: per attribute RMSE and Pearson r
    (`rmse_<name>`, `pearson_<name>`), their means, and the training loss on these rows."""
    targets = ratings.targets()
    report: dict = {
        "num_rows": len(ratings),
        "loss": float(regression_loss(predictions, targets, weights, ratings.std)),
    }
    rmses, correlations = [], []
    for k, name in enumerate(ratings.attributes):
        rmse = float((predictions[:, k] - targets[:, k]).square().mean().sqrt())
        report[f"rmse_{name}"], report[f"pearson_{name}"] = rmse, _pearson(predictions[:, k], targets[:, k])
        rmses.append(rmse)
        correlations += [report[f"pearson_{name}"]] if report[f"pearson_{name}"] is not None else []
    report["rmse"] = sum(rmses) / len(rmses)
    report["pearson"] = sum(correlations) / len(correlations) if correlations else None
    scores = [
        {"row": row, "predicted": dict(zip(ratings.attributes, p)), "target": dict(zip(ratings.attributes, t))}
        for row, p, t in zip(ratings["row"], predictions.tolist(), targets.tolist())
    ]
    return report, scores


def format_rating_report(report: dict) -> str:
    """The rating report as console lines (evaluate.py; training prints the same RMSEs)."""
    names = [key.removeprefix("rmse_") for key in report if key.startswith("rmse_")]
    width = max(len(name) for name in [*names, "mean"])
    lines = [f"ratings: {report['num_rows']} rows"]
    for name in names:
        lines.append(f"{name:<{width}}  rmse {report[f'rmse_{name}']:.4f}  pearson {_r(report[f'pearson_{name}'])}")
    lines.append(f"{'mean':<{width}}  rmse {report['rmse']:.4f}  pearson {_r(report['pearson'])}")
    lines.append(f"loss {report['loss']:.4f}")
    return "\n".join(lines)


def _r(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"  # Pearson's r is None when one side is constant


def run_rating_options(model: str | None) -> dict:
    """{"objective", "attributes", "attribute_weights"} as a train.py run used them (MODEL/config.yaml), those it
    recorded; empty for anything that is not a run directory. evaluate.py takes its rating defaults here."""
    return run_text_options(model, ("objective", "attributes", "attribute_weights"))


def write_rating_report(report: dict, scores: list[dict], report_dir: str | Path) -> None:
    """report_dir/metrics.json (the report) and scores.jsonl (a line a row: its row, predicted and target values)."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / "metrics.json", report)
    write_jsonl(report_dir / "scores.jsonl", scores)
