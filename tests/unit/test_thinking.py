"""rmtorch.thinking: split by the `</think>` token id (real Qwen3 tokenizer, real R1 traces) and thinking quality."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rmtorch.formatting import tokenize_response
from rmtorch.quality import ThinkingVocab, ThinkingWeights, thinking_quality
from rmtorch.score import RewardScorer
from rmtorch.thinking import ThinkTokens, resolve_think_tokens, split_completion
from tests.conftest import reward_alone, shared_path, tiny_llama

START, END = 151667, 151668
THINK = ThinkTokens(start_id=START, end_id=END)


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path("qwen3_tokenizer"))


@pytest.fixture(scope="module")
def qwen3_model(qwen3_tokenizer):
    """A 2-layer hidden-32 Qwen3ForSequenceClassification with Qwen3-0.6B's real vocabulary."""
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    vocab_size = json.loads(shared_path("qwen3_tokenizer", "qwen3-0.6b-config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_labels=1,
        pad_token_id=qwen3_tokenizer.pad_token_id,
        max_position_embeddings=4096,
    )
    model = Qwen3ForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def traces():
    path = shared_path("data", "r1_gsm8k", "r1_distill_qwen32b_gsm8k_labeled.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    closed = [r for r in rows if r["has_think_end"]][:12]
    unclosed = [r for r in rows if not r["has_think_end"]][:2]
    return closed, unclosed


def completion_text(row) -> str:
    return "<think>\n" + row["reasoning"] + "\n</think>\n\n" + row["answer"]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text=text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize(
    "ids, thinking, answer, unclosed",
    [
        ([5, 6, 7], [], [5, 6, 7], False),  # no think token: all answer
        ([START, 5, END, 6, 7], [START, 5, END], [6, 7], False),
        ([START, 5, END, 8, END, 6], [START, 5, END, 8, END], [6], False),  # the last </think> counts
        ([START, 5, 6], [], [START, 5, 6], True),  # opened, never closed
        ([START, 5, END, 6, START, 7], [START, 5, END], [6, START, 7], True),  # reopened after the last close
        ([END, 6], [END], [6], False),  # a template-opened think block (no <think> in the completion)
    ],
)
def test_split_completion_at_the_last_think_end(ids, thinking, answer, unclosed):
    assert split_completion(ids, THINK) == (thinking, answer, unclosed)


def test_split_without_a_think_token_keeps_everything_as_answer():
    assert split_completion([START, 5, END, 6], ThinkTokens(None, None)) == ([], [START, 5, END, 6], False)


def test_think_ids_come_from_the_tokenizer(qwen3_tokenizer, smol_tokenizer):
    assert resolve_think_tokens(qwen3_tokenizer) == ThinkTokens(START, END)
    assert resolve_think_tokens(smol_tokenizer) == ThinkTokens(None, None)  # not in SmolLM2's vocabulary
    assert resolve_think_tokens(qwen3_tokenizer, "<think>", 42) == ThinkTokens(START, 42)


def test_real_traces_split_into_their_reasoning_and_answer_spans(qwen3_tokenizer, qwen3_model, traces):
    closed, _ = traces
    prompts = [row["question"] + "\n" for row in closed]
    completions = [completion_text(row) for row in closed]
    split = RewardScorer(qwen3_model, qwen3_tokenizer).split(prompts, completions)
    for row, prompt, prompt_ids, thinking_ids, answer_ids in zip(
        closed, prompts, split.prompt_ids, split.thinking_ids, split.answer_ids
    ):
        assert prompt_ids == encode(qwen3_tokenizer, prompt)
        assert thinking_ids == [START] + encode(qwen3_tokenizer, "\n" + row["reasoning"] + "\n") + [END]
        assert answer_ids == encode(qwen3_tokenizer, "\n\n" + row["answer"]) + [qwen3_tokenizer.eos_token_id]
    assert not split.unclosed_think.any()


def test_real_conversations_split_into_their_reasoning_and_answer_spans(qwen3_tokenizer, qwen3_model, traces):
    closed, _ = traces
    prompts = [[{"role": "user", "content": row["question"]}] for row in closed]
    completions = [[{"role": "assistant", "content": completion_text(row)}] for row in closed]
    split = RewardScorer(qwen3_model, qwen3_tokenizer).split(prompts, completions)
    for row, thinking_ids, answer_ids in zip(closed, split.thinking_ids, split.answer_ids):
        # Qwen3's template strips the newlines around the reasoning and re-adds one on each side.
        assert thinking_ids == [START] + encode(qwen3_tokenizer, "\n" + row["reasoning"].strip("\n") + "\n") + [END]
        assert answer_ids == encode(qwen3_tokenizer, "\n\n" + row["answer"].lstrip("\n") + "<|im_end|>\n")
    assert not split.unclosed_think.any()


def test_unclosed_real_traces_are_flagged(qwen3_tokenizer, qwen3_model, traces):
    closed, unclosed = traces
    prompts = [row["question"] for row in unclosed + closed[:1]]
    completions = ["<think>\n" + row["reasoning"] for row in unclosed] + [completion_text(closed[0])]
    details = RewardScorer(qwen3_model, qwen3_tokenizer)(prompts, completions, part="answer", return_details=True)
    assert details.unclosed_think.tolist() == [True] * len(unclosed) + [False]


def test_think_end_in_the_prompt_does_not_move_the_split(qwen3_tokenizer, qwen3_model):
    prompt = "Reply after a closing tag like </think> please.\n"
    split = RewardScorer(qwen3_model, qwen3_tokenizer).split(
        [prompt, prompt], ["<think>ok</think>yes", "no tags here"]
    )
    assert split.thinking_ids == [[START] + encode(qwen3_tokenizer, "ok") + [END], []]
    assert split.answer_ids[1] == encode(qwen3_tokenizer, "no tags here") + [qwen3_tokenizer.eos_token_id]


@pytest.mark.parametrize(
    "batching", [dict(packing=True), dict(packing=False, padding_side="left")], ids=["packed", "padded-left"]
)
def test_parts_score_prompt_plus_that_part(qwen3_tokenizer, qwen3_model, traces, batching):
    closed, _ = traces
    prompts = [[{"role": "user", "content": row["question"]}] for row in closed[:3]]
    completions = [[{"role": "assistant", "content": completion_text(row)}] for row in closed[:3]]
    scorer = RewardScorer(qwen3_model, qwen3_tokenizer, max_tokens_per_batch=2048, **batching)
    split = scorer.split(prompts, completions)
    for part in ("full", "answer", "thinking"):
        expected = torch.tensor([reward_alone(qwen3_model, ids) for ids in split.sequences(part)])
        torch.testing.assert_close(scorer(prompts, completions, part=part), expected, atol=1e-5, rtol=0)
    full = [tokenize_response(qwen3_tokenizer, p, c) for p, c in zip(prompts, completions)]
    assert split.sequences("full") == full
    assert [p + a for p, a in zip(split.prompt_ids, split.answer_ids)] == split.sequences("answer")


def test_a_thinking_split_the_tokenizer_cannot_make_is_an_error(bos_tokenizer):
    """The BOS test tokenizer (like SmolLM2's) has no </think> token: part="answer" would silently score the whole
    completion, so it is refused with what to do."""
    scorer = RewardScorer(tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id), bos_tokenizer)
    prompts, completions = ["what is 2 + 3 ?"] * 2, [" think 5", " 5"]
    assert scorer.split(prompts, completions).thinking_ids == [[], []]
    for part in ("answer", "thinking"):
        with pytest.raises(
            ValueError,
            match=rf"part='{part}' splits completions at the reasoning end token, but "
            r"this tokenizer has no '</think>' token\. Score part='full'",
        ):
            scorer(prompts, completions, part=part)
    assert scorer(prompts, completions).isfinite().all()


def test_text_the_chat_template_leaves_out_is_flagged_or_refused(qwen3_tokenizer, qwen3_model):
    """Qwen3's template renders only the text before the first and after the last </think>: "hidden" is never
    scored. Flagged by default, refused with dropped_text="error"."""
    prompts = [[{"role": "user", "content": "2 + 3?"}]] * 2
    hidden = [{"role": "assistant", "content": "<think>a</think> hidden </think> answer"}]
    plain = [{"role": "assistant", "content": "<think>add them</think> 5"}]
    details = RewardScorer(qwen3_model, qwen3_tokenizer)(prompts, [hidden, plain], return_details=True)
    assert details.dropped_text.tolist() == [True, False]
    with pytest.raises(ValueError, match=r"Rows \[0\]: the chat template leaves text of the completion out"):
        RewardScorer(qwen3_model, qwen3_tokenizer, dropped_text="error")(prompts, [hidden, plain])


# -------------------------------------------------------------------------------------------- quality

STRUCTURED = (
    "<think>\nFirst, add 2 and 3.\n\nWait, is that right? Let me check: 2 + 3 = 5.\nHmm, "
    "wait.\n</think>\n\nThe answer is 5."
)


def test_structure_features_count_on_token_ids(qwen3_tokenizer):
    vocab = ThinkingVocab(qwen3_tokenizer, THINK)
    ids = encode(qwen3_tokenizer, STRUCTURED)
    thinking_ids, _, _ = split_completion(ids, THINK)
    content, lines, questions, reflections = vocab.features(thinking_ids)
    body = qwen3_tokenizer.decode(thinking_ids[1:-1])
    assert lines == len([line for line in body.split("\n") if line.strip()]) == 3
    assert questions == body.count("?") == 1
    assert reflections == 5  # "Wait", "is that right", "Let me check", "Hmm", " wait"
    words = [i for i in thinking_ids[1:-1] if any(c.isalnum() for c in qwen3_tokenizer.decode([i]))]
    assert content == len(words) < len([i for i in thinking_ids[1:-1] if qwen3_tokenizer.decode([i]).strip()])


def test_punctuation_lines_do_not_fake_structure(qwen3_tokenizer, qwen3_model):
    """Eight lines of '?' once outscored a real reasoning line (0.754 vs 0.342): they carry no words, so no steps,
    questions or depth."""
    vocab = ThinkingVocab(qwen3_tokenizer, THINK)
    gamed = "<think>\n" + "?\n" * 8 + "</think>\n\n5"
    real = "<think>\nAdd 2 and 3 to get 5.\n</think>\n\n5"
    assert vocab.features(split_completion(encode(qwen3_tokenizer, gamed), THINK)[0]) == (0, 0, 0, 0)
    scorer = RewardScorer(qwen3_model, qwen3_tokenizer)
    structure = thinking_quality(scorer, ["What is 2 + 3?\n"] * 2, [gamed, real], ThinkingWeights(reward=0.0)).quality
    assert structure[0] == 0.0 < structure[1]


def test_reflection_phrases_match_whole_tokens_only(qwen3_tokenizer):
    vocab = ThinkingVocab(qwen3_tokenizer, THINK)
    assert vocab.count_phrases(encode(qwen3_tokenizer, "We waited for the bus.")) == 0
    assert vocab.count_phrases(encode(qwen3_tokenizer, "We wait. Let me verify that.")) == 2


def test_quality_follows_the_documented_formula(qwen3_tokenizer, qwen3_model):
    weights = ThinkingWeights(depth_tokens=20, target_steps=2, target_reflections=10, reward_temperature=2.0)
    scorer = RewardScorer(qwen3_model, qwen3_tokenizer)
    prompts = ["What is 2 + 3?\n"] * 4
    # The third row loops: 5 words, 3 trigrams, 1 distinct -> distinct 1/3, novelty (1/3 - 0.25) / 0.25 = 1/3.
    completions = [STRUCTURED, "<think>I will just guess.</think> 7", "<think>wait wait Wait wait wait</think> 5", "7"]
    result = thinking_quality(scorer, prompts, completions, weights)
    thinking_rewards = scorer(prompts[:3], completions[:3], part="thinking")
    torch.testing.assert_close(result.thinking_reward[:3], thinking_rewards, atol=1e-6, rtol=0)
    assert math.isnan(result.thinking_reward[3])
    vocab = ThinkingVocab(qwen3_tokenizer, THINK)
    thinkings = [split_completion(encode(qwen3_tokenizer, c), THINK)[0] for c in completions[:3]]
    for row, thinking_ids in enumerate(thinkings):
        content, lines, questions, reflections = vocab.features(thinking_ids)
        novelty = min(1, max(0, (vocab.distinct_share(thinking_ids) - 0.25) / (0.5 - 0.25)))
        expected = novelty * (
            0.25 * min(1, content / 20)
            + 0.25 * min(1, lines / 2)
            + 0.2 * min(1, (questions + reflections) / 10)
            + 0.3 * torch.sigmoid(thinking_rewards[row] / 2.0).item()
        )
        assert result.quality[row].item() == pytest.approx(expected, abs=1e-6)
    assert result.novelty.tolist() == pytest.approx([1.0, 1.0, 1 / 3, 1.0])
    assert result.quality[3].item() == 0.0  # no thinking
    assert (
        result.depth[0] > result.depth[1]
        and result.steps[0] == 1.0
        and result.reflection[0].item() == pytest.approx(0.6)
    )


def test_quality_weights_are_the_users(qwen3_tokenizer, qwen3_model):
    scorer = RewardScorer(qwen3_model, qwen3_tokenizer)
    only_reward = ThinkingWeights(depth=0.0, steps=0.0, reflection=0.0, reward=1.0)
    result = thinking_quality(scorer, ["Q\n"], [STRUCTURED], only_reward)
    assert result.quality.item() == pytest.approx(
        torch.sigmoid(scorer(["Q\n"], [STRUCTURED], part="thinking")).item(), abs=1e-6
    )
    only_structure = ThinkingWeights(depth=0.0, steps=1.0, reflection=0.0, reward=0.0, target_steps=6)
    assert thinking_quality(scorer, ["Q\n"], [STRUCTURED], only_structure).quality.item() == pytest.approx(3 / 6)


def test_quality_prefers_worked_real_reasoning_over_a_guess(qwen3_tokenizer, qwen3_model, traces):
    closed, _ = traces
    scorer = RewardScorer(qwen3_model, qwen3_tokenizer)
    structure_only = ThinkingWeights(reward=0.0)
    prompts = [row["question"] + "\n" for row in closed[:3]] * 2
    completions = [completion_text(row) for row in closed[:3]] + [
        "<think>\nI will just guess.\n</think>\n\n" + row["answer"] for row in closed[:3]
    ]
    quality = thinking_quality(scorer, prompts, completions, structure_only).quality
    assert (quality[:3] > quality[3:]).all()


DEGENERATE = [
    "wait " * 10,
    "Wait, " * 10,
    "wait wait\n" * 10,
    "let me check " * 10,
    "Wait, is that right?\n" * 10,
    "Hmm, let me verify.\n" * 8,
    "Add 2 and 3 to get 5.\n" * 8,
]


def test_distinct_share_counts_repeated_words_once_whatever_their_case_or_space(qwen3_tokenizer):
    vocab = ThinkingVocab(qwen3_tokenizer, THINK)
    share = lambda text: vocab.distinct_share(encode(qwen3_tokenizer, "<think>\n" + text + "</think>"))  # noqa: E731
    assert share("wait " * 10) == share("Wait wait WAIT " * 3 + "wait") == pytest.approx(1 / 8)  # 10 words, 8 trigrams
    assert share("let me check " * 10) == pytest.approx(3 / 28)
    assert share("Add 2 and 3 to get 5.") == 1.0
    assert share("wait wait") == 1.0  # fewer words than a trigram: nothing can repeat
    assert vocab.distinct_share(encode(qwen3_tokenizer, "wait " * 10), n=1) == pytest.approx(1 / 10)


def test_repeating_a_word_or_phrase_scores_below_real_reasoning(qwen3_tokenizer, qwen3_model, traces):
    """ "wait " x 10 (ten reflection phrases) once outscored a real reasoning line; loops now score 0, real R1
    traces keep their full score, with the reward model's part and without it."""
    closed, _ = traces
    scorer = RewardScorer(qwen3_model, qwen3_tokenizer)
    real_line = "<think>\nAdd 2 and 3 to get 5.\n</think>\n\n5"
    loops = ["<think>\n" + text + "</think>\n\n5" for text in DEGENERATE]
    real_traces = [completion_text(row) for row in closed]
    completions = loops + [real_line] + real_traces
    prompts = ["What is 2 + 3?\n"] * (len(loops) + 1) + [row["question"] + "\n" for row in closed]
    for weights in (ThinkingWeights(), ThinkingWeights(reward=0.0)):
        result = thinking_quality(scorer, prompts, completions, weights)
        loop_quality, real_quality = result.quality[: len(loops)], result.quality[len(loops) :]
        assert (loop_quality == 0.0).all() and (real_quality > 0.0).all()
        assert (result.novelty[len(loops) :] == 1.0).all()  # nothing taken off real reasoning
    # What the loops were paid for before: full reflection (the phrases) or full steps (the repeated line).
    assert (result.reflection[: len(loops) - 1] == 1.0).all() and result.steps[len(loops) - 1] == 1.0


def test_repetition_thresholds_must_be_ordered():
    with pytest.raises(ValueError, match=r"min_distinct=0\.6, full_distinct=0\.5; .* 0 <= min_distinct < full"):
        ThinkingWeights(min_distinct=0.6, full_distinct=0.5)
