"""How the training commands end on a user's mistake: `error: <what is wrong and what to do>` on stderr, exit
status 1, no traceback. Any other exception is a bug and keeps its traceback.

    if __name__ == "__main__":
        with user_errors_exit():
            main()
"""

from __future__ import annotations

import contextlib

from .data import DataFormatError, DataNotFoundError


class UsageError(ValueError):
    """A command-line value that cannot work: a resume that would change the run, a device that is not there,
    a folder without the file the command reads. The message names the flag or file and what to do instead."""


USER_ERRORS = (UsageError, DataNotFoundError, DataFormatError)


def flag(name: str, value=None) -> str:
    """A config field's command-line flag: flag("batch_size") is "--batch-size"; with a value, the words that
    set it: "--batch-size 64", and for a bool "--class-norm" or "--no-class-norm"."""
    option = "--" + name.replace("_", "-")
    if value is None:
        return option
    if isinstance(value, bool):
        return option if value else "--no-" + option.removeprefix("--")
    return f"{option} {value}"


@contextlib.contextmanager
def user_errors_exit():
    try:
        yield
    except USER_ERRORS as err:
        raise SystemExit(f"error: {err}") from None
