"""Score data with a trained reward model: one reward per record, written as jsonl.

    python -m rm.score --model OUTPUT_DIR --data FILE [--output scores.jsonl] [--normalize] [--device cuda]

`--model` takes a training output directory (its merged `model/`, or `adapter/` with `--adapter`), a merged model
folder, or a LoRA adapter folder (the base model is read from its adapter_config.json, or `--base_model`).
`--data` takes any preference layout train.py reads (pairs are rendered exactly as in training, with the reward
position recorded in the model's config.json; empty replies are scored too; the summary gives accuracy and margin),
a jsonl/json file of records with a `text` field, or a .txt file with one text per line (plain texts are scored as
written: render chat turns yourself, ending them as the model was trained). The reward is read at the last real
token, through the trainer's own forward (rm.model.RewardModel), so the scores equal the trainer's eval rewards.
`--normalize` maps rewards to (reward - mean) / std with the eval-set statistics stored in the exported config.
The output goes to the model's training output directory (`scores/DATA_NAME.scores.jsonl`) unless `--output`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.hf_argparser import string_to_bool

from rm.config import TrainConfig
from rm.cli import DefaultsHelpFormatter
from rm.data import DataError, Pair, read_pairs, read_records
from rm.encoding import PairEncoder, pad_rows
from rm.loss import reward_metrics
from rm.outputs import ADAPTER_DIR, MODEL_DIR, SCORES_DIR, TRAINING_CONFIG
from rm.model import RewardModel, load_tokenizer
from rm.runtime import progress_bars_only_on_a_terminal

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


def load_reward_model(folder: Path, is_adapter: bool, base_model: str | None, dtype: torch.dtype,
                      tokenizer: Any) -> RewardModel:
    from transformers import AutoModelForSequenceClassification

    if not is_adapter:
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=dtype)
    else:
        from peft import PeftModel

        base = base_model or json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ScoreError(f"{folder}/adapter_config.json names no base model: pass --base_model PATH")
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)
        model = PeftModel.from_pretrained(model, folder)
    model.config.pad_token_id = tokenizer.pad_token_id
    return RewardModel(model).eval()


def exported_config(folder: Path, is_adapter: bool) -> tuple[Path, dict[str, Any]]:
    """The merged model's config.json (path, contents), where train.py records reward statistics and position."""
    config_path = (folder.parent / MODEL_DIR if is_adapter else folder) / "config.json"
    return config_path, json.loads(config_path.read_text()) if config_path.is_file() else {}


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


def training_lengths(folder: Path) -> tuple[int, int]:
    """max_source_length / max_target_length of the run that made the model, else the trainer's defaults."""
    defaults = TrainConfig()
    for candidate in (folder.parent / TRAINING_CONFIG, folder / TRAINING_CONFIG):
        if candidate.is_file():
            cfg = json.loads(candidate.read_text())
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
        folder, is_adapter = resolve_model_dir(model, adapter)
        mean, std = normalization_stats(folder, is_adapter) if normalize else (0.0, 1.0)
        where = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = {"auto": torch.bfloat16 if where.type == "cuda" else torch.float32, "float32": torch.float32,
                       "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        default_source, default_target = training_lengths(folder)
        config_path, config = exported_config(folder, is_adapter)
        tokenizer = load_tokenizer(str(folder))
        try:
            encoder = PairEncoder(tokenizer, max_source_length or default_source, max_target_length or default_target,
                                  config.get(REWARD_POSITION_KEY, "template_end"))
        except ValueError as err:
            raise ScoreError(f"{config_path}: {err}") from None
        reward_model = load_reward_model(folder, is_adapter, base_model, torch_dtype, tokenizer).to(where)
        return cls(folder, reward_model, encoder, where, mean, std)

    def rewards(self, rows: list[list[int]], batch_size: int, desc: str | None = None) -> list[float]:
        """Reward of every token-id row (normalised when loaded so); a progress bar only when desc is given."""
        raw = score_rows(self.model, rows, self.encoder.tokenizer.pad_token_id, batch_size, self.device, desc)
        return [(r - self.mean) / self.std for r in raw]


# --------------------------------------------------------------------------------------------- data
def _text_records(location: str) -> list[tuple[str, str]] | None:
    """(location, text) of every record when the data is texts (.txt lines, or records with a 'text' field and no
    pair fields); None when it is preference data. Read through rm.data's one reader."""
    texts = []
    for _, records in read_records(location):
        for where, record in records:
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, dict) or "text" not in record or "chosen" in record:
                return None
            if not isinstance(record["text"], str) or not record["text"].strip():
                raise DataError(where, "field 'text' must be a non-empty string (an empty text has no token to score)")
            texts.append((where, record["text"]))
    return texts


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


# --------------------------------------------------------------------------------------------- main
def default_output(args: argparse.Namespace) -> Path:
    """scores/DATA_NAME.scores.jsonl in the training output directory the model belongs to (the model folder
    itself when it stands alone): never the current directory, never beside the data (a data folder would then
    hold a jsonl that is not data)."""
    folder, _ = resolve_model_dir(args.model, args.adapter)
    root = folder.parent if folder.name in (MODEL_DIR, ADAPTER_DIR) else folder
    name = Path(args.data.rstrip("/")).stem or "data"
    return root / SCORES_DIR / f"{name}.scores.jsonl"


def score(args: argparse.Namespace) -> dict[str, Any]:
    output = Path(args.output) if args.output else default_output(args)
    if output.exists() and not args.overwrite:
        raise ScoreError(f"{output} exists: pass --overwrite true to replace it")
    scorer = Scorer.load(args.model, args.adapter, args.base_model, args.device, args.dtype, args.normalize,
                         args.max_source_length, args.max_target_length)
    encoder = scorer.encoder
    texts = _text_records(args.data)
    records: list[dict[str, Any]] = []
    if texts is not None:
        limit = encoder.max_source_length + encoder.max_target_length
        rows = [encoder.text_ids(text)[:limit] for _, text in texts]
        records = [{"source": where} for where, _ in texts]
        pairs: list[Pair] = []
    else:
        pairs = read_pairs(args.data, for_training=False, log=lambda m: print(m, file=sys.stderr))
        rows, kept = [], []
        for pair in pairs:
            encoded, _ = encoder.encode(pair)
            record = {"source": pair.source}
            if encoded is None:
                record["dropped"] = "chosen and rejected identical after truncation"
            else:
                kept.append(len(records))
                rows += [encoded["chosen_input_ids"], encoded["rejected_input_ids"]]
            records.append(record)

    rewards = scorer.rewards(rows, args.batch_size, f"Scoring {Path(args.data).name}")
    summary: dict[str, Any] = {"model": str(scorer.folder), "data": args.data, "normalized": bool(args.normalize),
                               "max_source_length": encoder.max_source_length,
                               "max_target_length": encoder.max_target_length,
                               "reward_position": encoder.reward_position}
    if pairs:
        chosen, rejected = torch.tensor(rewards[0::2]), torch.tensor(rewards[1::2])
        for index, c, r in zip(kept, chosen.tolist(), rejected.tolist()):
            records[index].update(chosen_reward=c, rejected_reward=r, margin=c - r)
        summary.update(reward_metrics(chosen, rejected), pairs=len(kept), dropped=len(pairs) - len(kept))
    else:
        for record, value in zip(records, rewards):
            record["reward"] = value
        values = torch.tensor(rewards, dtype=torch.float64)
        summary.update(texts=len(records), reward_mean=values.mean().item(),
                       reward_std=values.std(unbiased=False).item())

    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary["output"] = str(output)
    output.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rm.score", description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="training output dir, merged model folder or adapter folder")
    parser.add_argument("--data", required=True, help="preference data (any train.py layout) or texts (.txt, "
                                                      "jsonl/json with 'text')")
    parser.add_argument("--output", help="jsonl to write (default: MODEL_OUTPUT_DIR/scores/DATA_NAME.scores.jsonl); "
                                         "a summary goes next to it as .summary.json")
    parser.add_argument("--overwrite", type=string_to_bool, nargs="?", const=True, default=False,
                        help="replace an existing output")
    parser.add_argument("--adapter", action="store_true", help="load base model + LoRA adapter, not the merged one")
    parser.add_argument("--base_model", help="base model of an adapter (default: from adapter_config.json)")
    parser.add_argument("--normalize", action="store_true", help="(reward - mean) / std, the stored eval statistics")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--max_source_length", type=int, help="default: the training run's (training_config.json)")
    parser.add_argument("--max_target_length", type=int, help="default: the training run's (training_config.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    progress_bars_only_on_a_terminal()
    args = parse_args(argv)
    try:
        summary = score(args)
    except (ScoreError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "accuracy" in summary:
        print(f"{summary['pairs']} pairs ({summary['dropped']} dropped): accuracy {summary['accuracy']:.4f}, "
              f"mean margin {summary['margin']:.4f}, chosen {summary['reward_chosen']:.4f}, "
              f"rejected {summary['reward_rejected']:.4f}")
    else:
        print(f"{summary['texts']} texts: reward mean {summary['reward_mean']:.4f}, std {summary['reward_std']:.4f}")
    print(f"wrote {summary['output']}" + (" (normalized)" if summary["normalized"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
