"""rmtorch.outputs: which locations a command may write, and what a resumed run must match."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rmtorch.outputs import (
    check_output_dir,
    check_output_file,
    check_resume,
    file_marker_path,
    fingerprint,
    write_file_marker,
    write_marker,
)


def test_an_unwritable_place_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # what a read-only directory answers
    with pytest.raises(
        PermissionError, match=rf"--report {tmp_path}/new/report: cannot write in {tmp_path} \(permission denied\)"
    ):
        check_output_dir(tmp_path / "new" / "report", "evaluate", "--report")


def test_same_kind_outputs_may_be_replaced_other_kinds_may_not(tmp_path):
    (tmp_path / "report").mkdir()
    write_marker(tmp_path / "report", "evaluate")
    (tmp_path / "report" / "metrics.json").write_text("{}")
    check_output_dir(tmp_path / "report", "evaluate", "--report")  # an earlier evaluation: allowed
    with pytest.raises(FileExistsError, match=r"holds an rmtorch evaluate output, not a merge output"):
        check_output_dir(tmp_path / "report", "merge", "--output_dir")


def test_an_output_file_is_never_an_input_or_a_foreign_file(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="is also an input of this command"):
        check_output_file(data, "score", "--output", [data])
    with pytest.raises(FileExistsError, match="exists and is not an output of this command"):
        check_output_file(data, "score", "--output", [])


def test_an_output_file_is_replaced_only_while_it_is_what_the_command_wrote(tmp_path):
    """Judged by the marker the command wrote beside it (kind, name, sha256), never by the file's columns."""
    scored = tmp_path / "scored.jsonl"
    scored.write_text('{"prompt": "a", "completion": "b", "reward": 1.5}\n')
    with pytest.raises(FileExistsError, match=r"--output .*scored\.jsonl exists and is not an output of this command"):
        check_output_file(scored, "score", "--output", [])  # a reward column alone: human labels look the same
    write_file_marker(scored, "score")
    assert file_marker_path(scored) == tmp_path / ".scored.jsonl.rmtorch_run.json"
    check_output_file(scored, "score", "--output", [])  # its own earlier output: allowed
    with pytest.raises(FileExistsError, match="exists and is not an output of this command"):
        check_output_file(scored, "other", "--output", [])
    scored.write_text('{"prompt": "a", "completion": "b", "reward": 2.0}\n')  # edited by hand since
    with pytest.raises(
        FileExistsError, match=r"exists and has changed since this command wrote it; choose a new file name, or delete"
    ):
        check_output_file(scored, "score", "--output", [])
    moved = tmp_path / "moved.jsonl"
    scored.rename(moved)  # the marker names the file it describes
    file_marker_path(scored).rename(file_marker_path(moved))
    with pytest.raises(FileExistsError, match="exists and is not an output of this command"):
        check_output_file(moved, "score", "--output", [])
    (tmp_path / "empty.jsonl").write_text("")
    check_output_file(tmp_path / "empty.jsonl", "score", "--output", [])  # nothing to lose


def test_a_training_runs_own_directories_are_refused_to_other_outputs(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    write_marker(run, "train")
    (run / "report").mkdir()
    write_marker(run / "report", "evaluate")  # what train.py's final report carries
    for place, message in [
        (run / "report", rf"--report {run}/report is the report/ directory of the run in {run}: a run's directories"),
        (run / "checkpoints" / "new", r"is inside the checkpoints/ directory of the run in"),
        (run / "trackers", r"is the trackers/ directory of the run in"),
        (run, rf"--report {run} is the directory of a training run: .* choose a new directory elsewhere"),
    ]:
        with pytest.raises(FileExistsError, match=message):
            check_output_dir(place, "evaluate", "--report")
    check_output_dir(run / "merged", "merge", "--output_dir")  # merge_lora.py's default place: beside them


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc (Linux)")
def test_a_place_where_no_file_can_be_created_is_refused(tmp_path):
    # /proc lets root pass every permission check, yet nothing can be created in it.
    with pytest.raises(PermissionError, match=r"--output_dir /proc/rmtorch_test/out: cannot write in /proc \("):
        check_output_dir("/proc/rmtorch_test/out", "train", "--output_dir")
    with pytest.raises(PermissionError, match=r"--output /proc/scored\.jsonl: cannot write in /proc \("):
        check_output_file("/proc/scored.jsonl", "score", "--output", [])
    (tmp_path / "data.jsonl").write_text("")
    with pytest.raises(NotADirectoryError, match=r"data\.jsonl is a file, not a directory; choose another place"):
        check_output_dir(tmp_path / "data.jsonl" / "report", "evaluate", "--report")
    check_output_dir(tmp_path / "new" / "report", "evaluate", "--report")
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]  # the probe file is gone, nothing was created


def test_fingerprint_follows_content_not_names(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("x\n")
    b.write_text("x\n")
    assert fingerprint(a) == fingerprint(b) != fingerprint(tmp_path)
    b.write_text("y\n")
    assert fingerprint(a) != fingerprint(b)


def test_resume_names_every_changed_option(tmp_path):
    write_marker(
        tmp_path, "train", options={"lr": 1e-5, "batch_size": 8, "eval_every": 10}, data={"train_file": "abc"}
    )
    check_resume(tmp_path, {"lr": 1e-5, "batch_size": 8, "eval_every": 5}, {"train_file": "abc"})  # logging may change
    with pytest.raises(
        ValueError, match=r"--batch_size 8 → 4; --lr 1e-05 → 0\.001; train_file changed since the run started"
    ):
        check_resume(tmp_path, {"lr": 1e-3, "batch_size": 4, "eval_every": 10}, {"train_file": "xyz"})
