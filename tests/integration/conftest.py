"""What the multi-process tests share (test_distributed.py, test_fsdp.py, test_deepspeed.py): several runs in one
launch, the objectives' data and 1-process references, and the check that a 2-process run equals its reference."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import (
    PAIR_WORDS,
    assert_same_weights,
    launch_options,
    launch_runs,
    read_jsonl,
    train_in_process,
    write_jsonl,
)
from tests.integration.test_train_ratings import rating_rows
from tests.integration.test_train_steps import step_rows

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


# train.py's flags and the evaluation keys of each objective beyond pairs.
OBJECTIVES = {
    "steps": (("--objective", "steps", "--step_separator", "."), ("step_accuracy", "first_error_accuracy")),
    "groups": (("--loss", "listwise"), ("accuracy", "kendall_tau")),
    "ratings": (("--objective", "regression", "--attributes", "helpfulness,verbosity"), ("rmse_helpfulness", "rmse")),
}
OBJECTIVE_ROWS = {"steps": step_rows, "groups": group_rows, "ratings": rating_rows}


def objective_data(root: Path, name: str, model_dir: Path) -> tuple[Path, Path]:
    """launch_data's layout for objective `name`: 12 training rows, 7 held out."""
    write_jsonl(root / "train.jsonl", OBJECTIVE_ROWS[name](12, seed=0))
    write_jsonl(root / "eval.jsonl", OBJECTIVE_ROWS[name](7, seed=1))
    return root, model_dir


def objective_options(data: tuple[Path, Path], output_dir: Path, name: str, batch_size: int) -> list[str]:
    return launch_options(data, output_dir, batch_size, *OBJECTIVE_STEPS, *OBJECTIVES[name][0])


@pytest.fixture(scope="session")
def objective_references(tmp_path_factory, tiny_model_dir):
    """{objective: (data, the 1-process run of its options at batch 4)}: each reference trained once a session."""
    from accelerate.state import AcceleratorState

    references = {}
    for name in OBJECTIVES:
        data = objective_data(tmp_path_factory.mktemp(f"objective_{name}"), name, tiny_model_dir)
        one = data[0] / "one_process"
        train_in_process(objective_options(data, one, name, 4))
        AcceleratorState._reset_state(reset_partial_state=True)  # each run builds its own Accelerator
        references[name] = data, one
    return references


def launch_together(config: str, engine: str, root: Path, runs: dict[str, Callable[[Path], list[str]]]):
    """The runs ({name: output directory -> train.py options}) under `config` in one launch of 2 processes, one after
    the other (tests/integration/launch_runs.py), each in root/name; each must say it ran under `engine` (a later run
    of a process once fell back to plain DDP). Returns ({name: output directory}, what the launch printed)."""
    outputs = {name: root / name for name in runs}
    result = launch_runs(config, [make(outputs[name]) for name, make in runs.items()], root / "runs.json")
    printed = result.stdout + result.stderr
    assert printed.count(f", {engine}: 2 process(es) x 2 pairs x 2 accumulation") == len(runs), printed[-3000:]
    return outputs, result


def objective_runs(objective_references) -> dict[str, Callable[[Path], list[str]]]:
    """For launch_together: each objective's run at half its reference's batch, for 2 processes."""
    return {
        name: lambda output_dir, name=name: objective_options(objective_references[name][0], output_dir, name, 2)
        for name in OBJECTIVES
    }


def assert_objective_launch(objective: str, output_dir: Path, objective_references) -> None:
    """`objective` trained in 2 processes of half the batch (in `output_dir`) equals its 1-process run: the same
    weights, metrics lines and evaluation, every held-out row counted once."""
    data, one = objective_references[objective]
    flags, eval_keys = OBJECTIVES[objective]
    assert_same_weights(one, output_dir, atol=1e-5)
    assert_same_objective_run(one, output_dir)
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert set(eval_keys) <= results.keys()
    held_out = read_jsonl(data[0] / "eval.jsonl")
    if objective == "steps":  # every held-out step once
        assert results["num_steps"] == sum(len(row["labels"]) for row in held_out)
    elif objective == "groups":  # every held-out group once, each with all its ordered pairs
        assert results["num_groups"] == len(held_out)
        assert results["num_pairs"] == sum(len(row["scores"]) * (len(row["scores"]) - 1) // 2 for row in held_out)
    else:
        assert results["num_rows"] == len(held_out)


def assert_same_numbers(one: dict, two: dict, where) -> None:
    """Every number of `one` is in `two` within rel 1e-5 / abs 1e-5 (NaN equals NaN); wall-clock times left out."""
    for key, value in one.items():
        if key not in RUN_TIMING_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
            assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-5, nan_ok=True), (where, key)


def assert_same_objective_run(one: Path, two: Path) -> None:
    """assert_same_run for any objective: the same metrics lines (the same keys, every number alike) and the same
    final evaluation, whatever the objective's metric names."""
    lines_one, lines_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [line["step"] for line in lines_two] == [line["step"] for line in lines_one] == [1, 2, 2, 3, 4]
    for line_one, line_two in zip(lines_one, lines_two):
        assert line_two.keys() == line_one.keys(), line_one["step"]
        assert_same_numbers(line_one, line_two, line_one["step"])
    results_one, results_two = (json.loads((d / "eval_results.json").read_text()) for d in (one, two))
    assert results_two.keys() == results_one.keys()
    assert_same_numbers(results_one, results_two, "eval_results.json")
    assert results_two["data"] == results_one["data"]
