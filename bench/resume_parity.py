"""Resume parity under DeepSpeed: for ZeRO-2 and ZeRO-3, full fine-tuning and LoRA, one run is stopped with SIGTERM
after step STOP_AT (it saves a checkpoint at the step it stops and prints its resume command), that printed command
resumes it to the end (the checkpoint loads through rm/safe_checkpoint.py's restricted loader: `load_checkpoint`
has no other path), and an uninterrupted run gives the reference loss curve (metrics.json history). One process per
run, bf16 on a CUDA GPU (fp32 with --cpu), a small random Qwen3 *causal LM* (so the score head is created as for a
real checkpoint), the repo's sample data. The four configurations run side by side.

    python bench/resume_parity.py LOG_DIR [--cpu] [--configs zero2-full,zero3-lora]
                                               (prints one table row per configuration; exit 1 on a failure)

Tolerance: every step's loss within 1e-2 of the uninterrupted run under bf16 (bf16 keeps ~3 significant digits, and
CUDA's backward kernels are not bitwise deterministic, so two uninterrupted runs differ at the 1e-3 level; a resume
that loses the data position, the optimizer state or the LR schedule differs by 4e-2 or more: docs/mutation_check.md
13-15), 1e-5 in fp32 on the CPU (deterministic there).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS, STOP_AT = 16, 6
STAGES, MODES = (2, 3), ("full", "lora")
RESUME_LINE = "Resume with: "


def write_model(path: Path, cpu: bool) -> Path:
    """A random Qwen3 causal LM (no score head) with the tiny tokenizer: hidden 256, 4 layers (tiny on --cpu)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rm.model import TINY, load_tokenizer, tiny_config

    tokenizer = load_tokenizer(TINY)
    config = tiny_config(tokenizer) if cpu else tiny_config(tokenizer, hidden_size=256, num_layers=4)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def command(stage: int, mode: str, model: Path, out: Path, port: int, cpu: bool) -> list[str]:
    precision = "no" if cpu else "bf16"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "accelerate_configs" / f"zero{stage}_1node.yaml"), "--num_processes", "1",
            "--mixed_precision", precision, "--main_process_port", str(port), "train.py",
            "--model_name_or_path", str(model), "--train_file_dir", "data/sample/train.jsonl",
            "--validation_file_dir", "none", "--output_dir", str(out), "--use_peft", str(mode == "lora").lower(),
            "--lora_dropout", "0", "--torch_compile", "false", "--gradient_checkpointing", "false",
            "--max_steps", str(STEPS), "--save_steps", "1000", "--logging_steps", "1",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-4",
            "--report_to", "none", "--bf16", str(not cpu).lower()]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def stop_all_after(runs: list[tuple[subprocess.Popen, Path, Path]], step: int, timeout: float = 300) -> None:
    """SIGTERM to each training process (rank 0's pid, from output_dir/run.lock) once it logged `step`, as a
    scheduler's preemption does; all watched at once (they run side by side)."""
    pending, deadline = list(runs), time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for run in list(pending):
            proc, log, out = run
            if proc.poll() is not None:
                pending.remove(run)  # ended first: reported by the caller (no stop, no resume line)
            elif f"step {step}/{STEPS} " in log.read_text():
                os.kill(json.loads((out / "run.lock").read_text())["pid"], signal.SIGTERM)
                pending.remove(run)
        time.sleep(0.01)


def losses(out: Path) -> dict[int, float]:
    try:
        history = json.loads((out / "metrics.json").read_text())["history"]
    except (OSError, ValueError, KeyError):
        return {}
    return {h["step"]: h["train/loss"] for h in history if "train/loss" in h}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log_dir", type=Path)
    parser.add_argument("--cpu", action="store_true", help="fp32 on the CPU (gloo): a check of this script")
    parser.add_argument("--configs", default=",".join(f"zero{s}-{m}" for s in STAGES for m in MODES),
                        help="a comma-separated subset (all four by default)")
    args = parser.parse_args()
    logs, tolerance = args.log_dir, 1e-5 if args.cpu else 1e-2
    logs.mkdir(parents=True, exist_ok=True)
    model = write_model(logs / "model", args.cpu)
    configs = [(stage, mode) for stage in STAGES for mode in MODES if f"zero{stage}-{mode}" in args.configs.split(",")]
    runs, port = {}, 29760
    for stage, mode in configs:  # phase 1, side by side: the uninterrupted run and the one to stop
        for kind in ("uninterrupted", "stopped"):
            name, port = f"zero{stage}-{mode}-{kind}", port + 1
            out = logs / name
            runs[name] = (start(command(stage, mode, model, out, port, args.cpu), logs / f"{name}.log"), out)
    stop_all_after([(runs[f"zero{s}-{m}-stopped"][0], logs / f"zero{s}-{m}-stopped.log", runs[f"zero{s}-{m}-stopped"][1])
                    for s, m in configs], STOP_AT)
    for proc, _ in runs.values():
        proc.wait(timeout=600)
    resumed = {}
    for stage, mode in configs:  # phase 2: each stopped run resumed with the command it printed
        name = f"zero{stage}-{mode}-stopped"
        printed = [line.split(RESUME_LINE, 1)[1] for line in (logs / f"{name}.log").read_text().splitlines()
                   if RESUME_LINE in line]
        if printed:
            resumed[(stage, mode)] = start(shlex.split(printed[-1]), logs / f"zero{stage}-{mode}-resumed.log")
    for proc in resumed.values():
        proc.wait(timeout=600)

    failures = 0
    print("| config | stopped (exit, step) | resumed exit | steps compared | max abs loss diff | tolerance | result |")
    print("|---|---|---|---|---|---|---|")
    for stage, mode in configs:
        stopped_proc, stopped_out = runs[f"zero{stage}-{mode}-stopped"]
        reference_proc, reference_out = runs[f"zero{stage}-{mode}-uninterrupted"]
        stopped_log = (logs / f"zero{stage}-{mode}-stopped.log").read_text()
        stop_step = next((int(line.split("after optimizer step ")[1].split(";")[0]) for line in
                          stopped_log.splitlines() if "after optimizer step " in line), None)
        resumed_proc = resumed.get((stage, mode))
        got, want = losses(stopped_out), losses(reference_out)
        diffs = [abs(got[s] - want[s]) for s in want if s in got]
        ok = (reference_proc.returncode == 0 and resumed_proc is not None and resumed_proc.returncode == 0
              and stop_step is not None and stop_step < STEPS and sorted(got) == sorted(want) == list(
                  range(1, STEPS + 1)) and max(diffs) <= tolerance
              and "resumed from" in (logs / f"zero{stage}-{mode}-resumed.log").read_text())
        failures += not ok
        print(f"| ZeRO-{stage} {mode} | {stopped_proc.returncode}, {stop_step} | "
              f"{resumed_proc.returncode if resumed_proc else 'not resumed'} | {len(diffs)}/{STEPS} | "
              f"{max(diffs) if diffs else float('nan'):.2e} | {tolerance:g} | {'ok' if ok else 'FAILED'} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
