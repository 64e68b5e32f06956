"""Real data from ../shared: the eval report on LLMBar with a tiny model, and a short SmolLM2 run on
LLaMA-Factory's dpo_en_demo pairs that must beat chance on held-out pairs (slow)."""

from __future__ import annotations

import json

import pytest
import torch

import evaluate
from rmtorch.formatting import tokenize_response
from rmtorch.score import RewardScorer
from tests.conftest import PROMPTS, RESPONSES, read_jsonl, reward_alone, save_tiny_llama, shared_path


def test_eval_report_on_llmbar_scores_the_labelled_output_as_chosen(tmp_path, smol_tokenizer):
    from transformers import AutoModelForSequenceClassification

    data = shared_path("data", "llmbar", "LLMBar_Natural.json")
    model_dir = save_tiny_llama(tmp_path / "model", smol_tokenizer)
    report = evaluate.main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--report",
            str(tmp_path / "report"),
            "--bf16",
            "false",
            "--max_length",
            "4096",  # none would be the model's own limit (512 here), which 4 of these pairs pass
        ]
    )
    assert report["num_pairs"] == 100 and report["data"]["pairs_out"] == 100
    scores = read_jsonl(tmp_path / "report" / "scores.jsonl")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    for row, score in list(zip(json.loads(data.read_text()), scores))[:8]:
        better, worse = ("output_1", "output_2") if str(row["label"]) == "1" else ("output_2", "output_1")
        with torch.no_grad():
            expected = [
                model(
                    torch.tensor(
                        [
                            smol_tokenizer.apply_chat_template(
                                [
                                    {"role": "user", "content": row["input"]},
                                    {"role": "assistant", "content": row[side]},
                                ],
                                tokenize=True,
                                return_dict=True,
                            )["input_ids"]
                        ]
                    )
                ).logits.item()
                for side in (better, worse)
            ]
        assert [score["chosen_reward"], score["rejected_reward"]] == pytest.approx(expected, rel=1e-4, abs=1e-4)


# Measured on 2 shared CPU cores (bf16 autocast, seed 42): held-out accuracy 0.686 (24/35 pairs), mean margin
# 0.363; the untrained model (same seed-42 head) scores 0.571 (20/35) with margin 0.071. LLMBar Natural after a
# similar run stays at chance (0.517 on 87 pairs), so the held-out split of the training file is the honest check.
MIN_HELD_OUT_ACCURACY = 0.60
MIN_HELD_OUT_MARGIN = 0.20


@pytest.mark.slow
def test_short_smollm2_run_beats_chance_on_held_out_dpo_pairs(tmp_path):
    import train

    train_file = shared_path("data", "llamafactory", "dpo_en_demo.json")
    out = tmp_path / "run"
    train.main(
        [
            "--train_file",
            str(train_file),
            "--eval_fraction",
            "0.5",
            "--max_length",
            "256",
            "--truncation",
            "keep_end",
            "--batch_size",
            "8",
            "--lr",
            "1e-4",
            "--max_steps",
            "10",
            "--output_dir",
            str(out),
        ]
    )
    report = json.loads((out / "report" / "metrics.json").read_text())
    summary = (
        f"held-out accuracy {report['accuracy']:.3f}, margin {report['margin']:.3f} on {report['num_pairs']} pairs"
    )
    assert report["num_pairs"] == 35, (
        summary
    )  # 150 held-out rows; keep_end at 256 tokens keeps the pairs whose responses fit
    assert report["accuracy"] >= MIN_HELD_OUT_ACCURACY, summary
    assert report["margin"] >= MIN_HELD_OUT_MARGIN, summary


@pytest.mark.slow
def test_smollm2_fused_equals_one_by_one():
    scorer = RewardScorer.from_pretrained("smollm2", device="cpu", max_tokens_per_batch=256)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS for _ in range(2)]
    completions = [
        [{"role": "assistant", "content": r}] for r in RESPONSES + ["blue", "It is 5.", "Hi!", "Yes, very good."]
    ]
    expected = [
        reward_alone(scorer.model, tokenize_response(scorer.tokenizer, p, c)) for p, c in zip(prompts, completions)
    ]
    torch.testing.assert_close(scorer(prompts, completions), torch.tensor(expected), atol=1e-4, rtol=0)


def test_keep_end_on_real_pairs_never_cuts_a_response_token(smol_tokenizer):
    """dpo_en_demo at 512 tokens: every truncated pair keeps each response token its full tokenization has (the
    common-prefix rule once cut 4 and 9 response tokens from two pairs whose responses begin alike)."""
    from rmtorch.files import read_rows
    from rmtorch.pairs import tokenize_pairs

    rows = read_rows(shared_path("data", "llamafactory", "dpo_en_demo.json"))
    full = tokenize_pairs(rows, smol_tokenizer)
    cut = tokenize_pairs(rows, smol_tokenizer, max_length=512, truncation="keep_end")
    by_row = {row: i for i, row in enumerate(full["row"])}
    assert cut.report.truncated > 50
    for i, row in enumerate(cut["row"]):
        whole = full[by_row[row]]
        for side in ("chosen_ids", "rejected_ids"):
            response = whole[side][whole["prompt_length"] :]
            assert cut[i][side][len(cut[i][side]) - len(response) :] == response, (row, side)
            assert len(cut[i][side]) <= 512
