"""Data directories (see `data_writer` for what they hold): `prepare` one from a text
file, `DataDir` to read one, and the batches training and evaluation draw from it.

The corpus is read and encoded in blocks, so it never has to fit in memory, and
training reads the .bin files through a memory map. The validation split is the
last `val_fraction` of the corpus (by bytes, moved to a line start), as in the
usual Tiny Shakespeare figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpus_prepare import prepare_corpus
from .data_writer import META_VERSION
from .errors import QuillError
from .tokenizer import Tokenizer, load_tokenizer


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
