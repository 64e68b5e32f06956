"""Reward normalization for RL: GRPO group advantages (TRL's formula), running statistics and a normalizer.

- `group_advantages`: the advantages TRL 1.16's GRPOTrainer computes from one reward per completion, NaN (a
  missing reward) handling included.
- `RunningMoments`: count, mean and M2 (Welford), mergeable across chunks and processes (Chan et al.).
- `normalize_rewards` / `RewardNormalizer`: centering, z-scores with a floor on std, clipping, using running
  statistics that are saved next to the model as `reward_stats.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from rmtorch.files import write_json

REWARD_STATS_FILE = "reward_stats.json"
SCALES = ("group", "batch", "none")


def _nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs; NaN where fewer than 2 values (TRL's `nanstd`, op for op)."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(values), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    std = torch.sqrt(variance * correction)
    return std.squeeze() if dim is None else std.squeeze(dim)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str | bool = "group", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO advantages of one reward per completion, as TRL 1.16's `GRPOTrainer` computes them.

    Args:
        rewards: (N,) rewards of the whole generation batch (gathered across processes), the `group_size`
            completions of each prompt adjacent. NaN marks a missing (`None`) reward.
        group_size: completions per prompt (`num_generations`).
        scale: "group" divides by each group's std, "batch" by the std of all N rewards, "none" only centers.
            True/False mean "group"/"none", as in `GRPOConfig.scale_rewards`.
        eps: added to the std (not the variance) before dividing.

    Returns:
        (N,) `reward - group mean`, divided by `std + eps` unless scale is "none". Means and stds ignore NaN and the
        std is Bessel-corrected, so a group with a single valid reward has a NaN std; every NaN advantage
        (missing reward, or NaN std) becomes 0.
    """
    scale = {True: "group", False: "none"}.get(scale, scale)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES} (or True/False), got {scale!r}.")
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (one reward per completion), got shape {tuple(rewards.shape)}.")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"{rewards.numel()} rewards cannot be split into groups of group_size={group_size}: pass the whole "
            "generation batch, with the completions of each prompt adjacent."
        )
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    group_mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    advantages = rewards - group_mean
    if scale == "group":
        std = (
            _nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
            if group_size > 1
            else 0.0
        )
        advantages = advantages / (std + eps)
    elif scale == "batch":
        std = _nanstd(rewards) if rewards.numel() > 1 else 0.0
        advantages = advantages / (std + eps)
    return torch.nan_to_num(advantages, nan=0.0)  # also maps +-inf to the dtype's extremes, as TRL does


def _stats_file(path: str | Path) -> Path:
    # A .json path is the file itself; anything else is a directory (the model's) that holds reward_stats.json.
    path = Path(path)
    return path if path.suffix == ".json" else path / REWARD_STATS_FILE


def _write_json(state: dict, path: str | Path) -> Path:
    path = _stats_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, state)  # readers never see a half-written file


def _read_json(path: str | Path) -> tuple[dict, Path]:
    path = _stats_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"No reward statistics at {path}: save them with .save(model_dir) after training.")
    try:
        return json.loads(path.read_text()), path
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); it should hold reward statistics written by rmtorch."
        ) from error


def _load_json_state(cls, path: str | Path):
    """A fresh `cls()` with the state `save` wrote to `path` (errors name the file)."""
    state, file = _read_json(path)
    obj = cls()
    obj.load_state_dict(state, source=str(file))
    return obj


class RunningMoments:
    """Count, mean and M2 (sum of squared deviations) of every reward seen, updated batch by batch.

    Batches are merged with Chan et al.'s parallel formula, so the result equals the statistics of all values
    at once, whatever the split: over chunks (`merge`) or over processes (`update(values, accelerator)`).
    `std` is Bessel-corrected (sqrt(M2 / (count - 1))), as TRL's `nanstd`; it is 0 until two values are seen.
    NaN values (missing rewards) are skipped. State is three numbers: `state_dict()`, `save()` write JSON.
    """

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @classmethod
    def from_values(cls, values: torch.Tensor) -> RunningMoments:
        """The moments of one tensor (all elements, NaN skipped), computed in float64."""
        values = values.detach().flatten().double()
        values = values[~torch.isnan(values)]
        if torch.isinf(values).any():
            raise ValueError(
                "Rewards contain inf; running statistics would stay inf forever. Clip or drop them first."
            )
        moments = cls()
        if values.numel():
            mean = values.mean()
            moments.count, moments.mean, moments.m2 = values.numel(), mean.item(), ((values - mean) ** 2).sum().item()
        return moments

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Fold `other`'s values into this one (in place; `other` is unchanged). Returns self."""
        if other.count == 0:
            return self
        count = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / count
        self.m2 += other.m2 + delta**2 * self.count * other.count / count
        self.count = count
        return self

    def update(self, values: torch.Tensor, accelerator=None) -> RunningMoments:
        """Add a batch of rewards. With an Accelerate `accelerator` on several processes every process must call
        this; the batch moments of all processes are gathered and merged in rank order, so every process ends with
        the same global statistics (only the new batch is exchanged, so nothing is counted twice). Returns self."""
        batch = RunningMoments.from_values(values)
        if accelerator is None or accelerator.num_processes == 1:
            return self.merge(batch)
        local = torch.tensor([[batch.count, batch.mean, batch.m2]], dtype=torch.float64, device=accelerator.device)
        for count, mean, m2 in accelerator.gather(local).tolist():  # (num_processes, 3)
            part = RunningMoments()
            part.count, part.mean, part.m2 = round(count), mean, m2
            self.merge(part)
        return self

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict, source: str = "state dict") -> None:
        missing = [key for key in ("count", "mean", "m2") if key not in state]
        if missing:
            raise ValueError(f"Reward statistics in {source} lack {missing}; expected count, mean and m2.")
        count, mean, m2 = state["count"], state["mean"], state["m2"]
        finite = all(type(value) in (int, float) and math.isfinite(value) for value in (mean, m2))
        if type(count) is not int or count < 0 or not finite or m2 < 0:
            raise ValueError(f"Reward statistics in {source} are invalid (count={count!r}, mean={mean!r}, m2={m2!r}).")
        self.count, self.mean, self.m2 = count, float(mean), float(m2)

    def save(self, path: str | Path) -> Path:
        """Write JSON to `path` if it ends in .json, else to `path/reward_stats.json`. Returns the file."""
        return _write_json(self.state_dict() | {"std": self.std}, path)

    @classmethod
    def load(cls, path: str | Path) -> RunningMoments:
        """Read statistics written by `save` (a .json file, or a directory holding reward_stats.json)."""
        return _load_json_state(cls, path)

    def __repr__(self) -> str:
        return f"RunningMoments(count={self.count}, mean={self.mean:.6g}, std={self.std:.6g})"


def normalize_rewards(
    rewards: torch.Tensor,
    mean: float,
    std: float,
    center: bool = True,
    scale: bool = True,
    std_floor: float = 1e-4,
    clip: float | None = None,
) -> torch.Tensor:
    """`(rewards - mean) / max(std, std_floor)`, then clamped to [-clip, clip]; a new tensor.

    `center=False` skips the subtraction, `scale=False` the division. The floor keeps a (near-)constant batch
    from dividing by ~0; it is in reward units.
    """
    normalized = rewards - mean if center else rewards
    if scale:
        normalized = normalized / max(std, std_floor)
    if clip is not None:
        normalized = normalized.clamp(-clip, clip)
    return normalized if normalized is not rewards else rewards.clone()


class RewardNormalizer:
    """Running-statistics reward normalization for RL: center, z-score with a std floor, clip.

    `normalizer(rewards)` adds the batch to the running statistics, then normalizes it with them (so the first
    batch is normalized by its own statistics). Save it next to the model (`normalizer.save(model_dir)` writes
    reward_stats.json with the statistics and these settings) and reload with `RewardNormalizer.load(model_dir)`.
    """

    def __init__(self, center: bool = True, scale: bool = True, std_floor: float = 1e-4, clip: float | None = None):
        """center: subtract the running mean. scale: divide by max(running std, std_floor). clip: clamp the result
        to [-clip, clip] (None: no clipping)."""
        if scale and not std_floor > 0:
            raise ValueError(
                f"std_floor must be > 0 when scaling (it stops a constant batch from dividing by 0), got {std_floor}."
            )
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}.")
        self.center, self.scale, self.std_floor, self.clip = center, scale, std_floor, clip
        self.moments = RunningMoments()

    def __call__(self, rewards: torch.Tensor, update: bool = True, accelerator=None) -> torch.Tensor:
        """Normalized rewards, same shape and dtype. With `update`, first add `rewards` to the statistics (across
        processes if `accelerator` is given; see `RunningMoments.update`). NaN rewards stay NaN."""
        if update:
            self.moments.update(rewards, accelerator)
        if self.moments.count == 0:
            raise ValueError(
                "RewardNormalizer has no statistics yet: call it with update=True first, or load reward_stats.json."
            )
        return normalize_rewards(
            rewards, self.moments.mean, self.moments.std, self.center, self.scale, self.std_floor, self.clip
        )

    def state_dict(self) -> dict:
        settings = {"center": self.center, "scale": self.scale, "std_floor": self.std_floor, "clip": self.clip}
        return self.moments.state_dict() | settings

    def load_state_dict(self, state: dict, source: str = "state dict") -> None:
        missing = [key for key in ("center", "scale", "std_floor", "clip") if key not in state]
        if missing:
            raise ValueError(
                f"Reward normalizer settings in {source} lack {missing}; was it written by RunningMoments.save?"
            )
        checked = RewardNormalizer(state["center"], state["scale"], state["std_floor"], state["clip"])
        checked.moments.load_state_dict(state, source)
        self.center, self.scale, self.std_floor, self.clip, self.moments = (
            checked.center,
            checked.scale,
            checked.std_floor,
            checked.clip,
            checked.moments,
        )

    def save(self, path: str | Path) -> Path:
        """Write JSON to `path` if it ends in .json, else to `path/reward_stats.json` (e.g. the model directory).
        Returns the file. In a multi-process run call it on the main process only."""
        return _write_json(self.state_dict() | {"std": self.moments.std}, path)

    @classmethod
    def load(cls, path: str | Path) -> RewardNormalizer:
        """A normalizer with the settings and statistics written by `save` (a .json file, or a directory)."""
        return _load_json_state(cls, path)

    def __repr__(self) -> str:
        return (
            f"RewardNormalizer(center={self.center}, scale={self.scale}, std_floor={self.std_floor}, "
            f"clip={self.clip}, {self.moments})"
        )
