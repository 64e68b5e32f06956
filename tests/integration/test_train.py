"""train.py end to end: packed batches train like padded ones, length grouping and packing build the batches they
should, LoRA and QLoRA runs write adapters that load, resume exactly, and train."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rmtorch.batching import EpochSampler, LengthGroupedBatchSampler
from rmtorch.config import TrainConfig
from rmtorch.model import RewardModel
from rmtorch.pairs import tokenize_pairs
from tests.conftest import (
    PAIR_WORDS,
    TEXTS,
    batch_of,
    pair_rows,
    read_jsonl,
    train_argv,
    train_in_process,
    train_records,
    write_jsonl,
)


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    """Pairs of uneven lengths, for the BOS tokenizer."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", pair_rows(9, seed=4))


def fp32_run(tmp_path, name: str, model_dir, train_file, *flags: str) -> list[dict]:
    out = tmp_path / name
    options = (
        "--batch_size",
        "3",
        "--max_steps",
        "3",
        "--lr",
        "1e-3",
        "--shuffle",
        "false",
        "--warmup_steps",
        "0",
        "--warmup_ratio",
        "0",
    )
    train_in_process(train_argv(model_dir, train_file, out, *options, "--max_length", "none", *flags))
    return train_records(out)


def test_packed_training_equals_padded_training(tmp_path, tiny_model_dir, pair_file):
    padded = fp32_run(tmp_path, "padded", tiny_model_dir, pair_file, "--packing", "false")
    packed = fp32_run(tmp_path, "packed", tiny_model_dir, pair_file, "--packing", "true")
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], abs=1e-5)
    assert [r["grad_norm"] for r in packed] == pytest.approx([r["grad_norm"] for r in padded], rel=1e-5)  # norms ~10
    assert packed[-1]["tokens"] < padded[-1]["tokens"]  # each pair's prompt ran once


def test_grouped_packed_batches_are_the_samplers_batches(tmp_path, tiny_model_dir, pair_file, bos_tokenizer):
    """Each step's logged tokens are those of the batch the length-grouped sampler yields, packed with the prompt
    once: grouping and packing both shape what the model runs."""
    records = fp32_run(
        tmp_path,
        "fast",
        tiny_model_dir,
        pair_file,
        "--group_by_length",
        "true",
        "--packing",
        "true",
        "--shuffle",
        "true",
    )
    pairs = tokenize_pairs(read_jsonl(pair_file), bos_tokenizer)
    batches = list(
        LengthGroupedBatchSampler(EpochSampler(len(pairs), seed=42, shuffle=True), pairs.lengths(), batch_size=3)
    )
    packed_tokens = [
        sum(len(pairs[i]["chosen_ids"]) + len(pairs[i]["rejected_ids"]) - pairs[i]["prompt_length"] for i in batch)
        for batch in batches
    ]
    steps = [r["tokens"] - (records[i - 1]["tokens"] if i else 0) for i, r in enumerate(records)]
    assert steps == packed_tokens
    assert sorted(len(batch) for batch in batches) == [3, 3, 3]


def run_train(tmp_path, model_dir, *extra: str, data_dir=None) -> tuple:
    """A run of batch 4 on 16 learnable pairs (evaluated on 4 others), the data in data_dir (default: tmp_path);
    returns (output_dir, per-step losses)."""
    data_dir = data_dir or tmp_path
    data_dir.mkdir(exist_ok=True)
    train_file = write_jsonl(data_dir / "train.jsonl", pair_rows(16))
    eval_file = write_jsonl(data_dir / "eval.jsonl", pair_rows(4, seed=1))
    out = tmp_path / "out"
    options = ("--batch_size", "4", "--warmup_steps", "0", "--warmup_ratio", "0", "--bf16", "true")
    train_in_process(train_argv(model_dir, train_file, out, *options, *extra, eval_file=eval_file))
    return out, [r["loss"] for r in train_records(out)]


def test_lora_run_writes_an_adapter_that_peft_loads_and_a_merged_model(tmp_path, tiny_model_dir, bos_tokenizer):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification

    out, _ = run_train(
        tmp_path,
        tiny_model_dir,
        "--lora",
        "--lora_r",
        "4",
        "--merge_lora",
        "--max_steps",
        "2",
        "--lr",
        "1e-2",
        "--bf16",
        "false",
    )
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    with_peft = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    batch = batch_of(bos_tokenizer, TEXTS)
    with torch.no_grad():
        assert torch.allclose(RewardModel(with_peft)(**batch), RewardModel(merged)(**batch), atol=1e-5, rtol=0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(RewardModel(base)(**batch), RewardModel(merged)(**batch), atol=1e-3)  # it trained


def test_qlora_with_checkpointing_trains_on_cpu(tmp_path, tiny_model_dir):
    """bf16 compute (the default), an evaluation half way; two epochs over 4 batches: the second has the lower loss."""
    out, losses = run_train(
        tmp_path,
        tiny_model_dir,
        "--lora",
        "--load_in_4bit",
        "--gradient_checkpointing",
        "--max_steps",
        "8",
        "--lr",
        "5e-3",
        "--eval_every",
        "4",
    )
    assert json.loads((out / "rmtorch_adapter.json").read_text()) == {
        "load_in_4bit": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    assert sum(losses[4:]) < 0.5 * sum(losses[:4]), losses


def test_qlora_resumes_to_the_same_adapter(tmp_path, tiny_model_dir):
    """Checkpoints hold only adapters and head; resuming reloads the 4-bit base and continues exactly."""
    from safetensors.torch import load_file

    qlora = ("--lora", "--load_in_4bit", "--bf16", "false", "--max_steps", "4", "--lr", "5e-3")
    straight, _ = run_train(tmp_path / "a", tiny_model_dir, *qlora, "--save_every", "2", data_dir=tmp_path)
    checkpoint = straight / "checkpoints" / "step-000002"
    assert not any("base_layer" in name for name in load_file(checkpoint / "model.safetensors"))
    resumed, _ = run_train(tmp_path / "b", tiny_model_dir, *qlora, "--resume_from", str(checkpoint), data_dir=tmp_path)
    ours, theirs = load_file(resumed / "adapter_model.safetensors"), load_file(straight / "adapter_model.safetensors")
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("value", [torch.tensor(2.5), 2.5, None], ids=["tensor", "float", "none"])
def test_gradient_norm_of_every_engine_is_handled(value):
    """DDP/FSDP return a tensor, DeepSpeed a float or None (it clips inside its engine)."""
    from train import grad_norm_tensor

    norm = grad_norm_tensor(value)
    assert norm is None if value is None else (isinstance(norm, torch.Tensor) and norm.item() == 2.5)


@pytest.mark.parametrize("total_steps", [10, 19, 113])
def test_warm_up_steps_from_a_ratio_are_rounded_up_as_transformers_does(total_steps):
    from transformers import TrainingArguments

    from rmtorch.config import TrainConfig
    from train import build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(TrainConfig(warmup_ratio=0.05), optimizer, total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = TrainingArguments(output_dir="unused", warmup_steps=0.05).get_warmup_steps(total_steps)
    assert lrs.index(max(lrs)) == expected  # the peak is reached right after the warm-up steps


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_the_schedule_is_transformers_schedule_to_the_last_bit(schedule):
    """TRL's learning rates (transformers' get_scheduler), exactly, for every step and warm-up shape."""
    from transformers import get_scheduler

    from rmtorch.config import TrainConfig
    from train import build_scheduler

    name = "constant_with_warmup" if schedule == "constant" else schedule
    for total_steps, warmup_steps in [(10, 0), (10, 1), (19, 3), (7, 7), (113, 6)]:
        cfg = TrainConfig(scheduler=schedule, warmup_steps=warmup_steps, warmup_ratio=0.0)
        ours, theirs = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4) for _ in range(2))
        schedulers = build_scheduler(cfg, ours, total_steps), get_scheduler(name, theirs, warmup_steps, total_steps)
        for step in range(total_steps + 2):
            assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"], (total_steps, warmup_steps, step)
            for optimizer, scheduler in zip((ours, theirs), schedulers):
                optimizer.step()
                scheduler.step()


def test_an_eval_file_with_the_built_in_data_is_used_and_nothing_is_held_out(tmp_path):
    from rmtorch.builtin_data import builtin_pairs
    from rmtorch.config import TrainConfig
    from tests.conftest import make_bos_tokenizer
    from train import build_data

    eval_file = write_jsonl(tmp_path / "eval.jsonl", pair_rows(5, seed=3))
    cfg = TrainConfig(eval_file=str(eval_file), builtin_size=40)
    train_set, eval_set, report = build_data(cfg, make_bos_tokenizer())
    assert len(eval_set) == 5 and report["eval"]["rows_in"] == 5
    assert len(train_set) == report["train"]["rows_in"] == len(builtin_pairs(40, seed=cfg.seed))


class EpochLoader:
    """A loader of `size` micro-batches (epoch, index) per epoch, and the accelerator part optimizer_steps uses."""

    def __init__(self, size: int):
        self.size, self.epoch = size, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(self.size)])

    @staticmethod
    def skip_first_batches(loader, skip: int):
        return list(loader)[skip:]


def steps_of(size: int, grad_accum: int, count: int, state: dict | None = None) -> list[list]:
    from train import optimizer_steps

    state = state or {"epoch": 0, "batches_done_in_epoch": 0}
    loader = EpochLoader(size)
    steps = optimizer_steps(loader, state, TrainConfig(grad_accum=grad_accum), loader)
    out = []
    for _ in range(count):
        window, batches = next(steps)
        out.append(list(batches))
        assert len(out[-1]) == window
    return out


def test_optimizer_steps_take_grad_accum_micro_batches_and_fewer_at_an_uneven_epochs_end():
    assert [len(step) for step in steps_of(8, 3, 6)] == [3, 3, 2, 3, 3, 2]
    assert steps_of(8, 3, 4)[2:] == [[(0, 6), (0, 7)], [(1, 0), (1, 1), (1, 2)]]  # the next epoch starts anew
    assert [len(step) for step in steps_of(6, 3, 3)] == [3, 3, 3]
    assert [len(step) for step in steps_of(5, 1, 6)] == [1] * 6


def test_optimizer_steps_go_on_from_a_checkpoints_place():
    state = {"epoch": 1, "batches_done_in_epoch": 6}  # a checkpoint after the second step of epoch 1
    assert steps_of(8, 3, 2, state) == [[(1, 6), (1, 7)], [(2, 0), (2, 1), (2, 2)]]
    assert state == {"epoch": 2, "batches_done_in_epoch": 3}
    ended = {"epoch": 0, "batches_done_in_epoch": 8}  # saved after an epoch's last step
    assert steps_of(8, 3, 1, ended) == [[(1, 0), (1, 1), (1, 2)]]


def test_the_printed_data_line_speaks_as_the_tokenize_report():
    from rmtorch.pairs import TokenizeReport
    from train import report_summary

    report = TokenizeReport(rows_in=10, pairs_out=8, dropped_too_long=1, skipped_bad=1)
    assert report_summary({**report.to_dict(), "also_in_train": 2}) == report.summary()
    assert report.summary() == "8/10 pairs kept, 1 dropped as longer than max_length, 1 bad rows skipped"


def length_rows(count: int, seed: int, chosen_longer: bool) -> list[dict]:
    """Pairs of random words whose only difference is length: the chosen response always the longer one, or
    longer or shorter at random (length says nothing)."""
    rng = random.Random(seed)
    pick = lambda n: " ".join(rng.choice(PAIR_WORDS) for _ in range(n))  # noqa: E731
    rows = []
    for _ in range(count):
        short, long = rng.randint(1, 4), rng.randint(6, 12)
        chosen, rejected = (long, short) if chosen_longer or rng.random() < 0.5 else (short, long)
        rows.append({"prompt": pick(3), "chosen": " " + pick(chosen), "rejected": " " + pick(rejected)})
    return rows


def test_length_penalty_lowers_the_rewards_correlation_with_length(tmp_path, tiny_model_dir):
    # Trained where the chosen response is always longer, evaluated where length is uninformative.
    train_file = write_jsonl(tmp_path / "longer.jsonl", length_rows(32, seed=0, chosen_longer=True))
    eval_file = write_jsonl(tmp_path / "neutral.jsonl", length_rows(32, seed=1, chosen_longer=False))

    def correlation(penalty: str) -> float:
        options = ("--batch_size", "8", "--max_steps", "8", "--lr", "1e-3", "--warmup_ratio", "0")
        argv = train_argv(tiny_model_dir, train_file, tmp_path / penalty, *options, eval_file=eval_file)
        return train_in_process([*argv, "--length_penalty", penalty])["reward_length_pearson"]

    learned, penalised = correlation("0"), correlation("3")  # 0.91 and 0.17 here
    assert learned > 0.6  # without the penalty the model learns that longer is better
    assert abs(penalised) < learned / 2
