"""rmtorch against TRL 1.16's RewardTrainer as the oracle: tokens, collated batches, pooling, loss, gradients, a
4-step training trajectory and evaluation numbers, on tiny random Llama models in fp32."""

from __future__ import annotations

import copy
import json

import datasets
import pytest
import torch
from safetensors.torch import load_file

from rmtorch.batching import PairCollator
from rmtorch.loss import pairwise_loss
from rmtorch.metrics import eval_metrics
from rmtorch.model import RewardModel, last_token_index
from rmtorch.pairs import tokenize_pairs
from tests.conftest import save_tiny_llama, tiny_llama

trl = pytest.importorskip("trl")
from trl import RewardConfig, RewardTrainer  # noqa: E402
from trl.trainer.reward_trainer import DataCollatorForPreference  # noqa: E402

PROMPT, CHOSEN, REJECTED = "what color is the sky ?", " blue", " green"


def reward_config(tmp_path, **overrides) -> RewardConfig:
    options = dict(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        max_length=None,
    )
    options.update(overrides)
    return RewardConfig(**options)


def trl_tokenized(tmp_path, tokenizer, rows, **config) -> datasets.Dataset:
    model = tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    trainer = RewardTrainer(
        model=model,
        args=reward_config(tmp_path, **config),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=copy.deepcopy(tokenizer),
    )
    return trainer.train_dataset


def dataset_formats():
    messages = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    return {
        "standard": [
            {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
            {"prompt": "how many are 2 + 2 ?", "chosen": " 4", "rejected": " 5"},
        ],
        "implicit": [{"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED}],
        "ends_with_eos": [{"prompt": PROMPT, "chosen": CHOSEN + "{eos}", "rejected": REJECTED}],
        "conversational": [
            {
                "prompt": messages("user", PROMPT),
                "chosen": messages("assistant", "blue"),
                "rejected": messages("assistant", "green"),
            }
        ],
        "conversational_implicit": [
            {
                "chosen": messages("user", PROMPT) + messages("assistant", "blue"),
                "rejected": messages("user", PROMPT) + messages("assistant", "green"),
            }
        ],
        "conversational_system": [
            {
                "prompt": messages("system", "answer yes or no") + messages("user", PROMPT),
                "chosen": messages("assistant", "yes"),
                "rejected": messages("assistant", "no"),
            }
        ],
    }


@pytest.mark.parametrize("tokenizer_name", ["smol_tokenizer", "bos_tokenizer"])
@pytest.mark.parametrize("fmt", list(dataset_formats()))
def test_token_ids_match_trl(request, tmp_path, tokenizer_name, fmt):
    tokenizer = request.getfixturevalue(tokenizer_name)
    rows = json.loads(json.dumps(dataset_formats()[fmt]).replace("{eos}", tokenizer.eos_token))
    ours = tokenize_pairs(datasets.Dataset.from_list(rows), tokenizer)
    theirs = trl_tokenized(tmp_path, tokenizer, rows)
    assert ours["chosen_ids"] == theirs["chosen_ids"]
    assert ours["rejected_ids"] == theirs["rejected_ids"]


def test_pretokenized_and_legacy_columns_match_trl(tmp_path, bos_tokenizer):
    rows = [{"chosen_ids": [1, 5, 6, 2], "rejected_ids": [1, 7, 2], "margin": 0.5}]
    legacy = [{"chosen_input_ids": r["chosen_ids"], "rejected_input_ids": r["rejected_ids"]} for r in rows]
    ours = tokenize_pairs(datasets.Dataset.from_list(rows), bos_tokenizer)
    theirs = trl_tokenized(tmp_path, bos_tokenizer, rows)
    assert ours["chosen_ids"] == theirs["chosen_ids"] and ours["rejected_ids"] == theirs["rejected_ids"]
    assert ours["margin"] == pytest.approx(theirs["margin"])
    with pytest.warns(FutureWarning):
        theirs_legacy = trl_tokenized(tmp_path, bos_tokenizer, legacy)
    assert (
        tokenize_pairs(datasets.Dataset.from_list(legacy), bos_tokenizer)["chosen_ids"] == theirs_legacy["chosen_ids"]
    )


@pytest.mark.parametrize("offset", [None, 0, -1])
def test_max_length_drop_keeps_the_same_rows_as_trl(tmp_path, smol_tokenizer, offset):
    rows = [
        {"prompt": "what is the colour of " + "the " * n, "chosen": " blue", "rejected": " a deep green"}
        for n in range(6)
    ]
    lengths = [len(smol_tokenizer(r["prompt"] + r["rejected"] + smol_tokenizer.eos_token)["input_ids"]) for r in rows]
    max_length = None if offset is None else lengths[3] + offset
    ours, report = tokenize_pairs(
        datasets.Dataset.from_list(rows), smol_tokenizer, max_length=max_length, truncation="drop", return_report=True
    )
    theirs = trl_tokenized(tmp_path, smol_tokenizer, rows, max_length=max_length)
    assert ours["chosen_ids"] == theirs["chosen_ids"]
    assert report.dropped_too_long == len(rows) - len(theirs)  # TRL drops silently; rmtorch counts


@pytest.mark.parametrize("pad_to_multiple_of", [None, 4])
@pytest.mark.parametrize("with_margin", [False, True])
def test_collated_batch_matches_trl(pad_to_multiple_of, with_margin):
    examples = [{"chosen_ids": [5, 6, 7], "rejected_ids": [8, 9]}, {"chosen_ids": [6, 7], "rejected_ids": [8]}]
    if with_margin:
        for e, m in zip(examples, (0.5, 1.0)):
            e["margin"] = m
    ours = PairCollator(pad_token_id=2, pad_to_multiple_of=pad_to_multiple_of)(examples)
    theirs = DataCollatorForPreference(pad_token_id=2, pad_to_multiple_of=pad_to_multiple_of)(examples)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype
        assert torch.equal(ours[key], theirs[key])


def _batch(tokenizer, rows, padding_side="right"):
    tokenized = tokenize_pairs(datasets.Dataset.from_list(rows), tokenizer)
    return PairCollator(tokenizer.pad_token_id, padding_side=padding_side)(tokenized.to_list())


PAIRS = [
    {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "margin": 0.3},
    {"prompt": "how many are 2 + 2 ?", "chosen": " 4 .", "rejected": " it is 5", "margin": 0.0},
    {"prompt": "hello", "chosen": " hello world", "rejected": " no", "margin": 1.5},
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pooled_rewards_equal_trl_when_pad_differs_from_eos(bos_tokenizer, padding_side):
    model = tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id)
    batch = _batch(bos_tokenizer, PAIRS, padding_side)
    with torch.no_grad():
        ours = RewardModel(model)(batch["input_ids"], batch["attention_mask"])
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_pooled_rewards_differ_from_trl_exactly_where_eos_equals_pad(smol_tokenizer):
    model = tiny_llama(len(smol_tokenizer), pad_token_id=smol_tokenizer.pad_token_id)
    batch = _batch(smol_tokenizer, PAIRS)
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ours = RewardModel(model)(input_ids, mask)
        theirs = model(input_ids=input_ids, attention_mask=mask).logits.squeeze(-1)
        hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        per_token = model.score(hidden).squeeze(-1)  # (2B, T): the score at every position
    rows = torch.arange(len(input_ids))
    last = last_token_index(mask)
    assert (input_ids[rows, last] == smol_tokenizer.eos_token_id).all()  # every sequence ends with the appended EOS
    assert torch.allclose(ours, per_token[rows, last], atol=1e-6)  # rmtorch scores the EOS
    assert torch.allclose(theirs, per_token[rows, last - 1], atol=1e-6)  # TRL skips it (pad id == eos id)
    assert (ours - theirs).abs().min() > 1e-4


@pytest.mark.parametrize("center", [None, 0.01])
@pytest.mark.parametrize("with_margin", [False, True])
def test_loss_and_gradients_match_trl(tmp_path, bos_tokenizer, center, with_margin):
    rows = [dict(r) for r in PAIRS] if with_margin else [{k: v for k, v in r.items() if k != "margin"} for r in PAIRS]
    batch = _batch(bos_tokenizer, rows)
    ours_model = tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id)
    theirs_model = copy.deepcopy(ours_model)
    trainer = RewardTrainer(
        model=theirs_model,
        args=reward_config(tmp_path, center_rewards_coefficient=center),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=copy.deepcopy(bos_tokenizer),
    )
    theirs_loss = trainer.compute_loss(theirs_model, dict(batch))
    theirs_loss.backward()
    rewards = RewardModel(ours_model)(batch["input_ids"], batch["attention_mask"])
    chosen, rejected = rewards.chunk(2)
    ours_loss = pairwise_loss(chosen, rejected, batch.get("margin"), center or 0.0)
    ours_loss.backward()
    assert abs(ours_loss.item() - theirs_loss.item()) <= 1e-6
    theirs_grads = dict(theirs_model.named_parameters())
    for name, param in ours_model.named_parameters():
        assert torch.allclose(param.grad, theirs_grads[name].grad, atol=1e-6, rtol=0), name


@pytest.mark.parametrize("grad_accum", [2, 3])
def test_four_step_training_matches_reward_trainer(tmp_path, bos_tokenizer, grad_accum):
    """Sequential order, batch 2, grad accumulation 2, warmup 1, margins, centering; head drawn from the seed.
    With accumulation 3 the epoch's 8 micro-batches end in a step of 2: its loss is their mean, as in TRL."""
    import train

    words = "what color is the sky blue green red yes no good bad".split()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(16):
        pick = lambda n: " ".join(words[j] for j in torch.randint(len(words), (n,), generator=gen).tolist())  # noqa: E731
        rows.append(
            {
                "prompt": pick(3 + i % 4),
                "chosen": " " + pick(1 + i % 3),
                "rejected": " " + pick(2 + i % 2),
                "margin": float(i % 3) / 2,
            }
        )
    rows = [r for r in rows if r["chosen"] != r["rejected"]]
    assert len(rows) == 16  # 8 micro-batches of 2: with accumulation 3, steps of 3, 3 and 2 micro-batches
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = save_tiny_llama(tmp_path / "base", bos_tokenizer, causal=True)  # no head: both draw it from seed 42

    hyper = dict(lr=1e-3, batch_size=2, grad_accum=grad_accum, warmup_steps=1, max_steps=4, center=0.01, seed=42)
    trl_args = reward_config(
        tmp_path,
        learning_rate=hyper["lr"],
        per_device_train_batch_size=hyper["batch_size"],
        gradient_accumulation_steps=hyper["grad_accum"],
        warmup_steps=hyper["warmup_steps"],
        max_steps=hyper["max_steps"],
        center_rewards_coefficient=hyper["center"],
        seed=hyper["seed"],
        train_sampling_strategy="sequential",
        logging_steps=1,
        gradient_checkpointing=False,
        max_grad_norm=1.0,
    )
    trainer = RewardTrainer(
        model=str(model_dir),
        args=trl_args,
        train_dataset=datasets.load_dataset("json", data_files=str(train_file), split="train"),
        processing_class=copy.deepcopy(bos_tokenizer),
    )
    trainer.train()

    out = tmp_path / "ours"
    train.main(
        [
            "--model",
            str(model_dir),
            "--train_file",
            str(train_file),
            "--eval_file",
            str(train_file),
            "--output_dir",
            str(out),
            "--lr",
            str(hyper["lr"]),
            "--batch_size",
            "2",
            "--grad_accum",
            str(grad_accum),
            "--warmup_steps",
            "1",
            "--max_steps",
            "4",
            "--center_rewards_coefficient",
            "0.01",
            "--margin_column",
            "margin",
            "--seed",
            "42",
            "--shuffle",
            "false",
            "--bf16",
            "false",
            "--max_grad_norm",
            "1.0",
            "--max_length",
            "none",
            "--log_every",
            "1",
            "--packing",
            "false",  # TRL's padded batches, token for token
        ]
    )
    ours = load_file(out / "model.safetensors")
    theirs = trainer.model.state_dict()
    assert ours.keys() <= theirs.keys()
    for name, tensor in ours.items():
        assert torch.allclose(tensor, theirs[name], atol=1e-6, rtol=0), name
    trl_losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    our_losses = [
        json.loads(line)["loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line and "eval_" not in line
    ]
    assert our_losses == pytest.approx(trl_losses, abs=1e-5)


def test_eval_loss_matches_trl_and_accuracy_is_pair_weighted(tmp_path, bos_tokenizer):
    rows = [{k: v for k, v in r.items() if k != "margin"} for r in PAIRS]  # 3 pairs, eval batch 2: batches of 2 and 1
    model = tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id)
    trainer = RewardTrainer(
        model=copy.deepcopy(model),
        args=reward_config(tmp_path, per_device_eval_batch_size=2),
        train_dataset=datasets.Dataset.from_list(rows),
        eval_dataset=datasets.Dataset.from_list(rows),
        processing_class=copy.deepcopy(bos_tokenizer),
    )
    theirs = trainer.evaluate()
    batch = _batch(bos_tokenizer, rows)
    with torch.no_grad():
        chosen, rejected = RewardModel(model)(batch["input_ids"], batch["attention_mask"]).chunk(2)
    ours = eval_metrics(chosen, rejected)
    assert ours["loss"] == pytest.approx(theirs["eval_loss"], abs=1e-6)
    assert ours["accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    batch_means = [
        (chosen[:2] > rejected[:2]).float().mean().item(),
        (chosen[2:] > rejected[2:]).float().mean().item(),
    ]
    assert theirs["eval_accuracy"] == pytest.approx(sum(batch_means) / 2)  # TRL: mean of batch means
