"""The machine a bench runs on: CPU model, its matrix extensions, and torch's matmul peaks measured here."""

from __future__ import annotations

import math
import platform
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
