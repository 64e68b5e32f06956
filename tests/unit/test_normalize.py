"""rmtorch.normalize: GRPO group advantages against TRL's formula, running moments against whole-tensor
statistics, the normalizer against its formula, and its saved state."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from rmtorch.normalize import REWARD_STATS_FILE, RewardNormalizer, RunningMoments, group_advantages, normalize_rewards


@pytest.mark.parametrize(
    "scale,expected",
    [
        ("group", [0.707057, -0.707057, 0.70709, -0.70709]),
        ("batch", [0.258192, -0.258192, 0.774577, -0.774577]),
        ("none", [1.0, -1.0, 3.0, -3.0]),
    ],
)
def test_group_advantages_spec_numbers(scale, expected):
    advantages = group_advantages(torch.tensor([3.0, 1.0, 10.0, 4.0]), group_size=2, scale=scale)
    torch.testing.assert_close(advantages, torch.tensor(expected), rtol=0, atol=1e-6)


def test_group_advantages_formula_with_bessel_std_and_eps():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    groups = rewards.view(2, 3)
    expected = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 3), expected.flatten())


def test_scale_bools_follow_grpo_config():
    rewards = torch.tensor([3.0, 1.0, 10.0, 4.0])
    assert torch.equal(group_advantages(rewards, 2, True), group_advantages(rewards, 2, "group"))
    assert torch.equal(group_advantages(rewards, 2, False), group_advantages(rewards, 2, "none"))


def test_missing_rewards_get_zero_advantage_and_leave_the_baseline():
    rewards = torch.tensor([math.nan, 1.0, 3.0, math.nan, math.nan, math.nan])
    advantages = group_advantages(rewards, group_size=3, scale="group")
    expected = torch.tensor([0.0, -1.0, 1.0, 0.0, 0.0, 0.0]) / (math.sqrt(2.0) + 1e-4)
    torch.testing.assert_close(advantages, expected)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: group_advantages(torch.ones(5), group_size=2), "groups of group_size=2"),
        (lambda: group_advantages(torch.ones(2, 2), group_size=2), "1-D"),
        (lambda: group_advantages(torch.ones(4), group_size=2, scale="global"), "scale must be one of"),
    ],
)
def test_bad_arguments_raise_sentences(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_caller_rewards_are_not_mutated():
    rewards = torch.tensor([1.0, math.nan, 2.0, 0.0])
    before = rewards.clone()
    group_advantages(rewards, 2)
    torch.testing.assert_close(rewards, before, rtol=0, atol=0, equal_nan=True)


def whole_moments(values: torch.Tensor) -> tuple[int, float, float]:
    values = values.double().flatten()
    values = values[~torch.isnan(values)]
    return values.numel(), values.mean().item(), values.std().item()


def assert_moments_equal(moments: RunningMoments, values: torch.Tensor):
    count, mean, std = whole_moments(values)
    assert moments.count == count
    assert moments.mean == pytest.approx(mean, rel=1e-12, abs=1e-12)
    assert moments.std == pytest.approx(std, rel=1e-12)


@pytest.mark.parametrize("split_sizes", [[100], [1] * 100, [37, 0, 50, 13], [99, 1], [2, 98]])
def test_merged_chunks_equal_whole_tensor(split_sizes):
    values = torch.randn(100, generator=torch.Generator().manual_seed(0)) * 3 + 7
    merged = RunningMoments()
    for chunk in values.split(split_sizes):
        merged.merge(RunningMoments.from_values(chunk))
    assert_moments_equal(merged, values)


def test_update_batch_by_batch_equals_whole_tensor():
    values = (
        torch.randn(4, 16, generator=torch.Generator().manual_seed(1)) * 100 + 1e4
    )  # a large offset breaks naive sum-of-squares
    moments = RunningMoments()
    for batch in values:
        moments.update(batch)
    assert_moments_equal(moments, values)


def test_nan_rewards_are_skipped_and_inf_is_refused():
    moments = RunningMoments().update(torch.tensor([1.0, math.nan, 3.0]))
    assert (moments.count, moments.mean, moments.std) == (2, 2.0, math.sqrt(2.0))
    with pytest.raises(ValueError, match="inf"):
        moments.update(torch.tensor([1.0, math.inf]))


def test_std_is_zero_until_two_values():
    moments = RunningMoments()
    assert (moments.count, moments.mean, moments.std) == (0, 0.0, 0.0)
    moments.update(torch.tensor([5.0]))
    assert (moments.count, moments.mean, moments.std) == (1, 5.0, 0.0)


class ThreadAccelerator:
    """Stands in for one process of an Accelerate run: `gather` concatenates every rank's tensor (a collective)."""

    def __init__(self, rank: int, slots: list, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.device = rank, len(slots), torch.device("cpu")
        self.slots, self.barrier = slots, barrier

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[self.process_index] = tensor
        self.barrier.wait()
        gathered = torch.cat(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before all have read it
        return gathered


def test_update_across_processes_equals_whole_tensor_on_every_rank():
    num_processes, num_steps = 3, 4
    values = torch.randn(num_steps, num_processes, 5, generator=torch.Generator().manual_seed(2)) * 2 - 1
    values[1, 2] = math.nan  # a rank whose whole batch is missing still takes part in the gather
    slots, barrier = [None] * num_processes, threading.Barrier(num_processes)
    per_rank = [RunningMoments() for _ in range(num_processes)]

    def run_rank(rank):
        accelerator = ThreadAccelerator(rank, slots, barrier)
        for step in range(num_steps):
            per_rank[rank].update(values[step, rank], accelerator)

    threads = [threading.Thread(target=run_rank, args=(rank,)) for rank in range(num_processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    for moments in per_rank:
        assert_moments_equal(moments, values)
        assert moments.state_dict() == per_rank[0].state_dict()


def test_running_moments_save_load_round_trip_is_exact(tmp_path):
    moments = RunningMoments().update(torch.randn(33, generator=torch.Generator().manual_seed(3)))
    file = moments.save(tmp_path / "model")
    assert file == tmp_path / "model" / REWARD_STATS_FILE
    loaded = RunningMoments.load(tmp_path / "model")
    assert loaded.state_dict() == moments.state_dict()
    assert json.loads(file.read_text())["std"] == moments.std  # readable by people, ignored on load


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not valid JSON"),
        ('{"count": 3, "mean": 1.0}', "lack \\['m2'\\]"),
        ('{"count": -1, "mean": 1.0, "m2": 0.0}', "invalid"),
        ('{"count": 2, "mean": "x", "m2": 0.0}', "invalid"),
    ],
)
def test_bad_stats_file_names_the_file(tmp_path, content, message):
    file = tmp_path / REWARD_STATS_FILE
    file.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        RunningMoments.load(tmp_path)
    if "JSON" not in message:
        assert str(file) in str(error.value)


def test_missing_stats_file_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="save them"):
        RewardNormalizer.load(tmp_path)


def test_normalizer_z_scores_with_running_statistics():
    batches = torch.randn(3, 8, generator=torch.Generator().manual_seed(4)) * 5 + 2
    normalizer = RewardNormalizer()
    for i, batch in enumerate(batches):
        normalized = normalizer(batch)
        count, mean, std = whole_moments(batches[: i + 1])
        torch.testing.assert_close(normalized, ((batch.double() - mean) / std).float())


def test_constant_batch_does_not_blow_up():
    normalizer = RewardNormalizer(std_floor=1e-2)
    assert torch.equal(normalizer(torch.full((4,), 3.0)), torch.zeros(4))
    uncentered = RewardNormalizer(center=False, std_floor=1e-2)
    assert torch.equal(uncentered(torch.full((4,), 3.0)), torch.full((4,), 300.0))


def test_clip_bounds_normalized_rewards():
    normalizer = RewardNormalizer(clip=1.0)
    normalized = normalizer(torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0]))
    assert normalized.max().item() == 1.0 and normalized.min().item() > -1.0


def test_center_only_subtracts_the_running_mean():
    normalizer = RewardNormalizer(scale=False)
    assert torch.equal(normalizer(torch.tensor([1.0, 2.0, 6.0])), torch.tensor([-2.0, -1.0, 3.0]))


def test_update_false_leaves_statistics_and_input_alone():
    normalizer = RewardNormalizer()
    normalizer(torch.tensor([1.0, 3.0]))
    state = normalizer.state_dict()
    rewards = torch.tensor([5.0, 7.0])
    normalized = normalizer(rewards, update=False)
    assert normalizer.state_dict() == state
    assert torch.equal(rewards, torch.tensor([5.0, 7.0]))
    torch.testing.assert_close(normalized, (rewards - 2.0) / math.sqrt(2.0))


def test_normalize_rewards_returns_a_new_tensor_when_it_changes_nothing():
    rewards = torch.tensor([1.0, 2.0])
    out = normalize_rewards(rewards, 0.0, 1.0, center=False, scale=False)
    assert out is not rewards and torch.equal(out, rewards)


def test_normalizer_without_statistics_refuses():
    with pytest.raises(ValueError, match="no statistics yet"):
        RewardNormalizer()(torch.tensor([1.0]), update=False)


def test_normalizer_save_load_gives_identical_outputs(tmp_path):
    normalizer = RewardNormalizer(center=True, scale=True, std_floor=1e-3, clip=2.5)
    normalizer(torch.randn(16, generator=torch.Generator().manual_seed(5)))
    normalizer.save(tmp_path)
    loaded = RewardNormalizer.load(tmp_path / REWARD_STATS_FILE)
    assert loaded.state_dict() == normalizer.state_dict()
    probe = torch.linspace(-5, 5, 11)
    assert torch.equal(loaded(probe, update=False), normalizer(probe, update=False))


def test_json_path_is_the_file_itself(tmp_path):
    file = RunningMoments().update(torch.tensor([1.0, 2.0])).save(tmp_path / "stats" / "rewards.json")
    assert file == tmp_path / "stats" / "rewards.json" and file.is_file()
    assert RunningMoments.load(file).count == 2


def test_normalizer_refuses_a_moments_only_file(tmp_path):
    RunningMoments().update(torch.tensor([1.0, 2.0])).save(tmp_path)
    with pytest.raises(ValueError, match="lack"):
        RewardNormalizer.load(tmp_path)


@pytest.mark.parametrize("kwargs,message", [(dict(std_floor=0.0), "std_floor"), (dict(clip=-1.0), "clip")])
def test_normalizer_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardNormalizer(**kwargs)
