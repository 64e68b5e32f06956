"""Padding-free packing, shared-prompt attention and length-grouped batching (issue 5).

Oracles: the padded forward and one-sequence-at-a-time forwards of the same tiny fp32 model.
"""

from __future__ import annotations

import json

import pytest
import torch

from rmtorch.data import PairCollator
from rmtorch.loss import pairwise_loss
from rmtorch.modeling import RewardModel
from rmtorch.packing import PackedPairCollator, enable_block_attention, pack_groups, packed_inputs, shared_prefix_length
from rmtorch.sampling import EpochSampler, LengthGroupedBatchSampler
from tests.conftest import make_bos_tokenizer, save_tiny_llama, tiny_llama

VOCAB, PAD = 100, 0


def random_pairs(seed: int = 1, shapes=((5, 3, 6), (9, 7, 1), (1, 2, 4), (12, 1, 1))) -> list[dict]:
    """Pairs (prompt, chosen response, rejected response) of the given lengths, with margins."""
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, VOCAB, (n,), generator=gen).tolist()  # noqa: E731
    pairs = []
    for i, (prompt_length, chosen_length, rejected_length) in enumerate(shapes):
        prompt = ids(prompt_length)
        pairs.append({"chosen_ids": prompt + ids(chosen_length), "rejected_ids": prompt + ids(rejected_length), "margin": 0.5 * i})
    return pairs


def block_model(seed: int = 0) -> RewardModel:
    model = tiny_llama(VOCAB, seed=seed, pad_token_id=PAD)
    enable_block_attention(model)
    return RewardModel(model)


def one_by_one(reward_model, sequences) -> torch.Tensor:
    return torch.cat([reward_model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in sequences])


# ------------------------------------------------------------------------------------------------ layout


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
    [([[1, 2, 3], [1, 2, 4]], 2), ([[1, 2, 3], [1, 2, 3, 4]], 2), ([[1, 2], [1, 2]], 1), ([[7], [7, 8]], 0), ([[1, 2, 3], [4, 2, 3]], 0)],
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


# ------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("share_prompt", [False, True], ids=["packed", "shared_prompt"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_packed_rewards_and_loss_equal_padded_path(share_prompt, padding_side):
    reward_model, pairs = block_model(), random_pairs()
    padded = PairCollator(pad_token_id=PAD, padding_side=padding_side)(pairs)
    packed = PackedPairCollator(share_prompt=share_prompt)(pairs)
    with torch.no_grad():
        padded_rewards = reward_model(padded["input_ids"], padded["attention_mask"])
        packed_rewards = reward_model(packed["input_ids"], packed["attention_mask"], **packed_inputs(packed))
    torch.testing.assert_close(packed_rewards, padded_rewards, atol=1e-5, rtol=0)
    padded_loss = pairwise_loss(*padded_rewards.chunk(2), padded["margin"], 0.01)
    packed_loss = pairwise_loss(*packed_rewards.chunk(2), packed["margin"], 0.01)
    assert abs(packed_loss.item() - padded_loss.item()) <= 1e-5


def test_packed_rewards_under_cpu_bf16_autocast_stay_close_to_fp32():
    """bf16 autocast (the training default) runs the packed path; its rewards stay within bf16 rounding of fp32."""
    reward_model, pairs = block_model(), random_pairs()
    packed = PackedPairCollator(share_prompt=True)(pairs)
    with torch.no_grad():
        fp32 = reward_model(packed["input_ids"], packed["attention_mask"], **packed_inputs(packed))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = reward_model(packed["input_ids"], packed["attention_mask"], **packed_inputs(packed))
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0.05)


def test_shared_prompt_rewards_equal_one_by_one():
    reward_model, pairs = block_model(), random_pairs()
    packed = PackedPairCollator(share_prompt=True)(pairs)
    with torch.no_grad():
        packed_rewards = reward_model(packed["input_ids"], packed["attention_mask"], **packed_inputs(packed))
        alone = one_by_one(reward_model, [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs])
    torch.testing.assert_close(packed_rewards, alone, atol=1e-5, rtol=0)


def _gradients(reward_model, batch) -> dict[str, torch.Tensor]:
    reward_model.zero_grad()
    rewards = reward_model(batch["input_ids"], batch["attention_mask"], **packed_inputs(batch))
    pairwise_loss(*rewards.chunk(2), batch["margin"], 0.01).backward()
    return {name: param.grad.clone() for name, param in reward_model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("share_prompt", [False, True], ids=["packed", "shared_prompt"])
def test_packed_gradients_equal_padded_path(share_prompt):
    reward_model, pairs = block_model(), random_pairs(seed=3)
    padded = _gradients(reward_model, PairCollator(pad_token_id=PAD)(pairs))
    packed = _gradients(reward_model, PackedPairCollator(share_prompt=share_prompt)(pairs))
    assert padded.keys() == packed.keys() and len(padded) > 10
    for name, grad in padded.items():
        torch.testing.assert_close(packed[name], grad, atol=1e-5, rtol=0, msg=name)


def test_grpo_group_rewards_equal_one_by_one():
    """One prompt, many completions (a GRPO group): the prompt is computed once, every reward is unchanged."""
    reward_model = block_model(seed=2)
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(1, VOCAB, (20,), generator=gen).tolist()
    group = [prompt + torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (1, 4, 9, 2, 7, 3)]
    packed = pack_groups([group, group[:2]], share_prompt=True)
    assert packed["input_ids"].shape[1] == 20 + (1 + 4 + 9 + 2 + 7 + 3) + 20 + (1 + 4)
    with torch.no_grad():
        rewards = reward_model(packed["input_ids"], packed["attention_mask"], **packed_inputs(packed))
        alone = one_by_one(reward_model, group + group[:2])
    torch.testing.assert_close(rewards, alone, atol=1e-5, rtol=0)


def test_padded_path_is_unchanged_by_block_attention():
    pairs = random_pairs()
    batch = PairCollator(pad_token_id=PAD, padding_side="left")(pairs)
    with torch.no_grad():
        before = RewardModel(tiny_llama(VOCAB, pad_token_id=PAD))(batch["input_ids"], batch["attention_mask"])
        after = block_model()(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(before, after)


def test_packed_batch_without_block_attention_is_refused():
    batch = PackedPairCollator()(random_pairs())
    with pytest.raises(ValueError, match="enable_block_attention"):
        RewardModel(tiny_llama(VOCAB, pad_token_id=PAD))(batch["input_ids"], batch["attention_mask"], **packed_inputs(batch))


def test_packed_path_works_with_gradient_checkpointing():
    pairs = random_pairs(seed=4)
    batch = PackedPairCollator(share_prompt=True)(pairs)
    plain = _gradients(block_model().train(), batch)
    checkpointed_model = block_model().train()
    checkpointed_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = _gradients(checkpointed_model, batch)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=0, msg=name)


def test_packed_path_works_with_lora():
    from rmtorch.modeling import apply_lora

    pairs = random_pairs(seed=6)
    lora_model = apply_lora(tiny_llama(VOCAB, pad_token_id=PAD), r=4, alpha=8)
    torch.nn.init.normal_(next(p for n, p in lora_model.named_parameters() if "lora_B" in n), std=0.1)  # a non-zero adapter
    enable_block_attention(lora_model)
    reward_model = RewardModel(lora_model)
    padded, packed = PairCollator(pad_token_id=PAD)(pairs), PackedPairCollator(share_prompt=True)(pairs)
    with torch.no_grad():
        expected = reward_model(padded["input_ids"], padded["attention_mask"])
        rewards = reward_model(packed["input_ids"], packed["attention_mask"], **packed_inputs(packed))
    torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- length grouping


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


# -------------------------------------------------------------------------------------------- train.py


def _train(tmp_path, name: str, model_dir, train_file, *flags: str) -> list[dict]:
    import train

    out = tmp_path / name
    train.main([
        "--model", str(model_dir), "--train_file", str(train_file), "--eval_file", str(train_file), "--output_dir", str(out),
        "--bf16", "false", "--batch_size", "3", "--max_steps", "3", "--lr", "1e-3", "--shuffle", "false", "--warmup_steps", "0",
        "--warmup_ratio", "0", "--log_every", "1", "--max_length", "none", *flags,
    ])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval_' not in line]


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    """Text pairs of uneven lengths sharing a prompt, for the BOS tokenizer."""
    words = "what color is the sky blue green red yes no good bad a an of to and in it".split()
    gen = torch.Generator().manual_seed(0)
    pick = lambda n: " ".join(words[j] for j in torch.randint(len(words), (n,), generator=gen).tolist())  # noqa: E731
    rows = [{"prompt": pick(2 + 3 * (i % 4)), "chosen": " " + pick(1 + i % 5), "rejected": " " + pick(1 + (i * 7) % 6)} for i in range(9)]
    rows = [r for r in rows if r["chosen"] != r["rejected"]]
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), make_bos_tokenizer())


@pytest.mark.parametrize("flags", [("--packing", "true"), ("--shared_prompt", "true")], ids=["packing", "shared_prompt"])
def test_train_py_packed_losses_equal_padded(tmp_path, tiny_dir, pair_file, flags):
    padded = _train(tmp_path, "padded", tiny_dir, pair_file)
    packed = _train(tmp_path, "packed", tiny_dir, pair_file, *flags)
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], abs=1e-5)
    assert [r["grad_norm"] for r in packed] == pytest.approx([r["grad_norm"] for r in padded], rel=1e-5)  # norms ~10


def test_train_py_runs_with_grouping_packing_and_shared_prompt(tmp_path, tiny_dir, pair_file):
    records = _train(tmp_path, "fast", tiny_dir, pair_file, "--group_by_length", "true", "--shared_prompt", "true", "--shuffle", "true")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["step_time"] > 0 for r in records)
