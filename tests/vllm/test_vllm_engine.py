"""rmtorch with `engine="vllm"` scores as rmtorch's own torch engine: `python -m rmtorch.serve --engine vllm` (a
RewardScorer.from_pretrained(run, engine="vllm") behind rmtorch's endpoints) in .venv-vllm, its /score, /get_reward
and /classify against RewardScorer's torch engine in this venv on the same real GSM8K rows (fp32, within 1e-4),
with the thinking split (part="answer").

vLLM imports only in .venv-vllm (tests/vllm/setup_venv.sh installs rmtorch there too); these tests run from the main
venv and start that venv's Python. The server test starts vLLM once (about 60 s on 2 cores).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time

import httpx
import pytest
import torch

from bench.vllm_engine import REPO_ROOT, VENV_PYTHON, free_port, stop_process_group, unavailable, vllm_env
from rmtorch.engines import VllmEngine
from rmtorch.formatting import chat_text
from rmtorch.score import RewardScorer
from tests.vllm.conftest import FAST_START, FAST_START_ENV, SCORED, thinking_conversation

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(unavailable() is not None, reason=f"plain vLLM is not installed: {unavailable()}"),
]

STARTUP_TIMEOUT_S = 420
API_KEY = "test-key"


@pytest.fixture(scope="module")
def rows(gsm8k_rows) -> tuple[list, list]:
    """(prompts, completions): GSM8K questions and R1's reasoning, </think>, answer, as conversations."""
    prompts, completions = zip(*(thinking_conversation(row) for row in gsm8k_rows[:SCORED]))
    return list(prompts), list(completions)


@pytest.fixture(scope="module")
def torch_scorer(runs) -> RewardScorer:
    scorer = RewardScorer.from_pretrained(str(runs["full"][0]))  # fp32: the run trained with --bf16 false
    assert scorer.precision == "fp32" and scorer.think.end_id is not None
    return scorer


def test_a_lora_adapter_is_refused_with_the_merge_command(runs):
    with pytest.raises(ValueError, match=r"is a LoRA adapter.*python merge_lora.py --model .*lora"):
        RewardScorer.from_pretrained(str(runs["lora"][0]), engine="vllm")


def test_without_vllm_the_engine_says_how_to_install_it(runs):
    with contextlib.suppress(ImportError):
        import vllm  # noqa: F401

        pytest.skip("vLLM imports in this venv")
    with pytest.raises(ImportError, match=r"pip install 'rmtorch\[vllm\]'.*tests/vllm/setup_venv.sh"):
        VllmEngine(runs["full"][1])


@contextlib.contextmanager
def rmtorch_server(model, *options: str):
    """`python -m rmtorch.serve --engine vllm` from .venv-vllm, in a process group of its own; yields its URL once
    /health answers 200, and ends the group (the server, with vLLM's engine inside under FAST_START_ENV) on leaving."""
    port = free_port()
    command = [
        str(VENV_PYTHON), "-m", "rmtorch.serve", "--engine", "vllm", "--model", str(model), "--port", str(port),
        *options,
    ]  # fmt: skip
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=vllm_env(**FAST_START_ENV),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"rmtorch.serve --engine vllm did not start ({process.poll()}):\n{log.read()[-4000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        break
                time.sleep(1)
            yield url
        finally:
            stop_process_group(process)  # uvicorn answers what is in flight, then the process ends with vLLM's engine


def test_served_by_vllm_engine_as_by_torch_engine(runs, rows, torch_scorer):
    """/score (training's formatting, part=answer), /get_reward and /classify (chat texts) give the torch engine's
    rewards; /health names the engine, /metrics counts the rows, the API key is asked for."""
    prompts, completions = rows
    expected = torch_scorer(prompts, completions)
    texts = [chat_text(torch_scorer.tokenizer, [*p, *c]) for p, c in zip(prompts, completions)]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with rmtorch_server(runs["full"][1], "--api_key", API_KEY, "--vllm_options", json.dumps(FAST_START)) as url:

        def post(path: str, body: dict) -> dict:
            response = httpx.post(url + path, json=body, headers=headers, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()

        health = httpx.get(url + "/health", timeout=5).json()  # the server's RewardScorer(engine="vllm")
        assert (health["engine"], health["precision"]) == ("vllm", "fp32")
        assert health["max_length"] == torch_scorer.max_length  # the run's, as the torch engine reads it
        assert httpx.post(url + "/score", json={"prompts": prompts, "completions": completions}).status_code == 401
        scored = post("/score", {"prompts": prompts, "completions": completions})["rewards"]
        torch.testing.assert_close(torch.tensor(scored), expected, atol=1e-4, rtol=0)
        answer = post("/score", {"prompts": prompts, "completions": completions, "part": "answer"})["rewards"]
        expected_answer = torch_scorer(prompts, completions, part="answer")
        torch.testing.assert_close(torch.tensor(answer), expected_answer, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            torch.tensor(post("/get_reward", {"query": texts})["rewards"]), expected, atol=1e-4, rtol=0
        )
        classified = post("/classify", {"model": "rm", "input": texts, "use_activation": False})
        torch.testing.assert_close(
            torch.tensor([d["probs"][-1] for d in classified["data"]]), expected, atol=1e-4, rtol=0
        )
        metrics = httpx.get(url + "/metrics", headers=headers, timeout=5).text
    rows_total = next(line for line in metrics.splitlines() if line.startswith("rmtorch_serve_rows_total"))
    assert float(rows_total.split()[-1]) == 4 * SCORED
