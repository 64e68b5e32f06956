"""RemoteScorer: `RewardScorer`'s call, answered by rmtorch.serve servers (one server per GPU, used in turn)."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import torch

from rmtorch.score import RewardScorer, ScoreDetails, check_row_lists

RETRIED_STATUSES = (429, 500, 502, 503, 504)  # the server may answer the same request later, or another one may
# A reward is the row's alone: a non-finite one comes back on every try and from every replica.
FINAL_ERRORS = ("nonfinite_reward",)
# What each value of a /score answer's lists must be (JSON gives exact ints, floats and bools). A null reward passes
# here: JSON encoders write NaN as null, so it is reported with the non-finite rewards.
VALUE_KINDS = {
    "a number": lambda value: value is None or type(value) in (int, float),
    "a token count": lambda value: type(value) is int and 0 <= value < 2**63,
    "true or false": lambda value: type(value) is bool,
}
FP32_MAX = torch.finfo(torch.float32).max
DETAIL_KINDS = {"num_tokens": "a token count", "truncated": "true or false", "unclosed_think": "true or false",
                "dropped_text": "true or false"}  # fmt: skip


class ServerAnswerError(ValueError):
    """A server's 200 answer that RemoteScorer cannot use: not rmtorch.serve's (not JSON, a key missing, a list whose
    length is not the number of rows sent, a value of the wrong type), or holding a non-finite reward. The message
    names the server's URL and what was wrong."""


class _BadAnswer(Exception):
    """What is wrong with a 200 answer; `final` when every replica would answer the same (a non-finite reward)."""

    def __init__(self, problem: str, final: bool = False):
        super().__init__(problem)
        self.final = final


class RemoteScorer:
    """Scores (prompt, completion) rows on rmtorch.serve servers, with RewardScorer's call and formatting:

        scorer = RemoteScorer(["http://gpu0:8000", "http://gpu1:8000"], api_key=key)
        rewards = scorer(prompts, completions)              # (N,) fp32, input order
        trainer = GRPOTrainer(..., reward_funcs=[scorer.as_reward_func(name="rm")])

    The rewards are the server's: normalized when it runs with --normalize (the raw ones are in
    `return_details=True`'s answer, not in ScoreDetails). Each call goes to the next server in turn. A call that cannot
    connect, times out or gets 429/5xx is retried on the next server after a backoff (doubling from `backoff_s`, at
    least the server's Retry-After, never more than `max_backoff_s`), `retries` times; any other error status, or a
    non-finite reward, means the request itself is wrong and raises ValueError with the server's message at once.
    Connecting to a server waits at most `connect_timeout_s` (a host that drops packets would otherwise hold each
    attempt for minutes).

    Every 200 answer is checked before it is used. One that is not rmtorch.serve's (not JSON, e.g. a proxy's HTML
    page; a key missing; a list whose length is not the number of rows sent; a value of the wrong type) raises
    `ServerAnswerError` naming the server and the problem: at once with one server, else after trying the next
    servers as for a 5xx (a broken proxy or a wrong URL answers so, not the request). A 200 answer with a
    non-finite reward (NaN, inf or null) raises `ServerAnswerError` at once: every replica would give it. When the
    retries run out the error is ConnectionError if no server answered, else that of the last answer: RuntimeError
    (429/5xx) or ServerAnswerError.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("RemoteScorer needs at least one server URL, e.g. 'http://127.0.0.1:8000'.")
        if not (retries >= 0 and backoff_s >= 0 and 0 <= max_backoff_s < math.inf):
            raise ValueError(
                f"RemoteScorer got retries={retries}, backoff_s={backoff_s}, max_backoff_s={max_backoff_s}; give "
                "retries >= 0, backoff_s >= 0 and a finite max_backoff_s >= 0."
            )
        self.urls = [url.rstrip("/") for url in self.urls]
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self._turn = itertools.count()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s))
        self._client = httpx.Client(timeout=timeout, headers=headers)

    def __call__(self, prompts, completions, *, part: str = "full", return_details: bool = False):
        """Rewards of N (prompt, completion) rows, (N,) fp32 in input order; see `RewardScorer.__call__`."""
        check_row_lists(prompts, completions)  # here, before the network: the server would refuse them
        body = {"prompts": list(prompts), "completions": list(completions), "part": part}
        rows = len(body["completions"])
        return self.post(
            "/score",
            {**body, "return_details": return_details},
            read=lambda answer: _read_score_answer(answer, rows, return_details),
        )

    # TRL's reward function, the same as RewardScorer's: it only calls self(prompts, completions, part=part).
    as_reward_func = RewardScorer.as_reward_func

    def post(self, path: str, body: dict, read: Callable[[dict], Any] | None = None) -> Any:
        """POST `body` as JSON to `path` on the next server, retrying as the class docstring says: the JSON object
        answered, or what `read` makes of it (`read` raises _BadAnswer for an answer it cannot use)."""
        last_failure, error_type = "", ConnectionError
        for attempt in range(self.retries + 1):
            url = self.urls[next(self._turn) % len(self.urls)] + path
            wait = 0.0
            try:
                response = self._client.post(url, json=body)
            except httpx.TransportError as err:  # refused, reset or timed out: the next server may answer
                last_failure = f"{url}: {err!r}"
            else:
                if response.status_code == 200:
                    try:
                        answer = _json_object(response)
                        return read(answer) if read else answer
                    except _BadAnswer as bad:
                        message = f"{url} answered 200 but {bad}"
                        if not bad.final:
                            message += (
                                ". That is not an rmtorch.serve answer: check that the URL is an rmtorch.serve "
                                "server's and that no proxy answers in its place."
                            )
                        if bad.final or len(self.urls) == 1:
                            raise ServerAnswerError(message) from None
                        last_failure, error_type = message, ServerAnswerError
                else:
                    kind, message = _error(response)
                    if response.status_code not in RETRIED_STATUSES or kind in FINAL_ERRORS:
                        raise ValueError(f"{url} refused the request ({response.status_code}): {message}")
                    last_failure, error_type = f"{url} answered {response.status_code}: {message}", RuntimeError
                    wait = _retry_after(response)
            if attempt < self.retries:
                backoff = self.backoff_s * 2.0 ** min(attempt, 60)  # a capped exponent: 2.0**1024 overflows
                time.sleep(min(max(wait, backoff), self.max_backoff_s))
        if error_type is ConnectionError:
            raise ConnectionError(
                f"No rmtorch.serve server answered in {self.retries + 1} attempts; the last: {last_failure}"
            )
        raise error_type(
            f"rmtorch.serve did not score the request in {self.retries + 1} attempts; the last: {last_failure}"
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemoteScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_object(response: httpx.Response) -> dict:
    """The answer's JSON object, else _BadAnswer saying what came instead."""
    try:
        answer = response.json()
    except ValueError:  # not JSON, or bytes that are not text
        content_type = response.headers.get("Content-Type", "no Content-Type")
        raise _BadAnswer(f"its body is not JSON ({content_type}, starting {response.text[:80]!r})") from None
    if not isinstance(answer, dict):
        raise _BadAnswer(f"its JSON is a {type(answer).__name__}, not an object")
    return answer


def _read_score_answer(answer: dict, rows: int, return_details: bool) -> torch.Tensor | ScoreDetails:
    """/score's answer as RewardScorer returns it, each list checked against the `rows` sent (else _BadAnswer)."""
    rewards = _values(answer, "rewards", rows, "a number")
    nonfinite = [row for row, reward in enumerate(rewards) if not _finite(reward)]
    if nonfinite:
        raise _BadAnswer(
            f"the reward model gave a non-finite reward (NaN, inf, null or past fp32) to rows {nonfinite[:10]}; "
            "every replica would give the same. With --bf16, try fp32 (--bf16 false).",
            final=True,
        )
    rewards = torch.tensor(rewards, dtype=torch.float32)
    if not return_details:
        return rewards
    if "details" not in answer:
        raise _BadAnswer(f"'details' is missing (return_details=True asks for it; it has {sorted(answer)[:10]})")
    details = answer["details"]
    if not isinstance(details, dict):
        raise _BadAnswer(f"'details' is {_shown(details)}, not an object (return_details=True asks for it)")
    num_tokens, *flags = (_values(details, key, rows, kind, "details.") for key, kind in DETAIL_KINDS.items())
    return ScoreDetails(
        rewards, torch.tensor(num_tokens, dtype=torch.long), *(torch.tensor(flag, dtype=torch.bool) for flag in flags)
    )


def _finite(reward: float | int | None) -> bool:
    """Whether a reward stays finite as the fp32 RemoteScorer returns (past fp32's range it would become inf)."""
    return reward is not None and abs(reward) <= FP32_MAX  # False for NaN; exact for an int past any float


def _values(answer: dict, key: str, rows: int, kind: str, where: str = "") -> list:
    """answer[key]: a list of one value per row sent, each `kind` (a key of VALUE_KINDS), else _BadAnswer."""
    if key not in answer:
        raise _BadAnswer(f"'{where}{key}' is missing (it has {sorted(answer)[:10]})")
    values = answer[key]
    if not isinstance(values, list):
        raise _BadAnswer(f"'{where}{key}' is {_shown(values)}, not a list")
    if len(values) != rows:
        raise _BadAnswer(f"'{where}{key}' has {len(values)} values for the {rows} rows sent")
    is_kind = VALUE_KINDS[kind]
    wrong = next((row for row, value in enumerate(values) if not is_kind(value)), None)
    if wrong is not None:
        raise _BadAnswer(f"'{where}{key}[{wrong}]' is {_shown(values[wrong])}, not {kind}")
    return values


def _shown(value: Any) -> str:
    """A JSON value in an error: its type and the start of its repr."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _error(response: httpx.Response) -> tuple[str, str]:
    """(type, message) of rmtorch.serve's JSON error body, else ("", the start of the body as text)."""
    try:
        error = response.json()["error"]
        return str(error.get("type", "")), error["message"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", response.text[:500]


def _retry_after(response: httpx.Response) -> float:
    """Seconds the server asks to wait, inf included (the caller caps the wait at max_backoff_s); 0 when absent,
    negative, NaN or not a number (a proxy may send an HTTP date)."""
    try:
        seconds = float(response.headers.get("Retry-After", "0") or 0)
    except ValueError:
        return 0.0
    return seconds if seconds > 0 else 0.0  # NaN > 0 is false
