"""Shared fixtures: the shipped tiny tokenizer, tiny random Qwen3 models (hidden 64, 2 layers), offline."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from rm.model import TINY, load_tokenizer

    return load_tokenizer(TINY)


@pytest.fixture
def tiny_model(tokenizer):
    import torch

    from rm.model import TINY, load_backbone

    torch.manual_seed(0)
    return load_backbone(TINY, tokenizer, torch.float32)
