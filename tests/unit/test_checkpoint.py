"""rmtorch.checkpoint when a save fails: the temp directory goes, `latest` and the older checkpoints stay as they
were, and a full disk is an `error: ...` that names the directory, the reason and what to do."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
import torch

from rmtorch.checkpoint import resolve_checkpoint, save_checkpoint


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


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
