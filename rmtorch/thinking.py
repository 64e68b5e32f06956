"""Thinking: split completions at `</think>` by token id.

Everything here works on the token ids the reward model sees, never on regexes over decoded text:
- the split point is the **last** `</think>` id inside the completion (the id comes from the tokenizer, e.g.
  151668 in Qwen3), so a `</think>` quoted in the prompt or inside the thinking does not move it;
- thinking = completion tokens up to and including that `</think>`; answer = the tokens after it (with the
  closing EOS or chat-template tokens, so the answer still reads as a finished turn);
- no `</think>` in the completion → thinking is empty and the whole completion is the answer;
- a `<think>` with no `</think>` after it is *unclosed* (generation stopped mid-thought): the row is flagged,
  the tokens stay where the rule above puts them, and the caller decides what an unclosed row is worth.

The quality of the thinking (`thinking_quality`) is rmtorch.quality's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARTS = ("full", "answer", "thinking")  # what a scorer can score of each row


@dataclass(frozen=True)
class ThinkTokens:
    """Ids of the thinking delimiters in one tokenizer; None where the tokenizer has no such token."""

    start_id: int | None
    end_id: int | None


def resolve_think_tokens(
    tokenizer, start_token: str | int | None = "<think>", end_token: str | int | None = "</think>"
) -> ThinkTokens:
    """Look up the delimiter ids (an int is taken as the id itself); a token missing from the vocabulary is None."""

    def lookup(token):
        if token is None or isinstance(token, int):
            return token
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            return None
        return token_id

    return ThinkTokens(start_id=lookup(start_token), end_id=lookup(end_token))


def split_completion(completion_ids: list[int], think: ThinkTokens) -> tuple[list[int], list[int], bool]:
    """(thinking_ids, answer_ids, unclosed) of one completion, split after its last `</think>` id."""
    end = -1
    if think.end_id is not None:
        for position in range(len(completion_ids) - 1, -1, -1):
            if completion_ids[position] == think.end_id:
                end = position
                break
    thinking_ids, answer_ids = completion_ids[: end + 1], completion_ids[end + 1 :]
    unclosed = think.start_id is not None and think.start_id in answer_ids
    return thinking_ids, answer_ids, unclosed


@dataclass
class SplitCompletions:
    """Token ids of N scored rows, cut into prompt | thinking | answer (each a list of N id lists).

    prompt_ids + thinking_ids + answer_ids is exactly the row's full (training-format) sequence.
    """

    prompt_ids: list[list[int]]
    thinking_ids: list[list[int]]
    answer_ids: list[list[int]]
    unclosed_think: torch.Tensor  # (N,) bool
    dropped_text: torch.Tensor | None = None  # (N,) bool: the chat template left out text of the completion

    def sequences(self, part: str) -> list[list[int]]:
        """The id lists the reward model scores for `part`: full, answer (prompt + answer) or thinking
        (prompt + thinking)."""
        if part == "full":
            return [p + t + a for p, t, a in zip(self.prompt_ids, self.thinking_ids, self.answer_ids)]
        if part == "answer":
            return [p + a for p, a in zip(self.prompt_ids, self.answer_ids)]
        if part == "thinking":
            return [p + t for p, t in zip(self.prompt_ids, self.thinking_ids)]
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}.")

    def select(self, rows: list[int]) -> SplitCompletions:
        """The given rows only, in the given order."""
        return SplitCompletions(
            [self.prompt_ids[i] for i in rows],
            [self.thinking_ids[i] for i in rows],
            [self.answer_ids[i] for i in rows],
            self.unclosed_think[rows],
            None if self.dropped_text is None else self.dropped_text[rows],
        )


def split_rows(sequences: list[list[int]], prompt_lengths: list[int], think: ThinkTokens) -> SplitCompletions:
    """Split each full sequence after its prompt (`prompt_lengths` tokens) into thinking and answer."""
    prompts, thinkings, answers, unclosed = [], [], [], []
    for ids, prompt_length in zip(sequences, prompt_lengths):
        thinking_ids, answer_ids, is_unclosed = split_completion(ids[prompt_length:], think)
        prompts.append(ids[:prompt_length])
        thinkings.append(thinking_ids)
        answers.append(answer_ids)
        unclosed.append(is_unclosed)
    return SplitCompletions(prompts, thinkings, answers, torch.tensor(unclosed, dtype=torch.bool))
