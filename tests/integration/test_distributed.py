"""Two processes equal one under DDP: `accelerate launch --config_file configs/ddp.yaml` (the README's command) with
2 CPU processes (gloo) and the same global batch and seed gives the 1-process weights within fp32 tolerance, takes
the same steps, and gathers the eval set without duplicated rows. So do the other objectives (a process reward model,
groups of responses, rated attributes), under DDP and FSDP2 (and ZeRO-2: test_deepspeed.py).
"""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_run, assert_same_weights, launch, launch_options, read_jsonl
from tests.integration.conftest import OBJECTIVES, assert_objective_launch


@pytest.mark.slow
def test_two_ddp_processes_equal_one_with_the_same_global_batch(launch_data, one_process, tmp_path):
    two = tmp_path / "two_processes"
    result = launch("ddp.yaml", launch_options(launch_data, two, 2))
    assert "2 process(es) x 2 pairs x 2 accumulation" in result.stdout + result.stderr
    assert_same_weights(one_process(), two, atol=1e-5)
    assert_same_run(one_process(), two)
    # 8 steps and the evaluation at step 4, one line each: the main process alone writes.
    assert [line["step"] for line in read_jsonl(two / "metrics.jsonl")] == [1, 2, 3, 4, 4, 5, 6, 7, 8]


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_trains_in_two_ddp_processes_as_in_one(objective_launches, objective_references, objective):
    """Rows of different numbers of steps (each process's step loss weighed by its share of the steps), groups of
    different sizes, and rated attributes."""
    output_dir = objective_launches("ddp.yaml", "DDP")[objective]
    assert_objective_launch(objective, output_dir, objective_references)


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_trains_under_fsdp2_as_in_one_process(objective_launches, objective_references, objective):
    """configs/fsdp2_cpu.yaml, 2 processes: FSDP2 averages the gradients as DDP does (the step share fails without
    the weight: checked)."""
    output_dir = objective_launches("fsdp2_cpu.yaml", "FSDP2")[objective]
    assert_objective_launch(objective, output_dir, objective_references)
