"""Attention for packed rows on CUDA: torch's flash varlen kernel (torch >= 2.10), no compile step.

A packed row (rm/batching.py) is one row of concatenated sequences. The reward model passes its sequence
boundaries under transformers' standard keyword names (`cu_seq_lens_q` / `cu_seq_lens_k`, `max_length_q` /
`max_length_k`, as `DataCollatorWithFlattening` and the flash-attention integrations name them); transformers
hands them down to every attention call, where `_varlen_attention` runs each sequence causally on its own. Padded
rows (no boundaries given) take transformers' SDPA path unchanged.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

VARLEN_ATTENTION = "rm_varlen"


def varlen_available(device: torch.device) -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda"


def _varlen_options(query_heads: int, kv_heads: int) -> dict[str, Any]:
    """varlen_attn's causal/GQA keywords: torch 2.11 and 2.13 differ (is_causal vs window_size, enable_gqa).
    Read once at enable time, outside any torch.compile trace."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    options: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if query_heads != kv_heads and "enable_gqa" in params:
        options["enable_gqa"] = True
    return options


def _varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, *, varlen_options: dict[str, Any],
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: packed rows (cu_seq_lens_q given) through flash varlen, else SDPA."""
    from torch.nn.attention.varlen import varlen_attn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens_q = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # (1, heads, tokens, dim) -> (tokens, heads, dim), in the autocast dtype as SDPA would run (with fp32 weights
    # Qwen3's q/k norms return fp32 even under autocast)
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else value.dtype
    q, k, v = (t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value))
    if k.shape[1] != q.shape[1] and "enable_gqa" not in varlen_options:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out = varlen_attn(q, k, v, cu_seq_lens_q, kwargs["cu_seq_lens_k"], kwargs["max_length_q"],
                      kwargs["max_length_k"], scale=kwargs.get("scaling"), **varlen_options)
    return out[None], None  # (1, tokens, heads, dim), as transformers' attention functions return


def _varlen_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Packed rows need no mask (boundaries come from cu_seq_lens_q/k); padded rows get SDPA's."""
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)


def enable_varlen_attention(model: torch.nn.Module) -> None:
    """Route the model's attention through `_varlen_attention` (packed rows) / SDPA (padded rows)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = model.config
    options = _varlen_options(config.num_attention_heads, config.num_key_value_heads)
    AttentionInterface.register(VARLEN_ATTENTION, functools.partial(_varlen_attention, varlen_options=options))
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    model.set_attn_implementation(VARLEN_ATTENTION)


# Handed to transformers as the attention mask of a packed row on the varlen path. Given no mask, transformers
# derives one from the position ids (masking_utils.find_packed_sequence_indices) and reads it back to the host: a
# host sync and ~8 launches per forward, for a mask the varlen kernel never reads (it takes cu_seq_lens). A mask
# that is already 4D is passed to the attention function untouched, and `_varlen_attention` ignores it.
PREPARED_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


def packed_attention_kwargs(cu_seq_lens: torch.Tensor, max_length: int, attn_implementation: str) -> dict[str, Any]:
    """The keywords a packed row's forward passes to transformers (queries and keys share the boundaries); on the
    varlen path also the placeholder mask above."""
    kwargs: dict[str, Any] = {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": max_length,
                              "max_length_k": max_length}
    if attn_implementation == VARLEN_ATTENTION:
        kwargs["attention_mask"] = PREPARED_MASK
    return kwargs
