"""The packed fast path's pieces: the sampler rebuilds accelerate's plain micro-batches per process and packs each
optimizer step into the same number of forwards everywhere; packed rows give the rewards of padded rows; the
weighted loss is the plain path's sum of micro-batch means; and the benchmark runs both paths (CPU smoke)."""

import json
import random
import subprocess
import sys

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, RandomSampler

from conftest import ROOT
from rm.batching import (KeyedPairs, PackedPairCollator, PackedStepSampler, is_placeholder, largest_micro_batch_tokens,
                         micro_batches_per_process, model_inputs, pack_units, split_to_count)
from rm.encoding import PairCollator
from rm.loss import pairwise_loss


def items_per_process(make_sampler, processes):
    """What accelerate's prepared loader hands each process (on one process it does not shard). Every process
    has its own sampler whose generator accelerate synchronises: here, a fresh one with the same seed."""
    if processes == 1:
        return [list(make_sampler())]
    return [list(BatchSamplerShard(make_sampler(), processes, rank, split_batches=False, even_batches=True))
            for rank in range(processes)]


@pytest.mark.parametrize("pairs,batch_size,ga,processes", [(37, 2, 3, 1), (37, 2, 3, 2), (40, 1, 8, 3), (9, 4, 2, 2)])
def test_sampler_reproduces_the_plain_steps_of_every_process(pairs, batch_size, ga, processes):
    tokens = [(7 * i) % 50 + 10 for i in range(pairs)]
    def packed():
        return PackedStepSampler(tokens, batch_size, ga, max_tokens=120, num_processes=processes,
                                 generator=torch.Generator().manual_seed(3))

    def plain_batches():
        return BatchSampler(RandomSampler(range(pairs), generator=torch.Generator().manual_seed(3)), batch_size,
                            drop_last=False)

    plain = items_per_process(plain_batches, processes)
    fast = items_per_process(packed, processes)
    for rank in range(processes):
        assert len(fast[rank]) == len(plain[rank]) == len(packed()) // processes  # one item per plain micro-batch
        # what train.py counts before the loader exists (the LoRA compile decision needs the step count)
        assert len(plain[rank]) == micro_batches_per_process(pairs, batch_size, processes)
    for start in range(0, len(plain[0]), ga):
        forwards = set()
        for rank in range(processes):
            units, items = plain[rank][start:start + ga], fast[rank][start:start + ga]
            real = [item for item in items if item]
            assert all(not item for item in items[:len(items) - len(real)])  # placeholders first, a forward last
            forwards.add(len(real))
            keys = sorted(key for item in real for key in item)
            assert keys == sorted((i, len(unit)) for unit in units for i in unit)  # same pairs, weight 1/unit size
            for item in real:
                if len(item) > max(len(u) for u in units):  # several units packed: within the budget
                    assert sum(tokens[i] for i, _ in item) <= 120
        assert len(forwards) == 1  # the same number of forwards on every process


def test_split_to_count_keeps_every_unit():
    bins = pack_units([[0], [1], [2], [3]], [50, 40, 30, 20], max_tokens=100)
    assert sorted(len(b) for b in bins) == [2, 2]
    split = split_to_count(bins, 4)
    assert sorted(p for b in split for p in b) == [0, 1, 2, 3] and len(split) == 4


def test_packed_rows_give_the_rewards_of_padded_rows(tiny_model, tokenizer):
    from rm.model import RewardModel

    torch.manual_seed(1)
    pairs = [{"chosen_input_ids": torch.randint(5, 4000, (n,)).tolist(),
              "rejected_input_ids": torch.randint(5, 4000, (m,)).tolist(), "margin": 0.0}
             for n, m in [(9, 4), (3, 12), (7, 7)]]
    model = RewardModel(tiny_model).eval()
    padded = PairCollator(tokenizer.pad_token_id)(pairs)
    packed = PackedPairCollator()([KeyedPairs(pairs)[(i, 3)] for i in range(3)])
    assert packed["input_ids"].shape == (1, 42) and packed["cu_seq_lens"].tolist() == [0, 9, 12, 19, 23, 35, 42]
    assert packed["position_ids"][0, 9:13].tolist() == [0, 1, 2, 0]
    assert packed["micro_batches"] == 1 and int(packed["num_tokens"]) == int(padded["num_tokens"]) == 42
    with torch.no_grad():
        torch.testing.assert_close(model(**model_inputs(packed)), model(**model_inputs(padded)), rtol=1e-5,
                                   atol=1e-6)
    assert is_placeholder(PackedPairCollator()([]))


def test_weighted_loss_is_the_sum_of_micro_batch_means():
    chosen, rejected, margin = torch.randn(5), torch.randn(5), torch.rand(5)
    weights = torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3])  # a unit of 2 pairs and one of 3
    expected = sum(pairwise_loss(chosen[s], rejected[s], margin[s], 0.1) for s in (slice(0, 2), slice(2, 5)))
    torch.testing.assert_close(pairwise_loss(chosen, rejected, margin, 0.1, weights), expected)


def test_bench_smoke_measures_both_paths(tmp_path):
    """`python -m rm.bench` on CPU: one table, the packed and the plain path of the real trainer side by side."""
    report = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "rm.bench", "--max_train_samples", "48", "--max_steps", "2",
                           "--logging_steps", "1",
                           "--work_dir", str(tmp_path / "work"), "--json", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "configuration" in proc.stdout and "x plain" in proc.stdout
    results = json.loads(report.read_text())["results"]
    assert [r["path"] for r in results] == ["plain", "packed"]
    for r in results:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["first_step_s"] > 0
        assert r["graphs_after_first_step"] is None  # not compiled (CPU): no recompile count to report
    # the same pairs in the same steps: the same loss curve
    torch.testing.assert_close(torch.tensor(results[0]["losses"]), torch.tensor(results[1]["losses"]), rtol=1e-4,
                               atol=1e-5)


def test_packed_evaluation_gives_every_pair_its_padded_reward_whatever_the_budget(tiny_model, tokenizer):
    """Evaluation packs by token budget: the rewards (in the pairs' order) are each pair's own padded-row rewards,
    for a budget that packs everything into one row and for one that puts each pair alone."""
    from accelerate import Accelerator

    from rm.evaluate import collect_rewards
    from rm.model import RewardModel

    torch.manual_seed(2)
    rows = [{"chosen_input_ids": torch.randint(5, 4000, (n,)).tolist(),
             "rejected_input_ids": torch.randint(5, 4000, (m,)).tolist(), "margin": 0.5 * i}
            for i, (n, m) in enumerate([(9, 4), (3, 12), (7, 7), (20, 5), (6, 6)])]
    from datasets import Dataset

    model = RewardModel(tiny_model)
    with torch.no_grad():
        expected = [model(**model_inputs(PairCollator(tokenizer.pad_token_id)([row]))) for row in rows]
    for budget in (1000, 1):
        chosen, rejected, margin = collect_rewards(Accelerator(cpu=True), model, Dataset.from_list(rows), budget)
        torch.testing.assert_close(chosen, torch.stack([e[0] for e in expected]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rejected, torch.stack([e[1] for e in expected]), rtol=1e-5, atol=1e-6)
        assert margin.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_eval_rows_cover_every_pair_once_with_the_same_forwards_everywhere():
    from rm.evaluate import eval_rows

    tokens = [30, 50, 20, 90, 10, 40, 40]
    for processes in (1, 2, 3, 8):
        per_process, forwards = eval_rows(tokens, 100, processes)
        assert sorted(i for rows in per_process for row in rows for i in row) == list(range(len(tokens)))
        assert forwards == max(len(rows) for rows in per_process)
        for rows in per_process:
            assert all(len(row) == 1 or sum(tokens[i] for i in row) <= 100 for row in rows)


def test_the_largest_micro_batch_is_bounded_by_the_data_not_only_by_the_token_cap():
    """Checkpointing is sized for it: the default (1 pair x GA 8, cap 16384) on pairs of ~550 tokens is ~4.4k tokens,
    and the cap alone turned checkpointing on for the Qwen3-0.6B shape on an 80 GB GPU."""
    rng = random.Random(3)
    tokens = [rng.randint(100, 1000) for _ in range(400)]
    for batch, ga, cap in ((1, 8, 16384), (2, 4, 3000), (4, 2, 500), (1, 1, 16384)):
        bound = largest_micro_batch_tokens(tokens, batch, ga, cap, packing=True)
        sampler = PackedStepSampler(tokens, batch, ga, cap, 1, torch.Generator().manual_seed(0))
        largest = max(sum(tokens[i] for i, _ in item) for item in sampler if item)
        assert largest <= bound <= max(cap, sum(sorted(tokens)[-batch:])), (batch, ga, cap, largest, bound)
        assert bound <= sum(sorted(tokens)[-batch * ga:])
    assert largest_micro_batch_tokens(tokens, 1, 8, 16384, packing=True) == sum(sorted(tokens)[-8:]) < 8000
    assert largest_micro_batch_tokens(tokens, 2, 8, 16384, packing=False) == 4 * max(tokens)
