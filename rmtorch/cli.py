"""What every command shares: `error: ...` instead of a traceback, and the CPU thread count."""

from __future__ import annotations

import os
import sys

import torch

from rmtorch.files import PairDataError
from rmtorch.loading import quiet_bitsandbytes

# Errors that describe the user's input or setup; anything else is a bug and keeps its traceback.
USER_ERRORS = (
    PairDataError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ValueError,
    ImportError,
)


def run(main, argv: list[str] | None = None):
    """Call `main(argv)`; a user error prints `error: <message>` (no traceback) and exits with status 1.

    RMTORCH_DEBUG=1 shows the traceback as well.
    """
    try:
        with quiet_bitsandbytes():
            return main(argv)
    except KeyboardInterrupt:
        sys.exit("interrupted")
    except USER_ERRORS as err:
        if os.environ.get("RMTORCH_DEBUG"):
            raise
        message = str(err)
        sys.exit(message if message.startswith("error: ") else f"error: {message}")


def set_cpu_threads(cpu_threads: int | None, device: torch.device) -> None:
    """Torch threads on CPU: the given number, else the cores split among this machine's processes.

    `accelerate launch` without a config pins every CPU process to one thread (OMP_NUM_THREADS=1).
    """
    if device.type != "cpu":
        return
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 1) // local_processes))
