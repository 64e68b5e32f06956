"""The machine a bench runs on: CPU model, its matrix extensions, torch's matmul peaks measured here, and its memory
made ready before timing (`warm_memory`)."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

MATRIX_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx2")


def cpu_info() -> dict:
    """{'model': ..., 'extensions': [...]} from /proc/cpuinfo (Linux), else platform's processor string."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {"model": model, "extensions": [flag for flag in MATRIX_FLAGS if flag in flags], "torch": torch.__version__}


def cpu_description() -> str:
    info = cpu_info()
    return f"{info['model']} ({', '.join(info['extensions']) or 'no matrix extensions'}), torch {info['torch']}"


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` torch.matmul throughput at size x size on this process's threads, in GFLOP/s."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def available_gib() -> float:
    """Memory available to a new process, in GiB: Linux's MemAvailable (free memory plus the page cache it can drop),
    else the free pages."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20  # kB
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


def write_gib(count: int) -> None:
    """Write `count` GiB, one GiB at a time, keeping all of it, and print each GiB's seconds (warm_memory's child)."""
    kept = []
    for _ in range(count):
        start = time.perf_counter()
        kept.append(torch.ones(2**28))  # 2**28 fp32 = 1 GiB, every page written
        print(time.perf_counter() - start, flush=True)


def warm_memory(gib: float) -> dict:
    """Write `gib` GiB once in a child process (at most half the memory available now), before anything is timed.

    On the project's virtual machines memory that the host has never backed costs about 12 us per 4 KiB page on first
    write, against about 1.3 us once backed (docs/benchmarks.md, 2026-12-08): a freshly started machine ran every
    training variant 20-26% slower, and whichever variant first touched the most memory paid the most. Pages stay
    backed after the child exits, so every variant then runs on memory in the same state. Returns the GiB written and
    the seconds of the first and the last GiB (on the AMX Xeon about 0.2 s a GiB once backed, 1.8 s before)."""
    count = int(min(gib, available_gib() / 2))
    if count < 1:
        return {"gib": 0, "first_gib_s": None, "last_gib_s": None}
    here = str(Path(__file__).parent)
    child = f"import sys; sys.path.insert(0, {here!r}); import machine; machine.write_gib({count})"
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    seconds = [float(line) for line in out.stdout.split()]
    return {"gib": count, "first_gib_s": seconds[0], "last_gib_s": seconds[-1]}
