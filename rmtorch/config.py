"""One config dataclass for training, with YAML files and command-line overrides (CLI wins)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_MODEL = "smollm2"  # the embedded SmolLM2-135M-Instruct (see rmtorch.modeling.resolve_model_path)


@dataclass
class TrainConfig:
    # model
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Base model: a local HF directory, or 'smollm2' for the embedded SmolLM2-135M-Instruct."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the model directory (off: never run code from a checkpoint)."})
    # data
    train_file: str | None = field(default=None, metadata={"help": "Training pairs: JSONL, JSON, Parquet or a saved `datasets` directory. None: the built-in dataset."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out pairs (same formats). None: a held-out split of the training data."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Fraction of the training data held out when --eval_file is not given."})
    builtin_size: int = field(default=1000, metadata={"help": "Number of pairs generated for the built-in dataset."})
    max_length: int | None = field(default=512, metadata={"help": "Longest sequence (tokens, special and template tokens included); None: no limit."})
    truncation: str = field(default="drop", metadata={"help": "Pairs longer than max_length: 'drop' (TRL's rule, counted) or 'keep_end' (cut the prompt from the left)."})
    on_bad_row: str = field(default="error", metadata={"help": "'error': stop at the first bad row with its location; 'skip': skip and count bad rows."})
    margin_column: str | None = field(default=None, metadata={"help": "Column holding a per-pair margin m in -logsigmoid(r_c - r_r - m)."})
    # optimisation
    output_dir: str = field(default="outputs/reward_model", metadata={"help": "Where checkpoints, metrics and the final model go."})
    batch_size: int = field(default=8, metadata={"help": "Pairs per micro-batch per process."})
    eval_batch_size: int = field(default=16, metadata={"help": "Pairs per evaluation batch per process."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches accumulated per optimizer step."})
    lr: float = field(default=5e-5, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not applied to biases and norms)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Clip the gradient norm to this value; None: no clipping."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training data (ignored when max_steps is set)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps to run; overrides epochs."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Warm-up as a fraction of all steps (used when warmup_steps is 0)."})
    scheduler: str = field(default="linear", metadata={"help": "Learning-rate schedule after warm-up: linear, cosine or constant."})
    center_rewards_coefficient: float = field(default=0.0, metadata={"help": "Weight c of the centering term c * mean((r_c + r_r)^2); 0.01 is the paper's value."})
    seed: int = field(default=42, metadata={"help": "Seed for the score head, data order and dropout."})
    shuffle: bool = field(default=True, metadata={"help": "Shuffle training pairs each epoch (False: file order, as TRL's sequential sampler)."})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast for the forward pass (loss stays fp32). Off: pure fp32."})
    cpu_threads: int | None = field(default=None, metadata={"help": "Torch threads per process on CPU. None: the machine's cores split among this machine's processes (`accelerate launch` alone would give each process 1)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward (non-reentrant) to save memory."})
    group_by_length: bool = field(default=False, metadata={"help": "Batch pairs of similar length (sorted within windows of 50 batches, batches shuffled) to cut padding. Changes which pairs share a batch."})
    packing: bool = field(default=False, metadata={"help": "Padding-free batches: each batch's sequences back to back in one row with restarting positions (block attention); rewards equal the padded path to ~1e-6 in fp32."})
    shared_prompt: bool = field(default=False, metadata={"help": "Packed rows as [prompt, chosen, rejected]: the shared prompt is computed once (implies --packing; equal to the unshared path to ~1e-6 in fp32). Logged tokens then count the prompt once."})
    # LoRA and QLoRA
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on a frozen body; the score head is always fully trained in fp32. output_dir then holds the adapter (loads with peft or rmtorch.modeling.load_reward_model)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input (the only dropout left on: the model's own is disabled)."})
    lora_target: str = field(default="all-linear", metadata={"help": "Layers that get adapters: 'all-linear' (every attention and MLP projection, not the head) or comma-separated names, e.g. 'q_proj,v_proj'."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the body in 4-bit nf4 with double quantization (bitsandbytes); compute in bf16 when --bf16, else fp32. Needs --lora."})
    merge_lora: bool = field(default=False, metadata={"help": "With --lora: also write a merged plain model to output_dir/merged (loads with AutoModelForSequenceClassification, no peft). Same as `python -m rmtorch.export --adapter OUTPUT_DIR --merge`."})
    # logging and checkpoints
    log_every: int = field(default=10, metadata={"help": "Print and record metrics every N optimizer steps."})
    eval_every: int | None = field(default=None, metadata={"help": "Evaluate every N optimizer steps (None: only at the end)."})
    save_every: int | None = field(default=None, metadata={"help": "Save a resumable checkpoint every N optimizer steps (None: only at the end)."})
    resume_from: str | None = field(default=None, metadata={"help": "Checkpoint directory to resume from, or 'latest' for output_dir/checkpoints/latest."})
    report_to: str | None = field(default="none", metadata={"help": "Also log metrics to a tracker via Accelerate: 'none' (metrics.jsonl only) or 'tensorboard' (output_dir/tensorboard)."})
    category_column: str | None = field(default="category", metadata={"help": "Eval-data column whose values split accuracy in output_dir/report (ignored when the data has no such column)."})

    def __post_init__(self):
        if self.truncation not in ("drop", "keep_end"):
            raise ValueError(f"truncation must be 'drop' or 'keep_end', got {self.truncation!r}.")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}.")
        if self.scheduler not in ("linear", "cosine", "constant"):
            raise ValueError(f"scheduler must be linear, cosine or constant, got {self.scheduler!r}.")
        for name in ("lr", "batch_size", "eval_batch_size", "grad_accum"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}.")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {self.max_length}.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.load_in_4bit and not self.lora:
            raise ValueError("load_in_4bit needs lora: 4-bit weights cannot be fully fine-tuned. Add --lora to train adapters on the 4-bit body (QLoRA).")
        if self.merge_lora and not self.lora:
            raise ValueError("merge_lora needs lora: without --lora, output_dir already holds a plain model.")
        if self.lora:
            if not (isinstance(self.lora_r, int) and self.lora_r > 0 and self.lora_alpha > 0):
                raise ValueError(f"lora_r and lora_alpha must be positive, got lora_r={self.lora_r!r}, lora_alpha={self.lora_alpha!r}.")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
            if not self.lora_target.strip(" ,"):
                raise ValueError("lora_target is empty: use 'all-linear' or comma-separated layer names such as 'q_proj,v_proj'.")
        if self.report_to not in (None, "none", "tensorboard"):
            raise ValueError(f"report_to must be 'none' or 'tensorboard', got {self.report_to!r}.")


def _parse_value(text: str, default):
    """Parse a CLI string with YAML rules, so `--max_steps none`, `--lr 2e-5`, `--bf16 false` all work."""
    if text.strip().lower() in ("none", "null", "~"):
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str) and isinstance(default, float):
        try:
            value = float(value)  # YAML 1.1 reads "2e-5" as a string
        except ValueError:
            pass  # not a number: _check_type names the option
    return value


def _check_type(name: str, value, field_type: str, source: str):
    if value is None:
        if "None" not in field_type:
            raise ValueError(f"{source}: {name} cannot be empty (none).")
        return value
    if field_type.startswith("bool"):
        if not isinstance(value, bool):
            raise ValueError(f"{source}: {name} must be true or false, got {value!r}.")
    elif field_type.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{source}: {name} must be an integer, got {value!r}.")
    elif field_type.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: {name} must be a number, got {value!r}.")
        value = float(value)
    elif field_type.startswith("str"):
        value = str(value)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a reward model (pairwise loss) with a hand-written Accelerate loop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file of option: value pairs; CLI options override it.")
    for f in dataclasses.fields(TrainConfig):
        # A bool option given alone means true (`--lora`); `--bf16 false` still works.
        bare = {"nargs": "?", "const": "true"} if f.type.startswith("bool") else {}
        parser.add_argument(f"--{f.name}", default=f.default, help=f.metadata["help"] + f" [{f.type}]", **bare)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < YAML file (--config) < command-line options. Unknown keys are errors."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        valid = ", ".join(f"--{f.name}" for f in dataclasses.fields(TrainConfig))
        raise SystemExit(f"error: unknown option(s) {' '.join(unknown)}. Valid options: --config, {valid}")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    values: dict = {}
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"error: config file {path} does not exist.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"error: config file {path} must hold a mapping of option: value pairs.")
        bad = sorted(set(loaded) - set(types))
        if bad:
            raise SystemExit(f"error: config file {path}: unknown key(s) {bad}. Valid keys: {sorted(types)}.")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    try:
        for name, value in (loaded.items() if args.config is not None else ()):
            values[name] = _check_type(name, value, types[name], f"config file {path}")
        for name, default in defaults.items():
            cli_value = getattr(args, name)
            if cli_value is not default:  # given on the command line, as a string
                values[name] = _check_type(name, _parse_value(cli_value, default), types[name], f"--{name}")
        return TrainConfig(**values)
    except ValueError as err:  # wrong types and values: a message, not a traceback
        raise SystemExit(f"error: {err}") from None
