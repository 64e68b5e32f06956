"""The best-of-N comparison's data (bench/prm_gsm8k_data.py: known first errors) and its measures
(bench/prm_best_of_n.py: ties are draws, so a constant reward scores chance)."""

from __future__ import annotations

import random

import pytest
import torch

from bench.prm_best_of_n import best_of_n_accuracy, pairwise_accuracy
from bench.prm_gsm8k_data import NUMBER, corrupt, step_row, variants

TRACE = {
    "id": 7,
    "question": "Tom has 3 boxes of 12 pens. How many pens?",
    "reasoning": "Tom has 3 boxes.\n\nEach box holds 12 pens, so 3 * 12 = 36 pens.\n\nThe total is $36.00.",
}


def test_best_of_n_counts_ties_as_draws():
    rewards = torch.tensor([[2.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    assert best_of_n_accuracy(rewards) == pytest.approx((1 + 0.5 + 0 + 0.25) / 4)
    assert pairwise_accuracy(rewards[:1]) == pytest.approx(1.0)
    assert pairwise_accuracy(rewards[1:2]) == pytest.approx((0.5 + 1 + 1) / 3)


def test_a_corruption_changes_one_number_of_one_step_and_labels_from_it_on():
    rng = random.Random(0)
    steps = TRACE["reasoning"].split("\n\n")
    for _ in range(20):
        step = rng.randrange(len(steps))
        changed = corrupt(steps, step, rng)
        assert [i for i, (a, b) in enumerate(zip(steps, changed)) if a != b] == [step]
        before, after = NUMBER.findall(steps[step]), NUMBER.findall(changed[step])
        assert len(before) == len(after) and sum(a != b for a, b in zip(before, after)) == 1
        assert all(("." in a) == ("." in b) and len(a.partition(".")[2]) == len(b.partition(".")[2])
                   for a, b in zip(before, after))  # fmt: skip
    for steps_, error in variants(TRACE, 3, random.Random(1)):
        assert step_row(TRACE, steps_, error)["labels"] == [i < error for i in range(len(steps_))]
    assert step_row(TRACE, steps, None)["labels"] == [True] * 3
    assert len({error for _, error in variants(TRACE, 3, random.Random(2))}) == 3  # distinct steps while they last
