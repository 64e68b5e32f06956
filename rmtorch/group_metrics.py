"""Evaluation numbers for groups of ranked responses (pure functions): the pair report over every ordered pair a
group's labels imply, plus a rank correlation per group.

accuracy, margin, loss, ece and the splits by length and category are `rmtorch.metrics.build_report`'s, over all
ordered pairs (i labelled above j) pooled, each pair weighing the same; responses labelled equal form no pair.
kendall_tau is Kendall's tau-b between labels and rewards in each group (ties handled by tau-b), the mean over the
groups where it is defined (labels and rewards not all equal: kendall_tau_groups counts them).
"""

from __future__ import annotations

import math

import torch

from rmtorch.metrics import build_report


def kendall_tau_b(labels, rewards) -> float | None:
    """Kendall's tau-b of two equal-length sequences; None when either is constant (undefined)."""
    concordant = discordant = pairs = label_ties = reward_ties = 0
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            a, b = labels[i] - labels[j], rewards[i] - rewards[j]
            pairs += 1
            label_ties += a == 0
            reward_ties += b == 0
            concordant += a * b > 0
            discordant += a * b < 0
    denominator = math.sqrt((pairs - label_ties) * (pairs - reward_ties))
    return (concordant - discordant) / denominator if denominator else None


def group_report(groups, rewards: torch.Tensor, category_column: str | None = None) -> tuple[dict, list[dict]]:
    """(report, per-pair score lines) of a scored GroupSet; `rewards` (M,) in `groups.sequences()` order.

    The report holds `build_report`'s numbers over the ordered pairs, plus num_groups, num_responses, kendall_tau
    and kendall_tau_groups. Each line is one ordered pair: the group's row in the data file, the two responses'
    indices in it (better, worse), their rewards (chosen_reward is the better's), the longer one's length and the
    category when the set carries one.
    """
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"{groups.source}: the model gave non-finite rewards (NaN or inf) for {len(bad)} responses, so the "
            "report would mean nothing. Check the model's weights (did training diverge?) or evaluate with --bf16 "
            "false."
        )
    values = rewards.double().tolist()
    has_category = category_column is not None and category_column in groups.column_names
    lines, taus, start = [], [], 0
    for index, (ids, labels, row) in enumerate(zip(groups["ids"], groups["scores"], groups["row"])):
        mine = values[start : start + len(ids)]
        start += len(ids)
        tau = kendall_tau_b(labels, mine)
        if tau is not None:
            taus.append(tau)
        for i, j in ((i, j) for i in range(len(ids)) for j in range(len(ids)) if labels[i] > labels[j]):
            line = {"row": row, "better": i, "worse": j, "chosen_reward": mine[i], "rejected_reward": mine[j]}
            line["length"] = max(len(ids[i]), len(ids[j]))
            if has_category:
                line["category"] = groups[category_column][index]
            lines.append(line)
    if not lines:
        raise ValueError(f"{groups.source}: no group has two responses ranked apart, so there is nothing to score.")
    report = build_report(
        [line["chosen_reward"] for line in lines], [line["rejected_reward"] for line in lines],
        [line["length"] for line in lines], [line["category"] for line in lines] if has_category else None,
    )  # fmt: skip
    report.update(
        num_groups=len(groups), num_responses=len(values), kendall_tau=sum(taus) / len(taus) if taus else None,
        kendall_tau_groups=len(taus),
    )  # fmt: skip
    return report, lines
