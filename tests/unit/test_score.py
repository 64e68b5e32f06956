"""rmtorch.score: fused batched scoring equals one-by-one scoring, uses the training format, leaves the caller's
model as it was, and has TRL's reward-function signature."""

from __future__ import annotations

import copy

import pytest
import torch

from rmtorch.files import PairDataError
from rmtorch.formatting import tokenize_response
from rmtorch.pairs import tokenize_pairs, validate_row
from rmtorch.score import RewardScorer, check_row_lists
from tests.conftest import PROMPTS, RESPONSES, ROWS, message_rows, reward_alone, save_tiny_llama, tiny_llama


@pytest.fixture(params=["smol", "bos"])
def tokenizer(request, smol_tokenizer, bos_tokenizer):
    return smol_tokenizer if request.param == "smol" else bos_tokenizer


BATCHING = {
    "packed": dict(packing=True),
    "padded-right": dict(packing=False, padding_side="right"),
    "padded-left": dict(packing=False, padding_side="left"),
}


def grpo_rows(kind: str, generations: int = 3):
    """Each prompt repeated for `generations` completions of mixed length, adjacent (as GRPO orders them)."""
    prompts, completions = ROWS[kind]()
    order = [(p, (p + shift) % len(prompts)) for p in range(len(prompts)) for shift in range(generations)]
    return [prompts[p] for p, _ in order], [completions[c] for _, c in order]


@pytest.mark.parametrize("batching", list(BATCHING))
@pytest.mark.parametrize("kind", ["text", "messages"])
def test_fused_rewards_equal_one_by_one(tokenizer, kind, batching):
    model = tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    prompts, completions = grpo_rows(kind)
    # A small budget forces several micro-batches (and split prompt groups) of mixed lengths.
    scorer = RewardScorer(model, tokenizer, max_tokens_per_batch=64, **BATCHING[batching])
    rewards = scorer(prompts, completions)
    expected = [reward_alone(model, tokenize_response(tokenizer, p, c)) for p, c in zip(prompts, completions)]
    assert rewards.dtype == torch.float32 and rewards.shape == (len(prompts),)
    torch.testing.assert_close(rewards, torch.tensor(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["text", "messages"])
def test_packing_computes_each_prompt_once(bos_tokenizer, kind):
    model = tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id)
    scorer = RewardScorer(model, bos_tokenizer)
    prompts, completions = grpo_rows(kind)
    split = scorer.split(prompts, completions)
    seen_tokens = []
    scorer.reward_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen_tokens.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    scorer.score_split(split)
    full_tokens = sum(len(ids) for ids in split.sequences("full"))
    repeated_prompt_tokens = sum(len(ids) for ids in split.prompt_ids) - sum(len(ids) for ids in split.prompt_ids[::3])
    assert sum(seen_tokens) <= full_tokens - repeated_prompt_tokens


def test_pad_equal_eos_scores_the_eos(smol_tokenizer):
    # SmolLM2: pad == eos; the EOS training appends is the pooled token (not skipped as in TRL).
    model = tiny_llama(len(smol_tokenizer), pad_token_id=smol_tokenizer.pad_token_id)
    scorer = RewardScorer(model, smol_tokenizer)
    ids = tokenize_response(smol_tokenizer, PROMPTS[0], RESPONSES[0])
    assert ids[-1] == smol_tokenizer.eos_token_id == smol_tokenizer.pad_token_id
    assert scorer(PROMPTS[:2], RESPONSES[:2])[0].item() == pytest.approx(reward_alone(model, ids), abs=1e-5)
    assert scorer(PROMPTS[:2], RESPONSES[:2])[0].item() != pytest.approx(reward_alone(model, ids[:-1]), abs=1e-3)


@pytest.mark.parametrize("kind", ["text", "messages"])
def test_scorer_ids_equal_training_ids(tokenizer, kind):
    model = tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    prompts, completions = ROWS[kind]()
    rows = [
        {"prompt": p, "chosen": c, "rejected": completions[(i + 1) % len(completions)]}
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]
    training_ids = tokenize_pairs(rows, tokenizer)["chosen_ids"]
    assert RewardScorer(model, tokenizer).split(prompts, completions).sequences("full") == training_ids


def test_prompt_split_is_a_prefix_of_the_full_ids(tokenizer):
    model = tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    prompts, completions = message_rows()
    split = RewardScorer(model, tokenizer).split(prompts, completions)
    for prompt, ids in zip(prompts, split.prompt_ids):
        generation_prompt = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        assert ids == list(generation_prompt)
    assert not split.unclosed_think.any() and split.thinking_ids == [[] for _ in prompts]


def test_long_rows_keep_their_end_and_bos(bos_tokenizer):
    model = tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id)
    scorer = RewardScorer(model, bos_tokenizer, max_length=6)
    details = scorer(PROMPTS, RESPONSES, return_details=True)
    full = [tokenize_response(bos_tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    kept = [ids if len(ids) <= 6 else ids[:1] + ids[-5:] for ids in full]
    assert details.truncated.tolist() == [len(ids) > 6 for ids in full]
    assert details.num_tokens.tolist() == [len(ids) for ids in kept]
    torch.testing.assert_close(
        details.rewards, torch.tensor([reward_alone(model, ids) for ids in kept]), atol=1e-5, rtol=0
    )


def test_max_length_defaults_to_the_model_context(smol_tokenizer):
    model = tiny_llama(len(smol_tokenizer), pad_token_id=smol_tokenizer.pad_token_id)
    assert RewardScorer(model, smol_tokenizer).max_length == model.config.max_position_embeddings == 512


@pytest.mark.parametrize("kind", ["text", "messages"])
def test_empty_completion_is_scored_in_training_format(tokenizer, kind):
    model = tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    prompts, completions = ROWS[kind]()
    empty = "" if kind == "text" else [{"role": "assistant", "content": ""}]
    rewards = RewardScorer(model, tokenizer)(prompts[:2], [empty, completions[1]])
    assert rewards[0].item() == pytest.approx(
        reward_alone(model, tokenize_response(tokenizer, prompts[0], empty)), abs=1e-5
    )


@pytest.mark.parametrize(
    "prompts, completions, message",
    [
        (["a", "b"], ["x"], "2 prompts but 1 completions"),
        (
            ["a", [{"role": "user", "content": "b"}]],
            ["x", [{"role": "assistant", "content": "y"}]],
            "Row 1 is messages but row 0 is text",
        ),
        (["a"], [[{"role": "assistant", "content": "y"}]], "Row 0: prompt is str and completion is list"),
        ("a", "x", "must be lists"),
    ],
)
def test_bad_inputs_are_refused_with_a_sentence(smol_tokenizer, prompts, completions, message):
    scorer = RewardScorer(tiny_llama(len(smol_tokenizer)), smol_tokenizer)
    with pytest.raises(ValueError, match=message):
        scorer(prompts, completions)


USER = [{"role": "user", "content": "hi"}]
ASSISTANT = [{"role": "assistant", "content": "y"}]
BAD_MESSAGES = {
    "empty completion list": (
        [USER, USER],
        [ASSISTANT, []],
        r"Row 1, field 'completion': expected a non-empty list of messages, got \[\]\. For an empty response give "
        r"\[\{'role': 'assistant', 'content': ''\}\]\.",
    ),
    "completion message without role": (
        [USER],
        [[{"content": "y"}]],
        r"Row 0, field 'completion', message 0: each message needs 'role' and 'content' keys, got \{'content': 'y'\}",
    ),
    "prompt message without role": (
        [USER, [{"role": "system", "content": "be brief"}, {"content": "hi"}]],
        [ASSISTANT, ASSISTANT],
        r"Row 1, field 'prompt', message 1: each message needs 'role' and 'content' keys",
    ),
    "unknown role": (
        [USER],
        [[{"role": "robot", "content": "y"}]],
        r"Row 0, field 'completion', message 0: unknown role 'robot'; use one of system, user, assistant, tool\.",
    ),
    "completion not ending with the assistant": (
        [USER],
        [ASSISTANT + USER],
        r"Row 0, field 'completion': the conversation must end with an assistant turn \(the response to score\), "
        r"but it ends with 'user'",
    ),
    "content that is not text": (
        [USER],
        [[{"role": "assistant", "content": 5}]],
        r"Row 0, field 'completion', message 0: 'content' must be text, got int",
    ),
}


@pytest.mark.parametrize("prompts, completions, message", list(BAD_MESSAGES.values()), ids=list(BAD_MESSAGES))
def test_messages_training_refuses_are_refused_naming_row_field_and_message(
    bos_tokenizer, prompts, completions, message
):
    """Before, an empty completion list got "prompt is list and completion is list. Give both as ... lists" and
    role 'robot' was scored."""
    with pytest.raises(ValueError, match=message):
        check_row_lists(prompts, completions)  # what RemoteScorer runs before any request
    with pytest.raises(ValueError, match=message):
        RewardScorer(tiny_llama(len(bos_tokenizer)), bos_tokenizer)(prompts, completions)


@pytest.mark.parametrize("case", ["completion message without role", "unknown role", "content that is not text"])
def test_scorer_and_training_share_one_message_rule(case):
    """The same message list gets the same sentence from training (a chosen response) and the scorer."""
    prompts, completions, _ = BAD_MESSAGES[case]
    with pytest.raises(PairDataError) as scored:
        check_row_lists(prompts, completions)
    row = {"prompt": prompts[0], "chosen": completions[0], "rejected": ASSISTANT}
    with pytest.raises(PairDataError) as trained:
        validate_row(row, "pairs.jsonl, row 0")
    assert str(scored.value).split(", message 0: ")[1] == str(trained.value).split(", message 0: ")[1]


def test_empty_prompts_and_empty_responses_are_still_scored():
    assert check_row_lists([None, []], [ASSISTANT, [{"role": "assistant", "content": ""}]]) == "messages"


def test_conversations_need_a_chat_template(bos_tokenizer):
    tokenizer = copy.deepcopy(bos_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        RewardScorer(tiny_llama(len(tokenizer)), tokenizer)(*message_rows())


def test_scores_in_eval_mode_and_restores_the_mode(bos_tokenizer):
    model = tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id, attention_dropout=0.5)
    scorer = RewardScorer(model, bos_tokenizer)
    expected = scorer(PROMPTS, RESPONSES)
    model.train()
    torch.testing.assert_close(scorer(PROMPTS, RESPONSES), expected, atol=0, rtol=0)
    assert model.training


def test_from_pretrained_loads_a_saved_model(tmp_path, bos_tokenizer):
    save_tiny_llama(tmp_path, bos_tokenizer)
    scorer = RewardScorer.from_pretrained(str(tmp_path), device="cpu", max_tokens_per_batch=32)
    expected = RewardScorer(tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id), bos_tokenizer)(
        PROMPTS, RESPONSES
    )
    assert not scorer.model.training and scorer.max_tokens_per_batch == 32
    torch.testing.assert_close(scorer(PROMPTS, RESPONSES), expected, atol=1e-6, rtol=0)


def test_reward_func_has_trl_signature(bos_tokenizer):
    scorer = RewardScorer(tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id), bos_tokenizer)
    reward_func = scorer.as_reward_func(name="rm", transform=lambda r: 2 * r)
    values = reward_func(prompts=PROMPTS, completions=RESPONSES, completion_ids=[[1]] * 4, trainer_state=None)
    assert reward_func.__name__ == "rm"
    assert isinstance(values, list) and all(isinstance(v, float) for v in values)
    torch.testing.assert_close(torch.tensor(values), 2 * scorer(PROMPTS, RESPONSES), atol=1e-6, rtol=0)


def test_the_callers_model_is_left_as_it_was(bos_tokenizer):
    model = tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id, attn_implementation="eager")
    scorer = RewardScorer(model, bos_tokenizer)
    assert model.config._attn_implementation == "eager"
    scorer(*grpo_rows("text"))  # packed: block attention only for the duration of each forward
    assert model.config._attn_implementation == "eager"
    assert RewardScorer(model, bos_tokenizer, packing=False)(PROMPTS, RESPONSES).isfinite().all()


def test_identical_rows_are_scored_once_and_get_identical_rewards(bos_tokenizer):
    model = tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id)
    scorer = RewardScorer(model, bos_tokenizer)
    tokens = []
    scorer.reward_model.register_forward_pre_hook(
        lambda module, args, kwargs: tokens.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    rewards = scorer(PROMPTS * 3, RESPONSES * 3)
    assert torch.equal(rewards[:4], rewards[4:8]) and torch.equal(rewards[:4], rewards[8:])
    assert sum(tokens) == sum(len(ids) for ids in scorer.split(PROMPTS, RESPONSES).sequences("full"))


def test_a_missing_prompt_and_the_text_null_are_different_prompts(bos_tokenizer):
    model = tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id)
    scorer = RewardScorer(model, bos_tokenizer)
    together = scorer.split(["null", None], [" yes", "null yes"])
    alone = [scorer.split([prompt], [completion]) for prompt, completion in (("null", " yes"), (None, "null yes"))]
    assert together.prompt_ids == [split.prompt_ids[0] for split in alone]
    assert together.prompt_ids[0] != together.prompt_ids[1]
