"""Write trained LoRA adapters, and merge them into a plain model.

    python -m rmtorch.export --adapter outputs/reward_model --merge                 # → outputs/reward_model/merged
    python -m rmtorch.export --adapter outputs/reward_model --merge --output plain_rm

An adapter directory (what `train.py --lora` writes) holds adapter_config.json + adapter_model.safetensors (LoRA
weights and the trained score head), the tokenizer, and rmtorch_adapter.json (whether the base was 4-bit). It loads
with peft or with rmtorch.modeling.load_reward_model. The merged directory is a plain safetensors model that
AutoModelForSequenceClassification loads without peft.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rmtorch.modeling import ADAPTER_INFO_FILE, load_adapter_model


def save_adapter(model, output_dir: str | Path, *, base_model: str, compute_dtype: torch.dtype | None = None,
                 is_main_process: bool = True) -> Path:
    """Save a PeftModel's adapters and score head (safetensors) and how its base was loaded; the caller saves the
    tokenizer next to them.

    `base_model` is recorded as given ('smollm2', a directory) so the adapter finds its base again;
    `compute_dtype` is the 4-bit compute dtype, None for a base that was not quantized.
    """
    output_dir = Path(output_dir)
    if Path(base_model).exists():
        base_model = str(Path(base_model).resolve())  # a relative path would break when loading from elsewhere
    model.peft_config[model.active_adapter].base_model_name_or_path = base_model
    model.save_pretrained(output_dir, safe_serialization=True, is_main_process=is_main_process)
    if is_main_process:
        info = {"load_in_4bit": compute_dtype is not None, "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch.") if compute_dtype else None}
        (output_dir / ADAPTER_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return output_dir


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path | None = None, *, merge_into: str = "trained",
                  trust_remote_code: bool = False) -> Path:
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
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json: not a LoRA adapter directory (train with --lora).")
    output_dir = Path(output_dir) if output_dir is not None else adapter_dir / "merged"
    base_weights = "dequantized" if merge_into == "trained" else "original"
    model, tokenizer = load_adapter_model(adapter_dir, trust_remote_code=trust_remote_code, base_weights=base_weights)
    merged = model.merge_and_unload()
    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Merge a LoRA adapter trained by rmtorch into a plain reward model.")
    parser.add_argument("--adapter", required=True, help="Adapter directory (output_dir of `train.py --lora`).")
    parser.add_argument("--merge", action="store_true", help="Merge the adapter and score head into the base and write a plain model.")
    parser.add_argument("--output", default=None, help="Where the merged model goes (default: ADAPTER/merged).")
    parser.add_argument("--merge_into", choices=("trained", "original"), default="trained",
                        help="'trained': the base as trained (4-bit dequantized), scores like the adapter; 'original': the base's full-precision weights.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow custom model code from the base model directory.")
    args = parser.parse_args(argv)
    if not args.merge:
        parser.error("nothing to do: pass --merge to write a merged model (the adapter directory itself already loads with peft).")
    try:
        output_dir = merge_adapter(args.adapter, args.output, merge_into=args.merge_into, trust_remote_code=args.trust_remote_code)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"merged model written to {output_dir} (loads with AutoModelForSequenceClassification, no peft needed)")
    return output_dir


if __name__ == "__main__":
    main(sys.argv[1:])
