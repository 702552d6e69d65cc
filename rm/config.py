"""Every training setting and its default, in one place.

Defaults follow the original torchrun + DeepSpeed reward-model scripts. Values come from, in rising priority:
these defaults, an optional yaml/json file (`--config FILE`), then command-line flags.
DeepSpeed settings are not here: they live in accelerate_configs/*.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A setting is missing, unknown or invalid; raised before any model or data is loaded."""


@dataclass
class TrainConfig:
    # model
    model_name_or_path: str = field(default="Qwen/Qwen3-0.6B", metadata={
        "help": "Local path or hub name of a causal LM; 'tiny' builds a small random Qwen3 model (offline)."})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Defaults to the model's."})
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters (+ the score head); false = full."})
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: str = field(default="all", metadata={
        "help": "'all' = every linear layer but the head, or a comma-separated list of module names."})
    gradient_checkpointing: bool = True
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (a launcher yaml may also set it)."})
    # data
    train_file_dir: str = field(default="data/sample/train.jsonl", metadata={
        "help": "Directory of .jsonl/.json/.parquet files, one such file, or a datasets hub name."})
    validation_file_dir: Optional[str] = field(default="data/sample/eval.jsonl")
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Cache for tokenized data and hub downloads."})
    max_source_length: int = field(default=1024, metadata={"help": "Prompt tokens kept (its end is kept)."})
    max_target_length: int = field(default=256, metadata={"help": "Response tokens kept (end-of-turn kept)."})
    max_train_samples: Optional[int] = field(default=1000, metadata={"help": "Use at most this many pairs; -1 = all."})
    max_eval_samples: Optional[int] = field(default=10, metadata={"help": "-1 = all."})
    # optimisation
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Pairs per micro-batch per process."})
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 8
    packing: bool = field(default=True, metadata={
        "help": "Fast path: pack each optimizer step's pairs pad-free into few micro-batches (same gradient as "
                "one micro-batch per per_device_train_batch_size pairs); false = the plain path."})
    max_tokens_per_micro_batch: int = field(default=16384, metadata={
        "help": "Token budget of one packed micro-batch (a plain micro-batch is never split)."})
    torch_compile: bool = field(default=False, metadata={
        "help": "torch.compile each decoder layer (fuses norms and activations; the first steps pay the compile)."})
    num_train_epochs: float = 1.0
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides num_train_epochs when > 0."})
    learning_rate: float = 2e-5
    weight_decay: float = 0.001
    warmup_ratio: float = 0.05
    lr_scheduler_type: str = field(default="linear", metadata={"help": "linear or cosine"})
    max_grad_norm: float = 1.0
    center_rewards_coefficient: float = field(default=0.0, metadata={
        "help": "Adds coef * mean((r_chosen + r_rejected)^2) to keep rewards centred at zero."})
    seed: int = 42
    # output and logging
    output_dir: str = "outputs/rm"
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing into a non-empty output_dir."})
    logging_steps: int = 10
    eval_steps: int = 50
    save_steps: int = field(default=500, metadata={
        "help": "Save the full training state to output_dir/checkpoint-<step> every this many optimizer steps."})
    save_total_limit: int = field(default=3, metadata={"help": "Keep only the newest this many checkpoints; 0 = all."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "'latest' (newest complete checkpoint in output_dir) or a checkpoint directory to continue from."})
    skip_bad_records: bool = field(default=False, metadata={
        "help": "Drop records that fail validation (and report them) instead of stopping."})
    skip_nonfinite_steps: bool = field(default=False, metadata={
        "help": "Skip an optimizer step whose loss or gradient norm is NaN/inf instead of stopping (not under "
                "DeepSpeed, which steps inside backward)."})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb, all or none"})


def _to_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "y", "on"}:
        return True
    if lowered in {"0", "false", "no", "n", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_type(f: dataclasses.Field) -> type:
    """The scalar type behind a field's (possibly Optional, possibly string) annotation."""
    name = str(f.type).replace("Optional[", "").rstrip("]")
    return {"str": str, "int": int, "float": float, "bool": bool}[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a pairwise reward model.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="yaml or json file with any of the settings below")
    for f in fields(TrainConfig):
        kind = _field_type(f)
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f.metadata.get("help", " ")}
        if kind is bool:
            kwargs.update(type=_to_bool, nargs="?", const=True)
        else:
            kwargs.update(type=kind)
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def _coerce(name: str, value: Any, source: str) -> Any:
    f = {f.name: f for f in fields(TrainConfig)}.get(name)
    if f is None:
        raise ConfigError(f"{source}: unknown setting {name!r}")
    if value is None:
        return None
    kind = _field_type(f)
    try:
        if kind is bool:
            return _to_bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{source}: setting {name!r} must be {kind.__name__}, got {value!r}") from None


def load_config_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid {'json' if path.endswith('.json') else 'yaml'}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of setting: value")
    return {k: _coerce(k, v, path) for k, v in data.items()}


def validate(cfg: TrainConfig) -> None:
    positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "max_tokens_per_micro_batch",
                "max_source_length", "max_target_length", "logging_steps", "eval_steps", "save_steps"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.lr_scheduler_type not in {"linear", "cosine"}:
        raise ConfigError(f"lr_scheduler_type must be linear or cosine, got {cfg.lr_scheduler_type!r}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.report_to not in {"tensorboard", "wandb", "all", "none"}:
        raise ConfigError(f"report_to must be tensorboard, wandb, all or none, got {cfg.report_to!r}")
    if cfg.save_total_limit < 0:
        raise ConfigError(f"save_total_limit must be >= 0 (0 = keep all), got {cfg.save_total_limit}")
    if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
        raise ConfigError("set num_train_epochs > 0 or max_steps > 0")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file:
        values.update(load_config_file(config_file))
    values.update(args)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg
