"""Train a reward model with a hand-written Accelerate loop.

    accelerate launch train.py                      # embedded SmolLM2-135M-Instruct on the built-in dataset
    accelerate launch train.py --config cfg.yaml --lr 2e-5 --train_file pairs.jsonl

Reads top to bottom: builders for the model, the data and the optimizer; `train_step` (one micro-batch:
chosen and rejected through the model together, the pairwise loss, backward); `evaluate` (the same scoring
path and report as evaluate.py); then `main`, the loop, one concern per commented block.
`python train.py --help` lists every option with its default.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rmtorch.accelerator import engine_name, launch_accelerator
from rmtorch.attention import use_block_attention
from rmtorch.batching import EpochSampler, LengthGroupedBatchSampler, PackedPairCollator, PairCollator, model_inputs
from rmtorch.builtin_data import builtin_pairs
from rmtorch.checkpoint import (
    checkpoint_trainable_weights_only,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    truncate_metrics,
)
from rmtorch.cli import run, set_cpu_threads
from rmtorch.config import TrainConfig, parse_config, to_yaml, tracker_names
from rmtorch.files import PairDataError, Rows, read_rows, write_json, write_text
from rmtorch.group_loss import ranking_loss
from rmtorch.group_metrics import group_report
from rmtorch.groups import (
    GroupCollator,
    GroupReport,
    GroupSet,
    check_ties,
    is_group_data,
    score_groups,
    shared_groups,
    tokenize_groups,
)
from rmtorch.loading import load_reward_model, quantization_config_4bit, resolve_model_path
from rmtorch.lora import apply_lora, merge_adapter, save_adapter
from rmtorch.loss import length_penalty, pairwise_loss
from rmtorch.metrics import StepMetrics, pair_report, report_scalars
from rmtorch.model import (
    RewardModel,
    compile_elementwise,
    compute_rewards,
    disable_dropout,
    enable_gradient_checkpointing,
    score_pairs,
)
from rmtorch.outputs import check_new_run, check_resume, check_writable, fingerprint, read_marker, write_marker
from rmtorch.pairs import TokenizeReport, shared_pairs, tokenize_pairs
from rmtorch.ratings import (
    RatingCollator,
    RatingReport,
    RatingSet,
    describe_attributes,
    rating_report,
    regression_loss,
    shared_ratings,
    target_scale,
    tokenize_ratings,
    write_rating_report,
)
from rmtorch.report import plot_training_curves, write_report
from rmtorch.steps import (
    StepCollator,
    StepReport,
    StepSet,
    compute_step_rewards,
    step_correct,
    step_loss,
    step_model_inputs,
    step_report,
    tokenize_steps,
    write_step_report,
)

MAX_NONFINITE_STEPS_IN_A_ROW = 5
DEEPSPEED_DEPRECATION = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator of this launch (one process, DDP, FSDP or DeepSpeed; GPUs or CPU processes). The scheduler is
    stepped by hand once per optimizer step; prepare() only makes it part of the checkpoints (under DeepSpeed the
    engine steps it)."""
    accelerator = launch_accelerator(
        mixed_precision="bf16" if cfg.bf16 else "no", grad_accum=cfg.grad_accum, batch_size=cfg.batch_size,
        max_grad_norm=cfg.max_grad_norm, step_scheduler_with_optimizer=False,
        log_with=tracker_names(cfg.report_to) or None, project_dir=str(Path(cfg.output_dir) / "trackers"),
    )  # fmt: skip
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # ZeRO's first step calls a torch collective that torch deprecates; every process printed the FutureWarning
        # into the progress bar, and only a DeepSpeed release can act on it.
        warnings.filterwarnings("ignore", message=DEEPSPEED_DEPRECATION, category=FutureWarning)
    return accelerator


def build_model(cfg: TrainConfig, accelerator: Accelerator) -> tuple[RewardModel, object]:
    """The base model with a new score head (drawn from the seed, as TRL), dropout off, and optionally gradient
    checkpointing and LoRA/QLoRA: a 4-bit nf4 body computing in bf16 (fp32 with --bf16 false), while norms and the
    score head stay fp32 and the head is always trained in full."""
    quantization_config = quantization_config_4bit(compute_dtype(cfg)) if cfg.load_in_4bit else None
    with accelerator.main_process_first():  # the main process converts the embedded GGUF once; the others read it
        model_path = resolve_model_path(cfg.model)
    # Every process loads at once: under DeepSpeed ZeRO-3 building the weights is a collective.
    outputs = len(cfg.attribute_names()) if cfg.objective == "regression" else 1  # a rating model: one per attribute
    model, tokenizer = load_reward_model(
        model_path, trust_remote_code=cfg.trust_remote_code, quantization_config=quantization_config,
        num_labels=outputs,
    )  # fmt: skip
    disable_dropout(model)
    if cfg.packing:  # packed rows run block attention, also when a checkpointed layer recomputes in backward
        use_block_attention(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target=cfg.lora_target)
        checkpoint_trainable_weights_only(accelerator)  # checkpoints hold adapters and head; the body is the base
    if cfg.compile:
        compile_elementwise(model)
    return RewardModel(model), tokenizer


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.bf16 else torch.float32


def build_data(cfg: TrainConfig, tokenizer) -> tuple:
    """(train pairs, eval pairs, data report): validated and tokenized before anything is written."""
    if cfg.train_file is None:  # the built-in dataset: its last rows are held out, unless --eval_file is given
        rows = Rows(builtin_pairs(cfg.builtin_size, seed=cfg.seed), "built-in dataset")
        num_eval = 0 if cfg.eval_file is not None else max(1, int(len(rows) * cfg.eval_fraction))
        train_rows = rows.select(range(len(rows) - num_eval))
        eval_rows = (
            read_rows(cfg.eval_file, cfg.on_bad_row)
            if cfg.eval_file is not None
            else rows.select(range(len(rows) - num_eval, len(rows)))
        )
    else:
        train_rows = read_rows(cfg.train_file, cfg.on_bad_row)
        if cfg.eval_file is not None:
            eval_rows = read_rows(cfg.eval_file, cfg.on_bad_row)
        else:
            train_rows, eval_rows = train_rows.split(cfg.eval_fraction, cfg.seed)
    if cfg.objective == "steps":  # a process reward model: step-labelled rows (their `completions` are not groups)
        return build_step_data(cfg, tokenizer, train_rows, eval_rows)
    if cfg.objective == "regression":  # a rating model: rows with a response and its attributes' ratings
        return build_rating_data(cfg, tokenizer, train_rows, eval_rows)
    if is_group_data(train_rows) or is_group_data(eval_rows):
        return build_group_data(cfg, tokenizer, train_rows, eval_rows)
    options = dict(
        max_length=cfg.max_length,
        truncation=cfg.truncation,
        on_bad_row=cfg.on_bad_row,
        margin_column=cfg.margin_column,
    )
    ties = ["tie"] if "tie" in train_rows.column_names else []  # pairs labelled as ties (--tie_nu)
    train_set = tokenize_pairs(train_rows, tokenizer, **options, keep_columns=ties)
    categories = [cfg.category_column] if cfg.category_column in eval_rows.column_names else []
    eval_set = tokenize_pairs(eval_rows, tokenizer, **options, keep_columns=categories)
    check_ties(train_set, cfg.tie_nu)
    report = {
        "train": train_set.report.to_dict(),
        "eval": {**eval_set.report.to_dict(), "also_in_train": shared_pairs(train_set, eval_set)},
    }
    return train_set, eval_set, report


def build_group_data(cfg: TrainConfig, tokenizer, train_rows: Rows, eval_rows: Rows) -> tuple:
    """(train groups, eval groups, data report) of group data (responses with ranks or scores)."""
    if not (is_group_data(train_rows) and is_group_data(eval_rows)):
        raise PairDataError(
            f"{train_rows.source} and {eval_rows.source}: one holds groups, the other pairs; give both as groups."
        )
    if cfg.loss == "pairwise":
        raise ValueError(
            f"{train_rows.source} holds groups of responses: train them with --loss all_pairs or listwise."
        )
    if not cfg.packing or cfg.length_penalty:
        raise ValueError(
            "groups train on packed rows only, without --length_penalty: set --packing true, --length_penalty 0."
        )
    options = dict(max_length=cfg.max_length, truncation=cfg.truncation, on_bad_row=cfg.on_bad_row)
    train_set = tokenize_groups(train_rows, tokenizer, **options, allow_ties=cfg.tie_nu is not None)
    categories = [cfg.category_column] if cfg.category_column in eval_rows.column_names else []
    eval_set = tokenize_groups(
        eval_rows, tokenizer, **options, allow_ties=cfg.tie_nu is not None, keep_columns=categories
    )
    report = {
        "train": train_set.report.to_dict(),
        "eval": {**eval_set.report.to_dict(), "also_in_train": shared_groups(train_set, eval_set)},
    }
    return train_set, eval_set, report


def build_step_data(cfg: TrainConfig, tokenizer, train_rows: Rows, eval_rows: Rows) -> tuple:
    """(train steps, eval steps, data report) of step-labelled rows (prompt, completions, labels)."""
    options = dict(separator=cfg.step_separator, max_length=cfg.max_length, on_bad_row=cfg.on_bad_row)
    train_set = tokenize_steps(train_rows, tokenizer, **options, last_step_only=cfg.train_on_last_step_only)
    eval_set = tokenize_steps(eval_rows, tokenizer, **options)
    if train_set.label_kind != eval_set.label_kind:
        raise PairDataError(
            f"{train_rows.source} has {train_set.label_kind} step labels but {eval_rows.source} "
            f"{eval_set.label_kind}; give both true/false labels or both numbers."
        )
    seen = {tuple(ids) for ids in train_set["ids"]}
    report = {
        "train": train_set.report.to_dict(),
        "eval": {**eval_set.report.to_dict(), "also_in_train": sum(tuple(ids) in seen for ids in eval_set["ids"])},
    }
    return train_set, eval_set, report


def build_rating_data(cfg: TrainConfig, tokenizer, train_rows: Rows, eval_rows: Rows) -> tuple:
    """(train ratings, eval ratings, data report) of rated rows (prompt, response, one column per attribute)."""
    options = dict(max_length=cfg.max_length, truncation=cfg.truncation, on_bad_row=cfg.on_bad_row)
    train_set = tokenize_ratings(train_rows, tokenizer, cfg.attribute_names(), **options)
    eval_set = tokenize_ratings(eval_rows, tokenizer, cfg.attribute_names(), **options)
    # The training targets' scale, computed once: both sets' losses read it, and the saved config holds it.
    train_set.mean, train_set.std = eval_set.mean, eval_set.std = target_scale(train_set, cfg.normalize_targets)
    report = {
        "train": train_set.report.to_dict(),
        "eval": {**eval_set.report.to_dict(), "also_in_train": shared_ratings(train_set, eval_set)},
    }
    return train_set, eval_set, report


def build_train_loader(cfg: TrainConfig, train_set, tokenizer) -> DataLoader:
    """Batches of pairs: packed rows ([prompt, chosen, rejected], no padding) or TRL's padded batches; the order
    depends only on (seed, epoch), so a resumed run sees the same batches."""
    lengths = cfg.length_penalty > 0  # each response's tokens, for the penalty
    collate = (
        PackedPairCollator(response_lengths=lengths)
        if cfg.packing
        else PairCollator(pad_token_id=tokenizer.pad_token_id, response_lengths=lengths)
    )
    if isinstance(train_set, GroupSet):  # a group is one packed piece [prompt, response 1, response 2, ...]
        collate = GroupCollator()
    if isinstance(train_set, StepSet):  # rows packed (or padded) whole; the loss reads each step's separator
        collate = StepCollator(cfg.packing, tokenizer.pad_token_id, train_set.label_kind)
    if isinstance(train_set, RatingSet):  # one sequence per row, its targets beside it
        collate = RatingCollator(cfg.packing, tokenizer.pad_token_id, train_set.std)
    sampler = EpochSampler(len(train_set), seed=cfg.seed, shuffle=cfg.shuffle)
    if cfg.group_by_length:
        batches = LengthGroupedBatchSampler(sampler, train_set.lengths(), cfg.batch_size)
        return DataLoader(train_set, batch_sampler=batches, collate_fn=collate)
    return DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate)


def build_optimizer(cfg: TrainConfig, reward_model: RewardModel) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norms."""
    trainable = [p for p in reward_model.parameters() if p.requires_grad]
    is_matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in trainable]  # ZeRO-3 keeps the shape in ds_shape
    groups = [
        {"params": [p for p, matrix in zip(trainable, is_matrix) if matrix], "weight_decay": cfg.weight_decay},
        {"params": [p for p, matrix in zip(trainable, is_matrix) if not matrix], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]  # ZeRO drops an empty group, which a scheduler would count
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=True)


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The learning rate's factor at `step`: linear warm-up, then linear to 0, half a cosine to 0, or constant. The
    formulas of transformers' get_scheduler (TRL's schedule), written here because importing transformers.optimization
    imports peft and bitsandbytes: 2.3 s of every train.py process (tests/integration/test_train.py compares them)."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Linear warm-up, then linear, cosine or constant."""
    warmup_steps = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)  # rounded up, as transformers
    factor = functools.partial(lr_factor, schedule=cfg.scheduler, warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_steps(train_loader, state: dict, cfg: TrainConfig, accelerator: Accelerator) -> Iterator:
    """Each optimizer step's micro-batches as (how many, an iterator over them): grad_accum, or fewer in an epoch's
    last step; epochs follow each other from where `state` stands (a resumed run skips what its checkpoint did).
    The batches are fetched while the step runs, so Accelerate still sees each epoch's end."""
    while True:
        train_loader.set_epoch(state["epoch"])  # the prepared loader re-sets the sampler's epoch on iteration
        done = state["batches_done_in_epoch"]
        batches = iter(accelerator.skip_first_batches(train_loader, done) if done else train_loader)
        while (window := min(cfg.grad_accum, len(train_loader) - state["batches_done_in_epoch"])) > 0:
            state["batches_done_in_epoch"] += window
            yield window, itertools.islice(batches, window)
        state["epoch"], state["batches_done_in_epoch"] = state["epoch"] + 1, 0


def batch_loss(reward_model, batch: dict, cfg: TrainConfig, accelerator: Accelerator) -> tuple[torch.Tensor, ...]:
    """A micro-batch's loss and the (chosen, rejected) rewards the step's numbers count. Pairs: chosen and rejected in
    one forward, TRL's pairwise loss (or a group or tie loss over every ordered pair), plus the length penalty when
    asked. Steps (a process reward model): one logit per step read at its separator; "accuracy" is then step
    accuracy and "margin" the mean signed reward. Ratings (a rating model): the weighted MSE of the attributes;
    "accuracy" then counts rows whose reward (the weighted sum of attributes) is predicted above its target and
    "margin" is the mean reward error, predicted minus target."""
    if cfg.objective == "steps":
        step_rewards = reward_model(**step_model_inputs(batch))  # (K,) steps of the micro-batch
        kind, labels = batch["label_kind"], batch["step_labels"]
        # Each process's mean weighed by its share of the steps: the mean over all the micro-batch's steps.
        loss = step_loss(step_rewards, labels, batch["step_trained"], kind) * step_share(batch, accelerator)
        signed = torch.where(step_correct(step_rewards, labels, kind), 1.0, -1.0) * step_rewards.abs()
        return loss, signed, torch.zeros_like(signed)
    if cfg.objective == "regression":
        # (B, K) attributes, in the data's units (one attribute: the model's (B,) made a column)
        predictions = reward_model(**model_inputs(batch)).view(len(batch["targets"]), -1)
        loss = regression_loss(predictions, batch["targets"], cfg.weights("attribute_weights"), batch["target_std"])
        weights = predictions.new_tensor(cfg.weights("reward_weights"))
        return loss, predictions.detach() @ weights, batch["targets"].to(predictions.device) @ weights
    rewards = reward_model(**model_inputs(batch))  # (2B,): chosen then rejected (groups: every response)
    if cfg.loss == "pairwise" and cfg.tie_nu is None:  # TRL's loss
        chosen, rejected = rewards.chunk(2)
        loss = pairwise_loss(chosen, rejected, batch.get("margin"), cfg.center_rewards_coefficient)
    else:
        loss, chosen, rejected = ranking_loss(
            rewards, batch, cfg.loss, cfg.group_margin, cfg.tie_nu, cfg.center_rewards_coefficient
        )
    if cfg.length_penalty:  # off by default, leaving TRL's loss bit for bit
        loss = loss + length_penalty(rewards, batch["response_lengths"], cfg.length_penalty)
    return loss, chosen, rejected


def step_share(batch: dict, accelerator: Accelerator) -> torch.Tensor | float:
    """P * n / N: this process's trained steps n over the mean of the P processes' (N in all). Data parallelism
    averages the processes' gradients, and rows have different numbers of steps: without this weight P processes
    would train on the mean of their means, not on the mean over every step of the global micro-batch (1 process)."""
    if accelerator.num_processes == 1:
        return 1.0
    count = batch["step_trained"].sum().float()
    return accelerator.num_processes * count / accelerator.reduce(count, reduction="sum")


def train_step(
    reward_model, micro_batches, window: int, optimizer, accelerator: Accelerator, cfg: TrainConfig
) -> dict:
    """One optimizer step: each of its `window` micro-batches forward, `batch_loss` and backward; then clipping, and
    the update unless a loss or gradient is non-finite (DeepSpeed's engine has applied it inside backward already).
    Returns the step's metrics, read to the host once."""
    stats = StepMetrics(accelerator.device)
    # Under bf16 the step's micro-batches share one autocast region, whose cache casts each weight to bf16 once.
    with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        for batch in micro_batches:
            with accelerator.accumulate(reward_model):
                loss, chosen, rejected = batch_loss(reward_model, batch, cfg, accelerator)
                # Accelerate divides by grad_accum; a short last step of an epoch takes the mean of its own (TRL).
                accelerator.backward(loss * (cfg.grad_accum / window))
                stats.add(loss.detach(), chosen.detach(), rejected.detach(), batch["attention_mask"].sum())
    if not accelerator.sync_gradients:  # the step's end by our count and by Accelerate's must agree
        raise RuntimeError(f"a step of {window} micro-batches ended without Accelerate's gradient synchronization")
    grad_norm = accelerator.clip_grad_norm_(reward_model.parameters(), cfg.max_grad_norm or math.inf)
    record = stats.reduce(accelerator, grad_norm_tensor(grad_norm))  # the step's one host sync
    if record["finite"]:
        optimizer.step()
    optimizer.zero_grad()
    return record


def evaluate(reward_model, eval_set, tokenizer, cfg: TrainConfig, accelerator: Accelerator) -> tuple[dict, list[dict]]:
    """(report, per-pair scores) of the eval set: the scoring path and report evaluate.py uses (for groups, the
    report over every ordered pair and a rank correlation per group)."""
    if isinstance(eval_set, StepSet):
        step_rewards = compute_step_rewards(
            reward_model, eval_set["ids"], eval_set["step_ends"], pad_token_id=tokenizer.pad_token_id,
            packing=cfg.packing, max_tokens_per_batch=cfg.max_tokens_per_batch,
        )  # fmt: skip
        return step_report(eval_set, step_rewards)
    if isinstance(eval_set, RatingSet):
        predictions = compute_rewards(
            reward_model, *eval_set.sequences(), pad_token_id=tokenizer.pad_token_id, packing=cfg.packing,
            max_tokens_per_batch=cfg.max_tokens_per_batch, accelerator=accelerator,
        )  # fmt: skip
        return rating_report(eval_set, predictions.view(len(eval_set), -1), cfg.weights("attribute_weights"))  # (N, K)
    if isinstance(eval_set, GroupSet):
        rewards = score_groups(
            reward_model, eval_set, pad_token_id=tokenizer.pad_token_id, packing=cfg.packing,
            max_tokens_per_batch=cfg.max_tokens_per_batch, accelerator=accelerator,
        )  # fmt: skip
        return group_report(eval_set, rewards, cfg.category_column)
    chosen, rejected = score_pairs(
        reward_model, eval_set, pad_token_id=tokenizer.pad_token_id, packing=cfg.packing,
        max_tokens_per_batch=cfg.max_tokens_per_batch, accelerator=accelerator,
    )  # fmt: skip
    return pair_report(eval_set, chosen, rejected, cfg.category_column)


def check_run_dir(cfg: TrainConfig) -> tuple[Path | None, dict]:
    """Where the run writes and what it resumes: (the checkpoint to resume from or None, the data files'
    fingerprints). A resumed run must match the options and data of the run that wrote its checkpoint; a new run (or
    one continued from another run's checkpoint) never goes into a used or foreign directory."""
    data_files = {name: fingerprint(path) for name in ("train_file", "eval_file") if (path := getattr(cfg, name))}
    checkpoint = resolve_checkpoint(cfg.resume_from, cfg.output_dir) if cfg.resume_from else None
    owner = checkpoint.resolve().parent.parent if checkpoint is not None else None  # RUN of RUN/checkpoints/step-N
    if owner is not None:
        check_resume(owner, dataclasses.asdict(cfg), data_files)
    if owner != Path(cfg.output_dir).resolve():
        check_new_run(cfg.output_dir, inputs=[cfg.model, cfg.train_file, cfg.eval_file])
    else:  # the run's own directory: it must still take files (a disk remounted read-only, a changed owner)
        check_writable(Path(cfg.output_dir), "--output_dir")
    return checkpoint, data_files


def start_run_dir(cfg: TrainConfig, state: dict, data_report: dict, data_files: dict) -> None:
    """The run's marker (what a resumed run must match), config.yaml and data_report.json; a resumed run's
    metrics.jsonl loses what a killed run logged after its checkpoint."""
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if read_marker(output_dir) is None:
        write_marker(output_dir, "train", options=dataclasses.asdict(cfg), data=data_files)
    write_text(output_dir / "config.yaml", to_yaml(cfg))
    write_json(output_dir / "data_report.json", data_report)
    truncate_metrics(output_dir / "metrics.jsonl", state["step"])


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv, TrainConfig, description="Train a reward model (pairwise loss) with an Accelerate loop.")
    checkpoint, data_files = check_run_dir(cfg)  # before any work: a bad start leaves nothing behind
    accelerator = build_accelerator(cfg)
    set_cpu_threads(cfg.cpu_threads, accelerator.device)
    set_seed(cfg.seed)  # before the model: the new score head is drawn from this seed (as TRL)
    start_time = time.time()

    # Model, data, optimizer and schedule.
    reward_model, tokenizer = build_model(cfg, accelerator)
    with accelerator.main_process_first():
        train_set, eval_set, data_report = build_data(cfg, tokenizer)
    if isinstance(train_set, RatingSet):  # the saved config names the outputs, the reward weights, the scale
        describe_attributes(reward_model.model.config, train_set.attributes, cfg.weights("reward_weights"),
                            train_set.mean, train_set.std)  # fmt: skip
    train_loader = accelerator.prepare(build_train_loader(cfg, train_set, tokenizer))  # this process's share
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(train_loader) / cfg.grad_accum)))
    optimizer = build_optimizer(cfg, reward_model)
    # The scheduler goes in with the model: under DeepSpeed, Accelerate checkpoints a scheduler only then.
    reward_model, optimizer, scheduler = accelerator.prepare(
        reward_model, optimizer, build_scheduler(cfg, optimizer, total_steps)
    )

    # Where the loop stands: restored from the checkpoint when resuming.
    state = {"step": 0, "epoch": 0, "batches_done_in_epoch": 0, "tokens": 0, "skipped_nonfinite_steps": 0}
    if checkpoint is not None:
        state.update(load_checkpoint(accelerator, checkpoint))
    if accelerator.is_main_process:
        start_run_dir(cfg, state, data_report, data_files)
    log = RunLog(cfg, accelerator, total_steps, data_report, state, checkpoint)

    nonfinite_in_a_row = 0
    reward_model.train()
    step_start = time.perf_counter()  # step_time: data, forward, backward and update; eval and saving excluded
    steps = optimizer_steps(train_loader, state, cfg, accelerator)
    while state["step"] < total_steps:
        window, micro_batches = next(steps)
        record = train_step(reward_model, micro_batches, window, optimizer, accelerator, cfg)
        state["step"] += 1
        scheduler.step()

        # Record the step; too many non-finite steps in a row stop the run.
        finite = record.pop("finite")
        skipped = not finite and accelerator.distributed_type != DistributedType.DEEPSPEED
        if not finite and not skipped:
            step = state["step"]
            accelerator.print(f"warning: step {step}: non-finite loss or gradient, applied by DeepSpeed's engine")
        nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
        state["skipped_nonfinite_steps"] += int(skipped)
        state["tokens"] += record["tokens"]
        step_time = round(time.perf_counter() - step_start, 4)
        log.step({**record, "tokens": state["tokens"], "skipped": skipped, "step_time": step_time}, state, scheduler)
        if nonfinite_in_a_row >= MAX_NONFINITE_STEPS_IN_A_ROW:
            save_checkpoint(accelerator, cfg.output_dir, state)
            raise SystemExit(
                f"error: {nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient; stopped "
                f"at step {state['step']} with a checkpoint in {cfg.output_dir}/checkpoints. Lower --lr, turn off "
                "--bf16, or check the data."
            )

        # Evaluation and checkpoints every N steps (the last step gets both below).
        if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < total_steps:
            log.evaluation(evaluate(reward_model, eval_set, tokenizer, cfg, accelerator)[0], state["step"])
        if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total_steps:
            save_checkpoint(accelerator, cfg.output_dir, state)
            log.curves()
        step_start = time.perf_counter()

    # Final checkpoint and model (plain safetensors, or the adapter with --lora), then evaluation, report, curves.
    save_checkpoint(accelerator, cfg.output_dir, state)
    save_model(accelerator, reward_model, tokenizer, cfg)
    report, scores = evaluate(reward_model, eval_set, tokenizer, cfg, accelerator)
    results = {
        **report_scalars(report), "train_steps": state["step"], "train_wall_s": round(time.time() - start_time, 1),
        "skipped_nonfinite_steps": state["skipped_nonfinite_steps"], "data": data_report,
    }  # fmt: skip
    log.finish(report, scores, results)
    if cfg.merge_lora and accelerator.is_main_process:
        merged = merge_adapter(
            cfg.output_dir, Path(cfg.output_dir) / "merged", trust_remote_code=cfg.trust_remote_code
        )
        accelerator.print(f"merged model in {merged}")
    # Every process reaches the end before any tears its process group down (gloo aborted a rank that left early).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def grad_norm_tensor(grad_norm) -> torch.Tensor | None:
    """clip_grad_norm_'s result as a plain tensor: a tensor (DDP), a DTensor (FSDP2: the total norm, replicated), a
    float or None (DeepSpeed, which clips inside its engine and may not report the norm)."""
    if isinstance(grad_norm, DTensor):
        return grad_norm.full_tensor()
    if grad_norm is None or isinstance(grad_norm, torch.Tensor):
        return grad_norm
    return torch.tensor(float(grad_norm))


class RunLog:
    """Everything a run reports as it goes: metrics.jsonl (a line per step and per evaluation), the trackers, the
    progress bar, the console, and at the end eval_results.json and report/. Files are written by the main process
    only; `start_run_dir` has written the rest of output_dir."""

    def __init__(self, cfg, accelerator, total_steps: int, data_report: dict, state: dict, checkpoint):
        self.cfg, self.accelerator, self.total_steps = cfg, accelerator, total_steps
        self.output_dir = Path(cfg.output_dir)
        self.metrics_file, self.curves_drawn = None, -math.inf
        print_ = accelerator.print
        train_words, eval_words = (report_summary(data_report[name]) for name in ("train", "eval"))
        print_(f"data: train {train_words}; eval {eval_words}")
        if data_report["eval"]["also_in_train"]:
            print_(
                f"warning: {data_report['eval']['also_in_train']} eval pairs also occur in the training data (same "
                "tokens): held-out numbers will be optimistic."
            )
        if checkpoint is not None:
            where = f"step {state['step']} (epoch {state['epoch']}, batch {state['batches_done_in_epoch']})"
            print_(f"resumed from {checkpoint} at {where}")
        accelerator.init_trackers("rmtorch", config=dataclasses.asdict(cfg))  # no-op unless --report_to names one
        if accelerator.is_main_process:
            self.metrics_file = open(self.output_dir / "metrics.jsonl", "a")
        precision, batching = "bf16 autocast" if cfg.bf16 else "fp32", "packed" if cfg.packing else "padded"
        print_(
            f"training {total_steps} step{'s' if total_steps != 1 else ''}, {engine_name(accelerator)}: "
            f"{accelerator.num_processes} process(es) x {cfg.batch_size} pairs x {cfg.grad_accum} accumulation, "
            f"{precision}, {batching} batches"
        )
        disable = not accelerator.is_main_process
        self.progress = tqdm(
            total=total_steps, initial=state["step"], desc="train", disable=disable, dynamic_ncols=True
        )

    def _write(self, record: dict, tracker_values: dict) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        self.accelerator.log(tracker_values, step=record["step"])

    def step(self, record: dict, state: dict, scheduler) -> None:
        step = state["step"]
        record = {**record, "step": step, "epoch": state["epoch"], "lr": scheduler.get_last_lr()[0]}
        self._write(
            record, {f"train/{k}": v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        )
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            norm = "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
            self._print(
                f"step {step}/{self.total_steps}  loss {record['loss']:.4f}  acc {record['accuracy']:.3f}  "
                f"margin {record['margin']:.3f}  lr {record['lr']:.2e}  grad_norm {norm}"
            )

    def evaluation(self, report: dict, step: int) -> None:
        scalars = report_scalars(report)
        self._write(
            {"step": step, **{f"eval_{k}": v for k, v in scalars.items()}},
            {f"eval/{k}": v for k, v in scalars.items()},
        )
        shown = ("accuracy", "margin", "loss", "ece", "step_accuracy", "first_error_accuracy", "rmse", "pearson")
        self._print(f"eval at step {step}: " + "  ".join(f"{k} {scalars[k]:.4f}" for k in shown if k in scalars))

    def _print(self, line: str) -> None:
        if self.accelerator.is_main_process:  # tqdm.write prints even for a disabled bar: once, not once a process
            self.progress.write(line)

    def curves(self, final: bool = False) -> None:
        """Redraw the training curves: at checkpoints at most once a minute (a plot costs about a second, a run may
        save every step), so a long run can be watched; always at the end."""
        if self.accelerator.is_main_process and (final or time.monotonic() - self.curves_drawn >= 60):
            plot_training_curves(self.output_dir / "metrics.jsonl", self.output_dir / "report" / "training_curves.png")
            self.curves_drawn = time.monotonic()

    def finish(self, report: dict, scores: list[dict], results: dict) -> None:
        self.progress.close()
        self.accelerator.log({f"eval/{k}": v for k, v in report_scalars(report).items()}, step=results["train_steps"])
        if self.accelerator.is_main_process:
            self.metrics_file.close()
            write_json(self.output_dir / "eval_results.json", results)
            if "num_steps" in report:  # a process reward model's report: step metrics, step rewards per row
                write_step_report(report, scores, self.output_dir / "report")
            elif "rmse" in report:  # a rating model's: per attribute RMSE and Pearson, predictions per row
                write_rating_report(report, scores, self.output_dir / "report")
            else:
                write_report(report, scores, self.output_dir / "report")
            self.curves(final=True)
        if "rmse" in report:
            attributes = ", ".join(
                f"{k.removeprefix('rmse_')} {v:.3f}" for k, v in report.items() if k.startswith("rmse_")
            )
            self.accelerator.print(
                f"done in {results['train_wall_s']:.0f}s: held-out RMSE {attributes} on {results['num_rows']} rows; "
                f"model in {self.output_dir}"
            )
            return
        if "num_steps" in report:
            self.accelerator.print(
                f"done in {results['train_wall_s']:.0f}s: held-out step accuracy {results['step_accuracy']:.3f} "
                f"(majority label {results['majority_baseline']:.3f}), loss {results['loss']:.4f} on "
                f"{results['num_steps']} steps of {results['num_rows']} rows; model in {self.output_dir}"
            )
            return
        self.accelerator.print(
            f"done in {results['train_wall_s']:.0f}s: held-out accuracy {results['accuracy']:.3f}, loss "
            f"{results['loss']:.4f} on {results['num_pairs']} pairs; model in {self.output_dir}, report in "
            f"{self.output_dir / 'report'}"
        )


def report_summary(report: dict) -> str:
    """A data report (TokenizeReport.to_dict(), plus counts of its own) in TokenizeReport's words."""
    kind = GroupReport if "groups_out" in report else StepReport if "rows_out" in report else TokenizeReport
    kind = RatingReport if "ratings_out" in report else kind
    return kind(**{k: v for k, v in report.items() if k in kind.__dataclass_fields__}).summary()


def save_model(accelerator: Accelerator, reward_model, tokenizer, cfg: TrainConfig) -> None:
    """output_dir gets a plain HF model (safetensors) that AutoModelForSequenceClassification loads, or with --lora
    the adapter directory (load_reward_model and peft load it); and the tokenizer."""
    output_dir = Path(cfg.output_dir)
    unwrapped = accelerator.unwrap_model(reward_model).model
    if cfg.lora:
        compute = compute_dtype(cfg) if cfg.load_in_4bit else None
        if accelerator.distributed_type == DistributedType.FSDP:  # PEFT reads the model's own weights: here, shards
            full_state = accelerator.get_state_dict(reward_model)  # gathered on the main process
            if accelerator.is_main_process:
                state_dict = {name.removeprefix("model."): tensor for name, tensor in full_state.items()}
                save_adapter(unwrapped, output_dir, base_model=cfg.model, compute_dtype=compute, state_dict=state_dict)
        else:
            save_adapter(
                unwrapped, output_dir, base_model=cfg.model, compute_dtype=compute,
                is_main_process=accelerator.is_main_process,
            )  # fmt: skip
    else:
        # get_state_dict gathers full weights when FSDP or DeepSpeed ZeRO-3 shard them (keys "model.*" of RewardModel);
        # ZeRO-3 gives them to the main process only, and None to the others.
        full_state = accelerator.get_state_dict(reward_model) or {}
        state_dict = {name.removeprefix("model."): tensor for name, tensor in full_state.items()}
        unwrapped.save_pretrained(
            output_dir, state_dict=state_dict, is_main_process=accelerator.is_main_process,
            save_function=accelerator.save, safe_serialization=True,
        )  # fmt: skip
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)


if __name__ == "__main__":
    run(main, sys.argv[1:])
