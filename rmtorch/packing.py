"""Padding-free packing and shared-prompt attention.

A packed batch is **one row** holding many sequences back to back, with position ids that restart at 0 for
each sequence, so no compute is spent on padding. Its attention layout is a tuple of *blocks*
`(start, end, prefix_start, prefix_end)`: the tokens `start..end-1` attend causally to themselves and fully to
the prefix span `prefix_start..prefix_end-1` earlier in the row (an empty prefix for a plain sequence).

With a shared prompt, sequences that begin with the same tokens (a chosen/rejected pair, or a GRPO group of
completions of one prompt) become `[prompt, response_1, response_2, ...]`: the prompt is one block, each
response is a block whose prefix is the prompt and whose positions continue from the prompt's end. The prompt
is computed once instead of once per response. Either way every reward equals the one-sequence-at-a-time
reward (tests/test_packing.py checks rewards and gradients to 1e-5 in fp32).

Attention runs block by block with SDPA: on CPU a dense (L, L) mask over a packed row would cost more than the
padding it removes, and CPU has no variable-length flash kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rmtorch.data import common_prefix_length

BLOCK_ATTENTION = "rmtorch_blocks"  # name registered with transformers' AttentionInterface
PACKED_KEYS = ("position_ids", "last_index", "attention_blocks")  # model inputs a packed batch adds


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of all sequences, leaving each at least its last token of its own."""
    limit = min(len(s) for s in sequences) - 1
    return min([limit] + [common_prefix_length(sequences[0], s) for s in sequences[1:]])


def pack_groups(groups: Sequence[Sequence[Sequence[int]]], share_prompt: bool = False) -> dict:
    """Pack groups of token sequences into one row (batch size 1) with restarting position ids.

    With share_prompt, the common prefix of each group of two or more sequences is laid out once and every
    sequence's remainder attends to it. Returns `input_ids` (1, L), `attention_mask` (1, L) of ones,
    `position_ids` (1, L), `last_index` (N,) — the row position of each sequence's last token, in group order —
    and `attention_blocks` (the layout read by the block attention).
    """
    input_ids: list[int] = []
    position_ids: list[int] = []
    last_index: list[int] = []
    blocks: list[tuple[int, int, int, int]] = []
    for group in groups:
        if any(len(seq) == 0 for seq in group):
            raise ValueError("pack_groups got an empty sequence; every sequence needs at least one token.")
        prompt_length = shared_prefix_length(group) if share_prompt and len(group) > 1 else 0
        prompt_start = len(input_ids)
        if prompt_length:
            input_ids += group[0][:prompt_length]
            position_ids += range(prompt_length)
            blocks.append((prompt_start, prompt_start + prompt_length, prompt_start, prompt_start))
        for seq in group:
            start = len(input_ids)
            input_ids += seq[prompt_length:]
            position_ids += range(prompt_length, len(seq))
            prefix = (prompt_start, prompt_start + prompt_length) if prompt_length else (start, start)
            blocks.append((start, len(input_ids), *prefix))
            last_index.append(len(input_ids) - 1)
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "attention_mask": torch.ones((1, len(input_ids)), dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        "last_index": torch.tensor(last_index, dtype=torch.long),
        "attention_blocks": tuple(blocks),
    }


@dataclass
class PackedPairCollator:
    """Batch of B pairs → one packed row; rewards come out as (2B,), chosen 0..B-1 then rejected (as PairCollator).

    share_prompt lays each pair out as [prompt, chosen response, rejected response] so the prompt is computed once.
    The batch's attention_mask counts the tokens through the model, so a shared prompt counts once.
    """

    share_prompt: bool = False

    def __call__(self, examples: list[dict]) -> dict:
        batch = pack_groups([[e["chosen_ids"], e["rejected_ids"]] for e in examples], share_prompt=self.share_prompt)
        batch["last_index"] = batch["last_index"].view(-1, 2).t().reshape(-1)  # pair-major → chosen..., rejected...
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float)
        return batch


def packed_inputs(batch: dict) -> dict:
    """The packed-row model inputs of a batch (none for a padded batch), for RewardModel's keyword arguments."""
    return {key: batch[key] for key in PACKED_KEYS if key in batch}


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
            if prefix_start == prefix_end:
                output, _ = sdpa_attention_forward(module, block_query, block_key, block_value, None, **kwargs)  # causal
            else:
                block_key = torch.cat([key[:, :, prefix_start:prefix_end], block_key], dim=2)
                block_value = torch.cat([value[:, :, prefix_start:prefix_end], block_value], dim=2)
                mask = prefix_causal_mask(end - start, prefix_end - prefix_start, query.device)
                output, _ = sdpa_attention_forward(module, block_query, block_key, block_value, mask, **kwargs)
            outputs.append(output)
    return torch.cat(outputs, dim=1).to(dtype), None


def enable_block_attention(model) -> None:
    """Switch a loaded transformers model (PEFT-wrapped or not) to rmtorch's block attention.

    Ordinary padded batches still run plain SDPA with SDPA's masks, so their results do not change; packed rows
    (from pack_groups / PackedPairCollator) run block by block. Needed before RewardModel gets a packed batch.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(BLOCK_ATTENTION, block_attention)
    AttentionMaskInterface.register(BLOCK_ATTENTION, sdpa_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(BLOCK_ATTENTION)


def uses_block_attention(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config._attn_implementation == BLOCK_ATTENTION
