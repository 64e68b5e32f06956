"""FSDP2 through Accelerate, in 2 CPU processes (gloo) launched with configs/fsdp2_cpu.yaml: the final weights equal
a 1-process run with the same global batch (fp32), the sharded checkpoints resume after a kill -9 to the weights
of an uninterrupted FSDP run, and the final model is a plain safetensors model that transformers loads.

Every run evaluates during training with an eval set that splits unevenly over the processes: under FSDP each
forward gathers the weights from every process, so a process that ran fewer forwards would hang the others. The
uninterrupted runs (pairs, LoRA, the three objectives) share one launch (launch_together).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from rmtorch.checkpoint import LOOP_STATE_FILE, resolve_checkpoint
from tests.conftest import (
    LAUNCH_LORA,
    LAUNCH_STEPS,
    assert_same_run,
    assert_same_weights,
    launch,
    launch_and_kill,
    launch_options,
    train_records,
)
from tests.integration.conftest import OBJECTIVES, assert_objective_launch, launch_together, objective_runs


@pytest.fixture(scope="module")
def fsdp(launch_data, objective_references, tmp_path_factory):
    """Uninterrupted 2-process FSDP runs in one launch, each checkpointed at the end: pairs (2 pairs x 2 accumulation
    x 2 processes a step), the same with LoRA, and the three objectives. {name: output directory}."""
    runs = {
        "pairs": lambda output_dir: launch_options(launch_data, output_dir, 2),
        "lora": lambda output_dir: launch_options(launch_data, output_dir, 2, *LAUNCH_LORA),
        **objective_runs(objective_references),
    }
    return launch_together("fsdp2_cpu.yaml", "FSDP2", tmp_path_factory.mktemp("fsdp"), runs)[0]


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process(one_process, fsdp):
    fsdp_run = fsdp["pairs"]
    # The same weights, steps and evaluations: losses, gradient norms (a DTensor under FSDP2) and eval numbers.
    assert_same_weights(one_process(), fsdp_run, atol=1e-5)
    assert_same_run(one_process(), fsdp_run)

    # Checkpoints hold one shard per process; the final model is a plain model that transformers loads.
    shards = sorted(p.name for p in (resolve_checkpoint("latest", fsdp_run) / "pytorch_model_fsdp_0").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(fsdp_run)
    final = load_file(fsdp_run / "model.safetensors")
    assert torch.equal(model.score.weight, final["score.weight"])


@pytest.mark.slow
def test_fsdp_kill_9_at_a_random_step_then_resume_equals_an_uninterrupted_fsdp_run(launch_data, fsdp, tmp_path):
    fsdp_run = fsdp["pairs"]
    kill_after = random.Random(7).randint(2, LAUNCH_STEPS - 3)
    output_dir = tmp_path / "killed"
    argv = launch_options(launch_data, output_dir, 2, "--save_every", "1")
    killed_at = launch_and_kill("fsdp2_cpu.yaml", argv, kill_after)
    assert kill_after <= killed_at < LAUNCH_STEPS

    resumed = launch("fsdp2_cpu.yaml", argv + ["--resume_from", "latest"])
    assert f"at step {killed_at} " in resumed.stdout + resumed.stderr
    assert_same_weights(fsdp_run, output_dir, atol=1e-6)
    steps = [line["step"] for line in train_records(output_dir)]
    assert steps == list(range(1, LAUNCH_STEPS + 1))  # what the killed run logged after its checkpoint was rewritten
    final_state = json.loads((resolve_checkpoint("latest", output_dir) / LOOP_STATE_FILE).read_text())
    assert final_state == json.loads((resolve_checkpoint("latest", fsdp_run) / LOOP_STATE_FILE).read_text())


@pytest.mark.slow
def test_lora_under_fsdp_equals_one_process(one_process, fsdp):
    """LoRA under FSDP2: the adapter and the trained head (saved from the gathered shards) equal a 1-process run's,
    and the adapter directory loads as a reward model."""
    from rmtorch.loading import load_reward_model

    adapter = load_file(fsdp["lora"] / "adapter_model.safetensors")
    assert any("lora_B" in name for name in adapter) and any("score" in name for name in adapter)
    assert_same_weights(one_process(*LAUNCH_LORA), fsdp["lora"], atol=1e-5, file="adapter_model.safetensors")
    assert_same_run(one_process(*LAUNCH_LORA), fsdp["lora"])
    assert load_reward_model(str(fsdp["lora"]))[0].peft_config["default"].r == 4


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_trains_under_fsdp2_as_in_one_process(fsdp, objective_references, objective):
    """Steps, groups and ratings: FSDP2 averages the gradients as DDP does (the step share fails without the
    weight: checked)."""
    assert_objective_launch(objective, fsdp[objective], objective_references)
