"""Preference metrics: a training step's numbers (kept on the device), and the evaluation report (pure functions).

Accuracy counts r_c > r_r strictly (a tie is wrong, as in TRL), and every evaluation number weighs each pair
equally (TRL averages per-batch averages).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rmtorch.loss import per_pair_loss


class StepMetrics:
    """One optimizer step's training numbers, summed on the device over its micro-batches and processes.

    `add` costs no host sync; `reduce` gathers every process's sums by name in one collective and reads them to
    the host once: the only sync of a step, which also decides whether the update is finite.
    """

    SUMS = ("loss", "micro_batches", "pairs", "correct", "margin", "reward", "tokens", "nonfinite_losses")

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(len(self.SUMS), dtype=torch.float64, device=device)
        self.min_reward = torch.tensor(math.inf, dtype=torch.float64, device=device)
        self.max_reward = torch.tensor(-math.inf, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, tokens: torch.Tensor) -> None:
        """One micro-batch: its mean loss, (B,) chosen and rejected rewards, and the tokens it ran."""
        chosen, rejected = chosen.double(), rejected.double()
        rewards = torch.cat([chosen, rejected])
        one = torch.ones((), dtype=torch.float64, device=self.device)
        self.sums += torch.stack([
            loss.double(), one, one * chosen.numel(), (chosen > rejected).sum().double(), (chosen - rejected).sum(),
            rewards.sum(), tokens.double(), (~torch.isfinite(loss)).double(),
        ])  # fmt: skip
        self.min_reward = torch.minimum(self.min_reward, rewards.min())
        self.max_reward = torch.maximum(self.max_reward, rewards.max())

    def reduce(self, accelerator, grad_norm: torch.Tensor | None) -> dict:
        """The step's record, every process's micro-batches together: loss (mean of micro-batch losses),
        accuracy, margin, mean/min/max_reward (over all pairs), tokens, grad_norm (None when the engine does not
        report it), and `finite` (no non-finite loss anywhere and a finite gradient norm)."""
        norm = (
            grad_norm.detach().double().reshape(())
            if grad_norm is not None
            else torch.tensor(math.nan, device=self.device)
        )
        vector = torch.cat(
            [self.sums, self.min_reward[None], self.max_reward[None], norm.to(self.device, torch.float64)[None]]
        )
        if accelerator is not None and accelerator.num_processes > 1:
            gathered = accelerator.gather(vector[None])  # (P, K + 3)
            k = len(self.SUMS)
            vector = torch.cat(
                [
                    gathered[:, :k].sum(0),
                    gathered[:, k].min()[None],
                    gathered[:, k + 1].max()[None],
                    gathered[0, k + 2 :],
                ]
            )
        values = vector.tolist()  # the one host transfer of the step
        sums = dict(zip(self.SUMS, values))
        norm_value = None if grad_norm is None else values[-1]
        return {
            "loss": sums["loss"] / sums["micro_batches"],
            "accuracy": sums["correct"] / sums["pairs"],
            "margin": sums["margin"] / sums["pairs"],
            "mean_reward": sums["reward"] / (2 * sums["pairs"]),
            "min_reward": values[-3],
            "max_reward": values[-2],
            "tokens": int(sums["tokens"]),
            "grad_norm": norm_value,
            "finite": sums["nonfinite_losses"] == 0 and (norm_value is None or math.isfinite(norm_value)),
        }


# -------------------------------------------------------------------------------------- evaluation numbers


def _at_least_fp32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Upcast bf16/fp16 rewards for statistics; float64 stays float64."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return tuple(t.to(dtype) for t in tensors)


@torch.no_grad()
def pair_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy (strict >), mean margin r_c - r_r, and reward statistics over all 2B rewards."""
    r_chosen, r_rejected = _at_least_fp32(r_chosen, r_rejected)
    rewards = torch.cat([r_chosen, r_rejected])
    return {
        "accuracy": (r_chosen > r_rejected).double().mean().item(),
        "margin": (r_chosen - r_rejected).mean().item(),
        "mean_reward": rewards.mean().item(),
        "min_reward": rewards.min().item(),
        "max_reward": rewards.max().item(),
    }


@torch.no_grad()
def eval_metrics(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> dict[str, float]:
    """Metrics over a whole eval set, every pair weighted equally; loss is the pairwise loss per pair, without the
    centering term, which measures the reward offset, not the ranking (docs/design.md)."""
    r_chosen, r_rejected = _at_least_fp32(r_chosen, r_rejected)
    metrics = pair_metrics(r_chosen, r_rejected)
    metrics["loss"] = per_pair_loss(r_chosen, r_rejected, margin).mean().item()
    metrics["ties"] = int((r_chosen == r_rejected).sum().item())
    metrics["num_pairs"] = int(r_chosen.numel())
    return metrics


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
    empty = diff.numel() == 0  # accuracy and margin of no pairs: None, not NaN (JSON has none)
    return {
        "name": name,
        "num_pairs": int(diff.numel()),
        "accuracy": None if empty else (diff > 0).double().mean().item(),
        "margin": None if empty else diff.mean().item(),
    }


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


def accuracy_by_category(categories: Sequence, reward_diff: torch.Tensor) -> list[dict]:
    """Accuracy per value of a category column, sorted by name."""
    names = [str(c) for c in categories]
    return [_group(name, torch.tensor([n == name for n in names]), reward_diff) for name in sorted(set(names))]


# ------------------------------------------------------------------------------------------------ length bias


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation of two equal-size vectors (float64); None when either is constant, where it is undefined."""
    x, y = x.double(), y.double()
    if x.numel() < 2 or x.min() == x.max() or y.min() == y.max():
        return None
    x, y = x - x.mean(), y - y.mean()
    return (x @ y / (x.norm() * y.norm())).item()


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of x's values (float64); tied values share the mean of their ranks, as Spearman's rho needs."""
    sorted_x, order = x.sort(stable=True)
    _, run_of, run_size = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    run_rank = run_size.cumsum(0).double() - (run_size - 1).double() / 2  # a run's last rank minus half its spread
    ranks = torch.empty(x.numel(), dtype=torch.float64)
    ranks[order] = run_rank[run_of]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman's rank correlation: Pearson's of the average ranks; None when either is constant."""
    return pearson(average_ranks(x), average_ranks(y))


def length_bias(chosen: torch.Tensor, rejected: torch.Tensor, chosen_lengths, rejected_lengths) -> dict:
    """How far the rewards follow response length, in tokens of each response alone (the prompt not counted).

    reward_length_pearson / _spearman: over all 2N (reward, length) points. margin_length_pearson / _spearman:
    r_c - r_r against len_c - len_r over the N pairs. by_length_order: accuracy and margin of the pairs whose chosen
    response is shorter, as long, or longer than the rejected one (every group listed; accuracy None when empty).
    A correlation is None where it is undefined (a constant input).
    """
    chosen_lengths = torch.as_tensor(chosen_lengths, dtype=torch.float64).flatten()
    rejected_lengths = torch.as_tensor(rejected_lengths, dtype=torch.float64).flatten()
    rewards, lengths = torch.cat([chosen, rejected]), torch.cat([chosen_lengths, rejected_lengths])
    reward_diff, length_diff = chosen - rejected, chosen_lengths - rejected_lengths
    return {
        "reward_length_pearson": pearson(rewards, lengths),
        "reward_length_spearman": spearman(rewards, lengths),
        "margin_length_pearson": pearson(reward_diff, length_diff),
        "margin_length_spearman": spearman(reward_diff, length_diff),
        "by_length_order": [
            _group("chosen shorter", length_diff < 0, reward_diff),
            _group("same length", length_diff == 0, reward_diff),
            _group("chosen longer", length_diff > 0, reward_diff),
        ],
    }


def build_report(
    chosen_rewards,
    rejected_rewards,
    lengths,
    categories=None,
    margins=None,
    n_bins: int = 10,
    n_length_buckets: int = 4,
    response_lengths=None,
) -> dict:
    """The evaluation numbers for N pairs, from their rewards alone (a pure function).

    accuracy counts r_c > r_r (ties are wrong, as TRL); margin is mean(r_c - r_r); loss is
    mean(-logsigmoid(r_c - r_r - m)) with the pairs' margins m when given; ece and calibration come from
    `calibration_bins`; by_length splits pairs into quantile buckets of `lengths` (tokens); by_category splits by
    `categories` (N values) when given; `response_lengths`, (chosen, rejected) tokens of each response without its
    prompt, adds the numbers of `length_bias`.
    """
    chosen = torch.as_tensor(chosen_rewards, dtype=torch.float64).flatten()
    rejected = torch.as_tensor(rejected_rewards, dtype=torch.float64).flatten()
    lengths = torch.as_tensor(lengths).flatten()
    sizes = {"chosen_rewards": chosen.numel(), "rejected_rewards": rejected.numel(), "lengths": lengths.numel()}
    if categories is not None:
        sizes["categories"] = len(categories)
    if margins is not None:
        margins = torch.as_tensor(margins, dtype=torch.float64).flatten()
        sizes["margins"] = margins.numel()
    if response_lengths is not None:
        sizes["chosen_lengths"], sizes["rejected_lengths"] = (len(side) for side in response_lengths)
    if len(set(sizes.values())) != 1 or chosen.numel() == 0:
        raise ValueError(f"build_report needs the same non-zero number of values in each input, got {sizes}.")
    reward_diff = chosen - rejected
    metrics = eval_metrics(chosen, rejected, margins)
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
    if response_lengths is not None:
        report.update(length_bias(chosen, rejected, *response_lengths))
    return report


def report_scalars(report: dict) -> dict:
    """The report's single numbers (what eval_results.json and trackers get)."""
    return {key: value for key, value in report.items() if isinstance(value, (int, float))}


def format_report(report: dict) -> str:
    """A short text summary of a report, for the terminal."""
    lines = [
        f"pairs {report['num_pairs']}  accuracy {report['accuracy']:.4f}  margin {report['margin']:.4f}  "
        f"ties {report['ties']}  ECE {report['ece']:.4f}  loss {report['loss']:.4f}",
        f"rewards: chosen mean {report['mean_chosen_reward']:.4f}, rejected mean "
        f"{report['mean_rejected_reward']:.4f}, "
        f"range [{report['min_reward']:.4f}, {report['max_reward']:.4f}]",
        "accuracy by length (tokens):",
        *(_group_line(g) for g in report["by_length"]),
    ]
    if "by_category" in report:
        lines += ["accuracy by category:", *(_group_line(g) for g in report["by_category"])]
    if "by_length_order" in report:
        lines += _length_bias_lines(report)
    return "\n".join(lines)


def _group_line(group: dict) -> str:
    if group["num_pairs"] == 0:
        return f"  {group['name']:>14}  n=0"
    return (
        f"  {group['name']:>14}  n={group['num_pairs']:<5} accuracy {group['accuracy']:.4f}  margin "
        f"{group['margin']:.4f}"
    )


def _length_bias_lines(report: dict) -> list[str]:
    def value(key: str) -> str:
        return "n/a" if report[key] is None else f"{report[key]:.4f}"

    return [
        "length bias (response tokens, prompt not counted): reward vs length: pearson "
        f"{value('reward_length_pearson')}, spearman {value('reward_length_spearman')}; margin vs length "
        f"difference: pearson {value('margin_length_pearson')}, spearman {value('margin_length_spearman')}",
        "accuracy by which response is longer:",
        *(_group_line(g) for g in report["by_length_order"]),
    ]


def pair_report(
    pairs, chosen: torch.Tensor, rejected: torch.Tensor, category_column: str | None = None, **options
) -> tuple[dict, list[dict]]:
    """(report, per-pair score lines) of a scored PairSet: the report `build_report` makes (with the pairs'
    margins, response lengths and, when the set carries it, the category column), and one line per pair with its row
    in the data file, both rewards, its length, each response's tokens and its category. `options` go to
    build_report (n_bins, n_length_buckets)."""
    bad = (~torch.isfinite(chosen) | ~torch.isfinite(rejected)).nonzero().flatten().tolist()
    if bad:
        rows = [pairs["row"][i] for i in bad[:10]]
        raise ValueError(
            f"{pairs.source}, rows {rows}: the model gave non-finite rewards (NaN or inf) for {len(bad)} pairs, so "
            "the report would mean nothing. Check the model's weights (did training diverge?) or evaluate with "
            "--bf16 false."
        )
    categories = pairs[category_column] if category_column in pairs.column_names else None
    margins = pairs["margin"] if "margin" in pairs.column_names else None
    lengths, response_lengths = pairs.lengths(), pairs.response_lengths()
    report = build_report(chosen, rejected, lengths, categories, margins, response_lengths=response_lengths, **options)
    scores = []
    for i, (row, c, r, length) in enumerate(zip(pairs["row"], chosen.tolist(), rejected.tolist(), lengths)):
        line = {"row": row, "chosen_reward": c, "rejected_reward": r, "length": length}
        line["chosen_response_tokens"], line["rejected_response_tokens"] = (side[i] for side in response_lengths)
        if categories is not None:
            line["category"] = categories[i]
        scores.append(line)
    return report, scores
