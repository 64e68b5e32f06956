"""LoRA against TRL 1.16's RewardTrainer with the same LoraConfig: two training steps give the same adapter and
head."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import pair_rows, train_argv, train_in_process, write_jsonl

pytest.importorskip("trl")


def test_two_lora_steps_match_reward_trainer(tmp_path, tiny_model_dir, bos_tokenizer):
    """Same adapter init (set_seed(42) before get_peft_model), same data order, same trained LoRA and head weights."""
    import datasets
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import load_file
    from trl import RewardConfig, RewardTrainer

    train_file = write_jsonl(tmp_path / "train.jsonl", pair_rows(16))
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    trl_args = RewardConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        train_sampling_strategy="sequential",
        logging_steps=1,
        gradient_checkpointing=False,
        seed=42,
    )
    trainer = RewardTrainer(
        model=str(tiny_model_dir),
        args=trl_args,
        train_dataset=datasets.load_dataset("json", data_files=str(train_file), split="train"),
        processing_class=copy.deepcopy(bos_tokenizer),
        peft_config=LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=targets),
    )
    trainer.train()
    theirs = get_peft_model_state_dict(trainer.model)

    out = tmp_path / "ours"
    train_in_process(
        train_argv(
            tiny_model_dir,
            train_file,
            out,
            "--packing",
            "false",  # TRL's padded batches, token for token
            "--lora",
            "true",
            "--lora_r",
            "8",
            "--lora_alpha",
            "16",
            "--lora_target",
            ",".join(targets),
            "--shuffle",
            "false",
            "--max_steps",
            "2",
            "--lr",
            "1e-3",
            "--batch_size",
            "2",
            "--seed",
            "42",
            "--max_grad_norm",
            "1.0",
            "--warmup_steps",
            "0",
            "--warmup_ratio",
            "0",
        )
    )
    ours = load_file(out / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and any("score" in k for k in ours)
    assert all(ours[k].abs().sum() > 0 for k in ours if "lora_B" in k)  # trained away from B = 0
    for name, tensor in ours.items():
        assert torch.allclose(tensor, theirs[name], atol=1e-6, rtol=0), name
