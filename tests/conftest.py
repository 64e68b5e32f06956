"""Shared test helpers: tiny random models built from a config, the SmolLM2 and a BOS-adding tokenizer, pair data,
and one way to run train.py (in process, or as a real process for crash tests).

Layout: tests/unit (one module's behaviour), tests/parity (against TRL 1.16 as the oracle), tests/integration
(the command-line scripts end to end), tests/realdata (../shared data and the real SmolLM2). Each folder's tests
carry the marker of the same name; `slow` marks real-model and multi-process tests (still run in CI).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
FOLDER_MARKERS = ("unit", "parity", "integration", "realdata")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist workers share the cores: one torch thread each. A pool of 2 threads spin-waits for a peer the other
    # worker has descheduled (the SmolLM2 run took 445 s instead of 97). train.py, evaluate.py and the server set
    # their thread count from the machine's cores, so the cap is on torch's setter; subprocesses keep their own.
    _set_num_threads = torch.set_num_threads
    _set_num_threads(1)
    torch.set_num_threads = lambda _threads: _set_num_threads(1)


def pytest_collection_modifyitems(items):
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, folder))


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared holds the real third-party data)")
    return path


# ------------------------------------------------------------------------------------------------ tokenizers


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (pad == eos == <|im_end|> = 2, no BOS on text, ChatML template)."""
    from transformers import AutoTokenizer

    from rmtorch.loading import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


WORDS = (
    "what color is the sky ? blue green red the is a an of to and in it you I how many are 1 2 3 4 5 6 7 8 9 0 + - "
    "= . , ! "
    "hello world yes no answer question good bad think"
).split()


def make_bos_tokenizer():
    """A word-level tokenizer that adds BOS <s> to every text, with a distinct pad and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }}{% endfor %}"
    )
    return tokenizer


@pytest.fixture(scope="session")
def bos_tokenizer():
    return make_bos_tokenizer()


# ------------------------------------------------------------------------------------------------------ models


def tiny_llama(vocab_size: int, seed: int = 0, pad_token_id: int | None = None, **overrides):
    """2-layer hidden-32 LlamaForSequenceClassification (num_labels=1) with an N(0,1) score head (visible rewards)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(
        LlamaConfig(**tiny_config(vocab_size, pad_token_id), num_labels=1, **overrides)
    )
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model.eval()


def tiny_config(vocab_size: int, pad_token_id: int | None) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=pad_token_id, max_position_embeddings=512,
    )  # fmt: skip


def save_tiny_llama(directory: Path, tokenizer, seed: int = 0, causal: bool = False) -> Path:
    """Write a tiny Llama (seq-cls, or causal LM with no head) and its tokenizer as a loadable directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if causal:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**tiny_config(len(tokenizer), tokenizer.pad_token_id)))
    else:
        model = tiny_llama(len(tokenizer), seed=seed, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def reward_alone(model, ids: list[int]) -> float:
    """Oracle: one unpadded row through body and head, read at its last token."""
    from rmtorch.model import backbone, score_head

    with torch.no_grad():
        hidden = backbone(model)(input_ids=torch.tensor([ids])).last_hidden_state
        return score_head(model)(hidden[0, -1]).item()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama reward model with the BOS tokenizer (seed 0), shared by the session: do not modify."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_model"), make_bos_tokenizer())


# -------------------------------------------------------------------------------------------------------- data

PAIR_WORDS = "what color is the sky blue green red yes no a an of to and in it".split()
CATEGORIES = ("colors", "greetings", "answers")


def pair_rows(count: int, seed: int = 0, categories: bool = False) -> list[dict]:
    """Standard-format pairs in the BOS tokenizer's vocabulary, of varied lengths; chosen ends in 'good' and
    rejected in 'bad' (a preference a tiny model learns). With categories, each row has one of CATEGORIES."""
    rng = random.Random(seed)
    pick = lambda n: " ".join(rng.choice(PAIR_WORDS) for _ in range(n))  # noqa: E731
    rows = []
    for i in range(count):
        row = {"prompt": pick(2 + i % 9), "chosen": f" {pick(1 + i % 3)} good", "rejected": f" {pick(1 + i % 2)} bad"}
        if categories:
            row["category"] = CATEGORIES[i % 3]
        rows.append(row)
    return rows


# The scoring tests' batch: four prompts and responses of different lengths in the BOS tokenizer's vocabulary.
PROMPTS = ["what color is the sky ?", "how many are 2 + 3 ?", "hello", "is it good ?"]
RESPONSES = [" blue", " 5 . the answer is 2 + 3 = 5 , yes", " hello world ! how are you ? I think it is good", " no"]


def text_rows() -> tuple[list[str], list[str]]:
    return PROMPTS, RESPONSES


def message_rows() -> tuple[list[list[dict]], list[list[dict]]]:
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": r.strip()}] for r in RESPONSES]
    return prompts, completions


ROWS = {"text": text_rows, "messages": message_rows}


# Four texts of different lengths in the BOS tokenizer's vocabulary, most ending in its EOS: a padded model batch.
TEXTS = ["what color is the sky ? blue </s>", "how many are 2 + 2 ? 4 </s>", "hello world </s>", "yes"]


def batch_of(tokenizer, texts: list[str]) -> dict:
    """(N, T) right-padded ids and mask for a few texts."""
    return tokenizer(texts, padding=True, return_tensors="pt")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- train.py


def train_argv(model_dir, train_file, output_dir, *extra: str, eval_file=None) -> list[str]:
    """train.py options for a small fp32 run (2 steps of 2 pairs); options in `extra` override these."""
    return [
        "--model", str(model_dir), "--train_file", str(train_file), "--eval_file", str(eval_file or train_file),
        "--output_dir", str(output_dir), "--bf16", "false", "--batch_size", "2", "--max_steps", "2",
        "--log_every", "1000", *extra,
    ]  # fmt: skip


def train_in_process(argv: list[str]) -> dict:
    """train.main(argv), returning its eval results."""
    import train

    return train.main(argv)


def train_records(output_dir: Path) -> list[dict]:
    """The per-step training lines of a run's metrics.jsonl (evaluation lines left out)."""
    return [r for r in read_jsonl(Path(output_dir) / "metrics.jsonl") if "loss" in r]


def run_script(
    script: str, argv: list[str], patch: str = "", check: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run a root script (train.py, evaluate.py, ...) in a fresh interpreter, as a user would; `patch` is Python
    run first (fault injection, for tests only)."""
    wrapper = (
        f"import runpy, sys\n{patch}\nsys.argv = [{script!r}, *{argv!r}]\nrunpy.run_path({script!r}, "
        "run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", wrapper], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


# Every loss is made NaN (and so every gradient): a `patch` for run_script, or a sitecustomize.py for a launch.
NAN_LOSS = """
import rmtorch.loss
original_loss = rmtorch.loss.pairwise_loss
rmtorch.loss.pairwise_loss = lambda *args, **kwargs: original_loss(*args, **kwargs) * float("nan")
"""


def tree(root: Path) -> dict[str, str]:
    """Every file under root with the sha256 of its bytes, and every directory: what a refused command or a failed
    save must leave as it was."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator()


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """train.main builds an Accelerator; accelerate keeps its state process-wide, so tests that train with
    different precisions in one pytest process start from a clean state."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def assert_real_png(path: Path) -> Path:
    """An image of the report size (800 x 500) whose pixels are drawn content, not a flat fill."""
    import numpy as np
    from PIL import Image

    from rmtorch.report import DPI, FIGSIZE

    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.var() > 0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    return path


# ------------------------------------------------------------------------------------------- several processes

CONFIGS = REPO_ROOT / "configs"
LAUNCH_TIMEOUT = 240
LAUNCH_STEPS = 8  # 12 pairs in 3 micro-batches of 4, 2 a step: 2 steps an epoch (the second uneven), 4 epochs
LAUNCH_EVAL_PAIRS = 7  # odd: the processes get different numbers of eval rows, and no row may count twice
LAUNCH_LORA = ("--lora", "--lora_r", "4")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(config: str, script: str = "train.py") -> list[str]:
    """The command that starts `script` under `configs/<config>` (2 processes) on a free port; options follow."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "--config_file", str(CONFIGS / config), "--main_process_port", str(free_port())] + [
        script
    ]


def launch(config: str, argv: list[str], check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run train.py under `config` in 2 CPU processes, one torch thread each (the machine is shared)."""
    return run_launch(accelerate_launch(config) + argv, config, output_dir_of(argv), check, env)


def launch_runs(config: str, runs: list[list[str]], runs_file: Path) -> subprocess.CompletedProcess:
    """Several train.py runs (argument lists) in one launch under `config`, one after the other in the same 2
    processes (tests/integration/launch_runs.py); the list is written to `runs_file`."""
    runs_file.write_text(json.dumps(runs))
    command = accelerate_launch(config, "tests/integration/launch_runs.py") + [str(runs_file)]
    return run_launch(command, config, output_dir_of(runs[-1]), True, {}, timeout=LAUNCH_TIMEOUT * len(runs))


def output_dir_of(argv: list[str]) -> Path:
    return Path(argv[argv.index("--output_dir") + 1])


def run_launch(command: list[str], config: str, last_output: Path, check: bool, env: dict, timeout=LAUNCH_TIMEOUT):
    """Run a launch command; unless check is False, its failure fails the test (see aborted_after_finishing)."""
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )
    if check and result.returncode != 0 and not aborted_after_finishing(last_output, result):
        raise AssertionError(f"{config} launch failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def aborted_after_finishing(output_dir: Path, result: subprocess.CompletedProcess) -> bool:
    """A rank aborted in C++ teardown ("terminate called without an active exception", seen rarely on this shared
    CPU machine, docs/scale_out.md) after the run (the last, if several) had written its final model and results:
    the test goes on to check those outputs, with a warning."""
    finished = (output_dir / "eval_results.json").exists()  # written last, after the model
    if finished and "terminate called without an active exception" in result.stderr:
        warnings.warn(f"a process aborted at exit after finishing {output_dir}; its outputs are checked", stacklevel=2)
        return True
    return False


def kill_at_checkpoint(command: list[str], kill_after: int, **env: str) -> int:
    """Start `command` (a train.py run), SIGKILL it and every process it started at once (as when the machine dies)
    once a checkpoint of step `kill_after` or later exists; return the step of the newest checkpoint left."""
    import psutil

    output_dir = output_dir_of(command)
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env}
    )
    try:
        deadline = time.time() + LAUNCH_TIMEOUT
        while latest_step(output_dir) < kill_after:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            for member in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
                member.send_signal(signal.SIGKILL)
        process.wait()
    assert not (output_dir / "model.safetensors").exists()
    return latest_step(output_dir)


def launch_and_kill(config: str, argv: list[str], kill_after: int) -> int:
    """kill_at_checkpoint for train.py launched under `config`."""
    return kill_at_checkpoint(accelerate_launch(config) + argv, kill_after, OMP_NUM_THREADS="1")


def latest_step(output_dir: Path) -> int:
    try:
        return int((output_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    except (FileNotFoundError, ValueError):
        return 0


@pytest.fixture(scope="session")
def launch_data(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(folder with train.jsonl and eval.jsonl, model directory): what every multi-process run trains on."""
    root = tmp_path_factory.mktemp("launch_data")
    write_jsonl(root / "train.jsonl", pair_rows(12, seed=0))
    write_jsonl(root / "eval.jsonl", pair_rows(LAUNCH_EVAL_PAIRS, seed=1))
    return root, tiny_model_dir


def launch_options(data: tuple[Path, Path], output_dir: Path, batch_size: int, *extra: str) -> list[str]:
    """train.py options of the multi-process tests (fp32): warm-up then linear decay, weight decay, 2 micro-batches
    a step, clipping at 1, evaluation every 4 steps in several forwards. 2 processes of batch_size 2 make the global
    batch of 1 process of batch_size 4. Options in `extra` override these."""
    root, model_dir = data
    return train_argv(
        model_dir, root / "train.jsonl", output_dir, "--max_steps", str(LAUNCH_STEPS), "--lr", "1e-3",
        "--weight_decay", "0.1", "--warmup_steps", "2", "--batch_size", str(batch_size), "--grad_accum", "2",
        "--max_grad_norm", "1.0", "--eval_every", "4", "--max_tokens_per_batch", "40", *extra,
        eval_file=root / "eval.jsonl",
    )  # fmt: skip


@pytest.fixture(scope="session")
def one_process(launch_data, tmp_path_factory):
    """one_process(*extra): the output directory of the 1-process run of launch_options(..., 4, *extra), what a
    2-process run must equal. Each distinct run is trained once a session, whichever test asks first."""
    runs: dict[tuple[str, ...], Path] = {}

    def reference(*extra: str) -> Path:
        if extra not in runs:
            output_dir = tmp_path_factory.mktemp("one_process") / "run"
            train_in_process(launch_options(launch_data, output_dir, 4, *extra))
            runs[extra] = output_dir
        return runs[extra]

    return reference


def assert_same_weights(dir_a: Path, dir_b: Path, atol: float = 1e-6, file: str = "model.safetensors") -> None:
    """The `file` (the model, or adapter_model.safetensors) of two runs holds the same tensors, within atol."""
    from safetensors.torch import load_file

    weights_a, weights_b = load_file(dir_a / file), load_file(dir_b / file)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(
            weights_b[name], weights_a[name], rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


RUN_LINE_KEYS = ("loss", "accuracy", "lr", "tokens", "grad_norm", "eval_loss", "eval_accuracy", "eval_mean_reward")


def assert_same_run(one: Path, two: Path, atol: float = 1e-5) -> None:
    """Two runs took the same steps: the same metrics lines (training steps and evaluations, written once, by the
    main process), with the same losses, learning rates, token counts and gradient norms (the total norm, however
    the engine computes it), and the same final evaluation of every held-out pair."""
    lines_one, lines_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [line["step"] for line in lines_two] == [line["step"] for line in lines_one]
    for line_one, line_two in zip(lines_one, lines_two):
        assert line_two.keys() == line_one.keys(), line_one["step"]
        for key in RUN_LINE_KEYS:
            if key in line_one:
                assert line_two[key] == pytest.approx(line_one[key], rel=1e-5, abs=atol), (line_one["step"], key)
        if "loss" not in line_one:  # an evaluation: every held-out pair once, however unevenly split over processes
            assert line_two["eval_num_pairs"] == line_one["eval_num_pairs"] == LAUNCH_EVAL_PAIRS
    results_one, results_two = (json.loads((d / "eval_results.json").read_text()) for d in (one, two))
    assert results_one["num_pairs"] == results_two["num_pairs"] == LAUNCH_EVAL_PAIRS
    for key in ("loss", "accuracy", "margin", "mean_reward"):
        assert results_two[key] == pytest.approx(results_one[key], abs=atol), key
