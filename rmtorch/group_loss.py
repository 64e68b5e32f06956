"""Losses over groups of ranked responses, and ties: Bradley-Terry over all pairs, Plackett-Luce, Davidson.

A batch is either pairs (rewards (2B,): chosen then rejected, as the pair collators build them; a `tie` column
marks tied pairs) or groups (rewards in group order, with the index tensors `comparisons` builds from the labels).
Every loss weighs each group equally, and a pair is a group of two, so on pair data every loss here equals
`rmtorch.loss.pairwise_loss` bit for bit (gradients too):

- all pairs (Bradley-Terry): the mean of -logsigmoid(r_i - r_j - m_ij) over the group's ordered pairs (i scored
  above j), m_ij = margin_scale * (s_i - s_j) from the labels. Responses labelled equal form no ordered pair.
- listwise (Plackett-Luce): the negative log-likelihood of the ranking, the sum over stages of
  -log(e^{r_k} / (e^{r_k} + sum_j e^{r_j + m_kj})), j running over the responses ranked strictly below k. Tied
  responses never compete with each other (each stage's rivals are those strictly below it); without ties this is
  Plackett-Luce exactly. Written as -logsigmoid(-logsumexp_j(r_j - r_k + m_kj)), stable and exact at N = 2.
- ties (Davidson 1970): with tie_nu = nu, P(i > j) = e^{ri} / (e^{ri} + e^{rj} + nu sqrt(e^{ri} e^{rj})) and
  P(tie) = nu sqrt(e^{ri} e^{rj}) / (same). -log P(i > j) = -logsigmoid(d) + log1p(nu / (2 cosh(d / 2))) with
  d = r_i - r_j - m, so nu = 0 gives the Bradley-Terry loss exactly; -log P(tie) = -log nu + d / 2 - log P(i > j).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rmtorch.loss import per_pair_loss

LOSSES = ("pairwise", "all_pairs", "listwise")
GROUP_KEYS = (
    "group_sizes", "scores", "better", "worse", "pair_group", "tie_a", "tie_b", "tie_group", "stage_winner",
    "stage_rivals", "stage_mask", "stage_group",
)  # fmt: skip


def comparisons(scores: list[list[float]]) -> dict[str, torch.Tensor]:
    """What the labels of a batch of groups say, as indices into the batch's rewards (groups back to back; a higher
    score is better): ordered pairs (better, worse, pair_group), tied pairs (tie_a, tie_b, tie_group), and
    Plackett-Luce stages (stage_winner; stage_rivals (S, C), padded where stage_mask is False; stage_group)."""
    better, worse, pair_group, tie_a, tie_b, tie_group = [], [], [], [], [], []
    winners, rivals, stage_group = [], [], []
    start = 0
    for g, group in enumerate(scores):
        for i, s_i in enumerate(group):
            below = [start + j for j, s_j in enumerate(group) if s_j < s_i]
            better += [start + i] * len(below)
            worse += below
            pair_group += [g] * len(below)
            ties = [start + j for j in range(i + 1, len(group)) if group[j] == s_i]
            tie_a += [start + i] * len(ties)
            tie_b += ties
            tie_group += [g] * len(ties)
            if below:
                winners.append(start + i)
                rivals.append(below)
                stage_group.append(g)
        start += len(group)
    width = max((len(r) for r in rivals), default=0)
    long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return {
        "group_sizes": long([len(group) for group in scores]),
        "scores": torch.tensor([s for group in scores for s in group], dtype=torch.float),
        "better": long(better), "worse": long(worse), "pair_group": long(pair_group),
        "tie_a": long(tie_a), "tie_b": long(tie_b), "tie_group": long(tie_group),
        "stage_winner": long(winners), "stage_rivals": long([r + [0] * (width - len(r)) for r in rivals]),
        "stage_mask": torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rivals], dtype=torch.bool),
        "stage_group": long(stage_group),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ per-comparison terms


def davidson_win(d: torch.Tensor, nu: float) -> torch.Tensor:
    """-log P(i > j) under Davidson's model, d = r_i - r_j (less any margin): the Bradley-Terry loss plus
    log1p(nu / (2 cosh(d / 2))); 1 / (2 cosh(x / 2)) is computed as e^{-|x|/2} / (1 + e^{-|x|}), which never
    overflows, and nu = 0 adds an exact zero."""
    half = torch.exp(-d.abs() / 2)
    return -F.logsigmoid(d) + torch.log1p(nu * half / (1 + half * half))


def davidson_tie(d: torch.Tensor, nu: float) -> torch.Tensor:
    """-log P(tie) under Davidson's model, d = r_i - r_j (symmetric in d); infinite at nu = 0."""
    return -torch.log(torch.as_tensor(nu, dtype=d.dtype)) + d / 2 + davidson_win(d, nu)


def bradley_terry_terms(r_better, r_worse, margin=None, tie_nu: float | None = None) -> torch.Tensor:
    """(P,) -log P(better beats worse): Bradley-Terry, or Davidson's win term when tie_nu is given."""
    if tie_nu is None:
        return per_pair_loss(r_better, r_worse, margin)
    d = r_better - r_worse
    return davidson_win(d if margin is None else d - margin, tie_nu)


def plackett_luce_terms(rewards, winner, rivals, mask, margin=None) -> torch.Tensor:
    """(S,) -log P(winner first among itself and its rivals): -logsigmoid(-logsumexp(r_rival - r_winner + m))."""
    gaps = rewards[rivals] - rewards[winner][:, None]  # (S, C)
    if margin is not None:
        gaps = gaps + margin
    return -F.logsigmoid(-torch.logsumexp(gaps.masked_fill(~mask, -torch.inf), dim=1))


def _mean_by_group(terms: torch.Tensor, group: torch.Tensor, num_groups: int, counts: bool = True) -> torch.Tensor:
    """(G,) each group's mean of its terms (its sum with counts=False); an exact copy when a group has one term."""
    sums = torch.zeros(num_groups, dtype=terms.dtype, device=terms.device).index_add(0, group, terms)
    if not counts:
        return sums
    n = torch.zeros(num_groups, dtype=terms.dtype, device=terms.device).index_add(0, group, torch.ones_like(terms))
    return sums / n


# --------------------------------------------------------------------------------------------------- the losses


def pair_batch_loss(rewards, batch: dict, loss: str, tie_nu: float | None = None, center_coeff: float = 0.0):
    """(loss, chosen, rejected) of a pair batch (rewards (2B,): chosen then rejected) under `loss`; a pair is a
    group of two, so every loss gives `pairwise_loss`'s value (Davidson's with tie_nu, tied pairs per `tie`)."""
    chosen, rejected = rewards.chunk(2)
    margin = batch.get("margin")
    if loss == "listwise":
        index = torch.arange(len(chosen), device=rewards.device)
        rivals, mask = (index + len(chosen))[:, None], torch.ones_like(index, dtype=torch.bool)[:, None]
        terms = plackett_luce_terms(rewards, index, rivals, mask, None if margin is None else margin[:, None])
    else:
        terms = bradley_terry_terms(chosen, rejected, margin, tie_nu)
        if tie_nu is not None and batch.get("tie") is not None:
            terms = torch.where(batch["tie"], davidson_tie(chosen - rejected, tie_nu), terms)
    value = terms.mean()
    if center_coeff:
        value = value + center_coeff * torch.mean((chosen + rejected) ** 2)
    return value, chosen, rejected


def group_batch_loss(
    rewards, batch: dict, loss: str, margin_scale: float = 0.0, tie_nu: float | None = None, center_coeff: float = 0.0
):
    """(loss, better, worse) of a batch of groups (`comparisons`' keys) under "all_pairs" or "listwise": the mean
    over groups of each group's loss; `better`/`worse` are the rewards of every ordered pair (for step metrics).
    centering adds c * mean over groups of (2 * the group's mean reward)^2, TRL's (r_c + r_r)^2 for two."""
    num_groups = batch["group_sizes"].numel()
    scores = batch["scores"]
    r_better, r_worse = rewards[batch["better"]], rewards[batch["worse"]]
    if loss == "listwise":
        winner, rivals = batch["stage_winner"], batch["stage_rivals"]
        margin = margin_scale * (scores[winner][:, None] - scores[rivals]) if margin_scale else None
        terms = plackett_luce_terms(rewards, winner, rivals, batch["stage_mask"], margin)
        per_group = _mean_by_group(terms, batch["stage_group"], num_groups, counts=False)
    else:
        margin = margin_scale * (scores[batch["better"]] - scores[batch["worse"]]) if margin_scale else None
        terms, group = bradley_terry_terms(r_better, r_worse, margin, tie_nu), batch["pair_group"]
        if tie_nu is not None:
            tied = davidson_tie(rewards[batch["tie_a"]] - rewards[batch["tie_b"]], tie_nu)
            terms, group = torch.cat([terms, tied]), torch.cat([group, batch["tie_group"]])
        per_group = _mean_by_group(terms, group, num_groups)
    value = per_group.mean()
    if center_coeff:
        group_of = torch.repeat_interleave(torch.arange(num_groups, device=rewards.device), batch["group_sizes"])
        value = value + center_coeff * torch.mean((2 * _mean_by_group(rewards, group_of, num_groups)) ** 2)
    return value, r_better, r_worse


def ranking_loss(
    rewards, batch: dict, loss: str, margin_scale: float = 0.0, tie_nu: float | None = None, center_coeff: float = 0.0
):
    """(loss, better rewards, worse rewards) of a pair batch or a group batch (one with `group_sizes`)."""
    if "group_sizes" in batch:
        return group_batch_loss(rewards, batch, loss, margin_scale, tie_nu, center_coeff)
    return pair_batch_loss(rewards, batch, loss, tie_nu, center_coeff)
