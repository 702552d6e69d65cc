"""rm/graphs.py and the static shapes it needs (rm/batching.py): on CPU, the padded row and StepGraphs' forward,
loss and backward against the eager path; on CUDA (skipped elsewhere), graph replays against eager runs."""

import copy

import pytest
import torch

from conftest import run_train
from rm.batching import TOKEN_BUCKETS, KeyedPairs, PackedPairCollator, filler_slots, token_bucket
from rm.config import ConfigError
from rm.graphs import StepGraphs, graphs_wanted
from rm.loss import pairwise_loss, split_rewards
from rm.model import RewardModel, apply_lora

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_token_buckets_pad_at_most_a_quarter_and_filler_pieces_fit_the_longest_sequence():
    assert TOKEN_BUCKETS[:4] == [512, 640, 832, 1088] and all(b % 64 == 0 for b in TOKEN_BUCKETS)
    for tokens in (1, 511, 512, 513, 4000, 4417, 16384, 70000):
        bucket = token_bucket(tokens)
        assert tokens <= bucket and (bucket <= 512 or bucket < 1.26 * tokens + 64)
        below = TOKEN_BUCKETS[TOKEN_BUCKETS.index(bucket) - 1] if bucket > 512 else 0
        assert below < tokens or bucket == 512
        assert filler_slots(bucket, 100) * 100 >= bucket - max(below, 0)


def _pairs(lengths, seed=1):
    torch.manual_seed(seed)
    return [{"chosen_input_ids": torch.randint(5, 4000, (n,)).tolist(),
             "rejected_input_ids": torch.randint(5, 4000, (m,)).tolist(), "margin": 0.25 * i}
            for i, (n, m) in enumerate(lengths)]


def test_a_static_row_holds_the_packed_row_then_empty_slots_and_filler():
    pairs = _pairs([(9, 4), (3, 12), (7, 7)])
    features = [KeyedPairs(pairs)[(i, 3)] for i in range(3)]
    packed = PackedPairCollator()(features)
    static = PackedPairCollator(pair_slots=5, max_sequence_tokens=200, pad_id=0)(features)
    assert static["input_ids"].shape == (1, 512) and static["pairs"] == 3
    assert static["input_ids"][0, :42].tolist() == packed["input_ids"][0].tolist()
    assert (static["input_ids"][0, 42:] == 0).all()
    # 5 chosen slots (3 real, 2 empty), 5 rejected slots, then ceil(512 / 200) = 3 filler pieces of <= 200 tokens
    assert static["cu_seq_lens"].tolist() == [0, 9, 12, 19, 19, 19, 23, 35, 42, 42, 42, 242, 442, 512]
    assert static["pair_weight"].tolist() == pytest.approx([1 / 3] * 3 + [0, 0]) and static["margin"].tolist()[3:] == [0, 0]
    assert int(static["num_tokens"]) == 42 and static["micro_batches"] == 1 == packed["micro_batches"]
    assert static["position_ids"][0, 242:245].tolist() == [0, 1, 2]


def _lora_model(tiny_model):
    model = apply_lora(tiny_model, rank=4, alpha=8.0, dropout=0.0, target_modules="all")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return RewardModel(model).train()


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_the_graphed_forward_backward_of_a_static_row_is_the_eager_step_of_the_packed_row(tiny_model):
    """What a graph replays (StepGraphs._forward_backward, run eagerly here on CPU) on the padded row: the loss,
    rewards and accumulated gradients of the loop's eager path on the unpadded row, over two micro-batches."""
    eager, graphed = _lora_model(tiny_model), None
    graphed = copy.deepcopy(eager)
    steps = StepGraphs(graphed, pair_slots=4, max_sequence_tokens=64, gradient_accumulation_steps=2,
                       center_rewards_coefficient=0.01)
    for seed, lengths in ((1, [(9, 4), (3, 12), (7, 7)]), (2, [(5, 6)])):
        features = [KeyedPairs(_pairs(lengths, seed))[(i, len(lengths))] for i in range(len(lengths))]
        packed = PackedPairCollator()(features)
        chosen, rejected = split_rewards(eager(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                               cu_seq_lens=packed["cu_seq_lens"], max_length=packed["max_length"]))
        loss = pairwise_loss(chosen, rejected, packed["margin"], 0.01, packed["pair_weight"])
        (loss / 2).backward()

        static = PackedPairCollator(pair_slots=4, max_sequence_tokens=64)(features)
        inputs = {key: static[key] for key in ("input_ids", "position_ids", "cu_seq_lens", "margin", "pair_weight")}
        graph_loss, graph_chosen, graph_rejected = steps._forward_backward(inputs)
        n = static["pairs"]
        torch.testing.assert_close(graph_loss, loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(graph_chosen[:n], chosen.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(graph_rejected[:n], rejected.detach(), rtol=1e-5, atol=1e-6)
    expected, got = _grads(eager), _grads(graphed)
    for name in expected:
        assert expected[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=lambda text: f"{name}: {text}")


def test_graphs_run_only_where_they_can_and_say_why_not():
    ok = {"device": CUDA, "num_processes": 1, "zero_stage": 0, "packing": True, "varlen": True,
          "checkpointing": False, "compiled": False}
    assert graphs_wanted(None, **ok) == (True, "auto: one CUDA process, packed rows, eager")
    assert graphs_wanted(False, **ok) == (False, "as set")
    for change, why in (({"device": CPU}, "not on CUDA"), ({"num_processes": 2}, "more than one process"),
                        ({"zero_stage": 2}, "under DeepSpeed"), ({"checkpointing": True}, "gradient checkpointing"),
                        ({"compiled": True}, "torch.compile"), ({"packing": False}, "--packing false")):
        on, reason = graphs_wanted(None, **{**ok, **change})
        assert not on and why in reason
        with pytest.raises(ConfigError, match=why):
            graphs_wanted(True, **{**ok, **change})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("peft", ["true", "false"], ids=["lora", "full"])
def test_graph_replays_follow_the_eager_curve(tmp_path, peft):
    """Real train.py runs on the GPU, bf16, packed rows of several token buckets (batch 4 x GA 2, so some steps
    split into two micro-batches), with and without graphs: the same loss curve within bf16 noise."""
    from test_checkpoint_resume import assert_same_curve

    args = ["--model_name_or_path", "tiny", "--train_file_dir", "data/sample/train.jsonl", "--validation_file_dir",
            "none", "--use_peft", peft, "--bf16", "true", "--max_steps", 10, "--logging_steps", 1,
            "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2, "--max_tokens_per_micro_batch",
            600, "--report_to", "none", "--gradient_checkpointing", "false", "--torch_compile", "false"]
    _, eager, eager_info = run_train(tmp_path / "eager", *args, "--cuda_graphs", "false")
    _, graphed, info = run_train(tmp_path / "graphs", *args)
    assert info["cuda_graphs"] and not eager_info["cuda_graphs"] and len(info["cuda_graph_buckets"]) >= 1
    assert_same_curve(graphed, eager, tolerance=1e-2)
