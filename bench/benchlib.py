"""What the benches share: the results file they merge into, and the pytest-benchmark entry."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "latest.json"


def write_results(summary: dict, owned_prefixes: tuple[str, ...]) -> None:
    """Merge one bench's keys into latest.json: drop the old keys it owns, keep what other benches wrote."""
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.exists() else {}
    existing = {k: v for k, v in existing.items() if not k.startswith(owned_prefixes)}
    tmp = RESULTS_FILE.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**existing, **summary}, indent=2) + "\n")
    os.replace(tmp, RESULTS_FILE)


def run_benchmark(benchmark, main) -> dict:
    """pytest-benchmark entry: one full alternating comparison (args from RMTORCH_BENCH_ARGS); the figures go to
    extra_info. Never asserts timings."""
    argv = shlex.split(os.environ.get("RMTORCH_BENCH_ARGS", ""))
    summary = benchmark.pedantic(main, args=(argv,), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
    return summary
