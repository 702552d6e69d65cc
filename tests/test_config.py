import json

import pytest

from rm.config import ConfigError, TrainConfig, parse_config


def test_defaults_follow_the_original_scripts():
    cfg = parse_config([])
    assert cfg == TrainConfig()
    assert (cfg.model_name_or_path, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (
        "Qwen/Qwen3-0.6B", 1, 8)
    assert (cfg.learning_rate, cfg.weight_decay, cfg.warmup_ratio, cfg.max_train_samples, cfg.max_eval_samples) == (
        2e-5, 0.001, 0.05, 1000, 10)
    assert (cfg.use_peft, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules) == (
        True, 8, 16, 0.05, "all")
    assert (cfg.max_source_length, cfg.max_target_length, cfg.seed) == (1024, 256, 42)


def test_file_then_flags_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-4\nuse_peft: false\nlora_rank: 4\n")
    cfg = parse_config(["--config", str(path), "--lora_rank", "16", "--bf16"])
    assert (cfg.learning_rate, cfg.use_peft, cfg.lora_rank, cfg.bf16) == (1e-4, False, 16, True)


def test_json_config_and_bool_spellings(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"use_peft": "no", "max_steps": 5}))
    cfg = parse_config(["--config", str(path), "--gradient_checkpointing", "false"])
    assert (cfg.use_peft, cfg.max_steps, cfg.gradient_checkpointing) == (False, 5, False)


@pytest.mark.parametrize("text, message", [
    ("learning_rat: 1\n", "unknown setting 'learning_rat'"),
    ("lora_rank: eight\n", "setting 'lora_rank' must be int"),
    ("- a\n", "expected a mapping"),
    ("a: [\n", "not valid yaml"),
])
def test_bad_config_file_names_the_file_and_setting(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path).replace(".", r"\.")) as err:
        parse_config(["--config", str(path)])
    assert message in str(err.value)


def test_invalid_values_are_refused():
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be > 0"):
        parse_config(["--gradient_accumulation_steps", "0"])
    with pytest.raises(ConfigError, match="lr_scheduler_type"):
        parse_config(["--lr_scheduler_type", "step"])
