"""Check an accelerate yaml and the launch topology before `accelerate launch` reads it (the launcher runs this):

    python -m rm.validate --accelerate_config FILE --num_machines N --num_processes P [--gpus_per_node G]
                          [--main_process_ip HOST --main_process_port PORT --machine_rank R --connect_timeout S]

Exits 2 with one line per problem: zero stage not 1/2/3, gradient accumulation set in the yaml or its DeepSpeed
json, num_processes not nodes x GPUs, the master unreachable from a worker node within the timeout.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def accelerate_config_problems(path: str, num_machines: int | None = None, num_processes: int | None = None,
                               gpus_per_node: int | None = None) -> list[str]:
    """Problems of an accelerate yaml for a launch on num_machines x gpus_per_node (each defaulting to the
    yaml's own values); an empty list means it is fine."""
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        return [f"{path}: cannot read the accelerate config: {err}"]
    if not isinstance(config, dict):
        return [f"{path}: expected a mapping of accelerate settings"]
    problems = []
    machines = num_machines if num_machines is not None else int(config.get("num_machines", 1))
    processes = num_processes if num_processes is not None else int(config.get("num_processes", 1))
    source = "--num_processes" if num_processes is not None else f"{path}: field 'num_processes'"
    if processes % machines:
        problems.append(f"{source} is {processes}, not a multiple of num_machines {machines}")
    if gpus_per_node is not None and processes != machines * gpus_per_node:
        problems.append(f"{source} is {processes} but nodes x GPUs is {machines} x {gpus_per_node} = "
                        f"{machines * gpus_per_node}")
    if config.get("distributed_type") == "DEEPSPEED":
        deepspeed = config.get("deepspeed_config") or {}
        json_file = deepspeed.get("deepspeed_config_file")
        ds_json: dict[str, Any] = {}
        if json_file:
            json_path = Path(json_file) if Path(json_file).is_absolute() else Path(path).parent.parent / json_file
            json_path = json_path if json_path.exists() else Path(json_file)
            try:
                ds_json = json.loads(json_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                problems.append(f"{path}: field 'deepspeed_config.deepspeed_config_file' {json_file}: {err}")
        stage = deepspeed.get("zero_stage", ds_json.get("zero_optimization", {}).get("stage"))
        if str(stage) not in {"1", "2", "3"}:
            problems.append(f"{path}: field 'deepspeed_config.zero_stage' is {stage!r}; this trainer runs ZeRO "
                            "stage 1, 2 or 3")
        for where, settings in ((f"{path}: field 'deepspeed_config.", deepspeed), (f"{json_file}: field '", ds_json)):
            if settings.get("gradient_accumulation_steps") not in (None, "auto"):
                problems.append(f"{where}gradient_accumulation_steps' is set; remove it: it silently overrides "
                                "--gradient_accumulation_steps")
    if config.get("gradient_accumulation_steps") not in (None, 1, "auto"):
        problems.append(f"{path}: field 'gradient_accumulation_steps' is set; remove it: --gradient_accumulation_steps "
                        "owns that value")
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
    return (f"master {host}:{port} not reachable within {timeout_s:g} s ({error}); check --main_process_ip / "
            "master_addr, the port, and that node 0 is started")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check an accelerate yaml and the launch topology before launch.")
    parser.add_argument("--accelerate_config", required=True)
    parser.add_argument("--num_machines", type=int)
    parser.add_argument("--num_processes", type=int, help="total processes (nodes x GPUs per node)")
    parser.add_argument("--gpus_per_node", type=int)
    parser.add_argument("--main_process_ip")
    parser.add_argument("--main_process_port", type=int)
    parser.add_argument("--machine_rank", type=int, default=0)
    parser.add_argument("--connect_timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    problems = accelerate_config_problems(args.accelerate_config, args.num_machines, args.num_processes,
                                          args.gpus_per_node)
    if args.machine_rank > 0 and args.main_process_ip and args.main_process_port and not problems:
        unreachable = master_reachable_problem(args.main_process_ip, args.main_process_port, args.connect_timeout)
        problems += [unreachable] if unreachable else []
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
