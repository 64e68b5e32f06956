"""train.py --objective regression end to end on a tiny model: two rated attributes train (the loss goes down), the
saved model is a standard 2-label classifier naming them, RewardScorer's reward is the saved weights times the
attributes a plain forward gives, and evaluate.py on the run's eval file writes the run's own rating report."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

import evaluate
from rmtorch.files import PairDataError
from rmtorch.score import RewardScorer
from tests.conftest import read_jsonl, train_argv, train_in_process, train_records, write_jsonl

WORDS = "what color is the sky blue green red yes no a an of to and in it".split()


def rating_rows(count: int, seed: int = 0) -> list[dict]:
    """Responses ending in 'good' rate 4 on helpfulness, 'bad' 0; verbosity is the response's word count."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        good = rng.random() < 0.5
        words = rng.choices(WORDS, k=rng.randint(1, 4)) + ["good" if good else "bad"]
        rows.append({"prompt": " ".join(rng.choices(WORDS, k=3)), "response": " " + " ".join(words),
                     "helpfulness": 4 if good else 0, "verbosity": len(words)})  # fmt: skip
    return rows


@pytest.mark.parametrize("normalize", ["false", "true"])
def test_ratings_train_save_and_score(normalize, tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rating_rows(32))
    held_out = write_jsonl(tmp_path / "eval.jsonl", rating_rows(8, 1))
    out = tmp_path / "run"
    argv = train_argv(tiny_model_dir, train, out, "--objective", "regression", "--attributes", "helpfulness,verbosity",
                      "--reward_weights", "0.75,-0.25", "--normalize_targets", normalize, "--max_steps", "16",
                      "--batch_size", "8", "--lr", "1e-2", "--shuffle", "false", eval_file=held_out)  # fmt: skip
    results = train_in_process(argv)
    records = train_records(out)
    first_epoch, last_epoch = (sum(r["loss"] for r in part) for part in (records[:4], records[-4:]))  # same batches
    assert last_epoch < first_epoch
    assert results["num_rows"] == 8 and {"rmse_helpfulness", "pearson_verbosity", "rmse"} <= set(results)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "helpfulness", "1": "verbosity"} and config["problem_type"] == "regression"
    assert config["rmtorch_reward_weights"] == [0.75, -0.25]
    assert ("rmtorch_attribute_std" in config) == (normalize == "true")

    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert plain.config.num_labels == 2
    scorer = RewardScorer.from_pretrained(str(out), device="cpu", autocast_dtype=None)
    prompts = ["the sky is", "what color", "the sky is"]
    completions = [" blue good", " red a bad", " green"]
    details = scorer(prompts, completions, return_details=True)
    expected = []
    for prompt, completion in zip(prompts, completions):
        ids = scorer.tokenizer(prompt + completion + scorer.tokenizer.eos_token, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            outputs = plain(input_ids=ids).logits[0]  # one unpadded row: its last token is the pooled one
        if normalize == "true":
            outputs = outputs * torch.tensor(config["rmtorch_attribute_std"]) + torch.tensor(
                config["rmtorch_attribute_mean"]
            )
        expected.append(outputs)
    expected = torch.stack(expected)  # (3, 2)
    assert details.attributes.shape == (3, 2)
    torch.testing.assert_close(details.attributes, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(details.rewards, expected @ torch.tensor([0.75, -0.25]), atol=1e-5, rtol=0)


def test_one_attribute_trains_scores_and_evaluates(tiny_model_dir, tmp_path):
    """One rated column: the model's one output per row is that attribute (it used to be a (B,) that the loss's
    (B, 1) targets broadcast against)."""
    rows = [{k: v for k, v in row.items() if k != "verbosity"} for row in rating_rows(16)]
    train, held_out = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "eval.jsonl", rows[:8])
    out = tmp_path / "run"
    results = train_in_process(train_argv(tiny_model_dir, train, out, "--objective", "regression", "--attributes",
                                          "helpfulness", "--max_steps", "2", "--batch_size", "8", "--lr", "1e-2",
                                          eval_file=held_out))  # fmt: skip
    assert results["num_rows"] == 8 and "rmse_helpfulness" in results
    report = evaluate.main(["--model", str(out), "--data", str(held_out)])
    assert report["rmse_helpfulness"] == pytest.approx(results["rmse_helpfulness"], abs=1e-5)
    scorer = RewardScorer.from_pretrained(str(out), autocast_dtype=None)
    details = scorer(["the sky"], [" blue good"], return_details=True)
    assert details.attributes.shape == (1, 1)
    torch.testing.assert_close(details.rewards, details.attributes[:, 0], atol=1e-6, rtol=0)


def test_regression_needs_attributes(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rating_rows(4))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="--objective regression needs --attributes"):
        train_in_process(train_argv(tiny_model_dir, train, out, "--objective", "regression"))
    with pytest.raises(SystemExit, match=r"--reward_weights must be 2 comma-separated numbers"):
        train_in_process(train_argv(tiny_model_dir, train, out, "--objective", "regression", "--attributes",
                                    "helpfulness,verbosity", "--reward_weights", "1"))  # fmt: skip
    assert not out.exists()


@pytest.fixture(scope="module", params=["false", "true"], ids=["raw", "normalized"])
def rating_run(request, tiny_model_dir, tmp_path_factory):
    """A 4-step rating run with unequal loss weights, raw or normalized targets, and its held-out file."""
    root = tmp_path_factory.mktemp("rating_run")
    train = write_jsonl(root / "train.jsonl", rating_rows(32))
    held_out = write_jsonl(root / "eval.jsonl", rating_rows(8, 1))
    out = root / "run"
    train_in_process(train_argv(tiny_model_dir, train, out, "--objective", "regression", "--attributes",
                                "helpfulness,verbosity", "--attribute_weights", "3,1", "--normalize_targets",
                                request.param, "--max_steps", "4", "--batch_size", "8", "--lr", "1e-2",
                                eval_file=held_out))  # fmt: skip
    return {"dir": out, "eval": held_out}


RATING_KEYS = ("num_rows", "loss", "rmse", "pearson", "rmse_helpfulness", "rmse_verbosity", "pearson_helpfulness",
               "pearson_verbosity")  # fmt: skip


def assert_same_rating_report(report: dict, report_dir, run_dir) -> None:
    """`report` and report_dir's files equal the run's report/ (fp32: the numbers within 1e-5)."""
    expected = json.loads((run_dir / "report" / "metrics.json").read_text())
    results = json.loads((run_dir / "eval_results.json").read_text())
    for key in RATING_KEYS:
        assert report[key] == pytest.approx(expected[key], abs=1e-5), key
        assert results[key] == expected[key], key  # the run's own two files agree
    assert {k: v for k, v in json.loads((report_dir / "metrics.json").read_text()).items() if k in RATING_KEYS} == {
        k: report[k] for k in RATING_KEYS
    }
    scores, run_scores = read_jsonl(report_dir / "scores.jsonl"), read_jsonl(run_dir / "report" / "scores.jsonl")
    assert [(s["row"], s["target"]) for s in scores] == [(s["row"], s["target"]) for s in run_scores]
    for mine, theirs in zip(scores, run_scores):
        assert mine["predicted"] == pytest.approx(theirs["predicted"], abs=1e-5)


def test_evaluate_on_a_rating_run_reproduces_its_report(rating_run, tmp_path, capsys):
    """No options but --model and --data: the objective, attributes, loss weights and target scale are the run's."""
    report_dir = tmp_path / "report"
    report = evaluate.main(["--model", str(rating_run["dir"]), "--data", str(rating_run["eval"]),
                            "--report", str(report_dir)])  # fmt: skip
    assert "attributes='helpfulness,verbosity'" in capsys.readouterr().out
    assert_same_rating_report(report, report_dir, rating_run["dir"])
    assert report["scoring"]["attribute_weights"] == [3.0, 1.0]


def test_evaluate_regression_on_a_model_that_is_not_a_run(rating_run, tmp_path):
    """The saved model without its run's config.yaml: --objective regression with --attributes and
    --attribute_weights gives the same report (the target scale comes from the model's config); attributes out of
    the model's order are refused."""
    model = tmp_path / "model"
    shutil.copytree(rating_run["dir"], model, ignore=shutil.ignore_patterns("config.yaml", "checkpoints", "report"))
    argv = ["--model", str(model), "--data", str(rating_run["eval"]), "--objective", "regression",
            "--attribute_weights", "3,1"]  # fmt: skip
    report = evaluate.main([*argv, "--attributes", "helpfulness,verbosity", "--report", str(tmp_path / "report")])
    assert_same_rating_report(report, tmp_path / "report", rating_run["dir"])
    with pytest.raises(ValueError, match=r"rates helpfulness, verbosity, but --attributes names verbosity, "
                                         r"helpfulness: give --attributes helpfulness,verbosity\."):  # fmt: skip
        evaluate.main([*argv, "--attributes", "verbosity,helpfulness"])


def test_evaluate_refuses_a_file_missing_an_attribute_column(rating_run, tmp_path, monkeypatch):
    rows = [{k: v for k, v in row.items() if k != "verbosity"} for row in rating_rows(4, 1)]
    data = write_jsonl(tmp_path / "no_verbosity.jsonl", rows)
    monkeypatch.setattr(evaluate, "load_for_evaluation", lambda cfg: pytest.fail("the model loaded before the check"))
    with pytest.raises(PairDataError, match=r"no_verbosity\.jsonl, row 0, field 'verbosity': the file has no "
                                            r"'verbosity' column.* Add each row's 'verbosity' rating\."):  # fmt: skip
        evaluate.main(["--model", str(rating_run["dir"]), "--data", str(data), "--report", str(tmp_path / "report")])
    assert not (tmp_path / "report").exists()


def test_score_py_and_the_server_give_the_attributes_by_name(rating_run, tmp_path):
    """score.py writes each row's attributes beside its reward, and /score's details hold them per row: the values
    RewardScorer gives, under the names the model's config holds."""
    import httpx

    import score
    from tests.integration.test_serve import serving

    scorer = RewardScorer.from_pretrained(str(rating_run["dir"]), autocast_dtype=None)
    prompts, completions = ["the sky is", "what color"], [" blue good", " red a bad"]
    expected = scorer(prompts, completions, return_details=True)
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)])
    score.main(["--model", str(rating_run["dir"]), "--input", str(rows), "--output", str(tmp_path / "out.jsonl")])
    written = read_jsonl(tmp_path / "out.jsonl")
    with serving(scorer) as live:
        answer = httpx.post(live.url + "/score", json={"prompts": prompts, "completions": completions,
                                                       "return_details": True}, timeout=60).json()  # fmt: skip
    for i, row in enumerate(written):
        by_name = dict(zip(["helpfulness", "verbosity"], expected.attributes[i].tolist()))
        assert row["reward_attributes"] == pytest.approx(by_name, abs=1e-5)
        assert answer["details"]["attributes"][i] == pytest.approx(by_name, abs=1e-5)
        assert row["reward"] == pytest.approx(expected.rewards[i].item(), abs=1e-5)


@pytest.mark.parametrize(
    ("name", "extra"),
    [("padded", ("--packing", "false")), ("lora", ("--lora", "--lora_r", "4")),
     ("qlora", ("--lora", "--lora_r", "4", "--load_in_4bit"))],
    ids=["padded", "lora", "qlora"],
)  # fmt: skip
def test_ratings_train_padded_with_lora_and_qlora_and_evaluate_as_trained(name, extra, tiny_model_dir, tmp_path):
    """As pairs do: padded batches and LoRA (whose adapters start at zero) take the packed full run's first step; a
    LoRA or QLoRA run saves an adapter with its K-output head (rmtorch_adapter.json names and scales the outputs),
    which evaluate.py loads to the run's own report, and merge_lora.py into a plain model giving the same attributes
    and rewards."""
    train = write_jsonl(tmp_path / "train.jsonl", rating_rows(16))
    held_out = write_jsonl(tmp_path / "eval.jsonl", rating_rows(8, 1))
    options = ("--objective", "regression", "--attributes", "helpfulness,verbosity", "--batch_size", "8",
               "--lr", "1e-2", "--normalize_targets", "true")  # fmt: skip
    packed, run = tmp_path / "packed", tmp_path / name
    for out, flags in ((packed, ()), (run, extra)):
        train_in_process(train_argv(tiny_model_dir, train, out, *options, *flags, eval_file=held_out))
    if name != "qlora":  # QLoRA's body is nf4: another first step
        assert train_records(run)[0]["loss"] == pytest.approx(train_records(packed)[0]["loss"], rel=1e-5)
    assert (run / "adapter_model.safetensors").exists() == (name != "padded")
    report = evaluate.main(["--model", str(run), "--data", str(held_out), "--report", str(tmp_path / "report")])
    assert_same_rating_report(report, tmp_path / "report", run)
    if name != "padded":  # merged, a plain K-output model that names and scales its outputs as the adapter did
        from rmtorch.lora import merge_adapter

        merged = merge_adapter(run, tmp_path / "merged")
        config = json.loads((merged / "config.json").read_text())
        assert config["id2label"] == {"0": "helpfulness", "1": "verbosity"} and "rmtorch_attribute_std" in config
        prompts, completions = ["the sky is", "what color"], [" blue good", " red a bad"]
        adapter, plain = (RewardScorer.from_pretrained(str(d), autocast_dtype=None)(prompts, completions,
                          return_details=True) for d in (run, merged))  # fmt: skip
        torch.testing.assert_close(plain.attributes, adapter.attributes, atol=1e-4, rtol=0)
        torch.testing.assert_close(plain.rewards, adapter.rewards, atol=1e-4, rtol=0)
