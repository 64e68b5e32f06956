"""Best-of-N reranking on held-out GSM8K questions: a process reward model's aggregated step rewards against an
outcome reward model trained on the same traces.

    python bench/prm_gsm8k_data.py --out_dir /tmp/prm          # the data (see there: real traces, known first errors)
    python train.py --objective steps --step_separator $'\\n\\n' --train_file /tmp/prm/steps_train.jsonl \\
        --eval_file /tmp/prm/steps_eval.jsonl --max_length 1024 --output_dir /tmp/prm/prm
    python train.py --train_file /tmp/prm/pairs_train.jsonl --eval_file /tmp/prm/pairs_eval.jsonl \\
        --max_length 1024 --output_dir /tmp/prm/pairwise
    python train.py --train_file /tmp/prm/groups_train.jsonl --eval_file /tmp/prm/groups_eval.jsonl --loss listwise \\
        --batch_size 3 --max_length 1024 --output_dir /tmp/prm/listwise
    python bench/prm_best_of_n.py --data_dir /tmp/prm --prm /tmp/prm/prm \\
        --orm pairwise=/tmp/prm/pairwise listwise=/tmp/prm/listwise

Each held-out question has N candidates: R1's correct trace and N-1 copies with one number of one step changed.
A model picks the candidate it rewards most; best-of-N accuracy is the share of questions where that is the correct
trace, ties counted as a draw among the tied (so a constant reward scores 1/N, chance). The PRM's row reward is each
aggregation of its step rewards (min, last, mean, product); the ORM's is its reward of the whole trace. Also: the
ORM's pairwise accuracy (correct trace above each corrupted one), and the PRM's per candidate. Printed, and written
to --output (JSON).
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
from rmtorch.steps import AGGREGATIONS, aggregate, run_step_options  # noqa: E402

SEPARATOR = "\n\n"


def best_of_n_accuracy(rewards: torch.Tensor) -> float:
    """rewards: (questions, N), the correct candidate in column 0. The expected accuracy of picking the highest
    reward, ties broken at random."""
    top = rewards == rewards.max(dim=1, keepdim=True).values
    return (top[:, 0].float() / top.sum(dim=1)).mean().item()


def pairwise_accuracy(rewards: torch.Tensor) -> float:
    """The share of (correct, corrupted) pairs ranked right; a tie counts a half."""
    diff = rewards[:, :1] - rewards[:, 1:]
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="prm_gsm8k_data.py's --out_dir (best_of_n.jsonl).")
    parser.add_argument("--prm", required=True, help="The process reward model (train.py --objective steps run).")
    parser.add_argument(
        "--orm", nargs="+", required=True, metavar="[NAME=]DIR",
        help="Outcome reward models: train.py runs on the same traces (pairs, or groups with a group loss).",
    )  # fmt: skip
    parser.add_argument("--output", default="bench/results/prm_best_of_n.json")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in Path(args.data_dir, "best_of_n.jsonl").read_text().splitlines()]
    sizes = {len(row["candidates"]) for row in rows}
    if len(sizes) != 1:
        raise SystemExit(f"error: every question needs the same number of candidates, got {sorted(sizes)}.")
    n = sizes.pop()
    prompts = [row["prompt"] for row in rows for _ in row["candidates"]]
    candidates = [steps for row in rows for steps in row["candidates"]]

    separator = run_step_options(args.prm).get("step_separator", SEPARATOR)
    prm = RewardScorer.from_pretrained(args.prm, max_length=None)
    step_rewards = prm.score_steps(prompts, candidates, separator=separator).step_rewards
    texts = [SEPARATOR.join(steps) for steps in candidates]
    outcome = {}
    for given in args.orm:
        name, _, directory = given.rpartition("=")
        orm = RewardScorer.from_pretrained(directory, max_length=None)
        outcome[f"ORM ({name})" if name else "ORM"] = orm(prompts, texts).view(len(rows), n)

    by_model = {f"PRM ({how})": aggregate(step_rewards, how).view(len(rows), n) for how in AGGREGATIONS}
    by_model.update(outcome)
    result = {"questions": len(rows), "candidates": n, "chance": 1 / n, "models": {}}
    for name, rewards in by_model.items():
        result["models"][name] = {"best_of_n": best_of_n_accuracy(rewards), "pairwise": pairwise_accuracy(rewards)}
    result.update(prm=str(args.prm), orm=str(args.orm), data=str(args.data_dir))
    print(f"best-of-{n} on {len(rows)} held-out questions (chance {1 / n:.3f})")
    print(f"{'model':20s} {'best-of-N':>9s} {'pairwise':>9s}")
    for name, scores in result["models"].items():
        print(f"{name:20s} {scores['best_of_n']:9.3f} {scores['pairwise']:9.3f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
