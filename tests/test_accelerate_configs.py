"""Rules every accelerate yaml must keep, so that a new yaml cannot break them silently."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

CONFIG_DIR = ROOT / "accelerate_configs"
YAMLS = sorted(CONFIG_DIR.glob("*.yaml"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def deepspeed_json(config: dict) -> dict | None:
    ds_file = config.get("deepspeed_config", {}).get("deepspeed_config_file")
    return json.loads((ROOT / ds_file).read_text()) if ds_file else None


def test_every_stage_and_topology_exists():
    names = {p.name for p in YAMLS}
    for stage in (1, 2, 3):
        for topology in ("1node", "2node"):
            assert f"zero{stage}_{topology}.yaml" in names
    assert {"debug_1gpu.yaml", "cpu.yaml", "zero2_offload.yaml", "zero3_offload.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_rules(path):
    config = load(path)
    ds = config.get("deepspeed_config", {})
    ds_json = deepspeed_json(config)
    # mixed_precision must be a string: a bare `no` is read as a boolean and crashes accelerate
    if "mixed_precision" in config:
        assert config["mixed_precision"] in ("no", "bf16", "fp16"), config["mixed_precision"]
    # the code owns gradient accumulation: a yaml value would silently override it
    assert "gradient_accumulation_steps" not in ds
    if ds_json is not None:
        assert ds_json.get("gradient_accumulation_steps", "auto") == "auto"
        assert "mixed_precision" not in config, "deepspeed_config_file together with mixed_precision raises"
        # so the json names the precision itself: "auto" would be filled from the launcher's default, fp32
        assert ds_json["bf16"]["enabled"] is True
    assert config["num_processes"] % config["num_machines"] == 0
    if config["distributed_type"] != "DEEPSPEED":
        return
    stage = ds_json["zero_optimization"]["stage"] if ds_json else ds["zero_stage"]
    assert stage in (1, 2, 3)
    assert path.name.startswith(f"zero{stage}")
    if stage == 3:
        gathers = (ds_json["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] if ds_json
                   else ds["zero3_save_16bit_model"])
        assert gathers is True, "ZeRO-3 must gather 16-bit weights on save, or the export cannot be written"
        assert ds.get("zero3_init_flag") is True, "ZeRO-3 must partition the model as it loads"
    if config["num_machines"] > 1:
        assert ds["deepspeed_multinode_launcher"] == "standard", "each node runs torchrun"


def test_offload_variants_offload():
    assert load(CONFIG_DIR / "zero2_offload.yaml")["deepspeed_config"]["offload_optimizer_device"] == "cpu"
    zero = deepspeed_json(load(CONFIG_DIR / "zero3_offload.yaml"))["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] and zero["stage3_prefetch_bucket_size"]
