"""Fault suite: every bad input of issue 5 injected for real, asserting the message (file, line, field) and that
nothing was written or lost. Input faults go through train.py's own `main` in this process (they stop before the
model is built); non-finite steps run train.py for real."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, main_caller, snapshot
from rm.checkpoint import COMPLETE_MARKER, STAGING_PREFIX, complete_checkpoints, latest_checkpoint, rotate_checkpoints
from rm.config import ConfigError, parse_config
from rm.guards import EXIT_NONFINITE
from rm.cli.validate import accelerate_config_problems, master_reachable_problem
from rm.cli.validate import main as validate_main
from rm.data import DataError, load_training_data
from rm.runtime import check_accelerator_settings, resolve_mixed_precision

BASE = ["--model_name_or_path", "tiny", "--use_peft", "false", "--gradient_checkpointing", "false",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--report_to", "none",
        "--max_eval_samples", "-1"]


def record(i: int, **changes) -> dict:
    row = {"conversations": [{"from": "human", "value": f"Question {i}?"}], "chosen": f"A good answer {i}.",
           "rejected": f"A bad answer {i}."}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not None}


def write_lines(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line).encode())
            f.write(b"\n")
    return path


def good_lines(n: int = 20) -> list:
    return [record(i) for i in range(n)]


@pytest.fixture
def run_main(capsys):
    """train.py's main in this process with BASE settings; returns (exit code, stderr)."""
    return main_caller(capsys, BASE)


# ---- data faults: (lines of the train file, expected message pieces); the line number is where the fault is
DATA_FAULTS = {
    "malformed_json": ([*good_lines(2), '{"conversations": [}', *good_lines(20)], [":3", "malformed JSON"]),
    "missing_chosen": ([*good_lines(3), record(3, chosen=None), *good_lines(20)], [":4", "missing field 'chosen'"]),
    "missing_rejected": ([*good_lines(1), record(1, rejected=None)], [":2", "missing field 'rejected'"]),
    "empty_chosen": ([*good_lines(4), record(4, chosen="  "), *good_lines(20)], [":5", "'chosen' is empty"]),
    "wrong_type": ([*good_lines(2), record(2, rejected=7), *good_lines(20)], [":3", "'rejected' must be a string"]),
    "wrong_type_margin": ([*good_lines(2), record(2, margin="high")], [":3", "'margin' must be a number"]),
    "non_finite_margin": ([*good_lines(2), '{"conversations": [{"from": "human", "value": "q"}], "chosen": "a", '
                           '"rejected": "b", "margin": NaN}'], [":3", "'margin' must be a finite float32 number"]),
    "unknown_layout": ([{"instruction": "q", "output": "a"}, *good_lines(20)], [":1", "unknown layout"]),
    "chosen_equals_rejected": ([*good_lines(5), record(5, rejected="A good answer 5."), *good_lines(20)],
                               [":6", "'chosen' and 'rejected' are identical"]),
    "invalid_utf8": ([*good_lines(6), b'{"conversations": [{"from": "human", "value": "\xff\xfe"}]}', *good_lines(9)],
                     [":7", "invalid UTF-8"]),
    "too_small_for_one_step": (good_lines(5), ["5 usable training pairs", "fewer than one optimizer step", "= 8"]),
}


@pytest.mark.parametrize("case", sorted(DATA_FAULTS))
def test_bad_train_data_stops_before_training_and_writes_nothing(tmp_path, run_main, case):
    lines, expected = DATA_FAULTS[case]
    train_file = write_lines(tmp_path / "data" / "train.jsonl", lines)
    out = tmp_path / "out"
    code, err = run_main("--train_file_dir", train_file, "--validation_file_dir", "none", "--output_dir", out)
    assert code == 2, err
    for piece in expected:
        assert piece in err, (piece, err)
    if case != "too_small_for_one_step":
        assert str(train_file) in err
    assert not out.exists(), "output_dir was written"


def test_empty_and_missing_data_directories(tmp_path, run_main):
    (tmp_path / "empty").mkdir()
    for location, message in ((tmp_path / "empty", "no .jsonl/.json/.parquet/.ndjson/.jsonlines/.csv/.tsv files"),
                              (tmp_path / "missing", "no such file or directory")):
        code, err = run_main("--train_file_dir", location, "--output_dir", tmp_path / "out")
        assert code == 2 and str(location) in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_bad_eval_data_and_max_eval_samples_larger_than_the_data(tmp_path, run_main):
    train_file = write_lines(tmp_path / "train.jsonl", good_lines(20))
    eval_file = write_lines(tmp_path / "eval.jsonl", [*good_lines(3), '{"chosen": "x"'])
    code, err = run_main("--train_file_dir", train_file, "--validation_file_dir", eval_file, "--output_dir",
                         tmp_path / "out")
    assert code == 2 and f"{eval_file}:4" in err and "malformed JSON" in err, err
    write_lines(eval_file, good_lines(3))
    code, err = run_main("--train_file_dir", train_file, "--validation_file_dir", eval_file, "--max_eval_samples", 10,
                         "--output_dir", tmp_path / "out")
    assert code == 2 and "max_eval_samples is 10" in err and "only 3 valid pairs" in err, err
    assert not (tmp_path / "out").exists()


def test_skip_bad_records_drops_them_and_reports_count_and_first_locations(tmp_path, capsys):
    lines = [*good_lines(3), '{"broken', record(90, chosen=None), b'{"x": "\xff"}', record(91, rejected="A good answer 91."),
             record(92, rejected=[]), {"instruction": "q"}, "[1, 2]", *good_lines(4)]
    train_file = write_lines(tmp_path / "train.jsonl", lines)
    cfg = parse_config([*BASE, "--train_file_dir", str(train_file), "--validation_file_dir", "none", "--skip_bad_records",
                        "true", "--output_dir", str(tmp_path / "out")])
    logged = []
    train, evaluation = load_training_data(cfg, logged.append)
    assert len(train) == 7 and evaluation is None
    report = next(m for m in logged if "bad records from" in m)
    assert "dropped 7 bad records" in report
    for line in (4, 5, 6, 7, 8):  # the first five locations
        assert f"{train_file}:{line}:" in report, report
    assert f"{train_file}:9:" not in report
    cfg.skip_bad_records = False
    with pytest.raises(DataError, match=f"{train_file}:4: malformed JSON"):  # strict: the same first bad line
        load_training_data(cfg, logged.append)


# ---- output_dir and checkpoints
def test_output_dir_of_another_run_is_refused_and_left_as_it_was(tmp_path, run_main):
    train_file = write_lines(tmp_path / "train.jsonl", good_lines(20))
    out = tmp_path / "out"
    checkpoint = out / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    settings = vars(resolve_mixed_precision(parse_config([*BASE, "--train_file_dir", str(train_file),
                                                          "--output_dir", str(out)])))  # as a run saves it
    (checkpoint / "training_config.json").write_text(json.dumps({**settings, "learning_rate": 0.5}))
    (checkpoint / COMPLETE_MARKER).write_text("{}")
    (out / "notes.txt").write_text("earlier work")

    def refused(*args) -> str:
        """Runs train.py's main; it must exit 2 and leave output_dir exactly as it was (names, bytes, times)."""
        before = snapshot(out)
        code, err = run_main("--train_file_dir", train_file, "--output_dir", out, *args)
        assert code == 2, err
        assert snapshot(out) == before, "a refused run changed output_dir"
        return err

    err = refused()  # a fresh run into it
    assert "holds checkpoints of a run" in err and "--resume_from_checkpoint latest" in err, err
    err = refused("--resume_from_checkpoint", "latest")
    assert "other settings" in err and "learning_rate: 0.5 -> 2e-05" in err, err
    other = tmp_path / "other"
    (other / "checkpoint-1").mkdir(parents=True)
    (other / "checkpoint-1" / "training_config.json").write_text(json.dumps(settings))
    (other / "checkpoint-1" / COMPLETE_MARKER).write_text("{}")
    (checkpoint / "training_config.json").write_text(json.dumps({**settings, "seed": 7}))
    err = refused("--resume_from_checkpoint", other / "checkpoint-1")
    assert "holds another run" in err, err


def test_a_checkpoint_from_before_recipes_resumes_under_the_original_recipe_only(tmp_path):
    """training_config.json files written before the recipe settings existed lack their keys: they trained with
    the original recipe, so --recipe original matches them and the default recipe is named as the difference."""
    from rm.checkpoint import _config_differences

    argv = [*BASE, "--train_file_dir", "t.jsonl", "--output_dir", str(tmp_path)]
    old = vars(resolve_mixed_precision(parse_config([*argv, "--recipe", "original"])))
    for key in ("recipe", "lora_dropout", "use_rslora", "min_score_learning_rate", "min_lora_b_learning_rate",
                "disable_dropout"):
        old.pop(key)
    assert _config_differences(old, resolve_mixed_precision(parse_config([*argv, "--recipe", "original"]))) == []
    differences = _config_differences(old, resolve_mixed_precision(parse_config(argv)))
    assert "recipe: 'original' -> 'tuned'" in differences and "lora_dropout: 0.05 -> 0.0" in differences


def test_resume_without_a_complete_checkpoint_is_refused(tmp_path, run_main):
    out = tmp_path / "out"
    code, err = run_main("--output_dir", out, "--resume_from_checkpoint", "latest")
    assert code == 2 and "no complete checkpoint" in err, err
    torn = out / "checkpoint-6"  # a save killed before its marker
    torn.mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"partial")
    code, err = run_main("--output_dir", out, "--resume_from_checkpoint", torn)
    assert code == 2 and "incomplete checkpoint" in err, err
    code, err = run_main("--output_dir", out, "--resume_from_checkpoint", "latest")
    assert code == 2 and "no complete checkpoint" in err, err
    assert (torn / "model.safetensors").read_bytes() == b"partial"


def test_interrupted_saves_never_look_complete_and_rotation_keeps_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step != 8:  # checkpoint-8: its save was interrupted before the marker
            (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("{}")
    (tmp_path / f"{STAGING_PREFIX}checkpoint-10").mkdir()
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-6")
    removed = rotate_checkpoints(str(tmp_path), total_limit=2)
    assert sorted(os.path.basename(p) for p in removed) == [f"{STAGING_PREFIX}checkpoint-10", "checkpoint-2",
                                                              "checkpoint-8"]
    assert [os.path.basename(p) for p in complete_checkpoints(str(tmp_path))] == ["checkpoint-4", "checkpoint-6"]


# ---- arguments and the accelerate yaml
def write_yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


YAML = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: {stage}
{extra}mixed_precision: 'no'
num_machines: {machines}
num_processes: {processes}
"""


@pytest.mark.parametrize("stage", [0, 4, "'three'"])
def test_zero_stage_other_than_1_2_3(tmp_path, stage):
    path = write_yaml(tmp_path / "a.yaml", YAML.format(stage=stage, extra="", machines=1, processes=2))
    problems = accelerate_config_problems(path)
    assert len(problems) == 1 and "deepspeed_config.zero_stage" in problems[0] and path in problems[0]


def test_gradient_accumulation_in_the_yaml(tmp_path):
    path = write_yaml(tmp_path / "a.yaml", YAML.format(stage=2, extra="  gradient_accumulation_steps: 4\n", machines=1,
                                                       processes=2))
    problems = accelerate_config_problems(path)
    assert len(problems) == 1 and "gradient_accumulation_steps' is set" in problems[0]


def test_num_processes_must_be_nodes_times_gpus(tmp_path, capsys):
    path = write_yaml(tmp_path / "a.yaml", YAML.format(stage=3, extra="", machines=2, processes=8))
    assert accelerate_config_problems(path, gpus_per_node=4) == []
    problems = accelerate_config_problems(path, gpus_per_node=2)
    assert len(problems) == 1 and "num_processes' is 8 but nodes x GPUs is 2 x 2 = 4" in problems[0]
    assert validate_main(["--accelerate_config", path, "--num_machines", "2", "--num_processes", "7"]) == 2
    assert "not a multiple of num_machines 2" in capsys.readouterr().err
    for shipped in sorted((ROOT / "accelerate_configs").glob("*.yaml")):  # the repo's own yamls pass
        assert accelerate_config_problems(str(shipped)) == [], shipped


def test_unreachable_master_is_a_clear_timeout_not_a_hang(capsys):
    with socket.socket() as probe:  # a local port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    code = validate_main(["--accelerate_config", str(ROOT / "accelerate_configs/zero3_2node.yaml"), "--machine_rank",
                          "1", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                          "--connect_timeout", "3"])
    assert code == 2 and time.monotonic() - started < 10
    assert f"master 127.0.0.1:{port} not reachable within 3 s" in capsys.readouterr().err
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert master_reachable_problem("127.0.0.1", listener.getsockname()[1], 3) is None


def test_bad_arguments(capsys):
    for args, name in ((["--save_total_limit", "-1"], "save_total_limit"),
                       (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
                       (["--learning_rate", "fast"], "learning_rate")):
        with pytest.raises((ConfigError, SystemExit)) as raised:
            parse_config(args)
        message = str(raised.value) if raised.type is ConfigError else capsys.readouterr().err  # argparse prints
        assert name in message and args[1] in message, (args, message)
    cfg = parse_config(["--skip_nonfinite_steps", "true"])
    with pytest.raises(ConfigError, match="not supported under DeepSpeed"):
        check_accelerator_settings(cfg, uses_deepspeed=True)


# ---- non-finite steps, in real runs (a huge learning rate overflows the weights after the first real update)
NAN_RUN = ["--config", "examples/quickstart.yaml", "--max_train_samples", "40", "--max_steps", "6", "--save_steps", "1",
           "--save_total_limit", "0", "--learning_rate", "1e30", "--warmup_ratio", "0", "--logging_steps", "1",
           "--max_eval_samples", "8", "--report_to", "none"]


def run_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_non_finite_step_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = run_script(*NAN_RUN, "--output_dir", out)
    assert proc.returncode == EXIT_NONFINITE, proc.stderr[-3000:]
    match = re.search(r"non-finite loss or gradient norm at optimizer step (\d+)", proc.stderr)
    assert match, proc.stderr[-3000:]
    bad_step = int(match.group(1))
    assert bad_step >= 2
    kept = [os.path.basename(p) for p in complete_checkpoints(str(out))]
    assert kept == [f"checkpoint-{s}" for s in range(1, bad_step)]
    assert not (out / f"checkpoint-{bad_step}").exists() and not (out / "model").exists()


def test_skip_nonfinite_steps_skips_them_and_never_applies_them(tmp_path):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "skip"
    proc = run_script(*NAN_RUN, "--save_steps", "100", "--skip_nonfinite_steps", "true", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"skipped \d+ optimizer steps with a non-finite loss or gradient norm", proc.stdout), proc.stdout
    weights = load_file(out / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
