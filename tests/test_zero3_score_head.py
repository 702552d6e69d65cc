"""The score head of a reward model built from a causal-LM checkpoint (which has none) under ZeRO-3: a real
2-process gloo run builds it as train.py does (rm.model.load_backbone after the Accelerator, so zero.Init
partitions it as it loads), gathers the head and checks it: finite, not all zero, std near the config's
initializer_range, and equal to the head one process without DeepSpeed builds under the same seed."""

import subprocess
import sys

import torch

from conftest import ROOT, train_command

BUILD_HEAD = """
import contextlib, sys
sys.path.insert(0, sys.argv[1])
import torch
from accelerate.utils import set_seed
from rm.config import parse_config
from rm.model import load_backbone, load_tokenizer
from rm.runtime import make_accelerator, zero_stage

model_dir, out = sys.argv[2:4]
cfg = parse_config(["--model_name_or_path", model_dir, "--output_dir", out + ".unused", "--report_to", "none"])
accelerator = make_accelerator(cfg)
set_seed(cfg.seed)
model = load_backbone(model_dir, load_tokenizer(model_dir), torch.float32, None, accelerator)
weight = model.score.weight
gathered = contextlib.nullcontext()
if hasattr(weight, "ds_id"):
    import deepspeed
    gathered = deepspeed.zero.GatheredParameters([weight])
with gathered:
    head = weight.detach().clone()
if accelerator.is_main_process:
    torch.save({"head": head, "zero_stage": zero_stage(accelerator), "processes": accelerator.num_processes,
                "initializer_range": model.config.initializer_range}, out)
accelerator.wait_for_everyone()
"""


def build_head(tmp_path, model_dir, name, **launch) -> dict:
    script = tmp_path / "build_head.py"
    script.write_text(BUILD_HEAD)
    out = tmp_path / f"{name}.pt"
    launcher, env = train_command(tmp_path, **launch)  # python, or accelerate launch with the yaml
    launcher = launcher[:launcher.index("train.py")]
    proc = subprocess.run([*launcher, str(script), str(ROOT), str(model_dir), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


def test_zero3_two_processes_initialise_the_new_score_head_as_one_process_does(tmp_path, pretrained_causal_lm_dir):
    one = build_head(tmp_path, pretrained_causal_lm_dir, "one")
    two = build_head(tmp_path, pretrained_causal_lm_dir, "two", processes=2, port=29671,
                     accelerate_config=ROOT / "accelerate_configs" / "zero3_1node.yaml")
    assert (one["zero_stage"], one["processes"]) == (0, 1) and (two["zero_stage"], two["processes"]) == (3, 2)
    head, expected_std = two["head"], two["initializer_range"]
    assert head.shape == (1, 64) and torch.isfinite(head).all(), head
    assert head.abs().sum() > 0, "the gathered score head is all zero"
    assert 0.7 * expected_std < head.std().item() < 1.3 * expected_std, (head.std().item(), expected_std)
    torch.testing.assert_close(head, one["head"], rtol=0, atol=0)  # same seed, same head: ZeRO-3 drew it as 1 process
