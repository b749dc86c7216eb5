"""Built-in plugin `char`: one token per character, learned from a corpus.

Ids 0-3 are always ``<pad> <unk> <bos> <eos>``; the corpus characters follow in
code-point order. A character the vocabulary lacks becomes ``<unk>``, and the
tokenizer warns once per new character, listing them, so nothing is dropped
silently. `extend` appends characters after the existing ones (old ids never move),
so an extended vocabulary is no longer wholly in code-point order.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from typing import Any

from gpt_runtime.errors import QuillError, QuillWarning, UsageError
from gpt_runtime.hf_tokenizer import bpe_model, tokenizer_json
from gpt_runtime.hookspecs import hookimpl
from gpt_runtime.tokenizer import Progress, Tokenizer

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


class CharTokenizer(Tokenizer):
    """Character-level tokenizer with a fixed `<unk>` policy."""

    kind = "char"

    def __init__(self, chars: list[str]) -> None:
        if len(set(chars)) != len(chars) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise QuillError("a char vocabulary must be distinct single characters")
        self.chars = list(chars)
        self.special_tokens = {name: i for i, name in enumerate(SPECIALS)}
        self.stoi = {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}
        try:
            self.pieces = [s.encode("utf-8") for s in SPECIALS] + [c.encode("utf-8") for c in self.chars]
        except UnicodeEncodeError as exc:
            raise QuillError(f"a char vocabulary cannot hold the lone surrogate U+{ord(exc.object[exc.start]):04X}") from None
        self._reported: set[str] = set()

    @classmethod
    def train(cls, text: str, vocab_size: int | None = None, progress: Progress | None = None, **options: Any) -> "CharTokenizer":
        """Learn the characters of `text`; with `vocab_size`, keep only the most frequent."""
        if options:
            raise UsageError(f"the char tokenizer takes no options (got {', '.join(sorted(options))})")
        counts = Counter(text)
        if vocab_size is not None:
            if vocab_size <= len(SPECIALS):
                raise UsageError(f"vocab size {vocab_size} is too small for a char tokenizer", hint=f"it needs more than {len(SPECIALS)} (its special tokens)")
            # most frequent first; equal counts by code point, so training is deterministic
            ranked = sorted(counts, key=lambda c: (-counts[c], c))
            keep = ranked[: vocab_size - len(SPECIALS)]
        else:
            keep = list(counts)
        if progress:
            progress(1, 1)
        return cls(sorted(keep))

    @classmethod
    def from_content(cls, content: dict[str, Any], special_tokens: dict[str, int]) -> "CharTokenizer":
        if special_tokens != {name: i for i, name in enumerate(SPECIALS)}:
            raise QuillError(f"char tokenizer special tokens must be {list(SPECIALS)} with ids 0-3")
        chars = content["chars"]
        if not isinstance(chars, list):
            raise QuillError("'chars' must be a list of characters")
        return cls(chars)

    def content(self) -> dict[str, Any]:
        return {"chars": self.chars}

    def hf_tokenizer_json(self) -> dict[str, Any]:
        """A BPE model with no merges and no pre-split: each character is looked up
        alone, unknown ones become <unk>, the same ids as here. (HuggingFace turns
        special-token text such as "<eos>" into its id; Quill only when asked.)"""
        model = bpe_model({**self.special_tokens, **self.stoi}, [], unk_token="<unk>")
        return tokenizer_json(model, self, None, {"type": "Fuse"})

    def missing(self, text: str) -> Counter[str]:
        """The characters of `text` outside the vocabulary, counted, first seen first."""
        absent = set(text).difference(self.stoi)  # set() runs in C: the common case costs little
        return Counter(c for c in text if c in absent) if absent else Counter()

    def extend(self, chars: Iterable[str]) -> "CharTokenizer":
        """This vocabulary plus `chars` (in the order given, those it lacks), after the old ids."""
        new = [c for c in dict.fromkeys(chars) if c not in self.stoi]
        return CharTokenizer(self.chars + new)

    def encode_ordinary(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            pass
        unk = self.special_tokens["<unk>"]
        ids = [self.stoi.get(c, unk) for c in text]
        new = sorted({c for c in text if c not in self.stoi} - self._reported)
        if new:
            self._reported.update(new)
            shown = " ".join(repr(c) for c in new[:20]) + (" ..." if len(new) > 20 else "")
            warnings.warn(
                f"{len(new)} character(s) not in the char vocabulary became <unk>: {shown}",
                QuillWarning,
                stacklevel=3,
            )
        return ids


@hookimpl
def quill_register_tokenizers(register) -> None:
    register("char", CharTokenizer)
