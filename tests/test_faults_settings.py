"""Fault suite, settings and the end of a run (issue 13, sections 2 and 3).

Every setting with a bad value stops train.py with exit 2 and one line naming the setting, before anything is
written. Faults that used to lose a whole trained run at the end (no evaluation possible, a tokenizer without a pad
token, a signal during the final evaluation) now end with the model exported."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, train_command
from test_config import BAD_VALUES

import train

TINY_RUN = ["--model_name_or_path", "tiny", "--use_peft", "false", "--gradient_checkpointing", "false",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--report_to", "none",
            "--max_steps", "3", "--logging_steps", "1"]


def run_main(capsys, *args) -> tuple[int, str]:
    code = train.main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_every_bad_setting_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, name):
    out = tmp_path / "out"
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({name: BAD_VALUES[name]}))
    code, err = run_main(capsys, "--output_dir", out, "--config", config)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and f"setting '{name}'" in err, err
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing_config", "output_dir_is_a_file", "output_dir_under_a_file",
                                  "bf16_against_the_launcher"])
def test_bad_launch_settings_exit_2_before_anything_is_written(tmp_path, capsys, monkeypatch, case):
    (tmp_path / "a_file").write_text("keep me")
    out, args = tmp_path / "out", []
    if case == "missing_config":
        args, expected = ["--config", tmp_path / "nope.yaml"], "nope.yaml: cannot read it"
    elif case == "output_dir_is_a_file":
        out, expected = tmp_path / "a_file", "is a file"
    elif case == "output_dir_under_a_file":
        out, expected = tmp_path / "a_file" / "out", "sits under"
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        args, expected = ["--bf16", "false"], "--bf16 false disagrees with the accelerate launcher's mixed_precision"
    code, err = run_main(capsys, *TINY_RUN, "--output_dir", out, *args)
    assert code == 2 and expected in err, err
    assert (tmp_path / "a_file").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("case", ["no_such_folder", "a_file", "empty_folder", "config_without_weights",
                                  "tokenizer_folder_without_files"])
def test_a_bad_model_or_tokenizer_folder_exits_2_before_anything_is_written(tmp_path, capsys, case):
    """A mistyped or incomplete local model folder is named in one line, not answered by a hub error or a
    traceback after the data was tokenized, and the output_dir is not created."""
    (tmp_path / "a_file").write_text("keep me")
    (tmp_path / "folder").mkdir()
    option, location, expected = "--model_name_or_path", tmp_path / "folder", "the folder holds none of config.json"
    if case == "no_such_folder":
        location, expected = tmp_path / "qwen3-0.6b", "no such folder"
    elif case == "a_file":
        location, expected = tmp_path / "a_file", "a file, not a model folder"
    elif case == "config_without_weights":
        (tmp_path / "folder" / "config.json").write_text("{}")
        expected = "the folder holds none of model.safetensors"
    elif case == "tokenizer_folder_without_files":
        option, expected = "--tokenizer_name_or_path", "the folder holds none of tokenizer.json"
    out = tmp_path / "out"
    code, err = run_main(capsys, *TINY_RUN, option, location, "--output_dir", out)  # the last flag wins
    assert code == 2 and err.count("\n") == 1 and f"error: {option} {location}: {expected}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "folder"]


def tokenizer_without_special_tokens(folder: Path) -> Path:
    """The shipped tiny tokenizer with its pad, eos and unk tokens removed (the template keeps its own markers)."""
    from rm.model import TINY_TOKENIZER

    shutil.copytree(TINY_TOKENIZER, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("pad_token", "eos_token", "unk_token"):
        config.pop(key, None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def identical_after_truncation(path: Path) -> Path:
    """Eval pairs whose chosen and rejected differ only past max_target_length tokens."""
    rows = [{"prompt": f"Question {i}?", "chosen": "same words here and then " * 8 + "yes",
             "rejected": "same words here and then " * 8 + "no"} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case", ["max_eval_samples_0", "eval_pairs_identical_after_truncation",
                                  "tokenizer_without_pad_eos_unk"])
def test_runs_that_used_to_lose_everything_at_the_end_export_the_model(tmp_path, case):
    extra = {"max_eval_samples_0": ["--max_eval_samples", 0],
             "eval_pairs_identical_after_truncation": [
                 "--validation_file_dir", identical_after_truncation(tmp_path / "eval.jsonl"),
                 "--max_target_length", 8, "--max_eval_samples", -1],
             "tokenizer_without_pad_eos_unk": [
                 "--tokenizer_name_or_path", tokenizer_without_special_tokens(tmp_path / "tok"),
                 "--max_eval_samples", 8]}[case]
    out = tmp_path / "out"
    cmd, env = train_command(out, *TINY_RUN, *extra)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model" / "config.json").is_file() and (out / "metrics.json").is_file()
    final = json.loads((out / "metrics.json").read_text())["final"]
    if case == "tokenizer_without_pad_eos_unk":
        assert final["eval/pairs"] == 8
    else:
        assert "eval/accuracy" not in final and "evaluation: off" in proc.stdout + proc.stderr


def test_sigterm_during_the_final_evaluation_still_exports_the_model(tmp_path):
    """The signal arrives after the last optimizer step was logged, while the final evaluation (100 eval pairs,
    batch 1) or the export runs: the handlers stay installed until the export is written."""
    out = tmp_path / "out"
    cmd, env = train_command(out, *TINY_RUN, "--validation_file_dir", ROOT / "data/sample/eval.jsonl",
                             "--max_eval_samples", -1)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 3/3" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-3000:]
    assert (out / "model" / "config.json").is_file(), log[-3000:]
    assert "SIGTERM arrived after the last step; the model was exported first" in log


def test_an_export_killed_midway_leaves_no_folder_that_looks_loadable(tmp_path):
    """A kill (or a second signal) between the weights and the tokenizer left model/ with config and weights but no
    tokenizer, which looks loadable. The folder is now published by one rename, and an earlier export stays whole
    until the new one is complete."""
    import os

    from rm.export import publish_folder

    def written(content):
        def write(folder):
            os.makedirs(folder)
            (Path(folder) / "config.json").write_text(content)
        return write

    def killed(folder):
        written("half")(folder)
        raise KeyboardInterrupt  # the weights are on disk, the tokenizer is not

    with pytest.raises(KeyboardInterrupt):
        publish_folder(str(tmp_path), "model", killed)
    assert not (tmp_path / "model").exists()
    publish_folder(str(tmp_path), "model", written("old"))
    with pytest.raises(KeyboardInterrupt):
        publish_folder(str(tmp_path), "model", killed)
    assert (tmp_path / "model" / "config.json").read_text() == "old"
    publish_folder(str(tmp_path), "model", written("new"))
    assert sorted(os.listdir(tmp_path)) == ["model"] and (tmp_path / "model" / "config.json").read_text() == "new"
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


SIGNAL_DURING_SETUP = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import train

def signalled(*args, **kwargs):  # the signal arrives while the data is read, before any handler of the run
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    raise AssertionError("the signal did not stop the run")

train.token_sets = signalled
sys.exit(train.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_setup_stops_with_one_line_and_releases_the_lock(tmp_path, name, code):
    """Before the run's own handlers exist, SIGTERM used to kill the process silently (run.lock left behind) and
    SIGINT printed a KeyboardInterrupt traceback from wherever it landed."""
    script = tmp_path / "signalled.py"
    script.write_text(SIGNAL_DURING_SETUP)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), str(ROOT), name, *TINY_RUN, "--output_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"stopped at once by {name}"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not out.exists()  # lock released, the folder it created removed


SIGNAL_DURING_EVALUATION = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import train

evaluate, calls = train.evaluate, []

def signalled_evaluate(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's notice arrives during the first evaluation
    return evaluate(*args, **kwargs)

train.evaluate = signalled_evaluate
code = train.main(sys.argv[2:])
print(f"evaluations: {len(calls)}")
sys.exit(code)
"""


def test_a_stop_skips_the_evaluations_due_before_the_checkpoint(tmp_path):
    """Under a launcher the workers get 30 s after SIGTERM: evaluations due while the stop flag travels (it is read
    a step late) used to run first, and a long one cost the checkpoint. Now the first evaluation after the signal
    is skipped and the checkpoint of the next step saved."""
    script = tmp_path / "signalled.py"
    script.write_text(SIGNAL_DURING_EVALUATION)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), str(ROOT), *TINY_RUN, "--max_steps", "8", "--eval_steps",
                           "1", "--save_steps", "100", "--output_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "evaluations: 1" in proc.stdout and "stopped by SIGTERM after optimizer step 2" in proc.stderr, \
        proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error:" not in proc.stderr, proc.stderr[-2000:]  # a requested stop, not an error
    assert (out / "checkpoint-2" / "COMPLETE").is_file()


def loaded_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("command, line", [
    ([str(ROOT / "train.py"), *TINY_RUN, "--output_dir", "OUT"], "train.py: interrupted (Ctrl-C); stopped at once"),
    (["-m", "rm.score", "--model", "nowhere", "--data", "nothing.jsonl", "--output", "OUT"],
     "rm.score: interrupted (Ctrl-C); stopped at once"),
])
def test_ctrl_c_while_torch_imports_is_one_line(tmp_path, command, line):
    """A Ctrl-C during `import torch`, before main() runs, printed a 14-line traceback. The signal is sent once
    torch's library is mapped into the process (its import is under way; the rest of the imports take seconds)."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc to see the import under way")
    command = [str(tmp_path / "out") if arg == "OUT" else arg for arg in command]
    proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not loaded_torch(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT or proc.returncode == 130, (proc.returncode, err[-3000:])
    assert err.count("\n") == 1 and err.startswith(line), err[-3000:]
    assert not (tmp_path / "out").exists()
