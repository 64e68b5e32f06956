"""Plain vLLM serves what train.py writes as rmtorch scores it.

A full fine-tune and a LoRA run merged by merge_lora.py, each served by the command docs/serve.md documents
(`bench.vllm_engine.server_command`), give RewardScorer's fp32 rewards within 1e-4 through `/classify` with
`"use_activation": false`, on real GSM8K rows in training's format: sent as training's token ids, and as the
chat-template texts verl sends (which vLLM must tokenize into those same ids). A rating model (`--objective
regression`, two attributes, normalized targets) answers its K outputs, which the config's scale and weights turn
into RewardScorer's attributes and reward.

vLLM runs from .venv-vllm (tests/vllm/setup_venv.sh; CI creates it); these tests run from the main venv and skip
with the reason when it is absent. One server per model, shared by that model's tests: startup takes about 90 s on
2 cores.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from bench.vllm_engine import SERVED_NAME, VllmServer, unavailable
from rmtorch.formatting import chat_text, tokenize_response
from rmtorch.score import RewardScorer
from tests.conftest import train_argv, train_in_process, write_jsonl
from tests.vllm.conftest import SCORED, THINK_TOKENS, conversation, save_base_model

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(unavailable() is not None, reason=f"plain vLLM is not installed: {unavailable()}"),
]

TIMEOUT = httpx.Timeout(120)


@pytest.fixture(scope="module", params=["full", "lora"])
def served(request, runs, gsm8k_rows):
    """(vLLM's URL, the scorer, training's token ids of the scored rows, their fp32 rewards from rmtorch)."""
    scored_dir, served_dir = runs[request.param]
    scorer = RewardScorer.from_pretrained(str(scored_dir), autocast_dtype=None)
    prompts, completions = zip(*(conversation(row) for row in gsm8k_rows[:SCORED]))
    ids = [tokenize_response(scorer.tokenizer, p, c) for p, c in zip(prompts, completions)]
    rewards = scorer(list(prompts), list(completions))
    assert rewards.std() > 0.01, "the rows' rewards must differ for the comparison to mean anything"
    with VllmServer(served_dir) as server:
        yield server.url, scorer, ids, rewards


def classify(url: str, body: dict) -> dict:
    response = httpx.post(url + "/classify", json={"model": SERVED_NAME, **body}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def test_vllm_scores_training_ids_as_rmtorch(served):
    url, _, ids, rewards = served
    answer = classify(url, {"input": ids, "use_activation": False})
    assert [d["index"] for d in answer["data"]] == list(range(len(ids)))
    assert answer["usage"]["prompt_tokens"] == sum(len(row) for row in ids)
    torch.testing.assert_close(torch.tensor([d["probs"][-1] for d in answer["data"]]), rewards, atol=1e-4, rtol=0)


def test_vllm_scores_chat_texts_as_training_ids(served, gsm8k_rows):
    """What verl sends: the rendered chat text, one row per request. vLLM tokenizes it into training's ids (with
    add_special_tokens false; its default true would add a BOS-adding tokenizer's BOS a second time)."""
    url, scorer, ids, rewards = served
    texts = [chat_text(scorer.tokenizer, [*p, *c]) for p, c in map(conversation, gsm8k_rows[:SCORED])]
    tokenize = {"model": SERVED_NAME, "add_special_tokens": False}
    tokenized = [
        httpx.post(url + "/tokenize", json={**tokenize, "prompt": text}, timeout=TIMEOUT).json()["tokens"]
        for text in texts
    ]
    assert tokenized == ids
    body = {"use_activation": False, "add_special_tokens": False}
    served_rewards = [classify(url, {**body, "input": text})["data"][-1]["probs"][-1] for text in texts]
    torch.testing.assert_close(torch.tensor(served_rewards), rewards, atol=1e-4, rtol=0)
    # Without use_activation false, vLLM answers the reward's sigmoid.
    sigmoid = classify(url, {"input": texts[0], "add_special_tokens": False})["data"][-1]["probs"][-1]
    assert sigmoid == pytest.approx(torch.sigmoid(rewards[0]).item(), abs=1e-5)


@pytest.fixture(scope="module")
def rating_run(tmp_path_factory, smol_tokenizer, gsm8k_rows):
    """A rating model trained on GSM8K answers: whether the answer is right, and its length in words (normalized
    targets, so the head predicts standardized attributes that the config's mean and std turn back)."""
    import copy

    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("vllm_ratings")
    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.add_tokens(THINK_TOKENS, special_tokens=True)
    base = save_base_model(root / "base", tokenizer)
    rows = []
    for row in gsm8k_rows[SCORED : SCORED + 16]:
        prompt, response = conversation(row)
        rows.append({"prompt": prompt, "response": response, "correct": float(row["is_correct"]),
                     "words": float(len(row["answer"].split()))})  # fmt: skip
    data = write_jsonl(root / "ratings.jsonl", rows)
    options = ("--objective", "regression", "--attributes", "correct,words", "--reward_weights", "1.0,-0.01",
               "--normalize_targets", "true", "--max_length", "1024", "--lr", "1e-3")  # fmt: skip
    train_in_process(train_argv(base, data, root / "run", *options))
    AcceleratorState._reset_state(reset_partial_state=True)
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
    with VllmServer(rating_run) as server:
        answer = classify(server.url, {"input": ids, "use_activation": False})
    raw = torch.tensor([d["probs"] for d in answer["data"]])
    assert raw.shape == (SCORED, 2)
    assert raw[:, 1].std() > 0.01, "the rows' predicted lengths must differ for the comparison to mean anything"
    torch.testing.assert_close(raw, (details.attributes - mean) / std, atol=1e-4, rtol=0)  # in the head's units
    attributes = raw * std + mean
    torch.testing.assert_close(attributes @ torch.tensor(config["rmtorch_reward_weights"]), details.rewards,
                               atol=1e-4, rtol=0)  # fmt: skip
