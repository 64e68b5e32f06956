"""train.py --objective regression end to end on a tiny model: two rated attributes train (the loss goes down), the
saved model is a standard 2-label classifier naming them, and RewardScorer's reward is the saved weights times the
attributes a plain forward gives."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rmtorch.score import RewardScorer
from tests.conftest import train_argv, train_in_process, train_records, write_jsonl

WORDS = "what color is the sky blue green red yes no a an of to and in it".split()


def rating_rows(count: int, seed: int = 0) -> list[dict]:
    """Responses ending in 'good' rate 4 on helpfulness, 'bad' 0; verbosity is the response's word count."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        good = rng.random() < 0.5
        words = rng.choices(WORDS, k=rng.randint(1, 4)) + ["good" if good else "bad"]
        rows.append({"prompt": " ".join(rng.choices(WORDS, k=3)), "response": " " + " ".join(words),
                     "helpfulness": 4 if good else 0, "verbosity": len(words)})  # fmt: skip
    return rows


@pytest.mark.parametrize("normalize", ["false", "true"])
def test_ratings_train_save_and_score(normalize, tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rating_rows(32))
    held_out = write_jsonl(tmp_path / "eval.jsonl", rating_rows(8, 1))
    out = tmp_path / "run"
    argv = train_argv(tiny_model_dir, train, out, "--objective", "regression", "--attributes", "helpfulness,verbosity",
                      "--reward_weights", "0.75,-0.25", "--normalize_targets", normalize, "--max_steps", "16",
                      "--batch_size", "8", "--lr", "1e-2", "--shuffle", "false", eval_file=held_out)  # fmt: skip
    results = train_in_process(argv)
    records = train_records(out)
    first_epoch, last_epoch = (sum(r["loss"] for r in part) for part in (records[:4], records[-4:]))  # same batches
    assert last_epoch < first_epoch
    assert results["num_rows"] == 8 and {"rmse_helpfulness", "pearson_verbosity", "rmse"} <= set(results)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "helpfulness", "1": "verbosity"} and config["problem_type"] == "regression"
    assert config["rmtorch_reward_weights"] == [0.75, -0.25]
    assert ("rmtorch_attribute_std" in config) == (normalize == "true")

    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert plain.config.num_labels == 2
    scorer = RewardScorer.from_pretrained(str(out), device="cpu", autocast_dtype=None)
    prompts = ["the sky is", "what color", "the sky is"]
    completions = [" blue good", " red a bad", " green"]
    details = scorer(prompts, completions, return_details=True)
    expected = []
    for prompt, completion in zip(prompts, completions):
        ids = scorer.tokenizer(prompt + completion + scorer.tokenizer.eos_token, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            outputs = plain(input_ids=ids).logits[0]  # one unpadded row: its last token is the pooled one
        if normalize == "true":
            outputs = outputs * torch.tensor(config["rmtorch_attribute_std"]) + torch.tensor(
                config["rmtorch_attribute_mean"]
            )
        expected.append(outputs)
    expected = torch.stack(expected)  # (3, 2)
    assert details.attributes.shape == (3, 2)
    torch.testing.assert_close(details.attributes, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(details.rewards, expected @ torch.tensor([0.75, -0.25]), atol=1e-5, rtol=0)


def test_regression_needs_attributes(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rating_rows(4))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="--objective regression needs --attributes"):
        train_in_process(train_argv(tiny_model_dir, train, out, "--objective", "regression"))
    with pytest.raises(SystemExit, match=r"--reward_weights must be 2 comma-separated numbers"):
        train_in_process(train_argv(tiny_model_dir, train, out, "--objective", "regression", "--attributes",
                                    "helpfulness,verbosity", "--reward_weights", "1"))  # fmt: skip
    assert not out.exists()
