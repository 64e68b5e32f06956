"""Pairwise (Bradley-Terry) loss and preference metrics; pure functions on reward tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_pair_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None, center_coeff: float = 0.0) -> torch.Tensor:
    """(B,) loss of each pair: -logsigmoid(r_c - r_r - margin) + c * (r_c + r_r)^2."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coeff:
        loss = loss + center_coeff * (r_chosen + r_rejected) ** 2
    return loss


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None, center_coeff: float = 0.0) -> torch.Tensor:
    """-logsigmoid(r_c - r_r - margin).mean() + c * mean((r_c + r_r)^2), as TRL's RewardTrainer (spec §4.1).

    The two means are taken separately, in TRL's order, so the result matches it to the last bit.
    """
    loss = per_pair_loss(r_chosen, r_rejected, margin).mean()
    if center_coeff:
        loss = loss + center_coeff * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


def _at_least_fp32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Upcast bf16/fp16 rewards for statistics; float64 stays float64."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return tuple(t.to(dtype) for t in tensors)


@torch.no_grad()
def pair_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy (strict >, ties are wrong as in TRL), mean margin r_c - r_r, and reward statistics over all 2B rewards."""
    r_chosen, r_rejected = _at_least_fp32(r_chosen, r_rejected)
    rewards = torch.cat([r_chosen, r_rejected])
    return {
        "accuracy": (r_chosen > r_rejected).double().mean().item(),
        "margin": (r_chosen - r_rejected).mean().item(),
        "mean_reward": rewards.mean().item(),
        "min_reward": rewards.min().item(),
        "max_reward": rewards.max().item(),
    }


@torch.no_grad()
def eval_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None, center_coeff: float = 0.0) -> dict[str, float]:
    """Metrics over a whole eval set, every pair weighted equally (TRL averages batch averages: spec P6)."""
    r_chosen, r_rejected = _at_least_fp32(r_chosen, r_rejected)
    metrics = pair_metrics(r_chosen, r_rejected)
    metrics["loss"] = per_pair_loss(r_chosen, r_rejected, margin, center_coeff).mean().item()
    metrics["ties"] = int((r_chosen == r_rejected).sum().item())
    metrics["num_pairs"] = int(r_chosen.numel())
    return metrics
