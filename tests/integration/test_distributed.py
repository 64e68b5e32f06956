"""Two processes equal one under DDP: `accelerate launch --config_file configs/ddp.yaml` (the README's command) with
2 CPU processes (gloo) and the same global batch and seed gives the 1-process weights within fp32 tolerance, takes
the same steps, and gathers the eval set without duplicated rows. So do a process reward model (`--objective steps`,
rows of different numbers of steps) and groups of different sizes (`--loss listwise`); the step objective under
FSDP2 too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import (
    PAIR_WORDS,
    assert_same_run,
    assert_same_weights,
    launch,
    launch_options,
    read_jsonl,
    train_in_process,
    write_jsonl,
)
from tests.integration.test_train_steps import step_rows


@pytest.mark.slow
def test_two_ddp_processes_equal_one_with_the_same_global_batch(launch_data, one_process, tmp_path):
    two = tmp_path / "two_processes"
    result = launch("ddp.yaml", launch_options(launch_data, two, 2))
    assert "2 process(es) x 2 pairs x 2 accumulation" in result.stdout + result.stderr
    assert_same_weights(one_process(), two, atol=1e-5)
    assert_same_run(one_process(), two)
    # 8 steps and the evaluation at step 4, one line each: the main process alone writes.
    assert [line["step"] for line in read_jsonl(two / "metrics.jsonl")] == [1, 2, 3, 4, 4, 5, 6, 7, 8]


# ------------------------------------------------------------------------------------ steps and groups objectives

OBJECTIVE_STEPS = ("--max_steps", "4", "--eval_every", "2")  # evaluations at step 2 and at the end
RUN_TIMING_KEYS = {"step_time", "train_wall_s"}  # wall clock: differs between any two runs


def group_rows(count: int, seed: int = 0) -> list[dict]:
    """Groups of 2 to 4 responses with distinct scores (so each group's number of ordered pairs and Plackett-Luce
    stages differs); the best ends in 'good' and the worst in 'bad'."""
    rng = random.Random(seed)
    pick = lambda n: " ".join(rng.choice(PAIR_WORDS) for _ in range(n))  # noqa: E731
    rows = []
    for i in range(count):
        size = 2 + i % 3
        scores = rng.sample(range(1, 10), size)
        best, worst = max(scores), min(scores)
        responses = [f" {pick(1 + j % 3)} {'good' if s == best else 'bad' if s == worst else 'yes'}"
                     for j, s in enumerate(scores)]  # fmt: skip
        rows.append({"prompt": pick(2 + i % 5), "responses": responses, "scores": scores})
    return rows


@pytest.fixture(scope="module")
def objective_data(tmp_path_factory, tiny_model_dir) -> dict[str, tuple[Path, Path]]:
    """launch_data's layout (12 training rows, 7 held out) for step-labelled rows and for groups."""
    data = {}
    for name, rows in (("steps", step_rows), ("groups", group_rows)):
        root = tmp_path_factory.mktemp(f"launch_{name}")
        write_jsonl(root / "train.jsonl", rows(12, seed=0))
        write_jsonl(root / "eval.jsonl", rows(7, seed=1))
        data[name] = (root, tiny_model_dir)
    return data


def assert_same_numbers(one: dict, two: dict, where) -> None:
    """Every number of `one` is in `two` within rel 1e-5 / abs 1e-5 (NaN equals NaN); wall-clock times left out."""
    for key, value in one.items():
        if key not in RUN_TIMING_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
            assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-5, nan_ok=True), (where, key)


def assert_same_objective_run(one: Path, two: Path) -> None:
    """assert_same_run for any objective: the same metrics lines (the same keys, every number alike) and the same
    final evaluation, whatever the objective's metric names."""
    lines_one, lines_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [line["step"] for line in lines_two] == [line["step"] for line in lines_one]
    for line_one, line_two in zip(lines_one, lines_two):
        assert line_two.keys() == line_one.keys(), line_one["step"]
        assert_same_numbers(line_one, line_two, line_one["step"])
    results_one, results_two = (json.loads((d / "eval_results.json").read_text()) for d in (one, two))
    assert results_two.keys() == results_one.keys()
    assert_same_numbers(results_one, results_two, "eval_results.json")
    assert results_two["data"] == results_one["data"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("objective", "flags", "eval_keys"),
    [
        ("steps", ("--objective", "steps", "--step_separator", "."), ("step_accuracy", "first_error_accuracy")),
        ("groups", ("--loss", "listwise"), ("accuracy", "kendall_tau")),
    ],
    ids=["steps", "groups"],
)
def test_steps_and_groups_train_in_two_ddp_processes_as_in_one(objective_data, tmp_path, objective, flags, eval_keys):
    data = objective_data[objective]
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    train_in_process(launch_options(data, one, 4, *OBJECTIVE_STEPS, *flags))
    launch("ddp.yaml", launch_options(data, two, 2, *OBJECTIVE_STEPS, *flags))
    assert_same_weights(one, two, atol=1e-5)
    assert_same_objective_run(one, two)
    assert [line["step"] for line in read_jsonl(two / "metrics.jsonl")] == [1, 2, 2, 3, 4]
    results = json.loads((two / "eval_results.json").read_text())
    assert set(eval_keys) <= results.keys()
    held_out = read_jsonl(data[0] / "eval.jsonl")
    if objective == "steps":  # every held-out step once
        assert results["num_steps"] == sum(len(row["labels"]) for row in held_out)
    else:  # every held-out group once, each with all its ordered pairs
        assert results["num_groups"] == len(held_out)
        assert results["num_pairs"] == sum(len(row["scores"]) * (len(row["scores"]) - 1) // 2 for row in held_out)


@pytest.mark.slow
def test_steps_train_under_fsdp2_as_in_one_process(objective_data, tmp_path):
    """The step objective under FSDP2 (configs/fsdp2_cpu.yaml, 2 processes): each process's share of the steps
    weighs its loss before FSDP averages the gradients, as under DDP."""
    data, flags = objective_data["steps"], ("--objective", "steps", "--step_separator", ".")
    one, two = tmp_path / "one_process", tmp_path / "fsdp"
    train_in_process(launch_options(data, one, 4, *OBJECTIVE_STEPS, *flags))
    launch("fsdp2_cpu.yaml", launch_options(data, two, 2, *OBJECTIVE_STEPS, *flags))
    assert_same_weights(one, two, atol=1e-5)
    assert_same_objective_run(one, two)
