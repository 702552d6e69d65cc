"""Train a pairwise (chosen vs rejected) reward model.

    python train.py --model_name_or_path tiny --output_dir outputs/quickstart ...                 # 1 process
    accelerate launch --config_file accelerate_configs/zero3_1node.yaml train.py ...               # DeepSpeed

Reads top to bottom: settings, setup (Accelerator, tokenizer, data, model, prepare), the loop, finish (final
evaluation, export). Every check that can fail runs before the model is built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from rm.interrupts import interrupts_in_one_line

if __name__ == "__main__":
    interrupts_in_one_line("train.py")  # before torch imports (seconds): a Ctrl-C then is one line too

from rm.dependencies import require_supported_dependencies  # noqa: E402

require_supported_dependencies()  # a package missing or outside its range: one line, exit 2, before the imports below

import torch  # noqa: E402  (the imports below come after the lines above on purpose)
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rm.attention import enable_varlen_attention, varlen_available
from rm.batching import (PackedPairCollator, build_train_loader, is_placeholder, largest_micro_batch_tokens,
                         longest_sequence_tokens, micro_batches_per_process, model_inputs, pair_token_counts)
from rm.checkpoint import Position, agreed_checkpoint, load_checkpoint, prepare_output_dir, save_checkpoint
from rm.config import ConfigError, TrainConfig, hub_cache_dir, parse_config
from rm.data import DataError, check_enough_pairs
from rm.encoding import PairCollator, PairEncoder
from rm.evaluate import accuracy_note, collect_rewards, evaluate, summarize_rewards
from rm.export import export_reward_model
from rm.fused import fuse_lora_linears, fuse_rms_norms
from rm.graphs import StepGraphs, graphs_wanted
from rm.guards import StepGuard, TrainingInterrupted, TrainingStopped, resume_command
from rm.loss import pairwise_loss, split_rewards
from rm.model import (RewardModel, apply_lora, check_model_sources, compile_decoder_layers, compile_requested,
                      compiled_graphs, disable_dropout, enable_checkpointing, import_model_code, load_backbone,
                      load_tokenizer, needs_checkpointing, set_zero3_leaf_layers, start_compile_workers,
                      zero3_hooks)
from rm.outputs import METRICS, RUN_INFO, TRAINING_CONFIG, write_json
from rm.plots import write_training_plots
from rm.progress import DataPosition, MetricsWindow
from rm.run_lock import hold_output_dir, remove_later_checkpoints, remove_previous_run
from rm.runtime import (build_optimizer, build_scheduler, check_accelerator_settings, check_launch_environment,
                        describe_run, make_accelerator, model_dtype, optimizer_steps, peak_learning_rates,
                        resolve_mixed_precision, seconds_since_launch, shut_down_process_groups, zero_stage)
from rm.token_store import token_sets

# torch deprecations of calls inside DeepSpeed (not ours)
warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).*")


@dataclass
class Run:
    """What setup hands the loop and the finish."""

    cfg: TrainConfig
    accelerator: Accelerator
    tokenizer: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: DataLoader
    eval_set: Any  # tokenized eval pairs (rm/evaluate.py packs them by token budget), or None
    data: DataPosition
    total_steps: int
    history: list[dict[str, Any]]
    run_info: dict[str, Any]
    graphs: StepGraphs | None  # CUDA graphs of the packed forward + backward (rm/graphs.py), or None: eager

    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(message)


def setup(cfg: TrainConfig) -> Run:
    """Accelerator, data (read, checked, tokenized), model, optimizer, loaders, prepare, schedule, resume."""
    resume_from = prepare_output_dir(cfg)  # a fresh output_dir or this run's own (main's lock checked it writable)
    check_launch_environment()
    accelerator = make_accelerator(cfg)
    resume_from = agreed_checkpoint(accelerator, resume_from)
    set_seed(cfg.seed)
    log = (lambda message: tqdm.write(message)) if accelerator.is_main_process else (lambda message: None)
    stage = zero_stage(accelerator)
    log(describe_run(accelerator))
    check_accelerator_settings(cfg, uses_deepspeed=stage > 0)

    # ---- tokenizer and data: validated and tokenized once, before the model costs any memory
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, hub_cache_dir(cfg.cache_dir))
    encoder = PairEncoder(tokenizer, cfg.max_source_length, cfg.max_target_length, cfg.reward_position)
    import_model_code(cfg.model_name_or_path, tokenizer, hub_cache_dir(cfg.cache_dir))  # while the data is hashed
    # every record checked (rm/data.py) and tokenized once per machine, or loaded from the token cache
    announce = lambda message: tqdm.write(f"[process {accelerator.process_index}] {message}")  # noqa: E731
    duplicates: dict[str, int] = {}  # counts of repeated pairs, for run_info.json
    train_set, eval_set = token_sets(cfg, encoder, accelerator, log, announce, duplicates)
    if eval_set is not None and len(eval_set) == 0:
        log("evaluation: off (every eval pair became identical after truncation)")
        eval_set = None
    check_enough_pairs(len(train_set), cfg, accelerator.num_processes)
    planned_steps, _ = optimizer_steps(cfg, micro_batches_per_process(len(train_set), cfg.per_device_train_batch_size,
                                                                       accelerator.num_processes))
    graphs_possible = accelerator.num_processes == 1 and stage == 0 and cfg.packing and cfg.cuda_graphs is not False
    compile_layers, compile_why = compile_requested(cfg.torch_compile, accelerator.device, stage, cfg.use_peft,
                                                    planned_steps, graphs_possible)
    if compile_layers:
        start_compile_workers()  # they come up while the model loads, not at the first forward
    data_ready = seconds_since_launch()

    # ---- model: built after the Accelerator so ZeRO-3 can partition it as it loads
    pair_tokens = pair_token_counts(train_set)  # read from the Arrow offsets once: checkpointing and packing use them
    longest_micro_batch = largest_micro_batch_tokens(pair_tokens, cfg.per_device_train_batch_size,
                                                     cfg.gradient_accumulation_steps, cfg.max_tokens_per_micro_batch,
                                                     cfg.packing)
    model, model_info = build_model(cfg, accelerator, tokenizer, log, compile_layers, compile_why, longest_micro_batch)
    model_ready = seconds_since_launch()

    # ---- optimizer, loaders, prepare; the LR schedule stays out of prepare (it would step once per process)
    optimizer = build_optimizer(model, cfg)
    learning_rates = peak_learning_rates(cfg)
    log("learning rates: " + ", ".join(f"{part} {rate:g}" for part, rate in learning_rates.items()) +
        f" (--recipe {cfg.recipe}; docs/quality_results.md)")
    collator = PairCollator(tokenizer.pad_token_id)
    use_graphs, graphs_why = graphs_wanted(cfg.cuda_graphs, accelerator.device, accelerator.num_processes, stage,
                                           cfg.packing, model_info["varlen_attention"],
                                           model_info["gradient_checkpointing"], model_info["torch_compile"])
    log(f"CUDA graphs: {'on' if use_graphs else 'off'} ({graphs_why}; --cuda_graphs true/false)")
    pair_slots = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps  # most pairs a packed row holds
    longest_sequence = longest_sequence_tokens(train_set)
    static_collator = PackedPairCollator(pair_slots, longest_sequence, tokenizer.pad_token_id) if use_graphs else None
    train_loader = build_train_loader(train_set, collator, cfg.per_device_train_batch_size,
                                      cfg.gradient_accumulation_steps, cfg.seed, cfg.packing,
                                      cfg.max_tokens_per_micro_batch, accelerator.num_processes,
                                      accelerator.device.type == "cuda", pair_tokens, static_collator)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    graphs = StepGraphs(model, pair_slots, longest_sequence, cfg.gradient_accumulation_steps,
                        cfg.center_rewards_coefficient) if use_graphs else None
    if stage == 3:
        model_info["zero3_hooks"] = zero3_hooks(model)  # what DeepSpeed hooked, for run_info.json
    if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise ConfigError(f"gradient accumulation is {accelerator.gradient_accumulation_steps} after prepare, "
                          f"expected {cfg.gradient_accumulation_steps}: remove it from the accelerate yaml")
    total_steps, steps_per_epoch = optimizer_steps(cfg, len(train_loader))
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    epochs = -(-total_steps // steps_per_epoch)
    pairs_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    log(f"data: {len(train_set)} train pairs, {len(eval_set) if eval_set is not None else 0} eval pairs; "
        f"{total_steps} optimizer steps of {pairs_per_step} pairs ({epochs} epochs)")
    log(f"setup: {seconds_since_launch():.1f} s after launch (data read and tokenized at {data_ready:.1f} s, "
        f"model built at {model_ready:.1f} s)")

    position = load_checkpoint(accelerator, resume_from, scheduler) if resume_from else Position()
    if resume_from:
        log(f"resumed from {resume_from}: step {position.global_step}, epoch {position.epoch + 1}, "
            f"{position.micro_batches_in_epoch} micro-batches of it done")
    if cfg.overwrite_output_dir and resume_from:
        remove_later_checkpoints(cfg.output_dir, position.global_step)  # the course the resumed run abandons
    elif cfg.overwrite_output_dir:
        remove_previous_run(cfg.output_dir)  # only now: bad data or a failed model build never costs the old run
    tensorboard = {"tensorboard": {"purge_step": position.global_step + 1}} if resume_from else {}
    hparams = {k: (v if v is not None else "") for k, v in dataclasses.asdict(cfg).items()}
    accelerator.init_trackers("runs", config=hparams, init_kwargs=tensorboard)  # hides the killed run's later steps
    run_info = {"distributed_type": accelerator.distributed_type.value, "num_processes": accelerator.num_processes,
                "zero_stage": stage, "mixed_precision": accelerator.mixed_precision,
                "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
                "total_steps": total_steps, "train_pairs": len(train_set), "duplicates": duplicates,
                "learning_rates": learning_rates, "cuda_graphs": use_graphs,
                **model_info}
    return Run(cfg, accelerator, tokenizer, model, optimizer, scheduler, train_loader, eval_set,
               DataPosition(accelerator, train_loader, position, total_steps, epochs), total_steps,
               position.history, run_info, graphs)


def build_model(cfg: TrainConfig, accelerator: Accelerator, tokenizer: Any, log: Callable[[str], None],
                compile_layers: bool, compile_why: str, longest_micro_batch: int) -> tuple[RewardModel, dict[str, Any]]:
    """The reward model as this run trains it: backbone, packed-row attention, checkpointing (sized for the
    largest micro-batch's tokens), LoRA, compile (on or off and why, from rm.model.compile_requested). Returns it
    with what was chosen (for run_info.json)."""
    stage = zero_stage(accelerator)
    backbone = load_backbone(cfg.model_name_or_path, tokenizer, model_dtype(accelerator, cfg.use_peft),
                             hub_cache_dir(cfg.cache_dir), accelerator)
    if cfg.disable_dropout:
        log(f"dropout: off ({disable_dropout(backbone)} dropout layers and settings set to 0; --disable_dropout false)")
    varlen = varlen_available(accelerator.device) and accelerator.mixed_precision == "bf16"
    if varlen:
        enable_varlen_attention(backbone)  # packed rows (training, evaluation) through flash varlen (rm/attention.py)
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 parameters are partitioned)
    parameters = sum(numel(p) for p in backbone.parameters())
    checkpointing, why = needs_checkpointing(cfg.gradient_checkpointing, backbone.config, accelerator.device,
                                             longest_micro_batch, parameters, 0 if cfg.use_peft else parameters)
    log(f"gradient checkpointing: {'on' if checkpointing else 'off'} ({why}; --gradient_checkpointing true/false)")
    if checkpointing:
        enable_checkpointing(backbone)
    if stage == 3:
        leaves = set_zero3_leaf_layers(backbone, accelerator.state.deepspeed_plugin.deepspeed_config)
        log(f"ZeRO-3 leaf modules: {', '.join(leaves)} (one hook and one gather per layer, not per submodule)"
            if leaves else "ZeRO-3 leaf modules: as the DeepSpeed config's zero_optimization.leaf_module says")
    if cfg.use_peft:
        backbone.enable_input_require_grads()  # reentrant checkpointing needs a grad-carrying input
        backbone = apply_lora(backbone, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules,
                              adapter_dtype_float32=stage != 3,  # ZeRO-3 wants one dtype for all tensors
                              under_autocast=accelerator.mixed_precision == "bf16" and stage == 0,
                              rslora=cfg.use_rslora)
    fused_norms = fused_lora = 0
    if compile_layers:  # inductor fuses the compiled layers itself
        compile_decoder_layers(backbone)
    else:
        fused_norms = fuse_rms_norms(backbone)
        fused_lora = fuse_lora_linears(backbone) if cfg.use_peft and stage != 3 else 0  # ZeRO-3: see rm/fused.py
        log(f"fused forwards: {fused_norms} RMSNorm, {fused_lora} LoRA linear (rm/fused.py)")
    log(f"torch.compile: {'on (each decoder layer, dynamic shapes; ' if compile_layers else 'off ('}{compile_why}; "
        "--torch_compile true/false)")
    model = RewardModel(backbone)
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    log(f"model: {cfg.model_name_or_path}, {sum(numel(p) for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{trainable / 1e6:.3f}M trainable ({'LoRA' if cfg.use_peft else 'full fine-tuning'})")
    return model, {"trainable_parameters": trainable, "gradient_checkpointing": checkpointing,
                   "torch_compile": compile_layers, "fused_rms_norms": fused_norms, "fused_lora_linears": fused_lora,
                   "varlen_attention": varlen}


def train_loop(run: Run, guard: StepGuard) -> int:
    """One forward over chosen + rejected, one backward, one optimizer step every GA micro-batches. Returns the
    optimizer steps done."""
    cfg, accelerator, model, optimizer = run.cfg, run.accelerator, run.model, run.optimizer
    step, grad_norm = run.data.start.global_step, torch.zeros(())
    window = MetricsWindow(accelerator)
    drop_grads = run.graphs is None  # a graph adds into the .grad tensors it captured: zero them, never drop them
    progress = tqdm(total=run.total_steps, initial=step, desc="Training",  # no bar when stderr is not a TTY
                    disable=None if accelerator.is_local_main_process else True)
    model.train()
    for batch in run.data:
        with accelerator.accumulate(model):
            if is_placeholder(batch):  # packing: this plain micro-batch rides in a later packed one
                continue
            if run.graphs is not None:  # the same forward, loss and backward, replayed as one CUDA graph
                loss, chosen, rejected = run.graphs(batch)
            else:
                chosen, rejected = split_rewards(model(**model_inputs(batch)))
                loss = pairwise_loss(chosen, rejected, batch["margin"], cfg.center_rewards_coefficient,
                                     batch.get("pair_weight"))
                accelerator.backward(loss)
            guard.watch(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if guard.check_step(grad_norm, step + 1):  # non-finite, --skip_nonfinite_steps
                    optimizer.zero_grad(set_to_none=drop_grads)  # no gradients: the step below changes nothing
            optimizer.step()
            optimizer.zero_grad(set_to_none=drop_grads)
        window.add(batch, loss, chosen, rejected)
        if not accelerator.sync_gradients:
            continue
        run.scheduler.step()
        step += 1
        progress.update(1)
        if step == 1:
            run.run_info["first_step_unix_time"] = first_step_time(accelerator)  # read by rm.bench
            run.run_info["compiled_graphs_first_step"] = compiled_graphs()
            run.log(f"first optimizer step done {seconds_since_launch():.1f} s after launch")

        if step % cfg.logging_steps == 0 or step == run.total_steps:
            metrics = window.collect(lr=run.scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                                     epoch=run.data.epoch + 1)
            record(run, step, metrics)
            progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/accuracy']:.3f}")
        if run.eval_set is not None and step % cfg.eval_steps == 0 and step < run.total_steps:
            guard.settle()  # a stop asked for meanwhile skips the evaluation: the checkpoint comes first
            if not guard.stop_requested:
                record(run, step, {f"eval/{k}": v for k, v in evaluate(accelerator, model, run.eval_set,
                                                                      cfg.max_tokens_per_micro_batch).items()})
        if step % cfg.save_steps == 0 or step >= run.total_steps:
            guard.settle()  # the last step's non-finite check, read now: no checkpoint or export holds such a step
        if step % cfg.save_steps == 0 or (guard.stop_requested and step < run.total_steps):
            saved = save_checkpoint(accelerator, cfg, run.data.after_step(step, run.history), run.scheduler)
            run.log(f"saved checkpoint {saved}")
            if guard.stop_requested and step < run.total_steps:
                raise TrainingInterrupted(f"stopped by {guard.signal_name or 'a signal to another rank'} after "
                                          f"optimizer step {step}; checkpoint saved in {saved}. Resume with: "
                                          f"{resume_command()}")
        if step >= run.total_steps:
            break
    progress.close()
    return step


def first_step_time(accelerator: Accelerator) -> float:
    """Wall-clock time when the first optimizer step's work has finished on the device."""
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return time.time()


def record(run: Run, step: int, metrics: dict[str, float]) -> None:
    """Log metrics to the trackers, the history (metrics.json) and the console."""
    run.accelerator.log(metrics, step=step)
    run.history.append({"step": step, **metrics})
    run.log(f"step {step}/{run.total_steps} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


def finish(run: Run, step: int) -> dict[str, Any]:
    """Final evaluation, then the export, then the json files and plots. The model is exported even when the final
    evaluation or the plots fail: those are reported, not fatal."""
    cfg, accelerator = run.cfg, run.accelerator
    final: dict[str, Any] = {"step": step}
    eval_rewards, reward_stats = None, None
    if run.eval_set is not None:
        try:
            eval_rewards = collect_rewards(accelerator, run.model, run.eval_set, cfg.max_tokens_per_micro_batch)
            final.update({f"eval/{k}": v for k, v in summarize_rewards(*eval_rewards).items()})
            reward_stats = {"mean": final["eval/reward_mean"], "std": final["eval/reward_std"]}  # for rm.score
            accelerator.log({k: v for k, v in final.items() if k != "step"}, step=step)
            if note := accuracy_note(final):
                run.log(note)
        except Exception as err:  # noqa: BLE001  (the trained model matters more than its final numbers)
            run.log(f"final evaluation failed ({type(err).__name__}: {err}); exporting the model without it")
    train_logs = [h for h in run.history if "train/loss" in h]
    if train_logs:
        final.update({k: v for k, v in train_logs[-1].items() if k.startswith("train/")})
    exported_config = {**(reward_stats or {}), "reward_position": cfg.reward_position}  # read by rm.score
    if run.run_info["torch_compile"]:
        run.run_info["compiled_graphs"] = compiled_graphs()  # more than at the first step: recompiled after warm-up
        run.log(f"torch.compile: {run.run_info['compiled_graphs']} graphs built, "
                f"{run.run_info['compiled_graphs'] - run.run_info.get('compiled_graphs_first_step', 0)} "
                "after the first step")
    if run.graphs is not None:
        run.run_info["cuda_graph_buckets"] = sorted(run.graphs.graphs)
        run.log(f"CUDA graphs: {len(run.graphs.graphs)} captured, rows of {sorted(run.graphs.graphs)} tokens")
    merged_dir = export_reward_model(accelerator, run.model, run.tokenizer, cfg.output_dir,
                                     extra_config=exported_config)
    if accelerator.is_main_process:
        write_json(os.path.join(cfg.output_dir, TRAINING_CONFIG), dataclasses.asdict(cfg))
        write_json(os.path.join(cfg.output_dir, RUN_INFO), run.run_info)
        write_json(os.path.join(cfg.output_dir, METRICS), {"final": final, "history": run.history})
        try:
            write_training_plots(cfg.output_dir, run.history + [final], eval_rewards[:2] if eval_rewards else None)
        except Exception as err:  # noqa: BLE001
            run.log(f"plots not written ({type(err).__name__}: {err})")
    run.log(f"saved the reward model to {merged_dir}")
    run.log("final: " + json.dumps(final))
    accelerator.wait_for_everyone()  # before end_training: avoids the exit-time crashes seen under ZeRO-3
    accelerator.end_training()
    return final


def train(cfg: TrainConfig) -> dict[str, Any]:
    run = setup(resolve_mixed_precision(cfg))
    guard = StepGuard(run.accelerator, cfg.skip_nonfinite_steps)  # SIGTERM/SIGINT and non-finite steps
    guard.install_signal_handlers()  # until the export is written: a signal in the final evaluation waits for it
    try:
        step = train_loop(run, guard)
        if guard.skipped_steps:
            run.log(f"skipped {len(guard.skipped_steps)} optimizer steps with a non-finite loss or gradient norm: "
                    f"{guard.skipped_steps[:10]}")
        final = finish(run, step)
        if guard.signal_name:
            run.log(f"{guard.signal_name} arrived after the last step; the model was exported first")
        return final
    finally:
        guard.restore_signal_handlers()


def stop_at_once(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    # Until the StepGuard takes over (and again after it): SIGTERM stops at once as Ctrl-C does, so the lock is
    # released and the message says so, rather than the process dying silently.
    previous = signal.signal(signal.SIGTERM, stop_at_once)
    try:
        cfg = parse_config(argv)
        check_model_sources(cfg.model_name_or_path, cfg.tokenizer_name_or_path,
                            cache_dir=hub_cache_dir(cfg.cache_dir))
        with hold_output_dir(cfg):  # one run per output_dir
            train(cfg)
        code = 0
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except TrainingStopped as err:  # a requested stop (checkpoint saved) is no error; a non-finite step is
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}" if err.is_error else str(err), file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt as err:  # a signal before training, or a second one during it: asked for, no error
        name = str(err) or "SIGINT"
        if os.environ.get("RANK", "0") == "0":
            print(f"stopped at once by {name}; output_dir keeps what was complete before it (resume with "
                  "--resume_from_checkpoint latest where a checkpoint exists)", file=sys.stderr)
        return 128 + (signal.SIGTERM if "SIGTERM" in name else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    shut_down_process_groups()  # finished, refused or stopped: the exit code is this one, not a SIGABRT at exit
    return code


if __name__ == "__main__":
    sys.exit(main())
