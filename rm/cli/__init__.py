"""Command-line tools around the trainer (score, plan, validate, bench); nothing the trainer runs imports them.
Importing any of them first checks the installed dependencies (rm.dependencies: one line and exit 2 for a package
missing or outside its range, before the tool imports torch or transformers)."""

import argparse
import copy
from typing import Any, NoReturn

from rm.dependencies import require_supported_dependencies

require_supported_dependencies()


def other_spelling(option: str) -> str | None:
    """--a_b for --a-b and the other way round (train.py's parser takes both too); None when there is none."""
    if not option.startswith("--"):
        return None
    name = option[2:]
    other = name.replace("_", "-") if "_" in name else name.replace("-", "_")
    return "--" + other if other != name else None


class OneSpellingHelpFormatter(argparse.HelpFormatter):
    """--help lists each option once, in the spelling it was declared with."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        aliases = getattr(action, "spelling_aliases", ())
        if aliases:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in aliases]
        return super()._format_action_invocation(action)


class DefaultsHelpFormatter(OneSpellingHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none to show (None, or a flag that takes no value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals (a missing required option, `--batch_size abc`) are one line and exit 2, not the
    usage text; every `--a_b` option is also `--a-b` and the other way round."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", OneSpellingHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: Any, **kwargs: Any) -> argparse.Action:
        aliases = [alias for name in names if (alias := other_spelling(str(name))) and alias not in names]
        action = super().add_argument(*names, *aliases, **kwargs)
        action.spelling_aliases = tuple(aliases)  # type: ignore[attr-defined]  (hidden from --help)
        return action

    def error(self, message: str) -> NoReturn:
        # argparse names an option by all its spellings ("--batch_size/--batch-size"): keep the first
        for action in self._actions:
            for alias in getattr(action, "spelling_aliases", ()):
                message = message.replace("/" + alias, "")
        self.exit(2, f"error: {message} (see --help)\n")
