"""Writing a data directory: corpus text read in blocks that encode as they would whole,
and the token ids (with chat data's loss mask) of each split, then meta.json.

A data directory holds::

    train.bin  val.bin   token ids, uint16 when the vocabulary fits, else uint32
    train.mask val.mask  chat data only: one byte per token, 1 where the loss counts
                         (the model's turns), 0 elsewhere (system and user text)
    meta.json            counts, dtype, and the tokenizer's fingerprint
    tokenizer.json       the tokenizer itself, so the directory is enough to train

`corpus_prepare` (text) and `chat_data` (conversations) write them with these;
`data.DataDir` reads them. No torch here.
"""

from __future__ import annotations

import json
import os
import re
from array import array
from collections.abc import Iterator
from pathlib import Path

from .fileio import atomic_write_bytes, decode_corpus
from .tokenizer import Tokenizer

META_VERSION = 1
BLOCK_BYTES = 1 << 22  # corpus bytes encoded at a time


def _token_dtype(vocab_size: int) -> tuple[str, str]:
    """(array typecode, name) for ids of a vocabulary this big."""
    return ("H", "uint16") if vocab_size <= 1 << 16 else ("I", "uint32")


def line_start_after(f, offset: int, size: int) -> int:
    """The first offset >= `offset` that starts a line (or `size`)."""
    if offset <= 0:
        return 0
    f.seek(offset - 1)
    while offset < size:
        chunk = f.read(1 << 16)
        if not chunk:
            break
        nl = chunk.find(b"\n")
        if nl >= 0:
            return offset + nl
        offset += len(chunk)
    return size


# Whitespace after a character that is not whitespace, in the reversed block (so the
# last such place is found first): a candidate for where to end a block.
_CUT_CANDIDATE = re.compile(rb"[ \t\n](?:[\x21-\x7e]|[\x80-\xbf]{1,3}[\xc2-\xf4])")


def _safe_cut(data: bytes) -> int:
    """The last place every built-in BPE pre-split (gpt2, gpt4, words) has a chunk
    boundary, so the text either side encodes exactly as it would whole: before a
    space or tab that follows a non-space character, or before a newline that follows
    a letter or digit (gpt4 keeps newlines with the punctuation before them). 0 if none."""
    reversed_data = data[::-1]
    for m in _CUT_CANDIDATE.finditer(reversed_data):
        try:
            char = reversed_data[m.start() + 1:m.end()][::-1].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not char.isspace() and (m.group()[0] != 0x0A or char.isalnum()):
            return len(data) - 1 - m.start()
    return 0


def _cut(data: bytes) -> int:
    """Where to end a block: at its last safe place (see `_safe_cut`), else after its
    last newline, else at a character boundary."""
    cut = _safe_cut(data)
    if cut:
        return cut
    cut = data.rfind(b"\n") + 1
    if cut:
        return cut
    cut = len(data)
    while cut > 0 and data[cut - 1] & 0xC0 == 0x80:  # inside a multi-byte character
        cut -= 1
    return cut - 1 if cut and data[cut - 1] >= 0xC0 else len(data)


def text_blocks(f, start: int, end: int, path: str, progress=None) -> Iterator[str]:
    """Corpus bytes [start, end) of open file `f` as text, a block at a time (each ends
    where BPE encodes the same whole or cut, see `_cut`); `progress(offset, None)` after each."""
    f.seek(start)
    block_start, carry = start, b""
    while block_start < end:
        data = carry + f.read(min(BLOCK_BYTES, end - block_start - len(carry)))
        if block_start + len(data) < end:
            cut = _cut(data)
            data, carry = data[:cut], data[cut:]
        else:
            carry = b""
        yield decode_corpus(data, path, block_start)
        block_start += len(data)
        if progress:
            progress(block_start, None)


class SplitWriter:
    """The token ids of one split (and, for chat data, their loss mask), written to
    temporary files as they come; `commit` renames them into place."""

    def __init__(self, out: Path, name: str, vocab_size: int, masked: bool = False) -> None:
        self.out, self.name = out, name
        self.typecode, self.dtype = _token_dtype(vocab_size)
        self.tokens = 0
        self._ids = open(out / f".{name}.bin.tmp", "wb")
        self._mask = open(out / f".{name}.mask.tmp", "wb") if masked else None

    def write(self, ids: list[int], mask: list[bool] | None = None) -> None:
        """Append `ids`; chat data gives each its `mask` (True: the loss counts there)."""
        if (mask is None) != (self._mask is None) or (mask is not None and len(mask) != len(ids)):
            raise ValueError("a masked split needs one mask value per token, an unmasked one none")
        array(self.typecode, ids).tofile(self._ids)
        if self._mask is not None:
            self._mask.write(bytes(bytearray(map(bool, mask))))
        self.tokens += len(ids)

    @property
    def masked(self) -> bool:
        return self._mask is not None

    def _files(self) -> list[str]:
        return [f"{self.name}.bin"] + ([f"{self.name}.mask"] if self._mask is not None else [])

    def close(self) -> None:
        self._ids.close()
        if self._mask is not None:
            self._mask.close()

    def discard(self) -> None:
        """Close and remove the temporary files (an earlier preparation stays as it was)."""
        self.close()
        for name in self._files():
            (self.out / f".{name}.tmp").unlink(missing_ok=True)

    def commit(self) -> None:
        self.close()
        for name in self._files():
            os.replace(self.out / f".{name}.tmp", self.out / name)


def write_data_dir(out: Path, splits: list[SplitWriter], tok: Tokenizer, meta: dict) -> dict:
    """Finish a preparation: move the splits into place, then write tokenizer.json and
    meta.json (counts, dtype, fingerprint and mask added to `meta`). Returns the metadata."""
    # Without meta.json the directory is not usable, so a crash while the files
    # below are replaced leaves nothing that mixes two preparations.
    (out / "meta.json").unlink(missing_ok=True)
    for name in ("train.mask", "val.mask"):  # a mask left by an earlier chat preparation
        (out / name).unlink(missing_ok=True)
    for split in splits:
        split.commit()
    meta = {"version": META_VERSION, **meta, "dtype": splits[0].dtype, "vocab_size": tok.vocab_size,
            "tokenizer_kind": tok.kind, "tokenizer_fingerprint": tok.fingerprint,
            **{f"{split.name}_tokens": split.tokens for split in splits},
            "mask": splits[0].masked}
    tok.save(out / "tokenizer.json")
    atomic_write_bytes(out / "meta.json", (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode())
    return meta
