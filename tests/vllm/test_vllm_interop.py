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

from bench.vllm_engine import SERVED_NAME, VllmServer, unavailable
from rmtorch.formatting import chat_text, tokenize_response
from rmtorch.score import RewardScorer
from tests.conftest import read_jsonl, run_script, shared_path, tiny_config, train_argv, train_in_process, write_jsonl

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(unavailable() is not None, reason=f"plain vLLM is not installed: {unavailable()}"),
]

DATA = ("data", "r1_gsm8k", "r1_distill_qwen32b_gsm8k_labeled.jsonl")
SCORED = 8  # the first GSM8K rows are scored; the training pairs come from the rows after them
TIMEOUT = httpx.Timeout(120)


def conversation(row: dict) -> tuple[list[dict], list[dict]]:
    """(prompt, completion) as TRL's GRPO passes them: the question as a user turn, the answer as the reply."""
    return [{"role": "user", "content": row["question"]}], [{"role": "assistant", "content": row["answer"]}]


def save_base_model(directory, tokenizer):
    """A random 2-layer Llama reward model with head_dim 64: vLLM's CPU attention runs head sizes 32, 64, 80, ...,
    and with conftest's tiny Llama (head_dim 8) its server starts, then fails its first request."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
    config = LlamaConfig(
        **{**tiny_config(len(tokenizer), tokenizer.pad_token_id), **shape, "max_position_embeddings": 2048},
        num_labels=1,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    return read_jsonl(shared_path(*DATA))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smol_tokenizer, gsm8k_rows) -> dict:
    """{name: (the directory rmtorch scores, the directory vLLM serves)}: a full fine-tune (the same directory), and
    a LoRA run (its adapter, and the plain model merge_lora.py writes from it)."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("vllm_runs")
    base = save_base_model(root / "base", smol_tokenizer)
    pairs = []
    for row, other in zip(gsm8k_rows[SCORED : SCORED + 8], gsm8k_rows[SCORED + 1 :]):
        prompt, chosen = conversation(row)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": conversation(other)[1]})  # another's answer
    data = write_jsonl(root / "pairs.jsonl", pairs)
    # A large learning rate, so that the trained weights are far from the base's (a served base would show).
    options = ("--max_length", "1024", "--lr", "1e-3")
    for name, extra in {"full": (), "lora": ("--lora", "--lora_r", "4")}.items():
        train_in_process(train_argv(base, data, root / name, *options, *extra))
        AcceleratorState._reset_state(reset_partial_state=True)  # each run builds its own Accelerator
    run_script("merge_lora.py", ["--model", str(root / "lora"), "--output_dir", str(root / "lora_merged")])
    return {"full": (root / "full", root / "full"), "lora": (root / "lora", root / "lora_merged")}


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
