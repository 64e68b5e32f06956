"""The pairwise (Bradley-Terry) loss; pure functions on reward tensors."""

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
