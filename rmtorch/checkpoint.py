"""Atomic, resumable checkpoints: accelerator state + where the loop stood, renamed into place when complete.

Layout under output_dir/checkpoints/: step-000020/ (one per save), and `latest`, a one-line file naming the
newest complete checkpoint. A crash during a save leaves a `.tmp-*` directory and `latest` untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

LOOP_STATE_FILE = "loop_state.json"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(accelerator, output_dir: str | Path, loop_state: dict, keep_last: int = 2) -> Path:
    """Every process calls this. Writes accelerator.save_state to a temp dir, then the main process renames it
    and repoints `latest`; older checkpoints beyond `keep_last` are removed."""
    root = checkpoints_dir(output_dir)
    name = f"step-{loop_state['step']:06d}"
    final_dir, tmp_dir = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp_dir), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp_dir / LOOP_STATE_FILE).write_text(json.dumps(loop_state, indent=2))
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp_dir, final_dir)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(name + "\n")
        os.replace(latest_tmp, root / "latest")  # atomic: readers see the old or the new name, never half
        complete = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final_dir


def resolve_checkpoint(resume_from: str, output_dir: str | Path) -> Path:
    """'latest' → the checkpoint named by output_dir/checkpoints/latest; otherwise the given directory."""
    if resume_from == "latest":
        pointer = checkpoints_dir(output_dir) / "latest"
        if not pointer.exists():
            raise FileNotFoundError(f"--resume_from latest: no checkpoint under {checkpoints_dir(output_dir)} yet. Start without --resume_from.")
        path = checkpoints_dir(output_dir) / pointer.read_text().strip()
    else:
        path = Path(resume_from)
    if not (path / LOOP_STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete rmtorch checkpoint (no {LOOP_STATE_FILE}). Pass a step-* directory or 'latest'.")
    return path


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG states; return the loop state saved with them."""
    accelerator.load_state(str(path))
    return json.loads((path / LOOP_STATE_FILE).read_text())
