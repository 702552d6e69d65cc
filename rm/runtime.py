"""Accelerator, output directory, optimizer and LR schedule: the pieces whose wrong setup trains silently wrong."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

from rm.config import ConfigError, TrainConfig
from rm.outputs import written_by_others

if TYPE_CHECKING:
    from rm.model import RewardModel


def warn(message: str) -> None:
    """Before the Accelerator exists every rank runs the same checks; the global rank 0 says what it found."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse to write into a non-empty output_dir unless asked to: nothing already written is overwritten. This
    run's own lock (rm/run_lock.py hold_output_dir) does not count."""
    written = sorted(written_by_others(cfg.output_dir))
    if written and not cfg.overwrite_output_dir:
        shown = ", ".join(written[:5]) + (", ..." if len(written) > 5 else "")
        raise ConfigError(f"output_dir {cfg.output_dir!r} exists and is not empty ({shown}); pass "
                          "--overwrite_output_dir true to write into it (a run stopped before its first checkpoint "
                          "leaves runs/ or a .staging folder: nothing to resume), or choose another directory")


def shut_down_process_groups() -> None:
    """Now, not in interpreter teardown: DeepSpeed keeps references to the gloo groups after end_training, and their
    destructors at exit aborted a rank now and then (SIGABRT: exit code -6 in place of the run's own)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_launch_environment() -> None:
    """Under a launcher, more processes on this node than GPUs means a yaml/topology mismatch: say so before CUDA
    fails with an invalid device ordinal."""
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


def resolve_mixed_precision(cfg: TrainConfig) -> TrainConfig:
    """The config with `bf16` as it will run. One source: the flag, or else the launcher (`accelerate launch` passes
    its yaml's or --mixed_precision's choice as ACCELERATE_MIXED_PRECISION); both set and disagreeing is refused."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher not in (None, "no", "bf16"):
        raise ConfigError(f"the accelerate launcher asks for mixed_precision {launcher!r}; this trainer runs 'bf16' "
                          "or 'no': set it in the accelerate yaml or with accelerate launch --mixed_precision")
    launcher_bf16 = None if launcher is None else launcher == "bf16"
    if cfg.bf16 is not None and launcher_bf16 is not None and cfg.bf16 != launcher_bf16:
        raise ConfigError(f"--bf16 {str(cfg.bf16).lower()} disagrees with the accelerate launcher's mixed_precision "
                          f"{launcher!r}: set it in one place (leave --bf16 unset to follow the launcher)")
    return dataclasses.replace(cfg, bf16=bool(cfg.bf16 if cfg.bf16 is not None else launcher_bf16))


def progress_bars_only_on_a_terminal() -> None:
    """Captured logs (stderr not a terminal) get log lines, not progress-bar redraws glued to them. Our own bars pass
    tqdm's disable=None (no bar without a terminal); this turns off those of transformers and the hub ("Writing
    model shards") and of datasets ("Saving the dataset", the token cache)."""
    if not sys.stderr.isatty():
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """Without CUDA, name gloo explicitly: accelerate picks no backend on CPU under DeepSpeed and then believes
    every rank is rank 0 of 1 (field notes). A plain `python train.py` (no launcher, no WORLD_SIZE) stays
    single-process."""
    progress_bars_only_on_a_terminal()
    launched = "WORLD_SIZE" in os.environ
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []
    trackers = {"none": None, "all": "all"}.get(cfg.report_to, cfg.report_to)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision="bf16" if cfg.bf16 else "no",  # resolved by resolve_mixed_precision
        log_with=trackers,
        project_dir=cfg.output_dir,
        kwargs_handlers=handlers,
        dataloader_config=DataLoaderConfiguration(non_blocking=True),  # pinned batches: no sync per copy
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None and not torch.cuda.is_available():
        # transformers' save_pretrained imports deepspeed whenever it is installed (accelerate's unwrap), and its
        # accelerator detection then warns "Setting accelerator to CPU" in a run that never uses it: name it
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if plugin is not None:
        ds_config = plugin.deepspeed_config
        if "gradient_accumulation_steps" in ds_config and ds_config["gradient_accumulation_steps"] not in (
                "auto", cfg.gradient_accumulation_steps):
            raise ConfigError("the accelerate yaml sets gradient_accumulation_steps; remove it: "
                              "--gradient_accumulation_steps owns that value")
        if ds_config.get("gradient_clipping", "auto") == "auto":
            ds_config["gradient_clipping"] = cfg.max_grad_norm
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # the packed loader has no batch_size
            ds_config["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
    return accelerator


def describe_run(accelerator: Accelerator) -> str:
    """One line saying what runs: processes, distribution, precision, device."""
    processes = accelerator.num_processes
    stage = zero_stage(accelerator)
    how = f"DeepSpeed ZeRO-{stage}" if stage else "no DeepSpeed"
    if processes > 1 and not stage:
        how += f" ({accelerator.distributed_type.value})"
    precision = "bf16 mixed precision" if accelerator.mixed_precision == "bf16" else "fp32"
    return f"run: {processes} process{'es' if processes > 1 else ''}, {how}, {precision}, device {accelerator.device}"


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    """The ZeRO stage that runs (0 without DeepSpeed)."""
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def model_dtype(accelerator: Accelerator, use_peft: bool) -> torch.dtype:
    """bf16 weights when DeepSpeed keeps fp32 master copies or when the base is frozen (LoRA); else fp32 weights
    under bf16 autocast, so plain full fine-tuning never updates bf16 weights directly."""
    bf16 = accelerator.mixed_precision == "bf16"
    return torch.bfloat16 if bf16 and (use_peft or uses_deepspeed(accelerator)) else torch.float32


def build_optimizer(model: RewardModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch AdamW (DeepSpeed's own Adam needs a long JIT build), fused: one kernel per step for all tensors of a
    device and dtype on CUDA, and on CPU no `.item()` per tensor (the per-tensor loop reads each step count back).
    One group per learning rate
    (the score head and LoRA's B matrices at least at their --min_*_learning_rate, the rest at --learning_rate)
    and weight decay (none on norms and biases)."""
    head, rates = {id(p) for p in model.hf_model.score.parameters()}, peak_learning_rates(cfg)
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "score_head" if id(param) in head else "lora_B" if "lora_B" in name else "rest"
        decay = cfg.weight_decay if param.ndim >= 2 else 0.0
        groups.setdefault((rates[part], decay), []).append(param)
    return torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": decay}
                              for (lr, decay), params in groups.items()], lr=cfg.learning_rate,
                             fused=True)


def peak_learning_rates(cfg: TrainConfig) -> dict[str, float]:
    """The peak learning rate of each part build_optimizer tells apart (for the log and run_info.json)."""
    rates = {"score_head": max(cfg.learning_rate, cfg.min_score_learning_rate)}
    if cfg.use_peft:
        rates["lora_B"] = max(cfg.learning_rate, cfg.min_lora_b_learning_rate)
    return {**rates, "rest": cfg.learning_rate}


def optimizer_steps(cfg: TrainConfig, micro_batches_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, optimizer steps per epoch) from the per-process micro-batch count."""
    per_epoch = max(1, math.ceil(micro_batches_per_epoch / cfg.gradient_accumulation_steps))
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * per_epoch)
    return total, per_epoch


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """The learning rate's share of its peak after `step` optimizer steps: linear warmup from 0 over `warmup` steps,
    then linear decay to 0 ("linear") or half a cosine cycle ("cosine") at `total`, as transformers' schedules.
    Written here because importing transformers' get_scheduler also imports peft (via its trainer utilities): ~2 s
    at every launch, for nothing in full fine-tuning."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Kept out of accelerator.prepare (which would step it once per process) and stepped once per optimizer step."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg.lr_scheduler_type, step, warmup, total_steps))


def seconds_since_launch() -> float:
    """Wall-clock seconds since this process started (interpreter start and imports included)."""
    import psutil  # an accelerate dependency

    return time.time() - psutil.Process().create_time()


def peak_memory_gb(accelerator: Accelerator) -> float:
    """Peak device memory on GPU; peak resident set size of this process on CPU."""
    if accelerator.device.type == "cuda":
        return torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
