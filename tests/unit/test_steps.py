"""rmtorch.steps: step-labelled rows (validation, ids, step ends), batches, the loss, aggregation, the scorer's step
rewards against the head read at each separator in a plain forward, and the step report."""

from __future__ import annotations

import math

import pytest
import torch

from rmtorch.files import PairDataError, Rows
from rmtorch.model import backbone, score_head
from rmtorch.score import RewardScorer
from rmtorch.steps import (
    aggregate,
    first_error,
    separator_ends,
    split_steps,
    step_loss,
    step_report,
    tokenize_steps,
)

ROWS = [
    {
        "prompt": "what color is the sky ?",
        "completions": ["the sky is blue", "yes it is blue"],
        "labels": [True, False],
    },
    {"prompt": "how many are 2 + 3 ?", "completions": ["2 + 3 = 5", "answer 5", "good"], "labels": [True, True, True]},
    {"prompt": "hello", "completions": ["hello world"], "labels": [False]},
]


def test_separator_ends_finds_each_occurrence_by_id():
    assert separator_ends([5, 1, 2, 7, 1, 2, 1], [1, 2]) == [2, 5]
    assert separator_ends([9, 9, 9], [9], start=1) == [1, 2]
    assert split_steps("a\nb\n", "\n") == ["a", "b"] and split_steps("a", "\n") == ["a"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"labels": [True]}, r"data\.jsonl, row 1, field 'labels': expected a list of 2 labels \(one per step\)"),
        ({"labels": [True, "yes"]}, r"row 1, field 'labels', item 1: a step label must be true/false or a finite"),
        ({"completions": []}, r"row 1, field 'completions': expected a non-empty list of step strings"),
        ({"completions": ["a .", "b"]}, r"row 1, field 'completions', step 0: the step holds the step separator '\.'"),
        ({"completions": ["the", " "]}, r"row 1, field 'completions', step 1: the step is empty"),
        ({"prompt": [{"role": "user", "content": "x"}]}, r"row 1, field 'prompt': expected a string, got"),
    ],
)
def test_bad_rows_name_file_row_and_field(change, message, bos_tokenizer):
    rows = Rows([ROWS[2], {**ROWS[0], **change}], "data.jsonl")
    with pytest.raises(PairDataError, match=message):
        tokenize_steps(rows, bos_tokenizer, separator=".")


def test_mixed_label_kinds_are_refused_and_skip_counts(bos_tokenizer):
    rows = Rows([ROWS[0], {**ROWS[2], "labels": [0.5]}], "data.jsonl")
    with pytest.raises(PairDataError, match=r"data\.jsonl: row 0 has true/false step labels and row 1 numbers"):
        tokenize_steps(rows, bos_tokenizer, separator=".")
    steps = tokenize_steps(Rows([ROWS[0], {**ROWS[2], "labels": []}], "d"), bos_tokenizer, ".", on_bad_row="skip")
    assert (steps.report.rows_out, steps.report.skipped_bad, steps["row"]) == (1, 1, [0])


def test_numbers_train_with_squared_error_and_long_rows_are_dropped_and_counted(bos_tokenizer):
    rows = [{**ROWS[0], "labels": [0.25, 1.0]}, ROWS[1] | {"labels": [0.0, 0.5, 1.0]}]
    steps = tokenize_steps(rows, bos_tokenizer, separator=".", max_length=18)
    assert steps.label_kind == "number" and steps.report.dropped_too_long == 1
    loss = step_loss(torch.tensor([0.0, 1.0]), torch.tensor([0.25, 1.0]), torch.tensor([True, True]), "number")
    assert loss.item() == pytest.approx(0.25**2 / 2)


def test_step_ends_hold_the_separator_and_labels(bos_tokenizer):
    steps = tokenize_steps(ROWS, bos_tokenizer, separator=".", last_step_only=True)
    dot = bos_tokenizer.convert_tokens_to_ids(".")
    for ids, ends in zip(steps["ids"], steps["step_ends"]):
        assert [ids[e] for e in ends] == [dot] * len(ends) and ends[-1] == len(ids) - 1
    assert steps["trained"] == [[False, True], [False, False, True], [True]]
    assert steps["labels"][0] == [1.0, 0.0]


def test_aggregations():
    rows = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.0])]
    assert aggregate(rows, "min").tolist() == [-2.0, 0.0]
    assert aggregate(rows, "last").tolist() == [3.0, 0.0]
    assert aggregate(rows, "mean").tolist() == pytest.approx([2 / 3, 0.0])
    expected = 1 / (1 + math.exp(-1)) / (1 + math.exp(2)) / (1 + math.exp(-3))
    assert aggregate(rows, "product").tolist() == pytest.approx([expected, 0.5])
    with pytest.raises(ValueError, match="aggregation must be one of min, last, mean, product, got 'max'"):
        aggregate(rows, "max")


def test_report_counts_steps_and_first_errors(bos_tokenizer):
    steps = tokenize_steps(ROWS, bos_tokenizer, separator=".")
    rewards = [torch.tensor([2.0, -1.0]), torch.tensor([1.0, -1.0, 1.0]), torch.tensor([1.0])]
    report, scores = step_report(steps, rewards)
    assert report["step_accuracy"] == pytest.approx(4 / 6)
    assert report["accuracy_false_steps"] == pytest.approx(1 / 2) and report["majority_baseline"] == pytest.approx(
        4 / 6
    )
    assert report["first_error_accuracy"] == pytest.approx(1 / 3)  # row 0 right; row 1 predicts an error; row 2 misses
    assert first_error([True, False, False]) == 1 and first_error([True]) == -1
    assert scores[1] == {"row": 1, "step_rewards": [1.0, -1.0, 1.0], "labels": [1.0, 1.0, 1.0]}


@pytest.mark.parametrize("packing", [True, False])
def test_scorer_step_rewards_equal_the_head_at_each_separator(packing, tiny_model_dir):
    scorer = RewardScorer.from_pretrained(tiny_model_dir, packing=packing, max_tokens_per_batch=24)
    prompts = [r["prompt"] for r in ROWS]
    completions = [r["completions"] for r in ROWS[:2]] + [" . ".join(ROWS[2]["completions"]) + " ."]
    scores = scorer.score_steps(prompts, completions, separator=".", aggregation="last")
    dot = scorer.tokenizer.convert_tokens_to_ids(".")
    for prompt, completion, rewards in zip(prompts, completions, scores.step_rewards):
        steps = completion if isinstance(completion, list) else ["hello world"]
        text_ids = [scorer.tokenizer.bos_token_id] + scorer.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for step in steps:
            text_ids += scorer.tokenizer(step, add_special_tokens=False)["input_ids"] + [dot]
        with torch.no_grad():  # the oracle: the row alone, no mask, the head at every separator
            hidden = backbone(scorer.model)(input_ids=torch.tensor([text_ids])).last_hidden_state[0]
            expected = score_head(scorer.model)(hidden).squeeze(-1)[[i for i, t in enumerate(text_ids) if t == dot]]
        torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=0)
    assert scores.rewards.tolist() == [r[-1].item() for r in scores.step_rewards]


def test_run_step_options_reads_the_runs_config(tmp_path):
    from rmtorch.steps import format_step_report, run_step_options

    assert run_step_options(str(tmp_path)) == {} and run_step_options(None) == {}
    (tmp_path / "config.yaml").write_text('objective: steps\nstep_separator: "\\n\\n"\nlr: 0.001\n')
    assert run_step_options(str(tmp_path)) == {"objective": "steps", "step_separator": "\n\n"}
    (tmp_path / "config.yaml").write_text(": not yaml : [")
    assert run_step_options(str(tmp_path)) == {}
    report = {"num_rows": 2, "num_steps": 3, "step_accuracy": 0.5, "majority_baseline": 0.6, "loss": 0.7,
              "accuracy_true_steps": 1.0, "accuracy_false_steps": math.nan, "mean_step_reward": 0.1,
              "first_error_accuracy": 0.5}  # fmt: skip
    assert "first-error-step accuracy 0.5000" in format_step_report(report)
