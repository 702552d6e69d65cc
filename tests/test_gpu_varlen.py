"""Packed rows through torch's flash varlen kernel give the rewards of padded rows, on a CUDA GPU in bf16 (skipped
elsewhere, so not in CI; on CPU the packed path runs through SDPA and tests/test_batching.py checks it exactly).
On the GPU machine: `pytest -q -s tests/test_gpu_varlen.py`.

bf16 rounds differently in a packed row than in a padded batch, so the threshold is set against bf16's own noise
floor, measured on the same model: padded rows batched together against the same rows one pair at a time. A
packed row whose sequences attended across their boundaries would be off by tens of percent.

Run on one H200 (torch 2.11, a random Qwen3-0.6B-shaped model, 16 sample pairs): packed vs padded 2.5e-2, noise
floor 2.9e-2, passed; with the kernel given the whole row as one sequence (boundaries ignored): 2.2, failed."""

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_packed_flash_varlen_rewards_equal_padded_rows(tmp_path):
    from rm.attention import varlen_available
    from rm.cli.bench import make_random_model, packed_matches_padded

    assert varlen_available(torch.device("cuda")), "no flash varlen kernel: packed rows would not use it"
    model = make_random_model(tmp_path / "qwen3-0.6b", "qwen3-0.6b")
    packed, noise = packed_matches_padded(model, str(ROOT / "data/sample/train.jsonl"), pairs=16)
    print(f"relative reward difference: packed vs padded {packed:.2e}; bf16 noise floor (batched vs one pair at a "
          f"time) {noise:.2e}")
    assert packed <= max(4 * noise, 1e-2), (packed, noise)
