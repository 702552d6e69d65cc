"""Up-front checks, before any model is built or anything is written: the data, the launch topology and the
accelerate yaml.

Data: every record of the train and eval data is read and checked (rm/data.py parses the layouts and raises
DataError naming file, line and field); on top of that a pair whose chosen equals its rejected or whose margin is
not finite is refused. With --skip_bad_records bad records are dropped and counted instead, with the first few
locations reported.

The accelerate yaml is read by `accelerate launch` itself, before train.py runs, so the launcher checks it with
    python -m rm.validate --accelerate_config FILE --num_machines N --num_processes P [--gpus_per_node G]
                          [--main_process_ip HOST --main_process_port PORT --machine_rank R --connect_timeout S]
which exits 2 with one line per problem (zero stage not 1/2/3, gradient accumulation set in the yaml or its
DeepSpeed json, num_processes not nodes x GPUs, the master unreachable from a worker node within the timeout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from rm.config import ConfigError, TrainConfig
from rm.data import DataError, Pair, _records, data_files, detect_layout, is_hub_name, load_pairs

SHOWN_BAD_RECORDS = 5


def check_pair(pair: Pair) -> None:
    """What rm/data.py's layout parsing does not refuse but training cannot use."""
    if pair.chosen.strip() == pair.rejected.strip():
        raise DataError(pair.source, "fields 'chosen' and 'rejected' are identical: the pair states no preference")
    if not math.isfinite(pair.margin):
        raise DataError(pair.source, f"field 'margin' must be a finite number, got {pair.margin}")


def _jsonl_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record or the DataError of that line) per non-empty line: one bad line does not stop the file."""
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield where, DataError(where, f"invalid UTF-8 at byte {err.start} of the line")
            continue
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            yield where, DataError(where, f"malformed JSON: {err.msg} (column {err.colno})")


def _read_skipping(path: Path, cache_dir: str | None, bad: list[DataError]) -> list[Pair]:
    """The good pairs of one file; each bad record's DataError goes to `bad`. The layout is detected from the
    first record that has one. A JSON array file that does not parse as a whole cannot be skipped through."""
    line_by_line = path.suffix == ".jsonl" or (path.suffix == ".json" and not _starts_with_bracket(path))
    records = _jsonl_lines(path) if line_by_line else _records(path, cache_dir)
    pairs: list[Pair] = []
    parse = None
    for where, record in records:
        try:
            if isinstance(record, DataError):
                raise record
            if parse is None:
                _, parse = detect_layout(record, where)
            elif not isinstance(record, dict):
                raise DataError(where, f"expected a JSON object, got {type(record).__name__}")
            pair = parse(record, where)
            pair.source = where
            check_pair(pair)
        except DataError as err:
            bad.append(err)
            continue
        pairs.append(pair)
    return pairs


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip().startswith(b"[")


def read_pairs(location: str, split: str, cfg: TrainConfig, log: Callable[[str], None]) -> list[Pair]:
    """Every pair at `location`, validated; bad records raise DataError, or are dropped under skip_bad_records."""
    if not cfg.skip_bad_records or is_hub_name(location):
        pairs = load_pairs(location, cache_dir=cfg.cache_dir, split=split, log=log)
        for pair in pairs:
            check_pair(pair)
        return pairs
    pairs, bad = [], []
    for path in data_files(location):
        file_pairs = _read_skipping(path, cfg.cache_dir, bad)
        log(f"{path}: {len(file_pairs)} pairs")
        pairs += file_pairs
    if bad:
        shown = "; ".join(str(err) for err in bad[:SHOWN_BAD_RECORDS])
        log(f"skip_bad_records: dropped {len(bad)} bad records from {location} (first {min(len(bad), SHOWN_BAD_RECORDS)}:"
            f" {shown})")
    if not pairs:
        raise DataError(location, f"no valid records ({len(bad)} bad records dropped)")
    return pairs


def _cap(pairs: list[Pair], max_samples: int | None) -> list[Pair]:
    return pairs if max_samples is None or max_samples < 0 else pairs[:max_samples]


def load_training_data(cfg: TrainConfig, log: Callable[[str], None]) -> tuple[list[Pair], list[Pair] | None]:
    """All train and eval pairs, read and validated before the model is built, capped at max_*_samples."""
    train = read_pairs(cfg.train_file_dir, "train", cfg, log)
    evaluation = None
    if cfg.validation_file_dir:
        evaluation = read_pairs(cfg.validation_file_dir, "validation", cfg, log)
        if cfg.max_eval_samples is not None and cfg.max_eval_samples > len(evaluation):
            raise ConfigError(f"max_eval_samples is {cfg.max_eval_samples} but {cfg.validation_file_dir} holds only "
                              f"{len(evaluation)} valid pairs; lower it or pass -1 for all")
        evaluation = _cap(evaluation, cfg.max_eval_samples)
    return _cap(train, cfg.max_train_samples), evaluation


def check_enough_pairs(usable_pairs: int, cfg: TrainConfig, num_processes: int) -> None:
    """At least one optimizer step's worth of pairs (after tokenization drops identical-after-truncation pairs)."""
    needed = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * num_processes
    if usable_pairs < needed:
        raise DataError(cfg.train_file_dir, f"{usable_pairs} usable training pairs, fewer than one optimizer step "
                        f"takes ({cfg.per_device_train_batch_size} per device x {cfg.gradient_accumulation_steps} "
                        f"accumulation steps x {num_processes} processes = {needed})")


def check_launch_environment() -> None:
    """Under a launcher, more processes on this node than GPUs means a yaml/topology mismatch: say so before CUDA
    fails with an invalid device ordinal."""
    import torch

    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and local_processes > torch.cuda.device_count():
        raise ConfigError(f"{local_processes} processes were started on this node but it has "
                          f"{torch.cuda.device_count()} GPUs: num_processes must be nodes x GPUs per node "
                          f"(WORLD_SIZE={os.environ.get('WORLD_SIZE')})")


def check_accelerator_settings(cfg: TrainConfig, uses_deepspeed: bool) -> None:
    if cfg.skip_nonfinite_steps and uses_deepspeed:
        raise ConfigError("skip_nonfinite_steps is not supported under DeepSpeed (it applies the step inside "
                          "backward, before the gradient norm is known); leave it off: non-finite steps then stop "
                          "the run, keeping the last good checkpoint")


# --------------------------------------------------------------------------------------------- accelerate yaml
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
