"""rmtorch.ratings: the weighted MSE by hand, rows' validation and batching, the report's numbers."""

from __future__ import annotations

import pytest
import torch

from rmtorch.files import PairDataError
from rmtorch.ratings import RatingCollator, rating_report, regression_loss, target_scale, tokenize_ratings


def test_regression_loss_by_hand():
    predictions = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    targets = torch.tensor([[0.0, 2.0], [1.0, 4.0]])
    # attribute 0: errors 1, 2 -> MSE 2.5; attribute 1: errors 0, -4 -> MSE 8
    assert regression_loss(predictions, targets, [1.0, 1.0], [1.0, 1.0]).item() == pytest.approx(5.25)
    assert regression_loss(predictions, targets, [3.0, 1.0], [1.0, 1.0]).item() == pytest.approx((7.5 + 8) / 4)
    # std 2 on attribute 1: its errors count half, its MSE a quarter
    assert regression_loss(predictions, targets, [1.0, 1.0], [1.0, 2.0]).item() == pytest.approx((2.5 + 2) / 2)


def rows() -> list[dict]:
    return [
        {"prompt": "the sky is", "response": " blue", "a": 4, "b": 1.5},
        {"prompt": "the sky is", "response": " green", "a": 0, "b": 0.5},
        {"prompt": "what color", "response": " red it is", "a": 2, "b": 1.0},
    ]


def test_tokenize_ratings_keeps_targets_in_attribute_order(bos_tokenizer):
    ratings = tokenize_ratings(rows(), bos_tokenizer, ["b", "a"], source="r.jsonl")
    assert ratings["targets"] == [[1.5, 4.0], [0.5, 0.0], [1.0, 2.0]]
    assert ratings.report.ratings_out == 3
    ids, prompt_length = ratings[0]["ids"], ratings[0]["prompt_length"]
    assert ids[:prompt_length] == bos_tokenizer("the sky is")["input_ids"][:prompt_length]
    mean, std = target_scale(ratings, normalize=True)
    assert mean == pytest.approx([1.0, 2.0]) and std == pytest.approx([(1 / 6) ** 0.5, (8 / 3) ** 0.5])
    assert target_scale(ratings, normalize=False) == ([0.0, 0.0], [1.0, 1.0])


def test_a_missing_or_bad_rating_names_file_row_and_field(bos_tokenizer):
    bad = rows()
    bad[1]["a"] = "high"
    with pytest.raises(
        PairDataError, match=r"r\.jsonl, row 1, field 'a': the rating must be a finite number, got a string"
    ):
        tokenize_ratings(bad, bos_tokenizer, ["a", "b"], source="r.jsonl")
    with pytest.raises(PairDataError, match=r"row 0, field 'c': .* got nothing \(the column is missing\)"):
        tokenize_ratings(rows(), bos_tokenizer, ["a", "c"], source="r.jsonl")
    skipped = tokenize_ratings(bad, bos_tokenizer, ["a", "b"], source="r.jsonl", on_bad_row="skip")
    assert skipped["row"] == [0, 2] and skipped.report.skipped_bad == 1


def test_collator_packs_or_pads_with_targets():
    examples = [{"ids": [1, 2, 3], "targets": [4.0, 0.5]}, {"ids": [1, 5], "targets": [1.0, 2.0]}]
    packed = RatingCollator(target_std=[2.0, 1.0])(examples)
    assert packed["last_index"].tolist() == [2, 4] and packed["target_std"].tolist() == [2.0, 1.0]
    padded = RatingCollator(packing=False, pad_token_id=0)(examples)
    assert padded["input_ids"].tolist() == [[1, 2, 3], [1, 5, 0]] and padded["attention_mask"].sum() == 5
    assert padded["targets"].tolist() == [[4.0, 0.5], [1.0, 2.0]] and padded["target_std"].tolist() == [1.0, 1.0]


def test_report_rmse_and_pearson(bos_tokenizer):
    ratings = tokenize_ratings(rows(), bos_tokenizer, ["a", "b"], source="r.jsonl")
    predictions = torch.tensor([[3.0, 1.5], [1.0, 0.5], [2.0, 1.0]])  # a: errors -1, 1, 0; b exact
    report, scores = rating_report(ratings, predictions, [1.0, 1.0])
    assert report["rmse_a"] == pytest.approx((2 / 3) ** 0.5) and report["rmse_b"] == 0.0
    assert report["pearson_a"] == pytest.approx(1.0) and report["pearson_b"] == pytest.approx(1.0)
    assert report["loss"] == pytest.approx((2 / 3) / 2)
    assert scores[0] == {"row": 0, "predicted": {"a": 3.0, "b": 1.5}, "target": {"a": 4.0, "b": 1.5}}
