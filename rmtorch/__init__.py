"""rmtorch: train and serve reward models for RLHF in plain PyTorch.

The names below are imported on first use, so `import rmtorch` stays cheap (no torch or transformers import).
"""

__version__ = "0.2.0"

_API = {
    "RewardScorer": "rmtorch.score",
    "ScoreDetails": "rmtorch.score",
    "load_reward_model": "rmtorch.loading",
    "compute_rewards": "rmtorch.model",
    "RewardModel": "rmtorch.model",
    "read_rows": "rmtorch.files",
    "load_pairs": "rmtorch.files",
    "tokenize_pairs": "rmtorch.pairs",
    "tokenize_response": "rmtorch.pairs",
    "pairwise_loss": "rmtorch.loss",
    "build_report": "rmtorch.metrics",
    "RewardNormalizer": "rmtorch.normalize",
    "RunningMoments": "rmtorch.normalize",
    "group_advantages": "rmtorch.normalize",
    "thinking_quality": "rmtorch.quality",
    "ThinkingWeights": "rmtorch.quality",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'rmtorch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
