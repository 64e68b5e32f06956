"""FSDP2 through Accelerate, in 2 CPU processes (gloo) launched with configs/fsdp2_cpu.yaml: the final weights equal
a 1-process run with the same global batch (fp32), the sharded checkpoints resume after a kill -9 to the weights
of an uninterrupted FSDP run, and the final model is a plain safetensors model that transformers loads.

Every run evaluates during training with an eval set that splits unevenly over the processes: under FSDP each
forward gathers the weights from every process, so a process that ran fewer forwards would hang the others.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rmtorch.checkpoint import LOOP_STATE_FILE, resolve_checkpoint, save_checkpoint
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

MAX_STEPS = 10  # 12 pairs, global batch 4: 3 steps an epoch, so the runs cross epoch boundaries


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("fsdp")
    write_jsonl(root / "train.jsonl", pair_rows(12, seed=0))
    write_jsonl(root / "eval.jsonl", pair_rows(7, seed=1))  # odd: the processes run their shares of the plan
    return root, tiny_model_dir


def train_options(data, output_dir: Path, batch_size: int, *extra: str) -> list[str]:
    root, model_dir = data
    return train_argv(
        model_dir, root / "train.jsonl", output_dir, "--max_steps", str(MAX_STEPS), "--lr", "1e-3",
        "--weight_decay", "0.1", "--batch_size", str(batch_size), "--grad_accum", "2", "--eval_every", "4",
        "--max_tokens_per_batch", "40", *extra, eval_file=root / "eval.jsonl",
    )  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_run(data):
    """An uninterrupted 2-process FSDP run (2 pairs x 2 accumulation x 2 processes a step), saving every step."""
    output_dir = data[0] / "fsdp"
    result = launch("fsdp2_cpu.yaml", train_options(data, output_dir, 2, "--save_every", "1"))
    assert "2 process(es) x 2 pairs x 2 accumulation" in result.stdout + result.stderr
    return output_dir


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process(data, fsdp_run):
    one = data[0] / "one_process"
    subprocess.run(
        [sys.executable, "train.py", *train_options(data, one, 4)], cwd=REPO_ROOT, check=True, capture_output=True
    )
    assert_same_weights(one, fsdp_run, atol=1e-5)

    # The same steps and evaluations: losses, gradient norms (a DTensor under FSDP2) and eval numbers.
    lines_one, lines_fsdp = read_jsonl(one / "metrics.jsonl"), read_jsonl(fsdp_run / "metrics.jsonl")
    assert [line["step"] for line in lines_fsdp] == [line["step"] for line in lines_one]
    for line_one, line_fsdp in zip(lines_one, lines_fsdp):
        for key in ("loss", "grad_norm", "eval_loss", "eval_accuracy"):
            if key in line_one:
                assert line_fsdp[key] == pytest.approx(line_one[key], abs=1e-5), (line_one["step"], key)
    results = json.loads((fsdp_run / "eval_results.json").read_text())
    assert results["num_pairs"] == 7

    # Checkpoints hold one shard per process; the final model is a plain model that transformers loads.
    shards = sorted(p.name for p in (resolve_checkpoint("latest", fsdp_run) / "pytorch_model_fsdp_0").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(fsdp_run)
    final = load_file(fsdp_run / "model.safetensors")
    assert torch.equal(model.score.weight, final["score.weight"])


@pytest.mark.slow
def test_fsdp_kill_9_at_a_random_step_then_resume_equals_an_uninterrupted_fsdp_run(data, fsdp_run):
    kill_after = random.Random(7).randint(2, MAX_STEPS - 3)
    output_dir = data[0] / "killed"
    argv = train_options(data, output_dir, 2, "--save_every", "1")
    killed_at = launch_and_kill("fsdp2_cpu.yaml", argv, kill_after)
    assert kill_after <= killed_at < MAX_STEPS

    resumed = launch("fsdp2_cpu.yaml", argv + ["--resume_from", "latest"])
    assert f"at step {killed_at} " in resumed.stdout + resumed.stderr
    assert_same_weights(fsdp_run, output_dir, atol=1e-6)
    steps = [line["step"] for line in read_jsonl(output_dir / "metrics.jsonl") if "loss" in line]
    assert steps == list(range(1, MAX_STEPS + 1))  # what the killed run logged after its checkpoint was rewritten
    final_state = json.loads((resolve_checkpoint("latest", output_dir) / LOOP_STATE_FILE).read_text())
    assert final_state == json.loads((resolve_checkpoint("latest", fsdp_run) / LOOP_STATE_FILE).read_text())


@pytest.mark.slow
def test_lora_under_fsdp_equals_one_process(data, tmp_path):
    """LoRA under FSDP2: the adapter and the trained head (saved from the gathered shards) equal a 1-process run's,
    and the adapter directory loads as a reward model."""
    from rmtorch.model import load_reward_model

    lora = ("--lora", "--lora_r", "4", "--max_steps", "4")
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    result = launch("fsdp2_cpu.yaml", train_options(data, fsdp, 2, *lora))
    assert "2 process(es) x 2 pairs x 2 accumulation" in result.stdout + result.stderr
    subprocess.run(
        [sys.executable, "train.py", *train_options(data, one, 4, *lora)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    )
    ours, reference = load_file(fsdp / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert (
        ours.keys() == reference.keys()
        and any("lora_B" in name for name in ours)
        and any("score" in name for name in ours)
    )
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert load_reward_model(str(fsdp))[0].peft_config["default"].r == 4


def test_a_checkpoint_directory_a_process_cannot_see_stops_the_save(tmp_path, accelerator, monkeypatch):
    """On several machines each process writes its shard into the temp directory the main process made; one that
    does not see it (output_dir not on a shared filesystem) would leave a checkpoint without its shards."""
    accelerator.prepare(torch.nn.Linear(2, 1))
    monkeypatch.setattr(Path, "is_dir", lambda path: not path.name.startswith(".tmp-"))
    with pytest.raises(FileNotFoundError, match=r"Not every process sees .*\.tmp-step-000001.* filesystem that every"):
        save_checkpoint(accelerator, tmp_path, {"step": 1})
    assert not (tmp_path / "checkpoints" / "latest").exists()
