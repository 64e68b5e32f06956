"""train.py --objective steps end to end on a tiny model: step-labelled rows train (packed, padded, LoRA), the loss
goes down, and the run writes step metrics; bad rows stop it with their location before anything is written."""

from __future__ import annotations

import json
import random

import pytest

from tests.conftest import read_jsonl, train_argv, train_in_process, train_records, write_jsonl

WORDS = "what color is the sky blue green red yes no a an of to and in it".split()


def step_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows whose steps ending in 'good' are true and in 'bad' false (a label a tiny model learns)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        labels = [rng.random() < 0.6 for _ in range(rng.randint(1, 4))]
        steps = [" ".join(rng.choices(WORDS, k=rng.randint(1, 4)) + ["good" if ok else "bad"]) for ok in labels]
        rows.append({"prompt": " ".join(rng.choices(WORDS, k=3)), "completions": steps, "labels": labels})
    return rows


@pytest.fixture
def step_files(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", step_rows(32)), write_jsonl(tmp_path / "eval.jsonl", step_rows(8, 1))


@pytest.mark.parametrize(
    "extra",
    [[], ["--packing", "false"], ["--lora", "--lr", "1e-2"], ["--lora", "--load_in_4bit", "--lr", "1e-2"]],
    ids=["packed", "padded", "lora", "qlora"],
)
def test_steps_train_and_report(extra, step_files, tiny_model_dir, tmp_path):
    train, held_out = step_files
    out = tmp_path / "run"
    argv = train_argv(tiny_model_dir, train, out, "--objective", "steps", "--step_separator", ".", "--max_steps", "8",
                      "--lr", "3e-3", "--shuffle", "false", *extra, eval_file=held_out)  # fmt: skip
    results = train_in_process(argv)
    records = train_records(out)
    assert records[-1]["loss"] < records[0]["loss"]
    assert results["num_steps"] == sum(len(r["labels"]) for r in read_jsonl(held_out))
    assert 0 <= results["step_accuracy"] <= 1 and "first_error_accuracy" in results
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["step_accuracy"] == results["step_accuracy"]
    assert [len(s["step_rewards"]) for s in read_jsonl(out / "report" / "scores.jsonl")] == [
        len(r["labels"]) for r in read_jsonl(held_out)
    ]


def test_packed_and_padded_give_the_same_first_step(step_files, tiny_model_dir, tmp_path):
    train, held_out = step_files
    losses = []
    for packing in ("true", "false"):
        out = tmp_path / packing
        options = ("--objective", "steps", "--step_separator", ".", "--max_steps", "1", "--shuffle", "false")
        argv = train_argv(tiny_model_dir, train, out, *options, "--packing", packing, eval_file=held_out)
        train_in_process(argv)
        losses.append(train_records(out)[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_a_bad_step_row_names_file_row_and_field(tiny_model_dir, tmp_path):
    rows = step_rows(4)
    rows[2]["labels"] = rows[2]["labels"] + [True]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"train\.jsonl, row 2, field 'labels': expected a list of \d+ labels"):
        train_in_process(train_argv(tiny_model_dir, train, out, "--objective", "steps", "--step_separator", "."))
    assert not out.exists()
