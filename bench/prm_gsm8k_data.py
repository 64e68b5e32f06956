"""Step-labelled rows for a process reward model from ../shared's R1 GSM8K traces, with weak labels.

    python bench/prm_gsm8k_data.py --out_dir /tmp/prm   # writes train.jsonl and eval.jsonl
    accelerate launch train.py --objective steps --step_separator $'\\n\\n' \\
        --train_file /tmp/prm/train.jsonl --eval_file /tmp/prm/eval.jsonl ...

Each trace's reasoning is split into steps at blank lines. The file only says whether a trace's final answer is
right (`is_correct`), not which step went wrong, so the labels are weak: every step of a correct trace is labelled
true; in a wrong trace the last step (where the wrong result is stated) is false and the earlier steps true, though
the error may sit in any of them. Held-out numbers therefore measure agreement with these weak labels only.
The split is stratified: a fixed share of the wrong traces is held out, so the eval set has false steps.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "r1_gsm8k" / "r1_distill_qwen32b_gsm8k_labeled.jsonl"


def step_row(trace: dict) -> dict:
    steps = [step.strip() for step in trace["reasoning"].split("\n\n") if step.strip()]
    labels = [True] * len(steps) if trace["is_correct"] else [True] * (len(steps) - 1) + [False]
    return {"prompt": f"Question: {trace['question']}\nReasoning:\n", "completions": steps, "labels": labels,
            "id": trace["id"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--correct", type=int, default=160, help="Correct traces used (of 470).")
    parser.add_argument("--eval_fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    traces = [json.loads(line) for line in DATA.read_text().splitlines()]
    rng = random.Random(args.seed)
    wrong = [t for t in traces if not t["is_correct"]]
    correct = rng.sample([t for t in traces if t["is_correct"]], args.correct)
    train, held_out = [], []
    for group in (wrong, correct):
        rng.shuffle(group)
        cut = round(len(group) * args.eval_fraction)
        held_out += group[:cut]
        train += group[cut:]
    rng.shuffle(train)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", held_out)):
        rows = [step_row(t) for t in rows]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        false = sum(not v for r in rows for v in r["labels"])
        print(f"{name}: {len(rows)} rows, {sum(len(r['labels']) for r in rows)} steps, {false} false")


if __name__ == "__main__":
    main()
