"""Fault suite for checkpoints (issue 13, classes 1, 5 and 7), on real checkpoints made once per session: no
DeepSpeed, ZeRO-2 with LoRA and ZeRO-3 (one process each, CPU). Every refusal asserts the exit code, the file it
names and that output_dir was left as it was; planted payloads assert that they did not run.

Resumes that are refused go through train.py's `main` in this process: the checks run before the Accelerator, so
the launcher makes no difference to them. The disk-full cases mount a real tmpfs (root only; skipped otherwise)."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, main_caller, snapshot, train_command
from rm.checkpoint import EXIT_NO_SPACE
from rm.safe_checkpoint import restricted_load, verify_checkpoint, write_manifest
from rm.outputs import MANIFEST, RUN_LOCK

KINDS = {"plain": None, "zero2_lora": "zero2_1node.yaml", "zero3": "zero3_1node.yaml"}
PORTS = {"zero2_lora": 29741, "zero3": 29742}


def run_args(data: Path) -> list[str]:
    return ["--model_name_or_path", "tiny", "--use_peft", "false", "--gradient_checkpointing", "false",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
            "--train_file_dir", str(data / "train.jsonl"), "--validation_file_dir", str(data / "eval.jsonl"),
            "--max_train_samples", "40", "--max_eval_samples", "8", "--max_steps", "2", "--save_steps", "1",
            "--logging_steps", "1", "--report_to", "none"]


def kind_args(kind: str, data: Path) -> list[str]:
    return run_args(data) + (["--use_peft", "true"] if kind == "zero2_lora" else [])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(ROOT / "data" / "sample" / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """One real 2-step run per kind, saving checkpoint-1 and checkpoint-2, made under umask 077."""
    made = {}
    for kind, yaml in KINDS.items():
        out = tmp_path_factory.mktemp("runs") / kind
        launch = {"accelerate_config": ROOT / "accelerate_configs" / yaml, "port": PORTS[kind]} if yaml else {}
        cmd, env = train_command(out, *kind_args(kind, data_dir), **launch)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, umask=0o077)
        assert proc.returncode == 0, f"{kind}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        made[kind] = out
    return made


@pytest.fixture
def call_main(capsys):
    """train.py's main in this process; returns (exit code, stdout + stderr)."""
    return main_caller(capsys, with_stdout=True)


def copy_run(runs: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs[kind], tmp_path / kind))


def pickled_files(checkpoint: Path) -> list[str]:
    """Every file of a checkpoint that torch.load would unpickle, found by content: a torch zip or a raw pickle."""
    found = []
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            found.append(path.relative_to(checkpoint).as_posix())
    return found


class Payload:
    """Unpickling this creates the marker file: what a crafted checkpoint would do with a worse call."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path) -> None:
    """Adds the payload to a saved state (the file still holds everything it held) and saves it back."""
    state = torch.load(path, weights_only=False)  # our own file, just written by the fixture
    state = {**state, "extra": Payload(marker)} if isinstance(state, dict) else {"state": state, "x": Payload(marker)}
    torch.save(state, path)


# ---- class 1: a checkpoint never runs code
PICKLED = {  # the table the payload cases walk; test_the_table_lists_every_pickled_file checks it is complete
    "plain": ["optimizer.bin", "random_states_0.pkl"],
    "zero2_lora": ["pytorch_model/mp_rank_00_model_states.pt",
                   "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt", "random_states_0.pkl"],
    "zero3": ["pytorch_model/zero_pp_rank_0_mp_rank_00_model_states.pt",
              "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt", "random_states_0.pkl"],
}
PAYLOAD_CASES = [(kind, rel) for kind, files in PICKLED.items() for rel in files]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_table_lists_every_pickled_file_and_real_checkpoints_verify(runs, kind):
    for step in (1, 2):
        checkpoint = runs[kind] / f"checkpoint-{step}"
        assert pickled_files(checkpoint) == PICKLED[kind]
        verify_checkpoint(str(checkpoint))  # raises on anything it refuses


@pytest.mark.parametrize("kind,rel", PAYLOAD_CASES, ids=[f"{k}:{r.split('/')[-1]}" for k, r in PAYLOAD_CASES])
def test_payload_in_a_pickled_file_is_refused_and_never_runs(runs, data_dir, tmp_path, call_main, kind, rel):
    out = copy_run(runs, kind, tmp_path)
    target = out / "checkpoint-2" / rel
    marker = tmp_path / "payload-ran"
    plant(target, marker)
    probe = tmp_path / "probe.pt"  # the payload is live: an unrestricted load runs it
    shutil.copy(target, probe)
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()
    write_manifest(str(out / "checkpoint-2"))  # the attacker rewrites the manifest too
    before = snapshot(out)

    code, err = call_main(*kind_args(kind, data_dir), "--output_dir", out, "--resume_from_checkpoint", "latest")
    assert code == 2, err
    assert f"{target} refused" in err and "it names io.open" in err, err
    assert not marker.exists(), "the payload ran"
    assert snapshot(out) == before
    with pytest.raises(pickle.UnpicklingError):  # the loader DeepSpeed's engine is given while resuming
        restricted_load(str(target))
    assert not marker.exists()


def test_payload_in_an_added_file_or_without_a_manifest_update_is_refused(runs, data_dir, tmp_path, call_main):
    out = copy_run(runs, "plain", tmp_path)
    marker = tmp_path / "payload-ran"
    added = out / "checkpoint-2" / "custom_checkpoint_0.pkl"  # where accelerate keeps registered objects
    torch.save({"last_epoch": 1, "x": Payload(marker)}, added)
    write_manifest(str(out / "checkpoint-2"))
    before = snapshot(out)
    code, err = call_main(*run_args(data_dir), "--output_dir", out, "--resume_from_checkpoint", "latest")
    assert code == 2 and f"{added} refused" in err, err
    added.unlink()
    write_manifest(str(out / "checkpoint-2"))
    plant(out / "checkpoint-2" / "optimizer.bin", marker)  # manifest left as saved: the file no longer matches
    before = snapshot(out)
    code, err = call_main(*run_args(data_dir), "--output_dir", out, "--resume_from_checkpoint", out / "checkpoint-2")
    assert code == 2 and f"{out / 'checkpoint-2' / 'optimizer.bin'} has 27" in err and TRUNCATED[1] in err, err
    assert not marker.exists() and snapshot(out) == before


# ---- class 5: resume refuses what it cannot restore exactly
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


TRUNCATED = ("has", "bytes when saved (truncated or changed)")
CHANGED = ("changed since it was saved (its sha256 differs)",)
DAMAGE = {  # case: (kind, file in checkpoint-2, how, what the message says after the file's path, then anywhere)
    "truncated_model": ("plain", "model.safetensors", truncate, TRUNCATED),
    "truncated_optimizer": ("plain", "optimizer.bin", truncate, TRUNCATED),
    "truncated_trainer_state": ("plain", "trainer_state.json", truncate, TRUNCATED),
    "corrupt_rng_state": ("plain", "random_states_0.pkl", flip_middle, CHANGED),
    "complete_without_config": ("plain", "training_config.json", Path.unlink, ("is missing",)),
    "no_manifest": ("plain", MANIFEST, Path.unlink, ("is missing: the checkpoint cannot be verified",)),
    "file_added": ("plain", "notes.txt", lambda p: p.write_text("x"), ("was not part of the saved checkpoint",)),
    "zero2_truncated_optimizer": ("zero2_lora", "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  truncate, TRUNCATED),
    "zero3_corrupt_model_states": ("zero3", "pytorch_model/zero_pp_rank_0_mp_rank_00_model_states.pt",
                                   flip_middle, CHANGED),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_is_refused_naming_the_file(runs, data_dir, tmp_path, call_main, case):
    kind, rel, damage, message = DAMAGE[case]
    out = copy_run(runs, kind, tmp_path)
    damage(out / "checkpoint-2" / rel)
    before = snapshot(out)
    code, err = call_main(*kind_args(kind, data_dir), "--output_dir", out, "--resume_from_checkpoint",
                          out / "checkpoint-2")
    assert code == 2, err
    assert f"{out / 'checkpoint-2' / rel} {message[0]}" in err and all(piece in err for piece in message), err
    assert snapshot(out) == before


@pytest.mark.parametrize("case", ["truncated_optimizer", "corrupt_rng_state", "complete_without_config"])
def test_latest_skips_a_damaged_checkpoint_with_a_warning_and_resumes_from_the_one_before(
        runs, data_dir, tmp_path, call_main, case):
    kind, rel, damage, _ = DAMAGE[case]
    out = copy_run(runs, kind, tmp_path)
    damage(out / "checkpoint-2" / rel)
    code, err = call_main(*run_args(data_dir), "--output_dir", out, "--resume_from_checkpoint", "latest")
    assert code == 0, err
    assert f"warning: skipping damaged checkpoint {out / 'checkpoint-2'}: {out / 'checkpoint-2' / rel}" in err, err
    assert f"resumed from {out / 'checkpoint-1'}: step 1" in err
    verify_checkpoint(str(out / "checkpoint-2"))  # saved again by the resumed run
    assert not (out / RUN_LOCK).exists()


def test_no_usable_checkpoint_left(runs, data_dir, tmp_path, call_main):
    out = copy_run(runs, "plain", tmp_path)
    for step in (1, 2):
        truncate(out / f"checkpoint-{step}" / "optimizer.bin")
    before = snapshot(out)
    code, err = call_main(*run_args(data_dir), "--output_dir", out, "--resume_from_checkpoint", "latest")
    assert code == 2 and "no usable checkpoint" in err and "checkpoint-2, checkpoint-1 damaged" in err, err
    assert snapshot(out) == before


def test_a_resume_from_an_earlier_checkpoint_removes_the_later_ones_only_when_asked(runs, data_dir, tmp_path,
                                                                                   call_main):
    """Resuming from checkpoint-1 while checkpoint-2 of the abandoned course is there: its saves would mix with that
    course (`latest` and rotation go by step: a later step of the old course would outlive, and be resumed instead
    of, the resumed run's own checkpoints). Refused, naming them; --overwrite_output_dir true removes them."""
    out = copy_run(runs, "plain", tmp_path)
    before = snapshot(out)
    resume = [*run_args(data_dir), "--output_dir", out, "--resume_from_checkpoint", out / "checkpoint-1"]
    code, err = call_main(*resume)
    assert code == 2 and "holds later checkpoints (checkpoint-2)" in err and "--overwrite_output_dir true" in err, err
    assert snapshot(out) == before
    code, err = call_main(*resume, "--overwrite_output_dir", "true")
    assert code == 0 and "removed the checkpoints past step 1: checkpoint-2" in err, err
    assert "resumed from" in err and (out / "checkpoint-2" / "COMPLETE").is_file() and (out / "model").is_dir()
    code, err = call_main(*run_args(data_dir), "--output_dir", out, "--resume_from_checkpoint", "latest")
    assert code == 0 and "checkpoint-2" in err, err  # the resumed run's own, the newest


def test_changed_train_data_is_refused_unless_allowed(runs, data_dir, tmp_path, call_main):
    out = copy_run(runs, "plain", tmp_path)
    train_file = data_dir / "train.jsonl"
    original = train_file.read_bytes()
    try:
        lines = original.decode().splitlines(keepends=True)
        train_file.write_text("".join(lines[1:] + lines[:1]))  # same pairs, another order: another data order
        before = snapshot(out)
        resume = ["--output_dir", out, "--resume_from_checkpoint", out / "checkpoint-1", "--overwrite_output_dir",
                  "true"]  # checkpoint-2 goes (test_a_resume_from_an_earlier_checkpoint_...)
        code, err = call_main(*run_args(data_dir), *resume)
        assert code == 2 and f"the train data at {train_file} changed" in err, err
        assert "train.jsonl: content changed" in err and "--allow_changed_data true" in err
        assert snapshot(out) == before
        code, err = call_main(*run_args(data_dir), *resume, "--allow_changed_data", "true")
        assert code == 0 and "continuing on changed train data" in err, err
    finally:
        train_file.write_bytes(original)


def test_another_number_of_processes_is_refused(runs, data_dir, tmp_path, call_main):
    out = copy_run(runs, "plain", tmp_path)
    checkpoint = out / "checkpoint-1"
    (checkpoint / "random_states_0.pkl").rename(checkpoint / "random_states_1.pkl")  # as rank 1 of 2 saved it
    write_manifest(str(checkpoint))
    before = snapshot(out)
    code, err = call_main(*run_args(data_dir), "--output_dir", out, "--resume_from_checkpoint", checkpoint,
                          "--overwrite_output_dir", "true")  # checkpoint-2 would go, were the resume accepted
    assert code == 2 and f"{checkpoint} holds the RNG states of processes [1]" in err, err
    assert snapshot(out) == before


# ---- class 7: files others can read; disk full said plainly
@pytest.mark.parametrize("kind,folders", [("plain", ["model"]), ("zero2_lora", ["model", "adapter"])])
def test_exported_files_are_readable_whatever_the_umask(runs, kind, folders):
    assert runs[kind].stat().st_mode & 0o777 == 0o755  # output_dir, created by the run
    for folder in folders:  # the fixture's runs ran under umask 077
        root = runs[kind] / folder
        assert [p for p in root.rglob("*") if p.is_file()], root
        assert root.stat().st_mode & 0o777 == 0o755
        for path in root.rglob("*"):
            assert path.stat().st_mode & 0o777 == (0o644 if path.is_file() else 0o755), path


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of a given size (root only), unmounted afterwards."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk-{size}"
        folder.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): needs root")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


DISK_FULL = {  # case: (tmpfs size, extra args, what was being written, what is kept, what to do next)
    "first_checkpoint": ("2m", [], "saving checkpoint-1 to {out}", [], "no checkpoint was saved yet"),
    "second_checkpoint": ("6m", [], "saving checkpoint-2 to {out}", ["checkpoint-1"],
                          "the earlier checkpoints are kept (newest: checkpoint-1). Free space, then resume"),
    "export": ("1m", ["--save_steps", "100"], "exporting the model to {out}/model", [],
               "no checkpoint was saved yet"),
}


@pytest.mark.parametrize("case", sorted(DISK_FULL))
def test_full_disk_while_saving(data_dir, small_disk, call_main, case):
    size, extra, action, kept, then = DISK_FULL[case]
    out = small_disk(size)  # a plain checkpoint takes ~4.1 MB, the exported model ~1.6 MB
    code, err = call_main(*run_args(data_dir), "--output_dir", out, *extra)
    assert code == EXIT_NO_SPACE, err
    assert f"no space left on device while {action.format(out=out)}; the partial save was removed, {then}" in err
    assert "Traceback" not in err and "inline_container" not in err
    assert sorted(p.name for p in out.iterdir()) == kept  # no staging folder, no partial model, no lock
    for name in kept:
        verify_checkpoint(str(out / name))


AGREE = """
import sys
sys.path.insert(0, sys.argv[1])
from accelerate import Accelerator
from rm.checkpoint import agreed_checkpoint
from rm.config import ConfigError
from rm.runtime import shut_down_process_groups

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
assert agreed_checkpoint(accelerator, "out/checkpoint-4") == "out/checkpoint-4"
assert agreed_checkpoint(accelerator, None) is None
try:
    agreed_checkpoint(accelerator, f"out/checkpoint-{4 - 2 * rank}")  # rank 1 saw checkpoint-4 as damaged
    print(f"rank {rank} accepted", flush=True)
except ConfigError as err:
    print(f"rank {rank} refused: {err}", flush=True)
shut_down_process_groups()  # as train.main does on every exit: no SIGABRT from gloo's destructors at exit
"""


def test_processes_that_chose_different_checkpoints_are_refused_on_every_rank(tmp_path):
    """Each rank picks the checkpoint before the processes can talk; 2 real gloo processes whose choices differ
    both stop with the same message, rather than resume from different states."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "29543",
                           "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", str(script), str(ROOT)],
                          env={**os.environ, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    choices = "(rank 0: out/checkpoint-4, rank 1: out/checkpoint-2)"
    for rank in (0, 1):
        assert f"rank {rank} refused: the processes chose different checkpoints to resume from {choices}" \
            in proc.stdout, proc.stdout
