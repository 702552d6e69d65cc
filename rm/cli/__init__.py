"""Command-line tools around the trainer (score, plan, validate, bench); nothing the trainer runs imports them.
Importing any of them first checks the installed dependencies (rm.dependencies: one line and exit 2 for a package
missing or outside its range, before the tool imports torch or transformers)."""

import argparse
from typing import NoReturn

from rm.dependencies import require_supported_dependencies

require_supported_dependencies()


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none to show (None, or a flag that takes no value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals (a missing required option, `--batch_size abc`) are one line and exit 2, not the
    usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")
