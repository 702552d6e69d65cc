"""Real training runs through train.py: the quickstart, export round trips, the LR schedule on 1 and 2 processes."""

import json
import math
import re

import pytest
import torch

from conftest import ROOT, assert_export_matches_trainer, run_train
from rm.model import load_tokenizer

QUICK = ["--config", "examples/quickstart.yaml"]


@pytest.mark.floor  # full fine-tuning, checkpointing off, export
def test_quickstart_learns_and_exports(tmp_path):
    out = tmp_path / "quick"
    proc, metrics, info = run_train(out, *QUICK)
    final = metrics["final"]
    assert final["eval/accuracy"] > 0.9 and final["eval/pairs"] == 100
    assert "eval/accuracy_ci95_low" not in final  # 100 pairs and more: the accuracy alone
    assert info["num_processes"] == 1 and info["total_steps"] == 75
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "training_config.json",
                 "metrics.json"):
        assert (out / name).exists(), name
    assert any((out / "runs").rglob("events.out.tfevents*")), "no tensorboard log"
    assert "tokens_per_s=" in proc.stdout and "peak_memory_gb=" in proc.stdout
    # where launch time goes: the log says when setup ended and when the first optimizer step was done
    setup = re.search(r"setup: ([\d.]+) s after launch \(data read and tokenized at ([\d.]+) s, model built at "
                      r"([\d.]+) s\)", proc.stdout)
    first = re.search(r"first optimizer step done ([\d.]+) s after launch", proc.stdout)
    assert setup and first, proc.stdout[-3000:]
    data_ready, model_ready, setup_done = float(setup[2]), float(setup[3]), float(setup[1])
    assert 0 < data_ready <= model_ready <= setup_done <= float(first[1])
    assert info["learning_rates"] == {"score_head": 4e-3, "rest": 1e-3}  # the tuned recipe's minimum for the head
    assert_export_matches_trainer(out, final)


@pytest.mark.floor
def test_lora_with_checkpointing_exports_adapter_and_merged_model(tmp_path):
    out = tmp_path / "lora"
    _, metrics, info = run_train(out, *QUICK, "--use_peft", "true", "--gradient_checkpointing", "true",
                                 "--max_steps", "8", "--learning_rate", "5e-3")
    assert (out / "adapter/adapter_config.json").exists() and (out / "adapter/adapter_model.safetensors").exists()
    assert info["trainable_parameters"] < 100_000
    assert info["learning_rates"] == {"score_head": 5e-3, "lora_B": 5e-3, "rest": 5e-3}  # above the minimums
    adapter = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter["use_rslora"] is True and adapter["lora_dropout"] == 0.0  # the default recipe reached PEFT
    assert_export_matches_trainer(out, metrics["final"])


def test_the_default_data_is_found_from_any_directory(tmp_path):
    """Started from another directory (the launcher no longer changes into the repository), the default train data
    is the embedded sample: read, fingerprinted for resume and evaluated on its eval file."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model_name_or_path", "tiny", "--use_peft",
                           "false", "--max_steps", "1", "--save_steps", "1", "--report_to", "none",
                           "--output_dir", "out", "--max_train_samples", "16", "--max_eval_samples", "4"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_data = json.loads((tmp_path / "out/checkpoint-1/train_data.json").read_text())
    assert list(train_data["files"]) == ["train.jsonl"] and (tmp_path / "out/model").is_dir()
    # 4 eval pairs: the accuracy comes with its 95% interval, in the log and in metrics.json
    final = json.loads((tmp_path / "out/metrics.json").read_text())["final"]
    low, high = final["eval/accuracy_ci95_low"], final["eval/accuracy_ci95_high"]
    assert final["eval/pairs"] == 4 and 0 <= low <= final["eval/accuracy"] <= high <= 1 and high - low > 0.4
    assert f"on 4 pairs: 95% interval {low:.2f}-{high:.2f} (Wilson)" in proc.stdout, proc.stdout[-3000:]


def test_existing_output_dir_is_refused(tmp_path):
    import subprocess
    import sys

    (tmp_path / "keep.txt").write_text("earlier work")
    proc = subprocess.run([sys.executable, "train.py", *QUICK, "--output_dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "--overwrite_output_dir" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "earlier work"


def expected_lr(schedule: str, step: int, total: int, warmup: int, peak: float) -> float:
    """transformers' linear and cosine (half a cycle) schedules with linear warmup, after `step` optimizer steps."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    return peak * (max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("schedule, packing, processes", [("linear", "true", 2), ("linear", "false", 1),
                                                          ("cosine", "true", 1), ("cosine", "false", 1)])
def test_lr_schedule_steps_once_per_optimizer_step(tmp_path, schedule, packing, processes):
    """6 optimizer steps of GA 2, warmup 3: the LR logged after every step is the schedule's formula, on the packed
    path (placeholders skip part of the loop body) and the plain one, and on 2 processes (a real gloo run)."""
    _, metrics, info = run_train(tmp_path / "lr", *QUICK, "--max_steps", 6, "--warmup_ratio", 0.5,
                                 "--lr_scheduler_type", schedule, "--packing", packing, "--logging_steps", 1,
                                 "--eval_steps", 100, "--learning_rate", 1e-3, "--max_train_samples", 48,
                                 "--max_eval_samples", 8, processes=processes, port=29531)
    assert info["num_processes"] == processes and info["gradient_accumulation_steps"] == 2
    assert info["distributed_type"] == ("MULTI_CPU" if processes == 2 else "NO")
    lrs = [h["train/lr"] for h in metrics["history"] if "train/lr" in h]
    assert len(lrs) == 6
    for step, lr in enumerate(lrs, start=1):
        assert math.isclose(lr, expected_lr(schedule, step, 6, 3, 1e-3), abs_tol=1e-12), (step, lr)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_lr_schedule_is_transformers_own(schedule):
    """rm.runtime.lr_factor replaces transformers' get_scheduler (whose import pulls in peft): the same factor at
    every step, including warmup-only and one-step runs."""
    from transformers import get_scheduler

    from rm.runtime import lr_factor

    for total, warmup in ((1, 1), (1, 0), (7, 0), (7, 1), (40, 2), (40, 40), (125, 7)):
        reference = get_scheduler(schedule, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                  num_warmup_steps=warmup, num_training_steps=total)
        for step in range(total + 2):
            assert lr_factor(schedule, step, warmup, total) == pytest.approx(reference.lr_lambdas[0](step), abs=1e-12)


def test_a_schedule_state_saved_by_transformers_scheduler_resumes():
    """Checkpoints written before rm.runtime had its own schedule hold get_scheduler's state ({} per lambda)."""
    import json

    from transformers import get_scheduler

    from rm.config import TrainConfig
    from rm.runtime import build_scheduler

    def optimizer():
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)

    old_optimizer = optimizer()
    old = get_scheduler("linear", old_optimizer, num_warmup_steps=1, num_training_steps=10)
    for _ in range(4):
        old_optimizer.step()
        old.step()
    cfg = TrainConfig(output_dir="unused", lr_scheduler_type="linear", warmup_ratio=0.1)
    new_optimizer = optimizer()
    new = build_scheduler(new_optimizer, cfg, 10)
    new.load_state_dict(json.loads(json.dumps(old.state_dict())))  # SCHEDULER_STATE is JSON
    for _ in range(3):
        assert new.get_last_lr() == pytest.approx(old.get_last_lr())
        for stepped in (old_optimizer, new_optimizer, old, new):
            stepped.step()


def test_full_fine_tuning_does_not_import_peft():
    """peft costs ~2 s of imports on a CPU box; only LoRA runs need it."""
    import subprocess
    import sys

    probe = "import sys, train; print(sorted(m for m in sys.modules if m == 'peft' or m.startswith('peft.')))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout[-500:], proc.stderr[-2000:])


def test_from_a_causal_lm_checkpoint_the_new_head_is_initialised(tmp_path, pretrained_causal_lm_dir):
    from rm.model import load_backbone

    tokenizer = load_tokenizer(str(pretrained_causal_lm_dir))
    model = load_backbone(str(pretrained_causal_lm_dir), tokenizer, torch.float32)
    assert torch.isfinite(model.score.weight).all() and model.score.weight.std() > 0.01
    out = tmp_path / "from_path"
    _, metrics, _ = run_train(out, *QUICK, "--model_name_or_path", pretrained_causal_lm_dir, "--max_steps", 20)
    assert metrics["final"]["eval/accuracy"] > 0.7
    assert_export_matches_trainer(out, metrics["final"])
