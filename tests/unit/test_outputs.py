"""rmtorch.outputs: which locations a command may write, and what a resumed run must match."""

from __future__ import annotations

import os

import pytest

from rmtorch.outputs import check_output_dir, check_output_file, check_resume, fingerprint, write_marker


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
        check_output_file(data, "--output", [data], ours=lambda path: True)
    with pytest.raises(FileExistsError, match="exists and is not an output of this command"):
        check_output_file(data, "--output", [], ours=lambda path: False)


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
