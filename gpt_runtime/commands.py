"""Slash commands: one registry that every interface uses.

Commands are registered by plugins (the built-in ones by `plugins/commands.py`)
through the ``quill_register_commands`` hook::

    @hookimpl
    def quill_register_commands(register):
        register("/shout", shout, help="say it louder", usage="/shout TEXT")

    def shout(session, args: str):
        if not args:
            raise UsageError("say what?")
        return args.upper()

A handler gets the `ChatSession` and the text after the command name. It
returns text to show, an iterator of events to stream like a reply (`Notice`,
`Token`, `Done`), `QUIT` to end the chat, or None. A `UsageError` it raises is
shown with the command's usage. ``complete=fn(session, partial) -> [str]``
offers tab completions for its argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import QuillError, UsageError, did_you_mean
from .registry import Entry

class _Quit:
    def __repr__(self) -> str:
        return "QUIT"


QUIT = _Quit()  # what /quit returns; interfaces end the chat on it

Completer = Callable[[Any, str], list[str]]


def commands() -> list[Entry]:
    """Every registered command, sorted by name; `meta` has help, usage, complete."""
    from .plugins import get_registry

    return get_registry().entries("commands")


def find(name: str) -> Entry:
    """The command called `name` (with its slash), or an error suggesting the closest."""
    from .plugins import get_registry

    registry = get_registry()
    if name in registry.names("commands"):
        return registry.get("commands", name)
    names = registry.names("commands")
    raise UsageError(f"unknown command {name}", hint=did_you_mean(name, names) or "/help lists the commands")


def run(session: Any, line: str) -> Any:
    """Run one command line such as ``/set temperature 0.7``; returns what the handler does."""
    name, _, args = line.strip().partition(" ")
    entry = find(name)
    try:
        return entry.obj(session, args.strip())
    except UsageError as exc:
        usage = entry.meta.get("usage")
        raise UsageError(exc.message, hint=exc.hint or (f"usage: {usage}" if usage else None)) from None
    except QuillError:
        raise
    except Exception as exc:  # a plugin's command failed: say which, and keep the chat going
        raise QuillError(f"command {name} (plugin {entry.plugin!r}) failed: {type(exc).__name__}: {exc}") from exc


def complete(session: Any, line: str) -> list[str]:
    """Completions for a partly typed command line: names first, then the argument."""
    if " " not in line:
        return [e.name for e in commands() if e.name.startswith(line)]
    name, _, partial = line.partition(" ")
    try:
        entry = find(name)
    except QuillError:
        return []
    completer: Completer | None = entry.meta.get("complete")
    return completer(session, partial) if completer else []
