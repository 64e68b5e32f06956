"""rmtorch against TRL 1.16's GRPOTrainer: group advantages equal the advantages a real GRPO step logs, the scorer's
rewards equal TRL's own reward-model scoring where TRL uses the training format, and the scorer runs as a reward
function in a real GRPO step."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rmtorch.formatting import tokenize_response
from rmtorch.normalize import group_advantages
from rmtorch.score import RewardScorer
from tests.conftest import PROMPTS, ROWS, make_bos_tokenizer, reward_alone, save_tiny_llama, tiny_llama

pytest.importorskip("trl")

# Fixed rewards per reward function, by position in the generation batch; None is a missing reward.
REWARD_CASES = {
    "single": dict(group_size=2, rewards=[[3, 1, 10, 4]], weights=None),
    "single_none": dict(group_size=2, rewards=[[3, None, 10, 4]], weights=None),
    "group_of_three": dict(group_size=3, rewards=[[3, None, 1, 10, 4, None]], weights=None),
}


def as_rewards_per_func(case: dict) -> torch.Tensor:
    """(N, K) float32 with NaN for None, as `_calculate_rewards` builds it."""
    columns = [[math.nan if r is None else float(r) for r in rewards] for rewards in case["rewards"]]
    return torch.tensor(columns, dtype=torch.float32).T.contiguous()


def run_trl_grpo(policy_dir, tokenizer, output_dir, case_name: str, scale: str, mode: str) -> tuple[list[float], dict]:
    """One GRPOTrainer step with fixed-reward callables: (its logged advantages, its logged metrics)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    case = REWARD_CASES[case_name]
    reward_funcs = []
    for name, rewards in zip(("func_a", "func_b"), case["rewards"]):

        def fixed_rewards(completions, _rewards=list(rewards), **kwargs):  # noqa: B006 (binds this function's rewards)
            return _rewards  # by position, so the sampler's prompt order does not matter

        fixed_rewards.__name__ = name  # TRL names the metrics after the function
        reward_funcs.append(fixed_rewards)

    group_size, batch_size = case["group_size"], len(case["rewards"][0])
    args = GRPOConfig(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        bf16=False,
        num_generations=group_size,
        per_device_train_batch_size=batch_size,
        max_completion_length=3,
        max_steps=1,
        gradient_checkpointing=False,
        scale_rewards=scale,
        multi_objective_aggregation=mode,
        reward_weights=case["weights"],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    prompts = ["what color is the sky ?", "how many are 2 + 2 ?"][: batch_size // group_size]
    trainer = GRPOTrainer(
        model=str(policy_dir),
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
    )
    trainer.train()
    return list(trainer._logs["advantages"]), trainer.state.log_history[0]


@pytest.fixture(scope="module")
def trl_grpo(tmp_path_factory):
    """run(case_name, scale, mode) -> (advantages, metrics) of a real GRPO step, each configuration run once."""
    tokenizer = make_bos_tokenizer()
    policy_dir = save_tiny_llama(tmp_path_factory.mktemp("policy"), tokenizer, causal=True)
    runs = {}

    def run(*key):
        if key not in runs:
            runs[key] = run_trl_grpo(policy_dir, tokenizer, tmp_path_factory.mktemp("grpo"), *key)
        return runs[key]

    return run


@pytest.mark.parametrize("case_name", list(REWARD_CASES))
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl_grpo(trl_grpo, case_name, scale):
    case = REWARD_CASES[case_name]
    trl_advantages, _ = trl_grpo(case_name, scale, "sum_then_normalize")
    ours = group_advantages(as_rewards_per_func(case)[:, 0], case["group_size"], scale)
    torch.testing.assert_close(ours, torch.tensor(trl_advantages), rtol=0, atol=1e-6)


def grpo_trainer(tmp_path, tokenizer, reward_funcs, prompts, **config):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    policy_dir = save_tiny_llama(tmp_path / "policy", tokenizer, causal=True)
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=3,
        max_steps=1,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        **config,
    )
    reward_processing_classes = [tokenizer if isinstance(f, torch.nn.Module) else None for f in reward_funcs]
    return GRPOTrainer(
        model=str(policy_dir),
        reward_funcs=reward_funcs,
        args=args,
        processing_class=tokenizer,
        reward_processing_classes=reward_processing_classes,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
    )


@pytest.mark.parametrize("kind", ["text", "messages"])
def test_matches_trl_grpo_where_trl_uses_the_training_format(tmp_path, bos_tokenizer, kind):
    """Conversations give identical ids in TRL's GRPO, so rewards agree; standard text with a BOS-adding
    tokenizer does not (TRL drops BOS and EOS), and rmtorch keeps training's format."""
    model = tiny_llama(len(bos_tokenizer), pad_token_id=bos_tokenizer.pad_token_id)
    prompts, completions = ROWS[kind]()
    trainer = grpo_trainer(tmp_path, bos_tokenizer, [copy.deepcopy(model)], prompts)
    trl_rewards = trainer._calculate_rewards(
        [{"prompt": p} for p in prompts], prompts, completions, [[1]] * len(prompts)
    )[:, 0]
    rewards = RewardScorer(model, bos_tokenizer)(prompts, completions)
    if kind == "messages":
        torch.testing.assert_close(rewards, trl_rewards, atol=1e-6, rtol=0)
    else:
        assert (rewards - trl_rewards).abs().max() > 1e-2
        training_ids = [tokenize_response(bos_tokenizer, p, c) for p, c in zip(prompts, completions)]
        torch.testing.assert_close(
            rewards, torch.tensor([reward_alone(model, ids) for ids in training_ids]), atol=1e-5, rtol=0
        )


def test_runs_one_grpo_step_as_a_reward_function(tmp_path, smol_tokenizer):
    """The scorer is a plain TRL reward function; the logged rewards are its rewards of the logged completions."""
    model = tiny_llama(len(smol_tokenizer), pad_token_id=smol_tokenizer.pad_token_id)
    scorer = RewardScorer(model, smol_tokenizer)
    trainer = grpo_trainer(tmp_path, smol_tokenizer, [scorer.as_reward_func(name="rm")], PROMPTS)
    trainer.train()
    assert trainer.state.global_step == 1
    logged = torch.tensor(list(trainer._logs["rewards"]["rm"]))
    assert len(logged) == 4 and "rewards/rm/mean" in trainer.state.log_history[0]
    torch.testing.assert_close(
        logged, scorer(list(trainer._logs["prompt"]), list(trainer._logs["completion"])), atol=1e-6, rtol=0
    )
