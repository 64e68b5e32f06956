"""rmtorch's process reward model against TRL's PRMTrainer (the last release that had it; TRL 1.16 no longer does):
token ids, label positions and the loss.

TRL's `tokenize_row` is reproduced below as the oracle, from its published behaviour, because the installed TRL no
longer ships it. TRL trained a 2-class token classifier (cross-entropy over the tokens whose label is not -100);
rmtorch reads one logit at the same positions, and the 2-class loss equals binary cross-entropy on l1 - l0.
"""

from __future__ import annotations

from itertools import chain

import pytest
import torch
import torch.nn.functional as F

from rmtorch.model import RewardModel
from rmtorch.steps import StepCollator, step_loss, step_model_inputs, tokenize_steps
from tests.conftest import tiny_llama

ROWS = [
    {"prompt": "Which number is larger, 9.8 or 9.11?", "completions": ["11 is greater than 8.", "Hence, 9.11 > 9.8."],
     "labels": [True, False]},
    {"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5.", "The answer is 5.", "Done."],
     "labels": [True, True, True]},
    {"prompt": "Compute 7 * 6.", "completions": ["7 * 6 = 48."], "labels": [False]},
]  # fmt: skip
BOS_ROWS = [
    {"prompt": "what color is the sky ?", "completions": ["the sky is blue", "yes it is blue"],
     "labels": [True, False]},
    {"prompt": "how many are 2 + 3 ?", "completions": ["2 + 3 = 5", "answer 5", "good"],
     "labels": [True, True, False]},
]  # fmt: skip


# --------------------------------------------------------------------------------- the oracle (TRL's behaviour)


def trl_prm_tokenize_row(features, tokenizer, step_separator, max_length, max_completion_length,
                         train_on_last_step_only, is_eval):  # fmt: skip
    """ORACLE: TRL PRMTrainer.tokenize_row as it last shipped: prompt and steps tokenized without special tokens,
    the separator's ids after each step, the step's label on the separator's last token (-100 elsewhere), the BOS id
    before the prompt when the tokenizer has one, then the completion and the whole cut to their maxima."""
    prompt_ids = tokenizer(features["prompt"], add_special_tokens=False)["input_ids"]
    completions_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in features["completions"]]
    if train_on_last_step_only and not is_eval:
        labels = [-100] * (len(features["labels"]) - 1) + [int(features["labels"][-1])]
    else:
        labels = [int(label) for label in features["labels"]]
    separator_ids = tokenizer.encode(step_separator, add_special_tokens=False)
    completions_ids = [completion + separator_ids for completion in completions_ids]
    labels = [[-100] * (len(completion) - 1) + [label] for completion, label in zip(completions_ids, labels)]
    completion_ids = list(chain(*completions_ids))
    labels = list(chain(*labels))
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    if max_completion_length is not None:
        completion_ids, labels = completion_ids[:max_completion_length], labels[:max_completion_length]
    input_ids = prompt_ids + completion_ids
    labels = [-100] * len(prompt_ids) + labels
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def oracle_rows(rows, tokenizer, separator, last_only=False):
    return [trl_prm_tokenize_row(r, tokenizer, separator, None, None, last_only, is_eval=False) for r in rows]


def labelled(oracle: dict) -> tuple[list[int], list[int]]:
    """(positions, labels) of the tokens TRL's loss reads."""
    pairs = [(i, label) for i, label in enumerate(oracle["labels"]) if label != -100]
    return [i for i, _ in pairs], [label for _, label in pairs]


# ------------------------------------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("case", ["smollm2", "bos"])
@pytest.mark.parametrize("last_only", [False, True])
def test_ids_and_label_positions_match_trl(case, last_only, smol_tokenizer, bos_tokenizer):
    tokenizer, rows, separator = (smol_tokenizer, ROWS, "\n") if case == "smollm2" else (bos_tokenizer, BOS_ROWS, ".")
    steps = tokenize_steps(rows, tokenizer, separator=separator, last_step_only=last_only)
    for i, oracle in enumerate(oracle_rows(rows, tokenizer, separator, last_only)):
        assert steps["ids"][i] == oracle["input_ids"]
        positions, labels = labelled(oracle)
        trained = [end for end, t in zip(steps["step_ends"][i], steps["trained"][i]) if t]
        assert trained == positions
        assert [v for v, t in zip(steps["labels"][i], steps["trained"][i]) if t] == [float(v) for v in labels]


def test_completion_string_split_by_the_separator_gives_the_same_ids(smol_tokenizer):
    joined = [{**r, "completions": "\n".join(r["completions"]) + "\n"} for r in ROWS]
    assert tokenize_steps(joined, smol_tokenizer)["ids"] == tokenize_steps(ROWS, smol_tokenizer)["ids"]


# --------------------------------------------------------------------------------------------------------- loss


def test_two_class_cross_entropy_equals_bce_on_the_logit_difference():
    torch.manual_seed(0)
    logits = torch.randn(64, 2, dtype=torch.float64) * 3
    labels = torch.randint(0, 2, (64,))
    trl_loss = F.cross_entropy(logits, labels)
    ours = F.binary_cross_entropy_with_logits(logits[:, 1] - logits[:, 0], labels.double())
    assert abs(trl_loss.item() - ours.item()) <= 1e-6


@pytest.mark.parametrize("packing", [True, False])
def test_loss_on_trl_batches_equals_trl_token_classification_loss(packing, smol_tokenizer):
    """A 2-class token classifier's per-token logits (l0, l1): TRL's cross-entropy over its padded batch with -100
    labels equals rmtorch's step loss on l1 - l0 read at rmtorch's step ends, packed or padded."""
    oracle = oracle_rows(ROWS, smol_tokenizer, "\n")
    length = max(len(o["input_ids"]) for o in oracle)
    torch.manual_seed(0)
    logits = torch.randn(len(oracle), length, 2)  # what TRL's AutoModelForTokenClassification would output
    labels = torch.full((len(oracle), length), -100)
    for row, o in enumerate(oracle):
        labels[row, : len(o["labels"])] = torch.tensor(o["labels"])
    trl_loss = F.cross_entropy(logits.view(-1, 2), labels.view(-1), ignore_index=-100)

    steps = tokenize_steps(ROWS, smol_tokenizer)
    batch = StepCollator(packing=False)([steps[i] for i in range(3)])
    difference = logits[..., 1] - logits[..., 0]  # (N, T): the one logit rmtorch's head gives
    rows, positions = batch["step_index"].unbind(-1)
    ours = step_loss(difference[rows, positions], batch["step_labels"], batch["step_trained"], "binary")
    assert abs(trl_loss.item() - ours.item()) <= 1e-6
    if packing:  # the packed batch reads the same positions, shifted to each row's place in the packed row
        packed = StepCollator(packing=True)([steps[i] for i in range(3)])
        flat = torch.cat([difference[r, : len(steps["ids"][r])] for r in range(3)])
        packed_loss = step_loss(flat[packed["step_index"]], packed["step_labels"], packed["step_trained"], "binary")
        assert abs(trl_loss.item() - packed_loss.item()) <= 1e-6


def test_model_loss_packed_equals_padded_and_trl_layout(smol_tokenizer):
    """Through a real (tiny) model: the step rewards of a packed and a padded batch are equal, and equal the head's
    output at TRL's labelled positions of each row run alone."""
    steps = tokenize_steps(ROWS, smol_tokenizer)
    model = RewardModel(tiny_llama(len(smol_tokenizer), pad_token_id=smol_tokenizer.pad_token_id))
    examples = [steps[i] for i in range(len(steps))]
    with torch.no_grad():
        packed = model(**step_model_inputs(StepCollator(packing=True)(examples)))
        padded = model(**step_model_inputs(StepCollator(packing=False, pad_token_id=2)(examples)))
        alone = []
        for o in oracle_rows(ROWS, smol_tokenizer, "\n"):
            hidden = model.model.model(input_ids=torch.tensor([o["input_ids"]])).last_hidden_state
            alone.append(model.model.score(hidden)[0, labelled(o)[0], 0])
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=0)
    torch.testing.assert_close(padded, torch.cat(alone), atol=1e-5, rtol=0)
