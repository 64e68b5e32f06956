"""Training throughput: rmtorch's train.py against TRL 1.16's RewardTrainer, in one run, alternating.

    python bench/bench_train.py                       # defaults: 16 real pairs, batch 4, bf16, 2 rounds
    python bench/bench_train.py --threads 1 --precision bf16 fp32
    pytest bench/ --benchmark-only          # the same through pytest-benchmark (RMTORCH_BENCH_ARGS adds options)

Same model (SmolLM2-135M-Instruct, score head drawn from seed 42), same real data (the first `--pairs` pairs
of LLaMA-Factory's dpo_en_demo that fit in `--max_length` tokens: TRL's own drop rule, so prompts stay whole and
lengths stay uneven), same token ids (rmtorch tokenizes once and TRL gets the `chosen_ids`/`rejected_ids`
columns, which it uses verbatim), same batch size, learning rate, precision and optimizer (fused AdamW), one
epoch each. Every run is a fresh process; variants alternate their order from round to round and each keeps
its best round.

Tokens/s counts the non-pad tokens of every chosen and rejected sequence (what TRL logs as num_tokens), the
same total for every variant, over the loop's wall time (data, forward, backward, update; rmtorch's
`step_time` in metrics.jsonl, TRL's time from on_train_begin to the last on_step_end). Achieved FLOP/s is
6 * N * tokens/s with N the parameters in matmuls (the body without the embedding table, plus the head), as a
fraction of this machine's torch.matmul peak at 2048x2048, measured in the same run (the best of the
measurements taken before every training run).
"Executed" counts only the tokens the model ran (a shared prompt once, padding never: the logged token count).
The final loss is each trained model's pair-weighted loss over the same pairs (untimed, same precision).
bf16's effect on accuracy: rmtorch is also trained once in fp32 (`--fp32_check`), and the initial model's
rewards on 8 pairs are compared between fp32 and bf16 autocast (largest difference, pair-order agreement).

Before anything is timed, `--warm_memory_gib` GiB are written once in a child process (machine.warm_memory): on a
freshly started virtual machine the first write of memory costs several times a later one, which favoured whichever
variant ran later. Writes bench/results/latest.json (read-modify-write: other benches own other keys) and prints a
table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from benchlib import RESULTS_FILE, run_benchmark, write_results
from machine import cpu_info, matmul_peak_gflops, warm_memory

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
DATA_FILE = REPO_ROOT.parent / "shared" / "data" / "llamafactory" / "dpo_en_demo.json"
FAST_FLAGS = ["--packing", "true", "--group_by_length", "true"]
VARIANTS = {  # name → rmtorch train.py flags (None: TRL)
    "trl": None,
    "rmtorch": FAST_FLAGS,
    "rmtorch-padded": ["--packing", "false"],
}


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: everything but the input embedding table."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embedding)


def bench_pairs(tokenizer, num_pairs: int, max_length: int) -> list[dict]:
    """The first num_pairs pairs of dpo_en_demo that fit in max_length tokens, tokenized as train.py does."""
    from rmtorch.files import load_pairs
    from rmtorch.pairs import tokenize_pairs

    tokenized = tokenize_pairs(load_pairs(DATA_FILE), tokenizer, max_length=max_length, truncation="drop")
    if len(tokenized) < num_pairs:
        raise SystemExit(
            f"only {len(tokenized)} pairs of {DATA_FILE} fit in {max_length} tokens; lower --pairs or raise "
            "--max_length."
        )
    return tokenized.select(range(num_pairs)).to_list()


def pairs_of_length(tokenizer, length: int, num_pairs: int) -> list[dict]:
    """num_pairs conversational pairs of about `length` tokens each: a user turn made of real dpo_en_demo user
    texts, cut to fit, and that row's real chosen and rejected answers (at most length // 4 tokens each). Long
    prompts, as in multi-turn or retrieval data, where attention's share of the work grows."""
    from rmtorch.files import load_pairs
    from rmtorch.pairs import tokenize_pairs

    rows = load_pairs(DATA_FILE).to_list()
    user_texts = [m["content"] for row in rows for m in row["prompt"] if m["role"] == "user"]
    answer_budget = max(8, length // 4)

    def cut(text: str, tokens: int) -> str:
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:tokens])

    pairs = []
    for i in range(num_pairs):
        chosen, rejected = (cut(rows[i][side][0]["content"], answer_budget) for side in ("chosen", "rejected"))
        answer = max(len(tokenizer(chosen)["input_ids"]), len(tokenizer(rejected)["input_ids"]))
        prompt, j = "", i
        while len(tokenizer(prompt)["input_ids"]) < length:
            prompt, j = prompt + user_texts[j % len(user_texts)] + "\n\n", j + 1
        prompt = cut(prompt, length - answer - 32)  # the chat template adds about 30 tokens
        pairs.append({
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })  # fmt: skip
    return tokenize_pairs(pairs, tokenizer).to_list()


def run_trl(model_path: str, pairs: list[dict], args, bf16: bool, workdir: Path, final_loss: bool) -> dict:
    import datasets
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import RewardConfig, RewardTrainer

    from rmtorch.loading import load_reward_model

    class StepClock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.begin, self.step_ends = time.perf_counter(), []

        def on_step_end(self, *_, **__):
            self.step_ends.append(time.perf_counter())

    torch.manual_seed(args.seed)
    model, tokenizer = load_reward_model(model_path)
    dataset = datasets.Dataset.from_list(
        [{"chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"]} for p in pairs]
    )
    config = RewardConfig(
        output_dir=str(workdir / "trl"),
        report_to="none",
        use_cpu=True,
        bf16=bf16,
        save_strategy="no",
        max_steps=math.ceil(len(pairs) / args.batch_size),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        logging_steps=1,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        max_length=None,
        learning_rate=args.lr,
        warmup_steps=0,
        seed=args.seed,
        disable_tqdm=True,
    )
    clock = StepClock()
    hf_logging.set_verbosity_error()
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=copy.deepcopy(tokenizer), callbacks=[clock]
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    num_tokens = max(log.get("num_tokens", 0) for log in trainer.state.log_history)
    result = {
        "loop_s": clock.step_ends[-1] - clock.begin,
        "train_loss": sum(losses) / len(losses),
        "logged_tokens": int(num_tokens),
    }
    if final_loss:
        result["final_loss"] = trainer.evaluate(eval_dataset=dataset)["eval_loss"]
    return result


def run_rmtorch(
    model_path: str, pairs: list[dict], args, bf16: bool, flags: list[str], workdir: Path, final_loss: bool
) -> dict:
    import train

    run_dir = workdir
    train_file = run_dir / "pairs.jsonl"
    train_file.write_text(
        "".join(json.dumps({"chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"]}) + "\n" for p in pairs)
    )
    eval_file = train_file if final_loss else run_dir / "one_pair.jsonl"
    if not final_loss:
        eval_file.write_text(train_file.read_text().splitlines()[0] + "\n")
    eval_results = train.main(
        [
            "--model",
            model_path,
            "--train_file",
            str(train_file),
            "--eval_file",
            str(eval_file),
            "--output_dir",
            str(run_dir / "out"),
            "--batch_size",
            str(args.batch_size),
            "--max_steps",
            str(math.ceil(len(pairs) / args.batch_size)),
            "--lr",
            str(args.lr),
            "--warmup_steps",
            "0",
            "--warmup_ratio",
            "0",
            "--max_length",
            "none",
            "--seed",
            str(args.seed),
            "--bf16",
            str(bf16).lower(),
            "--log_every",
            "1000",
            "--cpu_threads",
            str(torch.get_num_threads()),  # the bench's thread count, as TRL gets (train.py would take every core)
            *flags,
        ]
    )
    records = [json.loads(line) for line in (run_dir / "out" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "step_time" in r]
    result = {
        "loop_s": sum(r["step_time"] for r in records),
        "train_loss": sum(r["loss"] for r in records) / len(records),
        "logged_tokens": records[-1]["tokens"],
    }
    if final_loss:
        result["final_loss"] = eval_results["loss"]
    return result


def bf16_reward_drift(model_path: str, pairs: list[dict], seed: int) -> dict:
    """How far bf16 autocast moves the initial model's rewards from fp32 on the bench pairs (forward only); the
    score head is drawn from `seed`, as the training runs draw theirs (else every bench run compared another head)."""
    from rmtorch.loading import load_reward_model
    from rmtorch.model import RewardModel, compute_rewards

    torch.manual_seed(seed)
    model, tokenizer = load_reward_model(model_path)
    reward_model = RewardModel(model)
    sequences = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    prompt_lengths = [p["prompt_length"] for p in pairs] * 2
    fp32, bf16 = (
        compute_rewards(
            reward_model, sequences, prompt_lengths, pad_token_id=tokenizer.pad_token_id, autocast_dtype=dtype
        ).view(2, -1)
        for dtype in (None, torch.bfloat16)
    )  # (2, N): chosen row, rejected row
    same_order = ((fp32[0] > fp32[1]) == (bf16[0] > bf16[1])).float().mean().item()
    return {
        "pairs": fp32.shape[1],
        "reward_max_abs_diff": (fp32 - bf16).abs().max().item(),
        "reward_std_fp32": fp32.std().item(),
        "pair_order_agreement": same_order,
    }


def run_worker(args) -> dict:
    """One training run (a fresh process: Accelerate's state is per process, and peaks never mix)."""
    from transformers import AutoTokenizer

    from rmtorch.loading import resolve_model_path

    variant, precision = args.worker
    model_path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if args.pair_length:
        pairs = pairs_of_length(tokenizer, args.pair_length, args.pairs)
    else:
        pairs = bench_pairs(tokenizer, args.pairs, args.max_length)
    with tempfile.TemporaryDirectory(prefix="rmtorch-bench-") as tmp:
        if VARIANTS[variant] is None:
            return run_trl(model_path, pairs, args, precision == "bf16", Path(tmp), args.final_loss)
        return run_rmtorch(model_path, pairs, args, precision == "bf16", VARIANTS[variant], Path(tmp), args.final_loss)


def run_in_subprocess(args, variant: str, precision: str, final_loss: bool) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        precision,
        "--final_loss",
        str(int(final_loss)),
        "--model",
        args.model,
        "--pairs",
        str(args.pairs),
        "--max_length",
        str(args.max_length),
        "--batch_size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--pair_length",
        str(args.pair_length),
    ]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"{variant} {precision} failed:\n{finished.stderr[-4000:]}")
    return json.loads(
        next(line for line in reversed(finished.stdout.splitlines()) if line.startswith("RESULT "))[len("RESULT ") :]
    )


def run_bench(args) -> dict:
    from transformers import AutoTokenizer

    from rmtorch.loading import load_reward_model, resolve_model_path

    model_path = resolve_model_path(args.model)
    pairs = bench_pairs(AutoTokenizer.from_pretrained(model_path), args.pairs, args.max_length)
    lengths = [len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs]
    total_tokens = sum(lengths)
    num_params = matmul_params(load_reward_model(model_path)[0])
    warmed = warm_memory(args.warm_memory_gib)  # every variant's first steps then write memory in the same state
    print(f"memory: wrote {warmed['gib']} GiB before timing (last GiB {warmed['last_gib_s'] or 0:.2f} s)", flush=True)
    peaks = {"fp32": 0.0, "bf16": 0.0}
    runs: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):
        order = [(p, v) for p in args.precision for v in args.variants]
        order = order if round_index % 2 == 0 else order[::-1]
        if round_index == 0 and args.fp32_check and "fp32" not in args.precision:
            order.append(("fp32", "rmtorch"))  # bf16's effect on the final loss
        for precision, variant in order:
            for name, dtype in (
                ("fp32", torch.float32),
                ("bf16", torch.bfloat16),
            ):  # the best of many: others share this machine
                peaks[name] = max(peaks[name], matmul_peak_gflops(dtype))
            print(f"round {round_index + 1}/{args.rounds}: {variant} {precision}", flush=True)
            result = run_in_subprocess(args, variant, precision, final_loss=round_index == 0)
            result["tokens_per_s"] = total_tokens / result["loop_s"]
            print(
                f"  {result['tokens_per_s']:.1f} tokens/s, loop {result['loop_s']:.1f}s, mean train loss "
                f"{result['train_loss']:.4f}",
                flush=True,
            )
            runs.setdefault(f"{variant} {precision}", []).append(result)
    drift = bf16_reward_drift(model_path, pairs[:8], args.seed)
    summary = summarize(args, runs, peaks, num_params, total_tokens, lengths, drift)
    summary["train_memory_warmed"] = warmed
    return summary


def run_scaling(args) -> dict:
    """tokens/s of TRL and rmtorch (bf16 both) on pairs of each length in args.lengths, 2 steps each, fresh
    processes, the two alternating."""
    rows = []
    for index, length in enumerate(args.lengths):
        num_pairs = max(2, args.scaling_tokens // (2 * length))
        worker_args = copy.copy(args)
        worker_args.pair_length, worker_args.pairs = length, num_pairs
        worker_args.batch_size = max(1, num_pairs // 2)  # two steps
        result = {}
        for variant in ("trl", "rmtorch") if index % 2 == 0 else ("rmtorch", "trl"):
            print(f"length {length}: {variant}, {num_pairs} pairs", flush=True)
            run = run_in_subprocess(worker_args, variant, "bf16", final_loss=False)
            result[variant] = run
        tokens = result["trl"]["logged_tokens"]  # TRL counts every non-pad token: the same total for both
        row = {
            "length": length,
            "pairs": num_pairs,
            "tokens": tokens,
            "trl_tokens_per_s": tokens / result["trl"]["loop_s"],
            "rmtorch_tokens_per_s": tokens / result["rmtorch"]["loop_s"],
            "rmtorch_executed_tokens": result["rmtorch"]["logged_tokens"],
        }
        row["speedup"] = row["rmtorch_tokens_per_s"] / row["trl_tokens_per_s"]
        rows.append(row)
        print(
            f"  TRL {row['trl_tokens_per_s']:.1f} tokens/s, rmtorch {row['rmtorch_tokens_per_s']:.1f} "
            f"({row['speedup']:.2f}x; it ran {row['rmtorch_executed_tokens']} of {tokens} tokens)",
            flush=True,
        )
    print("| pair length | pairs | TRL tokens/s | rmtorch tokens/s | vs TRL | tokens rmtorch ran |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| ~{r['length']} | {r['pairs']} | {r['trl_tokens_per_s']:.1f} | {r['rmtorch_tokens_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['rmtorch_executed_tokens']} of {r['tokens']} |"
        )
    return {"train_scaling": rows, "train_scaling_machine": machine()}


def summarize(
    args, runs: dict, peaks: dict, num_params: int, total_tokens: int, lengths: list[int], drift: dict | None
) -> dict:
    rows = []
    for key, results in runs.items():
        variant, precision = key.split()
        best = max(results, key=lambda r: r["tokens_per_s"])
        flops = 6 * num_params * best["tokens_per_s"]
        trl = max(runs[f"trl {precision}"], key=lambda r: r["tokens_per_s"]) if f"trl {precision}" in runs else None
        rows.append(
            {
                "variant": variant,
                "precision": precision,
                "tokens_per_s": best["tokens_per_s"],
                "rounds_tokens_per_s": [r["tokens_per_s"] for r in results],
                "vs_trl": best["tokens_per_s"] / trl["tokens_per_s"] if trl else None,
                "gflops": flops / 1e9,
                "peak_fraction": flops / 1e9 / peaks[precision],
                "executed_peak_fraction": 6
                * num_params
                * best["logged_tokens"]
                / best["loop_s"]
                / 1e9
                / peaks[precision],
                "train_loss": results[0]["train_loss"],
                "final_loss": results[0].get("final_loss"),
                "logged_tokens": results[0]["logged_tokens"],
            }
        )
    figures = {f"train_{r['variant'].replace('-', '_')}_{r['precision']}": r for r in rows}  # lookup only
    summary = {
        "train_rows": rows,
        "train_config": {
            "model": args.model,
            "data": f"{DATA_FILE.name}: first {args.pairs} pairs within {args.max_length} tokens",
            "pairs": args.pairs,
            "tokens": total_tokens,
            "pair_tokens_min_median_max": [min(lengths), sorted(lengths)[len(lengths) // 2], max(lengths)],
            "batch_size": args.batch_size,
            "steps": math.ceil(args.pairs / args.batch_size),
            "lr": args.lr,
            "rounds": args.rounds,
            "threads": torch.get_num_threads(),
            "matmul_params": num_params,
            "rmtorch_flags": " ".join(FAST_FLAGS),
        },
        "train_machine": machine(),
        "peak_fp32_gflops": peaks["fp32"],
        "peak_bf16_gflops": peaks["bf16"],
    }
    for r in rows:
        name = f"{r['variant'].replace('-', '_')}_{r['precision']}"
        summary[f"train_tokens_per_s_{name}"] = r["tokens_per_s"]
        summary[f"train_final_loss_{name}"] = r["final_loss"]
    main_precision = "bf16" if "bf16" in args.precision else args.precision[0]
    if (
        f"train_rmtorch_{main_precision}" in figures
        and figures[f"train_rmtorch_{main_precision}"]["vs_trl"] is not None
    ):
        summary["train_speedup_vs_trl"] = figures[f"train_rmtorch_{main_precision}"]["vs_trl"]
    for precision in ("bf16", "fp32"):
        if f"train_rmtorch_{precision}" in figures:
            summary[f"train_{precision}_peak_fraction"] = figures[f"train_rmtorch_{precision}"]["peak_fraction"]
            summary[f"train_{precision}_executed_peak_fraction"] = figures[f"train_rmtorch_{precision}"][
                "executed_peak_fraction"
            ]
    if drift:
        summary["train_bf16_reward_drift"] = drift
    return summary


def machine() -> dict:
    info = cpu_info()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": info["model"],
        "matrix_extensions": info["extensions"],
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "load_avg_1min_at_end": load,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def markdown_table(summary: dict) -> str:
    lines = [
        "| variant | precision | tokens/s | vs TRL | GFLOP/s | of matmul peak | executed, of peak | mean train loss "
        "| final loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["train_rows"]:
        vs_trl = f"{r['vs_trl']:.2f}x" if r["vs_trl"] is not None else "-"
        final = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['precision']} | {r['tokens_per_s']:.1f} | {vs_trl} | {r['gflops']:.1f} | "
            f"{r['peak_fraction']:.1%} | {r['executed_peak_fraction']:.1%} | {r['train_loss']:.4f} | {final} |"
        )
    config, host = summary["train_config"], summary["train_machine"]
    lines.append("")
    lines.append(
        f"{host['cpu']} ({', '.join(host['matrix_extensions']) or 'no matrix extensions'}): matmul peak (2048², "
        f"same run) fp32 {summary['peak_fp32_gflops']:.1f} GFLOP/s, bf16 {summary['peak_bf16_gflops']:.1f} GFLOP/s. "
        f"{config['data']} ({config['tokens']} tokens, pair length {config['pair_tokens_min_median_max']}), batch "
        f"{config['batch_size']} pairs, "
        f"{config['steps']} steps, {config['threads']} thread(s); {host['cpu']}, {host['cores']} cores, torch "
        f"{host['torch']}, "
        f"1-min load {host['load_avg_1min_at_end']:.1f} at the end, {host['date']}; "
        f"{summary['train_memory_warmed']['gib']} GiB of memory written before timing."
    )
    drift = summary.get("train_bf16_reward_drift")
    if drift:
        lines.append(
            f"bf16 autocast vs fp32, initial model, {drift['pairs']} pairs: largest reward difference "
            f"{drift['reward_max_abs_diff']:.4f} "
            f"(reward std {drift['reward_std_fp32']:.3f}), same preferred response in "
            f"{drift['pair_order_agreement']:.0%} of pairs."
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="Model for both trainers (a local directory or 'smollm2').")
    parser.add_argument("--pairs", type=int, default=16, help="Pairs in the fixed subset (one epoch each).")
    parser.add_argument(
        "--max_length",
        type=int,
        default=512,
        help="Longest sequence kept (longer pairs are skipped when picking the subset).",
    )
    parser.add_argument("--batch_size", type=int, default=4, help="Pairs per step, for every variant.")
    parser.add_argument(
        "--lr", type=float, default=1e-5, help="Learning rate, for every variant (no warm-up, linear decay)."
    )
    parser.add_argument("--seed", type=int, default=42, help="Seed of the score head and the data order.")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds; each variant keeps its best round.")
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["bf16"],
        choices=["bf16", "fp32"],
        help="Precisions to compare at (bf16: autocast for both).",
    )
    parser.add_argument(
        "--fp32_check",
        type=int,
        default=1,
        help="1: also train rmtorch once in fp32 (round 1) to show bf16's effect on the final loss.",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="What to run.")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for every variant (0: torch's default). Use 1 on a shared, oversubscribed machine.",
    )
    parser.add_argument(
        "--warm_memory_gib",
        type=float,
        default=12,
        help="GiB written once before timing (bench/machine.py warm_memory; 0: none): on a freshly started virtual "
        "machine the first write of memory costs several times a later one.",
    )
    parser.add_argument("--no_write", action="store_true", help="Print only; leave bench/results/latest.json alone.")
    parser.add_argument(
        "--worker", nargs=2, metavar=("VARIANT", "PRECISION"), help=argparse.SUPPRESS
    )  # one run, in a subprocess
    parser.add_argument("--final_loss", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--lengths",
        nargs="*",
        type=int,
        default=[],
        help="Instead of the real-data comparison: TRL vs rmtorch (bf16) on pairs of about these lengths in tokens "
        "(e.g. 256 1024 4096), --scaling_tokens tokens each, 2 steps.",
    )
    parser.add_argument("--scaling_tokens", type=int, default=8192, help="Chosen + rejected tokens per length run.")
    parser.add_argument("--pair_length", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        result = run_worker(args)
        print("RESULT " + json.dumps(result), flush=True)
        return result
    if args.lengths:
        summary = run_scaling(args)
        owned = ("train_scaling",)
    else:
        summary = run_bench(args)
        print(markdown_table(summary))
        owned = ("train_", "peak_")
    if not args.no_write:
        write_results(summary, owned)
        print(f"written to {RESULTS_FILE}")
    return summary


def test_train_vs_trl(benchmark):
    run_benchmark(benchmark, main)


if __name__ == "__main__":
    main(sys.argv[1:])
