"""rmtorch.loss and rmtorch.metrics: the loss formula, pair-weighted metrics, the evaluation report's numbers, and
a training step's metrics reduced on the device; the length-bias numbers and the length penalty."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from rmtorch.loss import length_penalty, pairwise_loss
from rmtorch.metrics import StepMetrics, build_report, eval_metrics, format_report, pair_metrics


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


# ------------------------------------------------------------------------------------------------ length bias


def length_report(**options) -> dict:
    """Three pairs by hand: chosen longer and right, chosen shorter and wrong, the same length and tied."""
    return build_report(
        [2.0, 0.0, 1.0], [0.0, 1.0, 1.0], lengths=[9, 9, 9], response_lengths=([4, 2, 3], [2, 5, 3]), **options
    )


def test_length_bias_correlations_by_hand():
    report = length_report()
    # rewards [2, 0, 1, 0, 1, 1] against lengths [4, 2, 3, 2, 5, 3]: sums of squares 17/6 and 41/6, products 19/6
    assert report["reward_length_pearson"] == pytest.approx(19 / math.sqrt(17 * 41), abs=1e-12)
    # average ranks [6, 1.5, 4, 1.5, 4, 4] and [5, 1.5, 3.5, 1.5, 6, 3.5]: products 13, squares 15 and 16.5
    assert report["reward_length_spearman"] == pytest.approx(13 / math.sqrt(15 * 16.5), abs=1e-12)
    # margins [2, -1, 0] against length differences [2, -3, 0]: products 66/9, squares 42/9 and 114/9
    assert report["margin_length_pearson"] == pytest.approx(66 / math.sqrt(42 * 114), abs=1e-12)
    assert report["margin_length_spearman"] == pytest.approx(1.0, abs=1e-12)  # the same order


def test_length_bias_correlations_equal_the_statistics_module():
    import statistics

    rewards, lengths = [3.0, -1.0, 0.5, 0.5, 2.0, 7.0, -4.0, 0.0], [10, 3, 7, 7, 2, 30, 3, 5]
    report = build_report(rewards[:4], rewards[4:], lengths=[1] * 4, response_lengths=(lengths[:4], lengths[4:]))
    assert report["reward_length_pearson"] == pytest.approx(statistics.correlation(rewards, lengths), abs=1e-12)
    # Spearman's rho with average ranks for ties: Pearson's of the ranks
    ranks = lambda xs: [sum(y < x for y in xs) + (sum(y == x for y in xs) + 1) / 2 for x in xs]  # noqa: E731
    expected = statistics.correlation(ranks(rewards), ranks(lengths))
    assert report["reward_length_spearman"] == pytest.approx(expected, abs=1e-12)


def test_accuracy_when_the_chosen_response_is_shorter_or_longer():
    groups = {g["name"]: g for g in length_report()["by_length_order"]}
    assert list(groups) == ["chosen shorter", "same length", "chosen longer"]
    assert (groups["chosen shorter"]["num_pairs"], groups["chosen shorter"]["accuracy"]) == (1, 0.0)
    assert groups["chosen shorter"]["margin"] == -1.0
    assert (groups["same length"]["num_pairs"], groups["same length"]["accuracy"]) == (1, 0.0)  # a tie is wrong
    assert (groups["chosen longer"]["num_pairs"], groups["chosen longer"]["accuracy"]) == (1, 1.0)
    assert groups["chosen longer"]["margin"] == 2.0


def test_length_bias_of_constant_inputs_is_none_and_empty_groups_are_listed():
    report = build_report([1.0, 2.0], [0.0, 0.0], lengths=[5, 5], response_lengths=([3, 3], [3, 3]))
    assert [report[f"{x}_length_{k}"] for x in ("reward", "margin") for k in ("pearson", "spearman")] == [None] * 4
    assert [(g["num_pairs"], g["accuracy"], g["margin"]) for g in report["by_length_order"]] == [
        (0, None, None),
        (2, 1.0, 1.5),
        (0, None, None),
    ]
    json.dumps(report, allow_nan=False)  # what write_json does: no NaN in the file
    assert "same length" in format_report(report) and "pearson n/a" in format_report(report)


def test_length_bias_is_in_the_printed_summary():
    text = format_report(length_report())
    assert f"reward vs length: pearson {19 / math.sqrt(17 * 41):.4f}" in text
    assert "chosen shorter  n=1     accuracy 0.0000  margin -1.0000" in text


def test_response_lengths_of_another_size_are_an_error():
    with pytest.raises(ValueError, match="same non-zero number"):
        build_report([1.0, 2.0], [0.0, 0.0], lengths=[3, 4], response_lengths=([1, 2], [3]))


def test_length_penalty_is_the_formula():
    rewards, lengths = torch.tensor([1.0, 0.0, 0.0, 2.0]), torch.tensor([3.0, 1.0, 1.0, 5.0])
    # centred lengths are twice the centred rewards: cov = 2 var(r), var(len) = 4 var(r), so cov^2 / var = var(r)
    assert length_penalty(rewards, lengths, 0.5).item() == pytest.approx(0.5 * 0.6875, rel=1e-6)
    r, n = torch.tensor([0.3, -1.2, 2.0, 0.7, 0.1, -0.4]), torch.tensor([12.0, 4.0, 30.0, 7.0, 7.0, 2.0])
    corr = torch.corrcoef(torch.stack([r, n]))[0, 1]
    assert length_penalty(r, n, 2.0).item() == pytest.approx((2.0 * r.var(correction=0) * corr**2).item(), rel=1e-5)
    assert length_penalty(r, torch.full((6,), 9.0), 2.0).item() == 0.0  # equal lengths: nothing to penalise


def test_length_penalty_gradient_moves_rewards_along_the_lengths_only():
    rewards = torch.tensor([0.3, -1.2, 2.0, 0.7, 0.1, -0.4], dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([12.0, 4.0, 30.0, 7.0, 7.0, 2.0], dtype=torch.float64)
    length_penalty(rewards, lengths, 1.0).backward()
    centred = lengths - lengths.mean()
    covariance = ((rewards.detach() - rewards.detach().mean()) * centred).mean()
    expected = 2 * covariance * centred / (len(lengths) * (centred.pow(2).mean() + 1e-6))
    assert torch.allclose(rewards.grad, expected, rtol=1e-9, atol=0)
    # a step down the gradient lowers |corr(r, len)| and leaves the part of r that length does not explain
    stepped = rewards.detach() - 0.5 * rewards.grad
    corr = lambda r: torch.corrcoef(torch.stack([r, lengths]))[0, 1].abs().item()  # noqa: E731
    assert corr(stepped) < corr(rewards.detach())
    residual = lambda r: r - r.mean() - ((r - r.mean()) @ centred) / (centred @ centred) * centred  # noqa: E731
    assert torch.allclose(residual(stepped), residual(rewards.detach()), atol=1e-12)
