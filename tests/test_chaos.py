"""Faults survived, as a figure (issue 25): one tiny-model run is killed ten times, SIGKILL and SIGTERM in turn, at
random moments (during setup and restore, mid-step, during a checkpoint save, during the export) and each time
continued with the resume command it printed (its "Resume with:" line). It must end with the final weights of an
uninterrupted run (1e-6, fp32, CPU), the same loss curve, and no stray file in output_dir.

The moments come from a seeded generator: the seed is printed (and named in every failure); RM_CHAOS_SEED=N replays
one. A moment "during a checkpoint save" or "during the export" is found by polling output_dir for the staging
folder that save writes (rm/outputs.py STAGING_PREFIX): no hook in the trainer. A SIGKILL that hit one leaves that
folder behind, which the test asserts; a SIGTERM during the export lets the run finish, as the trainer promises.
"""

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import ROOT
from rm.checkpoint import complete_checkpoints, step_of
from rm.outputs import STAGING_PREFIX

STEPS, SAVE_STEPS, KEEP = 60, 5, 2
ARGS = ["--model_name_or_path", "tiny", "--use_peft", "false", "--gradient_checkpointing", "false",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--report_to", "none",
        "--max_steps", STEPS, "--logging_steps", 1, "--eval_steps", 20, "--save_steps", SAVE_STEPS,
        "--save_total_limit", KEEP, "--seed", 11]
# kill i: (signal, moment). "random": a random step of the training ahead, or (a third of the time, never in the
# first process, which has no checkpoint to resume from yet) a random moment of start-up; "save"/"export": while
# that staging folder exists.
PLAN = [(signal.SIGKILL, "random"), (signal.SIGTERM, "random"), (signal.SIGKILL, "save"), (signal.SIGTERM, "save"),
        (signal.SIGKILL, "random"), (signal.SIGTERM, "random"), (signal.SIGKILL, "random"),
        (signal.SIGTERM, "random"), (signal.SIGKILL, "export"), (signal.SIGTERM, "export")]
RESUME_LINE = "Resume with: "


def train_data(path: Path) -> Path:
    """100 distinct pairs and 20 copies (the held-out split must keep copies of its pairs out of training)."""
    rows = [{"prompt": f"Question {i}?", "chosen": f"A good answer {i}.", "rejected": f"A bad answer {i}."}
            for i in range(100)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:20]))
    return path


class Process:
    """A train.py process whose output lines are collected (with a log file) as they come."""

    def __init__(self, command: list[str], env: dict, log: Path) -> None:
        self.lines: list[str] = []
        self.started_ns = time.time_ns()
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.log = log
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log, "w") as f:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                f.write(line)

    def seen(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for line in self.lines)

    def finish(self, timeout: float = 240) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def tail(self) -> str:
        return "\n".join(self.lines[-25:])


def staging(output_dir: Path, kind: str, since_ns: int) -> list[str]:
    """The staging folders of a checkpoint save ("save") or of the export ("export") made since since_ns (a killed
    save's folder stays until the next save of that kind removes it: it must not count as a save in progress)."""
    prefix = STAGING_PREFIX + ("checkpoint-" if kind == "save" else "model")
    found = []
    for entry in os.scandir(output_dir) if output_dir.is_dir() else []:
        try:
            if entry.name.startswith(prefix) and entry.stat().st_mtime_ns >= since_ns:
                found.append(entry.name)
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    return found


def latest_step(output_dir: Path) -> int:
    checkpoints = complete_checkpoints(str(output_dir))
    return step_of(os.path.basename(checkpoints[-1])) if checkpoints else 0


def strike(process: Process, sig: signal.Signals, moment: str, output_dir: Path, rng: random.Random) -> str:
    """Waits for the moment, sends the signal, waits for the process; returns what the moment turned out to be."""
    start = latest_step(output_dir)
    if moment == "random" and start > 0 and (rng.random() < 1 / 3 or start > STEPS - 12):
        until = time.monotonic() + rng.uniform(0.0, 3.0)  # start-up: imports, reading the data, restoring
        while time.monotonic() < until and not process.seen("resumed from") and process.proc.poll() is None:
            time.sleep(0.002)  # the restore done (training starts now) is the latest start-up moment
        moment = "start-up"
    elif moment == "random":
        target = rng.randint(max(start, SAVE_STEPS) + 1, max(start, SAVE_STEPS) + 4)  # a checkpoint exists by then
        while not process.seen(f"step {target}/") and process.proc.poll() is None:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))  # somewhere in the next step
        moment = f"after step {target}"
    else:
        while not staging(output_dir, moment, process.started_ns) and process.proc.poll() is None:
            time.sleep(0.0005)
    assert process.proc.poll() is None, f"the run ended before the kill ({moment})\n{process.tail()}"
    process.proc.send_signal(sig)
    process.finish()
    return moment


def test_ten_kills_at_random_moments_end_with_the_weights_of_an_uninterrupted_run(tmp_path, capsys):
    seed = int(os.environ.get("RM_CHAOS_SEED", random.SystemRandom().randrange(10 ** 6)))
    rng = random.Random(seed)
    with capsys.disabled():  # shown without -s: the seed, and below the figure
        print(f"\nchaos seed {seed} (RM_CHAOS_SEED={seed} replays it)")
    data = train_data(tmp_path / "train.jsonl")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",  # one core each: the reference runs beside
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/torch_ext")}
    command = lambda out: [sys.executable, "train.py", *map(str, ARGS), "--train_file_dir", str(data),  # noqa: E731
                           "--output_dir", str(out)]
    reference_dir, out = tmp_path / "reference", tmp_path / "chaos"
    reference = Process(command(reference_dir), env, tmp_path / "reference.log")

    resume = command(out) + ["--resume_from_checkpoint", "latest"]  # what the run must print (checked below)
    process, survived = Process(command(out), env, tmp_path / "run-0.log"), []
    for number, (sig, moment) in enumerate(PLAN, start=1):
        where = f"seed {seed}, kill {number} ({sig.name}, {moment})"
        hit = strike(process, sig, moment, out, rng)
        code = process.proc.returncode
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL, f"{where}: exit {code}\n{process.tail()}"
            if moment in ("save", "export"):  # the kill hit the save: its staging folder is left behind
                assert staging(out, moment, process.started_ns), f"{where}: no staging folder left: the kill missed the save"
        elif moment == "export":  # the run finishes the export it was writing, then exits 0
            assert code == 0 and process.seen("SIGTERM arrived after the last step"), f"{where}: exit {code}\n" \
                                                                                       f"{process.tail()}"
        else:  # stopped with a checkpoint (3); during start-up: at once (143), or before Python's handler (-15)
            assert code in (3, 128 + signal.SIGTERM, -signal.SIGTERM), f"{where}: exit {code}\n{process.tail()}"
        printed = [line.split(RESUME_LINE, 1)[1] for line in process.lines if RESUME_LINE in line]
        if code == 3:
            assert printed, f"{where}: no resume command printed\n{process.tail()}"
        for line in printed:
            assert shlex.split(line) == resume, f"{where}: printed {line!r}"
            resume = shlex.split(line)
        survived.append(f"{sig.name} {hit}")
        if code == 0:
            break
        process = Process(resume, env, tmp_path / f"run-{number}.log")
    assert len(survived) == len(PLAN), f"seed {seed}: the run ended after {len(survived)} kills: {survived}"
    with capsys.disabled():
        print(f"\nchaos: {len(survived)} kills survived (seed {seed}): " + "; ".join(survived))

    assert reference.finish() == 0, reference.tail()
    final = lambda d: load_file(str(d / "model" / "model.safetensors"))  # noqa: E731
    want, got = final(reference_dir), final(out)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=lambda m: f"seed {seed}: {name}: {m}")
    curve = lambda d: [(h["step"], h["train/loss"]) for h in json.loads((d / "metrics.json").read_text())[  # noqa: E731
        "history"] if "train/loss" in h]
    assert [s for s, _ in curve(out)] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(curve(out), curve(reference_dir)):
        assert abs(a - b) <= 1e-6, f"seed {seed}: step {step}: loss {a} after the kills, {b} uninterrupted"

    # no stray files: what the uninterrupted run leaves, its checkpoints complete and rotated
    names = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*")  # noqa: E731
                             if step_of(p.relative_to(d).parts[0]) is None)
    assert names(out) == names(reference_dir), f"seed {seed}: stray files"
    checkpoints = sorted(p.name for p in out.iterdir() if step_of(p.name) is not None)
    assert checkpoints == [os.path.basename(c) for c in complete_checkpoints(str(out))] and len(checkpoints) == KEEP
    info = json.loads((out / "run_info.json").read_text())
    assert info["duplicates"] == json.loads((reference_dir / "run_info.json").read_text())["duplicates"]
    assert info["duplicates"]["duplicate_pairs"] == 20
