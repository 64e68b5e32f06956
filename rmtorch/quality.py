"""Thinking quality: a heuristic score of how well a completion thinks, on the token ids the reward model sees
(the thinking span comes from rmtorch.thinking's split).

`thinking_quality` combines the structure of the thinking (depth, steps, self-questioning) with the reward
model's score of prompt + thinking, and takes it to 0 for thinking that loops (the same word or phrase over and
over); see its docstring for the formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rmtorch.thinking import ThinkTokens

REFLECTION_PHRASES = (
    "wait",
    "hmm",
    "let me check",
    "let me verify",
    "double-check",
    "double check",
    "alternatively",
    "is that right",
    "make sure",
)


@dataclass
class ThinkingWeights:
    """Weights and scales of `thinking_quality`; the defaults sum to 1, so quality lies in [0, 1]."""

    depth: float = field(
        default=0.25, metadata={"help": "Weight of depth: thinking length, saturating at depth_tokens."}
    )
    steps: float = field(
        default=0.25, metadata={"help": "Weight of steps: lines of two or more words, saturating at target_steps."}
    )
    reflection: float = field(
        default=0.2,
        metadata={
            "help": "Weight of self-questioning: steps asking a question and reflection phrases, saturating at "
            "target_reflections."
        },
    )
    reward: float = field(
        default=0.3,
        metadata={
            "help": "Weight of the reward model's view: sigmoid(reward(prompt + thinking) / reward_temperature)."
        },
    )
    depth_tokens: int = field(default=512, metadata={"help": "Content tokens at which depth reaches 1."})
    target_steps: int = field(default=8, metadata={"help": "Lines at which steps reaches 1."})
    target_reflections: int = field(
        default=3, metadata={"help": "Questions + reflection phrases at which reflection reaches 1."}
    )
    reward_temperature: float = field(default=1.0, metadata={"help": "Scale of the reward before the sigmoid."})
    ngram: int = field(
        default=3, metadata={"help": "Length in word tokens of the n-grams whose distinct share measures repetition."}
    )
    min_distinct: float = field(
        default=0.25,
        metadata={"help": "Distinct n-gram share at or below which quality is 0 (a word repeated 6 times has 0.25)."},
    )
    full_distinct: float = field(
        default=0.5,
        metadata={
            "help": "Distinct n-gram share from which repetition costs nothing (real reasoning keeps 0.6 or more)."
        },
    )
    phrases: tuple[str, ...] = field(
        default=REFLECTION_PHRASES,
        metadata={
            "help": "Reflection phrases, matched as token-id sequences (lower/capitalised, with and without a "
            "leading space)."
        },
    )

    def __post_init__(self):
        if not (self.ngram >= 1 and 0 <= self.min_distinct < self.full_distinct <= 1):
            raise ValueError(
                f"ThinkingWeights: got ngram={self.ngram}, min_distinct={self.min_distinct}, "
                f"full_distinct={self.full_distinct}; ngram must be at least 1 and "
                "0 <= min_distinct < full_distinct <= 1."
            )


class ThinkingVocab:
    """What a tokenizer's ids mean for structure: whitespace, newline, '?', and the reflection phrases as id sequences.

    Token texts are decoded once per id actually seen and cached, so a 150k vocabulary costs nothing up front.
    """

    def __init__(self, tokenizer, think: ThinkTokens, phrases: tuple[str, ...] = REFLECTION_PHRASES):
        self.tokenizer = tokenizer
        self.marker_ids = {i for i in (think.start_id, think.end_id) if i is not None}
        variants = {v for p in phrases for v in (p, p.capitalize(), " " + p, " " + p.capitalize())}
        self.phrase_ids = sorted({tuple(tokenizer(text=v, add_special_tokens=False)["input_ids"]) for v in variants})
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        if token_id not in self._texts:
            self._texts[token_id] = self.tokenizer.decode([token_id])
        return self._texts[token_id]

    def features(self, thinking_ids: list[int], min_step_words: int = 2) -> tuple[int, int, int, int]:
        """(content_tokens, steps, questions, reflections) of one thinking span.

        content_tokens: word tokens (holding a letter or a digit; whitespace, punctuation and think markers do not
        count); steps: lines with at least `min_step_words` word tokens; questions: steps holding a '?' (one per
        step); reflections: phrase occurrences. Lines of punctuation ("?\n" x 8) count for nothing, so structure
        cannot be faked without words.
        """
        content = steps = questions = 0
        line_words, line_question = 0, False
        for token_id in [*thinking_ids, None]:  # None ends the last line
            text = "\n" if token_id is None else self.text(token_id)
            if token_id in self.marker_ids:
                continue
            words = any(c.isalnum() for c in text)
            content += words
            line_words += words
            line_question = line_question or "?" in text
            if "\n" in text:
                if line_words >= min_step_words:
                    steps += 1
                    questions += line_question
                line_words, line_question = 0, False
        return content, steps, questions, self.count_phrases(thinking_ids)

    def distinct_share(self, thinking_ids: list[int], n: int = 3) -> float:
        """Distinct word n-grams / word n-grams of one thinking span; 1.0 when it has fewer than n word tokens.

        Word tokens are compared by their text without case or surrounding whitespace ("Wait", " wait" and
        " Wait" are one word), so a phrase repeated k times keeps about 1/k of its n-grams distinct.
        """
        words = [
            text.strip().lower()
            for text in (self.text(i) for i in thinking_ids if i not in self.marker_ids)
            if any(c.isalnum() for c in text)
        ]
        ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        return len(set(ngrams)) / len(ngrams) if ngrams else 1.0

    def count_phrases(self, ids: list[int]) -> int:
        count = 0
        for phrase in self.phrase_ids:
            width = len(phrase)
            count += sum(tuple(ids[i : i + width]) == phrase for i in range(len(ids) - width + 1))
        return count


@dataclass
class ThinkingQuality:
    """Per-row thinking quality and its parts, each (N,) fp32 (unclosed_think: bool)."""

    quality: torch.Tensor
    depth: torch.Tensor
    steps: torch.Tensor
    reflection: torch.Tensor
    novelty: torch.Tensor  # 1 for thinking that does not loop, down to 0 for a word or phrase repeated over and over
    judged: torch.Tensor  # sigmoid(reward(prompt + thinking) / temperature); 0 where there is no thinking
    thinking_reward: torch.Tensor  # raw reward of prompt + thinking; NaN where there is no thinking
    unclosed_think: torch.Tensor


def thinking_quality(scorer, prompts, completions, weights: ThinkingWeights | None = None) -> ThinkingQuality:
    """Score how well each completion thinks, on the ids the reward model sees.

    With content = word tokens of the thinking (holding a letter or digit), steps = lines of at least two word
    tokens, reflections = steps that ask a question + reflection-phrase occurrences (all counted on token ids,
    see `ThinkingVocab.features`):

        depth      = min(1, content / depth_tokens)
        steps      = min(1, steps / target_steps)
        reflection = min(1, reflections / target_reflections)
        judged     = sigmoid(reward(prompt + thinking) / reward_temperature)
        distinct   = distinct word n-grams / word n-grams of the thinking (n = ngram; words compared without case
                     or surrounding whitespace; 1 below n words)
        novelty    = clamp((distinct - min_distinct) / (full_distinct - min_distinct), 0, 1)
        quality    = novelty * (w_depth * depth + w_steps * steps + w_reflection * reflection + w_reward * judged)

    Why novelty: every count above grows when the thinking repeats itself, so "wait " x 10 (ten reflections) once
    outscored a real reasoning line. A word or phrase of p words repeated k times keeps p / (kp - 2) of its
    3-grams distinct, about 1/k ("wait " x 10: 0.125, so quality 0), while real reasoning reuses phrases but keeps
    most of them distinct (492 closed R1-distill-Qwen-32B traces on GSM8K: 0.60 to 0.99, median 0.89, falling to
    about 0.7 at 1,200 words), so the defaults take nothing off it (unclosed traces that loop until the length
    limit lose up to a third). It multiplies the reward model's part too: a loop that a reward model happens to
    like is still a loop.

    A row with no thinking content scores 0 (its thinking is not sent to the reward model). Unclosed thinking is
    scored as written and flagged in `unclosed_think`. `scorer` is a `rmtorch.score.RewardScorer`.
    """
    weights = weights or ThinkingWeights()
    split = scorer.split(prompts, completions)
    vocab = ThinkingVocab(scorer.tokenizer, scorer.think, weights.phrases)
    counts = torch.tensor([vocab.features(ids) for ids in split.thinking_ids], dtype=torch.float32).reshape(-1, 4)
    content, step_lines, questions, reflections = counts.unbind(-1)
    has_thinking = content > 0
    thinking_reward = torch.full((len(content),), float("nan"))
    rows = has_thinking.nonzero().flatten().tolist()
    if rows:
        thinking_reward[rows] = scorer.score_split(split.select(rows), "thinking").rewards
    judged = torch.where(has_thinking, torch.sigmoid(thinking_reward / weights.reward_temperature), torch.zeros(()))
    depth = (content / weights.depth_tokens).clamp(max=1.0)
    steps = (step_lines / weights.target_steps).clamp(max=1.0)
    reflection = ((questions + reflections) / weights.target_reflections).clamp(max=1.0)
    distinct = torch.tensor([vocab.distinct_share(ids, weights.ngram) for ids in split.thinking_ids])
    novelty = ((distinct - weights.min_distinct) / (weights.full_distinct - weights.min_distinct)).clamp(0.0, 1.0)
    structure = weights.depth * depth + weights.steps * steps + weights.reflection * reflection
    quality = novelty * (structure + weights.reward * judged)
    return ThinkingQuality(quality, depth, steps, reflection, novelty, judged, thinking_reward, split.unclosed_think)
