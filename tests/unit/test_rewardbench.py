"""rmtorch.rewardbench: the benchmark facts, row checks with their messages, formatting against training's own
(tokenize_pairs), and the scoring rules on hand-computed examples. The official package is the oracle in
tests/parity/test_rewardbench_official.py."""

from __future__ import annotations

import math

import pytest

from rmtorch.files import PairDataError, Rows
from rmtorch.pairs import tokenize_pairs
from rmtorch.report import format_benchmark_table, plot_benchmark_scores
from rmtorch.rewardbench import (
    V1_EXAMPLE_COUNTS,
    V1_ROWS,
    V1_SECTIONS,
    V2_ROWS,
    Prompt,
    best_of_n_result,
    pair_result,
    score_benchmark,
    section_scores,
    ties_score,
)
from rmtorch.rewardbench_data import read_prompts, tokenize_prompts
from tests.conftest import assert_real_png, make_bos_tokenizer


def v1_row(**changes) -> dict:
    row = {"prompt": "what color is the sky ?", "chosen": "blue", "rejected": "red", "subset": "hep-go", "id": 7}
    return {**row, **changes}


def v2_row(**changes) -> dict:
    row = {
        "prompt": "what color is the sky ?", "chosen": ["blue"], "rejected": ["red", "green", "no"], "num_correct": 1,
        "subset": "Focus", "id": "12",
    }  # fmt: skip
    return {**row, **changes}


def prompts_of(subset_rows: dict[str, int]) -> list[Prompt]:
    """Prompts with the given number of rows per subset (v2 Ties rows as ref/tied pairs of one question each)."""
    prompts = []
    for subset, count in subset_rows.items():
        for i in range(count):
            row_id = f"{('ref', 'tied')[i % 2]}:{i // 2}" if subset == "Ties" else len(prompts)
            prompts.append(Prompt(len(prompts), row_id, subset, "p", ["a", "b", "c"], 1 + (subset == "Ties")))
    return prompts


# ------------------------------------------------------------------------------------------------ the facts


def test_published_sizes_and_the_math_up_weighting():
    assert sum(V1_ROWS.values()) == 2985  # the "filtered" split
    assert sum(V2_ROWS.values()) == 1865  # the "test" split
    code = [name for name in V1_SECTIONS["Reasoning"] if name.startswith("hep-")]
    assert V1_EXAMPLE_COUNTS["math-prm"] == sum(V1_EXAMPLE_COUNTS[name] for name in code) == 984
    assert V1_ROWS["math-prm"] == 447 and {k: v for k, v in V1_ROWS.items() if k != "math-prm"} == {
        k: v for k, v in V1_EXAMPLE_COUNTS.items() if k != "math-prm"
    }
    members = [name for names in V1_SECTIONS.values() for name in names]
    assert sorted(members) == sorted(V1_EXAMPLE_COUNTS)  # every subset in exactly one section


# -------------------------------------------------------------------------------------------------- scoring


def test_a_v1_pair_is_right_only_when_chosen_is_strictly_higher():
    assert (pair_result(1.0, 0.5), pair_result(0.5, 1.0), pair_result(0.7, 0.7)) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "rewards, expected",
    [
        ([3.0, 1.0, 2.0, 0.0], 1.0),
        ([3.0, 3.0, 1.0, 0.0], 1 / 2),  # a tie at the top shares the credit
        ([2.0, 2.0, 2.0, 2.0], 1 / 4),
        ([1.0, 3.0, 2.0, 0.0], 0.0),
        ([2.0, 3.0, 3.0, 0.0], 0.0),  # others tied above the chosen
    ],
)
def test_best_of_n_credits_the_chosen_at_the_top_over_the_completions_sharing_it(rewards, expected):
    assert best_of_n_result(rewards) == pytest.approx(expected, abs=1e-15)


def test_ties_score_on_a_hand_computed_example():
    rows = [
        ("ref:1", 1, [2.0, 1.0, 0.5]),  # accurate, gap 1.0
        ("tied:1", 2, [3.0, 2.5, 1.0]),  # accurate, spread 0.5, gap 1.5
        ("ref:2", 1, [0.0, 1.0]),  # wrong, gap -1.0
        ("tied:2", 3, [1.0, 0.2, 0.6, 0.4]),  # wrong (0.2 < 0.4), spread 0.8, gap -0.2
    ]
    parts = ties_score(rows)
    margin = (math.tanh(1.0 / 0.5 - 1) + math.tanh(-1.0 / 0.8 - 1)) / 2
    expected = {
        "tied_accuracy": 0.5,
        "ref_accuracy": 0.5,
        "correctness_preferred": 0.5,  # question 1: 1.5 > 0.5; question 2: -0.2 < 0.8
        "correctness_preferred_hard": 0.5,  # min gaps 1.0 and -1.0 against 0.5 and 0.8
        "correctness_margin": margin,
        "score": 0.3 * 0.5 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0.5 + 0.01 * margin,
    }
    assert parts == pytest.approx(expected, abs=1e-12)


def test_ties_score_edges_follow_the_released_package():
    # Equal correct rewards: a spread of 0 counts for "preferred" but has no margin ratio.
    exact = ties_score([("ref:3", 1, [1.0, 0.0]), ("tied:3", 2, [1.0, 1.0, 0.0])])
    assert exact == pytest.approx(
        {"tied_accuracy": 1, "ref_accuracy": 1, "correctness_preferred": 1, "correctness_preferred_hard": 1,
         "correctness_margin": 0, "score": 1.0},
        abs=1e-12,
    )  # fmt: skip
    # A tied question with one correct answer has no spread: it counts for accuracy only.
    single = ties_score([("ref:5", 1, [1.0, 0.0]), ("tied:5", 1, [1.0, 0.0])])
    assert (single["correctness_preferred"], single["score"]) == (0, pytest.approx(0.6, abs=1e-12))
    # No reference rows: their accuracy and every paired part are 0.
    assert ties_score([("tied:1", 2, [2.0, 1.0, 0.0])])["score"] == pytest.approx(0.3, abs=1e-12)


def test_sections_weigh_subsets_by_the_official_counts():
    sections = section_scores({"math-prm": 1.0, "hep-go": 0.0, "alpacaeval-easy": 0.5, "mt-bench-easy": 1.0})
    assert sections == pytest.approx({"Chat": (0.5 * 100 + 1.0 * 28) / 128, "Reasoning": 984 / (984 + 164)})


def test_v1_report_overall_is_the_mean_of_the_sections_and_complete_only_on_the_published_rows():
    prompts = prompts_of(V1_ROWS)
    rewards = [[float(p.row % 3), 1.0] for p in prompts]  # wrong, a tie (wrong), right, in turn
    report, lines = score_benchmark("rewardbench", prompts, rewards)
    assert report["complete"] and report["missing_subsets"] == [] and report["num_rows"] == 2985
    for name in V1_ROWS:
        results = [r[0] > r[1] for p, r in zip(prompts, rewards) if p.subset == name]
        assert report["subsets"][name] == pytest.approx(sum(results) / len(results), abs=1e-12)
    assert report["sections"] == pytest.approx(section_scores(report["subsets"]), abs=1e-12)
    assert report["overall"] == pytest.approx(sum(report["sections"].values()) / 4, abs=1e-12)
    assert lines[1] == {"row": 1, "id": 1, "subset": "alpacaeval-easy", "chosen_reward": 1.0,
                        "rejected_reward": 1.0, "result": 0.0}  # fmt: skip

    partial, _ = score_benchmark("rewardbench", prompts[1:], rewards[1:])
    assert not partial["complete"] and partial["subset_rows"]["alpacaeval-easy"] == 99
    only_chat = [p for p in prompts if p.subset in V1_SECTIONS["Chat"]]
    chat, _ = score_benchmark("rewardbench", only_chat, rewards[: len(only_chat)])
    assert list(chat["sections"]) == ["Chat"] and chat["overall"] == chat["sections"]["Chat"]
    assert chat["missing_subsets"] == [name for name in V1_ROWS if name not in V1_SECTIONS["Chat"]]


def test_v2_report_overall_is_the_mean_of_the_six_subsets():
    prompts = prompts_of({name: 4 for name in V2_ROWS})
    rewards = [[2.0, 1.0, 2.0 if p.row % 2 else 0.0] for p in prompts]  # alternately right and half right
    report, lines = score_benchmark("rewardbench2", prompts, rewards)
    ties = [(p.id, p.num_correct, r) for p, r in zip(prompts, rewards) if p.subset == "Ties"]
    assert report["ties"] == ties_score(ties) and report["subsets"]["Ties"] == report["ties"]["score"]
    assert {k: v for k, v in report["subsets"].items() if k != "Ties"} == {
        name: pytest.approx(0.75, abs=1e-12) for name in V2_ROWS if name != "Ties"
    }
    assert report["overall"] == pytest.approx(sum(report["subsets"].values()) / 6, abs=1e-12)
    assert lines[1] == {"row": 1, "id": 1, "subset": "Factuality", "chosen_rewards": [2.0],
                        "rejected_rewards": [1.0, 2.0], "result": 0.5}  # fmt: skip
    assert lines[-1]["result"] is None  # Ties is scored as a whole
    assert "sections" not in report and not report["complete"]


def test_non_finite_rewards_are_an_error_naming_the_rows():
    prompts = prompts_of({"hep-go": 3})
    with pytest.raises(
        ValueError, match=r"data rows \[1\]: the model gave non-finite rewards \(NaN or inf\) for 1 rows"
    ):
        score_benchmark("rewardbench", prompts, [[1.0, 0.0], [math.nan, 0.0], [1.0, 0.0]])


# ----------------------------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    "version, row, match",
    [
        ("rewardbench", v1_row(subset=None), r"f.jsonl, row 3, field 'subset': missing. RewardBench v1 rows need "
         r"prompt, chosen, rejected, subset, id; fill it in or remove the row."),
        ("rewardbench", v1_row(subset="chat"), r"row 3, field 'subset': unknown subset 'chat'; RewardBench v1 has "
         r"alpacaeval-easy, .*, hep-rust. Fix the value"),
        ("rewardbench", v1_row(subset="Ties"), r"It is a RewardBench 2 subset: use --benchmark rewardbench2."),
        ("rewardbench", v1_row(chosen=["blue"]), r"field 'chosen': a list, as in RewardBench 2 data; .*Use "
         r"--benchmark rewardbench2"),
        ("rewardbench", v1_row(prompt=["hi"]), r"field 'prompt': expected a string, got list."),
        ("rewardbench2", v1_row(), r"field 'num_correct': missing. .*these look like RewardBench v1 rows: use "
         r"--benchmark rewardbench."),
        ("rewardbench2", v2_row(num_correct=2), r"row 3, field 'num_correct': 2, but 'chosen' holds 1 "
         r"completions. num_correct counts the chosen"),
        ("rewardbench2", v2_row(num_correct=True), r"field 'num_correct': True, but"),
        ("rewardbench2", v2_row(total_completions=3), r"field 'total_completions': 3, but 'chosen' and 'rejected' "
         r"hold 4 completions"),
        ("rewardbench2", v2_row(chosen=["blue", "green"], num_correct=2), r"field 'chosen': 2 completions; outside "
         r"Ties RewardBench 2 scores best-of-N with exactly one"),
        ("rewardbench2", v2_row(rejected=[]), r"field 'rejected': expected a non-empty list of strings"),
        ("rewardbench2", v2_row(rejected=["a", 3]), r"field 'rejected': expected a non-empty list of strings"),
        ("rewardbench2", v2_row(subset="Ties", id="tied-4"), r"field 'id': 'tied-4'; a Ties row's id is 'ref:N' or "
         r"'tied:N'"),
        ("rewardbench2", v2_row(subset="math-prm"), r"unknown subset 'math-prm'; RewardBench 2 has Factuality, "
         r"Precise IF, Math, Safety, Focus, Ties. It is a RewardBench v1 subset: use --benchmark rewardbench."),
    ],
)  # fmt: skip
def test_a_bad_row_is_an_error_naming_file_row_field_and_fix(version, row, match):
    good = v1_row() if version == "rewardbench" else v2_row()
    rows = Rows([good, good, good, row], "f.jsonl")
    with pytest.raises(PairDataError, match=match):
        read_prompts(rows, version)


def test_skipped_rows_are_counted_and_good_rows_kept():
    rows = Rows([v2_row(), v2_row(num_correct=3), v2_row(subset="Nope"), v2_row(id="13")], "f.jsonl", [0, 2, 3, 4])
    rows.bad_rows.append("f.jsonl, line 2: malformed JSON")  # what read_rows skipped
    prompts, report = read_prompts(rows, "rewardbench2", on_bad_row="skip")
    assert [(p.row, p.id) for p in prompts] == [(0, "12"), (4, "13")]
    assert (report.rows_in, report.skipped_bad) == (5, 3)
    assert report.bad_rows[0] == "f.jsonl, line 2: malformed JSON"
    assert "row 2, field 'num_correct'" in report.bad_rows[1]


def test_a_repeated_ties_id_is_a_bad_row_and_subset_names_match_ignoring_case():
    rows = Rows([v2_row(subset="ties", id="ref:1", chosen=["a"]), v2_row(subset="Ties", id="ref:1")], "f.jsonl")
    with pytest.raises(PairDataError, match=r"row 1, field 'id': 'ref:1' is also the id of row 0; the Ties score"):
        read_prompts(rows, "rewardbench2")
    prompts, report = read_prompts(rows, "rewardbench2", on_bad_row="skip")
    assert [p.subset for p in prompts] == ["Ties"] and report.skipped_bad == 1


def test_no_usable_row_is_an_error():
    with pytest.raises(PairDataError, match=r"f.jsonl: no usable RewardBench v1 rows \(0/1 rows scored, 1 bad rows"):
        read_prompts(Rows([v1_row(id=None)], "f.jsonl"), "rewardbench", on_bad_row="skip")


# ---------------------------------------------------------------------------------------------- formatting


def tokenize_rows(rows: list[dict], tokenizer, **options):
    prompts, report = read_prompts(Rows(rows, "f.jsonl"), "rewardbench2")
    return tokenize_prompts(prompts, tokenizer, report, **options), report


def test_completions_are_formatted_as_training_formats_a_conversation(bos_tokenizer):
    tokenized, _ = tokenize_rows([v2_row()], bos_tokenizer)
    user = [{"role": "user", "content": "what color is the sky ?"}]
    pairs = tokenize_pairs(
        [{"prompt": user, "chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant",
          "content": "blue"}]} for c in ("red", "green", "no")],
        bos_tokenizer,
    )  # fmt: skip
    assert tokenized.sequences == [pairs["rejected_ids"][0], *pairs["chosen_ids"]]
    assert tokenized.prompt_lengths == pairs["prompt_length"][:1] * 4  # the user turn, shared by all four
    assert bos_tokenizer.convert_ids_to_tokens(tokenized.sequences[1]) == [
        "<s>", "<|user|>", "what", "color", "is", "the", "sky", "?", "</s>", "<|assistant|>", "red", "</s>",
    ]  # fmt: skip


def test_without_a_chat_template_completions_are_plain_text_with_eos():
    tokenizer = make_bos_tokenizer()
    tokenizer.chat_template = None
    tokenized, _ = tokenize_rows([v2_row(prompt="what color is the sky ? ")], tokenizer)
    pairs = tokenize_pairs([{"prompt": "what color is the sky ? ", "chosen": "blue", "rejected": "red"}], tokenizer)
    assert tokenized.sequences[:2] == [pairs["chosen_ids"][0], pairs["rejected_ids"][0]]
    assert tokenizer.convert_ids_to_tokens(tokenized.sequences[0])[-2:] == ["blue", "</s>"]
    assert tokenized.prompt_lengths == pairs["prompt_length"] * 4


def test_rows_longer_than_max_length_are_dropped_or_cut_from_the_left_and_counted(bos_tokenizer):
    long_prompt = "what color is the sky ? " * 3  # 18 words: 21 prompt tokens with BOS, <|user|> and </s>
    rows = [v2_row(prompt=long_prompt), v2_row(id="13")]
    full, _ = tokenize_rows(rows, bos_tokenizer)
    assert [len(ids) for ids in full.sequences[:4]] == [24] * 4 and full.prompt_lengths[0] == 21

    dropped, report = tokenize_rows(rows, bos_tokenizer, max_length=20)
    assert [p.id for p in dropped.prompts] == ["13"] and (report.dropped_too_long, report.rows_scored) == (1, 1)

    cut, report = tokenize_rows(rows, bos_tokenizer, max_length=20, truncation="keep_end")
    assert (report.truncated, report.dropped_too_long) == (1, 0)
    for whole, kept in zip(full.sequences[:4], cut.sequences[:4]):
        assert kept == whole[:1] + whole[5:]  # BOS kept, then the same 4 prompt tokens cut from each
    assert cut.prompt_lengths[:4] == [17] * 4 and cut.sequences[4:] == full.sequences[4:]

    # A completion alone longer than max_length is never cut: its row is dropped.
    _, report = tokenize_rows([*rows, v2_row(id="14", rejected=["no " * 14, "a", "b"])], bos_tokenizer,
                              max_length=14, truncation="keep_end")  # fmt: skip
    assert (report.truncated, report.dropped_too_long, report.rows_scored) == (1, 1, 2)


def test_every_row_too_long_is_an_error(bos_tokenizer):
    with pytest.raises(PairDataError, match=r"f.jsonl: every row is longer than max_length=4 tokens .* Raise"):
        tokenize_rows([v2_row()], bos_tokenizer, max_length=4)


# ------------------------------------------------------------------------------------------------- output


def test_the_table_lists_sections_subsets_and_says_when_the_data_is_partial(tmp_path):
    prompts = prompts_of({"hep-go": 2, "alpacaeval-easy": 1})
    report, _ = score_benchmark("rewardbench", prompts, [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    table = format_benchmark_table(report).splitlines()
    assert table[:6] == [
        "RewardBench v1: 3 rows",
        "  Chat                                      1.0000",
        "    alpacaeval-easy                 1 rows  1.0000",
        "  Reasoning                                 0.5000",
        "    hep-go                          2 rows  0.5000",
        "  overall                                   0.7500",
    ]
    table = "\n".join(table)
    assert "note: not the full benchmark" in table and "no rows of alpacaeval-length," in table
    assert_real_png(plot_benchmark_scores(report, tmp_path / "scores.png"))
