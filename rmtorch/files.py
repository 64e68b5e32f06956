"""Reading preference files: JSONL, JSON, Parquet or a saved `datasets` directory, and two foreign layouts.

Rows stay Python dicts exactly as the file holds them: JSON goes through `json.loads` only, never through Arrow,
which would give every row the union of all rows' nested keys (a tool call's arguments would gain `null` fields
and tokenize differently). Each row keeps its own row number in the file, so an error names the file's row even
after a shuffle or a train/eval split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

FILE_TYPES = (".jsonl", ".json", ".parquet")


class PairDataError(ValueError):
    """A preference row or file that cannot be used, with its location and what to do."""


class Rows(Sequence):
    """Rows of one source, in order, each with its row number in that source (0-based).

    `bad_rows` holds the messages of rows the reader skipped (`on_bad_row="skip"`), so they are counted later;
    `originals` the rows as the file wrote them, before a foreign layout was converted (for outputs that copy them).
    """

    def __init__(
        self, rows: list[dict], source: str, numbers: list[int] | None = None, bad_rows: list[str] | None = None,
        originals: list[dict] | None = None,
    ):  # fmt: skip
        self.rows = rows
        self.source = source
        self.numbers = list(range(len(rows))) if numbers is None else numbers
        self.bad_rows = bad_rows if bad_rows is not None else []
        self.originals = rows if originals is None else originals

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    @property
    def column_names(self) -> list[str]:
        """Every field name any row has, in order of first appearance."""
        return list(dict.fromkeys(key for row in self.rows for key in row))

    def where(self, index: int) -> str:
        """'file, row N' for the index-th row here, N being its row number in the file."""
        return f"{self.source}, row {self.numbers[index]}"

    def select(self, indices: Sequence[int]) -> Rows:
        pick = lambda values: [values[i] for i in indices]  # noqa: E731
        return Rows(pick(self.rows), self.source, pick(self.numbers), self.bad_rows, pick(self.originals))

    def to_list(self) -> list[dict]:
        return list(self.rows)

    def split(self, held_out_fraction: float, seed: int) -> tuple[Rows, Rows]:
        """(train, held out): a seeded shuffle, the first ceil(fraction * N) rows held out.

        The same permutation as `datasets.Dataset.train_test_split(test_size=fraction, seed=seed)`, so runs made
        before rmtorch stopped using `datasets` here keep their split.
        """
        import numpy as np

        num_held_out = math.ceil(held_out_fraction * len(self.rows))
        if not 0 < num_held_out < len(self.rows):
            raise PairDataError(
                f"{self.source}: holding out {held_out_fraction} of {len(self.rows)} rows leaves "
                f"{num_held_out} held-out and {len(self.rows) - num_held_out} training rows; both need at least one. "
                "Change --eval_fraction or pass --eval_file."
            )
        permutation = np.random.default_rng(seed).permutation(len(self.rows)).tolist()
        return self.select(permutation[num_held_out:]), self.select(permutation[:num_held_out])


def read_rows(path: str | Path, on_bad_row: str = "error") -> Rows:
    """Rows of a JSONL, JSON (a list of objects), Parquet file or saved `datasets` directory, foreign layouts
    (LLaMA-Factory ShareGPT, LLMBar) converted to conversational prompt/chosen/rejected.

    on_bad_row="skip" skips (and records in `Rows.bad_rows`) JSONL lines that are not JSON objects and rows a
    layout adapter cannot convert; "error" raises PairDataError with the file, line or row, and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise PairDataError(
            f"{path}: no such file. Pass an existing JSONL, JSON or Parquet file, or a saved datasets directory."
        )
    bad_rows: list[str] = []
    if path.is_dir():
        rows, numbers = _read_datasets_dir(path), None
    elif path.suffix == ".parquet":
        import pyarrow.parquet

        rows, numbers = pyarrow.parquet.read_table(path).to_pylist(), None
    elif path.suffix in (".jsonl", ".json"):
        rows, numbers = _read_json_rows(path, on_bad_row, bad_rows)
    else:
        raise PairDataError(
            f"{path}: unknown file type {path.suffix!r}. Use .jsonl, .json, .parquet or a saved datasets directory."
        )
    if not rows and not bad_rows:
        raise PairDataError(f"{path} holds no rows. Give it at least one prompt/chosen/rejected pair.")
    return _convert_layout(Rows(rows, str(path), numbers, bad_rows), on_bad_row)


load_pairs = read_rows  # the name rmtorch 0.1 exported


def _read_datasets_dir(path: Path) -> list[dict]:
    import datasets

    if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        raise PairDataError(
            f"{path} is a directory but not a saved `datasets` dataset (no dataset_info.json). "
            "Pass a file, or a directory written by Dataset.save_to_disk."
        )
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        raise PairDataError(
            f"{path} holds a DatasetDict with splits {list(loaded)}; pass the split's own directory, "
            f"e.g. {path / next(iter(loaded))}."
        )
    return loaded.to_list()


def _read_json_rows(path: Path, on_bad_row: str, bad_rows: list[str]) -> tuple[list[dict], list[int]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is common in files saved on Windows
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise PairDataError(
            f"{path}, line {line}: bytes that are not UTF-8 (at byte {err.start}). Re-encode the file as UTF-8."
        ) from None
    if not text.strip():
        raise PairDataError(f"{path} is empty. Give it at least one prompt/chosen/rejected pair.")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise PairDataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}).") from None
        if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
            rows = next(iter(rows.values()))  # {"train": [...]} style
        if not isinstance(rows, list):
            raise PairDataError(
                f"{path}: a .json file must hold a list of objects; for one object per line use .jsonl."
            )
        numbers = list(range(len(rows)))
    else:
        rows, numbers = [], []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
                numbers.append(len(numbers) + len(bad_rows))
            except json.JSONDecodeError as err:
                message = (
                    f"{path}, line {line_no}: malformed JSON ({err.msg} at column {err.colno}). "
                    "Each line must be one JSON object."
                )
                if on_bad_row == "error":
                    raise PairDataError(message) from None
                bad_rows.append(message)
    kept_rows, kept_numbers = [], []
    for row, number in zip(rows, numbers):
        if isinstance(row, dict):
            kept_rows.append(row)
            kept_numbers.append(number)
            continue
        message = (
            f"{path}, row {number}: expected a JSON object with chosen/rejected fields, got {type(row).__name__}."
        )
        if on_bad_row == "error":
            raise PairDataError(message)
        bad_rows.append(message)
    return kept_rows, kept_numbers


# Other public layouts, converted to conversational prompt/chosen/rejected on read (files stay untouched).
SHAREGPT_ROLES = {
    "human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
    "observation": "tool", "function_call": "assistant",
}  # fmt: skip


def from_sharegpt(row: dict) -> dict:
    """LLaMA-Factory preference layout: conversations [{from, value}], chosen/rejected {from: gpt, value}."""
    prompt = [{"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]} for m in row["conversations"]]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}],
    }


def from_llmbar(row: dict) -> dict:
    """LLMBar / MT-Bench judgments: input, output_1, output_2, label ("1" or "2" names the better output)."""
    label = str(row["label"])
    if label not in ("1", "2"):
        raise PairDataError(f"field 'label': must be 1 or 2 (the better output), got {row['label']!r}.")
    better, worse = ("output_1", "output_2") if label == "1" else ("output_2", "output_1")
    return {
        "prompt": [{"role": "user", "content": row["input"]}],
        "chosen": [{"role": "assistant", "content": row[better]}],
        "rejected": [{"role": "assistant", "content": row[worse]}],
    }


LAYOUTS = {  # name: (columns that identify it, adapter)
    "sharegpt": ({"conversations", "chosen", "rejected"}, from_sharegpt),
    "llmbar": ({"input", "output_1", "output_2", "label"}, from_llmbar),
}


def detect_layout(columns: Sequence[str]) -> str:
    """'sharegpt', 'llmbar', or 'pairs' (rmtorch's own prompt/chosen/rejected or *_ids columns)."""
    for name, (needed, _) in LAYOUTS.items():
        if needed <= set(columns):
            return name
    return "pairs"


def _convert_layout(rows: Rows, on_bad_row: str) -> Rows:
    layout = detect_layout(rows.column_names)
    if layout == "pairs":
        return rows
    adapter = LAYOUTS[layout][1]
    converted, kept = [], []
    for index, row in enumerate(rows):
        try:
            converted.append(adapter(row))
            kept.append(index)
        except (KeyError, TypeError, PairDataError) as err:
            reason = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            message = f"{rows.where(index)} ({layout} layout): {reason} Fix the row or remove it."
            if on_bad_row == "error":
                raise PairDataError(message) from None
            rows.bad_rows.append(message)
    return Rows(converted, rows.source, [rows.numbers[i] for i in kept], rows.bad_rows, [rows.rows[i] for i in kept])


# --------------------------------------------------------------------------------------------- writing


def write_text(path: str | Path, text: str) -> Path:
    """Write a file whole or not at all: a temporary name in the same directory, renamed when complete."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, value) -> Path:
    """JSON with NaN refused (it is not JSON): a NaN that reaches a file is a bug to report, not to write."""
    return write_text(path, json.dumps(value, indent=2, allow_nan=False) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows))
