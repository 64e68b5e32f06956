"""Plain vLLM serves a rating model (`train.py --objective regression`) unchanged: `/classify` with
`"use_activation": false` answers the head's K outputs, which the config's scale and weights turn into
RewardScorer's attributes and reward (fp32, within 1e-4), on real GSM8K answers. A module of its own, so that its
vLLM server can start on another pytest-xdist worker than the interop servers'."""

from __future__ import annotations

import json

import pytest
import torch

from bench.vllm_engine import unavailable
from rmtorch.formatting import tokenize_response
from rmtorch.score import RewardScorer
from tests.conftest import train_argv, train_in_process, write_jsonl
from tests.vllm.conftest import SCORED, conversation, fast_vllm_server, save_base_model
from tests.vllm.test_vllm_interop import classify

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(unavailable() is not None, reason=f"plain vLLM is not installed: {unavailable()}"),
]


@pytest.fixture(scope="module")
def rating_run(tmp_path_factory, smol_tokenizer, gsm8k_rows):
    """A rating model trained on GSM8K answers: whether the answer is right, and its length in words (normalized
    targets, so the head predicts standardized attributes that the config's mean and std turn back)."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("vllm_ratings")
    base = save_base_model(root / "base", smol_tokenizer)  # its rows hold no thinking: SmolLM2's own vocabulary
    rows = []
    for row in gsm8k_rows[SCORED : SCORED + 16]:
        prompt, response = conversation(row)
        rows.append({"prompt": prompt, "response": response, "correct": float(row["is_correct"]),
                     "words": float(len(row["answer"].split()))})  # fmt: skip
    data = write_jsonl(root / "ratings.jsonl", rows)
    options = ("--objective", "regression", "--attributes", "correct,words", "--reward_weights", "1.0,-0.01",
               "--normalize_targets", "true", "--max_length", "1024", "--lr", "1e-3")  # fmt: skip
    train_in_process(train_argv(base, data, root / "run", *options))
    AcceleratorState._reset_state(reset_partial_state=True)  # tests after this one build their own Accelerator
    return root / "run"


def test_vllm_classify_serves_a_rating_models_attributes(rating_run, gsm8k_rows):
    """vLLM answers the head's K raw outputs (standardized here); times the saved std plus the saved mean they are
    RewardScorer's attributes, and their weighted sum its reward."""
    scorer = RewardScorer.from_pretrained(str(rating_run), autocast_dtype=None)
    prompts, completions = zip(*(conversation(row) for row in gsm8k_rows[:SCORED]))
    ids = [tokenize_response(scorer.tokenizer, p, c) for p, c in zip(prompts, completions)]
    details = scorer(list(prompts), list(completions), return_details=True)
    config = json.loads((rating_run / "config.json").read_text())
    mean, std = torch.tensor(config["rmtorch_attribute_mean"]), torch.tensor(config["rmtorch_attribute_std"])
    with fast_vllm_server(rating_run) as server:
        answer = classify(server.url, {"input": ids, "use_activation": False})
    raw = torch.tensor([d["probs"] for d in answer["data"]])
    assert raw.shape == (SCORED, 2)
    assert raw[:, 1].std() > 0.01, "the rows' predicted lengths must differ for the comparison to mean anything"
    torch.testing.assert_close(raw, (details.attributes - mean) / std, atol=1e-4, rtol=0)  # in the head's units
    attributes = raw * std + mean
    torch.testing.assert_close(attributes @ torch.tensor(config["rmtorch_reward_weights"]), details.rewards,
                               atol=1e-4, rtol=0)  # fmt: skip
