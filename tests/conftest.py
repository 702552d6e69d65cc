"""Shared fixtures: the shipped tiny tokenizer, tiny random Qwen3 models (hidden 64, 2 layers), offline."""

import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "RM_CACHE_DIR" not in os.environ:  # the default token cache: never the user's ~/.cache/rm; runs share it
    import atexit
    import shutil
    import tempfile

    os.environ["RM_CACHE_DIR"] = tempfile.mkdtemp(prefix="rm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["RM_CACHE_DIR"], True)


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


def train_command(output_dir, *args, processes: int = 1, port: int | None = None,
                  accelerate_config: str | None = None, mixed_precision: str = "no") -> tuple[list[str], dict]:
    """The command (python, or accelerate launch for several processes / a yaml) and environment of a real
    train.py run. mixed_precision overrides the yaml's (fp32 on CPU: the yamls ask for bf16)."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/torch_ext")}
    launcher = [sys.executable, "train.py"]
    if accelerate_config or processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(port)]
        if accelerate_config:
            launcher += ["--config_file", str(accelerate_config), "--num_processes", str(processes),
                         "--mixed_precision", mixed_precision]
        else:  # plain DDP on CPU over gloo (ACCELERATE_USE_CPU must never be set for DeepSpeed runs)
            env["ACCELERATE_USE_CPU"] = "true"
            launcher += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                         "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
        launcher += ["train.py"]
    return launcher + ["--output_dir", str(output_dir), *map(str, args)], env


def run_train(output_dir, *args, timeout: int = 600, **launch):
    """Runs train.py for real (see train_command); returns (completed process, metrics.json, run_info.json)."""
    import json
    import subprocess

    cmd, env = train_command(output_dir, *args, **launch)
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


def eval_rewards_of_export(model_dir, pairs: int, eval_file=ROOT / "data/sample/eval.jsonl"):
    """Rewards of the first eval pairs from the exported model, read two ways: HF's own pooling and ours."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rm.data import read_pairs
    from rm.encoding import PairCollator, PairEncoder, encode_pairs
    from rm.model import RewardModel, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoded = encode_pairs(read_pairs(str(eval_file), log=lambda m: None)[:pairs], PairEncoder(tokenizer, 1024, 256),
                           show_progress=False, log=lambda m: None)
    batch = PairCollator(tokenizer.pad_token_id)(list(encoded))
    with torch.no_grad():
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        ours = RewardModel(model)(batch["input_ids"], batch["attention_mask"])
    return hf, ours


def assert_export_matches_trainer(output_dir, final, tolerance: float = 1e-4):
    """The exported model, loaded without this package, gives the rewards the trainer measured at the end."""
    import torch

    from rm.loss import reward_metrics, split_rewards

    hf, ours = eval_rewards_of_export(Path(output_dir) / "model", int(final["eval/pairs"]))
    torch.testing.assert_close(hf, ours, atol=1e-5, rtol=1e-5)
    reloaded = reward_metrics(*split_rewards(hf))
    for key in ("accuracy", "reward_chosen", "reward_rejected", "reward_std"):
        assert math.isclose(reloaded[key], final[f"eval/{key}"], rel_tol=tolerance, abs_tol=tolerance / 10), key


def main_caller(capsys, prefix: tuple = (), with_stdout: bool = False):
    """A function that runs train.py's `main` in this process with `prefix` + its arguments and returns (exit code,
    stderr, or stdout + stderr); accelerate's global state is reset after each call."""
    import train
    from accelerate.state import AcceleratorState

    def call(*args) -> tuple[int, str]:
        try:
            code = train.main([str(a) for a in [*prefix, *args]])
        finally:
            AcceleratorState._reset_state(True)
        captured = capsys.readouterr()
        return code, (captured.out + captured.err) if with_stdout else captured.err

    return call


def snapshot(path: Path) -> dict:
    """Every file and folder under path: its modification time and, for a file, its bytes."""
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(path.rglob("*"))} if path.exists() else {}
