"""The (recipe) settings do what they say on the tiny model: learning rate per parameter, rsLoRA scale, dropout."""

import copy

import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForSequenceClassification

from rm.config import parse_config
from rm.encoding import PairCollator
from rm.loss import pairwise_loss, split_rewards
from rm.model import RewardModel, apply_lora, disable_dropout
from rm.runtime import build_optimizer


def _lora_model(tiny_model, cfg) -> RewardModel:
    return RewardModel(apply_lora(copy.deepcopy(tiny_model), cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                  cfg.target_modules, rslora=cfg.use_rslora))


def _step_changes(model: RewardModel, cfg) -> dict[str, float]:
    """One real AdamW step (zero weight decay): the largest change of each trainable parameter. Adam's first step
    moves every element with a non-zero gradient by ~its learning rate, so this reads the rate each one got."""
    optimizer = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    features = [{"chosen_input_ids": [5, 6, 7, 11], "rejected_input_ids": [5, 6, 7, 12, 13], "margin": 0.0},
                {"chosen_input_ids": [8, 9, 14], "rejected_input_ids": [8, 9, 15, 16], "margin": 0.0}]
    batch = PairCollator(pad_token_id=0)(features)
    chosen, rejected = split_rewards(model(batch["input_ids"], batch["attention_mask"]))
    pairwise_loss(chosen, rejected).backward()
    optimizer.step()
    return {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}


def _rate_of(changes: dict[str, float], part: str) -> float:
    return max(v for n, v in changes.items() if part in n)


def test_tuned_recipe_trains_head_and_lora_b_at_their_minimum_rates(tiny_model):
    cfg = parse_config(["--weight_decay", "0", "--min_score_learning_rate", "1e-3",
                        "--min_lora_b_learning_rate", "3e-4"])
    changes = _step_changes(_lora_model(tiny_model, cfg), cfg)
    assert abs(_rate_of(changes, "score.modules_to_save") - 1e-3) < 1e-5
    assert abs(_rate_of(changes, "lora_B") - 3e-4) < 1e-5
    assert _rate_of(changes, "lora_A") == 0.0  # B starts at zero: A gets no gradient on the first step


def test_original_recipe_trains_everything_at_the_learning_rate(tiny_model):
    cfg = parse_config(["--recipe", "original", "--weight_decay", "0", "--learning_rate", "1e-3"])
    changes = _step_changes(_lora_model(tiny_model, cfg), cfg)
    assert abs(_rate_of(changes, "score.modules_to_save") - 1e-3) < 1e-5
    assert abs(_rate_of(changes, "lora_B") - 1e-3) < 1e-5


def test_a_learning_rate_above_the_minimums_applies_to_every_part(tiny_model):
    cfg = parse_config(["--learning_rate", "5e-3", "--weight_decay", "0"])  # above both tuned minimums
    changes = _step_changes(_lora_model(tiny_model, cfg), cfg)
    assert abs(_rate_of(changes, "score.modules_to_save") - 5e-3) < 1e-5
    assert abs(_rate_of(changes, "lora_B") - 5e-3) < 1e-5


def test_full_fine_tuning_head_gets_its_minimum_rate_and_the_backbone_the_learning_rate(tiny_model):
    cfg = parse_config(["--use_peft", "false", "--weight_decay", "0", "--min_score_learning_rate", "1e-3"])
    changes = _step_changes(RewardModel(copy.deepcopy(tiny_model)), cfg)
    assert abs(_rate_of(changes, "score.weight") - 1e-3) < 1e-5
    assert abs(_rate_of(changes, "layers.1.mlp.down_proj") - cfg.learning_rate) < 1e-7


def test_optimizer_groups_keep_weight_decay_off_norms(tiny_model):
    cfg = parse_config(["--use_peft", "false"])
    model = RewardModel(copy.deepcopy(tiny_model))
    groups = build_optimizer(model, cfg).param_groups
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay_of[id(named["model.model.norm.weight"])] == 0.0
    assert decay_of[id(named["model.score.weight"])] == cfg.weight_decay
    assert sum(len(g["params"]) for g in groups) == len(named)  # every trainable parameter, once


def test_rslora_scales_adapters_by_alpha_over_sqrt_rank(tiny_model):
    for flag, scale in (("true", 16 / 8 ** 0.5), ("false", 16 / 8)):
        cfg = parse_config(["--use_rslora", flag])
        model = _lora_model(tiny_model, cfg)
        scales = {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}
        assert scales == {scale}


def test_lora_dropout_follows_the_recipe(tiny_model):
    for recipe, rate in (("tuned", 0.0), ("original", 0.05)):
        model = _lora_model(tiny_model, parse_config(["--recipe", recipe]))
        dropouts = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
        assert dropouts and {getattr(m, "p", 0.0) for m in dropouts} == {rate}  # PEFT puts Identity for 0


def test_disable_dropout_zeroes_dropout_layers_and_attention_dropout():
    config = AutoConfig.for_model("qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_dropout=0.1,
                                  num_labels=1)
    model = AutoModelForSequenceClassification.from_config(config)
    assert disable_dropout(model) == 2  # one attention_dropout per layer
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    assert model.config.attention_dropout == 0.1  # the saved config is the model's own
    gpt2 = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4, num_labels=1))
    assert disable_dropout(gpt2) > 0
    assert all(m.p == 0.0 for m in gpt2.modules() if isinstance(m, torch.nn.Dropout))
    assert disable_dropout(gpt2) == 0
