"""rmtorch.loss and rmtorch.metrics: the loss formula, pair-weighted metrics, the evaluation report's numbers, and
a training step's metrics reduced on the device."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rmtorch.loss import pairwise_loss
from rmtorch.metrics import StepMetrics, build_report, eval_metrics, pair_metrics


def test_pairwise_loss_is_the_formula():
    r_c, r_r, m = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5]), torch.tensor([0.1, 0.0, 1.0])
    expected = -F.logsigmoid(r_c - r_r - m).mean() + 0.01 * ((r_c + r_r) ** 2).mean()
    assert pairwise_loss(r_c, r_r, m, 0.01).item() == pytest.approx(expected.item(), abs=1e-6)
    assert pairwise_loss(torch.zeros(2), torch.zeros(2)).item() == pytest.approx(math.log(2))


def test_metrics_are_pair_weighted_and_ties_are_wrong():
    r_c, r_r = torch.tensor([1.0, 0.0, 3.0, 2.0]), torch.tensor([0.0, 0.0, 4.0, 1.0])
    assert pair_metrics(r_c, r_r)["accuracy"] == 0.5  # the tie (0, 0) counts as wrong, as in TRL
    metrics = eval_metrics(r_c, r_r)
    assert metrics["ties"] == 1 and metrics["num_pairs"] == 4
    assert metrics["margin"] == pytest.approx(0.25)
    assert metrics["loss"] == pytest.approx((-F.logsigmoid(r_c - r_r)).mean().item())


def test_report_counts_accuracy_margin_and_ties():
    report = build_report([2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, -1.0], lengths=[5, 6, 7, 8])
    assert (report["accuracy"], report["margin"], report["ties"], report["num_pairs"]) == (0.5, 0.5, 1, 4)


@pytest.mark.parametrize(
    "diff, expected_ece", [(0.0, 0.0), (math.log(3.0), 0.25), (-math.log(3.0), 0.75), (60.0, 0.0)]
)
def test_ece_of_a_constant_margin(diff, expected_ece):
    # p = sigmoid(diff) for every pair: counted as (p, 1) and (1 - p, 0), ECE = |1 - p| exactly.
    report = build_report(torch.full((8,), diff, dtype=torch.float64), torch.zeros(8), lengths=torch.arange(8))
    assert report["ece"] == pytest.approx(expected_ece, abs=1e-12)


def test_calibration_bins_count_each_pair_in_both_orders():
    report = build_report([math.log(3.0)] * 4, [0.0] * 4, lengths=[1, 2, 3, 4], n_bins=10)
    calibration = report["calibration"]
    assert calibration["count"] == [0, 0, 4, 0, 0, 0, 0, 4, 0, 0]
    assert calibration["observed"][2] == 0.0 and calibration["observed"][7] == 1.0
    assert calibration["mean_predicted"][7] == pytest.approx(0.75)


def test_length_buckets_are_quantiles_and_keep_equal_lengths_together():
    distinct = build_report(
        torch.arange(8.0), torch.zeros(8), lengths=[10, 20, 30, 40, 50, 60, 70, 80], n_length_buckets=4
    )
    assert [(g["min_tokens"], g["max_tokens"], g["num_pairs"]) for g in distinct["by_length"]] == [
        (10, 20, 2),
        (30, 40, 2),
        (50, 60, 2),
        (70, 80, 2),
    ]
    same = build_report(torch.arange(8.0), torch.zeros(8), lengths=[42] * 8, n_length_buckets=4)
    assert [(g["name"], g["num_pairs"]) for g in same["by_length"]] == [("42-42", 8)]


def test_accuracy_by_category():
    report = build_report(
        [1.0, 1.0, -1.0, 1.0], [0.0, 2.0, 0.0, 0.0], lengths=[1, 2, 3, 4], categories=["b", "a", "b", "b"]
    )
    assert [(g["name"], g["num_pairs"], g["accuracy"]) for g in report["by_category"]] == [
        ("a", 1, 0.0),
        ("b", 3, pytest.approx(2 / 3)),
    ]


def test_inputs_of_different_sizes_are_an_error():
    with pytest.raises(ValueError, match="same non-zero number"):
        build_report([1.0, 2.0], [0.0], lengths=[3, 4])


def test_step_metrics_are_pair_weighted_sums_read_once():
    stats = StepMetrics(torch.device("cpu"))
    stats.add(torch.tensor(0.5), torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0]), torch.tensor(10))
    stats.add(torch.tensor(0.7), torch.tensor([4.0]), torch.tensor([-1.0]), torch.tensor(6))
    record = stats.reduce(None, torch.tensor(2.5))
    assert record["loss"] == pytest.approx(0.6)  # the mean of the micro-batch losses
    assert record["accuracy"] == pytest.approx(2 / 3) and record["margin"] == pytest.approx((1 - 1 + 5) / 3)
    assert (record["min_reward"], record["max_reward"], record["tokens"]) == (-1.0, 4.0, 16)
    assert record["mean_reward"] == pytest.approx(9 / 6) and record["grad_norm"] == 2.5 and record["finite"]


@pytest.mark.parametrize(
    "loss, norm, finite", [(float("inf"), 1.0, False), (0.5, float("nan"), False), (0.5, None, True)]
)
def test_step_metrics_flag_a_non_finite_step(loss, norm, finite):
    stats = StepMetrics(torch.device("cpu"))
    stats.add(torch.tensor(loss), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor(3))
    record = stats.reduce(None, None if norm is None else torch.tensor(norm))
    assert record["finite"] is finite and (record["grad_norm"] is None) == (norm is None)
