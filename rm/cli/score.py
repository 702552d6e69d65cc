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
from pathlib import Path
from typing import Any

import torch
from transformers.hf_argparser import string_to_bool

from rm.cli import DefaultsHelpFormatter
from rm.config import ConfigError
from rm.data import DataError, Pair, read_pairs, read_records
from rm.loss import reward_metrics
from rm.outputs import ADAPTER_DIR, MODEL_DIR, SCORES_DIR
from rm.runtime import progress_bars_only_on_a_terminal
from rm.scoring import ScoreError, Scorer, resolve_model_dir


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
