"""rm.plan: parameter counts against real models, the memory formulas on hand-computed cases, recommendations."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from rm.config import TrainConfig
from rm.cli.plan import (PRESETS, PlanError, Setup, Shape, Workload, activation_bytes, estimate, load_shape, main,
                     model_state_bytes, recommend, tokens_per_micro_batch)

# h 8, 2 layers, MLP 16, 2 query heads / 1 kv head of dim 4, vocab 10: per layer 576 linear weights + 16 norm
# weights = 592; model = 80 embedding + 2 x 592 + 8 final norm + 8 score head = 1280 parameters.
HAND = Shape(hidden_size=8, num_hidden_layers=2, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
             head_dim=4, vocab_size=10)
P = 1280


def test_parameter_count_by_hand():
    assert HAND.layer_parameters() == 592
    assert HAND.parameters() == P
    # LoRA r2: 2 x (in + out) summed over q, k, v, o, gate, up, down = 2 x 128 per layer, + the 8-weight score head
    assert HAND.lora_parameters(2) == 2 * 2 * 128 + 8


@pytest.mark.parametrize("extra", [{}, {"model_type": "llama", "attention_bias": True}, {"model_type": "qwen2"}])
def test_parameter_counts_match_real_models(tokenizer, extra):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rm.model import apply_lora, tiny_config

    config = tiny_config(tokenizer)
    if extra:
        config = AutoConfig.for_model(**{**config.to_dict(), **extra})
    model = AutoModelForSequenceClassification.from_config(config)
    shape = Shape.from_config(config.to_dict())
    assert shape.parameters() == sum(p.numel() for p in model.parameters())
    lora = apply_lora(model, 4, 8.0, 0.0, "all")
    assert shape.lora_parameters(4) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_model_states_by_hand():
    n, gathered = 4, 2 * 2 * 592  # ZeRO-3 keeps two layers (bf16) gathered: larger than the 80-weight embedding
    assert model_state_bytes(HAND, Setup("", "", 0), 1, None) == (16 * P, 0)
    assert model_state_bytes(HAND, Setup("", "", 1), n, None) == (2 * P + 2 * P + 16 * P / n, 0)
    assert model_state_bytes(HAND, Setup("", "", 2), n, None) == (2 * P + (2 * P + 16 * P) / n, 0)
    assert model_state_bytes(HAND, Setup("", "", 2, offload_optimizer=True), n, None) == (2 * P + 2 * P / n,
                                                                                           16 * P / n)
    assert model_state_bytes(HAND, Setup("", "", 3), n, None) == ((2 * P + 2 * P + 16 * P) / n + gathered, 0)
    assert model_state_bytes(HAND, Setup("", "", 3, True, True), n, None) == (gathered + 2 * P / n,
                                                                              2 * P / n + 16 * P / n)
    t = HAND.lora_parameters(2)
    assert model_state_bytes(HAND, Setup("", "", 0), 1, 2) == (2 * (P - t) + 16 * t, 0)
    assert model_state_bytes(HAND, Setup("", "", 2), n, 2) == (2 * P + (2 * t + 16 * t) / n, 0)


def test_activations_by_hand():
    per_token_layer = 12 * 8 + 4 * 8 + 4 * 4 + 8 * 16  # 272 bytes
    assert HAND.activation_bytes_per_token_layer() == per_token_layer
    assert activation_bytes(HAND, Workload(10, gradient_checkpointing=False)) == 2 * 10 * per_token_layer
    # checkpointing: each layer's bf16 input (2h bytes per token) + one layer recomputed in full
    assert activation_bytes(HAND, Workload(10, gradient_checkpointing=True)) == 2 * 2 * 8 * 10 + 10 * per_token_layer


def test_tokens_per_micro_batch():
    cfg = TrainConfig(per_device_train_batch_size=2, max_source_length=100, max_target_length=28, packing=False,
                      gradient_accumulation_steps=4, max_tokens_per_micro_batch=1000)
    assert tokens_per_micro_batch(cfg) == 2 * 2 * 128
    cfg.packing = True  # the step's 4 x 512 tokens packed under a 1000-token budget
    assert tokens_per_micro_batch(cfg) == 1000
    cfg.gradient_accumulation_steps = 1  # nothing to pack together
    assert tokens_per_micro_batch(cfg) == 512


def test_estimate_adds_up():
    result = estimate(HAND, Setup("", "", 2), 4, Workload(10, True), None)
    parts = result["model_states"] + result["activations"] + result["overhead"]
    assert result["total"] == pytest.approx(parts)


ORIGINAL_WORKLOAD = Workload(tokens_per_micro_batch(TrainConfig(packing=False)), gradient_checkpointing=True)


@pytest.mark.parametrize("preset, yaml", [
    ("qwen3-0.6b", "zero2_1node.yaml"),      # <= 13B: ZeRO-2 + activation checkpointing
    ("llama-2-7b", "zero2_1node.yaml"),
    ("llama-2-13b", "zero2_1node.yaml"),
    ("qwen3-32b", "zero2_offload.yaml"),     # ~32B: ZeRO-2 + optimizer offload
    ("llama-3-70b", "zero3_offload.yaml"),   # >= 65B: ZeRO-3 + offload + tuned buckets
    ("qwen2.5-72b", "zero3_offload.yaml"),
])
def test_recommendations_follow_the_original_advice(preset, yaml):
    """One node of 8 x 80 GiB GPUs, full fine-tuning, the original batch (1 pair, GA 8, 1024 + 256 tokens)."""
    _, shape = load_shape(preset)
    setup, result = recommend(shape, 1, 8, 80, ORIGINAL_WORKLOAD, None)
    assert setup.yaml == yaml and result["total"] <= 72


def test_recommendations_depend_on_topology_and_memory():
    _, shape = load_shape("qwen3-0.6b")
    assert recommend(shape, 1, 1, 80, ORIGINAL_WORKLOAD, None)[0].yaml == "debug_1gpu.yaml"
    assert recommend(shape, 2, 8, 80, ORIGINAL_WORKLOAD, None)[0].yaml == "zero2_2node.yaml"
    _, big = load_shape("llama-3-70b")
    assert recommend(big, 1, 1, 24, ORIGINAL_WORKLOAD, None) == (None, None)
    assert recommend(big, 1, 8, 80, ORIGINAL_WORKLOAD, 8)[0].yaml == "zero3_1node.yaml"  # LoRA: no offload needed


def test_preset_sizes():
    sizes = {name: Shape.from_config(shape).parameters() / 1e9 for name, shape in PRESETS.items()}
    assert sizes["qwen3-0.6b"] == pytest.approx(0.596, abs=0.005)
    assert sizes["llama-2-7b"] == pytest.approx(6.6, abs=0.1)
    assert sizes["qwen3-32b"] == pytest.approx(32.0, abs=0.3)
    assert sizes["llama-3-70b"] == pytest.approx(69.5, abs=0.3)


def test_cli_reads_a_model_folder_and_names_bad_fields(tmp_path, tokenizer, capsys):
    from rm.model import tiny_config

    tiny_config(tokenizer).save_pretrained(tmp_path)
    assert main(["--model", str(tmp_path), "--gpus-per-node", "2", "--gpu-memory", "16"]) == 0
    out = capsys.readouterr().out
    assert "zero2_1node.yaml" in out and "full fine-tuning: ZeRO-2" in out
    config = json.loads((tmp_path / "config.json").read_text())
    del config["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanError, match="config.json: field 'intermediate_size'"):
        load_shape(str(tmp_path))
    assert main(["--model", str(tmp_path / "nowhere")]) == 2
    assert "not a preset" in capsys.readouterr().err


def test_offload_recommendation_states_host_memory_and_commands_fit_the_topology(capsys):
    assert main(["--model", "llama-3-70b", "--packing", "false"]) == 0
    out = capsys.readouterr().out
    full = next(line for line in out.splitlines() if line.startswith("full fine-tuning:"))
    host = float(full.split("needs ~")[1].split(" GiB of host memory on every node")[0])
    assert "zero3_offload.yaml" in full and 1100 < host < 1300  # bf16 weights + fp32 states of 70B over 8 GPUs
    assert "NODE_RANK" not in out and "MASTER_ADDR" not in out  # one node: nothing to fill in
    assert "torchrun_multi_node_multi_gpu.sh 3 1 8 localhost 29500" in out
    assert main(["--model", "llama-3-70b", "--nodes", "2", "--packing", "no"]) == 0
    two_nodes = capsys.readouterr().out
    assert '--machine_rank "${NODE_RANK:?export NODE_RANK=' in two_nodes
    assert '--main_process_ip "${MASTER_ADDR:?export MASTER_ADDR=' in two_nodes


def printed_commands(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if line.startswith("    ")]


def test_the_printed_commands_run_as_printed(capsys):
    """They said MODEL_PATH and no data: now the preset's hub name and the embedded sample, named as the data to
    replace; multi-node ones take NODE_RANK and MASTER_ADDR from the environment and stop, saying so, without.
    The launcher's commands run for real up to its dry run (RM_DRY_RUN=1); an `accelerate launch` one is parsed by
    accelerate's own parser, and its train.py flags by train.py's."""
    from accelerate.commands.launch import launch_command_parser

    from rm.config import parse_config

    env = {**os.environ, "RM_DRY_RUN": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("NODE_RANK", None), env.pop("MASTER_ADDR", None)

    def run(command: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=ROOT, env={**env, **extra}, capture_output=True,
                              text=True, timeout=120)

    def train_args(argv: list[str]) -> list[str]:
        return argv[[i for i, arg in enumerate(argv) if arg.endswith("train.py")][0] + 1:]

    assert main(["--model", "qwen3-8b", "--gpus-per-node", "2", "--gpu-memory", "40"]) == 0
    out = capsys.readouterr().out
    assert "replace --train_file_dir data/sample/train.jsonl with your data" in out
    commands = printed_commands(out)
    assert any(c.startswith("bash ") for c in commands) and any(c.startswith("accelerate ") for c in commands)
    for command in commands:
        assert "--model_name_or_path Qwen/Qwen3-8B --train_file_dir data/sample/train.jsonl" in command
        if command.startswith("bash "):
            proc = run(command)
            assert proc.returncode == 0, proc.stderr  # the launcher's checks pass; it prints what it would run
            argv = shlex.split(proc.stdout.splitlines()[-1])
        else:
            argv = shlex.split(command)
            assert launch_command_parser().parse_args(argv[2:]).training_script == "train.py"
        parse_config(train_args(argv))
    assert main(["--model", "qwen3-8b", "--nodes", "2", "--gpus-per-node", "2", "--gpu-memory", "80"]) == 0
    command = printed_commands(capsys.readouterr().out)[-1]
    assert command.startswith("NODE_RANK=")
    proc = run(command)
    assert proc.returncode != 0 and "MASTER_ADDR: export MASTER_ADDR=the address of node 0" in proc.stderr
    proc = run(command, MASTER_ADDR="10.0.0.1")
    assert proc.returncode != 0 and "NODE_RANK: export NODE_RANK=the rank of this node" in proc.stderr
    proc = run(command, NODE_RANK="0", MASTER_ADDR="10.0.0.1")
    assert proc.returncode == 0 and "--main_process_ip 10.0.0.1" in proc.stdout, proc.stderr


def test_help_shows_defaults_and_packing_parses_booleans(capsys):
    from rm.cli.plan import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8)" in help_text and "(default: 16384)" in help_text and "(default: True)" in help_text
    assert parse_args(["--model", "x", "--packing", "False"]).packing is False
    assert parse_args(["--model", "x", "--packing"]).packing is True
    with pytest.raises(SystemExit):
        parse_args(["--model", "x", "--packing", "maybe"])
