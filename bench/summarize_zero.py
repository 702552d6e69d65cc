"""The results table of bench/gpu_zero.sh, read from its runs.log (train.py's per-step log lines).

    python bench/summarize_zero.py RESULTS_DIR/runs.log

Per run (`=== stage S, MODE` header): tokens/s per GPU = median over the steps after the first 3 (warm-up) of
train.py's tokens_per_s (real, unpadded tokens, all processes) / processes; peak memory = the largest per-step
torch.cuda.max_memory_allocated; the loss at the last logged step; and the largest per-step relative difference
of the train loss from the run without DeepSpeed (stage 0) of the same mode.
"""

from __future__ import annotations

import re
import statistics
import sys

WARMUP_STEPS = 3
HEADER = re.compile(r"^=== stage (\d), (\w+)")
RUN = re.compile(r"^run: \w+, ZeRO stage \d, (\d+) processes")
STEP = re.compile(r"step (\d+)/\d+ ((?:\w+=\S+ ?)+)")


def parse(log_path: str) -> dict[tuple[int, str], dict]:
    runs: dict[tuple[int, str], dict] = {}
    current = None
    with open(log_path, encoding="utf-8", errors="replace") as log:
        for line in log:
            if header := HEADER.match(line):
                current = runs.setdefault((int(header[1]), header[2]), {"processes": 1, "steps": []})
            elif current is not None and (run := RUN.match(line)):
                current["processes"] = int(run[1])
            elif current is not None:
                for step in STEP.finditer(line):  # tqdm may share the line; the values are name=value pairs
                    values = dict(pair.split("=", 1) for pair in step[2].split())
                    current["steps"].append({"step": int(step[1]), **{k: float(v) for k, v in values.items()}})
    return runs


def table(runs: dict[tuple[int, str], dict]) -> str:
    rows = ["| ZeRO stage | mode | GPUs | tokens/s per GPU | peak memory per GPU (GiB) | loss at last step (step) "
            "| max per-step loss rel. diff vs no DeepSpeed |", "|---|---|---|---|---|---|---|"]
    for (stage, mode), run in sorted(runs.items(), key=lambda item: (item[0][1], item[0][0])):
        steps = run["steps"]
        if not steps:
            rows.append(f"| {stage or 'none'} | {mode} | {run['processes']} | not finished | | | |")
            continue
        speed = statistics.median(s["tokens_per_s"] for s in steps[WARMUP_STEPS:]) / run["processes"]
        memory = max(s["peak_memory_gb"] for s in steps)
        reference = runs.get((0, mode), {}).get("steps")
        parity = "-"
        if stage and reference:
            parity = f"{max(abs(a['loss'] - b['loss']) / abs(b['loss']) for a, b in zip(steps, reference)):.1e}"
        rows.append(f"| {stage or 'none'} | {mode} | {run['processes']} | {speed:,.0f} | {memory:.1f} | "
                    f"{steps[-1]['loss']:.4f} ({steps[-1]['step']}) | {parity} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(parse(sys.argv[1])))
