import json
import os
from pathlib import Path

import pytest

from rm.data import DataError, data_files, is_hub_data_set, read_pairs
from rm.layouts import FLOAT32_MAX

DATA = Path(__file__).resolve().parent / "data"  # small real subsets, sources in tests/data/README.md


def read_file(path, **kwargs):
    """(layout, pairs) of one file, through the one reader the trainer uses."""
    logged = []
    pairs = read_pairs(str(path), log=logged.append, **kwargs)
    layout = logged[-1].split("layout ", 1)[1] if "layout " in logged[-1] else ""
    return layout, pairs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_medicalgpt_layout_from_the_real_file():
    layout, pairs = read_file(DATA / "dpo_zh_20.jsonl")
    assert layout == "medicalgpt" and len(pairs) == 20
    assert pairs[0].prompt[-1]["role"] == "user" and pairs[0].chosen and pairs[0].rejected
    assert pairs[0].source.endswith("dpo_zh_20.jsonl:1")


def test_llamafactory_layout_from_the_real_file():
    layout, pairs = read_file(DATA / "dpo_en_demo_10.json")
    assert layout == "llamafactory" and len(pairs) == 10
    assert pairs[0].chosen.startswith("That sounds like a fun")
    assert pairs[0].source.endswith("dpo_en_demo_10.json:record 1")


def test_trl_layout_from_the_real_file():
    layout, pairs = read_file(DATA / "sentiment_pairs_30.jsonl")
    assert layout == "trl" and len(pairs) == 30
    assert pairs[0].prompt == [{"role": "user", "content": "Write a one-sentence movie review."}]


def test_hh_rlhf_transcripts_from_the_real_file_have_an_implicit_prompt():
    layout, pairs = read_file(DATA / "hh_harmless_27.jsonl", for_training=False)
    assert layout == "hh-rlhf (implicit prompt)" and len(pairs) == 27
    first = json.loads((DATA / "hh_harmless_27.jsonl").read_text().splitlines()[0])
    pair = pairs[0]
    assert pair.prompt[0]["role"] == "user" and pair.prompt[-1]["role"] == "user"
    assert [m["role"] for m in pair.prompt] == ["user", "assistant"] * (len(pair.prompt) // 2) + ["user"]
    assert first["chosen"].endswith(pair.chosen) and first["rejected"].endswith(pair.rejected)
    assert "Human:" not in pair.prompt[0]["content"] and pair.chosen != pair.rejected
    assert pairs[24].chosen == "" and pairs[24].rejected  # record 87: an empty chosen reply, kept for scoring
    assert "Human:" in pairs[25].chosen  # record 1255: the reply itself holds a 'Human:' line, kept as written


def test_training_refuses_an_empty_reply_with_the_skip_hint_and_skips_it_when_asked():
    """The transcript in 'chosen' is not empty, its last Assistant reply is: the message says which. Once the flag
    is given, the summary of the dropped records does not repeat the hint to give it."""
    with pytest.raises(DataError, match=r"hh_harmless_27.jsonl:25: the last Assistant reply of field 'chosen' is "
                                        r"empty.*--skip_bad_records"):
        read_file(DATA / "hh_harmless_27.jsonl")
    logged = []
    pairs = read_pairs(str(DATA / "hh_harmless_27.jsonl"), skip_bad=True, log=logged.append)
    assert len(pairs) == 26
    summary = [line for line in logged if line.startswith("skip_bad_records: dropped 1 bad records")]
    assert len(summary) == 1 and "the last Assistant reply of field 'chosen' is empty" in summary[0]
    assert "--skip_bad_records true" not in summary[0], summary[0]


def test_an_empty_last_message_is_named_as_such(tmp_path):
    convo = [{"role": "user", "content": "q"}]
    f = write_jsonl(tmp_path / "trl.jsonl", [
        {"chosen": convo + [{"role": "assistant", "content": "a"}],
         "rejected": convo + [{"role": "assistant", "content": "b"}]},
        {"chosen": convo + [{"role": "assistant", "content": "a"}],
         "rejected": convo + [{"role": "assistant", "content": " "}]}])
    with pytest.raises(DataError, match=r"trl.jsonl:2: the last message of field 'rejected' is empty"):
        read_file(f)


def test_prompt_less_pairs_are_read(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"chosen": "a tidy room", "rejected": "a mess"},
                                           {"prompt": "", "chosen": "x", "rejected": "y"}])
    _, pairs = read_file(f)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [([], "a tidy room", "a mess"), ([], "x", "y")]


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
    assert len(read_pairs(str(tmp_path), log=lambda m: None)) == 2


GOOD = {"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "chosen": ""}, "field 'chosen' is empty"),
    ({**GOOD, "chosen": "b"}, "'chosen' and 'rejected' are identical"),
    ({**GOOD, "margin": 10 ** 400}, "field 'margin' must be a finite float32 number"),
    ({**GOOD, "margin": 1e39}, "field 'margin' must be a finite float32 number"),
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
    with pytest.raises(DataError, match="no .jsonl/.json/.parquet/.ndjson/.jsonlines/.csv/.tsv files"):
        read_pairs(str(tmp_path))
    with pytest.raises(DataError, match="no such file"):
        read_pairs(str(tmp_path / "nope.jsonl"))


@pytest.mark.floor
def test_parquet_file(tmp_path):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}]).to_parquet(str(path))
    layout, [pair] = read_file(path, cache_dir=str(tmp_path / "cache"))
    assert layout == "trl" and pair.chosen == "a" and pair.source.endswith("d.parquet:row 1")


# ---- reading exactly: what valid files hold is read as written, whatever the mode
def test_unicode_line_separators_inside_json_strings_stay_in_the_record(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{**GOOD, "chosen": "line\u2028break"}, {**GOOD, "chosen": "next\x85line"}, GOOD]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    for skip in (False, True):
        pairs = read_pairs(str(f), skip_bad=skip, log=lambda m: None)
        assert [p.chosen for p in pairs] == ["line\u2028break", "next\x85line", "a"]
        assert [p.source.rsplit(":", 1)[1] for p in pairs] == ["1", "2", "3"]


def test_a_bad_line_has_the_same_number_in_strict_and_skip_mode(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({**GOOD, "chosen": "a\u2028b"}, ensure_ascii=False) + "\n\n{oops\n" + json.dumps(GOOD)
                 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl:3: malformed JSON"):
        read_pairs(str(f), log=lambda m: None)
    logged = []
    assert len(read_pairs(str(f), skip_bad=True, log=logged.append)) == 2
    assert "d.jsonl:3: malformed JSON" in logged[-1]


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode())
    assert read_pairs(str(f), log=lambda m: None)[0].chosen == "a"


def test_deep_nesting_is_a_data_error_naming_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(GOOD) + "\n" + "[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: JSON nested too deeply"):
        read_pairs(str(f), log=lambda m: None)


def test_margin_at_float32s_edge_is_read_and_past_it_refused(tmp_path):
    ok = write_jsonl(tmp_path / "ok.jsonl", [{**GOOD, "margin": 1e38}])
    assert read_pairs(str(ok), log=lambda m: None)[0].margin == 1e38 < FLOAT32_MAX


def test_directory_walk_skips_hidden_folders_reads_any_suffix_case_and_follows_symlinks(tmp_path):
    root = tmp_path / "data"
    (root / ".ipynb_checkpoints").mkdir(parents=True)
    write_jsonl(root / ".ipynb_checkpoints" / "a-checkpoint.jsonl", [GOOD])
    write_jsonl(root / "upper.JSONL", [GOOD])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_jsonl(elsewhere / "b.jsonl", [GOOD])
    os.symlink(elsewhere, root / "linked")
    os.symlink(root, elsewhere / "loop")  # a cycle must not hang the walk
    names = [p.name for p in data_files(str(root))]
    assert sorted(names) == ["b.jsonl", "upper.JSONL"]


def test_a_missing_local_looking_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for local in ("data/reward", "./x/y", "a/b.jsonl", "a/b/c", "~/x", "/x", "x.jsonl", "imdb"):
        assert not is_hub_data_set(local), local
    assert is_hub_data_set("Anthropic/hh-rlhf") and is_hub_data_set("owner/set.v2")
    with pytest.raises(DataError, match="data/reward: no such file or directory"):
        read_pairs("data/reward", log=lambda m: None)


def test_txt_files_are_read_one_text_per_line_for_scoring(tmp_path):
    from rm.data import read_records

    f = tmp_path / "t.txt"
    f.write_text("first\n\nsecond\n")
    [(source, records)] = list(read_records(str(f)))
    assert [(w.rsplit(":", 1)[1], r) for w, r in records] == [("1", {"text": "first"}), ("3", {"text": "second"})]


# ---- the class of inputs that lost part of a record silently, or crashed with a traceback
PROMPTED = {"prompt": "Q0", "chosen": "good", "rejected": "bad"}
MESSAGES = lambda *turns: [{"role": r, "content": c} for r, c in turns]  # noqa: E731


@pytest.mark.parametrize("rows, message", [
    # a later record of another layout: its prompt would be read by the first record's layout, i.e. dropped
    ([PROMPTED, {"conversations": [{"from": "human", "value": "Q"}], "chosen": "a", "rejected": "b"}],
     "are layout medicalgpt, but this file's first record"),
    # a misspelled prompt field: the pair would train prompt-less
    ([PROMPTED, {"promt": "Q1", "chosen": "good", "rejected": "bad"}], "no prompt, while this file's first record"),
    ([{"chosen": "good", "rejected": "bad"}, PROMPTED], "a prompt, while this file's first record"),
    # Alpaca-style or question-style prompts in a layout that does not read them
    ([{"instruction": "Translate", "input": "hello", "chosen": "a", "rejected": "b"}] * 2,
     "field 'instruction' is not read by layout trl"),
    ([{"question": "Q", "chosen": "a", "rejected": "b"}] * 2, "field 'question' is not read by layout trl"),
    ([{**PROMPTED, "system": "Be brief."}] * 2, "field 'system' is not read by layout trl"),
    # an explicit prompt with chosen and rejected in different contexts
    ([{"prompt": "Hi", "chosen": MESSAGES(("user", "A?"), ("assistant", "good")),
       "rejected": MESSAGES(("user", "B?"), ("assistant", "bad"))}] * 2, "must share every message but the last"),
    # LLaMA-Factory: a reply given as several turns
    ([{**GOOD, "chosen": [{"from": "human", "value": "OTHER"}, {"from": "gpt", "value": "good"}],
       "rejected": {"from": "gpt", "value": "bad"}}] * 2, "field 'chosen' must be one assistant message, got 2"),
    # a prompt the reply cannot answer
    ([{**GOOD, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}] * 2,
     "field 'conversations': the prompt's last message has role 'assistant'"),
    ([{**GOOD, "conversations": [{"from": "system", "value": "S"}]}] * 2,
     "the prompt's last message has role 'system'"),
    # null or missing, named as such
    ([{"chosen": None, "rejected": "b"}] * 2, "field 'chosen' must be a string or a non-empty list of messages, "
                                              "got null"),
])
def test_records_that_would_lose_part_of_themselves_are_refused(tmp_path, rows, message):
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as err:
        read_file(f)
    line = 2 if rows[0] != rows[-1] else 1
    assert str(err.value).startswith(f"{f}:{line}: ") and message in str(err.value), err.value


def test_a_text_cut_inside_a_character_is_refused(tmp_path):
    """The JSON escape of half a UTF-16 pair (JavaScript's substring on an emoji writes it): valid JSON, not text."""
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD).replace('"a"', '"good \\ud800 x"') + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'chosen' holds an unpaired UTF-16 surrogate"):
        read_file(f)


def test_fields_no_layout_reads_are_named_in_the_log(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{**PROMPTED, "id": i, "score_chosen": 8.0} for i in range(3)])
    logged = []
    assert len(read_pairs(str(f), log=logged.append)) == 3
    assert logged[-1].endswith("layout trl; fields not read: id (3 records), score_chosen (3 records)"), logged


def test_a_json_array_is_read_whole_whatever_the_suffix_and_one_json_object_is_explained(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps([PROMPTED, PROMPTED], indent=2))
    assert len(read_file(f)[1]) == 2
    f = tmp_path / "o.json"
    f.write_text(json.dumps({"data": [PROMPTED]}, indent=2))
    with pytest.raises(DataError, match=r"o.json:1: the file is one JSON object over several lines; .*its field "
                                        r"'data' holds a list"):
        read_file(f)


def test_a_corrupt_parquet_file_is_named_and_other_files_of_a_directory_are_logged(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [PROMPTED])
    write_jsonl(tmp_path / "b.ndjson", [PROMPTED])
    (tmp_path / "extra.xlsx").write_text("prompt,chosen,rejected\n")
    logged = []
    assert len(read_pairs(str(tmp_path), log=logged.append)) == 2
    assert f"{tmp_path}: skipped 1 files that are not" in logged[0] and "extra.xlsx" in logged[0], logged
    (tmp_path / "c.parquet").write_text(json.dumps(PROMPTED) + "\n")  # JSON lines under a .parquet name
    with pytest.raises(DataError, match=r"c.parquet: not a readable Parquet file \(ArrowInvalid"):
        read_pairs(str(tmp_path), log=lambda m: None)


def test_csv_and_tsv_files_are_read_with_their_header_as_field_names(tmp_path):
    (tmp_path / "pairs.csv").write_text('prompt,chosen,rejected,margin\n"Say hi, politely",Hello!,go away,1.5\n'
                                        '\nq2,"a reply\nover two lines",meh,\n', encoding="utf-8")
    layout, pairs = read_file(tmp_path / "pairs.csv")
    assert layout == "trl" and [(p.prompt[0]["content"], p.chosen, p.rejected, p.margin) for p in pairs] == [
        ("Say hi, politely", "Hello!", "go away", 1.5), ("q2", "a reply\nover two lines", "meh", 0.0)]
    assert pairs[1].source.endswith("pairs.csv:4")
    (tmp_path / "legacy.tsv").write_text("question\tresponse_chosen\tresponse_rejected\nq\tgood\tbad\n")
    layout, [pair] = read_file(tmp_path / "legacy.tsv")
    assert layout == "medicalgpt_legacy" and (pair.chosen, pair.rejected) == ("good", "bad")
    assert len(read_pairs(str(tmp_path), log=lambda m: None)) == 3  # a directory reads its tables too


@pytest.mark.parametrize("text, message", [
    ("prompt,chosen,rejected\np,a,b\np,a,b,extra\n", "bad.csv:3: 4 columns, but the header row has 3"),
    ("prompt,chosen,rejected\np,a,b\np,a\n", "bad.csv:3: 2 columns, but the header row has 3"),
    ("prompt,chosen,chosen\np,a,b\n", "bad.csv:1: the header row must name every column once"),
    ("prompt,chosen,rejected,margin\np,a,b,lots\n", "bad.csv:2: field 'margin' must be a number"),
    ("prompt,chosen,rejected\np,a,\n", "bad.csv:2: field 'rejected' is empty"),
    ("prompt,chosen,rejected\np,a,b\n\n", None),
])
def test_a_bad_table_row_names_file_and_line(tmp_path, text, message):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    if message is None:
        assert len(read_file(f)[1]) == 1
        return
    with pytest.raises(DataError) as err:
        read_file(f)
    assert message in str(err.value), str(err.value)
