"""rmtorch.report: training curves from metrics.jsonl and the report files, as real PNG images of the fixed size."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rmtorch.metrics import build_report
from rmtorch.report import REPORT_FILES, plot_training_curves, read_metrics, write_report
from tests.conftest import assert_real_png, read_jsonl, write_jsonl


def synthetic_metrics(path, steps: int = 30, eval_every: int = 10):
    lines = []
    for step in range(1, steps + 1):
        lines.append(
            {
                "loss": 0.7 * math.exp(-step / 10),
                "accuracy": min(1.0, 0.5 + step / 40),
                "margin": step / 10,
                "mean_reward": 0.0,
                "min_reward": -1.0,
                "max_reward": 1.0,
                "step": step,
                "epoch": 0,
                "lr": 5e-5 * (1 - step / steps),
                "grad_norm": 1.0,
                "tokens": 100 * step,
                "skipped": False,
            }
        )
        if step % eval_every == 0:
            lines.append(
                {
                    "step": step,
                    "eval_loss": 0.8 * math.exp(-step / 12),
                    "eval_accuracy": 0.5 + step / 70,
                    "eval_margin": step / 12,
                }
            )
    return write_jsonl(path, lines)


def test_plot_adds_the_final_eval_from_eval_results(tmp_path):
    synthetic_metrics(tmp_path / "metrics.jsonl", steps=30, eval_every=10)
    (tmp_path / "eval_results.json").write_text(
        json.dumps({"accuracy": 0.9, "loss": 0.2, "train_steps": 30, "data": {"train": {}}})
    )
    _, eval_records = read_metrics(tmp_path)
    assert [r["step"] for r in eval_records] == [10, 20, 30, 30]
    assert eval_records[-1]["eval_accuracy"] == 0.9 and "eval_data" not in eval_records[-1]


def test_training_curves_are_a_real_png(tmp_path):
    synthetic_metrics(tmp_path / "metrics.jsonl")
    assert_real_png(plot_training_curves(tmp_path, tmp_path / "curves" / "training_curves.png"))


def test_a_cut_off_metrics_file_names_the_line(tmp_path):
    metrics = synthetic_metrics(tmp_path / "metrics.jsonl", steps=3)
    metrics.write_text(metrics.read_text() + '{"loss": 0.5, "st')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 4: not valid JSON"):
        read_metrics(tmp_path)


def test_a_missing_run_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="training output directory"):
        read_metrics(tmp_path / "nowhere")


def test_write_report_writes_every_file(tmp_path):
    chosen, rejected = torch.tensor([1.0, 0.5, -1.0, 2.0]), torch.tensor([0.0, 0.7, -2.0, 1.0])
    chosen_tokens, rejected_tokens = [3, 1, 4, 1], [2, 2, 4, 6]
    report = build_report(
        chosen,
        rejected,
        [5, 6, 7, 8],
        categories=["a", "b", "a", "b"],
        response_lengths=(chosen_tokens, rejected_tokens),
    )
    scores = [
        {"row": i, "chosen_reward": c, "rejected_reward": r, "length": 5 + i, "category": "ab"[i % 2],
         "chosen_response_tokens": chosen_tokens[i], "rejected_response_tokens": rejected_tokens[i]}
        for i, (c, r) in enumerate(zip(chosen.tolist(), rejected.tolist()))
    ]  # fmt: skip
    paths = write_report(report, scores, tmp_path / "report")
    assert set(paths) == set(REPORT_FILES)
    assert json.loads(paths["metrics"].read_text()) == report and read_jsonl(paths["scores"]) == scores
    for name in ("reward_histograms", "calibration", "accuracy_by_length", "accuracy_by_category", "length_bias"):
        assert_real_png(paths[name])
    assert not list((tmp_path / "report").glob(".*"))  # no temporary file left behind
