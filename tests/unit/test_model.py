"""rmtorch.model: pooling, packed forwards equal to padded and one-by-one ones, and `compute_rewards`, the one path
from token ids to rewards. Oracles: the padded forward and one-sequence-at-a-time forwards of a tiny fp32 model."""

from __future__ import annotations

import pytest
import torch

from rmtorch.attention import use_block_attention
from rmtorch.batching import PackedPairCollator, PairCollator, model_inputs, pack_groups
from rmtorch.loss import pairwise_loss
from rmtorch.model import RewardModel, compute_rewards, last_token_index
from tests.conftest import tiny_llama

VOCAB, PAD = 100, 0


@pytest.mark.parametrize(
    "mask,expected", [([1, 1, 1, 0, 0], 2), ([0, 0, 1, 1, 1], 4), ([1, 1, 1, 1, 1], 4), ([0, 1, 0, 0, 0], 1)]
)
def test_last_token_index_follows_the_attention_mask(mask, expected):
    assert last_token_index(torch.tensor([mask])).item() == expected


def random_pairs(seed: int = 1, shapes=((5, 3, 6), (9, 7, 1), (1, 2, 4), (12, 1, 1))) -> list[dict]:
    """Pairs (prompt, chosen response, rejected response) of the given lengths, with margins."""
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, VOCAB, (n,), generator=gen).tolist()  # noqa: E731
    pairs = []
    for i, (prompt_length, chosen_length, rejected_length) in enumerate(shapes):
        prompt = ids(prompt_length)
        pairs.append(
            {
                "chosen_ids": prompt + ids(chosen_length),
                "rejected_ids": prompt + ids(rejected_length),
                "margin": 0.5 * i,
            }
        )
    return pairs


def block_model(seed: int = 0) -> RewardModel:
    return RewardModel(tiny_llama(VOCAB, seed=seed, pad_token_id=PAD))


def one_by_one(reward_model, sequences) -> torch.Tensor:
    return torch.cat([reward_model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in sequences])


@pytest.mark.parametrize("share_prompt", [False, True], ids=["packed", "shared_prompt"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_packed_rewards_and_loss_equal_padded_path(share_prompt, padding_side):
    reward_model, pairs = block_model(), random_pairs()
    padded = PairCollator(pad_token_id=PAD, padding_side=padding_side)(pairs)
    packed = PackedPairCollator(share_prompt=share_prompt)(pairs)
    with torch.no_grad():
        padded_rewards = reward_model(padded["input_ids"], padded["attention_mask"])
        packed_rewards = reward_model(**model_inputs(packed))
    torch.testing.assert_close(packed_rewards, padded_rewards, atol=1e-5, rtol=0)
    padded_loss = pairwise_loss(*padded_rewards.chunk(2), padded["margin"], 0.01)
    packed_loss = pairwise_loss(*packed_rewards.chunk(2), packed["margin"], 0.01)
    assert abs(packed_loss.item() - padded_loss.item()) <= 1e-5


def test_packed_rewards_under_cpu_bf16_autocast_stay_close_to_fp32():
    """bf16 autocast (the training default) runs the packed path; its rewards stay within bf16 rounding of fp32."""
    reward_model, pairs = block_model(), random_pairs()
    packed = PackedPairCollator(share_prompt=True)(pairs)
    with torch.no_grad():
        fp32 = reward_model(**model_inputs(packed))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = reward_model(**model_inputs(packed))
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0.05)


def test_the_score_head_runs_outside_autocast_so_close_rewards_do_not_tie():
    """Under bf16 autocast the body computes in bf16 but the head reads its fp32 hidden states in fp32: rewards are
    not rounded to bf16's 8 bits (a step of 0.03 near 5), where close rewards used to come out equal."""
    reward_model, pairs = block_model(), random_pairs()
    inputs = model_inputs(PackedPairCollator(share_prompt=True)(pairs))
    head = reward_model.model.score
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rewards = reward_model(**inputs)
    assert seen == [(torch.float32, torch.float32)]
    assert (rewards != rewards.bfloat16().float()).any()  # finer than bf16: not bf16 values cast up


def test_shared_prompt_rewards_equal_one_by_one():
    reward_model, pairs = block_model(), random_pairs()
    packed = PackedPairCollator(share_prompt=True)(pairs)
    with torch.no_grad():
        packed_rewards = reward_model(**model_inputs(packed))
        alone = one_by_one(reward_model, [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs])
    torch.testing.assert_close(packed_rewards, alone, atol=1e-5, rtol=0)


def _gradients(reward_model, batch) -> dict[str, torch.Tensor]:
    reward_model.zero_grad()
    rewards = reward_model(**model_inputs(batch))
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
        rewards = reward_model(**model_inputs(packed))
        alone = one_by_one(reward_model, group + group[:2])
    torch.testing.assert_close(rewards, alone, atol=1e-5, rtol=0)


def test_packed_path_works_with_gradient_checkpointing():
    pairs = random_pairs(seed=4)
    batch = PackedPairCollator(share_prompt=True)(pairs)
    plain = _gradients(block_model().train(), batch)
    checkpointed_model = block_model().train()
    use_block_attention(checkpointed_model.model)  # what train.py does with --packing
    checkpointed_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed_model.model.is_gradient_checkpointing
    checkpointed = _gradients(checkpointed_model, batch)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=0, msg=name)


def test_packed_path_works_with_lora():
    from rmtorch.lora import apply_lora

    pairs = random_pairs(seed=6)
    lora_model = apply_lora(tiny_llama(VOCAB, pad_token_id=PAD), r=4, alpha=8)
    torch.nn.init.normal_(
        next(p for n, p in lora_model.named_parameters() if "lora_B" in n), std=0.1
    )  # a non-zero adapter
    reward_model = RewardModel(lora_model)
    padded, packed = PairCollator(pad_token_id=PAD)(pairs), PackedPairCollator(share_prompt=True)(pairs)
    with torch.no_grad():
        expected = reward_model(padded["input_ids"], padded["attention_mask"])
        rewards = reward_model(**model_inputs(packed))
    torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=0)


def test_a_packed_forward_leaves_the_model_attention_as_it_was():
    model = tiny_llama(VOCAB, pad_token_id=PAD, attn_implementation="eager")
    packed = PackedPairCollator()(random_pairs())
    with torch.no_grad():
        RewardModel(model)(**model_inputs(packed))
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("budget", [1, 24, 10_000])
def test_compute_rewards_equals_one_by_one_at_any_budget(packing, budget):
    reward_model = block_model(seed=3)
    pairs = random_pairs(seed=7)
    sequences = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    prompt_lengths = [0] * len(sequences) if not packing else [len(p["chosen_ids"]) - 3 for p in pairs] * 2
    prompt_lengths = [max(0, min(n, len(s) - 1)) for n, s in zip(prompt_lengths, sequences)]
    prompt_lengths = [
        n if s[:n] == sequences[(i + len(pairs)) % len(sequences)][:n] else 0
        for i, (n, s) in enumerate(zip(prompt_lengths, sequences))
    ]
    rewards = compute_rewards(
        reward_model, sequences, prompt_lengths, pad_token_id=PAD, packing=packing, max_tokens_per_batch=budget
    )
    with torch.no_grad():
        expected = one_by_one(reward_model, sequences)
    torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=0)
    assert reward_model.training  # its mode is given back


def test_compute_rewards_refuses_an_empty_sequence():
    with pytest.raises(ValueError, match="empty token sequence"):
        compute_rewards(block_model(), [[1, 2], []])


@pytest.mark.slow
def test_compiled_norms_and_mlps_give_the_eager_rewards_and_gradients():
    """--compile fuses the elementwise work of norms and MLPs; packed rows of changing length (dynamic shapes)
    still give the eager model's rewards and gradients."""
    from rmtorch.model import compile_elementwise

    eager, compiled = block_model(seed=5), block_model(seed=5)
    assert compile_elementwise(compiled.model) == 2 * 3 + 1  # per layer two norms and an MLP; the final norm
    for seed in (3, 4):  # two packed lengths: no recompilation needed, same numbers
        batch = PackedPairCollator()(random_pairs(seed=seed))
        expected, got = _gradients(eager, batch), _gradients(compiled, batch)
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-4, msg=name)
