"""Tokenizer files: save/load identity, fingerprints, and clear errors for bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt_runtime.errors import QuillError
from gpt_runtime.tokenizer import FORMAT, FORMAT_VERSION, fingerprint_of, load_tokenizer, tokenizer_from_dict
from helpers import SAMPLE_TEXT
from plugins.bpe_tokenizer import PATTERNS, BPETokenizer
from plugins.char_tokenizer import CharTokenizer

PROBE = SAMPLE_TEXT[:300] + " <eos> Ünïcödé 日本語 😀 \r\n\x00"


def make(kind: str):
    if kind == "char":
        return CharTokenizer.train(SAMPLE_TEXT + "<> Ünïcödé 日本語 😀\r\x00")
    return BPETokenizer.train(SAMPLE_TEXT + "Ünïcödé 日本語 😀", 256 + 3 + 80, pattern="gpt4")


@pytest.fixture(params=["char", "bpe"])
def tok(request):
    return make(request.param)


@pytest.fixture
def saved(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    return path


def edit(path: Path, change) -> Path:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def refit(data: dict) -> None:
    """Recompute the stored fingerprint, as a careful forger would."""
    data["fingerprint"] = fingerprint_of({k: v for k, v in data.items() if k != "fingerprint"})


def load_error(path) -> str:
    with pytest.raises(QuillError) as info:
        load_tokenizer(path)
    message = info.value.message
    assert str(path) in message, message  # every file error names the file
    assert "\n" not in message
    return message


# --- save / load -------------------------------------------------------------------------------

def test_save_load_identity(tok, saved):
    loaded = load_tokenizer(saved)
    assert type(loaded) is type(tok)
    assert loaded.kind == tok.kind
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.to_dict() == tok.to_dict()
    assert loaded.pieces == tok.pieces
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.encode(PROBE) == tok.encode(PROBE)
    assert loaded.encode(PROBE, allowed_special="all") == tok.encode(PROBE, allowed_special="all")
    ids = tok.encode(PROBE)
    assert loaded.decode(ids) == tok.decode(ids)


def test_file_layout(tok, saved):
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["format"] == FORMAT and data["version"] == FORMAT_VERSION
    assert data["kind"] == tok.kind
    assert data["fingerprint"] == tok.fingerprint
    assert data["special_tokens"] == tok.special_tokens
    assert saved.read_bytes().endswith(b"\n")
    assert not [p for p in saved.parent.iterdir() if p.name.endswith(".tmp")]  # no temp file left


def test_save_is_reproducible_and_overwrites(tok, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    tok.save(a)
    b.write_text("old content")
    tok.save(b)
    assert a.read_bytes() == b.read_bytes()
    load_tokenizer(b).save(b)  # load then save again: byte for byte the same file
    assert a.read_bytes() == b.read_bytes()


def test_save_creates_parent_directories(tok, tmp_path):
    path = tmp_path / "deep" / "er" / "tok.json"
    tok.save(path)
    assert load_tokenizer(path).fingerprint == tok.fingerprint


def test_load_accepts_str_and_pathlike(saved):
    assert load_tokenizer(str(saved)).fingerprint == load_tokenizer(saved).fingerprint


# --- fingerprints ------------------------------------------------------------------------------

def test_fingerprint_is_stable(tok, tmp_path):
    fp = tok.fingerprint
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert tok.fingerprint == fp  # the same object, asked again
    tok.encode(PROBE)  # using it (caches, <unk> reports) changes nothing
    assert tok.fingerprint == fp
    path = tmp_path / "t.json"
    for _ in range(2):
        tok.save(path)
        tok = load_tokenizer(path)
        assert tok.fingerprint == fp
    body = {k: v for k, v in tok.to_dict().items() if k != "fingerprint"}
    assert fingerprint_of(body) == fp
    assert fingerprint_of(dict(reversed(list(body.items())))) == fp  # key order is irrelevant


def test_fingerprint_differs_when_content_differs():
    a = CharTokenizer.train("abc")
    assert CharTokenizer.train("cab").fingerprint == a.fingerprint  # same characters
    assert CharTokenizer.train("abd").fingerprint != a.fingerprint
    assert CharTokenizer.train("ab").fingerprint != a.fingerprint

    base = BPETokenizer.train(SAMPLE_TEXT, 300)
    assert BPETokenizer(base.merges, base.pattern).fingerprint == base.fingerprint
    assert BPETokenizer.train(SAMPLE_TEXT, 301).fingerprint != base.fingerprint
    assert BPETokenizer.train(SAMPLE_TEXT[::-1], 300).fingerprint != base.fingerprint
    # same merges, another pre-split pattern: encodes differently, so a new fingerprint
    assert BPETokenizer(base.merges, PATTERNS["words"]).fingerprint != base.fingerprint
    swapped = list(base.merges)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    if swapped != base.merges:
        assert BPETokenizer(swapped, base.pattern).fingerprint != base.fingerprint
    n = 256 + len(base.merges)
    renamed = {"<pad>": n, "<bos>": n + 1, "<end>": n + 2}
    assert BPETokenizer(base.merges, base.pattern, renamed).fingerprint != base.fingerprint
    reordered = {"<pad>": n, "<bos>": n + 2, "<eos>": n + 1}
    assert BPETokenizer(base.merges, base.pattern, reordered).fingerprint != base.fingerprint


def test_different_kinds_never_share_a_fingerprint():
    assert CharTokenizer.train("abc").fingerprint != BPETokenizer.train("abc", 259).fingerprint


# --- corrupt files -------------------------------------------------------------------------------

def test_truncated_json(saved):
    raw = saved.read_bytes()
    saved.write_bytes(raw[: len(raw) // 2])
    assert "truncated or not JSON" in load_error(saved)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.json"
    path.write_bytes(b"")
    assert "is empty" in load_error(path)
    path.write_bytes(b"  \n")
    assert "is empty" in load_error(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b'{"format": "quill-tokenizer", "x": "\xff\xfe"}')
    assert "not UTF-8" in load_error(path)


def test_not_json_at_all(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("To be, or not to be\n")
    assert "not JSON" in load_error(path)


@pytest.mark.parametrize(
    "data,found",
    [
        ({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}, "added_tokens": []}, "None"),
        ({"format": "other-tokenizer", "version": 1}, "'other-tokenizer'"),
        ([1, 2, 3], "'list'"),
        ("quill-tokenizer", "'str'"),
        (None, "'NoneType'"),
    ],
    ids=["huggingface-like", "other format", "list", "string", "null"],
)
def test_another_format(tmp_path, data, found):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    message = load_error(path)
    assert "is not a Quill tokenizer file" in message and f"(format: {found})" in message


def test_deeply_nested_json(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in load_error(path)


def test_unknown_kind(saved):
    edit(saved, lambda d: d.update(kind="bpee"))
    message = load_error(saved)
    assert "'bpee'" in message and "no installed plugin provides" in message
    with pytest.raises(QuillError) as info:
        load_tokenizer(saved)
    assert "did you mean 'bpe'?" in (info.value.hint or "")


def test_missing_kind(saved):
    edit(saved, lambda d: d.pop("kind"))
    assert "no tokenizer kind" in load_error(saved)


def test_newer_format_version(saved):
    edit(saved, lambda d: d.update(version=FORMAT_VERSION + 1))
    message = load_error(saved)
    assert f"format version {FORMAT_VERSION + 1}" in message and "newer" in message


@pytest.mark.parametrize("version", [None, "1", 1.5, 0, -1, True])
def test_invalid_format_version(saved, version):
    edit(saved, lambda d: d.update(version=version))
    assert "no valid format version" in load_error(saved)


def test_edited_file_no_longer_matches_its_fingerprint(tok, saved):
    def change(d):
        if d["kind"] == "char":
            d["chars"][-1] = "\u2603" if d["chars"][-1] != "\u2603" else "\u2604"
        else:
            d["merges"][-1] = [d["merges"][-1][1], d["merges"][-1][0]]

    edit(saved, change)
    message = load_error(saved)
    assert "does not match its own fingerprint" in message
    assert f"stored {tok.fingerprint}" in message


def test_edited_fingerprint(tok, saved):
    edit(saved, lambda d: d.update(fingerprint="0" * 16 if tok.fingerprint != "0" * 16 else "1" * 16))
    assert "does not match its own fingerprint" in load_error(saved)


def test_edited_file_with_refitted_fingerprint_loads(tok, saved):
    # The fingerprint guards against accidents, and names the content: an edit whose
    # fingerprint is recomputed is a different, valid tokenizer.
    def change(d):
        if d["kind"] == "char":
            d["chars"] = d["chars"][:-1]
        else:
            d["merges"] = d["merges"][:-1]
            d["special_tokens"] = {k: v - 1 for k, v in d["special_tokens"].items()}
        refit(d)

    edit(saved, change)
    loaded = load_tokenizer(saved)
    assert loaded.vocab_size == tok.vocab_size - 1
    assert loaded.fingerprint != tok.fingerprint


@pytest.mark.parametrize("bad", [[[300, 32]], [[32, 256]], [[-1, 32]], [[2**70, 32]]], ids=["future left", "self", "negative", "huge"])
def test_merges_referring_to_undefined_ids(tmp_path, bad):
    tok = BPETokenizer([], PATTERNS["gpt2"])
    path = tmp_path / "t.json"
    tok.save(path)
    edit(path, lambda d: (d.update(merges=bad, special_tokens={"<pad>": 257, "<bos>": 258, "<eos>": 259}), refit(d)))
    assert "refers to an id not yet defined" in load_error(path)


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda d: d.update(merges="oops"), "'merges' must be a list"),
        (lambda d: d.update(merges=[[1, 2, 3]]), "'merges' must be a list"),
        (lambda d: d.update(merges=[[1.0, 2]]), "'merges' must be a list"),
        (lambda d: d.update(merges=[[True, 2]]), "'merges' must be a list"),
        (lambda d: d.pop("merges"), "malformed"),
        (lambda d: d.pop("pattern"), "malformed"),
        (lambda d: d.update(pattern=5), "'pattern' must be"),
        (lambda d: d.update(pattern="(unclosed"), "invalid pre-split pattern"),
        (lambda d: d.update(special_tokens={"<pad>": 0}), "which a byte or a merge already uses"),
        (lambda d: d.update(special_tokens=["<pad>"]), "malformed special_tokens"),
        (lambda d: d.update(special_tokens={"<pad>": "x"}), "malformed special_tokens"),
    ],
)
def test_malformed_bpe_content(tmp_path, change, expected):
    path = tmp_path / "t.json"
    BPETokenizer.train("hello hello", 262).save(path)
    edit(path, change)
    assert expected in load_error(path)


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda d: d.update(chars="abc"), "'chars' must be a list"),
        (lambda d: d.update(chars=["a", "a"]), "distinct single characters"),
        (lambda d: d.update(chars=["ab"]), "distinct single characters"),
        (lambda d: d.update(chars=[["a"]]), "malformed"),
        (lambda d: d.pop("chars"), "malformed"),
        (lambda d: d.update(special_tokens={"<pad>": 0, "<unk>": 1, "<bos>": 3, "<eos>": 2}), "special tokens must be"),
    ],
)
def test_malformed_char_content(tmp_path, change, expected):
    path = tmp_path / "t.json"
    CharTokenizer.train("hello").save(path)
    edit(path, change)
    assert expected in load_error(path)


def test_missing_file(tmp_path):
    assert "does not exist" in load_error(tmp_path / "nope.json")


def test_directory(tmp_path):
    message = load_error(tmp_path)
    assert "is a directory" in message


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions as a normal user")
def test_unreadable_file(saved):
    saved.chmod(0)
    try:
        assert "permission denied" in load_error(saved)
    finally:
        saved.chmod(0o644)


def test_tokenizer_from_dict_names_its_source(tok):
    data = tok.to_dict()
    data["version"] = 99
    with pytest.raises(QuillError, match="checkpoint 'run1.pt'"):
        tokenizer_from_dict(data, source="checkpoint 'run1.pt'")
    assert tokenizer_from_dict(tok.to_dict()).fingerprint == tok.fingerprint


# --- fuzz: whatever the file holds, loading gives a tokenizer or a QuillError ------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.filterwarnings("ignore::gpt_runtime.errors.QuillWarning")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["char", "bpe"]), key=st.sampled_from(["chars", "merges", "pattern", "special_tokens", "kind", "version", "format"]), value=json_values, fit=st.booleans())
def test_any_corruption_is_a_clear_error(tmp_path, kind, key, value, fit):
    tok = CharTokenizer.train("hello") if kind == "char" else BPETokenizer.train("hello hello", 262)
    data = tok.to_dict()
    data[key] = value
    if fit:
        refit(data)
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    try:
        loaded = load_tokenizer(path)
    except QuillError as exc:
        assert str(path) in exc.message
    else:
        loaded.decode(loaded.encode("hello"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(merges=st.lists(st.lists(st.integers(-5, 2**80), min_size=2, max_size=2), max_size=4))
def test_any_merge_ids_are_checked(tmp_path, merges):
    data = BPETokenizer([], PATTERNS["gpt2"]).to_dict()
    n = 256 + len(merges)
    data.update(merges=merges, special_tokens={"<pad>": n, "<bos>": n + 1, "<eos>": n + 2})
    refit(data)
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    valid = all(0 <= x < 256 + r for r, m in enumerate(merges) for x in m)
    if valid:
        assert load_tokenizer(path).vocab_size == n + 3
    else:
        assert "refers to an id not yet defined" in load_error(path)


def test_file_without_fingerprint_is_refused(saved):
    edit(saved, lambda d: d.pop("fingerprint"))
    assert "has no fingerprint" in load_error(saved)


def test_content_may_not_override_reserved_keys():
    class Sneaky(CharTokenizer):
        def content(self):
            return {**super().content(), "kind": "bpe"}

    tok = Sneaky(["a", "b"])
    with pytest.raises(QuillError, match=r"reserved keys \['kind'\]"):
        tok.to_dict()
