"""Two processes equal one under DDP: `accelerate launch --config_file configs/ddp.yaml` (the README's command) with
2 CPU processes (gloo) and the same global batch and seed gives the 1-process weights within fp32 tolerance, takes
the same steps, and gathers the eval set without duplicated rows. So do the other objectives (a process reward model,
groups of responses, rated attributes), under DDP (FSDP2: test_fsdp.py; ZeRO-2: test_deepspeed.py). The runs share
one launch (launch_together).
"""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_run, assert_same_weights, launch_options, read_jsonl
from tests.integration.conftest import OBJECTIVES, assert_objective_launch, launch_together, objective_runs


@pytest.fixture(scope="module")
def ddp(launch_data, objective_references, tmp_path_factory):
    """Pairs and the three objectives, each in 2 DDP processes of half its reference's batch: {name: output dir}."""
    runs = {"pairs": lambda output_dir: launch_options(launch_data, output_dir, 2)}
    runs.update(objective_runs(objective_references))
    return launch_together("ddp.yaml", "DDP", tmp_path_factory.mktemp("ddp"), runs)[0]


@pytest.mark.slow
def test_two_ddp_processes_equal_one_with_the_same_global_batch(one_process, ddp):
    assert_same_weights(one_process(), ddp["pairs"], atol=1e-5)
    assert_same_run(one_process(), ddp["pairs"])
    # 8 steps and the evaluation at step 4, one line each: the main process alone writes.
    assert [line["step"] for line in read_jsonl(ddp["pairs"] / "metrics.jsonl")] == [1, 2, 3, 4, 4, 5, 6, 7, 8]


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_trains_in_two_ddp_processes_as_in_one(ddp, objective_references, objective):
    """Rows of different numbers of steps (each process's step loss weighed by its share of the steps), groups of
    different sizes, and rated attributes."""
    assert_objective_launch(objective, ddp[objective], objective_references)
