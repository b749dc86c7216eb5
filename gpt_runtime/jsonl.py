"""Documents from a JSON Lines file: one JSON object per line, its text in one field.

The file is read a line at a time, so its size does not matter. A line that is not
a JSON object with a string in the field is an error naming the file and the line,
or, when the caller allows it, skipped and counted. Blank lines are ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import QuillError


@dataclass(frozen=True)
class Record:
    """One document of a JSON Lines file: its text and the bytes [start, end) of its line."""

    text: str
    start: int
    end: int


def read_records(path: str | os.PathLike, field: str = "text", skip_bad: bool = False,
                 on_bad: Callable[[int], None] | None = None) -> Iterator[Record]:
    """Yield the records of a JSON Lines file in order. With `skip_bad`, lines that are
    not records are skipped, each line number given to `on_bad`."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a byte-order mark is not part of the first record
            if not line.strip():
                continue
            problem, text = _parse(line, field)
            if problem is None:
                yield Record(text, start, offset)
            elif skip_bad:
                if on_bad:
                    on_bad(number)
            else:
                raise QuillError(f"{os.fspath(path)}:{number}: {problem}",
                                 hint="fix the line, or pass --skip-bad to leave such lines out")


def _parse(line: bytes, field: str) -> tuple[str | None, str]:
    """(None, the text) for a good line, else (what is wrong with it, "")."""
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return f"not UTF-8 (invalid byte 0x{line[exc.start]:02x})", ""
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg} at column {exc.colno})", ""
    except RecursionError:
        return "JSON nested too deeply", ""
    if not isinstance(value, dict):
        return f"not a JSON object but {type(value).__name__}", ""
    if field not in value:
        return f"has no {field!r} field (it has {', '.join(map(repr, list(value)[:5])) or 'none'})", ""
    text = value[field]
    if not isinstance(text, str):
        return f"its {field!r} field is {type(text).__name__}, not a string", ""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a "\ud800" escape: JSON allows it, Unicode does not
        return f"its {field!r} field holds a lone surrogate, which is not valid Unicode", ""
    return None, text
