"""rmtorch.lora: LoRA and QLoRA (bitsandbytes nf4 on CPU) adapters, gradient checkpointing, merging, on tiny random
Llama models."""

from __future__ import annotations

import sys

import pytest
import torch

from rmtorch.loading import load_reward_model, quantization_config_4bit
from rmtorch.lora import apply_lora, merge_adapter, save_adapter
from rmtorch.loss import pairwise_loss
from rmtorch.model import RewardModel, enable_gradient_checkpointing
from tests.conftest import TEXTS, batch_of


def load(model_dir, quantized: bool, dtype=torch.float32):
    quantization_config = quantization_config_4bit(compute_dtype=torch.float32) if quantized else None
    return load_reward_model(str(model_dir), dtype=dtype, quantization_config=quantization_config)


def test_unknown_target_module_lists_the_linear_layers(tiny_model_dir):
    model, _ = load(tiny_model_dir, quantized=False)
    with pytest.raises(
        ValueError,
        match=r"qkv_proj.*Its Linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    ):
        apply_lora(model, target="q_proj,qkv_proj")
    with pytest.raises(ValueError, match="the head 'score' is trained in full"):
        apply_lora(model, target="score")


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match=r"needs bitsandbytes: pip install"):
        quantization_config_4bit()


@pytest.mark.parametrize("target", ["all-linear", "q_proj,v_proj"])
def test_trainable_parameters_are_the_adapters_and_the_head_like_peft_seq_cls(tiny_model_dir, target):
    from peft import LoraConfig, get_peft_model

    ours = apply_lora(load(tiny_model_dir, quantized=False)[0], r=4, alpha=8, target=target)
    targets = "all-linear" if target == "all-linear" else target.split(",")
    reference = get_peft_model(
        load(tiny_model_dir, quantized=False)[0],
        LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets),
    )
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(reference)
    assert "base_model.model.score.modules_to_save.default.weight" in trainable(ours)


def test_score_head_is_trainable_and_fp32_under_4bit_with_a_bf16_body(tiny_model_dir):
    model, _ = load(tiny_model_dir, quantized=True, dtype=torch.bfloat16)
    model = apply_lora(model, target="all-linear")
    head = model.base_model.model.score.modules_to_save["default"]
    assert head.weight.requires_grad and head.weight.dtype == torch.float32
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(
        p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n
    )  # upcast by prepare_model_for_kbit_training
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


def loss_and_grads(model, tokenizer) -> tuple[float, dict]:
    """Pairwise loss of TEXTS[:2] over TEXTS[2:] and the gradient of every trainable parameter."""
    reward_model = RewardModel(model).train()
    batch = batch_of(tokenizer, TEXTS)
    rewards = reward_model(batch["input_ids"], batch["attention_mask"])
    loss = pairwise_loss(*rewards.chunk(2), None, 0.0)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def build(tiny_model_dir, mode: str, checkpointing: bool):
    model, tokenizer = load(tiny_model_dir, quantized=mode == "qlora")
    if checkpointing:
        enable_gradient_checkpointing(model)
    if mode != "full":
        torch.manual_seed(0)
        model = apply_lora(model, r=4, alpha=8)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # nonzero B: gradients then reach lora_A and the body's inputs
                torch.nn.init.normal_(param, std=0.5)
    return model, tokenizer


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_gradients_with_checkpointing_equal_gradients_without(tiny_model_dir, mode):
    plain_loss, plain_grads = loss_and_grads(*build(tiny_model_dir, mode, checkpointing=False))
    model, tokenizer = build(tiny_model_dir, mode, checkpointing=True)
    assert (model.get_base_model() if mode != "full" else model).is_activation_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads(model, tokenizer)
    assert ckpt_loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 1
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(ckpt_grads[name], grad, atol=1e-6, rtol=0), name


def test_an_evaluation_does_not_change_4bit_gradients(tiny_model_dir):
    """bitsandbytes repacks 4-bit weights at an eval-mode no-grad CPU forward; backward would then be wrong."""
    model, tokenizer = build(tiny_model_dir, "qlora", checkpointing=False)
    _, before = loss_and_grads(model, tokenizer)
    model.zero_grad()
    with torch.no_grad():
        RewardModel(model).eval()(**batch_of(tokenizer, TEXTS))
    _, after = loss_and_grads(model, tokenizer)
    for name, grad in before.items():
        assert torch.allclose(after[name], grad, atol=1e-6, rtol=0), name


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_merged_export_scores_like_the_adapter(tmp_path, tiny_model_dir, mode):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = build(tiny_model_dir, mode, checkpointing=False)
    torch.nn.init.normal_(model.base_model.model.score.modules_to_save["default"].weight)  # a "trained" head
    adapter_dir = tmp_path / "adapter"
    save_adapter(
        model, adapter_dir, base_model=str(tiny_model_dir), compute_dtype=torch.float32 if mode == "qlora" else None
    )
    tokenizer.save_pretrained(adapter_dir)
    merged_dir = merge_adapter(adapter_dir)

    assert merged_dir == adapter_dir / "merged" and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()  # a plain model: no peft involved
    assert type(merged).__name__ == "LlamaForSequenceClassification"
    assert not any("lora" in name for name in merged.state_dict())
    batch = batch_of(tokenizer, TEXTS)
    with torch.no_grad():
        adapter_rewards = RewardModel(model).eval()(**batch)
        reloaded_rewards = RewardModel(load_reward_model(str(adapter_dir))[0]).eval()(**batch)
        merged_rewards = RewardModel(merged)(**batch)
    assert torch.allclose(merged_rewards, adapter_rewards, atol=1e-5, rtol=0)
    assert torch.allclose(reloaded_rewards, adapter_rewards, atol=1e-5, rtol=0)
