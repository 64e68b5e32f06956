"""Atomic, resumable checkpoints: accelerator state + where the loop stood, renamed into place when complete.

Layout under output_dir/checkpoints/: step-000020/ (one per save), and `latest`, a one-line file naming the
newest complete checkpoint. A save writes `.tmp-step-N/` and renames it only once it is complete, then
rewrites `latest` with an atomic os.replace, so a crash at any moment leaves `latest` naming a complete
checkpoint. A save that fails (a full disk) removes its temp directory and stops the run with `error: ...`;
leftover `.tmp-*` directories from a crash are removed by `--resume_from latest` and by the next save.

Under FSDP and DeepSpeed every process writes its own shard of the model and optimizer into the one temp
directory; the main process renames it only after all have finished. On several machines, output_dir must be on a
filesystem they all mount (a save checks that every process sees the temp directory).

In one process and under DDP nothing here unpickles code: weights are safetensors, and Accelerate reads the
optimizer, scheduler and RNG files with torch.load(weights_only=True). The sharded formats of the engines do
unpickle (FSDP's distributed-checkpoint metadata, DeepSpeed's state files): resume those only from checkpoints
your own runs wrote.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

from rmtorch.files import write_text

LOOP_STATE_FILE = "loop_state.json"
LOW_DISK_BYTES = 64 << 20  # free space below this after a failed save: the disk is full


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    """N of a step-N checkpoint directory (also of the .old-step-N copy a replacing save keeps)."""
    return int(path.name.rsplit("step-", 1)[-1])


def save_checkpoint(accelerator, output_dir: str | Path, loop_state: dict, keep_last: int = 2) -> Path:
    """Every process calls this. Writes accelerator.save_state to a temp dir, then the main process renames it
    and repoints `latest`; older checkpoints beyond `keep_last` (and any from a later step of an abandoned run)
    are removed. A save that fails (a full disk) removes its temp dir and leaves `latest` as it was; an OSError
    becomes an `error: ...` (SystemExit) naming the directory and what to do."""
    from accelerate.utils import gather_object

    root = checkpoints_dir(output_dir)
    name = f"step-{loop_state['step']:06d}"
    final_dir, tmp_dir, old_dir = root / name, root / f".tmp-{name}", root / f".old-{name}"
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # saves run one at a time: from a crash
                shutil.rmtree(stale, ignore_errors=True)
            tmp_dir.mkdir()
        accelerator.wait_for_everyone()
        # Under FSDP and DeepSpeed every process writes its own shard into tmp_dir: all must see the one directory.
        if not all(gather_object([tmp_dir.is_dir()])):
            raise FileNotFoundError(
                f"Not every process sees {tmp_dir}, which the main process created: its checkpoint would miss their "
                "shards. Put --output_dir on a filesystem that every machine of the run mounts."
            )
        accelerator.save_state(str(tmp_dir), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp_dir / LOOP_STATE_FILE).write_text(json.dumps(loop_state, indent=2))
            if final_dir.exists():  # the same step saved again (after a resume): the old copy stays until this is in
                os.replace(final_dir, old_dir)
            os.replace(tmp_dir, final_dir)
            write_text(root / "latest", name + "\n")  # atomic: readers see the old or the new name, never half
    except BaseException as err:  # an interrupt too: a half-written checkpoint only fills the disk
        full = disk_full(err, root)  # before the cleanup frees space
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if accelerator.is_main_process and old_dir.exists() and not final_dir.exists():
            os.replace(old_dir, final_dir)  # put back the copy this save was replacing
        if full or isinstance(err, OSError) and err.errno is not None:
            raise SystemExit(save_failed_message(err, full, tmp_dir, output_dir)) from err
        raise
    if accelerator.is_main_process:
        shutil.rmtree(old_dir, ignore_errors=True)
        others = sorted((p for p in root.glob("step-*") if p.is_dir() and p != final_dir), key=_step_of)
        older = [p for p in others if _step_of(p) < loop_state["step"]]
        later = [p for p in others if _step_of(p) > loop_state["step"]]
        for old in later + older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final_dir


def disk_full(err: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of space: torch and safetensors report it in their own exception types, and
    torch's message does not say so, so a nearly empty disk counts too."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(err, Exception):
        return False
    if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
        return True
    try:
        return shutil.disk_usage(directory).free < LOW_DISK_BYTES
    except OSError:
        return False


def save_failed_message(err: BaseException, full: bool, tmp_dir: Path, output_dir: str | Path) -> str:
    """`error: ...` for a checkpoint save that failed: which directory, the system's reason, and what to do."""
    if isinstance(err, OSError) and err.errno is not None:
        reason = f"{(err.strerror or os.strerror(err.errno)).lower()} ({errno.errorcode.get(err.errno, err.errno)})"
    else:  # torch and safetensors wrap the system's error in their own words
        reason = f"no space left on device (ENOSPC); {type(err).__name__}: {err}"
    fix = "free space on that disk (or move the run to a larger one)" if full else f"make {tmp_dir.parent} writable"
    latest = tmp_dir.parent / "latest"
    if latest.exists():
        then = f"{latest} still names {latest.read_text().strip()}: {fix}, then continue with --resume_from latest."
    else:
        then = f"no earlier checkpoint exists: {fix}, then start again (a new --output_dir, or delete {output_dir})."
    return f"error: saving checkpoint {tmp_dir} failed: {reason}. The incomplete directory was removed; {then}"


def resolve_checkpoint(resume_from: str, output_dir: str | Path) -> Path:
    """'latest' → the checkpoint named by output_dir/checkpoints/latest (and the `.tmp-*` directories of saves cut
    short by a crash are removed); otherwise the given directory.

    A checkpoint with a damaged file (cut short by a full disk, a copy, a crash of the storage) is refused with
    the file named; with 'latest', the newest older intact checkpoint is used instead, and a warning says so.
    """
    root = checkpoints_dir(output_dir)
    if resume_from == "latest":
        pointer = root / "latest"
        if not pointer.exists():
            raise FileNotFoundError(
                f"--resume_from latest: no checkpoint under {root} yet. Start without --resume_from, or check "
                "--output_dir."
            )
        for stale in root.glob(".tmp-*"):  # a save cut short by a crash: never a checkpoint, and it fills the disk
            shutil.rmtree(stale, ignore_errors=True)
        name = pointer.read_text().strip()
        path = root / name
        if not path.exists() and (root / f".old-{name}").exists():
            path = root / f".old-{name}"  # a crash while replacing a same-step checkpoint: the old copy is complete
    else:
        path = Path(resume_from)
    if not (path / LOOP_STATE_FILE).exists():
        raise FileNotFoundError(
            f"{path} is not a complete rmtorch checkpoint (no {LOOP_STATE_FILE}). Pass a step-* directory or 'latest'."
        )
    damaged = damaged_file(path)
    if damaged is None:
        return path
    try:  # the older checkpoints next to it, newest first
        step = _step_of(path)
        older = [p for p in sorted(path.parent.glob("step-*"), key=_step_of, reverse=True) if _step_of(p) < step]
    except ValueError:  # not a step-N directory
        older = []
    intact = next((p for p in older if (p / LOOP_STATE_FILE).exists() and damaged_file(p) is None), None)
    if resume_from != "latest" or intact is None:
        raise ValueError(
            f"{damaged} is damaged ({damaged_reason(damaged)}), so checkpoint {path.name} cannot be resumed. "
            + (f"Resume from an older one ({', '.join(p.name for p in older)})." if older else "Start a new run.")
        )
    print(
        f"warning: {damaged} is damaged ({damaged_reason(damaged)}); resuming from {intact.name} instead.",
        file=sys.stderr,
    )
    return intact


def damaged_reason(file: Path) -> str:
    return "not a complete safetensors file" if file.suffix == ".safetensors" else "not a complete torch archive"


def damaged_file(path: Path) -> Path | None:
    """The first file of a checkpoint that cannot be read whole: safetensors whose header does not cover the file,
    torch archives (optimizer, scheduler, random states) that are not complete zip files. None when all are."""
    from safetensors import safe_open

    for file in sorted(path.rglob("*")):
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, "pt"):
                    pass
            except Exception:  # safetensors raises its own SafetensorError for a cut file
                return file
        elif file.suffix in (".bin", ".pkl", ".pt"):
            try:
                with zipfile.ZipFile(file) as archive:
                    if archive.testzip() is not None:
                        return file
            except zipfile.BadZipFile:
                return file
    return None


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG states; return the loop state saved with them."""
    accelerator.load_state(str(path))
    return json.loads((path / LOOP_STATE_FILE).read_text())


def truncate_metrics(metrics_file: str | Path, step: int) -> None:
    """Keep only the metrics lines up to `step` (a resumed run rewrites the steps after its checkpoint).

    A line cut short by a crash is dropped too. The rewrite is atomic.
    """
    metrics_file = Path(metrics_file)
    if not metrics_file.exists():
        return
    kept = []
    for line in metrics_file.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_text(metrics_file, "".join(kept))


def checkpoint_trainable_weights_only(accelerator) -> None:
    """Make accelerator.save_state / load_state keep only the trainable weights (adapters and head) of each model.

    Under LoRA the frozen body is the base model, loaded again on resume: saving it would copy the whole model into
    every checkpoint, and a 4-bit body's quantization state does not load back through load_state_dict. Under FSDP
    and DeepSpeed nothing changes: each process saves and loads its own shard of the whole model, which these hooks
    never see.
    """
    from accelerate.utils import SAFE_MODEL_NAME, DistributedType
    from safetensors.torch import load_file

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return

    def trainable_names(model) -> set[str]:
        return {name for name, param in model.named_parameters() if param.requires_grad}

    def keep_trainable(models, weights, output_dir):
        for model, state in zip(models, weights):
            for name in set(state) - trainable_names(model):
                del state[name]

    def load_trainable(models, input_dir):
        for i, model in enumerate(models):
            path = Path(input_dir) / f"{SAFE_MODEL_NAME}{f'_{i}' if i else ''}.safetensors"
            state = load_file(path, device=str(next(model.parameters()).device))
            missing = trainable_names(model) - set(state)
            unexpected = model.load_state_dict(state, strict=False).unexpected_keys
            if missing or unexpected:
                raise ValueError(
                    f"{path} does not hold this model's trainable weights (missing {sorted(missing)[:3]}, unexpected "
                    f"{sorted(unexpected)[:3]}): resume with the same --lora, --lora_target and --lora_r as the "
                    "checkpoint."
                )
        models.clear()  # loaded here: accelerate would expect the full state dict

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)
