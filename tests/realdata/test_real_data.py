"""Real data from ../shared: the eval report on LLMBar with a tiny model, and a short SmolLM2 run on
LLaMA-Factory's dpo_en_demo pairs that must learn the pairs it trains on (slow)."""

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


# What a 5-step run on real pairs can show: that it learns the pairs it trains on, measured paired (each pair's
# margin after training against its margin under the untrained model, the same seed-42 head), with the mean gain
# standing well clear of its own standard error. Held-out pairs cannot show it at this size: 35 of them fit in 256
# tokens, and on 2026-12-08 (AMX Xeon, bf16, 10 steps) their mean margin gain was 0.23 with a per-pair spread of
# 1.11 (t 1.2; accuracy 0.600, whose standard error is 0.08; 0.571 to 0.686 across equally good settings), so the
# earlier bar on held-out accuracy (0.60) passed or failed by chance. Held-out figures are printed, not asserted;
# generalization is the default run's to show (docs/benchmarks.md: 0.84 on 100 held-out pairs).
# Measured the same day: 41 training pairs, gain 0.71 +- 0.62 (t 7.3), accuracy 0.512 -> 0.902 (10 steps: t 11.8,
# 0.927; 5 steps keep CI's slowest test at about a minute alone).
MIN_PAIRED_T = 3.0  # mean margin gain over its standard error: p < 0.003 on 40 pairs
TRAIN_ARGS = [
    "--eval_fraction", "0.5", "--max_length", "256", "--truncation", "keep_end", "--batch_size", "8", "--lr", "1e-4",
    "--max_steps", "5",
]  # fmt: skip


def pair_margins(model, pairs, tokenizer) -> torch.Tensor:
    """(N,) chosen-minus-rejected rewards of tokenized pairs under bf16 autocast."""
    from rmtorch.model import RewardModel, score_pairs

    chosen, rejected = score_pairs(
        RewardModel(model), pairs, pad_token_id=tokenizer.pad_token_id, autocast_dtype=torch.bfloat16
    )
    return chosen - rejected


@pytest.mark.slow
def test_short_smollm2_run_learns_its_real_training_pairs(tmp_path):
    from transformers import set_seed

    import train
    from rmtorch.config import TrainConfig, parse_config
    from rmtorch.loading import load_reward_model, resolve_model_path

    argv = ["--train_file", str(shared_path("data", "llamafactory", "dpo_en_demo.json")), *TRAIN_ARGS]
    out = tmp_path / "run"
    train.main([*argv, "--output_dir", str(out)])
    report = json.loads((out / "report" / "metrics.json").read_text())

    cfg = parse_config([*argv, "--output_dir", str(tmp_path / "unused")], TrainConfig)
    set_seed(cfg.seed)
    untrained_model, tokenizer = load_reward_model(resolve_model_path(cfg.model))  # the head train.py drew
    train_set, _, _ = train.build_data(cfg, tokenizer)  # train.py's own split
    untrained = pair_margins(untrained_model, train_set, tokenizer)
    gain = pair_margins(load_reward_model(str(out))[0], train_set, tokenizer) - untrained
    t = (gain.mean() / (gain.std() / len(gain) ** 0.5)).item()
    summary = (
        f"{len(gain)} training pairs: margin gain {gain.mean():.3f} +- {gain.std():.3f} (t {t:.1f}), accuracy "
        f"{(untrained > 0).float().mean():.3f} -> {(gain + untrained > 0).float().mean():.3f}; held-out: accuracy "
        f"{report['accuracy']:.3f}, margin {report['margin']:.3f} on {report['num_pairs']} pairs"
    )
    print(summary)
    assert report["num_pairs"] == 35, summary  # keep_end at 256 tokens keeps 35 of the 150 held-out rows
    assert t >= MIN_PAIRED_T, summary


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
