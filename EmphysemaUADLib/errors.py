"""The one exception type that carries a message meant for the user."""
from __future__ import annotations

import re
from typing import Callable


class InputError(Exception):
    """Bad input or a failed precondition; its message is shown as is, without a traceback.

    `settings`: the options the message names, by their library names ("patch_size"),
    written in the message in words ("patch size"); a front end that spells them otherwise
    (the command line: --patch-size) rewrites the message with `message_for`."""

    def __init__(self, message: str, *settings: str):
        super().__init__(message)
        self.settings = settings


def words(setting: str) -> str:
    """How a message names a setting: "patch_size" -> "patch size"."""
    return setting.replace("_", " ")


def setting_error(setting: str, problem: str) -> InputError:
    """An InputError about one setting: "<setting in words> <problem>"."""
    return InputError(f"{words(setting)} {problem}", setting)


def message_for(exc: InputError, spell: Callable[[str], str]) -> str:
    """The message with each of its settings as a front end spells it (e.g. its CLI flag)."""
    text = str(exc)
    for setting in sorted(exc.settings, key=len, reverse=True):
        pattern = rf"(?<![\w./-]){re.escape(words(setting))}(?![\w./-])"  # not in a path
        text = re.sub(pattern, lambda _: spell(setting), text)
    return text
