"""Bad input is named: each case asserts the error's location (file, line/row, field) and what to do, or, with
on_bad_row="skip", a counted skip in the report. A failed start leaves nothing in output_dir."""

from __future__ import annotations

import json
import re

import pytest
import torch

from rmtorch.config import parse_config
from rmtorch.files import PairDataError, load_pairs
from rmtorch.pairs import tokenize_pairs
from tests.conftest import make_bos_tokenizer, train_argv, write_jsonl

GOOD = {"prompt": "what color is the sky ?", "chosen": "blue", "rejected": "green"}
USER = [{"role": "user", "content": "what color is the sky ?"}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


GOOD_CHAT = {"prompt": USER, "chosen": assistant("blue"), "rejected": assistant("green")}


def load_and_tokenize(path, tokenizer=None, **options):
    return tokenize_pairs(load_pairs(path), tokenizer or make_bos_tokenizer(), return_report=True, **options)


# ------------------------------------------------------------------------------------------- file-level


FILE_CASES = {
    "malformed JSON line": (
        b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n',
        r"line 2: malformed JSON .*Each line must be one JSON object",
    ),
    "non-UTF-8 bytes": (
        b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff\xfe", "chosen": "b", "rejected": "c"}\n',
        r"line 2: bytes that are not UTF-8 .*Re-encode the file as UTF-8",
    ),
    "empty file": (b"", r"is empty\. Give it at least one"),
    "whitespace-only file": (b"  \n\n \t\n", r"is empty\. Give it at least one"),
    "row that is not an object": (
        b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n[1, 2]\n',
        r"row 1: expected a JSON object with chosen/rejected fields, got list",
    ),
    "number where other rows have a string": (
        b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 5, "rejected": "c"}\n',
        r"row 1, field 'chosen': a number here but a string in row 0\. .*fix or remove row 1",
    ),
    "nested dict where other rows have a string": (
        b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": {"text": "b"}, "rejected": '
        b'"c"}\n',
        r"row 1, field 'chosen': an object here but a string in row 0",
    ),
    "messages mixed with strings": (
        b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": [{"role": "assistant", '
        b'"content": "b"}], "rejected": "c"}\n',
        r"row 1, field 'chosen': a list of objects here but a string in row 0",
    ),
    "margin not a number in one row": (
        b'{"chosen": "b", "rejected": "c", "margin": 1.0}\n{"chosen": "b", "rejected": "c d", "margin": "big"}\n',
        r"row 1, field 'margin': a string here but a number in row 0",
    ),
    "token id that is not an integer": (
        b'{"chosen_ids": [1, 2], "rejected_ids": [1, 3]}\n{"chosen_ids": [1, "x"], "rejected_ids": [1, 3]}\n',
        r"row 1, field 'chosen_ids': a list of numbers and strings here but a list of numbers in row 0",
    ),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_file_level_errors_name_the_file_and_line(tmp_path, case):
    content, message = FILE_CASES[case]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(content)
    with pytest.raises(PairDataError, match=message) as err:
        load_and_tokenize(path)
    assert str(path) in str(err.value)


def test_json_file_that_is_not_a_list(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b"}))
    with pytest.raises(
        PairDataError, match=r"a \.json file must hold a list of objects; for one object per line use \.jsonl"
    ):
        load_pairs(path)


def test_missing_file(tmp_path):
    with pytest.raises(PairDataError, match=r"missing\.jsonl: no such file\. Pass an existing JSONL"):
        load_pairs(tmp_path / "missing.jsonl")


def test_directory_instead_of_a_file(tmp_path):
    (tmp_path / "pairs").mkdir()
    with pytest.raises(PairDataError, match=r"is a directory but not a saved `datasets` dataset .*Pass a file"):
        load_pairs(tmp_path / "pairs")


def test_unknown_file_type(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\n")
    with pytest.raises(PairDataError, match=r"unknown file type '\.csv'\. Use \.jsonl, \.json, \.parquet"):
        load_pairs(path)


# -------------------------------------------------------------------------------------------- row-level

# name: (bad row, expected message). Each bad row is written after one good row, so it is row 1.
ROW_CASES = {
    "missing chosen": (
        {"prompt": "a", "rejected": "c"},
        r"row 1: missing field 'chosen'\. Each row needs 'chosen' and 'rejected'",
    ),
    "missing rejected": ({"prompt": "a", "chosen": "b"}, r"row 1: missing field 'rejected'"),
    "chosen is null": ({"prompt": "a", "chosen": None, "rejected": "c"}, r"row 1: missing field 'chosen'"),
    "empty response": (
        {"prompt": "a", "chosen": "", "rejected": "c"},
        r"row 1, field 'chosen': the response is empty or whitespace only\. Remove the row or fill it in",
    ),
    "whitespace-only response": (
        {"prompt": "a", "chosen": "b", "rejected": " \n\t"},
        r"row 1, field 'rejected': the response is empty or whitespace only",
    ),
    "chosen identical to rejected": (
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        r"row 1: 'chosen' and 'rejected' are identical, so the pair carries no preference\. Remove the row",
    ),
    "margin NaN": (
        {**GOOD, "margin": float("nan")},
        r"row 1, field 'margin': the margin must be a finite number .*got nan",
    ),
    "margin inf": (
        {**GOOD, "margin": float("inf")},
        r"row 1, field 'margin': the margin must be a finite number .*got inf",
    ),
    "margin -inf": (
        {**GOOD, "margin": float("-inf")},
        r"row 1, field 'margin': the margin must be a finite number .*got -inf",
    ),
    "margin beyond float32": (
        {**GOOD, "margin": 1e39},
        r"row 1, field 'margin': the margin must be a finite number \(float32 range\)",
    ),
    "margin missing on one row": (
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        r"row 1, field 'margin': the margin must be a finite number .*got None",
    ),
}
CHAT_ROW_CASES = {
    "message without role": (
        {"prompt": [{"content": "hi"}], "chosen": assistant("b"), "rejected": assistant("c")},
        r"row 1, field 'prompt', message 0: each message needs 'role' and 'content' keys",
    ),
    "unknown role": (
        {"prompt": [{"role": "bot", "content": "hi"}], "chosen": assistant("b"), "rejected": assistant("c")},
        r"row 1, field 'prompt', message 0: unknown role 'bot'; use one of system, user, assistant, tool",
    ),
    "conversation not ending with assistant": (
        {"prompt": USER, "chosen": assistant("b") + USER, "rejected": assistant("c")},
        r"row 1, field 'chosen': the conversation must end with an assistant turn .*ends with 'user'",
    ),
    "empty assistant turn": (
        {"prompt": USER, "chosen": assistant("b"), "rejected": assistant("  ")},
        r"row 1, field 'rejected': the assistant response is empty\. Remove the row or fill it in",
    ),
    "assistant turn without content": (
        {"prompt": USER, "chosen": assistant("b"), "rejected": [{"role": "assistant"}]},
        r"row 1, field 'rejected': the assistant response is empty",
    ),
    "empty message list": (
        {"prompt": USER, "chosen": [], "rejected": assistant("c")},
        r"row 1, field 'chosen': expected a non-empty list of messages",
    ),
    "identical conversations": (
        {"prompt": USER, "chosen": assistant("b"), "rejected": assistant("b")},
        r"row 1: 'chosen' and 'rejected' are identical",
    ),
}
IDS_ROW_CASES = {
    "token id above the vocabulary": (
        {"chosen_ids": [1, 99999], "rejected_ids": [1, 3]},
        r"row 1, field 'chosen_ids': token id 99999 is outside the tokenizer's vocabulary \(0\.\.\d+\)\. Were these "
        r"ids made with another tokenizer",
    ),
    "negative token id": (
        {"chosen_ids": [1, 2], "rejected_ids": [-1, 3]},
        r"row 1, field 'rejected_ids': token id -1 is outside the tokenizer's vocabulary",
    ),
    "empty token list": (
        {"chosen_ids": [], "rejected_ids": [1, 3]},
        r"row 1, field 'chosen_ids': expected a non-empty list of integer token ids",
    ),
}
GOOD_ROW = {
    **{name: GOOD for name in ROW_CASES},
    **{name: GOOD_CHAT for name in CHAT_ROW_CASES},
    **{name: {"chosen_ids": [1, 2], "rejected_ids": [1, 4]} for name in IDS_ROW_CASES},
}
GOOD_ROW["margin NaN"] = GOOD_ROW["margin inf"] = GOOD_ROW["margin -inf"] = GOOD_ROW[
    "margin beyond float32"
] = GOOD_ROW["margin missing on one row"] = {**GOOD, "margin": 0.5}
ALL_ROW_CASES = {**ROW_CASES, **CHAT_ROW_CASES, **IDS_ROW_CASES}


@pytest.mark.parametrize("case", list(ALL_ROW_CASES))
def test_bad_row_error_names_file_row_and_field(tmp_path, case):
    bad_row, message = ALL_ROW_CASES[case]
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_ROW[case], bad_row])
    with pytest.raises(PairDataError, match=message) as err:
        load_and_tokenize(path, margin_column="margin")
    assert str(err.value).startswith(f"{path}, row 1")


@pytest.mark.parametrize("case", list(ALL_ROW_CASES))
def test_bad_row_is_skipped_and_counted_with_its_message(tmp_path, case):
    bad_row, message = ALL_ROW_CASES[case]
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_ROW[case], bad_row, GOOD_ROW[case]])
    dataset, report = load_and_tokenize(path, margin_column="margin", on_bad_row="skip")
    assert (report.rows_in, report.pairs_out, report.skipped_bad, len(dataset)) == (3, 2, 1, 2)
    assert len(report.bad_rows) == 1 and re.search(message, report.bad_rows[0])


@pytest.mark.parametrize("value, shown", [(5, "int"), ({"text": "b"}, "dict"), ([1, 2], "list")])
def test_wrong_type_in_every_row(tmp_path, value, shown):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": value, "rejected": "c"}])
    with pytest.raises(PairDataError, match=rf"row 0, field 'chosen': expected a string, got {shown}"):
        load_and_tokenize(path)


def test_margin_that_is_a_string_in_every_row(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{**GOOD, "margin": "big"}])
    with pytest.raises(PairDataError, match=r"row 0, field 'margin': the margin must be a finite number .*got 'big'"):
        load_and_tokenize(path, margin_column="margin")


def test_old_trl_column_names_are_named(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"input_ids_chosen": [1, 2], "input_ids_rejected": [1, 3]}])
    with pytest.raises(
        PairDataError, match=r"row 0: column 'input_ids_chosen' is an old TRL name; rename it to 'chosen_ids'"
    ):
        load_and_tokenize(path)


def test_tokenizer_without_chat_template_given_conversations(tmp_path):
    tokenizer = make_bos_tokenizer()
    tokenizer.chat_template = None
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_CHAT])
    with pytest.raises(
        PairDataError,
        match=r"row 0: the data is conversational \(message lists\) but the tokenizer has no chat template\. Use a "
        r"chat model's tokenizer",
    ):
        load_and_tokenize(path, tokenizer)


# ------------------------------------------------------------------------------ longer than max_length

LONG = {"prompt": "what color is the sky ? " * 5, "chosen": "blue", "rejected": "green"}  # 33 tokens with BOS and EOS
LONG_RESPONSE = {"prompt": "a", "chosen": "blue " * 20, "rejected": "green"}


def test_drop_counts_too_long_pairs(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, LONG, GOOD])
    dataset, report = load_and_tokenize(path, max_length=12, truncation="drop")
    assert (len(dataset), report.dropped_too_long, report.truncated) == (2, 1, 0)
    assert "1 dropped as longer than max_length" in report.summary()


def test_keep_end_truncates_the_prompt_and_counts_it(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, LONG])
    dataset, report = load_and_tokenize(path, max_length=12, truncation="keep_end")
    assert (len(dataset), report.dropped_too_long, report.truncated) == (2, 0, 1)
    assert max(len(ids) for ids in list(dataset["chosen_ids"]) + list(dataset["rejected_ids"])) <= 12


def test_keep_end_drops_a_response_that_alone_is_too_long(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, LONG_RESPONSE])
    dataset, report = load_and_tokenize(path, max_length=12, truncation="keep_end")
    assert (len(dataset), report.dropped_too_long, report.truncated) == (1, 1, 0)


@pytest.mark.parametrize("truncation", ["drop", "keep_end"])
def test_every_pair_too_long_is_an_error_that_says_what_to_do(tmp_path, truncation):
    path = write_jsonl(tmp_path / "pairs.jsonl", [LONG_RESPONSE, LONG_RESPONSE])
    with pytest.raises(
        PairDataError,
        match=rf"{re.escape(str(path))}: no usable pairs left \(0/2 pairs kept, 2 dropped as longer than "
        r"max_length\)\. Raise max_length \(now 12\)",
    ):
        load_and_tokenize(path, max_length=12, truncation=truncation)


def test_every_row_bad_under_skip_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "x"}])
    with pytest.raises(PairDataError, match=r"no usable pairs left \(0/1 pairs kept, 1 bad rows skipped\)"):
        load_and_tokenize(path, on_bad_row="skip")


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rate", "1e-5"], r"unknown option\(s\) --learning_rate 1e-5\. Valid options: --config, --model"),
        (["--lr", "-0.001"], r"lr must be a positive number, got -0.001"),
        (["--lr", "nan"], r"lr must be a positive number, got nan"),
        (["--batch_size", "two"], r"--batch_size: batch_size must be an integer, got 'two'"),
        (["--truncation", "left"], r"truncation must be 'drop' or 'keep_end', got 'left'"),
        (["--on_bad_row", "ignore"], r"on_bad_row must be 'error' or 'skip', got 'ignore'"),
        (
            ["--load_in_4bit", "true"],
            r"load_in_4bit needs lora: 4-bit weights cannot be fully fine-tuned\. Add --lora",
        ),
        (["--config", "missing.yaml"], r"config file missing\.yaml does not exist"),
    ],
)
def test_config_errors_say_what_to_do(argv, message):
    with pytest.raises(SystemExit, match=message):
        parse_config(argv)


def test_config_file_with_unknown_key(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("lr: 1e-5\nlearning_rate: 2e-5\n")
    with pytest.raises(SystemExit, match=r"cfg\.yaml: unknown key\(s\) \['learning_rate'\]\. Valid keys:"):
        parse_config(["--config", str(path)])


# ----------------------------------------------------------------------------------------------- model


def test_model_directory_without_weights(tmp_path, tiny_model_dir):
    from rmtorch.loading import load_reward_model

    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(
        FileNotFoundError,
        match=r"has a config but no \*\.safetensors weights\. Pass a directory written by model\.save_pretrained",
    ):
        load_reward_model(str(tmp_path))


def test_model_path_that_does_not_exist(tmp_path):
    from rmtorch.loading import load_reward_model

    with pytest.raises(
        FileNotFoundError,
        match=r"is not a local directory \(nothing is downloaded at run time\)\. Pass a directory with config\.json",
    ):
        load_reward_model(str(tmp_path / "nope"))


def test_directory_that_is_not_a_model(tmp_path):
    from rmtorch.loading import load_reward_model

    with pytest.raises(FileNotFoundError, match=r"has no config\.json: not a Hugging Face model directory"):
        load_reward_model(str(tmp_path))


# ------------------------------------------------------------------------ train.py: nothing half-written


def short_run(model_dir, train_file, output_dir, *extra):
    return train_argv(model_dir, train_file, output_dir, "--max_steps", "1", "--max_length", "64", *extra)


# problem: (what train.main raises, its message); each stops the run before output_dir is made.
START_FAILURES = {
    "bad row": (PairDataError, r"bad\.jsonl, row 1: 'chosen' and 'rejected' are identical"),
    "bad eval file": (PairDataError, r"bad\.jsonl, row 1: 'chosen' and 'rejected' are identical"),
    "missing train file": (PairDataError, r"nope\.jsonl: no such file"),
    "model without weights": (FileNotFoundError, r"no_weights has a config but no \*\.safetensors weights"),
    "unknown option": (SystemExit, r"unknown option\(s\) --learning_rate 1\. Valid options: --config, --model"),
    "resume without checkpoint": (
        FileNotFoundError,
        r"--resume_from latest: no checkpoint under .*/out/checkpoints yet",
    ),
}


@pytest.mark.parametrize("problem", list(START_FAILURES))
def test_failed_start_leaves_output_dir_untouched(tmp_path, tiny_model_dir, problem):
    import train

    good = write_jsonl(tmp_path / "good.jsonl", [GOOD, {**GOOD, "chosen": "red"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"prompt": "a", "chosen": "x", "rejected": "x"}])
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    output_dir = tmp_path / "out"
    argv = {
        "bad row": short_run(tiny_model_dir, bad, output_dir),
        "bad eval file": short_run(tiny_model_dir, good, output_dir, "--eval_file", str(bad)),
        "missing train file": short_run(tiny_model_dir, tmp_path / "nope.jsonl", output_dir),
        "model without weights": short_run(no_weights, good, output_dir),
        "unknown option": short_run(tiny_model_dir, good, output_dir, "--learning_rate", "1"),
        "resume without checkpoint": short_run(tiny_model_dir, good, output_dir, "--resume_from", "latest"),
    }[problem]
    error, message = START_FAILURES[problem]
    with pytest.raises(error, match=message):
        train.main(argv)
    assert not output_dir.exists()


def test_fresh_run_into_a_used_output_dir_is_refused(tmp_path, tiny_model_dir):
    import train

    output_dir = tmp_path / "out"
    (output_dir / "checkpoints").mkdir(parents=True)
    (output_dir / "checkpoints" / "latest").write_text("step-000003\n")
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD, {**GOOD, "chosen": "red"}])
    with pytest.raises(
        SystemExit,
        match=r"already holds a run with checkpoints\. Pass --resume_from latest to continue it, or choose a new "
        r"--output_dir",
    ):
        train.main(short_run(tiny_model_dir, good, output_dir))
    assert sorted(p.name for p in output_dir.rglob("*")) == ["checkpoints", "latest"]


def test_skipped_rows_are_in_the_run_report(tmp_path, tiny_model_dir):
    import train

    rows = [
        GOOD,
        {"prompt": "a", "chosen": "x", "rejected": "x"},
        {**GOOD, "chosen": "red"},
        {**GOOD, "chosen": "blue " * 80},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    output_dir = tmp_path / "out"
    train.main(short_run(tiny_model_dir, path, output_dir, "--on_bad_row", "skip"))
    report = json.loads((output_dir / "data_report.json").read_text())
    assert report == json.loads((output_dir / "eval_results.json").read_text())["data"]
    for split in ("train", "eval"):
        assert (
            report[split]["rows_in"],
            report[split]["pairs_out"],
            report[split]["skipped_bad"],
            report[split]["dropped_too_long"],
        ) == (4, 2, 1, 1)
        assert report[split]["bad_rows"] == [
            f"{path}, row 1: 'chosen' and 'rejected' are identical, so the pair carries no preference. Remove the row."
        ]


# ----------------------------------------------------------------------------------------------- scorer


@pytest.fixture(scope="module")
def scorer():
    from rmtorch.score import RewardScorer
    from tests.conftest import tiny_llama

    tokenizer = make_bos_tokenizer()
    model = tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return RewardScorer(model, tokenizer, max_length=16)


def test_scorer_scores_an_empty_completion_as_training_formats_it(scorer):
    from rmtorch.formatting import tokenize_response

    rewards = scorer(["what color is the sky ?"], [""])
    expected = scorer.score_ids([tokenize_response(scorer.tokenizer, "what color is the sky ?", "")])
    assert torch.isfinite(rewards).all() and torch.equal(rewards, expected)


def test_scorer_keeps_the_end_of_a_completion_longer_than_the_window(scorer):
    from rmtorch.formatting import tokenize_response

    completion = "blue " * 30
    details = scorer(["a"], [completion], return_details=True)
    ids = tokenize_response(scorer.tokenizer, "a", completion)
    assert len(ids) > 16 and details.truncated.tolist() == [True] and details.num_tokens.tolist() == [16]
    expected = scorer.score_ids([ids[:1] + ids[-15:]])  # the leading BOS is kept, the start of the text cut
    assert torch.equal(details.rewards, expected)


def test_scorer_refuses_mixed_strings_and_messages(scorer):
    with pytest.raises(
        ValueError,
        match=r"Row 1 is messages but row 0 is text; score standard text and conversations in separate calls",
    ):
        scorer(["a", USER], ["blue", assistant("blue")])


def test_scorer_refuses_a_string_prompt_with_a_message_completion(scorer):
    with pytest.raises(
        ValueError, match=r"Row 0: prompt is str and completion is list\. Give both as strings, or both as lists"
    ):
        scorer(["a"], [assistant("blue")])


def test_scorer_refuses_prompts_and_completions_of_different_lengths(scorer):
    with pytest.raises(ValueError, match=r"Got 2 prompts but 3 completions; pass one prompt per completion"):
        scorer(["a", "b"], ["x", "y", "z"])
