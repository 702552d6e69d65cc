"""Check an accelerate yaml and the launch topology before `accelerate launch` reads it (the launcher runs this):

    python -m rm.validate --accelerate_config FILE --num_machines N --num_processes P [--gpus_per_node G]
                          [--main_process_ip HOST --main_process_port PORT --machine_rank R --connect_timeout S]

Exits 2 with one line per problem: a count that is not a positive integer (in the yaml or on the command line), a
machine rank outside 0..num_machines-1, a port outside 1..65535, a timeout that is not a positive number of seconds,
zero stage not 1/2/3, a DeepSpeed section or json that is not a mapping, gradient accumulation set in the yaml or its
DeepSpeed json, num_processes not nodes x GPUs, on a worker node (machine rank > 0) no master address to check or the
master unreachable within the timeout. A topology value left off the command line is the yaml's, as for
`accelerate launch`. On success it prints one line: the launch it checked and what was checked.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from rm.cli import OneLineParser

# what `accelerate launch` uses for a topology value that neither the command line nor the yaml sets
ACCELERATE_DEFAULTS = {"num_machines": 1, "num_processes": 1, "machine_rank": 0}


def _yaml_error(err: yaml.YAMLError) -> str:
    """A yaml error in one line (PyYAML's own text spans several, with a snippet of the file)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or " ".join(str(err).split())
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def read_accelerate_config(path: str) -> tuple[dict[str, Any], str | None]:
    """(the yaml's settings, None), or ({}, the one-line problem)."""
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        return {}, f"{path}: cannot read the accelerate config: {err.strerror or err}"
    except UnicodeDecodeError as err:
        return {}, f"{path}: not UTF-8 text (byte {err.start})"
    except yaml.YAMLError as err:
        return {}, f"{path}: not valid yaml: {_yaml_error(err)}"
    if not isinstance(config, dict):
        return {}, f"{path}: expected a mapping of accelerate settings"
    return config, None


def _as_int(value: Any) -> int | None:
    """An integer, or a string of digits (accelerate reads the yaml as it is); None for anything else (a bool, a
    float, a word)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
        return int(value)
    return None


def _setting(config: dict[str, Any], path: str, name: str, given: Any, problems: list[str],
             minimum: int = 1) -> tuple[int | None, str]:
    """(the value of a topology setting: the command line's, else the yaml's, else accelerate's default; None when
    it is out of range, with the problem appended), and where it came from."""
    if given is not None:
        value, source = given, f"--{name}"
    else:
        value, source = config.get(name, ACCELERATE_DEFAULTS.get(name)), f"{path}: field '{name}'"
    number = _as_int(value)
    if number is None or number < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        problems.append(f"{source} is {value!r}; expected {expected}")
        return None, source
    return number, source


def accelerate_config_problems(path: str, num_machines: int | None = None, num_processes: int | None = None,
                               gpus_per_node: int | None = None, machine_rank: int | None = None) -> list[str]:
    """Problems of an accelerate yaml for a launch on num_machines x gpus_per_node as machine machine_rank (each
    defaulting to the yaml's own values); an empty list means it is fine."""
    config, problem = read_accelerate_config(path)
    if problem:
        return [problem]
    problems: list[str] = []
    machines, _ = _setting(config, path, "num_machines", num_machines, problems)
    processes, source = _setting(config, path, "num_processes", num_processes, problems)
    gpus = _setting(config, path, "gpus_per_node", gpus_per_node, problems)[0] if gpus_per_node is not None else None
    rank, rank_source = _setting(config, path, "machine_rank", machine_rank, problems, minimum=0)
    if machines and processes and processes % machines:
        problems.append(f"{source} is {processes}, not a multiple of num_machines {machines}")
    if machines and processes and gpus and processes != machines * gpus:
        problems.append(f"{source} is {processes} but nodes x GPUs is {machines} x {gpus} = {machines * gpus}")
    if machines and rank is not None and rank >= machines:
        problems.append(f"{rank_source} is {rank} but machine ranks run 0..{machines - 1} for {machines} "
                        "machine(s)")
    if config.get("distributed_type") == "DEEPSPEED":
        problems += _deepspeed_problems(config, path)
    if config.get("gradient_accumulation_steps") not in (None, 1, "auto"):
        problems.append(f"{path}: field 'gradient_accumulation_steps' is set; remove it: --gradient_accumulation_steps "
                        "owns that value")
    return problems


def _deepspeed_problems(config: dict[str, Any], path: str) -> list[str]:
    deepspeed = config.get("deepspeed_config") or {}
    if not isinstance(deepspeed, dict):
        return [f"{path}: field 'deepspeed_config' is {deepspeed!r}; expected a mapping of DeepSpeed settings"]
    problems = []
    json_file = deepspeed.get("deepspeed_config_file")
    ds_json: dict[str, Any] = {}
    if json_file is not None and not isinstance(json_file, str):
        problems.append(f"{path}: field 'deepspeed_config.deepspeed_config_file' is {json_file!r}; expected a file "
                        "path")
    elif json_file:
        json_path = Path(json_file) if Path(json_file).is_absolute() else Path(path).parent.parent / json_file
        json_path = json_path if json_path.exists() else Path(json_file)
        try:
            loaded = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # ValueError: bad json, or bytes that are not UTF-8
            problems.append(f"{path}: field 'deepspeed_config.deepspeed_config_file' {json_file}: {err}")
        else:
            if isinstance(loaded, dict):
                ds_json = loaded
            else:
                problems.append(f"{json_file}: expected a json object of DeepSpeed settings, got "
                                f"{type(loaded).__name__}")
    zero = ds_json.get("zero_optimization", {})
    if not isinstance(zero, dict):
        problems.append(f"{json_file}: field 'zero_optimization' is {zero!r}; expected an object")
        zero = {}
    stage = deepspeed.get("zero_stage", zero.get("stage"))
    if str(stage) not in {"1", "2", "3"}:
        problems.append(f"{path}: field 'deepspeed_config.zero_stage' is {stage!r}; this trainer runs ZeRO "
                        "stage 1, 2 or 3")
    for where, settings in ((f"{path}: field 'deepspeed_config.", deepspeed), (f"{json_file}: field '", ds_json)):
        if settings.get("gradient_accumulation_steps") not in (None, "auto"):
            problems.append(f"{where}gradient_accumulation_steps' is set; remove it: it silently overrides "
                            "--gradient_accumulation_steps")
    return problems


def master_reachable_problem(host: str, port: int, timeout_s: float) -> str | None:
    """A worker node (machine_rank > 0) must reach the master's port; retried until timeout_s because the master
    may start a little later. None when reachable."""
    deadline = time.monotonic() + timeout_s
    error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.1, deadline - time.monotonic()))):
                return None
        except OSError as err:
            error = err
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        except ValueError as err:  # a host name no resolver accepts (an empty label, a label over 63 characters)
            return f"--main_process_ip {host!r} is not a host name or address ({err})"
    return (f"master {host}:{port} not reachable within {timeout_s:g} s ({error}); check --main_process_ip / "
            "master_addr, the port, and that node 0 is started")


def _port_problem(port: Any, source: str) -> str | None:
    number = _as_int(port)
    return None if number is not None and 1 <= number <= 65535 else f"{source} is {port!r}; expected a port 1..65535"


def worker_problems(args: argparse.Namespace) -> list[str]:
    """On a worker node (machine rank above 0), the master must answer; what the command line leaves out is the
    yaml's, as for `accelerate launch`. Nothing to check on node 0."""
    config, _ = read_accelerate_config(args.accelerate_config)
    rank = _as_int(args.machine_rank if args.machine_rank is not None else config.get("machine_rank", 0))
    if not rank:
        return []
    host = args.main_process_ip or config.get("main_process_ip")
    port = args.main_process_port if args.main_process_port is not None else config.get("main_process_port")
    missing = [flag for flag, value in (("--main_process_ip", host), ("--main_process_port", port)) if not value]
    if missing:
        return [f"machine rank {rank} is a worker node, whose check needs the master's address: give "
                f"{' and '.join(missing)} (not on the command line, not in the yaml)"]
    if problem := _port_problem(port, f"{args.accelerate_config}: field 'main_process_port'"):
        return [problem]
    unreachable = master_reachable_problem(str(host), int(port), args.connect_timeout)
    return [unreachable] if unreachable else []


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description="Check an accelerate yaml and the launch topology before launch.")
    parser.add_argument("--accelerate_config", required=True)
    parser.add_argument("--num_machines", type=int)
    parser.add_argument("--num_processes", type=int, help="total processes (nodes x GPUs per node)")
    parser.add_argument("--gpus_per_node", type=int)
    parser.add_argument("--main_process_ip", help="the master's address (default: the yaml's)")
    parser.add_argument("--main_process_port", type=int, help="the master's port (default: the yaml's)")
    parser.add_argument("--machine_rank", type=int, help="this machine's rank (default: the yaml's, else 0); above 0 "
                        "the master must answer at --main_process_ip:--main_process_port")
    parser.add_argument("--connect_timeout", type=float, default=60.0, help="seconds a worker node waits for the "
                        "master (> 0)")
    args = parser.parse_args(argv)
    problems = []
    if args.main_process_port is not None and (problem := _port_problem(args.main_process_port,
                                                                        "--main_process_port")):
        problems.append(problem)
    if not (math.isfinite(args.connect_timeout) and args.connect_timeout > 0):
        problems.append(f"--connect_timeout is {args.connect_timeout:g}; expected a positive number of seconds")
    problems += accelerate_config_problems(args.accelerate_config, args.num_machines, args.num_processes,
                                           args.gpus_per_node, args.machine_rank)
    if not problems:
        problems += worker_problems(args)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(what_was_checked(args))
    return 2 if problems else 0


def what_was_checked(args: argparse.Namespace) -> str:
    """The one line printed on success: the launch as accelerate will see it, and what was checked."""
    config, _ = read_accelerate_config(args.accelerate_config)

    def value(name: str) -> Any:
        given = getattr(args, name)
        return given if given is not None else config.get(name, ACCELERATE_DEFAULTS.get(name))

    kind = str(config.get("distributed_type", "NO"))
    kind = "no distributed training (NO)" if kind == "NO" else kind
    deepspeed = config.get("deepspeed_config") or {}
    if kind == "DEEPSPEED":
        stage = deepspeed.get("zero_stage")
        kind = f"DeepSpeed ZeRO-{stage}" if stage is not None else "DeepSpeed (ZeRO stage 1/2/3 in its json)"
    gpus = f" (= nodes x {args.gpus_per_node} GPUs per node)" if args.gpus_per_node is not None else ""
    rank = _as_int(value("machine_rank")) or 0
    master = (f"; master {args.main_process_ip or config.get('main_process_ip')}:"
              f"{value('main_process_port')} answers" if rank else "")
    return (f"ok: {args.accelerate_config}: {kind}, {value('num_machines')} machine(s), {value('num_processes')} "
            f"processes{gpus}, machine rank {rank}{master}; counts, ranks and ports in range, no gradient "
            "accumulation set in the yaml")


if __name__ == "__main__":
    sys.exit(main())
