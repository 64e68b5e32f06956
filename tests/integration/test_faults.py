"""Crashes lose nothing: kill -9 then resume equals an uninterrupted run, a crash mid-save keeps the previous
checkpoint, non-finite steps are skipped, counted, and stop the run with a checkpoint after 5 in a row.

Runs that crash go to subprocesses (a killed process must be a real one); a fault inside a save or the loss is
injected by a wrapper that patches the library function and then runs train.py unchanged (test-only: train.py
has no fault hooks). The uninterrupted reference and the resumed runs train in the test's process.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rmtorch.checkpoint import LOOP_STATE_FILE, resolve_checkpoint
from rmtorch.loss import pairwise_loss
from tests.conftest import (
    NAN_LOSS,
    assert_same_weights,
    kill_at_checkpoint,
    pair_rows,
    run_script,
    train_argv,
    train_in_process,
    train_records,
    write_jsonl,
)

MAX_STEPS = 30  # 12 training pairs, 2 per batch: 6 steps an epoch, so a kill lands in any of 5 epochs


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("faults")
    write_jsonl(root / "train.jsonl", pair_rows(12, seed=0))
    write_jsonl(root / "eval.jsonl", pair_rows(7, seed=1))
    return root, tiny_model_dir


def train_command(setup, output_dir: Path, *extra: str) -> list[str]:
    root, model_dir = setup
    return train_argv(
        model_dir,
        root / "train.jsonl",
        output_dir,
        "--max_steps",
        str(MAX_STEPS),
        "--lr",
        "1e-3",
        *extra,
        eval_file=root / "eval.jsonl",
    )


def run_train(argv: list[str], patch: str = "", check: bool = True) -> subprocess.CompletedProcess:
    return run_script("train.py", argv, patch=patch, check=check)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    output_dir = setup[0] / "uninterrupted"
    train_in_process(train_command(setup, output_dir, "--save_every", "1"))
    return output_dir


def train_steps_logged(output_dir: Path) -> list[int]:
    return [line["step"] for line in train_records(output_dir)]


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_equals_an_uninterrupted_run(setup, uninterrupted, tmp_path, capsys):
    kill_after = random.Random(2024).randint(3, 20)
    output_dir = tmp_path / "killed"
    command = train_command(setup, output_dir, "--save_every", "1")
    killed_at = kill_at_checkpoint([sys.executable, "train.py", *command], kill_after)
    assert kill_after <= killed_at < MAX_STEPS

    train_in_process(command + ["--resume_from", "latest"])
    assert f"at step {killed_at} " in capsys.readouterr().out
    assert_same_weights(output_dir, uninterrupted)
    assert train_steps_logged(output_dir) == list(
        range(1, MAX_STEPS + 1)
    )  # lines written after the checkpoint were replaced
    final_state = json.loads((resolve_checkpoint("latest", output_dir) / LOOP_STATE_FILE).read_text())
    assert final_state == json.loads((resolve_checkpoint("latest", uninterrupted) / LOOP_STATE_FILE).read_text())


# Dies by SIGKILL inside the Nth save_state, after the state is written to the temp dir and one file is cut in half.
CRASH_IN_SAVE = """
import os, signal
from pathlib import Path
import accelerate
original_save_state, calls = accelerate.Accelerator.save_state, []
def save_state_then_die(self, output_dir=None, **kwargs):
    result = original_save_state(self, output_dir, **kwargs)
    calls.append(output_dir)
    if len(calls) == {crash_at}:
        weights = Path(output_dir) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return result
accelerate.Accelerator.save_state = save_state_then_die
"""


@pytest.mark.slow
def test_crash_mid_save_keeps_the_previous_checkpoint_and_latest(setup, uninterrupted, tmp_path):
    output_dir = tmp_path / "crashed"
    command = train_command(setup, output_dir, "--save_every", "4")
    crashed = run_train(command, patch=CRASH_IN_SAVE.format(crash_at=3), check=False)
    assert crashed.returncode == -signal.SIGKILL
    checkpoints = output_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-000008"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        ".tmp-step-000012",
        "latest",
        "step-000004",
        "step-000008",
    ]
    previous = resolve_checkpoint("latest", output_dir)
    assert json.loads((previous / LOOP_STATE_FILE).read_text())["step"] == 8
    load_file(previous / "model.safetensors")  # intact

    train_in_process(command + ["--resume_from", "latest"])
    assert_same_weights(output_dir, uninterrupted)
    assert not list(checkpoints.glob(".tmp-*"))
    assert (checkpoints / "latest").read_text().strip() == f"step-{MAX_STEPS:06d}"


def test_nonfinite_steps_are_skipped_and_counted(setup, tmp_path, monkeypatch):
    import train

    calls = []

    def loss_inf_on_micro_batches_2_and_3(
        *args, **kwargs
    ):  # inf keeps the gradients finite: only the loss check sees it
        calls.append(1)
        loss = pairwise_loss(*args, **kwargs)
        return loss + float("inf") if len(calls) in (2, 3) else loss

    monkeypatch.setattr(train, "pairwise_loss", loss_inf_on_micro_batches_2_and_3)
    output_dir = tmp_path / "out"
    results = train.main(train_command(setup, output_dir, "--max_steps", "6"))
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, True, True, False, False, False]
    assert results["skipped_nonfinite_steps"] == 2 and results["train_steps"] == 6
    assert all(torch.isfinite(t).all() for t in load_file(output_dir / "model.safetensors").values())


@pytest.mark.slow
def test_five_nonfinite_steps_in_a_row_stop_with_a_message_and_a_checkpoint(setup, tmp_path):
    output_dir = tmp_path / "out"
    result = run_train(train_command(setup, output_dir), patch=NAN_LOSS, check=False)
    assert result.returncode == 1
    assert (
        "error: 5 optimizer steps in a row had a non-finite loss or gradient; stopped at step 5 with a checkpoint "
        f"in {output_dir}/checkpoints. "
        "Lower --lr, turn off --bf16, or check the data."
    ) in result.stderr
    checkpoint = resolve_checkpoint("latest", output_dir)
    assert checkpoint.name == "step-000005"
    assert json.loads((checkpoint / LOOP_STATE_FILE).read_text())["skipped_nonfinite_steps"] == 5
    # Every update was skipped, so the checkpoint holds the starting weights.
    saved = {
        name.removeprefix("model."): tensor for name, tensor in load_file(checkpoint / "model.safetensors").items()
    }
    initial = load_file(setup[1] / "model.safetensors")
    assert saved.keys() == initial.keys() and all(torch.equal(saved[name], initial[name]) for name in initial)
