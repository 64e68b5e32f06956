"""Several train.py runs in one `accelerate launch` (for tests): every process runs `train.main` on each argument
list of the JSON file named first on its command line, in turn, so the processes start once (three interpreters
importing torch, transformers and Accelerate, ~10 s of a 2-core machine) for several runs.

Between runs the process group stays up: torch re-creates a destroyed default group under the same store keys, and
a rank that reads the last group's keys waits forever (2 of 5 FSDP2 launches of three runs hung so). The last run
tears it down as train.py does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: train.py
import train  # noqa: E402

runs = json.loads(Path(sys.argv[1]).read_text())
destroy_process_group = PartialState.destroy_process_group
for number, argv in enumerate(runs, 1):
    last = number == len(runs)
    PartialState.destroy_process_group = destroy_process_group if last else (lambda self, group=None: None)
    train.main(argv)
    AcceleratorState._reset_state()  # the next run's Accelerator takes its own options (precision, accumulation)
