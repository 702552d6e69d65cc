"""A trained reward model, loaded to score token rows exactly as its training run read rewards: the output dir,
merged model or LoRA adapter resolved, the run's lengths and reward position (config.json / training_config.json)
applied, optional normalisation with the stored eval mean and std. Used by rm.score and rm.reward_function."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rm.config import TrainConfig
from rm.encoding import PairEncoder, pad_rows
from rm.model import LOAD_ERRORS, RewardModel, cannot_load, load_tokenizer
from rm.outputs import ADAPTER_DIR, MODEL_DIR, TRAINING_CONFIG

NORMALIZATION_KEYS = ("mean", "std")  # the names OpenRLHF reads from config.json
REWARD_POSITION_KEY = "reward_position"  # in config.json, written by train.py; absent: "template_end"


class ScoreError(ValueError):
    """The model or data cannot be scored as asked."""


# --------------------------------------------------------------------------------------------- model
def resolve_model_dir(path: str, adapter: bool) -> tuple[Path, bool]:
    """(folder to load, is it a LoRA adapter) for an output dir, a merged model folder or an adapter folder."""
    root = Path(path)
    if adapter:
        candidates = [root / ADAPTER_DIR, root]
        for folder in candidates:
            if (folder / "adapter_config.json").is_file():
                return folder, True
        raise ScoreError(f"{path}: no adapter_config.json here or in {ADAPTER_DIR}/ (was it a LoRA run?)")
    if (root / MODEL_DIR / "config.json").is_file():
        return root / MODEL_DIR, False
    if (root / "adapter_config.json").is_file():
        return root, True
    if (root / "config.json").is_file():
        return root, False
    raise ScoreError(f"{path}: neither a training output directory (with {MODEL_DIR}/), a model folder "
                     "(config.json) nor an adapter folder (adapter_config.json)")


def read_json(path: Path) -> dict[str, Any]:
    """A json object from a model, adapter or run folder, or ScoreError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ScoreError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(data, dict):
        raise ScoreError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def adapter_base(folder: Path, base_model: str | None) -> str:
    """The base model an adapter folder loads on: --base_model, else the one its adapter_config.json names."""
    adapter_config = folder / "adapter_config.json"
    base = base_model or read_json(adapter_config).get("base_model_name_or_path")
    if not base:
        raise ScoreError(f"{adapter_config} names no base model: pass --base_model PATH")
    return base


def load_reward_model(folder: Path, is_adapter: bool, base_model: str | None, dtype: torch.dtype,
                      tokenizer: Any) -> RewardModel:
    from transformers import AutoModelForSequenceClassification

    def load(source: Path | str, what: str) -> Any:
        try:
            return AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=dtype,
                                                                      trust_remote_code=False)
        except LOAD_ERRORS as err:
            raise cannot_load(what, err) from None

    if not is_adapter:
        model = load(folder, f"the model at {folder}")
    else:
        from peft import PeftModel

        base = adapter_base(folder, base_model)
        model = load(base, f"the adapter's base model {base}")
        try:
            model = PeftModel.from_pretrained(model, folder)
        except (*LOAD_ERRORS, KeyError) as err:  # KeyError: an adapter_config.json of no known peft_type
            raise cannot_load(f"the adapter at {folder}", err) from None
    model.config.pad_token_id = tokenizer.pad_token_id
    return RewardModel(model).eval()


def exported_config(folder: Path, is_adapter: bool) -> tuple[Path, dict[str, Any]]:
    """The merged model's config.json (path, contents), where train.py records reward statistics and position."""
    config_path = (folder.parent / MODEL_DIR if is_adapter else folder) / "config.json"
    return config_path, read_json(config_path) if config_path.is_file() else {}


def normalization_stats(folder: Path, is_adapter: bool) -> tuple[float, float]:
    """The eval reward mean and std train.py stored in the merged model's config.json."""
    config_path, config = exported_config(folder, is_adapter)
    if not all(isinstance(config.get(k), (int, float)) for k in NORMALIZATION_KEYS):
        raise ScoreError(f"{config_path}: no reward 'mean' / 'std' stored (written by train.py when it ran an "
                         "evaluation): --normalize needs them")
    mean, std = (float(config[k]) for k in NORMALIZATION_KEYS)
    if std <= 0:
        raise ScoreError(f"{config_path}: stored reward std is {std}, cannot normalise")
    return mean, std


def check_lengths(max_source_length: int | None, max_target_length: int | None) -> None:
    """Lengths given to score with: None means the training run's; below 1 is refused (0 used to mean None)."""
    for name, value in (("max_source_length", max_source_length), ("max_target_length", max_target_length)):
        if value is not None and value < 1:
            raise ScoreError(f"--{name} is {value}; expected a positive integer (leave it unset for the training "
                             "run's value)")


def training_lengths(folder: Path) -> tuple[int, int]:
    """max_source_length / max_target_length of the run that made the model, else the trainer's defaults."""
    defaults = TrainConfig()
    for candidate in (folder.parent / TRAINING_CONFIG, folder / TRAINING_CONFIG):
        if candidate.is_file():
            cfg = read_json(candidate)
            return (cfg.get("max_source_length", defaults.max_source_length),
                    cfg.get("max_target_length", defaults.max_target_length))
    return defaults.max_source_length, defaults.max_target_length


@dataclass
class Scorer:
    """A trained reward model with the encoder that renders, truncates and ends sequences as its training did."""

    folder: Path
    model: RewardModel
    encoder: PairEncoder
    device: torch.device
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def load(cls, model: str, adapter: bool = False, base_model: str | None = None, device: str = "auto",
             dtype: str = "auto", normalize: bool = False, max_source_length: int | None = None,
             max_target_length: int | None = None) -> "Scorer":
        """Lengths default to the training run's; the reward position is the one recorded in config.json."""
        check_lengths(max_source_length, max_target_length)
        folder, is_adapter = resolve_model_dir(model, adapter)
        mean, std = normalization_stats(folder, is_adapter) if normalize else (0.0, 1.0)
        where = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = {"auto": torch.bfloat16 if where.type == "cuda" else torch.float32, "float32": torch.float32,
                       "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        default_source, default_target = training_lengths(folder)
        config_path, config = exported_config(folder, is_adapter)
        tokenizer = load_tokenizer(str(folder))
        try:
            encoder = PairEncoder(tokenizer, default_source if max_source_length is None else max_source_length,
                                  default_target if max_target_length is None else max_target_length,
                                  config.get(REWARD_POSITION_KEY, "template_end"))
        except ValueError as err:
            raise ScoreError(f"{config_path}: {err}") from None
        reward_model = load_reward_model(folder, is_adapter, base_model, torch_dtype, tokenizer).to(where)
        return cls(folder, reward_model, encoder, where, mean, std)

    def rewards(self, rows: list[list[int]], batch_size: int, desc: str | None = None) -> list[float]:
        """Reward of every token-id row (normalised when loaded so); a progress bar only when desc is given."""
        raw = score_rows(self.model, rows, self.encoder.tokenizer.pad_token_id, batch_size, self.device, desc)
        return [(r - self.mean) / self.std for r in raw]


@torch.no_grad()
def score_rows(model: RewardModel, rows: list[list[int]], pad_token_id: int, batch_size: int,
               device: torch.device, desc: str | None = None) -> list[float]:
    """Reward of every token-id row, in order; rows are batched by length to waste little padding."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    rewards = [0.0] * len(rows)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=None if desc else True):
        chunk = order[start:start + batch_size]
        input_ids, attention_mask = pad_rows([rows[i] for i in chunk], pad_token_id)
        values = model(input_ids.to(device), attention_mask.to(device)).cpu().tolist()
        for i, value in zip(chunk, values):
            rewards[i] = value
    return rewards
