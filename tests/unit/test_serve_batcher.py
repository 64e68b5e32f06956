"""rmtorch.serve.batcher without HTTP: the shared prefixes found across a batch, and the queue the model worker
takes from (arrival order, the token budget, cancel, stop), with a scorer that records its batches."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest
import torch

from rmtorch.serve.batcher import Batcher, Overloaded, RequestTooLarge, Scored, shared_prefix_lengths
from rmtorch.serve.metrics import ServeMetrics

SYSTEM = list(range(100, 120))  # 20 tokens every row starts with, like a chat template's system turn


def test_rows_sharing_a_prompt_share_it_and_a_lone_row_shares_nothing():
    prompt = SYSTEM + list(range(30))
    rows = [prompt + [1, 2], prompt + [3], list(range(500, 540)), prompt + [4, 5, 6]]
    assert shared_prefix_lengths(rows) == [50, 50, 0, 50]


def test_each_group_keeps_its_own_prompt_rather_than_the_prefix_all_rows_share():
    a, b = SYSTEM + [1] * 40, SYSTEM + [2] * 40
    rows = [a + [7], b + [8], a + [9], b + [10], a + [11]]
    # Sharing only the 20 system tokens across all five rows would save 80 tokens; per group it saves 2*60 + 60.
    assert shared_prefix_lengths(rows) == [60, 60, 60, 60, 60]


def test_every_row_keeps_a_token_of_its_own_and_short_prefixes_are_not_shared():
    row = SYSTEM + [1, 2, 3]
    assert shared_prefix_lengths([row, list(row), row[:-1]]) == [len(row) - 2] * 3
    assert shared_prefix_lengths([[1, 2, 3, 4], [1, 2, 3, 5]]) == [0, 0]  # 3 tokens: below MIN_SHARED_TOKENS
    assert shared_prefix_lengths([[1, 2, 3, 4], [1, 2, 3, 5]], min_shared=3) == [3, 3]
    assert shared_prefix_lengths([]) == []


def test_shared_prefixes_do_not_depend_on_row_order():
    rng = random.Random(0)
    prompts = [SYSTEM + [rng.randrange(50) for _ in range(rng.randint(0, 30))] for _ in range(6)]
    rows = [rng.choice(prompts) + [rng.randrange(50) for _ in range(rng.randint(1, 9))] for _ in range(40)]
    lengths = dict(zip(map(tuple, rows), shared_prefix_lengths(rows)))
    order = list(range(len(rows)))
    rng.shuffle(order)
    shuffled = [rows[i] for i in order]
    assert dict(zip(map(tuple, shuffled), shared_prefix_lengths(shuffled))) == lengths
    for row, length in lengths.items():  # a shared prefix really is shared by another row
        assert length == 0 or any(other != row and other[:length] == row[:length] for other in lengths)


# ------------------------------------------------------------------------------------------------- queue


class RecordingScorer:
    """Stands in for RewardScorer: each row's reward is its token count; every batch's rows are recorded."""

    def __init__(self, max_tokens_per_batch: int, max_length: int | None = None):
        self.max_tokens_per_batch, self.max_length, self.batches = max_tokens_per_batch, max_length, []

    def score_tokens(self, sequences, prompt_lengths=None):
        self.batches.append(sequences)
        lengths = torch.tensor([len(ids) for ids in sequences])
        return SimpleNamespace(
            rewards=lengths.float(), num_tokens=lengths, truncated=torch.zeros_like(lengths).bool(), attributes=None
        )


def run_queue(scorer, requests: list[list[list[int]]], max_queue_tokens: int = 1000):
    """Queue every request before the worker starts, then let it score them all; the results in request order."""

    async def main():
        batcher = Batcher(scorer, max_wait_s=0, max_queue_tokens=max_queue_tokens, metrics=ServeMetrics())
        jobs = [batcher.submit(rows) for rows in requests]
        batcher.start()
        results = await asyncio.gather(*(job.future for job in jobs))
        await asyncio.to_thread(batcher.stop)
        return results

    return asyncio.run(main())


def test_the_worker_takes_requests_in_arrival_order_up_to_the_token_budget():
    scorer = RecordingScorer(max_tokens_per_batch=6)
    requests = [[[1, 2, 3]], [[4, 5], [6]], [[7, 8, 9, 10]], [[11] * 9], [[12]]]
    results = run_queue(scorer, requests)
    # 3 + 3 tokens fill the budget; 4 tokens start the next batch; a request over the budget runs alone.
    assert scorer.batches == [[[1, 2, 3], [4, 5], [6]], [[7, 8, 9, 10]], [[11] * 9], [[12]]]
    assert results == [
        Scored([3.0], [3], [False]), Scored([2.0, 1.0], [2, 1], [False, False]), Scored([4.0], [4], [False]),
        Scored([9.0], [9], [False]), Scored([1.0], [1], [False]),
    ]  # fmt: skip


def test_queue_limits_cancel_and_stop():
    scorer = RecordingScorer(max_tokens_per_batch=100, max_length=4)

    async def main():
        batcher = Batcher(scorer, max_wait_s=0, max_queue_tokens=10, metrics=ServeMetrics())
        first = batcher.submit([[1] * 20, [2] * 3])  # counted as scored: 4 (max_length) + 3 tokens
        with pytest.raises(RequestTooLarge, match="holds 12 tokens, more than the server queues at once"):
            batcher.submit([[3] * 4] * 3)
        with pytest.raises(Overloaded, match="7 tokens are waiting and this request adds 4") as overloaded:
            batcher.submit([[3] * 4])
        assert overloaded.value.retry_after == 1  # no forward measured yet
        left = batcher.submit([[5] * 3])
        assert batcher.cancel(left) and (batcher.queued_tokens, batcher.queued_requests) == (7, 1)
        batcher.start()
        await asyncio.to_thread(batcher.stop)  # scores what is queued, then ends
        with pytest.raises(Overloaded, match="shutting down"):
            batcher.submit([[6]])
        return await first.future

    assert asyncio.run(main()).num_tokens == [20, 3]  # the recording scorer does not truncate
    assert scorer.batches == [[[1] * 20, [2] * 3]]
