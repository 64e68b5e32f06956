"""The pairwise (Bradley-Terry) loss and the length penalty; pure functions on reward tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_pair_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None, center_coeff: float = 0.0
) -> torch.Tensor:
    """(B,) loss of each pair: -logsigmoid(r_c - r_r - margin) + c * (r_c + r_r)^2."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coeff:
        loss = loss + center_coeff * (r_chosen + r_rejected) ** 2
    return loss


def pairwise_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None, center_coeff: float = 0.0
) -> torch.Tensor:
    """-logsigmoid(r_c - r_r - margin).mean() + c * mean((r_c + r_r)^2), as TRL's RewardTrainer.

    The two means are taken separately, in TRL's order, so the result matches it to the last bit.
    """
    loss = per_pair_loss(r_chosen, r_rejected, margin).mean()
    if center_coeff:
        loss = loss + center_coeff * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


def length_penalty(rewards: torch.Tensor, lengths: torch.Tensor, coeff: float, eps: float = 1e-6) -> torch.Tensor:
    """coeff * cov(r, len)^2 / (var(len) + eps) over a batch's responses: the part of the rewards' variance that
    length explains linearly, var(r) * corr(r, len)^2, times coeff (1/n moments).

    rewards and lengths are (2B,), every chosen and rejected response of the batch, lengths in tokens of the response
    alone (the prompt not counted). Its gradient, 2 * coeff * cov * (len_i - mean(len)) / (n * var(len)), moves
    each reward along the batch's centred lengths only: it removes the rewards' linear trend in length and leaves the
    rest of their spread alone. The simple alternative to ODIN's separate length head (docs/design.md).
    """
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))  # bf16 up to fp32; fp64 stays
    centred_lengths = lengths.to(rewards.dtype) - lengths.to(rewards.dtype).mean()
    covariance = ((rewards - rewards.mean()) * centred_lengths).mean()
    return coeff * covariance**2 / (centred_lengths.pow(2).mean() + eps)
