import json

import pytest

from conftest import SHARED_DATA
from rm.data import DataError, load_pairs, read_file


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_medicalgpt_layout_from_the_real_file():
    layout, pairs = read_file(SHARED_DATA / "dpo_zh_500.jsonl")
    assert layout == "medicalgpt" and len(pairs) == 500
    assert pairs[0].prompt[-1]["role"] == "user" and pairs[0].chosen and pairs[0].rejected
    assert pairs[0].source.endswith("dpo_zh_500.jsonl:1")


def test_llamafactory_layout_from_the_real_file():
    layout, pairs = read_file(SHARED_DATA / "dpo_en_demo.json")
    assert layout == "llamafactory" and len(pairs) == 300
    assert pairs[0].chosen.startswith("That sounds like a fun")
    assert pairs[0].source.endswith("dpo_en_demo.json:record 1")


def test_trl_layout_from_the_real_file():
    layout, pairs = read_file(SHARED_DATA / "sentiment_pairs_en.jsonl")
    assert layout == "trl" and len(pairs) == 4575
    assert pairs[0].prompt == [{"role": "user", "content": "Write a one-sentence movie review."}]


def test_medicalgpt_legacy_layout_with_system_and_history(tmp_path):
    f = write_jsonl(tmp_path / "legacy.jsonl", [{"system": "be kind", "history": [["hi", "hello"]],
                                                 "question": "q?", "response_chosen": "good",
                                                 "response_rejected": "bad"}])
    layout, [pair] = read_file(f)
    assert layout == "medicalgpt_legacy"
    assert [m["role"] for m in pair.prompt] == ["system", "user", "assistant", "user"]
    assert (pair.chosen, pair.rejected) == ("good", "bad")


def test_trl_message_lists_and_implicit_prompt(tmp_path):
    convo = [{"role": "user", "content": "q"}]
    f = write_jsonl(tmp_path / "trl.jsonl", [
        {"chosen": convo + [{"role": "assistant", "content": "a"}],
         "rejected": convo + [{"role": "assistant", "content": "b"}], "margin": 1.5}])
    layout, [pair] = read_file(f)
    assert layout == "trl" and pair.prompt == convo and (pair.chosen, pair.rejected, pair.margin) == ("a", "b", 1.5)


def test_medicalgpt_system_prompt_goes_first(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"system": "sys", "conversations": [{"from": "human", "value": "q"}],
                                            "chosen": "a", "rejected": "b"}])
    _, [pair] = read_file(f)
    assert pair.prompt == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}]


def test_medicalgpt_tools_as_json_string(tmp_path):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    f = write_jsonl(tmp_path / "m.jsonl", [{**GOOD, "tools": json.dumps(tools)}, {**GOOD, "tools": "{oops"}])
    with pytest.raises(DataError, match=r"m.jsonl:2: field 'tools' is a string but not valid JSON"):
        read_file(f)
    f = write_jsonl(tmp_path / "ok.jsonl", [{**GOOD, "tools": json.dumps(tools)}])
    assert read_file(f)[1][0].tools == tools


def test_directory_reads_every_file_with_its_own_layout(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "response_chosen": "a", "response_rejected": "b"}])
    (tmp_path / "notes.txt").write_text("ignored")
    assert len(load_pairs(str(tmp_path), log=lambda m: None)) == 2


GOOD = {"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "chosen": ""}, "field 'chosen' is empty"),
    ({k: v for k, v in GOOD.items() if k != "rejected"}, "missing field 'rejected'"),
    ({**GOOD, "rejected": 3}, "field 'rejected' must be a string"),
    ({**GOOD, "conversations": [{"from": "alien", "value": "q"}]}, "conversations[0].from must be one of"),
    ({**GOOD, "conversations": []}, "must be a non-empty list"),
    ({**GOOD, "margin": "big"}, "field 'margin' must be a number"),
])
def test_bad_record_names_file_line_and_field(tmp_path, bad, message):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as err:
        read_file(f)
    assert f"{f}:2" in str(err.value) and message in str(err.value)


def test_unknown_layout_names_the_fields(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: unknown layout: fields \['text'\]"):
        read_file(f)


def test_missing_field_in_a_later_record(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, {"conversations": GOOD["conversations"], "chosen": "a"}])
    with pytest.raises(DataError, match=r"d.jsonl:3: missing field 'rejected'"):
        read_file(f)


def test_malformed_json_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON"):
        read_file(f)


def test_invalid_utf8_names_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes((json.dumps(GOOD) + "\n").encode() + b'{"chosen": "\xff"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid UTF-8"):
        read_file(f)


def test_empty_directory_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="no .jsonl/.json/.parquet files"):
        load_pairs(str(tmp_path))
    with pytest.raises(DataError, match="no such file"):
        load_pairs(str(tmp_path / "nope.jsonl"))


def test_parquet_file(tmp_path):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}]).to_parquet(str(path))
    layout, [pair] = read_file(path, cache_dir=str(tmp_path / "cache"))
    assert layout == "trl" and pair.chosen == "a" and pair.source.endswith("d.parquet:row 1")
