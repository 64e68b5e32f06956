"""RewardScorer with engine="vllm", as a user of .venv-vllm runs it: the rows of a JSON file scored in each part.

    .venv-vllm/bin/python tests/vllm/score_with_vllm.py MODEL ROWS.json OUTPUT.json

ROWS.json: {"prompts": [...], "completions": [...], "parts": ["full", "answer", ...]}. OUTPUT.json gets
{"engine", "precision", "max_length", PART: [rewards] for each part}; vLLM's log goes to stdout and stderr.
"""

from __future__ import annotations

import json
import sys

from rmtorch.score import RewardScorer


def main(model: str, rows_file: str, output_file: str) -> None:
    rows = json.loads(open(rows_file).read())
    scorer = RewardScorer.from_pretrained(model, engine="vllm")  # precision: the run's config.yaml, as the torch one
    answer = {"engine": scorer.engine.name, "precision": scorer.precision, "max_length": scorer.max_length}
    for part in rows["parts"]:
        answer[part] = scorer(rows["prompts"], rows["completions"], part=part).tolist()
    with open(output_file, "w") as out:
        json.dump(answer, out)


if __name__ == "__main__":  # vLLM starts its engine in a new process
    main(*sys.argv[1:])
