import copy

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from rm.encoding import PairCollator
from rm.loss import pairwise_loss, split_rewards
from rm.model import RewardModel, apply_lora, last_token_index, position_ids_from_mask, set_zero3_leaf_layers


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 0, 3]
    assert last_token_index(left).tolist() == [3, 3, 3]


def test_last_token_index_ignores_token_ids_when_pad_equals_eos(tokenizer, tiny_model):
    eos = tokenizer.eos_token_id
    ids = torch.tensor([[5, 6, eos, eos, eos]])  # the real sequence ends with eos, then eos padding
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [2]
    tiny_model.config.pad_token_id = eos  # HF's own pooling would now read position 1
    model = RewardModel(tiny_model).eval()
    with torch.no_grad():
        ours = model(ids, mask)
        truth = model(ids[:, :3], mask[:, :3])
    torch.testing.assert_close(ours, truth)


def test_left_and_right_padding_give_the_same_reward(tiny_model):
    model = RewardModel(tiny_model).eval()
    right_ids, right_mask = torch.tensor([[7, 8, 9, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]])
    left_ids, left_mask = torch.tensor([[0, 0, 7, 8, 9]]), torch.tensor([[0, 0, 1, 1, 1]])
    assert position_ids_from_mask(left_mask).tolist() == [[0, 0, 0, 1, 2]]
    with torch.no_grad():
        torch.testing.assert_close(model(right_ids, right_mask), model(left_ids, left_mask), atol=1e-5, rtol=1e-5)


def _batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features = []
    for _ in range(n):
        prompt = torch.randint(10, 4000, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist()
        features.append({"chosen_input_ids": prompt + [11, 12], "rejected_input_ids": prompt + [13, 14, 15],
                         "margin": 0.0})
    return PairCollator(pad_token_id=0)(features)


def _one_step(model: torch.nn.Module, lr: float = 1e-2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = _batch()
    chosen, rejected = split_rewards(model(batch["input_ids"], batch["attention_mask"]))
    pairwise_loss(chosen, rejected).backward()
    optimizer.step()


@pytest.mark.floor
def test_lora_trains_adapters_and_score_head_only(tiny_model):
    model = RewardModel(apply_lora(tiny_model, rank=4, alpha=8, dropout=0.0, target_modules="all"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    _one_step(model)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (name in trainable), f"{name}: changed={changed}, trainable={name in trainable}"


def test_full_fine_tuning_changes_every_parameter(tiny_model):
    model = RewardModel(tiny_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())
    _one_step(model)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach())]
    assert not unchanged


@pytest.mark.floor
@pytest.mark.parametrize("use_lora", [False, True])
def test_gradient_accumulation_equals_one_big_batch(tiny_model, use_lora):
    """batch 1 x GA 4 and batch 4 x GA 1 through accelerator.accumulate / backward give the same gradients."""
    if use_lora:
        tiny_model = apply_lora(tiny_model, rank=4, alpha=8, dropout=0.0, target_modules="all")
    batch = _batch(4)
    grads = []
    for micro_batches, ga in ((1, 4), (4, 1)):
        AcceleratorState._reset_state(True)
        accelerator = Accelerator(gradient_accumulation_steps=ga, cpu=True)
        model = accelerator.prepare(RewardModel(copy.deepcopy(tiny_model)))
        n = batch["margin"].shape[0]
        for start in range(0, n, micro_batches):
            rows = list(range(start, start + micro_batches)) + list(range(n + start, n + start + micro_batches))
            ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
            width = int(mask.sum(-1).max())
            with accelerator.accumulate(model):
                chosen, rejected = split_rewards(model(ids[:, :width], mask[:, :width]))
                accelerator.backward(pairwise_loss(chosen, rejected))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    AcceleratorState._reset_state(True)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)


def test_checkpointing_follows_an_explicit_choice_and_stays_on_without_cuda(tiny_model):
    from rm.model import needs_checkpointing

    cpu = torch.device("cpu")
    assert needs_checkpointing(True, tiny_model.config, cpu, 10**6, 10, 10)[0] is True
    assert needs_checkpointing(False, tiny_model.config, cpu, 10**6, 10, 10)[0] is False
    assert needs_checkpointing(None, tiny_model.config, cpu, 16384, 10, 10)[0] is True  # the original default


@pytest.mark.floor
@pytest.mark.parametrize("use_lora", [False, True])
def test_checkpointing_recomputes_each_layer_and_keeps_the_gradients(tiny_model, use_lora):
    """enable_checkpointing on every transformers in range (5.17 has no activation_checkpointing_enable): each
    decoder layer's forward runs again in backward, and the gradients equal those without checkpointing."""
    from rm.model import enable_checkpointing

    batch = _batch(2)
    calls, grads = [], []
    for checkpointing in (False, True):
        backbone = copy.deepcopy(tiny_model)
        if checkpointing:
            enable_checkpointing(backbone)
        if use_lora:
            backbone.enable_input_require_grads()  # as train.py does: reentrant checkpointing needs it under LoRA
            torch.manual_seed(0)  # the same LoRA initialisation both times
            backbone = apply_lora(backbone, rank=4, alpha=8, dropout=0.0, target_modules="all")
        model = RewardModel(backbone).train()
        forwards = []
        model.hf_model.model.layers[0].mlp.register_forward_hook(lambda *args: forwards.append(1))  # recomputed
        chosen, rejected = split_rewards(model(batch["input_ids"], batch["attention_mask"]))
        pairwise_loss(chosen, rejected).backward()
        calls.append(len(forwards))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert calls == [1, 2]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_checkpointing_decides_by_the_gpus_free_memory_not_its_size(monkeypatch, tiny_model):
    """Another job holding most of the GPU: the same micro-batch that runs without checkpointing on an idle GPU
    must get checkpointing (jobs sharing one GPU went out of memory when the rule read the GPU's size)."""
    from rm.model import activation_bytes_per_token, needs_checkpointing

    tokens, gib = 16384, 2**30
    activations = tokens * activation_bytes_per_token(tiny_model.config)
    free = {"idle": 1.3 * activations, "busy": activations}  # estimated activations: 77% and 100% of what is free
    for state, expected in (("idle", False), ("busy", True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free[state]: (f, 141 * gib))
        verdict, why = needs_checkpointing(None, tiny_model.config, torch.device("cuda", 0), tokens, 0, 0)
        assert verdict is expected, (state, why)


@pytest.mark.floor
def test_lora_under_autocast_skips_the_fp32_input_cast(tiny_model):
    from peft.tuners.lora import Linear as LoraLinear

    wrapped = apply_lora(copy.deepcopy(tiny_model), 4, 8.0, 0.0, "all", under_autocast=True)
    layers = [m for m in wrapped.modules() if isinstance(m, LoraLinear)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    assert all(m.cast_input_dtype_enabled for m in apply_lora(copy.deepcopy(tiny_model), 4, 8.0, 0.0, "all").modules()
               if isinstance(m, LoraLinear))


def test_compiling_turns_off_the_fusion_that_recompiles_by_token_count_unless_the_environment_chose(
        monkeypatch, tiny_model):
    """Inductor's mix-order reduction guards on the token count (>= 2560, >= 5120 rows on GPU): left on, packed rows
    of a new size class recompiled every layer after warm-up. An explicit TORCHINDUCTOR_MIX_ORDER_REDUCTION wins."""
    import torch._inductor.config as inductor_config

    from rm.model import compile_decoder_layers

    monkeypatch.setenv("TORCH_LOGS", "")  # leave this process's logging as it is
    monkeypatch.setattr(inductor_config.triton, "mix_order_reduction", True)
    monkeypatch.setenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", "1")
    compile_decoder_layers(tiny_model)
    assert inductor_config.triton.mix_order_reduction is True
    monkeypatch.delenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION")
    compile_decoder_layers(tiny_model)
    assert inductor_config.triton.mix_order_reduction is False


def test_compile_is_on_by_default_on_cuda_only_and_an_explicit_choice_wins():
    from rm.model import LORA_COMPILE_MIN_STEPS, compile_requested

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    on = lambda *args: compile_requested(*args)[0]  # noqa: E731
    assert on(None, cuda, 0, False, 10) and on(None, cuda, 2, False, 10)  # full fine-tuning: pays back in tens of steps
    assert not on(None, cuda, 3, False, 10_000) and not on(None, cpu, 0, False, 10_000)
    # LoRA: only a run long enough to pay the compile back (the original 1000-pair default has 125 steps)
    assert not on(None, cuda, 0, True, 125) and not on(None, cuda, 0, True, LORA_COMPILE_MIN_STEPS - 1)
    assert on(None, cuda, 0, True, LORA_COMPILE_MIN_STEPS) and not on(None, cuda, 2, True, 10_000)
    assert on(True, cpu, 0, True, 1) and not on(False, cuda, 0, False, 10_000)
    assert compile_requested(None, cuda, 0, True, 125)[1].startswith("auto: a LoRA compile pays back")
    # where CUDA graphs can run (one process), LoRA stays eager under them however long the run; full FT compiles
    assert not on(None, cuda, 0, True, 10_000, True) and on(None, cuda, 0, False, 10, True)


def test_compiled_lora_layers_take_python_floats_as_constants(monkeypatch, tiny_model):
    """Under dynamic=True dynamo passes a Python float (LoRA's scaling, the norms' eps) as a float64 CPU tensor; on
    GPU LoRA's `* scaling` then needed a C++ kernel whose first build held the first step back by a minute. The
    compiled layers must take no such input."""
    from torch._inductor.utils import run_and_get_code

    from rm.model import compile_decoder_layers

    monkeypatch.setenv("TORCH_LOGS", "")  # leave this process's logging as it is
    monkeypatch.setattr(torch._dynamo.config, "specialize_float", False)  # torch's default
    torch._dynamo.reset()
    model = apply_lora(copy.deepcopy(tiny_model), 4, 8.0, 0.0, "all")
    compile_decoder_layers(model)
    _, codes = run_and_get_code(lambda: model(input_ids=torch.randint(0, 100, (1, 12))).logits.sum().backward())
    assert codes and not any("float64" in code for code in codes), [c for c in codes if "float64" in c][0][:2000]
    torch._dynamo.reset()


def test_zero3_leaf_layers_are_the_decoder_layers_unless_the_deepspeed_config_names_its_own(tiny_model):
    from deepspeed.utils import z3_leaf_module

    assert set_zero3_leaf_layers(tiny_model, {"zero_optimization": {"leaf_module": {"classes": []}}}) == []
    assert not any(z3_leaf_module(m) for m in tiny_model.modules())  # the config's own choice: DeepSpeed applies it
    assert set_zero3_leaf_layers(tiny_model, {"zero_optimization": {"stage": 3}}) == ["Qwen3DecoderLayer"]
    assert [m for m in tiny_model.modules() if z3_leaf_module(m)] == list(tiny_model.model.layers)
