"""Which files make a corpus: the files and directories the user names, expanded.

A file named on the command line is read whatever it holds, and what is wrong
with it is an error. A file found inside a directory is only a candidate: one that
is empty, binary (a NUL byte in its first 8 KiB) or not UTF-8 is skipped and
counted, so a folder of notes with a stray image in it still prepares. Hidden
files and folders (names starting with '.') inside directories are left out, as
`.git` would otherwise be read.
"""

from __future__ import annotations

import codecs
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import QuillError

SNIFF_BYTES = 8192  # how much of a file is searched for a NUL byte
READ_BYTES = 1 << 20  # bytes read at a time when checking a file is UTF-8
SKIP_REASONS = ("empty", "binary", "not UTF-8", "unreadable")


@dataclass(frozen=True)
class CorpusFile:
    """One input file: its path, its size in bytes, and whether it is JSON Lines."""

    path: Path
    size: int
    jsonl: bool


def is_jsonl(path: Path) -> bool:
    """Whether a file is read as JSON Lines (one document per line), by its suffix."""
    return path.suffix.lower() == ".jsonl"


def find_corpus_files(inputs: Iterable[str | os.PathLike], glob: str | None = None,
                      exclude: Path | None = None) -> tuple[list[CorpusFile], Counter[str]]:
    """The files `inputs` name, in order (a directory's files sorted, recursively,
    those matching `glob` only, none under `exclude`), each once, and the count of
    directory files skipped by reason (see `SKIP_REASONS`)."""
    files: list[CorpusFile] = []
    skipped: Counter[str] = Counter()
    seen: set[Path] = set()
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = _directory_files(path, glob or "*", exclude.resolve() if exclude else None)
        else:
            _check_named_file(path)
            found = [path]
        for file in found:
            key = file.resolve()
            if key in seen:
                continue
            seen.add(key)
            reason = skip_reason(file) if path.is_dir() else None
            if reason:
                skipped[reason] += 1
            else:
                files.append(CorpusFile(file, file.stat().st_size, is_jsonl(file)))
    return files, skipped


def _check_named_file(path: Path) -> None:
    """The errors for a file the user named (as `quill prepare` always gave them)."""
    if not path.exists():
        raise QuillError(f"corpus {str(path)!r} does not exist")
    if not path.is_file():
        raise QuillError(f"corpus {str(path)!r} is not a regular file", hint="name a text file or a directory")
    if not os.access(path, os.R_OK):
        raise QuillError(f"corpus {str(path)!r} cannot be read: permission denied")
    if path.stat().st_size == 0:
        raise QuillError(f"corpus {str(path)!r} is empty", hint="give it some text to learn from")


def _directory_files(root: Path, glob: str, exclude: Path | None) -> Iterator[Path]:
    """Files under `root` whose path relative to it matches `glob`, sorted, hidden ones
    and those under `exclude` (the data directory being written) left out."""
    for folder, dirs, names in os.walk(root):
        if exclude is not None and Path(folder).resolve() == exclude:
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(folder, name)
            if not name.startswith(".") and path.is_file() and PurePosixPath(path.relative_to(root).as_posix()).match(glob):
                yield path


def skip_reason(path: Path) -> str | None:
    """Why a file found in a directory is not text to learn from, or None if it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
            if not head or head == codecs.BOM_UTF8:
                return "empty"
            if b"\0" in head:
                return "binary"
            # Checked whole before any of it is encoded, so a bad byte near the end
            # skips the file rather than failing half-way through the preparation.
            decoder = codecs.getincrementaldecoder("utf-8")()
            block = head
            while block:
                decoder.decode(block)
                block = f.read(READ_BYTES)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not UTF-8"
    except OSError:
        return "unreadable"
    return None
