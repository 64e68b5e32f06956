"""A process reward model (train.py --objective steps) through the other commands: evaluate.py writes training's
step report (equal to the run's eval_results.json on the same file), score.py --part steps and the server's /score
part "steps" give `RewardScorer.score_steps`' rewards, and the run's step separator is their default."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest

import evaluate
import score as score_cli
from rmtorch.config import ServeConfig
from rmtorch.score import RewardScorer
from rmtorch.serve.app import build_app
from tests.conftest import PROMPTS, RESPONSES, read_jsonl, train_argv, train_in_process, write_jsonl
from tests.integration.test_serve import LiveServer
from tests.integration.test_train_steps import step_rows


@pytest.fixture(scope="module")
def step_run(tiny_model_dir, tmp_path_factory):
    """A 2-step process reward model run with step separator '.', its held-out file and its eval results."""
    root = tmp_path_factory.mktemp("step_run")
    train, held_out = (
        write_jsonl(root / "train.jsonl", step_rows(16)),
        write_jsonl(root / "eval.jsonl", step_rows(6, 1)),
    )
    out = root / "run"
    argv = train_argv(tiny_model_dir, train, out, "--objective", "steps", "--step_separator", ".", "--lr", "3e-3",
                      eval_file=held_out)  # fmt: skip
    results = train_in_process(argv)
    return {"dir": out, "eval": held_out, "results": results, "root": root}


@pytest.fixture(scope="module")
def step_scorer(step_run):
    return RewardScorer.from_pretrained(str(step_run["dir"]), device="cpu")


STEP_KEYS = ("num_rows", "num_steps", "step_accuracy", "first_error_accuracy", "loss", "mean_step_reward",
             "majority_baseline", "accuracy_true_steps", "accuracy_false_steps")  # fmt: skip


@pytest.mark.parametrize("given", [[], ["--objective", "steps", "--step_separator", "."]], ids=["detected", "given"])
def test_evaluate_writes_the_runs_step_report(given, step_run, tmp_path):
    report_dir = tmp_path / "report"
    argv = ["--model", str(step_run["dir"]), "--data", str(step_run["eval"]), "--report", str(report_dir), *given]
    report = evaluate.main(argv)
    results = step_run["results"]
    for key in STEP_KEYS:
        assert report[key] == pytest.approx(results[key], abs=1e-6, nan_ok=True), key
    assert json.loads((report_dir / "metrics.json").read_text())["step_accuracy"] == report["step_accuracy"]
    run_scores = read_jsonl(step_run["dir"] / "report" / "scores.jsonl")
    scores = read_jsonl(report_dir / "scores.jsonl")
    assert [s["row"] for s in scores] == [s["row"] for s in run_scores]
    for mine, theirs in zip(scores, run_scores):
        assert mine["step_rewards"] == pytest.approx(theirs["step_rewards"], abs=1e-5)
    assert report["scoring"]["step_separator"] == "."


def test_evaluate_with_another_separator_finds_other_steps(step_run, tmp_path):
    """The run's separator is only the default: rows whose steps are split at ';' score with --step_separator ';'."""
    rows = [{**row, "completions": ";".join(row["completions"]) + ";"} for row in read_jsonl(step_run["eval"])]
    data = write_jsonl(tmp_path / "semicolon.jsonl", rows)
    report = evaluate.main(["--model", str(step_run["dir"]), "--data", str(data), "--step_separator", ";"])
    assert report["num_steps"] == step_run["results"]["num_steps"]


def test_score_part_steps_writes_step_rewards_and_reward(step_run, step_scorer, tmp_path):
    rows = read_jsonl(step_run["eval"])
    rows[0]["completions"] = ".".join(rows[0]["completions"])  # one string: split at the run's separator
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    output = tmp_path / "scored.jsonl"
    score_cli.main(["--model", str(step_run["dir"]), "--input", str(data), "--output", str(output),
                    "--part", "steps", "--aggregation", "mean", "--rows_per_chunk", "4"])  # fmt: skip
    scored = read_jsonl(output)
    expected = step_scorer.score_steps(
        [r["prompt"] for r in rows], [r["completions"] for r in rows], separator=".", aggregation="mean"
    )
    assert [r["labels"] for r in scored] == [r["labels"] for r in rows]  # input fields are kept
    for row, steps, reward in zip(scored, expected.step_rewards, expected.rewards.tolist()):
        assert row["step_rewards"] == pytest.approx(steps.tolist(), abs=1e-6)
        assert row["reward"] == pytest.approx(reward, abs=1e-6)
        assert len(row["step_rewards"]) == len(row["labels"])


def test_score_part_steps_needs_completions(step_run, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError, match=r"--part steps needs 'completions'"):
        score_cli.main(["--model", str(step_run["dir"]), "--input", str(data), "--output", str(tmp_path / "o.jsonl"),
                        "--part", "steps"])  # fmt: skip
    assert not (tmp_path / "o.jsonl").exists()


@pytest.fixture(scope="module")
def step_server(step_run, step_scorer):
    app = build_app(step_scorer, ServeConfig(model=str(step_run["dir"]), bf16=False, max_wait_ms=20))
    with LiveServer(app) as live:
        yield live


def test_serve_part_steps_equals_score_steps(step_run, step_scorer, step_server):
    rows = read_jsonl(step_run["eval"])
    prompts, completions = [r["prompt"] for r in rows], [r["completions"] for r in rows]
    completions[1] = ".".join(completions[1]) + "."  # a string: split at the run's separator, the server's default
    for aggregation in (None, "product"):
        body = {"prompts": prompts, "completions": completions, "part": "steps", "return_details": True}
        if aggregation:
            body["aggregation"] = aggregation
        answer = step_server.post("/score", body)
        assert answer.status_code == 200, answer.text
        answer = answer.json()
        expected = step_scorer.score_steps(prompts, completions, separator=".", aggregation=aggregation or "min")
        assert answer["step_separator"] == "." and answer["aggregation"] == (aggregation or "min")
        assert len(answer["step_rewards"]) == len(rows)
        for got, want in zip(answer["step_rewards"], expected.step_rewards):
            assert got == pytest.approx(want.tolist(), abs=1e-6)
        assert answer["rewards"] == pytest.approx(expected.rewards.tolist(), abs=1e-6)
        assert answer["details"]["num_tokens"] == expected.num_tokens.tolist()


def test_serve_part_steps_separator_in_the_request(step_scorer, step_server):
    prompts, completions = ["what color is the sky"], ["the sky ; is blue ;"]
    answer = step_server.post(
        "/score", {"prompts": prompts, "completions": completions, "part": "steps", "step_separator": ";"}
    ).json()
    expected = step_scorer.score_steps(prompts, completions, separator=";")
    assert len(answer["step_rewards"][0]) == 2
    assert answer["step_rewards"][0] == pytest.approx(expected.step_rewards[0].tolist(), abs=1e-6)


def test_serve_part_steps_beside_other_requests(step_scorer, step_server):
    """Step requests and ordinary ones at once: each gets what it gets alone."""
    steps_body = {"prompts": ["what color is the sky"], "completions": [["the sky is blue", "yes"]], "part": "steps"}
    alone_steps = step_scorer.score_steps(steps_body["prompts"], steps_body["completions"], separator=".")
    alone = step_scorer(PROMPTS, RESPONSES).tolist()

    def send(i):
        if i % 2:
            return "steps", step_server.post("/score", steps_body).json()
        return "full", step_server.post("/score", {"prompts": PROMPTS, "completions": RESPONSES}).json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(16)))
    for kind, answer in answers:
        if kind == "steps":
            assert answer["step_rewards"][0] == pytest.approx(alone_steps.step_rewards[0].tolist(), abs=1e-5)
        else:
            assert answer["rewards"] == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"input_ids": [[1, 2, 3]], "part": "steps"}, "part 'steps' takes prompts and completions"),
        ({"prompts": ["a"], "completions": ["b"], "aggregation": "min"}, "go with part 'steps'"),
        (
            {"prompts": ["a"], "completions": [["the sky . blue"]], "part": "steps"},
            r"Row 0, field 'completions', step 0",
        ),
        ({"completions": [["the sky"]], "part": "steps"}, "Row 0, field 'prompt': expected a string"),
        ({"prompts": ["a"], "completions": [["b"]], "part": "steps", "aggregation": "max"}, "aggregation"),
    ],
)
def test_serve_part_steps_errors_are_400_and_serving_goes_on(body, message, step_server):
    answer = step_server.post("/score", body)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]
    good = step_server.post("/score", {"prompts": ["a"], "completions": [["the sky"]], "part": "steps"})
    assert good.status_code == 200 and all(math.isfinite(v) for v in good.json()["rewards"])
