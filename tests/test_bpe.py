"""Byte-level BPE: round trips, pre-split, special tokens, training rules.

Reference implementations (a naive trainer and a naive encoder) are written
here from the definitions, so the incremental trainer, the cached str.replace
encoder and the ASCII fast-path splitter are each checked against them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gpt_runtime.errors import QuillError
from gpt_runtime.tokenizer import train_tokenizer
from helpers import SAMPLE_TEXT
from plugins.bpe_tokenizer import PATTERNS, SPECIALS, BPETokenizer, _Splitter

ROOT = Path(__file__).resolve().parents[1]

# A small corpus with some non-ASCII text, so merges build multi-byte pieces too.
UNICODE_TEXT = (
    "Ünïcödé café naïve résumé — 日本語のテキスト、中文文本。한국어 텍스트 "
    "😀😀😀 👍🏽👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 مرحبا بالعالم שלום עולם e\u0301e\u0301 ñ\n"
)
CORPUS = SAMPLE_TEXT + UNICODE_TEXT * 10
CUSTOM = r"[a-z]+"  # skips everything that is not a lowercase letter: gaps must be kept
PATTERN_CASES = ["gpt2", "gpt4", "words", CUSTOM]
N_MERGES = 150
VOCAB = 256 + N_MERGES + len(SPECIALS)

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Valid Unicode (no surrogates), of any kind.
any_text = st.text(st.characters(exclude_categories=("Cs",)))
# Text biased towards what the corpus holds, so many merges actually apply.
INTERESTING = list("First Citizen:\n speak,.?'sdmtlvre") + list(UNICODE_TEXT) + ["\r\n", "\r", "\t", "\x00", "\x1c", "  ", "123", "4567", "'S", "'LL", "\u200d", "\U0001f1eb"]
corpus_like_text = st.lists(st.sampled_from(INTERESTING), max_size=60).map("".join)
texts = st.one_of(any_text, corpus_like_text)
ascii_text = st.one_of(
    st.text(st.characters(max_codepoint=127)),
    st.lists(st.sampled_from(list(" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f'sdmtlvrSDMTLVR aZ09!.,-_") + ["'ll", "'VE", "'re", "123456", "  \n", "\r\n"]), max_size=40)
    .map("".join)
    .filter(str.isascii),
)


_TRAINED: dict[str, BPETokenizer] = {}


def trained(pattern: str) -> BPETokenizer:
    if pattern not in _TRAINED:
        _TRAINED[pattern] = BPETokenizer.train(CORPUS, VOCAB, pattern=pattern)
    return _TRAINED[pattern]


@pytest.fixture(params=PATTERN_CASES, ids=["gpt2", "gpt4", "words", "custom"])
def tok(request) -> BPETokenizer:
    return trained(request.param)


# --- reference implementations -------------------------------------------------------

def reference_split(pattern: str, text: str) -> list[str]:
    """Chunks of `text`: each match of the full `regex` pattern, and each gap between."""
    chunks, pos = [], 0
    for m in regex.finditer(pattern, text):
        if m.start() > pos:
            chunks.append(text[pos:m.start()])
        if m.end() > m.start():
            chunks.append(m.group())
        pos = max(pos, m.end())
    if pos < len(text):
        chunks.append(text[pos:])
    return chunks


def merge_all(ids: list[int], pair: tuple[int, int], new: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def reference_encode(merges: list[tuple[int, int]], pattern: str, text: str) -> list[int]:
    """Naive BPE: in each chunk, repeatedly merge the adjacent pair of lowest rank."""
    ranks = {tuple(m): r for r, m in enumerate(merges)}
    out: list[int] = []
    for chunk in reference_split(pattern, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) > 1:
            pairs = [p for p in zip(ids, ids[1:]) if p in ranks]
            if not pairs:
                break
            best = min(pairs, key=ranks.__getitem__)
            ids = merge_all(ids, best, 256 + ranks[best])
        out += ids
    return out


def reference_train(text: str, n_merges: int, pattern: str) -> list[tuple[int, int]]:
    """Naive BPE training: recount every pair each step; highest count, then smallest pair."""
    words = Counter(tuple(c.encode("utf-8")) for c in reference_split(pattern, text))
    merges: list[tuple[int, int]] = []
    while len(merges) < n_merges:
        counts: Counter = Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                counts[p] += n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        new = 256 + len(merges)
        merges.append(best)
        merged: Counter = Counter()
        for w, n in words.items():
            merged[tuple(merge_all(list(w), best, new))] += n
        words = merged
    return merges


# --- round trips ------------------------------------------------------------------------

@SETTINGS
@given(text=texts)
def test_roundtrip_any_unicode(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


@SETTINGS
@given(text=texts)
def test_roundtrip_with_specials_allowed(tok, text):
    # Allowing specials changes nothing for text that holds none of them.
    assume(not any(s in text for s in SPECIALS))
    assert tok.encode(text, allowed_special="all") == tok.encode(text)


EXPLICIT = {
    "empty": "",
    "emoji": "😀 hello 🎉🎉",
    "zwj family": "👨\u200d👩\u200d👧\u200d👦 and 🧑\u200d💻",
    "flags": "🇫🇷🇯🇵🇺🇸 🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",
    "skin tone": "👍🏽👋🏿",
    "combining marks": "e\u0301 a\u0308\u0304 Z\u0351\u0352\u0353 \u0301lone mark",
    "cjk": "日本語のテキスト、中文文本。한국어",
    "arabic": "مرحبا بالعالم، ١٢٣",
    "hebrew": "שלום עולם",
    "bidi mix": "abc \u202eشلום\u202c def \u200f",
    "control chars": "".join(chr(c) for c in range(32)) + "\x7f\x85\u2028\u2029",
    "nul": "a\x00b\x00\x00",
    "crlf": "line one\r\nline two\r\n\r\n",
    "lone cr": "a\rb\r",
    "supplementary": "\U0001d54f\U00010000\U0010fffd",
    "bom and nbsp": "\ufeffa\u00a0b\u3000c",
    "replacement char": "\ufffd",
    "special-looking": "<eos><pad> <bos",
    "digits": "1234567890 ٣٤٥ ¾",
    "contractions": "I'd've they'LL it's IT'S",
}


@pytest.mark.parametrize("text", list(EXPLICIT.values()), ids=list(EXPLICIT))
def test_roundtrip_explicit(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == reference_encode(tok.merges, tok.pattern, text)


LONG = {
    "20k spaces": " " * 20_000,
    "20k a": "a" * 20_000,
    "5k emoji": "😀" * 5_000,
    "20k newlines": "\n" * 20_000,
    "mixed long": ("ab " * 3000) + ("\r\n" * 3000) + ("👨\u200d👩\u200d👧" * 1000),
}


@pytest.mark.parametrize("text", list(LONG.values()), ids=list(LONG))
def test_roundtrip_long_runs(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) <= len(text.encode("utf-8"))


def test_merges_actually_compress(tok):
    # Guard: the round trips above would pass trivially with no merges.
    assert len(tok.merges) == N_MERGES
    text = SAMPLE_TEXT[:500]
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 1.5


def test_custom_pattern_keeps_gaps():
    split = _Splitter(CUSTOM).split
    assert split("AB cd, EF gh") == ["AB ", "cd", ", EF ", "gh"]
    assert split("abc") == ["abc"]
    assert split("ABC") == ["ABC"]
    assert split("") == []
    tok = trained(CUSTOM)
    for text in ["Hello, World!", "ALL CAPS ONLY", "x", "Ünïcödé", "  leading and trailing  "]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        # merges never cross a chunk boundary: encoding is chunk by chunk
        assert ids == [i for c in split(text) for i in tok.encode(c)]


def test_pattern_with_capture_groups_splits_whole_matches():
    # findall() returns groups, not matches, for a pattern with groups: with two
    # groups each match gives a 2-tuple, whose len() can add up to len(text).
    pattern = r"(\w)(\w)"
    assert _Splitter(pattern).split("ab") == ["ab"]
    assert _Splitter(pattern).split("abcd") == ["ab", "cd"]
    assert _Splitter(pattern).split("ab cde") == ["ab", " ", "cd", "e"]
    assert _Splitter(r"(a)(b)?|(c)").split("abac") == ["ab", "a", "c"]
    tok = BPETokenizer.train("abab" * 10, 256 + 1 + len(SPECIALS), pattern=pattern)
    assert tok.merges == [(ord("a"), ord("b"))]
    assert tok.encode("abab") == [256, 256]
    assert tok.decode(tok.encode("abcd")) == "abcd"


# --- reference equivalence ----------------------------------------------------------------

@SETTINGS
@given(text=texts)
def test_encode_matches_naive_reference(tok, text):
    assert tok.encode(text) == reference_encode(tok.merges, tok.pattern, text)


@pytest.mark.parametrize("pattern", PATTERN_CASES, ids=["gpt2", "gpt4", "words", "custom"])
def test_training_matches_naive_reference_on_corpus(pattern):
    text = SAMPLE_TEXT[:1500] + UNICODE_TEXT
    tok = BPETokenizer.train(text, 256 + 60 + len(SPECIALS), pattern=pattern)
    assert tok.merges == reference_train(text, 60, PATTERNS.get(pattern, pattern))


@FEW
@given(text=st.one_of(corpus_like_text, st.text(st.sampled_from("aab  c\n"), max_size=80)), n=st.integers(0, 25), pattern=st.sampled_from(PATTERN_CASES))
def test_training_matches_naive_reference(text, n, pattern):
    tok = BPETokenizer.train(text, 256 + n + len(SPECIALS), pattern=pattern)
    assert tok.merges == reference_train(text, n, PATTERNS.get(pattern, pattern))


# --- the ASCII fast path ------------------------------------------------------------------

@pytest.mark.skipif(sys.version_info < (3, 11), reason="possessive quantifiers need Python 3.11")
def test_every_named_pattern_has_an_ascii_twin():
    for name, pattern in PATTERNS.items():
        assert _Splitter(pattern).ascii is not None, name
    assert _Splitter(CUSTOM).ascii is None


@pytest.mark.parametrize("name", list(PATTERNS))
@settings(max_examples=300, deadline=None)
@given(text=ascii_text)
def test_ascii_fast_path_matches_full_regex(name, text):
    splitter = _Splitter(PATTERNS[name])
    if splitter.ascii is None:
        pytest.skip("no ASCII twin on this Python")
    assert splitter.ascii.findall(text) == splitter.full.findall(text)
    assert splitter.split(text) == reference_split(PATTERNS[name], text)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_ascii_fast_path_every_character_pair(name):
    # Exhaustive over short strings of all 128 ASCII characters in pairs, plus context.
    splitter = _Splitter(PATTERNS[name])
    if splitter.ascii is None:
        pytest.skip("no ASCII twin on this Python")
    chars = [chr(c) for c in range(128)]
    for a in chars:
        text = "".join(f"{a}{b} {a}{b}{b}\n" for b in chars)
        assert splitter.ascii.findall(text) == splitter.full.findall(text), repr(a)


# --- invalid text ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,pos", [("a\ud800b", 1), ("\udfff", 0), ("ok 😀 \udcff", 5)])
def test_lone_surrogate_is_a_quill_error(tok, text, pos):
    code = f"U+{ord(text[pos]):04X}"
    with pytest.raises(QuillError, match=re.escape(f"lone surrogate {code} at character {pos}")):
        tok.encode(text)
    with pytest.raises(QuillError, match="surrogate"):
        tok.encode(text, allowed_special="all")


def test_lone_surrogate_in_training_text_is_a_quill_error():
    with pytest.raises(QuillError, match=r"lone surrogate U\+D800"):
        BPETokenizer.train("abc \ud800 abc", 300)


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    for bad in ([tok.vocab_size], [0, -1], [10**30], [1.5]):
        with pytest.raises(QuillError, match="outside this vocabulary"):
            tok.decode(bad)


def test_decode_of_partial_character_is_replacement(tok):
    ids = tok.encode("é")
    assert tok.decode_bytes(ids) == "é".encode("utf-8")
    first_byte = "é".encode("utf-8")[0]
    assert tok.decode([first_byte]) == "\ufffd"


# --- special tokens -------------------------------------------------------------------------

def test_special_token_ids_follow_the_merges(tok):
    n = 256 + len(tok.merges)
    assert tok.special_tokens == {name: n + i for i, name in enumerate(SPECIALS)}
    assert tok.vocab_size == n + len(SPECIALS)
    for name, i in tok.special_tokens.items():
        assert tok.pieces[i] == name.encode()
        assert tok.decode([i]) == name


def test_special_strings_are_plain_text_unless_allowed(tok):
    eos, bos = tok.special_tokens["<eos>"], tok.special_tokens["<bos>"]
    text = "end<eos>start<bos>"
    plain = tok.encode(text)
    assert eos not in plain and bos not in plain
    assert tok.decode(plain) == text
    assert plain == tok.encode(text, allowed_special=())

    everything = tok.encode(text, allowed_special="all")
    assert everything == tok.encode("end") + [eos] + tok.encode("start") + [bos]
    assert tok.decode(everything) == text

    only_eos = tok.encode(text, allowed_special={"<eos>"})
    assert only_eos == tok.encode("end") + [eos] + tok.encode("start<bos>")
    assert bos not in only_eos

    assert tok.encode("<eos><eos>", allowed_special=["<eos>"]) == [eos, eos]


def test_unknown_allowed_special_is_an_error(tok):
    with pytest.raises(QuillError, match="unknown special tokens"):
        tok.encode("hi", allowed_special={"<unk>"})


# --- training -------------------------------------------------------------------------------

def test_training_is_deterministic():
    a = BPETokenizer.train(CORPUS, VOCAB, pattern="gpt4")
    b = BPETokenizer.train(CORPUS, VOCAB, pattern="gpt4")
    assert a.merges == b.merges
    assert a.fingerprint == b.fingerprint
    assert a.to_dict() == b.to_dict()


def test_training_is_deterministic_across_processes(tmp_path):
    # Hash randomisation must not change the merges (sets and dicts are iterated in training).
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    code = (
        "import sys; from plugins.bpe_tokenizer import BPETokenizer; "
        "text = open(sys.argv[1], encoding='utf-8').read(); "
        f"print(BPETokenizer.train(text, {VOCAB}, pattern='gpt2').fingerprint)"
    )
    prints = set()
    for seed in ("1", "2", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code, str(corpus)], capture_output=True, env=env, cwd=ROOT, check=True)
        prints.add(out.stdout.decode().strip())
    assert prints == {trained("gpt2").fingerprint}


@pytest.mark.parametrize("vocab_size", [259, 260, 300, 400])
def test_vocab_size_is_honoured_exactly(vocab_size):
    tok = BPETokenizer.train(CORPUS, vocab_size)
    assert tok.vocab_size == vocab_size
    assert len(tok.pieces) == vocab_size
    assert len(tok.merges) == vocab_size - 256 - len(SPECIALS)
    assert len(set(tok.pieces)) == vocab_size  # every merge makes a new piece


def test_training_stops_when_every_chunk_is_one_token():
    # 'words' chunks: "abcd" and " abcd". Pairs ab, bc, cd occur twice: ab wins the tie
    # (256); then (256, c) and (c, d) twice: cd (257); then abcd (258), then " abcd" (259).
    # After that every chunk is one token, so training stops below the vocab size asked.
    text = "abcd abcd"
    a, b, c, d = map(ord, "abcd")
    tok = BPETokenizer.train(text, 1000, pattern="words")
    assert tok.merges == [(a, b), (c, d), (256, 257), (ord(" "), 258)]
    assert tok.vocab_size == 256 + 4 + len(SPECIALS)
    assert tok.encode("abcd") == [tok.pieces.index(b"abcd")]
    assert tok.encode(" abcd") == [tok.pieces.index(b" abcd")]


@pytest.mark.parametrize("vocab_size", [0, 1, 256, 256 + len(SPECIALS) - 1])
def test_too_small_vocab_size_is_an_error(vocab_size):
    with pytest.raises(QuillError, match=f"vocab size {vocab_size} is too small"):
        BPETokenizer.train(CORPUS, vocab_size)


def test_training_option_errors():
    with pytest.raises(QuillError, match="needs a vocabulary size"):
        BPETokenizer.train(CORPUS)
    with pytest.raises(QuillError, match="unknown BPE option"):
        BPETokenizer.train(CORPUS, 300, dropout=0.1)
    with pytest.raises(QuillError, match="invalid pre-split pattern"):
        BPETokenizer.train(CORPUS, 300, pattern="(unclosed")
    with pytest.raises(QuillError, match="invalid pre-split pattern"):
        train_tokenizer("bpe", CORPUS, 300, pattern="[")


def test_named_patterns_are_stored_expanded():
    for name, pattern in PATTERNS.items():
        assert BPETokenizer.train("abc", 260, pattern=name).pattern == pattern
    assert BPETokenizer.train("abc", 260).pattern == PATTERNS["gpt2"]
    assert BPETokenizer.train("abc", 260, pattern=CUSTOM).pattern == CUSTOM


def test_tiny_example_by_hand():
    # One chunk "aaabdaaabac". Pair counts: aa 4, ab 2, others 1, so 'aa' -> 256.
    # Then "Z a b d Z a b a c" (Z=256): (256,97) and (97,98) both occur twice; the tie
    # goes to the smaller left id, so 'ab' -> 257. Then "Z Y d Z Y a c": (256,257) twice.
    a, b = ord("a"), ord("b")
    tok = BPETokenizer.train("aaabdaaabac", 256 + 3 + len(SPECIALS), pattern="words")
    assert tok.merges == [(a, a), (a, b), (256, 257)]
    assert tok.pieces[256:259] == [b"aa", b"ab", b"aaab"]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, a, ord("c")]


def test_tie_goes_to_smallest_pair_not_first_seen():
    # Every pair occurs once; "cd", "da", "ab" in text order, but (a, b) is smallest.
    tok = BPETokenizer.train("cdab", 256 + 3 + len(SPECIALS), pattern="words")
    a, b, c, d = map(ord, "abcd")
    # after ab -> 256: "c d Z": (c, d) < (d, 256); then "Y Z" -> (257, 256)
    assert tok.merges == [(a, b), (c, d), (257, 256)]


def test_tie_on_left_id_goes_to_smaller_right_id():
    # "ac" and "ab" once each (the gap "." is a chunk too, with no pair in it).
    tok = BPETokenizer.train("ac.ab", 256 + 1 + len(SPECIALS), pattern=CUSTOM)
    assert tok.merges == [(ord("a"), ord("b"))]


def test_highest_count_beats_smaller_ids():
    # "zz" occurs 3 times, "ab" twice: the count wins over the smaller ids.
    tok = BPETokenizer.train("ab ab zz zz zz", 256 + 1 + len(SPECIALS), pattern=CUSTOM)
    assert tok.merges == [(ord("z"), ord("z"))]


def test_merges_never_cross_the_pre_split():
    # With 'words', "a b" is two chunks ("a", " b"): the pair (a, ' ') never forms.
    tok = BPETokenizer.train("a b " * 50, 300, pattern="words")
    assert (ord("a"), ord(" ")) not in tok.merges
    assert all(b"a " not in p for p in tok.pieces[256:])


def test_progress_is_reported():
    calls = []
    BPETokenizer.train(CORPUS, 300, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (300 - 256 - len(SPECIALS),) * 2
    assert all(t == calls[-1][1] for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# --- long chunks: the heap-based merge must equal the simple one ----------------------

def simple_bpe(tok: BPETokenizer, chunk: str) -> list[int]:
    """The per-rank loop `_bpe` uses for short chunks, applied at any length."""
    s = chunk.encode("utf-8").decode("latin-1")
    while len(s) > 1:
        ranks = [tok._char_ranks.get(p) for p in zip(s, s[1:])]
        known = [r for r in ranks if r is not None]
        if not known:
            break
        pair, new = tok._char_merges[min(known)]
        s = s.replace(pair, new)
    return [ord(c) for c in s]


long_words = st.lists(st.sampled_from(list("FirstCzenaspkdmtlvr") + ["e", "ee", "th", "é", "😀"]), min_size=30, max_size=400).map("".join)


@SETTINGS
@given(word=long_words)
def test_long_chunk_heap_merge_equals_simple_merge(tok, word):
    s = word.encode("utf-8").decode("latin-1")
    assert tok._bpe_long(s) == simple_bpe(tok, word)


def test_long_letter_runs_encode_exactly_and_round_trip():
    tok = trained(PATTERNS["gpt2"])
    word = ("Citizenspeakresolved" * 200)[:3000]  # one chunk of 3000 letters, nothing trivial
    ids = tok.encode(" " + word)
    assert ids == reference_encode(tok.merges, tok.pattern, " " + word)
    assert tok.decode(ids) == " " + word


@FEW
@given(text=st.text(st.sampled_from("abcab"), min_size=40, max_size=300), n=st.integers(1, 30))
def test_training_on_long_unsplit_words_matches_naive_reference(text, n):
    # the "words" pattern leaves space-free text whole: long chunks with many repeats
    assert BPETokenizer.train(text, 256 + 3 + n, pattern="words").merges == reference_train(text, n, PATTERNS["words"])
