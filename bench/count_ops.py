"""Operators dispatched per optimizer step of a real train.py run: launch overhead measured without a GPU.

    python bench/count_ops.py --skip 2 --steps 3 -- train.py --model_name_or_path tiny ...     (CPU is enough)

train.py runs unchanged (as `python train.py ...` would). A TorchDispatchMode counts every aten operator that
reaches a backend (below autograd, after composite decompositions: each is a kernel launch on a GPU, views and
metadata-only operators aside, which are counted apart); an optimizer-step hook cuts the count into optimizer
steps. After `--skip` steps it records `--steps` steps and prints one JSON line per recorded step and a summary:
operators per step (all, and without views), `aten._local_scalar_dense` per step (each `.item()`, `.tolist()`,
`bool(tensor)` or `float(tensor)`: a host sync on a GPU) and the most frequent operators. Steps that log metrics
read them to the host on purpose: keep them out of the recorded window (`--logging_steps` above the last one).
tests/test_launch_count.py holds the ceilings; docs/speed_results.md the table.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import traceback
import warnings
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READ = "aten._local_scalar_dense.default"


class OperatorCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while it is active, by name."""

    def __init__(self, trace: str | None = None) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.views = 0
        self.trace = trace
        self.traced: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[str(func)] += 1
        if self.trace and self.trace in str(func):
            self.traced["".join(traceback.format_stack(limit=8)[:-1])] += 1
        if torch.Tag.view_copy in func.tags or func.is_view:
            self.views += 1
        return func(*args, **(kwargs or {}))


def step_summary(counts: collections.Counter[str], views: int) -> dict[str, Any]:
    total = sum(counts.values())
    return {"operators": total, "operators_without_views": total - views, "host_reads": counts[HOST_READ]}


def main() -> int:
    from train_under_hook import report, run_train_script  # bench/, the script's folder (this module is imported too)

    split = sys.argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip", type=int, default=2, help="optimizer steps before counting (warm-up)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps counted")
    parser.add_argument("--top", type=int, default=25, help="most frequent operators listed")
    parser.add_argument("--trace", help="print where operators whose name contains this are called from")
    parser.add_argument("--sync_debug", action="store_true",
                        help="on CUDA, also list where the counted steps synchronize with the GPU "
                             "(torch.cuda.set_sync_debug_mode)")
    parser.add_argument("--json", help="write the summary here too")
    args = parser.parse_args(sys.argv[1:split])
    script, *train_args = sys.argv[split + 1:]

    counter = OperatorCounter(args.trace)
    steps: list[dict[str, Any]] = []
    totals: collections.Counter[str] = collections.Counter()
    seen = {"steps": 0, "views": 0}

    syncs: collections.Counter[str] = collections.Counter()
    if args.sync_debug and torch.cuda.is_available():
        warnings.filterwarnings("always", message=".*synchronizing CUDA operation.*")
        shown = warnings.showwarning

        def record_sync(message: Any, category: Any, *rest: Any, **kw: Any) -> None:
            if "synchronizing CUDA operation" in str(message):
                syncs["".join(traceback.format_stack(limit=9)[:-2])] += 1
            else:
                shown(message, category, *rest, **kw)

        warnings.showwarning = record_sync

    def on_step(optimizer: Any, *_: Any) -> None:
        seen["steps"] += 1
        if args.sync_debug and torch.cuda.is_available():  # "warn" over the counted steps only
            torch.cuda.set_sync_debug_mode("warn" if args.skip <= seen["steps"] < args.skip + args.steps else 0)
        if args.skip < seen["steps"] <= args.skip + args.steps:
            steps.append(step_summary(counter.counts, counter.views - seen["views"]))
            totals.update(counter.counts)
            print("STEP " + json.dumps({"step": seen["steps"], **steps[-1]}), flush=True)
        counter.counts = collections.Counter()  # the next step starts here (after this step's optimizer work)
        seen["views"] = counter.views

    register_optimizer_step_post_hook(on_step)
    with counter:
        code = run_train_script(script, train_args)
    if code:
        print(f"train.py exited with {code}")
        return code
    if len(steps) < args.steps:
        print(f"count: {len(steps)} optimizer steps recorded, {args.steps} asked for (too few steps in the run)")
        return 1
    for stack, n in counter.traced.most_common(12):
        print(f"--- {n} calls of {args.trace} from:\n{stack}")
    for stack, n in syncs.most_common(12):
        print(f"--- {n / args.steps:g} syncs a step from:\n{stack}")
    summary = {key: sum(s[key] for s in steps) / len(steps) for key in steps[0]}
    summary["syncs_per_step"] = sum(syncs.values()) / args.steps
    summary["top"] = {name: n / len(steps) for name, n in totals.most_common(args.top)}
    print("\n".join(f"{n:9.1f}  {name}" for name, n in summary["top"].items()))
    report("COUNT", {k: v for k, v in summary.items() if k != "top"}, summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
