"""The command-line scripts as users run them: score.py's output, merge_lora.py, one option convention, and
`error: ...` (file, row, field, what to do) with no traceback, before a model loads or an output appears.

One error case per script runs the script in a fresh interpreter, as a user does (the last line of stderr, status
1, no traceback); the other cases call the script's main through rmtorch.cli.run, which makes that line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import evaluate
import merge_lora
import score as score_cli
import train
from rmtorch.cli import run
from rmtorch.score import RewardScorer
from tests.conftest import (
    PROMPTS,
    REPO_ROOT,
    RESPONSES,
    pair_rows,
    run_script,
    train_argv,
    train_in_process,
    write_jsonl,
)

SCRIPTS = {"train.py": train, "evaluate.py": evaluate, "score.py": score_cli, "merge_lora.py": merge_lora}


@pytest.mark.parametrize("layout", ["pairs", "completions"])
def test_score_py_scores_a_file_and_keeps_every_input_field(tmp_path, tiny_model_dir, layout):
    if layout == "pairs":
        rows = [
            {"prompt": p, "chosen": r, "rejected": " no", "id": i, "meta": {"k": [i]}}
            for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))
        ]
    else:
        rows = [
            {"prompt": p, "completion": r, "id": i, "meta": {"k": [i]}}
            for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))
        ]
    source, output = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    score_cli.main(
        [
            "--model",
            str(tiny_model_dir),
            "--input",
            str(source),
            "--output",
            str(output),
            "--rows_per_chunk",
            "3",
            "--bf16",
            "false",
        ]
    )
    scored = [json.loads(line) for line in output.read_text().splitlines()]
    scorer = RewardScorer.from_pretrained(str(tiny_model_dir), device="cpu")
    assert [{k: v for k, v in row.items() if not k.endswith("reward")} for row in scored] == rows
    if layout == "pairs":
        torch.testing.assert_close(
            torch.tensor([row["chosen_reward"] for row in scored]), scorer(PROMPTS, RESPONSES), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor([row["rejected_reward"] for row in scored]), scorer(PROMPTS, [" no"] * 4), atol=1e-5, rtol=0
        )
    else:
        torch.testing.assert_close(
            torch.tensor([row["reward"] for row in scored]), scorer(PROMPTS, RESPONSES), atol=1e-5, rtol=0
        )


def test_merge_lora_py_writes_a_plain_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    train_in_process(train_argv(tiny_model_dir, data, tmp_path / "adapter", "--lora", "--lora_r", "4"))
    run(merge_lora.main, ["--model", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "plain")])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain")
    assert not any("lora" in name for name in model.state_dict())


# Each case: (script, arguments, message). Files named in the arguments are created by the test below.
ERROR_CASES = {
    "train: bad row": (
        "train.py",
        ["--train_file", "{bad}"],
        r"error: {bad}, row 1: 'chosen' and 'rejected' are identical",
    ),
    "train: unknown option": ("train.py", ["--learning_rate", "1"], r"error: unknown option\(s\) --learning_rate 1"),
    "train: value out of range": (
        "train.py",
        ["--max_grad_norm", "-1"],
        r"error: --max_grad_norm must be > 0 \(or 0/none to turn clipping off\), got -1",
    ),
    "evaluate: missing data file": (
        "evaluate.py",
        ["--model", "{model}", "--data", "{tmp}/nope.jsonl"],
        r"error: {tmp}/nope\.jsonl: no such file",
    ),
    "evaluate: no --data": ("evaluate.py", ["--model", "{model}"], r"error: --data is required"),
    "score: no completions": (
        "score.py",
        ["--model", "{model}", "--input", "{no_completion}", "--output", "{tmp}/out.jsonl"],
        r"error: {no_completion}: rows have fields \['prompt', 'text'\]; a row needs 'completion'",
    ),
    "score: output is the input": (
        "score.py",
        ["--model", "{model}", "--input", "{good}", "--output", "{good}"],
        r"error: --output {good} is also an input of this command",
    ),
    "score: tensor parallelism on the torch engine": (
        "score.py",
        ["--model", "{model}", "--input", "{good}", "--output", "{tmp}/out.jsonl", "--tensor_parallel_size", "2"],
        r"error: --tensor_parallel_size 2 needs --engine vllm \(the torch engine runs on one device\)",
    ),
    "merge: a full model": (
        "merge_lora.py",
        ["--model", "{model}"],
        r"error: {model} holds a full model, not a LoRA adapter \(no adapter_config\.json\): it needs no merge, load "
        r"it as is\. Merging expects the output directory of `train\.py --lora`, which holds adapter_config\.json",
    ),
    "merge: no such path": (
        "merge_lora.py",
        ["--model", "{tmp}/nope"],
        r"error: {tmp}/nope does not exist\. Merging expects the output directory of `train\.py --lora`",
    ),
    "merge: not a model": (
        "merge_lora.py",
        ["--model", "{tmp}"],
        r"error: {tmp} is not a LoRA adapter directory \(no adapter_config\.json\)\. Merging expects",
    ),
    "train: output_dir where nothing can be created": (
        "train.py",
        ["--output_dir", "/proc/rmtorch_test/out"],
        r"error: --output_dir /proc/rmtorch_test/out: cannot write in /proc \((no such file or directory|permission "
        r"denied)\); choose another place\.",
    ),
}


# The cases that run their script in a fresh interpreter: one per script.
IN_SUBPROCESS = ("train: bad row", "evaluate: missing data file", "score: output is the input", "merge: a full model")


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_one_line_without_a_traceback_and_leave_nothing_behind(tmp_path, tiny_model_dir, case):
    script, argv, message = ERROR_CASES[case]
    files = {
        "tmp": str(tmp_path),
        "model": str(tiny_model_dir),
        "good": str(write_jsonl(tmp_path / "good.jsonl", pair_rows(4))),
        "bad": str(
            write_jsonl(
                tmp_path / "bad.jsonl",
                [{"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "a", "chosen": " x", "rejected": " x"}],
            )
        ),
        "no_completion": str(write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "hello", "text": "x"}])),
    }
    argv = [arg.format(**files) for arg in argv]
    if script == "train.py":
        argv = train_argv(tiny_model_dir, files["good"], tmp_path / "out") + argv
    before = sorted(p.name for p in tmp_path.iterdir())
    if case in IN_SUBPROCESS:
        result = run_script(script, argv, check=False)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        error = result.stderr.strip().splitlines()[-1]
    else:
        with pytest.raises(SystemExit) as exit_info:  # only a user's error becomes SystemExit; a bug keeps its type
            run(SCRIPTS[script].main, argv)
        error = exit_info.value.code
        assert isinstance(error, str) and "\n" not in error  # one line, which Python prints, exiting with status 1
    assert re.search(message.format(**{k: re.escape(v) for k, v in files.items()}), error), error
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output directory, no partial output file


@pytest.mark.parametrize("steps, words", [(1, "training 1 step, one process:"), (2, "training 2 steps, one process:")])
def test_the_step_count_is_said_in_good_english(tmp_path, tiny_model_dir, capsys, steps, words):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    train_in_process(train_argv(tiny_model_dir, data, tmp_path / "out", "--max_steps", str(steps)))
    assert words in capsys.readouterr().out


def test_import_rmtorch_is_cheap_and_changes_nothing():
    code = (
        "import logging, sys\n"
        "levels = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}\n"
        "import rmtorch\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
        "assert {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict} == levels\n"
        "assert rmtorch.RewardScorer.__module__ == 'rmtorch.score' and callable(rmtorch.group_advantages)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_help_works_for_every_script(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].main(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert "--model" in shown and "--config" in shown
