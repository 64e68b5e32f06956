"""Formatting: prompts and responses (text or messages) → the token ids a reward model is trained and scored on, and
the truncation rules. One module for training (rmtorch.pairs), evaluation, RewardBench, the scorer and the server, so
a model is scored on the ids it was trained on (TRL keeps its formatting in trl/data_utils.py, apart from its
trainer).

Token ids equal TRL 1.16's RewardTrainer: standard text gets the EOS string appended and is tokenized with the
tokenizer's own special tokens; conversations go through `apply_chat_template` with nothing appended.

Truncation, one function per rule; a leading BOS the tokenizer adds (`bos_to_keep`) is kept by both cuts:
- `cut_prompt` (`--truncation keep_end` of train.py and evaluate.py): the shared prompt loses tokens from the left,
  whole leading turns first, so every response stays whole; None when a response alone does not fit (the row is
  dropped and counted). `--truncation drop` (TRL's rule) drops every row over max_length instead.
- `keep_last` (the scorer and the server, which must score every row): the row's last max_length tokens, flagged as
  truncated by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def _template_messages(messages: list[dict]) -> list[dict]:
    """Messages as the chat template gets them: a tool-call message's null content becomes "" (not "None")."""
    return [{**m, "content": ""} if m.get("content") is None else m for m in messages]


def chat_ids(
    tokenizer, messages: list[dict], tools=None, chat_template_kwargs=None, add_generation_prompt=False
) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template."""
    encoded = tokenizer.apply_chat_template(
        _template_messages(messages), tools=tools, tokenize=True, return_dict=True,
        add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}),
    )  # fmt: skip
    return list(encoded["input_ids"])


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The text a chat template renders for a conversation (what `chat_ids` tokenizes)."""
    return tokenizer.apply_chat_template(_template_messages(messages), tokenize=False)


def chat_opening(tokenizer) -> str | None:
    """What every rendering of the tokenizer's chat template holds right after its BOS text, when the template
    starts with the BOS text (SmolLM2: BOS '<|im_start|>', opening 'system\n'); None otherwise.

    verl strips a leading BOS text from rendered chats before posting them (for vLLM, which used to add it back): a
    text that starts with the opening is such a chat, and its BOS is restored (`restore_chat_bos`)."""
    bos = tokenizer.bos_token
    if not bos or not getattr(tokenizer, "chat_template", None):
        return None
    probe = "\x00probe\x00"
    try:  # the roles' renderings share the template's head (a default system turn included)
        texts = [chat_text(tokenizer, [{"role": role, "content": probe}]) for role in ("system", "user")]
    except Exception:  # a template that refuses a lone system or user turn: leave texts as sent
        return None
    if not all(text.startswith(bos) for text in texts):
        return None
    heads = [text[len(bos) : text.index(probe)] for text in texts]
    opening = heads[0][: common_prefix_length(heads[0], heads[1])]
    return opening or None


def restore_chat_bos(text: str, tokenizer, opening: str | None) -> str:
    """`text` with the chat template's BOS text put back when a client stripped it (see `chat_opening`)."""
    if opening and text.startswith(opening) and not text.startswith(tokenizer.bos_token):
        return tokenizer.bos_token + text
    return text


def tokenize_response(tokenizer, prompt, response) -> list[int]:
    """Token ids of prompt + response, formatted exactly as training formats them (TRL's rules).

    `prompt`/`response` are both strings (EOS appended unless present, tokenizer's special tokens added) or
    both message lists (chat template, nothing appended). Training and rmtorch.score both call this, so a
    model is always scored on the format it was trained on.
    """
    if isinstance(response, str):
        if tokenizer.eos_token and not response.endswith(tokenizer.eos_token):
            response = response + tokenizer.eos_token
        return list(tokenizer(text=(prompt or "") + response)["input_ids"])
    return chat_ids(tokenizer, list(prompt or []) + list(response))


def prompt_ids(tokenizer, prompt, tools=None, chat_template_kwargs=None) -> list[int]:
    """Token ids of a prompt on its own: text with the tokenizer's special tokens, or messages with the
    generation prompt (the assistant header a response follows)."""
    if isinstance(prompt, str) or prompt is None:
        return list(tokenizer(text=prompt or "")["input_ids"])
    if not prompt:
        return []
    return chat_ids(tokenizer, prompt, tools, chat_template_kwargs, add_generation_prompt=True)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Tokens two sequences share at the start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts plain text with its BOS token."""
    bos_id = tokenizer.bos_token_id
    return bos_id is not None and tokenizer(text="a")["input_ids"][:1] == [bos_id]


def bos_to_keep(tokenizer) -> int | None:
    """The BOS id a cut from the left keeps at the front (when the tokenizer adds one to text), else None. Computed
    once per tokenizer by the caller; the rules keep it only where a sequence does start with it."""
    return tokenizer.bos_token_id if adds_bos(tokenizer) else None


def _kept(ids: Sequence[int], bos_id: int | None) -> int:
    return int(bos_id is not None and len(ids) > 0 and ids[0] == bos_id)


def keep_last(ids: list[int], max_length: int, bos_id: int | None = None) -> list[int]:
    """The scorer's rule: the last `max_length` tokens (after a leading BOS, kept), so the sequence ends intact."""
    if len(ids) <= max_length:
        return ids
    start = _kept(ids, bos_id)
    return ids[:start] + ids[len(ids) - (max_length - start) :]


@dataclass
class PromptCut:
    """What `cut_prompt` made: the sequences, their new shared prompt length, the tokens cut from each, and whether
    the cut fell on a turn boundary (conversations)."""

    sequences: list[list[int]]
    prompt_length: int
    cut: int
    at_turn: bool


def cut_prompt(
    sequences: list[list[int]], prompt_length: int, max_length: int, bos_id: int | None = None,
    turn_starts: Sequence[int] = (),
) -> PromptCut | None:  # fmt: skip
    """Training's rule (`--truncation keep_end`): cut the same tokens of the shared prompt (its first
    `prompt_length`) from the left of every sequence so the longest fits, every response whole; a leading BOS stays.
    With `turn_starts` (positions where a prompt message begins), whole leading turns go when that is enough. None
    when a response alone does not fit: cutting it would change what is judged."""
    start = _kept(sequences[0], bos_id)
    overflow = max(len(ids) for ids in sequences) - max_length
    if overflow > prompt_length - start:
        return None
    cut_end = start + max(overflow, 0)
    whole_turns = [s for s in turn_starts if cut_end <= s <= prompt_length]
    if whole_turns:
        cut_end = whole_turns[0]
    cut = cut_end - start
    cut_sequences = [ids[:start] + ids[cut_end:] for ids in sequences]
    return PromptCut(cut_sequences, prompt_length - cut, cut, at_turn=bool(whole_turns))
