"""Attention for packed rows (see rmtorch.batching): each block attends causally to itself and fully to its prefix.

The function is registered with transformers' AttentionInterface under BLOCK_ATTENTION. A model rmtorch trains
uses it for good (`use_block_attention`: padded batches still go to SDPA, and a checkpointed layer recomputes
its backward with the same attention); a caller's model gets it only for the duration of a packed forward
(`packed_attention`) and keeps its own attention for everything else. It runs block by block with SDPA: on CPU a
dense (L, L) mask over a packed row would cost more than the padding it removes, and CPU has no variable-length
flash kernel.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

BLOCK_ATTENTION = "rmtorch_blocks"  # name registered with transformers' AttentionInterface


def prefix_causal_mask(length: int, prefix_length: int, device) -> torch.Tensor:
    """(1, 1, length, prefix_length + length) bool: every query sees the whole prefix and itself causally."""
    causal = torch.ones((length, length), dtype=torch.bool, device=device).tril()
    prefix = torch.ones((length, prefix_length), dtype=torch.bool, device=device)
    return torch.cat([prefix, causal], dim=1)[None, None]


def block_attention(module, query, key, value, attention_mask, attention_blocks=None, **kwargs):
    """transformers attention function: SDPA, or block by block for a packed row (`attention_blocks` given).

    query (1, H, L, D), key/value (1, H_kv, L, D); returns (1, L, H, D) like every transformers attention function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"A packed batch is one row; got {query.shape[0]} rows with attention_blocks.")
    dtype = query.dtype
    if query.device.type == "cpu":  # PyTorch's CPU flash kernel is slower in bf16 than in fp32 on short blocks
        query, key, value = query.float(), key.float(), value.float()
    outputs = []
    with torch.autocast("cpu", enabled=False):  # else CPU autocast casts SDPA's inputs back to bf16
        for start, end, prefix_start, prefix_end in attention_blocks:
            block_query = query[:, :, start:end]
            block_key, block_value = key[:, :, start:end], value[:, :, start:end]
            mask = None  # causal within the block
            if prefix_start != prefix_end:
                block_key = torch.cat([key[:, :, prefix_start:prefix_end], block_key], dim=2)
                block_value = torch.cat([value[:, :, prefix_start:prefix_end], block_value], dim=2)
                mask = prefix_causal_mask(end - start, prefix_end - prefix_start, query.device)
            output, _ = sdpa_attention_forward(module, block_query, block_key, block_value, mask, **kwargs)
            outputs.append(output)
    return torch.cat(outputs, dim=1).to(dtype), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if BLOCK_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(BLOCK_ATTENTION, block_attention)
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
