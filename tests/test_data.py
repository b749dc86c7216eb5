"""Data preparation (`prepare`, `DataDir`) and batches (`BatchSampler`, `sequential_windows`)."""

from __future__ import annotations

import json
from array import array
from pathlib import Path

import pytest
import torch

import gpt_runtime.data_writer as data_module
from gpt_runtime.data import BatchSampler, DataDir, prepare, sequential_windows
from gpt_runtime.errors import QuillError
from helpers import SAMPLE_TEXT
from plugins.bpe_tokenizer import SPECIALS as BPE_SPECIALS
from plugins.bpe_tokenizer import BPETokenizer
from plugins.char_tokenizer import SPECIALS as CHAR_SPECIALS
from plugins.char_tokenizer import CharTokenizer

MULTIBYTE_LINES = "héllo wörld — 😀 ñ\nzweite Zeile: ü, ß, €\n\nдругая строка 中文字符\n    indented 🇫🇷 line\n"
MULTIBYTE_ONE_LINE = MULTIBYTE_LINES.replace("\n", " ")
NO_SPACES = "é😀ñ中€ß👨\u200d👩\u200d👧" * 12  # multi-byte characters only: no newline, no space


def read_ids(path: Path, dtype: str) -> list[int]:
    ids = array({"uint16": "H", "uint32": "I"}[dtype])
    ids.frombytes(path.read_bytes())
    return ids.tolist()


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def expected_split(data: bytes, val_fraction: float) -> int:
    """The first line start at or after the val_fraction point, worked out independently."""
    i = int(len(data) * (1 - val_fraction))
    while i < len(data) and not (i == 0 or data[i - 1] == ord("\n")):
        i += 1
    return i


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    return CharTokenizer.train(SAMPLE_TEXT + MULTIBYTE_LINES + NO_SPACES)


# --- prepare: files and dtypes --------------------------------------------------------------------

def test_prepare_writes_a_complete_data_directory(tmp_path, char_tok):
    corpus = write(tmp_path / "c.txt", SAMPLE_TEXT)
    meta = prepare(corpus, char_tok, tmp_path / "d", val_fraction=0.1)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert json.loads((tmp_path / "d" / "meta.json").read_text()) == meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == char_tok.vocab_size
    assert meta["tokenizer_fingerprint"] == char_tok.fingerprint and meta["tokenizer_kind"] == "char"
    split = expected_split(SAMPLE_TEXT.encode(), 0.1)
    assert (meta["train_bytes"], meta["val_bytes"]) == (split, len(SAMPLE_TEXT) - split)
    assert (meta["train_tokens"], meta["val_tokens"]) == (split, len(SAMPLE_TEXT) - split)  # ASCII, one char per token
    d = DataDir.open(tmp_path / "d")
    assert d.tokenizer.fingerprint == char_tok.fingerprint
    assert d.tokens("train").tolist() == char_tok.encode(SAMPLE_TEXT[:split])
    assert d.tokens("val").tolist() == char_tok.encode(SAMPLE_TEXT[split:])


def test_prepare_accepts_a_tokenizer_file(tmp_path, char_tok):
    char_tok.save(tmp_path / "t.json")
    meta = prepare(write(tmp_path / "c.txt", SAMPLE_TEXT), tmp_path / "t.json", tmp_path / "d")
    assert meta["tokenizer_fingerprint"] == char_tok.fingerprint


def big_char_tokenizer(vocab_size: int) -> CharTokenizer:
    """A real char tokenizer with `vocab_size` ids: newline plus that many code points (no surrogates)."""
    chars = ["\n"] + [chr(c) for c in range(0x20, 0x20 + vocab_size + 4096) if not 0xD800 <= c <= 0xDFFF]
    tok = CharTokenizer(chars[: vocab_size - len(CHAR_SPECIALS)])
    assert tok.vocab_size == vocab_size
    return tok


@pytest.mark.parametrize("vocab_size,dtype", [(1 << 16, "uint16"), ((1 << 16) + 1, "uint32"), (70_000, "uint32")])
def test_token_dtype_follows_the_vocabulary_size(tmp_path, vocab_size, dtype):
    tok = big_char_tokenizer(vocab_size)
    top = tok.chars[-3:]  # the highest ids: 65535 fits uint16 exactly, above needs uint32
    text = ("ab" + "".join(top) + "\n") * 20 + "".join(reversed(top)) + "\n"
    ids = tok.encode(text)
    assert max(ids) == vocab_size - 1
    meta = prepare(write(tmp_path / "c.txt", text), tok, tmp_path / "d", val_fraction=0.2)
    assert meta["dtype"] == dtype
    split = expected_split(text.encode(), 0.2)
    n_train = len(tok.encode(text.encode()[:split].decode()))
    width = 2 if dtype == "uint16" else 4
    assert (tmp_path / "d" / "train.bin").stat().st_size == n_train * width
    assert read_ids(tmp_path / "d" / "train.bin", dtype) + read_ids(tmp_path / "d" / "val.bin", dtype) == ids
    d = DataDir.open(tmp_path / "d")  # the saved tokenizer.json of that size loads and matches
    assert torch.cat([d.tokens("train"), d.tokens("val")]).to(torch.int64).tolist() == ids


# --- prepare: the split and block-wise encoding ---------------------------------------------------

@pytest.mark.parametrize("val_fraction", [0.0, 0.05, 0.1, 0.37, 0.5])
def test_validation_split_is_the_last_fraction_from_a_line_start(tmp_path, char_tok, val_fraction):
    text = MULTIBYTE_LINES * 7
    raw = text.encode()
    meta = prepare(write(tmp_path / "c.txt", text), char_tok, tmp_path / "d", val_fraction=val_fraction)
    split = expected_split(raw, val_fraction) if val_fraction else len(raw)
    assert split == 0 or raw[split - 1] == ord("\n")
    assert split >= len(raw) * (1 - val_fraction)
    assert (meta["train_bytes"], meta["val_bytes"]) == (split, len(raw) - split)
    d = DataDir.open(tmp_path / "d")
    assert char_tok.decode(d.tokens("train").tolist()) == raw[:split].decode()
    assert char_tok.decode(d.tokens("val").tolist()) == raw[split:].decode()
    if not val_fraction:
        assert meta["val_tokens"] == 0 and d.tokens("val").numel() == 0


def test_a_byte_order_mark_is_not_text(tmp_path, char_tok):
    meta = prepare(write(tmp_path / "c.txt", b"\xef\xbb\xbf" + SAMPLE_TEXT.encode()), char_tok, tmp_path / "d", val_fraction=0)
    assert DataDir.open(tmp_path / "d").tokens("train").tolist() == char_tok.encode(SAMPLE_TEXT)
    assert meta["train_bytes"] == len(SAMPLE_TEXT)


@pytest.mark.parametrize("block_bytes", [1, 2, 3, 5, 8, 64])
@pytest.mark.parametrize("text", [MULTIBYTE_LINES * 5, MULTIBYTE_ONE_LINE * 5, NO_SPACES], ids=["lines", "one-line", "no-spaces"])
def test_char_blockwise_encoding_equals_whole(tmp_path, monkeypatch, char_tok, block_bytes, text):
    monkeypatch.setattr(data_module, "BLOCK_BYTES", block_bytes)
    assert len(text.encode()) > 4 * block_bytes
    prepare(write(tmp_path / "c.txt", text), char_tok, tmp_path / "d", val_fraction=0)
    assert DataDir.open(tmp_path / "d").tokens("train").tolist() == char_tok.encode(text)


@pytest.fixture(scope="module")
def bpe_toks() -> dict[str, BPETokenizer]:
    # Trained on the same text they encode, so they hold merges such as "\n\n", "\n    " and " w".
    text = (MULTIBYTE_LINES + SAMPLE_TEXT[:600]) * 2
    return {p: BPETokenizer.train(text, 256 + len(BPE_SPECIALS) + 120, pattern=p) for p in ("gpt2", "gpt4", "words")}


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "words"])
@pytest.mark.parametrize("text", [MULTIBYTE_LINES + SAMPLE_TEXT[:600], MULTIBYTE_ONE_LINE * 6], ids=["lines", "one-line"])
def test_bpe_blockwise_encoding_equals_whole(tmp_path, monkeypatch, bpe_toks, pattern, text):
    """Blocks must be cut where the pre-split has a boundary, or the tokens at each cut differ.

    64-byte blocks: each holds a letter followed by whitespace, the place a cut is safe.
    """
    tok = bpe_toks[pattern]
    monkeypatch.setattr(data_module, "BLOCK_BYTES", 64)
    assert len(text.encode()) > 10 * 64
    meta = prepare(write(tmp_path / "c.txt", text), tok, tmp_path / "d", val_fraction=0.25 if "\n" in text else 0.0)
    split = expected_split(text.encode(), 0.25) if "\n" in text else len(text.encode())
    d = DataDir.open(tmp_path / "d")
    assert d.tokens("train").tolist() == tok.encode(text.encode()[:split].decode())
    if "\n" in text:
        assert d.tokens("val").tolist() == tok.encode(text.encode()[split:].decode())
    assert meta["train_tokens"] + meta["val_tokens"] < len(text)  # the merges are in use


def test_progress_is_reported_up_to_the_corpus_size(tmp_path, monkeypatch, char_tok):
    monkeypatch.setattr(data_module, "BLOCK_BYTES", 100)
    calls = []
    prepare(write(tmp_path / "c.txt", SAMPLE_TEXT), char_tok, tmp_path / "d", progress=lambda done, total: calls.append((done, total)))
    assert len(calls) > 10
    assert all(total == len(SAMPLE_TEXT) for _, total in calls)
    dones = [done for done, _ in calls]
    assert dones == sorted(dones) and dones[-1] == len(SAMPLE_TEXT)


# --- prepare: errors ------------------------------------------------------------------------------

def test_empty_corpus(tmp_path, char_tok):
    with pytest.raises(QuillError, match=r"corpus '.*e\.txt' is empty"):
        prepare(write(tmp_path / "e.txt", b""), char_tok, tmp_path / "d")


def test_corpus_is_a_directory(tmp_path, char_tok):
    with pytest.raises(QuillError, match=r"corpus '.*' is a directory, not a file"):
        prepare(tmp_path, char_tok, tmp_path / "d")


def test_missing_corpus(tmp_path, char_tok):
    with pytest.raises(QuillError, match=r"corpus '.*nope\.txt' does not exist"):
        prepare(tmp_path / "nope.txt", char_tok, tmp_path / "d")


@pytest.mark.parametrize("block_bytes", [4, 1 << 22])
@pytest.mark.parametrize("where", [3, 200, len(SAMPLE_TEXT) - 5])  # early, in train, in the val split
def test_non_utf8_corpus_names_the_byte_and_its_offset(tmp_path, monkeypatch, char_tok, block_bytes, where):
    monkeypatch.setattr(data_module, "BLOCK_BYTES", block_bytes)
    raw = bytearray(SAMPLE_TEXT.encode())
    raw[where] = 0xE9  # latin-1 'é': a lead byte without its continuation
    with pytest.raises(QuillError, match=rf"corpus '.*c\.txt' is not UTF-8 text \(invalid byte 0xe9 at offset {where}\)") as info:
        prepare(write(tmp_path / "c.txt", bytes(raw)), char_tok, tmp_path / "d")
    assert "iconv" in info.value.hint
    assert not (tmp_path / "d" / "meta.json").exists()


def test_a_corpus_too_short_for_the_split(tmp_path, char_tok):
    with pytest.raises(QuillError, match="too short for a validation split") as info:
        prepare(write(tmp_path / "c.txt", "no newline after the split point"), char_tok, tmp_path / "d", val_fraction=0.1)
    assert "--val-fraction 0" in info.value.hint
    with pytest.raises(QuillError, match="leaves no training text"):
        prepare(write(tmp_path / "c.txt", "All\nSpeak\n"), char_tok, tmp_path / "d", val_fraction=0.99)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 2.0])
def test_bad_val_fraction(tmp_path, char_tok, fraction):
    with pytest.raises(QuillError, match=r"--val-fraction must be in \[0, 1\)"):
        prepare(write(tmp_path / "c.txt", SAMPLE_TEXT), char_tok, tmp_path / "d", val_fraction=fraction)


# --- DataDir.open errors --------------------------------------------------------------------------

@pytest.fixture
def data_dir(tmp_path, char_tok) -> Path:
    prepare(write(tmp_path / "c.txt", SAMPLE_TEXT), char_tok, tmp_path / "d")
    return tmp_path / "d"


def test_open_missing_directory(tmp_path):
    with pytest.raises(QuillError, match=r"data directory '.*nowhere' does not exist") as info:
        DataDir.open(tmp_path / "nowhere")
    assert "quill prepare" in info.value.hint


def test_open_directory_without_meta(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuillError, match=r"'.*empty' has no meta.json: not a prepared data directory"):
        DataDir.open(tmp_path / "empty")


@pytest.mark.parametrize("content,message", [
    (b'{"version": 1, "dtype": "uint1', r"meta.json' is corrupt \(not JSON\)"),
    (b"\xff\xfe", r"meta.json' is corrupt \(not JSON\)"),
    (b"[1, 2]", r"meta.json' is corrupt \(not a JSON object\)"),
    (b'{"version": 1}', r"meta.json' is corrupt \(it lacks dtype, tokenizer_fingerprint, train_tokens, val_tokens\)"),
    (b'{"version": 99}', r"meta.json' has data format version 99; this Quill reads 1"),
])
def test_open_corrupt_meta(data_dir, content, message):
    (data_dir / "meta.json").write_bytes(content)
    with pytest.raises(QuillError, match=message) as info:
        DataDir.open(data_dir)
    assert "quill prepare" in info.value.hint


@pytest.mark.parametrize("split", ["train", "val"])
def test_bin_size_mismatch(data_dir, split):
    meta = json.loads((data_dir / "meta.json").read_text())
    n = meta[f"{split}_tokens"]
    path = data_dir / f"{split}.bin"
    path.write_bytes(path.read_bytes()[:-3])
    d = DataDir.open(data_dir)
    with pytest.raises(QuillError, match=rf"{split}.bin' should hold {n} tokens \({2 * n} bytes\) but has {2 * n - 3} bytes"):
        d.tokens(split)


def test_missing_bin_file(data_dir):
    (data_dir / "val.bin").unlink()
    with pytest.raises(QuillError, match=r"val.bin' is missing"):
        DataDir.open(data_dir).tokens("val")


def test_tokenizer_json_replaced_by_another_tokenizer(data_dir, char_tok):
    other = CharTokenizer.train("a different alphabet: xyz")
    other.save(data_dir / "tokenizer.json")
    with pytest.raises(QuillError) as info:
        DataDir.open(data_dir)
    message = str(info.value)
    assert char_tok.fingerprint in message and other.fingerprint in message
    assert char_tok.fingerprint != other.fingerprint


def test_tokenizer_json_missing_or_broken(data_dir):
    (data_dir / "tokenizer.json").write_text("{")
    with pytest.raises(QuillError, match=r"tokenizer file '.*tokenizer.json' is truncated or not JSON"):
        DataDir.open(data_dir)
    (data_dir / "tokenizer.json").unlink()
    with pytest.raises(QuillError, match=r"tokenizer file '.*tokenizer.json' does not exist"):
        DataDir.open(data_dir)


# --- BatchSampler ---------------------------------------------------------------------------------

TOKENS = torch.arange(1000, dtype=torch.int32)  # a token's value is its position: windows are easy to check


def draws(sampler: BatchSampler, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [sampler.next() for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_batches_are_contiguous_windows_with_shifted_targets():
    sampler = BatchSampler(TOKENS, block_size=8, batch_size=5, seed=0)
    for x, y in draws(sampler, 20):
        assert x.shape == y.shape == (5, 8) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)
        assert torch.equal(x - x[:, :1], torch.arange(8).expand(5, 8))


def test_every_offset_can_be_drawn_and_none_past_the_end():
    tokens = torch.arange(12)
    sampler = BatchSampler(tokens, block_size=4, batch_size=64, seed=0)
    starts = {int(s) for x, _ in draws(sampler, 10) for s in x[:, 0]}
    assert starts == set(range(12 - 4))  # the last window's target is the last token


def test_sampler_is_deterministic_under_its_seed():
    a = draws(BatchSampler(TOKENS, 8, 4, seed=7), 10)
    b = draws(BatchSampler(TOKENS, 8, 4, seed=7), 10)
    c = draws(BatchSampler(TOKENS, 8, 4, seed=8), 10)
    assert same(a, b)
    assert not same(a, c)


def test_sampler_state_resumes_the_exact_sequence():
    reference = draws(BatchSampler(TOKENS, 8, 4, seed=3), 12)
    first = BatchSampler(TOKENS, 8, 4, seed=3)
    head = draws(first, 5)
    state = first.state().clone()
    torch.manual_seed(123)  # unrelated randomness in between must not matter
    torch.rand(10)
    second = BatchSampler(TOKENS, 8, 4, seed=999)
    second.load_state(state)
    assert same(head + draws(second, 7), reference)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_see_the_one_process_batch(world):
    B = 3
    single = draws(BatchSampler(TOKENS, 8, B * world, seed=5), 6)
    ranks = [draws(BatchSampler(TOKENS, 8, B, seed=5, rank=r, world_size=world), 6) for r in range(world)]
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[r][step][0] for r in range(world)]), x)
        assert torch.equal(torch.cat([ranks[r][step][1] for r in range(world)]), y)
    # and the ranks' slices differ from each other
    assert not torch.equal(ranks[0][0][0], ranks[1][0][0])


@pytest.mark.parametrize("n", [0, 5, 8])
def test_a_split_shorter_than_one_block_is_a_clear_error(n):
    with pytest.raises(QuillError, match=rf"the split has {n} tokens, not enough for one block of 8 \(\+1 target\)") as info:
        BatchSampler(torch.arange(n), block_size=8, batch_size=2, seed=0)
    assert "--block-size" in info.value.hint
    BatchSampler(torch.arange(9), block_size=8, batch_size=2, seed=0).next()  # one more token is enough


# --- sequential_windows ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,block,batch", [(2, 4, 3), (17, 4, 3), (16, 4, 2), (9, 8, 1), (100, 7, 5)])
def test_sequential_windows_predict_every_token_once(n, block, batch):
    tokens = torch.arange(n)
    targets, n_windows = [], 0
    for x, y in sequential_windows(tokens, block, batch):
        assert x.shape == y.shape and x.shape[1] == block and 1 <= x.shape[0] <= batch
        n_windows += x.shape[0]
        mask = y >= 0
        assert torch.equal(y[mask], x[mask] + 1)  # each target follows its input
        assert torch.equal(x[:, 0] % block, torch.zeros(x.shape[0], dtype=torch.int64))  # windows start on block multiples
        for row in range(x.shape[0]):
            length = int(mask[row].sum())
            assert mask[row, :length].all() and not mask[row, length:].any()  # padding only at the end
        targets += y[mask].tolist()
    assert sorted(targets) == targets == list(range(1, n))
    assert n_windows == -(-(n - 1) // block)


def test_failed_preparation_leaves_the_earlier_one_intact(data_dir, tmp_path):
    before = {name: (data_dir / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json")}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(SAMPLE_TEXT.encode() + b"\xff trailing bytes that are not UTF-8\n")
    with pytest.raises(QuillError, match="not UTF-8"):
        prepare(bad, data_dir / "tokenizer.json", data_dir, val_fraction=0.1)
    after = {name: (data_dir / name).read_bytes() for name in before}
    assert after == before
    assert not list(data_dir.glob(".*.tmp"))
