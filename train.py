"""Train a pairwise (chosen vs rejected) reward model.

    python train.py --model_name_or_path tiny --train_file_dir data/sample/train.jsonl ...        # 1 process
    accelerate launch --config_file accelerate_configs/zero3_1node.yaml train.py ...               # DeepSpeed

Reads top to bottom: settings, Accelerator, tokenizer, data, model, prepare, the loop, evaluation, export.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rm.batching import build_train_loader, enable_varlen_attention, is_placeholder, model_inputs, varlen_available
from rm.checkpoint import Position, load_checkpoint, prepare_output_dir, save_checkpoint
from rm.config import ConfigError, TrainConfig, parse_config
from rm.data import DataError
from rm.encoding import PairCollator, PairEncoder, encode_pairs
from rm.evaluate import collect_rewards, evaluate, summarize_rewards
from rm.export import export_reward_model
from rm.outputs import METRICS, RUN_INFO, TRAINING_CONFIG, write_json
from rm.loss import pair_statistics, pairwise_loss, split_rewards
from rm.model import RewardModel, apply_lora, compile_decoder_layers, load_backbone, load_tokenizer
from rm.plots import write_training_plots
from rm.guards import StepGuard, TrainingInterrupted, TrainingStopped, resume_command
from rm.runtime import (build_optimizer, build_scheduler, make_accelerator, model_dtype, optimizer_steps,
                        peak_memory_gb, zero_stage)
from rm.validate import check_accelerator_settings, check_enough_pairs, check_launch_environment, load_training_data

warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")  # torch deprecation inside DeepSpeed


def train(cfg: TrainConfig) -> dict[str, float]:
    resume_from = prepare_output_dir(cfg)  # nothing is written before this: a fresh output_dir or this run's own
    check_launch_environment()
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)

    def log(message: str) -> None:
        if accelerator.is_main_process:
            tqdm.write(message)

    stage = zero_stage(accelerator)
    log(f"run: {accelerator.distributed_type.value}, ZeRO stage {stage}, {accelerator.num_processes} processes, "
        f"mixed precision {accelerator.mixed_precision}, device {accelerator.device}")
    check_accelerator_settings(cfg, uses_deepspeed=stage > 0)

    # ---- tokenizer and data: validated and tokenized once, before the model costs any memory
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.cache_dir)
    encoder = PairEncoder(tokenizer, cfg.max_source_length, cfg.max_target_length)
    train_pairs, eval_pairs = load_training_data(cfg, log)  # every record checked (rm/validate.py)
    with accelerator.main_process_first():
        quiet = not accelerator.is_main_process
        train_set = encode_pairs(train_pairs, encoder, cfg.cache_dir, "train", show_progress=not quiet, log=log)
        eval_set = None
        if eval_pairs is not None:
            eval_set = encode_pairs(eval_pairs, encoder, cfg.cache_dir, "eval", show_progress=not quiet, log=log)
    check_enough_pairs(len(train_set), cfg, accelerator.num_processes)

    # ---- model: built after the Accelerator so ZeRO-3 can partition it as it loads
    backbone = load_backbone(cfg.model_name_or_path, tokenizer, model_dtype(accelerator, cfg.use_peft), cfg.cache_dir,
                             accelerator)
    if cfg.packing and varlen_available(accelerator.device) and accelerator.mixed_precision == "bf16":
        enable_varlen_attention(backbone)  # packed rows through the flash varlen kernel (rm/batching.py)
    if cfg.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if cfg.use_peft:
        backbone.enable_input_require_grads()  # reentrant checkpointing needs a grad-carrying input
        backbone = apply_lora(backbone, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules,
                              adapter_dtype_float32=stage != 3)  # ZeRO-3 wants one dtype for all tensors
    if cfg.torch_compile:
        compile_decoder_layers(backbone)
    model = RewardModel(backbone)
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 parameters are partitioned)
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    log(f"model: {cfg.model_name_or_path}, {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable "
        f"({'LoRA' if cfg.use_peft else 'full fine-tuning'})")

    optimizer = build_optimizer(model.parameters(), cfg)
    collator = PairCollator(tokenizer.pad_token_id)
    train_loader = build_train_loader(train_set, collator, cfg.per_device_train_batch_size,
                                      cfg.gradient_accumulation_steps, cfg.seed, cfg.packing,
                                      cfg.max_tokens_per_micro_batch, accelerator.num_processes,
                                      accelerator.device.type == "cuda")
    eval_loader = (DataLoader(eval_set, batch_size=cfg.per_device_eval_batch_size, collate_fn=collator)
                   if eval_set is not None else None)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise ConfigError(f"gradient accumulation is {accelerator.gradient_accumulation_steps} after prepare, "
                          f"expected {cfg.gradient_accumulation_steps}: remove it from the accelerate yaml")
    total_steps, steps_per_epoch = optimizer_steps(cfg, len(train_loader))
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    accelerator.register_for_checkpointing(scheduler)  # kept out of prepare, so saved and loaded by name
    epochs = -(-total_steps // steps_per_epoch)
    pairs_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    log(f"data: {len(train_set)} train pairs, {len(eval_set) if eval_set is not None else 0} eval pairs; "
        f"{total_steps} optimizer steps of {pairs_per_step} pairs ({epochs} epochs)")

    run_info = {"distributed_type": accelerator.distributed_type.value, "num_processes": accelerator.num_processes,
                "zero_stage": stage, "mixed_precision": accelerator.mixed_precision,
                "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
                "total_steps": total_steps, "train_pairs": len(train_set), "trainable_parameters": trainable}
    hparams = {k: (v if v is not None else "") for k, v in dataclasses.asdict(cfg).items()}
    position = load_checkpoint(accelerator, resume_from) if resume_from else Position()
    if resume_from:
        log(f"resumed from {resume_from}: step {position.global_step}, epoch {position.epoch + 1}, "
            f"{position.micro_batches_in_epoch} micro-batches of it done")
    tensorboard = {"tensorboard": {"purge_step": position.global_step + 1}} if resume_from else {}
    accelerator.init_trackers("runs", config=hparams, init_kwargs=tensorboard)  # hides the killed run's later steps

    # ---- the loop: one forward over chosen + rejected, one backward, one optimizer step every GA micro-batches
    global_step, history = position.global_step, position.history
    sums = {k: torch.zeros((), device=accelerator.device) for k in ("loss", "micro", "pairs", "correct", "margin",
                                                                     "tokens")}
    grad_norm = torch.zeros(())
    progress = tqdm(total=total_steps, initial=global_step, desc="Training",
                    disable=not accelerator.is_local_main_process)
    data_generator = train_loader.generator  # shuffles each epoch; its state at the epoch's start is checkpointed
    guard = StepGuard(accelerator, cfg.skip_nonfinite_steps)  # SIGTERM/SIGINT and non-finite steps
    guard.install_signal_handlers()
    window_start = time.perf_counter()
    model.train()
    for epoch in range(position.epoch, epochs):
        if global_step >= total_steps:  # resumed from the last step's checkpoint: nothing left to train
            break
        epoch_loader, micro_batches = train_loader, 0
        if epoch == position.epoch and position.epoch_generator_state is not None:  # resuming mid-run
            data_generator.set_state(position.epoch_generator_state)
            micro_batches = position.micro_batches_in_epoch  # skip_first_batches counts micro-batches (GA included)
            epoch_loader = accelerator.skip_first_batches(train_loader, micro_batches) if micro_batches else train_loader
        epoch_generator_state = data_generator.get_state()
        if hasattr(epoch_loader, "set_epoch"):
            epoch_loader.set_epoch(epoch)
        for batch in epoch_loader:
            micro_batches += 1
            with accelerator.accumulate(model):
                if is_placeholder(batch):  # packing: this plain micro-batch rides in a later packed one
                    continue
                chosen, rejected = split_rewards(model(**model_inputs(batch)))
                loss = pairwise_loss(chosen, rejected, batch["margin"], cfg.center_rewards_coefficient,
                                     batch.get("pair_weight"))
                accelerator.backward(loss)
                guard.watch(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    if guard.check_step(grad_norm, global_step + 1):  # non-finite, --skip_nonfinite_steps
                        optimizer.zero_grad()  # no gradients: the step below changes nothing
                        log(f"skipped optimizer step {global_step + 1}: non-finite loss or gradient norm")
                optimizer.step()
                optimizer.zero_grad()
            for key, value in pair_statistics(chosen, rejected).items():
                sums[key] += value
            sums["loss"] += loss.detach().float()
            sums["micro"] += batch.get("micro_batches", 1)
            sums["tokens"] += batch["num_tokens"]
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            global_step += 1
            progress.update(1)
            if global_step == 1:  # launch-to-first-step time, read by rm.bench
                if accelerator.device.type == "cuda":
                    torch.cuda.synchronize()
                run_info["first_step_unix_time"] = time.time()

            if global_step % cfg.logging_steps == 0 or global_step == total_steps:
                totals = {k: accelerator.reduce(v.clone(), reduction="sum").item() for k, v in sums.items()}
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "train/loss": totals["loss"] / totals["micro"],
                    "train/accuracy": totals["correct"] / totals["pairs"],
                    "train/margin": totals["margin"] / totals["pairs"],
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "train/tokens_per_s": totals["tokens"] / elapsed,
                    "train/pairs_per_s": totals["pairs"] / elapsed,
                    "train/peak_memory_gb": peak_memory_gb(accelerator),
                    "train/epoch": epoch + 1,
                }
                accelerator.log(metrics, step=global_step)
                history.append({"step": global_step, **metrics})
                progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/accuracy']:.3f}")
                log(f"step {global_step}/{total_steps} " + " ".join(
                    f"{k.split('/')[1]}={v:.4g}" for k, v in metrics.items()))
                for value in sums.values():
                    value.zero_()
                window_start = time.perf_counter()

            if eval_loader is not None and global_step % cfg.eval_steps == 0 and global_step < total_steps:
                eval_metrics = {f"eval/{k}": v for k, v in evaluate(accelerator, model, eval_loader).items()}
                accelerator.log(eval_metrics, step=global_step)
                history.append({"step": global_step, **eval_metrics})
                log(f"eval at step {global_step}: " + " ".join(f"{k[5:]}={v:.4g}" for k, v in eval_metrics.items()))
            if global_step % cfg.save_steps == 0 or guard.stop_requested:
                saved = save_checkpoint(accelerator, cfg, Position.after_step(
                    global_step, epoch, micro_batches, len(train_loader), history, epoch_generator_state,
                    data_generator))
                log(f"saved checkpoint {saved}")
                if guard.stop_requested:
                    raise TrainingInterrupted(f"stopped by {guard.signal_name or 'a signal to another rank'} after "
                                              f"optimizer step {global_step}; checkpoint saved in {saved}. Resume "
                                              f"with: {resume_command()}")
            if global_step >= total_steps:
                break
    progress.close()
    guard.restore_signal_handlers()
    if guard.skipped_steps:
        log(f"skipped {len(guard.skipped_steps)} optimizer steps with a non-finite loss or gradient norm: "
            f"{guard.skipped_steps[:10]}")

    # ---- final evaluation and export
    final, eval_rewards, reward_stats = {"step": global_step}, None, None
    if eval_loader is not None:
        eval_rewards = collect_rewards(accelerator, model, eval_loader)
        final.update({f"eval/{k}": v for k, v in summarize_rewards(*eval_rewards).items()})
        reward_stats = {"mean": final["eval/reward_mean"], "std": final["eval/reward_std"]}  # for rm.score
        accelerator.log({k: v for k, v in final.items() if k != "step"}, step=global_step)
    train_logs = [h for h in history if "train/loss" in h]
    if train_logs:
        final.update({k: v for k, v in train_logs[-1].items() if k.startswith("train/")})
    merged_dir = export_reward_model(accelerator, model, tokenizer, cfg.output_dir, extra_config=reward_stats)
    if accelerator.is_main_process:
        write_json(os.path.join(cfg.output_dir, TRAINING_CONFIG), dataclasses.asdict(cfg))
        write_json(os.path.join(cfg.output_dir, RUN_INFO), run_info)
        write_json(os.path.join(cfg.output_dir, METRICS), {"final": final, "history": history})
        write_training_plots(cfg.output_dir, history + [final], eval_rewards[:2] if eval_rewards else None)
    log(f"saved the reward model to {merged_dir}")
    log("final: " + json.dumps(final))
    accelerator.wait_for_everyone()  # before end_training: avoids the exit-time crashes seen under ZeRO-3
    accelerator.end_training()
    return final


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        train(cfg)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
