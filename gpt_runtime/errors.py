"""Errors meant for people.

Every failure a user can cause is raised as a `QuillError`: the message says what
went wrong and with which file or value, the hint says what to do. The CLI prints
them as one line on stderr (plus the hint) and never a traceback, unless
`QUILL_DEBUG=1` is set.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable


class QuillError(Exception):
    """A failure to report to the user: exit code 1 from the CLI."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(QuillError):
    """The command line itself is wrong: exit code 2 from the CLI."""

    exit_code = 2


class QuillWarning(UserWarning):
    """Something the user should know about that does not stop the work."""


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """Return 'did you mean X?' for the closest of `choices`, or None."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def env_flag(name: str) -> bool:
    """Whether environment variable `name` is set, and not to 0, false or no."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def debug_enabled() -> bool:
    """Whether the user asked for tracebacks (QUILL_DEBUG)."""
    return env_flag("QUILL_DEBUG")


def explain(exc: BaseException) -> tuple[str, str, str | None]:
    """How every interface tells a person about an error: (kind, message, hint).

    A `QuillError` is an "error" with its own message and hint; anything else is a
    bug, here or in a plugin: an "internal error" naming its type, with the way to
    see its traceback.
    """
    if isinstance(exc, QuillError):
        return "error", exc.message, exc.hint
    return "internal error", f"{type(exc).__name__}: {exc}", "run again with QUILL_DEBUG=1 for the traceback, and please report it"
