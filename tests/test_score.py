"""rm.score against the trainer: two real tiny trainings (full fine-tuning, LoRA), scored after export."""

import json
import shutil

import pytest

from conftest import ROOT, run_train
from rm.cli.score import main as score_main

EVAL = ROOT / "data" / "sample" / "eval.jsonl"
QUICK = ["--config", "examples/quickstart.yaml", "--max_steps", "10", "--report_to", "none",
         "--per_device_eval_batch_size", "16"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("score_full") / "out"
    _, metrics, _ = run_train(out, *QUICK)
    return out, metrics["final"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer):
    """LoRA on a tiny checkpoint saved to disk, so the adapter names a base model that can be loaded again."""
    import torch

    from rm.model import TINY, load_backbone

    base = tmp_path_factory.mktemp("score_base")
    torch.manual_seed(0)
    load_backbone(TINY, tokenizer, torch.float32).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path_factory.mktemp("score_lora") / "out"
    _, metrics, _ = run_train(out, *QUICK, "--model_name_or_path", base, "--use_peft", "true")
    return out, metrics["final"]


def score(tmp_path, *args):
    output = tmp_path / f"scores{len(list(tmp_path.glob('*.jsonl')))}.jsonl"
    assert score_main([*map(str, args), "--output", str(output)]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    return records, json.loads(output.with_suffix(".summary.json").read_text())


def assert_matches_trainer_eval(summary, final):
    assert summary["pairs"] == final["eval/pairs"] == 100
    for key in ("accuracy", "loss", "margin", "reward_chosen", "reward_rejected", "reward_mean", "reward_std"):
        assert summary[key] == pytest.approx(final[f"eval/{key}"], abs=1e-5), key


def test_merged_model_scores_equal_trainer_eval_rewards(full_run, tmp_path, capsys):
    out, final = full_run
    records, summary = score(tmp_path, "--model", out, "--data", EVAL, "--batch_size", "7")
    assert_matches_trainer_eval(summary, final)
    assert len(records) == 100 and records[0]["source"].endswith("eval.jsonl:1")
    assert all(r["margin"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"]) for r in records)
    assert f"accuracy {final['eval/accuracy']:.4f}" in capsys.readouterr().out
    assert (out / "training_curves.png").stat().st_size > 0 and (out / "eval_reward_histogram.png").exists()
    # batching and padding do not change a reward
    one_by_one, _ = score(tmp_path, "--model", out / "model", "--data", EVAL, "--batch_size", "1")
    assert [r["chosen_reward"] for r in one_by_one] == pytest.approx([r["chosen_reward"] for r in records], abs=1e-5)


def test_normalize_uses_the_stored_eval_statistics(full_run, tmp_path):
    out, final = full_run
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["mean"] == pytest.approx(final["eval/reward_mean"])
    assert config["std"] == pytest.approx(final["eval/reward_std"])
    _, summary = score(tmp_path, "--model", out, "--data", EVAL, "--normalize")
    assert summary["normalized"] and summary["accuracy"] == final["eval/accuracy"]
    assert summary["reward_mean"] == pytest.approx(0.0, abs=1e-5)  # the stats came from this very eval set
    assert summary["reward_std"] == pytest.approx(1.0, abs=1e-5)


def test_adapter_and_merged_model_give_the_same_rewards(lora_run, tmp_path):
    out, final = lora_run
    merged, merged_summary = score(tmp_path, "--model", out, "--data", EVAL)
    adapter, adapter_summary = score(tmp_path, "--model", out, "--adapter", "--data", EVAL)
    assert_matches_trainer_eval(merged_summary, final)
    assert_matches_trainer_eval(adapter_summary, final)
    assert adapter_summary["model"].endswith("adapter")
    assert [r["chosen_reward"] for r in adapter] == pytest.approx([r["chosen_reward"] for r in merged], abs=1e-5)
    _, normalized = score(tmp_path, "--model", out / "adapter", "--data", EVAL, "--normalize")
    assert normalized["reward_std"] == pytest.approx(1.0, abs=1e-5)


def test_plain_texts_from_txt_and_jsonl(full_run, tmp_path):
    out, _ = full_run
    texts = ["The service was excellent and friendly.", "Terrible food, rude staff.", "ok", "A" * 300,
             "Great value, would come back."]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    from_txt, summary = score(tmp_path, "--model", out, "--data", tmp_path / "texts.txt", "--batch_size", "2")
    from_jsonl, _ = score(tmp_path, "--model", out, "--data", tmp_path / "texts.jsonl", "--batch_size", "5")
    assert summary["texts"] == 5 and from_txt[1]["source"].endswith("texts.txt:2")
    assert [r["reward"] for r in from_txt] == pytest.approx([r["reward"] for r in from_jsonl], abs=1e-5)
    assert len({round(r["reward"], 6) for r in from_txt}) == 5


def test_errors_name_the_problem(full_run, tmp_path, capsys):
    out, _ = full_run
    output = tmp_path / "taken.jsonl"
    output.write_text("keep me\n")
    assert score_main(["--model", str(out), "--data", str(EVAL), "--output", str(output)]) == 2
    assert "exists: pass --overwrite true" in capsys.readouterr().err and output.read_text() == "keep me\n"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(EVAL.read_text().splitlines()[0] + "\n" + '{"conversations": [], "chosen": "a", "rejected": "b"}\n')
    assert score_main(["--model", str(out), "--data", str(bad), "--output", str(tmp_path / "x.jsonl")]) == 2
    assert f"{bad}:2: field 'conversations'" in capsys.readouterr().err

    no_stats = tmp_path / "model"
    shutil.copytree(out / "model", no_stats)
    config = json.loads((no_stats / "config.json").read_text())
    del config["mean"], config["std"]
    (no_stats / "config.json").write_text(json.dumps(config))
    assert score_main(["--model", str(no_stats), "--data", str(EVAL), "--normalize",
                       "--output", str(tmp_path / "y.jsonl")]) == 2
    assert "no reward 'mean' / 'std' stored" in capsys.readouterr().err
    assert score_main(["--model", str(tmp_path / "nothing"), "--data", str(EVAL)]) == 2
