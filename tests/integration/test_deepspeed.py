"""DeepSpeed ZeRO-2 and ZeRO-3 through Accelerate, in 2 CPU processes (gloo) launched with
configs/deepspeed_zero2.yaml and deepspeed_zero3.yaml: the final weights (full fine-tune and LoRA) equal a
1-process run with the same global batch (fp32), with the learning rate schedule, gradient accumulation, clipping
and weight decay of the command line, and a checkpoint resumes after a kill -9 to the weights of an uninterrupted
run.

DeepSpeed clips and steps inside its engine, during backward: clip_grad_norm_ only reads back the norm (a float),
and rmtorch's skipping of a non-finite step cannot undo an update the engine already made.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rmtorch.checkpoint import LOOP_STATE_FILE, resolve_checkpoint
from tests.conftest import (
    REPO_ROOT,
    assert_same_weights,
    launch,
    launch_and_kill,
    pair_rows,
    read_jsonl,
    train_argv,
    write_jsonl,
)

pytest.importorskip("deepspeed", reason="pip install deepspeed (CPU works: the tests run it on gloo)")

MAX_STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("deepspeed")
    write_jsonl(root / "train.jsonl", pair_rows(12, seed=0))
    write_jsonl(root / "eval.jsonl", pair_rows(7, seed=1))
    return root, tiny_model_dir


def train_options(data, output_dir, batch_size: int, *extra: str) -> list[str]:
    """Warm-up then linear decay, weight decay on matrices only, 2 micro-batches a step, clipping at 1."""
    root, model_dir = data
    return train_argv(
        model_dir, root / "train.jsonl", output_dir, "--max_steps", str(MAX_STEPS), "--lr", "1e-3",
        "--weight_decay", "0.1", "--warmup_steps", "2", "--batch_size", str(batch_size), "--grad_accum", "2",
        "--max_grad_norm", "1.0", *extra, eval_file=root / "eval.jsonl",
    )  # fmt: skip


def one_process_run(data, output_dir, *extra: str):
    command = [sys.executable, "train.py", *train_options(data, output_dir, 4, *extra)]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True)
    return output_dir


@pytest.fixture(scope="module")
def one_process(data):
    return one_process_run(data, data[0] / "one_process")


@pytest.fixture(scope="module")
def zero2(data):
    output_dir = data[0] / "zero2"
    result = launch("deepspeed_zero2.yaml", train_options(data, output_dir, 2))
    assert "2 process(es) x 2 pairs x 2 accumulation" in result.stdout + result.stderr
    return output_dir


def assert_same_run(one, two) -> None:
    """Same learning rates and losses every step, and the same eval numbers."""
    lines_one, lines_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [line["lr"] for line in lines_two] == [line["lr"] for line in lines_one]
    assert [line["loss"] for line in lines_two] == pytest.approx([line["loss"] for line in lines_one], abs=1e-5)
    results_one, results_two = (json.loads((d / "eval_results.json").read_text()) for d in (one, two))
    for key in ("loss", "accuracy", "mean_reward"):
        assert results_two[key] == pytest.approx(results_one[key], abs=1e-5)


@pytest.mark.slow
def test_zero2_two_processes_equal_one_process(one_process, zero2):
    assert_same_weights(one_process, zero2, atol=1e-5)
    assert_same_run(one_process, zero2)
    # The norm DeepSpeed reads back (before clipping) is the one a single process computes.
    norms = [[line["grad_norm"] for line in read_jsonl(d / "metrics.jsonl")] for d in (one_process, zero2)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)


@pytest.mark.slow
def test_zero3_two_processes_equal_one_process(data, one_process):
    """ZeRO-3 also shards the weights: the model is built by all processes together, and the final save gathers it."""
    zero3 = data[0] / "zero3"
    launch("deepspeed_zero3.yaml", train_options(data, zero3, 2))
    assert_same_weights(one_process, zero3, atol=1e-5)
    assert_same_run(one_process, zero3)
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(zero3)  # a plain model, not DeepSpeed's files


@pytest.mark.slow
def test_lora_under_zero3_equals_one_process(data):
    """ZeRO-3 shards the adapters too; PEFT gathers them to save the adapter."""
    one = one_process_run(data, data[0] / "one_process_lora", "--lora")
    two = data[0] / "zero3_lora"
    launch("deepspeed_zero3.yaml", train_options(data, two, 2, "--lora"))
    adapter_one, adapter_two = (load_file(d / "adapter_model.safetensors") for d in (one, two))
    assert adapter_one.keys() == adapter_two.keys()
    for name in adapter_one:
        torch.testing.assert_close(adapter_two[name], adapter_one[name], rtol=0, atol=1e-5)
    assert_same_run(one, two)


@pytest.mark.slow
def test_zero2_kill_9_then_resume_equals_an_uninterrupted_run(data, zero2):
    """The checkpoint holds DeepSpeed's model and optimizer shards and the learning rate schedule."""
    output_dir = data[0] / "zero2_killed"
    argv = train_options(data, output_dir, 2, "--save_every", "1")
    killed_at = launch_and_kill("deepspeed_zero2.yaml", argv, kill_after=3)
    assert 3 <= killed_at < MAX_STEPS
    resumed = launch("deepspeed_zero2.yaml", argv + ["--resume_from", "latest"])
    assert f"at step {killed_at} " in resumed.stdout + resumed.stderr
    assert_same_weights(zero2, output_dir, atol=1e-6)
    assert_same_run(zero2, output_dir)
    final_state = json.loads((resolve_checkpoint("latest", output_dir) / LOOP_STATE_FILE).read_text())
    assert final_state == json.loads((resolve_checkpoint("latest", zero2) / LOOP_STATE_FILE).read_text())


@pytest.mark.slow
def test_a_deepspeed_launch_that_accelerate_would_run_as_ddp_is_refused(data, tmp_path):
    """ACCELERATE_USE_CPU=1 (what CPU launches of DDP used to need) makes Accelerate drop DeepSpeed for plain DDP."""
    argv = train_options(data, tmp_path / "out", 2)
    result = launch("deepspeed_zero2.yaml", argv, check=False, ACCELERATE_USE_CPU="1")
    assert result.returncode != 0
    assert "error: ACCELERATE_USE_CPU=1 turns DeepSpeed off; launch the DeepSpeed config without it." in result.stderr


NAN_LOSS = """
import rmtorch.loss
original_loss = rmtorch.loss.pairwise_loss
rmtorch.loss.pairwise_loss = lambda *args, **kwargs: original_loss(*args, **kwargs) * float("nan")
"""


def test_a_nonfinite_step_under_deepspeed_is_logged_as_applied_not_skipped(data, tmp_path):
    """DeepSpeed's engine steps inside backward, so the loop cannot skip the update: each non-finite step is logged
    with skipped false and a warning, and 5 in a row still stop the run with a message."""
    (tmp_path / "sitecustomize.py").write_text(NAN_LOSS)  # imported by every process of the launch: a NaN loss
    output_dir = tmp_path / "out"
    result = launch("deepspeed_zero2.yaml", train_options(data, output_dir, 2), check=False, PYTHONPATH=str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "error: 5 optimizer steps in a row had a non-finite loss or gradient; stopped at step 5" in output
    assert "warning: step 5: non-finite loss or gradient, applied by DeepSpeed's engine" in output
    steps = [line for line in read_jsonl(output_dir / "metrics.jsonl") if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2, 3, 4, 5]
    assert not any(line["skipped"] for line in steps)
