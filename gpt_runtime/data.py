"""Corpus -> token ids on disk, and batches drawn from them.

`prepare` writes a data directory::

    train.bin  val.bin   token ids, uint16 when the vocabulary fits, else uint32
    train.mask val.mask  chat data only: one byte per token, 1 where the loss counts
                         (the model's turns), 0 elsewhere (system and user text)
    meta.json            counts, dtype, and the tokenizer's fingerprint
    tokenizer.json       the tokenizer itself, so the directory is enough to train

The corpus is read and encoded in blocks, so it never has to fit in memory, and
training reads the .bin files through a memory map. The validation split is the
last `val_fraction` of the corpus (by bytes, moved to a line start), as in the
usual Tiny Shakespeare figures.
"""

from __future__ import annotations

import json
import os
import re
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import QuillError
from .fileio import atomic_write_bytes, decode_corpus
from .tokenizer import Tokenizer, load_tokenizer

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


def prepare(
    corpus: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Tokenize one text file, `corpus`, into `out_dir` (train.bin, val.bin, meta.json,
    tokenizer.json): `corpus_prepare.prepare_corpus` with a single input. Returns the
    metadata written to meta.json."""
    from .corpus_prepare import prepare_corpus  # which builds on this module

    if Path(corpus).is_dir():
        raise QuillError(f"corpus {str(corpus)!r} is a directory, not a file", hint="name a text file")
    return prepare_corpus([corpus], tokenizer, out_dir, val_fraction, progress)


@dataclass
class DataDir:
    """A prepared data directory: its metadata, tokenizer and memory-mapped splits."""

    path: Path
    meta: dict
    tokenizer: Tokenizer

    @classmethod
    def open(cls, path: str | os.PathLike) -> "DataDir":
        path = Path(path)
        meta_path = path / "meta.json"
        if not path.is_dir():
            raise QuillError(f"data directory {str(path)!r} does not exist", hint="make one with `quill prepare CORPUS --tokenizer FILE --out DIR`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise QuillError(f"{str(path)!r} has no meta.json: not a prepared data directory", hint="make one with `quill prepare`") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise QuillError(f"{str(meta_path)!r} is corrupt (not JSON)", hint="run `quill prepare` again") from None
        if not isinstance(meta, dict):
            raise QuillError(f"{str(meta_path)!r} is corrupt (not a JSON object)", hint="run `quill prepare` again")
        if meta.get("version") != META_VERSION:
            raise QuillError(f"{str(meta_path)!r} has data format version {meta.get('version')!r}; this Quill reads {META_VERSION}", hint="run `quill prepare` again")
        missing = [key for key in ("dtype", "tokenizer_fingerprint", "train_tokens", "val_tokens") if key not in meta]
        if missing:
            raise QuillError(f"{str(meta_path)!r} is corrupt (it lacks {', '.join(missing)})", hint="run `quill prepare` again")
        tok = load_tokenizer(path / "tokenizer.json")
        if tok.fingerprint != meta["tokenizer_fingerprint"]:
            raise QuillError(
                f"{str(path)!r} was prepared with tokenizer {meta['tokenizer_fingerprint']}, "
                f"but its tokenizer.json is {tok.fingerprint}",
                hint="run `quill prepare` again",
            )
        return cls(path, meta, tok)

    def tokens(self, split: str) -> torch.Tensor:
        """The ids of one split as a 1-D tensor backed by a memory map."""
        n = self.meta[f"{split}_tokens"]
        file = self.path / f"{split}.bin"
        dtype = torch.uint16 if self.meta["dtype"] == "uint16" else torch.uint32
        expected = n * (2 if dtype is torch.uint16 else 4)
        if not file.is_file():
            raise QuillError(f"{str(file)!r} is missing", hint="run `quill prepare` again")
        actual = file.stat().st_size
        if actual != expected:
            raise QuillError(f"{str(file)!r} should hold {n} tokens ({expected} bytes) but has {actual} bytes", hint="run `quill prepare` again")
        if n == 0:
            return torch.zeros(0, dtype=torch.int64)
        return torch.from_file(str(file), shared=False, size=n, dtype=dtype)

    def mask(self, split: str) -> torch.Tensor | None:
        """Chat data's loss mask of one split (bool, True where the loss counts), memory-mapped;
        None for plain text, where every token counts."""
        if not self.meta.get("mask"):
            return None
        n = self.meta[f"{split}_tokens"]
        file = self.path / f"{split}.mask"
        if not file.is_file() or file.stat().st_size != n:
            raise QuillError(f"{str(file)!r} is missing or does not hold one byte per token ({n})", hint="run `quill prepare` again")
        if n == 0:
            return torch.zeros(0, dtype=torch.bool)
        return torch.from_file(str(file), shared=False, size=n, dtype=torch.bool)


class BatchSampler:
    """Random (input, target) windows from a token tensor, reproducible and resumable.

    Every rank draws the same global batch of offsets from one seeded generator and
    keeps its own slice, so N ranks with batch B see exactly what one process with
    batch N*B sees. `state()` / `load_state()` capture the position for exact resume.
    With a `mask` (chat data), targets where it is False are -1, which the loss ignores.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 mask: torch.Tensor | None = None) -> None:
        if len(tokens) <= block_size:
            raise QuillError(
                f"the split has {len(tokens)} tokens, not enough for one block of {block_size} (+1 target)",
                hint="use a longer corpus or a smaller --block-size",
            )
        self.tokens = tokens
        self.mask = mask
        self.block_size = block_size
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.tokens) - self.block_size
        offsets = torch.randint(high, (self.batch_size * self.world_size,), generator=self.generator)
        mine = offsets[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
        rows = torch.stack([self.tokens[i:i + self.block_size + 1] for i in mine]).to(torch.int64)
        x, y = rows[:, :-1], rows[:, 1:]
        if self.mask is not None:
            keep = torch.stack([self.mask[i + 1:i + self.block_size + 1] for i in mine])
            y = y.masked_fill(~keep, -1)
        return x, y

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def sequential_windows(tokens: torch.Tensor, block_size: int, batch_size: int, mask: torch.Tensor | None = None):
    """Yield (input, target) batches covering every token once, for exact evaluation.

    Windows do not overlap, so each target is predicted once with the context of
    its own window; the last window is shorter. Targets padded with -1 are ignored,
    as are those where `mask` (chat data) is False.
    """
    n = len(tokens) - 1  # the first token has nothing to predict it from
    starts = list(range(0, n, block_size))
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        x = torch.zeros(len(group), block_size, dtype=torch.int64)
        y = torch.full((len(group), block_size), -1, dtype=torch.int64)
        for row, s in enumerate(group):
            length = min(block_size, n - s)
            window = tokens[s:s + length + 1].to(torch.int64)
            x[row, :length] = window[:-1]
            y[row, :length] = window[1:]
            if mask is not None:
                y[row, :length].masked_fill_(~mask[s + 1:s + length + 1], -1)
        yield x, y
