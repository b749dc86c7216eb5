"""The character tokenizer: vocabulary, fixed special ids, the <unk> policy and its warnings."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt_runtime.errors import QuillError, QuillWarning
from gpt_runtime.tokenizer import train_tokenizer
from helpers import SAMPLE_TEXT
from plugins.char_tokenizer import SPECIALS, CharTokenizer

FIXED_SPECIALS = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}  # documented, part of the format


def quill_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, QuillWarning)]


def encode_recording(tok, text, **kw):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # the tokenizer, not the warnings filter, must de-duplicate
        ids = tok.encode(text, **kw)
    return ids, quill_warnings(record)


@pytest.fixture
def tok() -> CharTokenizer:
    return CharTokenizer.train(SAMPLE_TEXT)


def test_vocabulary_is_the_corpus_characters_in_code_point_order(tok):
    assert tok.chars == sorted(set(SAMPLE_TEXT))
    assert tok.vocab_size == len(SPECIALS) + len(set(SAMPLE_TEXT))
    for c in set(SAMPLE_TEXT):
        assert tok.encode(c) == [len(SPECIALS) + sorted(set(SAMPLE_TEXT)).index(c)]
        assert tok.pieces[tok.encode(c)[0]] == c.encode("utf-8")


def test_round_trip_on_known_characters(tok):
    ids, warned = encode_recording(tok, SAMPLE_TEXT)
    assert warned == []
    assert len(ids) == len(SAMPLE_TEXT)
    assert tok.decode(ids) == SAMPLE_TEXT
    assert min(ids) >= len(SPECIALS)


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs",)), min_size=1))
def test_round_trip_property(text):
    tok = CharTokenizer.train(text)
    ids, warned = encode_recording(tok, text)
    assert warned == []
    assert tok.decode(ids) == text
    assert len(ids) == len(text)


def test_special_tokens_have_fixed_ids(tok):
    assert SPECIALS == tuple(FIXED_SPECIALS)
    assert tok.special_tokens == FIXED_SPECIALS
    other = CharTokenizer.train("completely different text 日本")
    assert other.special_tokens == FIXED_SPECIALS
    for name, i in FIXED_SPECIALS.items():
        assert tok.pieces[i] == name.encode()
        assert tok.decode([i]) == name


def test_special_strings_only_when_allowed():
    tok = CharTokenizer.train("<eos> <bos> ab")
    text = "a<eos>b"
    plain, _ = encode_recording(tok, text)
    assert 3 not in plain and len(plain) == len(text)
    assert tok.decode(plain) == text
    assert tok.encode(text, allowed_special="all") == tok.encode("a") + [FIXED_SPECIALS["<eos>"]] + tok.encode("b")
    assert tok.encode(text, allowed_special={"<eos>"}) == tok.encode(text, allowed_special="all")
    assert tok.encode(text, allowed_special={"<bos>"}) == plain
    with pytest.raises(QuillError, match="unknown special tokens"):
        tok.encode(text, allowed_special={"<sep>"})


def test_unknown_characters_become_unk_and_warn_once(tok):
    unk = FIXED_SPECIALS["<unk>"]
    assert "Z" not in SAMPLE_TEXT and "😀" not in SAMPLE_TEXT
    text = "hear Zed 😀 Z"
    ids, warned = encode_recording(tok, text)
    assert ids == [unk if c in "Z😀" else tok.encode(c)[0] for c in text]
    assert len(warned) == 1
    assert "2 character(s)" in warned[0] and "<unk>" in warned[0]
    assert repr("Z") in warned[0] and repr("😀") in warned[0]
    assert tok.decode(ids) == text.replace("Z", "<unk>").replace("😀", "<unk>")

    # the same characters again: same ids, no new warning
    again, warned = encode_recording(tok, "😀Z")
    assert again == [unk, unk]
    assert warned == []

    # a new one: a new warning that lists only the new character
    ids, warned = encode_recording(tok, "Z and Q")
    assert ids.count(unk) == 2
    assert len(warned) == 1
    assert "1 character(s)" in warned[0] and repr("Q") in warned[0]
    assert repr("Z") not in warned[0]


def test_unknown_warning_is_per_tokenizer_and_caps_its_list():
    a = CharTokenizer.train("abc")
    b = CharTokenizer.train("abc")
    assert len(encode_recording(a, "x")[1]) == 1
    assert len(encode_recording(b, "x")[1]) == 1  # b has not reported 'x' yet
    many = "".join(chr(0x4E00 + i) for i in range(25))
    ids, warned = encode_recording(a, many)
    assert ids == [FIXED_SPECIALS["<unk>"]] * 25
    assert len(warned) == 1 and "25 character(s)" in warned[0] and warned[0].endswith("...")


def test_warning_points_at_the_caller():
    tok = CharTokenizer.train("abc")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tok.encode("xyz")
    assert [w.filename for w in record] == [__file__]


def test_vocab_size_keeps_the_most_frequent_characters():
    text = "aaaaa bbbb cc dd e"  # counts: a 5, b 4, ' ' 4, c 2, d 2, e 1
    counts = Counter(text)
    for n_chars in range(1, len(counts) + 1):
        tok = CharTokenizer.train(text, vocab_size=len(SPECIALS) + n_chars)
        assert tok.vocab_size == len(SPECIALS) + n_chars
        ranked = sorted(counts, key=lambda c: (-counts[c], c))  # ties by code point
        assert tok.chars == sorted(ranked[:n_chars])
    assert CharTokenizer.train(text, vocab_size=len(SPECIALS) + 2).chars == [" ", "a"]  # ' ' < 'b'
    assert CharTokenizer.train(text, vocab_size=len(SPECIALS) + 3).chars == [" ", "a", "b"]


def test_vocab_size_above_the_corpus_keeps_everything():
    tok = CharTokenizer.train("abcabc", vocab_size=1000)
    assert tok.chars == ["a", "b", "c"]
    assert tok.vocab_size == len(SPECIALS) + 3


@pytest.mark.parametrize("vocab_size", [0, 1, len(SPECIALS)])
def test_too_small_vocab_size_is_an_error(vocab_size):
    with pytest.raises(QuillError, match="too small"):
        CharTokenizer.train(SAMPLE_TEXT, vocab_size=vocab_size)


def test_training_is_deterministic():
    a = CharTokenizer.train(SAMPLE_TEXT, vocab_size=20)
    b = CharTokenizer.train(SAMPLE_TEXT, vocab_size=20)
    assert a.chars == b.chars and a.fingerprint == b.fingerprint


@pytest.mark.parametrize("options", [{"pattern": "gpt2"}, {"lowercase": True}])
def test_options_are_rejected(options):
    with pytest.raises(QuillError, match="takes no options") as info:
        CharTokenizer.train(SAMPLE_TEXT, **options)
    assert next(iter(options)) in str(info.value)
    with pytest.raises(QuillError, match="takes no options"):
        train_tokenizer("char", SAMPLE_TEXT, **options)


@pytest.mark.parametrize("chars", [["a", "a"], ["ab"], [""], [1], ["a", None]])
def test_invalid_vocabularies_are_rejected(chars):
    with pytest.raises(QuillError, match="distinct single characters"):
        CharTokenizer(chars)


def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(QuillError, match="outside this vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(QuillError, match="outside this vocabulary"):
        tok.decode([-1])
