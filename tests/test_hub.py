"""Hub names for real, without network: a Hugging Face cache folder (HF_HOME) built here holds the tiny random model
and tokenizer under the default name Qwen/Qwen3-0.6B and a small data set under a dotted name, in the hub cache's
own layout (models--Qwen--Qwen3-0.6B/refs/main, snapshots/<commit>/...). train.py, rm.score and the data reader
load them by name; a name that is not cached is one line at once, offline or with the hub unreachable."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, train_command

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL = "Qwen/Qwen3-0.6B"  # TrainConfig's default
DATA_SET = "owner/prefs.v2"
EVAL = ROOT / "data" / "sample" / "eval.jsonl"
pytestmark = pytest.mark.floor  # huggingface_hub differs too: 1.x beside transformers 5.17, 2.x beside 5.24
UNREACHABLE = "http://127.0.0.1:9"  # a closed local port: the hub cannot be reached, and nothing leaves the machine


def snapshot_folder(hub, kind, name):
    """The folder a hub snapshot's files go in, with refs/main pointing at it."""
    repo = hub / f"{kind}s--{name.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    folder = repo / "snapshots" / COMMIT
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from rm.model import tiny_config

    home = tmp_path_factory.mktemp("hf_home")
    model = snapshot_folder(home / "hub", "model", MODEL)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(tokenizer)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    data = snapshot_folder(home / "hub", "dataset", DATA_SET) / "data"
    data.mkdir()
    lines = (ROOT / "data" / "sample" / "train.jsonl").read_text().splitlines()[:80]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    return home


def hub_env(hf_home, offline: bool = True) -> dict:
    """HF_HOME set; offline: HF_HUB_OFFLINE=1, else no offline flag and a hub that cannot be reached."""
    env = {**os.environ, "HF_HOME": str(hf_home)}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_DATASETS_OFFLINE", None)
    env.update({"HF_HUB_OFFLINE": "1"} if offline else {"HF_ENDPOINT": UNREACHABLE})
    return env


def run(cmd, env, expect: int = 0):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def train(hf_home, output_dir, *args, offline: bool = True):
    cmd, _ = train_command(output_dir, "--max_steps", "2", "--report_to", "none", *args)
    return run(cmd, {**hub_env(hf_home, offline), "TORCH_EXTENSIONS_DIR": "/tmp/torch_ext"})


def rm_score(hf_home, *args, expect: int = 0):
    return run([sys.executable, "-m", "rm.score", *map(str, args)], hub_env(hf_home), expect)


@pytest.fixture(scope="module")
def default_run(hf_home, tmp_path_factory):
    """`python train.py` with no model flag (the default: LoRA on Qwen/Qwen3-0.6B), offline from the cache."""
    out = tmp_path_factory.mktemp("hub_default") / "out"
    proc = train(hf_home, out)
    return out, proc.stdout + proc.stderr


def test_the_default_model_name_trains_from_the_hub_cache_and_exports(default_run):
    from transformers import AutoModelForSequenceClassification

    out, log = default_run
    assert f"model: {MODEL}," in log and "LoRA" in log
    assert json.loads((out / "training_config.json").read_text())["model_name_or_path"] == MODEL
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == MODEL
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")  # the export stands alone
    assert model.config.num_labels == 1 and model.config.hidden_size == 64


def test_rm_score_loads_an_adapter_on_a_hub_base_model(default_run, hf_home, tmp_path):
    out, _ = default_run
    rewards = {}
    for name, args in (("merged", []), ("adapter", ["--adapter", "--base_model", MODEL]),
                       ("adapter_config", ["--adapter"])):  # the base named in adapter_config.json
        output = tmp_path / f"{name}.jsonl"
        rm_score(hf_home, "--model", out, *args, "--data", EVAL, "--output", output)
        rewards[name] = [json.loads(line)["chosen_reward"] for line in output.read_text().splitlines()]
    assert len(rewards["merged"]) == 100
    assert rewards["adapter"] == pytest.approx(rewards["merged"], abs=1e-4)
    assert rewards["adapter_config"] == pytest.approx(rewards["merged"], abs=1e-4)


@pytest.mark.parametrize("token_cache", [[], ["--cache_dir", "none"]], ids=["token-cache", "no-token-cache"])
def test_a_dotted_hub_data_set_trains_with_the_hub_unreachable(hf_home, tmp_path, token_cache):
    """No HF_HUB_OFFLINE and no network: the cached model and data set are used, after one short probe, with the
    token cache keyed by the data set's snapshot, and with it off (--cache_dir none: the hub cache stays HF_HOME's)."""
    out = tmp_path / "out"
    proc = train(hf_home, out, "--train_file_dir", DATA_SET, "--use_peft", "false", *token_cache, offline=False)
    log = proc.stdout + proc.stderr
    assert f"the hub ({UNREACHABLE}) cannot be reached" in log and "from the hub cache (offline)" in log
    assert f"{DATA_SET}[train]: 80 pairs" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["eval/pairs"] == 4  # the held-out split of the hub data (5% of 80)
    assert (out / "model" / "config.json").is_file()


def test_the_data_reader_reads_a_cached_hub_data_set_offline(hf_home):
    from rm.data import read_pairs

    pairs = read_pairs(DATA_SET, cache_dir=str(hf_home / "hub"), log=lambda m: None)
    assert len(pairs) == 80 and pairs[0].source == f"{DATA_SET}[train]:row 1"


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
@pytest.mark.parametrize("what", ["model", "data_set", "base_model"])
def test_a_name_that_is_not_cached_is_one_line_at_once(hf_home, tmp_path, offline, what):
    """No ~50 s of retries (measured before the fix: 52 s for the tokenizer alone) and no traceback."""
    env = hub_env(hf_home, offline)
    start = time.monotonic()
    if what == "base_model":
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "owner/missing-1.5B"}))
        cmd = [sys.executable, "-m", "rm.score", "--model", adapter, "--data", EVAL, "--output", tmp_path / "s.jsonl"]
    else:
        flag = ["--model_name_or_path", "owner/missing-1.5B"] if what == "model" else \
            ["--train_file_dir", "owner/missing.v1"]
        cmd, _ = train_command(tmp_path / "out", *flag)
    proc = run(cmd, env, expect=2)
    elapsed = time.monotonic() - start
    reason = "HF_HUB_OFFLINE is set" if offline else f"the hub ({UNREACHABLE}) cannot be reached"
    assert proc.stderr.count("\n") == 1 and "missing" in proc.stderr and reason in proc.stderr, proc.stderr
    assert "not in the hub cache" in proc.stderr and "hf download owner/missing" in proc.stderr
    assert elapsed < 15, elapsed
    assert not (tmp_path / "out").exists()
