"""Built-in plugin `bpe`: byte-level byte-pair encoding, written from scratch.

Ids 0-255 are the raw bytes, so no text is ever unknown; each learned merge adds
one id (256, 257, ...); the special tokens come last. A tokenizer imported from
GPT-2 keeps GPT-2's numbering instead (the optional ``ids`` of its file). Text is
first pre-split by a regular expression (GPT-2's by default) and merges never
cross those boundaries.

Training counts the distinct pre-split chunks once, then keeps pair counts up to
date incrementally: a merge only revisits the chunks that contain its pair, and a
lazy max-heap finds the next most frequent pair. Ties go to the pair with the
smaller ids (left id first), so training is deterministic.

Encoding applies merges in the order they were learned, lowest rank first,
caching each chunk's ids: real text repeats its words, so most chunks are looked
up rather than merged.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from itertools import chain, repeat
from typing import Any

import regex

from gpt_runtime.errors import QuillError, UsageError, did_you_mean
from gpt_runtime.hf_tokenizer import GPT2_PATTERN, bpe_model, byte_alphabet, spell, tokenizer_json
from gpt_runtime.hookspecs import hookimpl
from gpt_runtime.tokenizer import Progress, Tokenizer

# Pre-split patterns by name. A tokenizer file stores the pattern itself, so a
# custom pattern given as a regular expression round-trips too.
PATTERNS = {
    # GPT-2: contractions, letters, digits, other symbols, each with one leading space.
    "gpt2": GPT2_PATTERN,
    # GPT-4 style: case-insensitive contractions, digits in groups of at most three,
    # newlines kept apart from other whitespace.
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
    # Whitespace-separated words, each keeping its leading whitespace.
    "words": r"""\s*\S+|\s+""",
}
# The same patterns for ASCII-only text, in the standard library's `re`, which
# splits about 2.5x faster than `regex`. On ASCII, \p{L} is [A-Za-z], \p{N} is
# [0-9], and both engines agree on \s (tests check the splits are identical).
_ASCII_PATTERNS = {
    PATTERNS["gpt2"]: r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""",
    PATTERNS["gpt4"]: r"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?+[A-Za-z]+|[0-9]{1,3}| ?[^\sA-Za-z0-9]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
    PATTERNS["words"]: r"""\s*\S+|\s+""",
}
DEFAULT_PATTERN = "gpt2"
SPECIALS = ("<pad>", "<bos>", "<eos>")
_NO_MERGE = 1 << 62  # rank of a pair with no merge: above every real rank
_CACHE_LIMIT = 200_000  # distinct chunks remembered before the cache is reset
_LONG_CHUNK = 64  # bytes; longer chunks are merged with a heap (see _bpe_long)


class _ChunkCache(dict):
    """chunk -> ids; a missing chunk is encoded once and remembered."""

    def __init__(self, encode) -> None:
        super().__init__()
        self._encode = encode

    def __missing__(self, chunk: str) -> list[int]:
        ids = self[chunk] = self._encode(chunk)
        return ids


class _Splitter:
    """Pre-splits text by a pattern, with the fast `re` twin for ASCII text."""

    def __init__(self, pattern: str) -> None:
        try:
            self.full = regex.compile(pattern)
        except regex.error as exc:
            raise QuillError(f"invalid pre-split pattern {pattern!r}: {exc}", hint=f"or use one of: {', '.join(PATTERNS)}") from None
        try:
            self.ascii = re.compile(_ASCII_PATTERNS[pattern], re.ASCII) if pattern in _ASCII_PATTERNS else None
        except re.error:  # possessive quantifiers need Python 3.11
            self.ascii = None

    def split(self, text: str) -> list[str]:
        """Chunks of `text` in order; text the pattern skips becomes chunks too."""
        pattern = self.ascii if self.ascii is not None and text.isascii() else self.full
        if not pattern.groups:  # with groups, findall() gives the groups, not the matches
            chunks = pattern.findall(text)
            if sum(map(len, chunks)) == len(text):
                return chunks
        chunks, pos = [], 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                chunks.append(text[pos:m.start()])
            if m.end() > m.start():
                chunks.append(m.group())
            pos = max(pos, m.end())
        if pos < len(text):
            chunks.append(text[pos:])
        return chunks


class BPETokenizer(Tokenizer):
    """Byte-level BPE over a regex pre-split."""

    kind = "bpe"
    progress_unit = "merges"

    def __init__(
        self,
        merges: list[tuple[int, int]],
        pattern: str = PATTERNS[DEFAULT_PATTERN],
        special_tokens: dict[str, int] | None = None,
        ids: list[int] | None = None,
    ) -> None:
        """`merges` pairs ids in rank order. Quill numbers byte b as id b and merge r's
        result as 256 + r; `ids` gives another numbering (the id of each byte, then of
        each merge's result), as a tokenizer imported from GPT-2 needs."""
        self.merges = [tuple(m) for m in merges]
        self.pattern = pattern
        self.ids = None if ids is None else list(ids)
        self._splitter = _Splitter(pattern)
        if ids is None:
            byte_ids, made = range(256), range(256, 256 + len(self.merges))
        elif len(ids) != 256 + len(self.merges):
            raise QuillError(f"'ids' must hold 256 byte ids and one id per merge ({256 + len(self.merges)} in all), not {len(ids)}")
        elif not all(type(i) is int and 0 <= i < 0x110000 for i in ids):  # each id becomes a character (chr)
            raise QuillError("'ids' must be token ids from 0 to 1114111")
        else:
            byte_ids, made = ids[:256], ids[256:]
        piece_of = {i: bytes([b]) for b, i in enumerate(byte_ids)}
        if len(piece_of) != 256:
            raise QuillError("the 256 bytes must have 256 different ids")
        for rank, ((a, b), new) in enumerate(zip(self.merges, made)):  # checked before chr() sees the ids
            if a not in piece_of or b not in piece_of:
                raise QuillError(f"merge {rank} ({a}, {b}) refers to an id not yet defined")
            piece = piece_of[a] + piece_of[b]
            if piece_of.setdefault(new, piece) != piece:
                raise QuillError(f"merge {rank} makes id {new}, which already stands for {piece_of[new]!r}")
        if special_tokens is None:
            special_tokens = {name: len(piece_of) + i for i, name in enumerate(SPECIALS)}
        for name, i in special_tokens.items():
            if i in piece_of:
                raise QuillError(f"special token {name!r} has id {i}, which a byte or a merge already uses")
            piece_of[i] = name.encode("utf-8")
        gap = next((i for i in range(len(piece_of)) if i not in piece_of), None)
        if gap is not None:
            raise QuillError(f"BPE ids must run from 0 to {len(piece_of) - 1} without gaps: "
                             f"id {gap} is neither a byte, a merge nor a special token")
        self.special_tokens = dict(special_tokens)
        self.pieces = [piece_of[i] for i in range(len(piece_of))]
        self._char_ranks = {(chr(a), chr(b)): rank for rank, (a, b) in enumerate(self.merges)}
        self._char_merges = [(chr(a) + chr(b), chr(new)) for (a, b), new in zip(self.merges, made)]
        # Bytes to ids for str.translate, when they are not the identity.
        self._byte_ids = None if ids is None else dict(enumerate(byte_ids))
        self._cache = _ChunkCache(self._bpe)

    # --- training ---------------------------------------------------------------
    @classmethod
    def train(cls, text: str, vocab_size: int | None = None, progress: Progress | None = None, pattern: str = DEFAULT_PATTERN, **options: Any) -> "BPETokenizer":
        """Learn merges from `text` until the vocabulary (bytes, merges, specials) has `vocab_size` ids.

        `pattern` is a name from `PATTERNS` or a regular expression. Training stops
        early if every chunk has become a single token.
        """
        if options:
            raise UsageError(f"unknown BPE option(s): {', '.join(sorted(options))}", hint="BPE takes: pattern")
        if vocab_size is None:
            raise UsageError("a BPE tokenizer needs a vocabulary size", hint="e.g. --vocab-size 4096")
        n_merges = vocab_size - 256 - len(SPECIALS)
        if n_merges < 0:
            raise UsageError(f"vocab size {vocab_size} is too small for byte-level BPE", hint=f"it needs at least {256 + len(SPECIALS)}: 256 bytes and {len(SPECIALS)} special tokens")
        pattern = resolve_pattern(pattern)
        chunks = Counter(_Splitter(pattern).split(text))
        return cls(_learn_merges(chunks, n_merges, progress), pattern)

    # --- files ------------------------------------------------------------------
    @classmethod
    def from_content(cls, content: dict[str, Any], special_tokens: dict[str, int]) -> "BPETokenizer":
        merges = content["merges"]
        if not isinstance(merges, list) or not all(isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m) for m in merges):
            raise QuillError("'merges' must be a list of [left id, right id] pairs")
        pattern = content["pattern"]
        if not isinstance(pattern, str):
            raise QuillError("'pattern' must be a regular expression string")
        ids = content.get("ids")
        if ids is not None and not isinstance(ids, list):
            raise QuillError("'ids' must be a list of token ids")
        return cls([tuple(m) for m in merges], pattern, special_tokens, ids)

    def content(self) -> dict[str, Any]:
        content = {"pattern": self.pattern, "merges": [list(m) for m in self.merges]}
        if self.ids is not None:
            content["ids"] = self.ids
        return content

    def describe(self) -> dict[str, str]:
        name = next((name for name, p in PATTERNS.items() if p == self.pattern), None)
        facts = {"pre_split": name or self.pattern, "merges": str(len(self.merges))}
        if self.ids is not None:
            facts["numbering"] = "imported (not byte order)"
        return facts

    def hf_tokenizer_json(self) -> dict[str, Any]:
        """Byte-level BPE as GPT-2 writes it, with these ids; a pre-split pattern other
        than GPT-2's becomes a Split step before the byte-level one."""
        alphabet, specials = byte_alphabet(), set(self.special_tokens.values())
        vocab: dict[str, int] = {}
        for i, piece in enumerate(self.pieces):
            if i not in specials and vocab.setdefault(spell(piece, alphabet), i) != i:
                raise QuillError(f"ids {vocab[spell(piece, alphabet)]} and {i} both stand for {piece!r}, "
                                 "which a HuggingFace vocabulary cannot hold")
        merges = [f"{spell(self.pieces[a], alphabet)} {spell(self.pieces[b], alphabet)}" for a, b in self.merges]
        gpt2 = self.pattern == GPT2_PATTERN
        pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": gpt2}
        if not gpt2:
            split = {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False}
            pre = {"type": "Sequence", "pretokenizers": [split, pre]}
        decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        return tokenizer_json(bpe_model(vocab, merges), self, pre, decoder)

    # --- encoding ---------------------------------------------------------------
    def encode_ordinary(self, text: str) -> list[int]:
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        # Hits stay in C (dict lookups); misses run _ChunkCache.__missing__.
        return list(chain.from_iterable(map(cache.__getitem__, self._splitter.split(text))))

    def _bpe(self, chunk: str) -> list[int]:
        # Ids are held as the characters of a str (id i is chr(i)): latin-1 maps
        # each byte to its own id, and str.replace applies a merge left to right
        # in C. The same trick drives training.
        s = chunk.encode("utf-8").decode("latin-1")
        if self._byte_ids is not None:
            s = s.translate(self._byte_ids)
        if len(s) > _LONG_CHUNK:
            return self._bpe_long(s)
        get_rank, merges = self._char_ranks.get, self._char_merges
        while len(s) > 1:
            rank = min(map(get_rank, zip(s, s[1:]), repeat(_NO_MERGE)))
            if rank == _NO_MERGE:
                break
            pair, new = merges[rank]
            s = s.replace(pair, new)
        return list(map(ord, s))


    def _bpe_long(self, s: str) -> list[int]:
        """The same merges in O(n log n), for long chunks.

        A heap of (rank, position) over a linked list of tokens: the lowest rank,
        leftmost first, exactly the order the simple loop applies merges in.
        """
        toks: list[str | None] = list(s)
        n = len(toks)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        get_rank = self._char_ranks.get
        heap = [(r, i) for i, r in enumerate(map(get_rank, zip(s, s[1:]))) if r is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i] if toks[i] is not None else n
            if j >= n or get_rank((toks[i], toks[j])) != rank:
                continue  # stale: position i was merged away, or its pair changed
            toks[i], toks[j] = self._char_merges[rank][1], None
            k = nxt[i] = nxt[j]
            if k < n:
                prv[k] = i
                if (r := get_rank((toks[i], toks[k]))) is not None:
                    heapq.heappush(heap, (r, i))
            p = prv[i]
            if p >= 0 and (r := get_rank((toks[p], toks[i]))) is not None:
                heapq.heappush(heap, (r, p))
        return [ord(t) for t in toks if t is not None]


def resolve_pattern(pattern: str) -> str:
    """A pattern name from `PATTERNS` to its regex; anything else must be a regex."""
    if pattern in PATTERNS:
        return PATTERNS[pattern]
    if not pattern or regex.fullmatch(r"\w+", pattern):
        hint = did_you_mean(pattern, PATTERNS) or f"use one of {', '.join(PATTERNS)}, or a regular expression"
        raise UsageError(f"unknown pre-split pattern {pattern!r}", hint=hint)
    try:
        _Splitter(pattern)  # a regex that does not compile is the caller's mistake
    except QuillError as exc:
        raise UsageError(exc.message, hint=exc.hint) from None
    return pattern


def _surrogate_message(text: str) -> str:
    for i, ch in enumerate(text):
        if 0xD800 <= ord(ch) <= 0xDFFF:
            return f"text has a lone surrogate U+{ord(ch):04X} at character {i}, which is not valid Unicode and cannot be encoded"
    return "text cannot be encoded as UTF-8"


def _learn_merges(chunks: Counter, n_merges: int, progress: Progress | None) -> list[tuple[int, int]]:
    # Each chunk is a str of id characters (see BPETokenizer._bpe).
    try:
        words = [chunk.encode("utf-8").decode("latin-1") for chunk in chunks]
    except UnicodeEncodeError:
        raise QuillError(_surrogate_message("".join(chunks))) from None
    counts = list(chunks.values())

    # pair -> total count over all chunks; pair -> chunks that may contain it
    # (a superset: entries go stale as merges rewrite chunks, and are rechecked).
    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            where[pair].add(i)
    # Max-heap by count, then smallest pair. Counts of existing pairs only ever
    # fall, so a popped entry whose count is stale is pushed back with the true one.
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    every = max(1, n_merges // 200)
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg:
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        new = chr(256 + len(merges))
        merges.append((ord(pair[0]), ord(pair[1])))
        left, right = pair
        joined = left + right
        touched: set[tuple[str, str]] = set()

        def add(p: tuple[str, str], count: int, i: int) -> None:
            pair_counts[p] += count
            where[p].add(i)
            touched.add(p)

        # Only the pairs next to each occurrence change: (x, left) and (right, y)
        # lose a count, (x, new) and (new, y) gain one. Back-to-back occurrences
        # share a neighbour, which becomes (new, new).
        for i in where.pop(pair):
            word = words[i]
            pos = word.find(joined)
            if pos < 0:
                continue  # stale: this chunk no longer holds the pair
            count, n, prev_end = counts[i], len(word), -1
            while pos >= 0:
                next_pos = word.find(joined, pos + 2)
                if pos > 0:
                    if pos == prev_end:
                        add((new, new), count, i)
                    else:
                        pair_counts[(word[pos - 1], left)] -= count
                        add((word[pos - 1], new), count, i)
                if pos + 2 < n:
                    pair_counts[(right, word[pos + 2])] -= count
                    if next_pos != pos + 2:
                        add((new, word[pos + 2]), count, i)
                prev_end, pos = pos + 2, next_pos
            words[i] = word.replace(joined, new)
        del pair_counts[pair]
        for p in touched:
            heapq.heappush(heap, (-pair_counts[p], p))
        if progress and len(merges) % every == 0:
            progress(len(merges), n_merges)
    if progress:
        progress(n_merges, n_merges)
    return merges


@hookimpl
def quill_register_tokenizers(register) -> None:
    register("bpe", BPETokenizer)
