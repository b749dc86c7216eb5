"""Reading the user's files with clear errors, and writing ours atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .errors import QuillError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one.

    The bytes go to a temporary file in the same directory, are fsynced, then
    renamed over `path` (rename is atomic on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_user_file(path: str | os.PathLike, what: str = "file") -> bytes:
    """Read a file the user named, turning OS errors into one-line QuillErrors."""
    path = Path(path)
    if path.is_dir():
        raise QuillError(f"{what} {str(path)!r} is a directory, not a file", hint="name a file inside it")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise QuillError(f"{what} {str(path)!r} does not exist") from None
    except PermissionError:
        raise QuillError(f"{what} {str(path)!r} cannot be read: permission denied") from None
    except OSError as exc:
        raise QuillError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None


def decode_corpus(data: bytes, path: str | os.PathLike, offset: int = 0) -> str:
    """UTF-8 bytes of a corpus (starting at byte `offset` of the file) to text."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QuillError(
            f"corpus {str(path)!r} is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset {offset + exc.start})",
            hint="convert it first, e.g. `iconv -f latin1 -t utf-8`",
        ) from None


def read_corpus(path: str | os.PathLike) -> str:
    """Read a UTF-8 text corpus; empty, binary or non-UTF-8 files are clear errors."""
    data = read_user_file(path, "corpus")
    if not data:
        raise QuillError(f"corpus {str(path)!r} is empty", hint="give it some text to learn from")
    text = decode_corpus(data, path)
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark is not part of the text
    if not text:
        raise QuillError(f"corpus {str(path)!r} is empty", hint="give it some text to learn from")
    return text


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, in hex, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
