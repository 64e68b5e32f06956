"""rmtorch.config: one definition per option, shared by every command with the same default; YAML then CLI;
values checked on parse."""

from __future__ import annotations

import dataclasses

import pytest

from rmtorch.config import EvalConfig, ScoreConfig, ServeConfig, TrainConfig, parse_config, to_yaml, trained_defaults


def test_config_yaml_then_cli_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 3.0e-4\nbatch_size: 4\nmax_length: null\nbf16: false\n")
    cfg = parse_config(["--config", str(recipe), "--lr", "2e-5", "--max_steps", "7"])
    assert (
        cfg.lr == 2e-5 and cfg.batch_size == 4 and cfg.max_length is None and cfg.bf16 is False and cfg.max_steps == 7
    )


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 1e-4\n")
    with pytest.raises(SystemExit, match="unknown key.*learning_rate"):
        parse_config(["--config", str(recipe)])
    with pytest.raises(SystemExit, match="lr must be a positive number"):
        parse_config(["--lr", "-1"])
    with pytest.raises(SystemExit, match="unknown option"):
        parse_config(["--learning_rate", "1"])


def test_bare_bool_flags_mean_true_and_explicit_values_still_work():
    cfg = parse_config(["--lora", "--lora_r", "8", "--load_in_4bit", "--bf16", "false", "--gradient_checkpointing"])
    assert (cfg.lora, cfg.lora_r, cfg.load_in_4bit, cfg.bf16, cfg.gradient_checkpointing) == (
        True,
        8,
        True,
        False,
        True,
    )
    assert parse_config(["--lora", "true", "--shuffle", "false"]).shuffle is False


@pytest.mark.parametrize("argv, message", [
    (["--load_in_4bit"], "load_in_4bit needs lora"),
    (["--merge_lora"], "merge_lora needs lora"),
    (["--lora", "--lora_r", "0"], r"--lora_r must be a positive number, got 0"),
])  # fmt: skip
def test_bad_lora_options_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        parse_config(argv)
    with pytest.raises(ValueError, match="lora_target is empty"):
        TrainConfig(lora=True, lora_target=" , ")


def test_shared_options_have_one_definition_and_one_default():
    fields = {cls: {f.name: f for f in dataclasses.fields(cls)} for cls in (TrainConfig, EvalConfig, ScoreConfig)}
    for name in ("truncation", "packing", "max_tokens_per_batch", "margin_column", "on_bad_row"):
        defined = [fields[cls][name] for cls in fields if name in fields[cls]]
        assert len(defined) >= 2, name
        assert len({(f.default, f.metadata["help"]) for f in defined}) == 1, name
    # Precision and length of scoring: one definition for every scoring command (training has its own defaults).
    scoring = {cls: {f.name: f for f in dataclasses.fields(cls)} for cls in (EvalConfig, ScoreConfig, ServeConfig)}
    for name in ("bf16", "max_length"):
        assert len({(fields[name].default, fields[name].metadata["help"]) for fields in scoring.values()}) == 1, name


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 2e-5\nmax_grad_norm: 1\n")
    cfg = parse_config(["--config", str(recipe)])
    assert cfg.lr == 2e-5 and cfg.max_grad_norm == 1.0


def test_evaluation_defaults_to_the_options_a_run_trained_with(tmp_path):
    trained = TrainConfig(max_length=64, truncation="keep_end", packing=True, bf16=False, trust_remote_code=True)
    (tmp_path / "config.yaml").write_text(to_yaml(trained))
    defaults = trained_defaults(str(tmp_path), EvalConfig)
    assert defaults == {
        "max_length": 64,
        "truncation": "keep_end",
        "margin_column": "margin",
        "category_column": "category",
        "packing": True,
        "max_tokens_per_batch": 16384,
        "bf16": False,
    }
    cfg = parse_config(
        ["--model", str(tmp_path), "--data", "x.jsonl", "--max_length", "128"], EvalConfig, base=defaults
    )
    assert (cfg.max_length, cfg.truncation, cfg.bf16, cfg.trust_remote_code) == (
        128,
        "keep_end",
        False,
        False,
    )  # never inherits remote code
    assert trained_defaults(str(tmp_path / "nothing"), EvalConfig) == {}


def test_required_options_are_named():
    with pytest.raises(SystemExit, match=r"error: --data is required: Pairs to evaluate"):
        parse_config(["--model", "m"], EvalConfig)


def test_length_penalty_is_off_by_default_and_never_negative():
    assert TrainConfig().length_penalty == 0.0
    assert parse_config(["--length_penalty", "0.5"]).length_penalty == 0.5
    with pytest.raises(SystemExit, match=r"--length_penalty must be >= 0, got -0.1"):
        parse_config(["--length_penalty", "-0.1"])
