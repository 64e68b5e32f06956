"""Step-labelled data with known first errors, from ../shared's R1 GSM8K traces, for a process reward model and an
outcome reward model trained on the same traces (bench/prm_best_of_n.py compares them).

    python bench/prm_gsm8k_data.py --out_dir /tmp/prm

The traces only say whether a final answer is right, not where a wrong one went wrong, so wrong steps are made
the way Math-Shepherd-style data is checked by hand: from a correct trace (R1's reasoning, split into steps at blank
lines), one number of one step is changed (by +-1..+-9, or doubled or halved), so that step is the first error. Its
labels: true before it, false from it on (the solution is wrong from there). Questions are split once, so no
held-out question is seen in training, in any form. Written to --out_dir:
- steps_train.jsonl, steps_eval.jsonl: stepwise rows (`prompt`, `completions` = steps, `labels`), per question
  the correct trace and `--train_corruptions` corrupted ones (train) or `--candidates - 1` (eval);
- pairs_train.jsonl: the outcome model's pairs from the same traces (chosen: the correct trace, rejected: each
  corrupted one; steps joined by blank lines, as they were written);
- groups_train.jsonl: the same traces as groups (`prompt`, `responses`, `scores`): the correct trace scores 1, a
  corrupted one the share of its steps before the first error (partial credit: a later error is the better
  answer); corruptions at the same step would tie, so a group keeps one per step;
- pairs_eval.jsonl, groups_eval.jsonl: the held-out candidates in those layouts;
- best_of_n.jsonl: per held-out question its `--candidates` candidates (the correct trace first, then corrupted
  ones, each at a different step where the trace allows), for best-of-N reranking.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "r1_gsm8k" / "r1_distill_qwen32b_gsm8k_labeled.jsonl"
NUMBER = re.compile(r"(?<![\w.,])\d+(?:\.\d+)?(?!\w|,\d)")  # a number, not inside a word or "1,000"
SEPARATOR = "\n\n"


def prompt_of(trace: dict) -> str:
    return f"Question: {trace['question']}\nReasoning:\n"


def steps_of(trace: dict) -> list[str]:
    return [step.strip() for step in trace["reasoning"].split(SEPARATOR) if step.strip()]


def changed(value: str, rng: random.Random) -> str:
    """Another number of the same kind: an integer stays an integer (and non-negative)."""
    number = float(value)
    while True:
        new = rng.choice([number + rng.choice([-9, -5, -3, -2, -1, 1, 2, 3, 5, 9]), number * 2, number / 2])
        if new >= 0 and new != number and ("." in value or new == int(new)):
            return f"{new:.{len(value.split('.')[1])}f}" if "." in value else str(int(new))  # as it was written


def corrupt(steps: list[str], step: int, rng: random.Random) -> list[str]:
    """steps with one number of steps[step] changed."""
    numbers = list(NUMBER.finditer(steps[step]))
    match = rng.choice(numbers)
    text = steps[step]
    return [*steps[:step], text[: match.start()] + changed(match[0], rng) + text[match.end() :], *steps[step + 1 :]]


def variants(trace: dict, count: int, rng: random.Random) -> list[tuple[list[str], int]]:
    """`count` corrupted copies of a correct trace, each (steps, first error step), at distinct steps while the
    trace has enough steps with numbers."""
    steps = steps_of(trace)
    with_numbers = [i for i, step in enumerate(steps) if NUMBER.search(step)]
    chosen = rng.sample(with_numbers, min(count, len(with_numbers)))
    chosen += [rng.choice(with_numbers) for _ in range(count - len(chosen))]
    return [(corrupt(steps, step, rng), step) for step in chosen]


def step_row(trace: dict, steps: list[str], error: int | None) -> dict:
    labels = [error is None or i < error for i in range(len(steps))]
    return {"prompt": prompt_of(trace), "completions": steps, "labels": labels, "id": trace["id"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--eval_questions", type=int, default=120, help="Held-out questions.")
    parser.add_argument("--train_questions", type=int, default=200, help="Training questions (at most what is left).")
    parser.add_argument("--max_words", type=int, default=150, help="Longest reasoning used, in words.")
    parser.add_argument("--train_corruptions", type=int, default=3, help="Corrupted traces per training question.")
    parser.add_argument("--candidates", type=int, default=4, help="Best-of-N: N (1 correct, N-1 corrupted).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    traces = [json.loads(line) for line in DATA.read_text().splitlines()]
    # Correct traces with a number in some step (a corruption needs one).
    short = [t for t in traces if t["is_correct"] and len(t["reasoning"].split()) <= args.max_words]
    usable = [t for t in short if any(NUMBER.search(step) for step in steps_of(t))]
    rng.shuffle(usable)
    held_out = usable[: args.eval_questions]
    train = usable[args.eval_questions : args.eval_questions + args.train_questions]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ("steps_train", "steps_eval", "pairs_train", "pairs_eval", "groups_train", "groups_eval", "best_of_n")
    files = {name: [] for name in names}
    for trace in train:
        correct = steps_of(trace)
        files["steps_train"].append(step_row(trace, correct, None))
        group = {"prompt": prompt_of(trace), "responses": [SEPARATOR.join(correct)], "scores": [1.0]}
        for steps, error in variants(trace, args.train_corruptions, rng):
            files["steps_train"].append(step_row(trace, steps, error))
            chosen, rejected = SEPARATOR.join(correct), SEPARATOR.join(steps)
            files["pairs_train"].append({"prompt": prompt_of(trace), "chosen": chosen, "rejected": rejected})
            if error / len(steps) not in group["scores"]:
                group["responses"].append(rejected)
                group["scores"].append(error / len(steps))
        files["groups_train"].append(group)
    for trace in held_out:
        candidates = [(steps_of(trace), None), *variants(trace, args.candidates - 1, rng)]
        files["steps_eval"] += [step_row(trace, steps, error) for steps, error in candidates]
        texts = [SEPARATOR.join(steps) for steps, _ in candidates]
        prompt = prompt_of(trace)
        files["pairs_eval"] += [{"prompt": prompt, "chosen": texts[0], "rejected": text} for text in texts[1:]]
        scores = [1.0] + [error / len(steps) for steps, error in candidates[1:]]
        kept = [i for i, score in enumerate(scores) if score not in scores[:i]]  # no ties, as in training
        files["groups_eval"].append(
            {"prompt": prompt, "responses": [texts[i] for i in kept], "scores": [scores[i] for i in kept]}
        )
        files["best_of_n"].append(
            {"id": trace["id"], "prompt": prompt_of(trace), "candidates": [steps for steps, _ in candidates],
             "first_errors": [error for _, error in candidates]}
        )  # fmt: skip
    rng.shuffle(files["steps_train"])
    rng.shuffle(files["pairs_train"])
    for name, rows in files.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
