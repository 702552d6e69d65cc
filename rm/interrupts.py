"""Ctrl-C at any moment is one line. An interrupt that nothing handles (while torch imports, before a tool's main()
runs, or in a tool without handling of its own) prints one line instead of a traceback. The exit status stays 130:
Python ends the process by SIGINT after the hook. Imports nothing heavy, so it can run first."""

from __future__ import annotations

import os
import sys
from types import TracebackType


def interrupts_in_one_line(tool: str) -> None:
    """Make an unhandled KeyboardInterrupt print `TOOL: interrupted ...` (on the main process only)."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
        if not issubclass(kind, KeyboardInterrupt):
            previous(kind, value, traceback)
        elif os.environ.get("RANK", "0") == "0":
            print(f"{tool}: interrupted ({str(value) or 'Ctrl-C'}); stopped at once", file=sys.stderr)

    sys.excepthook = hook
