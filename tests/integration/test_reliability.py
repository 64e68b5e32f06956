"""Never overwrite what is not ours, never train or score something other than what the user gave.

Each case runs a command in process through `rmtorch.cli.run` (what `python train.py ...` runs) and asserts the
exit (SystemExit with the `error: ...` line, status 1), the message, and that every file on disk is unchanged.
`test_cli.py` runs a few of them as real processes (exit status, no traceback).
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest
import torch

import evaluate
import merge_lora
import score as score_cli
import train
from rmtorch.cli import run
from rmtorch.formatting import chat_ids
from rmtorch.outputs import read_marker
from rmtorch.pairs import tokenize_pairs
from tests.conftest import pair_rows, read_jsonl, save_tiny_llama, train_argv, train_in_process, tree, write_jsonl


def refused(main, argv: list[str], message: str, root: Path) -> None:
    """main(argv) through cli.run exits with `error: <message>` (a regex); every file under root is as it was."""
    before = tree(root)
    with pytest.raises(SystemExit) as exit_info:
        run(main, argv)
    assert isinstance(exit_info.value.code, str), exit_info.value.code  # a message: Python exits with status 1
    assert exit_info.value.code.startswith("error: ")
    assert re.search(message, exit_info.value.code), exit_info.value.code
    assert tree(root) == before


@pytest.fixture
def files(tmp_path, tiny_model_dir):
    """A private copy of the tiny model (some cases try to overwrite it) and good pair files."""
    import shutil

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    return {
        "model": model,
        "train": write_jsonl(tmp_path / "train.jsonl", pair_rows(8)),
        "eval": write_jsonl(tmp_path / "eval.jsonl", pair_rows(4, seed=1)),
        "root": tmp_path,
    }


def args(files, output_dir, *extra):
    return train_argv(files["model"], files["train"], output_dir, *extra, eval_file=files["eval"])


# ------------------------------------------------------------------------------------------------- data loss


def test_training_into_the_base_model_directory_is_refused(files):
    refused(
        train.main,
        args(files, files["model"]),
        r"--output_dir .*model is also an input of this command",
        files["root"],
    )


def test_a_finished_run_whose_checkpoints_were_deleted_is_not_overwritten(files):
    import shutil

    run_dir = files["root"] / "run"
    train_in_process(args(files, run_dir))
    shutil.rmtree(run_dir / "checkpoints")  # to save disk
    refused(
        train.main,
        args(files, run_dir),
        r"already holds an rmtorch run \(without checkpoints to resume from\)",
        files["root"],
    )


@pytest.mark.parametrize("place", ["foreign directory", "data file", "a file"])
def test_foreign_or_input_locations_are_refused_as_output_dir(files, place):
    target = {
        "foreign directory": files["root"] / "notes",
        "data file": files["train"],
        "a file": files["root"] / "x.txt",
    }[place]
    if place == "foreign directory":
        target.mkdir()
        (target / "todo.txt").write_text("mine")
    if place == "a file":
        target.write_text("mine")
    message = {
        "foreign directory": r"is not empty and was not written by rmtorch \(it holds todo\.txt\)",
        "data file": r"is also an input of this command",
        "a file": r"is a file; give a directory that does not exist yet",
    }[place]
    refused(train.main, args(files, target), message, files["root"])


def test_merging_onto_the_adapters_own_base_is_refused(files):
    adapter = files["root"] / "adapter"
    train_in_process(args(files, adapter, "--lora", "--lora_r", "4"))
    refused(
        merge_lora.main,
        ["--model", str(adapter), "--output_dir", str(files["model"])],
        r"is the base model the adapter was "
        r"trained on",
        files["root"],
    )


def test_evaluate_and_score_refuse_foreign_outputs_and_replace_their_own(files):
    foreign = files["root"] / "foreign.jsonl"
    foreign.write_text("my notes\n")
    base = ["--model", str(files["model"]), "--bf16", "false"]
    refused(
        score_cli.main,
        [*base, "--input", str(files["eval"]), "--output", str(foreign)],
        r"exists and is not an output of this "
        r"command",
        files["root"],
    )
    (files["root"] / "report").mkdir()
    (files["root"] / "report" / "mine.txt").write_text("mine")
    refused(
        evaluate.main,
        [*base, "--data", str(files["eval"]), "--report", str(files["root"] / "report")],
        r"is not empty and was not written by "
        r"rmtorch",
        files["root"],
    )
    own = files["root"] / "scored.jsonl"
    for _ in range(2):  # a second run replaces its own earlier output
        score_cli.main([*base, "--input", str(files["eval"]), "--output", str(own)])
    assert len(read_jsonl(own)) == 4
    for _ in range(2):
        evaluate.main([*base, "--data", str(files["eval"]), "--report", str(files["root"] / "own_report")])
    assert (files["root"] / "own_report" / "metrics.json").exists()


@pytest.mark.parametrize("existing", ["human labels", "a run's scores", "its own output, edited since"])
def test_score_py_replaces_only_what_it_wrote_itself(files, existing, monkeypatch):
    """Judged by the marker score.py writes beside its output, not by reward columns, which labels have too."""
    base = ["--model", str(files["model"]), "--bf16", "false", "--input", str(files["eval"])]
    if existing == "human labels":
        target = write_jsonl(files["root"] / "labels.jsonl", [{"completion": " yes", "reward": 1.0}])
    elif existing == "a run's scores":
        target = files["root"] / "run" / "report" / "scores.jsonl"
        target.parent.mkdir(parents=True)
        write_jsonl(target, [{"row": 0, "chosen_reward": 0.3, "rejected_reward": -0.1}])
    else:
        target = files["root"] / "scored.jsonl"
        score_cli.main([*base, "--output", str(target)])
        write_jsonl(target, [{**row, "label": "checked by hand"} for row in read_jsonl(target)])
    monkeypatch.setattr(score_cli.RewardScorer, "from_pretrained", _no_model_load)
    message = "has changed since this command wrote it" if "edited" in existing else "is not an output of this command"
    refused(
        score_cli.main,
        [*base, "--output", str(target)],
        rf"--output {target} exists and {message}; choose a new file name, or delete it yourself\.",
        files["root"],
    )


def test_evaluate_refuses_a_training_runs_directories(files, monkeypatch):
    run_dir = files["root"] / "run"
    train_in_process(args(files, run_dir, "--save_every", "1"))
    monkeypatch.setattr(evaluate, "load_reward_model", _no_model_load)
    base = ["--model", str(files["model"]), "--bf16", "false", "--data", str(files["eval"])]
    for report, message in [
        (run_dir / "report", rf"--report {run_dir}/report is the report/ directory of the run in {run_dir}: a run's"),
        (run_dir / "checkpoints", r"is the checkpoints/ directory of the run in"),
        (run_dir, rf"--report {run_dir} is the directory of a training run: a run's directories belong to the run"),
    ]:
        refused(evaluate.main, [*base, "--report", str(report)], message, files["root"])


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc (Linux)")
def test_a_place_nothing_can_be_written_to_is_refused_before_the_model_loads(files, monkeypatch):
    """/proc passes a permission check even for root, and refuses every new file."""
    for module in (train, evaluate):
        monkeypatch.setattr(module, "load_reward_model", _no_model_load)
    monkeypatch.setattr(score_cli.RewardScorer, "from_pretrained", _no_model_load)
    cannot = r": cannot write in /proc \((no such file or directory|permission denied)\); choose another place\."
    argv = args(files, "/proc/rmtorch_test/out")
    refused(train.main, argv, r"--output_dir /proc/rmtorch_test/out" + cannot, files["root"])
    base = ["--model", str(files["model"]), "--bf16", "false"]
    output = ["--input", str(files["eval"]), "--output", "/proc/rmtorch_test/scored.jsonl"]
    refused(score_cli.main, [*base, *output], r"--output /proc/rmtorch_test/scored\.jsonl" + cannot, files["root"])
    report = ["--data", str(files["eval"]), "--report", "/proc/rmtorch_test/report"]
    refused(evaluate.main, [*base, *report], r"--report /proc/rmtorch_test/report" + cannot, files["root"])


def _no_model_load(*args, **kwargs):
    raise AssertionError("the model loaded before the output location was checked")


def test_a_full_disk_during_a_save_stops_cleanly_and_the_run_resumes(files, monkeypatch):
    """The failed save leaves no .tmp-step-* behind (it would keep the disk full) and `latest` as it was."""
    import accelerate

    run_dir = files["root"] / "run"
    save_state, calls = accelerate.Accelerator.save_state, []

    def disk_full_at_the_second_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            (Path(output_dir) / "model.safetensors").write_bytes(b"the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", disk_full_at_the_second_save)
    argv = args(files, run_dir, "--max_steps", "3", "--save_every", "1")
    checkpoints = run_dir / "checkpoints"
    with pytest.raises(SystemExit) as exit_info:
        run(train.main, argv)
    assert exit_info.value.code == (
        f"error: saving checkpoint {checkpoints}/.tmp-step-000002 failed: no space left on device (ENOSPC). The "
        f"incomplete directory was removed; {checkpoints}/latest still names step-000001: free space on that disk (or "
        "move the run to a larger one), then continue with --resume_from latest."
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000001"]
    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)  # space freed
    assert train_in_process([*argv, "--resume_from", "latest"])["train_steps"] == 3
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000002", "step-000003"]


def test_an_unwritable_output_location_is_named(files):
    locked = files["root"] / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if (locked / "probe").exists() or _can_write(locked):  # running as root: permissions do not bind
            pytest.skip("permissions are not enforced for this user (root)")
        refused(
            train.main, args(files, locked / "run"), r"cannot write in .*locked \(permission denied\)", files["root"]
        )
    finally:
        locked.chmod(0o700)


def _can_write(directory: Path) -> bool:
    try:
        (directory / "probe").write_text("")
        (directory / "probe").unlink()
        return True
    except PermissionError:
        return False


# --------------------------------------------------------------------------- options checked at parse time


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--max_grad_norm", "-1", r"--max_grad_norm must be > 0 \(or 0/none to turn clipping off\), got -1"),
        ("--center_rewards_coefficient", "-1", r"--center_rewards_coefficient must be >= 0, got -1\.0"),
        ("--weight_decay", "-5", r"--weight_decay must be >= 0, got -5\.0"),
        ("--warmup_steps", "-3", r"--warmup_steps must be >= 0, got -3"),
        ("--warmup_ratio", "5", r"--warmup_ratio must be in \[0, 1\], got 5\.0"),
        ("--epochs", "0", r"--epochs must be a positive number, got 0\.0"),
        ("--epochs", "-1", r"--epochs must be a positive number, got -1\.0"),
        ("--eval_every", "-1", r"--eval_every must be a positive number, got -1"),
        ("--save_every", "-2", r"--save_every must be a positive number, got -2"),
        ("--log_every", "0", r"--log_every must be a positive number, got 0"),
        ("--cpu_threads", "-1", r"--cpu_threads must be a positive number, got -1"),
        ("--adam_beta1", "1.5", r"--adam_beta1 must be in \[0, 1\), got 1\.5"),
        ("--max_tokens_per_batch", "0", r"--max_tokens_per_batch must be a positive number, got 0"),
        (
            "--report_to",
            "wandbb",
            r"--report_to: unknown tracker\(s\) \['wandbb'\]; Accelerate supports "
            r".*tensorboard",
        ),
    ],
)
def test_out_of_range_training_options_are_refused_before_any_work(files, option, value, message):
    refused(train.main, args(files, files["root"] / "run", option, value), message, files["root"])


def test_no_held_out_data_is_refused(files):
    argv = train_argv(files["model"], files["train"], files["root"] / "run", "--eval_fraction", "0")
    argv.remove("--eval_file")
    argv.remove(str(files["train"]))  # train_argv evaluates on the train file by default; drop that
    argv += ["--train_file", str(files["train"])]
    refused(train.main, argv, r"--eval_fraction 0 leaves nothing to evaluate on", files["root"])


@pytest.mark.parametrize(
    "option, value", [("--max_tokens_per_batch", "0"), ("--n_bins", "0"), ("--length_buckets", "-1")]
)
def test_out_of_range_evaluation_options_are_refused(files, option, value):
    argv = ["--model", str(files["model"]), "--data", str(files["eval"]), option, value]
    refused(evaluate.main, argv, rf"{option} must be a positive number, got {value}", files["root"])


def test_a_yaml_learning_rate_without_a_dot_is_a_number(files):
    recipe = files["root"] / "recipe.yaml"
    recipe.write_text("lr: 2e-5\n")
    results = train_in_process(args(files, files["root"] / "run", "--config", str(recipe)))
    assert json.loads((files["root"] / "run" / "rmtorch_run.json").read_text())["options"]["lr"] == 2e-5
    assert results["train_steps"] == 2


# ------------------------------------------------------------------------------- bytes in = bytes scored


def test_a_misspelled_margin_column_is_refused_and_a_margin_column_is_used(files):
    rows = [{**row, "margin": 3.0} for row in pair_rows(8)]
    data = write_jsonl(files["root"] / "margins.jsonl", rows)
    argv = train_argv(files["model"], data, files["root"] / "run", "--margin_column", "margn")
    refused(train.main, argv, r"no column 'margn' \(--margin_column\) to read margins from", files["root"])
    with_margin = train_in_process(train_argv(files["model"], data, files["root"] / "with"))
    without = train_in_process(train_argv(files["model"], data, files["root"] / "without", "--margin_column", "none"))
    assert with_margin["loss"] > without["loss"] + 1.0  # -logsigmoid(d - 3) vs -logsigmoid(d)


def test_tool_call_rows_are_scored_as_written(files, bos_tokenizer):
    """Two rows whose tool calls have different argument keys: each row's ids are its own conversation's ids."""

    def call(args):
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "now", "arguments": args}}],
        }

    rows = [
        {
            "prompt": [{"role": "user", "content": "what is the time ?"}],
            "chosen": [call({"city": "a"})],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
        {
            "prompt": [{"role": "user", "content": "what is the time ?"}],
            "chosen": [call({"city": "b", "timezone": "c"})],
            "rejected": [{"role": "assistant", "content": "yes"}],
        },
    ]
    pairs = tokenize_pairs(write_jsonl(files["root"] / "tools.jsonl", rows), bos_tokenizer)
    for row, ids in zip(rows, pairs["chosen_ids"]):
        assert ids == chat_ids(bos_tokenizer, row["prompt"] + row["chosen"])
    assert (
        train_in_process(train_argv(files["model"], files["root"] / "tools.jsonl", files["root"] / "run"))["num_pairs"]
        == 2
    )


def test_held_out_duplicates_of_training_pairs_are_counted_and_warned(files, capsys):
    results = train_in_process(train_argv(files["model"], files["train"], files["root"] / "run"))  # eval = train file
    assert results["data"]["eval"]["also_in_train"] == 8
    assert "warning: 8 eval pairs also occur in the training data" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "change, message",
    [
        (("--lr", "1e-3"), r"--lr 5e-05 → 0\.001"),
        (("--batch_size", "4"), r"--batch_size 2 → 4"),
        (("--train_file", "OTHER"), r"--train_file '.*train\.jsonl' → '.*other\.jsonl'"),
        (("CONTENT", ""), r"train_file changed since the run started"),
    ],
)
def test_resume_refuses_changed_data_or_options_and_says_which(files, change, message):
    run_dir = files["root"] / "run"
    train_in_process(args(files, run_dir, "--max_steps", "4", "--save_every", "2"))
    option, value = change
    if option == "CONTENT":
        files["train"].write_text(files["train"].read_text().replace("good", "fine"))
        extra = ()
    elif value == "OTHER":
        other = write_jsonl(files["root"] / "other.jsonl", pair_rows(8, seed=9))
        extra = (option, str(other))
    else:
        extra = (option, value)
    argv = args(files, run_dir, "--max_steps", "4", "--save_every", "2", "--resume_from", "latest", *extra)
    refused(
        train.main, argv, rf"--resume_from: .*run was started with other options or data: .*{message}", files["root"]
    )


def test_resuming_another_runs_checkpoint_checks_that_run_and_writes_only_into_a_fresh_directory(files):
    """--resume_from RUN/checkpoints/step-N --output_dir X: the options are compared with RUN's, and X must be new
    (not the model, not another run); X then gets its own marker, so it can be resumed in turn."""
    run_dir = files["root"] / "run"
    train_in_process(args(files, run_dir, "--max_steps", "4", "--save_every", "2"))
    checkpoint = str(run_dir / "checkpoints" / "step-000002")
    other_run = files["root"] / "other_run"
    train_in_process(args(files, other_run, "--max_steps", "2"))
    resume = ("--max_steps", "4", "--save_every", "2", "--resume_from", checkpoint)
    refused(train.main, args(files, run_dir / "x", *resume, "--lr", "1e-3"), r"--lr 5e-05 → 0\.001", files["root"])
    refused(train.main, args(files, files["model"], *resume), r"model is also an input of this command", files["root"])
    refused(train.main, args(files, other_run, *resume), r"already holds a run with checkpoints", files["root"])
    fork = files["root"] / "fork"
    train_in_process(args(files, fork, *resume))
    assert read_marker(fork)["kind"] == "train" and (fork / "model.safetensors").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]


# ---------------------------------------------------------------------------------------- non-finite rewards


@pytest.fixture
def nan_model(tmp_path, bos_tokenizer):
    from transformers import AutoModelForSequenceClassification

    path = save_tiny_llama(tmp_path / "nan_model", bos_tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(path)
    return path


def test_nan_rewards_stop_score_py_and_evaluate_with_the_row(files, nan_model):
    base = ["--model", str(nan_model), "--bf16", "false"]
    refused(
        score_cli.main,
        [*base, "--input", str(files["eval"]), "--output", str(files["root"] / "out.jsonl")],
        r"eval\.jsonl, row 0, field 'chosen': the "
        r"model gave a non-finite reward \(nan\)",
        files["root"],
    )
    refused(
        evaluate.main,
        [*base, "--data", str(files["eval"]), "--report", str(files["root"] / "report")],
        r"eval\.jsonl, rows \[0, 1, 2, 3\]: the "
        r"model gave non-finite rewards",
        files["root"],
    )


# ------------------------------------------------------------------------------- messages instead of tracebacks


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"train\.jsonl is empty\. Give it at least one"),
        (
            b'{"prompt": "a", "chosen": " b", "rejected": " c", "margin": "big"}\n',
            r"row 0, field 'margin': the margin must "
            r"be a finite number",
        ),
        (
            b'{"prompt": "a", "chosen": " b", "rejected": " b"}\n',
            r"no usable pairs left \(0/1 pairs kept, 1 bad "
            r"rows skipped\)",
        ),
    ],
    ids=["empty file", "bad margin", "no usable pairs"],
)
def test_data_errors_are_one_line_messages(files, content, message):
    files["train"].write_bytes(content)
    extra = ("--on_bad_row", "skip") if b'" b"}' in content else ()
    refused(train.main, args(files, files["root"] / "run", *extra), message, files["root"])


def test_error_rows_are_the_files_own_rows_after_a_split(files):
    rows = pair_rows(20)
    rows[13] = {"prompt": "a", "chosen": " same", "rejected": " same"}
    data = write_jsonl(files["root"] / "pairs.jsonl", rows)
    argv = train_argv(files["model"], data, files["root"] / "run", "--eval_fraction", "0.5")
    argv[argv.index("--eval_file") : argv.index("--eval_file") + 2] = []
    refused(train.main, argv, r"pairs\.jsonl, row 13: 'chosen' and 'rejected' are identical", files["root"])


def test_skip_mode_skips_malformed_lines_too(files):
    files["train"].write_text(files["train"].read_text() + '{"prompt": "a", "chosen": \n')
    results = train_in_process(args(files, files["root"] / "run", "--on_bad_row", "skip"))
    assert (
        results["data"]["train"]["skipped_bad"] == 1
        and "line 9: malformed JSON" in results["data"]["train"]["bad_rows"][0]
    )
