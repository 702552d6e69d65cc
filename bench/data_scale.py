"""Data at scale: generated TRL-layout pairs read, checked and tokenized by train.py, cold and from the token cache.

    python bench/data_scale.py --pairs 100000 [--workdir /tmp/rm-data-scale] [--two_processes]

Writes PAIRS pairs of ~220 words (TRL conversational layout: an 80-word user prompt, 70-word chosen and rejected
replies; words drawn, seeded, from the tiny tokenizer's vocabulary) once, then runs train.py on them (tiny model,
one optimizer step, every pair, a fresh token cache) and prints, from each run's log and /usr/bin/time:
  cold      read + check + tokenize time and pairs/s, seconds from launch to data ready and to the model built,
            peak RSS of the process;
  warm      the same command again (token cache hit);
  2 procs   (--two_processes) `accelerate launch --multi_gpu --num_processes 2` on CPU with a fresh cache: setup
            seconds against the 1-process cold run, how many processes tokenized, peak RSS of the largest process.
Exits non-zero when a run fails. The numbers depend on the machine's load: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = {"prompt": 80, "chosen": 70, "rejected": 70}


def write_pairs(path: Path, pairs: int) -> None:
    spec = json.loads((ROOT / "rm/assets/tiny_tokenizer/tokenizer.json").read_text())
    vocabulary = sorted(k[1:] for k in spec["model"]["vocab"] if k.startswith("Ġ") and k[1:].isalpha() and len(k) <= 7)
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choices(vocabulary, k=n)).capitalize() + "."  # noqa: E731
    draft = path.with_suffix(".tmp")
    with draft.open("w") as f:
        for _ in range(pairs):
            f.write(json.dumps({"prompt": [{"role": "user", "content": text(WORDS["prompt"])}],
                                "chosen": [{"role": "assistant", "content": text(WORDS["chosen"])}],
                                "rejected": [{"role": "assistant", "content": text(WORDS["rejected"])}]}) + "\n")
    draft.rename(path)


def run(name: str, data: Path, workdir: Path, cache: str, processes: int = 1) -> dict:
    """One train.py run under /usr/bin/time -v; the numbers its log and time give."""
    out, log = workdir / f"out-{name}", workdir / f"{name}.log"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "RM_CACHE_DIR": str(workdir / f"cache-{cache}")}
    launcher = [sys.executable, "train.py"]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", "29761", "train.py"]
    cmd = ["/usr/bin/time", "-v", *launcher, "--model_name_or_path", "tiny", "--train_file_dir", str(data),
           "--max_train_samples", "-1", "--max_steps", "1", "--report_to", "none", "--output_dir", str(out)]
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - started
    log.write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{name}: exit {proc.returncode}; see {log}\n{proc.stderr[-2000:]}")
    text = proc.stdout + proc.stderr

    def number(pattern: str) -> float | None:
        found = re.search(pattern, text)
        return float(found.group(1)) if found else None

    return {"name": name, "wall_s": wall,
            "tokenize_s": number(r"pairs read and tokenized in ([\d.]+) s"),
            "pairs_per_s": number(r"read and tokenized in [\d.]+ s \((\d+) pairs/s\)"),
            "data_ready_s": number(r"data read and tokenized at ([\d.]+) s"),
            "model_built_s": number(r"model built at ([\d.]+) s"),
            "setup_s": number(r"setup: ([\d.]+) s after launch"),
            "first_step_s": number(r"first optimizer step done ([\d.]+) s"),
            "peak_rss_gb": number(r"Maximum resident set size \(kbytes\): (\d+)") / 1e6,
            "tokenized_by": len(re.findall(r"\] data: reading and tokenizing", text))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--workdir", default="/tmp/rm-data-scale")
    parser.add_argument("--two_processes", action="store_true")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / f"pairs-{args.pairs}.jsonl"
    if not data.exists():
        write_pairs(data, args.pairs)
    for cache in workdir.glob("cache-*"):
        shutil.rmtree(cache)
    results = [run("cold", data, workdir, "one"), run("warm", data, workdir, "one")]
    if args.two_processes:
        results.append(run("2-processes", data, workdir, "two", processes=2))
    print(f"\n{args.pairs} pairs, {data.stat().st_size / 1e6:.0f} MB ({data}); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; logs in {workdir}")
    columns = ["name", "tokenize_s", "pairs_per_s", "data_ready_s", "model_built_s", "setup_s", "first_step_s",
               "peak_rss_gb", "tokenized_by"]
    print(" | ".join(columns))
    for r in results:
        print(" | ".join("-" if r[c] is None else f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])
                         for c in columns))
    if args.two_processes:
        print(f"2-process setup / 1-process setup (cold): {results[2]['setup_s'] / results[0]['setup_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
