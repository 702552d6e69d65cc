"""The supported dependency ranges: one list (rm/dependencies.txt) that pyproject.toml installs from and the
start-up check reads; the lock inside it; a package below its floor is one line and exit 2 before any heavy import.
The old package is real metadata: a dist-info folder put first on PYTHONPATH, as an older install would be found."""

import os
import subprocess
import sys
import time

import pytest
from packaging.requirements import Requirement

from conftest import ROOT
from rm.dependencies import supported_ranges, unmet

pytestmark = pytest.mark.floor  # the floor environment must pass its own check


def ranges() -> dict[str, Requirement]:
    return {Requirement(line).name: Requirement(line) for line in supported_ranges()}


def test_pyproject_installs_the_list_the_check_reads():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["rm/dependencies.txt"]}
    assert "dependencies.txt" in project["tool"]["setuptools"]["package-data"]["rm"]
    floors = {name: str(req.specifier) for name, req in ranges().items()}
    for name, floor in {"torch": ">=2.11", "transformers": ">=5.17", "accelerate": ">=1.15", "peft": ">=0.21.0",
                        "deepspeed": ">=0.19.8", "datasets": ">=5.2"}.items():
        assert floors[name] == floor, name  # at or below the GPU machine's stock stack (docs/stack.md)


def test_the_lock_lies_inside_the_ranges_and_this_environment_passes():
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name] = version
    for name, requirement in ranges().items():
        if name in pins:
            assert requirement.specifier.contains(pins[name]), (name, pins[name])
    assert unmet(supported_ranges()) is None


def test_a_missing_package_or_one_outside_its_range_is_named():
    assert unmet(["transformers>=99"]).startswith("transformers ")
    assert "is installed; rm needs transformers>=99" in unmet(["transformers>=99"])
    assert unmet(["no-such-package-rm-test>=1"]).startswith("no-such-package-rm-test is not installed")
    assert unmet(["no-such-package-rm-test"]) is None  # no range: not checked at start
    assert unmet(["transformers<1"]) is not None and unmet(["transformers>=1", "torch>=1"]) is None


@pytest.mark.parametrize("command", [["train.py", "--model_name_or_path", "tiny"], ["-m", "rm.score", "--help"],
                                     ["-m", "rm.validate", "--help"], ["-m", "rm.plan", "--help"]],
                         ids=["train.py", "rm.score", "rm.validate", "rm.plan"])
def test_a_package_below_its_floor_stops_train_and_the_tools_in_one_line(tmp_path, command):
    old = tmp_path / "transformers-5.10.0.dist-info"  # what importlib.metadata finds first: an older install
    old.mkdir()
    (old / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.10.0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr == ("error: transformers 5.10.0 is installed; rm needs transformers>=5.17 (supported versions: "
                           "docs/stack.md)\n")
    assert elapsed < 5, elapsed  # torch and transformers are never imported


def test_the_check_imports_nothing_heavy():
    code = ("import sys; from rm.dependencies import require_supported_dependencies as check; check(); "
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'deepspeed', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "[]\n", proc.stderr
