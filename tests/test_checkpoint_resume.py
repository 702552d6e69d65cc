"""Real runs killed and resumed: SIGKILL at a random step then `--resume_from_checkpoint latest` reproduces the
uninterrupted loss curve (CPU fp32, 1e-6); SIGTERM to a 2-process DeepSpeed ZeRO-2 launch saves a complete
checkpoint on every rank and exits non-zero with the resume command, and that resume reproduces the curve too;
so do a resume after SIGKILL of a whole 2-process ZeRO-2 run (launcher and workers) and a ZeRO-3 + LoRA resume."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, run_train, train_command
from rm.checkpoint import COMPLETE_MARKER, complete_checkpoints

# 40 pairs, 4 per micro-batch, GA 2: 5 optimizer steps per epoch, so 30 steps cross 5 epoch boundaries.
RUN = ["--config", "examples/quickstart.yaml", "--max_train_samples", 40, "--max_steps", 30, "--save_steps", 3,
       "--save_total_limit", 2, "--logging_steps", 1, "--eval_steps", 100, "--max_eval_samples", 8]


def losses(metrics: dict) -> dict[int, tuple[float, float]]:
    return {h["step"]: (h["train/loss"], h["train/lr"]) for h in metrics["history"] if "train/loss" in h}


def assert_same_curve(resumed: dict, reference: dict, tolerance: float = 1e-6) -> None:
    got, want = losses(resumed), losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, len(want) + 1))
    for step in want:
        assert abs(got[step][0] - want[step][0]) <= tolerance, (step, got[step], want[step])
        assert abs(got[step][1] - want[step][1]) <= 1e-12, (step, got[step], want[step])


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_EXTENSIONS_DIR": "/tmp/torch_ext", **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_every_process_of(output_dir) -> None:
    """SIGKILL every other process whose command line names output_dir, as a node failure would: the launcher and
    its workers (torch's elastic agent starts each worker in a session of its own, out of the launcher's group)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(output_dir).encode() in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # gone already


def wait_for_step(proc: subprocess.Popen, step: int) -> str:
    """Reads output until `step {step}/` was logged (after at least one checkpoint); returns what was read."""
    seen, saved = [], False
    for line in proc.stdout:
        seen.append(line)
        saved = saved or "saved checkpoint" in line
        if saved and f"step {step}/" in line:
            return "".join(seen)
    raise AssertionError(f"the run ended before step {step}:\n" + "".join(seen)[-3000:])


def test_sigkill_at_a_random_step_then_resume_reproduces_the_loss_curve(tmp_path):
    _, reference, _ = run_train(tmp_path / "reference", *RUN)
    kill_at = random.Random().randint(4, 20)
    out = tmp_path / "killed"
    cmd = [sys.executable, "train.py", *map(str, RUN), "--output_dir", str(out)]
    proc = start(cmd)
    wait_for_step(proc, kill_at)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "metrics.json").exists(), f"killed at {kill_at}"
    events_before = {p.name for p in (out / "runs").rglob("events.out.tfevents*")}

    _, resumed, _ = run_train(out, *RUN, "--resume_from_checkpoint", "latest")
    assert_same_curve(resumed, reference)
    kept = complete_checkpoints(str(out))
    assert [os.path.basename(p) for p in kept] == ["checkpoint-27", "checkpoint-30"], kept  # save_total_limit 2
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]
    events_after = {p.name for p in (out / "runs").rglob("events.out.tfevents*")}
    assert events_before < events_after, "the resumed run must add a tensorboard file, not overwrite one"


def test_resume_from_the_last_steps_checkpoint_trains_no_further(tmp_path):
    """A kill after the final checkpoint but before the export: the resume only evaluates and exports."""
    args = [*RUN, "--max_steps", 6, "--report_to", "none"]
    _, reference, _ = run_train(tmp_path / "run", *args)
    assert os.path.basename(complete_checkpoints(str(tmp_path / "run"))[-1]) == "checkpoint-6"
    _, resumed, _ = run_train(tmp_path / "run", *args, "--resume_from_checkpoint", "latest")
    assert resumed["final"]["step"] == 6
    assert_same_curve(resumed, reference)


def test_sigterm_on_two_deepspeed_ranks_saves_a_checkpoint_and_resume_reproduces_the_curve(tmp_path):
    """ZeRO-2 over 2 gloo processes; SIGTERM to the launcher's whole process group mid-run."""
    yaml = ROOT / "accelerate_configs/zero2_1node.yaml"
    args = [*RUN, "--max_steps", 12, "--save_steps", 100, "--report_to", "none"]
    _, reference, info = run_train(tmp_path / "reference", *args, processes=2, port=29711, accelerate_config=yaml)
    assert (info["distributed_type"], info["num_processes"], info["zero_stage"]) == ("DEEPSPEED", 2, 2)

    out = tmp_path / "preempted"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "29712", "--config_file",
              str(yaml), "--num_processes", "2", "--mixed_precision", "no", "train.py"]
    proc = start(launch + [*map(str, args), "--output_dir", str(out)])
    seen = []
    for line in proc.stdout:  # the first logged step: training is under way on both ranks
        seen.append(line)
        if "step 2/" in line:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the preempted run hung after SIGTERM:\n" + "".join(seen)[-3000:])
    output = "".join(seen) + rest
    assert proc.returncode != 0, output[-3000:]
    assert "Resume with:" in output and "--resume_from_checkpoint latest" in output, output[-3000:]
    checkpoints = complete_checkpoints(str(out))
    assert len(checkpoints) == 1, output[-3000:]
    step = json.loads((out / os.path.basename(checkpoints[0]) / COMPLETE_MARKER).read_text())["global_step"]
    assert 2 <= step < 12
    ranks_saved = list((out / os.path.basename(checkpoints[0])).rglob("*zero_pp_rank_1*optim_states.pt"))
    assert ranks_saved, "rank 1's optimizer shard is missing from the checkpoint"

    _, resumed, _ = run_train(out, *args, "--resume_from_checkpoint", "latest", processes=2, port=29713,
                              accelerate_config=yaml)
    assert_same_curve(resumed, reference)


def test_sigkill_of_a_two_process_zero2_run_then_resume_reproduces_the_curve(tmp_path):
    """A node failure under ZeRO-2 over 2 gloo processes: launcher and workers SIGKILLed at a random step."""
    yaml = ROOT / "accelerate_configs/zero2_1node.yaml"
    args = [*RUN, "--max_steps", 12, "--report_to", "none"]
    _, reference, _ = run_train(tmp_path / "reference", *args, processes=2, port=29716, accelerate_config=yaml)
    kill_at = random.Random().randint(4, 9)
    out = tmp_path / "killed"
    cmd, env = train_command(out, *args, processes=2, port=29717, accelerate_config=yaml)
    proc = start(cmd, env)
    wait_for_step(proc, kill_at)
    kill_every_process_of(out)
    proc.wait(timeout=60)
    assert not (out / "metrics.json").exists(), f"killed at {kill_at}"
    _, resumed, _ = run_train(out, *args, "--resume_from_checkpoint", "latest", processes=2, port=29718,
                              accelerate_config=yaml)
    assert_same_curve(resumed, reference)


def test_zero3_lora_resume_from_a_copied_checkpoint_reproduces_the_curve(tmp_path):
    """ZeRO-3 (parameters sharded over 2 ranks) with LoRA: a run's first checkpoint, copied alone into a fresh
    output_dir (what a kill right after it leaves), resumes to the same curve; a moved output_dir is accepted."""
    import shutil

    yaml = ROOT / "accelerate_configs/zero3_1node.yaml"
    args = [*RUN, "--max_steps", 8, "--report_to", "none", "--use_peft", "true", "--learning_rate", 5e-3]
    _, reference, info = run_train(tmp_path / "reference", *args, processes=2, port=29714, accelerate_config=yaml)
    assert (info["distributed_type"], info["num_processes"], info["zero_stage"]) == ("DEEPSPEED", 2, 3)
    out = tmp_path / "moved"
    out.mkdir()
    shutil.copytree(tmp_path / "reference" / "checkpoint-3", out / "checkpoint-3")
    _, resumed, _ = run_train(out, *args, "--resume_from_checkpoint", "latest", processes=2, port=29715,
                              accelerate_config=yaml)
    assert_same_curve(resumed, reference)
