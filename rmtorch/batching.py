"""Batches: padded and packed collators, the packed-row layout, data order, and token-budget micro-batching.

A **padded** batch of B pairs is one (2B, T) tensor, rows 0..B-1 chosen and B..2B-1 rejected, exactly as TRL's
collator builds it. A **packed** batch is one row holding many sequences back to back, with position ids that
restart for each sequence, so no compute is spent on padding. Its attention layout is a tuple of *blocks*
`(start, end, prefix_start, prefix_end)`: tokens `start..end-1` attend causally to themselves and fully to the
prefix span `prefix_start..prefix_end-1` earlier in the row (empty for a plain sequence). Sequences that share
a prompt (a chosen/rejected pair, a GRPO group) are laid out as `[prompt, response 1, response 2, ...]`: the
prompt is one block, each response a block whose prefix is the prompt and whose positions continue from it,
so the prompt is computed once. `rmtorch.attention` runs the blocks.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

PACKED_KEYS = ("position_ids", "last_index", "attention_blocks")  # model inputs a packed batch adds


# ------------------------------------------------------------------------------------------------ padded


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
):
    """(N, T) int64 ids and attention mask padded to the longest sequence (rounded up to a multiple if asked)."""
    length = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if padding_side == "right" else slice(length - len(seq), length)
        input_ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def _margins(examples: list[dict]) -> dict:
    """The pairs' labels beside chosen/rejected: `margin` (B,) and `tie` (B,) when the set has them."""
    labels = {}
    if "margin" in examples[0]:
        labels["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float)
    if "tie" in examples[0]:
        labels["tie"] = torch.tensor([e["tie"] is True for e in examples], dtype=torch.bool)  # null: untied
    return labels


def _response_lengths(examples: list[dict], wanted: bool) -> dict:
    """(2B,) tokens of each response after its pair's prompt, chosen then rejected: what --length_penalty takes."""
    if not wanted:
        return {}
    prompts = [pair_prompt_length(e) for e in examples]
    lengths = [len(e[side]) - p for side in ("chosen_ids", "rejected_ids") for e, p in zip(examples, prompts)]
    return {"response_lengths": torch.tensor(lengths, dtype=torch.float)}


@dataclass
class PairCollator:
    """Batch of B pairs → one (2B, T) forward: rows 0..B-1 chosen, rows B..2B-1 rejected (TRL's collator).
    With response_lengths, the batch also holds each response's tokens after the prompt, (2B,)."""

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    response_lengths: bool = False

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        input_ids, attention_mask = pad_sequences(
            sequences, self.pad_token_id, self.padding_side, self.pad_to_multiple_of
        )
        return {
            "input_ids": input_ids, "attention_mask": attention_mask, **_margins(examples),
            **_response_lengths(examples, self.response_lengths),
        }  # fmt: skip


# ------------------------------------------------------------------------------------------------ packed


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of all sequences, leaving each at least its last token of its own."""
    length = min(len(s) for s in sequences) - 1
    first = sequences[0]
    for seq in sequences[1:]:
        length = min(length, next((i for i, (a, b) in enumerate(zip(first, seq)) if a != b), length))
    return max(length, 0)


def pack_groups(
    groups: Sequence[Sequence[Sequence[int]]], share_prompt: bool = False, prompt_lengths: Sequence[int] | None = None
) -> dict:
    """Pack groups of token sequences into one row (batch size 1) with restarting position ids.

    A group of two or more sequences shares its first `prompt_lengths[g]` tokens (which must be equal in all of
    them, with at least one token of each left over); without `prompt_lengths`, `share_prompt` shares the longest
    common prefix. Returns `input_ids` (1, L), `attention_mask` (1, L) of ones, `position_ids` (1, L),
    `last_index` (N,) — the row position of each sequence's last token, in group order — and `attention_blocks`.
    """
    input_ids: list[int] = []
    position_ids: list[int] = []
    last_index: list[int] = []
    blocks: list[tuple[int, int, int, int]] = []
    for g, group in enumerate(groups):
        if any(len(seq) == 0 for seq in group):
            raise ValueError("pack_groups got an empty sequence; every sequence needs at least one token.")
        if len(group) < 2:
            prompt_length = 0
        elif prompt_lengths is not None:
            prompt_length = prompt_lengths[g]
        else:
            prompt_length = shared_prefix_length(group) if share_prompt else 0
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


def pair_prompt_length(example: dict) -> int:
    """The prompt a pair shares: the stored `prompt_length` (from tokenize_pairs), else its common prefix."""
    if "prompt_length" in example:
        return example["prompt_length"]
    return shared_prefix_length([example["chosen_ids"], example["rejected_ids"]])


@dataclass
class PackedPairCollator:
    """Batch of B pairs → one packed row; rewards come out as (2B,), chosen 0..B-1 then rejected (as PairCollator).

    share_prompt lays each pair out as [prompt, chosen response, rejected response], the prompt computed once.
    The batch's attention_mask counts the tokens through the model, so a shared prompt counts once. With
    response_lengths, the batch also holds each response's tokens after the prompt, (2B,).
    """

    share_prompt: bool = True
    response_lengths: bool = False

    def __call__(self, examples: list[dict]) -> dict:
        groups = [[e["chosen_ids"], e["rejected_ids"]] for e in examples]
        prompt_lengths = [pair_prompt_length(e) if self.share_prompt else 0 for e in examples]
        batch = pack_groups(groups, prompt_lengths=prompt_lengths)
        batch["last_index"] = batch["last_index"].view(-1, 2).t().reshape(-1)  # pair-major → chosen..., rejected...
        return {**batch, **_margins(examples), **_response_lengths(examples, self.response_lengths)}


def model_inputs(batch: dict) -> dict:
    """The keyword arguments RewardModel takes from a padded or packed batch."""
    return {key: batch[key] for key in ("input_ids", "attention_mask", *PACKED_KEYS) if key in batch}


# ---------------------------------------------------------------------------------------- micro-batches


def micro_batches(sizes: Sequence[int], max_tokens_per_batch: int, padded: bool = True) -> list[list[int]]:
    """Group item indices, largest first, into batches that fit the token budget.

    padded: a batch costs items × its largest size (rows of one padded tensor); otherwise the sum of the sizes
    (pieces of one packed row). An item larger than the budget gets a batch of its own.
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    batches: list[list[int]] = []
    cost = 0
    for index in order:
        added = (len(batches[-1]) + 1) * sizes[batches[-1][0]] if padded and batches else cost + sizes[index]
        if batches and added <= max_tokens_per_batch:
            batches[-1].append(index)
            cost = added
        else:
            batches.append([index])
            cost = sizes[index]
    return batches


@dataclass
class PackedGroup:
    """Rows (indices into the scored sequences) packed as one group, their first `shared` tokens laid out once."""

    rows: list[int]
    shared: int


def _prompt_groups(sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int]) -> list[tuple[list[int], int]]:
    """(rows, shared) per set of rows whose prompts (first prompt_lengths[i] tokens) are identical, `shared` being
    the prefix they can share."""
    groups: dict[Hashable, list[int]] = {}
    for index, (ids, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        groups.setdefault(tuple(ids[:prompt_length]) if prompt_length else ("row", index), []).append(index)
    out = []
    for key, rows in groups.items():
        shared = 0 if key[0] == "row" or len(rows) < 2 else min([len(key)] + [len(sequences[i]) - 1 for i in rows])
        out.append((rows, shared))
    return out


def plan_packed(
    sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], max_tokens_per_batch: int
) -> list[list[PackedGroup]]:
    """Packed rows for scoring: rows whose prompts are identical form a group (the prompt laid out once), groups
    are split to fit the budget and packed, largest first, into rows of at most `max_tokens_per_batch` tokens.
    Deterministic: every process of a distributed run computes the same plan."""
    chunks: list[PackedGroup] = []
    chunk_tokens: list[int] = []
    for rows, shared in _prompt_groups(sequences, prompt_lengths):
        own = [len(sequences[i]) - shared for i in rows]
        for part in micro_batches(own, max_tokens_per_batch - shared, padded=False):
            chunks.append(PackedGroup([rows[j] for j in part], shared if len(part) > 1 else 0))
            chunk_tokens.append(sum(len(sequences[i]) for i in chunks[-1].rows) - chunks[-1].shared * (len(part) - 1))
    return [[chunks[c] for c in batch] for batch in micro_batches(chunk_tokens, max_tokens_per_batch, padded=False)]


def plan_padded(
    sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], max_tokens_per_batch: int
) -> list[list[PackedGroup]]:
    """Padded micro-batches for scoring, longest first, of at most `max_tokens_per_batch` padded tokens (rows x
    longest row). Rows that share a prompt (a pair, a GRPO group) stay in one micro-batch when they fit, so they
    see the same padded length. Each batch is one PackedGroup (shared 0), the shape `plan_packed` returns."""
    groups = [rows for rows, _ in _prompt_groups(sequences, prompt_lengths)]
    # Groups larger than the budget are split into padded micro-batches of their own rows.
    pieces = []
    for rows in groups:
        longest = max(len(sequences[i]) for i in rows)
        if len(rows) * longest <= max_tokens_per_batch:
            pieces.append(rows)
        else:
            pieces += [
                [rows[j] for j in part]
                for part in micro_batches([len(sequences[i]) for i in rows], max_tokens_per_batch)
            ]
    pieces.sort(key=lambda rows: -max(len(sequences[i]) for i in rows))
    batches: list[list[int]] = []
    for rows in pieces:  # longest first: a batch's first piece holds its longest row
        if batches and (len(batches[-1]) + len(rows)) * len(sequences[batches[-1][0]]) <= max_tokens_per_batch:
            batches[-1] += rows
        else:
            batches.append(sorted(rows, key=lambda i: -len(sequences[i])))
    return [[PackedGroup(rows, 0)] for rows in batches]


# ------------------------------------------------------------------------------------------- data order


class EpochSampler(Sampler[int]):
    """Shuffled (or file-order) indices whose order depends only on (seed, epoch); call set_epoch(e) each epoch."""

    def __init__(self, num_rows: int, seed: int = 0, shuffle: bool = True):
        self.num_rows, self.seed, self.shuffle, self.epoch = num_rows, seed, shuffle, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_rows))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=generator).tolist())

    def __len__(self):
        return self.num_rows


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of rows of similar length (less padding), in shuffled order, for DataLoader(batch_sampler=...).

    Takes the epoch's order from `sampler` (an EpochSampler), sorts each window of `batch_size * window_batches`
    rows longest first, cuts it into batches and shuffles the batches (with shuffle on), so batch composition
    still changes from epoch to epoch. A short batch stays last: with several processes, Accelerate's
    BatchSamplerShard drops a whole round whose last batch is short unless it is the final one.
    Accelerate's set_epoch reaches the inner sampler through `.sampler`.
    """

    def __init__(self, sampler: EpochSampler, lengths: Sequence[int], batch_size: int, window_batches: int = 50):
        if len(lengths) != len(sampler):
            raise ValueError(f"LengthGroupedBatchSampler got {len(lengths)} lengths for {len(sampler)} rows.")
        self.sampler, self.lengths, self.batch_size = sampler, list(lengths), batch_size
        self.window = batch_size * window_batches

    def set_epoch(self, epoch: int):
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        order = list(self.sampler)
        batches = []
        for window_start in range(0, len(order), self.window):
            window = sorted(order[window_start : window_start + self.window], key=lambda row: -self.lengths[row])
            batches += [window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        if self.sampler.shuffle:
            generator = torch.Generator().manual_seed(self.sampler.seed + self.sampler.epoch)
            short = batches[-1:] if batches and len(batches[-1]) < self.batch_size else []
            full = batches[: len(batches) - len(short)]
            batches = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()] + short
        return iter(batches)

    def __len__(self):
        full_windows, rest = divmod(len(self.sampler), self.window)
        return full_windows * (self.window // self.batch_size) + -(-rest // self.batch_size)
