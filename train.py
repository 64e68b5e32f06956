"""Train a reward model with a hand-written Accelerate loop.

    accelerate launch train.py                      # embedded SmolLM2-135M-Instruct on the built-in dataset
    accelerate launch train.py --config cfg.yaml --lr 2e-5 --train_file pairs.jsonl

Reads top to bottom: config → model and tokenizer → data → optimizer and schedule → prepare → loop
(forward chosen+rejected together, pairwise loss, accumulate, clip, step, log, eval, checkpoint) → final
eval and save (safetensors). `python train.py --help` lists every option with its default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import rmtorch  # noqa: F401  (first: it quiets a bitsandbytes warning that accelerate's import would print)
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from rmtorch.checkpoint import checkpoint_trainable_weights_only, checkpoints_dir, load_checkpoint, resolve_checkpoint, save_checkpoint, truncate_metrics
from rmtorch.config import TrainConfig, parse_config
from rmtorch.data import PairCollator, load_pairs, tokenize_pairs
from rmtorch.eval import build_report, pair_lengths, write_report
from rmtorch.loss import eval_metrics, pair_metrics, pairwise_loss
from rmtorch.export import merge_adapter, save_adapter
from rmtorch.modeling import RewardModel, apply_lora, disable_dropout, enable_gradient_checkpointing, load_reward_model, quantization_config_4bit
from rmtorch.packing import PackedPairCollator, enable_block_attention, packed_inputs
from rmtorch.sampling import EpochSampler, LengthGroupedBatchSampler
from rmtorch.synthetic import builtin_pairs

MAX_NONFINITE_STEPS_IN_A_ROW = 5


def build_datasets(cfg: TrainConfig, tokenizer):
    """Tokenized train and eval sets, plus a report of what tokenization kept, dropped and truncated."""
    import datasets

    if cfg.train_file is None:
        rows = builtin_pairs(cfg.builtin_size, seed=cfg.seed)
        num_eval = max(1, int(len(rows) * cfg.eval_fraction))
        train_raw = datasets.Dataset.from_list(rows[:-num_eval])
        eval_raw = datasets.Dataset.from_list(rows[-num_eval:])
        train_raw.info.description, eval_raw.info.description = "built-in dataset (train)", "built-in dataset (eval)"
    else:
        train_raw = load_pairs(cfg.train_file)
        if cfg.eval_file is not None:
            eval_raw = load_pairs(cfg.eval_file)
        else:
            split = train_raw.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
            train_raw, eval_raw = split["train"], split["test"]
            train_raw.info.description = eval_raw.info.description = cfg.train_file
    options = dict(max_length=cfg.max_length, truncation=cfg.truncation, on_bad_row=cfg.on_bad_row, margin_column=cfg.margin_column, return_report=True)
    train_set, train_report = tokenize_pairs(train_raw, tokenizer, **options)
    report_columns = [cfg.category_column] if cfg.category_column in eval_raw.column_names else []  # for the report's accuracy split
    eval_set, eval_report = tokenize_pairs(eval_raw, tokenizer, **options, keep_columns=report_columns)
    return train_set, eval_set, {"train": train_report.__dict__, "eval": eval_report.__dict__}


@torch.no_grad()
def evaluate(reward_model, eval_loader, accelerator, cfg: TrainConfig) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Pair-weighted metrics over the whole eval set, gathered across processes without duplicates, and the
    (N,) chosen and rejected rewards in eval-set order (gather_for_metrics keeps the unshuffled order)."""
    reward_model.eval()
    chosen_all, rejected_all, margin_all = [], [], []
    for batch in eval_loader:
        rewards = reward_model(batch["input_ids"], batch["attention_mask"])  # (2B,)
        chosen, rejected = rewards.chunk(2)
        margin = batch.get("margin", torch.zeros_like(chosen))
        chosen, rejected, margin = accelerator.gather_for_metrics((chosen, rejected, margin))
        chosen_all.append(chosen), rejected_all.append(rejected), margin_all.append(margin)
    reward_model.train()
    chosen, rejected, margin = torch.cat(chosen_all), torch.cat(rejected_all), torch.cat(margin_all)
    return eval_metrics(chosen, rejected, margin if cfg.margin_column else None, cfg.center_rewards_coefficient), chosen, rejected


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    # Resume target and output_dir are checked before any work, so a bad start leaves nothing behind.
    checkpoint = resolve_checkpoint(cfg.resume_from, cfg.output_dir) if cfg.resume_from else None
    if checkpoint is None and (checkpoints_dir(cfg.output_dir) / "latest").exists():
        raise SystemExit(f"error: {cfg.output_dir} already holds a run with checkpoints. Pass --resume_from latest to continue it, or choose a new --output_dir.")
    # The scheduler is stepped by hand once per optimizer step; prepare() only makes it part of save_state.
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision="bf16" if cfg.bf16 else "no", step_scheduler_with_optimizer=False,
        log_with="tensorboard" if cfg.report_to == "tensorboard" else None, project_dir=cfg.output_dir,
    )
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))))
    set_seed(cfg.seed)  # before the model: the new score head is drawn from this seed (as TRL)
    start_time = time.time()

    # Model and tokenizer. The main process converts the embedded GGUF once; the others then read the cache.
    # QLoRA: the body in 4-bit nf4, matmuls in bf16 (fp32 with --bf16 false); norms and score head stay fp32.
    compute_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    quantization_config = quantization_config_4bit(compute_dtype) if cfg.load_in_4bit else None
    with accelerator.main_process_first():
        model, tokenizer = load_reward_model(cfg.model, trust_remote_code=cfg.trust_remote_code, quantization_config=quantization_config)
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora:  # frozen body + adapters; the score head is trained in full, in fp32
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target=cfg.lora_target)
        checkpoint_trainable_weights_only(accelerator)  # checkpoints hold adapters and head; the body is the base model
    if cfg.packing or cfg.shared_prompt:  # padded batches still run plain SDPA; packed rows run block by block
        enable_block_attention(model)
    reward_model = RewardModel(model)

    # Data: validated and tokenized before anything is written to output_dir.
    with accelerator.main_process_first():
        train_set, eval_set, data_report = build_datasets(cfg, tokenizer)
    accelerator.print(f"data: train {data_report['train']['pairs_out']} pairs, eval {data_report['eval']['pairs_out']} pairs")
    for split, report in data_report.items():
        if report["dropped_too_long"] or report["truncated"] or report["skipped_bad"]:
            accelerator.print(f"  {split}: dropped {report['dropped_too_long']} too long, truncated {report['truncated']}, skipped {report['skipped_bad']} bad rows")
    collate = PairCollator(pad_token_id=tokenizer.pad_token_id)
    train_collate = PackedPairCollator(share_prompt=cfg.shared_prompt) if cfg.packing or cfg.shared_prompt else collate
    train_sampler = EpochSampler(len(train_set), seed=cfg.seed, shuffle=cfg.shuffle)
    if cfg.group_by_length:
        batch_sampler = LengthGroupedBatchSampler(train_sampler, pair_lengths(train_set).tolist(), cfg.batch_size)
        train_loader = DataLoader(train_set, batch_sampler=batch_sampler, collate_fn=train_collate)
    else:
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=train_sampler, collate_fn=train_collate)
    eval_loader = DataLoader(eval_set, batch_size=cfg.eval_batch_size, collate_fn=collate)

    # Optimizer: AdamW, no weight decay on biases and norms; linear/cosine/constant schedule with warm-up.
    trainable = [(n, p) for n, p in reward_model.named_parameters() if p.requires_grad]
    param_groups = [
        {"params": [p for n, p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=True)
    reward_model, optimizer, train_loader, eval_loader = accelerator.prepare(reward_model, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup", optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    scheduler = accelerator.prepare(scheduler)  # saved by save_state as scheduler.bin, read back with weights_only=True

    loop_state = {"step": 0, "epoch": 0, "batches_done_in_epoch": 0, "tokens": 0, "skipped_nonfinite_steps": 0}
    if checkpoint is not None:
        loop_state.update(load_checkpoint(accelerator, checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {loop_state['step']} (epoch {loop_state['epoch']}, batch {loop_state['batches_done_in_epoch']})")
    step, epoch, batches_done_in_epoch = loop_state["step"], loop_state["epoch"], loop_state["batches_done_in_epoch"]
    tokens_seen, nonfinite_total = loop_state["tokens"], loop_state["skipped_nonfinite_steps"]

    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(cfg_to_yaml(cfg))
        (output_dir / "data_report.json").write_text(json.dumps(data_report, indent=2))
        truncate_metrics(output_dir / "metrics.jsonl", step)  # drop lines a killed run wrote after its last checkpoint
    metrics_file = open(output_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None
    accelerator.init_trackers("tensorboard", config=dataclasses.asdict(cfg))  # no-op unless --report_to names a tracker
    accelerator.print(f"training {total_steps} steps: {accelerator.num_processes} process(es) x {cfg.batch_size} pairs x {cfg.grad_accum} accumulation, {'bf16 autocast' if cfg.bf16 else 'fp32'}")

    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_main_process, dynamic_ncols=True)
    window, window_tokens = [], 0  # per-micro-batch metrics and tokens since the last optimizer step
    nonfinite_in_a_row = 0
    reward_model.train()
    step_start = time.perf_counter()  # step_time: data, forward, backward and update; eval and saving excluded
    while step < total_steps:
        train_loader.set_epoch(epoch)  # the prepared loader's epoch, not the sampler's: it re-sets the sampler on iteration
        epoch_loader = accelerator.skip_first_batches(train_loader, batches_done_in_epoch) if batches_done_in_epoch else train_loader
        for batch in epoch_loader:
            batches_done_in_epoch += 1
            with accelerator.accumulate(reward_model):
                rewards = reward_model(batch["input_ids"], batch["attention_mask"], **packed_inputs(batch))  # (2B,): chosen then rejected
                chosen_rewards, rejected_rewards = rewards.chunk(2)
                loss = pairwise_loss(chosen_rewards, rejected_rewards, batch.get("margin"), cfg.center_rewards_coefficient)
                accelerator.backward(loss)
                window.append({"loss": loss.item(), **pair_metrics(chosen_rewards, rejected_rewards)})
                window_tokens += int(batch["attention_mask"].sum())
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(reward_model.parameters(), cfg.max_grad_norm or float("inf"))
                    finite = update_is_finite(accelerator, grad_norm, window)
                    if not finite:
                        optimizer.zero_grad()  # a non-finite loss or gradient: skip this update, keep the weights
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done.
            step += 1
            scheduler.step()
            nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
            nonfinite_total += 0 if finite else 1
            record = {key: sum(m[key] for m in window) / len(window) for key in window[0]}
            record.update(step=step, epoch=epoch, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm.item(), tokens=window_tokens, skipped=not finite, step_time=round(time.perf_counter() - step_start, 4))
            record = reduce_record(accelerator, record)
            tokens_seen += record["tokens"]  # summed over processes by reduce_record
            record["tokens"] = tokens_seen
            window, window_tokens = [], 0
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
            if step % cfg.log_every == 0 or step == total_steps:
                progress.write(f"step {step}/{total_steps}  loss {record['loss']:.4f}  acc {record['accuracy']:.3f}  margin {record['margin']:.3f}  lr {record['lr']:.2e}  grad_norm {record['grad_norm']:.3f}")
            loop_state = {"step": step, "epoch": epoch, "batches_done_in_epoch": batches_done_in_epoch, "tokens": tokens_seen, "skipped_nonfinite_steps": nonfinite_total}
            if nonfinite_in_a_row >= MAX_NONFINITE_STEPS_IN_A_ROW:
                save_checkpoint(accelerator, cfg.output_dir, loop_state)
                raise SystemExit(
                    f"error: {nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient; stopped at step {step} "
                    f"with a checkpoint in {cfg.output_dir}/checkpoints. Lower --lr, turn off --bf16, or check the data."
                )
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                metrics, _, _ = evaluate(reward_model, eval_loader, accelerator, cfg)
                accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
                progress.write(f"eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if metrics_file:
                    metrics_file.write(json.dumps({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}) + "\n")
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save_checkpoint(accelerator, cfg.output_dir, loop_state)
            step_start = time.perf_counter()
            if step >= total_steps:
                break
        else:
            epoch, batches_done_in_epoch = epoch + 1, 0
    progress.close()

    # Final evaluation and save: a plain HF model (safetensors) that AutoModelForSequenceClassification loads,
    # or with --lora the adapter directory (load_reward_model and peft load it).
    eval_results, chosen_rewards, rejected_rewards = evaluate(reward_model, eval_loader, accelerator, cfg)
    accelerator.log({f"eval/{k}": v for k, v in eval_results.items()}, step=step)
    eval_results.update(train_steps=step, train_wall_s=round(time.time() - start_time, 1), skipped_nonfinite_steps=nonfinite_total, data=data_report)
    save_checkpoint(accelerator, cfg.output_dir, loop_state)  # as of the last step
    unwrapped = accelerator.unwrap_model(reward_model).model
    if cfg.lora:  # the adapter and trained score head; a plain merged model goes to output_dir/merged with --merge_lora
        save_adapter(unwrapped, output_dir, base_model=cfg.model, compute_dtype=compute_dtype if cfg.load_in_4bit else None, is_main_process=accelerator.is_main_process)
    else:
        # get_state_dict gathers full weights when FSDP or DeepSpeed ZeRO-3 shard them (keys "model.*" of RewardModel).
        state_dict = {name.removeprefix("model."): tensor for name, tensor in accelerator.get_state_dict(reward_model).items()}
        unwrapped.save_pretrained(output_dir, state_dict=state_dict, is_main_process=accelerator.is_main_process, save_function=accelerator.save, safe_serialization=True)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
        (output_dir / "eval_results.json").write_text(json.dumps(eval_results, indent=2))
        metrics_file.close()
        # The same report as `python -m rmtorch.eval`: metrics.json, per-pair scores.jsonl and PNG plots.
        categories = eval_set[cfg.category_column] if cfg.category_column in eval_set.column_names else None
        scores = {"chosen_rewards": chosen_rewards.cpu(), "rejected_rewards": rejected_rewards.cpu(), "lengths": pair_lengths(eval_set), "categories": categories}
        write_report(build_report(**scores), scores, output_dir / "report")
    if cfg.merge_lora and accelerator.is_main_process:
        accelerator.print(f"merged model in {merge_adapter(output_dir, output_dir / 'merged', trust_remote_code=cfg.trust_remote_code)}")
    accelerator.print(
        f"done in {eval_results['train_wall_s']:.0f}s: held-out accuracy {eval_results['accuracy']:.3f}, loss {eval_results['loss']:.4f} "
        f"on {eval_results['num_pairs']} pairs; model in {output_dir}, report in {output_dir / 'report'}"
    )
    accelerator.end_training()
    return eval_results


def update_is_finite(accelerator, grad_norm: torch.Tensor, window: list[dict]) -> bool:
    """True when the (global) gradient norm and every process's losses since the last step are finite.

    A loss of inf can still give finite gradients (e.g. -logsigmoid far in the saturated tail), so both are checked;
    the all-reduce makes every process take the same decision.
    """
    bad_losses = torch.tensor([sum(not math.isfinite(m["loss"]) for m in window)], dtype=torch.float32, device=accelerator.device)
    return bool(torch.isfinite(grad_norm)) and accelerator.reduce(bad_losses, reduction="sum").item() == 0


def reduce_record(accelerator, record: dict) -> dict:
    """Average a step's metrics over processes (min/max reduced as such, tokens summed)."""
    if accelerator.num_processes == 1:
        return record
    keys = ["loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward", "tokens"]
    gathered = accelerator.gather(torch.tensor([[record[k] for k in keys]], dtype=torch.float64, device=accelerator.device))  # (P, K)
    reduced = dict(zip(keys, gathered.mean(0).tolist()))
    reduced.update(min_reward=gathered[:, 4].min().item(), max_reward=gathered[:, 5].max().item(), tokens=int(gathered[:, 6].sum().item()))
    return {**record, **reduced}


def cfg_to_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


if __name__ == "__main__":
    main(sys.argv[1:])
