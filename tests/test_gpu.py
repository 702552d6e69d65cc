"""bf16 runs on a CUDA GPU (skipped elsewhere, so not in CI): a Qwen3-0.6B-shaped random model, the tiny
tokenizer, the sample data. On the GPU machine: `pytest -q tests/test_gpu.py`.

- A run killed with SIGKILL at a random step and resumed with `--resume_from_checkpoint latest` follows the
  uninterrupted run's loss curve within 1e-2 (bf16), without DeepSpeed and under ZeRO-2.
- `--torch_compile true` (compiled decoder layers around the flash varlen attention) follows the eager curve.
- Compiled runs (the default for full fine-tuning on CUDA; LoRA in runs of >= 200 steps or with --torch_compile true)
  build no graph after the first optimizer step (no recompiles), with an evaluation in the middle (evaluation runs
  eagerly), and none when the packed rows change token class after the first step.
"""

import random
import shutil

import pytest
import torch

from conftest import ROOT, run_train, train_command
from test_checkpoint_resume import assert_same_curve, kill_every_process_of, start, wait_for_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RUN = ["--train_file_dir", "data/sample/train.jsonl", "--validation_file_dir", "none", "--use_peft", "false",
       "--bf16", "true", "--max_steps", 12, "--save_steps", 4, "--save_total_limit", 1, "--logging_steps", 1,
       "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2, "--learning_rate", 1e-5,
       "--report_to", "none"]
ZERO2 = ROOT / "accelerate_configs/zero2_1node.yaml"


@pytest.fixture(scope="module")
def qwen3_shaped_model(tmp_path_factory):
    from rm.cli.bench import make_random_model

    return make_random_model(tmp_path_factory.mktemp("model") / "qwen3-0.6b", "qwen3-0.6b")


@pytest.mark.parametrize("yaml", [None, ZERO2], ids=["no-deepspeed", "zero2"])
def test_bf16_sigkill_then_resume_follows_the_uninterrupted_curve(tmp_path, qwen3_shaped_model, yaml):
    launch = {"accelerate_config": yaml, "mixed_precision": "bf16", "port": 29801}
    args = ["--model_name_or_path", qwen3_shaped_model, *RUN]
    _, reference, info = run_train(tmp_path / "reference", *args, "--save_steps", 1000, **launch)  # 7 GB a save
    assert info["mixed_precision"] == "bf16" and info["zero_stage"] == (2 if yaml else 0)

    kill_at = random.Random().randint(5, 10)
    out = tmp_path / "killed"
    cmd, env = train_command(out, *args, **launch)
    proc = start(cmd, env)
    wait_for_step(proc, kill_at)
    kill_every_process_of(out)  # the launcher and its worker: torch's elastic agent starts workers in own sessions
    proc.wait(timeout=60)
    _, resumed, _ = run_train(out, *args, "--resume_from_checkpoint", "latest", **launch)
    print(f"killed at step {kill_at}; max |loss difference| "
          f"{max(abs(a['train/loss'] - b['train/loss']) for a, b in zip(resumed['history'], reference['history']))}")
    shutil.rmtree(tmp_path)  # the checkpoints (fp32 weights + Adam states) fill the disk otherwise
    assert_same_curve(resumed, reference, tolerance=1e-2)


def test_compiled_layers_follow_the_eager_curve(tmp_path, qwen3_shaped_model):
    args = ["--model_name_or_path", qwen3_shaped_model, *RUN, "--max_steps", 8, "--save_steps", 1000]
    _, eager, _ = run_train(tmp_path / "eager", *args, "--torch_compile", "false")
    _, compiled, _ = run_train(tmp_path / "compiled", *args, "--torch_compile", "true")
    assert_same_curve(compiled, eager, tolerance=1e-2)


@pytest.mark.parametrize("peft", ["true", "false"], ids=["lora", "full"])
def test_compiled_runs_build_no_graph_after_the_first_step(tmp_path, qwen3_shaped_model, peft):
    """Full fine-tuning compiles by default on CUDA; a 30-step LoRA run only when asked (too short to pay the
    compile back, rm.model.compile_requested)."""
    args = ["--model_name_or_path", qwen3_shaped_model, *RUN, "--use_peft", peft, "--max_steps", 30,
            "--save_steps", 1000, "--per_device_train_batch_size", 1, "--gradient_accumulation_steps", 8,
            "--validation_file_dir", "data/sample/eval.jsonl", "--eval_steps", 10]
    _, _, info = run_train(tmp_path / "run", *args, *(["--torch_compile", "true"] if peft == "true" else []))
    assert info["torch_compile"] is True
    assert info["compiled_graphs"] == info["compiled_graphs_first_step"] >= 1


def test_compiled_layers_build_no_graph_when_packed_rows_change_size_class(tmp_path, qwen3_shaped_model):
    """600 sample pairs of ~62 tokens, 64 pairs a step: nine packed rows of ~3,950 tokens, then one of ~1,480 in the
    last step. Inductor's mix-order reduction fusion, left on, guarded on the token class (< 2560, 2560-5119,
    >= 5120) and recompiled every layer at that last step (rm.model.compile_decoder_layers turns it off)."""
    args = ["--model_name_or_path", qwen3_shaped_model, *RUN, "--max_steps", -1, "--num_train_epochs", 1,
            "--save_steps", 1000, "--per_device_train_batch_size", 8, "--gradient_accumulation_steps", 8]
    _, _, info = run_train(tmp_path / "run", *args)
    assert info["torch_compile"] is True and info["total_steps"] == 10
    assert info["compiled_graphs"] == info["compiled_graphs_first_step"] >= 1
