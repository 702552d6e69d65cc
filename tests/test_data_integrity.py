"""Data that says two things, and eval data that is train data (issue 25).

A record with a repeated key, or a number past float32's range however it is spelled, is one DataError naming
file:line and the key or field. The held-out split is disjoint by content: copies of one pair (up to whitespace and
Unicode form) never sit on both sides, and the counts are logged and returned for run_info.json; explicit eval data
that overlaps the train data is used, with a warning that counts the overlap.
"""

import json
import unicodedata

import pytest

from conftest import main_caller
from rm.config import parse_config
from rm.data import DataError, load_training_data, read_pairs

GOOD = '{"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": "b"%s}'
HUGE = "1" + "0" * 5000  # past Python's int-to-str limit (4300 digits): json.loads itself raised ValueError


def read(path, **kwargs):
    return read_pairs(str(path), log=lambda m: None, **kwargs)


# ---- records that say two things
@pytest.mark.parametrize("second_line, key", [
    (GOOD % ', "chosen": "c"', "chosen"),
    ('{"conversations": [{"from": "human", "value": "q", "value": "r"}], "chosen": "a", "rejected": "b"}', "value"),
    ('{"prompt": "p", "prompt": "p", "chosen": "a", "rejected": "b"}', "prompt"),  # same value twice: still refused
])
def test_a_repeated_key_in_a_json_line_names_file_line_and_key(tmp_path, second_line, key):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD % "" + "\n" + second_line + "\n" + GOOD % "" + "\n")
    with pytest.raises(DataError, match=rf"d.jsonl:2: key '{key}' appears twice in one JSON object"):
        read(path)
    assert len(read(path, skip_bad=True)) == 2  # --skip_bad_records drops that record only


def test_a_repeated_key_in_a_json_array_names_the_line_of_its_record(tmp_path):
    path = tmp_path / "d.json"
    records = [GOOD % "", GOOD % "", '{\n  "chosen": "a",\n  "rejected": "b",\n  "rejected": "c"}', GOOD % ""]
    path.write_text("[\n" + ",\n".join(records) + "\n]\n")  # the third record starts on line 4
    with pytest.raises(DataError, match=r"d.json:4 \(record 3\): key 'rejected' appears twice"):
        read(path)
    assert [p.source.rsplit(":", 1)[1] for p in read(path, skip_bad=True)] == ["record 1", "record 2", "record 4"]


# ---- numbers past float32's range, however spelled
@pytest.mark.parametrize("spelled, shown", [(HUGE, "100000000000... (5001 digits)"),
                                            ("-" + HUGE, "-10000000000... (5001 digits)"),
                                            ("1e400", "inf"), ("-1e400", "-inf"), ("1e39", "1e+39"),
                                            ("Infinity", "inf"), ("-Infinity", "-inf"), ("NaN", "nan")])
def test_a_margin_past_float32_is_one_line_naming_file_line_and_field(tmp_path, spelled, shown):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD % "" + "\n" + GOOD % f', "margin": {spelled}' + "\n")
    with pytest.raises(DataError) as err:
        read(path)
    assert str(err.value) == (f"{path}:2: field 'margin' must be a finite float32 number (|margin| <= 3.403e+38), "
                              f"got {shown}")


def test_a_huge_integer_in_a_field_no_layout_reads_is_no_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD % f', "id": {HUGE}' + "\n")
    assert read(path)[0].chosen == "a"


def test_a_5000_digit_margin_stops_train_py_with_one_line(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(GOOD % f', "margin": {i}' + "\n" for i in range(5)) + GOOD % f', "margin": {HUGE}' + "\n")
    code, err = main_caller(capsys)("--model_name_or_path", "tiny", "--train_file_dir", path, "--output_dir",
                                    tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and f"{path}:6: field 'margin'" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("margin", [float("inf"), float("-inf"), float("nan"), 1e39])
def test_a_parquet_margin_past_float32_names_file_row_and_field(tmp_path, margin):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": m}
                                for m in (0.5, margin)]).to_parquet(str(path))
    with pytest.raises(DataError, match=r"d.parquet:row 2: field 'margin' must be a finite float32 number"):
        read(path)


# ---- the held-out split is disjoint by content
def pair_record(i: int, variant: int = 0) -> dict:
    """Pair i; variants 1 and 2 are copies that differ only in whitespace and Unicode form (NFD)."""
    answer = f"Caf\u00e9 answer {i} is good."
    if variant == 1:
        answer = f"  Caf\u00e9   answer {i}\tis good.\n"
    elif variant == 2:
        answer = unicodedata.normalize("NFD", answer)
    return {"prompt": f"Question number {i}?", "chosen": answer, "rejected": f"Bad answer {i}."}


def content(pair) -> tuple:
    """The test's own normalisation (not the module's): NFC, whitespace runs as one space."""
    norm = lambda t: " ".join(unicodedata.normalize("NFC", t).split())  # noqa: E731
    return (tuple((m["role"], norm(m["content"])) for m in pair.prompt), norm(pair.chosen), norm(pair.rejected))


def write_records(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def config(tmp_path, train, *extra):
    return parse_config(["--model_name_or_path", "tiny", "--train_file_dir", str(train), "--output_dir",
                         str(tmp_path / "out"), "--max_eval_samples", "-1", *map(str, extra)])


def test_held_out_pairs_are_never_trained_on_even_when_the_data_repeats_them(tmp_path):
    # 120 distinct pairs, each present two or three times, the copies spread through the file
    records = [pair_record(i) for i in range(120)] + [pair_record(i, 1) for i in range(120)] + \
              [pair_record(i, 2) for i in range(0, 120, 3)]
    train_file = write_records(tmp_path / "train.jsonl", records)
    logged, facts = [], {}
    train, evaluation = load_training_data(config(tmp_path, train_file), logged.append, facts)
    held = {content(p) for p in evaluation}
    assert len(held) == len(evaluation) == 6  # 5% of the 120 distinct pairs, each once
    leaked = [p.source for p in train if content(p) in held]
    assert not leaked, f"{len(leaked)} held-out pairs are also trained on: {leaked[:5]}"
    assert {content(p) for p in train} | held == {content(p) for p in read(train_file)}  # nothing else dropped
    assert facts == {"duplicate_pairs": 160, "held_out_copies_dropped": len(records) - len(train) - 6,
                     "eval_pairs_also_in_train": 0}
    assert facts["held_out_copies_dropped"] >= 6  # every held-out pair had at least one copy
    assert any("the train data holds 160 copies of pairs it already has" in m and
               f"{facts['held_out_copies_dropped']} copies of held-out pairs dropped" in m for m in logged), logged


def test_the_split_of_data_without_duplicates_is_the_seeded_one_it_always_was(tmp_path):
    train_file = write_records(tmp_path / "train.jsonl", [pair_record(i) for i in range(100)])
    facts = {}
    train, evaluation = load_training_data(config(tmp_path, train_file, "--seed", 7), lambda m: None, facts)
    import random

    held = sorted(random.Random(7).sample(range(100), 5))
    assert [p.source.rsplit(":", 1)[1] for p in evaluation] == [str(i + 1) for i in held]
    assert len(train) == 95 and facts["duplicate_pairs"] == 0 and facts["held_out_copies_dropped"] == 0


def test_eval_data_that_overlaps_the_train_data_is_used_with_a_warning_that_counts_it(tmp_path):
    train_file = write_records(tmp_path / "train.jsonl", [pair_record(i) for i in range(20)] + [pair_record(3, 1)])
    eval_file = write_records(tmp_path / "eval.jsonl", [pair_record(3, 2), pair_record(5), pair_record(7, 1),
                                                        pair_record(50), pair_record(51)])
    logged, facts = [], {}
    train, evaluation = load_training_data(config(tmp_path, train_file, "--validation_file_dir", eval_file),
                                           logged.append, facts)
    assert len(train) == 21 and len(evaluation) == 5
    assert facts == {"duplicate_pairs": 1, "eval_pairs_also_in_train": 3}
    assert any(m.startswith(f"warning: 3 of the 5 eval pairs of {eval_file} are also in the train data") for m in
               logged), logged


# ---- the train pairs are read again, not held (issue 26)
def test_the_train_pairs_are_not_held_in_memory_but_read_again_when_iterated(tmp_path):
    import tracemalloc

    long_text = " ".join(f"word{i}" for i in range(150))  # ~1 KB a pair: 20k pairs would hold ~40 MB as Pair objects
    train_file = tmp_path / "train.jsonl"
    with train_file.open("w") as out:
        for i in range(20_000):
            out.write(json.dumps({"prompt": f"Question {i}? {long_text}", "chosen": f"Yes {i}. {long_text}",
                                  "rejected": f"No {i}."}) + "\n")
    cfg = config(tmp_path, train_file, "--max_eval_samples", 50, "--max_train_samples", -1)
    tracemalloc.start()
    try:
        train, evaluation = load_training_data(cfg, lambda m: None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12e6, f"reading and splitting 20k pairs peaked at {peak / 1e6:.0f} MB: the pairs are being held"
    assert len(train) == 19_950 and len(evaluation) == 50
    held = {p.source for p in evaluation}
    first, second = [p.source for p in train], [p.source for p in train]  # each pass reads the file again
    assert first == second and len(set(first)) == 19_950 and not held & set(first)
    assert [p.source for p in train[:3]] == first[:3]  # max_train_samples keeps the first pairs, as a list would


def test_train_data_that_shrinks_between_its_two_readings_is_one_error(tmp_path):
    train_file = write_records(tmp_path / "train.jsonl", [pair_record(i) for i in range(100)])
    train, _ = load_training_data(config(tmp_path, train_file), lambda m: None)
    write_records(train_file, [pair_record(i) for i in range(60)])
    with pytest.raises(DataError, match=rf"{train_file}: changed while it was read: pair \d+ of the first reading"):
        list(train)
