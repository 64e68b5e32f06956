"""No pickle: weights only from safetensors, torch files only with weights_only=True, no custom model code unless
the user passes trust_remote_code. Each test plants a payload that would leave a marker file if it ever ran."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from rmtorch.checkpoint import load_checkpoint, save_checkpoint
from rmtorch.config import TrainConfig, parse_config
from rmtorch.loading import load_reward_model
from tests.conftest import REPO_ROOT


class Payload:
    """Unpickling this opens (creates) the marker file: proof that a pickle was loaded with code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_checkpoint_is_refused_with_a_clear_message(tmp_path, tiny_model_dir):
    marker = tmp_path / "payload_ran"
    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(
        ValueError,
        match=r"has weights only in pickle format \(pytorch_model\.bin\)\. rmtorch loads safetensors only, because "
        r"unpickling can run arbitrary code\. Convert once in a trusted environment",
    ):
        load_reward_model(str(model_dir))
    assert not marker.exists()


def test_a_pickle_next_to_safetensors_is_never_read(tmp_path, tiny_model_dir):
    marker = tmp_path / "payload_ran"
    model_dir = tmp_path / "both"
    shutil.copytree(tiny_model_dir, model_dir)
    torch.save({"model.embed_tokens.weight": Payload(marker)}, model_dir / "pytorch_model.bin")
    model, _ = load_reward_model(str(model_dir))
    assert not marker.exists() and model.config.num_labels == 1


def test_trust_remote_code_is_off_unless_passed(tmp_path, tiny_model_dir):
    assert TrainConfig().trust_remote_code is False and parse_config([]).trust_remote_code is False
    marker = tmp_path / "remote_code_ran"
    model_dir = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "modeling_custom.py").write_text(
        f"open({str(marker)!r}, 'w')\nfrom transformers import LlamaForSequenceClassification as CustomModel\n"
    )
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.CustomModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    model, _ = load_reward_model(str(model_dir))
    assert type(model).__name__ == "LlamaForSequenceClassification" and not marker.exists()


def test_checkpoints_hold_no_file_that_is_unpickled_with_code(tmp_path, accelerator):
    """train.py's setup: model, optimizer and scheduler through prepare(); nothing registered as a custom (pickled)
    object."""
    from accelerate.utils import load

    from rmtorch.config import TrainConfig
    from train import build_scheduler

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = build_scheduler(TrainConfig(warmup_steps=1), optimizer, 4)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    path = save_checkpoint(accelerator, tmp_path, {"step": 1})
    names = sorted(p.name for p in path.iterdir())
    assert not [
        name for name in names if name.startswith("custom_checkpoint")
    ]  # Accelerate reads these with weights_only=False
    assert "model.safetensors" in names and "scheduler.bin" in names
    for name in names:
        if name.endswith((".bin", ".pkl")):
            load(path / name)  # Accelerate's loader, weights_only=True


def test_resume_refuses_a_planted_pickle(tmp_path, accelerator):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    path = save_checkpoint(accelerator, tmp_path, {"step": 1})
    marker = tmp_path / "payload_ran"
    torch.save({"state": Payload(marker)}, path / "optimizer.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(accelerator, path)
    assert not marker.exists()


def python_sources() -> list[Path]:
    return sorted((REPO_ROOT / "rmtorch").glob("*.py")) + sorted(REPO_ROOT.glob("*.py"))


def test_rmtorch_calls_torch_load_only_with_weights_only_and_never_pickle():
    for path in python_sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "cPickle", "dill", "joblib"} & set(modules), (
                    f"{path}:{node.lineno} imports a pickle module"
                )
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and getattr(node.func.value, "id", None) == "torch"
            ):
                flags = {k.arg: k.value for k in node.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, (
                    f"{path}:{node.lineno}: torch.load without weights_only=True"
                )
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "register_for_checkpointing":
                raise AssertionError(
                    f"{path}:{node.lineno}: register_for_checkpointing saves a pickle that Accelerate loads with "
                    "weights_only=False"
                )
            if (
                isinstance(node, ast.keyword)
                and node.arg == "trust_remote_code"
                and isinstance(node.value, ast.Constant)
                and node.value.value is True
            ):
                raise AssertionError(f"{path}:{node.lineno}: trust_remote_code=True hard-coded")
