"""Every training setting and its default, in one place.

Defaults follow the original torchrun + DeepSpeed reward-model scripts. Values come from, in rising priority:
these defaults, an optional yaml/json file (`--config FILE`), then command-line flags.
DeepSpeed settings are not here: they live in accelerate_configs/*.yaml.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from argparse import ArgumentTypeError
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Literal, NoReturn, Optional, get_args, get_origin, get_type_hints

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool


NO_CACHE = "none"  # --cache_dir value that turns the token cache off


def hub_cache_dir(cache_dir: str | None) -> str | None:
    """The folder handed to transformers / datasets for hub downloads: --cache_dir, or their default."""
    return None if cache_dir is None or cache_dir.strip().lower() == NO_CACHE else cache_dir


class ConfigError(ValueError):
    """A setting is missing, unknown or invalid; raised before any model or data is loaded."""


@dataclass
class TrainConfig:
    # model
    model_name_or_path: str = field(default="Qwen/Qwen3-0.6B", metadata={
        "help": "Local path or hub name of a causal LM; 'tiny' builds a small random Qwen3 model (offline)."})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Defaults to the model's."})
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters (+ the score head); false = full."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: Optional[float] = field(default=None, metadata={
        "help": "(recipe) Dropout on the LoRA input, in [0, 1). Unset: the --recipe's value."})
    use_rslora: Optional[bool] = field(default=None, metadata={
        "nargs": "?", "const": True,
        "help": "(recipe) rsLoRA: scale the adapters by alpha / sqrt(r) instead of alpha / r. Unset: the --recipe's."})
    target_modules: str = field(default="all", metadata={
        "help": "'all' = every linear layer but the head, or a comma-separated list of module names."})
    gradient_checkpointing: Optional[bool] = field(default=None, metadata={
        "nargs": "?", "const": True,
        "help": "Recompute activations in backward: less memory, more compute. Unset: on, except on CUDA when the "
                "largest micro-batch's activations (estimated high) fit in 80%% of the free memory (the log says "
                "which and why)."})
    bf16: Optional[bool] = field(default=None, metadata={
        "nargs": "?", "const": True,
        "help": "bf16 mixed precision. Unset: what the accelerate launcher says (its yaml's mixed_precision; plain "
                "python: off). Set against the launcher's choice: refused. training_config.json records what ran."})
    # data
    train_file_dir: str = field(default="data/sample/train.jsonl", metadata={
        "help": "Directory of .jsonl/.json/.parquet (.ndjson, .jsonlines) files, one such file, or a datasets hub "
                "name."})
    validation_file_dir: Optional[str] = field(default=None, metadata={
        "help": "Eval data (same forms as train_file_dir). Unset: the embedded sample's eval file with the embedded "
                "train file, else a held-out split of the train data; 'none': no evaluation."})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "Cache for tokenized data and hub downloads. Unset: token ids in $RM_CACHE_DIR, else ~/.cache/rm "
                "(rm/token_store.py), hub downloads where transformers puts them; 'none': no token cache."})
    max_source_length: int = field(default=1024, metadata={"help": "Prompt tokens kept (its end is kept)."})
    max_target_length: int = field(default=256, metadata={"help": "Response tokens kept (end-of-turn kept)."})
    reward_position: Literal["template_end", "eos"] = field(default="template_end", metadata={
        "help": "Where each sequence ends and the reward is read: template_end = after the chat template's whole "
                "end-of-turn (HF / TRL clients), eos = at the EOS token (OpenRLHF). Recorded in model/config.json."})
    max_train_samples: int = field(default=1000, metadata={"help": "Use at most this many pairs; -1 = all."})
    max_eval_samples: int = field(default=10, metadata={
        "help": "Evaluate on at most this many pairs; -1 = all, 0 = no evaluation."})
    # optimisation
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Pairs per micro-batch per process."})
    per_device_eval_batch_size: int = field(default=1, metadata={
        "help": "Accepted for the original scripts' command lines and checked; evaluation is packed by "
                "max_tokens_per_micro_batch instead, so this changes no reported number."})
    gradient_accumulation_steps: int = field(default=8, metadata={
        "help": "Micro-batches per optimizer step (the yaml must not set it)."})
    packing: bool = field(default=True, metadata={
        "help": "Fast path: pack each optimizer step's pairs pad-free into few micro-batches (same gradient as "
                "one micro-batch per per_device_train_batch_size pairs); false = the plain path."})
    max_tokens_per_micro_batch: int = field(default=16384, metadata={
        "help": "Token budget of one packed micro-batch (a plain micro-batch is never split)."})
    torch_compile: Optional[bool] = field(default=None, metadata={
        "nargs": "?", "const": True,
        "help": "torch.compile each decoder layer (fuses norms and activations; the first steps pay the compile). "
                "Unset, on CUDA and not under ZeRO-3: on for full fine-tuning, and for LoRA without DeepSpeed where "
                "CUDA graphs cannot run (several processes) in runs of at least 200 optimizer steps (shorter ones do "
                "not pay the compile back); off elsewhere."})
    cuda_graphs: Optional[bool] = field(default=None, metadata={
        "nargs": "?", "const": True,
        "help": "Capture each packed micro-batch's forward, loss and backward as a CUDA graph per token bucket "
                "(rows padded to at most 25%% more tokens) and replay it: the host no longer issues thousands of "
                "kernels a step. Unset: on where it can run (CUDA, one process without DeepSpeed, packing, bf16, no "
                "gradient checkpointing, no torch.compile); off elsewhere."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the train data (may be fractional)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides num_train_epochs when > 0."})
    learning_rate: float = field(default=2e-5, metadata={
        "help": "Peak AdamW learning rate of the LoRA adapters, or of the whole model in full fine-tuning (the "
                "score head and LoRA's B matrices train at least at their own minimums below)."})
    recipe: Literal["tuned", "original"] = field(default="tuned", metadata={
        "help": "Values for the settings marked (recipe) that are left unset: tuned = picked by measurement on real "
                "preference data (docs/quality_results.md); original = the original scripts' behaviour exactly."})
    min_score_learning_rate: Optional[float] = field(default=None, metadata={
        "help": "(recipe) The score head (new, random) trains at max(--learning_rate, this); 0 = at "
                "--learning_rate. Unset: the --recipe's."})
    min_lora_b_learning_rate: Optional[float] = field(default=None, metadata={
        "help": "(recipe) LoRA's B matrices (zero at the start) train at max(--learning_rate, this); 0 = at "
                "--learning_rate. Unset: the --recipe's."})
    disable_dropout: Optional[bool] = field(default=None, metadata={
        "nargs": "?", "const": True,
        "help": "(recipe) Set every dropout of the pretrained model to 0, as TRL does (LoRA's own dropout is "
                "--lora_dropout). Unset: the --recipe's."})
    weight_decay: float = field(default=0.001, metadata={"help": "AdamW weight decay (not on norms and biases)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of the steps spent warming up, in [0, 1)."})
    lr_scheduler_type: Literal["linear", "cosine"] = field(default="linear", metadata={
        "help": "Decay after warmup."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient's global norm to this (> 0)."})
    center_rewards_coefficient: float = field(default=0.0, metadata={
        "help": "Adds coef * mean((r_chosen + r_rejected)^2) to keep rewards centred at zero."})
    seed: int = field(default=42, metadata={"help": "Seeds shuffling, initialisation and dropout."})
    # output and logging
    output_dir: str = field(default="outputs/rm", metadata={
        "help": "Where the model, metrics, plots, tensorboard logs and checkpoints go."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace the run in output_dir: its checkpoints, model, metrics and logs are removed just before "
                "this run's first write (other files stay). With --resume_from_checkpoint: the checkpoints past "
                "the resumed one are removed."})
    logging_steps: int = field(default=10, metadata={"help": "Log train metrics every this many optimizer steps."})
    eval_steps: int = field(default=50, metadata={"help": "Evaluate every this many optimizer steps."})
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
    allow_changed_data: bool = field(default=False, metadata={
        "help": "Resume although the train data changed since the checkpoint was saved (its data order then "
                "differs from an uninterrupted run's); without it such a resume is refused."})
    report_to: Literal["tensorboard", "wandb", "all", "none"] = field(default="tensorboard", metadata={
        "help": "Experiment tracker."})


# ---- the range of every setting: one check per field, table-driven (tests/test_config.py walks every field)
def _positive(v: Any) -> bool:
    return v > 0 and math.isfinite(v)


def _non_negative(v: Any) -> bool:
    return v >= 0 and math.isfinite(v)


def _non_empty(v: Any) -> bool:
    return bool(v.strip())


_ANY: Callable[[Any], bool] = lambda v: True  # noqa: E731  (bools and free-form optional strings)
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model_name_or_path": (_non_empty, "a local path, a hub name or 'tiny'"),
    "tokenizer_name_or_path": (_non_empty, "a non-empty path or hub name"),
    "lora_rank": (_positive, "> 0"),
    "lora_alpha": (_positive, "> 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "min_score_learning_rate": (_non_negative, ">= 0 and finite"),
    "min_lora_b_learning_rate": (_non_negative, ">= 0 and finite"),
    "target_modules": (lambda v: all(m.strip() for m in v.split(",")), "'all' or comma-separated module names"),
    "train_file_dir": (_non_empty, "a file, a directory or a hub data set name"),
    "validation_file_dir": (_non_empty, "a file, a directory, a hub name or 'none'"),
    "cache_dir": (_non_empty, "a directory or 'none'"),
    "max_source_length": (_positive, "> 0"),
    "max_target_length": (_positive, "> 0"),
    "max_train_samples": (lambda v: v == -1 or v > 0, "> 0, or -1 for all"),
    "max_eval_samples": (lambda v: v >= -1, ">= 0 (0 = no evaluation), or -1 for all"),
    "per_device_train_batch_size": (_positive, "> 0"),
    "per_device_eval_batch_size": (_positive, "> 0"),
    "gradient_accumulation_steps": (_positive, "> 0"),
    "max_tokens_per_micro_batch": (_positive, "> 0"),
    "num_train_epochs": (_positive, "> 0 and finite"),
    "max_steps": (lambda v: v == -1 or v > 0, "> 0, or -1 to train num_train_epochs"),
    "learning_rate": (_positive, "> 0 and finite"),
    "weight_decay": (_non_negative, ">= 0 and finite"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_grad_norm": (_positive, "> 0 and finite (a negative norm would flip the gradient)"),
    "center_rewards_coefficient": (_non_negative, ">= 0 and finite"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "output_dir": (_non_empty, "a directory"),
    "logging_steps": (_positive, "> 0"),
    "eval_steps": (_positive, "> 0"),
    "save_steps": (_positive, "> 0"),
    "save_total_limit": (_non_negative, ">= 0 (0 = keep all)"),
    "resume_from_checkpoint": (_non_empty, "'latest' or a checkpoint directory"),
}


def _field_kind(name: str) -> tuple[type, bool, tuple[str, ...] | None]:
    """(scalar type, may it be None, its choices) from a field's annotation."""
    hint = get_type_hints(TrainConfig)[name]
    optional = type(None) in get_args(hint)
    if optional:
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    if get_origin(hint) is Literal:
        return str, optional, get_args(hint)
    return hint, optional, None


def check_value(name: str, value: Any, source: str) -> None:
    """Raise ConfigError naming `source` and the field when `value` is of the wrong type or out of range."""
    kind, optional, choices = _field_kind(name)
    if value is None:
        if not optional:
            raise ConfigError(f"{source}: setting {name!r} must not be null")
        return
    type_ok = {bool: lambda: isinstance(value, bool),
               int: lambda: isinstance(value, int) and not isinstance(value, bool),
               float: lambda: isinstance(value, (int, float)) and not isinstance(value, bool),
               str: lambda: isinstance(value, str)}[kind]()
    if not type_ok:
        expected = "true or false" if kind is bool else kind.__name__
        raise ConfigError(f"{source}: setting {name!r} must be {expected}, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{source}: setting {name!r} must be one of {', '.join(choices)}, got {value!r}")
    check, expected = _CHECKS.get(name, (_ANY, ""))
    if isinstance(value, float) and not math.isfinite(value) or not check(value):
        raise ConfigError(f"{source}: setting {name!r} must be {expected}, got {value!r}")


# ---- trackers: the packages accelerate logs through (any one of them will do). 'all' logs to whichever are
# installed, 'none' to nothing: neither needs a package.
TRACKER_PACKAGES: dict[str, tuple[str, ...]] = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def check_tracker_installed(report_to: str) -> None:
    """ConfigError when the tracker `report_to` names is not installed (accelerate would only warn, and track
    nothing). Looked up with find_spec: the tracker is not imported."""
    packages = TRACKER_PACKAGES.get(report_to, ())
    if packages and not any(find_spec(package) for package in packages):
        raise ConfigError(f"--report_to: setting 'report_to' is {report_to!r}, but the {packages[0]} package is not "
                          f"installed (pip install {packages[0]}, or use report_to none)")


# ---- the --config file
class _SettingsLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a scalar key is hashable; merge keys (<<) are meant to be overridden
            key = self.construct_object(key_node)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first_line[key]})", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _one_line(err: yaml.YAMLError) -> str:
    """A PyYAML error as its line, column and problem (PyYAML's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return " ".join(str(err).split())
    context = f" ({err.context})" if err.context else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}{context}"


def _read_settings(path: str) -> Any:
    """The parsed content of a yaml or json file, or ConfigError naming the file (and the line, for yaml)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {err.start})") from None
    try:
        if path.endswith(".json"):
            return json.loads(text, object_pairs_hook=lambda pairs: _json_object(pairs, path))
        return yaml.load(text, Loader=_SettingsLoader)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid json: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid yaml: {_one_line(err)}") from None


def _json_object(pairs: list[tuple[str, Any]], path: str) -> dict[str, Any]:
    """A json object that refuses a key given twice (json.loads silently keeps the last one)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"{path}: not valid json: duplicate key {key!r}")
        seen[key] = value
    return seen


def _yaml_number(name: str, value: Any) -> Any:
    """PyYAML (YAML 1.1) reads 1e-5 and 1e3 as strings: for a float setting such a string is its number, for an int
    setting only when it is an exact integer. Anything else is returned as it is, for check_value to judge."""
    kind = _field_kind(name)[0]
    if not isinstance(value, str) or kind not in (int, float):
        return value
    try:
        if kind is float:
            return float(value)
        number = Decimal(value)
    except (ValueError, InvalidOperation):
        return value
    return int(number) if number.is_finite() and number == number.to_integral_value() else value


def load_config_file(path: str) -> dict[str, Any]:
    """The settings of a yaml or json file, each checked for name, type and range."""
    data = _read_settings(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of setting: value")
    known = {f.name for f in fields(TrainConfig)}
    for name, value in data.items():
        if name not in known:
            raise ConfigError(f"{path}: unknown setting {name!r}")
        if not path.endswith(".json"):
            data[name] = value = _yaml_number(name, value)
        check_value(name, value, path)
    return data


# ---- the command line
_EXPECTED_TYPE: dict[Callable[[str], Any], str] = {float: "a float", int: "an int", string_to_bool: "true or false"}


def _strict(convert: Callable[[str], Any], expected: str, choices: Any) -> Callable[[str], Any]:
    """`convert`, refusing a value it cannot convert (or that is not one of `choices`) in one phrase."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
            if choices is None or value in choices:
                return value
        except (ArgumentTypeError, TypeError, ValueError):
            pass
        raise ArgumentTypeError(f"expected {expected}, got {text!r}")
    return parse


class _Parser(HfArgumentParser):
    """HfArgumentParser whose refusals are a one-line ConfigError naming the flag, the value and the expected type,
    instead of argparse's usage text and exit."""

    def add_argument(self, *names: Any, **kwargs: Any) -> Any:
        if "type" in kwargs:
            choices = kwargs.get("choices")
            expected = ("one of " + ", ".join(map(str, choices)) if choices is not None
                        else _EXPECTED_TYPE.get(kwargs["type"], "a string"))
            kwargs["type"] = _strict(kwargs["type"], expected, choices)
        return super().add_argument(*names, **kwargs)

    def error(self, message: str) -> NoReturn:
        # argparse says "argument --learning_rate/--learning-rate: ...": keep the flag's first spelling
        flag, _, problem = message.removeprefix("argument ").partition(": ")
        raise ConfigError(f"{flag.split('/')[0]}: {problem}" if problem else message)


def _negative_numbers_attached(argv: list[str]) -> list[str]:
    """`--flag -1e-5` as `--flag=-1e-5`: argparse takes -3 and -.5 for values but -1e-5 for an unknown option."""
    attached: list[str] = []
    for arg in argv:
        if attached and _is_bare_flag(attached[-1]) and _is_negative_number(arg):
            attached[-1] += "=" + arg
        else:
            attached.append(arg)
    return attached


def _is_bare_flag(arg: str) -> bool:
    return arg.startswith("--") and "=" not in arg


def _is_negative_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.startswith("-")


def build_parser() -> HfArgumentParser:
    """Every TrainConfig field as --name (defaults shown by --help), plus --config FILE."""
    parser = _Parser(TrainConfig, description="Train a pairwise (chosen vs rejected) reward model.",
                     allow_abbrev=False)  # a misspelt flag is an error, not another flag
    parser.add_argument("--config", help="yaml or json file with any of the settings below; flags override it")
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the --config file, then command-line flags; every value checked, or ConfigError."""
    argv = _negative_numbers_attached(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config_file = parser.parse_known_args(argv)[0].config
    if config_file:
        parser.set_defaults(**load_config_file(config_file))
    try:
        cfg, _ = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except ValueError as err:  # HfArgumentParser's words for arguments no field took
        unknown = str(err).split(": ", 1)[-1]
        raise ConfigError(f"unknown command-line arguments {unknown} (see --help)") from None
    for f in fields(TrainConfig):
        check_value(f.name, getattr(cfg, f.name), "--" + f.name)
    check_tracker_installed(cfg.report_to)
    return apply_recipe(cfg)


# ---- recipes: the values of the (recipe) settings a run leaves unset. "original" is the original scripts exactly;
# "tuned" was picked by the learning-rate and recipe sweep in docs/quality_results.md (bench/quality_sweep.py).
RECIPES: dict[str, dict[str, Any]] = {
    "tuned": {"lora_dropout": 0.0, "use_rslora": True, "min_score_learning_rate": 4e-3,
              "min_lora_b_learning_rate": 3.2e-4, "disable_dropout": True},
    "original": {"lora_dropout": 0.05, "use_rslora": False, "min_score_learning_rate": 0.0,
                 "min_lora_b_learning_rate": 0.0, "disable_dropout": False},
}


def apply_recipe(cfg: TrainConfig) -> TrainConfig:
    """The config with every unset (recipe) setting filled from its --recipe; settings given explicitly win."""
    unset = {name: value for name, value in RECIPES[cfg.recipe].items() if getattr(cfg, name) is None}
    return dataclasses.replace(cfg, **unset)
