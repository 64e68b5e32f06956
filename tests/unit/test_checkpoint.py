"""rmtorch.checkpoint without training: the last two checkpoints kept, `latest` resolved (a damaged one falls back
to the one before), metrics cut back to a checkpoint's step; and when a save fails, the temp directory goes,
`latest` and the older checkpoints stay as they were, and a full disk is an `error: ...` that names the directory,
the reason and what to do."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from rmtorch.checkpoint import LOOP_STATE_FILE, resolve_checkpoint, save_checkpoint, truncate_metrics
from tests.conftest import tree


def fail_writing(accelerator, monkeypatch, error: BaseException) -> None:
    """accelerator.save_state writes part of the state, then raises `error` (a full disk, as the writer sees it)."""

    def save_state(output_dir, **kwargs):
        (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
        raise error

    monkeypatch.setattr(accelerator, "save_state", save_state)


@pytest.fixture
def saved_once(tmp_path, accelerator):
    accelerator.prepare(torch.nn.Linear(2, 1))
    save_checkpoint(accelerator, tmp_path, {"step": 1})
    return tmp_path


def test_a_full_disk_removes_the_incomplete_save_and_keeps_latest(saved_once, accelerator, monkeypatch):
    before = tree(saved_once)
    fail_writing(accelerator, monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(SystemExit) as exit_info:
        save_checkpoint(accelerator, saved_once, {"step": 2})
    checkpoints = saved_once / "checkpoints"
    assert exit_info.value.code == (
        f"error: saving checkpoint {checkpoints}/.tmp-step-000002 failed: no space left on device (ENOSPC). The "
        f"incomplete directory was removed; {checkpoints}/latest still names step-000001: free space on that disk (or "
        "move the run to a larger one), then continue with --resume_from latest."
    )
    assert tree(saved_once) == before  # no .tmp-step-000002 left to fill the disk
    assert resolve_checkpoint("latest", saved_once).name == "step-000001"


def test_a_full_disk_in_the_writers_own_words_is_recognised(saved_once, accelerator, monkeypatch):
    """safetensors raises its own error type for ENOSPC; torch.save's message does not even say so (then the free
    space decides)."""
    before = tree(saved_once)
    fail_writing(accelerator, monkeypatch, RuntimeError("I/O error: No space left on device (os error 28)"))
    with pytest.raises(SystemExit, match=r"failed: no space left on device \(ENOSPC\); RuntimeError: I/O error"):
        save_checkpoint(accelerator, saved_once, {"step": 2})
    assert tree(saved_once) == before


def test_a_save_replacing_the_same_step_puts_the_old_copy_back(saved_once, accelerator, monkeypatch):
    before = tree(saved_once)
    fail_writing(accelerator, monkeypatch, OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(SystemExit, match=r"failed: permission denied \(EACCES\)\. .*: make .*checkpoints writable"):
        save_checkpoint(accelerator, saved_once, {"step": 1})  # a resumed run saving step 1 again
    assert tree(saved_once) == before


def test_a_bug_during_a_save_keeps_its_traceback_and_leaves_no_temp_dir(saved_once, accelerator, monkeypatch):
    before = tree(saved_once)
    fail_writing(accelerator, monkeypatch, KeyError("not a disk problem"))
    with pytest.raises(KeyError, match="not a disk problem"):
        save_checkpoint(accelerator, saved_once, {"step": 2})
    assert tree(saved_once) == before


def test_the_first_save_failing_says_there_is_nothing_to_resume(tmp_path, accelerator, monkeypatch):
    accelerator.prepare(torch.nn.Linear(2, 1))
    fail_writing(accelerator, monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(SystemExit, match=r"no earlier checkpoint exists: free space .*then start again \(a new"):
        save_checkpoint(accelerator, tmp_path, {"step": 1})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_resume_from_latest_ignores_and_removes_a_crashed_save(saved_once):
    stray = saved_once / "checkpoints" / ".tmp-step-000002"
    stray.mkdir()
    (stray / "loop_state.json").write_text('{"step": 2}')  # complete-looking, but never renamed into place
    assert resolve_checkpoint("latest", saved_once).name == "step-000001"
    assert not stray.exists()


def test_save_keeps_the_last_two_and_cleans_a_crashed_temp_dir(tmp_path, accelerator):
    accelerator.prepare(torch.nn.Linear(2, 1))
    (tmp_path / "checkpoints" / ".tmp-step-000009").mkdir(parents=True)  # left by a crash
    for step in (1, 2, 3):
        save_checkpoint(accelerator, tmp_path, {"step": step})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-000002", "step-000003"]
    assert resolve_checkpoint("latest", tmp_path).name == "step-000003"


def test_saving_a_step_again_replaces_it_and_drops_later_steps(tmp_path, accelerator):
    accelerator.prepare(torch.nn.Linear(2, 1))
    for step in (4, 5):
        save_checkpoint(accelerator, tmp_path, {"step": step, "run": "first"})
    save_checkpoint(
        accelerator, tmp_path, {"step": 4, "run": "resumed"}
    )  # a run resumed from step 4 saves step 4 again
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000004"]
    assert json.loads((resolve_checkpoint("latest", tmp_path) / LOOP_STATE_FILE).read_text())["run"] == "resumed"


def test_resolve_checkpoint_errors_say_what_to_do(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"--resume_from latest: no checkpoint under .* yet\. Start without --resume_from"
    ):
        resolve_checkpoint("latest", tmp_path)
    with pytest.raises(
        FileNotFoundError,
        match=r"is not a complete rmtorch checkpoint \(no loop_state\.json\)\. Pass a step-\* directory or 'latest'",
    ):
        resolve_checkpoint(str(tmp_path), tmp_path)


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 1}\n{"step": 2, "eval_loss": 1}\n{"step": 3, "loss": 1}\n{"step": 4, "lo')
    truncate_metrics(metrics, 2)
    assert metrics.read_text() == '{"step": 1, "loss": 1}\n{"step": 2, "eval_loss": 1}\n'


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, accelerator, capsys):
    accelerator.prepare(torch.nn.Linear(2, 1), torch.optim.AdamW(torch.nn.Linear(2, 1).parameters()))
    for step in (1, 2):
        save_checkpoint(accelerator, tmp_path, {"step": step})
    weights = tmp_path / "checkpoints" / "step-000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])  # cut short: a full disk, an interrupted copy
    assert resolve_checkpoint("latest", tmp_path).name == "step-000001"
    assert (
        f"warning: {weights} is damaged (not a complete safetensors file); resuming from step-000001"
        in capsys.readouterr().err
    )
    with pytest.raises(
        ValueError, match=r"step-000002/model\.safetensors is damaged .* Resume from an older one \(step-000001\)"
    ):
        resolve_checkpoint(str(weights.parent), tmp_path)
    (tmp_path / "checkpoints" / "step-000001" / "optimizer.bin").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(ValueError, match=r"step-000002/model\.safetensors is damaged .* Resume from an older one"):
        resolve_checkpoint("latest", tmp_path)  # no intact checkpoint left: the damaged file is named


def test_a_checkpoint_directory_a_process_cannot_see_stops_the_save(tmp_path, accelerator, monkeypatch):
    """On several machines each process writes its shard into the temp directory the main process made; one that
    does not see it (output_dir not on a shared filesystem) would leave a checkpoint without its shards."""
    accelerator.prepare(torch.nn.Linear(2, 1))
    monkeypatch.setattr(Path, "is_dir", lambda path: not path.name.startswith(".tmp-"))
    with pytest.raises(FileNotFoundError, match=r"Not every process sees .*\.tmp-step-000001.* filesystem that every"):
        save_checkpoint(accelerator, tmp_path, {"step": 1})
    assert not (tmp_path / "checkpoints" / "latest").exists()
