"""Core behaviour without TRL: truncation policies, pooling, loss formula, config parsing, built-in data."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
import torch.nn.functional as F

from rmtorch.config import parse_config
from rmtorch.data import from_llmbar, from_sharegpt, load_pairs, tokenize_pairs
from rmtorch.loss import eval_metrics, pair_metrics, pairwise_loss
from rmtorch.modeling import last_token_index
from rmtorch.synthetic import builtin_pairs
from tests.conftest import shared_path


def test_keep_end_cuts_the_prompt_from_the_left_and_keeps_bos(bos_tokenizer):
    row = {"prompt": "what color is the sky ? " * 5, "chosen": " blue", "rejected": " it is green"}
    full, _ = tokenize_pairs(datasets.Dataset.from_list([row]), bos_tokenizer, return_report=True)
    cut, report = tokenize_pairs(datasets.Dataset.from_list([row]), bos_tokenizer, max_length=10, truncation="keep_end", return_report=True)
    assert report.truncated == 1 and report.dropped_too_long == 0
    for name in ("chosen_ids", "rejected_ids"):
        ids, whole = cut[name][0], full[name][0]
        assert len(ids) <= 10
        assert ids[0] == bos_tokenizer.bos_token_id  # BOS survives
        assert ids[1:] == whole[len(whole) - len(ids) + 1:]  # the end, response included, is intact
    prompt_length = len(full["chosen_ids"][0]) - len(cut["chosen_ids"][0])
    assert len(full["rejected_ids"][0]) - len(cut["rejected_ids"][0]) == prompt_length  # the same prompt tokens cut from both


def test_keep_end_drops_and_counts_a_pair_whose_response_alone_is_too_long(bos_tokenizer):
    rows = [{"prompt": "hello", "chosen": " blue " * 20, "rejected": " no"}, {"prompt": "hello", "chosen": " yes", "rejected": " no"}]
    kept, report = tokenize_pairs(datasets.Dataset.from_list(rows), bos_tokenizer, max_length=8, truncation="keep_end", return_report=True)
    assert len(kept) == 1 and report.dropped_too_long == 1 and report.pairs_out == 1


def test_drop_counts_every_dropped_pair(smol_tokenizer):
    rows = [{"prompt": "p" * n, "chosen": " yes", "rejected": " no"} for n in (1, 200, 400)]
    kept, report = tokenize_pairs(datasets.Dataset.from_list(rows), smol_tokenizer, max_length=60, return_report=True)
    assert report.rows_in == 3 and report.pairs_out == len(kept) == 1 and report.dropped_too_long == 2
    assert "2 dropped" in report.summary()


def test_skip_counts_bad_rows_and_keeps_their_messages(bos_tokenizer):
    rows = [{"prompt": "a", "chosen": " yes", "rejected": " no"}, {"prompt": "a", "chosen": " same", "rejected": " same"}, {"prompt": "a", "chosen": "  ", "rejected": " no"}]
    kept, report = tokenize_pairs(rows, bos_tokenizer, on_bad_row="skip", source="pairs.jsonl", return_report=True)
    assert len(kept) == 1 and report.skipped_bad == 2
    assert "pairs.jsonl, row 1" in report.bad_rows[0] and "identical" in report.bad_rows[0]
    assert "pairs.jsonl, row 2, field 'chosen'" in report.bad_rows[1]


@pytest.mark.parametrize("mask,expected", [([1, 1, 1, 0, 0], 2), ([0, 0, 1, 1, 1], 4), ([1, 1, 1, 1, 1], 4), ([0, 1, 0, 0, 0], 1)])
def test_last_token_index_follows_the_attention_mask(mask, expected):
    assert last_token_index(torch.tensor([mask])).item() == expected


def test_pairwise_loss_is_the_formula():
    r_c, r_r, m = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5]), torch.tensor([0.1, 0.0, 1.0])
    expected = -F.logsigmoid(r_c - r_r - m).mean() + 0.01 * ((r_c + r_r) ** 2).mean()
    assert pairwise_loss(r_c, r_r, m, 0.01).item() == pytest.approx(expected.item(), abs=1e-6)
    assert pairwise_loss(torch.zeros(2), torch.zeros(2)).item() == pytest.approx(math.log(2))


def test_metrics_are_pair_weighted_and_ties_are_wrong():
    r_c, r_r = torch.tensor([1.0, 0.0, 3.0, 2.0]), torch.tensor([0.0, 0.0, 4.0, 1.0])
    assert pair_metrics(r_c, r_r)["accuracy"] == 0.5  # the tie (0, 0) counts as wrong, as in TRL
    metrics = eval_metrics(r_c, r_r)
    assert metrics["ties"] == 1 and metrics["num_pairs"] == 4
    assert metrics["margin"] == pytest.approx(0.25)
    assert metrics["loss"] == pytest.approx((-F.logsigmoid(r_c - r_r)).mean().item())


def test_config_yaml_then_cli_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 3.0e-4\nbatch_size: 4\nmax_length: null\nbf16: false\n")
    cfg = parse_config(["--config", str(recipe), "--lr", "2e-5", "--max_steps", "7"])
    assert cfg.lr == 2e-5 and cfg.batch_size == 4 and cfg.max_length is None and cfg.bf16 is False and cfg.max_steps == 7


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 1e-4\n")
    with pytest.raises(SystemExit, match="unknown key.*learning_rate"):
        parse_config(["--config", str(recipe)])
    with pytest.raises(SystemExit, match="lr must be a positive number"):
        parse_config(["--lr", "-1"])
    with pytest.raises(SystemExit, match="unknown option"):
        parse_config(["--learning_rate", "1"])


def test_builtin_dataset_is_deterministic_and_valid(smol_tokenizer):
    rows = builtin_pairs(60, seed=3)
    assert rows == builtin_pairs(60, seed=3) and rows != builtin_pairs(60, seed=4)
    assert {r["category"] for r in rows} == {"arithmetic", "thinking", "facts"}
    tokenized, report = tokenize_pairs(rows, smol_tokenizer, return_report=True)
    assert report.pairs_out == 60 and report.skipped_bad == 0


def test_real_data_layouts_load_as_conversations(bos_tokenizer):
    sharegpt = load_pairs(shared_path("data", "llamafactory", "dpo_en_demo.json"))
    assert len(sharegpt) == 300 and sharegpt[0]["chosen"][0]["role"] == "assistant"
    row = {"input": "q", "output_1": "a", "output_2": "b", "label": 2}
    assert from_llmbar(row)["chosen"][0]["content"] == "b" and from_llmbar({**row, "label": "1"})["chosen"][0]["content"] == "a"
    converted = from_sharegpt({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}})
    assert [m["role"] for m in converted["prompt"]] == ["system", "user"]
