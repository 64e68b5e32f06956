"""Several train.py runs in one `accelerate launch` (for tests): every process runs `train.main` on each argument
list of the JSON file named first on its command line, in turn, so the launch starts its three interpreters (the
launcher, and two processes importing torch, transformers and Accelerate: ~10 s of a 2-core machine) once for all.

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


def main(runs_file: str) -> None:
    runs = json.loads(Path(runs_file).read_text())
    destroy_process_group = PartialState.destroy_process_group
    for number, argv in enumerate(runs, 1):
        last = number == len(runs)
        print(f"run {number}/{len(runs)}: {argv[argv.index('--output_dir') + 1]}", flush=True)  # which one failed
        PartialState.destroy_process_group = destroy_process_group if last else (lambda self, group=None: None)
        train.main(argv)
        AcceleratorState._reset_state()  # the next run's Accelerator takes its own options (precision)


if __name__ == "__main__":
    main(sys.argv[1])
