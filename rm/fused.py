"""Fewer kernel launches and autograd nodes per step on the eager path (issue 27: the default LoRA step is
host-bound, the GPU idle most of it).

- RMSNorm: transformers' Llama-style norm (Llama, Qwen2/3, Mistral, SmolLM2, ...) runs ~8 kernels forward and ~12
  backward (fp32 round trip, pow, mean, rsqrt, muls). Its forward is swapped, per module, for
  `torch.nn.functional.rms_norm`, which CUDA runs as one fused kernel each way (computed in fp32 inside).
- LoRA linear: PEFT's forward is ~7 kernels and ~12 autograd nodes a layer (base linear, two casts, two matmuls, the
  scaling, the add). `_LoraLinear` does the same arithmetic as one autograd node: the adapter output is added into
  the base output in place (addmm), and its backward computes only the gradients that are needed.

Both are exact rewrites of the arithmetic up to rounding (tests/test_fused.py compares each with the module it
replaces); each module keeps its class, parameters and state dict, so saving, export and PEFT's merge are unchanged.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
from torch import nn


def _standard_rms_norm_code() -> Any:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm.forward.__code__


def _same_code(a: Any, b: Any) -> bool:
    return (a.co_code, a.co_names, a.co_consts) == (b.co_code, b.co_names, b.co_consts)


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The Llama-style norm in one kernel. Its output dtype is the one transformers' gives (the promotion of the
    input's and the weight's dtypes); autocast stays out of it, as it stays out of transformers' fp32 arithmetic."""
    dtype = hidden_states.dtype if hidden_states.dtype == self.weight.dtype else torch.promote_types(
        hidden_states.dtype, self.weight.dtype)
    with torch.autocast(hidden_states.device.type, enabled=False):
        return nn.functional.rms_norm(hidden_states.to(dtype), self.weight.shape, self.weight.to(dtype),
                                      self.variance_epsilon)


def fuse_rms_norms(model: nn.Module) -> int:
    """Swap the forward of every norm whose code is transformers' LlamaRMSNorm.forward (the same bytecode, names and
    constants: Qwen3RMSNorm and the other copies of it) for the fused one. Returns how many were swapped; norms of
    any other formula (Gemma's 1 + weight, ...) keep theirs."""
    standard = _standard_rms_norm_code()
    swapped = 0
    for module in model.modules():
        forward = getattr(type(module), "forward", None)
        if getattr(forward, "__code__", None) is not None and _same_code(forward.__code__, standard):
            module.forward = MethodType(_rms_norm_forward, module)
            swapped += 1
    return swapped


class _LoraLinear(torch.autograd.Function):
    """y = x W^T (+ bias) + scaling * (x A^T) B^T with W frozen, in `dtype` (the autocast dtype, else x's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        down = torch.mm(rows, a.t()).mul_(scaling)  # (tokens, r), scaled once here
        out = torch.mm(rows, w.t()) if bias is None else torch.addmm(bias.to(dtype), rows, w.t())
        out.addmm_(down, b.t())
        ctx.save_for_backward(rows, w, a, b, down)
        ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = (
            scaling, x.shape, x.dtype, lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        rows, w, a, b, down = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(rows.dtype)
        up = torch.mm(grad, b).mul_(ctx.scaling)  # dL/d(down) scaled: (tokens, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad, w).addmm_(up, a).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(up.t(), rows).to(ctx.a_dtype)
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(grad.t(), down).to(ctx.b_dtype)  # down holds the scaling already
        return grad_x, None, None, grad_a, grad_b, None, None


def _fusable(layer: nn.Module) -> bool:
    """Plain LoRA on a frozen nn.Linear, one active adapter, no dropout, no bias on B, not merged: the case
    `_LoraLinear` computes. Checked at every call (cheap): PEFT's adapter switches then fall back to its forward."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    base = layer.base_layer
    return (name in layer.lora_A and name not in layer.lora_variant and isinstance(base, nn.Linear)
            and not base.weight.requires_grad and isinstance(layer.lora_dropout[name], nn.Identity)
            and layer.lora_B[name].bias is None)


def _lora_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs or not _fusable(self):
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    base = self.base_layer
    return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                             float(self.scaling[name]), dtype)


def fuse_lora_linears(model: nn.Module) -> int:
    """Swap the forward of every PEFT LoRA nn.Linear layer for `_lora_forward` (which falls back to PEFT's own
    outside the plain case). Not under ZeRO-3: there each adapter's weights are gathered by hooks on the adapter
    modules, which the fused path does not call. Returns how many layers were swapped."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    swapped = 0
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.forward = MethodType(_lora_forward, module)
            swapped += 1
    return swapped
