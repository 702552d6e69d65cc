"""Real 2-process runs (CPU, gloo, fp32) through the project's own yamls, against one process without DeepSpeed.

Same seed, data and settings: the per-step loss of 8 optimizer steps, and the evaluation after step 4 and at the
end, must agree between one process without DeepSpeed (batch 2 x GA 2) and two processes under ZeRO-1, ZeRO-2 and
ZeRO-3 (batch 2 x GA 1 each), ZeRO-2 with gradient accumulation (batch 1 x GA 2 each) and plain DDP (MULTI_CPU,
no DeepSpeed), for full fine-tuning (the random `tiny` preset) and, under ZeRO, LoRA (from a causal-LM checkpoint,
the path real models take: the score head is created and initialised under each stage). The evaluation set has an
odd size (7 pairs): two processes get uneven shares and must still count every pair once. Each run asserts the
stage, world size and accumulation that actually ran. The ZeRO-3 exports reload with
AutoModelForSequenceClassification and give the trainer's rewards. Every run saves its state once (step 5); the
ZeRO-3 full fine-tuning run resumes from it and recomputes the last 3 steps exactly.
"""

import math

import pytest

from conftest import ROOT, assert_export_matches_trainer, run_train

STEPS = 8
EVAL_PAIRS = 7
COMMON = ["--config", "examples/quickstart.yaml", "--max_steps", STEPS, "--logging_steps", 1, "--eval_steps", 4,
          "--max_eval_samples", EVAL_PAIRS, "--per_device_eval_batch_size", 2, "--max_train_samples", 96,
          "--learning_rate", 2e-3]
RESUME_FROM_STEP = 5  # every run saves its state once, at this step; the ZeRO-3 run resumes from it
PORTS = iter(range(29640, 29660))
EVAL_KEYS = ("pairs", "accuracy", "loss", "margin", "reward_chosen", "reward_rejected", "reward_std")
# name: (accelerate yaml or None for plain DDP, ZeRO stage that must run, batch per process, GA)
LAUNCHES = {"zero1": ("zero1_1node.yaml", 1, 2, 1), "zero2": ("zero2_1node.yaml", 2, 2, 1),
            "zero3": ("zero3_1node.yaml", 3, 2, 1), "zero2-ga2": ("zero2_1node.yaml", 2, 1, 2),
            "ddp": (None, 0, 2, 1)}


def losses(metrics: dict) -> list[float]:
    return [h["train/loss"] for h in metrics["history"] if "train/loss" in h]


def evaluations(metrics: dict) -> list[dict]:
    """The mid-run evaluation(s) and the final one."""
    return [h for h in metrics["history"] if "eval/pairs" in h] + [metrics["final"]]


@pytest.fixture(scope="module")
def modes(pretrained_causal_lm_dir):
    return {"full": ["--use_peft", "false"],
            "lora": ["--use_peft", "true", "--lora_dropout", 0.0, "--model_name_or_path", pretrained_causal_lm_dir]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, modes):
    """One process, no DeepSpeed, batch 2 x GA 2: the same 4 pairs per optimizer step as every 2-process run."""
    runs = {}
    for mode, flags in modes.items():
        _, metrics, info = run_train(tmp_path_factory.mktemp(f"ref-{mode}"), *COMMON, *flags,
                                     "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2)
        assert info["distributed_type"] == "NO" and info["num_processes"] == 1
        assert len(losses(metrics)) == STEPS and [e["eval/pairs"] for e in evaluations(metrics)] == [EVAL_PAIRS] * 2
        runs[mode] = metrics
    return runs


# modules DeepSpeed hooks under ZeRO-3 (tiny, 2 layers): with leaf layers, all but the layers' insides; without, a
# full fine-tuning layer adds ~15 and a LoRA layer ~80 (each LoRA linear is 6 modules)
HOOKED_AT_MOST = {"full": 11, "lora": 16}
FLOOR = {("zero1", "full"), ("zero2", "full"), ("zero3", "full"), ("zero3", "lora")}  # .ci/run's floor stack too


@pytest.mark.parametrize("launch, mode", [
    pytest.param(launch, mode, marks=[pytest.mark.floor] if (launch, mode) in FLOOR else [])
    for launch, mode in [(launch, "full") for launch in LAUNCHES] + [(launch, "lora") for launch in ("zero1", "zero2",
                                                                                                     "zero3")]])
def test_two_processes_match_one_process(tmp_path, modes, reference, launch, mode):
    yaml, stage, batch, accumulation = LAUNCHES[launch]
    out = tmp_path / f"{launch}-{mode}"
    args = [*COMMON, *modes[mode], "--per_device_train_batch_size", batch, "--gradient_accumulation_steps",
            accumulation, "--save_steps", RESUME_FROM_STEP]
    launcher = {"processes": 2, "port": next(PORTS), "accelerate_config": ROOT / "accelerate_configs" / yaml if yaml
                else None}
    _, metrics, info = run_train(out, *args, **launcher)
    assert (info["distributed_type"], info["zero_stage"], info["num_processes"]) == (
        "DEEPSPEED" if yaml else "MULTI_CPU", stage, 2)
    assert info["mixed_precision"] == "no" and info["gradient_accumulation_steps"] == accumulation
    got, want = losses(metrics), losses(reference[mode])
    assert len(got) == STEPS
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {launch} {a} vs one process {b}"
    for got_eval, want_eval in zip(evaluations(metrics), evaluations(reference[mode]), strict=True):
        for key in EVAL_KEYS:
            a, b = got_eval[f"eval/{key}"], want_eval[f"eval/{key}"]
            assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4), f"eval/{key} at step {got_eval['step']}: {a} vs {b}"
    if stage == 3:  # each decoder layer one DeepSpeed leaf (rm.model.set_zero3_leaf_layers), not every submodule
        assert info["zero3_hooks"]["leaf_modules"] == {"Qwen3DecoderLayer": 2}, info["zero3_hooks"]
        assert info["zero3_hooks"]["hooked_modules"] <= HOOKED_AT_MOST[mode], info["zero3_hooks"]
        assert_export_matches_trainer(out, metrics["final"])
    if (launch, mode) == ("zero3", "full"):  # the sharded state saved at step 5 recomputes the last 3 steps
        _, resumed, _ = run_train(out, *args, "--resume_from_checkpoint", "latest", **{**launcher, "port": next(PORTS)})
        recomputed = [h for h in resumed["history"] if "train/loss" in h and h["step"] > RESUME_FROM_STEP]
        assert [h["step"] for h in recomputed] == list(range(RESUME_FROM_STEP + 1, STEPS + 1))
        for entry in recomputed:
            a, b = entry["train/loss"], got[entry["step"] - 1]
            assert abs(a - b) <= 1e-6, f"step {entry['step']}: resumed {a} vs uninterrupted {b}"
