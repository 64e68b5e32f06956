"""Evaluate a reward model on preference pairs: accuracy, margin, ties, loss, calibration (ECE), accuracy by length
and category, with a report of files and plots.

    python evaluate.py --model OUT --data held_out.jsonl --report report_dir/
    python evaluate.py --model OUT --data reward-bench.parquet --benchmark rewardbench --report report_dir/

With --benchmark rewardbench (v1) or rewardbench2, --data is a local copy of that benchmark in its published
schema, scored by the official rules (rmtorch.rewardbench) instead of the pair report.

A process reward model (`train.py --objective steps`) is evaluated on step-labelled rows (prompt, completions,
labels) with training's step report: step accuracy, first-error-step accuracy, the loss (rmtorch.steps). That
happens with --objective steps, or when the run's config.yaml says objective: steps; its step_separator is the
default --step_separator then.

A rating model (`train.py --objective regression`) is evaluated on rated rows (prompt, response, one column per
attribute) with training's rating report: RMSE and Pearson r per attribute, the loss (rmtorch.ratings). That happens
with --objective regression --attributes a,b,..., or when the run's config.yaml says objective: regression; its
attributes and attribute weights are the defaults then, and the loss divides by the target std the model's config
saved (train.py --normalize_targets), so evaluating a run on its own eval file reproduces its report.

Shared options (max_length, truncation, packing, bf16, ...) have training's definitions; for a model train.py
wrote they default to what it trained with (OUT/config.yaml), so evaluating a run on its own eval file reproduces
its eval_results.json. Any other model is scored in fp32 up to its own length limit: the rule RewardScorer,
score.py and rmtorch.serve follow too (rmtorch.config.scoring_defaults). Runs on one process or several
(`accelerate launch evaluate.py`). `python evaluate.py --help` lists every option.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from rmtorch.accelerator import launch_accelerator
from rmtorch.cli import run, set_cpu_threads
from rmtorch.config import (
    EvalConfig,
    attribute_list,
    attribute_values,
    option,
    parse_config,
    scoring_source,
    trained_defaults,
)
from rmtorch.files import PairDataError, read_rows
from rmtorch.group_metrics import group_report
from rmtorch.groups import GroupSet, is_group_data, score_groups, tokenize_groups
from rmtorch.loading import load_reward_model
from rmtorch.metrics import format_report, pair_report
from rmtorch.model import RewardModel, compute_rewards, model_max_length, score_pairs
from rmtorch.outputs import check_output_dir
from rmtorch.pairs import tokenize_pairs
from rmtorch.ratings import (
    check_rating_rows,
    format_rating_report,
    rating_report,
    run_rating_options,
    saved_target_scale,
    tokenize_ratings,
    write_rating_report,
)
from rmtorch.report import format_benchmark_table, write_benchmark_report, write_report
from rmtorch.rewardbench import score_benchmark
from rmtorch.rewardbench_data import read_prompts, tokenize_prompts
from rmtorch.steps import (
    DEFAULT_SEPARATOR,
    compute_step_rewards,
    format_step_report,
    run_step_options,
    step_report,
    tokenize_steps,
    write_step_report,
)

DESCRIPTION = (
    "Evaluate a reward model on preference pairs: accuracy, margin, ties, calibration, accuracy by length "
    "and category."
)


@dataclass
class EvaluateConfig(EvalConfig):
    objective: str | None = option(
        None,
        "'steps': --data holds step-labelled rows (prompt, completions, labels) and gets the step report (step "
        "accuracy, first-error-step accuracy), as train.py --objective steps evaluates; 'regression': rated rows "
        "(prompt, response, one column per --attributes) and the rating report (RMSE, Pearson r per attribute), as "
        "train.py --objective regression evaluates; 'pairwise': the pair report. none: what the run's config.yaml "
        "says, else pairwise.",
        choices=("pairwise", "steps", "regression"),
    )
    attributes: str | None = option(
        None,
        "With the rating report: the rating columns, comma-separated, in the order of the model's outputs (none: the "
        "run's --attributes).",
    )
    attribute_weights: str | None = option(
        None,
        "With the rating report: the loss's weight per attribute, comma-separated (none: the run's "
        "--attribute_weights, else equal).",
    )
    step_separator: str | None = option(
        None,
        "With the step report: the text after each step, whose last token carries the step's reward (none: the "
        "run's --step_separator, else '\\n').",
    )


def main(argv: list[str] | None = None) -> dict:
    """Score --data with --model, print the report, and write it under --report when given; returns the report."""
    cfg = parse_config(argv, EvaluateConfig, description=DESCRIPTION)
    trained = trained_defaults(cfg.model, EvaluateConfig)
    steps = run_step_options(cfg.model)
    if steps.get("objective") == "steps":  # a process reward model's run: its objective and separator
        trained.update(steps)
    ratings = run_rating_options(cfg.model)
    if ratings.get("objective") == "regression":  # a rating model's run: its objective, attributes and loss weights
        trained.update(ratings)
    if trained:  # the run's own options, command line still first
        cfg = parse_config(argv, EvaluateConfig, base=trained, description=DESCRIPTION)
    if cfg.objective in ("steps", "regression") and cfg.benchmark is not None:
        raise SystemExit(f"error: --benchmark scores preference pairs; leave it out with --objective {cfg.objective}.")
    if cfg.objective != "regression" and (cfg.attributes or cfg.attribute_weights) and "attributes" not in trained:
        raise ValueError("--attributes and --attribute_weights apply to rating models: add --objective regression.")
    if cfg.report:  # checked, with the data, before the model loads
        check_output_dir(cfg.report, "evaluate", "--report", inputs=[cfg.model, cfg.data])
    if cfg.benchmark is not None:
        return evaluate_benchmark(cfg, trained)
    if cfg.objective == "steps":
        return evaluate_steps(cfg, trained)
    if cfg.objective == "regression":
        return evaluate_ratings(cfg, trained)
    rows = read_rows(cfg.data, cfg.on_bad_row)
    category_column = cfg.category_column if cfg.category_column in rows.column_names else None
    if category_column is None and cfg.category_column not in (None, "category"):
        raise PairDataError(
            f"{cfg.data}: no column '{cfg.category_column}' to split accuracy by; its columns are {rows.column_names}."
        )

    accelerator, model, tokenizer, max_length = load_for_evaluation(cfg)
    options = dict(max_length=max_length, truncation=cfg.truncation, on_bad_row=cfg.on_bad_row)
    keep = [category_column] if category_column else []
    if is_group_data(rows):  # responses with ranks or scores: the report over every ordered pair, and Kendall's tau
        pairs = tokenize_groups(rows, tokenizer, **options, allow_ties=True, keep_columns=keep)
    else:
        pairs = tokenize_pairs(rows, tokenizer, **options, margin_column=cfg.margin_column, keep_columns=keep)
    accelerator.print(f"data {cfg.data}: {pairs.report.summary()}")
    if trained:
        accelerator.print(trained_line(cfg, trained))
    reward_model = accelerator.prepare(RewardModel(model))  # autocasts its forward under --bf16, as in training
    batching = dict(
        pad_token_id=tokenizer.pad_token_id, packing=cfg.packing, max_tokens_per_batch=cfg.max_tokens_per_batch,
        accelerator=accelerator, progress=True,
    )  # fmt: skip
    if isinstance(pairs, GroupSet):
        report, scores = group_report(pairs, score_groups(reward_model, pairs, **batching), category_column)
    else:
        chosen, rejected = score_pairs(reward_model, pairs, **batching)
        report, scores = pair_report(
            pairs, chosen, rejected, category_column, n_bins=cfg.n_bins, n_length_buckets=cfg.length_buckets
        )
    report["model"], report["data"] = str(cfg.model), {"path": str(cfg.data), **pairs.report.to_dict()}
    report["scoring"] = scoring_report(cfg, max_length)
    accelerator.print(format_report(report) + scoring_line(report))
    if cfg.report and accelerator.is_main_process:
        paths = write_report(report, scores, cfg.report)
        print(f"report in {cfg.report}: {', '.join(p.name for p in paths.values())}")
    return report


def evaluate_steps(cfg: EvaluateConfig, trained: dict) -> dict:
    """The step report of step-labelled --data (rmtorch.steps.step_report, what train.py --objective steps writes
    in eval_results.json and report/): every step of every row read, rows longer than max_length dropped and
    counted as in training. Prints it and writes metrics.json and scores.jsonl under --report when given."""
    rows = read_rows(cfg.data, cfg.on_bad_row)  # read and checked before the model loads
    separator = cfg.step_separator or DEFAULT_SEPARATOR
    accelerator, model, tokenizer, max_length = load_for_evaluation(cfg)
    steps = tokenize_steps(rows, tokenizer, separator, max_length=max_length, on_bad_row=cfg.on_bad_row)
    accelerator.print(f"data {cfg.data}: {steps.report.summary()}")
    if trained:
        accelerator.print(trained_line(cfg, trained))
    reward_model = accelerator.prepare(RewardModel(model))  # autocasts its forward under --bf16, as in training
    step_rewards = compute_step_rewards(
        reward_model, steps["ids"], steps["step_ends"], pad_token_id=tokenizer.pad_token_id, packing=cfg.packing,
        max_tokens_per_batch=cfg.max_tokens_per_batch,
    )  # fmt: skip
    report, scores = step_report(steps, step_rewards)
    report["model"], report["data"] = str(cfg.model), {"path": str(cfg.data), **steps.report.to_dict()}
    report["scoring"] = {**scoring_report(cfg, max_length), "step_separator": separator}
    accelerator.print(format_step_report(report) + scoring_line(report))
    if cfg.report and accelerator.is_main_process:
        write_step_report(report, scores, cfg.report)
        print(f"report in {cfg.report}: metrics.json, scores.jsonl")
    return report


def evaluate_ratings(cfg: EvaluateConfig, trained: dict) -> dict:
    """The rating report of rated --data (rmtorch.ratings.rating_report, what train.py --objective regression writes
    in eval_results.json and report/): predictions in the data's units, and the loss weighted by --attribute_weights
    in units of the target std the model's config saved. Prints it and writes metrics.json and scores.jsonl under
    --report when given."""
    attributes, weights = rating_options(cfg)
    rows = read_rows(cfg.data, cfg.on_bad_row)
    check_rating_rows(rows, attributes, cfg.on_bad_row)  # read and checked before the model loads
    accelerator, model, tokenizer, max_length = load_for_evaluation(cfg)
    mean, std = saved_target_scale(model.config, attributes, cfg.model)
    options = dict(max_length=max_length, truncation=cfg.truncation, on_bad_row=cfg.on_bad_row)
    ratings = tokenize_ratings(rows, tokenizer, attributes, **options)
    ratings.mean, ratings.std = mean, std
    accelerator.print(f"data {cfg.data}: {ratings.report.summary()}")
    if trained:
        accelerator.print(trained_line(cfg, trained))
    reward_model = accelerator.prepare(RewardModel(model))  # autocasts its forward under --bf16, as in training
    predictions = compute_rewards(
        reward_model, *ratings.sequences(), pad_token_id=tokenizer.pad_token_id, packing=cfg.packing,
        max_tokens_per_batch=cfg.max_tokens_per_batch, accelerator=accelerator, progress=True,
    )  # fmt: skip
    report, scores = rating_report(ratings, predictions.reshape(len(ratings), len(attributes)), weights)  # (N, K)
    report["model"], report["data"] = str(cfg.model), {"path": str(cfg.data), **ratings.report.to_dict()}
    report["scoring"] = {**scoring_report(cfg, max_length), "attribute_weights": weights, "target_std": std}
    accelerator.print(format_rating_report(report) + scoring_line(report))
    if cfg.report and accelerator.is_main_process:
        write_rating_report(report, scores, cfg.report)
        print(f"report in {cfg.report}: metrics.json, scores.jsonl")
    return report


def rating_options(cfg: EvaluateConfig) -> tuple[list[str], list[float]]:
    """(attributes, loss weights) of --attributes and --attribute_weights, checked as train.py checks them."""
    names = attribute_list(cfg.attributes)
    return names, attribute_values(cfg.attribute_weights, names, "attribute_weights")


def evaluate_benchmark(cfg: EvalConfig, trained: dict) -> dict:
    """--benchmark: score a local copy of RewardBench (v1) or RewardBench 2, print its table and write its report
    under --report when given; returns the report."""
    # The rows are read and checked before the model loads.
    prompts, data = read_prompts(read_rows(cfg.data, cfg.on_bad_row), cfg.benchmark, cfg.on_bad_row)
    accelerator, model, tokenizer, max_length = load_for_evaluation(cfg)
    tokenized = tokenize_prompts(prompts, tokenizer, data, max_length, cfg.truncation)
    accelerator.print(f"data {cfg.data}: {data.summary()}")
    if trained:
        accelerator.print(trained_line(cfg, trained))
    # Each completion carries the prompt tokens it shares with its siblings: packed, the prompt runs once.
    rewards = compute_rewards(
        accelerator.prepare(RewardModel(model)), tokenized.sequences, tokenized.prompt_lengths,
        pad_token_id=tokenizer.pad_token_id, packing=cfg.packing, max_tokens_per_batch=cfg.max_tokens_per_batch,
        accelerator=accelerator, progress=True,
    )  # fmt: skip
    report, lines = score_benchmark(cfg.benchmark, tokenized.prompts, tokenized.per_prompt(rewards.tolist()))
    report["model"], report["data"] = str(cfg.model), asdict(data)
    report["scoring"] = scoring_report(cfg, max_length)
    accelerator.print(format_benchmark_table(report) + scoring_line(report))
    if cfg.report and accelerator.is_main_process:
        paths = write_benchmark_report(report, lines, cfg.report)
        print(f"report in {cfg.report}: {', '.join(p.name for p in paths.values())}")
    return report


def load_for_evaluation(cfg) -> tuple:
    """(accelerator, model, tokenizer, max_length) for --model: the launch's accelerator and threads, the model, and
    max_length resolved against the model's own limit."""
    accelerator = launch_accelerator(mixed_precision="bf16" if cfg.bf16 else "no")
    set_cpu_threads(cfg.cpu_threads, accelerator.device)
    model, tokenizer = load_reward_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    return accelerator, model, tokenizer, model_max_length(model, cfg.max_length)


def trained_line(cfg, trained: dict) -> str:
    """The line saying which options came from the run that trained --model."""
    return f"options from {Path(cfg.model) / 'config.yaml'}: " + ", ".join(f"{k}={v!r}" for k, v in trained.items())


def scoring_report(cfg: EvalConfig, max_length: int | None) -> dict:
    """What the report says about how it scored: precision, max_length and where they came from."""
    return {"precision": "bf16" if cfg.bf16 else "fp32", "max_length": max_length, "from": scoring_source(cfg.model)}


def scoring_line(report: dict) -> str:
    return "\nscoring: {precision}, max_length {max_length} (from {from})".format(**report["scoring"])


if __name__ == "__main__":
    run(main, sys.argv[1:])
