"""Plain vLLM serves what train.py writes as rmtorch scores it.

A full fine-tune and a LoRA run merged by merge_lora.py, each served by the command docs/serve.md documents
(`bench.vllm_engine.server_command`), give RewardScorer's fp32 rewards within 1e-4 through `/classify` with
`"use_activation": false`, on real GSM8K rows in training's format: sent as training's token ids, and as the
chat-template texts verl sends (which vLLM must tokenize into those same ids).

vLLM runs from .venv-vllm (tests/vllm/setup_venv.sh; CI creates it); these tests run from the main venv and skip
with the reason when it is absent. One server per model, shared by that model's tests: startup takes about 90 s on
2 cores.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from bench.vllm_engine import SERVED_NAME, unavailable
from rmtorch.formatting import chat_text, tokenize_response
from rmtorch.score import RewardScorer
from tests.vllm.conftest import SCORED, conversation, fast_vllm_server

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
    with fast_vllm_server(served_dir) as server:
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
