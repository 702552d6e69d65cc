"""The dependency ranges rm supports, read from rm/dependencies.txt (pyproject.toml's dependencies are that same
file), and the start-up check of train.py and the command-line tools: a package that is missing or outside its
range is one line and exit 2, before anything heavy is imported (importlib.metadata reads versions without
importing the packages; a too-old transformers would otherwise fail at import with a traceback)."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

DEPENDENCIES = Path(__file__).with_name("dependencies.txt")


def supported_ranges(path: Path = DEPENDENCIES) -> list[str]:
    """The requirement lines ('transformers>=5.17'), comments and blank lines left out."""
    lines = (line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def unmet(requirements: list[str]) -> str | None:
    """The first requirement the installed packages do not meet, as one line; None when all are met."""
    from packaging.requirements import Requirement

    for line in requirements:
        requirement = Requirement(line)
        if not requirement.specifier:  # no range: installed with rm, not checked (tensorboard, plots: optional uses)
            continue
        try:
            found = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            return f"{requirement.name} is not installed; rm needs {line} (supported versions: docs/stack.md)"
        if not requirement.specifier.contains(found, prereleases=True):
            return (f"{requirement.name} {found} is installed; rm needs {line} (supported versions: "
                    "docs/stack.md)")
    return None


def require_supported_dependencies() -> None:
    """Exit 2 with one line when a dependency is missing or outside its supported range."""
    problem = unmet(supported_ranges())
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
