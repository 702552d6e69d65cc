"""The packed fast path trains exactly like the plain path (one micro-batch per per_device_train_batch_size pairs):
same per-step loss curve and the same parameters at the end (fp32; Adam turns summation-order rounding into
differences of ~1e-6, up to ~1e-5 for an embedding row with near-zero gradient; the relative norm of the
whole difference stays under 1e-5), on 1 process and on 2 under ZeRO-2.

The sizes are chosen to hit the awkward cases: 37 pairs in micro-batches of 2 (a last micro-batch of 1 pair),
an odd number of micro-batches for 2 processes (accelerate's even_batches repeats one), 3 micro-batches per step
(a last step of 1), a token budget that packs a step into 1 to 3 forwards, and 2 epochs (a reshuffle)."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_train

ARGS = ["--model_name_or_path", "tiny", "--use_peft", "false", "--max_train_samples", 37,
        "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 3, "--num_train_epochs", 2,
        "--learning_rate", 2e-4, "--warmup_ratio", 0, "--logging_steps", 1, "--max_eval_samples", 4,
        "--max_tokens_per_micro_batch", 400, "--report_to", "none"]


def train_both(tmp_path, **launch):
    runs = {}
    for packing in ("true", "false"):
        out = tmp_path / f"packing-{packing}"
        _, metrics, info = run_train(out, *ARGS, "--packing", packing, **launch)
        losses = [h["train/loss"] for h in metrics["history"] if "train/loss" in h]
        runs[packing] = (losses, load_file(str(out / "model" / "model.safetensors")), info)
    return runs


def assert_same_training(runs, expected_steps):
    (fast_losses, fast_params, fast_info), (plain_losses, plain_params, plain_info) = runs["true"], runs["false"]
    assert fast_info["total_steps"] == plain_info["total_steps"] == expected_steps
    assert len(fast_losses) == len(plain_losses) == expected_steps
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=1e-5, atol=1e-6)
    assert fast_params.keys() == plain_params.keys()
    for name, value in plain_params.items():
        torch.testing.assert_close(fast_params[name], value, rtol=1e-4, atol=5e-5, msg=name)
    fast, plain = (torch.cat([p[k].flatten() for k in sorted(p)]) for p in (fast_params, plain_params))
    assert (fast - plain).norm() / plain.norm() < 1e-5


def test_packed_equals_plain_on_one_process(tmp_path):
    runs = train_both(tmp_path)
    # 19 micro-batches per epoch, 3 per step: 7 steps per epoch, 2 epochs
    assert_same_training(runs, expected_steps=14)
    assert runs["true"][2]["num_processes"] == 1


@pytest.mark.parametrize("port", [29811])
def test_packed_equals_plain_on_two_processes_zero2(tmp_path, port):
    config = ROOT / "accelerate_configs" / "zero2_1node.yaml"
    runs = train_both(tmp_path, processes=2, port=port, accelerate_config=config)
    # 19 micro-batches -> 10 per process (one repeated), 3 per step: 4 steps per epoch, 2 epochs
    assert_same_training(runs, expected_steps=8)
    for _, _, info in runs.values():
        assert (info["distributed_type"], info["num_processes"], info["zero_stage"]) == ("DEEPSPEED", 2, 2)


def test_compiled_decoder_layers_train_like_eager(tmp_path):
    """--torch_compile true (inductor, dynamic shapes: every packed micro-batch has another length): the same
    loss curve and export as eager, up to the rounding of fused kernels."""
    args = [*ARGS, "--num_train_epochs", 1]
    results = {}
    for compiled in ("false", "true"):
        out = tmp_path / f"compile-{compiled}"
        _, metrics, _ = run_train(out, *args, "--torch_compile", compiled)
        results[compiled] = ([h["train/loss"] for h in metrics["history"] if "train/loss" in h],
                             load_file(str(out / "model" / "model.safetensors")))
    (eager_losses, eager_params), (compiled_losses, compiled_params) = results["false"], results["true"]
    assert len(compiled_losses) == len(eager_losses) == 7
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    assert compiled_params.keys() == eager_params.keys()  # compiling the layers leaves the exported names alone
    for name, value in eager_params.items():
        torch.testing.assert_close(compiled_params[name], value, rtol=1e-3, atol=1e-4, msg=name)
