"""rmtorch.builtin_data: deterministic, valid, an even mix of its kinds, and no pair twice (so the default run's
held-out pairs are not training pairs)."""

from __future__ import annotations

from collections import Counter

import pytest

from rmtorch.builtin_data import builtin_pairs
from rmtorch.config import TrainConfig
from rmtorch.pairs import shared_pairs, tokenize_pairs


def test_builtin_dataset_is_deterministic_and_valid(smol_tokenizer):
    rows = builtin_pairs(60, seed=3)
    assert rows == builtin_pairs(60, seed=3) and rows != builtin_pairs(60, seed=4)
    assert Counter(r["category"] for r in rows) == {"arithmetic": 20, "thinking": 20, "facts": 20}
    tokenized, report = tokenize_pairs(rows, smol_tokenizer, return_report=True)
    assert report.pairs_out == 60 and report.skipped_bad == 0


def test_the_default_runs_held_out_pairs_are_not_training_pairs(smol_tokenizer):
    """The default run (1000 pairs, the last 100 held out) once warned that 16 held-out pairs were also training
    pairs. Checked on the SmolLM2 token ids train.py compares (same chosen and rejected ids)."""
    from train import build_data

    cfg = TrainConfig()
    train_set, eval_set, report = build_data(cfg, smol_tokenizer)
    assert (len(train_set), len(eval_set)) == (900, 100)
    assert report["eval"]["also_in_train"] == shared_pairs(train_set, eval_set) == 0
    pairs = {(tuple(c), tuple(r)) for s in (train_set, eval_set) for c, r in zip(s["chosen_ids"], s["rejected_ids"])}
    assert len(pairs) == 1000  # no pair twice anywhere, not only across the split


def test_asking_for_more_pairs_than_exist_says_how_many_do():
    with pytest.raises(ValueError, match=r"no more distinct facts pairs after 1838 rows\. Use --builtin_size 1838"):
        builtin_pairs(1841, seed=42)
