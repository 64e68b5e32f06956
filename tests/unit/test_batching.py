"""rmtorch.batching: the packed-row layout, the collators, token-budget plans, and data order."""

from __future__ import annotations

import pytest
import torch

from rmtorch.batching import (
    EpochSampler,
    LengthGroupedBatchSampler,
    PackedPairCollator,
    PairCollator,
    micro_batches,
    pack_groups,
    plan_packed,
    shared_prefix_length,
)


def test_pack_groups_lays_sequences_back_to_back_with_restarting_positions():
    packed = pack_groups([[[5, 6, 7], [5, 8]], [[9]]])
    assert packed["input_ids"].tolist() == [[5, 6, 7, 5, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert packed["attention_mask"].tolist() == [[1] * 6]
    assert packed["last_index"].tolist() == [2, 4, 5]
    assert packed["attention_blocks"] == ((0, 3, 0, 0), (3, 5, 3, 3), (5, 6, 5, 5))


def test_pack_groups_with_shared_prompt_lays_the_prompt_out_once():
    packed = pack_groups([[[5, 6, 7], [5, 6, 8, 9]], [[9]]], share_prompt=True)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 2, 3, 0]]
    assert packed["last_index"].tolist() == [2, 4, 5]
    # prompt block, two responses that see the prompt (0..2), then a lone sequence
    assert packed["attention_blocks"] == ((0, 2, 0, 0), (2, 3, 0, 2), (3, 5, 0, 2), (5, 6, 5, 5))


@pytest.mark.parametrize(
    "sequences, expected",
    [
        ([[1, 2, 3], [1, 2, 4]], 2),
        ([[1, 2, 3], [1, 2, 3, 4]], 2),
        ([[1, 2], [1, 2]], 1),
        ([[7], [7, 8]], 0),
        ([[1, 2, 3], [4, 2, 3]], 0),
    ],
)
def test_shared_prefix_leaves_every_sequence_its_last_token(sequences, expected):
    assert shared_prefix_length(sequences) == expected


def test_pair_collator_orders_rewards_chosen_then_rejected():
    pairs = [{"chosen_ids": [1, 2], "rejected_ids": [3]}, {"chosen_ids": [4], "rejected_ids": [5, 6, 7]}]
    batch = PackedPairCollator()(pairs)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert batch["last_index"].tolist() == [1, 3, 2, 6]  # chosen 0, chosen 1, rejected 0, rejected 1
    assert "margin" not in batch


def test_empty_sequence_is_refused():
    with pytest.raises(ValueError, match="empty sequence"):
        pack_groups([[[1, 2], []]])


def test_length_grouped_batches_hold_every_row_once_and_cut_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (103,), generator=gen).tolist()
    sampler = LengthGroupedBatchSampler(EpochSampler(103, seed=7), lengths, batch_size=8, window_batches=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4 * 3 + 1  # windows of 32 rows: 3 full (4 batches each) + 7 rows
    assert sorted(i for b in batches for i in b) == list(range(103))
    padded_tokens = lambda bs: sum(len(b) * max(lengths[i] for i in b) for b in bs)  # noqa: E731
    random_batches = [list(range(103))[i : i + 8] for i in range(0, 103, 8)]
    assert padded_tokens(batches) < 0.8 * padded_tokens(random_batches)


def test_length_grouped_order_depends_only_on_seed_and_epoch():
    lengths = list(range(40))
    make = lambda seed: LengthGroupedBatchSampler(EpochSampler(40, seed=seed), lengths, batch_size=4)  # noqa: E731
    first, again = make(1), make(1)
    assert list(first) == list(again)
    epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch0
    assert sorted(map(tuple, epoch0)) == sorted(map(tuple, list(make(1))))  # one window: same batches, new order
    unshuffled = LengthGroupedBatchSampler(EpochSampler(40, shuffle=False), lengths, batch_size=4)
    assert list(unshuffled)[0] == [39, 38, 37, 36]


@pytest.mark.parametrize("seed", range(6))
def test_length_grouped_batches_reach_every_process_under_accelerates_sharding(seed):
    """With several processes Accelerate wraps the batch sampler in BatchSamplerShard, which drops a whole round
    whose last batch is short unless it comes last: the short batch must stay last, so no pair is lost."""
    from accelerate.data_loader import BatchSamplerShard

    sampler = LengthGroupedBatchSampler(EpochSampler(21, seed=seed), list(range(21)), batch_size=4)
    shards = [BatchSamplerShard(sampler, num_processes=2, process_index=rank) for rank in range(2)]
    seen = [row for shard in shards for batch in shard for row in batch]
    assert set(seen) == set(range(21))
    assert [len(list(shard)) for shard in shards] == [len(shard) for shard in shards]


def test_packed_collator_shares_the_stored_prompt_length():
    pair = {"chosen_ids": [1, 2, 3, 4], "rejected_ids": [1, 2, 3, 5], "prompt_length": 2}  # responses share token 3
    batch = PackedPairCollator()([pair])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 3, 5]]  # the stored prompt once, token 3 in each response
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3]]
    assert PackedPairCollator(share_prompt=False)([pair])["input_ids"].tolist() == [[1, 2, 3, 4, 1, 2, 3, 5]]


def test_micro_batches_cover_every_row_once_within_budget():
    lengths = [5, 40, 7, 7, 100, 3, 40, 12]
    batches = micro_batches(lengths, max_tokens_per_batch=80)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert lengths[batch[0]] == longest
        assert len(batch) == 1 or len(batch) * longest <= 80
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)


def test_packed_plan_groups_rows_by_prompt_within_the_budget():
    prompt = [7, 7, 7, 7]
    sequences = [prompt + [1], prompt + [2, 2], [9, 9, 9], prompt + [3] * 10, [5]]
    plan = plan_packed(sequences, [4, 4, 0, 4, 0], max_tokens_per_batch=16)
    rows = sorted(row for batch in plan for group in batch for row in group.rows)
    assert rows == [0, 1, 2, 3, 4]
    for batch in plan:
        tokens = sum(sum(len(sequences[r]) for r in g.rows) - g.shared * (len(g.rows) - 1) for g in batch)
        assert tokens <= 16 or sum(len(g.rows) for g in batch) == 1
        for group in batch:
            assert group.shared in (0, 4) and (group.shared == 0 or len(group.rows) > 1)
    shared = [g for batch in plan for g in batch if g.shared]
    assert shared and all(set(g.rows) <= {0, 1, 3} for g in shared)  # only rows of the shared prompt share it


def test_collators_give_response_lengths_only_when_asked():
    pairs = [
        {"chosen_ids": [1, 2, 3, 4], "rejected_ids": [1, 2, 5], "prompt_length": 2},
        {"chosen_ids": [7, 8], "rejected_ids": [7, 9, 9, 9, 9], "prompt_length": 1},
    ]
    for collate in (PackedPairCollator, lambda **kw: PairCollator(pad_token_id=0, **kw)):
        assert "response_lengths" not in collate()(pairs)  # off by default: TRL's batch, key for key
        assert collate(response_lengths=True)(pairs)["response_lengths"].tolist() == [2, 1, 1, 4]  # chosen, rejected
