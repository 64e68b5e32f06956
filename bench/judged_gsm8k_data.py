"""Ties and ratings with real labels, from ../shared's R1 GSM8K rows: each question has two answers, R1's (written
after its reasoning) and a base model's (`base_model_response`), and each answer is right or wrong against GSM8K's
gold answer. bench/judged_gsm8k_eval.py compares the models trained on them.

    python bench/judged_gsm8k_data.py --out_dir /tmp/judged

R1's answers carry `is_correct`; a base answer is right when its last number equals the gold answer (the last number
of R1's answer is its `pred` in 457 of 491 rows). Of the 460 questions whose answers are short enough and not empty,
both answers are right in 385 and only one in 61: a pair whose answers are both right (or both wrong) is a tie, the
others a preference for the right one. The two answers differ in style as much as in content (R1's in markdown with
LaTeX, the base's in "Step 1:" prose), and in most untied pairs R1's is the right one, so a model trained on the
untied pairs alone can learn the style. The ties say that style is not what the label is about. Questions are split
once; held-out questions are never trained on. Written to --out_dir (chat messages: the question as the user's turn,
the answer as the assistant's):
- pairs_train.jsonl: the untied training pairs (what TRL's trainer gets: it has no tie);
- ties_train.jsonl: the untied pairs and the ties (`tie: true`, chosen/rejected in no particular order);
- ratings_train.jsonl: every training answer as a rated row (`correct`: 1 or 0, `words`: its length in words);
- pairs_eval.jsonl, ratings_eval.jsonl: the held-out untied pairs, and every held-out answer rated (for train.py's
  evaluation and evaluate.py);
- judged_eval.jsonl: per held-out question both answers and their labels (`r1`, `base`, `r1_right`, `base_right`).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "r1_gsm8k" / "r1_distill_qwen32b_gsm8k_labeled.jsonl"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    numbers = NUMBER.findall(text.replace("$", ""))
    return float(numbers[-1].replace(",", "")) if numbers else None


def base_is_right(row: dict) -> bool:
    value = last_number(row["base_model_response"])
    return value is not None and abs(value - float(row["gold_answer"].replace(",", ""))) < 1e-6


def messages(text: str, role: str) -> list[dict]:
    return [{"role": role, "content": text.strip()}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--eval_fraction", type=float, default=0.5, help="Share of the untied questions held out.")
    parser.add_argument("--eval_ties", type=int, default=120, help="Tied questions held out.")
    parser.add_argument("--max_words", type=int, default=250, help="Longest answer used (either one), in words.")
    parser.add_argument("--train_ties", type=int, default=200, help="Most tied training pairs kept.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    # Both answers short enough to train on, and not empty (some base answers are).
    lengths = lambda r: (len(r["answer"].split()), len(r["base_model_response"].split()))  # noqa: E731
    rows = [r for r in rows if 0 < min(lengths(r)) and max(lengths(r)) <= args.max_words]
    rng.shuffle(rows)
    # Held out: a share of the untied questions (the few that test correctness) and a number of the tied ones.
    untied = [r for r in rows if bool(r["is_correct"]) != base_is_right(r)]
    tied = [r for r in rows if r not in untied]
    held_out = {r["id"] for r in untied[: round(len(untied) * args.eval_fraction)] + tied[: args.eval_ties]}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ("pairs_train", "ties_train", "ratings_train", "pairs_eval", "ratings_eval", "judged_eval")
    files = {name: [] for name in names}
    ties = []
    for row in rows:
        prompt = messages(row["question"], "user")
        r1, base = messages(row["answer"], "assistant"), messages(row["base_model_response"], "assistant")
        r1_right, base_right = bool(row["is_correct"]), base_is_right(row)
        rated = []
        for response, right in ((r1, r1_right), (base, base_right)):
            words = len(response[0]["content"].split())
            rated.append({"prompt": prompt, "response": response, "correct": float(right), "words": words})
        chosen, rejected = (r1, base) if r1_right else (base, r1)  # a preference when only one is right
        split = "eval" if row["id"] in held_out else "train"
        files[f"ratings_{split}"] += rated
        if r1_right != base_right:
            files[f"pairs_{split}"].append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        if split == "eval":
            files["judged_eval"].append(
                {"id": row["id"], "prompt": prompt, "r1": r1, "base": base, "r1_right": r1_right,
                 "base_right": base_right}
            )  # fmt: skip
        elif r1_right == base_right:
            first, second = (r1, base) if rng.random() < 0.5 else (base, r1)
            ties.append({"prompt": prompt, "chosen": first, "rejected": second, "tie": True})
    files["ties_train"] = files["pairs_train"] + ties[: args.train_ties]
    rng.shuffle(files["ties_train"])
    rng.shuffle(files["ratings_train"])
    for name, kept in files.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept))
        print(f"{name}: {len(kept)} rows")
    eval_rows = files["judged_eval"]
    base_right = sum(row["base_right"] and not row["r1_right"] for row in eval_rows)
    print(f"held out: {len(eval_rows)} questions, {len(files['pairs_eval'])} untied ({base_right} base answers right)")


if __name__ == "__main__":
    main()
