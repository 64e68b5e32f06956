"""RemoteScorer: `RewardScorer`'s call, answered by rmtorch.serve servers (one server per GPU, used in turn)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import httpx
import torch

from rmtorch.score import RewardScorer, ScoreDetails, check_row_lists

RETRIED_STATUSES = (429, 500, 502, 503, 504)  # the server may answer the same request later, or another one may
# A reward is the row's alone: a non-finite one comes back on every try and from every replica.
FINAL_ERRORS = ("nonfinite_reward",)


class RemoteScorer:
    """Scores (prompt, completion) rows on rmtorch.serve servers, with RewardScorer's call and formatting:

        scorer = RemoteScorer(["http://gpu0:8000", "http://gpu1:8000"], api_key=key)
        rewards = scorer(prompts, completions)              # (N,) fp32, input order
        trainer = GRPOTrainer(..., reward_funcs=[scorer.as_reward_func(name="rm")])

    The rewards are the server's: normalized when it runs with --normalize (the raw ones are in
    `return_details=True`'s answer, not in ScoreDetails). Each call goes to the next server in turn. A call that cannot
    connect, times out or gets 429/5xx is retried on the next server after a backoff (doubling from `backoff_s`, at
    least the server's Retry-After), `retries` times; any other error status, or a non-finite reward, means the
    request itself is wrong and raises ValueError with the server's message at once. Connecting to a server waits
    at most `connect_timeout_s` (a host that drops packets would otherwise hold each attempt for minutes).
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
        answer = self.post("/score", {**body, "return_details": return_details})
        rewards = torch.tensor(answer["rewards"], dtype=torch.float32)
        if not return_details:
            return rewards
        details = answer["details"]
        return ScoreDetails(
            rewards,
            torch.tensor(details["num_tokens"], dtype=torch.long),
            torch.tensor(details["truncated"], dtype=torch.bool),
            torch.tensor(details["unclosed_think"], dtype=torch.bool),
            torch.tensor(details["dropped_text"], dtype=torch.bool),
        )

    # TRL's reward function, the same as RewardScorer's: it only calls self(prompts, completions, part=part).
    as_reward_func = RewardScorer.as_reward_func

    def post(self, path: str, body: dict) -> dict:
        """POST `body` as JSON to `path` on the next server, retrying as the class docstring says; the JSON answer."""
        last_failure, answered = "", False
        for attempt in range(self.retries + 1):
            url = self.urls[next(self._turn) % len(self.urls)] + path
            wait = 0.0
            try:
                response = self._client.post(url, json=body)
            except httpx.TransportError as err:  # refused, reset or timed out: the next server may answer
                last_failure = f"{url}: {err!r}"
            else:
                if response.status_code == 200:
                    return response.json()
                kind, message = _error(response)
                if response.status_code not in RETRIED_STATUSES or kind in FINAL_ERRORS:
                    raise ValueError(f"{url} refused the request ({response.status_code}): {message}")
                last_failure, answered = f"{url} answered {response.status_code}: {message}", True
                wait = _retry_after(response)
            if attempt < self.retries:
                time.sleep(max(wait, min(self.backoff_s * 2**attempt, self.max_backoff_s)))
        if answered:
            raise RuntimeError(
                f"rmtorch.serve did not score the request in {self.retries + 1} attempts; the last: {last_failure}"
            )
        raise ConnectionError(
            f"No rmtorch.serve server answered in {self.retries + 1} attempts; the last: {last_failure}"
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemoteScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _error(response: httpx.Response) -> tuple[str, str]:
    """(type, message) of rmtorch.serve's JSON error body, else ("", the start of the body as text)."""
    try:
        error = response.json()["error"]
        return str(error.get("type", "")), error["message"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", response.text[:500]


def _retry_after(response: httpx.Response) -> float:
    """Seconds the server asks to wait; 0 when absent or not a number (a proxy may send an HTTP date)."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", "0") or 0))
    except ValueError:
        return 0.0
