"""Fault suite for output_dir (issue 13, class 4): one run per output_dir (run.lock: pid, host, start time; a stale
lock taken over with a warning) and --overwrite_output_dir removing the previous run's outputs, so that rotation and
`latest` never mix two runs. Refusals assert exit code 2, the holder named and output_dir left as it was."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, main_caller, snapshot
from rm.checkpoint import complete_checkpoints, latest_checkpoint
from rm.run_lock import _process_start
from rm.outputs import RUN_LOCK

RUN = ["--model_name_or_path", "tiny", "--use_peft", "false", "--gradient_checkpointing", "false",
       "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
       "--train_file_dir", ROOT / "data/sample/train.jsonl", "--validation_file_dir", ROOT / "data/sample/eval.jsonl",
       "--max_train_samples", "40", "--max_eval_samples", "8", "--logging_steps", "1", "--report_to", "none"]


@pytest.fixture
def call_main(capsys):
    """train.py's main in this process with the RUN settings; returns (exit code, stdout + stderr)."""
    return main_caller(capsys, RUN, with_stdout=True)


@pytest.fixture
def sleeper():
    """A live process of this host that is not a run (its pid holds a lock in some cases)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def holder(pid: int, host: str | None = None, process_start: str | None = "same") -> dict:
    return {"pid": pid, "host": host or socket.gethostname(),
            "process_start": _process_start(pid) if process_start == "same" else process_start,
            "started": "2026-11-29 10:00:00 UTC", "command": "train.py --output_dir x"}


# case: (lock content from the live `sleeper` pid, is it refused, message pieces)
LOCKS = {
    "live_run_on_this_host": (lambda pid: holder(pid), True, ["is in use by another run: pid {pid} on host"]),
    "run_on_another_host": (lambda pid: holder(pid, host="node-17"), True,
                            ["is locked by pid {pid} on host node-17", "if no run writes there, delete {lock}"]),
    "unreadable_lock": (lambda pid: "not json", True, ["has an unreadable lock {lock}", "delete it"]),
    "dead_pid": (lambda pid: holder(dead_pid(), process_start=None), False, ["no longer running", "taking over"]),
    "pid_reused_by_another_process": (lambda pid: holder(pid, process_start="another-boot:1"), False,
                                      ["no longer running", "taking over its lock {lock}"]),
}


@pytest.mark.parametrize("case", sorted(LOCKS))
def test_a_locked_output_dir(tmp_path, call_main, sleeper, case):
    content, refused, pieces = LOCKS[case]
    out = tmp_path / "out"
    out.mkdir()
    lock = out / RUN_LOCK
    written = content(sleeper.pid)
    lock.write_text(written if isinstance(written, str) else json.dumps(written))
    before = snapshot(out)
    bad_data = tmp_path / "train.jsonl"  # the stale cases take the lock, then stop at once on this data
    bad_data.write_text('{"chosen": "a"}\n')
    code, err = call_main("--output_dir", out, "--max_steps", 2, "--train_file_dir", bad_data)
    assert code == 2, err
    pid = written["pid"] if isinstance(written, dict) else None
    for piece in pieces:
        assert piece.format(pid=pid, lock=lock) in err, (piece, err)
    if refused:
        assert snapshot(out) == before
    else:
        assert f"{bad_data}:1" in err and not lock.exists(), err  # taken over, then released
        assert os.listdir(out) == []


def test_two_runs_at_once_and_the_lock_of_a_killed_run(tmp_path, call_main):
    out = tmp_path / "out"
    args = [str(a) for a in [*RUN, "--output_dir", out, "--save_steps", 1000]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "train.py", *args, "--max_steps", "400"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / RUN_LOCK).exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "train.py", *args, "--max_steps", "2"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second was refused: make it longer"
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by another run: pid {first.pid} on host {socket.gethostname()}" in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # as a node failure would: no handler runs, the lock stays
        first.wait()
    assert json.loads((out / RUN_LOCK).read_text())["pid"] == first.pid
    code, err = call_main("--output_dir", out, "--max_steps", 2, "--save_steps", 1)
    assert code == 0, err
    assert f"locked by a run that is no longer running (pid {first.pid}" in err
    assert not (out / RUN_LOCK).exists() and (out / "model").is_dir()


def test_overwrite_removes_the_previous_runs_outputs_so_runs_never_mix(tmp_path, call_main):
    out = tmp_path / "out"
    code, err = call_main("--output_dir", out, "--max_steps", 6, "--save_steps", 2, "--save_total_limit", 3)
    assert code == 0, err
    assert [Path(p).name for p in complete_checkpoints(str(out))] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    (out / "notes.txt").write_text("the user's own file")
    code, err = call_main("--output_dir", out, "--max_steps", 3, "--save_steps", 1, "--save_total_limit", 3,
                          "--overwrite_output_dir", "true", "--seed", 7)
    assert code == 0, err
    assert "--overwrite_output_dir: removed the previous run's outputs" in err and "checkpoint-6" in err, err
    kept = complete_checkpoints(str(out))
    assert [Path(p).name for p in kept] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert latest_checkpoint(str(out)).endswith("checkpoint-3")
    for path in kept:  # every checkpoint is the new run's
        assert json.loads((Path(path) / "training_config.json").read_text())["seed"] == 7
    assert (out / "notes.txt").read_text() == "the user's own file"
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert max(h["step"] for h in history) == 3
    assert not (out / RUN_LOCK).exists()


def test_another_rank_checking_while_rank_0_takes_the_lock_sees_an_empty_output_dir(tmp_path, monkeypatch):
    """The race CI hit on a 2-process run: rank 1 checked output_dir while rank 0's lock draft was on disk (written,
    not yet linked into place) and refused the run's own fresh output_dir as 'not empty'. Here the other rank's checks
    run at exactly that moment."""
    import rm.run_lock
    from rm.checkpoint import prepare_output_dir
    from rm.config import parse_config
    from rm.run_lock import hold_output_dir
    from rm.runtime import check_output_dir

    out = tmp_path / "out"
    cfg = parse_config(["--output_dir", str(out), *map(str, RUN)])
    seen, link = [], os.link

    def other_rank_checks_then_link(source, target):
        seen.append(sorted(os.listdir(out)))
        check_output_dir(cfg)
        assert prepare_output_dir(cfg) is None
        link(source, target)

    monkeypatch.setattr(rm.run_lock.os, "link", other_rank_checks_then_link)
    with hold_output_dir(cfg):
        assert sorted(os.listdir(out)) == [RUN_LOCK]
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0] != RUN_LOCK  # the draft was there, alone


def test_a_stale_lock_taken_over_meanwhile_by_another_run_is_not_removed(tmp_path, monkeypatch, sleeper):
    """Two runs take over the same stale lock at once: the first removes it and writes its own, which may get the
    freed inode number back. The second must not remove that live lock on the strength of the inode alone; here
    the live lock is written in place (same inode) between the second run's look and its removal."""
    import rm.run_lock
    from rm.config import ConfigError, parse_config
    from rm.run_lock import hold_output_dir

    out = tmp_path / "out"
    out.mkdir()
    lock = out / RUN_LOCK
    lock.write_text(json.dumps(holder(dead_pid(), process_start=None)))
    warn = rm.run_lock.warn

    def another_run_takes_it_over(message):
        warn(message)
        with open(lock, "r+", encoding="utf-8") as f:  # in place: the inode the stale lock had
            f.truncate(0)
            json.dump(holder(sleeper.pid), f)

    monkeypatch.setattr(rm.run_lock, "warn", another_run_takes_it_over)
    with pytest.raises(ConfigError, match=f"is in use by another run: pid {sleeper.pid}"):
        with hold_output_dir(parse_config(["--output_dir", str(out), *map(str, RUN)])):
            pass
    assert json.loads(lock.read_text())["pid"] == sleeper.pid
