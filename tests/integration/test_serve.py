"""rmtorch.serve over real HTTP: a uvicorn server on a free localhost port (in a thread, or a real process for
SIGTERM) around a tiny fp32 model. Each endpoint's schema; rewards equal RewardScorer's and the row scored alone
whatever else shares its batch, under concurrent clients; every error is a JSON body with its status, and the
server goes on serving; RemoteScorer; graceful shutdown.

Where a test needs a known batch, `held_worker` blocks the model worker inside a forward until the requests under
test have queued. No test asserts a timing.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import httpx
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from rmtorch.config import ServeConfig
from rmtorch.formatting import common_prefix_length, keep_last, tokenize_response
from rmtorch.normalize import RewardNormalizer
from rmtorch.score import RewardScorer
from rmtorch.serve import RemoteScorer
from rmtorch.serve.__main__ import load_config
from rmtorch.serve.app import build_app, exposure_warning
from rmtorch.serve.batcher import MIN_SHARED_TOKENS
from rmtorch.serve.client import ServerAnswerError
from tests.conftest import PROMPTS, REPO_ROOT, RESPONSES, free_port, reward_alone

THINK = {"think_start_token": "question", "think_end_token": "think"}  # words of the test vocabulary


# --------------------------------------------------------------------------------------------- servers


class LiveServer:
    """A uvicorn server in a thread on a free 127.0.0.1 port; leaving the block stops it as SIGTERM would."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, "the server to start")
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    @property
    def state(self):
        return self.app.state.serve

    def post(self, path: str, body=None, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=kwargs.pop("timeout", 60), **kwargs)

    def metrics(self, headers=None) -> dict[str, float]:
        """Every sample of /metrics by its name and labels, e.g. 'rmtorch_serve_errors_total{kind=invalid_request}'."""
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=60).text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sample.labels.items())
                values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return values


class FakeServer:
    """What may stand where a server should (a proxy, another service): answers every POST with `status`, `headers`
    and `body` (bytes as they are, anything else as JSON) from a thread on a free 127.0.0.1 port; counts the POSTs."""

    def __init__(self, body, status: int = 200, headers: dict | None = None):
        if not isinstance(body, bytes):
            body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
        self.posts = 0
        fake = self

        class Answer(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                fake.posts += 1
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet: pytest shows what a test asserts
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FakeServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serving(scorer, normalizer=None, **options) -> LiveServer:
    return LiveServer(build_app(scorer, ServeConfig(model="tiny-llama", bf16=False, **options), normalizer))


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


@contextmanager
def held_worker(scorer):
    """Block the model worker in its next forward until the block ends; yields the event set once it is held."""
    held, release = threading.Event(), threading.Event()

    def hold(module, args, kwargs):
        if not release.is_set():
            held.set()
            release.wait(60)

    handle = scorer.reward_model.register_forward_pre_hook(hold, with_kwargs=True)
    try:
        yield held
    finally:
        release.set()
        handle.remove()


@contextmanager
def forward_tokens(scorer):
    """The number of tokens of each forward the model runs inside the block."""
    seen: list[int] = []
    handle = scorer.reward_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    return RewardScorer.from_pretrained(str(tiny_model_dir), device="cpu", **THINK)


@pytest.fixture(scope="module")
def server(scorer):
    with serving(scorer, max_wait_ms=20) as live:
        yield live


# ----------------------------------------------------------------------------------------------- rows


def chat_text(tokenizer, prompt: str, response: str) -> str:
    """A full text as OpenRLHF and verl send it: the conversation through the chat template."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response.strip()}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assert_rewards(rewards, expected_ids: list[list[int]], model) -> None:
    expected = torch.tensor([reward_alone(model, ids) for ids in expected_ids])
    torch.testing.assert_close(torch.tensor(rewards), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- endpoints


def test_health_names_the_model_and_needs_nothing(server):
    answer = httpx.get(server.url + "/health").json()
    assert answer == {
        "status": "ok", "model": "tiny-llama", "engine": "torch", "precision": "fp32", "max_length": 512,
        "normalized": False, "queue_tokens": 0,
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["text", "messages"])
def test_score_equals_the_in_process_scorer(server, scorer, kind):
    if kind == "text":
        prompts, completions = PROMPTS, RESPONSES
    else:
        prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
        completions = [[{"role": "assistant", "content": r.strip()}] for r in RESPONSES]
    response = server.post("/score", {"prompts": prompts, "completions": completions, "return_details": True})
    assert response.status_code == 200
    answer = response.json()
    expected = scorer(prompts, completions, return_details=True)
    torch.testing.assert_close(torch.tensor(answer["rewards"]), expected.rewards, atol=1e-5, rtol=0)
    assert answer["normalized"] is False
    assert answer["details"]["raw_rewards"] == answer["rewards"]
    assert answer["details"]["num_tokens"] == expected.num_tokens.tolist()
    assert answer["details"]["truncated"] == [False] * 4
    assert answer["details"]["unclosed_think"] == answer["details"]["dropped_text"] == [False] * 4


@pytest.mark.parametrize("part", ["answer", "thinking"])
def test_score_part_splits_at_the_reasoning_end(server, scorer, part):
    prompts = PROMPTS[:3]
    completions = [" yes think the answer is 5", " question no", " 1 2 think 3 think 4"]
    body = {"prompts": prompts, "completions": completions, "part": part, "return_details": True}
    answer = server.post("/score", body)
    expected = scorer(prompts, completions, part=part, return_details=True)
    torch.testing.assert_close(torch.tensor(answer.json()["rewards"]), expected.rewards, atol=1e-5, rtol=0)
    assert answer.json()["details"]["unclosed_think"] == [False, True, False] == expected.unclosed_think.tolist()
    full = scorer(prompts, completions)
    assert not torch.allclose(expected.rewards, full)  # the part changes what is scored


def test_score_takes_token_ids_as_they_are(server, scorer):
    input_ids = [tokenize_response(scorer.tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    answer = server.post("/score", {"input_ids": input_ids, "prompt_lengths": [2, 0, 1, 3]}).json()
    assert_rewards(answer["rewards"], input_ids, scorer.model)


def test_get_reward_is_openrlhf_field_for_field(server, scorer):
    queries = [chat_text(scorer.tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    prompts = [scorer.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False) for p in PROMPTS]
    response = server.post("/get_reward", {"query": queries, "prompts": prompts, "labels": [None, "5", None, None]})
    answer = response.json()
    assert set(answer) == {"rewards", "scores", "extra_logs", "normalized"}
    assert answer["scores"] == answer["rewards"] and answer["extra_logs"] == {"truncated": [0.0] * 4}
    # The text is scored token for token as sent: its own BOS, nothing added or appended.
    ids = [text_ids(scorer.tokenizer, q) for q in queries]
    assert all(row[0] == scorer.tokenizer.bos_token_id and row.count(row[0]) == 1 for row in ids)
    assert_rewards(answer["rewards"], ids, scorer.model)


def test_classify_is_vllm_shaped_as_verl_reads_it(server, scorer):
    text = chat_text(scorer.tokenizer, PROMPTS[0], RESPONSES[0])
    reward = reward_alone(scorer.model, text_ids(scorer.tokenizer, text))
    verl = server.post("/classify", {"model": "/models/rm", "input": text, "use_activation": False}).json()
    assert verl["object"] == "list" and verl["model"] == "tiny-llama" and verl["id"].startswith("classify-")
    probs = [pytest.approx(reward, abs=1e-5)]  # one class: the reward itself, verl reads probs[-1]
    assert verl["data"] == [{"index": 0, "label": "LABEL_0", "probs": probs, "num_classes": 1}]
    tokens = len(text_ids(scorer.tokenizer, text))
    assert verl["usage"] == {
        "prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": None
    }  # fmt: skip
    # vLLM's default (and its older `activation` name): the sigmoid of the reward; `input` may be a list.
    default = server.post("/classify", {"input": [text, text]}).json()
    assert [d["probs"][0] for d in default["data"]] == pytest.approx([torch.sigmoid(torch.tensor(reward)).item()] * 2)
    older = server.post("/classify", {"input": text, "activation": False}).json()
    assert older["data"][0]["probs"][0] == pytest.approx(reward, abs=1e-5)
    bos = server.post("/classify", {"input": text[len("<s>") :], "add_special_tokens": True, "use_activation": False})
    assert bos.json()["data"][0]["probs"][0] == pytest.approx(reward, abs=1e-5)  # the tokenizer put the BOS back


def test_metrics_count_batches_rows_latency_and_errors(server):
    # The server is the module's: other tests' requests are counted too, so each count is read as a difference.
    before = server.metrics()
    server.post("/get_reward", {"query": ["<s><|user|> hello </s>", "<s><|user|> hello world </s>"]})
    server.post("/get_reward", {"query": []})
    after = server.metrics()
    added = lambda name: after.get(name, 0) - before.get(name, 0)  # noqa: E731
    assert added("rmtorch_serve_rows_total") == 2 and added("rmtorch_serve_batch_rows_count") == 1
    assert added("rmtorch_serve_request_seconds_count{endpoint=/get_reward}") == 1  # the refused one is an error
    assert added("rmtorch_serve_errors_total{kind=invalid_request}") == 1
    assert after["rmtorch_serve_queue_tokens"] == 0 and after["rmtorch_serve_tokens_per_second"] > 0


# ---------------------------------------------------------------------------------- batching across clients


def overlapping_requests(tokenizer, count: int, seed: int = 0) -> list[tuple[str, dict, list[list[int]]]]:
    """(path, body, ids of each row) for `count` requests over the three endpoints, rows overlapping across
    requests: 4 prompts x 4 responses, shared prompts, the same row in several requests, verl's one row per
    request."""
    rng = random.Random(seed)
    pairs = [(p, r) for p in PROMPTS for r in RESPONSES]
    requests = []
    for i in range(count):
        picked = rng.sample(pairs, rng.randint(1, 5))
        if i % 3 == 0:
            texts = [chat_text(tokenizer, p, r) for p, r in picked]
            requests.append(("/get_reward", {"query": texts}, [text_ids(tokenizer, t) for t in texts]))
        elif i % 3 == 1:
            text = chat_text(tokenizer, *picked[0])
            body = {"model": "rm", "input": text, "use_activation": False}
            requests.append(("/classify", body, [text_ids(tokenizer, text)]))
        else:
            body = {"prompts": [p for p, _ in picked], "completions": [r for _, r in picked]}
            requests.append(("/score", body, [tokenize_response(tokenizer, p, r) for p, r in picked]))
    return requests


def rewards_of(path: str, answer: dict) -> list[float]:
    return [d["probs"][0] for d in answer["data"]] if path == "/classify" else answer["rewards"]


def test_every_reward_equals_the_row_alone_under_concurrent_clients(tiny_model_dir):
    # A small budget splits the queue into batches of mixed requests, each holding several.
    scorer = RewardScorer.from_pretrained(str(tiny_model_dir), device="cpu", max_tokens_per_batch=160)
    requests = overlapping_requests(scorer.tokenizer, 48)
    with serving(scorer, max_wait_ms=5) as live:
        # Round 1: a client per request, all queued behind a held forward, then run in batches of several requests.
        with ThreadPoolExecutor(len(requests)) as clients, held_worker(scorer) as held:
            first = clients.submit(live.post, *requests[0][:2])
            held.wait(60)
            rest = [clients.submit(live.post, path, body) for path, body, _ in requests[1:]]
            wait_until(lambda: live.state.batcher.queued_requests == len(requests) - 1, "the requests to queue")
        held_round = [first.result()] + [future.result() for future in rest]
        # Round 2: 16 clients as fast as they can, the worker batching whatever is waiting.
        with ThreadPoolExecutor(16) as clients:
            free_round = list(clients.map(lambda request: live.post(*request[:2]), requests))
        metrics = live.metrics()
    for responses in (held_round, free_round):
        for (path, _, ids), response in zip(requests, responses):
            assert response.status_code == 200, response.text
            assert_rewards(rewards_of(path, response.json()), ids, scorer.model)
    # Every request was scored once, and requests shared forwards.
    assert metrics["rmtorch_serve_batch_requests_sum"] == 2 * len(requests)
    assert metrics["rmtorch_serve_batch_requests_count"] < len(requests)


def test_rows_of_different_requests_share_their_prompt(scorer):
    # Full texts, no prompts given: the shared chat prefix of the rows is found in the tokens.
    prompt = "what color is the sky ? I think it is blue , and how many are 2 + 3 ? the answer is 5 ."
    texts = [chat_text(scorer.tokenizer, prompt, r) for r in RESPONSES]
    ids = [text_ids(scorer.tokenizer, t) for t in texts]
    with serving(scorer) as live, ThreadPoolExecutor(len(texts) + 1) as clients, forward_tokens(scorer) as seen:
        with held_worker(scorer) as held:
            first = clients.submit(live.post, "/get_reward", {"query": ["<s><|user|> hi </s>"]})
            held.wait(60)
            answers = [clients.submit(live.post, "/classify", {"input": t, "use_activation": False}) for t in texts]
            wait_until(lambda: live.state.batcher.queued_requests == len(texts), "the requests to queue")
        rewards = [a.result().json()["data"][0]["probs"][0] for a in answers]
        first.result()
    assert_rewards(rewards, ids, scorer.model)
    shared = min(common_prefix_length(ids[0], row) for row in ids[1:])  # the chat prefix and the prompt: 29
    assert shared > MIN_SHARED_TOKENS and seen[1] == sum(len(row) for row in ids) - (len(ids) - 1) * shared


# ------------------------------------------------------------------------------------------------- errors


BAD_REQUESTS = [
    ("/get_reward", b'{"query": ["a"', "The request body is not valid JSON"),
    ("/get_reward", [1], "The request body: Input should be a valid dictionary"),
    ("/get_reward", {}, "query is required."),
    ("/get_reward", {"query": "one text"}, r"query: Input should be a valid list \(got 'one text'\)\."),
    ("/get_reward", {"query": ["a", 7]}, r"query\[1\]: Input should be a valid string \(got 7\)."),
    ("/get_reward", {"query": []}, "query: List should have at least 1 item"),
    ("/get_reward", {"query": [""]}, r"query\[0\] has no tokens"),
    ("/classify", {"input": []}, "input: List should have at least 1 item"),
    ("/classify", {"input": "hello", "use_activation": "no"}, "use_activation: Input should be a valid boolean"),
    (
        "/score",
        {"completions": [" a"], "part": "reasoning"},
        "part: Input should be 'full', 'answer', 'thinking' or 'steps'",
    ),
    ("/score", {"prompts": ["a", "b"], "completions": [" x"]}, "Got 2 prompts but 1 completions"),
    ("/score", {"completion": [" x"]}, "completion: Extra inputs are not permitted"),
    ("/score", {"completions": [" x"], "input_ids": [[1]]}, "Give either completions"),
    ("/score", {"input_ids": [[1, 2]], "prompt_lengths": [2]}, r"prompt_lengths\[0\] is 2"),
    ("/score", {"input_ids": [[5, 10**6]]}, r"input_ids\[0\] holds the id 1000000, outside the model's vocabulary"),
    ("/score", {"input_ids": [[1], []]}, r"input_ids\[1\]: List should have at least 1 item"),
    ("/score", {"input_ids": [[5, 6, 7]], "part": "thinking"}, r"input_ids\[0\] has no tokens in part='thinking'"),
    ("/score", {"completions": [[{"role": "assistant", "content": "x"}]], "prompts": ["a"]}, "Row 0: prompt is str"),
]


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        ({"Content-Type": "application/json"}, b"", r"The request body is required: send a JSON object\."),
        ({"Content-Type": "application/x-www-form-urlencoded"}, b'{"query": ["a"]}',
         "The body was not read as JSON: send it with the header 'Content-Type: application/json'"),
    ],
)  # fmt: skip
def test_an_empty_or_non_json_body_is_named_with_the_fix(server, headers, body, message):
    response = httpx.post(server.url + "/get_reward", content=body, headers=headers)
    assert response.status_code == 400 and re.search(message, response.json()["error"]["message"]), response.json()


@pytest.mark.parametrize("path, body, message", BAD_REQUESTS)
def test_bad_requests_get_400_with_a_sentence_and_the_server_serves_on(server, scorer, path, body, message):
    if isinstance(body, bytes):
        response = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = server.post(path, body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request"
    assert re.search(message, response.json()["error"]["message"]), response.json()
    text = chat_text(scorer.tokenizer, PROMPTS[0], RESPONSES[0])
    assert server.post("/get_reward", {"query": [text]}).json()["rewards"] == [
        pytest.approx(reward_alone(scorer.model, text_ids(scorer.tokenizer, text)), abs=1e-5)
    ]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [("/get_reward", b'{"query": ["<s> fine", "<s> cut \\ud83d"]}', r"query\[1\] holds .* \(\\ud83d\) at character 8"),
     ("/classify", b'{"input": "\\udc00 x"}', r"input\[0\] holds .* \(\\udc00\) at character 0"),
     ("/score", b'{"completions": [" a", " b \\ud800"]}', r"completions\[1\] holds .* \(\\ud800\) at character 3"),
     ("/score", b'{"prompts": [[{"role": "user", "content": "hi \\udfff"}]], "completions": [[{"role": "assistant", '
                b'"content": "x"}]]}', r"prompts\[0\]\[0\]\.content holds .* \(\\udfff\) at character 3"),
     ("/score", b'{"completions": [" a"], "x\\ud800": 1}', r"A key of the request body holds .* at character 1")],
)  # fmt: skip
def test_an_unpaired_surrogate_is_a_400_naming_the_row_and_the_connection_serves_on(server, path, body, message):
    """A lone surrogate (a text cut inside an emoji's pair) made the tokenizer raise: a 500 with a traceback, and the
    connection closed under the client's next request. It is refused with the request's other errors instead."""
    with httpx.Client(timeout=60) as client:
        refused = client.post(server.url + path, content=body, headers={"Content-Type": "application/json"})
        # The same connection serves on; a surrogate pair (an emoji) is text like any other.
        smile = b'{"query": ["<s> smile \\ud83d\\ude00"]}'
        after = client.post(server.url + "/get_reward", content=smile, headers={"Content-Type": "application/json"})
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request"
    assert re.fullmatch(
        message + r": that is not Unicode text and no tokenizer reads it \(.*\)\. Repair the text where it is made, "
        r"or replace the character \(e\.g\. with U\+FFFD\)\.",
        refused.json()["error"]["message"],
    ), refused.json()
    assert after.status_code == 200 and len(after.json()["rewards"]) == 1


def test_unknown_paths_and_methods_answer_json(server):
    assert httpx.get(server.url + "/nope").json() == {"error": {"type": "not_found", "message": "Not Found"}}
    assert httpx.get(server.url + "/score").json()["error"]["type"] == "method_not_allowed"


def test_a_part_needs_the_reasoning_end_token(tiny_model_dir):
    scorer = RewardScorer.from_pretrained(str(tiny_model_dir), device="cpu")  # "</think>" is not in this vocabulary
    with serving(scorer) as live:
        response = live.post("/score", {"completions": [" a"], "part": "answer"})
    assert response.status_code == 400 and "lacks" in response.json()["error"]["message"]


def test_long_rows_keep_their_end_and_are_flagged(tiny_model_dir):
    scorer = RewardScorer.from_pretrained(str(tiny_model_dir), device="cpu", max_length=6)
    texts = [chat_text(scorer.tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    with serving(scorer) as live:
        answer = live.post("/get_reward", {"query": texts}).json()
        details = live.post("/score", {"prompts": PROMPTS, "completions": RESPONSES, "return_details": True}).json()
    ids = [text_ids(scorer.tokenizer, t) for t in texts]
    assert answer["extra_logs"]["truncated"] == [1.0] * 4
    assert_rewards(answer["rewards"], [keep_last(row, 6, scorer.tokenizer.bos_token_id) for row in ids], scorer.model)
    assert details["details"]["truncated"] == [True] * 4 and details["details"]["num_tokens"] == [6] * 4


def test_long_rows_are_refused_when_configured(tiny_model_dir):
    scorer = RewardScorer.from_pretrained(str(tiny_model_dir), device="cpu", max_length=6)
    text = chat_text(scorer.tokenizer, PROMPTS[0], RESPONSES[0])
    with serving(scorer, on_long_row="refuse") as live:
        response = live.post("/get_reward", {"query": ["<s><|user|> hi </s>", text]})
        short = live.post("/get_reward", {"query": ["<s><|user|> hi </s>"]})
    assert response.status_code == 400
    assert re.match(r"query\[1\] has \d+ tokens, more than --max_length 6", response.json()["error"]["message"])
    assert short.status_code == 200


def test_bodies_over_the_limit_get_413(scorer):
    big = {"query": ["hello " * 400]}
    with serving(scorer, max_body_mb=0.001) as live:
        declared = live.post("/get_reward", big)
        chunks = [json.dumps(big).encode()[i : i + 500] for i in range(0, 2500, 500)]
        chunked = httpx.post(live.url + "/get_reward", content=iter(chunks))  # no Content-Length
        small = live.post("/get_reward", {"query": ["<s> hello"]})
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "request_too_large"
        assert "the server takes at most 1000" in response.json()["error"]["message"]
    assert small.status_code == 200


def test_api_key_guards_everything_but_health(scorer):
    with serving(scorer, api_key="s3cret") as live:
        assert httpx.get(live.url + "/health").status_code == 200
        missing = live.post("/get_reward", {"query": ["<s> hi"]})
        wrong = live.post("/get_reward", {"query": ["<s> hi"]}, headers={"Authorization": "Bearer nope"})
        unread = httpx.get(live.url + "/metrics")
        right = live.post("/get_reward", {"query": ["<s> hi"]}, headers={"Authorization": "Bearer s3cret"})
    assert missing.status_code == wrong.status_code == unread.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.json()["error"] == {
        "type": "unauthorized", "message": "Missing API key: send the header 'Authorization: Bearer KEY'."
    }  # fmt: skip
    assert wrong.json()["error"]["message"] == "Wrong API key."
    assert right.status_code == 200


def test_a_full_queue_answers_503_with_retry_after(scorer):
    row = "<s><|user|> what color is the sky ? </s>"
    with serving(scorer, max_queue_tokens=25) as live, ThreadPoolExecutor(2) as clients:
        with held_worker(scorer) as held:
            running = clients.submit(live.post, "/get_reward", {"query": [row]})
            held.wait(60)
            queued = clients.submit(live.post, "/get_reward", {"query": [row, row]})
            wait_until(lambda: live.state.batcher.queued_requests == 1, "the second request to queue")
            refused = live.post("/get_reward", {"query": [row]})
            too_large = live.post("/get_reward", {"query": [row, row, row]})
        assert running.result().status_code == queued.result().status_code == 200
        after = live.post("/get_reward", {"query": [row]})
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "overloaded"
    tokens = len(text_ids(scorer.tokenizer, row))  # 9: two rows fit the queue, three do not
    assert f"{2 * tokens} tokens are waiting and this request adds {tokens}" in refused.json()["error"]["message"]
    assert too_large.status_code == 413 and "--max_queue_tokens 25" in too_large.json()["error"]["message"]
    assert after.status_code == 200


def test_a_client_that_leaves_does_not_break_the_worker(scorer):
    row = "<s><|user|> what color is the sky ? </s>"
    with serving(scorer) as live, ThreadPoolExecutor(2) as clients:
        with held_worker(scorer) as held:
            running = clients.submit(live.post, "/get_reward", {"query": [row]})
            held.wait(60)
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
                live.post("/get_reward", {"query": [row, "<s> hello"]}, timeout=0.5)
            wait_until(lambda: live.state.batcher.queued_requests == 0, "the abandoned request to leave the queue")
        assert running.result().status_code == 200
        after = live.post("/get_reward", {"query": [row]})
        metrics = live.metrics()
    assert after.status_code == 200
    assert metrics["rmtorch_serve_errors_total{kind=client_closed}"] == 1
    assert metrics["rmtorch_serve_batch_requests_count"] == 2  # the abandoned request never reached the model


def test_a_forward_that_raises_fails_only_its_batch(scorer):
    poison = scorer.tokenizer.convert_tokens_to_ids("bad")

    def fail_on_poison(module, args, kwargs):
        if (kwargs["input_ids"] == poison).any():
            raise RuntimeError("poisoned batch")

    clean = "<s><|user|> what color is the sky ? </s>"
    handle = scorer.reward_model.register_forward_pre_hook(fail_on_poison, with_kwargs=True)
    try:
        with serving(scorer) as live, ThreadPoolExecutor(3) as clients:
            with held_worker(scorer) as held:
                earlier = clients.submit(live.post, "/get_reward", {"query": [clean]})
                held.wait(60)
                same_batch = [
                    clients.submit(live.post, "/get_reward", {"query": [text]}) for text in ("<s> bad", clean)
                ]
                wait_until(lambda: live.state.batcher.queued_requests == 2, "both requests to queue")
            later = live.post("/get_reward", {"query": [clean]})
    finally:
        handle.remove()
    assert earlier.result().status_code == later.status_code == 200
    for future in same_batch:
        response = future.result()
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "forward_failed"
        assert "RuntimeError('poisoned batch')" in response.json()["error"]["message"]
    assert later.json()["rewards"] == earlier.result().json()["rewards"]


def test_a_failure_after_the_forward_answers_the_batch_and_the_worker_goes_on(scorer, monkeypatch):
    with serving(scorer) as live:
        observe = live.state.metrics.observe_batch
        calls = []

        def fails_once(*args):
            calls.append(args)
            if len(calls) == 1:
                raise RuntimeError("metrics broke")
            return observe(*args)

        monkeypatch.setattr(live.state.metrics, "observe_batch", fails_once)
        failed = live.post("/classify", {"input": ["<s> hello"]})
        after = live.post("/classify", {"input": ["<s> hello"]})
        health = httpx.get(live.url + "/health")
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "forward_failed"
    assert "RuntimeError('metrics broke')" in failed.json()["error"]["message"]
    assert after.status_code == 200 and health.status_code == 200


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the worker's end, on purpose
def test_a_stopped_worker_makes_health_503_and_requests_go_elsewhere(scorer, monkeypatch):
    from rmtorch.serve.batcher import Batcher

    def worker_dies(self):
        raise SystemExit  # what no except clause of the worker catches: the thread ends

    monkeypatch.setattr(Batcher, "_next_batch", worker_dies)
    with serving(scorer) as live:
        wait_until(lambda: not live.state.batcher._thread.is_alive(), "the worker thread to end")
        health = httpx.get(live.url + "/health")
        refused = live.post("/classify", {"input": ["<s> hello"]})
    assert health.status_code == 503 and health.json()["status"] == "model worker stopped"
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "overloaded"
    assert "model worker has stopped" in refused.json()["error"]["message"]
    assert refused.headers["Retry-After"] == "30"


def test_latency_counts_answered_requests_and_errors_by_kind(scorer):
    vocab_size = scorer.model.get_input_embeddings().num_embeddings
    with serving(scorer) as live:
        bad = live.post("/score", {"input_ids": [[1, vocab_size]]})
        good = live.post("/score", {"input_ids": [[1, 2, 3]]})
        metrics = live.metrics()
    assert bad.status_code == 400 and good.status_code == 200
    assert metrics["rmtorch_serve_request_seconds_count{endpoint=/score}"] == 1
    assert metrics["rmtorch_serve_errors_total{kind=invalid_request}"] == 1


def test_a_non_finite_reward_is_an_error_not_a_number(scorer):
    poison = scorer.tokenizer.convert_tokens_to_ids("bad")

    def nan_on_poison(module, args, kwargs, rewards):
        return rewards.fill_(float("nan")) if (kwargs["input_ids"] == poison).any() else rewards

    handle = scorer.reward_model.register_forward_hook(nan_on_poison, with_kwargs=True)
    try:
        with serving(scorer) as live:
            response = live.post("/classify", {"input": ["<s> hello", "<s> bad"]})
            after = live.post("/classify", {"input": ["<s> hello"]})
    finally:
        handle.remove()
    assert response.status_code == 500 and response.json()["error"]["type"] == "nonfinite_reward"
    assert "non-finite reward (NaN or inf) to input[0, 1]" in response.json()["error"]["message"]
    assert after.status_code == 200


def test_the_client_does_not_retry_a_non_finite_reward_and_says_why(scorer):
    """A reward is the row's alone, so a NaN comes back on every try: RemoteScorer raises at once with the server's
    message (one request reaches the server) instead of retrying and calling the server unreachable."""
    poison = scorer.tokenizer.convert_tokens_to_ids("bad")

    def nan_on_poison(module, args, kwargs, rewards):
        return rewards.fill_(float("nan")) if (kwargs["input_ids"] == poison).any() else rewards

    handle = scorer.reward_model.register_forward_hook(nan_on_poison, with_kwargs=True)
    try:
        with serving(scorer) as live, RemoteScorer(live.url, retries=3, backoff_s=0) as remote:
            with pytest.raises(ValueError, match=r"refused the request \(500\): .*non-finite reward"):
                remote(PROMPTS[:1], ["bad"])
            requests = live.metrics()["rmtorch_serve_errors_total{kind=nonfinite_reward}"]
    finally:
        handle.remove()
    assert requests == 1


@pytest.mark.parametrize(
    ("headers", "expected"), [({"Retry-After": "3"}, 3.0), ({"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}, 0.0),
                              ({}, 0.0), ({"Retry-After": "-2"}, 0.0), ({"Retry-After": "nan"}, 0.0),
                              ({"Retry-After": "inf"}, float("inf"))],
)  # fmt: skip
def test_retry_after_is_read_as_seconds_and_a_date_or_junk_is_ignored(headers, expected):
    from rmtorch.serve.client import _retry_after

    assert _retry_after(httpx.Response(503, headers=headers)) == expected


# ---------------------------------------------------------------------------------------- normalization


def test_normalize_returns_normalized_rewards_and_keeps_the_raw_ones(scorer, tmp_path):
    fitted = RewardNormalizer(clip=5.0)
    fitted(torch.tensor([0.3, -1.2, 2.0, 0.7, 0.1]))
    stats = fitted.save(tmp_path / "reward_stats.json")
    normalizer = RewardNormalizer.load(stats)
    with serving(scorer, normalizer=normalizer) as live:
        score = live.post("/score", {"prompts": PROMPTS, "completions": RESPONSES, "return_details": True}).json()
        text = chat_text(scorer.tokenizer, PROMPTS[0], RESPONSES[0])
        openrlhf = live.post("/get_reward", {"query": [text]}).json()
        health = httpx.get(live.url + "/health").json()
    raw = scorer(PROMPTS, RESPONSES)
    torch.testing.assert_close(torch.tensor(score["details"]["raw_rewards"]), raw, atol=1e-5, rtol=0)
    expected = fitted(raw, update=False)
    torch.testing.assert_close(torch.tensor(score["rewards"]), expected, atol=1e-5, rtol=0)
    assert score["normalized"] and openrlhf["normalized"] and health["normalized"]
    text_reward = reward_alone(scorer.model, text_ids(scorer.tokenizer, text))
    assert openrlhf["extra_logs"]["raw_reward"] == [pytest.approx(text_reward, abs=1e-5)]
    assert openrlhf["rewards"] == pytest.approx(fitted(torch.tensor([text_reward]), update=False).tolist(), abs=1e-5)
    assert normalizer.moments.count == 5  # the served statistics are never updated


# ------------------------------------------------------------------------------------------------- client


def test_remote_scorer_has_the_scorers_call(server, scorer):
    remote = RemoteScorer(server.url)
    torch.testing.assert_close(remote(PROMPTS, RESPONSES), scorer(PROMPTS, RESPONSES), atol=1e-5, rtol=0)
    details = remote(PROMPTS, RESPONSES, part="answer", return_details=True)
    expected = scorer(PROMPTS, RESPONSES, part="answer", return_details=True)
    for name in ("rewards", "num_tokens", "truncated", "unclosed_think", "dropped_text"):
        torch.testing.assert_close(getattr(details, name), getattr(expected, name), atol=1e-5, rtol=0)
    reward_func = remote.as_reward_func(name="remote_rm")
    values = reward_func(prompts=PROMPTS, completions=RESPONSES, completion_ids=[[1]] * 4, trainer_state=None)
    assert reward_func.__name__ == "remote_rm"
    assert values == pytest.approx(scorer(PROMPTS, RESPONSES).tolist(), abs=1e-5)
    with pytest.raises(ValueError, match=r"refused the request \(400\): part: Input should be"):
        remote(PROMPTS, RESPONSES, part="reasoning")


@pytest.mark.parametrize(
    ("prompts", "completions", "message"),
    [("a", [" x"], "must be lists"), (["a", "b"], [" x"], "Got 2 prompts but 1 completions"),
     (["a", "b"], [" x", [{"role": "assistant", "content": "y"}]], "Row 1: prompt is str")],
)  # fmt: skip
def test_remote_scorer_refuses_bad_rows_before_any_request(prompts, completions, message):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: reaching the network would be a ConnectionError
    with pytest.raises(ValueError, match=message):
        RemoteScorer(dead, retries=0)(prompts, completions)


def test_remote_scorer_uses_replicas_in_turn_and_skips_a_dead_one(tiny_model_dir, scorer):
    other = RewardScorer.from_pretrained(str(tiny_model_dir), device="cpu", **THINK)  # one model per server
    with serving(scorer) as first, serving(other) as second:
        remote = RemoteScorer([first.url, second.url])
        for _ in range(4):
            torch.testing.assert_close(remote(PROMPTS, RESPONSES), scorer(PROMPTS, RESPONSES), atol=1e-5, rtol=0)
        counts = [live.metrics()["rmtorch_serve_request_seconds_count{endpoint=/score}"] for live in (first, second)]
        dead = f"http://127.0.0.1:{free_port()}"
        with RemoteScorer([dead, second.url], backoff_s=0.01) as failover:
            torch.testing.assert_close(failover(PROMPTS, RESPONSES), scorer(PROMPTS, RESPONSES), atol=1e-5, rtol=0)
    assert counts == [2, 2]
    with pytest.raises(ConnectionError, match="No rmtorch.serve server answered in 3 attempts"):
        RemoteScorer(dead, retries=2, backoff_s=0)(PROMPTS, RESPONSES)


DETAILS = {"num_tokens": [3, 4], "truncated": [False, True], "unclosed_think": [False] * 2, "dropped_text": [True] * 2}
BAD_ANSWERS = [
    (b"<html><body>502 Bad Gateway</body></html>", False,
     r"its body is not JSON \(text/html, starting '<html><body>502 Bad Gateway"),
    ([0.5, 0.1], False, "its JSON is a list, not an object"),
    ({"score": [0.5, 0.1]}, False, r"'rewards' is missing \(it has \['score'\]\)"),
    ({"rewards": 0.5}, False, "'rewards' is float 0.5, not a list"),
    ({"rewards": [0.5]}, False, "'rewards' has 1 values for the 2 rows sent"),
    ({"rewards": [0.5, 0.1, 0.2]}, False, "'rewards' has 3 values for the 2 rows sent"),
    ({"rewards": [0.5, "0.1"]}, False, r"'rewards\[1\]' is str '0.1', not a number"),
    ({"rewards": [True, 0.1]}, False, r"'rewards\[0\]' is bool True, not a number"),
    ({"rewards": [0.5, 0.1]}, True, r"'details' is missing \(return_details=True asks for it"),
    ({"rewards": [0.5, 0.1], "details": [DETAILS]}, True, "'details' is list .*, not an object"),
    ({"rewards": [0.5, 0.1], "details": {**DETAILS, "truncated": [False]}}, True,
     "'details.truncated' has 1 values for the 2 rows sent"),
    ({"rewards": [0.5, 0.1], "details": {**DETAILS, "num_tokens": [3, 4.0]}}, True,
     r"'details.num_tokens\[1\]' is float 4.0, not a token count"),
    ({"rewards": [0.5, 0.1], "details": {**DETAILS, "dropped_text": [0, 1]}}, True,
     r"'details.dropped_text\[0\]' is int 0, not true or false"),
    ({"rewards": [0.5, 0.1], "details": {k: v for k, v in DETAILS.items() if k != "unclosed_think"}}, True,
     "'details.unclosed_think' is missing"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "return_details", "problem"), BAD_ANSWERS)
def test_remote_scorer_checks_every_answer_and_names_the_server(body, return_details, problem):
    """A 200 answer RemoteScorer cannot use raises ServerAnswerError naming the URL and what is wrong; with one server
    at once (the same URL would answer the same), instead of a raw JSONDecodeError, KeyError or TypeError."""
    headers = {"Content-Type": "text/html"} if isinstance(body, bytes) else None
    with FakeServer(body, headers=headers) as fake, RemoteScorer(fake.url, retries=3, backoff_s=0) as remote:
        with pytest.raises(ServerAnswerError, match=re.escape(f"{fake.url}/score answered 200 but ") + problem) as err:
            remote(PROMPTS[:2], RESPONSES[:2], return_details=return_details)
    assert "That is not an rmtorch.serve answer: check that the URL is an rmtorch.serve server's" in str(err.value)
    assert isinstance(err.value, ValueError) and fake.posts == 1


@pytest.mark.parametrize(
    "rewards", [b"[0.5, NaN]", b"[0.5, Infinity]", b"[0.5, -1e39]", b"[0.5, null]", b"[0.5, 1" + b"0" * 400 + b"]"]
)
def test_a_non_finite_reward_in_an_answer_is_final(rewards):
    """A reward is the row's alone: a NaN, inf or null comes back from every replica, so the next is not asked."""
    good = {"rewards": [0.5, 0.1], "normalized": False}
    with FakeServer(b'{"rewards": %s}' % rewards) as nan, FakeServer(good) as other:
        with RemoteScorer([nan.url, other.url], retries=3, backoff_s=0) as remote:
            with pytest.raises(ServerAnswerError, match=re.escape(f"{nan.url}/score answered 200 but ") + (
                r"the reward model gave a non-finite reward \(NaN, inf, null or past fp32\) to rows \[1\]; every "
            )):  # fmt: skip
                remote(PROMPTS[:2], RESPONSES[:2])
    assert nan.posts == 1 and other.posts == 0


def test_a_malformed_answer_is_tried_on_the_next_replica():
    """With several servers, one that answers a page instead of rewards (a broken proxy) is passed over; when all
    do, the error after the retries is still ServerAnswerError, naming the last."""
    page = b"<html>maintenance</html>"
    with FakeServer(page) as broken, FakeServer({"rewards": [0.5, 0.25], "normalized": False}) as good:
        with RemoteScorer([broken.url, good.url], backoff_s=0) as remote:
            rewards = remote(PROMPTS[:2], RESPONSES[:2])
        assert broken.posts == good.posts == 1
        with FakeServer(page) as other, RemoteScorer([broken.url, other.url], retries=2, backoff_s=0) as remote:
            with pytest.raises(ServerAnswerError, match=(
                "rmtorch.serve did not score the request in 3 attempts; the last: "
                + re.escape(f"{broken.url}/score answered 200 but its body is not JSON")
            )):  # fmt: skip
                remote(PROMPTS[:2], RESPONSES[:2])
    assert torch.equal(rewards, torch.tensor([0.5, 0.25]))
    assert broken.posts == 3 and other.posts == 1


@pytest.mark.parametrize(
    ("retry_after", "waits"),
    [("inf", [0.05, 0.05]), ("1e999", [0.05, 0.05]), ("99999999999999999999", [0.05, 0.05]), ("3", [0.05, 0.05]),
     ("-5", [0.01, 0.02]), ("nan", [0.01, 0.02]), ("Wed, 21 Oct 2026 07:28:00 GMT", [0.01, 0.02]), ("", [0.01, 0.02])],
)  # fmt: skip
def test_retry_after_never_raises_and_never_waits_past_max_backoff(monkeypatch, retry_after, waits):
    """Retry-After is at least the wait, never more than max_backoff_s: inf or a huge number made time.sleep raise
    OverflowError, NaN a ValueError; a negative number or an HTTP date is not a number of seconds to wait."""
    import rmtorch.serve.client as client

    slept = []
    monkeypatch.setattr(client, "time", SimpleNamespace(sleep=slept.append))  # the client's sleeps only
    overloaded = {"error": {"type": "overloaded", "message": "The queue is full."}}
    with FakeServer(overloaded, status=503, headers={"Retry-After": retry_after}) as busy:
        with RemoteScorer(busy.url, retries=2, backoff_s=0.01, max_backoff_s=0.05) as remote:
            with pytest.raises(RuntimeError, match=re.escape(f"{busy.url}/score answered 503: The queue is full.")):
                remote(PROMPTS[:1], RESPONSES[:1])
    assert slept == pytest.approx(waits) and busy.posts == 3


@pytest.mark.parametrize("options", [{"max_backoff_s": float("inf")}, {"backoff_s": -1.0}, {"retries": -1}])
def test_remote_scorer_refuses_waits_it_could_not_keep(options):
    with pytest.raises(ValueError, match="give retries >= 0, backoff_s >= 0 and a finite max_backoff_s >= 0"):
        RemoteScorer("http://127.0.0.1:8000", **options)


# --------------------------------------------------------------------------------------------- the command


SLOW_FORWARD = """
import sys, time
import rmtorch.model as model
forward = model.RewardModel.forward
def slow_forward(self, *args, **kwargs):
    print("forward started", file=sys.stderr, flush=True)
    time.sleep(3)
    return forward(self, *args, **kwargs)
model.RewardModel.forward = slow_forward
"""


def test_sigterm_answers_the_requests_in_flight_then_exits(tiny_model_dir, scorer):
    """python -m rmtorch.serve in a real process: SIGTERM during a (slowed) forward stops taking connections, answers
    the request in flight, shuts the model worker down and exits."""
    command = [
        sys.executable, "-c", SLOW_FORWARD + "import runpy; runpy.run_module('rmtorch.serve', run_name='__main__')",
        "--model", str(tiny_model_dir), "--port", "0", "--bf16", "false", "--cpu_threads", "1",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
    try:
        wait_until(lambda: any("Uvicorn running on" in line for line in lines), "the server to start", timeout=180)
        url = re.search(r"http://127\.0\.0\.1:\d+", next(line for line in lines if "Uvicorn running" in line))[0]
        text = chat_text(scorer.tokenizer, PROMPTS[0], RESPONSES[0])
        with ThreadPoolExecutor(1) as client:
            in_flight = client.submit(httpx.post, url + "/get_reward", json={"query": [text]}, timeout=60)
            wait_until(lambda: any("forward started" in line for line in lines), "the forward to start")
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: any("Shutting down" in line for line in lines), "the shutdown to begin")
            wait_until(lambda: refuses_connections(url), "the port to close")
            response = in_flight.result()
        # After its graceful shutdown uvicorn ends the process by the signal it caught, as process managers expect.
        assert process.wait(timeout=60) == -signal.SIGTERM
    finally:
        process.kill()
    assert response.status_code == 200
    assert_rewards(response.json()["rewards"], [text_ids(scorer.tokenizer, text)], scorer.model)
    assert any("Application shutdown complete" in line for line in lines)


def refuses_connections(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=5)
    except httpx.ConnectError:
        return True
    return False


def test_the_command_checks_its_options_before_loading_a_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rmtorch.serve", "--model", "smollm2", "--normalize", str(tmp_path / "missing.json")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "missing.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_binding_beyond_localhost_without_a_key_warns(monkeypatch):
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None
    assert exposure_warning("0.0.0.0", "key") is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert "without an API key" in exposure_warning("rm-host.internal", None)  # a name may resolve to anything
    monkeypatch.setenv("RMTORCH_SERVE_API_KEY", "from-env")
    assert load_config(["--host", "0.0.0.0"]).api_key == "from-env"
    assert load_config(["--api_key", "given"]).api_key == "given"


def test_tensor_parallelism_is_an_engine_option_of_vllm():
    with pytest.raises(ValueError, match=r"--tensor_parallel_size 2 needs --engine vllm"):
        load_config(["--tensor_parallel_size", "2"])
    assert load_config(["--engine", "vllm", "--tensor_parallel_size", "2"]).engine_options() == {
        "tensor_parallel_size": 2
    }
    assert load_config(["--engine", "vllm"]).engine_options() == {}


def test_vllm_options_go_to_vllm_as_json():
    options = '{"enforce_eager": true, "max_model_len": 4096}'
    assert load_config(
        ["--engine", "vllm", "--tensor_parallel_size", "2", "--vllm_options", options]
    ).engine_options() == {"tensor_parallel_size": 2, "enforce_eager": True, "max_model_len": 4096}
    with pytest.raises(ValueError, match=r"--vllm_options .* needs --engine vllm"):
        load_config(["--vllm_options", options])
    for bad in ("enforce_eager=true", "[1, 2]"):
        with pytest.raises(SystemExit, match=r"--vllm_options: vllm_options must be a mapping such as"):
            load_config(["--engine", "vllm", "--vllm_options", bad])


def test_an_unexpected_error_is_a_json_500_and_the_connection_serves_on(scorer, monkeypatch, caplog):
    from rmtorch.serve import app as serve_app

    def breaks(*args):
        raise KeyError("something no check foresaw")

    with serving(scorer) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        monkeypatch.setattr(serve_app.ServeState, "tokenize_texts", breaks)
        failed = client.post("/classify", json={"input": ["<s> hello"]})
        monkeypatch.undo()
        after = client.post("/classify", json={"input": ["<s> hello"]})  # the same keep-alive connection
        errors = live.metrics()["rmtorch_serve_errors_total{kind=internal_error}"]
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "internal_error"
    assert "KeyError('something no check foresaw')" in failed.json()["error"]["message"]
    assert after.status_code == 200 and errors == 1
    assert not [r for r in caplog.records if r.name.startswith("uvicorn") and r.levelname == "ERROR"]
