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


def run_train(output_dir, *args, processes: int = 1, port: int | None = None, accelerate_config: str | None = None,
              timeout: int = 600):
    """Runs train.py for real (python, or accelerate launch for several processes / a yaml); returns
    (completed process, metrics.json, run_info.json)."""
    import json
    import subprocess

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/torch_ext")}
    launcher = [sys.executable, "train.py"]
    if accelerate_config or processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(port)]
        if accelerate_config:
            launcher += ["--config_file", accelerate_config, "--num_processes", str(processes)]
        else:  # plain DDP on CPU over gloo (ACCELERATE_USE_CPU must never be set for DeepSpeed runs)
            env["ACCELERATE_USE_CPU"] = "true"
            launcher += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                         "--mixed_precision", "no", "--dynamo_backend", "no"]
        launcher += ["train.py"]
    cmd = launcher + ["--output_dir", str(output_dir), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    read = lambda name: json.loads((Path(output_dir) / name).read_text())  # noqa: E731
    return proc, read("metrics.json"), read("run_info.json")


@pytest.fixture(scope="session")
def pretrained_causal_lm_dir(tmp_path_factory, tokenizer):
    """A tiny Qwen3 *causal LM* checkpoint on disk (no score head), as users pass with --model_name_or_path."""
    import torch
    from transformers import AutoModelForCausalLM

    from rm.model import tiny_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen3-tiny-causal-lm")
    AutoModelForCausalLM.from_config(tiny_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
