"""Plain vLLM serves an rmtorch process reward model (train.py --objective steps) with its token-wise STEP pooling,
and its per-step outputs are RewardScorer.score_steps' step rewards (fp32, within 1e-4).

A step model is a plain `LlamaForSequenceClassification` with one head output (num_labels=1), trained so that the
head at the last token of each step's separator is that step's reward (logit). vLLM 0.32 converts the architecture
with `as_seq_cls_model` (the `ForSequenceClassification` suffix: `--convert classify` by default), whose pooler also
offers the task `token_classify`: the same `score` head on every position, which STEP pooling narrows to the
positions whose token id is `step_tag_id`. So a single-token separator (SmolLM2's "\\n\\n", id 1116) maps onto:

    python -m vllm.entrypoints.openai.api_server --model RUN_DIR --runner pooling --dtype float32 \\
        --pooler-config '{"task": "token_classify", "pooling_type": "STEP", "step_tag_id": 1116}'
    POST /pooling {"model": ..., "input": [[ids...], ...], "task": "token_classify", "use_activation": false}
    -> {"data": [{"index": i, "object": "pooling", "data": [[r_1], [r_2], ...]}, ...], "usage": {...}}

vLLM reads every position of the whole input whose id is step_tag_id, the prompt's included (it has no notion of
where the completion starts): the scored rows' prompts (GSM8K questions) hold no "\\n\\n", so vLLM's rows are
rmtorch's step rewards exactly; one extra row whose prompt ends with "\\n\\n" shows the extra leading output, which a
caller drops (the first `prompt_ids.count(step_tag_id)` values). Without `"use_activation": false` vLLM answers the
sigmoid of each step's logit. A server started this way serves only the `token_classify` task (/pooling): /classify
needs a second server with the plain command.

vLLM runs from .venv-vllm (tests/vllm/setup_venv.sh); these tests skip with the reason when it is absent.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from bench.vllm_engine import SERVED_NAME, unavailable
from rmtorch.score import RewardScorer
from rmtorch.steps import separator_ids_of, step_prompt_ids, tokenize_steps_row
from tests.conftest import train_argv, train_in_process, write_jsonl
from tests.vllm.conftest import SCORED, fast_vllm_server, save_base_model

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(unavailable() is not None, reason=f"plain vLLM is not installed: {unavailable()}"),
]

TIMEOUT = httpx.Timeout(120)
SEPARATOR = "\n\n"  # a blank line ends each of R1's reasoning steps; one SmolLM2 token (id 1116)
MAX_CHARS = 1500  # rows with longer reasoning are left out: short rows keep training and vLLM's startup cheap


def step_row(row: dict) -> dict | None:
    """A step-labelled row from a GSM8K row: the question as the prompt, R1's reasoning split at blank lines as the
    steps, each labelled by the row's correctness (a wrong row's last step false). None for a row too long or with
    fewer than two steps."""
    steps = [step for step in row["reasoning"].split(SEPARATOR) if step.strip()]
    if len(row["reasoning"]) > MAX_CHARS or len(steps) < 2 or SEPARATOR in row["question"]:
        return None
    labels = [bool(row["is_correct"]) or i < len(steps) - 1 for i in range(len(steps))]
    return {"prompt": row["question"], "completions": steps, "labels": labels}


def step_rows(rows: list[dict]) -> list[dict]:
    return [r for r in map(step_row, rows) if r is not None]


@pytest.fixture(scope="module")
def step_run(tmp_path_factory, smol_tokenizer, gsm8k_rows) -> dict:
    """A step model trained on GSM8K rows after the scored ones, and what rmtorch makes of the scored rows: training's
    token ids, the separator's id, and fp32 step rewards. The last scored row's prompt ends with the separator."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("vllm_steps")
    base = save_base_model(root / "base", smol_tokenizer)
    data = write_jsonl(root / "steps.jsonl", step_rows(gsm8k_rows[SCORED : SCORED + 16]))
    options = ("--objective", "steps", "--step_separator", SEPARATOR, "--max_length", "1024", "--lr", "1e-3")
    try:
        train_in_process(train_argv(base, data, root / "run", *options))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # tests after this one build their own Accelerator

    scored = step_rows(gsm8k_rows[:SCORED])
    assert len(scored) >= 4, "too few short GSM8K rows to score"
    prompts = [r["prompt"] for r in scored] + [scored[0]["prompt"] + SEPARATOR]  # last: separator in the prompt
    completions = [r["completions"] for r in scored] + [scored[0]["completions"]]

    scorer = RewardScorer.from_pretrained(str(root / "run"), autocast_dtype=None)
    separator_ids = separator_ids_of(scorer.tokenizer, SEPARATOR)
    assert len(separator_ids) == 1, f"STEP pooling needs a one-token separator, {SEPARATOR!r} is {separator_ids}"
    ids = [tokenize_steps_row(scorer.tokenizer, p, c, separator_ids)[0] for p, c in zip(prompts, completions)]
    in_prompt = [step_prompt_ids(scorer.tokenizer, p).count(separator_ids[0]) for p in prompts]
    assert in_prompt[:-1] == [0] * len(scored) and in_prompt[-1] >= 1, in_prompt
    step_rewards = scorer.score_steps(prompts, completions, separator=SEPARATOR).step_rewards
    assert [len(r) for r in step_rewards] == [len(c) for c in completions]
    assert torch.cat(step_rewards).std() > 0.01, "the step rewards must differ for the comparison to mean anything"
    return {
        "dir": root / "run", "step_tag_id": separator_ids[0], "ids": ids, "in_prompt": in_prompt,
        "step_rewards": step_rewards,
    }  # fmt: skip


def pooler_config(step_tag_id: int) -> dict:
    """vLLM 0.32's --pooler-config for a step model: the token-wise task, STEP pooling at the separator's id.
    ("pooling_type": "STEP" resolves to tok_pooling_type; returned_token_ids stays unset: StepPool applies it to the
    hidden states before the score head, so it has no meaning for a ForSequenceClassification model.)"""
    return {"task": "token_classify", "pooling_type": "STEP", "step_tag_id": step_tag_id}


@pytest.fixture(scope="module")
def served(step_run):
    """vLLM's URL: its server started by docs/serve.md's command (`server_command`) plus the step model's
    --pooler-config."""
    pooler = json.dumps(pooler_config(step_run["step_tag_id"]))
    with fast_vllm_server(step_run["dir"], "--pooler-config", pooler) as server:
        yield server.url


def pool(url: str, body: dict) -> dict:
    body = {"model": SERVED_NAME, "task": "token_classify", **body}
    response = httpx.post(url + "/pooling", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def per_step(item: dict) -> torch.Tensor:
    """One row's outputs: vLLM's [[value], ...] (one value per matched position, num_labels=1) as a (positions,)."""
    values = torch.tensor(item["data"], dtype=torch.float32)
    assert values.ndim == 2 and values.shape[1] == 1, values.shape
    return values[:, 0]


def test_step_pooling_gives_rmtorchs_step_rewards(served, step_run):
    ids, rewards, in_prompt = step_run["ids"], step_run["step_rewards"], step_run["in_prompt"]
    answer = pool(served, {"input": ids, "use_activation": False})
    assert [d["index"] for d in answer["data"]] == list(range(len(ids)))
    assert answer["usage"]["prompt_tokens"] == sum(len(row) for row in ids)
    for row, (item, expected, skip) in enumerate(zip(answer["data"], rewards, in_prompt)):
        values = per_step(item)
        # vLLM answers every position whose id is step_tag_id, the prompt's first: their count, then the steps'
        assert len(values) == skip + len(expected), f"row {row}: {len(values)} outputs, {skip} + {len(expected)} due"
        torch.testing.assert_close(values[skip:], expected, atol=1e-4, rtol=0, msg=f"row {row}")


def test_step_pooling_answers_sigmoids_by_default(served, step_run):
    """Without use_activation false, vLLM applies its classifier activation: sigmoid, for one output."""
    ids, rewards = step_run["ids"][:1], step_run["step_rewards"][0]
    values = per_step(pool(served, {"input": ids})["data"][0])
    torch.testing.assert_close(values, torch.sigmoid(rewards), atol=1e-4, rtol=0)
