"""train.py on groups and ties: on pair data --loss all_pairs and listwise train exactly as pairwise; group data
trains with both group losses (LoRA too) and reports pairwise accuracy within groups and Kendall's tau; ties train
with --tie_nu; the refusals say what to do.

The group data is synthetic (no real group data is available offline; docs/design.md): each prompt's three
responses end in 'good' (rank 1), 'yes' (rank 2) and 'bad' (rank 3), listed in a shuffled order."""

from __future__ import annotations

import json
import random

import pytest

from tests.conftest import PAIR_WORDS, pair_rows, train_argv, train_in_process, train_records, write_jsonl

STEPS = ("--max_steps", "3", "--lr", "1e-3", "--shuffle", "false", "--warmup_ratio", "0", "--batch_size", "3")


def group_rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pick = lambda n: " ".join(rng.choice(PAIR_WORDS) for _ in range(n))  # noqa: E731
    rows = []
    for i in range(count):
        ranked = [(f" {pick(1 + i % 3)} good", 1), (f" {pick(1 + i % 2)} yes", 2), (f" {pick(2)} bad", 3)]
        rng.shuffle(ranked)
        rows.append({"prompt": pick(2 + i % 5), "responses": [r for r, _ in ranked], "ranks": [k for _, k in ranked]})
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("group_data")
    return {
        "pairs": write_jsonl(root / "pairs.jsonl", [{**r, "margin": i / 10} for i, r in enumerate(pair_rows(9, 4))]),
        "groups": write_jsonl(root / "groups.jsonl", group_rows(9)),
        "ties": write_jsonl(root / "ties.jsonl", [{**r, "tie": i % 3 == 0} for i, r in enumerate(pair_rows(9, 5))]),
    }


def run(tmp_path, name, model_dir, train_file, *flags) -> tuple[dict, list[dict]]:
    out = tmp_path / name
    results = train_in_process(train_argv(model_dir, train_file, out, *STEPS, *flags))
    return results, train_records(out)


def test_on_pairs_every_loss_trains_exactly_as_pairwise(tmp_path, tiny_model_dir, data):
    _, pairwise = run(tmp_path, "pairwise", tiny_model_dir, data["pairs"])
    for loss in ("all_pairs", "listwise"):
        _, records = run(tmp_path, loss, tiny_model_dir, data["pairs"], "--loss", loss)
        assert [r["loss"] for r in records] == [r["loss"] for r in pairwise]
        assert [r["grad_norm"] for r in records] == [r["grad_norm"] for r in pairwise]


@pytest.mark.parametrize("loss", ["all_pairs", "listwise"])
def test_groups_train_and_report_accuracy_within_groups_and_kendall_tau(tmp_path, tiny_model_dir, data, loss):
    results, records = run(tmp_path, loss, tiny_model_dir, data["groups"], "--loss", loss, "--group_margin", "0.5")
    assert len(records) == 3 and all(r["loss"] > 0 for r in records)
    assert (results["num_groups"], results["num_responses"], results["num_pairs"]) == (9, 27, 27)
    assert -1 <= results["kendall_tau"] <= 1 and 0 <= results["accuracy"] <= 1
    saved = json.loads((tmp_path / loss / "eval_results.json").read_text())
    assert saved["kendall_tau"] == results["kendall_tau"] and saved["data"]["train"]["groups_out"] == 9
    lines = (tmp_path / loss / "report" / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 27 and {"better", "worse", "chosen_reward"} <= set(json.loads(lines[0]))


@pytest.mark.parametrize("extra", [(), ("--load_in_4bit",)], ids=["lora", "qlora"])
def test_a_lora_group_run_trains(tmp_path, tiny_model_dir, data, extra):
    results, records = run(
        tmp_path, "lora", tiny_model_dir, data["groups"], "--loss", "listwise", "--lora", "--lora_r", "4", *extra
    )
    assert len(records) == 3 and (tmp_path / "lora" / "adapter_model.safetensors").exists()
    assert results["num_groups"] == 9
    assert json.loads((tmp_path / "lora" / "rmtorch_adapter.json").read_text())["load_in_4bit"] == bool(extra)


def test_tied_pairs_train_with_a_tie_model_and_are_refused_without(tmp_path, tiny_model_dir, data):
    _, records = run(tmp_path, "ties", tiny_model_dir, data["ties"], "--tie_nu", "1.0")
    assert len(records) == 3 and all(r["loss"] > 0 for r in records)
    with pytest.raises(Exception, match=r"ties.jsonl, rows \[0, 3, 6\]: 3 pairs are labelled tie: true.*--tie_nu"):
        run(tmp_path, "no_tie_model", tiny_model_dir, data["ties"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((), r"holds groups of responses: train them with --loss all_pairs or listwise"),
        (("--loss", "all_pairs", "--packing", "false"), r"groups train on packed rows only.*--packing true"),
        (("--loss", "listwise", "--tie_nu", "1"), r"--tie_nu needs --loss pairwise or all_pairs"),
        (("--group_margin", "1"), r"--group_margin applies to groups: add --loss all_pairs or listwise"),
    ],
)
def test_group_runs_refuse_what_they_cannot_do(tmp_path, tiny_model_dir, data, flags, message):
    with pytest.raises((ValueError, SystemExit), match=message):  # config checks exit, data checks raise
        run(tmp_path, "refused", tiny_model_dir, data["groups"], *flags)
    assert not (tmp_path / "refused" / "model.safetensors").exists()


def test_evaluate_py_reports_a_group_file_as_training_does(tmp_path, tiny_model_dir, data):
    import evaluate

    results, _ = run(tmp_path, "groups", tiny_model_dir, data["groups"], "--loss", "listwise")
    run_dir = tmp_path / "groups"
    report = evaluate.main(["--model", str(run_dir), "--data", str(data["groups"]), "--report", str(tmp_path / "rep")])
    assert report["num_groups"] == results["num_groups"] and report["num_pairs"] == results["num_pairs"]
    assert report["kendall_tau"] == pytest.approx(results["kendall_tau"], abs=1e-6)
    assert report["accuracy"] == pytest.approx(results["accuracy"], abs=1e-9)
    lines = [json.loads(line) for line in (tmp_path / "rep" / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == report["num_pairs"] and {"better", "worse"} <= set(lines[0])
