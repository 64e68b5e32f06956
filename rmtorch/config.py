"""Every command-line option, defined once: dataclasses with a default, a help string and an allowed range per field.

Option groups are shared by the commands that need them, with the same names and defaults everywhere:
ModelOptions (model, precision), LengthOptions / DataOptions (max_length, truncation, bad rows, margins),
BatchOptions (packing, tokens per forward). TrainConfig, EvalConfig, ScoreConfig and MergeConfig combine them.
Values come from defaults < a YAML file (`--config`) < the command line, and are checked on parse with messages
like `error: --max_grad_norm must be > 0 (or 0/none to turn clipping off), got -1`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_MODEL = "smollm2"  # the embedded SmolLM2-135M-Instruct (rmtorch.loading.resolve_model_path)


def option(default, help: str, *, check: str | None = None, choices: tuple | None = None, required: bool = False):
    """A config field. check: '>0', '>=0', '[0,1)', '(0,1)', '[0,1]' or 'none|>0' (None or 0 turns it off)."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices, "required": required})


CHECKS = {  # rule: (test, words for the message)
    ">0": (lambda v: v > 0, "> 0"),
    ">=0": (lambda v: v >= 0, ">= 0"),
    ">=2": (lambda v: v >= 2, "at least 2"),
    "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "(0,1)": (lambda v: 0 < v < 1, "in (0, 1)"),
    "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}


@dataclass
class Options:
    """Base of every command's options: checks each field's rule on construction, then `check()` across fields."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                if f.metadata.get("required"):
                    raise ValueError(f"--{f.name} is required: {f.metadata['help']}")
                continue
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                allowed = " or ".join(repr(c) for c in choices) if len(choices) <= 3 else ", ".join(map(repr, choices))
                raise ValueError(f"--{f.name} must be {allowed}, got {value!r}.")
            rule = f.metadata.get("check")
            if rule is None:
                continue
            test, words = CHECKS[rule]
            if not (math.isfinite(value) and test(value)):
                raise ValueError(
                    f"--{f.name} must be {'a positive number' if rule == '>0' else words}, got {value!r}."
                )
        self.check()

    def check(self) -> None:
        """Rules across fields; raise ValueError with the fix."""


@dataclass
class ModelOptions(Options):
    model: str = option(
        DEFAULT_MODEL,
        "Model: a local HF directory (a run's output_dir, a LoRA adapter directory), a .gguf file, or 'smollm2' for "
        "the embedded SmolLM2-135M-Instruct.",
    )
    trust_remote_code: bool = option(
        False, "Allow custom model code from the model directory (off: never run code from a checkpoint)."
    )
    bf16: bool = option(True, "bf16 autocast for the forward pass (loss and rewards stay fp32). Off: pure fp32.")
    cpu_threads: int | None = option(
        None,
        "Torch threads per process on CPU. None: the machine's cores split among this machine's processes "
        "(`accelerate launch` alone would give each process 1).",
        check=">0",
    )


@dataclass
class LengthOptions(Options):
    max_length: int | None = option(
        512, "Longest sequence in tokens (special and template tokens included); none: no limit.", check=">=2"
    )


@dataclass
class DataOptions(LengthOptions):
    truncation: str = option(
        "drop",
        "Pairs longer than max_length: 'drop' (TRL's rule, counted) or 'keep_end' (cut the prompt from the left; "
        "responses stay whole).",
        choices=("drop", "keep_end"),
    )
    on_bad_row: str = option(
        "error",
        "'error': stop at the first bad row with its location; 'skip': skip and count bad rows (malformed lines "
        "included).",
        choices=("error", "skip"),
    )
    margin_column: str | None = option(
        "margin",
        "Column holding a per-pair margin m in -logsigmoid(r_c - r_r - m); used when present (as TRL). none: ignore "
        "margins.",
    )
    category_column: str | None = option(
        "category",
        "Column whose values split evaluation accuracy in the report (ignored when the data has no such column).",
    )


@dataclass
class BatchOptions(Options):
    packing: bool = option(
        True,
        "Padding-free packed rows, rows that share a prompt (a pair, a GRPO group) laid out as [prompt, response, "
        "...] with the prompt computed once (block attention; equal to the padded path within ~1e-6 in fp32). "
        "false: TRL's padded batches, token for token.",
    )
    max_tokens_per_batch: int = option(16384, "Tokens per forward pass when evaluating and scoring.", check=">0")


@dataclass
class TrainConfig(BatchOptions, DataOptions, ModelOptions):
    # data
    train_file: str | None = option(
        None, "Training pairs: JSONL, JSON, Parquet or a saved `datasets` directory. None: the built-in dataset."
    )
    eval_file: str | None = option(None, "Held-out pairs (same formats). None: a held-out split of the training data.")
    eval_fraction: float = option(
        0.1, "Fraction of the training data held out when --eval_file is not given.", check="[0,1)"
    )
    builtin_size: int = option(1000, "Number of pairs generated for the built-in dataset.", check=">=2")
    # optimisation
    output_dir: str = option("outputs/reward_model", "Where checkpoints, metrics and the final model go.")
    batch_size: int = option(8, "Pairs per micro-batch per process.", check=">0")
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.", check=">0")
    lr: float = option(5e-5, "Peak learning rate (AdamW).", check=">0")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norms).", check=">=0")
    adam_beta1: float = option(0.9, "AdamW beta1.", check="[0,1)")
    adam_beta2: float = option(0.999, "AdamW beta2.", check="[0,1)")
    adam_eps: float = option(1e-8, "AdamW epsilon.", check=">0")
    max_grad_norm: float | None = option(1.0, "Clip the gradient norm to this value; 0 or none: no clipping.")
    epochs: float = option(1.0, "Passes over the training data (ignored when max_steps is set).", check=">0")
    max_steps: int | None = option(None, "Optimizer steps to run; overrides epochs.", check=">0")
    warmup_steps: int = option(0, "Linear warm-up steps.", check=">=0")
    warmup_ratio: float = option(
        0.05, "Warm-up as a fraction of all steps (used when warmup_steps is 0).", check="[0,1]"
    )
    scheduler: str = option(
        "linear", "Learning-rate schedule after warm-up.", choices=("linear", "cosine", "constant")
    )
    center_rewards_coefficient: float = option(
        0.0, "Weight c of the centering term c * mean((r_c + r_r)^2); 0.01 is the paper's value.", check=">=0"
    )
    length_penalty: float = option(
        0.0,
        "Weight C of the length penalty C * cov(r, len)^2 / var(len) over each micro-batch's responses (len: tokens "
        "of the response alone): the reward variance that length explains, which RL would exploit. 0: off.",
        check=">=0",
    )
    loss: str = option(
        "pairwise",
        "Training loss: 'pairwise' (Bradley-Terry on each pair, as TRL), 'all_pairs' (Bradley-Terry over every "
        "ordered pair of a group, mean per group) or 'listwise' (Plackett-Luce likelihood of a group's ranking). "
        "Group data (responses with ranks or scores) needs all_pairs or listwise; on pairs all three give the same "
        "loss.",
        choices=("pairwise", "all_pairs", "listwise"),
    )
    group_margin: float = option(
        0.0,
        "Groups: margin m_ij = group_margin * (s_i - s_j) from the labels' score difference (ranks count as negated "
        "scores) in the all_pairs and listwise losses. 0: no margin.",
        check=">=0",
    )
    tie_nu: float | None = option(
        None,
        "Train on ties with Davidson's model, tie weight nu (fixed): P(tie) = nu sqrt(e^ri e^rj) / (e^ri + e^rj + nu "
        "sqrt(e^ri e^rj)). Ties are pairs with tie: true and equal labels in a group. none: no tie model (tied pairs "
        "are refused, equal labels in a group form no pair).",
        check=">0",
    )
    objective: str = option(
        "pairwise",
        "What is trained: 'pairwise' (a reward per response, from preference pairs or groups) or 'steps' (a process "
        "reward model: a reward per reasoning step, from rows with prompt, completions (the steps) and labels (one "
        "per step), read at each step's separator; TRL's former PRMTrainer's data and loss) or 'regression' (a "
        "rating model: one output per --attributes column, from rows with prompt, response and those ratings; MSE).",
        choices=("pairwise", "steps", "regression"),
    )
    attributes: str | None = option(
        None,
        "--objective regression: comma-separated rating columns, one model output each, e.g. "
        "'helpfulness,correctness,coherence,complexity,verbosity' (HelpSteer). Saved as the model's id2label.",
    )
    attribute_weights: str | None = option(
        None, "--objective regression: comma-separated loss weights (>= 0), one per attribute. none: equal weights."
    )
    reward_weights: str | None = option(
        None,
        "--objective regression: comma-separated weights, one per attribute, whose weighted sum of the predicted "
        "attributes is the reward the scorer returns (saved in the model's config). none: 1/K each.",
    )
    normalize_targets: bool = option(
        False,
        "--objective regression: the head learns each attribute standardized by the training set's mean and std "
        "(saved in the config; rmtorch turns predictions back into the data's units, vLLM's /classify does not).",
    )
    step_separator: str = option(
        "\n",
        "--objective steps: the text after each step (its last token carries the step's label and reward); a "
        "completion given as one string is split at it. TRL's default '\\n'; in a shell, $'\\n\\n' for a blank line.",
    )
    train_on_last_step_only: bool = option(
        False, "--objective steps: the loss reads only each row's last step (evaluation still reads every step)."
    )
    seed: int = option(42, "Seed for the score head, data order and dropout.")
    shuffle: bool = option(True, "Shuffle training pairs each epoch (False: file order, as TRL's sequential sampler).")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward (non-reentrant) to save memory.")
    compile: bool = option(
        False,
        "torch.compile (dynamic shapes) the norms and MLPs of every decoder layer, fusing their elementwise work. "
        "A one-time compile of tens of seconds for a few percent a step on CPU: worth it for long runs (numbers in "
        "docs/benchmarks.md).",
    )
    group_by_length: bool = option(
        False,
        "Batch pairs of similar length (sorted within windows of 50 batches, batches shuffled) to cut padding. "
        "Changes which pairs share a batch.",
    )
    # LoRA and QLoRA
    lora: bool = option(
        False,
        "Train LoRA adapters on a frozen body; the score head is always fully trained in fp32. output_dir then "
        "holds the adapter.",
    )
    lora_r: int = option(16, "LoRA rank r.", check=">0")
    lora_alpha: int = option(16, "LoRA alpha; the update is scaled by alpha / r.", check=">0")
    lora_dropout: float = option(
        0.0, "Dropout on the LoRA input (the only dropout left on: the model's own is disabled).", check="[0,1)"
    )
    lora_target: str = option(
        "all-linear",
        "Layers that get adapters: 'all-linear' (every attention and MLP projection, not the head) or "
        "comma-separated names, e.g. 'q_proj,v_proj'.",
    )
    load_in_4bit: bool = option(
        False,
        "QLoRA: load the body in 4-bit nf4 with double quantization (bitsandbytes); compute in bf16 when --bf16, "
        "else fp32. Needs --lora.",
    )
    merge_lora: bool = option(
        False, "With --lora: also write a merged plain model to output_dir/merged (same as merge_lora.py afterwards)."
    )
    # logging and checkpoints
    log_every: int = option(10, "Print metrics every N optimizer steps (metrics.jsonl gets every step).", check=">0")
    eval_every: int | None = option(None, "Evaluate every N optimizer steps (none: only at the end).", check=">0")
    save_every: int | None = option(
        None, "Save a resumable checkpoint every N optimizer steps (none: only at the end).", check=">0"
    )
    resume_from: str | None = option(
        None, "Checkpoint directory to resume from, or 'latest' for output_dir/checkpoints/latest."
    )
    report_to: str | None = option(
        "none",
        "Also log metrics through Accelerate's trackers: none, or comma-separated names (tensorboard, wandb "
        "(offline), mlflow, aim, comet_ml, clearml, dvclive, swanlab, trackio).",
    )

    def attribute_names(self) -> list[str]:
        return [name.strip() for name in (self.attributes or "").split(",") if name.strip()]

    def weights(self, name: str) -> list[float]:
        """--attribute_weights or --reward_weights as numbers, one per attribute (their defaults when none)."""
        return attribute_values(getattr(self, name), self.attribute_names(), name)

    def check_ratings(self) -> None:
        """The --objective regression options, together."""
        if self.objective != "regression":
            given = [f"--{n}" for n in ("attributes", "attribute_weights", "reward_weights") if getattr(self, n)]
            if given or self.normalize_targets:
                raise ValueError(f"{', '.join(given) or '--normalize_targets'} apply to rating models: add "
                                 "--objective regression.")  # fmt: skip
            return
        names = attribute_list(self.attributes)
        if self.loss != "pairwise" or self.tie_nu is not None or self.length_penalty:
            raise ValueError(
                "--objective regression trains one loss (MSE): leave --loss pairwise, --tie_nu none and "
                "--length_penalty 0."
            )
        for option_name in ("attribute_weights", "reward_weights"):
            attribute_values(getattr(self, option_name), names, option_name)

    def check(self) -> None:
        if self.eval_file is None and self.eval_fraction == 0:
            raise ValueError(
                "--eval_fraction 0 leaves nothing to evaluate on: give it a value in (0, 1), or pass --eval_file."
            )
        if self.max_grad_norm is not None and (not math.isfinite(self.max_grad_norm) or self.max_grad_norm < 0):
            raise ValueError(
                f"--max_grad_norm must be > 0 (or 0/none to turn clipping off), got {self.max_grad_norm!r}."
            )
        if self.load_in_4bit and not self.lora:
            raise ValueError(
                "load_in_4bit needs lora: 4-bit weights cannot be fully fine-tuned. Add --lora to train adapters on "
                "the 4-bit body (QLoRA)."
            )
        if self.tie_nu is not None and self.loss == "listwise":
            raise ValueError(
                "--tie_nu needs --loss pairwise or all_pairs: listwise (Plackett-Luce) has no tie outcome and skips "
                "comparisons between tied responses."
            )
        if self.group_margin and self.loss == "pairwise":
            raise ValueError(
                "--group_margin applies to groups: add --loss all_pairs or listwise (pairs use --margin_column)."
            )
        if self.objective == "steps" and (self.loss != "pairwise" or self.tie_nu is not None or self.length_penalty):
            raise ValueError(
                "--objective steps trains one loss on step labels: leave --loss pairwise, --tie_nu none and "
                "--length_penalty 0."
            )
        self.check_ratings()
        if not self.step_separator:
            raise ValueError("--step_separator is empty: give the text that ends each step, e.g. '\\n'.")
        if self.merge_lora and not self.lora:
            raise ValueError("merge_lora needs lora: without --lora, output_dir already holds a plain model.")
        if not self.lora_target.strip(" ,"):
            raise ValueError(
                "lora_target is empty: use 'all-linear' or comma-separated layer names such as 'q_proj,v_proj'."
            )
        trackers = tracker_names(self.report_to)
        unknown = sorted(set(trackers) - set(known_trackers()))
        if unknown:
            raise ValueError(
                f"--report_to: unknown tracker(s) {unknown}; Accelerate supports {', '.join(known_trackers())} (or "
                "none)."
            )


def attribute_list(attributes: str | None) -> list[str]:
    """--attributes as names (a rating model's columns, in the order of its outputs): at least one, distinct."""
    names = [name.strip() for name in (attributes or "").split(",") if name.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(
            "--objective regression needs --attributes: the rating columns, comma-separated and distinct, e.g. "
            f"'helpfulness,correctness'; got {attributes!r}."
        )
    return names


def attribute_values(text: str | None, names: list[str], option_name: str) -> list[float]:
    """--attribute_weights (loss weights: >= 0, not all 0; none: 1 each) or --reward_weights (none: 1/K each) as
    numbers, one per attribute."""
    if text is None:
        return [1.0] * len(names) if option_name == "attribute_weights" else [1.0 / len(names)] * len(names)
    try:
        values = [float(value) for value in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) != len(names) or not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"--{option_name} must be {len(names)} comma-separated numbers, one per attribute ({', '.join(names)}), "
            f"got {text!r}."
        )
    if option_name == "attribute_weights" and (any(v < 0 for v in values) or not sum(values)):
        raise ValueError(f"--attribute_weights must be >= 0 and not all 0, got {text!r}.")
    return values


@dataclass
class ScoringOptions(Options):
    """Precision and length of scoring, one rule for RewardScorer.from_pretrained, score.py, evaluate.py and
    rmtorch.serve (`scoring_defaults`): a train.py run's own config.yaml decides; any other model gets these."""

    bf16: bool = option(
        False,
        "bf16 autocast for the forward pass (rewards stay fp32). Default: what the model's run trained with "
        "(MODEL/config.yaml), else false (fp32).",
    )
    max_length: int | None = option(
        None,
        "Longest sequence in tokens (special and template tokens included). Default: the model's run's "
        "(MODEL/config.yaml), else none: the model's own limit (max_position_embeddings).",
        check=">=2",
    )


@dataclass
class EngineOptions(Options):
    engine: str = option(
        "torch",
        "What computes the rewards: 'torch' (rmtorch's forward, one process on a CPU or one GPU, each reward equal to "
        "its row scored alone) or 'vllm' (vLLM's pooling engine on the model directory: several GPUs, its CUDA "
        "kernels; needs vLLM installed, a plain or merged model, and --device unset). Formatting is the same.",
        choices=("torch", "vllm"),
    )
    tensor_parallel_size: int = option(
        1,
        "With --engine vllm: GPUs the model is split over (vLLM's tensor parallelism). The torch engine: 1.",
        check=">0",
    )
    vllm_options: dict | None = option(
        None,
        "With --engine vllm: more of vllm.LLM's keyword options, as a mapping (JSON or YAML), e.g. "
        '\'{"gpu_memory_utilization": 0.5, "max_model_len": 4096}\' (or "enforce_eager": true, which starts faster '
        "and serves slower).",
    )

    def engine_options(self) -> dict:
        """RewardScorer's engine_options for these options; a setting the torch engine has no use for is refused."""
        if self.engine == "torch":
            for name, unset in (("tensor_parallel_size", 1), ("vllm_options", None)):
                if getattr(self, name) != unset:
                    raise ValueError(
                        f"--{name} {getattr(self, name)} needs --engine vllm (the torch engine runs on one device): "
                        f"add --engine vllm, or leave --{name} out."
                    )
            return {}
        options = {"tensor_parallel_size": self.tensor_parallel_size} if self.tensor_parallel_size != 1 else {}
        return {**options, **(self.vllm_options or {})}


@dataclass
class EvalConfig(ScoringOptions, BatchOptions, DataOptions, ModelOptions):
    model: str | None = option(
        None,
        "The reward model to evaluate: a run's output_dir, a LoRA adapter directory, or 'smollm2'.",
        required=True,
    )
    data: str | None = option(
        None,
        "Pairs to evaluate: JSONL, JSON, Parquet or a saved datasets directory (also the LLaMA-Factory and LLMBar "
        "layouts).",
        required=True,
    )
    report: str | None = option(None, "Directory for metrics.json, scores.jsonl and the PNG plots (none: print only).")
    n_bins: int = option(10, "Calibration bins on [0, 1].", check=">0")
    length_buckets: int = option(4, "Quantile buckets of pair length.", check=">0")
    benchmark: str | None = option(
        None,
        "Score --data as a local copy of a benchmark instead of the pair report: 'rewardbench' (v1: prompt, "
        "chosen, rejected, subset, id) or 'rewardbench2' (v2: chosen and rejected lists, num_correct). --report "
        "gets BENCHMARK.json, BENCHMARK_scores.jsonl and BENCHMARK.png; --packing true computes each prompt once.",
        choices=("rewardbench", "rewardbench2"),
    )


@dataclass
class ScoreConfig(EngineOptions, ScoringOptions, BatchOptions, LengthOptions, ModelOptions):
    model: str | None = option(
        None,
        "Trained reward model directory (train.py's output_dir, a LoRA adapter directory), a .gguf file, or "
        "'smollm2'.",
        required=True,
    )
    input: str | None = option(
        None, "Rows to score: .jsonl, .json, .parquet or a saved datasets directory.", required=True
    )
    output: str | None = option(None, "JSONL file to write: each input row plus its reward field(s).", required=True)
    part: str = option(
        "full",
        "What to score: the full completion, the answer after </think>, or the thinking.",
        choices=("full", "answer", "thinking"),
    )
    rows_per_chunk: int = option(1024, "Rows handed to the scorer (and written) per progress step.", check=">0")
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (none: cuda when available).")


@dataclass
class MergeConfig(Options):
    model: str | None = option(None, "LoRA adapter directory (output_dir of `train.py --lora`).", required=True)
    output_dir: str | None = option(None, "Where the merged model goes (none: MODEL/merged).")
    merge_into: str = option(
        "trained",
        "'trained': the base as trained (4-bit dequantized), scores like the adapter; 'original': the base's "
        "full-precision weights.",
        choices=("trained", "original"),
    )
    trust_remote_code: bool = option(False, "Allow custom model code from the base model directory.")


# ------------------------------------------------------------------------------------------- trackers


def known_trackers() -> list[str]:
    from accelerate.utils import LoggerType

    return sorted(t.value for t in LoggerType if t.value != "all")


def tracker_names(report_to: str | None) -> list[str]:
    if report_to is None or report_to.strip().lower() in ("", "none"):
        return []
    return [name.strip() for name in report_to.split(",") if name.strip()]


# ---------------------------------------------------------------------------------------------- parsing


def _parse_value(text: str, default):
    """Parse a CLI string with YAML rules, so `--max_steps none`, `--lr 2e-5`, `--bf16 false` all work."""
    if text.strip().lower() in ("none", "null", "~"):
        return None
    if isinstance(default, str) and not text.strip():  # whitespace is a value (a step separator), not YAML's null
        return text
    return yaml.safe_load(text)


def _check_type(name: str, value, field_type: str, source: str):
    if value is None:
        if "None" not in field_type:
            raise ValueError(f"{source}: {name} cannot be empty (none).")
        return value
    if field_type.startswith("bool"):
        if not isinstance(value, bool):
            raise ValueError(f"{source}: {name} must be true or false, got {value!r}.")
    elif field_type.startswith("int"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 1e3 from YAML
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{source}: {name} must be an integer, got {value!r}.")
    elif field_type.startswith("float"):
        if isinstance(value, str):  # YAML 1.1 reads "2e-5" (no dot) and "nan" as strings
            try:
                value = float(value)
            except ValueError:
                pass  # not a number: named below
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: {name} must be a number, got {value!r}.")
        value = float(value)
    elif field_type.startswith("str"):
        value = str(value)
    elif field_type.startswith("dict") and not isinstance(value, dict):
        raise ValueError(f"{source}: {name} must be a mapping such as '{{\"name\": value}}', got {value!r}.")
    return value


def build_parser(cls: type[Options], description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "--config", default=None, help="YAML file of option: value pairs; command-line options override it."
    )
    for f in dataclasses.fields(cls):
        # A bool option given alone means true (`--lora`); `--bf16 false` still works.
        bare = {"nargs": "?", "const": "true"} if f.type.startswith("bool") else {}
        parser.add_argument(f"--{f.name}", default=f.default, help=f.metadata["help"] + f" [{f.type}]", **bare)
    return parser


def parse_config(
    argv: list[str] | None = None, cls: type[Options] = TrainConfig, base: dict | None = None, description: str = ""
):
    """Defaults < `base` (e.g. a trained run's config) < YAML file (--config) < command-line options.

    Unknown options and keys, wrong types and values out of range raise SystemExit("error: ...").
    """
    parser = build_parser(cls, description or (cls.__doc__ or ""))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        valid = ", ".join(f"--{f.name}" for f in dataclasses.fields(cls))
        raise SystemExit(f"error: unknown option(s) {' '.join(unknown)}. Valid options: --config, {valid}")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {k: v for k, v in (base or {}).items() if k in types}
    try:
        if args.config is not None:
            path = Path(args.config)
            if not path.is_file():
                raise ValueError(f"config file {path} does not exist.")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"config file {path} must hold a mapping of option: value pairs.")
            bad = sorted(set(loaded) - set(types))
            if bad:
                raise ValueError(f"config file {path}: unknown key(s) {bad}. Valid keys: {sorted(types)}.")
            for name, value in loaded.items():
                values[name] = _check_type(name, value, types[name], f"config file {path}")
        for f in dataclasses.fields(cls):
            cli_value = getattr(args, f.name)
            if cli_value is not f.default:  # given on the command line, as a string
                values[f.name] = _check_type(f.name, _parse_value(cli_value, f.default), types[f.name], f"--{f.name}")
        return cls(**values)
    except ValueError as err:  # wrong types and values: a message, not a traceback
        raise SystemExit(f"error: {err}") from None


def to_yaml(cfg: Options) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


# What evaluation and scoring take from the run that trained a model (its config.yaml), unless given.
TRAINED_DEFAULTS = (
    "max_length",
    "truncation",
    "margin_column",
    "category_column",
    "packing",
    "max_tokens_per_batch",
    "bf16",
)


def run_config(model: str | None) -> dict:
    """The options a train.py run wrote (MODEL/config.yaml); empty for anything that is not a run directory."""
    path = Path(model) / "config.yaml" if model else None
    if path is None or not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def run_text_options(model: str | None, names: tuple[str, ...]) -> dict:
    """Those of the text options `names` a train.py run recorded (MODEL/config.yaml) and set; empty for anything that
    is not a run directory."""
    loaded = run_config(model)
    return {k: loaded[k] for k in names if isinstance(loaded.get(k), str) and loaded[k]}


def trained_defaults(model: str | None, cls: type[Options] = ScoringOptions) -> dict:
    """The options a train.py run used (MODEL/config.yaml) that `cls` shares, so a model is evaluated and scored
    the way it was trained. Empty for anything that is not a run directory."""
    loaded, names = run_config(model), {f.name for f in dataclasses.fields(cls)}
    return {k: loaded[k] for k in TRAINED_DEFAULTS if k in loaded and k in names}


def scoring_defaults(model: str | None) -> dict:
    """The one rule for how a model is scored when the caller says nothing: {"bf16", "max_length"} from the model's
    run (MODEL/config.yaml), else ScoringOptions' defaults (fp32, the model's own limit). The library
    (RewardScorer.from_pretrained) and every command (score.py, evaluate.py, rmtorch.serve) use it."""
    defaults = {f.name: f.default for f in dataclasses.fields(ScoringOptions)}
    return {**defaults, **trained_defaults(model, ScoringOptions)}


def scoring_source(model: str | None) -> str:
    """Where `scoring_defaults` took its values from, for reports: the run's config.yaml or the defaults."""
    return str(Path(model) / "config.yaml") if trained_defaults(model, ScoringOptions) else "defaults"


# ---------------------------------------------------------------------------------------------- serving


@dataclass
class ServeConfig(EngineOptions, ScoringOptions, BatchOptions, LengthOptions, ModelOptions):
    host: str = option(
        "127.0.0.1",
        "Address to bind. 127.0.0.1 serves this machine only; binding another address without --api_key logs a "
        "warning.",
    )
    port: int = option(8000, "TCP port (0: a free port, printed at start).", check=">=0")
    max_wait_ms: float = option(
        2.0,
        "How long the model worker waits, after the oldest waiting request arrived, for more requests to fill a "
        "forward of --max_tokens_per_batch tokens.",
        check=">=0",
    )
    max_queue_tokens: int = option(
        262144, "Tokens allowed to wait for the model; a request beyond gets 503 with Retry-After.", check=">0"
    )
    on_long_row: str = option(
        "keep_last",
        "Rows longer than --max_length: 'keep_last' scores their last max_length tokens (the scorer's rule; flagged "
        "as truncated), 'refuse' answers 400.",
        choices=("keep_last", "refuse"),
    )
    chat_bos: str = option(
        "restore",
        "Texts for /classify and /get_reward that are a rendering of the model's chat template missing its leading "
        "BOS text (verl strips it before posting): 'restore' puts the BOS back, so they get the ids training used; "
        "'as_sent' scores them as sent.",
        choices=("restore", "as_sent"),
    )
    normalize: str | None = option(
        None,
        "reward_stats.json written by RewardNormalizer.save: rewards are returned normalized with those statistics "
        "(never updated); /score details keep the raw rewards.",
    )
    api_key: str | None = option(
        None,
        "Key every endpoint but /health requires as 'Authorization: Bearer KEY' (vLLM's --api-key). Also read from "
        "RMTORCH_SERVE_API_KEY, which keeps it out of the process list.",
    )
    max_body_mb: float = option(32.0, "Largest request body in MB (10^6 bytes); a larger one gets 413.", check=">0")
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (none: cuda when available). One server per GPU.")

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}.")
