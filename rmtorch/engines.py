"""Engines: what turns formatted token-id rows into rewards under a `RewardScorer` (and so under the server).

Both give `score(sequences, prompt_lengths) -> (N,) fp32 rewards` in input order; everything above them (training's
formatting, truncation, the thinking split, the server's endpoints, normalization) is the scorer's and the same.

- `TorchEngine` (`engine="torch"`, the default): rmtorch's own forward, `rmtorch.model.compute_rewards`, in this
  process on a CPU or one GPU. Rows sharing a prompt compute it once (packing), and every reward equals the row
  scored alone, whatever else the batch holds.
- `VllmEngine` (`engine="vllm"`): vLLM's offline pooling engine (`LLM(runner="pooling")`) on the model directory,
  for several GPUs (tensor parallelism is vLLM's: `tensor_parallel_size=`) and vLLM's CUDA kernels. It needs vLLM
  installed (`pip install 'rmtorch[vllm]'`; on a CPU, its own environment: tests/vllm/setup_venv.sh). vLLM batches
  and caches prefixes itself: prompt_lengths are not needed, and rewards may move with the batch by float rounding.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rmtorch.model import compute_rewards, lock_of

ENGINES = ("torch", "vllm")


@dataclass
class TorchEngine:
    """`compute_rewards` on `reward_model` (a `rmtorch.model.RewardModel`) with these batching options."""

    reward_model: nn.Module
    pad_token_id: int
    packing: bool = True
    max_tokens_per_batch: int = 16384
    padding_side: str = "right"
    autocast_dtype: torch.dtype | None = None
    name: str = field(default="torch", init=False)

    def score(self, sequences: list[list[int]], prompt_lengths: list[int] | None = None) -> torch.Tensor:
        with lock_of(self.reward_model.model):  # the forward switches the model's attention and mode: one at a time
            return compute_rewards(
                self.reward_model, sequences, prompt_lengths, pad_token_id=self.pad_token_id, packing=self.packing,
                max_tokens_per_batch=self.max_tokens_per_batch, padding_side=self.padding_side,
                autocast_dtype=self.autocast_dtype,
            )  # fmt: skip


def check_vllm_model(path: str | Path) -> None:
    """ValueError unless `path` is a directory vLLM's pooling runner serves as rmtorch scores it: a plain
    sequence-classification model (train.py's output, merge_lora.py's), not a LoRA adapter or a base LM."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        raise ValueError(
            f"{path} is a LoRA adapter, which vLLM's pooling runner cannot serve. Merge it first: python "
            f"merge_lora.py --model {path} (it writes {path}/merged), then pass the merged directory with engine vllm."
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"engine vllm loads a model directory with config.json; {path} has none. Pass a train.py output_dir (or "
            "merge_lora.py's output), or use the torch engine for .gguf files and 'smollm2'."
        )
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ValueError(
            f"{path} holds {architectures or 'no architectures'}, not a reward model (a *ForSequenceClassification "
            "with its trained score head); vLLM would score with a head it makes up. Pass a train.py output_dir, or "
            "use the torch engine."
        )


class VllmEngine:
    """vLLM's offline pooling engine on the model directory `path` (see the module docstring).

    dtype: vLLM's weight and compute dtype ("float32", "bfloat16"); rmtorch's rule gives bfloat16 for a run that
    trained in bf16, else float32. llm_options go to `vllm.LLM` (tensor_parallel_size, gpu_memory_utilization,
    max_model_len, ...). A program that builds one needs an `if __name__ == "__main__":` guard: vLLM starts its
    engine in a new process.
    """

    name = "vllm"

    def __init__(self, path: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False, **llm_options):
        check_vllm_model(path)
        try:
            from vllm import LLM, PoolingParams
            from vllm.inputs import TokensPrompt
        except ImportError as err:
            raise ImportError(
                f"engine vllm needs vLLM, which does not import here ({err}). Install it with pip install "
                "'rmtorch[vllm]' (on a CPU: in its own environment, tests/vllm/setup_venv.sh), or use the torch "
                "engine."
            ) from None
        self.dtype = dtype
        self._prompt = TokensPrompt
        self._params = PoolingParams(use_activation=False)  # the raw reward; vLLM's default applies a sigmoid
        self._lock = threading.Lock()  # the offline LLM serves one caller at a time
        self.llm = LLM(
            model=str(path), runner="pooling", dtype=dtype, enable_prefix_caching=True,
            trust_remote_code=trust_remote_code, **llm_options,
        )  # fmt: skip

    def score(self, sequences: list[list[int]], prompt_lengths: list[int] | None = None) -> torch.Tensor:
        """(N,) fp32 raw rewards; prompt_lengths are not needed (vLLM's prefix cache finds shared prefixes)."""
        prompts = [self._prompt(prompt_token_ids=list(ids)) for ids in sequences]
        with self._lock:
            outputs = self.llm.classify(prompts, pooling_params=self._params, use_tqdm=False)
        return torch.tensor([output.outputs.probs[-1] for output in outputs], dtype=torch.float32)
