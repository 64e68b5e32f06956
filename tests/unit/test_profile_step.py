"""bench/profile_step.py profiles train.py's own step (it broke once when train_step's signature changed, unseen
until a bench run): on a tiny model it runs its steps and sums every operator's time into its kinds."""

from __future__ import annotations

import pytest

from tests.conftest import shared_path


def test_profile_step_runs_train_py_steps_and_sums_every_kind(tiny_model_dir):
    shared_path("data", "llamafactory", "dpo_en_demo.json")  # the pairs it profiles
    from bench.profile_step import main

    options = ["--pairs", "2", "--steps", "1", "--precision", "fp32", "--top", "3"]
    result = main(["--model", str(tiny_model_dir), *options])
    assert result["tokens"] > 0 and result["seconds_by_kind"]["matmul"] > 0
    assert sum(result["share_by_kind"].values()) == pytest.approx(1.0)
    top = [op["seconds"] for op in result["top_operators"]]
    assert len(top) == 3 and top == sorted(top, reverse=True)
    assert {op["kind"] for op in result["top_operators"]} <= set(result["seconds_by_kind"])
