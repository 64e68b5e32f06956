"""Score a file offline with a trained reward model.

    python score.py --model outputs/rm --input pairs_or_completions.jsonl --output scored.jsonl

Input: JSONL, JSON, Parquet or a saved `datasets` directory (the layouts `train.py` reads). Rows with a
`completion` get `reward`; preference rows (`chosen`/`rejected`) get `chosen_reward` and `rejected_reward`.
`prompt` is optional; strings and message lists both work. Every input field is copied to the output.
Rows are formatted exactly as training formats them (rmtorch.score). `python score.py --help` lists the options.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rmtorch.data import load_pairs
from rmtorch.score import RewardScorer
from rmtorch.thinking import PARTS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Trained reward model directory (train.py's output_dir), a .gguf file, or 'smollm2'.")
    parser.add_argument("--input", required=True, help="Rows to score: .jsonl, .json, .parquet or a saved datasets directory.")
    parser.add_argument("--output", required=True, help="JSONL file to write: each input row plus its reward field(s).")
    parser.add_argument("--part", default="full", choices=PARTS, help="What to score: the full completion, the answer after </think>, or the thinking.")
    parser.add_argument("--max_length", type=int, default=None, help="Longest row in tokens; longer rows keep their end (default: the model's context).")
    parser.add_argument("--max_tokens_per_batch", type=int, default=16384, help="Tokens per forward pass: one padding-free row of prompts, each computed once, and their completions.")
    parser.add_argument("--rows_per_chunk", type=int, default=1024, help="Rows handed to the scorer at once (and written) per progress step.")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Weights' precision.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
    return parser.parse_args(argv)


def score_rows(scorer: RewardScorer, rows: list[dict], part: str, source: str) -> list[dict]:
    """Each row with `reward`, or `chosen_reward`/`rejected_reward` for preference rows."""
    if "completion" in rows[0]:
        rewards = scorer([row.get("prompt") for row in rows], [row["completion"] for row in rows], part=part).tolist()
        return [{**row, "reward": reward} for row, reward in zip(rows, rewards)]
    if "chosen" in rows[0] and "rejected" in rows[0]:
        prompts = [row.get("prompt") for row in rows]
        rewards = scorer(prompts + prompts, [row["chosen"] for row in rows] + [row["rejected"] for row in rows], part=part).tolist()
        return [{**row, "chosen_reward": c, "rejected_reward": r} for row, c, r in zip(rows, rewards[: len(rows)], rewards[len(rows) :])]
    raise ValueError(f"{source}: rows have fields {sorted(rows[0])}; a row needs 'completion' (to get 'reward') or 'chosen' and 'rejected' (to get one reward each).")


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    rows = load_pairs(args.input).to_list()
    scorer = RewardScorer.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device, max_length=args.max_length, max_tokens_per_batch=args.max_tokens_per_batch)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as out, tqdm(total=len(rows), desc="score", unit="row", dynamic_ncols=True) as progress:
        for start in range(0, len(rows), args.rows_per_chunk):
            chunk = rows[start : start + args.rows_per_chunk]
            for row in score_rows(scorer, chunk, args.part, args.input):
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            progress.update(len(chunk))
    print(f"scored {len(rows)} rows from {args.input} with {args.model} ({args.part}) → {output}")
    return output


if __name__ == "__main__":
    main()
