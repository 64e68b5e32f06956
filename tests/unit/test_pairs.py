"""rmtorch.pairs: formatting, the stored prompt length, truncation that never cuts a response, margins, counts."""

from __future__ import annotations

import datasets
import pytest

from rmtorch.files import PairDataError
from rmtorch.formatting import prompt_ids, tokenize_response
from rmtorch.pairs import tokenize_pairs, validate_row


def test_keep_end_cuts_the_prompt_from_the_left_and_keeps_bos(bos_tokenizer):
    row = {"prompt": "what color is the sky ? " * 5, "chosen": " blue", "rejected": " it is green"}
    full, _ = tokenize_pairs(datasets.Dataset.from_list([row]), bos_tokenizer, return_report=True)
    cut, report = tokenize_pairs(
        datasets.Dataset.from_list([row]), bos_tokenizer, max_length=10, truncation="keep_end", return_report=True
    )
    assert report.truncated == 1 and report.dropped_too_long == 0
    for name in ("chosen_ids", "rejected_ids"):
        ids, whole = cut[name][0], full[name][0]
        assert len(ids) <= 10
        assert ids[0] == bos_tokenizer.bos_token_id  # BOS survives
        assert ids[1:] == whole[len(whole) - len(ids) + 1 :]  # the end, response included, is intact
    prompt_length = len(full["chosen_ids"][0]) - len(cut["chosen_ids"][0])
    assert (
        len(full["rejected_ids"][0]) - len(cut["rejected_ids"][0]) == prompt_length
    )  # the same prompt tokens cut from both


def test_keep_end_drops_and_counts_a_pair_whose_response_alone_is_too_long(bos_tokenizer):
    rows = [
        {"prompt": "hello", "chosen": " blue " * 20, "rejected": " no"},
        {"prompt": "hello", "chosen": " yes", "rejected": " no"},
    ]
    kept, report = tokenize_pairs(
        datasets.Dataset.from_list(rows), bos_tokenizer, max_length=8, truncation="keep_end", return_report=True
    )
    assert len(kept) == 1 and report.dropped_too_long == 1 and report.pairs_out == 1


def test_drop_counts_every_dropped_pair(smol_tokenizer):
    rows = [{"prompt": "p" * n, "chosen": " yes", "rejected": " no"} for n in (1, 200, 400)]
    kept, report = tokenize_pairs(datasets.Dataset.from_list(rows), smol_tokenizer, max_length=60, return_report=True)
    assert report.rows_in == 3 and report.pairs_out == len(kept) == 1 and report.dropped_too_long == 2
    assert "2 dropped" in report.summary()


def test_skip_counts_bad_rows_and_keeps_their_messages(bos_tokenizer):
    rows = [
        {"prompt": "a", "chosen": " yes", "rejected": " no"},
        {"prompt": "a", "chosen": " same", "rejected": " same"},
        {"prompt": "a", "chosen": "  ", "rejected": " no"},
    ]
    kept, report = tokenize_pairs(rows, bos_tokenizer, on_bad_row="skip", source="pairs.jsonl", return_report=True)
    assert len(kept) == 1 and report.skipped_bad == 2
    assert "pairs.jsonl, row 1" in report.bad_rows[0] and "identical" in report.bad_rows[0]
    assert "pairs.jsonl, row 2, field 'chosen'" in report.bad_rows[1]


@pytest.mark.parametrize(
    "field, fix",
    [
        ("prompt", r"Give at least one message, or leave 'prompt' out\."),
        ("chosen", r"Give the conversation, ending with the assistant response, or remove the row\."),
    ],
)
def test_an_empty_message_list_says_what_to_give(field, fix):
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "b"}],
        "rejected": [{"role": "assistant", "content": "c"}],
        field: [],
    }
    with pytest.raises(
        PairDataError, match=rf"row 4, field '{field}': expected a non-empty list of messages, got \[\]\. {fix}"
    ):
        validate_row(row, "pairs.jsonl, row 4")


def test_prompt_length_is_the_prompt_and_is_shared_by_both_sides(bos_tokenizer, smol_tokenizer):
    chat = {
        "prompt": [{"role": "user", "content": "what color is the sky ?"}],
        "chosen": [{"role": "assistant", "content": "blue"}],
        "rejected": [{"role": "assistant", "content": "green"}],
    }
    text = {"prompt": "what color is the sky ?", "chosen": " blue", "rejected": " green"}
    for tokenizer in (bos_tokenizer, smol_tokenizer):
        for row in (text, chat):
            pair = tokenize_pairs([row], tokenizer)[0]
            length = pair["prompt_length"]
            assert (
                pair["chosen_ids"][:length]
                == pair["rejected_ids"][:length]
                == prompt_ids(tokenizer, row["prompt"])[:length]
            )
            assert length == len(prompt_ids(tokenizer, row["prompt"]))  # the whole prompt, generation header included


def test_responses_that_begin_alike_keep_their_shared_words_out_of_the_prompt(bos_tokenizer):
    row = {"prompt": "how many are 2 + 3 ?", "chosen": " the answer is 5", "rejected": " the answer is 6"}
    pair = tokenize_pairs([row], bos_tokenizer)[0]
    assert pair["prompt_length"] == len(prompt_ids(bos_tokenizer, row["prompt"]))
    shared = 0
    while pair["chosen_ids"][shared] == pair["rejected_ids"][shared]:
        shared += 1
    assert shared > pair["prompt_length"]  # "the answer is" is shared, but it is response, not prompt


def test_keep_end_never_cuts_a_response_token(bos_tokenizer):
    """Responses that begin alike: the common prefix is longer than the prompt, and only the prompt may be cut."""
    row = {"prompt": "what color is the sky ? " * 3, "chosen": " the answer is blue", "rejected": " the answer is red"}
    full = tokenize_pairs([row], bos_tokenizer)[0]
    cut, report = tokenize_pairs([row], bos_tokenizer, max_length=12, truncation="keep_end", return_report=True)
    prompt = full["prompt_length"]
    for side in ("chosen_ids", "rejected_ids"):
        assert cut[0][side][-(len(full[side]) - prompt) :] == full[side][prompt:]  # every response token is kept
    assert report.truncated_prompt_tokens == len(full["chosen_ids"]) - len(cut[0]["chosen_ids"])
    short = {"prompt": "hello", "chosen": " yes", "rejected": " no"}
    kept, report = tokenize_pairs([row, short], bos_tokenizer, max_length=5, truncation="keep_end", return_report=True)
    assert report.dropped_too_long == 1 and kept["row"] == [1]  # BOS + " the answer is blue" + EOS cannot fit 5


def test_keep_end_drops_whole_leading_turns_of_a_conversation(bos_tokenizer):
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    prompt = [
        turn("system", "answer yes or no"),
        turn("user", "is the sky blue ?"),
        turn("assistant", "yes"),
        turn("user", "is it green ?"),
    ]
    row = {"prompt": prompt, "chosen": [turn("assistant", "no")], "rejected": [turn("assistant", "yes")]}
    full = tokenize_pairs([row], bos_tokenizer)[0]
    cut, report = tokenize_pairs(
        [row], bos_tokenizer, max_length=len(full["chosen_ids"]) - 3, truncation="keep_end", return_report=True
    )
    last_turns = tokenize_response(bos_tokenizer, prompt[1:], [turn("assistant", "no")])  # the system turn is gone
    assert cut[0]["chosen_ids"] == [bos_tokenizer.bos_token_id] + last_turns[1:]  # the BOS, then whole turns
    assert report.truncated == 1 and report.truncated_within_turn == 0


def test_margin_column_is_used_when_present_and_a_missing_named_one_is_an_error(bos_tokenizer):
    rows = [{"prompt": "a", "chosen": " yes", "rejected": " no", "margin": 0.5}]
    assert tokenize_pairs(rows, bos_tokenizer)["margin"] == [0.5]  # TRL uses a `margin` column without being told
    assert "margin" not in tokenize_pairs(rows, bos_tokenizer, margin_column=None).column_names
    with pytest.raises(
        PairDataError,
        match=r"no column 'margn' \(--margin_column\) to read margins from; its columns are \['prompt', 'chosen', "
        r"'rejected', 'margin'\]",
    ):
        tokenize_pairs(rows, bos_tokenizer, margin_column="margn")


def test_pair_set_keeps_file_rows_and_kept_columns_aligned(bos_tokenizer):
    rows = [
        {"prompt": "what", "chosen": " good", "rejected": " bad", "category": "kept-1"},
        {"prompt": "what", "chosen": " good", "rejected": " good", "category": "bad-row"},  # identical sides: skipped
        {"prompt": "what " * 40, "chosen": " good", "rejected": " bad", "category": "too-long"},  # dropped
        {"prompt": "is", "chosen": " yes", "rejected": " no", "category": "kept-2"},
    ]
    pairs = tokenize_pairs(
        datasets.Dataset.from_list(rows), bos_tokenizer, max_length=16, on_bad_row="skip", keep_columns=["category"]
    )
    assert pairs["category"] == ["kept-1", "kept-2"] and pairs["row"] == [0, 3]
    assert pairs.select([1]).to_list() == [pairs[1]]
