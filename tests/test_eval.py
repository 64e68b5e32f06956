"""Evaluation reports and plots: numbers against direct computation from the scores, real PNG images,
the same report from train.py and from `python -m rmtorch.eval`, full models and LoRA adapters."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from rmtorch import eval as rm_eval
from rmtorch import plot
from rmtorch.data import tokenize_pairs
from tests.conftest import save_tiny_llama

WORDS = "what color is the sky blue green red yes no good bad hello world".split()
CATEGORIES = ("colors", "greetings", "answers")
PNG_SIZE = (int(plot.FIGSIZE[0] * plot.DPI), int(plot.FIGSIZE[1] * plot.DPI))


def pair_rows(count: int, seed: int = 0) -> list[dict]:
    """Pairs from the bos tokenizer's vocabulary with varied lengths, a category each, and one exact tie."""
    rng = random.Random(seed)
    pick = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    rows = [
        {"prompt": pick(2 + i % 9), "chosen": f" {pick(1 + i % 3)} good", "rejected": f" {pick(1 + i % 2)} bad", "category": CATEGORIES[i % 3]}
        for i in range(count)
    ]
    # "13" and "14" are both unknown words: the two sides tokenize identically, so their rewards tie exactly.
    rows.append({"prompt": "how many", "chosen": " 13", "rejected": " 14", "category": "answers"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_real_png(path):
    """An image of the fixed report size whose pixels are not all the same."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == PNG_SIZE
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.var() > 0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn content, not a flat fill


def top_label_ece(chosen: list[float], rejected: list[float], n_bins: int) -> float:
    """Guo et al.'s ECE: confidence max(p, 1-p) in n_bins/2 bins over [0.5, 1]; a tie is half right."""
    n_conf_bins = n_bins // 2
    bins = [[] for _ in range(n_conf_bins)]
    for c, r in zip(chosen, rejected):
        p = 1 / (1 + math.exp(-(c - r)))
        confidence = max(p, 1 - p)
        correct = 1.0 if c > r else 0.5 if c == r else 0.0
        bins[min(int((confidence - 0.5) * 2 * n_conf_bins), n_conf_bins - 1)].append((confidence, correct))
    return sum(len(b) / len(chosen) * abs(sum(k for _, k in b) / len(b) - sum(q for q, _ in b) / len(b)) for b in bins if b)


# ------------------------------------------------------------------------------------- build_report (pure)


def test_report_counts_accuracy_margin_and_ties():
    report = rm_eval.build_report([2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, -1.0], lengths=[5, 6, 7, 8])
    assert (report["accuracy"], report["margin"], report["ties"], report["num_pairs"]) == (0.5, 0.5, 1, 4)


@pytest.mark.parametrize("diff, expected_ece", [(0.0, 0.0), (math.log(3.0), 0.25), (-math.log(3.0), 0.75), (60.0, 0.0)])
def test_ece_of_a_constant_margin(diff, expected_ece):
    # p = sigmoid(diff) for every pair: counted as (p, 1) and (1 - p, 0), ECE = |1 - p| exactly.
    report = rm_eval.build_report(torch.full((8,), diff, dtype=torch.float64), torch.zeros(8), lengths=torch.arange(8))
    assert report["ece"] == pytest.approx(expected_ece, abs=1e-12)


def test_calibration_bins_count_each_pair_in_both_orders():
    report = rm_eval.build_report([math.log(3.0)] * 4, [0.0] * 4, lengths=[1, 2, 3, 4], n_bins=10)
    calibration = report["calibration"]
    assert calibration["count"] == [0, 0, 4, 0, 0, 0, 0, 4, 0, 0]
    assert calibration["observed"][2] == 0.0 and calibration["observed"][7] == 1.0
    assert calibration["mean_predicted"][7] == pytest.approx(0.75)


def test_length_buckets_are_quantiles_and_keep_equal_lengths_together():
    distinct = rm_eval.build_report(torch.arange(8.0), torch.zeros(8), lengths=[10, 20, 30, 40, 50, 60, 70, 80], n_length_buckets=4)
    assert [(g["min_tokens"], g["max_tokens"], g["num_pairs"]) for g in distinct["by_length"]] == [(10, 20, 2), (30, 40, 2), (50, 60, 2), (70, 80, 2)]
    same = rm_eval.build_report(torch.arange(8.0), torch.zeros(8), lengths=[42] * 8, n_length_buckets=4)
    assert [(g["name"], g["num_pairs"]) for g in same["by_length"]] == [("42-42", 8)]


def test_accuracy_by_category():
    report = rm_eval.build_report([1.0, 1.0, -1.0, 1.0], [0.0, 2.0, 0.0, 0.0], lengths=[1, 2, 3, 4], categories=["b", "a", "b", "b"])
    assert [(g["name"], g["num_pairs"], g["accuracy"]) for g in report["by_category"]] == [("a", 1, 0.0), ("b", 3, pytest.approx(2 / 3))]


def test_inputs_of_different_sizes_are_an_error():
    with pytest.raises(ValueError, match="same non-zero number"):
        rm_eval.build_report([1.0, 2.0], [0.0], lengths=[3, 4])


def test_keep_columns_stay_aligned_when_rows_are_skipped_and_dropped(bos_tokenizer):
    rows = [
        {"prompt": "what", "chosen": " good", "rejected": " bad", "category": "kept-1"},
        {"prompt": "what", "chosen": " good", "rejected": " good", "category": "bad-row"},  # identical sides: skipped
        {"prompt": "what " * 40, "chosen": " good", "rejected": " bad", "category": "too-long"},  # dropped
        {"prompt": "is", "chosen": " yes", "rejected": " no", "category": "kept-2"},
    ]
    pairs = tokenize_pairs(rows, bos_tokenizer, max_length=16, on_bad_row="skip", keep_columns=["category"])
    assert pairs["category"] == ["kept-1", "kept-2"]


# ------------------------------------------------------------------------------- python -m rmtorch.eval


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, bos_tokenizer):
    """A tiny random model evaluated by the CLI on 31 pairs with a category column."""
    root = tmp_path_factory.mktemp("eval")
    model_dir = save_tiny_llama(root / "model", bos_tokenizer, seed=3)
    data = write_jsonl(root / "held_out.jsonl", pair_rows(30))
    report = rm_eval.main(["--model", str(model_dir), "--data", str(data), "--report", str(root / "report"), "--batch_size", "4"])
    return {"root": root, "model_dir": model_dir, "data": data, "report": report, "report_dir": root / "report"}


def test_scores_equal_one_by_one_forward_of_the_saved_model(eval_run, bos_tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(eval_run["model_dir"]).eval()
    expected = []
    for row in read_jsonl(eval_run["data"]):
        with torch.no_grad():
            chosen, rejected = (model(**bos_tokenizer(row["prompt"] + side + bos_tokenizer.eos_token, return_tensors="pt")).logits.item() for side in (row["chosen"], row["rejected"]))
        expected.append((chosen, rejected))
    scores = read_jsonl(eval_run["report_dir"] / "scores.jsonl")
    np.testing.assert_allclose([(s["chosen_reward"], s["rejected_reward"]) for s in scores], expected, rtol=1e-5, atol=1e-5)


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
    assert metrics["loss"] == pytest.approx(sum(math.log1p(math.exp(r - c)) for c, r in zip(chosen, rejected)) / n, abs=1e-9)
    assert metrics["ece"] == pytest.approx(top_label_ece(chosen, rejected, n_bins=10), abs=1e-9)
    assert metrics["mean_reward"] == pytest.approx((sum(chosen) + sum(rejected)) / (2 * n), abs=1e-9)


def test_accuracy_by_category_and_length_equal_direct_computation(eval_run, bos_tokenizer):
    scores = read_jsonl(eval_run["report_dir"] / "scores.jsonl")
    metrics = eval_run["report"]
    rows = read_jsonl(eval_run["data"])
    assert [s["category"] for s in scores] == [r["category"] for r in rows]
    for s, row in zip(scores, rows):  # length: tokens in the longer side of the pair
        assert s["length"] == max(len(bos_tokenizer(row["prompt"] + side + "</s>")["input_ids"]) for side in (row["chosen"], row["rejected"]))

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


@pytest.mark.parametrize("name", ["reward_histograms", "calibration", "accuracy_by_length", "accuracy_by_category"])
def test_report_plots_are_real_images(eval_run, name):
    assert_real_png(eval_run["report_dir"] / rm_eval.REPORT_FILES[name])


def test_report_prints_the_summary(eval_run, capsys):
    rm_eval.main(["--model", str(eval_run["model_dir"]), "--data", str(eval_run["data"])])
    out = capsys.readouterr().out
    for text in ("accuracy", "margin", "ties", "ECE", "accuracy by length", "accuracy by category", "31/31 pairs kept"):
        assert text in out


def test_unknown_category_column_is_an_error_naming_the_columns(eval_run):
    with pytest.raises(SystemExit, match="no column 'topic'.*category"):
        rm_eval.main(["--model", str(eval_run["model_dir"]), "--data", str(eval_run["data"]), "--category_column", "topic"])


# ---------------------------------------------------------------------------------- train.py's report


def train_tiny(tmp_path, bos_tokenizer, *extra: str) -> tuple:
    import train

    model_dir = save_tiny_llama(tmp_path / "base", bos_tokenizer, seed=5)
    train_file = write_jsonl(tmp_path / "train.jsonl", pair_rows(24, seed=1))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", pair_rows(12, seed=2))
    out = tmp_path / "run"
    results = train.main([
        "--model", str(model_dir), "--train_file", str(train_file), "--eval_file", str(eval_file), "--output_dir", str(out),
        "--max_steps", "2", "--batch_size", "4", "--eval_batch_size", "5", "--bf16", "false", *extra,
    ])
    return out, eval_file, results


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, bos_tokenizer):
    out, eval_file, results = train_tiny(tmp_path_factory.mktemp("train"), bos_tokenizer, "--report_to", "tensorboard", "--eval_every", "1")
    return {"out": out, "eval_file": eval_file, "results": results}


def test_train_report_matches_its_eval_results(trained_run):
    report = json.loads((trained_run["out"] / "report" / "metrics.json").read_text())
    results = trained_run["results"]
    assert (report["num_pairs"], report["ties"], report["accuracy"]) == (results["num_pairs"], results["ties"], pytest.approx(results["accuracy"], abs=1e-6))  # eval_metrics averages in fp32
    assert report["margin"] == pytest.approx(results["margin"], abs=1e-6)
    assert [g["name"] for g in report["by_category"]] == sorted(CATEGORIES)
    for name in ("reward_histograms", "calibration", "accuracy_by_length", "accuracy_by_category"):
        assert_real_png(trained_run["out"] / "report" / rm_eval.REPORT_FILES[name])


def test_eval_cli_on_the_trained_model_reproduces_train_report(trained_run, tmp_path):
    rm_eval.main(["--model", str(trained_run["out"]), "--data", str(trained_run["eval_file"]), "--report", str(tmp_path / "report")])
    from_train = read_jsonl(trained_run["out"] / "report" / "scores.jsonl")
    from_cli = read_jsonl(tmp_path / "report" / "scores.jsonl")
    assert [s["length"] for s in from_cli] == [s["length"] for s in from_train]
    np.testing.assert_allclose([(s["chosen_reward"], s["rejected_reward"]) for s in from_cli], [(s["chosen_reward"], s["rejected_reward"]) for s in from_train], rtol=1e-5, atol=1e-5)


def test_tensorboard_logs_every_step_and_eval(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run["out"] / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [1, 2]  # eval_every 1, then the final eval
    train_losses = [r["loss"] for r in read_jsonl(trained_run["out"] / "metrics.jsonl") if "loss" in r]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(train_losses, rel=1e-6)


def test_no_tracker_by_default(tmp_path, bos_tokenizer):
    out, _, _ = train_tiny(tmp_path, bos_tokenizer, "--max_steps", "1")
    assert (out / "report" / "metrics.json").exists()
    assert not (out / "tensorboard").exists()


def test_eval_cli_on_a_lora_adapter_reproduces_train_report(tmp_path, bos_tokenizer):
    out, eval_file, _ = train_tiny(tmp_path, bos_tokenizer, "--lora", "true", "--lora_r", "4", "--lr", "1e-2")
    assert (out / "adapter_config.json").exists()
    report = rm_eval.main(["--model", str(out), "--data", str(eval_file), "--report", str(tmp_path / "report")])
    from_train = read_jsonl(out / "report" / "scores.jsonl")
    from_cli = read_jsonl(tmp_path / "report" / "scores.jsonl")
    np.testing.assert_allclose([(s["chosen_reward"], s["rejected_reward"]) for s in from_cli], [(s["chosen_reward"], s["rejected_reward"]) for s in from_train], rtol=1e-5, atol=1e-5)
    assert report["accuracy"] == json.loads((out / "report" / "metrics.json").read_text())["accuracy"]


# ------------------------------------------------------------------------------------- python -m rmtorch.plot


def synthetic_metrics(path, steps: int = 30, eval_every: int = 10):
    lines = []
    for step in range(1, steps + 1):
        lines.append({"loss": 0.7 * math.exp(-step / 10), "accuracy": min(1.0, 0.5 + step / 40), "margin": step / 10, "mean_reward": 0.0, "min_reward": -1.0,
                      "max_reward": 1.0, "step": step, "epoch": 0, "lr": 5e-5 * (1 - step / steps), "grad_norm": 1.0, "tokens": 100 * step, "skipped": False})
        if step % eval_every == 0:
            lines.append({"step": step, "eval_loss": 0.8 * math.exp(-step / 12), "eval_accuracy": 0.5 + step / 70, "eval_margin": step / 12})
    return write_jsonl(path, lines)


def test_plot_draws_training_curves_to_png(tmp_path):
    synthetic_metrics(tmp_path / "metrics.jsonl")
    path = plot.main([str(tmp_path)])
    assert path == tmp_path / "training_curves.png"
    assert_real_png(path)


def test_plot_adds_the_final_eval_from_eval_results(tmp_path):
    synthetic_metrics(tmp_path / "metrics.jsonl", steps=30, eval_every=10)
    (tmp_path / "eval_results.json").write_text(json.dumps({"accuracy": 0.9, "loss": 0.2, "train_steps": 30, "data": {"train": {}}}))
    _, eval_records = plot.read_metrics(tmp_path)
    assert [r["step"] for r in eval_records] == [10, 20, 30, 30]
    assert eval_records[-1]["eval_accuracy"] == 0.9 and "eval_data" not in eval_records[-1]


def test_plot_reads_a_metrics_file_and_writes_where_asked(tmp_path):
    metrics = synthetic_metrics(tmp_path / "run.jsonl")
    assert_real_png(plot.main([str(metrics), "--out", str(tmp_path / "curves" / "c.png")]))


def test_plot_of_a_cut_off_metrics_file_names_the_line(tmp_path):
    metrics = synthetic_metrics(tmp_path / "metrics.jsonl", steps=3)
    metrics.write_text(metrics.read_text() + '{"loss": 0.5, "st')
    with pytest.raises(SystemExit, match=r"metrics.jsonl, line 4: not valid JSON"):
        plot.main([str(tmp_path)])


def test_plot_of_a_missing_run_says_what_to_pass(tmp_path):
    with pytest.raises(SystemExit, match="training output directory"):
        plot.main([str(tmp_path / "nowhere")])
