"""Every command-line tool takes --a_b and --a-b alike (train.py, rm.score, rm.plan, rm.validate, rm.bench), and
its refusals name an option once, in its declared spelling."""

import pytest

from conftest import ROOT
from rm.cli import OneLineParser
from rm.cli.bench import main as bench_main
from rm.cli.plan import parse_args as plan_args
from rm.cli.score import parse_args as score_args
from rm.cli.validate import main as validate_main
from rm.config import parse_config


@pytest.mark.parametrize("spelling", ["_", "-"])
def test_every_tool_takes_both_spellings(spelling, capsys):
    def flag(name: str) -> str:
        return "--" + name.replace("_", spelling)

    assert parse_config([flag("per_device_train_batch_size"), "3"]).per_device_train_batch_size == 3
    assert score_args(["--model", "m", "--data", "d", flag("batch_size"), "4",
                       flag("max_source_length"), "7"]).batch_size == 4
    assert plan_args(["--model", "qwen3-0.6b", flag("gpus_per_node"), "2", flag("gpu_memory"), "40"]).gpus_per_node == 2
    yaml = str(ROOT / "accelerate_configs" / "zero2_1node.yaml")
    assert validate_main([flag("accelerate_config"), yaml, flag("num_machines"), "1", flag("num_processes"), "2",
                          flag("gpus_per_node"), "2"]) == 0
    with pytest.raises(SystemExit) as stop:  # parsed, then refused for its value: the spelling was known
        bench_main([flag("max_steps"), "four"])
    assert stop.value.code == 2
    assert "argument --max_steps: invalid int value: 'four'" in capsys.readouterr().err


def test_a_refusal_names_the_option_once_and_help_lists_it_once(capsys):
    parser = OneLineParser(prog="tool")
    parser.add_argument("--batch_size", type=int)
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch-size", "x"])
    assert capsys.readouterr().err == "error: argument --batch_size: invalid int value: 'x' (see --help)\n"
    assert "--batch-size" not in parser.format_help() and "--batch_size" in parser.format_help()
