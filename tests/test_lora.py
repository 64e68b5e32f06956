"""LoRA, QLoRA (bitsandbytes nf4 on CPU) and gradient checkpointing, on tiny random Llama models."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from rmtorch.config import TrainConfig, parse_config
from rmtorch.export import merge_adapter, save_adapter
from rmtorch.loss import pairwise_loss
from rmtorch.modeling import RewardModel, apply_lora, enable_gradient_checkpointing, load_reward_model, quantization_config_4bit
from tests.conftest import save_tiny_llama

WORDS = "what color is the sky blue green red yes no good bad".split()


def pair_rows(count: int, seed: int = 0) -> list[dict]:
    """Pairs built from the bos tokenizer's vocabulary; chosen always ends in 'good', rejected in 'bad' (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    pick = lambda n: " ".join(WORDS[j] for j in torch.randint(len(WORDS), (n,), generator=gen).tolist())  # noqa: E731
    return [{"prompt": pick(3 + i % 4), "chosen": f" {pick(1 + i % 2)} good", "rejected": f" {pick(1 + i % 3)} bad"} for i in range(count)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def batch_of(tokenizer, texts: list[str]) -> dict:
    """(N, T) right-padded ids and mask for a few texts."""
    return tokenizer(texts, padding=True, return_tensors="pt")


TEXTS = ["what color is the sky ? blue </s>", "how many are 2 + 2 ? 4 </s>", "hello world </s>", "yes"]


def load(model_dir, quantized: bool, dtype=torch.float32):
    quantization_config = quantization_config_4bit(compute_dtype=torch.float32) if quantized else None
    return load_reward_model(str(model_dir), dtype=dtype, quantization_config=quantization_config)


@pytest.fixture
def tiny_dir(tmp_path, bos_tokenizer):
    return save_tiny_llama(tmp_path / "base", bos_tokenizer)


# ---- config and errors -------------------------------------------------------------------------------------------

def test_bare_bool_flags_mean_true_and_explicit_values_still_work():
    cfg = parse_config(["--lora", "--lora_r", "8", "--load_in_4bit", "--bf16", "false", "--gradient_checkpointing"])
    assert (cfg.lora, cfg.lora_r, cfg.load_in_4bit, cfg.bf16, cfg.gradient_checkpointing) == (True, 8, True, False, True)
    assert parse_config(["--lora", "true", "--shuffle", "false"]).shuffle is False


@pytest.mark.parametrize("argv, message", [
    (["--load_in_4bit"], "load_in_4bit needs lora"),
    (["--merge_lora"], "merge_lora needs lora"),
    (["--lora", "--lora_r", "0"], "lora_r and lora_alpha must be positive"),
])
def test_bad_lora_options_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        parse_config(argv)
    with pytest.raises(ValueError, match="lora_target is empty"):
        TrainConfig(lora=True, lora_target=" , ")


def test_unknown_target_module_lists_the_linear_layers(tiny_dir):
    model, _ = load(tiny_dir, quantized=False)
    with pytest.raises(ValueError, match=r"qkv_proj.*Its Linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        apply_lora(model, target="q_proj,qkv_proj")
    with pytest.raises(ValueError, match="the head 'score' is trained in full"):
        apply_lora(model, target="score")


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match=r"needs bitsandbytes: pip install"):
        quantization_config_4bit()


# ---- what trains, in which dtype -----------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["all-linear", "q_proj,v_proj"])
def test_trainable_parameters_are_the_adapters_and_the_head_like_peft_seq_cls(tiny_dir, target):  # E12 (names)
    from peft import LoraConfig, get_peft_model

    ours = apply_lora(load(tiny_dir, quantized=False)[0], r=4, alpha=8, target=target)
    targets = "all-linear" if target == "all-linear" else target.split(",")
    reference = get_peft_model(load(tiny_dir, quantized=False)[0], LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets))
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(reference)
    assert "base_model.model.score.modules_to_save.default.weight" in trainable(ours)


def test_score_head_is_trainable_and_fp32_under_4bit_with_a_bf16_body(tiny_dir):  # better than TRL (spec P11, P12)
    model, _ = load(tiny_dir, quantized=True, dtype=torch.bfloat16)
    model = apply_lora(model, target="all-linear")
    head = model.base_model.model.score.modules_to_save["default"]
    assert head.weight.requires_grad and head.weight.dtype == torch.float32
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)  # upcast by prepare_model_for_kbit_training
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


# ---- gradient checkpointing ------------------------------------------------------------------------------------------

def loss_and_grads(model, tokenizer) -> tuple[float, dict]:
    """Pairwise loss of TEXTS[:2] over TEXTS[2:] and the gradient of every trainable parameter."""
    reward_model = RewardModel(model).train()
    batch = batch_of(tokenizer, TEXTS)
    rewards = reward_model(batch["input_ids"], batch["attention_mask"])
    loss = pairwise_loss(*rewards.chunk(2), None, 0.0)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def build(tiny_dir, mode: str, checkpointing: bool):
    model, tokenizer = load(tiny_dir, quantized=mode == "qlora")
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
def test_gradients_with_checkpointing_equal_gradients_without(tiny_dir, mode):
    plain_loss, plain_grads = loss_and_grads(*build(tiny_dir, mode, checkpointing=False))
    model, tokenizer = build(tiny_dir, mode, checkpointing=True)
    assert (model.get_base_model() if mode != "full" else model).is_activation_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads(model, tokenizer)
    assert ckpt_loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 1
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(ckpt_grads[name], grad, atol=1e-6, rtol=0), name


def test_an_evaluation_does_not_change_4bit_gradients(tiny_dir):
    """bitsandbytes repacks 4-bit weights at an eval-mode no-grad CPU forward; backward would then be wrong."""
    model, tokenizer = build(tiny_dir, "qlora", checkpointing=False)
    _, before = loss_and_grads(model, tokenizer)
    model.zero_grad()
    with torch.no_grad():
        RewardModel(model).eval()(**batch_of(tokenizer, TEXTS))
    _, after = loss_and_grads(model, tokenizer)
    for name, grad in before.items():
        assert torch.allclose(after[name], grad, atol=1e-6, rtol=0), name


# ---- export ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_merged_export_scores_like_the_adapter(tmp_path, tiny_dir, mode):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = build(tiny_dir, mode, checkpointing=False)
    torch.nn.init.normal_(model.base_model.model.score.modules_to_save["default"].weight)  # a "trained" head
    adapter_dir = tmp_path / "adapter"
    save_adapter(model, adapter_dir, base_model=str(tiny_dir), compute_dtype=torch.float32 if mode == "qlora" else None)
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


def test_export_cli_needs_merge_and_an_adapter(tmp_path, tiny_dir):
    from rmtorch import export

    with pytest.raises(SystemExit):
        export.main(["--adapter", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a LoRA adapter directory"):
        export.main(["--adapter", str(tiny_dir), "--merge"])


# ---- the training loop -----------------------------------------------------------------------------------------------

def run_train(tmp_path, model_dir, *extra: str) -> tuple:
    import train

    tmp_path.mkdir(exist_ok=True)
    train_file = write_jsonl(tmp_path / "train.jsonl", pair_rows(16))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", pair_rows(4, seed=1))
    out = tmp_path / "out"
    train.main([
        "--model", str(model_dir), "--train_file", str(train_file), "--eval_file", str(eval_file), "--output_dir", str(out),
        "--batch_size", "4", "--log_every", "1", "--warmup_steps", "0", "--warmup_ratio", "0", *extra,
    ])
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line and "eval_" not in line]
    return out, losses


def test_lora_run_writes_an_adapter_that_peft_loads_and_a_merged_model(tmp_path, tiny_dir, bos_tokenizer):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification

    out, _ = run_train(tmp_path, tiny_dir, "--lora", "--lora_r", "4", "--merge_lora", "--max_steps", "2", "--lr", "1e-2", "--bf16", "false")
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    with_peft = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    batch = batch_of(bos_tokenizer, TEXTS)
    with torch.no_grad():
        assert torch.allclose(RewardModel(with_peft)(**batch), RewardModel(merged)(**batch), atol=1e-5, rtol=0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(RewardModel(base)(**batch), RewardModel(merged)(**batch), atol=1e-3)  # it trained


def test_qlora_with_checkpointing_trains_on_cpu(tmp_path, tiny_dir):
    """bf16 compute (the default), an evaluation half way; two epochs over 4 batches: the second has the lower loss."""
    out, losses = run_train(tmp_path, tiny_dir, "--lora", "--load_in_4bit", "--gradient_checkpointing", "--max_steps", "8", "--lr", "5e-3", "--eval_every", "4")
    assert json.loads((out / "rmtorch_adapter.json").read_text()) == {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16"}
    assert sum(losses[4:]) < 0.5 * sum(losses[:4]), losses


def test_qlora_resumes_to_the_same_adapter(tmp_path, tiny_dir):
    """Checkpoints hold only adapters and head; resuming reloads the 4-bit base and continues exactly."""
    from safetensors.torch import load_file

    qlora = ("--lora", "--load_in_4bit", "--bf16", "false", "--max_steps", "4", "--lr", "5e-3")
    straight, _ = run_train(tmp_path / "a", tiny_dir, *qlora, "--save_every", "2")
    checkpoint = straight / "checkpoints" / "step-000002"
    assert not any("base_layer" in name for name in load_file(checkpoint / "model.safetensors"))
    resumed, _ = run_train(tmp_path / "b", tiny_dir, *qlora, "--resume_from", str(checkpoint))
    ours, theirs = load_file(resumed / "adapter_model.safetensors"), load_file(straight / "adapter_model.safetensors")
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


# ---- TRL parity ------------------------------------------------------------------------------------------------------

def test_two_lora_steps_match_reward_trainer(tmp_path, tiny_dir, bos_tokenizer):  # E12
    """Same adapter init (set_seed(42) before get_peft_model), same data order, same trained LoRA and head weights."""
    pytest.importorskip("trl")
    import datasets
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import load_file
    from trl import RewardConfig, RewardTrainer

    train_file = write_jsonl(tmp_path / "trl_train.jsonl", pair_rows(16))  # the rows run_train trains on
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    trl_args = RewardConfig(
        output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, save_strategy="no", max_steps=2,
        per_device_train_batch_size=2, learning_rate=1e-3, train_sampling_strategy="sequential", logging_steps=1,
        gradient_checkpointing=False, seed=42,
    )
    trainer = RewardTrainer(
        model=str(tiny_dir), args=trl_args, train_dataset=datasets.load_dataset("json", data_files=str(train_file), split="train"),
        processing_class=copy.deepcopy(bos_tokenizer), peft_config=LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=targets),
    )
    trainer.train()
    theirs = get_peft_model_state_dict(trainer.model)

    out, _ = run_train(
        tmp_path, tiny_dir, "--lora", "true", "--lora_r", "8", "--lora_alpha", "16", "--lora_target", ",".join(targets), "--bf16", "false",
        "--shuffle", "false", "--max_steps", "2", "--lr", "1e-3", "--batch_size", "2", "--seed", "42", "--max_grad_norm", "1.0",
    )
    ours = load_file(out / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and any("score" in k for k in ours)
    assert all(ours[k].abs().sum() > 0 for k in ours if "lora_B" in k)  # trained away from B = 0
    for name, tensor in ours.items():
        assert torch.allclose(tensor, theirs[name], atol=1e-6, rtol=0), name
