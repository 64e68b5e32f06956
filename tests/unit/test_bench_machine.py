"""bench/machine.py's warm_memory: the memory a bench writes once before timing, in a child process."""

from __future__ import annotations

import pytest

from bench.machine import available_gib, warm_memory


@pytest.mark.skipif(available_gib() < 3, reason="needs 3 GiB of available memory")
def test_warm_memory_writes_whole_gibs_in_a_child_and_times_them():
    warmed = warm_memory(1.5)
    assert warmed["gib"] == 1  # whole GiBs
    assert 0 < warmed["first_gib_s"] < 60 and warmed["last_gib_s"] == warmed["first_gib_s"]


def test_warm_memory_writes_nothing_below_one_gib():
    assert warm_memory(0) == warm_memory(0.5) == {"gib": 0, "first_gib_s": None, "last_gib_s": None}


def test_available_memory_is_read_from_the_system():
    assert 0 < available_gib() < 2**20
