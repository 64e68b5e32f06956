"""Serving under load on localhost: rmtorch.serve against a server that does what OpenRLHF's does, in one run.

    python bench/bench_serve.py                     # SmolLM2-135M, fp32, 1 thread, 1/8/32 clients, both styles
    python bench/bench_serve.py --clients 1,8 --prompts 8 --no_write      # a quick look (about 3 minutes)
    pytest bench/ --benchmark-only                  # the same through pytest-benchmark (RMTORCH_BENCH_ARGS)

Load: bench_score's GRPO rows (the first `--prompts` GSM8K questions of ../shared/data/r1_gsm8k, each with
`--generations` completions cut from real R1 traces at [`--min_completion`, `--max_completion`] tokens, each from
the trace of another question, so that a group shares its prompt and nothing more), sent as
RL frameworks send them: full texts, chat template applied. Two request styles:
- verl: one completion per request, POST /classify {"model", "input": text, "use_activation": false};
- OpenRLHF: one prompt's group per request, POST /get_reward {"query": texts, "prompts", "labels"}.
Clients (asyncio + httpx, in this process) take requests in GRPO order from one shared list, each sending its next
request when its previous answer arrives. A run sends `--requests_per_client` requests per client (at least
`--min_requests`, at most what the rows allow) and stops taking new ones after `--max_seconds`.

Servers, each in its own process, on the same model (a base model's score head seeded and saved once), precision
(fp32) and torch threads; both stay up, and each setting runs them back to back in alternating order:
- baseline: what OpenRLHF's serve_rm does: the request's texts tokenized with add_special_tokens=False, one
  left-padded forward per request inside the (async) request handler, so requests run one after another;
  the reward at the last attended token. It answers both request shapes.
- rmtorch: `python -m rmtorch.serve` with its defaults (but --max_length, so that no row is cut).

Per (server, style, clients): rows/s, tokens/s (the rows' own tokens), p50 and p99 request latency. Every row's
reward from both servers is compared (must agree to 1e-4). Writes serve_* keys to bench/results/latest.json;
serve_speedup_vs_baseline is rows/s at 32 clients (or the most clients run), one completion per request. The
default run takes about 15 minutes on a busy 2-core CPU, most of it the baseline answering 32 groups in turn.

Then, when .venv-vllm exists (tests/vllm/setup_venv.sh; else skipped, with the reason printed and recorded), plain
vLLM's server (docs/serve.md's command, bench/vllm_engine.py) on the same saved model, fp32 and threads, against
rmtorch.serve at the most clients, one completion per request (/classify with add_special_tokens false, so both
score the same ids). vLLM's prefix cache keeps whole sequences, so each of `--vllm_rounds` runs (after a warm-up
one) sends fresh rows, a new block of questions, to both servers in alternating order: rows/s, tokens/s, p50 and
p99 under serve_vs_vllm, rewards within 1e-4. A third server runs beside them: rmtorch's layer on vLLM's engine
(`python -m rmtorch.serve --engine vllm` from .venv-vllm, same threads), for what rmtorch's layer costs over plain
vLLM (engine_vllm_vs_vllm).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import torch
from bench_score import DATA_FILE, grpo_load
from benchlib import RESULTS_FILE, run_benchmark, write_results
from fastapi import FastAPI, Request  # at module level: the handlers' annotations are resolved here
from fastapi.responses import JSONResponse
from machine import cpu_description, cpu_info
from vllm_engine import stop_process_group  # imports nothing of vLLM

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
STYLES = ("verl", "openrlhf")


# ------------------------------------------------------------------------------------------- the baseline


def baseline_app(model_name: str):
    """OpenRLHF's serve_rm, in its essentials: each request's texts as one left-padded batch through the model,
    inside the request handler (nothing batched across requests)."""
    from rmtorch.loading import load_reward_model
    from rmtorch.model import RewardModel

    model, tokenizer = load_reward_model(model_name)
    reward_model = RewardModel(model.eval())
    tokenizer.padding_side = "left"  # the tokenizer is this process's own copy

    def rewards(texts: list[str]) -> list[float]:
        batch = tokenizer(texts, return_tensors="pt", add_special_tokens=False, padding=True)
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding starts at 0, as OpenRLHF
        with torch.no_grad():
            return reward_model(batch["input_ids"], batch["attention_mask"], position_ids=position_ids).tolist()

    app = FastAPI()

    @app.post("/get_reward")
    async def get_reward(request: Request):
        scores = rewards((await request.json())["query"])
        return JSONResponse({"rewards": scores, "scores": scores, "extra_logs": {"dummy_scores": scores}})

    @app.post("/classify")
    async def classify(request: Request):
        texts = (await request.json())["input"]
        scores = rewards([texts] if isinstance(texts, str) else texts)
        return JSONResponse({"data": [{"index": i, "probs": [score]} for i, score in enumerate(scores)]})

    return app


# ----------------------------------------------------------------------------------------------- servers


class ServerProcess:
    """A server in its own process on a free port (read from uvicorn's start line); SIGTERM at the end."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None):
        self.command, self.env = command, env

    def __enter__(self) -> ServerProcess:
        # A process group of its own: leaving ends the server and whatever it started (vLLM's engine processes).
        self.process = subprocess.Popen(
            self.command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=self.env,
            start_new_session=True,
        )  # fmt: skip
        for line in self.process.stderr:
            if match := re.search(r"Uvicorn running on (http://\S+)", line):
                self.url = match[1]
                break
        else:
            raise RuntimeError(f"{' '.join(self.command)} exited before serving (status {self.process.wait()}).")
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # keep the pipe from filling up
        return self

    def __exit__(self, *exc) -> None:
        stop_process_group(self.process)


def saved_model(name: str, directory: Path, seed: int):
    """(path, tokenizer): `name` itself when it is a model directory, else a copy saved once with a seeded score
    head, so both servers load the same weights (a head loaded from a base model is initialized at random)."""
    from rmtorch.loading import load_reward_model

    torch.manual_seed(seed)
    model, tokenizer = load_reward_model(name)
    if Path(name, "config.json").is_file():
        return name, tokenizer
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return str(directory), tokenizer


def server_commands(model: str, args) -> dict[str, list[str]]:
    python = sys.executable
    return {
        "baseline": [python, __file__, "--serve_baseline", "--model", model, "--threads", str(args.threads)],
        "rmtorch": [
            python, "-m", "rmtorch.serve", "--model", model, "--port", "0", "--bf16", "false",
            "--cpu_threads", str(args.threads), "--max_length", str(args.max_length),
        ],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------- load


@dataclass
class Rows:
    texts: list[str]  # full texts: prompt and completion through the chat template
    prompts: list[str]  # the prompt texts, with the generation prompt
    tokens: list[int]  # each text's tokens (add_special_tokens=False)
    groups: list[list[int]]  # row indices of each prompt's completions
    shared_tokens: int  # the tokens left when each group's common prefix is counted once

    def sharing_ceiling(self) -> float:
        """The most that computing each group's common prefix once can save: the rows' tokens over the tokens left
        (on a CPU a forward's cost per token barely depends on the batch, so this bounds the speedup there)."""
        return sum(self.tokens) / self.shared_tokens


def build_rows(tokenizer, args, prompts: int | None = None, offset: int = 0) -> Rows:
    """The load's rows: `prompts` (default `--prompts`) questions from the `offset`-th on, `--generations` each."""
    from rmtorch.batching import shared_prefix_length

    # Distinct completions: a group shares its prompt only (the server would also share any common start).
    prompts, completions = grpo_load(
        tokenizer, prompts or args.prompts, args.generations, args.min_completion, args.max_completion, args.seed,
        distinct=True, offset=offset,
    )  # fmt: skip
    texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
    prompt_texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    groups = [list(range(start, start + args.generations)) for start in range(0, len(texts), args.generations)]
    shared_tokens = sum(
        sum(len(ids[row]) for row in group) - shared_prefix_length([ids[row] for row in group]) * (len(group) - 1)
        for group in groups
    )
    return Rows(texts, prompt_texts, [len(row) for row in ids], groups, shared_tokens)


def requests_of(rows: Rows, style: str, model: str) -> list[tuple[str, dict, list[int]]]:
    """(path, body, row indices) of every request of a style, in GRPO order."""
    if style == "verl":
        return [
            ("/classify", {"model": model, "input": text, "use_activation": False}, [row])
            for row, text in enumerate(rows.texts)
        ]
    return [
        ("/get_reward", {"query": [rows.texts[i] for i in group], "prompts": [rows.prompts[i] for i in group],
                         "labels": [None] * len(group)}, group)
        for group in rows.groups
    ]  # fmt: skip


def rewards_in(path: str, answer: dict) -> list[float]:
    return [d["probs"][-1] for d in answer["data"]] if path == "/classify" else answer["rewards"]


@dataclass
class Run:
    server: str
    style: str
    clients: int
    requests: int
    rows: int
    tokens: int
    seconds: float
    rows_per_s: float
    tokens_per_s: float
    p50_s: float
    p99_s: float


async def drive(url: str, requests: list, clients: int, max_seconds: float, rewards: dict[int, float]):
    """`clients` concurrent clients sending `requests` in order; (rows, seconds, latencies) of the answered ones."""
    todo, latencies, done_rows = deque(requests), [], []
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:

        async def client():
            while todo and time.perf_counter() < deadline:
                path, body, rows = todo.popleft()
                sent = time.perf_counter()
                response = await http.post(url + path, json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - sent)
                rewards.update(zip(rows, rewards_in(path, response.json())))
                done_rows.extend(rows)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done_rows, time.perf_counter() - started, latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1] if len(values) > 1 else values[0]


def measure(name: str, url: str, rows: Rows, style: str, clients: int, args, rewards: dict[int, float]) -> Run:
    """One run: `clients` clients sending their share of the style's requests; the answers' rewards go to `rewards`."""
    requests = requests_of(rows, style, args.model)
    count = min(len(requests), max(clients * args.requests_per_client, args.min_requests))
    done, seconds, latencies = asyncio.run(drive(url, requests[:count], clients, args.max_seconds, rewards))
    tokens = sum(rows.tokens[row] for row in done)
    run = Run(
        name, style, clients, len(latencies), len(done), tokens, seconds, len(done) / seconds, tokens / seconds,
        percentile(latencies, 50), percentile(latencies, 99),
    )  # fmt: skip
    print(
        f"{name:9s} {style:9s} {clients:3d} clients: {run.rows:4d} rows in {seconds:6.1f} s, "
        f"{run.rows_per_s:6.2f} rows/s, p50 {run.p50_s:6.2f} s, p99 {run.p99_s:6.2f} s",
        flush=True,
    )
    return run


# -------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="rmtorch.serve against an OpenRLHF-style server, under load.")
    parser.add_argument("--model", default="smollm2", help="Reward model (default: the embedded SmolLM2-135M).")
    parser.add_argument("--prompts", type=int, default=32, help="Prompts (GSM8K questions).")
    parser.add_argument("--generations", type=int, default=8, help="Completions per prompt (a GRPO group).")
    parser.add_argument("--min_completion", type=int, default=8, help="Shortest completion, tokens.")
    parser.add_argument("--max_completion", type=int, default=128, help="Longest completion, tokens.")
    parser.add_argument("--clients", default="1,8,32", help="Concurrent clients of each run, comma-separated.")
    parser.add_argument("--requests_per_client", type=int, default=2, help="Requests a run sends per client.")
    parser.add_argument("--min_requests", type=int, default=8, help="Requests a run sends at least (latency samples).")
    parser.add_argument("--max_seconds", type=float, default=60, help="A run takes no new request after this.")
    parser.add_argument("--max_length", type=int, default=2048, help="rmtorch's --max_length (no row is cut).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server (1: steadiest).")
    parser.add_argument("--seed", type=int, default=0, help="Completion lengths and score-head init.")
    parser.add_argument(
        "--vllm_rounds", type=int, default=2, help="Runs against plain vLLM, each on fresh rows (after a warm-up)."
    )
    parser.add_argument(
        "--no_vllm", action="store_true", help="Leave out the comparison with plain vLLM (run when .venv-vllm exists)."
    )
    parser.add_argument("--no_write", action="store_true", help="Print only; leave bench/results/latest.json alone.")
    parser.add_argument("--serve_baseline", action="store_true", help=argparse.SUPPRESS)  # the baseline's process
    return parser


def serve_baseline(args) -> None:
    import uvicorn

    torch.set_num_threads(args.threads)
    uvicorn.run(baseline_app(args.model), host="127.0.0.1", port=0)


def summarize(runs: list[Run], max_diff: float, args, rows: Rows) -> dict:
    by_key = {(run.server, run.style, run.clients): run for run in runs}
    most, least = max(args.clients), min(args.clients)

    def ratio(style: str, clients: int, field: str) -> float:
        return getattr(by_key["rmtorch", style, clients], field) / getattr(by_key["baseline", style, clients], field)

    return {
        "serve_speedup_vs_baseline": ratio("verl", most, "rows_per_s"),
        "serve_p99_vs_baseline": ratio("verl", most, "p99_s"),
        "serve_group_speedup_vs_baseline": ratio("openrlhf", most, "rows_per_s"),
        "serve_group_p99_vs_baseline": ratio("openrlhf", most, "p99_s"),
        "serve_one_client_p50_vs_baseline": ratio("verl", least, "p50_s"),
        "serve_one_client_group_p50_vs_baseline": ratio("openrlhf", least, "p50_s"),
        "serve_max_reward_diff": max_diff,
        "serve_runs": [asdict(run) for run in runs],
        "serve_setup": {
            **{k: v for k, v in vars(args).items() if k != "serve_baseline"},
            "rows": len(rows.texts),
            "tokens": sum(rows.tokens),
            "shared_tokens": rows.shared_tokens,
            "precision": "fp32",
            "machine": cpu_info(),
            "cpus": os.cpu_count(),
        },
        "serve_sharing_ceiling": rows.sharing_ceiling(),
    }


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.serve_baseline:
        return serve_baseline(args)
    args.clients = [int(c) for c in str(args.clients).split(",")]
    if not DATA_FILE.exists():
        raise SystemExit(f"error: {DATA_FILE} is absent (../shared holds the R1 GSM8K traces).")
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as directory:
        model, tokenizer = saved_model(args.model, Path(directory), args.seed)
        rows = build_rows(tokenizer, args)
        print(
            f"{len(rows.texts)} rows ({args.prompts} prompts x {args.generations}), {sum(rows.tokens)} tokens, "
            f"{rows.shared_tokens} with each prompt once (sharing ceiling {rows.sharing_ceiling():.2f}x)\n"
            f"{cpu_description()}, {os.cpu_count()} CPUs"
        )
        runs, rewards = [], {"baseline": {}, "rmtorch": {}}
        commands = server_commands(model, args)
        # Both servers stay up (an idle one costs nothing) and each setting runs them back to back, in alternating
        # order: load from other jobs on a shared machine then weighs on both alike.
        with ServerProcess(commands["baseline"]) as baseline, ServerProcess(commands["rmtorch"]) as served:
            urls = {"baseline": baseline.url, "rmtorch": served.url}
            for url in urls.values():  # warm-up
                asyncio.run(drive(url, requests_of(rows, "openrlhf", args.model)[:1], 1, 600, {}))
            settings = [(style, clients) for style in STYLES for clients in args.clients]
            for index, (style, clients) in enumerate(settings):
                for name in list(urls) if index % 2 == 0 else list(urls)[::-1]:
                    runs.append(measure(name, urls[name], rows, style, clients, args, rewards[name]))
            versus_vllm = compare_with_vllm(args, model, tokenizer, served.url)
    common = rewards["baseline"].keys() & rewards["rmtorch"].keys()
    max_diff = max(abs(rewards["baseline"][row] - rewards["rmtorch"][row]) for row in common)
    if max_diff > 1e-4:
        raise RuntimeError(f"The servers' rewards differ by up to {max_diff:.1e} (> 1e-4): not the same work.")
    summary = {**summarize(runs, max_diff, args, rows), "serve_vs_vllm": versus_vllm}
    print_table(runs, summary)
    if not args.no_write:
        write_results(summary, ("serve_",))
        print(f"written to {RESULTS_FILE}")
    return summary


def print_table(runs: list[Run], summary: dict) -> None:
    print(f"\n{'server':9s} {'style':9s} {'clients':>7s} {'rows/s':>8s} {'tokens/s':>9s} {'p50 s':>7s} {'p99 s':>7s}")
    for run in sorted(runs, key=lambda run: (STYLES.index(run.style), run.clients, run.server)):
        print(
            f"{run.server:9s} {run.style:9s} {run.clients:7d} {run.rows_per_s:8.2f} {run.tokens_per_s:9.0f} "
            f"{run.p50_s:7.2f} {run.p99_s:7.2f}"
        )
    print(
        f"rmtorch vs baseline, most clients: {summary['serve_speedup_vs_baseline']:.2f}x rows/s one completion per "
        f"request (p99 {summary['serve_p99_vs_baseline']:.2f}x), {summary['serve_group_speedup_vs_baseline']:.2f}x "
        f"one group per request (p99 {summary['serve_group_p99_vs_baseline']:.2f}x); one client p50 "
        f"{summary['serve_one_client_p50_vs_baseline']:.2f}x; max |reward diff| {summary['serve_max_reward_diff']:.1e}"
    )


# ------------------------------------------------------------------------------------------------ plain vLLM


def compare_with_vllm(args, model: str, tokenizer, rmtorch_url: str) -> dict:
    """rmtorch.serve against plain vLLM's server (started as docs/serve.md says) on the same model, in fp32, with the
    same torch threads: the most clients, one completion per request (verl's /classify, add_special_tokens false for
    both, so both score the same ids). vLLM's prefix cache keeps whole sequences, so every run sends rows neither
    server has seen: a warm-up block, then `--vllm_rounds` blocks of fresh rows, each sent to both servers back to
    back in alternating order. {"skipped": reason} when .venv-vllm is absent."""
    import vllm_engine

    reason = "--no_vllm" if args.no_vllm else vllm_engine.unavailable()
    if reason:
        print(f"\nComparison with plain vLLM skipped: {reason}")
        return {"skipped": reason}
    clients = max(args.clients)
    per_block = math.ceil(max(clients * args.requests_per_client, args.min_requests) / args.generations)
    blocks = [build_rows(tokenizer, args, per_block, index * per_block) for index in range(args.vllm_rounds + 1)]
    body = {"model": vllm_engine.SERVED_NAME, "use_activation": False, "add_special_tokens": False}
    names = ("rmtorch", "vLLM", "rmtorch+vLLM")
    totals = {name: {"rows": 0, "tokens": 0, "seconds": 0.0, "latencies": []} for name in names}
    rewards = {name: {} for name in totals}
    # rmtorch's layer on vLLM's engine: rmtorch.serve --engine vllm from .venv-vllm, with vLLM's threads.
    engine_command = [
        str(vllm_engine.VENV_PYTHON), "-m", "rmtorch.serve", "--engine", "vllm", "--model", model, "--port", "0",
        "--bf16", "false", "--max_length", str(args.max_length),
    ]  # fmt: skip
    with (
        vllm_engine.VllmServer(model, threads=args.threads) as server,
        ServerProcess(engine_command, env=vllm_engine.vllm_env(args.threads)) as on_vllm,
    ):
        urls = {"rmtorch": rmtorch_url, "vLLM": server.url, "rmtorch+vLLM": on_vllm.url}
        for index, block in enumerate(blocks):
            requests = [("/classify", {**body, "input": text}, [(index, row)]) for row, text in enumerate(block.texts)]
            order = list(urls)[index % len(urls) :] + list(urls)[: index % len(urls)]  # each server leads in turn
            for name in order:
                done, seconds, latencies = asyncio.run(
                    drive(urls[name], requests, clients, args.max_seconds, rewards[name])
                )
                if index == 0:
                    continue  # the warm-up block
                total = totals[name]
                total["rows"] += len(done)
                total["tokens"] += sum(block.tokens[row] for _, row in done)
                total["seconds"] += seconds
                total["latencies"] += latencies
                print(
                    f"vs vLLM round {index}: {name:12s} {clients} clients, {len(done)} rows in {seconds:6.1f} s",
                    flush=True,
                )
    max_diff = max(
        abs(rewards[name][key] - rewards["vLLM"][key])
        for name in ("rmtorch", "rmtorch+vLLM")
        for key in rewards[name].keys() & rewards["vLLM"].keys()
    )
    servers = {
        name: {
            "rows": t["rows"], "tokens": t["tokens"], "seconds": t["seconds"], "rows_per_s": t["rows"] / t["seconds"],
            "tokens_per_s": t["tokens"] / t["seconds"], "p50_s": percentile(t["latencies"], 50),
            "p99_s": percentile(t["latencies"], 99),
        }
        for name, t in totals.items()
    }  # fmt: skip
    result = {
        "clients": clients, "rounds": args.vllm_rounds, "rows_per_round": len(blocks[0].texts), "servers": servers,
        "rmtorch_speedup": servers["rmtorch"]["rows_per_s"] / servers["vLLM"]["rows_per_s"],
        "rmtorch_p99_vs_vllm": servers["rmtorch"]["p99_s"] / servers["vLLM"]["p99_s"], "max_reward_diff": max_diff,
        "engine_vllm_vs_vllm": servers["rmtorch+vLLM"]["rows_per_s"] / servers["vLLM"]["rows_per_s"],
        "engine_vllm_p99_vs_vllm": servers["rmtorch+vLLM"]["p99_s"] / servers["vLLM"]["p99_s"],
    }  # fmt: skip
    print(f"\nvs plain vLLM: {clients} clients, one completion per request, {args.vllm_rounds} rounds of fresh rows")
    print(f"{'server':13s} {'rows/s':>8s} {'tokens/s':>9s} {'p50 s':>7s} {'p99 s':>7s}")
    for name, row in servers.items():
        rates = f"{row['rows_per_s']:8.2f} {row['tokens_per_s']:9.0f}"
        print(f"{name:13s} {rates} {row['p50_s']:7.2f} {row['p99_s']:7.2f}")
    print(
        f"rmtorch vs vLLM: {result['rmtorch_speedup']:.2f}x rows/s (p99 {result['rmtorch_p99_vs_vllm']:.2f}x); "
        f"rmtorch --engine vllm vs vLLM: {result['engine_vllm_vs_vllm']:.2f}x rows/s "
        f"(p99 {result['engine_vllm_p99_vs_vllm']:.2f}x); max |reward diff| {max_diff:.1e}"
    )
    if max_diff > 1e-4:
        raise RuntimeError(f"rmtorch's and vLLM's rewards differ by up to {max_diff:.1e} (> 1e-4): not the same work.")
    return result


def test_serve_vs_baseline(benchmark):
    run_benchmark(benchmark, main)


if __name__ == "__main__":
    main()
