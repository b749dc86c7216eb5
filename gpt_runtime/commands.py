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
returns text to show (a `str`), an iterator of events to stream like a reply
(`Notice`, `Token`, `Done`), `QUIT` to end the chat, or None; or one of the
result types below, which tell an interface what changed so that it can show it
its own way (the full-screen chat redraws the turns after `TurnsChanged`, opens
its job panel on `JobsChanged`, ...). Every interface renders results by type,
never by command name, so a plugin's command is treated as a built-in one is.
A `UsageError` it raises is shown with the command's usage. In the full-screen
chat, before any model has loaded (the first one failed), `session` is a stand-in
whose `profile` is None and whose other attributes raise a `QuillError` saying
how to load one; `/profile NAME` loads one through it.
``complete=fn(session, partial) -> [str]`` offers tab completions for its argument.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .errors import QuillError, UsageError, did_you_mean
from .plugins import get_registry
from .registry import Entry


class Quit:
    """End the chat (the one instance is `QUIT`)."""

    def __repr__(self) -> str:
        return "QUIT"


QUIT = Quit()  # what /quit returns; interfaces end the chat on it


class Text(str):
    """Text to show. Every result that has text is a `Text`, and so a `str`: an
    interface that knows no better view of a result shows it as text."""


class CommandHelp(Text):
    """The list of commands (the full-screen chat shows its help screen instead)."""


class TurnsChanged(Text):
    """The conversation changed from turn `kept` on (/undo, /clear, /load): redraw those turns."""

    kept: int

    def __new__(cls, text: str, kept: int) -> TurnsChanged:
        result = super().__new__(cls, text)
        result.kept = kept
        return result


class Resumed(TurnsChanged):
    """The conversation is now a saved session's (/resume): show its turns (kept is 0), and
    turn `at`, when it was resumed at a message (a search hit)."""

    at: int | None

    def __new__(cls, text: str, at: int | None = None) -> Resumed:
        result = super().__new__(cls, text, 0)
        result.at = at
        return result

    @classmethod
    def saying(cls, session: Any, number: int, said: list[str]) -> Resumed:
        """What /resume and `quill chat --resume` say: which session, its profile and turns, and `said`."""
        turns = len(session.turns)
        return cls(f"resumed session {number} with {session.profile.name}: {turns} turn{'s' if turns != 1 else ''}"
                   + "".join(f"; {line}" for line in said), session.resumed_at)


class Found(Text):
    """Saved messages that matched a search (/find): `hits`, each a `store.Hit` with its session's title."""

    hits: list[Any]

    def __new__(cls, text: str, hits: list[Any]) -> Found:
        result = super().__new__(cls, text)
        result.hits = hits
        return result


class JobsChanged(Text):
    """About the background jobs (started, listed, cancelled): the job panel shows them."""


class TokenView(Text):
    """How a tokenizer splits `source`: its `ids` and each one's text in `pieces`."""

    source: str
    ids: list[int]
    pieces: list[str]
    kind: str

    def __new__(cls, tokenizer: Any, source: str) -> TokenView:
        ids = tokenizer.encode(source)
        pieces = [tokenizer.decode([i]) for i in ids]
        text = f"{len(ids)} tokens: " + " ".join(f"{json.dumps(p, ensure_ascii=False)}:{i}" for p, i in zip(pieces, ids))
        result = super().__new__(cls, text)
        result.source, result.ids, result.pieces, result.kind = source, ids, pieces, tokenizer.kind
        return result


class Comparison(Text):
    """The last message answered two ways (`sides`, each with `side`, `text`, `seed`, speed)."""

    sides: list[Any]

    def __new__(cls, sides: list[Any]) -> Comparison:
        text = "\n\n".join(f"[{s.side}]  {s.tokens_per_second:.0f} tokens/s, seed {s.seed}\n{s.text}" for s in sides)
        result = super().__new__(cls, text)
        result.sides = sides
        return result


class Reply:
    """A reply to stream in place of the last one (/regen): iterate it for its events.

    With `kept` (/edit), the conversation changed from turn `kept` on: redraw those turns
    (the last one's reply is the one streaming)."""

    def __init__(self, events: Iterable[Any], kept: int | None = None) -> None:
        self.events, self.kept = events, kept

    def __iter__(self) -> Iterator[Any]:
        return iter(self.events)


Result = Text | Reply | Quit | None

Completer = Callable[[Any, str], list[str]]


def commands() -> list[Entry]:
    """Every registered command, sorted by name; `meta` has help, usage, complete."""
    return get_registry().entries("commands")


def find(name: str) -> Entry:
    """The command called `name` (with its slash), or an error suggesting the closest."""
    registry = get_registry()
    if name in registry.names("commands"):
        return registry.get("commands", name)
    names = registry.names("commands")
    raise UsageError(f"unknown command {name}", hint=did_you_mean(name, names) or "/help lists the commands")


def run(session: Any, line: str) -> Result:
    """Run one command line such as ``/set temperature 0.7``; returns what the handler
    does, as a result type (a plain `str` becomes `Text`, an iterator a `Reply`)."""
    name, _, args = line.strip().partition(" ")
    entry = find(name)
    try:
        return _as_result(entry.obj(session, args.strip()))
    except UsageError as exc:
        usage = entry.meta.get("usage")
        raise UsageError(exc.message, hint=exc.hint or (f"usage: {usage}" if usage else None)) from None
    except QuillError:
        raise
    except Exception as exc:  # a plugin's command failed: say which, and keep the chat going
        raise QuillError(f"command {name} (plugin {entry.plugin!r}) failed: {type(exc).__name__}: {exc}") from exc


def _as_result(value: Any) -> Result:
    if value is None or isinstance(value, (Text, Reply, Quit)):
        return value
    if isinstance(value, str):
        return Text(value)
    return Reply(value)  # an iterator of events, as handlers written before the result types return


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
