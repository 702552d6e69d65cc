"""torchrun_multi_node_multi_gpu.sh: the original interface, checked by what it prints and by real CPU launches;
and rm.validate, the check it runs before `accelerate launch`.

The dry runs (RM_DRY_RUN=1) print the exact argument list the script would exec; the real runs go through the
script itself and assert, from run_info.json, what ran: DeepSpeed, the stage asked for, the total world size.
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from rm.cli.validate import main as validate_main

SCRIPT = ROOT / "torchrun_multi_node_multi_gpu.sh"
TRAIN_PY = str(ROOT / "train.py")  # the launcher runs it by its path, from the caller's directory
# a short real run of the launcher's own defaults (LoRA + gradient checkpointing, bf16 from the yaml)
SHORT_RUN = ["--max_steps", "3", "--max_train_samples", "48", "--max_eval_samples", "8", "--report_to", "none"]


def launcher_env(**extra: str) -> dict[str, str]:
    """The caller's environment with this venv's `accelerate` first on PATH, as an activated venv would have it."""
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "RM_DRY_RUN", "MODEL_PATH", "OUTPUT_DIR")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/torch_ext")
    return {**env, **extra}


def launch(*args: str, script: Path = SCRIPT, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=launcher_env(**env), capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def dry_run(*args: str, cwd: Path | None = None, **env: str) -> tuple[str, list[str]]:
    """(the configuration block, the command the script would exec)."""
    proc = launch(*args, RM_DRY_RUN="1", cwd=cwd, **env)
    assert proc.returncode == 0, proc.stderr
    block, command = proc.stdout.rstrip("\n").rsplit("\n", 1)
    return block, shlex.split(command)


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def refused_in_one_line(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit 1, one line naming the problem, nothing printed or started before it."""
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("stage", ["0", "4", "zero3"])
def test_rejects_a_stage_other_than_1_2_3(stage):
    refused_in_one_line(launch(stage, RM_DRY_RUN="1"), f"zero_stage must be 1, 2 or 3, got '{stage}'")


@pytest.mark.parametrize("node_rank", ["2", "-1", "one", "08", "1x"])
def test_rejects_a_node_rank_outside_the_nodes(node_rank):
    refused_in_one_line(launch("3", "2", "4", "10.0.0.1", "29500", RM_DRY_RUN="1", NODE_RANK=node_rank),
                        f"NODE_RANK must be a node rank 0..1 for 2 node(s), got '{node_rank}'")


@pytest.mark.parametrize("args, message", [
    (("3", "1", "4", "localhost", "99999"), "master_port must be a port 1..65535, got '99999'"),
    (("3", "1", "4", "localhost", "65536"), "master_port must be a port 1..65535, got '65536'"),
    (("3", "1", "4", "localhost", "0"), "master_port must be a port 1..65535, got '0'"),
    (("3", "1", "4", "localhost", "12345678901234567890"), "master_port must be a port 1..65535"),
    (("3", "0", "4"), "num_nodes must be a positive integer (at most 9 digits), got '0'"),
    (("3", "-2", "4"), "num_nodes must be a positive integer (at most 9 digits), got '-2'"),
    (("3", "9999999999", "4"), "num_nodes must be a positive integer (at most 9 digits), got '9999999999'"),
    (("3", "1", "0"), "gpus_per_node must be a positive integer (at most 9 digits), got '0'"),
    (("3", "1", "four"), "gpus_per_node must be a positive integer (at most 9 digits), got 'four'"),
])
def test_rejects_counts_and_ports_out_of_range(args, message):
    """A port over 65535 used to pass (digits only) and fail later in accelerate with a 33-line OverflowError."""
    refused_in_one_line(launch(*args, RM_DRY_RUN="1"), message)


def test_numbers_with_leading_zeros_are_read_in_base_10():
    _, command = dry_run("3", "02", "08", "10.0.0.1", "029500", NODE_RANK="01")
    assert [flag(command, f) for f in ("--num_machines", "--machine_rank", "--main_process_port",
                                        "--num_processes")] == ["2", "1", "29500", "16"]


def test_help_prints_the_usage_from_the_scripts_header():
    proc = launch("--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("Multi-node, multi-GPU reward-model training")
    assert "bash torchrun_multi_node_multi_gpu.sh [zero_stage] [num_nodes] [gpus_per_node]" in proc.stdout
    assert "RM_DRY_RUN=1" in proc.stdout and "set -euo" not in proc.stdout and "\n# " not in proc.stdout


def test_an_accelerate_missing_from_path_is_one_line_before_the_banner(tmp_path):
    """Without an activated venv it printed its banner, then `exec: accelerate: not found` (exit 127)."""
    env = {**launcher_env(), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(SCRIPT), "2", "1", "2"], env=env, capture_output=True, text=True, timeout=60)
    refused_in_one_line(proc, "accelerate is not on PATH")
    assert "activate" in proc.stderr and "ZeRO stage" not in proc.stdout


def test_an_accelerate_that_cannot_run_is_one_line_naming_its_python(tmp_path):
    """An `accelerate` whose venv was moved or deleted (its python is gone) is found before anything starts."""
    (tmp_path / "accelerate").write_text("#!/gone/venv/bin/python3\n")
    (tmp_path / "accelerate").chmod(0o755)
    env = {**launcher_env(), "PATH": f"{tmp_path}:/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(SCRIPT), "2", "1", "2"], env=env, capture_output=True, text=True, timeout=60)
    refused_in_one_line(proc, f"{tmp_path}/accelerate cannot run: its python (/gone/venv/bin/python3) lacks "
                              "accelerate or torch; activate the venv")


def test_errors_when_the_config_it_needs_is_missing(tmp_path):
    shutil.copy(SCRIPT, tmp_path)
    shutil.copytree(ROOT / "accelerate_configs", tmp_path / "accelerate_configs")
    shutil.copytree(ROOT / "rm", tmp_path / "rm")  # the launcher checks the yaml with rm.validate
    (tmp_path / "accelerate_configs" / "zero2_2node.yaml").unlink()
    script = tmp_path / SCRIPT.name
    proc = launch("2", "2", "4", "10.0.0.1", "29500", script=script, RM_DRY_RUN="1")
    assert proc.returncode == 1 and "accelerate_configs/zero2_2node.yaml not found" in proc.stderr
    assert launch("2", "1", "4", script=script, RM_DRY_RUN="1").returncode == 0  # the 1-node yaml is still there


def test_yaml_that_does_not_fit_the_topology_is_refused_before_launch(tmp_path):
    shutil.copy(SCRIPT, tmp_path)
    shutil.copytree(ROOT / "rm", tmp_path / "rm")
    shutil.copytree(ROOT / "accelerate_configs", tmp_path / "accelerate_configs")
    yaml_path = tmp_path / "accelerate_configs" / "zero3_1node.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("deepspeed_config:\n", "deepspeed_config:\n  gradient_accumulation_steps: 4\n"))
    proc = launch("3", "1", "4", script=tmp_path / SCRIPT.name, RM_DRY_RUN="1")
    assert proc.returncode == 1 and "gradient_accumulation_steps" in proc.stderr and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")  # rm.validate's one line


def test_example_1_defaults_one_node():
    """No arguments = `3 1 4 localhost 29500`: ZeRO-3 on 4 GPUs of one node."""
    block, command = dry_run()
    assert dry_run("3", "1", "4", "localhost", "29500") == (block, command)
    assert command[:4] == ["accelerate", "launch", "--config_file",
                           str(ROOT / "accelerate_configs/zero3_1node.yaml")]
    assert [flag(command, f) for f in ("--num_machines", "--machine_rank", "--main_process_ip",
                                        "--main_process_port", "--num_processes")] == ["1", "0", "localhost",
                                                                                       "29500", "4"]
    assert command[command.index(TRAIN_PY) + 1:] == []  # no setting of its own: rm/config.py owns the defaults
    for line in ("ZeRO stage:      3", "nodes:           1", "GPUs per node:   4", "world size:      4",
                 "node rank:       0", "master:          localhost:29500",
                 f"config:          {ROOT}/accelerate_configs/zero3_1node.yaml",
                 "model:           (rm/config.py default)", "output dir:      (rm/config.py default)"):
        assert line in block.splitlines()


@pytest.mark.parametrize("node_rank", ["0", "1"])
def test_example_2_two_nodes(node_rank):
    block, command = dry_run("3", "2", "4", "10.0.0.1", "29500", NODE_RANK=node_rank)
    assert flag(command, "--config_file") == str(ROOT / "accelerate_configs/zero3_2node.yaml")
    assert [flag(command, f) for f in ("--num_machines", "--machine_rank", "--main_process_ip",
                                        "--main_process_port", "--num_processes")] == ["2", node_rank, "10.0.0.1",
                                                                                       "29500", "8"]
    assert f"node rank:       {node_rank}" in block and "world size:      8" in block


def test_paths_from_the_environment_and_extra_arguments_reach_train_py():
    env = dict(MODEL_PATH="/models/Qwen3 0.6B", TOKENIZER_PATH="/tok", TRAIN_FILE_DIR="/data/train",
               VALID_FILE_DIR="/data/valid", OUTPUT_DIR="/out/rm", CACHE_DIR="/cache")
    block, command = dry_run("1", "1", "2", "127.0.0.1", "29501", "--use_peft", "false", "--seed", "7", **env)
    assert flag(command, "--config_file") == str(ROOT / "accelerate_configs/zero1_1node.yaml")
    assert command[command.index(TRAIN_PY) + 1:] == [
        "--model_name_or_path", "/models/Qwen3 0.6B", "--tokenizer_name_or_path", "/tok",
        "--train_file_dir", "/data/train", "--validation_file_dir", "/data/valid", "--output_dir", "/out/rm",
        "--cache_dir", "/cache", "--use_peft", "false", "--seed", "7"]
    assert "output dir:      /out/rm" in block and "model:           /models/Qwen3 0.6B" in block


@pytest.mark.parametrize("args, env, model, output_dir", [
    (("--output_dir", "/out/b"), {}, "(rm/config.py default)", "/out/b"),
    (("--output_dir", "/out/b"), {"OUTPUT_DIR": "/out/a"}, "(rm/config.py default)", "/out/b"),  # train.py: last wins
    (("--output_dir=/out/b", "--model_name_or_path", "m"), {"MODEL_PATH": "tiny"}, "m", "/out/b"),
    (("--output-dir", "/out/c", "--output_dir", "/out/d"), {}, "(rm/config.py default)", "/out/d"),
    (("--config", "run.yaml",), {"OUTPUT_DIR": "/out/a"},
     "(--config run.yaml's model_name_or_path if it sets one, else rm/config.py default)", "/out/a"),
    (("--config=run.yaml",), {},
     "(--config run.yaml's model_name_or_path if it sets one, else rm/config.py default)",
     "(--config run.yaml's output_dir if it sets one, else rm/config.py default)"),
])
def test_banner_shows_the_output_dir_and_model_train_py_will_use(args, env, model, output_dir):
    """An --output_dir among the train.py arguments is what train.py uses (it used to show the rm/config.py default,
    or OUTPUT_DIR's value that the argument overrides)."""
    block, command = dry_run("3", "1", "4", "localhost", "29500", *args, **env)
    assert f"model:           {model}" in block.splitlines()
    assert f"output dir:      {output_dir}" in block.splitlines()
    assert command[-len(args):] == list(args)  # passed on unchanged


def test_runs_from_the_callers_directory(tmp_path):
    """Relative paths (OUTPUT_DIR=out, --train_file_dir data/x) are the caller's: the launcher no longer cd's into the
    repository; it finds the yaml and train.py by their paths."""
    block, command = dry_run("2", "1", "2", "127.0.0.1", "29500", "--train_file_dir", "data/x", cwd=tmp_path,
                             OUTPUT_DIR="out")
    assert f"working dir:     {tmp_path} (relative paths resolve here)" in block.splitlines()
    assert flag(command, "--config_file") == str(ROOT / "accelerate_configs/zero2_1node.yaml")
    assert command[command.index(TRAIN_PY) + 1:] == ["--output_dir", "out", "--train_file_dir", "data/x"]


def test_every_command_the_launcher_builds_parses_as_accelerate_launch():
    """accelerate's own parser reads the yaml and the topology flags the script writes."""
    from accelerate.commands.launch import launch_command_parser

    for args, node_rank in [(("1", "1", "2"), "0"), (("2", "2", "4", "10.0.0.1"), "1"), ((), "0")]:
        _, command = dry_run(*args, NODE_RANK=node_rank)
        parsed = launch_command_parser().parse_args(command[2:])
        assert (parsed.num_machines, parsed.machine_rank, parsed.training_script) == (
            int(flag(command, "--num_machines")), int(node_rank), TRAIN_PY)


def read_run(output_dir: Path) -> tuple[dict, dict]:
    return tuple(json.loads((output_dir / name).read_text()) for name in ("run_info.json", "metrics.json"))


def test_real_launch_one_node_two_processes_zero2(tmp_path):
    """`bash torchrun_multi_node_multi_gpu.sh 2 1 2 127.0.0.1 PORT` on CPU: a real 2-process ZeRO-2 run (gloo)
    with the launcher's defaults (LoRA) and gradient checkpointing asked for: the combination the original script
    had to switch checkpointing off for. Started from another directory with relative paths (OUTPUT_DIR=out,
    --train_file_dir data/train.jsonl): they are the caller's (the launcher used to cd into the repository)."""
    shutil.copytree(ROOT / "data" / "sample", tmp_path / "data")
    out = tmp_path / "out"
    proc = launch("2", "1", "2", "127.0.0.1", "29601", *SHORT_RUN, "--gradient_checkpointing", "true",
                  "--train_file_dir", "data/train.jsonl", "--validation_file_dir", "data/eval.jsonl",
                  cwd=tmp_path, MODEL_PATH="tiny", OUTPUT_DIR="out")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"config:          {ROOT}/accelerate_configs/zero2_1node.yaml" in proc.stdout
    assert not (ROOT / "out").exists()
    info, metrics = read_run(out)
    assert (info["distributed_type"], info["zero_stage"], info["num_processes"]) == ("DEEPSPEED", 2, 2)
    assert info["mixed_precision"] == "bf16" and info["gradient_accumulation_steps"] == 8
    config = json.loads((out / "training_config.json").read_text())
    assert config["use_peft"] and info["gradient_checkpointing"] is True  # run_info: what ran
    assert metrics["final"]["step"] == 3 and (out / "adapter").is_dir() and (out / "model").is_dir()


def run_nodes(node_envs: list[dict[str, str]], args: list[str], log_dir: Path, timeout: float = 600) -> list[tuple]:
    """Starts one launcher per node at once and polls them all: the first node that fails (or the timeout) stops
    the others at once, rather than leaving them to wait for a peer that is gone (torch's elastic agent waits up
    to 300 s at its exit barrier). Output goes to files, so no node can block on a full pipe while another is
    waited on. Returns (exit code, log, whether this function stopped it) per node."""
    logs = [open(log_dir / f"node{rank}.log", "w+") for rank in range(len(node_envs))]
    nodes = [subprocess.Popen(["bash", str(SCRIPT), *args], env=launcher_env(**env), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True) for env, log in zip(node_envs, logs)]
    deadline, stopped = time.monotonic() + timeout, set()
    while any(node.poll() is None for node in nodes):
        if any(node.poll() not in (None, 0) for node in nodes) or time.monotonic() > deadline:
            for rank, node in enumerate(nodes):
                if node.poll() is None:
                    os.killpg(node.pid, signal.SIGTERM)  # the agent stops its workers
                    stopped.add(rank)
            for node in nodes:
                try:
                    node.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(node.pid, signal.SIGKILL)
                    node.wait()
            break
        time.sleep(0.5)
    results = []
    for rank, (node, log) in enumerate(zip(nodes, logs)):
        log.seek(0)
        results.append((node.returncode, log.read(), rank in stopped))
        log.close()
    return results


def test_real_launch_example_2_as_two_nodes_of_one_process(tmp_path):
    """Example 2 on one machine: two launcher invocations, NODE_RANK 0 and 1, master 127.0.0.1, one process
    each; together one ZeRO-3 run of world size 2 (multinode launcher `standard`: each node runs torchrun)."""
    out = tmp_path / "out"
    results = run_nodes([dict(NODE_RANK=str(rank), MODEL_PATH="tiny", OUTPUT_DIR=str(out)) for rank in (0, 1)],
                        ["3", "2", "1", "127.0.0.1", "29602", *SHORT_RUN, "--use_peft", "false"], tmp_path)
    assert all(code == 0 for code, _, _ in results), "\n".join(
        f"node {rank} exited {code}{' (stopped: the other node failed first)' if stopped else ''}:\n{log[-4000:]}"
        for rank, (code, log, stopped) in enumerate(results) if code != 0)
    for rank, (_, log, _) in enumerate(results):
        assert f"node rank:       {rank}" in log
        assert f"config:          {ROOT}/accelerate_configs/zero3_2node.yaml" in log
    info, metrics = read_run(out)
    assert (info["distributed_type"], info["zero_stage"], info["num_processes"]) == ("DEEPSPEED", 3, 2)
    assert metrics["final"]["step"] == 3 and (out / "model" / "config.json").is_file()


# ---- rm.validate, the check the launcher runs before `accelerate launch`: misuse is one line per problem, exit 2
def validate(capsys, *args: str, yaml_text: str | None = None, tmp_path: Path | None = None) -> tuple[int, str]:
    config = str(ROOT / "accelerate_configs/zero3_2node.yaml")
    if yaml_text is not None:
        (tmp_path / "a.yaml").write_text(yaml_text)
        config = str(tmp_path / "a.yaml")
    try:
        code = validate_main(["--accelerate_config", config, *args])
    except SystemExit as stop:  # argparse's refusals
        code = stop.code
    err = capsys.readouterr().err
    return code, err


DEEPSPEED_YAML = "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n"


@pytest.mark.parametrize("yaml_text, message", [
    (DEEPSPEED_YAML + "num_processes: four\n", "a.yaml: field 'num_processes' is 'four'; expected a positive integer"),
    (DEEPSPEED_YAML + "num_machines: 0\n", "a.yaml: field 'num_machines' is 0; expected a positive integer"),
    (DEEPSPEED_YAML + "num_processes: 2.5\n", "a.yaml: field 'num_processes' is 2.5; expected a positive integer"),
    (DEEPSPEED_YAML + "machine_rank: -1\n", "a.yaml: field 'machine_rank' is -1; expected an integer >= 0"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config: [1, 2]\n",
     "a.yaml: field 'deepspeed_config' is [1, 2]; expected a mapping of DeepSpeed settings"),
    (DEEPSPEED_YAML + "  deepspeed_config_file: [a]\n",
     "a.yaml: field 'deepspeed_config.deepspeed_config_file' is ['a']; expected a file path"),
    ("num_processes: [\n", "a.yaml: not valid yaml:"),
])
def test_validate_a_yaml_field_that_is_not_a_setting(capsys, tmp_path, yaml_text, message):
    """`num_processes: four` was a ValueError traceback, `deepspeed_config: [1,2]` an AttributeError one."""
    code, err = validate(capsys, yaml_text=yaml_text, tmp_path=tmp_path)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_validate_a_deepspeed_json_that_is_not_an_object(capsys, tmp_path):
    (tmp_path / "ds.json").write_text("[1, 2]")
    code, err = validate(capsys, yaml_text=f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: "
                                           f"{tmp_path / 'ds.json'}\n", tmp_path=tmp_path)
    assert code == 2 and "ds.json: expected a json object of DeepSpeed settings, got list" in err, err


@pytest.mark.parametrize("args, messages", [
    (["--num_machines", "0"], ["--num_machines is 0; expected a positive integer"]),  # was a ZeroDivisionError
    (["--num_machines", "-2", "--num_processes", "-4", "--gpus_per_node", "2"],  # was accepted: -4 = -2 x 2
     ["--num_machines is -2; expected a positive integer", "--num_processes is -4; expected a positive integer"]),
    (["--num_machines", "1", "--num_processes", "0", "--gpus_per_node", "0"],  # was accepted: 0 = 1 x 0
     ["--num_processes is 0; expected a positive integer", "--gpus_per_node is 0; expected a positive integer"]),
    (["--num_machines", "1", "--num_processes", "4", "--machine_rank", "3"],
     ["--machine_rank is 3 but machine ranks run 0..0 for 1 machine(s)"]),
    (["--machine_rank", "-1"], ["--machine_rank is -1; expected an integer >= 0"]),
    (["--machine_rank", "1"],  # the reachability check was skipped silently
     ["machine rank 1 is a worker node, whose check needs the master's address: give --main_process_ip and "
      "--main_process_port (not on the command line, not in the yaml)"]),
    (["--machine_rank", "1", "--main_process_ip", "127.0.0.1"], ["give --main_process_port (not on"]),
    (["--connect_timeout", "-1"], ["--connect_timeout is -1; expected a positive number of seconds"]),
    (["--connect_timeout", "0"], ["--connect_timeout is 0; expected a positive number of seconds"]),
    (["--connect_timeout", "nan"], ["--connect_timeout is nan; expected a positive number of seconds"]),
    (["--machine_rank", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", "99999"],
     ["--main_process_port is 99999; expected a port 1..65535"]),  # was an OverflowError from the socket
    (["--num_machines", "two"], ["argument --num_machines: invalid int value: 'two' (see --help)"]),
])
def test_validate_refuses_out_of_range_arguments(capsys, args, messages):
    code, err = validate(capsys, *args)
    lines = err.splitlines()
    assert code == 2 and len(lines) == len(messages), err  # one line per problem, no traceback, no usage text
    assert all(line.startswith("error: ") and message in line for line, message in zip(lines, messages)), err


def test_validate_a_worker_takes_the_masters_address_from_the_yaml(capsys, tmp_path):
    """What the command line leaves out is the yaml's, as for `accelerate launch`: the check still runs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        yaml_text = (ROOT / "accelerate_configs/zero3_2node.yaml").read_text() + (
            f"main_process_ip: 127.0.0.1\nmain_process_port: {port}\n")
        assert validate(capsys, "--machine_rank", "1", "--connect_timeout", "5", yaml_text=yaml_text,
                        tmp_path=tmp_path) == (0, "")


def test_validate_says_what_it_checked_on_success(capsys):
    """It printed nothing: a user could not tell a check that passed from one that did not run."""
    config = str(ROOT / "accelerate_configs/zero2_1node.yaml")
    assert validate_main(["--accelerate_config", config, "--num_machines", "1", "--num_processes", "2",
                          "--gpus_per_node", "2"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.count("\n") == 1, out + err
    assert out.startswith(f"ok: {config}: DeepSpeed ZeRO-2, 1 machine(s), 2 processes (= nodes x 2 GPUs per node), "
                          "machine rank 0; counts, ranks and ports in range"), out
