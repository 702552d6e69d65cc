"""The token cache (rm/token_store.py): on by default, keyed by data bytes, settings and tokenizer content, published
whole, rebuilt when damaged, off with --cache_dir none; and a 2-process run that tokenizes once."""

import json
import os
import shutil

import pytest

from conftest import ROOT, train_command
from rm.config import parse_config
from rm.data import DataError
from rm.encoding import PairEncoder
from rm.token_store import cache_key, token_cache_root, token_sets

TOKENIZED = "data: reading and tokenizing"
LOADED = "loaded from the token cache"


class OneProcess:
    """What token_sets asks of the Accelerator in a single-process run."""

    is_local_main_process = True
    num_processes = 1


def write_pairs(path, count: int, first: int = 0):
    with open(path, "w") as f:
        for i in range(first, first + count):
            f.write(json.dumps({"prompt": f"Question {i}?", "chosen": f"A good answer {i}.",
                                "rejected": f"A poor answer {i}."}) + "\n")
    return path


def prepare(tokenizer, *args):
    """token_sets of a run with these flags: (train, eval, the log, the lines any process announced)."""
    cfg = parse_config(["--model_name_or_path", "tiny", "--max_eval_samples", "3", *map(str, args)])
    logged, announced = [], []
    train, evaluation = token_sets(cfg, PairEncoder(tokenizer, 64, 32), OneProcess(), logged.append,
                                   announced.append, {})
    return train, evaluation, logged, announced


def entries(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_the_default_cache_is_on_outside_the_home_folder_in_tests_and_reads_nothing_on_a_hit(tokenizer, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setenv("RM_CACHE_DIR", str(tmp_path / "cache"))
    assert token_cache_root(None) == str(tmp_path / "cache") and token_cache_root("none") is None
    monkeypatch.delenv("RM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert token_cache_root(None) == str(tmp_path / "xdg" / "rm")
    monkeypatch.setenv("RM_CACHE_DIR", str(tmp_path / "cache"))

    data = write_pairs(tmp_path / "train.jsonl", 40)
    train, evaluation, logged, announced = prepare(tokenizer, "--train_file_dir", data)
    assert len(train) == 38 and len(evaluation) == 2 and len(announced) == 1 and TOKENIZED in announced[0]
    (entry,) = entries(tmp_path / "cache")
    assert entries(tmp_path / "cache" / entry) == ["eval.arrow", "meta.json", "train.arrow"]
    assert train.cache_files == [{"filename": str(tmp_path / "cache" / entry / "train.arrow")}]  # memory-mapped

    data.with_suffix(".bak").write_bytes(data.read_bytes())
    data.write_text("not read on a hit: the bytes are hashed, not parsed\n")
    with pytest.raises(DataError, match="malformed JSON"):  # other bytes: another key, read and refused
        prepare(tokenizer, "--train_file_dir", data)
    shutil.move(data.with_suffix(".bak"), data)
    again, eval_again, replayed, announced = prepare(tokenizer, "--train_file_dir", data)
    assert "pairs read and tokenized in" in logged[-1]
    assert announced == [] and LOADED in replayed[-1] and replayed[:-1] == logged[:-1]  # the reading's log, replayed
    assert again.to_list() == train.to_list() and eval_again.to_list() == evaluation.to_list()
    assert entries(tmp_path / "cache") == [entry]


def test_cache_dir_none_tokenizes_every_time_and_writes_no_cache(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("RM_CACHE_DIR", str(tmp_path / "cache"))
    data = write_pairs(tmp_path / "train.jsonl", 40)
    first = prepare(tokenizer, "--train_file_dir", data, "--cache_dir", "none")
    second = prepare(tokenizer, "--train_file_dir", data, "--cache_dir", "none")
    assert [TOKENIZED in a for _, _, _, announced in (first, second) for a in announced] == [True, True]
    assert first[0].to_list() == second[0].to_list() and not (tmp_path / "cache").exists()
    assert not any(LOADED in m for m in first[2] + second[2])


def test_the_key_follows_data_bytes_settings_and_tokenizer_content_not_the_seed_with_eval_data(tokenizer, tmp_path):
    from rm.model import load_tokenizer

    data, held_out = write_pairs(tmp_path / "train.jsonl", 40), write_pairs(tmp_path / "eval.jsonl", 5, 100)
    key = lambda *args, tok=tokenizer: cache_key(parse_config(["--train_file_dir", str(data), *map(str, args)]),  # noqa
                                                 PairEncoder(tok, 64, 32))
    base = key()
    assert key("--seed", 7) != base  # the held-out split moves
    assert key("--validation_file_dir", held_out) == key("--validation_file_dir", held_out, "--seed", 7)
    assert len({base, key("--max_train_samples", 10), key("--skip_bad_records", "true"),
                key("--validation_file_dir", held_out), key("--validation_file_dir", "none")}) == 5
    assert cache_key(parse_config(["--train_file_dir", str(data)]), PairEncoder(tokenizer, 64, 33)) != base

    folder = tmp_path / "tok"
    tokenizer.save_pretrained(folder)
    before = key(tok=load_tokenizer(str(folder)))
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["Ġgood"], vocab["Ġpoor"] = vocab["Ġpoor"], vocab["Ġgood"]  # same name, same length, other ids
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    edited = load_tokenizer(str(folder))
    assert len(edited) == len(tokenizer) and key(tok=edited) != before

    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "One more?", "chosen": "Yes.", "rejected": "No."}) + "\n")
    assert key() != base


def test_the_cache_is_published_whole_and_a_damaged_one_is_rebuilt(tokenizer, tmp_path, monkeypatch):
    """Two jobs sharing the cache (a sweep), or two machines, tokenize the same data at once, and a run can be killed
    mid-write: no reader may find a half-written entry, and a damaged one costs a re-tokenization, not the run."""
    import rm.token_store

    monkeypatch.setenv("RM_CACHE_DIR", str(tmp_path / "cache"))
    data = write_pairs(tmp_path / "train.jsonl", 40)
    encode = rm.token_store.encode_pairs

    def killed_mid_write(*args, **kwargs):
        encode(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(rm.token_store, "encode_pairs", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(tokenizer, "--train_file_dir", data)
    assert entries(tmp_path / "cache") == []  # nothing at the entry's place, and the draft removed
    monkeypatch.setattr(rm.token_store, "encode_pairs", encode)

    first, _, _, _ = prepare(tokenizer, "--train_file_dir", data)
    (entry,) = entries(tmp_path / "cache")
    # a second writer of the same entry (it missed it too) keeps the first one's files and leaves no draft
    rm.token_store._publish(str(tmp_path / "cache" / entry), lambda draft: os.makedirs(draft))
    assert entries(tmp_path / "cache") == [entry] and entries(tmp_path / "cache" / entry) != []

    for damage in ("meta.json", "train.arrow"):
        with open(tmp_path / "cache" / entry / damage, "r+b") as f:
            f.truncate(40)
        again, _, logged, announced = prepare(tokenizer, "--train_file_dir", data)
        assert any("does not load" in m and "tokenizing again" in m for m in logged), logged
        assert len(announced) == 1 and again.to_list() == first.to_list()
        assert entries(tmp_path / "cache") == [entry]
    assert LOADED in prepare(tokenizer, "--train_file_dir", data)[2][-1]


def test_bad_data_is_still_named_by_file_and_line(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("RM_CACHE_DIR", str(tmp_path / "cache"))
    data = write_pairs(tmp_path / "train.jsonl", 40)
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "Q?", "chosen": 3, "rejected": "No."}) + "\n")
    with pytest.raises(DataError, match=f"{data}:41: field 'chosen' must be a string"):
        prepare(tokenizer, "--train_file_dir", data)
    assert entries(tmp_path / "cache") == []


def test_two_processes_on_one_machine_tokenize_once(tmp_path):
    """accelerate launch, 2 CPU processes: one process reads and tokenizes, the other waits and maps the same
    files; the rerun tokenizes nothing."""
    import subprocess

    data = write_pairs(tmp_path / "train.jsonl", 120)
    outputs = []
    for run in range(2):
        cmd, env = train_command(tmp_path / f"out{run}", "--model_name_or_path", "tiny", "--train_file_dir", data,
                                 "--max_steps", 1, "--report_to", "none", "--per_device_train_batch_size", 2,
                                 "--gradient_accumulation_steps", 1, processes=2, port=29731)
        env["RM_CACHE_DIR"] = str(tmp_path / "cache")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outputs.append(proc.stdout + proc.stderr)
        assert json.loads((tmp_path / f"out{run}" / "run_info.json").read_text())["num_processes"] == 2
    tokenized = [line for line in outputs[0].splitlines() if TOKENIZED in line]
    assert len(tokenized) == 1 and tokenized[0].startswith("[process 0]"), outputs[0]
    assert not any(TOKENIZED in line for line in outputs[1].splitlines()) and LOADED in outputs[1], outputs[1]
    assert len(entries(tmp_path / "cache")) == 1


def test_bad_data_found_by_the_tokenizing_process_stops_every_process(tmp_path):
    """Only the local main process reads the data now: its refusal must reach the process waiting for it (no hang
    until the collective times out), and the line naming file:line is printed."""
    import subprocess

    data = write_pairs(tmp_path / "train.jsonl", 40)
    with open(data, "a") as f:
        f.write('{"prompt": "Q?", "chosen": "Yes.", "rejected": null}\n')
    cmd, env = train_command(tmp_path / "out", "--model_name_or_path", "tiny", "--train_file_dir", data,
                             "--report_to", "none", processes=2, port=29733)
    env["RM_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert f"error: {data}:41: field 'rejected' must be" in proc.stderr, proc.stderr[-3000:]
    assert "the first process says why" in proc.stderr and entries(tmp_path / "cache") == []


def test_a_run_hashes_its_train_file_once_and_a_new_run_hashes_it_again(tmp_path, monkeypatch, capsys):
    """The resume check (rm.checkpoint) and the cache key both fingerprint the data: 1 GB of data costs ~1 s a hash."""
    import rm.checkpoint
    from conftest import main_caller

    hashed = []
    real = rm.checkpoint.sha256_of
    monkeypatch.setattr(rm.checkpoint, "sha256_of", lambda path: hashed.append(path) or real(path))
    monkeypatch.setenv("RM_CACHE_DIR", str(tmp_path / "cache"))
    data = write_pairs(tmp_path / "train.jsonl", 40)
    run = main_caller(capsys, ("--model_name_or_path", "tiny", "--train_file_dir", data, "--max_steps", 1,
                               "--report_to", "none", "--output_dir", tmp_path / "out"))
    assert run()[0] == 0
    assert hashed == [str(data)]
    data.write_text(data.read_text().replace("good", "fine"))  # same size, new content: the next run must see it
    assert run("--overwrite_output_dir", "true")[0] == 0
    assert hashed == [str(data)] * 2
    assert len(entries(tmp_path / "cache")) == 2  # a second cache entry: the new content was tokenized
