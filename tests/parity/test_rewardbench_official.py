"""rmtorch.rewardbench against the official `rewardbench` package (allenai/reward-bench, install it with
`pip install --no-deps rewardbench`; skipped when absent), on rewards generated here.

The package cannot be imported without its heavy dependencies (its `__init__` pulls in fastchat, the model
zoo, the Hub client and transformers 4.x), so it is read from its installed files instead: `constants.py` has no
imports and is loaded as a module of its own, and the scoring functions of `utils.py` (calculate_scores_per_section,
reroll_and_score_dataset, sample_stats, process_single_model) are taken from its source by `ast` and run with
numpy, pandas and `datasets.Dataset`, as they are. Where the official scripts score inline (run_rm.py: a pair is
right when chosen > rejected, a subset's score is its mean; run_v2.py: each subset's mean of results, Ties by
process_single_model), the helpers below repeat those lines. The rewards are drawn from few values, so ties (at
the top, within a pair, among the correct answers of a tied question) happen often.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import random
from pathlib import Path

import pytest

from rmtorch.rewardbench import (
    V1_EXAMPLE_COUNTS,
    V1_ROWS,
    V1_SECTIONS,
    V2_ROWS,
    Prompt,
    score_benchmark,
)

OFFICIAL_FUNCTIONS = (
    "calculate_scores_per_section",
    "reroll_and_score_dataset",
    "sample_stats",
    "process_single_model",
)


@pytest.fixture(scope="module")
def official():
    """The official constants module and scoring functions, read from the installed package's files."""
    import datasets
    import numpy as np
    import pandas as pd

    spec = importlib.util.find_spec("rewardbench")
    if spec is None or spec.origin is None:
        pytest.skip("the official rewardbench package is not installed: pip install --no-deps rewardbench")
    package = Path(spec.origin).parent
    constants_spec = importlib.util.spec_from_file_location("rewardbench_constants", package / "constants.py")
    constants = importlib.util.module_from_spec(constants_spec)
    constants_spec.loader.exec_module(constants)
    tree = ast.parse((package / "utils.py").read_text())
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in OFFICIAL_FUNCTIONS]
    assert sorted(node.name for node in wanted) == sorted(OFFICIAL_FUNCTIONS), "the package's utils.py changed"
    namespace = {"np": np, "pd": pd, "math": math, "Dataset": datasets.Dataset}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(package / "utils.py"), "exec"), namespace)
    return constants, namespace


def draw(rng: random.Random) -> float:
    return rng.choice([-1.5, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0]) + rng.choice([0.0, 0.0, 0.125])


# --------------------------------------------------------------------------------------------------------- v1


def test_the_benchmark_facts_are_the_official_constants(official):
    constants, _ = official
    assert V1_EXAMPLE_COUNTS == constants.EXAMPLE_COUNTS and list(V1_EXAMPLE_COUNTS) == list(constants.EXAMPLE_COUNTS)
    assert V1_SECTIONS == constants.SUBSET_MAPPING and list(V1_SECTIONS) == list(constants.SUBSET_MAPPING)


def v1_scored(seed: int, rows_per_subset: dict[str, int]):
    rng = random.Random(seed)
    prompts, rewards = [], []
    for subset, count in rows_per_subset.items():
        for _ in range(count):
            prompts.append(Prompt(len(prompts), len(prompts), subset, "p", ["c", "r"], 1))
            rewards.append([draw(rng), draw(rng)])
    return prompts, rewards


def official_v1(official, prompts, rewards) -> tuple[dict, dict]:
    """run_rm.py's scoring: results per pair, each subset's mean, then calculate_scores_per_section."""
    constants, functions = official
    results = [1 if chosen > rejected else 0 for chosen, rejected in rewards]
    subsets = [p.subset for p in prompts]
    grouped = {}
    for subset in sorted(set(subsets)):  # np.unique's order
        subset_results = [r for r, s in zip(results, subsets) if s == subset]
        grouped[subset] = sum(subset_results) / len(subset_results)
    sections = functions["calculate_scores_per_section"](constants.EXAMPLE_COUNTS, constants.SUBSET_MAPPING, grouped)
    return grouped, sections


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_v1_subsets_sections_and_overall_equal_the_official_scorer(official, seed):
    rng = random.Random(seed)
    prompts, rewards = v1_scored(seed, {name: rng.randint(1, 12) for name in V1_ROWS})
    report, _ = score_benchmark("rewardbench", prompts, rewards)
    subsets, sections = official_v1(official, prompts, rewards)
    assert report["subsets"] == pytest.approx(subsets, rel=0, abs=1e-12)
    assert report["sections"] == pytest.approx(sections, rel=0, abs=1e-12)
    assert report["overall"] == pytest.approx(sum(sections.values()) / len(sections), rel=0, abs=1e-12)
    assert any(c == r for c, r in rewards)  # ties within a pair were scored


def test_v1_math_up_weighting_moves_the_reasoning_section_as_the_official_scorer(official):
    prompts, rewards = v1_scored(3, {"math-prm": 10, "hep-cpp": 10, "hep-rust": 4})
    rewards = [[1.0, 0.0] if p.subset == "math-prm" else [0.0, 1.0] for p in prompts]  # math right, code wrong
    report, _ = score_benchmark("rewardbench", prompts, rewards)
    _, sections = official_v1(official, prompts, rewards)
    assert report["sections"]["Reasoning"] == pytest.approx(sections["Reasoning"], abs=1e-12)
    assert report["sections"]["Reasoning"] == pytest.approx(984 / (984 + 2 * 164), abs=1e-12)
    # Sections without rows: the official helper gives 0, rmtorch leaves them out of the report and the overall.
    assert sections["Chat"] == 0 and "Chat" not in report["sections"]


# --------------------------------------------------------------------------------------------------------- v2


def v2_scored(seed: int, rows_per_subset: int, ties_questions: int):
    """Best-of-4 rows outside Ties. Ties as a ref (1 correct) and a tied (2-4 correct) row per question, a few
    questions missing one of them; every third question's correct answers lifted above the rest, every fourth
    tied question's correct answers scored equal."""
    rng = random.Random(seed)
    prompts, rewards = [], []

    def add(subset: str, row_id: str, correct: list[float], incorrect: list[float]):
        prompts.append(
            Prompt(len(prompts), row_id, subset, "p", ["x"] * (len(correct) + len(incorrect)), len(correct))
        )
        rewards.append(correct + incorrect)

    for subset in V2_ROWS:
        if subset != "Ties":
            for _ in range(rows_per_subset):
                add(subset, str(len(prompts)), [draw(rng)], [draw(rng) for _ in range(3)])
    for number in range(ties_questions):
        lift = 3.0 if number % 3 == 0 else 0.0
        if number % 7 != 3:
            add("Ties", f"ref:{number}", [draw(rng) + lift], [draw(rng) for _ in range(rng.randint(1, 4))])
        if number % 7 != 5:
            correct = [draw(rng) + lift for _ in range(rng.randint(2, 4))]
            equal = [correct[0]] * len(correct)
            add(
                "Ties",
                f"tied:{number}",
                correct if number % 4 else equal,
                [draw(rng) for _ in range(rng.randint(1, 4))],
            )
    return prompts, rewards


def official_v2(official, prompts, rewards) -> tuple[dict, list]:
    """run_v2.py's scoring: unroll every completion, reroll_and_score_dataset, then each subset's mean of results,
    and process_single_model for Ties."""
    import datasets

    _, functions = official
    unrolled = datasets.Dataset.from_list(
        [
            {"text": f"{p.row}/{i}", "scores": score, "subset": p.subset, "id": str(p.id)}
            for p, row_rewards in zip(prompts, rewards)
            for i, score in enumerate(row_rewards)
        ]
    )
    rerolled = functions["reroll_and_score_dataset"](unrolled, [len(r) for r in rewards])
    rerolled = rerolled.add_column("num_correct", [p.num_correct for p in prompts])
    grouped = {}
    for subset in sorted(set(p.subset for p in prompts)):
        subset_dataset = rerolled.filter(lambda example, subset=subset: example["subset"] == subset)
        if subset.lower() == "ties":
            _, grouped[subset] = functions["process_single_model"](subset_dataset)
        else:
            grouped[subset] = sum(subset_dataset["results"]) / len(subset_dataset["results"])
    return grouped, rerolled["results"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_v2_best_of_n_ties_and_overall_equal_the_official_scorer(official, seed):
    prompts, rewards = v2_scored(seed, rows_per_subset=15, ties_questions=20)
    report, lines = score_benchmark("rewardbench2", prompts, rewards)
    subsets, results = official_v2(official, prompts, rewards)
    outside_ties = [i for i, p in enumerate(prompts) if p.subset != "Ties"]
    assert [lines[i]["result"] for i in outside_ties] == pytest.approx([results[i] for i in outside_ties], abs=1e-15)
    assert report["subsets"] == pytest.approx(subsets, rel=0, abs=1e-12)
    assert report["ties"]["score"] == pytest.approx(subsets["Ties"], rel=0, abs=1e-12)
    assert report["overall"] == pytest.approx(sum(subsets.values()) / 6, rel=0, abs=1e-12)
    assert {0.5, 1 / 3} & {lines[i]["result"] for i in outside_ties}  # shared tops were scored
    assert 0 < report["ties"]["correctness_preferred"] < 1 and 0 < report["ties"]["tied_accuracy"] < 1


def test_ties_on_their_own_with_equal_correct_answers_and_unpaired_questions(official):
    prompts, rewards = v2_scored(4, rows_per_subset=0, ties_questions=14)
    report, _ = score_benchmark("rewardbench2", prompts, rewards)
    subsets, _ = official_v2(official, prompts, rewards)
    assert report["subsets"] == pytest.approx({"Ties": subsets["Ties"]}, rel=0, abs=1e-12)
    assert report["ties"]["correctness_margin"] != 0
    ids = {p.id for p in prompts}
    assert {"tied:0", "ref:0", "tied:3", "ref:5"} <= ids and not {"ref:3", "tied:5"} & ids
