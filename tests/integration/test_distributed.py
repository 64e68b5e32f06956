"""Two processes equal one: `accelerate launch` with 2 CPU processes (gloo) and the same global batch and seed gives
the 1-process weights within fp32 tolerance, and the eval set is gathered without duplicated rows.

On CPU, Accelerate 1.15 starts several processes through torchrun only with `--multi_gpu` (its `--cpu` launcher
needs mpirun for more than one process), so the test launches with ACCELERATE_USE_CPU=1 and `--multi_gpu`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, free_port, pair_rows, train_argv, write_jsonl

NUM_EVAL_PAIRS = 7  # odd: the processes get different numbers of eval rows, and no row may count twice


def run(command: list[str], **env) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command[:6])} ... failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", pair_rows(12, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", pair_rows(NUM_EVAL_PAIRS, seed=1))
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    common = train_argv(
        tiny_model_dir,
        tmp_path / "train.jsonl",
        one,
        "--max_steps",
        "8",
        "--lr",
        "1e-3",
        "--max_tokens_per_batch",
        "40",
        "--eval_every",
        "4",
        eval_file=tmp_path / "eval.jsonl",
    )  # 12 pairs, global batch 4: 3 steps an epoch, so 8 steps cross two epoch boundaries; eval in several forwards
    run([sys.executable, "train.py", *common, "--batch_size", "4", "--output_dir", str(one)])
    launch = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    result = run([*launch, "train.py", *common, "--batch_size", "2", "--output_dir", str(two)], ACCELERATE_USE_CPU="1")
    assert "2 process(es) x 2 pairs" in result.stdout + result.stderr

    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for name in weights_one:
        torch.testing.assert_close(
            weights_two[name], weights_one[name], rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )

    results_one, results_two = (json.loads((d / "eval_results.json").read_text()) for d in (one, two))
    assert results_one["num_pairs"] == results_two["num_pairs"] == NUM_EVAL_PAIRS
    for key in ("loss", "accuracy", "margin", "mean_reward"):
        assert results_two[key] == pytest.approx(results_one[key], abs=1e-5)

    # One metrics line per step and per eval, written by the main process only; losses and token counts match.
    lines_one, lines_two = (
        [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)
    )
    assert [line["step"] for line in lines_two] == [line["step"] for line in lines_one] == [1, 2, 3, 4, 4, 5, 6, 7, 8]
    for line_one, line_two in zip(lines_one, lines_two):
        if "loss" in line_one:
            assert line_two["tokens"] == line_one["tokens"]
            assert line_two["loss"] == pytest.approx(line_one["loss"], abs=1e-5)
        else:
            assert line_two["eval_num_pairs"] == line_one["eval_num_pairs"] == NUM_EVAL_PAIRS
