import json
import math
from dataclasses import fields

import pytest

import rm.config
from rm.config import RECIPES, ConfigError, TrainConfig, apply_recipe, parse_config


def test_defaults_follow_the_original_scripts():
    cfg = parse_config(["--recipe", "original"])
    assert cfg == apply_recipe(TrainConfig(recipe="original"))
    assert (cfg.model_name_or_path, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (
        "Qwen/Qwen3-0.6B", 1, 8)
    assert (cfg.learning_rate, cfg.weight_decay, cfg.warmup_ratio, cfg.max_train_samples, cfg.max_eval_samples) == (
        2e-5, 0.001, 0.05, 1000, 10)
    assert (cfg.use_peft, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules) == (
        True, 8, 16, 0.05, "all")
    assert (cfg.max_source_length, cfg.max_target_length, cfg.seed) == (1024, 256, 42)
    assert (cfg.min_score_learning_rate, cfg.min_lora_b_learning_rate, cfg.use_rslora, cfg.disable_dropout) == (
        0.0, 0.0, False, False)  # every parameter at --learning_rate, dropout as the model has it: the original


def test_the_tuned_recipe_is_the_default_and_explicit_settings_win_over_it():
    assert parse_config([]) == apply_recipe(TrainConfig()) and TrainConfig().recipe == "tuned"
    tuned = parse_config([])
    assert {name: getattr(tuned, name) for name in RECIPES["tuned"]} == RECIPES["tuned"]
    assert tuned.learning_rate == 2e-5  # --learning_rate keeps the original's value and meaning (the adapters')
    cfg = parse_config(["--recipe", "original", "--use_rslora", "--min_score_learning_rate", "1e-3"])
    assert (cfg.use_rslora, cfg.min_score_learning_rate, cfg.lora_dropout) == (True, 1e-3, 0.05)
    cfg = parse_config(["--lora_dropout", "0.1", "--disable_dropout", "false"])
    assert (cfg.lora_dropout, cfg.disable_dropout, cfg.use_rslora) == (0.1, False, RECIPES["tuned"]["use_rslora"])
    assert set(RECIPES["tuned"]) == set(RECIPES["original"])
    assert all(getattr(TrainConfig(), name) is None for name in RECIPES["tuned"])  # unset until a recipe fills it


def test_file_then_flags_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-4\nuse_peft: false\nlora_rank: 4\n")
    cfg = parse_config(["--config", str(path), "--lora_rank", "16", "--bf16"])
    assert (cfg.learning_rate, cfg.use_peft, cfg.lora_rank, cfg.bf16) == (1e-4, False, 16, True)


def test_json_config_and_flag_bool_spellings(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"use_peft": False, "max_steps": 5}))
    cfg = parse_config(["--config", str(path), "--gradient_checkpointing", "no", "--packing", "0"])
    assert (cfg.use_peft, cfg.max_steps, cfg.gradient_checkpointing, cfg.packing) == (False, 5, False, False)


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(TrainConfig):
        assert f"--{f.name}" in text
    assert "(default: 2e-05)" in text and "(default: Qwen/Qwen3-0.6B)" in text


@pytest.mark.parametrize("text, message", [
    ("learning_rat: 1\n", "unknown setting 'learning_rat'"),
    ("lora_rank: eight\n", "setting 'lora_rank' must be int"),
    ("use_peft: 1\n", "setting 'use_peft' must be true or false"),
    ("max_source_length: null\n", "setting 'max_source_length' must not be null"),
    ("learning_rate: .nan\n", "setting 'learning_rate' must be > 0"),
    ("lr_scheduler_type: step\n", "must be one of linear, cosine"),
    ("- a\n", "expected a mapping"),
    ("a: [\n", "not valid yaml: line 2, column 1: expected the node content"),
    ("max_steps: 5\n\tlora_rank: 4\n", "not valid yaml: line 2, column 1: found character '\\t'"),
    ("max_steps: 5\nlora_rank: 4\nmax_steps: 2\n", "line 3, column 1: duplicate key 'max_steps' (first at line 1)"),
    ("learning_rate: abc\n", "setting 'learning_rate' must be float, got 'abc'"),
    ("max_steps: 2.5e0\n", "setting 'max_steps' must be int, got '2.5e0'"),
])
def test_bad_config_file_names_the_file_and_setting(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path).replace(".", r"\.")) as err:
        parse_config(["--config", str(path)])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name, content, message", [
    ("c.json", b'{"max_steps": 5, "max_steps": 2}', "not valid json: duplicate key 'max_steps'"),
    ("c.yaml", "max_steps: 5\nsystem: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 24)"),
])
def test_a_json_duplicate_key_and_a_file_that_is_not_utf8_are_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(path)])
    assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value), err.value


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-5 as the string '1e-5': a float setting takes it as its number, an int setting
    takes an exact integer."""
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-5\nlora_dropout: 5E-2\nmax_steps: 1e3\nseed: '7'\n")
    cfg = parse_config(["--config", str(path)])
    assert (cfg.learning_rate, cfg.lora_dropout, cfg.max_steps, cfg.seed) == (1e-5, 0.05, 1000, 7)
    assert type(cfg.max_steps) is int and type(cfg.seed) is int


def test_a_json_string_is_not_a_number(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"learning_rate": "1e-5"}))
    with pytest.raises(ConfigError, match="setting 'learning_rate' must be float, got '1e-5'"):
        parse_config(["--config", str(path)])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--config .*nope\.yaml: cannot read it"):
        parse_config(["--config", str(tmp_path / "nope.yaml")])


def test_unknown_flag_is_refused():
    with pytest.raises(ConfigError, match="unknown command-line arguments.*--learning_rat"):
        parse_config(["--learning_rat", "1"])


@pytest.mark.parametrize("args, message", [
    (["--learning_rate", "abc"], "--learning_rate: expected a float, got 'abc'"),
    (["--max_steps", "2.5"], "--max_steps: expected an int, got '2.5'"),
    (["--use_peft", "maybe"], "--use_peft: expected true or false, got 'maybe'"),
    (["--bf16", "sometimes"], "--bf16: expected true or false, got 'sometimes'"),
    (["--lora-rank", "x"], "--lora_rank: expected an int, got 'x'"),
    (["--report_to", "stdout"], "--report_to: expected one of tensorboard, wandb, all, none, got 'stdout'"),
    (["--max_steps"], "--max_steps: expected one argument"),
])
def test_a_badly_typed_flag_is_one_line_naming_the_flag_the_value_and_the_type(capsys, args, message):
    with pytest.raises(ConfigError) as err:
        parse_config(args)
    assert str(err.value) == message
    assert capsys.readouterr().err == ""  # no argparse usage text


@pytest.mark.parametrize("value", ["-1e-5", "-.5", "-3", "-2E+2", "-inf"])
def test_a_negative_number_is_a_flag_value_and_reaches_the_range_check(value):
    with pytest.raises(ConfigError, match="--learning_rate: setting 'learning_rate' must be > 0"):
        parse_config(["--learning_rate", value])
    assert parse_config(["--max_train_samples", "-1", "--max_steps", "-1"]).max_train_samples == -1


def pretend_installed(monkeypatch, *packages):
    monkeypatch.setattr(rm.config, "find_spec", lambda name: object() if name in packages else None)


@pytest.mark.parametrize("report_to, package", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_tracker_that_is_not_installed_is_refused(monkeypatch, report_to, package):
    pretend_installed(monkeypatch)
    with pytest.raises(ConfigError, match=f"--report_to: .*{report_to!r}.*the {package} package is not installed "
                                          f"\\(pip install {package}"):
        parse_config(["--report_to", report_to])


def test_installed_trackers_all_and_none_are_accepted_without_importing_the_tracker(monkeypatch):
    pretend_installed(monkeypatch, "wandb", "tensorboardX")  # a fake spec: importing either would fail here
    assert parse_config(["--report_to", "wandb"]).report_to == "wandb"
    assert parse_config(["--report_to", "tensorboard"]).report_to == "tensorboard"  # tensorboardX will do
    pretend_installed(monkeypatch)
    assert [parse_config(["--report_to", value]).report_to for value in ("all", "none")] == ["all", "none"]


# One bad value per field (a value of the right type but out of range where the field has a range, else one of the
# wrong type). The test below fails when a field is added without an entry here, so every setting stays checked.
BAD_VALUES = {
    "model_name_or_path": "  ", "tokenizer_name_or_path": "", "use_peft": "maybe", "lora_rank": 0,
    "lora_alpha": -1.0, "lora_dropout": 1.0, "target_modules": "q_proj,,v_proj", "gradient_checkpointing": 2,
    "bf16": "sometimes", "train_file_dir": "", "validation_file_dir": " ", "cache_dir": "",
    "max_source_length": 0, "max_target_length": -5, "max_train_samples": 0, "max_eval_samples": -2,
    "per_device_train_batch_size": 0, "per_device_eval_batch_size": 0, "gradient_accumulation_steps": 0,
    "packing": "fast", "max_tokens_per_micro_batch": 0, "torch_compile": "auto", "cuda_graphs": "auto", "num_train_epochs": math.nan,
    "max_steps": 0, "learning_rate": 0.0, "weight_decay": -0.1, "warmup_ratio": 1.0,
    "lr_scheduler_type": "step", "max_grad_norm": -1.0, "center_rewards_coefficient": math.inf, "seed": -1,
    "output_dir": "", "overwrite_output_dir": "please", "logging_steps": 0, "eval_steps": 0, "save_steps": 0,
    "save_total_limit": -1, "resume_from_checkpoint": "", "skip_bad_records": "yes please",
    "skip_nonfinite_steps": 3, "report_to": "stdout", "reward_position": "last", "allow_changed_data": "ok",
    "recipe": "best", "min_score_learning_rate": -1e-3, "min_lora_b_learning_rate": math.inf, "use_rslora": "on",
    "disable_dropout": 5,
}


def test_every_field_has_a_bad_value_below():
    assert sorted(BAD_VALUES) == sorted(f.name for f in fields(TrainConfig)), "add the new field to BAD_VALUES"


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_every_field_refuses_a_bad_value_from_a_file(tmp_path, name):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({name: BAD_VALUES[name]}, allow_nan=True))
    with pytest.raises(ConfigError, match=f"{str(path).replace('.', '[.]')}: setting '{name}'"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_every_field_refuses_a_bad_value_from_the_command_line(name):
    value = str(BAD_VALUES[name])
    with pytest.raises(ConfigError) as err:  # a wrong type or choice too: one line, not argparse's usage and exit
        parse_config([f"--{name}", value])
    assert str(err.value).startswith(f"--{name}: ") and value in str(err.value)
