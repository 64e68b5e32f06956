"""Reward models: the RewardModel wrapper, pooling, and `compute_rewards`, the one function that turns token-id
sequences into rewards (training's evaluation, evaluate.py, the scorer and the benches all call it). Loading is
rmtorch.loading's job.

The reward of a sequence is the score head applied at its **last attended token** (by attention mask).
TRL/transformers pool at the rightmost token whose id is not the pad id, so when pad == eos (SmolLM2) the EOS
that training appends is never scored. rmtorch scores it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from rmtorch.attention import packed_attention
from rmtorch.batching import PackedGroup, pack_groups, pad_sequences, plan_packed, plan_padded

# ------------------------------------------------------------------------------------ locks and settings


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def lock_of(shared) -> threading.RLock:
    """One lock per model or tokenizer, for whoever uses it. A packed forward switches the model's attention
    implementation (one config for all its layers) and its train/eval mode, and a fast tokenizer is not safe to share
    across threads: two threads must not use the same one at once."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(shared, threading.RLock())


def model_max_length(model: nn.Module, max_length: int | None) -> int | None:
    """max_length, or when None the model's own limit (max_position_embeddings; None when the config has none)."""
    return max_length if max_length is not None else getattr(model.config, "max_position_embeddings", None)


def disable_dropout(model: nn.Module) -> None:
    """Zero nn.Dropout modules and the attention-dropout floats that TRL's disable_dropout misses."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant); works for full, LoRA and 4-bit models.

    The input embeddings' output is made to require grad, so a frozen body (LoRA, 4-bit) still sends gradients into
    checkpointed layers.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # also hooks the embeddings
    else:  # transformers before the rename
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not getattr(base, "_require_grads_hooks", None):  # set by transformers when it added the hooks itself
        base.enable_input_require_grads()


def compile_elementwise(model: nn.Module) -> int:
    """torch.compile, with dynamic shapes, every RMSNorm and MLP of the body (PEFT-wrapped or not): their chains
    of elementwise work (upcast, square, mean, rsqrt, scale; SiLU times the up projection) fuse into few kernels.
    Attention stays eager: packed rows carry a block layout that changes with every batch. Returns the count."""
    compiled = 0
    for module in backbone(model).modules():
        if type(module).__name__.endswith(("RMSNorm", "MLP")):
            module.compile(dynamic=True)
            compiled += 1
    return compiled


# ------------------------------------------------------------------------------------------------ pooling


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) mask → (N,) index of each row's last attended token; works for left and right padding."""
    length = attention_mask.shape[-1]
    flipped_first = attention_mask.flip(-1).int().argmax(-1)
    return length - 1 - flipped_first


def score_head(model: nn.Module) -> nn.Module:
    """The linear head of a sequence-classification model (PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("score", "classifier"):
        head = getattr(base, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(base).__name__} has no 'score' head; load it with AutoModelForSequenceClassification.")


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body (everything below the head) of a sequence-classification model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


class RewardModel(nn.Module):
    """Wraps an AutoModelForSequenceClassification: forward returns one fp32 reward per row, (N,), or for a model
    with K outputs (a rating model, rmtorch.ratings) its K attribute values per row, (N, K).

    Pools at the last attended token of each row of a padded batch. A packed row (rmtorch.batching) passes
    `last_index`, the position of each sequence's last token, with `position_ids` and `attention_blocks`; its
    forward runs with block attention (rmtorch.attention), and the model keeps its own attention otherwise.
    `step_index` reads the head at given positions instead, one reward per step (rmtorch.steps): (K,) positions in a
    packed row or (K, 2) (row, position) pairs of a padded batch.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        last_index: torch.Tensor | None = None,
        attention_blocks: tuple | None = None,
        step_index: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        body = backbone(self.model)
        if attention_blocks is not None:  # one packed row: the mask is the block layout, not attention_mask
            with packed_attention(self.model):
                hidden = body(input_ids=input_ids, use_cache=False, attention_blocks=attention_blocks, **kwargs)
        else:
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        # Score every position, then pick: the head costs H flops a token, and this keeps the arithmetic
        # identical to transformers' own forward (gradients match TRL bit for bit). The head runs outside autocast,
        # in the dtype of the hidden states (fp32 under autocast): in bf16 a reward near 5 has a step of 0.03, and
        # close rewards came out equal (2 ties in 100 held-out pairs of the default run).
        with torch.autocast(input_ids.device.type, enabled=False):
            per_token = score_head(self.model)(hidden.last_hidden_state).squeeze(-1)  # (N, T)
        if step_index is not None:  # a process reward model: the head read at each step's end (rmtorch.steps)
            if step_index.dim() == 1:  # positions in one packed row
                return per_token[0, step_index].float()
            return per_token[step_index[:, 0], step_index[:, 1]].float()  # (row, position) pairs of a padded batch
        if last_index is not None:  # one packed row: sequence i ends at last_index[i]
            return self._in_data_units(per_token[0, last_index].float())
        rows = torch.arange(per_token.shape[0], device=per_token.device)
        return self._in_data_units(per_token[rows, last_token_index(attention_mask)].float())

    def _in_data_units(self, outputs: torch.Tensor) -> torch.Tensor:
        """A rating model trained on normalized targets (rmtorch.ratings) predicts (y - mean) / std; its config
        holds mean and std, and its outputs come back in the data's units. Other models' outputs pass unchanged."""
        std = getattr(self.model.config, "rmtorch_attribute_std", None)
        if std is None:
            return outputs
        mean = self.model.config.rmtorch_attribute_mean
        return outputs * outputs.new_tensor(std) + outputs.new_tensor(mean)  # (N, K)


# ---------------------------------------------------------------------------------------- ids → rewards


def _forward_inputs(sequences, batch: list[PackedGroup], packing: bool, pad_token_id: int, padding_side: str) -> dict:
    if packing:
        groups = [[sequences[i] for i in group.rows] for group in batch]
        return pack_groups(groups, prompt_lengths=[group.shared for group in batch])
    input_ids, attention_mask = pad_sequences([sequences[i] for i in batch[0].rows], pad_token_id, padding_side)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding starts at 0 too
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


@torch.no_grad()
def compute_rewards(
    reward_model: nn.Module,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int] | None = None,
    *,
    pad_token_id: int = 0,
    packing: bool = True,
    max_tokens_per_batch: int = 16384,
    padding_side: str = "right",
    autocast_dtype: torch.dtype | None = None,
    accelerator=None,
    progress: bool = False,
) -> torch.Tensor:
    """(N,) fp32 rewards of token-id sequences, in input order ((N, K) for a model with K outputs: a rating model's
    attributes); every reward equals the sequence scored alone, and identical sequences (scored once) get identical
    rewards.

    packing: rows that share a prompt (`prompt_lengths[i]` leading tokens, identical) are packed into padding-free
    rows with the prompt computed once, up to `max_tokens_per_batch` tokens a forward; otherwise rows are sorted
    by length and padded (`padding_side`) into micro-batches of at most that many padded tokens. A row longer than
    the budget runs alone. `reward_model` is a RewardModel (or one prepared by Accelerate); it runs in eval mode
    and gets its mode back. autocast_dtype: autocast the forward (an Accelerate-prepared model autocasts itself).
    accelerator: with several processes, each runs its share of the same batch plan (the same number of forwards
    everywhere, as FSDP and ZeRO-3 need) and every process gets all rewards.
    """
    if any(len(ids) == 0 for ids in sequences):
        raise ValueError("compute_rewards got an empty token sequence; every row needs at least one token.")
    if not sequences:
        return torch.empty(0)
    # Identical sequences are scored once: cheaper (GRPO repeats short answers), and they get identical rewards.
    unique: dict[tuple, int] = {}
    first = [unique.setdefault(tuple(ids), len(unique)) for ids in sequences]
    if len(unique) < len(sequences):
        kept = {}
        for index, u in enumerate(first):
            kept.setdefault(u, index)
        order = [kept[u] for u in range(len(unique))]
        unique_prompt_lengths = None if prompt_lengths is None else [prompt_lengths[i] for i in order]
        unique_rewards = compute_rewards(
            reward_model, [sequences[i] for i in order], unique_prompt_lengths, pad_token_id=pad_token_id,
            packing=packing, max_tokens_per_batch=max_tokens_per_batch, padding_side=padding_side,
            autocast_dtype=autocast_dtype, accelerator=accelerator, progress=progress,
        )  # fmt: skip
        return unique_rewards[first]
    prompt_lengths = prompt_lengths if prompt_lengths is not None else [0] * len(sequences)
    if packing:
        plan = plan_packed(sequences, prompt_lengths, max_tokens_per_batch)
    else:
        plan = plan_padded(sequences, prompt_lengths, max_tokens_per_batch)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    mine = plan[rank::world]
    forwards = -(-len(plan) // world)  # every process runs this many: the short ones repeat a batch, unused
    device = accelerator.device if accelerator is not None else next(reward_model.parameters()).device
    modes = [(module, module.training) for module in reward_model.modules()]  # each gets its own mode back
    reward_model.eval()
    results: list[tuple[list[int], list[float]]] = []
    try:
        from tqdm.auto import tqdm

        for i in tqdm(
            range(forwards), desc="score", unit="batch", disable=not progress or rank != 0, dynamic_ncols=True
        ):
            batch = mine[i] if i < len(mine) else plan[0]
            inputs = _forward_inputs(sequences, batch, packing, pad_token_id, padding_side)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            with torch.autocast(
                device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
            ):
                batch_rewards = reward_model(**inputs)
            if i < len(mine):
                results.append(([row for group in batch for row in group.rows], batch_rewards.float().cpu().tolist()))
    finally:
        for module, mode in modes:
            module.training = mode
    if world > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    outputs = torch.tensor(results[0][1]).shape[1:]  # () for one reward a row, (K,) for K attributes
    rewards = torch.full((len(sequences), *outputs), float("nan"))
    for rows, values in results:
        rewards[rows] = torch.tensor(values, dtype=torch.float32)
    return rewards


def score_pairs(reward_model: nn.Module, pairs, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) chosen and (N,) rejected rewards of a PairSet (rmtorch.pairs) through `compute_rewards`; each pair's
    stored prompt length lets packing compute its prompt once. `options` go to compute_rewards."""
    sequences, prompt_lengths = pairs.sequences()
    rewards = compute_rewards(reward_model, sequences, prompt_lengths, **options)
    return rewards[: len(pairs)], rewards[len(pairs) :]
