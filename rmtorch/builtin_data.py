"""The built-in preference dataset: generated here, deterministic by seed, no hub.

Three kinds of pair, each with a preference a small model can learn:
- arithmetic: a correct equation vs the same equation with a wrong result;
- thinking:   a worked `<think>` block with the right answer vs a guess (no or unsound reasoning, wrong answer);
- facts:      a true statement vs a false one (capitals, opposites), or a real answer vs an evasion.
"""

from __future__ import annotations

import random

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Cuba": "Havana",
    "Thailand": "Bangkok",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "old": "young",
    "open": "closed",
    "full": "empty",
    "early": "late",
    "hard": "soft",
    "wet": "dry",
}
EVASIONS = [
    "I don't know.",
    "I cannot answer that.",
    "Ask someone else.",
    "Maybe. Who can say?",
    "That is not my problem.",
]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "cookies", "shells"]
NAMES = ["Tom", "Ana", "Lee", "Sara", "Omar", "Mia", "Ivan", "Zoe"]
MAX_DRAWS = 10_000  # draws of one kind that only repeat earlier pairs before the kind counts as used up


def _wrong(value: int, rng: random.Random) -> int:
    return value + rng.choice([-1, 1]) * rng.randint(1, 9)


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    op, result = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
    return {
        "prompt": f"What is {a} {op} {b}?",
        "chosen": f" {a} {op} {b} = {result}.",
        "rejected": f" {a} {op} {b} = {_wrong(result, rng)}.",
        "category": "arithmetic",
    }


def _thinking(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, more, given = rng.randint(2, 15), rng.randint(2, 15), rng.randint(1, 5)
    answer = start + more - given
    prompt = f"{name} has {start} {item}, gets {more} more and gives away {given}. How many {item} are left?"
    chosen = (
        f" <think>{name} starts with {start}. After getting {more} more: {start} + {more} = {start + more}. "
        f"After giving away {given}: {start + more} - {given} = {answer}.</think> The answer is {answer}."
    )
    wrong = _wrong(answer, rng)
    rejected = rng.choice(
        [
            f" The answer is {wrong}.",
            f" <think>I will just guess.</think> The answer is {wrong}.",
            f" <think>{start} and {more} and {given}, so probably {wrong}.</think> The answer is {wrong}.",
        ]
    )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "category": "thinking"}


def _facts(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        country = rng.choice(list(CAPITALS))
        other = rng.choice([c for c in CAPITALS.values() if c != CAPITALS[country]])
        prompt = f"What is the capital of {country}?"
        chosen, rejected = (
            f" The capital of {country} is {CAPITALS[country]}.",
            f" The capital of {country} is {other}.",
        )
    elif kind == 1:
        word = rng.choice(list(OPPOSITES))
        other = rng.choice([w for w in OPPOSITES.values() if w != OPPOSITES[word]])
        prompt = f"What is the opposite of '{word}'?"
        chosen, rejected = (
            f" The opposite of '{word}' is '{OPPOSITES[word]}'.",
            f" The opposite of '{word}' is '{other}'.",
        )
    else:
        country = rng.choice(list(CAPITALS))
        prompt = f"Tell me the capital city of {country}."
        chosen, rejected = f" It is {CAPITALS[country]}.", " " + rng.choice(EVASIONS)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "category": "facts"}


def builtin_pairs(num_pairs: int = 1000, seed: int = 0) -> list[dict]:
    """`num_pairs` standard-format rows {prompt, chosen, rejected, category}, an even mix of the three kinds.

    No pair occurs twice (same prompt + chosen and prompt + rejected, the texts training tokenizes): a draw that
    repeats an earlier pair is drawn again, so rows held out for eval share no pair with the training rows.
    """
    rng = random.Random(seed)
    makers = [_arithmetic, _thinking, _facts]
    rows, seen = [], set()
    for i in range(num_pairs):
        for _ in range(MAX_DRAWS):
            row = makers[i % len(makers)](rng)
            key = (row["prompt"] + row["chosen"], row["prompt"] + row["rejected"])
            if key not in seen:
                break
        else:
            raise ValueError(
                f"The built-in dataset has no more distinct {row['category']} pairs after {len(rows)} rows. Use "
                f"--builtin_size {len(rows)} or fewer, or give --train_file."
            )
        seen.add(key)
        rows.append(row)
    return rows
