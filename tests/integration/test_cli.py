"""The command-line scripts as users run them: score.py's output, merge_lora.py, one option convention, and
`error: ...` (file, row, field, what to do) with no traceback, before a model loads or an output appears."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import score as score_cli
from rmtorch.score import RewardScorer
from tests.conftest import REPO_ROOT, launch, pair_rows, run_script, train_argv, train_in_process, write_jsonl
from tests.unit.test_score import PROMPTS, RESPONSES


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
    run_script("merge_lora.py", ["--model", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "plain")])
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
    result = run_script(script, argv, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    import re

    assert re.search(
        message.format(**{k: re.escape(v) for k, v in files.items()}), result.stderr.strip().splitlines()[-1]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output directory, no partial output file


@pytest.mark.parametrize("steps, words", [(1, "training 1 step:"), (2, "training 2 steps:")])
def test_the_step_count_is_said_in_good_english(tmp_path, tiny_model_dir, capsys, steps, words):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    train_in_process(train_argv(tiny_model_dir, data, tmp_path / "out", "--max_steps", str(steps)))
    assert words in capsys.readouterr().out


@pytest.mark.slow
def test_deepspeed_progress_bars_and_log_lines_are_clean(tmp_path, tiny_model_dir):
    """ZeRO's first step called a collective torch deprecates: each process printed a FutureWarning into the
    progress bar. And tqdm.write printed every step line once per process."""
    pytest.importorskip("deepspeed", reason="pip install deepspeed (CPU works: it runs on gloo)")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    result = launch("deepspeed_zero2.yaml", train_argv(tiny_model_dir, data, tmp_path / "out", "--log_every", "1"))
    assert "FutureWarning" not in result.stderr, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split("  ")[0] for line in lines if line.startswith("step ")] == ["step 1/2", "step 2/2"]


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


def test_help_works_for_every_script():
    for script in ("train.py", "evaluate.py", "score.py", "merge_lora.py"):
        result = run_script(script, ["--help"])
        assert "--model" in result.stdout and "--config" in result.stdout
