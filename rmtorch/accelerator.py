"""The Accelerator of a launch: one process, DDP, FSDP or DeepSpeed, on GPUs or on CPU processes (gloo).

Accelerate 1.15 needs help on a machine without a GPU: it connects CPU processes only with cpu=True (a config
file's use_cpu does not reach FSDP or multi-GPU launches, so each process would run alone), DeepSpeed only with the
gloo backend named (cpu=True would turn DeepSpeed off), and it turns FSDP on for accelerators only, though FSDP2
shards on CPU too. Training and evaluation build their Accelerator here.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs


def launch_accelerator(
    *, mixed_precision: str, grad_accum: int = 1, batch_size: int = 1, max_grad_norm: float | None = None, **kwargs
) -> Accelerator:
    """An Accelerator for whatever `accelerate launch` started. Under DeepSpeed the engine batches, accumulates and
    clips itself: the given batch size, accumulation and clipping are written into its config, so the command
    line's numbers win there too. Other keyword arguments go to Accelerator."""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    on_cpu = not torch.accelerator.is_available()
    accelerator = Accelerator(
        gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision, cpu=on_cpu and not deepspeed,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if on_cpu and deepspeed else None, **kwargs,
    )  # fmt: skip
    if deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise SystemExit("error: ACCELERATE_USE_CPU=1 turns DeepSpeed off; launch the DeepSpeed config without it.")
    if deepspeed:
        accelerator.gradient_accumulation_steps = grad_accum
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=grad_accum,
            gradient_clipping=max_grad_norm or 0.0,
        )  # fmt: skip
    # FSDP on CPU processes. An Accelerator built after AcceleratorState._reset_state() (a process training twice)
    # finds the type already FSDP, from the process-wide state this sets, but no plugin.
    sharded = accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP)
    no_plugin = getattr(accelerator.state, "fsdp_plugin", None) is None
    if sharded and os.environ.get("ACCELERATE_USE_FSDP") == "true" and no_plugin:
        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as Accelerate does
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin, accelerator.state.distributed_type = plugin, DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what barriers and gathers read
    return accelerator


def engine_name(accelerator: Accelerator) -> str:
    """What runs the processes, for the run's first line: DDP, FSDP2, DeepSpeed ZeRO-N, or one process."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    return "one process" if kind == DistributedType.NO else "DDP"
