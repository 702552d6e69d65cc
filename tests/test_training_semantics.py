"""What a training step does, checked through train.py's command line on one CPU process (fp32, deterministic):
which parameters LoRA trains, weight decay groups, gradient clipping, the data's margin and the centring term
reaching the loss, and train mode coming back after a mid-run evaluation.

The runs start from a tiny sequence-classification checkpoint on disk (score head included), so every parameter's
initial value is known to the test."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_train

STEPS = 3
# 24 pairs, 4 per micro-batch, GA 2: 3 optimizer steps of 8 pairs, one epoch; no evaluation unless asked for
BASE = ["--train_file_dir", "data/sample/train.jsonl", "--validation_file_dir", "data/sample/eval.jsonl",
        "--max_train_samples", 24, "--max_eval_samples", 8, "--per_device_train_batch_size", 4,
        "--gradient_accumulation_steps", 2, "--max_steps", STEPS, "--logging_steps", 1, "--eval_steps", 1000,
        "--save_steps", 1000, "--warmup_ratio", 0, "--learning_rate", 1e-3, "--report_to", "none"]
FULL = ["--use_peft", "false", "--gradient_checkpointing", "false"]


def save_seq_cls_model(path, tokenizer, **config_changes):
    """A tiny Qwen3 sequence-classification checkpoint with its score head, as --model_name_or_path."""
    from transformers import AutoModelForSequenceClassification

    from rm.model import tiny_config

    config = tiny_config(tokenizer)
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def seq_cls_dir(tmp_path_factory, tokenizer):
    return save_seq_cls_model(tmp_path_factory.mktemp("qwen3-tiny-seq-cls"), tokenizer)


def initial_weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def exported_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "model" / "model.safetensors"))


def train_losses(metrics: dict) -> list[float]:
    return [h["train/loss"] for h in metrics["history"] if "train/loss" in h]


# ---- LoRA trains the score head and every adapter weight, and nothing else
LORA = ["--use_peft", "true", "--lora_dropout", 0.1, "--gradient_checkpointing", "false", "--learning_rate", 5e-3,
        "--save_steps", 1, "--save_total_limit", 0]


def test_lora_trains_the_score_head_and_every_adapter_weight_and_nothing_else(tmp_path, seq_cls_dir):
    out = tmp_path / "lora"
    _, _, info = run_train(out, *BASE, *LORA, "--model_name_or_path", seq_cls_dir)
    initial = initial_weights(seq_cls_dir)
    exported = exported_weights(out)
    head_change = (exported["score.weight"] - initial["score.weight"]).norm() / initial["score.weight"].norm()
    assert head_change > 1e-2, f"the exported score head is (nearly) the initial one: relative change {head_change}"

    first, last = (load_file(str(out / f"checkpoint-{s}" / "model.safetensors")) for s in (1, STEPS))
    trainable = [k for k in first if "lora_" in k or "modules_to_save" in k]
    frozen = [k for k in first if k not in trainable]
    assert any("lora_A" in k for k in trainable) and any("modules_to_save" in k and "score" in k for k in trainable)
    assert sum(first[k].numel() for k in trainable) == info["trainable_parameters"]
    unchanged = [k for k in trainable if torch.equal(first[k], last[k])]
    assert not unchanged, f"trainable parameters that did not change between steps 1 and {STEPS}: {unchanged[:5]}"
    moved = [k for k in frozen if not torch.equal(first[k], last[k])]
    assert not moved, f"frozen parameters that changed: {moved[:5]}"
    base = {k.removeprefix("model.base_model.model.").replace(".base_layer", ""): first[k] for k in frozen}
    for name, value in initial.items():  # the frozen copy is the checkpoint's weights, untouched by step 1 too
        key = name.replace("score.weight", "score.original_module.weight")
        torch.testing.assert_close(base[key], value, rtol=0, atol=0, msg=name)


def test_train_mode_comes_back_after_a_mid_run_evaluation(tmp_path, tokenizer):
    """Attention dropout 1.0 zeroes every attention output in train mode (whatever the random state): each token
    then sees only itself, the chosen and rejected rewards are read at the same end-of-turn token, and the train
    loss is exactly log 2 at every step. The evaluations after every step run in eval mode, attention on (rewards
    differ); a model left in eval mode after them would train with attention on and leave log 2."""
    model = save_seq_cls_model(tmp_path / "dropout-model", tokenizer, attention_dropout=1.0)
    _, metrics, _ = run_train(tmp_path / "out", *BASE, *FULL, "--model_name_or_path", model, "--eval_steps", 1,
                              "--disable_dropout", "false")
    evaluations = [h for h in metrics["history"] if "eval/margin" in h]
    assert len(evaluations) == STEPS - 1 and all(abs(h["eval/margin"]) > 1e-4 for h in evaluations)
    losses = train_losses(metrics)
    assert len(losses) == STEPS
    for step, loss in enumerate(losses, start=1):
        assert abs(loss - math.log(2)) < 1e-6, f"step {step}: loss {loss}, not log 2: dropout was off"


def test_the_default_recipe_trains_with_the_models_dropout_off(tmp_path, tokenizer):
    """The same attention-dropout-1.0 model under the default recipe (disable_dropout): attention stays on in
    training, so the loss leaves log 2 from the first step; the exported config keeps the model's own dropout."""
    model = save_seq_cls_model(tmp_path / "dropout-model", tokenizer, attention_dropout=1.0)
    proc, metrics, _ = run_train(tmp_path / "out", *BASE, *FULL, "--model_name_or_path", model)
    assert all(abs(loss - math.log(2)) > 1e-4 for loss in train_losses(metrics))
    assert "dropout: off (2 dropout layers and settings set to 0" in proc.stdout
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())["attention_dropout"] == 1.0


# ---- full fine-tuning: weight decay groups and gradient clipping, read off the exported weights
def test_weight_decay_spares_norm_weights_and_decays_matrices(tmp_path, seq_cls_dir):
    """AdamW decay lr x wd = 0.05 per step shrinks a decayed weight by 0.95^3; Adam alone moves a weight by at most
    about lr (1e-4) per step, so a norm weight that was decayed would end ~0.14 below its initial 1.0."""
    out = tmp_path / "decay"
    run_train(out, *BASE, *FULL, "--model_name_or_path", seq_cls_dir, "--learning_rate", 1e-4, "--weight_decay", 500)
    initial, final = initial_weights(seq_cls_dir), exported_weights(out)
    vectors = [k for k, v in initial.items() if v.ndim == 1]
    assert vectors and all("norm" in k for k in vectors)
    for name in vectors:
        drift = (final[name] - initial[name]).abs().max().item()
        assert drift < 1e-3, f"{name} moved by {drift}: weight decay reached a norm weight"
    for name in (k for k, v in initial.items() if v.ndim == 2):
        ratio = (final[name].norm() / initial[name].norm()).item()
        assert ratio < 0.95, f"{name}: norm ratio {ratio}, weight decay not applied"


def test_max_grad_norm_clips_without_deepspeed(tmp_path, seq_cls_dir):
    """Gradients clipped to a total norm of 1e-12 are far below Adam's eps (1e-8): no weight can move by more than
    lr x 1e-4 per step. Unclipped, the same steps move weights by ~lr."""
    out = tmp_path / "clipped"
    _, metrics, _ = run_train(out, *BASE, *FULL, "--model_name_or_path", seq_cls_dir, "--weight_decay", 0,
                              "--max_grad_norm", 1e-12)
    assert min(h["train/grad_norm"] for h in metrics["history"] if "train/grad_norm" in h) > 1e-3  # before clipping
    initial, final = initial_weights(seq_cls_dir), exported_weights(out)
    moved = max((final[k] - v).abs().max().item() for k, v in initial.items())
    assert moved < 1e-6, f"a weight moved by {moved}: max_grad_norm was not applied"


# ---- the data's margin and --center_rewards_coefficient reach train.py's loss
def write_pairs(path, margin: float | None):
    rows = [json.loads(line) for line in (ROOT / "data/sample/train.jsonl").read_text().splitlines()[:16]]
    path.write_text("".join(json.dumps({**r, **({"margin": margin} if margin is not None else {})}) + "\n"
                            for r in rows))
    return path


def first_step_loss(output_dir, train_file, *extra) -> float:
    _, metrics, _ = run_train(output_dir, *BASE, *FULL, "--model_name_or_path", "tiny", "--train_file_dir", train_file,
                              "--max_steps", 1, *extra)
    return train_losses(metrics)[0]


@pytest.fixture(scope="module")
def plain_first_step_loss(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("no-margin")
    return first_step_loss(tmp / "out", write_pairs(tmp / "train.jsonl", None))


def test_margin_from_the_data_enters_the_loss(tmp_path, plain_first_step_loss):
    """Same model, same pairs at step 1: a margin of 2 turns -log sigmoid(d) into -log sigmoid(d - 2). The tiny
    model's reward differences d are ~0.1, so the loss rises from ~log 2 by about softplus(2) - log 2 = 1.43."""
    with_margin = first_step_loss(tmp_path / "out", write_pairs(tmp_path / "train.jsonl", 2.0))
    assert math.isclose(plain_first_step_loss, math.log(2), abs_tol=0.1)
    assert with_margin - plain_first_step_loss > 1.2, (with_margin, plain_first_step_loss)


def test_center_rewards_coefficient_enters_the_loss(tmp_path, plain_first_step_loss):
    """coef x mean((r_chosen + r_rejected)^2) is added: with coef 1000 the step-1 loss must rise."""
    centred = first_step_loss(tmp_path / "out", write_pairs(tmp_path / "train.jsonl", None),
                              "--center_rewards_coefficient", 1000)
    assert centred - plain_first_step_loss > 1e-3, (centred, plain_first_step_loss)
