"""Score a file offline with a trained reward model.

    python score.py --model outputs/rm --input completions.jsonl --output scored.jsonl

Input: JSONL, JSON, Parquet or a saved `datasets` directory (the layouts train.py reads). Rows with a
`completion` get `reward`; preference rows (`chosen`/`rejected`) get `chosen_reward` and `rejected_reward`.
`prompt` is optional; strings and message lists both work. Every input field is copied to the output, which is
written whole (to a temporary name, renamed at the end) or not at all, and replaces only a file an earlier
score.py wrote and nobody changed since (a hidden marker beside it records that). Rows are formatted exactly as
training formats them (rmtorch.score). `python score.py --help` lists the options.

A process reward model (`train.py --objective steps`) scores step rows with `--part steps`: rows with `prompt` and
`completions` (a list of steps, or one string the step separator splits) get `step_rewards` (one per step) and
`reward` (their --aggregation: min, last, mean or product), through `RewardScorer.score_steps`. --step_separator
defaults to the run's (its config.yaml), else "\n".
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rmtorch.cli import run
from rmtorch.config import ScoreConfig, option, parse_config, scoring_source, trained_defaults
from rmtorch.files import PairDataError, Rows, read_rows
from rmtorch.outputs import check_output_file, write_file_marker
from rmtorch.score import RewardScorer
from rmtorch.steps import AGGREGATIONS, DEFAULT_SEPARATOR, run_step_options

DESCRIPTION = "Score a file of completions or preference pairs with a trained reward model."


@dataclass
class ScoreFileConfig(ScoreConfig):
    part: str = option(
        "full",
        "What to score: the full completion, the answer after </think>, the thinking, or 'steps' (a process reward "
        "model: rows with prompt and completions get step_rewards and their aggregated reward).",
        choices=("full", "answer", "thinking", "steps"),
    )
    step_separator: str | None = option(
        None, "--part steps: the text after each step (none: the run's --step_separator, else '\\n')."
    )
    aggregation: str = option(
        "min",
        "--part steps: a row's reward from its step rewards: min, last, mean, or product (of the steps' sigmoid "
        "probabilities).",
        choices=AGGREGATIONS,
    )


def row_layout(rows: Rows, part: str = "full") -> str:
    """'completion' (rows get `reward`), 'pairs' (rows get `chosen_reward` and `rejected_reward`) or, with
    part='steps', 'steps' (rows get `step_rewards` and `reward`)."""
    columns = rows.column_names
    if part == "steps":
        if "completions" in columns:
            return "steps"
        raise PairDataError(
            f"{rows.source}: rows have fields {sorted(columns)}; --part steps needs 'completions' (each row's steps: "
            "a list of strings, or one string the step separator splits) and 'prompt'."
        )
    if "completion" in columns:
        return "completion"
    if "chosen" in columns and "rejected" in columns:
        return "pairs"
    raise PairDataError(
        f"{rows.source}: rows have fields {sorted(columns)}; a row needs 'completion' (to get 'reward') or 'chosen' "
        "and 'rejected' (to get one reward each)."
    )


FLAGS = ("truncated", "unclosed_think", "dropped_text")  # ScoreDetails fields a row may carry


def score_rows(
    scorer: RewardScorer, rows: Rows, layout: str, part: str, separator: str = DEFAULT_SEPARATOR, aggregation="min"
) -> list[dict]:
    """Each row as the file holds it, plus `reward` (or `chosen_reward`/`rejected_reward`), and `<key>_flags`
    listing what the scorer flagged (truncated, unclosed_think, dropped_text) when it flagged anything. Layout
    'steps': `step_rewards` and `reward` (`RewardScorer.score_steps`)."""
    prompts = [row.get("prompt") for row in rows]
    if layout == "steps":
        return score_step_rows(scorer, rows, prompts, separator, aggregation)
    fields = ["completion"] if layout == "completion" else ["chosen", "rejected"]
    outputs = [dict(original) for original in rows.originals]
    for name in fields:
        try:
            details = scorer(prompts, [row.get(name) for row in rows], part=part, return_details=True)
        except ValueError as err:  # the scorer names the row within the chunk: name the file's row
            raise PairDataError(f"{rows.source}, field '{name}': {_file_row(str(err), rows)}") from None
        nonfinite = (~torch.isfinite(details.rewards)).nonzero().flatten().tolist()
        if nonfinite:
            raise PairDataError(
                f"{rows.source}, row {rows.numbers[nonfinite[0]]}, field '{name}': the model gave a non-finite reward "
                f"({details.rewards[nonfinite[0]].item()}) for {len(nonfinite)} rows of this chunk; nothing was "
                "written. Check the model's weights, or score with --bf16 false."
            )
        key = "reward" if layout == "completion" else f"{name}_reward"
        for i, (out, reward) in enumerate(zip(outputs, details.rewards.tolist())):
            out[key] = reward
            if details.attributes is not None:  # a rating model: its attributes by name, beside the reward
                out[f"{key}_attributes"] = dict(zip(scorer.attribute_names, details.attributes[i].tolist()))
            flags = [flag for flag in FLAGS if getattr(details, flag)[i]]
            if flags:
                out[f"{key}_flags"] = flags
    return outputs


def score_step_rows(scorer: RewardScorer, rows: Rows, prompts, separator: str, aggregation: str) -> list[dict]:
    try:
        scored = scorer.score_steps(
            prompts, [row.get("completions") for row in rows], separator=separator, aggregation=aggregation
        )
    except ValueError as err:  # the scorer names the row within the chunk: name the file's row
        raise PairDataError(f"{rows.source}: {_file_row(str(err), rows)}") from None
    outputs = []
    for i, (original, steps, reward) in enumerate(zip(rows.originals, scored.step_rewards, scored.rewards.tolist())):
        values = steps.tolist()
        if not all(math.isfinite(v) for v in values + [reward]):
            raise PairDataError(
                f"{rows.source}, row {rows.numbers[i]}, field 'completions': the model gave a non-finite step reward; "
                "nothing was written. Check the model's weights, or score with --bf16 false."
            )
        outputs.append({**original, "step_rewards": values, "reward": reward})
    return outputs


def _file_row(message: str, rows: Rows) -> str:
    """'Row 3: ...' within a chunk → 'row <the file's row number>: ...'."""
    if message.startswith("Row "):
        index, _, rest = message[4:].partition(":")
        if index.isdigit():
            return f"row {rows.numbers[int(index)]}:{rest}"
    return message


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_config(argv, ScoreFileConfig, description=DESCRIPTION)
    trained = trained_defaults(cfg.model, ScoreFileConfig)
    steps = run_step_options(cfg.model)
    if steps.get("objective") == "steps" and "step_separator" in steps:  # a process reward model's separator
        trained["step_separator"] = steps["step_separator"]
    if trained:  # score the way the model was trained (scoring_defaults' rule), command line still first
        cfg = parse_config(argv, ScoreFileConfig, base=trained, description=DESCRIPTION)
    if cfg.part == "steps" and cfg.engine != "torch":
        raise SystemExit("error: --part steps reads the head at every step: it runs on --engine torch.")
    engine_options = cfg.engine_options()
    separator = cfg.step_separator or DEFAULT_SEPARATOR
    # Input and output are checked before the model loads; the output appears only when complete.
    rows = read_rows(cfg.input)
    layout = row_layout(rows, cfg.part)
    output = Path(cfg.output)
    # Replaced only when an earlier score.py wrote it, as its marker records: never labels or another run's scores.
    check_output_file(output, "score", "--output", inputs=[cfg.input, cfg.model])
    output.parent.mkdir(parents=True, exist_ok=True)

    autocast = torch.bfloat16 if cfg.bf16 else None
    # packing and padding are the torch engine's; vLLM batches (and caches prefixes) itself
    batching = {"packing": cfg.packing} if cfg.engine == "torch" else {}
    scorer = RewardScorer.from_pretrained(
        cfg.model, device=cfg.device, max_length=cfg.max_length, max_tokens_per_batch=cfg.max_tokens_per_batch,
        trust_remote_code=cfg.trust_remote_code, autocast_dtype=autocast, engine=cfg.engine,
        engine_options=engine_options, **batching,
    )  # fmt: skip
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        with tmp.open("w") as out, tqdm(total=len(rows), desc="score", unit="row", dynamic_ncols=True) as progress:
            for start in range(0, len(rows), cfg.rows_per_chunk):
                chunk = rows.select(range(start, min(start + cfg.rows_per_chunk, len(rows))))
                for row in score_rows(scorer, chunk, layout, cfg.part, separator, cfg.aggregation):
                    out.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
                progress.update(len(chunk))
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    write_file_marker(output, "score", model=str(cfg.model), input=str(cfg.input))
    print(
        f"scored {len(rows)} rows from {cfg.input} with {cfg.model} ({cfg.part}; {cfg.engine} engine, "
        f"{scorer.precision}, max_length {scorer.max_length}, from {scoring_source(cfg.model)}) → {output}"
    )
    return output


if __name__ == "__main__":
    run(main, sys.argv[1:])
