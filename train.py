"""Train a reward model with a hand-written Accelerate loop.

    accelerate launch train.py                      # embedded SmolLM2-135M-Instruct on the built-in dataset
    accelerate launch train.py --config cfg.yaml --lr 2e-5 --train_file pairs.jsonl

Reads top to bottom: config → model and tokenizer → data → optimizer and schedule → prepare → loop
(forward chosen+rejected together, pairwise loss, accumulate, clip, step, log, eval, checkpoint) → final
eval and save (safetensors). `python train.py --help` lists every option with its default.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from rmtorch.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from rmtorch.config import TrainConfig, parse_config
from rmtorch.data import PairCollator, load_pairs, tokenize_pairs
from rmtorch.loss import eval_metrics, pair_metrics, pairwise_loss
from rmtorch.modeling import RewardModel, disable_dropout, load_reward_model
from rmtorch.sampling import EpochSampler
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
    eval_set, eval_report = tokenize_pairs(eval_raw, tokenizer, **options)
    return train_set, eval_set, {"train": train_report.__dict__, "eval": eval_report.__dict__}


@torch.no_grad()
def evaluate(reward_model, eval_loader, accelerator, cfg: TrainConfig) -> dict:
    """Pair-weighted metrics over the whole eval set, gathered across processes without duplicates."""
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
    return eval_metrics(chosen, rejected, margin if cfg.margin_column else None, cfg.center_rewards_coefficient)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision="bf16" if cfg.bf16 else "no")
    set_seed(cfg.seed)  # before the model: the new score head is drawn from this seed (as TRL)
    start_time = time.time()

    # Model and tokenizer. The main process converts the embedded GGUF once; the others then read the cache.
    with accelerator.main_process_first():
        model, tokenizer = load_reward_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reward_model = RewardModel(model)

    # Data: validated and tokenized before anything is written to output_dir.
    with accelerator.main_process_first():
        train_set, eval_set, data_report = build_datasets(cfg, tokenizer)
    accelerator.print(f"data: train {data_report['train']['pairs_out']} pairs, eval {data_report['eval']['pairs_out']} pairs")
    for split, report in data_report.items():
        if report["dropped_too_long"] or report["truncated"] or report["skipped_bad"]:
            accelerator.print(f"  {split}: dropped {report['dropped_too_long']} too long, truncated {report['truncated']}, skipped {report['skipped_bad']} bad rows")
    collate = PairCollator(pad_token_id=tokenizer.pad_token_id)
    train_sampler = EpochSampler(len(train_set), seed=cfg.seed, shuffle=cfg.shuffle)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=train_sampler, collate_fn=collate)
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
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand below, once per optimizer step

    step, epoch, batches_done_in_epoch = 0, 0, 0
    if cfg.resume_from:
        checkpoint = resolve_checkpoint(cfg.resume_from, cfg.output_dir)
        loop_state = load_checkpoint(accelerator, checkpoint)
        step, epoch, batches_done_in_epoch = loop_state["step"], loop_state["epoch"], loop_state["batches_done_in_epoch"]
        accelerator.print(f"resumed from {checkpoint} at step {step} (epoch {epoch}, batch {batches_done_in_epoch})")

    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(cfg_to_yaml(cfg))
    metrics_file = open(output_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None
    accelerator.print(f"training {total_steps} steps: {accelerator.num_processes} process(es) x {cfg.batch_size} pairs x {cfg.grad_accum} accumulation, {'bf16 autocast' if cfg.bf16 else 'fp32'}")

    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_main_process, dynamic_ncols=True)
    window = []  # per-micro-batch metrics since the last optimizer step
    nonfinite_in_a_row, nonfinite_total, tokens_seen = 0, 0, 0
    reward_model.train()
    while step < total_steps:
        train_sampler.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(train_loader, batches_done_in_epoch) if batches_done_in_epoch else train_loader
        for batch in epoch_loader:
            batches_done_in_epoch += 1
            with accelerator.accumulate(reward_model):
                rewards = reward_model(batch["input_ids"], batch["attention_mask"])  # (2B,): chosen then rejected
                chosen_rewards, rejected_rewards = rewards.chunk(2)
                loss = pairwise_loss(chosen_rewards, rejected_rewards, batch.get("margin"), cfg.center_rewards_coefficient)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(reward_model.parameters(), cfg.max_grad_norm or float("inf"))
                    if not torch.isfinite(grad_norm):
                        optimizer.zero_grad()  # a non-finite loss or gradient: skip this update, keep the weights
                optimizer.step()
                optimizer.zero_grad()
            tokens_seen += int(batch["attention_mask"].sum())
            window.append({"loss": loss.item(), **pair_metrics(chosen_rewards, rejected_rewards)})
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done.
            step += 1
            scheduler.step()
            finite = bool(torch.isfinite(grad_norm))
            nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
            nonfinite_total += 0 if finite else 1
            record = {key: sum(m[key] for m in window) / len(window) for key in window[0]}
            record.update(step=step, epoch=epoch, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm.item(), tokens=tokens_seen, skipped=not finite)
            record = reduce_record(accelerator, record)
            window = []
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
            if step % cfg.log_every == 0 or step == total_steps:
                progress.write(f"step {step}/{total_steps}  loss {record['loss']:.4f}  acc {record['accuracy']:.3f}  margin {record['margin']:.3f}  lr {record['lr']:.2e}  grad_norm {record['grad_norm']:.3f}")
            loop_state = {"step": step, "epoch": epoch, "batches_done_in_epoch": batches_done_in_epoch}
            if nonfinite_in_a_row >= MAX_NONFINITE_STEPS_IN_A_ROW:
                save_checkpoint(accelerator, cfg.output_dir, loop_state)
                raise SystemExit(
                    f"error: {nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient; stopped at step {step} "
                    f"with a checkpoint in {cfg.output_dir}/checkpoints. Lower --lr, turn off --bf16, or check the data."
                )
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                metrics = evaluate(reward_model, eval_loader, accelerator, cfg)
                progress.write(f"eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if metrics_file:
                    metrics_file.write(json.dumps({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}) + "\n")
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save_checkpoint(accelerator, cfg.output_dir, loop_state)
            if step >= total_steps:
                break
        else:
            epoch, batches_done_in_epoch = epoch + 1, 0
    progress.close()

    # Final evaluation and save: a plain HF model (safetensors) that AutoModelForSequenceClassification loads.
    eval_results = evaluate(reward_model, eval_loader, accelerator, cfg)
    eval_results.update(train_steps=step, train_wall_s=round(time.time() - start_time, 1), skipped_nonfinite_steps=nonfinite_total, data=data_report)
    save_checkpoint(accelerator, cfg.output_dir, {"step": step, "epoch": epoch, "batches_done_in_epoch": batches_done_in_epoch})
    unwrapped = accelerator.unwrap_model(reward_model).model
    unwrapped.save_pretrained(output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save, safe_serialization=True)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
        (output_dir / "eval_results.json").write_text(json.dumps(eval_results, indent=2))
        metrics_file.close()
    accelerator.print(
        f"done in {eval_results['train_wall_s']:.0f}s: held-out accuracy {eval_results['accuracy']:.3f}, loss {eval_results['loss']:.4f} "
        f"on {eval_results['num_pairs']} pairs; model in {output_dir}"
    )
    accelerator.end_training()
    return eval_results


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
    import dataclasses

    import yaml

    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


if __name__ == "__main__":
    main(sys.argv[1:])
