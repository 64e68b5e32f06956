"""Attention for packed rows (see rmtorch.batching): each block attends causally to itself and fully to its prefix.

The function is registered with transformers' AttentionInterface under BLOCK_ATTENTION. A model rmtorch trains
uses it for good (`use_block_attention`: padded batches still go to SDPA, and a checkpointed layer recomputes
its backward with the same attention); a caller's model gets it only for the duration of a packed forward
(`packed_attention`) and keeps its own attention for everything else. It runs block by block with SDPA: on CPU a
dense (L, L) mask over a packed row would cost more than the padding it removes, and CPU has no variable-length
flash kernel. Whether it computes in bf16 or fp32 on a CPU is measured on the machine in hand (`attention_dtype`).

On CUDA a packed row runs FlexAttention instead (`flex_block_attention`): one fused kernel over the whole row, its
mask built from the same blocks, rather than a small SDPA call per block per layer. The row is padded to a shape
bucket (a power of two), so the kernel and the mask compile once per bucket.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
from contextlib import contextmanager

import torch

BLOCK_ATTENTION = "rmtorch_blocks"  # name registered with transformers' AttentionInterface


@functools.lru_cache(maxsize=64)
def prefix_causal_mask(length: int, prefix_length: int, device: torch.device) -> torch.Tensor:
    """(length, prefix_length + length) bool: every query sees the whole prefix and itself causally.

    Cached: every layer of a forward asks for the same masks."""
    causal = torch.ones((length, length), dtype=torch.bool, device=device).tril()
    prefix = torch.ones((length, prefix_length), dtype=torch.bool, device=device)
    return torch.cat([prefix, causal], dim=1)


def block_attention(module, query, key, value, attention_mask, attention_blocks=None, **kwargs):
    """transformers attention function: SDPA, or block by block for a packed row (`attention_blocks` given).

    query (1, H, L, D), key/value (1, H_kv, L, D); returns (1, L, H, D) like every transformers attention function.
    The row is split into its blocks (one autograd node, not a full-size zero gradient per slice), a response
    block's keys are its prompt block's keys then its own, and grouped-query heads are shared by SDPA itself.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"A packed batch is one row; got {query.shape[0]} rows with attention_blocks.")
    sizes = [end - start for start, end, _, _ in attention_blocks]
    block_of = {(start, end): i for i, (start, end, _, _) in enumerate(attention_blocks)}
    starts = [start for start, *_ in attention_blocks]
    if starts != list(itertools.accumulate(sizes, initial=0))[:-1] or sum(sizes) != query.shape[2]:
        raise ValueError("attention_blocks must cover the packed row in order, block after block (rmtorch.batching).")
    dtype, device = query.dtype, query.device
    # Under autocast the rotary embedding has upcast q and k to fp32: the choice is autocast's dtype or fp32.
    wanted = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype
    backward = torch.is_grad_enabled() and query.requires_grad  # training: the backward is timed too
    compute_dtype = attention_dtype(device, wanted, query.shape[1], query.shape[-1], backward)
    queries, keys, values = (t.to(compute_dtype).split(sizes, dim=2) for t in (query, key, value))
    dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
    outputs = []
    with torch.autocast(query.device.type, enabled=False):  # else autocast casts SDPA's inputs back to bf16
        for i, (start, end, prefix_start, prefix_end) in enumerate(attention_blocks):
            block_key, block_value, mask = keys[i], values[i], None  # no mask: causal within the block
            if prefix_start != prefix_end:
                prompt = block_of[(prefix_start, prefix_end)]  # the prefix is the group's prompt block
                block_key = torch.cat([keys[prompt], block_key], dim=2)
                block_value = torch.cat([values[prompt], block_value], dim=2)
                mask = prefix_causal_mask(end - start, prefix_end - prefix_start, query.device)
            outputs.append(
                torch.nn.functional.scaled_dot_product_attention(
                    queries[i],
                    block_key,
                    block_value,
                    attn_mask=mask,
                    dropout_p=dropout,
                    is_causal=mask is None,
                    scale=kwargs.get("scaling"),
                    enable_gqa=query.shape[1] != key.shape[1],
                )  # fmt: skip
            )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous().to(dtype), None


@functools.cache
def attention_dtype(
    device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, backward: bool = False
) -> torch.dtype:
    """The dtype packed attention computes in on this machine: on a GPU, `dtype`; on a CPU, a half-precision
    `dtype` only where its block loop measures clearly faster than fp32 (at least 15%: CPUs with AMX do, others
    may not), else fp32. `backward`: the loop is timed with its backward, as training runs it (on the AMD EPYC
    without AMX, forward and backward took 1.4x their fp32 time in bf16, the forward alone 1.0x). Measured once per
    process and shape, on the machine in hand; the margin keeps the choice the same from run to run on one machine,
    so a resumed bf16 run computes as the run it continues."""
    if device.type != "cpu" or dtype == torch.float32:
        return dtype
    half, full = (_timed_apart(dtype_, heads, head_dim, backward) for dtype_ in (dtype, torch.float32))
    return dtype if half < 0.85 * full else torch.float32


def _timed_apart(*args) -> float:
    """_time_block_loop in a thread of its own, with the caller's thread count: autocast and a checkpointed layer's
    saved-tensor hooks are per thread, and the first call comes from inside both (autocast would run the fp32 loop in
    bf16; the checkpoint would count the timing's tensors as its layer's)."""
    threads = torch.get_num_threads()

    def run() -> float:
        torch.set_num_threads(threads)  # a new thread starts with OpenMP's default
        return _time_block_loop(*args)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


def _time_block_loop(
    dtype: torch.dtype, heads: int, head_dim: int, backward: bool = False, blocks: int = 8, length: int = 128
) -> float:
    """Best of 5: SDPA over `blocks` causal blocks of `length` tokens in `dtype`, forward (and backward)."""
    import time

    generator = torch.Generator().manual_seed(0)
    query, key, value = (
        torch.randn(1, heads, blocks * length, head_dim, generator=generator).to(dtype).requires_grad_(backward)
        for _ in range(3)
    )
    best = float("inf")
    with torch.enable_grad() if backward else torch.no_grad():
        for _ in range(5):
            start = time.perf_counter()
            for q, k, v in zip(*(t.split(length, dim=2) for t in (query, key, value))):
                output = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                if backward:
                    output.sum().backward()
            best = min(best, time.perf_counter() - start)
    return best


def packed_row_attention(module, query, key, value, attention_mask, attention_blocks=None, **kwargs):
    """The function registered under BLOCK_ATTENTION: FlexAttention for a packed row on CUDA, `block_attention`
    (SDPA for padded batches, the block loop for packed rows) everywhere else."""
    if attention_blocks is not None and query.device.type == "cuda":
        return flex_block_attention(module, query, key, value, attention_blocks, **kwargs)
    return block_attention(module, query, key, value, attention_mask, attention_blocks, **kwargs)


def flex_block_attention(module, query, key, value, attention_blocks, compiled: bool = True, **kwargs):
    """FlexAttention over one packed row, masked by its blocks; the same outputs as `block_attention`.

    query (1, H, L, D), key/value (1, H_kv, L, D); returns (1, L, H, D). The row is zero-padded to
    `shape_bucket(L)`: the padding is a block of its own and is cut off again. `compiled=False` runs eager
    flex_attention, which materializes the scores (a reference for tests, not for speed).
    """
    from torch.nn.attention.flex_attention import flex_attention

    if query.shape[0] != 1:
        raise ValueError(f"A packed batch is one row; got {query.shape[0]} rows with attention_blocks.")
    if module.training and kwargs.get("dropout", 0.0):
        raise ValueError("FlexAttention has no attention dropout; rmtorch trains with dropout off (disable_dropout).")
    length = query.shape[2]
    bucket = shape_bucket(length)
    block_mask = packed_block_mask(attention_blocks, bucket, query.device, compiled)
    query, key, value = (torch.nn.functional.pad(t, (0, 0, 0, bucket - length)) for t in (query, key, value))
    attend = compiled_flex_attention() if compiled else flex_attention
    gqa = query.shape[1] != key.shape[1]  # grouped-query heads, shared by the kernel itself
    output = attend(query, key, value, block_mask=block_mask, scale=kwargs.get("scaling"), enable_gqa=gqa)
    return output[:, :, :length].transpose(1, 2).contiguous(), None


def shape_bucket(length: int) -> int:
    """The length a packed row runs at under FlexAttention: the next power of two from 128 (its tile size). A run
    compiles for a handful of lengths, and the padding costs little: it only attends within its own tiles."""
    return max(128, 1 << (length - 1).bit_length())


@functools.lru_cache(maxsize=16)
def packed_block_mask(attention_blocks: tuple, length: int, device: torch.device, compiled: bool = True):
    """FlexAttention's BlockMask of a packed row padded to `length`: a query sees the earlier tokens of its own block
    and its block's whole prefix span; the padding past the last block is one more block (no query sees nothing).
    Cached: every layer of a forward, and the recompute of a checkpointed layer, use the same mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    block = torch.full((length,), len(attention_blocks), dtype=torch.int32)  # (L,): the block of each position
    prefix = torch.zeros((2, length), dtype=torch.int32)  # (2, L): the prefix span [start, end) of each position
    for i, (start, end, prefix_start, prefix_end) in enumerate(attention_blocks):
        block[start:end] = i
        prefix[0, start:end], prefix[1, start:end] = prefix_start, prefix_end
    block, prefix = block.to(device), prefix.to(device)

    def mask_mod(batch, head, q, kv):
        return ((block[q] == block[kv]) & (kv <= q)) | ((prefix[0, q] <= kv) & (kv < prefix[1, q]))

    return create_block_mask(mask_mod, None, None, length, length, device=device, _compile=compiled)


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process; each shape bucket gets its own graph."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if BLOCK_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(BLOCK_ATTENTION, packed_row_attention)
        AttentionMaskInterface.register(BLOCK_ATTENTION, sdpa_mask)


def _config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config  # shared by all its layers: one name switches every layer


def use_block_attention(model) -> None:
    """Switch a model rmtorch owns (PEFT-wrapped or not) to block attention for good: packed rows run block by
    block, padded batches plain SDPA with SDPA's masks (their results do not change)."""
    _register()
    _config(model)._attn_implementation = BLOCK_ATTENTION


@contextmanager
def packed_attention(model):
    """Run the enclosed forward of `model` with block attention, then restore its own (also when it raises).

    For forwards without backward: a checkpointed layer would recompute outside this context. A model switched
    by `use_block_attention` is left as it is.
    """
    _register()
    config = _config(model)
    previous = config._attn_implementation
    config._attn_implementation = BLOCK_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
