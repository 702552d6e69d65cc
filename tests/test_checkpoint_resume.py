"""Resumes reproduce the uninterrupted run: only the steps a resumed run recomputes are compared (the history
before the checkpoint is copied from it), loss within 1e-6 and LR within 1e-12 on CPU fp32, and the final
evaluation too. Deterministic: a run's own checkpoints, copied alone into a fresh output_dir, stand for what a kill
right after them leaves (a checkpoint is complete only once its marker is written, tests/test_faults.py).

- one process: a mid-epoch checkpoint, an epoch-end one (the next epoch's shuffle) and the last step's (nothing
  left to train: only evaluation and export);
- SIGTERM to a 2-process DeepSpeed ZeRO-2 launch saves a complete checkpoint on every rank and exits non-zero with
  the resume command; that resume recomputes the rest of the curve;
- ZeRO-3 + LoRA (parameters sharded over 2 ranks) from a copied checkpoint.
"""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, run_train, train_command
from rm.checkpoint import COMPLETE_MARKER, complete_checkpoints

# 40 pairs, 4 per micro-batch, GA 2: 5 optimizer steps per epoch; 12 steps cross 2 epoch boundaries.
RUN = ["--config", "examples/quickstart.yaml", "--max_train_samples", 40, "--max_steps", 12, "--save_steps", 2,
       "--save_total_limit", 0, "--logging_steps", 1, "--eval_steps", 100, "--max_eval_samples", 8]


def losses(metrics: dict) -> dict[int, tuple[float, float]]:
    return {h["step"]: (h["train/loss"], h["train/lr"]) for h in metrics["history"] if "train/loss" in h}


def assert_same_curve(resumed: dict, reference: dict, tolerance: float = 1e-6, after_step: int = 0) -> None:
    """The resumed run logged every step, and the steps after `after_step` (those it recomputed when resumed from
    that step) have the reference's loss and LR; the final evaluation (recomputed) agrees too."""
    got, want = losses(resumed), losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, len(want) + 1))
    for step in range(after_step + 1, len(want) + 1):
        assert abs(got[step][0] - want[step][0]) <= tolerance, (step, got[step], want[step])
        assert abs(got[step][1] - want[step][1]) <= 1e-12, (step, got[step], want[step])
    for key in (k for k in reference["final"] if k.startswith("eval/")):
        assert abs(resumed["final"][key] - reference["final"][key]) <= 10 * tolerance, key


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_EXTENSIONS_DIR": "/tmp/torch_ext", **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_every_process_of(output_dir) -> None:
    """SIGKILL every other process whose command line names output_dir, as a node failure would: the launcher and
    its workers (torch's elastic agent starts each worker in a session of its own, out of the launcher's group).
    Used, with start and wait_for_step, by the GPU resume tests (tests/test_gpu.py)."""
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


def resume_copy(reference_dir: Path, step: int, out: Path, *args, **launch) -> dict:
    """Copies checkpoint-<step> (and the tensorboard logs) of a finished run alone into a fresh output_dir, as a
    kill right after that save leaves it, and resumes there; returns the resumed metrics."""
    shutil.copytree(reference_dir / f"checkpoint-{step}", out / f"checkpoint-{step}")
    if (reference_dir / "runs").exists():
        shutil.copytree(reference_dir / "runs", out / "runs")
    _, resumed, _ = run_train(out, *args, "--resume_from_checkpoint", "latest", **launch)
    return resumed


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    """One uninterrupted single-process run; its checkpoints (every 2 steps) serve every case below."""
    out = tmp_path_factory.mktemp("reference")
    run_train(out, *RUN)
    return out


@pytest.mark.parametrize("step", [pytest.param(4, marks=pytest.mark.floor), 10, 12],
                         ids=["mid-epoch", "epoch-end", "last-step"])
def test_resume_from_a_copied_checkpoint_recomputes_the_uninterrupted_curve(tmp_path, reference_dir, step):
    reference = json.loads((reference_dir / "metrics.json").read_text())
    out = tmp_path / "resumed"
    resumed = resume_copy(reference_dir, step, out, *RUN, "--save_total_limit", 2)
    assert resumed["final"]["step"] == 12
    assert_same_curve(resumed, reference, after_step=step)
    kept = [os.path.basename(p) for p in complete_checkpoints(str(out))]
    assert kept == (["checkpoint-12"] if step == 12 else ["checkpoint-10", "checkpoint-12"]), kept  # limit 2
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]
    events = {p.name for p in (out / "runs").rglob("events.out.tfevents*")}
    copied = {p.name for p in (reference_dir / "runs").rglob("events.out.tfevents*")}
    assert copied < events, "the resumed run must add a tensorboard file, not overwrite one"


ZERO2 = ROOT / "accelerate_configs/zero2_1node.yaml"
ZERO2_RUN = [*RUN, "--max_steps", 8, "--save_steps", 100, "--report_to", "none"]


def test_sigterm_on_two_deepspeed_ranks_saves_a_checkpoint_and_resume_reproduces_the_curve(tmp_path):
    """ZeRO-2 over 2 gloo processes; SIGTERM to the launcher's whole process group mid-run."""
    _, reference, info = run_train(tmp_path / "reference", *ZERO2_RUN, processes=2, port=29711,
                                   accelerate_config=ZERO2)
    assert (info["distributed_type"], info["num_processes"], info["zero_stage"]) == ("DEEPSPEED", 2, 2)

    out = tmp_path / "preempted"
    cmd, env = train_command(out, *ZERO2_RUN, processes=2, port=29712, accelerate_config=ZERO2)
    proc = start(cmd, env)
    seen = []
    for line in proc.stdout:  # the second logged step: training is under way on both ranks
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
    assert 2 <= step < 8
    ranks_saved = list((out / os.path.basename(checkpoints[0])).rglob("*zero_pp_rank_1*optim_states.pt"))
    assert ranks_saved, "rank 1's optimizer shard is missing from the checkpoint"

    _, resumed, _ = run_train(out, *ZERO2_RUN, "--resume_from_checkpoint", "latest", processes=2, port=29713,
                              accelerate_config=ZERO2)
    assert_same_curve(resumed, reference, after_step=step)


@pytest.mark.floor
def test_zero3_lora_resume_from_a_copied_checkpoint_reproduces_the_curve(tmp_path):
    """ZeRO-3 (parameters sharded over 2 ranks) with LoRA: a mid-epoch checkpoint, copied alone into a fresh
    output_dir, recomputes the rest of the curve; a moved output_dir is accepted."""
    yaml = ROOT / "accelerate_configs/zero3_1node.yaml"
    args = [*RUN, "--max_steps", 6, "--save_steps", 3, "--report_to", "none", "--use_peft", "true",
            "--learning_rate", 5e-3]
    _, reference, info = run_train(tmp_path / "reference", *args, processes=2, port=29714, accelerate_config=yaml)
    assert (info["distributed_type"], info["num_processes"], info["zero_stage"]) == ("DEEPSPEED", 2, 3)
    resumed = resume_copy(tmp_path / "reference", 3, tmp_path / "moved", *args, processes=2, port=29715,
                          accelerate_config=yaml)
    assert_same_curve(resumed, reference, after_step=3)
