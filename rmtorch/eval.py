"""Evaluate a reward model on held-out pairs: accuracy, calibration, reward distributions, plots.

    python -m rmtorch.eval --model OUT --data held_out.jsonl --report report_dir/

Three steps, usable on their own: `score_pairs` runs the model over tokenized pairs (chosen and rejected
rewards), `build_report` turns rewards into numbers (a pure function), `write_report` writes metrics.json,
the per-pair scores and PNG plots. train.py writes the same report for its eval set to OUT/report/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rmtorch import plot
from rmtorch.data import PairCollator, PairDataError, load_pairs, tokenize_pairs
from rmtorch.loss import eval_metrics
from rmtorch.modeling import RewardModel, load_reward_model

DEFAULT_CATEGORY_COLUMN = "category"
REPORT_FILES = {
    "metrics": "metrics.json",
    "scores": "scores.jsonl",
    "reward_histograms": "reward_histograms.png",
    "calibration": "calibration.png",
    "accuracy_by_length": "accuracy_by_length.png",
    "accuracy_by_category": "accuracy_by_category.png",
}


# --------------------------------------------------------------------------------------------- scoring


def pair_lengths(pairs) -> torch.Tensor:
    """(N,) length of each tokenized pair: tokens in its longer sequence (prompt and template included)."""
    return torch.tensor([max(len(c), len(r)) for c, r in zip(pairs["chosen_ids"], pairs["rejected_ids"])], dtype=torch.long)


@torch.inference_mode()
def score_pairs(reward_model, pairs, pad_token_id: int, batch_size: int = 16, bf16: bool = False, show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) chosen and (N,) rejected fp32 rewards of a tokenized pair dataset, in dataset order.

    `reward_model` maps (input_ids, attention_mask) to one reward per row (a RewardModel). Pairs are batched
    longest first so batches hold similar lengths (less padding); the model runs in eval mode and gets its
    own mode back afterwards.
    """
    device = next(reward_model.parameters()).device
    order = torch.argsort(pair_lengths(pairs), descending=True, stable=True)
    collate = PairCollator(pad_token_id=pad_token_id)
    chosen_rewards, rejected_rewards = torch.empty(len(pairs)), torch.empty(len(pairs))
    was_training = reward_model.training
    reward_model.eval()
    try:
        for start in tqdm(range(0, len(pairs), batch_size), desc="score", unit="batch", disable=not show_progress, dynamic_ncols=True):
            index = order[start : start + batch_size]
            batch = collate(pairs.select(index.tolist()).to_list())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                rewards = reward_model(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (2B,)
            chosen_rewards[index], rejected_rewards[index] = rewards.float().cpu().chunk(2)
    finally:
        reward_model.train(was_training)
    return chosen_rewards, rejected_rewards


# ------------------------------------------------------------------------------------------ the report


def calibration_bins(reward_diff: torch.Tensor, n_bins: int = 10) -> dict:
    """Reliability-diagram bins of p = sigmoid(r_c - r_r) against "the first item is the chosen one".

    Every pair is counted in both orders, (p, outcome 1) and (1 - p, outcome 0); otherwise every outcome
    would be 1 and the diagram would say nothing. Bins are equal-width on [0, 1]; p = 1 goes in the last.
    ECE = sum over bins of (count / total) * |observed - mean predicted|; with an even n_bins this equals the
    usual top-label ECE on confidence max(p, 1 - p) with n_bins / 2 bins over [0.5, 1].
    """
    p = torch.sigmoid(reward_diff.double())
    predicted = torch.cat([p, 1 - p])
    observed = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    bin_index = (predicted * n_bins).long().clamp(max=n_bins - 1)
    count = torch.bincount(bin_index, minlength=n_bins)
    predicted_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bin_index, predicted)
    observed_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bin_index, observed)
    ece = ((observed_sum - predicted_sum).abs().sum() / predicted.numel()).item()
    return {
        "ece": ece,
        "bin_edges": [i / n_bins for i in range(n_bins + 1)],
        "count": count.tolist(),
        "mean_predicted": [(s / n).item() if n else None for s, n in zip(predicted_sum, count)],
        "observed": [(s / n).item() if n else None for s, n in zip(observed_sum, count)],
    }


def _group(name: str, in_group: torch.Tensor, reward_diff: torch.Tensor) -> dict:
    diff = reward_diff[in_group]
    return {"name": name, "num_pairs": int(diff.numel()), "accuracy": (diff > 0).double().mean().item(), "margin": diff.mean().item()}


def accuracy_by_length(lengths: torch.Tensor, reward_diff: torch.Tensor, n_buckets: int = 4) -> list[dict]:
    """Accuracy per quantile bucket of pair length; equal lengths share a bucket, so there may be fewer."""
    lengths = lengths.double()
    edges = torch.quantile(lengths, torch.linspace(0, 1, n_buckets + 1, dtype=torch.float64))
    inner_edges = torch.unique(edges[1:-1])
    bucket = torch.bucketize(lengths, inner_edges, right=True)  # bucket i holds inner[i-1] <= length < inner[i]
    groups = []
    for b in bucket.unique().tolist():
        in_bucket = bucket == b
        low, high = int(lengths[in_bucket].min()), int(lengths[in_bucket].max())
        groups.append({**_group(f"{low}-{high}", in_bucket, reward_diff), "min_tokens": low, "max_tokens": high})
    return groups


def accuracy_by_category(categories: list, reward_diff: torch.Tensor) -> list[dict]:
    """Accuracy per value of a category column, sorted by name."""
    names = [str(c) for c in categories]
    return [_group(name, torch.tensor([n == name for n in names]), reward_diff) for name in sorted(set(names))]


def build_report(chosen_rewards, rejected_rewards, lengths, categories=None, n_bins: int = 10, n_length_buckets: int = 4) -> dict:
    """The evaluation numbers for N pairs, from their rewards alone (a pure function).

    accuracy counts r_c > r_r (ties are wrong, as TRL); margin is mean(r_c - r_r); loss is
    mean(-logsigmoid(r_c - r_r)); ece and calibration come from `calibration_bins`; by_length splits pairs
    into quantile buckets of `lengths` (tokens); by_category splits by `categories` (N values) when given.
    """
    chosen = torch.as_tensor(chosen_rewards, dtype=torch.float64).flatten()
    rejected = torch.as_tensor(rejected_rewards, dtype=torch.float64).flatten()
    lengths = torch.as_tensor(lengths).flatten()
    sizes = {"chosen_rewards": chosen.numel(), "rejected_rewards": rejected.numel(), "lengths": lengths.numel()}
    if categories is not None:
        sizes["categories"] = len(categories)
    if len(set(sizes.values())) != 1 or chosen.numel() == 0:
        raise ValueError(f"build_report needs the same non-zero number of values in each input, got {sizes}.")
    reward_diff = chosen - rejected
    metrics = eval_metrics(chosen, rejected)  # the same pair-weighted numbers training reports, in float64 here
    calibration = calibration_bins(reward_diff, n_bins)
    report = {
        **{key: metrics[key] for key in ("num_pairs", "accuracy", "margin", "ties", "loss")},
        "ece": calibration.pop("ece"),
        "mean_chosen_reward": chosen.mean().item(),
        "mean_rejected_reward": rejected.mean().item(),
        "mean_reward": metrics["mean_reward"],
        "std_reward": torch.cat([chosen, rejected]).std(correction=0).item(),
        "min_reward": metrics["min_reward"],
        "max_reward": metrics["max_reward"],
        "calibration": calibration,
        "by_length": accuracy_by_length(lengths, reward_diff, n_length_buckets),
    }
    if categories is not None:
        report["by_category"] = accuracy_by_category(categories, reward_diff)
    return report


def write_report(report: dict, scores: dict, report_dir: str | Path) -> dict[str, Path]:
    """Write metrics.json (the report), scores.jsonl (one line a pair) and the PNG plots; return their paths.

    `scores` holds what the report was built from: chosen_rewards, rejected_rewards, lengths (and categories).
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: report_dir / filename for name, filename in REPORT_FILES.items()}
    paths["metrics"].write_text(json.dumps(report, indent=2) + "\n")
    categories = scores.get("categories")
    with open(paths["scores"], "w") as scores_file:
        for i, (chosen, rejected, length) in enumerate(zip(scores["chosen_rewards"].tolist(), scores["rejected_rewards"].tolist(), scores["lengths"].tolist())):
            line = {"chosen_reward": chosen, "rejected_reward": rejected, "length": length}
            if categories is not None:
                line["category"] = categories[i]
            scores_file.write(json.dumps(line) + "\n")
    plot.plot_reward_histograms(scores["chosen_rewards"], scores["rejected_rewards"], paths["reward_histograms"])
    plot.plot_calibration(report["calibration"], report["ece"], paths["calibration"])
    plot.plot_accuracy_by(report["by_length"], "accuracy by pair length (quantile buckets)", "tokens in the longer sequence of the pair", paths["accuracy_by_length"])
    if "by_category" in report:
        plot.plot_accuracy_by(report["by_category"], "accuracy by category", "category", paths["accuracy_by_category"])
    else:
        del paths["accuracy_by_category"]
    return paths


def format_report(report: dict) -> str:
    """A short text summary of a report, for the terminal."""
    lines = [
        f"pairs {report['num_pairs']}  accuracy {report['accuracy']:.4f}  margin {report['margin']:.4f}  ties {report['ties']}  "
        f"ECE {report['ece']:.4f}  loss {report['loss']:.4f}",
        f"rewards: chosen mean {report['mean_chosen_reward']:.4f}, rejected mean {report['mean_rejected_reward']:.4f}, "
        f"range [{report['min_reward']:.4f}, {report['max_reward']:.4f}]",
        "accuracy by length (tokens):",
        *(f"  {g['name']:>12}  n={g['num_pairs']:<5} accuracy {g['accuracy']:.4f}  margin {g['margin']:.4f}" for g in report["by_length"]),
    ]
    if "by_category" in report:
        lines.append("accuracy by category:")
        lines += [f"  {g['name']:>12}  n={g['num_pairs']:<5} accuracy {g['accuracy']:.4f}  margin {g['margin']:.4f}" for g in report["by_category"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a reward model on preference pairs: accuracy, margin, ties, calibration (ECE), accuracy by length and category; optional report with plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="A model directory rmtorch trained (train.py's output_dir, or a LoRA adapter directory), or 'smollm2'.")
    parser.add_argument("--data", required=True, help="Pairs: JSONL, JSON, Parquet or a saved datasets directory (also the LLaMA-Factory and LLMBar layouts).")
    parser.add_argument("--report", default=None, help="Directory for metrics.json, scores.jsonl and the PNG plots (none: print only).")
    parser.add_argument("--max_length", type=int, default=None, help="Longest sequence in tokens (none: no limit).")
    parser.add_argument("--truncation", choices=("drop", "keep_end"), default="keep_end", help="Pairs longer than max_length: cut the prompt from the left, or drop them (counted either way).")
    parser.add_argument("--on_bad_row", choices=("error", "skip"), default="error", help="Stop at the first bad row, or skip and count bad rows.")
    parser.add_argument("--category_column", default=None, help=f"Column to split accuracy by (default: '{DEFAULT_CATEGORY_COLUMN}' when the data has it).")
    parser.add_argument("--batch_size", type=int, default=16, help="Pairs per forward pass.")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass (default: fp32).")
    parser.add_argument("--n_bins", type=int, default=10, help="Calibration bins on [0, 1].")
    parser.add_argument("--length_buckets", type=int, default=4, help="Quantile buckets of pair length.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow custom model code from the model directory.")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Score --data with --model, print the report, and write it under --report when given; returns the report."""
    from accelerate import PartialState

    args = build_parser().parse_args(argv)
    try:
        raw = load_pairs(args.data)
        category_column = args.category_column or (DEFAULT_CATEGORY_COLUMN if DEFAULT_CATEGORY_COLUMN in raw.column_names else None)
        if category_column is not None and category_column not in raw.column_names:
            raise PairDataError(f"{args.data}: no column '{category_column}' to split accuracy by; its columns are {raw.column_names}.")
        model, tokenizer = load_reward_model(args.model, trust_remote_code=args.trust_remote_code)
        pairs, data_report = tokenize_pairs(
            raw, tokenizer, max_length=args.max_length, truncation=args.truncation, on_bad_row=args.on_bad_row,
            keep_columns=[category_column] if category_column else [], return_report=True,
        )
    except (PairDataError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"data {args.data}: {data_report.summary()}")
    reward_model = RewardModel(model).to(PartialState().device)
    chosen_rewards, rejected_rewards = score_pairs(reward_model, pairs, tokenizer.pad_token_id, args.batch_size, args.bf16)
    scores = {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "lengths": pair_lengths(pairs),
        "categories": pairs[category_column] if category_column else None,
    }
    report = build_report(**scores, n_bins=args.n_bins, n_length_buckets=args.length_buckets)
    report["model"], report["data"] = str(args.model), {"path": str(args.data), **data_report.__dict__}
    print(format_report(report))
    if args.report:
        paths = write_report(report, scores, args.report)
        print(f"report in {args.report}: {', '.join(p.name for p in paths.values())}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
