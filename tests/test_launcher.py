"""torchrun_multi_node_multi_gpu.sh: the original interface, checked by what it prints and by real CPU launches.

The dry runs (RM_DRY_RUN=1) print the exact argument list the script would exec; the real runs go through the
script itself and assert, from run_info.json, what ran: DeepSpeed, the stage asked for, the total world size.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPT = ROOT / "torchrun_multi_node_multi_gpu.sh"
# a short real run of the launcher's own defaults (LoRA + gradient checkpointing, bf16 from the yaml)
SHORT_RUN = ["--max_steps", "3", "--max_train_samples", "48", "--max_eval_samples", "8", "--report_to", "none"]


def launcher_env(**extra: str) -> dict[str, str]:
    """The caller's environment with this venv's `accelerate` first on PATH, as an activated venv would have it."""
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "RM_DRY_RUN", "MODEL_PATH", "OUTPUT_DIR")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/torch_ext")
    return {**env, **extra}


def launch(*args: str, script: Path = SCRIPT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=launcher_env(**env), capture_output=True, text=True,
                          timeout=600)


def dry_run(*args: str, **env: str) -> tuple[str, list[str]]:
    """(the configuration block, the command the script would exec)."""
    proc = launch(*args, RM_DRY_RUN="1", **env)
    assert proc.returncode == 0, proc.stderr
    block, command = proc.stdout.rstrip("\n").rsplit("\n", 1)
    return block, shlex.split(command)


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.mark.parametrize("stage", ["0", "4", "zero3"])
def test_rejects_a_stage_other_than_1_2_3(stage):
    proc = launch(stage, RM_DRY_RUN="1")
    assert proc.returncode == 1
    assert "zero_stage must be 1, 2 or 3" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("node_rank", ["2", "-1", "one"])
def test_rejects_a_node_rank_outside_the_nodes(node_rank):
    proc = launch("3", "2", "4", "10.0.0.1", "29500", RM_DRY_RUN="1", NODE_RANK=node_rank)
    assert proc.returncode == 1 and f"NODE_RANK={node_rank} is outside 0..1" in proc.stderr


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
    assert proc.returncode == 1 and "gradient_accumulation_steps" in proc.stderr + proc.stdout
    assert "accelerate launch" not in proc.stdout


def test_example_1_defaults_one_node():
    """No arguments = `3 1 4 localhost 29500`: ZeRO-3 on 4 GPUs of one node."""
    block, command = dry_run()
    assert dry_run("3", "1", "4", "localhost", "29500") == (block, command)
    assert command[:4] == ["accelerate", "launch", "--config_file", "accelerate_configs/zero3_1node.yaml"]
    assert [flag(command, f) for f in ("--num_machines", "--machine_rank", "--main_process_ip",
                                        "--main_process_port", "--num_processes")] == ["1", "0", "localhost",
                                                                                       "29500", "4"]
    assert command[command.index("train.py") + 1:] == []  # no setting of its own: rm/config.py owns the defaults
    for line in ("ZeRO stage:      3", "nodes:           1", "GPUs per node:   4", "world size:      4",
                 "node rank:       0", "master:          localhost:29500",
                 "config:          accelerate_configs/zero3_1node.yaml", "output dir:      (rm/config.py default)"):
        assert line in block


@pytest.mark.parametrize("node_rank", ["0", "1"])
def test_example_2_two_nodes(node_rank):
    block, command = dry_run("3", "2", "4", "10.0.0.1", "29500", NODE_RANK=node_rank)
    assert flag(command, "--config_file") == "accelerate_configs/zero3_2node.yaml"
    assert [flag(command, f) for f in ("--num_machines", "--machine_rank", "--main_process_ip",
                                        "--main_process_port", "--num_processes")] == ["2", node_rank, "10.0.0.1",
                                                                                       "29500", "8"]
    assert f"node rank:       {node_rank}" in block and "world size:      8" in block


def test_paths_from_the_environment_and_extra_arguments_reach_train_py():
    env = dict(MODEL_PATH="/models/Qwen3 0.6B", TOKENIZER_PATH="/tok", TRAIN_FILE_DIR="/data/train",
               VALID_FILE_DIR="/data/valid", OUTPUT_DIR="/out/rm", CACHE_DIR="/cache")
    block, command = dry_run("1", "1", "2", "127.0.0.1", "29501", "--use_peft", "false", "--seed", "7", **env)
    assert flag(command, "--config_file") == "accelerate_configs/zero1_1node.yaml"
    assert command[command.index("train.py") + 1:] == [
        "--model_name_or_path", "/models/Qwen3 0.6B", "--tokenizer_name_or_path", "/tok",
        "--train_file_dir", "/data/train", "--validation_file_dir", "/data/valid", "--output_dir", "/out/rm",
        "--cache_dir", "/cache", "--use_peft", "false", "--seed", "7"]
    assert "output dir:      /out/rm" in block and "model:           /models/Qwen3 0.6B" in block


def test_every_command_the_launcher_builds_parses_as_accelerate_launch():
    """accelerate's own parser reads the yaml and the topology flags the script writes."""
    from accelerate.commands.launch import launch_command_parser

    for args, node_rank in [(("1", "1", "2"), "0"), (("2", "2", "4", "10.0.0.1"), "1"), ((), "0")]:
        _, command = dry_run(*args, NODE_RANK=node_rank)
        parsed = launch_command_parser().parse_args(command[2:])
        assert (parsed.num_machines, parsed.machine_rank, parsed.training_script) == (
            int(flag(command, "--num_machines")), int(node_rank), "train.py")


def read_run(output_dir: Path) -> tuple[dict, dict]:
    return tuple(json.loads((output_dir / name).read_text()) for name in ("run_info.json", "metrics.json"))


def test_real_launch_one_node_two_processes_zero2(tmp_path):
    """`bash torchrun_multi_node_multi_gpu.sh 2 1 2 127.0.0.1 PORT` on CPU: a real 2-process ZeRO-2 run (gloo)
    with the launcher's defaults (LoRA) and gradient checkpointing asked for: the combination the original script
    had to switch checkpointing off for."""
    out = tmp_path / "out"
    proc = launch("2", "1", "2", "127.0.0.1", "29601", *SHORT_RUN, "--gradient_checkpointing", "true",
                  MODEL_PATH="tiny", OUTPUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "config:          accelerate_configs/zero2_1node.yaml" in proc.stdout
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
        assert f"node rank:       {rank}" in log and "config:          accelerate_configs/zero3_2node.yaml" in log
    info, metrics = read_run(out)
    assert (info["distributed_type"], info["zero_stage"], info["num_processes"]) == ("DEEPSPEED", 3, 2)
    assert metrics["final"]["step"] == 3 and (out / "model" / "config.json").is_file()
