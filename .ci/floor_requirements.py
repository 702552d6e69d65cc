"""Prints the floor environment's requirements: requirements.txt (the lock) with each package that has a floor in
rm/dependencies.txt pinned at that floor instead. torch keeps the lock's version: the registry serves a CPU build
for that version only (torch's floor, 2.11, is exercised by the GPU matrix, bench/gpu_matrix.sh)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEEP_LOCKED = {"torch"}


def lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


floors = {}
for requirement in lines(ROOT / "rm" / "dependencies.txt"):
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([^\s,]+)", requirement)
    if match and match[1] not in KEEP_LOCKED:
        floors[match[1].lower()] = match[2]
for requirement in lines(ROOT / "requirements.txt"):
    name = re.split(r"[=<>!~\[ ;]", requirement)[0].lower()
    print(f"{name}=={floors.pop(name)}" if name in floors else requirement)
for name, floor in floors.items():  # a floored package the lock does not name
    print(f"{name}=={floor}")
