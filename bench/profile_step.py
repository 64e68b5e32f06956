"""Where a training step's time goes: torch.profiler over rmtorch's own train_step, grouped by kind of work.

    python bench/profile_step.py                          # SmolLM2, 4 real pairs packed, bf16 autocast, 1 thread
    python bench/profile_step.py --precision fp32 --packing false --threads 2

Runs a few warm-up steps, then profiles `--steps` steps of the recipe's own pieces (the collator, `train_step`,
clipping, the fused AdamW step) and sums each operator's self time into: matmul, attention, elementwise,
casts (dtype conversions: autocast's weight and activation casts), optimizer, data (collation), host syncs,
other. Prints the table, the CPU model and its matrix extensions (`--top N`: also the N operators with the most self
time); `--json` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_description  # noqa: E402

KINDS = {  # kind: substrings of aten operator names (first match wins, in this order)
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "flex_attention"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"),
    "casts": ("aten::to", "aten::_to_copy", "aten::copy_", "aten::type_as"),
    "optimizer": ("_fused_adamw", "adamw", "_foreach"),
    "host syncs": ("aten::item", "_local_scalar_dense"),
}


def kind_of(name: str) -> str:
    for kind, keys in KINDS.items():
        if any(key in name for key in keys):
            return kind
    if name.startswith("aten::"):
        return "elementwise"
    return "other"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Profile rmtorch training steps by kind of work.")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument(
        "--pairs", type=int, default=4, help="Pairs per step (the first dpo_en_demo pairs within 512 tokens)."
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--packing", default="true", choices=("true", "false"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="Write the figures here.")
    parser.add_argument("--top", type=int, default=0, help="Also print the N operators with the most self time.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from accelerate import Accelerator
    from bench_train import bench_pairs

    import train
    from rmtorch.config import TrainConfig

    cfg = TrainConfig(
        model=args.model, packing=args.packing == "true", bf16=args.precision == "bf16", lr=1e-5, max_grad_norm=1.0
    )
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no")
    reward_model, tokenizer = train.build_model(cfg, accelerator)
    pairs = bench_pairs(tokenizer, args.pairs * (args.steps + 2), 512)
    from rmtorch.pairs import PairSet

    pair_set = PairSet({k: [p[k] for p in pairs] for k in pairs[0]})
    cfg.batch_size, cfg.shuffle = args.pairs, False
    loader = train.build_train_loader(cfg, pair_set, tokenizer)
    optimizer = train.build_optimizer(cfg, reward_model)
    reward_model, optimizer = accelerator.prepare(reward_model, optimizer)
    reward_model.train()
    batches = iter(loader)

    def step():
        with torch.profiler.record_function("data"):
            batch = next(batches)
        # train.py's own step: forward, loss and backward under one autocast region, clipping, the update.
        train.train_step(reward_model, [batch], 1, optimizer, accelerator, cfg)
        return int(batch["attention_mask"].sum())

    for _ in range(2):  # warm-up: allocator, kernels, the attention precision choice
        step()
    tokens, start = 0, time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(args.steps):
            tokens += step()
    wall = time.perf_counter() - start
    totals: dict[str, float] = {}
    for event in profile.key_averages():
        name = "data" if event.key == "data" else event.key
        kind = "data" if name == "data" else kind_of(name)
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    total = sum(totals.values())
    result = {
        "cpu": cpu_description(),
        "precision": args.precision,
        "packing": args.packing == "true",
        "threads": args.threads,
        "steps": args.steps,
        "tokens": tokens,
        "profiled_wall_s": wall,
        "seconds_by_kind": totals,
        "share_by_kind": {k: v / total for k, v in totals.items()},
    }
    print(
        f"{result['cpu']}; {args.precision}, packing {args.packing}, {args.threads} thread(s), {args.steps} "
        f"steps, {tokens} tokens"
    )
    for kind, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:12s} {seconds:7.3f} s  {seconds / total:6.1%}")
    if args.top:
        events = sorted(profile.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]
        result["top_operators"] = [
            {"name": e.key, "kind": kind_of(e.key), "seconds": e.self_cpu_time_total / 1e6, "calls": e.count}
            for e in events
        ]
        for op in result["top_operators"]:
            print(f"    {op['name'][:60]:60s} {op['kind']:12s} {op['seconds']:7.3f} s  {op['calls']:6d} calls")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
