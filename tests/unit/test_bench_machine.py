"""bench/machine.py's warm_memory: the memory a bench writes once before timing, in a child process."""

from __future__ import annotations

import os

import pytest

from bench.machine import warm_memory

FREE_GIB = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


@pytest.mark.skipif(FREE_GIB < 3, reason="needs 3 GiB of free memory")
def test_warm_memory_writes_whole_gibs_in_a_child_and_times_them():
    warmed = warm_memory(1.5)
    assert warmed["gib"] == 1  # whole GiBs
    assert 0 < warmed["first_gib_s"] < 60 and warmed["last_gib_s"] == warmed["first_gib_s"]


def test_warm_memory_writes_nothing_below_one_gib():
    assert warm_memory(0) == warm_memory(0.5) == {"gib": 0, "first_gib_s": None, "last_gib_s": None}
