"""rmtorch.attention: the FlexAttention path for packed rows (CUDA) gives the block loop's outputs. On CPU its mask
is checked with eager flex_attention (forward only); on CUDA the compiled kernel, its gradients, and a whole model's
packed rewards against padded batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rmtorch.attention import block_attention, flex_block_attention, packed_row_attention, shape_bucket
from rmtorch.batching import pack_groups

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16

LAYOUTS = {
    # GRPO-shaped: a prompt shared by three responses, then a second group of two.
    "shared prompts": [[[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7], [1, 2, 3, 4, 8, 9, 10]], [[3, 3, 5], [3, 3, 6, 6]]],
    # Plain sequences only: block-diagonal causal attention.
    "no prompt": [[[1, 2, 3, 4, 5, 6, 7]], [[8, 9]], [[5]], [[4, 4, 4, 4]]],
    # A row long enough to span several 128-token tiles and be padded to 256.
    "long": [[[1] * 60 + [2] * 30, [1] * 60 + [3] * 45], [[4] * 50]],
}


def layout(groups) -> tuple:
    return pack_groups(groups, share_prompt=True)["attention_blocks"]


def dense_mask(blocks: tuple, length: int) -> torch.Tensor:
    """(L, L) bool straight from the layout's definition: a block attends causally to itself and fully to its
    prefix span."""
    mask = torch.zeros((length, length), dtype=torch.bool)
    for start, end, prefix_start, prefix_end in blocks:
        mask[start:end, start:end] = torch.ones((end - start, end - start), dtype=torch.bool).tril()
        mask[start:end, prefix_start:prefix_end] = True
    return mask


def qkv(length: int, device="cpu", requires_grad: bool = False, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(1, HEADS, length, HEAD_DIM), (1, KV_HEADS, length, HEAD_DIM), (1, KV_HEADS, length, HEAD_DIM)]
    return tuple(torch.randn(s, generator=generator).to(device).requires_grad_(requires_grad) for s in shapes)


def test_shape_buckets_are_powers_of_two_from_the_tile_size():
    assert [shape_bucket(n) for n in (1, 127, 128, 129, 1000, 1024, 1025)] == [128, 128, 128, 256, 1024, 1024, 2048]


def attention_outputs(path: str, blocks: tuple, query, key, value, compiled: bool = False) -> torch.Tensor:
    """(1, L, H, D) through FlexAttention, the block loop, or one dense SDPA call with the layout's definition."""
    module = nn.Module().eval()
    if path == "flex":
        return flex_block_attention(module, query, key, value, blocks, compiled=compiled, scaling=0.3)[0]
    if path == "blocks":
        return block_attention(module, query, key, value, None, attention_blocks=blocks, scaling=0.3)[0]
    mask = dense_mask(blocks, query.shape[2]).to(query.device)
    return nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=0.3, enable_gqa=True
    ).transpose(1, 2)


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_flex_attention_mask_gives_the_block_loops_outputs(name):
    """Eager flex_attention on CPU (forward only: it has no CPU backward) computes the mask exactly."""
    blocks = layout(LAYOUTS[name])
    query, key, value = qkv(blocks[-1][1])
    flex = attention_outputs("flex", blocks, query, key, value)
    assert flex.shape == (1, blocks[-1][1], HEADS, HEAD_DIM)
    for path in ("blocks", "dense"):
        torch.testing.assert_close(flex, attention_outputs(path, blocks, query, key, value), rtol=0, atol=1e-5)


def test_on_cpu_a_packed_row_runs_the_block_loop():
    blocks = layout(LAYOUTS["shared prompts"])
    query, key, value = qkv(blocks[-1][1])
    module = nn.Module().eval()
    routed, _ = packed_row_attention(module, query, key, value, None, attention_blocks=blocks, scaling=0.25)
    loop, _ = block_attention(module, query, key, value, None, attention_blocks=blocks, scaling=0.25)
    assert torch.equal(routed, loop)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled FlexAttention kernel needs CUDA")
@pytest.mark.parametrize("name", LAYOUTS)
def test_on_cuda_the_compiled_kernel_gives_the_block_loops_outputs_and_gradients(name):
    blocks = layout(LAYOUTS[name])
    results = {}
    for path in ("flex", "blocks"):
        query, key, value = qkv(blocks[-1][1], device="cuda", requires_grad=True)
        output = attention_outputs(path, blocks, query, key, value, compiled=True)
        output.pow(2).sum().backward()
        results[path] = [output, query.grad, key.grad, value.grad]
    for flex, loop in zip(results["flex"], results["blocks"]):
        torch.testing.assert_close(flex, loop, rtol=0, atol=1e-4)  # TF32-free fp32 kernels, different sum orders


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled FlexAttention kernel needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_packed_rewards_and_gradients_equal_the_padded_path(dtype):
    """A whole model on CUDA: packed rows (compiled FlexAttention) against padded batches (SDPA)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rmtorch.attention import use_block_attention
    from rmtorch.model import RewardModel

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config).cuda()  # head_dim 16: the smallest FlexAttention compiles for
    use_block_attention(model)
    reward_model = RewardModel(model).train()
    groups = [[[5, 6, 7, 8, 9, 10], [5, 6, 7, 11]], [[12, 13, 14]], [[5, 6, 20, 21, 22], [5, 6, 23]]]
    packed = pack_groups(groups, share_prompt=True)
    sequences = [seq for group in groups for seq in group]
    padded_ids = torch.zeros((len(sequences), max(map(len, sequences))), dtype=torch.long)
    padded_mask = torch.zeros_like(padded_ids)
    for row, seq in enumerate(sequences):
        padded_ids[row, : len(seq)], padded_mask[row, : len(seq)] = torch.tensor(seq), 1
    results = []
    for inputs in (
        {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed.items()},
        {"input_ids": padded_ids.cuda(), "attention_mask": padded_mask.cuda()},
    ):
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            rewards = reward_model(**inputs)
        rewards.sum().backward()
        results.append((rewards.detach(), model.score.weight.grad.clone()))
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=tolerance)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("half_time, chosen", [(0.5, torch.bfloat16), (0.9, torch.float32), (1.2, torch.float32)])
def test_cpu_attention_precision_follows_the_measurement(monkeypatch, half_time, chosen):
    """Half precision only where this machine's block loop is clearly (>= 15%) faster in it; a GPU keeps its dtype."""
    from rmtorch import attention

    monkeypatch.setattr(
        attention, "_time_block_loop", lambda dtype, *shape: half_time if dtype == torch.bfloat16 else 1.0
    )
    attention.attention_dtype.cache_clear()
    try:
        assert attention.attention_dtype(torch.device("cpu"), torch.bfloat16, 4, 8) == chosen
        assert attention.attention_dtype(torch.device("cpu"), torch.float32, 4, 8) == torch.float32
        assert attention.attention_dtype(torch.device("cuda"), torch.bfloat16, 4, 8) == torch.bfloat16
    finally:
        attention.attention_dtype.cache_clear()


def test_training_chooses_the_attention_precision_by_forward_and_backward(monkeypatch):
    """A forward that records a graph asks for the timing with backward (bf16 can be as fast forward only, as on the
    AMD EPYC, and slower with its backward); evaluation asks for the forward alone."""
    from rmtorch import attention

    asked = []
    monkeypatch.setattr(
        attention, "_time_block_loop", lambda dtype, heads, dim, backward: asked.append(backward) or 1.0
    )
    attention.attention_dtype.cache_clear()
    query, key, value = (torch.randn(1, 2, 8, 4) for _ in range(3))
    blocks = ((0, 4, 0, 0), (4, 8, 0, 4))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                attention.block_attention(torch.nn.Module(), query, key, value, None, blocks)
            assert asked == [False, False]
            attention.block_attention(torch.nn.Module(), query.requires_grad_(), key, value, None, blocks)
            assert asked == [False, False, True, True]
    finally:
        attention.attention_dtype.cache_clear()


def test_the_precision_timing_runs_apart_from_the_callers_autocast(monkeypatch):
    """Under the caller's autocast the "fp32" loop would run in bf16 (SDPA autocasts on CPU) and both timings would
    be bf16's; the timing runs in a thread of its own, with the caller's thread count."""
    from rmtorch import attention

    seen = []
    monkeypatch.setattr(
        attention,
        "_time_block_loop",
        lambda *args: seen.append((torch.is_autocast_enabled("cpu"), torch.get_num_threads())) or 1.0,
    )
    threads = torch.get_num_threads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention._timed_apart(torch.float32, 2, 8, True)
    assert seen == [(False, threads)]


def test_the_precision_timing_runs_the_backward_it_claims(monkeypatch):
    from rmtorch import attention

    calls = []
    original = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    assert attention._time_block_loop(torch.float32, 2, 8, False, blocks=2, length=8) > 0 and not calls
    assert attention._time_block_loop(torch.float32, 2, 8, True, blocks=2, length=8) > 0 and len(calls) == 10
