"""Collect bench/bench_*.py as test modules, so `pytest bench/ --benchmark-only` runs every benchmark.

Benchmarks compare against a baseline in the same run and record figures; they never assert timings.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train.py, imported by the benches


def pytest_collect_file(file_path: Path, parent):
    # A bench named on the command line is collected by pytest itself; collecting it here too would run it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
