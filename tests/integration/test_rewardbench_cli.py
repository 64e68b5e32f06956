"""evaluate.py --benchmark end to end on a tiny model, with samples in the published v1 and v2 schemas generated
here: rewards against a one-by-one forward of the saved model on the chat template, the scores against direct
computation from the per-row file, the same scores at any batch size with packing on or off, each prompt
computed once, and bad rows stopped before the model loads."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import torch

import evaluate
from rmtorch.cli import run
from rmtorch.files import PairDataError, read_rows
from rmtorch.loading import load_reward_model
from rmtorch.model import RewardModel, compute_rewards
from rmtorch.rewardbench import V1_EXAMPLE_COUNTS, V1_ROWS, V1_SECTIONS, V2_ROWS
from rmtorch.rewardbench_data import read_prompts, tokenize_prompts
from tests.conftest import PAIR_WORDS, assert_real_png, read_jsonl, save_tiny_llama, write_jsonl


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(PAIR_WORDS) for _ in range(rng.randint(low, high)))


def v1_rows(seed: int = 0) -> list[dict]:
    """Two rows per v1 subset in the published schema (model columns included). As in the published data, an
    alpacaeval prompt recurs in another subset; one pair has identical texts, so its rewards tie (scored wrong)."""
    rng = random.Random(seed)
    rows = [
        {"prompt": words(rng, 2, 9), "chosen": words(rng, 1, 5), "chosen_model": "gpt-4", "rejected": words(rng, 1, 5),
         "rejected_model": "llama-2", "subset": subset, "id": 30 + i}
        for i, subset in enumerate(name for name in V1_ROWS for _ in range(2))
    ]  # fmt: skip
    rows[2]["prompt"] = rows[0]["prompt"]
    rows[5]["rejected"] = rows[5]["chosen"]
    return rows


def v2_row(rng: random.Random, subset: str, row_id: str, num_correct: int, num_incorrect: int) -> dict:
    chosen = [words(rng, 1, 6) for _ in range(num_correct)]
    rejected = [words(rng, 1, 6) for _ in range(num_incorrect)]
    return {
        "id": row_id, "prompt": words(rng, 2, 9), "chosen": chosen, "rejected": rejected,
        "num_correct": num_correct, "num_incorrect": num_incorrect, "total_completions": num_correct + num_incorrect,
        "models": ["m"] * (num_correct + num_incorrect), "subset": subset,
    }  # fmt: skip


def v2_rows(seed: int = 0) -> list[dict]:
    """Two best-of-4 rows per subset outside Ties (in one, the chosen text is also a rejected one: a tie), and
    two Ties questions, each as a 'ref' row (one correct answer) and a 'tied' row (three)."""
    rng = random.Random(seed)
    rows = [
        v2_row(rng, subset, str(i), 1, 3) for i, subset in enumerate(n for n in V2_ROWS if n != "Ties" for _ in "ab")
    ]
    rows[0]["rejected"][1] = rows[0]["chosen"][0]
    for number in range(2):
        rows += [v2_row(rng, "Ties", f"ref:{number}", 1, 2), v2_row(rng, "Ties", f"tied:{number}", 3, 2)]
    return rows


def write_parquet(path, rows: list[dict]):
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bos_tokenizer):
    """The tiny model scored on a v1 sample (JSONL) and a v2 sample (Parquet), fp32, several forwards each."""
    root = tmp_path_factory.mktemp("rewardbench")
    model_dir = save_tiny_llama(root / "model", bos_tokenizer, seed=3)
    data = {
        "rewardbench": write_jsonl(root / "v1.jsonl", v1_rows()),
        "rewardbench2": write_parquet(root / "v2.parquet", v2_rows()),
    }
    out = {"model_dir": model_dir, "data": data, "report_dir": root / "report"}
    for name, path in data.items():
        argv = ["--model", str(model_dir), "--data", str(path), "--benchmark", name, "--bf16", "false"]
        out[name] = {"argv": argv, "report": evaluate.main([*argv, "--max_tokens_per_batch", "64", "--report",
                                                           str(root / "report")])}  # fmt: skip
    return out


def chat_reward(model, tokenizer, prompt: str, completion: str) -> float:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.item()


def row_rewards(line: dict) -> list[float]:
    """A scores line's rewards, chosen first: v1 (chosen_reward, rejected_reward) or v2's lists."""
    if "chosen_rewards" in line:
        return line["chosen_rewards"] + line["rejected_rewards"]
    return [line["chosen_reward"], line["rejected_reward"]]


@pytest.mark.parametrize("name", ["rewardbench", "rewardbench2"])
def test_rewards_equal_a_one_by_one_forward_on_the_chat_template(runs, bos_tokenizer, name):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(runs["model_dir"]).eval()
    rows = read_rows(runs["data"][name]).rows
    lines = read_jsonl(runs["report_dir"] / f"{name}_scores.jsonl")
    assert [(line["row"], line["id"], line["subset"]) for line in lines] == [
        (i, row["id"], row["subset"]) for i, row in enumerate(rows)
    ]
    for row, line in zip(rows, lines):
        texts = row["chosen"] + row["rejected"] if name == "rewardbench2" else [row["chosen"], row["rejected"]]
        expected = [chat_reward(model, bos_tokenizer, row["prompt"], text) for text in texts]
        np.testing.assert_allclose(row_rewards(line), expected, rtol=1e-5, atol=1e-5)


def test_v1_scores_equal_direct_computation_from_the_rewards(runs):
    lines = read_jsonl(runs["report_dir"] / "rewardbench_scores.jsonl")
    report = json.loads((runs["report_dir"] / "rewardbench.json").read_text())
    assert report["subsets"] == runs["rewardbench"]["report"]["subsets"] and report["num_rows"] == 46
    assert lines[5]["chosen_reward"] == lines[5]["rejected_reward"] and lines[5]["result"] == 0.0  # the tie
    accuracy = {}
    for subset in V1_ROWS:
        results = [line["chosen_reward"] > line["rejected_reward"] for line in lines if line["subset"] == subset]
        accuracy[subset] = sum(results) / len(results)
    assert report["subsets"] == pytest.approx(accuracy, abs=1e-12)
    for section, subsets in V1_SECTIONS.items():
        weights = [V1_EXAMPLE_COUNTS[s] for s in subsets]
        expected = sum(accuracy[s] * w for s, w in zip(subsets, weights)) / sum(weights)
        assert report["sections"][section] == pytest.approx(expected, abs=1e-12)
    assert report["overall"] == pytest.approx(sum(report["sections"].values()) / 4, abs=1e-12)
    assert not report["complete"] and report["missing_subsets"] == []  # 2 rows a subset, not the published counts
    assert report["data"]["rows_scored"] == 46 and report["model"] == str(runs["model_dir"])


def test_v2_scores_equal_direct_computation_from_the_rewards(runs):
    from rmtorch.rewardbench import ties_score

    lines = read_jsonl(runs["report_dir"] / "rewardbench2_scores.jsonl")
    report = json.loads((runs["report_dir"] / "rewardbench2.json").read_text())
    assert lines[0]["chosen_rewards"][0] == lines[0]["rejected_rewards"][1]  # the same text, the same reward
    expected = {}
    for subset in V2_ROWS:
        if subset == "Ties":
            continue
        credits = []
        for line in (line for line in lines if line["subset"] == subset):
            rewards = line["chosen_rewards"] + line["rejected_rewards"]
            top = max(rewards)
            credits.append(1 / rewards.count(top) if rewards[0] == top else 0.0)
            assert line["result"] == credits[-1]
        expected[subset] = sum(credits) / len(credits)
    ties = [(line["id"], 3 if line["id"].startswith("tied") else 1, line["chosen_rewards"] + line["rejected_rewards"])
            for line in lines if line["subset"] == "Ties"]  # fmt: skip
    expected["Ties"] = ties_score(ties)["score"]
    assert report["subsets"] == pytest.approx(expected, abs=1e-12) and list(report["subsets"]) == list(V2_ROWS)
    assert report["ties"] == pytest.approx(ties_score(ties), abs=1e-12)
    assert report["overall"] == pytest.approx(sum(expected.values()) / 6, abs=1e-12)


def test_report_files_and_printed_table(runs, capsys):
    assert_real_png(runs["report_dir"] / "rewardbench.png")
    assert_real_png(runs["report_dir"] / "rewardbench2.png")
    report = evaluate.main(runs["rewardbench2"]["argv"])  # no --report: print only
    out = capsys.readouterr().out
    assert f"data {runs['data']['rewardbench2']}: 14/14 rows scored" in out
    assert "RewardBench 2: 14 rows\n  Factuality" in out
    assert re.search(rf"^  overall +{report['overall']:.4f}$", out, re.MULTILINE)


@pytest.mark.parametrize("name", ["rewardbench", "rewardbench2"])
def test_batch_size_and_packing_do_not_change_the_scores(runs, name):
    base = read_jsonl(runs["report_dir"] / f"{name}_scores.jsonl")
    # Results can only stay equal when no two rewards of a row differ by less than the tolerance.
    gaps = [abs(a - b) for line in base for a in row_rewards(line) for b in row_rewards(line) if a != b]
    assert min(gaps) > 1e-4
    for options in (
        ["--packing", "true", "--max_tokens_per_batch", "16"],
        ["--packing", "false", "--max_tokens_per_batch", "100000"],
        ["--packing", "false", "--max_tokens_per_batch", "24"],
        ["--packing", "true", "--max_tokens_per_batch", "100000"],
    ):
        report_dir = runs["report_dir"].parent / f"report-{name}-{options[1]}-{options[3]}"
        report = evaluate.main([*runs[name]["argv"], *options, "--report", str(report_dir)])
        lines = read_jsonl(report_dir / f"{name}_scores.jsonl")
        np.testing.assert_allclose(
            [r for line in lines for r in row_rewards(line)], [r for line in base for r in row_rewards(line)],
            rtol=0, atol=1e-5,
        )  # fmt: skip
        # Accuracies match exactly; Ties' margin term moves with the rewards.
        assert report["subsets"] == pytest.approx(runs[name]["report"]["subsets"], rel=0, abs=1e-5), options


def test_each_prompt_is_computed_once_for_all_its_completions(runs):
    model, tokenizer = load_reward_model(str(runs["model_dir"]))
    prompts, report = read_prompts(read_rows(runs["data"]["rewardbench2"]), "rewardbench2")
    tokenized = tokenize_prompts(prompts, tokenizer, report)
    tokens_in = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, output: tokens_in.append(args[0].numel()))
    compute_rewards(RewardModel(model), tokenized.sequences, tokenized.prompt_lengths, packing=True)
    # Each distinct completion runs its own tokens, each distinct prompt its tokens once.
    shared = dict(zip(map(tuple, tokenized.sequences), tokenized.prompt_lengths))
    prompts_once = {ids[:length] for ids, length in shared.items()}
    assert len(prompts) == 14 and len(prompts_once) == 14 and len(shared) == len(tokenized.sequences) - 1
    assert sum(tokens_in) == sum(len(ids) - length for ids, length in shared.items()) + sum(map(len, prompts_once))


# --------------------------------------------------------------------------------------------------- bad input


def test_a_bad_row_stops_the_run_before_the_model_loads(tmp_path):
    rows = v2_rows()
    rows[3]["num_correct"] = 2
    data = write_jsonl(tmp_path / "v2.jsonl", rows)
    argv = ["--model", str(tmp_path / "not_a_model"), "--data", str(data), "--benchmark", "rewardbench2"]
    with pytest.raises(PairDataError, match=r"v2.jsonl, row 3, field 'num_correct': 2, but 'chosen' holds 1"):
        evaluate.main(argv)
    with pytest.raises(SystemExit, match=r"^error: .*v2.jsonl, row 3, field 'num_correct'"):
        run(evaluate.main, argv)


def test_skipped_rows_are_counted_in_the_report(runs, tmp_path):
    rows = v1_rows()
    rows[7]["subset"] = "chat"
    del rows[8]["prompt"]
    data = write_jsonl(tmp_path / "v1.jsonl", rows)
    argv = [*runs["rewardbench"]["argv"][:2], "--data", str(data), "--benchmark", "rewardbench", "--bf16", "false"]
    report = evaluate.main([*argv, "--on_bad_row", "skip"])
    assert (report["num_rows"], report["data"]["skipped_bad"], report["data"]["rows_in"]) == (44, 2, 46)
    assert "row 7, field 'subset': unknown subset 'chat'" in report["data"]["bad_rows"][0]
    assert report["subset_rows"]["mt-bench-easy"] == 1 and report["subset_rows"]["mt-bench-med"] == 1


def test_the_command_line_prints_the_table_and_writes_the_report(runs, tmp_path, capsys):
    """What evaluate.py's command line runs (test_cli runs the script itself in a fresh interpreter)."""
    out = tmp_path / "cli_report"
    run(evaluate.main, [*runs["rewardbench"]["argv"], "--report", str(out)])
    printed = capsys.readouterr().out
    assert "RewardBench v1: 46 rows" in printed and "  Chat Hard" in printed
    assert f"report in {out}: rewardbench.json, rewardbench_scores.jsonl, rewardbench.png" in printed
    assert json.loads((out / "rewardbench.json").read_text())["overall"] == pytest.approx(
        runs["rewardbench"]["report"]["overall"], abs=1e-12
    )
