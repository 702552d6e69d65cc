"""Writing the trained reward model in plain Hugging Face format.

The full state dict is gathered on every rank (ZeRO-3 needs all ranks for that) and written by the main one into
a fresh CPU copy of the model, so the export never touches the distributed model's sharded parameters:
  output_dir/model/    merged model + tokenizer: AutoModelForSequenceClassification.from_pretrained loads it
  output_dir/adapter/  the LoRA adapter with the trained score head (LoRA runs only)
Both are left readable by others (files 0644, folders 0755) whatever the umask: safetensors writes 0600 files, and
the people and jobs that load a reward model are often not the user who trained it. Each folder is written whole
or not at all (a staging folder renamed into place): a run killed mid-export leaves no folder that looks loadable.
A full disk: the partial export is removed and the run stops with a plain message (DiskFullError, exit 5).
"""

from __future__ import annotations

import copy
import os
import shutil
from typing import Any, Callable

from accelerate import Accelerator
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.initialization import no_init_weights

from rm.checkpoint import is_out_of_space, out_of_space_error
from rm.model import RewardModel, no_zero3_init
from rm.outputs import ADAPTER_DIR, DIR_MODE, FILE_MODE, MODEL_DIR, STAGING_PREFIX


def export_reward_model(accelerator: Accelerator, model: nn.Module, tokenizer: Any, output_dir: str,
                        extra_config: dict[str, Any] | None = None) -> str:
    """Saves the merged model (and the adapter under LoRA); returns the merged model's directory."""
    state = accelerator.get_state_dict(model)  # collective: every rank
    merged_dir = os.path.join(output_dir, MODEL_DIR)
    if accelerator.is_main_process:
        wrapper: RewardModel = accelerator.unwrap_model(model)
        prefix = "model."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        config = copy.deepcopy(wrapper.hf_model.config)
        for key, value in (extra_config or {}).items():
            setattr(config, key, value)
        # Every weight is overwritten from `state` below (a missing one is an error), so none is initialised first:
        # drawing random weights for a 0.6B model took ~25 s on the CPU at the end of every run.
        with no_zero3_init(accelerator), no_init_weights():
            host_model = AutoModelForSequenceClassification.from_config(config, dtype=next(iter(state.values())).dtype)
            peft_config = getattr(wrapper.model, "peft_config", None)
            if peft_config:
                from peft import get_peft_model

                host_model = get_peft_model(host_model, copy.deepcopy(peft_config["default"]),
                                            autocast_adapter_dtype=False)
        missing, unexpected = host_model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"export: state dict mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}")
        try:
            _write(host_model, tokenizer, output_dir, bool(peft_config))
        except Exception as err:
            if not is_out_of_space(err, output_dir):
                raise
            for folder in (ADAPTER_DIR, MODEL_DIR):  # a half-written model must not look loadable
                for path in (folder, STAGING_PREFIX + folder):
                    shutil.rmtree(os.path.join(output_dir, path), ignore_errors=True)
            raise out_of_space_error(f"exporting the model to {merged_dir}", output_dir) from err
    accelerator.wait_for_everyone()
    return merged_dir


def _write(host_model: nn.Module, tokenizer: Any, output_dir: str, lora: bool) -> None:
    def save(model: nn.Module) -> Callable[[str], None]:
        return lambda folder: (model.save_pretrained(folder), tokenizer.save_pretrained(folder))

    if lora:
        publish_folder(output_dir, ADAPTER_DIR, save(host_model))
        host_model = host_model.merge_and_unload()
    publish_folder(output_dir, MODEL_DIR, save(host_model))


def publish_folder(output_dir: str, name: str, write: Callable[[str], None]) -> None:
    """output_dir/name written whole or not at all: `write` fills a staging folder, which is made readable and
    renamed into place (an earlier export there is replaced only then). A kill mid-write leaves only the staging
    folder, which the next save or --overwrite_output_dir removes."""
    final, staging = os.path.join(output_dir, name), os.path.join(output_dir, STAGING_PREFIX + name)
    previous = os.path.join(output_dir, f"{STAGING_PREFIX}{name}.previous")
    for leftover in (staging, previous):
        shutil.rmtree(leftover, ignore_errors=True)
    write(staging)
    make_readable(staging)
    if os.path.exists(final):
        os.rename(final, previous)
    os.rename(staging, final)
    shutil.rmtree(previous, ignore_errors=True)


def make_readable(folder: str) -> None:
    """Files 0644 and folders 0755 under folder (itself included)."""
    os.chmod(folder, DIR_MODE)
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), DIR_MODE)
        for name in names:
            os.chmod(os.path.join(root, name), FILE_MODE)
