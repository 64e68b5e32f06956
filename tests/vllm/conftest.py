"""What tests/vllm's modules share: the GSM8K rows and the runs trained on them (once per session: vLLM's startup
dominates these tests, training them twice would add to it)."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.vllm_engine import VllmServer
from tests.conftest import read_jsonl, run_script, shared_path, tiny_config, train_argv, train_in_process, write_jsonl

DATA = ("data", "r1_gsm8k", "r1_distill_qwen32b_gsm8k_labeled.jsonl")
SCORED = 8  # the first GSM8K rows are scored; the training pairs come from the rows after them
THINK_TOKENS = ["<think>", "</think>"]  # added to SmolLM2's tokenizer, which has none, so rows can be split
# vLLM's start on 2 CPU cores (about 50 s) is mostly processes importing it and a torch.compile of the model. Eager,
# it takes about 30 s; with the model's worker in the engine's process (`uni`, which vLLM's CPU platform honours only
# under VLLM_ENABLE_V1_MULTIPROCESSING=0, FAST_START_ENV; without it `uni` silently became a worker process) 21 s
# (quiet). `vllm serve` keeps its engine in a process of its own; `vllm.LLM` in rmtorch.serve runs it in the
# server's. The model code is the same (compiling changes speed and rounding, within the tests' 1e-4);
# docs/serve.md's command itself runs in bench/bench_serve.py.
FAST_START = {"enforce_eager": True, "distributed_executor_backend": "uni"}  # vllm.LLM's options (--vllm_options)
FAST_START_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
FAST_START_FLAGS = tuple(  # the same as the server's flags: --enforce-eager --distributed-executor-backend uni
    part
    for name, value in FAST_START.items()
    for part in (f"--{name.replace('_', '-')}", *(() if value is True else (str(value),)))
)


def fast_vllm_server(model, *flags: str):
    """docs/serve.md's `vllm serve` command (bench.vllm_engine.server_command) with vLLM's `flags`, started the fast
    way (FAST_START_FLAGS, FAST_START_ENV): a context manager that yields the server."""
    return VllmServer(model, extra=(*flags, *FAST_START_FLAGS), env=FAST_START_ENV)


def conversation(row: dict) -> tuple[list[dict], list[dict]]:
    """(prompt, completion) as TRL's GRPO passes them: the question as a user turn, the answer as the reply."""
    return [{"role": "user", "content": row["question"]}], [{"role": "assistant", "content": row["answer"]}]


def thinking_conversation(row: dict) -> tuple[list[dict], list[dict]]:
    """conversation(row) with the row's reasoning before the answer, closed by </think>, as R1 wrote it."""
    prompt, _ = conversation(row)
    return prompt, [{"role": "assistant", "content": f"{row['reasoning'].strip()}\n</think>\n\n{row['answer']}"}]


def save_base_model(directory, tokenizer):
    """A random 2-layer Llama reward model with head_dim 64: vLLM's CPU attention runs head sizes 32, 64, 80, ...,
    and with conftest's tiny Llama (head_dim 8) its server starts, then fails its first request."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
    config = LlamaConfig(
        **{**tiny_config(len(tokenizer), tokenizer.pad_token_id), **shape, "max_position_embeddings": 2048},
        num_labels=1,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def gsm8k_rows() -> list[dict]:
    return read_jsonl(shared_path(*DATA))


@pytest.fixture(scope="session")
def runs(tmp_path_factory, smol_tokenizer, gsm8k_rows) -> dict:
    """{name: (the directory rmtorch scores, the directory vLLM serves)}: a full fine-tune (the same directory), and
    a LoRA run (its adapter, and the plain model merge_lora.py writes from it). Their tokenizer is SmolLM2's with
    <think> and </think> added as single tokens."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("vllm_runs")
    tokenizer = copy.deepcopy(smol_tokenizer)  # the session's tokenizer stays as it is
    tokenizer.add_tokens(THINK_TOKENS, special_tokens=True)
    base = save_base_model(root / "base", tokenizer)
    pairs = []
    for row, other in zip(gsm8k_rows[SCORED : SCORED + 8], gsm8k_rows[SCORED + 1 :]):
        prompt, chosen = conversation(row)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": conversation(other)[1]})  # another's answer
    data = write_jsonl(root / "pairs.jsonl", pairs)
    # A large learning rate, so that the trained weights are far from the base's (a served base would show).
    options = ("--max_length", "1024", "--lr", "1e-3")
    for name, extra in {"full": (), "lora": ("--lora", "--lora_r", "4")}.items():
        train_in_process(train_argv(base, data, root / name, *options, *extra))
        AcceleratorState._reset_state(reset_partial_state=True)  # each run builds its own Accelerator
    run_script("merge_lora.py", ["--model", str(root / "lora"), "--output_dir", str(root / "lora_merged")])
    return {"full": (root / "full", root / "full"), "lora": (root / "lora", root / "lora_merged")}
