"""LoRA and QLoRA: adapters on a frozen (optionally 4-bit nf4) body, saving adapter directories, and merging.

An adapter directory (what `train.py --lora` writes) holds adapter_config.json + adapter_model.safetensors (LoRA
weights and the trained score head), the tokenizer, and rmtorch_adapter.json (whether the base was 4-bit). It
loads with peft or with `rmtorch.loading.load_reward_model`. `merge_adapter` writes a plain safetensors model that
AutoModelForSequenceClassification loads without peft.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from rmtorch.loading import ADAPTER_INFO_FILE, RATING_HEAD_KEYS, adapter_base, load_reward_model
from rmtorch.model import score_head
from rmtorch.outputs import check_output_dir, write_marker


def linear_layer_names(model: nn.Module) -> list[str]:
    """Full names of the Linear layers (4-bit ones included) below the score head: what LoRA can adapt."""
    head = score_head(model)
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head]


def apply_lora(model: nn.Module, *, r: int = 16, alpha: int = 16, dropout: float = 0.0, target: str = "all-linear"):
    """Freeze the body, add LoRA adapters (peft, task_type SEQ_CLS) and return the PeftModel.

    `target` is 'all-linear' (every projection below the head) or comma-separated layer names ('q_proj,v_proj').
    The score head is always trained in full, saved with the adapter (modules_to_save) and kept in fp32: TRL freezes
    it without task_type SEQ_CLS and casts it to bf16 under 4-bit. A 4-bit model first goes through peft's
    prepare_model_for_kbit_training (norms upcast to fp32); checkpointing is enable_gradient_checkpointing's job.
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
                f"lora_target {', '.join(unknown)}: {type(model).__name__} has no Linear layer of that name below the "
                f"score head (the head '{head_name}' is trained in full, never adapted). Its Linear layers are: "
                f"{', '.join(short_names)}. Use 'all-linear' or a comma-separated subset of those names."
            )
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        task_type="SEQ_CLS", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
        modules_to_save=[head_name],
    )  # fmt: skip
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # adapters and the head's trainable copy: fp32 whatever the body's dtype
    return peft_model


def save_adapter(
    model,
    output_dir: str | Path,
    *,
    base_model: str,
    compute_dtype: torch.dtype | None = None,
    is_main_process: bool = True,
    state_dict: dict | None = None,
) -> Path:
    """Save a PeftModel's adapters and score head (safetensors) and how its base was loaded; the caller saves the
    tokenizer next to them.

    `base_model` is recorded as given ('smollm2', a directory) so the adapter finds its base again;
    `compute_dtype` is the 4-bit compute dtype, None for a base that was not quantized; `state_dict` the model's
    full weights when they are sharded (FSDP: gathered by the caller), else the model's own are read.
    """
    output_dir = Path(output_dir)
    if Path(base_model).exists():
        base_model = str(Path(base_model).resolve())  # a relative path would break when loading from elsewhere
    model.peft_config[model.active_adapter].base_model_name_or_path = base_model
    model.save_pretrained(output_dir, safe_serialization=True, is_main_process=is_main_process, state_dict=state_dict)
    if is_main_process:
        info = {
            "load_in_4bit": compute_dtype is not None,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch.") if compute_dtype else None,
        }
        config = model.get_base_model().config
        if getattr(config, "rmtorch_reward_weights", None) is not None:  # a rating model: what names its outputs
            info["head"] = {key: getattr(config, key) for key in RATING_HEAD_KEYS if hasattr(config, key)}
        (output_dir / ADAPTER_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return output_dir


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    merge_into: str = "trained",
    trust_remote_code: bool = False,
) -> Path:
    """Merge an adapter into its base and write a plain fp32 model (safetensors + tokenizer); return its directory.

    merge_into='trained' (default) merges into the base as it was trained: a 4-bit base is dequantized first, so the
    merged model scores like the adapter model. 'original' merges into the base's full-precision weights instead
    (for QLoRA this drops the nf4 rounding the adapter was trained against, so scores move slightly).
    output_dir defaults to ADAPTER_DIR/merged.
    """
    if merge_into not in ("trained", "original"):
        raise ValueError(f"merge_into must be 'trained' or 'original', got {merge_into!r}.")
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        if not adapter_dir.exists():
            what = "does not exist"
        elif not adapter_dir.is_dir():
            what = "is a file, not an adapter directory"
        elif (adapter_dir / "config.json").exists():
            what = "holds a full model, not a LoRA adapter (no adapter_config.json): it needs no merge, load it as is"
        else:
            what = "is not a LoRA adapter directory (no adapter_config.json)"
        raise FileNotFoundError(
            f"{adapter_dir} {what}. Merging expects the output directory of `train.py --lora`, which holds "
            "adapter_config.json and adapter_model.safetensors."
        )
    output_dir = Path(output_dir) if output_dir is not None else adapter_dir / "merged"
    base = adapter_base(adapter_dir)
    if Path(base).exists() and Path(base).resolve() == output_dir.resolve():
        raise ValueError(
            f"--output_dir {output_dir} is the base model the adapter was trained on: merging there would overwrite "
            "it "
            "and the adapter would then load on top of merged weights (LoRA applied twice). Choose a new directory."
        )
    check_output_dir(output_dir, "merge", "--output_dir", inputs=[adapter_dir, base])
    base_weights = "dequantized" if merge_into == "trained" else "original"
    model, tokenizer = load_reward_model(adapter_dir, trust_remote_code=trust_remote_code, base_weights=base_weights)
    merged = model.merge_and_unload()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:  # written whole, then moved into place: a failure leaves no half model
        merged.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        write_marker(tmp_dir, "merge", adapter=str(adapter_dir.resolve()), base=base, merge_into=merge_into)
        if output_dir.exists():  # an earlier merge (check_output_dir allowed it)
            shutil.rmtree(output_dir)
        os.replace(tmp_dir, output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return output_dir
