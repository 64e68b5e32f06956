"""rmtorch.files: rows exactly as the file holds them, the file's own row numbers, foreign layouts, atomic writes."""

from __future__ import annotations

import json

import datasets
import pytest

from rmtorch.files import PairDataError, Rows, from_llmbar, from_sharegpt, load_pairs, read_rows, write_json
from tests.conftest import shared_path, write_jsonl

TOOL_ROWS = [
    {
        "prompt": [{"role": "user", "content": "time in Paris?"}],
        "chosen": [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "now", "arguments": {"city": "Paris"}}}],
            }
        ],
        "rejected": [{"role": "assistant", "content": "noon"}],
    },
    {
        "prompt": [{"role": "user", "content": "time in Rome?"}],
        "chosen": [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "now", "arguments": {"city": "Rome", "timezone": "CET"}}}
                ],
            }
        ],
        "rejected": [{"role": "assistant", "content": "midnight"}],
    },
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_rows_keep_their_nested_fields_exactly(tmp_path, suffix):
    """Arrow would give row 0's tool-call arguments a `"timezone": null` from row 1; rmtorch keeps each row as
    written."""
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, TOOL_ROWS)
    else:
        path.write_text(json.dumps(TOOL_ROWS))
    rows = read_rows(path)
    assert rows.to_list() == TOOL_ROWS
    assert "timezone" not in rows[0]["chosen"][0]["tool_calls"][0]["function"]["arguments"]


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}).encode() + b"\n")
    assert read_rows(path).to_list() == [{"prompt": "a", "chosen": "b", "rejected": "c"}]


def test_skip_mode_skips_and_records_malformed_lines_and_non_objects(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": \n[1, 2]\n{"chosen": "c", "rejected": "d"}\n')
    rows = read_rows(path, on_bad_row="skip")
    assert [r["chosen"] for r in rows] == ["a", "c"]
    assert rows.numbers == [0, 3]  # the file's own rows: the bad ones still count
    assert len(rows.bad_rows) == 2
    assert rows.bad_rows[0].startswith(f"{path}, line 2: malformed JSON")
    assert rows.bad_rows[1] == f"{path}, row 2: expected a JSON object with chosen/rejected fields, got list."


def test_split_is_the_datasets_permutation_and_keeps_file_row_numbers(tmp_path):
    original = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(20)]
    rows = read_rows(write_jsonl(tmp_path / "pairs.jsonl", original))
    train, held_out = rows.split(0.25, seed=42)
    reference = datasets.Dataset.from_list(original).train_test_split(test_size=0.25, seed=42)
    assert train.to_list() == reference["train"].to_list() and held_out.to_list() == reference["test"].to_list()
    assert [original[n] for n in held_out.numbers] == held_out.to_list()
    assert held_out.where(0) == f"{tmp_path / 'pairs.jsonl'}, row {held_out.numbers[0]}"


def test_a_split_that_leaves_a_side_empty_is_refused():
    rows = Rows([{"chosen": "a", "rejected": "b"}], "one.jsonl")
    with pytest.raises(
        PairDataError, match=r"one\.jsonl: holding out 0\.5 of 1 rows leaves 1 held-out and 0 training rows"
    ):
        rows.split(0.5, seed=0)


def test_parquet_and_datasets_directory(tmp_path):
    original = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
    dataset = datasets.Dataset.from_list(original)
    dataset.to_parquet(tmp_path / "pairs.parquet")
    dataset.save_to_disk(tmp_path / "saved")
    assert read_rows(tmp_path / "pairs.parquet").to_list() == original
    assert read_rows(tmp_path / "saved").to_list() == original


def test_real_data_layouts_load_as_conversations():
    sharegpt = load_pairs(shared_path("data", "llamafactory", "dpo_en_demo.json"))
    assert len(sharegpt) == 300 and sharegpt[0]["chosen"][0]["role"] == "assistant"
    assert "conversations" in sharegpt.originals[0]  # the file's own row, for outputs that copy it
    row = {"input": "q", "output_1": "a", "output_2": "b", "label": 2}
    assert (
        from_llmbar(row)["chosen"][0]["content"] == "b"
        and from_llmbar({**row, "label": "1"})["chosen"][0]["content"] == "a"
    )
    converted = from_sharegpt({
        "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"},
    })  # fmt: skip
    assert [m["role"] for m in converted["prompt"]] == ["system", "user"]


def test_a_layout_row_that_cannot_be_converted_is_named(tmp_path):
    path = write_jsonl(
        tmp_path / "llmbar.jsonl",
        [
            {"input": "q", "output_1": "a", "output_2": "b", "label": "1"},
            {"input": "q", "output_1": "a", "output_2": "b", "label": "3"},
        ],
    )
    with pytest.raises(PairDataError, match=r"llmbar\.jsonl, row 1 \(llmbar layout\): field 'label': must be 1 or 2"):
        read_rows(path)
    rows = read_rows(path, on_bad_row="skip")
    assert len(rows) == 1 and len(rows.bad_rows) == 1


def test_write_json_refuses_nan_and_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json(tmp_path / "out.json", {"reward": float("nan")})
    assert not (tmp_path / "out.json").exists()
