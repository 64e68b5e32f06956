"""One model, one reward: a run train.py wrote, scored with no options through RewardScorer.from_pretrained,
score.py, evaluate.py and rmtorch.serve (/score, /classify), gives the same rewards, because all four take precision
and max_length from one rule (`rmtorch.config.scoring_defaults`): the run's config.yaml, else fp32 and the model's
own limit."""

from __future__ import annotations

import httpx
import pytest
import torch

import evaluate
import score
from rmtorch.config import EvalConfig, ScoreConfig, parse_config, scoring_defaults
from rmtorch.formatting import chat_opening, restore_chat_bos, tokenize_response
from rmtorch.score import RewardScorer
from rmtorch.serve.__main__ import build_scorer, load_config
from rmtorch.serve.app import build_app
from tests.conftest import (
    pair_rows,
    read_jsonl,
    save_tiny_llama,
    shared_path,
    train_argv,
    train_in_process,
    write_jsonl,
)
from tests.integration.test_serve import LiveServer


@pytest.fixture(scope="module", params=["false", "true"], ids=["fp32", "bf16"])
def run(request, tiny_model_dir, tmp_path_factory):
    """A 2-step train.py run in the given precision, its held-out rows, and its bf16 setting."""
    root = tmp_path_factory.mktemp(f"one_reward_{request.param}")
    rows = pair_rows(12, seed=3)
    data = write_jsonl(root / "pairs.jsonl", rows)
    train_in_process(train_argv(tiny_model_dir, data, root / "run", "--bf16", request.param))
    return root / "run", data, rows, request.param


def test_the_rule_reads_the_run(run):
    run_dir, _, _, bf16 = run
    assert scoring_defaults(str(run_dir)) == {"bf16": bf16 == "true", "max_length": 512}
    assert scoring_defaults("smollm2") == {"bf16": False, "max_length": None}  # not a run: fp32, the model's limit


def test_a_model_that_is_not_a_run_gets_the_same_defaults_everywhere(tiny_model_dir):
    model = str(tiny_model_dir)
    configs = [
        parse_config(["--model", model, "--input", "x.jsonl", "--output", "y.jsonl"], ScoreConfig),
        parse_config(["--model", model, "--data", "x.jsonl"], EvalConfig),
        load_config(["--model", model]),
    ]
    assert {(cfg.bf16, cfg.max_length) for cfg in configs} == {(False, None)}  # fp32, the model's own limit
    library = RewardScorer.from_pretrained(model, device="cpu")
    assert (library.precision, library.max_length) == ("fp32", library.model.config.max_position_embeddings)


def test_four_entry_points_give_one_reward(run, tmp_path):
    run_dir, data, rows, bf16 = run
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]

    library = RewardScorer.from_pretrained(str(run_dir), device="cpu")
    assert (library.precision, library.max_length) == ("bf16" if bf16 == "true" else "fp32", 512)
    expected = library(prompts, completions)

    score.main(["--model", str(run_dir), "--input", str(data), "--output", str(tmp_path / "scored.jsonl")])
    scored = read_jsonl(tmp_path / "scored.jsonl")
    from_score_py = [r["chosen_reward"] for r in scored] + [r["rejected_reward"] for r in scored]

    report = evaluate.main(["--model", str(run_dir), "--data", str(data), "--report", str(tmp_path / "report")])
    assert report["scoring"]["precision"] == library.precision and report["scoring"]["max_length"] == 512
    lines = sorted(read_jsonl(tmp_path / "report" / "scores.jsonl"), key=lambda line: line["row"])
    from_evaluate = [line["chosen_reward"] for line in lines] + [line["rejected_reward"] for line in lines]

    cfg = load_config(["--model", str(run_dir)])
    with LiveServer(build_app(build_scorer(cfg), cfg)) as server:
        health = httpx.get(server.url + "/health", timeout=60).json()
        assert (health["precision"], health["max_length"]) == (library.precision, 512)
        from_score = server.post("/score", {"prompts": prompts, "completions": completions}).json()["rewards"]
        tokenizer = library.tokenizer
        texts = [tokenizer.decode(tokenize_response(tokenizer, p, c)) for p, c in zip(prompts, completions)]
        answer = server.post("/classify", {"input": texts, "use_activation": False, "add_special_tokens": False})
        from_classify = [item["probs"][-1] for item in answer.json()["data"]]

    entry_points = {"score.py": from_score_py, "evaluate.py": from_evaluate, "/score": from_score}
    for name, rewards in {**entry_points, "/classify": from_classify}.items():
        torch.testing.assert_close(
            torch.tensor(rewards), expected, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def verl_classify_body(tokenizer, question: str, answer: str) -> dict:
    """The request verl 0.9.1's RewardLoopWorker posts to /classify (`_preprocess_reward_inputs`, then
    `compute_score_disrm`): the policy's decoded response without its EOS text, the chat template rendered as text,
    and a leading BOS text stripped."""
    response_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    rollout_response = tokenizer.decode(response_ids).replace(tokenizer.eos_token, "")
    chat = [{"role": "user", "content": question}, {"role": "assistant", "content": rollout_response}]
    rm_prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    if tokenizer.bos_token is not None and rm_prompt.startswith(tokenizer.bos_token):
        rm_prompt = rm_prompt[len(tokenizer.bos_token) :]
    return {"model": "rm", "input": rm_prompt, "use_activation": False}


@pytest.mark.parametrize("chat_bos", ["restore", "as_sent"])
def test_verl_requests_get_the_reward_of_the_training_format(smol_tokenizer, tmp_path, chat_bos):
    """SmolLM2's BOS is the chat token <|im_start|>: verl's text lacks the first token training saw."""
    model_dir = save_tiny_llama(tmp_path / "smol_rm", smol_tokenizer)
    scorer = RewardScorer.from_pretrained(str(model_dir), device="cpu")
    questions = ["What is 2 + 3?", "Name a color."]
    answers = ["2 + 3 = 5. The answer is 5.", "Blue."]
    expected = scorer([[{"role": "user", "content": q}] for q in questions], [
        [{"role": "assistant", "content": a}] for a in answers
    ])  # fmt: skip
    cfg = load_config(["--model", str(model_dir), "--chat_bos", chat_bos])
    with LiveServer(build_app(scorer, cfg)) as server:
        rewards = []
        for question, answer in zip(questions, answers):
            body = verl_classify_body(smol_tokenizer, question, answer)
            assert not body["input"].startswith(smol_tokenizer.bos_token)
            rewards.append(server.post("/classify", body).json()["data"][-1]["probs"][-1])
    difference = (torch.tensor(rewards) - expected).abs().max().item()
    if chat_bos == "restore":
        assert difference <= 1e-6
    else:  # as sent: one token short of what training saw, and another reward
        assert difference > 1e-3


def test_only_a_chat_missing_its_bos_gets_it_back(smol_tokenizer):
    from transformers import AutoTokenizer

    opening = chat_opening(smol_tokenizer)
    assert opening == "system\n"  # SmolLM2 renders a default system turn first
    bos = smol_tokenizer.bos_token
    assert restore_chat_bos("system\nhi<|im_end|>\n", smol_tokenizer, opening) == bos + "system\nhi<|im_end|>\n"
    for text in ("The sky is blue.", bos + "system\nhi<|im_end|>\n"):  # plain text, a chat with its BOS: as sent
        assert restore_chat_bos(text, smol_tokenizer, opening) == text
    qwen = AutoTokenizer.from_pretrained(shared_path("qwen3_tokenizer"))
    assert chat_opening(qwen) is None  # no BOS token: nothing to restore
