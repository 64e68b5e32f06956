"""Group losses and ties: on pairs (and groups of two) every loss is the pairwise loss bit for bit, gradients too;
Plackett-Luce, all-pairs Bradley-Terry and Davidson's tie model against hand computations with numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rmtorch.group_loss import comparisons, davidson_tie, davidson_win, group_batch_loss, pair_batch_loss
from rmtorch.loss import pairwise_loss

B = 6


def pair_rewards(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    chosen, rejected = torch.randn(B, generator=generator) * 3, torch.randn(B, generator=generator) * 3
    margin = torch.rand(B, generator=generator)
    return torch.cat([chosen, rejected]).requires_grad_(), margin


def grads(loss, rewards):
    return torch.autograd.grad(loss, rewards)[0]


@pytest.mark.parametrize("loss", ["all_pairs", "listwise"])
@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [0.0, 0.01])
def test_every_loss_on_a_pair_batch_is_the_pairwise_loss_bit_for_bit(loss, with_margin, center):
    rewards, margin = pair_rewards()
    batch = {"margin": margin} if with_margin else {}
    chosen, rejected = rewards.chunk(2)
    expected = pairwise_loss(chosen, rejected, batch.get("margin"), center)
    value, got_chosen, got_rejected = pair_batch_loss(rewards, batch, loss, center_coeff=center)
    assert torch.equal(value, expected)
    assert torch.equal(grads(value, rewards), grads(expected, rewards))
    assert torch.equal(got_chosen, chosen) and torch.equal(got_rejected, rejected)


@pytest.mark.parametrize("loss", ["all_pairs", "listwise"])
@pytest.mark.parametrize("with_margin", [False, True])
def test_groups_of_two_give_the_pairwise_loss_bit_for_bit(loss, with_margin):
    """A batch of B groups [better, worse] (the group collator's layout: group after group), margins from the score
    difference with --group_margin 1, against pairwise_loss on the same rewards: values and gradients identical."""
    rewards, margin = pair_rewards(seed=1)
    chosen, rejected = rewards.chunk(2)
    grouped = torch.stack([chosen, rejected], dim=1).flatten()  # (2B,): c0, r0, c1, r1, ...
    scores = [[m, 0.0] for m in margin.tolist()] if with_margin else [[1.0, 0.0]] * B
    batch = comparisons(scores)
    value, _, _ = group_batch_loss(grouped, batch, loss, margin_scale=1.0 if with_margin else 0.0)
    expected = pairwise_loss(chosen, rejected, batch["scores"][0::2] if with_margin else None)
    assert torch.equal(batch["scores"][0::2], margin) or not with_margin
    assert torch.equal(value, expected)
    assert torch.equal(grads(value, rewards), grads(expected, rewards))


def test_davidson_with_nu_zero_is_the_bradley_terry_loss_bit_for_bit():
    rewards, margin = pair_rewards(seed=2)
    chosen, rejected = rewards.chunk(2)
    for loss in ("pairwise", "all_pairs"):
        value, _, _ = pair_batch_loss(rewards, {"margin": margin, "tie": torch.zeros(B, dtype=torch.bool)}, loss, 0.0)
        expected = pairwise_loss(chosen, rejected, margin)
        assert torch.equal(value, expected)
        assert torch.equal(grads(value, rewards), grads(expected, rewards))
    batch = comparisons([[2.0, 1.0, 0.0]] * 2)
    group_rewards = torch.randn(6, requires_grad=True)
    with_nu, _, _ = group_batch_loss(group_rewards, batch, "all_pairs", tie_nu=0.0)
    without, _, _ = group_batch_loss(group_rewards, batch, "all_pairs")
    assert torch.equal(with_nu, without)
    assert torch.equal(grads(with_nu, group_rewards), grads(without, group_rewards))


def test_davidson_against_a_hand_computation():
    """r_i = 1.0, r_j = 0.2, nu = 0.5: e^1 = 2.71828, e^0.2 = 1.22140, 0.5 sqrt(e^1.2) = 0.5 e^0.6 = 0.91106, sum
    4.85074; P(i>j) = 2.71828 / 4.85074 = 0.56039, P(tie) = 0.91106 / 4.85074 = 0.18782."""
    e_i, e_j, nu = math.exp(1.0), math.exp(0.2), 0.5
    denominator = e_i + e_j + nu * math.sqrt(e_i * e_j)
    p_win, p_lose, p_tie = e_i / denominator, e_j / denominator, nu * math.sqrt(e_i * e_j) / denominator
    assert p_win == pytest.approx(0.56039, abs=1e-5) and p_tie == pytest.approx(0.18782, abs=1e-5)
    d = torch.tensor([0.8], dtype=torch.float64)
    assert davidson_win(d, nu).item() == pytest.approx(-math.log(p_win), rel=1e-12)
    assert davidson_win(-d, nu).item() == pytest.approx(-math.log(p_lose), rel=1e-12)
    assert davidson_tie(d, nu).item() == pytest.approx(-math.log(p_tie), rel=1e-12)
    assert davidson_tie(-d, nu).item() == pytest.approx(-math.log(p_tie), rel=1e-12)
    total = sum(
        math.exp(-x) for x in (davidson_win(d, nu).item(), davidson_win(-d, nu).item(), davidson_tie(d, nu).item())
    )
    assert total == pytest.approx(1.0, abs=1e-12)


def test_davidson_stays_finite_for_far_apart_rewards():
    d = torch.tensor([-1000.0, -90.0, 0.0, 90.0, 1000.0], requires_grad=True)
    loss = (davidson_win(d, 1.0) + davidson_tie(d, 1.0)).sum()
    assert torch.isfinite(loss) and torch.isfinite(grads(loss, d)).all()


def test_plackett_luce_against_a_hand_computation():
    """Ranks 1, 2, 3 (given out of order): NLL = -log(e^a / (e^a + e^b + e^c)) - log(e^b / (e^b + e^c)); with
    a, b, c = 0.5, 1.0, -0.3: -log(1.64872 / 5.10782) - log(2.71828 / 3.45910) = 1.13078 + 0.24100 = 1.37178."""
    a, b, c = 0.5, 1.0, -0.3
    rewards = torch.tensor([c, a, b], dtype=torch.float64)  # the file's order: worst, best, middle
    batch = comparisons([[-3.0, -1.0, -2.0]])  # ranks negated
    value, _, _ = group_batch_loss(rewards, batch, "listwise")
    expected = -math.log(math.exp(a) / (math.exp(a) + math.exp(b) + math.exp(c))) - math.log(
        math.exp(b) / (math.exp(b) + math.exp(c))
    )
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1.37178, abs=1e-5)


def test_plackett_luce_with_tied_ranks_never_compares_the_tied_responses():
    """Ranks 1, 1, 2: each tied response is a stage against the strictly worse one only."""
    a, b, c = 0.5, 1.0, -0.3
    value, _, _ = group_batch_loss(
        torch.tensor([a, b, c], dtype=torch.float64), comparisons([[-1.0, -1.0, -2.0]]), "listwise"
    )
    expected = -math.log(math.exp(a) / (math.exp(a) + math.exp(c))) - math.log(
        math.exp(b) / (math.exp(b) + math.exp(c))
    )
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_all_pairs_is_the_mean_over_ordered_pairs_with_score_margins_and_each_group_weighs_the_same():
    r = [0.5, 1.0, -0.3, 2.0, 0.1]
    rewards = torch.tensor(r, dtype=torch.float64)
    scores = [[9.0, 7.0, 4.0], [1.0, 3.0]]  # a group of three, then a group of two (second response better)
    value, better, worse = group_batch_loss(rewards, comparisons(scores), "all_pairs", margin_scale=0.5)
    bt = lambda x: -math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    first = (bt(r[0] - r[1] - 1.0) + bt(r[0] - r[2] - 2.5) + bt(r[1] - r[2] - 1.5)) / 3
    second = bt(r[4] - r[3] - 1.0)
    assert value.item() == pytest.approx((first + second) / 2, rel=1e-12)
    assert better.tolist() == [r[0], r[0], r[1], r[4]] and worse.tolist() == [r[1], r[2], r[2], r[3]]


def test_all_pairs_with_a_tie_model_adds_a_tie_term_for_equal_labels():
    r = [0.5, 1.0, -0.3]
    rewards, nu = torch.tensor(r, dtype=torch.float64), 2.0
    value, _, _ = group_batch_loss(rewards, comparisons([[2.0, 2.0, 1.0]]), "all_pairs", tie_nu=nu)
    d = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    terms = [davidson_win(d(r[0] - r[2]), nu), davidson_win(d(r[1] - r[2]), nu), davidson_tie(d(r[0] - r[1]), nu)]
    assert value.item() == pytest.approx(sum(t.item() for t in terms) / 3, rel=1e-12)
    without, _, _ = group_batch_loss(rewards, comparisons([[2.0, 2.0, 1.0]]), "all_pairs")
    assert without.item() == pytest.approx((F.softplus(d(r[2] - r[0])) + F.softplus(d(r[2] - r[1]))).item() / 2)


def test_tied_pairs_in_a_pair_batch_take_the_davidson_tie_term():
    rewards, _ = pair_rewards(seed=3)
    tie = torch.tensor([True, False] * (B // 2))
    value, _, _ = pair_batch_loss(rewards, {"tie": tie}, "pairwise", tie_nu=1.0)
    chosen, rejected = rewards.chunk(2)
    d = chosen - rejected
    expected = torch.where(tie, davidson_tie(d, 1.0), davidson_win(d, 1.0)).mean()
    assert torch.equal(value, expected)


def test_comparisons_index_the_rewards_of_groups_back_to_back():
    batch = comparisons([[3.0, 1.0, 3.0], [0.0, 5.0]])
    assert batch["group_sizes"].tolist() == [3, 2]
    assert list(zip(batch["better"].tolist(), batch["worse"].tolist())) == [(0, 1), (2, 1), (4, 3)]
    assert batch["pair_group"].tolist() == [0, 0, 1]
    assert (batch["tie_a"].tolist(), batch["tie_b"].tolist(), batch["tie_group"].tolist()) == ([0], [2], [0])
    assert batch["stage_winner"].tolist() == [0, 2, 4]
    assert batch["stage_rivals"][batch["stage_mask"]].tolist() == [1, 1, 3]
