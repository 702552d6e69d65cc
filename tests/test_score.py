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
    proc, metrics, _ = run_train(out, *QUICK)
    return out, metrics["final"], proc.stdout + proc.stderr


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
    proc, metrics, _ = run_train(out, *QUICK, "--model_name_or_path", base, "--use_peft", "true")
    return out, metrics["final"], proc.stdout + proc.stderr


def score(tmp_path, *args):
    output = tmp_path / f"scores{len(list(tmp_path.glob('*.jsonl')))}.jsonl"
    assert score_main([*map(str, args), "--output", str(output)]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    return records, json.loads(output.with_suffix(".summary.json").read_text())


def assert_matches_trainer_eval(summary, final):
    assert summary["pairs"] == final["eval/pairs"] == 100
    for key in ("accuracy", "loss", "margin", "reward_chosen", "reward_rejected", "reward_mean", "reward_std"):
        assert summary[key] == pytest.approx(final[f"eval/{key}"], abs=1e-5), key


def test_runs_log_no_warnings_and_no_progress_bars_when_captured(full_run, lora_run):
    """Full fine-tuning and LoRA, output captured (not a terminal): DeepSpeed's accelerator warning (on stdout),
    deprecation warnings from transformers / peft calls and progress-bar redraws all stay out."""
    for _, _, log in (full_run, lora_run):
        assert "warning" not in log.lower() and "\r" not in log and "it/s" not in log, log[-2000:]


@pytest.mark.floor
def test_merged_model_scores_equal_trainer_eval_rewards(full_run, tmp_path, capsys):
    out, final, _ = full_run
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
    out, final, _ = full_run
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["mean"] == pytest.approx(final["eval/reward_mean"])
    assert config["std"] == pytest.approx(final["eval/reward_std"])
    _, summary = score(tmp_path, "--model", out, "--data", EVAL, "--normalize")
    assert summary["normalized"] and summary["accuracy"] == final["eval/accuracy"]
    assert summary["reward_mean"] == pytest.approx(0.0, abs=1e-5)  # the stats came from this very eval set
    assert summary["reward_std"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.floor
def test_adapter_and_merged_model_give_the_same_rewards(lora_run, tmp_path):
    out, final, _ = lora_run
    merged, merged_summary = score(tmp_path, "--model", out, "--data", EVAL)
    adapter, adapter_summary = score(tmp_path, "--model", out, "--adapter", "--data", EVAL)
    assert_matches_trainer_eval(merged_summary, final)
    assert_matches_trainer_eval(adapter_summary, final)
    assert adapter_summary["model"].endswith("adapter")
    assert [r["chosen_reward"] for r in adapter] == pytest.approx([r["chosen_reward"] for r in merged], abs=1e-5)
    _, normalized = score(tmp_path, "--model", out / "adapter", "--data", EVAL, "--normalize")
    assert normalized["reward_std"] == pytest.approx(1.0, abs=1e-5)


def test_plain_texts_from_txt_and_jsonl(full_run, tmp_path):
    out, _, _ = full_run
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
    out, _, _ = full_run
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


@pytest.mark.parametrize("damage", ["not json", "[1, 2]"])
def test_a_damaged_adapter_config_or_run_config_is_one_line(lora_run, tmp_path, capsys, damage):
    out, _, _ = lora_run
    for name in ("adapter/adapter_config.json", "training_config.json"):
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(out, copy)
        (copy / name).write_text(damage)
        args = ["--model", str(copy), "--data", str(EVAL), "--output", str(tmp_path / f"{copy.name}.jsonl")]
        assert score_main(args + (["--adapter"] if name.startswith("adapter") else [])) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(f"error: {copy / name}: ") and "Traceback" not in err, err


def test_empty_reply_is_scored_and_the_default_output_goes_to_the_output_dir(full_run, tmp_path, monkeypatch):
    out, _, _ = full_run
    data = tmp_path / "empty.jsonl"
    data.write_text(json.dumps({"prompt": "How was it?", "chosen": "Lovely stay.", "rejected": ""}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert score_main(["--model", str(out), "--data", str(data)]) == 0
    written = out / "scores" / "empty.scores.jsonl"
    assert not list(tmp_path.glob("*.scores.jsonl")) and not (tmp_path / "scores").exists()
    (record,) = [json.loads(line) for line in written.read_text().splitlines()]
    assert record["margin"] == pytest.approx(record["chosen_reward"] - record["rejected_reward"])
    assert score_main(["--model", str(out), "--data", str(data), "--overwrite", "no"]) == 2
    assert score_main(["--model", str(out / "model"), "--data", str(data), "--overwrite", "yes"]) == 0



@pytest.fixture
def refused(monkeypatch, capsys):
    """score_main's answer to a bad command: exit 2 with one `error: ...` line, the model never loaded."""
    from rm.cli import score as cli

    def load(*args, **kwargs):
        raise AssertionError("a refused command loaded the model")

    monkeypatch.setattr(cli.Scorer, "load", load)

    def run(*args):
        capsys.readouterr()
        assert score_main(list(map(str, args))) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err.strip()
    return run


@pytest.mark.parametrize("flag, value", [("--batch_size", -3), ("--batch_size", 0), ("--max_source_length", 0),
                                         ("--max_target_length", -5)])
def test_numbers_below_one_are_refused(full_run, tmp_path, refused, flag, value):
    """A negative batch size scored nothing and wrote 0.0 for every reward; 0 was a traceback; a 0 length fell
    back to the training run's silently."""
    out, _, _ = full_run
    output = tmp_path / "s.jsonl"
    line = refused("--model", out, "--data", EVAL, "--output", output, flag, value)
    assert line.startswith(f"error: {flag} is {value}; expected a positive integer") and not output.exists()


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("empty.txt", ""), ("blank.txt", "\n  \n")])
def test_a_data_file_without_records_is_refused_naming_it(full_run, tmp_path, refused, name, content):
    """It was read as zero texts: exit 0, 'reward mean nan' and an empty output file."""
    out, _, _ = full_run
    data, output = tmp_path / name, tmp_path / "s.jsonl"
    data.write_text(content)
    assert refused("--model", out, "--data", data, "--output", output) == f"error: {data}: holds no records"
    assert not output.exists()


def test_a_directory_as_output_is_refused(full_run, tmp_path, refused):
    out, _, _ = full_run
    folder = tmp_path / "scores"
    folder.mkdir()
    for overwrite in ("false", "true"):  # with true it was an IsADirectoryError after scoring
        line = refused("--model", out, "--data", EVAL, "--output", folder, "--overwrite", overwrite)
        assert line.startswith(f"error: {folder} is a directory")
    (tmp_path / "file").write_text("")
    assert refused("--model", out, "--data", EVAL, "--output", tmp_path / "file" / "s.jsonl").endswith("is a file, "
                                                                                                         "not a folder")


def test_an_existing_summary_is_kept_without_overwrite(full_run, tmp_path, refused):
    """The summary beside the output was replaced silently when only the output was new."""
    out, _, _ = full_run
    output, summary = tmp_path / "s.jsonl", tmp_path / "s.summary.json"
    summary.write_text("keep me\n")
    assert refused("--model", out, "--data", EVAL, "--output", output) == \
        f"error: {summary} exists: pass --overwrite true to replace it"
    assert summary.read_text() == "keep me\n" and not output.exists()


def test_a_device_this_machine_lacks_is_refused(full_run, tmp_path, refused, monkeypatch):
    import torch

    out, _, _ = full_run
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    args = ["--model", out, "--data", EVAL, "--output", tmp_path / "s.jsonl", "--device"]
    assert refused(*args, "cuda").startswith("error: --device cuda: not on this machine; available here: auto, cpu")
    assert refused(*args, "banana").startswith("error: --device banana: not a device; available here: auto, cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert "available here: auto, cpu, cuda, cuda:0, cuda:1" in refused(*args, "cuda:2")


def test_base_model_problems_are_one_line(lora_run, full_run, tmp_path, refused):
    """A missing base folder and a hub name that cannot be had offline were 40-55 line tracebacks; --base_model
    with a merged model was ignored silently."""
    out, _, _ = lora_run
    args = ["--data", EVAL, "--output", tmp_path / "s.jsonl"]
    missing = tmp_path / "no_base"
    assert refused("--model", out, "--adapter", "--base_model", missing, *args) == \
        f"error: --base_model {missing}: no such folder"
    assert refused("--model", out, "--adapter", "--base_model", "owner/no-such-model", *args).startswith(
        "error: --base_model owner/no-such-model: not in the hub cache (")
    adapter = tmp_path / "adapter"  # the base named in adapter_config.json is gone
    shutil.copytree(out / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(missing)}))
    assert refused("--model", adapter, *args) == \
        f"error: {adapter}/adapter_config.json: base model {missing}: no such folder"
    merged, _, _ = full_run
    assert refused("--model", merged, "--base_model", config["base_model_name_or_path"], *args).startswith(
        f"error: --base_model is for a LoRA adapter, and {merged}/model is a merged model")


def test_base_model_overrides_the_adapter_config(lora_run, tmp_path):
    """--base_model is meaningful for an adapter folder given directly (no --adapter needed there)."""
    out, final, _ = lora_run
    base = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    adapter = tmp_path / "adapter"
    shutil.copytree(out / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gone/away"}))
    _, summary = score(tmp_path, "--model", adapter, "--base_model", base, "--data", EVAL)
    assert_matches_trainer_eval(summary, final)

# --------------------------------------------------------------------------------------------- RLHF clients
def scored_eval_pairs(out, tmp_path, count=12):
    """The first eval pairs and rm.score's rewards for them (which equal the trainer's, tested above)."""
    from rm.data import read_pairs

    records, _ = score(tmp_path, "--model", out, "--data", EVAL)
    return read_pairs(str(EVAL), log=lambda m: None)[:count], records[:count]


def test_reward_function_for_trl_gives_rm_score_rewards(full_run, tmp_path):
    from rm.model import load_tokenizer
    from rm.reward_function import RewardFunction

    out, _, _ = full_run
    pairs, records = scored_eval_pairs(out, tmp_path)
    expected = [r["chosen_reward"] for r in records]
    reward = RewardFunction(str(out), batch_size=5)
    conversational = reward(prompts=[p.prompt for p in pairs], completion_ids=None,
                            completions=[[{"role": "assistant", "content": p.chosen}] for p in pairs])
    assert conversational == pytest.approx(expected, abs=1e-5)
    tokenizer = load_tokenizer(str(out / "model"))
    rendered = [tokenizer.apply_chat_template(p.prompt, tokenize=False, add_generation_prompt=True) for p in pairs]
    standard = reward(prompts=rendered, completions=[p.chosen for p in pairs])
    assert standard == pytest.approx(expected, abs=1e-5)
    assert reward.__name__ == "reward_model"


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_plain_transformers_gives_the_trainers_rewards(full_run, tmp_path, padding_side):
    """No code of this package: the exported folder, AutoTokenizer on the chat-rendered text, one padded batch."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _, _ = full_run
    pairs, records = scored_eval_pairs(out, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(out / "model", padding_side=padding_side)
    model = AutoModelForSequenceClassification.from_pretrained(out / "model", dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template(p.prompt + [{"role": "assistant", "content": p.rejected}], tokenize=False)
             for p in pairs]
    batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    assert (batch["attention_mask"][:, 0 if padding_side == "left" else -1] == 0).any()  # padding really happened
    with torch.no_grad():
        rewards = model(**batch).logits[:, 0].tolist()
    assert rewards == pytest.approx([r["rejected_reward"] for r in records], abs=1e-5)


def test_eos_reward_position_is_recorded_and_honoured_by_rm_score(tmp_path_factory, tmp_path):
    out = tmp_path_factory.mktemp("score_eos") / "out"
    _, metrics, _ = run_train(out, *QUICK, "--max_steps", "4", "--reward_position", "eos")
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["reward_position"] == "eos"
    records, summary = score(tmp_path, "--model", out, "--data", EVAL)
    assert summary["reward_position"] == "eos"
    assert_matches_trainer_eval(summary, metrics["final"])
    relabelled = tmp_path / "template_end"  # the same weights read at the template's end give other rewards
    shutil.copytree(out / "model", relabelled)
    (relabelled / "config.json").write_text(json.dumps({**config, "reward_position": "template_end"}))
    other, _ = score(tmp_path, "--model", relabelled, "--data", EVAL)
    assert max(abs(a["chosen_reward"] - b["chosen_reward"]) for a, b in zip(records, other)) > 1e-3


def test_help_shows_defaults(capsys):
    from rm.cli.score import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 16)" in help_text and "(default: auto)" in help_text and "(default: False)" in help_text
    assert "(default: None)" not in help_text
    assert parse_args(["--model", "m", "--data", "d", "--overwrite"]).overwrite is True


@pytest.mark.parametrize("args", [["--batch_size", "abc"], ["--data", "x.jsonl"], ["--model", "m", "--bogus"]])
def test_a_mistyped_or_missing_flag_is_one_line(capsys, args):
    with pytest.raises(SystemExit) as stop:
        score_main([*(["--data", "d.jsonl"] if "--data" not in args else []), *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err


def test_the_python_scorer_refuses_lengths_below_one(full_run):
    """Scorer.load (rm.score's and the TRL reward function's loader) took 0 for "the training run's value"."""
    from rm.scoring import ScoreError, Scorer

    out, _, _ = full_run
    with pytest.raises(ScoreError, match="--max_source_length is 0; expected a positive integer"):
        Scorer.load(str(out), max_source_length=0)
    assert Scorer.load(str(out), max_target_length=7).encoder.max_target_length == 7
