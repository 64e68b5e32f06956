"""Scoring throughput on a GRPO-shaped load: rmtorch.score against the seed's `get_rewards_batch`, in one run.

    python bench/bench_score.py                       # 8 prompts x 8 completions, SmolLM2-135M, fp32 and bf16
    python bench/bench_score.py --threads 2 --max_completion 512
    python bench/bench_score.py --prompts 2 --generations 4 --rounds 2 --precision fp32 --no_write  # a quick look
    pytest bench/ --benchmark-only          # the same through pytest-benchmark (RMTORCH_BENCH_ARGS adds options)

Load: the first `--prompts` GSM8K questions of ../shared/data/r1_gsm8k as user turns, each with `--generations`
completions cut from that question's real R1 reasoning + answer at lengths drawn uniformly from
[`--min_completion`, `--max_completion`] tokens (seeded), conversational, adjacent per prompt: what TRL's GRPO
hands a reward function.

Baseline (the seed's get_rewards_batch): the chat-template texts of all rows, tokenized as one padded batch,
one forward of the HF model, `logits[:, 0]` (under no_grad). Its token ids equal rmtorch's training-format ids
(checked), and the chat template ends in "\\n", not the pad token, so transformers' pooling reads the same
token rmtorch does: the rewards must agree to 1e-3 (checked; fp32 for both).
Variants: rmtorch's scorer with packing and shared prompts (default), and with sorted padded micro-batches.
Each round runs every variant once in alternating order; each variant's time is its best round (wall clock;
CPU time of the process alongside; the recorded ratio uses CPU time, steadier on a shared machine). Tokens/s counts
the rows' real tokens (the same total for every variant). Each precision in `--precision` is timed on its own:
in bf16 the seed runs under CPU bf16 autocast and rmtorch with the scorer's bf16 autocast, and every variant's
largest reward difference from the seed's fp32 rewards is reported, so speed and accuracy are compared fairly.

Plain vLLM, in the same run when .venv-vllm exists (tests/vllm/setup_venv.sh; else skipped, with the reason
printed and recorded): its offline engine (`LLM(..., runner="pooling", dtype="float32")`, bench/vllm_engine.py in
that venv) with its prefix cache on (vLLM's default) and off, against rmtorch's packed scorer, token ids in and fp32
rewards out, on `--rounds` fresh GRPO loads of the same shape (vLLM's cache keeps whole sequences: a repeated row
would time the cache). Reported: each side's time, tokens/s, positions run (tokens less those vLLM read from its
cache; rmtorch's packed plan) and the rewards' largest difference (must be within 1e-4), under score_vs_vllm. Two
loads: `same_trace`, the load above (a group's completions are cuts of one trace, so they share long prefixes that
vLLM's block prefix cache finds and rmtorch's shared prompt does not), and `distinct` (each completion from another
question's trace: a group shares its prompt and nothing more, as sampled completions mostly do). `--only_vllm` runs
this comparison alone.

Writes score_* keys into bench/results/latest.json (read-modify-write: other benches own other keys) and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from benchlib import RESULTS_FILE, run_benchmark, write_results
from machine import cpu_description, cpu_info, matmul_peak_gflops

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
DATA_FILE = REPO_ROOT.parent / "shared" / "data" / "r1_gsm8k" / "r1_distill_qwen32b_gsm8k_labeled.jsonl"


def grpo_load(
    tokenizer, num_prompts: int, generations: int, min_tokens: int, max_tokens: int, seed: int, distinct: bool = False,
    offset: int = 0,
):  # fmt: skip
    """(prompts, completions) as GRPO passes them: message lists, each prompt's completions adjacent. The prompts
    are `num_prompts` questions from the `offset`-th on. Completions are cut from the prompt's own R1 trace, so a
    group's completions also share their first tokens; with `distinct`, each completion is cut from the trace of
    another question (the rows after the prompts'), so that a group shares its prompt and nothing more, as sampled
    completions mostly do."""
    lines = DATA_FILE.read_text().splitlines()[offset:]
    rows = [json.loads(line) for line in lines[:num_prompts]]
    if len(rows) < num_prompts:
        raise ValueError(f"{DATA_FILE} has too few rows for {num_prompts} prompts from row {offset}.")
    others = [json.loads(line) for line in lines[num_prompts:]] if distinct else []
    if distinct and len(others) < num_prompts * generations:
        raise ValueError(f"{DATA_FILE} has too few rows for {num_prompts} x {generations} distinct completions.")
    rng = random.Random(seed)
    prompts, completions = [], []
    for index, row in enumerate(rows):
        for generation in range(generations):
            source = others[index * generations + generation] if distinct else row
            trace_ids = tokenizer(text=source["reasoning"] + "\n\n" + source["answer"], add_special_tokens=False)[
                "input_ids"
            ]
            length = rng.randint(min_tokens, max_tokens)
            prompts.append([{"role": "user", "content": row["question"]}])
            completions.append([{"role": "assistant", "content": tokenizer.decode(trace_ids[:length])}])
    return prompts, completions


def get_rewards_batch(model, tokenizer, prompts, completions) -> torch.Tensor:
    """The seed's scorer: one padded batch of prompt+response texts through the HF model's own forward."""
    texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        return model(**batch).logits[:, 0].float()


def executed_tokens(sequences, prompt_lengths, budget: int) -> dict[str, int]:
    """Token positions each rmtorch variant runs through the model: packed, a shared prompt laid out once per group;
    padded, every micro-batch's rows x its longest row."""
    from rmtorch.batching import plan_packed, plan_padded

    packed = sum(
        sum(len(sequences[i]) for i in group.rows) - group.shared * (len(group.rows) - 1)
        for batch in plan_packed(sequences, prompt_lengths, budget)
        for group in batch
    )
    padded = sum(
        len(group.rows) * max(len(sequences[i]) for i in group.rows)
        for batch in plan_padded(sequences, prompt_lengths, budget)
        for group in batch
    )
    return {"rmtorch packed+shared": packed, "rmtorch padded": padded}


def timed(fn) -> tuple[torch.Tensor, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="rmtorch.score vs the seed's get_rewards_batch on a GRPO-shaped load."
    )
    parser.add_argument(
        "--model", default="smollm2", help="Reward model to load (default: the embedded SmolLM2-135M-Instruct)."
    )
    parser.add_argument("--prompts", type=int, default=8, help="Prompts (GSM8K questions).")
    parser.add_argument("--generations", type=int, default=8, help="Completions per prompt.")
    parser.add_argument("--min_completion", type=int, default=8, help="Shortest completion, tokens.")
    parser.add_argument("--max_completion", type=int, default=256, help="Longest completion, tokens.")
    parser.add_argument("--max_tokens_per_batch", type=int, default=4096, help="rmtorch's token budget per forward.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds; each variant keeps its best.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine).")
    parser.add_argument("--seed", type=int, default=0, help="Completion lengths and score-head init.")
    parser.add_argument(
        "--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
        help="Precisions to time; in each, the seed and rmtorch run in the same precision. fp32 comes first.",
    )  # fmt: skip
    parser.add_argument(
        "--no_vllm", action="store_true", help="Leave out the comparison with plain vLLM (run when .venv-vllm exists)."
    )
    parser.add_argument(
        "--vllm_loads", nargs="+", default=list(VLLM_LOADS), choices=list(VLLM_LOADS),
        help="Loads of the comparison with vLLM: completions cut from the question's own trace, or from others'.",
    )  # fmt: skip
    parser.add_argument(
        "--only_vllm", action="store_true", help="Only the comparison with plain vLLM (writes score_vs_vllm alone)."
    )
    parser.add_argument("--no_write", action="store_true", help="Print only; leave bench/results/latest.json alone.")
    return parser


def main(argv: list[str] | None = None) -> dict:
    from rmtorch.loading import load_reward_model
    from rmtorch.score import RewardScorer

    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = load_reward_model(args.model)
    model.eval()
    prompts, completions = grpo_load(
        tokenizer, args.prompts, args.generations, args.min_completion, args.max_completion, args.seed
    )
    scorers = {  # the same model: the scorer leaves its attention as it found it
        "rmtorch packed+shared": RewardScorer(model, tokenizer, max_tokens_per_batch=args.max_tokens_per_batch),
        "rmtorch padded": RewardScorer(
            model, tokenizer, max_tokens_per_batch=args.max_tokens_per_batch, packing=False
        ),
    }
    if args.only_vllm:  # the loads run now replace theirs in latest.json; the others' figures stay
        recorded = json.loads(RESULTS_FILE.read_text()).get("score_vs_vllm", {}) if RESULTS_FILE.exists() else {}
        recorded = {load: value for load, value in recorded.items() if load in VLLM_LOADS}
        fresh = versus_vllm(args, model, tokenizer, scorers["rmtorch packed+shared"])
        summary = {"score_vs_vllm": {**recorded, **fresh}}
        if not args.no_write:
            write_results(summary, ("score_vs_vllm",))
            print(f"written to {RESULTS_FILE}")
        return summary
    split = scorers["rmtorch padded"].split(prompts, completions)
    sequences = split.sequences("full")
    texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
    if tokenizer(texts, add_special_tokens=False)["input_ids"] != sequences:
        raise RuntimeError(
            "The seed's token ids differ from rmtorch's training-format ids; the comparison would not be like for "
            "like."
        )
    tokens = sum(len(ids) for ids in sequences)
    padded_tokens = len(sequences) * max(len(ids) for ids in sequences)
    executed = executed_tokens(sequences, [len(ids) for ids in split.prompt_ids], args.max_tokens_per_batch)
    executed["seed get_rewards_batch"] = padded_tokens
    embedding = model.get_input_embeddings().weight
    flops_per_token = 2 * sum(p.numel() for p in model.parameters() if p is not embedding)  # matmul FLOPs

    rows, rewards = {}, {}
    for precision in args.precision:  # each precision: the seed and rmtorch in the same precision, alternating
        rows[precision], rewards[precision] = time_variants(
            args, model, tokenizer, scorers, prompts, completions, precision
        )
    seed_name = "seed get_rewards_batch"
    reference = rewards[args.precision[0]][seed_name]  # fp32 unless only bf16 was asked for
    deviation = {
        precision: {name: (values - reference).abs().max().item() for name, values in by_name.items()}
        for precision, by_name in rewards.items()
    }  # each variant's largest reward difference from the seed's fp32 rewards
    if "fp32" in deviation and max(deviation["fp32"].values()) > 1e-3:
        raise RuntimeError(
            f"In fp32 rmtorch's rewards differ from the seed's by {deviation['fp32']} (> 1e-3); the timings would "
            "compare different work."
        )
    peaks = {precision: matmul_peak_gflops(PRECISIONS[precision]) for precision in args.precision}
    print(
        f"\n{len(sequences)} rows ({args.prompts} prompts x {args.generations}), {tokens} tokens ({padded_tokens} "
        f"padded in one batch), {args.threads} thread(s), best of {args.rounds} rounds\n{cpu_description()}; matmul "
        f"peak " + ", ".join(f"{precision} {peak:.1f} GFLOP/s" for precision, peak in peaks.items())
    )
    print(
        f"{'variant':24s} {'precision':9s} {'wall s':>8s} {'cpu s':>8s} {'tokens/s':>9s} {'x seed (wall)':>14s} "
        f"{'x seed (cpu)':>13s} {'executed':>9s} {'of peak':>8s} {'max |diff| vs fp32 seed':>24s}"
    )
    ceilings = {}
    for precision, by_name in rows.items():
        for name, row in by_name.items():
            # Matmul FLOPs of the token positions this variant ran, over its CPU time, as a share of the peak.
            row["peak_fraction"] = executed[name] * flops_per_token / row["cpu_s"] / 1e9 / peaks[precision]
            print(
                f"{name:24s} {precision:9s} {row['wall_s']:8.2f} {row['cpu_s']:8.2f} {row['tokens_per_s']:9.0f} "
                f"{row['speedup_wall']:14.2f} {row['speedup_cpu']:13.2f} {executed[name]:9d} "
                f"{row['peak_fraction']:8.1%} {deviation[precision][name]:24.1e}"
            )
        # The most rmtorch's plan could gain: its executed tokens at the full matmul peak, against the seed's time.
        ceiling = by_name[seed_name]["cpu_s"] / (
            executed["rmtorch packed+shared"] * flops_per_token / 1e9 / peaks[precision]
        )
        print(f"{precision}: rmtorch's packed plan at 100% of the matmul peak would be {ceiling:.2f}x the seed")
        ceilings[precision] = ceiling
    summary = {
        "score_setup": {
            **vars(args),
            "rows": len(sequences),
            "tokens": tokens,
            "padded_tokens": padded_tokens,
            "executed_tokens": executed["rmtorch packed+shared"],
        },  # fmt: skip
        "score_machine": cpu_info(),
    }
    for precision, by_name in rows.items():
        suffix = "" if precision == "fp32" else f"_{precision}"
        fast, padded = by_name["rmtorch packed+shared"], by_name["rmtorch padded"]
        # Process CPU time is the headline: on a shared machine the best wall round still carries other load.
        summary[f"score_speedup_vs_seed{suffix}"] = fast["speedup_cpu"]
        summary[f"score_speedup_vs_seed_wall{suffix}"] = fast["speedup_wall"]
        summary[f"score_padded_speedup_vs_seed{suffix}"] = padded["speedup_cpu"]
        summary[f"score_peak_fraction{suffix}"] = fast["peak_fraction"]
        summary[f"score_seed_peak_fraction{suffix}"] = by_name[seed_name]["peak_fraction"]
        summary[f"score_speedup_ceiling{suffix}"] = ceilings[precision]
        summary[f"score_tokens_per_s{suffix}"] = fast["tokens_per_s"]
        summary[f"score_seed_tokens_per_s{suffix}"] = by_name[seed_name]["tokens_per_s"]
        summary[f"score_max_reward_diff{suffix}"] = deviation[precision]["rmtorch packed+shared"]
        summary[f"score_seed_max_reward_diff{suffix}"] = deviation[precision][seed_name]
    summary["score_vs_vllm"] = versus_vllm(args, model, tokenizer, scorers["rmtorch packed+shared"])
    if not args.no_write:
        write_results(summary, ("score_",))
        print(f"written to {RESULTS_FILE}")
    return summary


def time_variants(args, model, tokenizer, scorers: dict, prompts, completions, precision: str) -> tuple[dict, dict]:
    """(timings, rewards) by variant: the seed's scorer and rmtorch's, all in `precision` (bf16: autocast for the
    seed, the scorer's own autocast for rmtorch), each the best of args.rounds alternating rounds."""
    autocast = torch.bfloat16 if precision == "bf16" else None

    def seed():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            return get_rewards_batch(model, tokenizer, prompts, completions)

    variants = {"seed get_rewards_batch": seed}
    for name, scorer in scorers.items():
        scorer.autocast_dtype = autocast
        variants[name] = lambda s=scorer: s(prompts, completions)
    best = {name: (math.inf, math.inf) for name in variants}
    rewards = {}
    for round_index in range(args.rounds):
        names = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in names:
            rewards[name], wall, cpu = timed(variants[name])
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
            print(f"{precision} round {round_index + 1}: {name:24s} {wall:7.2f} s wall {cpu:7.2f} s cpu", flush=True)
    tokens = sum(len(ids) for ids in next(iter(scorers.values())).split(prompts, completions).sequences("full"))
    seed_wall, seed_cpu = best["seed get_rewards_batch"]
    timings = {
        name: {
            "wall_s": wall,
            "cpu_s": cpu,
            "tokens_per_s": tokens / wall,
            "speedup_wall": seed_wall / wall,
            "speedup_cpu": seed_cpu / cpu,
        }  # fmt: skip
        for name, (wall, cpu) in best.items()
    }
    return timings, rewards


# --------------------------------------------------------------------------------------------- plain vLLM


def versus_vllm(args, model, tokenizer, scorer) -> dict:
    """compare_with_vllm on both loads: completions cut from the question's own trace (a group's completions share
    long prefixes, which vLLM's block prefix cache finds and rmtorch's shared prompt does not), and completions from
    other traces (a group shares its prompt and nothing more, as sampled completions mostly do)."""
    return {load: compare_with_vllm(args, model, tokenizer, scorer, VLLM_LOADS[load]) for load in args.vllm_loads}


VLLM_VARIANTS = {"vLLM prefix cache on": True, "vLLM prefix cache off": False}


VLLM_LOADS = {"same_trace": False, "distinct": True}  # name: grpo_load's distinct


def compare_with_vllm(args, model, tokenizer, scorer, distinct: bool) -> dict:
    """rmtorch's scorer (packed, shared prompts) against plain vLLM's offline engine with its prefix cache on and
    off: token ids in, fp32 rewards out (rmtorch's tokenization is left out, as vLLM gets ids), the same model saved
    once. vLLM's prefix cache keeps whole sequences, so each of `args.rounds` rounds (after a warm-up one) is a
    fresh GRPO load of the bench's shape: round k's prompts are the k-th block of `--prompts` questions, and no row
    repeats. One engine runs at a time (an idle one still spins about a tenth of a core), each round alternating
    it with rmtorch; each variant's time is its total over the rounds, compared with rmtorch's beside it.
    {"skipped": reason} when .venv-vllm is absent."""
    import vllm_engine

    reason = "--no_vllm" if args.no_vllm else vllm_engine.unavailable()
    if reason:
        print(f"\nComparison with plain vLLM skipped: {reason}")
        return {"skipped": reason}
    print(f"\nvs plain vLLM, completions {'from other traces' if distinct else 'cut from the question’s own trace'}")
    splits = [
        scorer.split(*grpo_load(
            tokenizer, args.prompts, args.generations, args.min_completion, args.max_completion, args.seed + index,
            distinct=distinct, offset=index * args.prompts,
        ))
        for index in range(args.rounds + 1)
    ]  # fmt: skip
    scorer.autocast_dtype = None  # vLLM runs in fp32 (dtype="float32")

    def rmtorch_round(split) -> dict:
        sequences, prompt_lengths = split.sequences("full"), [len(ids) for ids in split.prompt_ids]
        details, wall, cpu = timed(lambda: scorer.score_split(split))
        positions = executed_tokens(sequences, prompt_lengths, args.max_tokens_per_batch)["rmtorch packed+shared"]
        return {
            "wall_s": wall, "cpu_s": cpu, "tokens": sum(len(ids) for ids in sequences), "positions": positions,
            "rewards": details.rewards.tolist(),
        }  # fmt: skip

    rounds = {name: {"rmtorch packed+shared": [], name: []} for name in VLLM_VARIANTS}  # by engine: both sides
    with tempfile.TemporaryDirectory(prefix="bench_score_vllm_") as directory:
        model.save_pretrained(directory, safe_serialization=True)  # the weights scored here, score head included
        tokenizer.save_pretrained(directory)
        for engine_name, prefix_caching in VLLM_VARIANTS.items():
            with vllm_engine.OfflineEngine(directory, prefix_caching=prefix_caching, threads=args.threads) as engine:
                runners = {"rmtorch packed+shared": rmtorch_round}
                runners[engine_name] = lambda split, engine=engine: engine.score(split.sequences("full"))
                for index, split in enumerate(splits):
                    for name in list(runners) if index % 2 == 0 else list(reversed(runners)):
                        result = runners[name](split)
                        if index > 0:  # round 0 warms both up
                            rounds[engine_name][name].append(result)
                            wall, cpu = result["wall_s"], result["cpu_s"]
                            print(f"vs vLLM round {index}: {name:24s} {wall:7.2f} s wall {cpu:7.2f} s cpu", flush=True)
    return summarize_vllm(args, rounds)


def summarize_vllm(args, rounds: dict[str, dict[str, list[dict]]]) -> dict:
    """Totals of each side of each engine's rounds, rmtorch's speedup over the engine, the rewards' largest
    difference."""

    def totals(results: list[dict]) -> dict:
        row = {key: sum(result[key] for result in results) for key in ("wall_s", "cpu_s", "tokens", "positions")}
        return {**row, "tokens_per_s": row["tokens"] / row["wall_s"]}

    def rewards(results: list[dict]) -> torch.Tensor:
        return torch.tensor([reward for result in results for reward in result["rewards"]])

    def line(name: str, row: dict, wall_ratio: float, cpu_ratio: float, diff: float) -> None:
        print(
            f"{name:24s} {row['wall_s']:8.2f} {row['cpu_s']:8.2f} {row['tokens_per_s']:9.0f} {row['positions']:9d} "
            f"{wall_ratio:16.2f} {cpu_ratio:15.2f} {diff:22.1e}"
        )

    print(
        f"\nvs plain vLLM: fp32, token ids in, rewards out; {args.rounds} rounds of fresh rows, alternating; totals\n"
        f"{'variant':24s} {'wall s':>8s} {'cpu s':>8s} {'tokens/s':>9s} {'positions':>9s} {'rmtorch x (wall)':>16s} "
        f"{'rmtorch x (cpu)':>15s} {'max |diff| vs rmtorch':>22s}"
    )
    variants = {}
    for name, sides in rounds.items():
        rmtorch, vllm = totals(sides["rmtorch packed+shared"]), totals(sides[name])
        diff = (rewards(sides[name]) - rewards(sides["rmtorch packed+shared"])).abs().max().item()
        variants[name] = {
            **vllm, "rmtorch_beside": rmtorch, "max_reward_diff_vs_rmtorch": diff,
            "rmtorch_speedup_wall": vllm["wall_s"] / rmtorch["wall_s"],
            "rmtorch_speedup_cpu": vllm["cpu_s"] / rmtorch["cpu_s"],
        }  # fmt: skip
        line("rmtorch packed+shared", rmtorch, 1.0, 1.0, 0.0)
        row = variants[name]
        line(name, row, row["rmtorch_speedup_wall"], row["rmtorch_speedup_cpu"], row["max_reward_diff_vs_rmtorch"])
    worst = max(row["max_reward_diff_vs_rmtorch"] for row in variants.values())
    if worst > 1e-4:
        raise RuntimeError(
            f"vLLM's rewards differ from rmtorch's by up to {worst:.1e} (> 1e-4, both fp32); the timings would "
            "compare different work."
        )
    return {
        "rounds": args.rounds, "rows_per_round": args.prompts * args.generations, "threads": args.threads,
        "precision": "fp32", "variants": variants,
    }  # fmt: skip


def test_score_vs_seed(benchmark):
    run_benchmark(benchmark, main)


if __name__ == "__main__":
    main()
