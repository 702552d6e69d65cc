"""What bench/count_ops.py and bench/profile_step.py share: train.py run in this process as `python train.py ...`
would run it (their optimizer-step hooks see every step), and their summary printed as one tagged JSON line and
written to --json."""

from __future__ import annotations

import json
import os
import runpy
import sys
from typing import Any


def run_train_script(script: str, train_args: list[str]) -> int:
    """Runs `script` (train.py) with these arguments as its command line; returns its exit code."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    sys.argv = [script, *train_args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return 0


def report(tag: str, line: dict[str, Any], summary: dict[str, Any], json_path: str | None) -> None:
    """Prints `TAG {line as JSON}` (what the GPU scripts parse) and writes the whole summary to json_path."""
    print(f"{tag} " + json.dumps(line))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=1)
