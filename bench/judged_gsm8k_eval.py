"""Ties and ratings against the pairwise loss, on held-out GSM8K questions with two judged answers each (R1's and a
base model's, right or wrong against the gold answer; bench/judged_gsm8k_data.py).

    python bench/judged_gsm8k_data.py --out_dir /tmp/judged
    python train.py --train_file /tmp/judged/pairs_train.jsonl --eval_file /tmp/judged/pairs_eval.jsonl \\
        --max_length 1024 --epochs 2 --output_dir /tmp/judged/pairwise
    python train.py --train_file /tmp/judged/ties_train.jsonl --eval_file /tmp/judged/pairs_eval.jsonl \\
        --tie_nu 1.0 --max_length 1024 --output_dir /tmp/judged/ties
    python train.py --objective regression --attributes correct,words --reward_weights 1,0 \\
        --train_file /tmp/judged/ratings_train.jsonl --max_length 1024 --output_dir /tmp/judged/ratings
    python bench/judged_gsm8k_eval.py --data_dir /tmp/judged \\
        --models pairwise=/tmp/judged/pairwise ties=/tmp/judged/ties ratings=/tmp/judged/ratings

Per model, over the held-out questions: on the untied ones (one answer right), the share where the right answer gets
the higher reward (split by whose answer is right); on the tied ones (both right, or both wrong), the share where
R1's answer gets the higher reward (0.5: no preference for either style) and the mean |reward difference| in units
of the reward's spread over all held-out answers (small: the model sees them as equal). Printed, and written to
--output (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rmtorch.score import RewardScorer  # noqa: E402


def judged_metrics(rows: list[dict], r1: torch.Tensor, base: torch.Tensor) -> dict:
    """The held-out numbers of one model from its rewards of each question's R1 answer and base answer."""
    right_r1 = torch.tensor([row["r1_right"] for row in rows])
    right_base = torch.tensor([row["base_right"] for row in rows])
    untied, tied = right_r1 != right_base, right_r1 == right_base
    right_wins = torch.where(right_r1, r1 > base, base > r1)
    spread = torch.cat([r1, base]).std()
    return {
        "untied_pairs": int(untied.sum()),
        "untied_accuracy": right_wins[untied].float().mean().item(),
        "accuracy_when_r1_right": right_wins[untied & right_r1].float().mean().item(),
        "accuracy_when_base_right": right_wins[untied & right_base].float().mean().item(),
        "pairs_base_right": int((untied & right_base).sum()),
        "tied_pairs": int(tied.sum()),
        "tied_r1_preferred": (r1 > base)[tied].float().mean().item(),
        "tied_mean_gap": ((r1 - base).abs()[tied].mean() / spread).item(),
        "untied_mean_gap": ((r1 - base).abs()[untied].mean() / spread).item(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="judged_gsm8k_data.py's --out_dir (judged_eval.jsonl).")
    parser.add_argument("--models", nargs="+", required=True, help="NAME=RUN_DIR for each trained model.")
    parser.add_argument("--batch_tokens", type=int, default=4096)
    parser.add_argument("--output", default="bench/results/judged_gsm8k.json")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in (Path(args.data_dir) / "judged_eval.jsonl").read_text().splitlines()]
    prompts = [row["prompt"] for row in rows]
    results = {}
    for name, run_dir in (model.split("=", 1) for model in args.models):
        scorer = RewardScorer.from_pretrained(run_dir, max_tokens_per_batch=args.batch_tokens)
        r1 = scorer(prompts, [row["r1"] for row in rows])
        base = scorer(prompts, [row["base"] for row in rows])
        results[name] = judged_metrics(rows, r1.float(), base.float())
        print(name, json.dumps({k: round(v, 3) for k, v in results[name].items()}))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
