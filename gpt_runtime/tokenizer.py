"""Tokenizers: the base class plugins implement, and the one file format for all kinds.

A tokenizer file is JSON::

    {"format": "quill-tokenizer", "version": 1, "kind": "bpe",
     "special_tokens": {"<pad>": 4092, ...}, "fingerprint": "...", ...content}

where ``content`` is whatever the kind needs (a character list, BPE merges and a
pre-split pattern). The fingerprint is a hash of the canonical JSON of everything
else, so two tokenizers with the same fingerprint encode identically; checkpoints
store it, and loading one with another tokenizer is an error naming both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, ClassVar, Literal

from .errors import QuillError
from .fileio import atomic_write_bytes, read_user_file
from .plugins import get_registry
from .registry import check_entries

FORMAT = "quill-tokenizer"
FORMAT_VERSION = 1
RESERVED_KEYS = frozenset({"format", "version", "kind", "special_tokens", "fingerprint"})

AllowedSpecial = Literal["all"] | Collection[str]
Progress = Callable[[int, int], None]
# The special token that ends a text: Quill's <eos>, or GPT-2's <|endoftext|> (which also starts one).
END_OF_TEXT = ("<eos>", "<|endoftext|>")


class Tokenizer:
    """Base class for tokenizer kinds. Plugin authors subclass it and implement:

    - ``kind``: the registered name, stored in files;
    - ``train(text, vocab_size=None, progress=None, **options)`` (classmethod);
    - ``from_content(content, special_tokens)`` (classmethod) and ``content()``:
      the kind-specific part of the file, as JSON-able data;
    - ``encode_ordinary(text)``: text to ids, never producing special tokens;
    - ``pieces``: a list, indexed by id, of the bytes each id stands for (a special
      token's piece is its name, UTF-8 encoded).

    Optional, for tokenizers with a fixed alphabet (the char kind): ``missing(text)``
    names the characters it cannot encode, and ``extend(chars)`` makes a tokenizer
    that also encodes them, keeping every existing id (`quill prepare --extend`).

    The base class adds special-token handling, decoding, fingerprints and files.
    """

    kind: ClassVar[str] = ""
    progress_unit: ClassVar[str] = ""  # what `train` counts in its progress calls
    special_tokens: dict[str, int]
    pieces: list[bytes]

    # --- to implement -------------------------------------------------------
    @classmethod
    def train(cls, text: str, vocab_size: int | None = None, progress: Progress | None = None, **options: Any) -> "Tokenizer":
        raise NotImplementedError

    @classmethod
    def from_content(cls, content: dict[str, Any], special_tokens: dict[str, int]) -> "Tokenizer":
        raise NotImplementedError

    def content(self) -> dict[str, Any]:
        raise NotImplementedError

    def encode_ordinary(self, text: str) -> list[int]:
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        """Extra facts for `quill tokenizer inspect`, e.g. ``{"pre_split": "gpt2"}``; optional."""
        return {}

    def hf_tokenizer_json(self) -> dict[str, Any]:
        """This tokenizer as a HuggingFace ``tokenizer.json`` with the same ids, for
        ``quill export --format hf``; optional (`gpt_runtime.hf_tokenizer` helps)."""
        raise QuillError(f"the {self.kind!r} tokenizer has no HuggingFace form",
                         hint="its plugin does not implement Tokenizer.hf_tokenizer_json()")

    def missing(self, text: str) -> Counter[str]:
        """The characters of `text` this tokenizer cannot encode (they would become
        ``<unk>``), with their counts, in the order first seen; optional. The default,
        right for byte-level tokenizers, is none."""
        return Counter()

    def extend(self, chars: Iterable[str]) -> "Tokenizer":
        """A tokenizer that also encodes `chars`: every existing id keeps its piece and
        the new ones follow (see `is_extension`); optional. Characters it already has
        are ignored, so ``extend([])`` is an equal tokenizer."""
        raise QuillError(f"the {self.kind!r} tokenizer cannot be extended",
                         hint="only tokenizers with a fixed alphabet (char) can; a byte-level BPE encodes every character already")

    # --- provided -----------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.pieces)

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Text to token ids.

        Special-token strings in `text` (``<eos>``...) are encoded as plain text
        unless named in `allowed_special` (or it is ``"all"``), so user text can
        never inject them by accident. Text that is not valid Unicode (a lone
        surrogate) is a QuillError.
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise QuillError(
                f"text has a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}, "
                "which is not valid Unicode and cannot be encoded"
            ) from None
        if allowed_special == "all":
            allowed = list(self.special_tokens)
        else:
            allowed = [s for s in allowed_special if s in self.special_tokens]
            unknown = set(allowed_special) - set(self.special_tokens)
            if unknown:
                raise QuillError(f"unknown special tokens {sorted(unknown)}", hint=f"this tokenizer has {sorted(self.special_tokens)}")
        if not allowed:
            return self.encode_ordinary(text)
        splitter = re.compile("(" + "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")")
        ids: list[int] = []
        for i, part in enumerate(splitter.split(text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Token ids to the raw bytes they stand for (may end mid-character)."""
        if not isinstance(ids, list):
            ids = list(ids)
        if not ids:
            return b""
        try:
            if min(ids) >= 0:  # a negative index would silently wrap around
                return b"".join(map(self.pieces.__getitem__, ids))
        except (IndexError, TypeError):
            pass
        bad = next(i for i in ids if not isinstance(i, int) or not 0 <= i < self.vocab_size)
        raise QuillError(f"token id {bad!r} is outside this vocabulary (0..{self.vocab_size - 1})")

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids to text. Bytes that do not form valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @property
    def fingerprint(self) -> str:
        """Hash of the canonical content: equal fingerprints encode identically."""
        return fingerprint_of(self._body())

    def _body(self) -> dict[str, Any]:
        content = self.content()
        clash = set(content) & RESERVED_KEYS
        if clash:
            raise QuillError(f"{type(self).__name__}.content() may not use the reserved keys {sorted(clash)}")
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "special_tokens": dict(self.special_tokens),
            **content,
        }

    def to_dict(self) -> dict[str, Any]:
        """The whole file content, fingerprint included (also stored in checkpoints)."""
        body = self._body()
        return {**body, "fingerprint": fingerprint_of(body)}

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer file atomically."""
        data = json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n"
        atomic_write_bytes(path, data.encode("utf-8"))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} vocab_size={self.vocab_size} fingerprint={self.fingerprint}>"


def fingerprint_of(body: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of a tokenizer file body."""
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def check_tokenizer_class(name: str, cls: Any) -> None:
    """What the registry checks of a class a plugin registers as tokenizer kind `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Tokenizer)):
        raise QuillError(f"tokenizer {name!r} must be a subclass of gpt_runtime.tokenizer.Tokenizer, not {cls!r}")
    if cls.kind != name:
        raise QuillError(f"tokenizer {name!r} is registered with a class whose kind is {cls.kind!r}", hint=f"set kind = {name!r} on {cls.__name__}")


check_entries("tokenizers", check_tokenizer_class)


def tokenizer_class(kind: str) -> type[Tokenizer]:
    """The registered class for a tokenizer kind (`char`, `bpe`, or a plugin's)."""
    return get_registry().get("tokenizers", kind).obj


def train_tokenizer(kind: str, text: str, vocab_size: int | None = None, progress: Progress | None = None, **options: Any) -> Tokenizer:
    """Train a tokenizer of a registered kind on `text`."""
    return tokenizer_class(kind).train(text, vocab_size=vocab_size, progress=progress, **options)


def tokenizer_from_dict(data: Any, source: str = "tokenizer") -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.to_dict()` output, checking everything.

    `source` names where the data came from (a file, a checkpoint) in errors.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise QuillError(
            f"{source} is not a Quill tokenizer file (format: {found!r})",
            hint="make one with `quill tokenizer train`",
        )
    version = data.get("version")
    if type(version) is not int or version < 1:
        raise QuillError(f"{source} has no valid format version (found {version!r})")
    if version > FORMAT_VERSION:
        raise QuillError(
            f"{source} has format version {version}, newer than this Quill reads ({FORMAT_VERSION})",
            hint="upgrade quillgpt",
        )
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise QuillError(f"{source} has no tokenizer kind")
    try:
        cls = tokenizer_class(kind)
    except QuillError as exc:
        raise QuillError(f"{source} is a {kind!r} tokenizer, a kind no installed plugin provides", hint=exc.hint) from None
    specials = data.get("special_tokens")
    if not isinstance(specials, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in specials.items()):
        raise QuillError(f"{source} has malformed special_tokens (expected names mapped to ids)")
    stored = data.get("fingerprint")
    if not isinstance(stored, str):
        raise QuillError(f"{source} has no fingerprint", hint="files written by Quill always have one; was it edited?")
    content = {k: v for k, v in data.items() if k not in RESERVED_KEYS}
    try:
        tok = cls.from_content(content, dict(specials))
        actual = tok.fingerprint
    except QuillError as exc:
        raise QuillError(f"{source}: {exc.message}", hint=exc.hint) from None
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise QuillError(f"{source} is malformed: {type(exc).__name__}: {exc}") from None
    if stored != actual:
        raise QuillError(
            f"{source} does not match its own fingerprint (stored {stored}, content hashes to {actual})",
            hint="the file was edited or corrupted; train or export it again",
        )
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer file of any registered kind, with clear errors naming the file."""
    source = f"tokenizer file {str(path)!r}"
    raw = read_user_file(path, "tokenizer file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise QuillError(f"{source} is not text (not UTF-8)", hint="is it a tokenizer file?") from None
    except json.JSONDecodeError as exc:
        problem = "is empty" if not raw.strip() else f"is truncated or not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        raise QuillError(f"{source} {problem}") from None
    except RecursionError:
        raise QuillError(f"{source} is not a tokenizer file (JSON nested too deeply)") from None
    return tokenizer_from_dict(data, source)


def eos_id(tokenizer: Tokenizer) -> int | None:
    """The id that ends a text for this tokenizer, if it has one (see `END_OF_TEXT`)."""
    return next((tokenizer.special_tokens[name] for name in END_OF_TEXT if name in tokenizer.special_tokens), None)


def is_extension(old: Tokenizer, new: Tokenizer) -> bool:
    """Whether `new` keeps every id of `old` (same special tokens, and its pieces start
    with all of old's), so a model trained with `old` can grow rows for the rest."""
    return (new.special_tokens == old.special_tokens and len(new.pieces) >= len(old.pieces)
            and new.pieces[:len(old.pieces)] == old.pieces)


def check_ids(ids: Sequence[Any]) -> list[int]:
    """Validate a user-given list of token ids (e.g. parsed JSON)."""
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise QuillError("token ids must be a JSON list of integers, e.g. [12, 7, 301]")
    return ids
