"""The reward model: a sequence-classification LM whose reward is read at the last real token.

`RewardModel` wraps the Hugging Face model (optionally LoRA-wrapped) so that the trainer's forward, and with it
DDP / DeepSpeed, goes through one module. The reward position comes from the attention mask, never from
comparing token ids with the pad id (which reads the wrong token when pad == eos).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from rm.attention import packed_attention_kwargs
from rm.config import ConfigError
from rm.hub import check_hub_model, is_hub_name

# peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` inside get_peft_model and
# PeftModel.from_pretrained (its call, not ours): keep that FutureWarning out of every LoRA run and score
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

TINY = "tiny"
TINY_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"


def tiny_config(tokenizer: Any, hidden_size: int = 64, num_layers: int = 2) -> Any:
    """A small Qwen3 config (random weights): the offline quickstart and test model."""
    return AutoConfig.for_model(
        "qwen3", vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        max_position_embeddings=4096, tie_word_embeddings=False, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


# what a local folder must hold: one file of each group
MODEL_FILES = (("config.json",),
               ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"))
TOKENIZER_FILES = (("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"),)


def check_model_sources(model: str, tokenizer: str | None, model_option: str = "--model_name_or_path",
                        cache_dir: str | None = None) -> None:
    """A local model or tokenizer folder that is missing, is a file, or lacks the files it needs stops the run with
    one line before anything is written or loaded (transformers would answer a mistyped path with a hub error).
    'owner/name' that is no local path is a hub name (rm.hub): one that cannot be had (not cached, hub not
    reachable) stops the run the same way. model_option: the setting that named the model, for the message."""
    for location, option, needs in ((model, model_option, MODEL_FILES),
                                    (tokenizer, "--tokenizer_name_or_path", TOKENIZER_FILES)):
        if location is None or location == TINY:
            continue
        path = Path(location).expanduser()
        if path.is_dir():
            for group in needs:
                if not any((path / name).is_file() for name in group):
                    raise ConfigError(f"{option} {location}: the folder holds none of {', '.join(group)}")
        elif path.exists():
            raise ConfigError(f"{option} {location}: a file, not a model folder")
        elif is_hub_name(location):
            check_hub_model(location, option, cache_dir)
        else:
            raise ConfigError(f"{option} {location}: no such folder")


# What loading a model folder raises when it cannot be used: missing files or a hub name offline (OSError), code
# the folder asks to run (ValueError: trust_remote_code is always False here, so transformers refuses rather than
# asking on stdin), a pickled weights file that is more than tensors (UnpicklingError: weights_only loading).
LOAD_ERRORS = (OSError, ValueError, pickle.UnpicklingError)


def cannot_load(what: str, err: Exception) -> ConfigError:
    """transformers' loading error (missing weights, a hub name that cannot be had offline, no usable tokenizer
    files) as one line that says which setting pointed there."""
    text = str(err).strip()
    return ConfigError(f"{what}: cannot be loaded: {text.splitlines()[0] if text else type(err).__name__}")


def load_tokenizer(name_or_path: str, cache_dir: str | None = None) -> Any:
    """The tokenizer, right padding, with a pad token that is not the end-of-turn token when one can be had."""
    source = TINY_TOKENIZER if name_or_path == TINY else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=cache_dir, trust_remote_code=False)
    except LOAD_ERRORS as err:
        raise cannot_load(f"the tokenizer at {name_or_path} (--tokenizer_name_or_path, else --model_name_or_path)",
                          err) from None
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if tokenizer.pad_token is None:  # no pad, unk or eos token: padded positions are masked, so any id serves
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    return tokenizer


@contextlib.contextmanager
def no_zero3_init(accelerator: Any) -> Iterator[None]:
    """Build a model whole on this process even under ZeRO-3. transformers partitions at construction whenever its
    global DeepSpeed config says ZeRO-3, so lift that config while building and restore it after."""
    plugin = accelerator.state.deepspeed_plugin if accelerator is not None else None
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def import_model_code(name_or_path: str, tokenizer: Any, cache_dir: str | None = None) -> None:
    """Imports the model class's transformers code now (~1 s for Qwen3), while the data files' hashes are computed in
    threads (rm.checkpoint). Best effort: load_backbone, later, says what fails."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    try:
        config = tiny_config(tokenizer) if name_or_path == TINY else AutoConfig.from_pretrained(
            name_or_path, cache_dir=cache_dir, trust_remote_code=False)
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]  # the lookup imports the modeling module
    except Exception:  # noqa: BLE001  (whatever fails here fails again, with its message, in load_backbone)
        pass


def load_backbone(name_or_path: str, tokenizer: Any, dtype: torch.dtype, cache_dir: str | None = None,
                  accelerator: Any = None) -> nn.Module:
    """AutoModelForSequenceClassification with one output; build after the Accelerator so ZeRO-3 can shard it.
    The random `tiny` preset is built whole (DeepSpeed partitions it at prepare), so that its initial weights are
    the same under every ZeRO stage: zero.Init draws different random numbers."""
    if name_or_path == TINY:
        with no_zero3_init(accelerator):
            model = AutoModelForSequenceClassification.from_config(tiny_config(tokenizer), dtype=dtype)
    else:
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, num_labels=1, dtype=dtype, cache_dir=cache_dir, output_loading_info=True,
                trust_remote_code=False)
        except LOAD_ERRORS as err:
            raise cannot_load(f"--model_name_or_path {name_or_path}", err) from None
        if any(key.startswith("score.") for key in info["missing_keys"]):
            init_score_head(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def init_score_head(model: nn.Module) -> None:
    """A causal-LM checkpoint has no score head: initialise it explicitly, N(0, initializer_range).
    Under ZeRO-3 the new head may otherwise stay uninitialised, so gather it and write it from rank 0."""
    weight = model.score.weight
    gathered = contextlib.nullcontext()
    if hasattr(weight, "ds_id"):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([weight], modifier_rank=0)
    with gathered, torch.no_grad():
        weight.normal_(0.0, getattr(model.config, "initializer_range", 0.02))


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: str,
               adapter_dtype_float32: bool = True, under_autocast: bool = False, rslora: bool = False) -> nn.Module:
    """LoRA adapters on the linear layers; the score head is trained in full (modules_to_save).
    Under autocast, PEFT's cast of each LoRA input to the fp32 adapter dtype is switched off: autocast casts it
    straight back to bf16 for the matmul, so the two copies per adapter (and their backward) change nothing."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = "all-linear" if target_modules == "all" else [m.strip() for m in target_modules.split(",")]
    config = LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=targets, modules_to_save=["score"], use_rslora=rslora)
    model = get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype_float32)
    if under_autocast:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    return model


def disable_dropout(model: nn.Module) -> int:
    """Every dropout of the model to 0: dropout layers, and the dropout probabilities that attention modules keep as
    plain float attributes (e.g. `attention_dropout`, copied from the config at construction). The saved config is
    left as it was. Returns how many were non-zero."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p, changed = 0.0, changed + 1
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    return changed


def activation_bytes_per_token(config: Any) -> int:
    """Activation bytes one token keeps for backward without checkpointing, an upper estimate for a decoder under
    bf16 autocast with flash attention: per layer 64 x hidden + 12 x intermediate (the fp32 residual stream and
    norms, q/k/v/o inputs, the MLP's gate/up/act). Measured on Qwen3-0.6B: ~1.6 MB a token; this says 2.9 MB."""
    return config.num_hidden_layers * (64 * config.hidden_size + 12 * config.intermediate_size)


def enable_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing on every decoder layer, reentrant (what LoRA under ZeRO-3 needs, with
    enable_input_require_grads). transformers 5.24 renamed gradient_checkpointing_enable to
    activation_checkpointing_enable (same function; the old name warns and goes in v6); 5.17 has only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


ACTIVATION_SHARE = 0.8  # of the memory left, for estimated activations (with half, the default's worst-case
# micro-batch, 16k tokens of Qwen3-0.6B, ran checkpointed on an 80 GB H100: ~44 GiB estimated, ~26 GiB real)


def needs_checkpointing(requested: bool | None, config: Any, device: torch.device, tokens_per_micro_batch: int,
                        parameters: int, trainable: int) -> tuple[bool, str]:
    """Gradient checkpointing on or off, and why. An explicit true/false wins. Unset: on CUDA, off when the largest
    micro-batch's activations (activation_bytes_per_token, ~1.8x what Qwen3-0.6B keeps) fit in ACTIVATION_SHARE of
    the memory left after weights, gradients and Adam states (16 bytes per trainable, 4 per frozen parameter, upper
    bounds), so the real activations stay under half of it; elsewhere on (the original default).
    "Left" starts from the GPU's free memory now, not its size: another job on the same GPU counts."""
    if requested is not None:
        return requested, "as set"
    if device.type != "cuda":
        return True, "auto: not on CUDA"
    activations = tokens_per_micro_batch * activation_bytes_per_token(config)
    left = torch.cuda.mem_get_info(device)[0] - 16 * trainable - 4 * (parameters - trainable)
    verdict = activations > left * ACTIVATION_SHARE
    return verdict, (f"auto: ~{activations / 2**30:.1f} GiB of activations for {tokens_per_micro_batch} tokens, "
                     f"{left / 2**30:.0f} GiB left after the weights and optimizer states")


def set_zero3_leaf_layers(model: nn.Module, deepspeed_config: dict[str, Any]) -> list[str]:
    """Under ZeRO-3, make each decoder layer (the model's `_no_split_modules`, what accelerate's FSDP wraps) a
    DeepSpeed leaf module: one hook fetches and releases the whole layer, forward and backward, where DeepSpeed
    otherwise hooks every submodule (~40 a LoRA layer: each linear, its LoRA A/B, norms), and one gather per layer
    replaces one per linear. Those hooks, not the gathers, cost ZeRO-3 on one GPU (docs/speed_results.md).
    A DeepSpeed config that names `zero_optimization.leaf_module` itself (even empty: the per-submodule hooks)
    decides instead; DeepSpeed applies it at prepare. Returns the classes made leaves here. Before prepare."""
    if "leaf_module" in deepspeed_config.get("zero_optimization", {}):
        return []
    from deepspeed.utils import set_z3_leaf_modules

    names = set(getattr(model, "_no_split_modules", None) or ())
    classes = {type(module) for module in model.modules() if type(module).__name__ in names}
    if classes:
        set_z3_leaf_modules(model, list(classes))
    return sorted(cls.__name__ for cls in classes)


def zero3_hooks(model: nn.Module) -> dict[str, Any]:
    """What DeepSpeed hooked after prepare: its leaf modules by class, and how many modules carry its hooks."""
    from deepspeed.utils import z3_leaf_module

    leaves: dict[str, int] = {}
    for module in model.modules():
        if z3_leaf_module(module):
            leaves[type(module).__name__] = leaves.get(type(module).__name__, 0) + 1
    return {"leaf_modules": leaves, "hooked_modules": sum(hasattr(m, "ds_id") for m in model.modules())}


LORA_COMPILE_MIN_STEPS = 200


def compile_requested(requested: bool | None, device: torch.device, zero_stage: int, use_peft: bool,
                      optimizer_steps: int, graphs_possible: bool = False) -> tuple[bool, str]:
    """--torch_compile on or off, and why. An explicit true/false wins. Unset, on CUDA and not under ZeRO-3 (its
    parameter gathering runs in module hooks, which a compiled layer would trace; not tried): on for full
    fine-tuning, which pays back its ~20 s within tens of steps (1.8-2.3x per step); for LoRA only without DeepSpeed
    (where it was measured), where CUDA graphs cannot run (graphs_possible: one process, --cuda_graphs not false,
    packing; eager LoRA under graphs ran 1.8x the old eager rate, Qwen3-0.6B shape, docs/speed_results.md), and in
    runs of at least LORA_COMPILE_MIN_STEPS optimizer steps: on a fresh machine its compile put the first step ~25 s
    later and saved ~0.13 s a step (26 -> 46 pairs/s), paid back after ~190 steps."""
    if requested is not None:
        return requested, "as set"
    if device.type != "cuda":
        return False, "auto: not on CUDA"
    if zero_stage == 3:
        return False, "auto: not under ZeRO-3"
    if use_peft and zero_stage > 0:
        return False, "auto: LoRA under DeepSpeed runs eager (its compile was measured without DeepSpeed only)"
    if use_peft and graphs_possible:
        return False, "auto: LoRA on one process runs eager under CUDA graphs (faster than compiled layers)"
    if use_peft and optimizer_steps < LORA_COMPILE_MIN_STEPS:
        return False, (f"auto: a LoRA compile pays back after ~190 optimizer steps; this run has {optimizer_steps}, "
                       f"compiled from {LORA_COMPILE_MIN_STEPS}")
    return True, f"auto: CUDA, {'LoRA' if use_peft else 'full fine-tuning'}, {optimizer_steps} optimizer steps"


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a growing count after warm-up = recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def start_compile_workers() -> None:
    """Start inductor's compile worker pool now, so it comes up while the model loads rather than at the first
    forward (it otherwise starts there, seconds before the first step)."""
    from torch._inductor.async_compile import maybe_warm_pool

    maybe_warm_pool()


def compile_decoder_layers(model: nn.Module) -> None:
    """torch.compile every decoder layer on its first call, with dynamic shapes: packed rows change length at
    every micro-batch. The embedding, score head and the loop stay eager, so a compile failure names a layer.
    Each recompile is logged with the guard that failed (unless TORCH_LOGS says otherwise).
    Inductor's mix-order reduction fusion is off unless TORCHINDUCTOR_MIX_ORDER_REDUCTION is set: it decides by the
    token count (>= 2560, >= 5120 rows), and each decision is a guard, so packed rows of a new size class recompiled
    every layer after warm-up (Qwen3-0.6B shape: 3 graphs, ~7 s each; docs/speed_results.md).
    Python floats (norm eps, LoRA's scaling) are compiled in as constants: under dynamic=True dynamo otherwise passes
    them as float64 CPU tensors, and LoRA's `* scaling` then needs a C++ kernel, whose first build on a fresh machine
    (inductor's CPU toolchain and headers) held the first LoRA step back by about a minute on GPU."""
    torch._dynamo.config.specialize_float = True
    if "TORCH_LOGS" not in os.environ:
        torch._logging.set_logs(recompiles=True)
    if "TORCHINDUCTOR_MIX_ORDER_REDUCTION" not in os.environ:
        import torch._inductor.config as inductor_config

        inductor_config.triton.mix_order_reduction = False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, base.base_model_prefix), "layers", None)
    if layers is None:
        raise ConfigError(f"--torch_compile: no decoder layers found in {type(base).__name__}")
    for layer in layers:
        layer.compile(dynamic=True)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, per row; right or left padding alike."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row, so left-padded rows see the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class RewardModel(nn.Module):
    """Scalar reward per sequence: backbone hidden state at the last real token, through the score head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # the HF sequence-classification model, or its PEFT wrapper
        self.config = self.hf_model.config  # accelerate reads it to fill DeepSpeed's "auto" values

    @property
    def hf_model(self) -> nn.Module:
        """The sequence-classification model itself (with LoRA layers injected when PEFT is used)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                max_length: int | None = None) -> torch.Tensor:
        """Padded rows (input_ids + attention_mask), or one packed row of sequences (input_ids + position_ids
        restarting per sequence + cu_seq_lens boundaries, see rm/batching.py; rm/attention.py gets them as
        transformers' cu_seq_lens_q/k and max_length_q/k): one reward per sequence."""
        seq_cls = self.hf_model
        backbone = getattr(seq_cls, seq_cls.base_model_prefix)
        if cu_seq_lens is None:
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            last_hidden = hidden[rows, last_token_index(attention_mask)]
        else:
            hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                              **packed_attention_kwargs(cu_seq_lens, max_length,
                                                       seq_cls.config._attn_implementation)).last_hidden_state
            last_hidden = hidden.flatten(0, 1)[cu_seq_lens[1:].long() - 1]
        return seq_cls.score(last_hidden).squeeze(-1).float()
