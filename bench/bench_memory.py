"""Peak memory and step time of full fine-tuning, checkpointing, LoRA and QLoRA on SmolLM2-135M, side by side.

    python bench/bench_memory.py                                  # defaults: 2 pairs x 128 tokens, 3 timed steps
    python bench/bench_memory.py --batch_size 4 --seq_len 256 --steps 4

Every configuration runs in its own fresh subprocess, so peaks never mix, on the same synthetic batch and with the
pieces train.py uses (load_reward_model, apply_lora, enable_gradient_checkpointing, fused AdamW over the trainable
parameters, Accelerate with bf16 autocast, the pairwise loss). Memory on CUDA: peak allocated GPU memory while
training. On CPU: the peak resident set while training (VmHWM, reset once the model is loaded), the same net of
the resident set right after the imports (what the model and training add), and the process's overall peak
(ru_maxrss, loading included). Step time is the mean over the timed steps, after one warm-up step.
Prints a markdown table with ratios to full fine-tuning; raw numbers go to bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO_ROOT / "bench" / "results" / "memory.json"
CONFIGS = {
    "full": dict(lora=False, load_in_4bit=False, gradient_checkpointing=False),
    "full + checkpointing": dict(lora=False, load_in_4bit=False, gradient_checkpointing=True),
    "LoRA": dict(lora=True, load_in_4bit=False, gradient_checkpointing=False),
    "QLoRA": dict(lora=True, load_in_4bit=True, gradient_checkpointing=False),
    "QLoRA + checkpointing": dict(lora=True, load_in_4bit=True, gradient_checkpointing=True),
}
MIB = 2**20


def resident_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def reset_peak_resident() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: restart VmHWM from the current resident set


def run_config(name: str, args) -> dict:
    """One configuration, in this (fresh) process: load, build, train `steps + 1` steps, measure."""
    sys.path.insert(0, str(REPO_ROOT))
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from rmtorch.loading import load_reward_model, quantization_config_4bit
    from rmtorch.lora import apply_lora
    from rmtorch.loss import pairwise_loss
    from rmtorch.model import RewardModel, disable_dropout, enable_gradient_checkpointing

    options = CONFIGS[name]
    accelerator = Accelerator(mixed_precision="bf16")  # train.py's default
    cuda = accelerator.device.type == "cuda"
    set_seed(0)
    try:  # every configuration carries the same libraries, so the baselines agree
        quantization_config_4bit()  # imports bitsandbytes
    except ImportError:
        pass
    import peft  # noqa: F401

    rss_after_imports = resident_kib("VmRSS")
    quantization_config = quantization_config_4bit(torch.bfloat16) if options["load_in_4bit"] else None
    model, tokenizer = load_reward_model(args.model, quantization_config=quantization_config)
    disable_dropout(model)
    if options["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    if options["lora"]:
        model = apply_lora(model, r=args.lora_r, alpha=args.lora_r, target="all-linear")
    reward_model = RewardModel(model)
    trainable = [p for p in reward_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    reward_model, optimizer = accelerator.prepare(reward_model, optimizer)
    reward_model.train()

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, len(tokenizer), (2 * args.batch_size, args.seq_len), generator=generator).to(
        accelerator.device
    )  # (2B, T)
    attention_mask = torch.ones_like(input_ids)
    if platform.system() == "Linux":
        ctypes.CDLL("libc.so.6").malloc_trim(
            0
        )  # hand back what loading freed, so it does not count as training memory
    load_peak_kib, rss_loaded = resident_kib("VmHWM"), resident_kib("VmRSS")
    reset_peak_resident()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step_times = []
    for step in range(args.steps + 1):  # step 0 warms up: optimizer state, allocator, kernels
        start = time.perf_counter()
        rewards = reward_model(input_ids, attention_mask)
        loss = pairwise_loss(*rewards.chunk(2))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        if step:
            step_times.append(time.perf_counter() - start)
    return {
        "config": name,
        **options,
        "device": str(accelerator.device),
        "trainable_params": sum(p.numel() for p in trainable),
        "step_s": sum(step_times) / len(step_times),
        "train_peak_rss_mib": resident_kib("VmHWM") / 1024,
        "rss_after_imports_mib": rss_after_imports / 1024,
        "rss_after_load_mib": rss_loaded / 1024,
        "load_peak_rss_mib": load_peak_kib / 1024,
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "train_peak_cuda_mib": torch.cuda.max_memory_allocated() / MIB if cuda else None,
        "final_loss": loss.item(),
    }


def markdown_table(results: list[dict]) -> str:
    full = results[0]
    cuda = full["train_peak_cuda_mib"] is not None
    peak_key = "train_peak_cuda_mib" if cuda else "train_peak_rss_mib"
    net = lambda r: r["train_peak_rss_mib"] - r["rss_after_imports_mib"]  # noqa: E731
    header = ["configuration", "trainable params", "peak while training (MiB)", "x full"]
    header += [] if cuda else ["net of imports (MiB)", "x full"]
    header += ["process peak incl. loading (MiB)", "x full", "step (s)", "x full"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        row = [
            r["config"],
            f"{r['trainable_params'] / 1e6:.1f} M",
            f"{r[peak_key]:.0f}",
            f"{r[peak_key] / full[peak_key]:.2f}",
        ]
        row += [] if cuda else [f"{net(r):.0f}", f"{net(r) / net(full):.2f}"]
        row += [f"{r['process_peak_rss_mib']:.0f}", f"{r['process_peak_rss_mib'] / full['process_peak_rss_mib']:.2f}"]
        row += [f"{r['step_s']:.2f}", f"{r['step_s'] / full['step_s']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2", help="Model to train (default: the embedded SmolLM2-135M-Instruct)."
    )
    parser.add_argument("--batch_size", type=int, default=2, help="Pairs per step (2x rows).")
    parser.add_argument("--seq_len", type=int, default=128, help="Tokens per row (no padding).")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps after one warm-up step.")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank (alpha = r), all-linear targets.")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="Comma-separated subset of: " + ", ".join(CONFIGS)
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_config(args.worker, args)))
        return []

    names = [n.strip() for n in args.configs.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or names[0] != "full":
        parser.error(
            f"--configs must start with 'full' (the baseline) and name only: {', '.join(CONFIGS)}; got "
            f"{unknown or names}."
        )
    results = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        command = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--model",
            args.model,
            "--batch_size",
            str(args.batch_size),
            "--seq_len",
            str(args.seq_len),
            "--steps",
            str(args.steps),
            "--lora_r",
            str(args.lora_r),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: configuration {name!r} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = markdown_table(results)
    setup = (
        f"{args.model}, {args.batch_size} pairs x {args.seq_len} tokens, bf16 autocast, fused AdamW, LoRA "
        f"r={args.lora_r} all-linear, {results[0]['device']}"
    )
    print(f"{setup}\n\n{table}")
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(
        json.dumps({"setup": vars(args) | {"device": results[0]["device"]}, "results": results}, indent=2) + "\n"
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
