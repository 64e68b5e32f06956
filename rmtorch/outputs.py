"""Where rmtorch may write: never over what it did not write, never over its own inputs.

Every directory rmtorch creates as an output (a training run, an evaluation report, a merged model) holds
`rmtorch_run.json`, saying which command wrote it and, for a training run, with which options and data. An output
file (score.py's) gets a hidden marker beside it, `.NAME.rmtorch_run.json`, with the sha256 of what was written:
the file is replaced later only while it is still exactly that. A command refuses, before any work, an output
location that is one of its inputs (the model, a data file, the base model of an adapter), a file where a
directory is expected, a non-empty directory that is not an rmtorch output of the same kind, a place inside a
training run's own directories, and a place where it cannot create files. A training run is continued only with
`--resume_from` and the options and data it started with.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from rmtorch.files import write_json

RUN_MARKER = "rmtorch_run.json"
# Options a resumed run must share with the run it continues: they decide the data, its order, the model and
# the optimisation. Logging, evaluation and checkpoint frequency may change.
RESUME_FIXED = (
    "model", "train_file", "eval_file", "eval_fraction", "builtin_size", "max_length", "truncation", "on_bad_row",
    "margin_column", "packing", "batch_size", "grad_accum", "lr", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_eps", "max_grad_norm", "epochs", "max_steps", "warmup_steps", "warmup_ratio", "scheduler",
    "center_rewards_coefficient", "length_penalty", "seed", "shuffle", "group_by_length", "lora", "lora_r",
    "lora_alpha", "lora_dropout", "lora_target", "load_in_4bit", "bf16", "gradient_checkpointing",
)  # fmt: skip
# What train.py writes inside its run directory: no other command may write there.
RUN_SUBDIRS = ("checkpoints", "report", "trackers")


def read_marker(directory: str | Path) -> dict | None:
    """The marker of an rmtorch output directory, or None (no marker, or one that is not rmtorch's JSON)."""
    return _load_marker(Path(directory) / RUN_MARKER)


def write_marker(directory: str | Path, kind: str, **info) -> Path:
    from rmtorch import __version__

    return write_json(Path(directory) / RUN_MARKER, {"kind": kind, "rmtorch_version": __version__, **info})


def _load_marker(path: Path) -> dict | None:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "kind" in marker else None


def file_marker_path(path: str | Path) -> Path:
    """Where rmtorch records that it wrote the output file `path`: a hidden file beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{RUN_MARKER}")


def write_file_marker(path: str | Path, kind: str, **info) -> Path:
    """Record that a `kind` command wrote `path` as it is now (its sha256), so a later run of it may replace it."""
    from rmtorch import __version__

    record = {"kind": kind, "rmtorch_version": __version__, "file": Path(path).name, "sha256": fingerprint(path)}
    return write_json(file_marker_path(path), {**record, **info})


def _not_ours(path: Path, kind: str) -> str | None:
    """Why the existing file `path` is not a `kind` command's own output, or None when it is (an empty file holds
    nothing to lose)."""
    if path.stat().st_size == 0:
        return None
    marker = _load_marker(file_marker_path(path))
    if marker is None or marker["kind"] != kind or marker.get("file") != path.name:
        return "exists and is not an output of this command"
    if marker.get("sha256") != fingerprint(path):
        return "exists and has changed since this command wrote it"
    return None


def _resolved(path) -> Path:
    return Path(path).expanduser().resolve()


def check_output_dir(path: str | Path, kind: str, option: str, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse `path` as the output directory of a `kind` command (named `option` on the command line) unless it
    does not exist yet, is empty, or is an rmtorch output of the same kind; and refuse it when it is one of
    `inputs`, or a training run's directory or one of its RUN_SUBDIRS. Also checks that it can be created and
    written."""
    path = Path(path)
    target = _resolved(path)
    for source in inputs:
        if source is not None and Path(source).exists() and _resolved(source) == target:
            raise ValueError(f"{option} {path} is also an input of this command ({source}); choose a new directory.")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {path} is a file; give a directory that does not exist yet.")
    run_dir = _training_run_of(target)
    if run_dir is not None:
        inner = target.relative_to(run_dir).parts
        if not inner:
            where = "the directory of a training run"
        else:
            where = f"{'the' if len(inner) == 1 else 'inside the'} {inner[0]}/ directory of the run in {run_dir}"
        raise FileExistsError(
            f"{option} {path} is {where}: a run's directories belong to the run (train.py writes there); choose a new "
            "directory elsewhere."
        )
    if path.is_dir() and any(path.iterdir()):
        marker = read_marker(path)
        if marker is None:
            contents = ", ".join(sorted(p.name for p in path.iterdir())[:5])
            raise FileExistsError(
                f"{option} {path} is not empty and was not written by rmtorch (it holds {contents}); choose a new "
                "directory, or empty it yourself."
            )
        if marker["kind"] != kind:
            raise FileExistsError(
                f"{option} {path} holds an rmtorch {marker['kind']} output, not a {kind} output; choose a new "
                "directory."
            )
    check_writable(path, option)


def _training_run_of(path: Path) -> Path | None:
    """The training run whose directory `path` (resolved) is, or lies in one of the run's RUN_SUBDIRS; else None."""
    if (read_marker(path) or {}).get("kind") == "train":
        return path
    for run_dir in path.parents:
        if path.relative_to(run_dir).parts[0] in RUN_SUBDIRS and (read_marker(run_dir) or {}).get("kind") == "train":
            return run_dir
    return None


def check_writable(path: Path, option: str, is_file: bool = False) -> None:
    """The nearest existing directory at or above `path` (above, for a file) must let this process create files. A
    probe file is created and removed: permission bits do not tell for root, /proc or a read-only mount."""
    existing = Path(path).parent if is_file else Path(path)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{option} {path}: {existing} is a file, not a directory; choose another place.")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "permission denied"
    else:
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".rmtorch-probe-"):
                return
        except OSError as err:
            reason = (err.strerror or str(err)).lower()
    raise PermissionError(f"{option} {path}: cannot write in {existing} ({reason}); choose another place.")


def check_output_file(path: str | Path, kind: str, option: str, inputs: Iterable[str | Path | None]) -> None:
    """Refuse `path` as the output file of a `kind` command when it is an input, a directory, or an existing file
    that this command did not write (write_file_marker recorded it) or that changed since."""
    path = Path(path)
    for source in inputs:
        if source is not None and Path(source).exists() and _resolved(source) == _resolved(path):
            raise ValueError(f"{option} {path} is also an input of this command; write to a new file.")
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a directory; give a file name such as {path / 'scored.jsonl'}.")
    if path.exists() and (reason := _not_ours(path, kind)) is not None:
        raise FileExistsError(f"{option} {path} {reason}; choose a new file name, or delete it yourself.")
    check_writable(path, option, is_file=True)


def fingerprint(path: str | Path | None) -> str | None:
    """sha256 of a data file (or of every file in a directory, in name order): what a resumed run must read again."""
    if path is None:
        return None
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            digest.update(file.relative_to(path).as_posix().encode() if path.is_dir() else b"")
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def check_new_run(output_dir: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """A fresh training run never mixes with or overwrites another: not into a run with checkpoints (resume it),
    not into a finished run whose checkpoints were deleted, not over a model, a data file or foreign files."""
    output_dir = Path(output_dir)
    if (output_dir / "checkpoints" / "latest").exists():
        raise SystemExit(
            f"error: {output_dir} already holds a run with checkpoints. Pass --resume_from latest to continue it, "
            "or choose a new --output_dir."
        )
    if read_marker(output_dir) is not None:
        raise FileExistsError(
            f"--output_dir {output_dir} already holds an rmtorch run (without checkpoints to resume from); choose a "
            "new --output_dir, or delete the old run yourself."
        )
    check_output_dir(output_dir, "train", "--output_dir", inputs)


def check_resume(output_dir: str | Path, options: dict, data: dict) -> None:
    """A resumed run must have the options in RESUME_FIXED and the data files (by content) of the run it
    continues, as its marker recorded them; name every difference."""
    marker = read_marker(output_dir)
    if marker is None or marker.get("kind") != "train":
        return  # a checkpoint without a marker (an older rmtorch): nothing to compare
    before = marker.get("options", {})
    changed = [
        f"--{k} {before[k]!r} → {options[k]!r}" for k in RESUME_FIXED if k in before and before[k] != options.get(k)
    ]
    changed += [
        f"{name} changed since the run started"
        for name, digest in data.items()
        if marker.get("data", {}).get(name) not in (None, digest)
    ]
    if changed:
        raise ValueError(
            f"--resume_from: {output_dir} was started with other options or data: {'; '.join(changed)}. Resume with "
            "the run's own options and data (see its config.yaml), or start a new --output_dir."
        )
