"""The TRL side of bench/quality_sweep.py: TRL's RewardTrainer on a train file, then its accuracy on held-out pairs.

    python bench/quality_trl.py MODEL_DIR TRAIN_FILE HELDOUT_FILE OUTPUT_DIR --learning_rate 2e-4 [--full] [--seed 42]

Both files are read with this project's reader (rm.data.read_pairs), so TRL sees exactly the conversations train.py
sees, handed over in TRL's conversational layout (prompt messages + one assistant message each side); TRL renders
them with the same chat template. Batch: 8 pairs per step with no accumulation, the same gradient as the original
1 pair x GA 8 (mean over the 8 pairs either way) without eight micro-steps; checkpointing off (memory only).
Everything else is TRL's default or the original recipe (LoRA r8 / alpha 16 / dropout 0.05 all-linear, which
TRL's default disable_dropout sets to 0 with the model's own dropout; warmup 5%,
linear decay, weight decay 0.001, bf16). Prints one line: QUALITY {json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rm.data import read_pairs  # noqa: E402


def conversational(location: str) -> list[dict]:
    rows = []
    for pair in read_pairs(location):
        row = {"chosen": [{"role": "assistant", "content": pair.chosen}],
               "rejected": [{"role": "assistant", "content": pair.rejected}]}
        if pair.prompt:
            row["prompt"] = pair.prompt
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("model_dir", "train_file", "heldout_file", "output_dir"):
        parser.add_argument(name)
    parser.add_argument("--learning_rate", type=float, required=True)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=1, dtype=torch.bfloat16)
    config = RewardConfig(output_dir=args.output_dir, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                          per_device_eval_batch_size=1, learning_rate=args.learning_rate, weight_decay=0.001,
                          warmup_steps=0.05, lr_scheduler_type="linear", num_train_epochs=1, max_length=1280,
                          bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                          gradient_checkpointing=False, logging_steps=10, report_to=[],
                          save_strategy="no", dataloader_num_workers=0, seed=args.seed)
    lora = None if args.full else LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="SEQ_CLS")
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(conversational(args.train_file)),
                            processing_class=tokenizer, peft_config=lora)
    start = time.time()
    trainer.train()
    train_s = time.time() - start
    heldout = trainer._prepare_dataset(Dataset.from_list(conversational(args.heldout_file)), tokenizer, config, "eval")
    metrics = trainer.evaluate(heldout)
    print("QUALITY " + json.dumps({
        "trainer": "trl", "learning_rate": args.learning_rate, "full": args.full, "seed": args.seed,
        "train_pairs": len(trainer.train_dataset), "heldout_pairs": len(heldout),
        "accuracy": metrics["eval_accuracy"], "steps": trainer.state.global_step, "train_s": round(train_s, 1)}))


if __name__ == "__main__":
    main()
