"""Merge a LoRA adapter trained by rmtorch into a plain reward model.

    python merge_lora.py --model outputs/reward_model                        # → outputs/reward_model/merged
    python merge_lora.py --model outputs/reward_model --output_dir plain_rm

The merged directory is a plain fp32 safetensors model that AutoModelForSequenceClassification loads without
peft, scoring like the adapter model. A QLoRA adapter is merged into the dequantized nf4 base it was trained
against (`--merge_into original`: the base's own full-precision weights instead).
"""

from __future__ import annotations

import sys
from pathlib import Path

from rmtorch.cli import run
from rmtorch.config import MergeConfig, parse_config
from rmtorch.lora import merge_adapter


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_config(
        argv, MergeConfig, description="Merge a LoRA adapter trained by rmtorch into a plain reward model."
    )
    output_dir = merge_adapter(
        cfg.model, cfg.output_dir, merge_into=cfg.merge_into, trust_remote_code=cfg.trust_remote_code
    )
    print(f"merged model written to {output_dir} (loads with AutoModelForSequenceClassification, no peft needed)")
    return output_dir


if __name__ == "__main__":
    run(main, sys.argv[1:])
