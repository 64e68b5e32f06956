"""DeepSpeed ZeRO-2 and ZeRO-3 through Accelerate, in 2 CPU processes (gloo) launched with
configs/deepspeed_zero2.yaml and deepspeed_zero3.yaml: the final weights (full fine-tune and LoRA) equal a
1-process run with the same global batch (fp32), with the learning rate schedule, gradient accumulation, clipping
and weight decay of the command line, and a checkpoint resumes after a kill -9 to the weights of an uninterrupted
run. The runs evaluate during training over an eval set that splits unevenly over the processes (under ZeRO-3 each
forward gathers the weights from every process).

DeepSpeed clips and steps inside its engine, during backward: clip_grad_norm_ only reads back the norm (a float),
and rmtorch's skipping of a non-finite step cannot undo an update the engine already made.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from rmtorch.checkpoint import LOOP_STATE_FILE, resolve_checkpoint
from tests.conftest import (
    LAUNCH_LORA,
    LAUNCH_STEPS,
    NAN_LOSS,
    assert_same_run,
    assert_same_weights,
    launch,
    launch_and_kill,
    launch_options,
    train_records,
)
from tests.integration.conftest import OBJECTIVES, assert_objective_launch, launch_together, objective_runs

pytest.importorskip("deepspeed", reason="pip install deepspeed (CPU works: the tests run it on gloo)")


@pytest.fixture(scope="module")
def zero2(launch_data, objective_references, tmp_path_factory):
    """2-process ZeRO-2 runs in one launch: pairs (a log line every step) and the three objectives. ({name: output
    directory}, what the launch printed)."""
    runs = {
        "pairs": lambda output_dir: launch_options(launch_data, output_dir, 2, "--log_every", "1"),
        **objective_runs(objective_references),
    }
    return launch_together("deepspeed_zero2.yaml", "DeepSpeed ZeRO-2", tmp_path_factory.mktemp("zero2"), runs)


@pytest.fixture(scope="module")
def zero3(launch_data, tmp_path_factory):
    """2-process ZeRO-3 runs in one launch, full and LoRA: {name: output directory}."""
    runs = {
        "pairs": lambda output_dir: launch_options(launch_data, output_dir, 2),
        "lora": lambda output_dir: launch_options(launch_data, output_dir, 2, *LAUNCH_LORA),
    }
    return launch_together("deepspeed_zero3.yaml", "DeepSpeed ZeRO-3", tmp_path_factory.mktemp("zero3"), runs)[0]


@pytest.mark.slow
def test_zero2_two_processes_equal_one_process(one_process, zero2):
    """The same weights, learning rates, losses and eval numbers; the norm DeepSpeed reads back (before clipping) is
    the one a single process computes."""
    assert_same_weights(one_process(), zero2[0]["pairs"], atol=1e-5)
    assert_same_run(one_process(), zero2[0]["pairs"])


@pytest.mark.slow
def test_deepspeed_progress_bars_and_log_lines_are_clean(zero2):
    """ZeRO's first step called a collective torch deprecates: each process printed a FutureWarning into the
    progress bar. And tqdm.write printed every step line once per process (the objectives' runs print their last)."""
    result = zero2[1]
    assert "FutureWarning" not in result.stderr, result.stderr[-3000:]
    printed = [line.split("  ")[0] for line in result.stdout.splitlines() if line.startswith("step ")]
    every_step = [f"step {step}/{LAUNCH_STEPS}" for step in range(1, LAUNCH_STEPS + 1)]
    assert printed == every_step + ["step 4/4"] * len(OBJECTIVES)


@pytest.mark.slow
def test_zero3_two_processes_equal_one_process(one_process, zero3):
    """ZeRO-3 also shards the weights: the model is built by all processes together, and the final save gathers it."""
    assert_same_weights(one_process(), zero3["pairs"], atol=1e-5)
    assert_same_run(one_process(), zero3["pairs"])
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(zero3["pairs"])  # a plain model, not DeepSpeed's files


@pytest.mark.slow
def test_lora_under_zero3_equals_one_process(one_process, zero3):
    """ZeRO-3 shards the adapters too; PEFT gathers them to save the adapter."""
    assert any("lora_B" in name for name in load_file(zero3["lora"] / "adapter_model.safetensors"))
    assert_same_weights(one_process(*LAUNCH_LORA), zero3["lora"], atol=1e-5, file="adapter_model.safetensors")
    assert_same_run(one_process(*LAUNCH_LORA), zero3["lora"])


@pytest.mark.slow
def test_zero2_kill_9_then_resume_equals_an_uninterrupted_run(launch_data, zero2, tmp_path):
    """The checkpoint holds DeepSpeed's model and optimizer shards and the learning rate schedule."""
    uninterrupted = zero2[0]["pairs"]
    output_dir = tmp_path / "zero2_killed"
    argv = launch_options(launch_data, output_dir, 2, "--save_every", "1")
    killed_at = launch_and_kill("deepspeed_zero2.yaml", argv, kill_after=3)
    assert 3 <= killed_at < LAUNCH_STEPS
    resumed = launch("deepspeed_zero2.yaml", argv + ["--resume_from", "latest"])
    assert f"at step {killed_at} " in resumed.stdout + resumed.stderr
    assert_same_weights(uninterrupted, output_dir, atol=1e-6)
    assert_same_run(uninterrupted, output_dir)
    final_state = json.loads((resolve_checkpoint("latest", output_dir) / LOOP_STATE_FILE).read_text())
    assert final_state == json.loads((resolve_checkpoint("latest", uninterrupted) / LOOP_STATE_FILE).read_text())


@pytest.mark.slow
def test_a_deepspeed_launch_that_accelerate_would_run_as_ddp_is_refused(launch_data, tmp_path):
    """ACCELERATE_USE_CPU=1 (what CPU launches of DDP used to need) makes Accelerate drop DeepSpeed for plain DDP."""
    argv = launch_options(launch_data, tmp_path / "out", 2)
    result = launch("deepspeed_zero2.yaml", argv, check=False, ACCELERATE_USE_CPU="1")
    assert result.returncode != 0
    assert "error: ACCELERATE_USE_CPU=1 turns DeepSpeed off; launch the DeepSpeed config without it." in result.stderr


def test_a_nonfinite_step_under_deepspeed_is_logged_as_applied_not_skipped(launch_data, tmp_path):
    """DeepSpeed's engine steps inside backward, so the loop cannot skip the update: each non-finite step is logged
    with skipped false and a warning, and 5 in a row still stop the run with a message."""
    (tmp_path / "sitecustomize.py").write_text(NAN_LOSS)  # imported by every process of the launch: a NaN loss
    output_dir = tmp_path / "out"
    argv = launch_options(launch_data, output_dir, 2, "--eval_every", "none")  # no evaluation of NaN weights
    result = launch("deepspeed_zero2.yaml", argv, check=False, PYTHONPATH=str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "error: 5 optimizer steps in a row had a non-finite loss or gradient; stopped at step 5" in output
    assert "warning: step 5: non-finite loss or gradient, applied by DeepSpeed's engine" in output
    steps = train_records(output_dir)
    assert [line["step"] for line in steps] == [1, 2, 3, 4, 5]
    assert not any(line["skipped"] for line in steps)


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_trains_under_zero2_as_in_one_process(zero2, objective_references, objective):
    """Steps, groups and ratings under ZeRO-2: DeepSpeed's engine scales and reduces the gradients itself."""
    assert_objective_launch(objective, zero2[0][objective], objective_references)
