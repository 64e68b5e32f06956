"""Group data: reading the group and UltraFeedback layouts, errors that name file, row and field, the packed group
batch (every reward equals the response scored alone), and the group evaluation report."""

from __future__ import annotations

import pytest
import torch

from rmtorch.batching import PairCollator
from rmtorch.files import PairDataError, read_rows
from rmtorch.formatting import tokenize_response
from rmtorch.group_metrics import group_report, kendall_tau_b
from rmtorch.groups import GroupCollator, check_ties, is_group_data, tokenize_groups
from rmtorch.model import RewardModel
from rmtorch.pairs import tokenize_pairs
from tests.conftest import reward_alone, tiny_llama, write_jsonl

GROUP = {"prompt": "what color is the sky ?", "responses": [" red bad", " blue good", " green"], "ranks": [3, 1, 2]}


def ultrafeedback_row(scores=(4.5, 2.0, 3.25)) -> dict:
    """A row in openbmb/UltraFeedback's layout (the fields rmtorch reads, plus some it does not)."""
    return {
        "source": "evol_instruct",
        "instruction": "what color is the sky ?",
        "models": ["a", "b", "c"],
        "completions": [
            {"model": m, "response": text, "fine-grained_score": score, "overall_score": 7.0, "critique": "..."}
            for m, text, score in zip("abc", ("blue", "red", "green"), scores)
        ],
    }


def test_a_group_with_ranks_is_tokenized_as_pairs_are_and_stored_as_scores(bos_tokenizer):
    groups = tokenize_groups([GROUP], bos_tokenizer)
    expected = [tokenize_response(bos_tokenizer, GROUP["prompt"], r) for r in GROUP["responses"]]
    assert groups["ids"][0] == expected
    assert groups["scores"][0] == [-3.0, -1.0, -2.0]
    pair = tokenize_pairs([{"prompt": GROUP["prompt"], "chosen": " blue good", "rejected": " red bad"}], bos_tokenizer)
    assert groups["prompt_length"][0] == pair["prompt_length"][0]
    assert groups.report.summary() == "1/1 groups kept (3 responses, 3 pairs)"


def test_ultrafeedback_rows_become_conversations_scored_by_their_fine_grained_score(bos_tokenizer, tmp_path):
    rows = read_rows(write_jsonl(tmp_path / "uf.jsonl", [ultrafeedback_row()]))
    assert is_group_data(rows)
    groups = tokenize_groups(rows, bos_tokenizer)
    assert groups["scores"][0] == [4.5, 2.0, 3.25]
    messages = [{"role": "user", "content": "what color is the sky ?"}, {"role": "assistant", "content": "blue"}]
    assert groups["ids"][0][0] == tokenize_response(bos_tokenizer, messages[:1], messages[1:])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ranks": None}, r"uf.jsonl, row 1: a group needs 'ranks' \(1 = best\) or 'scores'.*got neither"),
        ({"scores": [1, 2, 3]}, r"row 1: a group needs 'ranks'.*got both"),
        ({"ranks": [1, 2]}, r"row 1, field 'ranks': expected a list of 3 numbers"),
        ({"ranks": [1, 0, 2]}, r"row 1, field 'ranks', item 1: must be a whole number >= 1"),
        ({"responses": [" a", " a", " b"]}, r"row 1, field 'responses': responses 0 and 1 are identical"),
        ({"responses": [" a"], "ranks": [1]}, r"row 1, field 'responses': expected a list of at least 2"),
        ({"responses": [" a", "  ", " b"]}, r"row 1, field 'responses\[1\]': the response is empty"),
        ({"ranks": [2, 2, 2]}, r"row 1: every response has the same rank or score.*--tie_nu"),
    ],
)
def test_a_bad_group_is_named_by_file_row_and_field(bos_tokenizer, tmp_path, change, message):
    path = write_jsonl(tmp_path / "uf.jsonl", [GROUP, {**GROUP, **change}])
    with pytest.raises(PairDataError, match=message):
        tokenize_groups(path, bos_tokenizer)


def test_an_ultrafeedback_completion_without_its_score_is_named(bos_tokenizer, tmp_path):
    row = ultrafeedback_row()
    del row["completions"][2]["fine-grained_score"]
    with pytest.raises(PairDataError, match=r"uf.jsonl, row 0, field 'scores', item 2: must be a finite number"):
        tokenize_groups(write_jsonl(tmp_path / "uf.jsonl", [row]), bos_tokenizer)


def test_all_tied_groups_are_kept_for_a_tie_model_and_bad_rows_can_be_skipped(bos_tokenizer):
    groups = tokenize_groups([{**GROUP, "ranks": [1, 1, 1]}, GROUP, {"prompt": "x"}], bos_tokenizer, allow_ties=True,
                             on_bad_row="skip")  # fmt: skip
    assert len(groups) == 2 and groups.report.skipped_bad == 1


def test_a_packed_group_batch_gives_each_response_its_reward_alone(bos_tokenizer):
    groups = tokenize_groups([GROUP, {**GROUP, "prompt": "hello", "ranks": [1, 2, 2]}], bos_tokenizer)
    model = tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id)
    batch = GroupCollator()([groups[0], groups[1]])
    with torch.no_grad():
        rewards = RewardModel(model)(
            **{k: batch[k] for k in ("input_ids", "position_ids", "last_index", "attention_blocks")}
        )
    expected = [reward_alone(model, ids) for group in groups["ids"] for ids in group]
    assert rewards.tolist() == pytest.approx(expected, abs=1e-5)
    prompt_tokens = groups["prompt_length"][0] + groups["prompt_length"][1]
    assert batch["input_ids"].shape[1] == sum(len(s) for g in groups["ids"] for s in g) - 2 * prompt_tokens
    assert batch["better"].tolist() == [1, 1, 2, 3, 3] and batch["worse"].tolist() == [0, 2, 0, 4, 5]


def test_kendall_tau_b_against_hand_counts():
    # 3 items, labels 3 > 2 > 1; rewards order 1st > 3rd > 2nd: pairs (0,1) C, (0,2) C, (1,2) D: (2 - 1) / 3
    assert kendall_tau_b([3, 2, 1], [0.9, 0.1, 0.5]) == pytest.approx(1 / 3)
    # a label tie: labels (2, 2, 1), rewards all different: C = 2, D = 0, tau-b = 2 / sqrt(2 * 3)
    assert kendall_tau_b([2, 2, 1], [0.3, 0.2, 0.1]) == pytest.approx(2 / 6**0.5)
    assert kendall_tau_b([1, 1], [0.3, 0.2]) is None


def test_the_group_report_counts_every_ordered_pair_and_averages_tau_over_groups(bos_tokenizer):
    groups = tokenize_groups([GROUP, {**GROUP, "prompt": "hello", "ranks": [1, 2, 2]}], bos_tokenizer)
    rewards = torch.tensor([0.1, 0.9, 0.5, 1.0, 0.0, 2.0])  # group 1 in order; group 2: response 2 above the best
    report, lines = group_report(groups, rewards)
    assert (report["num_groups"], report["num_responses"], report["num_pairs"]) == (2, 6, 5)
    assert report["accuracy"] == pytest.approx(4 / 5)  # group 2's (0, 2) pair is wrong
    assert report["kendall_tau"] == pytest.approx((1.0 + 0.0) / 2)  # group 2: C = 1, D = 1 → 0
    assert lines[0] == {"row": 0, "better": 1, "worse": 0, "chosen_reward": pytest.approx(0.9),
                        "rejected_reward": pytest.approx(0.1), "length": len(groups["ids"][0][1])}  # fmt: skip


def test_pairs_labelled_tie_need_a_tie_model(bos_tokenizer):
    rows = [{"prompt": "a", "chosen": " b", "rejected": " c", "tie": t} for t in (False, True)]
    pairs = tokenize_pairs(rows, bos_tokenizer, keep_columns=["tie"])
    check_ties(pairs, 1.0)
    with pytest.raises(PairDataError, match=r"dataset, rows \[1\]: 1 pairs are labelled tie: true.*--tie_nu"):
        check_ties(pairs, None)
    rows.append({"prompt": "a", "chosen": " d", "rejected": " e"})  # no tie key: untied (JSONL rows leave it out)
    pairs = tokenize_pairs(rows, bos_tokenizer, keep_columns=["tie"])
    check_ties(pairs, 1.0)
    batch = PairCollator(bos_tokenizer.pad_token_id)([pairs[i] for i in range(3)])
    assert batch["tie"].tolist() == [False, True, False]
    rows[0]["tie"] = "yes"
    with pytest.raises(PairDataError, match=r"row 0, field 'tie': must be true or false, got 'yes'"):
        check_ties(tokenize_pairs(rows, bos_tokenizer, keep_columns=["tie"]), 1.0)
