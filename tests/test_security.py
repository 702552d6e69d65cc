"""Nothing read from a model or tokenizer folder runs code, through train.py and rm.score alike.

Each case plants a code path that writes a marker file: an `auto_map` to a module in the folder where transformers
finds no built-in class (it then asks on stdin whether to run the folder's code; every test answers "y"), pickled
weights with a payload, a chat template that reaches for Python internals. The run must stop with one line (exit 2)
and the marker must never appear."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

PAYLOAD = """from pathlib import Path
Path({marker!r}).write_text("code from the model folder ran")
"""


class Payload:
    """Unpickling it writes the marker (what a weights file from an untrusted folder could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code from the model folder ran"))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A real tiny model folder (weights, config, tokenizer), as train.py exports it."""
    from transformers import AutoModelForSequenceClassification

    from rm.model import load_tokenizer, tiny_config

    folder = tmp_path_factory.mktemp("model") / "tiny"
    tokenizer = load_tokenizer("tiny")
    AutoModelForSequenceClassification.from_config(tiny_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def plant(case: str, folder: Path, marker: Path) -> None:
    (folder / "evil.py").write_text(PAYLOAD.format(marker=str(marker)))
    if case == "config_auto_map":  # no model_type: transformers can only use the folder's classes
        edit_json(folder / "config.json", lambda c: (c.pop("model_type"), c.update(auto_map={
            "AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"})))
    elif case == "tokenizer_auto_map":
        (folder / "config.json").unlink()
        edit_json(folder / "tokenizer_config.json", lambda c: c.update(
            tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}))
    elif case == "pickled_weights":
        (folder / "model.safetensors").unlink()
        torch.save({"score.weight": torch.zeros(1, 64), "x": Payload(marker)}, folder / "pytorch_model.bin")
    elif case == "template_reaches_python":
        edit_json(folder / "tokenizer_config.json", lambda c: c.update(chat_template=(
            "{% for m in messages %}{{ m.content.__class__.__mro__[1].__subclasses__() }}{% endfor %}")))
        (folder / "chat_template.jinja").unlink(missing_ok=True)


CASES = ["config_auto_map", "tokenizer_auto_map", "pickled_weights", "template_reaches_python"]


def check_refused(proc: subprocess.CompletedProcess, marker: Path) -> None:
    assert not marker.exists(), "code from the model folder ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error: "), \
        proc.stderr[-3000:]


@pytest.mark.parametrize("case", CASES)
def test_train_refuses_a_folder_that_would_run_code(model_folder, tmp_path, case):
    folder, marker = Path(shutil.copytree(model_folder, tmp_path / "folder")), tmp_path / "marker"
    plant(case, folder, marker)
    model = "tiny" if case in ("tokenizer_auto_map", "template_reaches_python") else folder
    proc = subprocess.run([sys.executable, "train.py", "--model_name_or_path", model, "--tokenizer_name_or_path",
                           folder, "--output_dir", tmp_path / "out", "--use_peft", "false", "--max_steps", "1",
                           "--report_to", "none", "--max_train_samples", "16", "--max_eval_samples", "4"],
                          cwd=ROOT, input="y\n", capture_output=True, text=True, timeout=300)
    check_refused(proc, marker)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["config_auto_map", "pickled_weights", "template_reaches_python"])
def test_score_refuses_a_folder_that_would_run_code(model_folder, tmp_path, case):
    folder, marker = Path(shutil.copytree(model_folder, tmp_path / "folder")), tmp_path / "marker"
    plant(case, folder, marker)
    proc = subprocess.run([sys.executable, "-m", "rm.score", "--model", folder, "--data",
                           ROOT / "data/sample/eval.jsonl", "--output", tmp_path / "scores.jsonl"],
                          cwd=ROOT, input="y\n", capture_output=True, text=True, timeout=300)
    check_refused(proc, marker)
    assert not (tmp_path / "scores.jsonl").exists()
