"""evaluate.py end to end: its numbers against direct computation from the scores, its scores against a one-by-one
forward of the saved model, real PNG images, and the report train.py writes reproduced from a run's directory
(full model and LoRA adapter) with the run's own options."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import evaluate
from rmtorch.files import PairDataError
from rmtorch.metrics import format_report
from rmtorch.report import REPORT_FILES
from tests.conftest import (
    CATEGORIES,
    assert_real_png,
    pair_rows,
    read_jsonl,
    save_tiny_llama,
    train_argv,
    train_in_process,
    write_jsonl,
)


def rows_with_a_tie(count: int, seed: int = 0) -> list[dict]:
    """pair_rows with categories, plus one pair whose two sides tokenize identically ("13" and "14" are unknown
    words to the BOS tokenizer), so their rewards tie exactly."""
    return pair_rows(count, seed, categories=True) + [
        {"prompt": "how many", "chosen": " 13", "rejected": " 14", "category": "answers"}
    ]


def top_label_ece(chosen: list[float], rejected: list[float], n_bins: int) -> float:
    """Guo et al.'s ECE: confidence max(p, 1-p) in n_bins/2 bins over [0.5, 1]; a tie is half right."""
    n_conf_bins = n_bins // 2
    bins = [[] for _ in range(n_conf_bins)]
    for c, r in zip(chosen, rejected):
        p = 1 / (1 + math.exp(-(c - r)))
        confidence = max(p, 1 - p)
        correct = 1.0 if c > r else 0.5 if c == r else 0.0
        bins[min(int((confidence - 0.5) * 2 * n_conf_bins), n_conf_bins - 1)].append((confidence, correct))
    return sum(
        len(b) / len(chosen) * abs(sum(k for _, k in b) / len(b) - sum(q for q, _ in b) / len(b)) for b in bins if b
    )


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, bos_tokenizer):
    """A tiny random model evaluated by evaluate.py on 31 pairs with a category column, in several forwards."""
    root = tmp_path_factory.mktemp("eval")
    model_dir = save_tiny_llama(root / "model", bos_tokenizer, seed=3)
    data = write_jsonl(root / "held_out.jsonl", rows_with_a_tie(30))
    argv = ["--model", str(model_dir), "--data", str(data), "--bf16", "false", "--max_tokens_per_batch", "64"]
    report = evaluate.main([*argv, "--report", str(root / "report")])
    return {
        "root": root,
        "model_dir": model_dir,
        "data": data,
        "argv": argv,
        "report": report,
        "report_dir": root / "report",
    }


def test_scores_equal_one_by_one_forward_of_the_saved_model(eval_run, bos_tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(eval_run["model_dir"]).eval()
    expected = []
    for row in read_jsonl(eval_run["data"]):
        with torch.no_grad():
            sides = (row["chosen"], row["rejected"])
            expected.append(
                [
                    model(**bos_tokenizer(row["prompt"] + side + "</s>", return_tensors="pt")).logits.item()
                    for side in sides
                ]
            )
    scores = read_jsonl(eval_run["report_dir"] / "scores.jsonl")
    np.testing.assert_allclose(
        [(s["chosen_reward"], s["rejected_reward"]) for s in scores], expected, rtol=1e-5, atol=1e-5
    )
    assert [s["row"] for s in scores] == list(range(31))  # each line names its row in the data file


def test_report_numbers_equal_direct_computation_from_the_scores(eval_run):
    scores = read_jsonl(eval_run["report_dir"] / "scores.jsonl")
    metrics = json.loads((eval_run["report_dir"] / "metrics.json").read_text())
    chosen, rejected = [s["chosen_reward"] for s in scores], [s["rejected_reward"] for s in scores]
    n = len(scores)
    assert metrics == eval_run["report"]  # the file is the returned report
    assert metrics["num_pairs"] == n == 31
    assert metrics["accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / n, abs=1e-12)
    assert metrics["margin"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / n, abs=1e-9)
    assert metrics["ties"] == sum(c == r for c, r in zip(chosen, rejected)) >= 1
    assert metrics["loss"] == pytest.approx(
        sum(math.log1p(math.exp(r - c)) for c, r in zip(chosen, rejected)) / n, abs=1e-9
    )
    assert metrics["ece"] == pytest.approx(top_label_ece(chosen, rejected, n_bins=10), abs=1e-9)
    assert metrics["mean_reward"] == pytest.approx((sum(chosen) + sum(rejected)) / (2 * n), abs=1e-9)


def test_accuracy_by_category_and_length_equal_direct_computation(eval_run, bos_tokenizer):
    scores = read_jsonl(eval_run["report_dir"] / "scores.jsonl")
    metrics = eval_run["report"]
    rows = read_jsonl(eval_run["data"])
    assert [s["category"] for s in scores] == [r["category"] for r in rows]
    for s, row in zip(scores, rows):  # length: tokens in the longer side of the pair
        assert s["length"] == max(
            len(bos_tokenizer(row["prompt"] + side + "</s>")["input_ids"]) for side in (row["chosen"], row["rejected"])
        )

    def accuracy(selected):
        return sum(s["chosen_reward"] > s["rejected_reward"] for s in selected) / len(selected)

    for group in metrics["by_category"]:
        selected = [s for s in scores if s["category"] == group["name"]]
        assert (group["num_pairs"], group["accuracy"]) == (len(selected), pytest.approx(accuracy(selected), abs=1e-12))
    assert sorted(g["name"] for g in metrics["by_category"]) == sorted(CATEGORIES)
    assert sum(g["num_pairs"] for g in metrics["by_length"]) == len(scores)
    for group in metrics["by_length"]:
        selected = [s for s in scores if group["min_tokens"] <= s["length"] <= group["max_tokens"]]
        assert (group["num_pairs"], group["accuracy"]) == (len(selected), pytest.approx(accuracy(selected), abs=1e-12))


def test_length_bias_equals_direct_computation_on_response_tokens(eval_run, bos_tokenizer):
    import statistics

    scores, metrics = read_jsonl(eval_run["report_dir"] / "scores.jsonl"), eval_run["report"]
    for s, row in zip(scores, read_jsonl(eval_run["data"])):  # the response alone: tokens after the prompt's
        prompt_tokens = len(bos_tokenizer(row["prompt"])["input_ids"])
        for side in ("chosen", "rejected"):
            full = len(bos_tokenizer(row["prompt"] + row[side] + "</s>")["input_ids"])
            assert s[f"{side}_response_tokens"] == full - prompt_tokens
    rewards = [s["chosen_reward"] for s in scores] + [s["rejected_reward"] for s in scores]
    lengths = [s["chosen_response_tokens"] for s in scores] + [s["rejected_response_tokens"] for s in scores]
    assert metrics["reward_length_pearson"] == pytest.approx(statistics.correlation(rewards, lengths), abs=1e-9)
    margins = [s["chosen_reward"] - s["rejected_reward"] for s in scores]
    differences = [s["chosen_response_tokens"] - s["rejected_response_tokens"] for s in scores]
    assert metrics["margin_length_pearson"] == pytest.approx(statistics.correlation(margins, differences), abs=1e-9)
    for group, keep in zip(metrics["by_length_order"], (lambda d: d < 0, lambda d: d == 0, lambda d: d > 0)):
        selected = [m for m, d in zip(margins, differences) if keep(d)]
        assert group["num_pairs"] == len(selected)
        if selected:
            assert group["accuracy"] == pytest.approx(sum(m > 0 for m in selected) / len(selected), abs=1e-12)
    assert sum(g["num_pairs"] for g in metrics["by_length_order"]) == 31


@pytest.mark.parametrize(
    "name", ["reward_histograms", "calibration", "accuracy_by_length", "accuracy_by_category", "length_bias"]
)
def test_report_plots_are_real_images(eval_run, name):
    assert_real_png(eval_run["report_dir"] / REPORT_FILES[name])


def test_the_printed_summary_is_the_report(eval_run, capsys):
    report = evaluate.main(eval_run["argv"])
    out = capsys.readouterr().out
    assert format_report(report) in out and report["accuracy"] == eval_run["report"]["accuracy"]
    assert f"data {eval_run['data']}: 31/31 pairs kept" in out


def test_packing_and_batch_size_do_not_change_the_report(eval_run):
    for options in (
        ["--packing", "true", "--max_tokens_per_batch", "16"],
        ["--packing", "false", "--max_tokens_per_batch", "100000"],
    ):
        report = evaluate.main([*eval_run["argv"], *options])
        assert report["accuracy"] == eval_run["report"]["accuracy"] and report["ties"] == eval_run["report"]["ties"]
        assert report["margin"] == pytest.approx(eval_run["report"]["margin"], abs=1e-6)
        assert report["mean_reward"] == pytest.approx(eval_run["report"]["mean_reward"], abs=1e-6)


def test_unknown_category_column_is_an_error_naming_the_columns(eval_run):
    with pytest.raises(
        PairDataError,
        match=r"no column 'topic' to split accuracy by; its columns are \['prompt', 'chosen', 'rejected', "
        r"'category'\]",
    ):
        evaluate.main([*eval_run["argv"], "--category_column", "topic"])


# ------------------------------------------------------------------------------ a run's own report, reproduced


LONG_PROMPT_WORDS = "what color is the sky ? " * 6  # 36 prompt tokens: over the run's max_length of 32


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, bos_tokenizer):
    """A run whose options differ from the defaults where it matters: pairs longer than its max_length of 32,
    keep_end truncation, packing, fp32, margins. Its eval file is evaluated again below."""
    root = tmp_path_factory.mktemp("run")
    model_dir = save_tiny_llama(root / "base", bos_tokenizer, seed=5)
    rows = pair_rows(24, seed=1, categories=True)
    long_rows = [{**row, "prompt": LONG_PROMPT_WORDS + row["prompt"], "margin": 0.1 * i} for i, row in enumerate(rows)]
    train_file = write_jsonl(root / "train.jsonl", long_rows[:16])
    eval_file = write_jsonl(root / "eval.jsonl", long_rows[16:])
    out = root / "run"
    options = [
        "--max_length",
        "32",
        "--truncation",
        "keep_end",
        "--packing",
        "true",
        "--max_tokens_per_batch",
        "48",
        "--batch_size",
        "4",
    ]
    results = train_in_process(
        train_argv(
            model_dir,
            train_file,
            out,
            *options,
            "--report_to",
            "tensorboard",
            "--eval_every",
            "1",
            eval_file=eval_file,
        )
    )
    return {"out": out, "eval_file": eval_file, "results": results}


def test_train_report_matches_its_eval_results(trained_run):
    report = json.loads((trained_run["out"] / "report" / "metrics.json").read_text())
    results = trained_run["results"]
    assert {k: v for k, v in report.items() if isinstance(v, (int, float))} == {
        k: results[k] for k in report if isinstance(report[k], (int, float))
    }
    assert results["data"]["eval"]["truncated"] == 8  # every eval pair was longer than max_length
    assert [g["name"] for g in report["by_category"]] == sorted(CATEGORIES)
    for name in ("reward_histograms", "calibration", "accuracy_by_length", "accuracy_by_category", "training_curves"):
        assert_real_png(trained_run["out"] / "report" / f"{name}.png")


def test_evaluate_on_a_runs_eval_file_reproduces_its_eval_results(trained_run, tmp_path, capsys):
    """No options but --model and --data: max_length, truncation, packing, precision come from the run's config."""
    report = evaluate.main(
        [
            "--model",
            str(trained_run["out"]),
            "--data",
            str(trained_run["eval_file"]),
            "--report",
            str(tmp_path / "report"),
        ]
    )
    assert "options from" in capsys.readouterr().out
    results = trained_run["results"]
    for key in ("num_pairs", "accuracy", "ties", "margin", "loss", "ece", "mean_reward", "min_reward", "max_reward"):
        assert report[key] == pytest.approx(results[key], abs=1e-6), key
    from_cli, from_train = (
        read_jsonl(tmp_path / "report" / "scores.jsonl"),
        read_jsonl(trained_run["out"] / "report" / "scores.jsonl"),
    )
    assert [(s["row"], s["length"], s["category"]) for s in from_cli] == [
        (s["row"], s["length"], s["category"]) for s in from_train
    ]
    rewards = lambda scores: [(s["chosen_reward"], s["rejected_reward"]) for s in scores]  # noqa: E731
    np.testing.assert_allclose(rewards(from_cli), rewards(from_train), rtol=0, atol=1e-6)


def test_tensorboard_logs_every_step_and_eval(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run["out"] / "trackers" / "rmtorch"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [1, 2]  # eval_every 1, then the final eval
    train_losses = [r["loss"] for r in read_jsonl(trained_run["out"] / "metrics.jsonl") if "loss" in r]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(train_losses, rel=1e-6)


def test_no_tracker_by_default(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    train_in_process(train_argv(tiny_model_dir, data, tmp_path / "run", "--max_steps", "1"))
    assert (tmp_path / "run" / "report" / "metrics.json").exists()
    assert not (tmp_path / "run" / "trackers").exists()


def test_evaluate_on_a_lora_adapter_reproduces_train_report(tmp_path, tiny_model_dir):
    train_file, eval_file = (
        write_jsonl(tmp_path / "train.jsonl", pair_rows(16)),
        write_jsonl(tmp_path / "eval.jsonl", pair_rows(8, seed=2)),
    )
    out = tmp_path / "run"
    train_in_process(
        train_argv(
            tiny_model_dir, train_file, out, "--lora", "true", "--lora_r", "4", "--lr", "1e-2", eval_file=eval_file
        )
    )
    assert (out / "adapter_config.json").exists()
    report = evaluate.main(["--model", str(out), "--data", str(eval_file), "--report", str(tmp_path / "report")])
    from_train, from_cli = (
        read_jsonl(out / "report" / "scores.jsonl"),
        read_jsonl(tmp_path / "report" / "scores.jsonl"),
    )
    rewards = lambda scores: [(s["chosen_reward"], s["rejected_reward"]) for s in scores]  # noqa: E731
    np.testing.assert_allclose(rewards(from_cli), rewards(from_train), rtol=1e-5, atol=1e-5)
    assert report["accuracy"] == json.loads((out / "report" / "metrics.json").read_text())["accuracy"]
