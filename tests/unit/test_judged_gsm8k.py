"""The ties-and-ratings comparison's labels (bench/judged_gsm8k_data.py: a base answer is right when its last
number is the gold answer) and its measures (bench/judged_gsm8k_eval.py)."""

from __future__ import annotations

import pytest
import torch

from bench.judged_gsm8k_data import base_is_right, last_number
from bench.judged_gsm8k_eval import judged_metrics


def test_a_base_answer_is_judged_by_its_last_number():
    assert last_number("Step 1: 3 + 4 = 7 eggs.\nAnswer: she makes $1,018.50 a day.") == 1018.5
    assert last_number("no number here") is None
    row = {"gold_answer": "540", "base_model_response": "180 meters/day * 3 days = 540 meters\n\nAnswer: 540 meters"}
    assert base_is_right(row)
    assert not base_is_right({**row, "base_model_response": "So 3 sprints of 60 meters is 180."})
    assert not base_is_right({**row, "base_model_response": "I cannot tell."})


def test_judged_metrics_by_hand():
    rows = [
        {"r1_right": True, "base_right": False},  # untied, R1's answer right
        {"r1_right": True, "base_right": False},
        {"r1_right": False, "base_right": True},  # untied, the base answer right
        {"r1_right": True, "base_right": True},  # tied
        {"r1_right": False, "base_right": False},  # tied (both wrong)
    ]
    r1 = torch.tensor([2.0, 0.0, 3.0, 1.0, 0.5])
    base = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.5])
    spread = torch.cat([r1, base]).std().item()
    got = judged_metrics(rows, r1, base)
    assert got["untied_pairs"] == 3 and got["tied_pairs"] == 2 and got["pairs_base_right"] == 1
    assert got["untied_accuracy"] == pytest.approx(1 / 3)  # only the first: the third rewards the wrong R1 answer
    assert got["accuracy_when_r1_right"] == pytest.approx(0.5)
    assert got["accuracy_when_base_right"] == pytest.approx(0.0)
    assert got["tied_r1_preferred"] == pytest.approx(0.5)
    assert got["tied_mean_gap"] == pytest.approx(1.0 / spread)
    assert got["untied_mean_gap"] == pytest.approx((1 + 1 + 2) / 3 / spread)
