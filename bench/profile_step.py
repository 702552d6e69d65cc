"""Where an optimizer step's time goes: torch.profiler over a few optimizer steps of a real train.py run.

    python bench/profile_step.py --skip 8 --steps 5 --json out.json -- train.py --model_name_or_path ... (GPU)

train.py runs unchanged (as `python train.py ...` would); a global optimizer-step hook marks the step boundaries,
so one profiler step is one whole optimizer step (data hand-off, forwards, backwards, clipping, the step itself).
After `--skip` steps (warm-up, compile) it records `--steps` steps and prints, per optimizer step: wall time,
CPU-side launches (kernels, copies, memsets, graph replays), host syncs (stream/device/event synchronize, blocking
copies, `aten::item`/`_local_scalar_dense`), the GPU busy fraction (union of kernel intervals over the wall time)
and the time spent waiting for the DataLoader; then the top operators by self CPU time and by GPU time.
The profiler adds a few microseconds per operator, so wall times here are above the unprofiled run's.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch",
            "cudaMemcpyAsync", "cudaMemsetAsync")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
         "aten::_local_scalar_dense")


def busy_fraction(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Share of [start, end] covered by at least one of the intervals."""
    covered, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            covered += b - a
            reach = b
    return covered / (end - start) if end > start else 0.0


def summarize(prof: Any, step_walls: list[float]) -> dict[str, Any]:
    events = prof.events()
    steps = [e for e in events if e.name.startswith("ProfilerStep") and e.device_type == DeviceType.CPU]
    start, end = min(e.time_range.start for e in steps), max(e.time_range.end for e in steps)
    n = len(steps)
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    kernels = [(e.time_range.start, e.time_range.end) for e in events  # the step markers have a device-side twin
               if e.device_type == DeviceType.CUDA and not e.name.startswith("ProfilerStep")]
    count = lambda names: sum(1 for e in cpu if e.name in names) / n  # noqa: E731
    loader = [e for e in cpu if e.name.startswith("enumerate(DataLoader)")]
    summary = {
        "profiled_steps": n,
        "wall_ms_per_step": (end - start) / n / 1e3,
        "unprofiled_wall_ms_per_step_before": step_walls,
        "launches_per_step": count(LAUNCHES),
        "kernel_launches_per_step": count(LAUNCHES[:5]),
        "host_syncs_per_step": count(SYNCS[:4]),
        "item_calls_per_step": count(SYNCS[4:]),
        "sync_names": {name: count((name,)) for name in SYNCS if count((name,))},
        "gpu_busy_fraction": busy_fraction(kernels, start, end),
        "gpu_kernel_ms_per_step": sum(b - a for a, b in kernels) / n / 1e3,
        "dataloader_ms_per_step": sum(e.time_range.end - e.time_range.start for e in loader) / n / 1e3,
        "dataloader_calls_per_step": len(loader) / n,
    }
    table = prof.key_averages()
    summary["top_cpu"] = table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
    summary["top_gpu"] = table.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60)
    return summary


def main() -> int:
    from train_under_hook import report, run_train_script  # bench/, the script's folder

    split = sys.argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip", type=int, default=8, help="optimizer steps before recording (warm-up)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps recorded")
    parser.add_argument("--json", help="write the summary here too")
    args = parser.parse_args(sys.argv[1:split])
    script, *train_args = sys.argv[split + 1:]

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=args.skip - 1, warmup=1, active=args.steps, repeat=1))
    walls: list[float] = []
    done: dict[str, Any] = {}

    def on_step(optimizer: Any, *_: Any) -> None:
        walls.append(time.perf_counter())
        if len(walls) <= args.skip + args.steps:
            prof.step()
            if len(walls) == args.skip + args.steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                prof.stop()
                done["summary"] = summarize(prof, [round((walls[j] - walls[j - 1]) * 1e3, 1)
                                                   for j in range(max(1, args.skip - 3), args.skip)])

    register_optimizer_step_post_hook(on_step)
    prof.start()
    code = run_train_script(script, train_args)
    if code:
        print(f"train.py exited with {code}")
    summary = done.get("summary")
    if summary is None:
        print("profile: too few optimizer steps")
        return 1
    print(summary.pop("top_cpu"), summary.pop("top_gpu"), sep="\n")
    report("PROFILE", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}, summary,
           args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
