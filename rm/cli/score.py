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
Bad settings, a data file without records, and an output or summary that exists (without `--overwrite true`) or is
a directory are refused in one `error:` line, exit 2, before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig
from transformers.hf_argparser import string_to_bool

from rm.cli import DefaultsHelpFormatter, OneLineParser
from rm.config import ConfigError
from rm.data import DataError, Pair, read_pairs, read_records
from rm.encoding import PairEncoder
from rm.loss import reward_metrics
from rm.model import LOAD_ERRORS, cannot_load, check_model_sources
from rm.outputs import ADAPTER_DIR, MODEL_DIR, SCORES_DIR
from rm.runtime import progress_bars_only_on_a_terminal
from rm.scoring import ScoreError, Scorer, adapter_base, check_lengths, resolve_model_dir


# --------------------------------------------------------------------------------------------- data
def _text_records(location: str) -> list[tuple[str, str]] | None:
    """(location, text) of every record when the data is texts (.txt lines, or records with a 'text' field and no
    pair fields); None when it is preference data. Read through rm.data's one reader; a file without records is
    refused as read_pairs refuses it (an empty list here would read as zero texts)."""
    texts = []
    for source, records in read_records(location):
        found = 0
        for where, record in records:
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, dict) or "text" not in record or "chosen" in record:
                return None
            if not isinstance(record["text"], str) or not record["text"].strip():
                raise DataError(where, "field 'text' must be a non-empty string (an empty text has no token to score)")
            texts.append((where, record["text"]))
            found += 1
        if not found:
            raise DataError(source, "holds no records")
    return texts


def _encode_texts(texts: list[tuple[str, str]], encoder: PairEncoder) -> tuple[list[list[int]], list[dict]]:
    """Token rows (cut at the run's total length) and output records of plain texts."""
    limit = encoder.max_source_length + encoder.max_target_length
    return [encoder.text_ids(text)[:limit] for _, text in texts], [{"source": where} for where, _ in texts]


def _encode_pairs(pairs: list[Pair], encoder: PairEncoder) -> tuple[list[list[int]], list[dict], list[int]]:
    """Token rows (chosen, rejected per kept pair), output records, and the indices of the records kept."""
    rows, records, kept = [], [], []
    for pair in pairs:
        encoded, _ = encoder.encode(pair)
        record = {"source": pair.source}
        if encoded is None:
            record["dropped"] = "chosen and rejected identical after truncation"
        else:
            kept.append(len(records))
            rows += [encoded["chosen_input_ids"], encoded["rejected_input_ids"]]
        records.append(record)
    return rows, records, kept


# --------------------------------------------------------------------------------------------- checks
def check_settings(args: argparse.Namespace) -> None:
    """Numbers below 1 and a device this machine lacks, refused before anything is read or loaded."""
    if args.batch_size < 1:
        raise ScoreError(f"--batch_size is {args.batch_size}; expected a positive integer")
    check_lengths(args.max_source_length, args.max_target_length)
    check_device(args.device)


def available_devices() -> list[str]:
    """The --device values this machine can run: auto, cpu, and the CUDA / MPS devices present."""
    count = torch.cuda.device_count()
    cuda = ["cuda", *(f"cuda:{i}" for i in range(count))] if count else []
    return ["auto", "cpu", *cuda, *(["mps"] if torch.backends.mps.is_available() else [])]


def check_device(device: str) -> None:
    """A device name torch knows and this machine has (cpu in any spelling torch accepts)."""
    available = available_devices()
    try:
        parsed = torch.device(device) if device != "auto" else None
    except RuntimeError:  # not a device name torch knows
        raise ScoreError(f"--device {device}: not a device; available here: {', '.join(available)}") from None
    if parsed is not None and parsed.type != "cpu" and str(parsed) not in available:
        raise ScoreError(f"--device {device}: not on this machine; available here: {', '.join(available)}")


def check_base_model(folder: Path, is_adapter: bool, base_model: str | None) -> None:
    """An adapter's base model must be a complete local folder, or a name that can be loaded (its config is read
    now, so an offline hub name fails before the data is read); --base_model means nothing for a merged model."""
    if not is_adapter:
        if base_model:
            raise ScoreError(f"--base_model is for a LoRA adapter, and {folder} is a merged model (pass --adapter to "
                             "score a training output directory's adapter/ on that base)")
        return
    base = adapter_base(folder, base_model)
    option = "--base_model" if base_model else f"{folder / 'adapter_config.json'}: base model"
    check_model_sources(base, None, model_option=option)
    setting = f"{option} {base}"
    try:
        AutoConfig.from_pretrained(base, trust_remote_code=False)
    except LOAD_ERRORS as err:
        raise cannot_load(setting, err) from None


def check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Every file score writes: not a directory, not existing unless --overwrite, in a folder that can be made."""
    for path in paths:
        if path.is_dir():
            raise ScoreError(f"{path} is a directory: --output takes the file to write (its summary goes beside it)")
        if path.exists() and not overwrite:
            raise ScoreError(f"{path} exists: pass --overwrite true to replace it")
    folder = next(parent for parent in paths[0].parents if parent.exists())
    if not folder.is_dir():
        raise ScoreError(f"{paths[0]}: {folder} is a file, not a folder")


# --------------------------------------------------------------------------------------------- main
def default_output(folder: Path, data: str) -> Path:
    """scores/DATA_NAME.scores.jsonl in the training output directory the model folder belongs to (the model
    folder itself when it stands alone): never the current directory, never beside the data (a data folder would
    then hold a jsonl that is not data)."""
    root = folder.parent if folder.name in (MODEL_DIR, ADAPTER_DIR) else folder
    name = Path(data.rstrip("/")).stem or "data"
    return root / SCORES_DIR / f"{name}.scores.jsonl"


def summary_path(output: Path) -> Path:
    return output.with_suffix(".summary.json")


def score(args: argparse.Namespace) -> dict[str, Any]:
    """Score args.data with args.model; every setting, output file and the data are checked before the model is
    loaded."""
    check_settings(args)
    folder, is_adapter = resolve_model_dir(args.model, args.adapter)
    output = Path(args.output) if args.output else default_output(folder, args.data)
    check_outputs([output, summary_path(output)], args.overwrite)
    check_base_model(folder, is_adapter, args.base_model)
    texts = _text_records(args.data)
    pairs = [] if texts is not None else read_pairs(args.data, for_training=False,
                                                     log=lambda m: print(m, file=sys.stderr))
    scorer = Scorer.load(args.model, args.adapter, args.base_model, args.device, args.dtype, args.normalize,
                         args.max_source_length, args.max_target_length)
    encoder = scorer.encoder
    kept: list[int] = []
    if texts is not None:
        rows, records = _encode_texts(texts, encoder)
    else:
        rows, records, kept = _encode_pairs(pairs, encoder)

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
    summary_path(output).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m rm.score", description=__doc__.split("\n\n")[0],
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
    except (ScoreError, DataError, ConfigError) as err:  # ConfigError: a tokenizer that cannot be loaded
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
