"""Two processes equal one under DDP: `accelerate launch --config_file configs/ddp.yaml` (the README's command) with
2 CPU processes (gloo) and the same global batch and seed gives the 1-process weights within fp32 tolerance, takes
the same steps, and gathers the eval set without duplicated rows.
"""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_run, assert_same_weights, launch, launch_options, read_jsonl


@pytest.mark.slow
def test_two_ddp_processes_equal_one_with_the_same_global_batch(launch_data, one_process, tmp_path):
    two = tmp_path / "two_processes"
    result = launch("ddp.yaml", launch_options(launch_data, two, 2))
    assert "2 process(es) x 2 pairs x 2 accumulation" in result.stdout + result.stderr
    assert_same_weights(one_process(), two, atol=1e-5)
    assert_same_run(one_process(), two)
    # 8 steps and the evaluation at step 4, one line each: the main process alone writes.
    assert [line["step"] for line in read_jsonl(two / "metrics.jsonl")] == [1, 2, 3, 4, 4, 5, 6, 7, 8]
