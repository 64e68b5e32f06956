"""The model worker: one thread owns the model and scores, in one forward, what many requests left in its queue.

Requests (each a list of token-id rows) wait in a FIFO queue. The worker takes the waiting requests in order, up to
the scorer's `max_tokens_per_batch` tokens (at least one request), after waiting at most `max_wait_s` from the
oldest one's arrival for more, and scores them with one `RewardScorer.score_tokens` call: the scorer's truncation
rule and one `compute_rewards`, whose packing computes a prefix rows share once. Rows of different requests share
prefixes too: `shared_prefix_lengths` finds them in the tokens, so full texts (OpenRLHF, verl) share their prompt
like rows rmtorch formatted itself. Whatever a batch holds, each reward equals the row scored alone
(`compute_rewards`' guarantee).

The event loop submits and awaits; the worker answers each request's future through the loop. A batch whose
forward raises fails its own requests only, and the worker goes on to the next.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from rmtorch.formatting import common_prefix_length

logger = logging.getLogger(__name__)

# A shorter shared prefix saves less than it costs: one more attention block (an SDPA call a layer) in the forward.
MIN_SHARED_TOKENS = 16


class Overloaded(Exception):
    """The queue is full or the server is stopping; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTooLarge(Exception):
    """A request holds more tokens than the queue may ever hold: retrying cannot help."""


class ForwardFailed(Exception):
    """The forward of the batch holding the request raised; the message names the error."""


@dataclass
class Scored:
    """One request's results, in its row order."""

    rewards: list[float]  # raw rewards
    num_tokens: list[int]  # tokens scored (after truncation)
    truncated: list[bool]  # longer than max_length: the start was cut
    attributes: list[list[float]] | None = None  # a rating model's attribute values per row (else None)


@dataclass(eq=False)  # jobs are compared by identity (deque.remove)
class Job:
    sequences: list[list[int]]
    tokens: int
    future: asyncio.Future
    arrived: float  # time.monotonic()

    def resolve(self, result: Scored | None = None, error: Exception | None = None) -> None:
        """Answer the waiting request from the worker thread (a request whose client left is skipped)."""
        self.future.get_loop().call_soon_threadsafe(_settle, self.future, result, error)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():  # cancelled: its client disconnected
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def shared_prefix_lengths(sequences: list[list[int]], min_shared: int = MIN_SHARED_TOKENS) -> list[int]:
    """Per row, the leading tokens it shares with the other rows of its group (0: none): `compute_rewards`'
    prompt_lengths, so a packed forward computes each group's prefix once.

    Sorted by their ids, rows that share a prefix are neighbours. A run of neighbours becomes a group sharing their
    common prefix; the run ends where taking the next row would save fewer tokens than the group already saves, or
    where the prefix would drop below `min_shared`. Every row keeps at least its last token of its own.
    """
    order = sorted(range(len(sequences)), key=sequences.__getitem__)
    lengths = [0] * len(sequences)
    group, shared = order[:1], 0
    for previous, row in zip(order, order[1:]):
        a, b = sequences[previous], sequences[row]
        common = min(common_prefix_length(a, b), len(a) - 1, len(b) - 1)
        candidate = common if len(group) == 1 else min(shared, common)
        # A group of k rows sharing p tokens saves (k - 1) * p; adding this row makes it k * candidate.
        if candidate >= min_shared and len(group) * candidate >= (len(group) - 1) * shared:
            group.append(row)
            shared = candidate
            continue
        for member in group if len(group) > 1 else ():
            lengths[member] = shared
        group, shared = [row], 0
    for member in group if len(group) > 1 else ():
        lengths[member] = shared
    return lengths


class Batcher:
    """The queue and the model worker thread; `submit` and `cancel` are called on the event loop."""

    def __init__(self, scorer, *, max_wait_s: float, max_queue_tokens: int, metrics):
        self.scorer = scorer
        self.max_wait_s = max_wait_s
        self.max_queue_tokens = max_queue_tokens
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._queued_tokens = 0
        self._condition = threading.Condition()
        self._stopping = False
        self._tokens_per_s: float | None = None  # of the last forward: what Retry-After is estimated from
        self._thread = threading.Thread(target=self._work, name="rmtorch-serve-model", daemon=True)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._thread.start()

    def submit(self, sequences: list[list[int]]) -> Job:
        """Queue one request's rows; the returned job's future gets a `Scored` or a `ForwardFailed`.

        Raises RequestTooLarge (more tokens than the queue may hold) or Overloaded (full, or stopping).
        """
        max_length = self.scorer.max_length
        tokens = sum(len(ids) if max_length is None else min(len(ids), max_length) for ids in sequences)
        if tokens > self.max_queue_tokens:
            raise RequestTooLarge(
                f"The request holds {tokens} tokens, more than the server queues at once (--max_queue_tokens "
                f"{self.max_queue_tokens}); send its rows in smaller requests."
            )
        job = Job(sequences, tokens, asyncio.get_running_loop().create_future(), time.monotonic())
        with self._condition:
            if self._stopping:
                raise Overloaded("The server is shutting down; send the request to another replica.", retry_after=1)
            if not self.alive:
                raise Overloaded("The server's model worker has stopped; send the request to another replica.", 30)
            if self._queued_tokens + tokens > self.max_queue_tokens:
                raise Overloaded(
                    f"The server is busy: {self._queued_tokens} tokens are waiting and this request adds {tokens} "
                    f"(--max_queue_tokens {self.max_queue_tokens}). Retry later or add a replica.",
                    retry_after=self._retry_after(),
                )
            self._queue.append(job)
            self._queued_tokens += tokens
            self._condition.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Drop a job whose client left, if it still waits; False when the worker already has it."""
        with self._condition:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self._queued_tokens -= job.tokens
            return True

    def stop(self) -> None:
        """Refuse new requests, score the queued ones, then end the worker (returns when it has ended)."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _retry_after(self) -> int:
        """Whole seconds the worker needs for what is queued, at the last forward's speed (at least 1)."""
        if not self._tokens_per_s:
            return 1
        return max(1, math.ceil(self._queued_tokens / self._tokens_per_s))

    # ------------------------------------------------------------------------------------ worker thread

    @property
    def alive(self) -> bool:
        """The worker thread runs (or has not been started yet)."""
        return self._thread.is_alive() or self._thread.ident is None

    def _work(self) -> None:
        while (jobs := self._next_batch()) is not None:
            try:
                self._score(jobs)
            except Exception as err:  # after the forward (results, metrics): answer the batch, keep serving
                logger.exception("Answering a batch of %d requests failed.", len(jobs))
                failure = ForwardFailed(f"The server failed while answering the batch holding this request: {err!r}")
                for job in jobs:  # those already answered keep their answer
                    job.resolve(error=failure)

    def _next_batch(self) -> list[Job] | None:
        """The next requests to score, in arrival order; None once stopping with nothing queued."""
        budget = self.scorer.max_tokens_per_batch
        with self._condition:
            while True:
                if not self._queue:
                    if self._stopping:
                        return None
                    self._condition.wait()
                    continue
                # Wait for more requests while the budget has room, up to max_wait after the oldest arrived.
                remaining = self._queue[0].arrived + self.max_wait_s - time.monotonic()
                if remaining > 0 and self._queued_tokens < budget and not self._stopping:
                    self._condition.wait(remaining)
                    continue
                jobs, tokens = [], 0
                while self._queue and (not jobs or tokens + self._queue[0].tokens <= budget):
                    jobs.append(self._queue.popleft())
                    tokens += jobs[-1].tokens
                self._queued_tokens -= tokens
                return jobs

    def _score(self, jobs: list[Job]) -> None:
        """One scorer call for every row of `jobs`; each job gets its own rows' results."""
        sequences = [ids for job in jobs for ids in job.sequences]
        started = time.perf_counter()
        try:
            # The rows already are the part asked for: scored as given, a prefix they share computed once.
            details = self.scorer.score_tokens(sequences, shared_prefix_lengths(sequences))
        except Exception as err:  # the batch's requests get the error; the worker serves the next batch
            logger.exception("The forward of %d requests (%d rows) failed.", len(jobs), len(sequences))
            failure = ForwardFailed(f"The reward model's forward failed on the batch holding this request: {err!r}")
            for job in jobs:
                job.resolve(error=failure)
            return
        seconds = time.perf_counter() - started
        num_tokens = details.num_tokens.tolist()
        self._tokens_per_s = sum(num_tokens) / max(seconds, 1e-9)
        self.metrics.observe_batch(len(jobs), len(sequences), sum(num_tokens), seconds)
        start = 0
        for job in jobs:
            end = start + len(job.sequences)
            attributes = None if details.attributes is None else details.attributes[start:end].tolist()
            job.resolve(
                Scored(
                    details.rewards[start:end].tolist(), num_tokens[start:end], details.truncated[start:end].tolist(),
                    attributes,
                )
            )  # fmt: skip
            start = end
