"""What bench/gpu_check.sh runs on a CUDA machine; writes bench/results/gpu.json.

    python bench/gpu_check.py --shared ../shared --output bench/results/gpu.json --budget_s 420

Sections, in order; each records its numbers or its error and the run goes on, and gpu.json is rewritten after
each (also to $OUT when set), so a run cut short keeps what it measured. A section that would start after
`--budget_s` seconds is skipped and says so.

1. environment: the GPU, package versions, torch.matmul's bf16 peak (8192^3).
2. tests: tests/unit/test_attention.py, whose CUDA tests compile FlexAttention and check it against the block loop
   and a whole model's packed rows against padded batches.
3. model: a reward model of Qwen3-0.6B's shape (its config, random weights, seed 0; the score head drawn by
   train.py) with the Qwen3 tokenizer, saved once in bf16 to a temporary directory. Nothing is downloaded.
4. train: TRL 1.16's RewardTrainer against rmtorch's train.py on that model, bf16 (full fine-tune) and 4-bit QLoRA
   (nf4 body, LoRA r=16 on every linear layer, score head trained in full), on the first `--pairs` pairs of
   dpo_en_demo within `--max_length` tokens (bench_train.bench_pairs: the same token ids for both), one epoch.
   Each variant runs in a fresh process that trains twice and times the second run: the first pays CUDA's
   start-up and, for rmtorch, FlexAttention's compile per shape bucket (its time is recorded as cold_loop_s).
5. score: rmtorch.score.RewardScorer (packed, shared prompts) against the seed's one padded batch on a
   GRPO-shaped load (bench_score.grpo_load), bf16 autocast on the GPU, best of 3 after a warm-up; rewards compared.
6. vllm: the same scorer against plain vLLM's offline engine (bench/vllm_engine.py, dtype bfloat16) with its prefix
   cache on and off, one engine at a time, token ids in and rewards out, alternating round by round on 3 fresh
   GRPO loads after a warm-up one (round k's prompts are the k-th block of `--prompts` questions: vLLM's cache
   keeps whole sequences, so no row repeats). Runs where the Python running this has vllm; else it records why
   not (the GPU image has none, and vLLM's CUDA wheels are far larger than what a device call carries).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

TRAIN_VARIANTS = ("trl bf16", "rmtorch bf16", "trl qlora", "rmtorch qlora")
RMTORCH_FLAGS = {"bf16": ["--packing", "true", "--group_by_length", "true"]}
RMTORCH_FLAGS["qlora"] = RMTORCH_FLAGS["bf16"] + ["--lora", "--load_in_4bit"]


# ------------------------------------------------------------------------------------------------ sections


def environment() -> dict:
    import importlib.metadata

    versions = {}
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes", "triton"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    peak = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12
    return {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda, "versions": versions, "bf16_tflops": peak}


def tests() -> dict:
    command = [sys.executable, "-m", "pytest", "tests/unit/test_attention.py", "-q", "-p", "no:cacheprovider", "-rs"]
    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    summary = finished.stdout.strip().splitlines()[-1] if finished.stdout.strip() else ""
    print(finished.stdout[-3000:], finished.stderr[-2000:], sep="\n")
    return {"command": " ".join(command[1:]), "returncode": finished.returncode, "summary": summary}


def build_model(shared: Path, directory: Path) -> dict:
    """A Qwen3-0.6B-shaped AutoModelForSequenceClassification (num_labels=1) with random weights, saved in bf16."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared / "qwen3_tokenizer")
    config_dict = json.loads((shared / "qwen3_tokenizer" / "qwen3-0.6b-config.json").read_text())
    config = AutoConfig.for_model(**{**config_dict, "num_labels": 1, "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return {
        "path": str(directory),
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": [config.num_attention_heads, config.num_key_value_heads, getattr(config, "head_dim", None)],
    }


def train(args, model_dir: Path) -> dict:
    """Both trainers on the same pairs, bf16 and QLoRA: tokens/s, and each one's ratio to TRL."""
    from bench_train import matmul_params

    from rmtorch.loading import load_reward_model

    rows = {}
    for variant in TRAIN_VARIANTS:  # a variant that fails is recorded, and the others still run
        try:
            rows[variant] = run_worker_process(args, model_dir, variant)
        except Exception as err:
            rows[variant] = {"error": str(err)[-3000:]}
        print(f"{variant}: {json.dumps(rows[variant])}", flush=True)
    matmuls = matmul_params(load_reward_model(str(model_dir))[0])
    for row in rows.values():
        if "loop_s" in row:
            row["tokens_per_s"] = row["tokens"] / row["loop_s"]
            row["model_tflops"] = 6 * matmuls * row["tokens_per_s"] / 1e12  # every chosen and rejected token
    for variant, row in rows.items():
        trl = rows[f"trl {variant.split()[1]}"]
        if "tokens_per_s" in row and "tokens_per_s" in trl:
            row["vs_trl"] = row["tokens_per_s"] / trl["tokens_per_s"]
    return {
        "rows": rows,
        "setup": {
            "pairs": args.pairs, "max_length": args.max_length, "batch_size": args.batch_size, "lr": args.lr,
            "matmul_params": matmuls, "rmtorch_flags": RMTORCH_FLAGS,
        },
    }  # fmt: skip


def run_worker_process(args, model_dir: Path, variant: str) -> dict:
    command = [
        sys.executable, __file__, "--worker", variant, "--model", str(model_dir), "--shared", str(args.shared),
        "--pairs", str(args.pairs), "--max_length", str(args.max_length), "--batch_size", str(args.batch_size),
        "--lr", str(args.lr), "--seed", str(args.seed),
    ]  # fmt: skip
    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    if finished.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{finished.stderr[-3000:]}")
    line = next(line for line in reversed(finished.stdout.splitlines()) if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def score(args, model_dir: Path) -> dict:
    """The scorer against the seed's padded batch, both on the GPU in bf16 autocast."""
    import bench_score
    from bench_score import get_rewards_batch, grpo_load

    from rmtorch.loading import load_reward_model
    from rmtorch.score import RewardScorer

    bench_score.DATA_FILE = args.shared / "data" / "r1_gsm8k" / "r1_distill_qwen32b_gsm8k_labeled.jsonl"
    model, tokenizer = load_reward_model(str(model_dir))
    model = model.cuda().eval()
    prompts, completions = grpo_load(tokenizer, args.prompts, args.generations, 64, args.max_completion, seed=0)
    scorer = RewardScorer(model, tokenizer, max_tokens_per_batch=16384, autocast_dtype=torch.bfloat16)

    def seed():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return get_rewards_batch(CudaInputs(model), tokenizer, prompts, completions)

    variants = {"seed padded batch": seed, "rmtorch scorer": lambda: scorer(prompts, completions)}
    best, rewards = {}, {}
    for name, fn in variants.items():
        fn()  # warm-up: CUDA kernels, FlexAttention's compile per shape bucket
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            rewards[name] = fn().float().cpu()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        best[name] = min(times)
    tokens = sum(len(ids) for ids in scorer.split(prompts, completions).sequences("full"))
    return {
        "rows": len(prompts),
        "tokens": tokens,
        "seconds": best,
        "tokens_per_s": {name: tokens / seconds for name, seconds in best.items()},
        "speedup_vs_seed": best["seed padded batch"] / best["rmtorch scorer"],
        "max_reward_diff_vs_seed": (rewards["rmtorch scorer"] - rewards["seed padded batch"]).abs().max().item(),
        "reward_std": rewards["seed padded batch"].std().item(),
    }


def versus_vllm(args, model_dir: Path) -> dict:
    """rmtorch's scorer against plain vLLM's offline engine, both bf16 on the GPU; see section 6 above."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {
            "skipped": f"{sys.executable} has no vllm: the GPU image holds none, and vLLM's CUDA wheels (hundreds of "
            "MB with their dependencies) exceed the 64 MiB a device call carries"
        }
    import bench_score
    import vllm_engine
    from bench_score import VLLM_VARIANTS, executed_tokens, grpo_load

    from rmtorch.loading import load_reward_model
    from rmtorch.score import RewardScorer

    bench_score.DATA_FILE = args.shared / "data" / "r1_gsm8k" / "r1_distill_qwen32b_gsm8k_labeled.jsonl"
    model, tokenizer = load_reward_model(str(model_dir))
    scorer = RewardScorer(model.cuda().eval(), tokenizer, max_tokens_per_batch=16384, autocast_dtype=torch.bfloat16)
    splits = [
        scorer.split(*grpo_load(tokenizer, args.prompts, args.generations, 64, args.max_completion, index,
                                offset=index * args.prompts))
        for index in range(4)
    ]  # fmt: skip

    def rmtorch_round(split) -> dict:
        torch.cuda.synchronize()
        start = time.perf_counter()
        rewards = scorer.score_split(split).rewards
        torch.cuda.synchronize()
        sequences = split.sequences("full")
        positions = executed_tokens(sequences, [len(ids) for ids in split.prompt_ids], 16384)["rmtorch packed+shared"]
        return {"wall_s": time.perf_counter() - start, "positions": positions, "rewards": rewards.tolist()}

    results = {}
    for name, prefix_caching in VLLM_VARIANTS.items():  # one engine at a time, the rmtorch model staying loaded
        sides = {"rmtorch": [], "vllm": []}
        with vllm_engine.OfflineEngine(
            model_dir, prefix_caching=prefix_caching, threads=None, python=sys.executable, dtype="bfloat16",
            gpu_memory_utilization=0.5,
        ) as engine:  # fmt: skip
            for index, split in enumerate(splits):
                for side in ("rmtorch", "vllm") if index % 2 == 0 else ("vllm", "rmtorch"):
                    result = rmtorch_round(split) if side == "rmtorch" else engine.score(split.sequences("full"))
                    if index > 0:  # round 0 warms both up
                        sides[side].append(result)
        tokens = sum(len(ids) for split in splits[1:] for ids in split.sequences("full"))
        wall = {side: sum(r["wall_s"] for r in rounds) for side, rounds in sides.items()}
        rewards = {side: torch.tensor([x for r in rounds for x in r["rewards"]]) for side, rounds in sides.items()}
        results[name] = {
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": {side: tokens / seconds for side, seconds in wall.items()},
            "positions": {side: sum(r["positions"] for r in rounds) for side, rounds in sides.items()},
            "rmtorch_speedup": wall["vllm"] / wall["rmtorch"],
            "max_reward_diff": (rewards["vllm"] - rewards["rmtorch"]).abs().max().item(),
        }
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    return {"rows_per_round": len(splits[0].sequences("full")), "rounds": len(splits) - 1, "variants": results}


class CudaInputs(torch.nn.Module):
    """The seed's scorer tokenizes on the CPU; this moves its batch to the model's GPU."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model(**{key: value.cuda() for key, value in batch.items()})


# ------------------------------------------------------------------------------------------ training runs


def run_worker(args) -> dict:
    """One variant in this fresh process: trained twice on the same pairs, the second run timed."""
    import bench_train
    from accelerate.state import AcceleratorState
    from bench_train import bench_pairs, run_rmtorch
    from transformers import AutoTokenizer

    bench_train.DATA_FILE = args.shared / "data" / "llamafactory" / "dpo_en_demo.json"
    trainer, precision = args.worker.split()
    pairs = bench_pairs(AutoTokenizer.from_pretrained(args.model), args.pairs, args.max_length)
    runs = []
    for _ in range(2):
        with tempfile.TemporaryDirectory(prefix="rmtorch-gpu-") as tmp:
            if trainer == "trl":
                runs.append(run_trl(args, pairs, qlora=precision == "qlora", workdir=Path(tmp)))
            else:
                runs.append(
                    run_rmtorch(str(args.model), pairs, args, True, RMTORCH_FLAGS[precision], Path(tmp), False)
                )
        AcceleratorState._reset_state(reset_partial_state=True)  # each run builds its own Accelerator
        torch.cuda.empty_cache()
    return {
        **runs[1],
        "cold_loop_s": runs[0]["loop_s"],
        "tokens": sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def run_trl(args, pairs: list[dict], qlora: bool, workdir: Path) -> dict:
    """TRL's RewardTrainer on the GPU as its documentation runs it: bf16, or QLoRA through peft_config on a model
    quantized to nf4 straight onto the GPU (the LoRA layout rmtorch's --lora uses)."""
    import datasets
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import RewardConfig, RewardTrainer

    from rmtorch.loading import load_reward_model, quantization_config_4bit

    class StepClock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.begin, self.step_ends = time.perf_counter(), []

        def on_step_end(self, *_, **__):
            torch.cuda.synchronize()
            self.step_ends.append(time.perf_counter())

    torch.manual_seed(args.seed)
    quantization = quantization_config_4bit(torch.bfloat16) if qlora else None
    placement = {"": torch.cuda.current_device()} if qlora else None  # nf4 weights are quantized on the GPU
    model, tokenizer = load_reward_model(str(args.model), quantization_config=quantization, device_map=placement)
    peft_config = None
    if qlora:
        peft_config = LoraConfig(
            task_type="SEQ_CLS", r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
            modules_to_save=["score"],
        )  # fmt: skip
    dataset = datasets.Dataset.from_list(
        [{"chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"]} for p in pairs]
    )
    config = RewardConfig(
        output_dir=str(workdir / "trl"), report_to="none", bf16=True, save_strategy="no",
        max_steps=math.ceil(len(pairs) / args.batch_size), per_device_train_batch_size=args.batch_size,
        logging_steps=1, gradient_checkpointing=False, dataloader_num_workers=0, max_length=None,
        learning_rate=args.lr, warmup_steps=0, seed=args.seed, disable_tqdm=True,
    )  # fmt: skip
    clock = StepClock()
    hf_logging.set_verbosity_error()
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
        callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {"loop_s": clock.step_ends[-1] - clock.begin, "train_loss": sum(losses) / len(losses)}


# ---------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="rmtorch's GPU check (see bench/gpu_check.sh).")
    parser.add_argument("--shared", type=Path, default=REPO_ROOT.parent / "shared", help="Tokenizer and data.")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "gpu.json")
    parser.add_argument("--budget_s", type=float, default=420, help="No section starts after this many seconds.")
    parser.add_argument("--pairs", type=int, default=64, help="Training pairs (one epoch per run).")
    parser.add_argument("--max_length", type=int, default=1024, help="Longest pair, tokens.")
    parser.add_argument("--batch_size", type=int, default=8, help="Pairs per step.")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=42, help="Score head and data order (both trainers).")
    parser.add_argument("--prompts", type=int, default=16, help="Scorer load: GSM8K prompts.")
    parser.add_argument("--generations", type=int, default=8, help="Scorer load: completions per prompt.")
    parser.add_argument("--max_completion", type=int, default=1024, help="Scorer load: longest completion.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)))
        return {}
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: run bench/gpu_check.sh on a GPU machine.")
    start, results = time.time(), {"date": time.strftime("%Y-%m-%d %H:%M")}
    with tempfile.TemporaryDirectory(prefix="rmtorch-qwen3-") as tmp:
        model_dir = Path(tmp) / "qwen3-0.6b-rm"
        sections = {
            "environment": environment,
            "tests": tests,
            "model": lambda: build_model(args.shared, model_dir),
            "train": lambda: train(args, model_dir),
            "score": lambda: score(args, model_dir),
            "vllm": lambda: versus_vllm(args, model_dir),
        }
        for name, section in sections.items():
            if time.time() - start > args.budget_s:
                results[name] = {"skipped": f"the {args.budget_s:.0f} s budget was spent"}
            else:
                print(f"== {name} ({time.time() - start:.0f} s)", flush=True)
                try:
                    results[name] = section()
                except Exception:  # recorded; the other sections still run
                    results[name] = {"error": traceback.format_exc()[-4000:]}
                    print(results[name]["error"], flush=True)
            results["wall_s"] = round(time.time() - start, 1)
            write(results, args.output)
    return results


def write(results: dict, output: Path) -> None:
    text = json.dumps(results, indent=2, default=str) + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / output.name).write_text(text)


if __name__ == "__main__":
    main()
