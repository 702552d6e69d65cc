"""The README a user reads: each layout example is read by the trainer's reader as the layout it is named, and
every link goes to a file that exists."""

import json
import re

from conftest import ROOT
from rm.data import read_pairs

README = (ROOT / "README.md").read_text(encoding="utf-8")
LAYOUTS = ["medicalgpt", "medicalgpt_legacy", "llamafactory", "trl", "trl", "hh-rlhf (implicit prompt)", "trl"]


def test_every_layout_example_is_read_as_named(tmp_path):
    block = README.split("```jsonl\n", 1)[1].split("```", 1)[0]
    examples = block.strip().splitlines()
    assert len(examples) == len(LAYOUTS)
    for number, (line, layout) in enumerate(zip(examples, LAYOUTS)):
        path = tmp_path / f"example{number}.jsonl"
        path.write_text(line + "\n", encoding="utf-8")
        logged = []
        [pair] = read_pairs(str(path), log=logged.append)
        assert logged[-1].endswith(f"1 pairs, layout {layout}"), (line, logged)
        assert pair.chosen.startswith(("Hello!", "A tidy")) and pair.rejected in ("Go away.", "A mess.")
        assert bool(pair.prompt) == ("Hi?" in json.dumps(json.loads(line)))


def test_the_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        assert (ROOT / target).exists(), target
