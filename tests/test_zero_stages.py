"""Real 2-process DeepSpeed runs (CPU, gloo, fp32) through the project's own yamls.

Same seed, data and settings: the per-step loss of the first 20 optimizer steps must agree between one process
without DeepSpeed (batch 2 x GA 2) and two processes x GA 1 under ZeRO-1, ZeRO-2 and ZeRO-3 (batch 2 each), for
full fine-tuning (the random `tiny` preset) and LoRA (from a causal-LM checkpoint, the path real models take: the
score head is created and initialised under each stage); each run asserts the stage and world size that actually
ran. The ZeRO-3 exports reload with AutoModelForSequenceClassification and give the trainer's rewards. Every run
saves its state once (step 15); the ZeRO-3 full fine-tuning run resumes from it and repeats the last 5 steps exactly.
"""

import pytest

from conftest import ROOT, assert_export_matches_trainer, run_train

STEPS = 20
COMMON = ["--config", "examples/quickstart.yaml", "--max_steps", STEPS, "--logging_steps", 1, "--eval_steps", 1000,
          "--max_eval_samples", 16, "--per_device_train_batch_size", 2, "--learning_rate", 2e-3]
RESUME_FROM_STEP = 15  # every run saves its state once, at this step; the ZeRO-3 run resumes from it
PORTS = iter(range(29640, 29660))


def losses(metrics: dict) -> list[float]:
    return [h["train/loss"] for h in metrics["history"] if "train/loss" in h]


@pytest.fixture(scope="module")
def modes(pretrained_causal_lm_dir):
    return {"full": ["--use_peft", "false"],
            "lora": ["--use_peft", "true", "--lora_dropout", 0.0, "--model_name_or_path", pretrained_causal_lm_dir]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, modes):
    """One process, no DeepSpeed, GA 2: the same 4 pairs per optimizer step as 2 processes x GA 1."""
    runs = {}
    for mode, flags in modes.items():
        _, metrics, info = run_train(tmp_path_factory.mktemp(f"ref-{mode}"), *COMMON, *flags,
                                     "--gradient_accumulation_steps", 2)
        assert info["distributed_type"] == "NO" and info["num_processes"] == 1
        runs[mode] = losses(metrics)
        assert len(runs[mode]) == STEPS
    return runs


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_single_process_loss(tmp_path, modes, reference, stage, mode):
    out = tmp_path / f"zero{stage}-{mode}"
    yaml = ROOT / f"accelerate_configs/zero{stage}_1node.yaml"
    args = [*COMMON, *modes[mode], "--gradient_accumulation_steps", 1, "--save_steps", RESUME_FROM_STEP]
    _, metrics, info = run_train(out, *args, processes=2, port=next(PORTS), accelerate_config=yaml)
    assert (info["distributed_type"], info["zero_stage"], info["num_processes"]) == ("DEEPSPEED", stage, 2)
    assert info["mixed_precision"] == "no" and info["gradient_accumulation_steps"] == 1
    got = losses(metrics)
    assert len(got) == STEPS
    for step, (a, b) in enumerate(zip(got, reference[mode]), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: ZeRO-{stage} {a} vs reference {b}"
    if stage == 3:
        assert_export_matches_trainer(out, metrics["final"])
    if (stage, mode) == (3, "full"):  # the sharded state saved at step 15 resumes to the same last 5 steps
        _, resumed, _ = run_train(out, *args, "--resume_from_checkpoint", "latest", processes=2, port=next(PORTS),
                                  accelerate_config=yaml)
        assert len(losses(resumed)) == STEPS and losses(resumed)[:RESUME_FROM_STEP] == got[:RESUME_FROM_STEP]
        for step, (a, b) in enumerate(zip(losses(resumed), got), start=1):
            assert abs(a - b) <= 1e-6, f"step {step}: resumed {a} vs uninterrupted {b}"
