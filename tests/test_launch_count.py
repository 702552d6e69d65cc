"""Launch overhead without a GPU: the operators one optimizer step dispatches on the default path (each a kernel
launch on a GPU, bar views), counted by bench/count_ops.py on the tiny model on CPU, held under a ceiling; and the
parity of each piece that took launches or host syncs out of the step (issue 27).

The counted runs mirror the GPU default row (bf16, packing, no checkpointing as the auto rule decides on a large
GPU, 1 pair x GA 8 packed into one forward) for LoRA and for full fine-tuning, with logging after the counted
steps (a logged step reads its metrics on purpose). On CPU the attention is SDPA with a mask built from the position
ids, which reads one value back per forward; on CUDA the varlen path skips that (test below)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

COUNT_ARGS = ["--model_name_or_path", "tiny", "--train_file_dir", "data/sample/train.jsonl", "--validation_file_dir",
              "none", "--report_to", "none", "--max_steps", "6", "--logging_steps", "100", "--bf16", "true",
              "--gradient_checkpointing", "false", "--overwrite_output_dir", "true"]

# Measured 2026-12-05 (docs/speed_results.md, "operators per optimizer step"), with ~3% room:
# LoRA 933 operators (634 without views; 1162 / 695 before rm/fused.py), full fine-tuning 834 (545);
# before issue 27: 1457 (988) and 1083 (792). On CPU torch's rms_norm is composite (the same ~8 operators as
# transformers' norm); on CUDA it is one kernel each way, so the GPU saves more than these counts show.
CEILINGS = {"true": {"operators": 960, "operators_without_views": 655, "host_reads": 1},
            "false": {"operators": 860, "operators_without_views": 562, "host_reads": 1}}


def count_operators(output_dir, *extra) -> dict:
    command = [sys.executable, "bench/count_ops.py", "--skip", "2", "--steps", "3", "--", "train.py",
               "--output_dir", str(output_dir), *COUNT_ARGS, *extra]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("STEP ")]
    summary = next(json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("COUNT "))
    return {"steps": steps, "summary": summary, "stdout": proc.stdout}


@pytest.mark.parametrize("use_peft", ["true", "false"])
def test_operators_per_optimizer_step_stay_under_the_ceiling(tmp_path, use_peft):
    counted = count_operators(tmp_path / "run", "--use_peft", use_peft)
    assert len(counted["steps"]) == 3
    assert len({json.dumps({k: v for k, v in s.items() if k != "step"}) for s in counted["steps"]}) == 1, \
        "steps of one shape dispatched different numbers of operators: something varies per step"
    summary = counted["summary"]
    for key, ceiling in CEILINGS[use_peft].items():
        assert summary[key] <= ceiling, (
            f"{'LoRA' if use_peft == 'true' else 'full fine-tuning'}: {summary[key]:g} {key} per optimizer step, "
            f"ceiling {ceiling}. A change added launches or host reads to every step. Find them with `python "
            f"bench/count_ops.py --trace OPNAME -- train.py ...` (the command in docs/speed_results.md) and take them "
            f"out; if they are worth their cost, measure, then raise this ceiling with the number and the reason.\n"
            + counted["stdout"][-2500:])


def test_fused_adamw_steps_like_the_per_tensor_reference(tiny_model):
    """build_optimizer's fused AdamW (now on CPU too) against torch's per-tensor loop, same groups and gradients."""
    from rm.config import parse_config
    from rm.model import RewardModel
    from rm.runtime import build_optimizer

    cfg = parse_config(["--model_name_or_path", "tiny", "--output_dir", "unused", "--use_peft", "false",
                        "--weight_decay", "0.1"])
    model = RewardModel(tiny_model)
    reference = RewardModel(type(tiny_model)(tiny_model.config))
    reference.load_state_dict(model.state_dict())
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"] and len(fused.param_groups) >= 2
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = dict(reference.named_parameters())
    loop = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "params"},
                               "params": [by_name[names[id(p)]] for p in g["params"]], "fused": False,
                               "foreach": False} for g in fused.param_groups])
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for name, value in reference.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_metrics_window_gives_the_per_batch_means():
    """One device vector and host counts give what summing each statistic apart gave: loss per plain micro-batch,
    accuracy and margin per pair, tokens."""
    from accelerate import Accelerator

    from rm.progress import MetricsWindow

    window = MetricsWindow(Accelerator(cpu=True))
    batches = [(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 0.25]), 2, 30),
               (torch.tensor([0.3]), torch.tensor([0.7]), 1, 11)]
    for chosen, rejected, micro, tokens in batches:
        window.add({"micro_batches": micro, "num_tokens": torch.tensor(tokens)}, torch.tensor(0.5 * micro),
                   chosen, rejected)
    metrics = window.collect(lr=1e-5)
    assert metrics["train/loss"] == pytest.approx((0.5 * 2 + 0.5) / 3)
    assert metrics["train/accuracy"] == pytest.approx(2 / 4)
    assert metrics["train/margin"] == pytest.approx((1 - 3 + 0.25 - 0.4) / 4)
    assert metrics["train/lr"] == 1e-5 and metrics["train/tokens_per_s"] > 0
    assert metrics["train/pairs_per_s"] / metrics["train/tokens_per_s"] == pytest.approx(4 / 41)
    chosen, rejected, micro, tokens = batches[1]
    window.add({"num_tokens": torch.tensor(tokens)}, torch.tensor(2.0), chosen, rejected)  # a fresh window
    assert (window.collect()["train/loss"], window.micro, window.pairs) == (2.0, 0, 0)


def _block_diagonal_sdpa(module, query, key, value, attention_mask, *, cu_seq_lens_q=None, scaling=None, **kwargs):
    """A CPU stand-in for the flash varlen kernel (no CPU build exists): each sequence of the packed row attends
    causally to itself only, the boundaries taken from cu_seq_lens on the device, nothing read back."""
    tokens = query.shape[2]
    sequence = torch.searchsorted(cu_seq_lens_q[1:].long(), torch.arange(tokens), right=True)
    mask = (sequence[:, None] == sequence[None, :]) & torch.ones(tokens, tokens, dtype=torch.bool).tril()
    key, value = (t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value))
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2), None


def test_varlen_path_builds_no_mask_and_reads_nothing_back(tiny_model, tokenizer):
    """On the varlen path a packed forward hands transformers a prepared placeholder mask: transformers then skips
    deriving one from the position ids (operators and a host read per forward), and the rewards stay those of
    padded rows. The attention kernel is replaced by a CPU stand-in registered under the varlen name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from bench.count_ops import HOST_READ, OperatorCounter
    from rm.attention import VARLEN_ATTENTION, _varlen_mask
    from rm.batching import KeyedPairs, PackedPairCollator, model_inputs
    from rm.encoding import PairCollator
    from rm.model import RewardModel

    torch.manual_seed(1)
    pairs = [{"chosen_input_ids": torch.randint(5, 4000, (n,)).tolist(),
              "rejected_input_ids": torch.randint(5, 4000, (m,)).tolist(), "margin": 0.0}
             for n, m in [(9, 4), (3, 12), (7, 7)]]
    model = RewardModel(tiny_model).eval()
    with torch.no_grad():
        padded = model(**model_inputs(PairCollator(tokenizer.pad_token_id)(pairs)))
    packed_batch = PackedPairCollator()([KeyedPairs(pairs)[(i, 3)] for i in range(3)])
    assert packed_batch["max_length"] == 12
    AttentionInterface.register(VARLEN_ATTENTION, _block_diagonal_sdpa)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    tiny_model.set_attn_implementation(VARLEN_ATTENTION)
    with torch.no_grad(), OperatorCounter() as counter:
        packed = model(**model_inputs(packed_batch))
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    assert counter.counts[HOST_READ] == 0, counter.counts
    assert not any("diff" in name or "cumsum" in name for name in counter.counts), counter.counts
