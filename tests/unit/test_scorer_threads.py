"""One RewardScorer shared by threads: every call's rewards equal the same call made alone, and the caller's model
ends as it began (its attention implementation and mode)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import torch

from rmtorch.score import RewardScorer
from tests.conftest import PAIR_WORDS, tiny_llama


def calls(count: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """GRPO-shaped calls of different sizes: prompts repeated for their completions (packed with a shared prompt)."""
    rng = random.Random(seed)
    words = lambda n: " ".join(rng.choice(PAIR_WORDS) for _ in range(n))  # noqa: E731
    out = []
    for i in range(count):
        prompts = [words(4 + i % 7) for _ in range(2 + i % 3)]
        rows = [(p, " " + words(1 + (i + k) % 12)) for p in prompts for k in range(3)]
        out.append(([p for p, _ in rows], [c for _, c in rows]))
    return out


def test_threads_sharing_a_scorer_get_the_rewards_of_each_call_alone(bos_tokenizer):
    model = tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id)
    attention, mode = model.config._attn_implementation, model.training
    scorer = RewardScorer(model, bos_tokenizer)  # packing, the default: the forward switches attention
    work = calls(24)
    alone = [scorer(prompts, completions) for prompts, completions in work]
    for _ in range(3):  # several rounds: interleavings differ from run to run
        with ThreadPoolExecutor(max_workers=6) as pool:
            together = list(pool.map(lambda call: scorer(*call), work))
        for i, (a, b) in enumerate(zip(alone, together)):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=f"call {i}")
    assert model.config._attn_implementation == attention and model.training == mode


def test_two_scorers_of_one_model_in_two_threads(bos_tokenizer):
    model = tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id)
    attention = model.config._attn_implementation
    packed, padded = RewardScorer(model, bos_tokenizer), RewardScorer(model, bos_tokenizer, packing=False)
    work = calls(16, seed=1)
    alone = [packed(*call) for call in work]
    with ThreadPoolExecutor(max_workers=4) as pool:
        jobs = [pool.submit(scorer, *call) for call in work for scorer in (packed, padded)]
        together = [job.result() for job in jobs]
    for i, rewards in enumerate(together):
        torch.testing.assert_close(rewards, alone[i // 2], rtol=0, atol=1e-5, msg=f"call {i // 2}")
    assert model.config._attn_implementation == attention
