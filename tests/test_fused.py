"""rm/fused.py: each fused forward against the module it replaces, values and gradients, fp32 and bf16 autocast."""

import copy

import pytest
import torch
from torch import nn

from rm.fused import fuse_lora_linears, fuse_rms_norms
from rm.model import RewardModel, apply_lora

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # on CUDA, rms_norm is a fused kernel


def _norm(dtype_in, dtype_weight, device):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    torch.manual_seed(0)
    norm = Qwen3RMSNorm(64, eps=1e-6).to(device, dtype_weight)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(2, 5, 64) * 3).to(device, dtype_in).requires_grad_()
    return norm, x


def _forward_backward(module, x):
    out = module(x)
    out.float().square().sum().backward()
    return out, x.grad, *(p.grad for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype_in,dtype_weight,tolerance", [
    (torch.float32, torch.float32, 1e-6),
    (torch.bfloat16, torch.bfloat16, 2e-2),  # the LoRA case: the model is bf16
    (torch.bfloat16, torch.float32, 1e-2),  # full fine-tuning: fp32 weights, a bf16 projection's output
])
def test_the_fused_rms_norm_gives_transformers_values_and_gradients(dtype_in, dtype_weight, tolerance, device):
    reference, x = _norm(dtype_in, dtype_weight, device)
    fused, x_fused = copy.deepcopy(reference), x.detach().clone().requires_grad_()
    assert fuse_rms_norms(fused) == 1
    expected, got = _forward_backward(reference, x), _forward_backward(fused, x_fused)
    assert got[0].dtype == expected[0].dtype  # transformers' promotion of input and weight dtypes
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.float(), e.float(), rtol=tolerance, atol=tolerance)


def test_only_norms_with_transformers_llama_formula_are_swapped(tiny_model):
    class OnePlusWeightNorm(nn.Module):  # Gemma's formula: must keep its own forward
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(64)), 1e-6

        def forward(self, hidden_states):
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            return (1 + self.weight) * hidden_states * torch.rsqrt(variance + self.variance_epsilon)

    # 2 layers x (input, post-attention, q and k norms) + the final norm
    assert fuse_rms_norms(tiny_model) == 9
    assert fuse_rms_norms(OnePlusWeightNorm()) == 0


def _lora_reward_model(tiny_model, **lora):
    torch.manual_seed(1)
    model = apply_lora(tiny_model, rank=4, alpha=8.0, dropout=lora.pop("dropout", 0.0), target_modules="all", **lora)
    with torch.no_grad():  # PEFT starts B at zero, which would leave A's gradient zero: nothing to compare
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return RewardModel(model)


def _rewards_and_grads(model, autocast: bool):
    device = next(model.parameters()).device
    torch.manual_seed(2)
    ids = torch.randint(3, 200, (2, 9), device=device)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        rewards = model(input_ids=ids, attention_mask=mask)
    (rewards * torch.tensor([1.0, -2.0], device=device)).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return rewards.detach(), grads


def _relative_error(got, expected):
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rslora", [False, True])
def test_the_fused_lora_linear_gives_peft_values_and_every_gradient(tiny_model, rslora, device):
    """fp32: the same numbers as PEFT's forward. bf16 autocast: as close to the fp32 numbers as PEFT's own bf16 run
    is, within 3x (the bf16 noise floor: the roundings fall in other places; the fp32 half checks the arithmetic)."""
    reference = _lora_reward_model(tiny_model, rslora=rslora).to(device)
    fused = copy.deepcopy(reference)
    assert fuse_lora_linears(fused) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    exact_rewards, exact = _rewards_and_grads(copy.deepcopy(reference), autocast=False)
    rewards, got = _rewards_and_grads(copy.deepcopy(fused), autocast=False)
    torch.testing.assert_close(rewards, exact_rewards, rtol=1e-5, atol=1e-6)
    assert got.keys() == exact.keys() and any("lora_A" in name for name in got)
    for name in exact:
        assert got[name].abs().sum() > 0, name  # every trainable parameter gets a gradient
        torch.testing.assert_close(got[name], exact[name], rtol=1e-4, atol=1e-6 * exact[name].abs().max().item(),
                                   msg=lambda text: f"{name}: {text}")

    peft_rewards, peft_grads = _rewards_and_grads(reference, autocast=True)
    rewards, got = _rewards_and_grads(fused, autocast=True)
    noise = _relative_error(peft_rewards, exact_rewards)
    assert _relative_error(rewards, exact_rewards) <= 3 * noise + 2e-3
    for name in exact:
        assert got[name].dtype == peft_grads[name].dtype, name
        noise = _relative_error(peft_grads[name], exact[name])
        assert _relative_error(got[name], exact[name]) <= 3 * noise + 2e-3, (name, noise)


def test_outside_the_plain_case_the_fused_layer_runs_peft_forward(tiny_model):
    with_dropout = _lora_reward_model(tiny_model, dropout=0.5)
    fused = copy.deepcopy(with_dropout)
    fuse_lora_linears(fused)
    ids = torch.randint(3, 200, (1, 7))
    mask = torch.ones_like(ids)
    for model in (with_dropout, fused):  # dropout: PEFT's own forward, the same random draws
        torch.manual_seed(3)
        model.train()
        model.rewards = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(fused.rewards, with_dropout.rewards, rtol=0, atol=0)
    with fused.model.disable_adapter(), torch.no_grad():  # adapters off: the base model's reward
        fused.eval()
        base = fused(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        fused.eval()
        adapted = fused(input_ids=ids, attention_mask=mask)
    assert not torch.allclose(base, adapted)
