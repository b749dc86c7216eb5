"""Corpora as people have them: many files, directories, JSON Lines, separators, the split
across documents, skipped files, unknown characters and --extend (`corpus_prepare`), and
`--tokenizer` naming a profile or a checkpoint."""

from __future__ import annotations

import json
from array import array
from pathlib import Path

import pytest

import gpt_runtime.data_writer as data_module
from gpt_runtime.corpus_prepare import Options, prepare_corpus
from gpt_runtime.data import DataDir, prepare
from gpt_runtime.errors import QuillError
from gpt_runtime.tokenizer import is_extension, load_tokenizer
from helpers import SAMPLE_TEXT, run_quill
from plugins.bpe_tokenizer import BPETokenizer
from plugins.char_tokenizer import CharTokenizer

SHIPPED = Path(__file__).resolve().parent.parent / "profiles"
ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;?!'\n"


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer.train(ALPHABET)


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def ids(out: Path, split: str) -> list[int]:
    meta = json.loads((out / "meta.json").read_text())
    values = array({"uint16": "H", "uint32": "I"}[meta["dtype"]])
    values.frombytes((out / f"{split}.bin").read_bytes())
    return values.tolist()


def ok(out) -> str:
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 0, err
    assert "Traceback" not in err and "warning" not in err, err
    return out.stdout.decode("utf-8")


def fails(out) -> str:
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 1, err
    assert "Traceback" not in err and err.startswith("quill: error: "), err
    assert out.stdout == b""
    return err.splitlines()[0]


# --- several files and directories ---------------------------------------------------------------

def test_files_and_directories_are_documents_separated_by_eos(tmp_path, tok):
    a = write(tmp_path / "a.txt", "first one\n")
    write(tmp_path / "d" / "b.txt", "second\n")
    write(tmp_path / "d" / "sub" / "c.txt", "third\n")
    write(tmp_path / "d" / ".hidden.txt", "never read\n")
    meta = prepare_corpus([a, tmp_path / "d"], tok, tmp_path / "out", val_fraction=0)
    eos = tok.special_tokens["<eos>"]
    assert ids(tmp_path / "out", "train") == tok.encode("first one\n") + [eos] + tok.encode("second\n") + [eos] + tok.encode("third\n")
    assert (meta["files"], meta["documents"], meta["separator"], meta["skipped"]) == (3, 3, "<eos>", {})
    assert meta["inputs"] == [str(a), str(tmp_path / "d")]


def test_the_data_directory_inside_a_corpus_directory_is_not_read(tmp_path, tok):
    write(tmp_path / "a.txt", "alpha\n")
    prepare_corpus([tmp_path], tok, tmp_path / "data", val_fraction=0)
    meta = prepare_corpus([tmp_path], tok, tmp_path / "data", val_fraction=0)
    assert meta["files"] == 1 and ids(tmp_path / "data", "train") == tok.encode("alpha\n")


def test_glob_chooses_files_inside_directories(tmp_path, tok):
    write(tmp_path / "d" / "a.txt", "alpha\n")
    write(tmp_path / "d" / "n" / "b.md", "beta\n")
    write(tmp_path / "d" / "n" / "c.txt", "gamma\n")
    prepare_corpus([tmp_path / "d"], tok, tmp_path / "out", val_fraction=0, options=Options(glob="*.txt"))
    eos = tok.special_tokens["<eos>"]
    assert ids(tmp_path / "out", "train") == tok.encode("alpha\n") + [eos] + tok.encode("gamma\n")


def test_a_text_separator_and_a_special_token_separator(tmp_path, tok):
    files = [write(tmp_path / "a.txt", "one\n"), write(tmp_path / "b.txt", "two\n")]
    prepare_corpus(files, tok, tmp_path / "x", val_fraction=0, options=Options(separator="\n\n"))
    assert ids(tmp_path / "x", "train") == tok.encode("one\n\n\ntwo\n")
    meta = prepare_corpus(files, tok, tmp_path / "y", val_fraction=0, options=Options(separator="<bos>"))
    assert ids(tmp_path / "y", "train") == tok.encode("one\n") + [tok.special_tokens["<bos>"]] + tok.encode("two\n")
    assert meta["separator"] == "<bos>"


def test_gpt2_style_end_of_text_separates_bpe_documents(tmp_path):
    bpe = BPETokenizer.train(SAMPLE_TEXT, 300)
    eot = bpe.special_tokens.get("<|endoftext|>", bpe.special_tokens.get("<eos>"))
    files = [write(tmp_path / "a.txt", "All:\nSpeak.\n"), write(tmp_path / "b.txt", "First Citizen:\n")]
    prepare_corpus(files, bpe, tmp_path / "out", val_fraction=0)
    assert ids(tmp_path / "out", "train") == bpe.encode("All:\nSpeak.\n") + [eot] + bpe.encode("First Citizen:\n")


def test_a_tokenizer_without_end_of_text_needs_a_separator(tmp_path, monkeypatch, tok):
    no_eos = CharTokenizer(tok.chars)
    monkeypatch.setattr(no_eos, "special_tokens", {k: v for k, v in tok.special_tokens.items() if k != "<eos>"})
    files = [write(tmp_path / "a.txt", "one\n"), write(tmp_path / "b.txt", "two\n")]
    with pytest.raises(QuillError, match="no end-of-text token") as info:
        prepare_corpus(files, no_eos, tmp_path / "out")
    assert "--separator" in info.value.hint
    prepare_corpus(files[:1], no_eos, tmp_path / "one", val_fraction=0)  # one file is one document: no separator needed


# --- one file stays as it was ----------------------------------------------------------------

@pytest.mark.parametrize("val_fraction", [0.0, 0.1, 0.37])
def test_a_single_file_prepares_exactly_as_prepare_does(tmp_path, val_fraction):
    tok = CharTokenizer.train(SAMPLE_TEXT)
    corpus = write(tmp_path / "c.txt", b"\xef\xbb\xbf" + SAMPLE_TEXT.encode())
    old = prepare(corpus, tok, tmp_path / "old", val_fraction)
    new = prepare_corpus([corpus], tok, tmp_path / "new", val_fraction)
    for split in ("train", "val"):
        assert ids(tmp_path / "new", split) == ids(tmp_path / "old", split)
    assert {k: new[k] for k in old} == old
    assert new["separator"] is None and new["documents"] == 1


# --- the split across documents --------------------------------------------------------------

def test_documents_before_the_split_point_train_after_it_validate_and_the_one_holding_it_is_cut(tmp_path, tok):
    texts = ["aaaa\n" * 4, "bbbb\nbbbb\nbbbb\nbbbb\n", "cccc\n" * 4]  # 20 bytes each
    files = [write(tmp_path / f"{i}.txt", t) for i, t in enumerate(texts)]
    meta = prepare_corpus(files, tok, tmp_path / "out", val_fraction=0.4)  # split point: byte 36, inside b, at its line 4 (byte 35)
    eos = tok.special_tokens["<eos>"]
    assert ids(tmp_path / "out", "train") == tok.encode(texts[0]) + [eos] + tok.encode("bbbb\n" * 4)
    assert ids(tmp_path / "out", "val") == tok.encode(texts[2])
    prepare_corpus(files, tok, tmp_path / "cut", val_fraction=0.5)  # byte 30, inside b: its last two lines validate
    assert ids(tmp_path / "cut", "train") == tok.encode(texts[0]) + [eos] + tok.encode("bbbb\nbbbb\n")
    assert ids(tmp_path / "cut", "val") == tok.encode("bbbb\nbbbb\n") + [eos] + tok.encode(texts[2])
    assert meta["train_bytes"] + meta["val_bytes"] == 60


def test_jsonl_records_are_documents_and_the_one_holding_the_split_point_validates_whole(tmp_path, tok):
    lines = [json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(["one", "two", "three", "four"])]
    corpus = write(tmp_path / "r.jsonl", "".join(lines))
    size = sum(len(line) for line in lines)
    split = int(size * 0.6)
    ends = [sum(len(line) for line in lines[:i + 1]) for i in range(4)]
    n_train = sum(end <= split for end in ends)
    assert 0 < n_train < 4 and ends[n_train - 1] < split  # a record holds the split point
    prepare_corpus([corpus], tok, tmp_path / "out", val_fraction=0.4)
    eos = tok.special_tokens["<eos>"]

    def joined(texts):
        return [i for n, t in enumerate(texts) for i in ([eos] if n else []) + tok.encode(t)]
    texts = ["one", "two", "three", "four"]
    assert ids(tmp_path / "out", "train") == joined(texts[:n_train])
    assert ids(tmp_path / "out", "val") == joined(texts[n_train:])


# --- JSON Lines -------------------------------------------------------------------------------

def test_jsonl_field_and_blank_lines(tmp_path, tok):
    corpus = write(tmp_path / "r.jsonl", '{"body": "hello"}\n\n{"body": "world", "x": 1}\n')
    meta = prepare_corpus([corpus], tok, tmp_path / "out", val_fraction=0, options=Options(field="body"))
    assert ids(tmp_path / "out", "train") == tok.encode("hello") + [tok.special_tokens["<eos>"]] + tok.encode("world")
    assert meta["documents"] == 2


@pytest.mark.parametrize("line,problem", [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"other": "x"}', "has no 'text' field"),
    ('{"text": 3}', "its 'text' field is int, not a string"),
])
def test_a_bad_jsonl_line_names_file_and_line_unless_skipped(tmp_path, tok, line, problem):
    corpus = write(tmp_path / "r.jsonl", f'{{"text": "good one"}}\n{line}\n{{"text": "good two"}}\n')
    with pytest.raises(QuillError) as info:
        prepare_corpus([corpus], tok, tmp_path / "out")
    assert info.value.message.startswith(f"{corpus}:2: {problem}")
    assert "--skip-bad" in info.value.hint
    assert not (tmp_path / "out" / "meta.json").exists() and not list((tmp_path / "out").glob(".*.tmp"))
    meta = prepare_corpus([corpus], tok, tmp_path / "out", val_fraction=0, options=Options(skip_bad=True))
    assert meta["skipped"] == {"bad lines": 1} and meta["documents"] == 2


# --- files skipped in directories, errors for files named ---------------------------------------

def test_binary_non_utf8_and_empty_files_in_a_directory_are_skipped_and_counted(tmp_path, tok):
    write(tmp_path / "d" / "good.txt", "good text\n")
    write(tmp_path / "d" / "image.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    write(tmp_path / "d" / "latin1.txt", "caf\xe9\n".encode("latin-1") * 5000)  # the bad byte comes first in every block
    write(tmp_path / "d" / "late.txt", b"fine\n" * 3000 + b"\xff")  # ... and here only at the end
    write(tmp_path / "d" / "empty.txt", b"")
    meta = prepare_corpus([tmp_path / "d"], tok, tmp_path / "out", val_fraction=0)
    assert meta["skipped"] == {"binary": 1, "empty": 1, "not UTF-8": 2}
    assert (meta["files"], meta["documents"]) == (1, 1)
    assert ids(tmp_path / "out", "train") == tok.encode("good text\n")


def test_files_named_keep_their_errors(tmp_path, tok):
    with pytest.raises(QuillError, match="is empty"):
        prepare_corpus([write(tmp_path / "e.txt", b"")], tok, tmp_path / "out")
    with pytest.raises(QuillError, match=r"is not UTF-8 text \(invalid byte 0xe9 at offset 3\)"):
        prepare_corpus([write(tmp_path / "ok.txt", "fine\n"), write(tmp_path / "l.txt", b"caf\xe9\n")], tok, tmp_path / "out")
    with pytest.raises(QuillError, match="does not exist"):
        prepare_corpus([tmp_path / "nope.txt"], tok, tmp_path / "out")


def test_no_text_at_all_is_an_error(tmp_path, tok):
    write(tmp_path / "d" / "x.bin", b"\0\1\2")
    with pytest.raises(QuillError, match=r"no text to prepare in .*\(1 binary skipped\)"):
        prepare_corpus([tmp_path / "d"], tok, tmp_path / "out")
    with pytest.raises(QuillError, match="holds no text"):
        prepare_corpus([write(tmp_path / "r.jsonl", '{"text": ""}\n')], tok, tmp_path / "out2")


# --- bounded memory ----------------------------------------------------------------------------

@pytest.mark.parametrize("block_bytes", [1, 7, 64])
def test_tiny_blocks_give_the_same_ids_as_whole_encoding(tmp_path, monkeypatch, tok, block_bytes):
    texts = [SAMPLE_TEXT[:500], "été à ça\n" * 10, SAMPLE_TEXT[500:900]]
    files = [write(tmp_path / "d" / f"{i}.txt", t) for i, t in enumerate(texts)]
    whole = prepare_corpus([tmp_path / "d"], tok, tmp_path / "whole", val_fraction=0.3)
    monkeypatch.setattr(data_module, "BLOCK_BYTES", block_bytes)
    small = prepare_corpus([tmp_path / "d"], tok, tmp_path / "small", val_fraction=0.3)
    assert ids(tmp_path / "small", "train") == ids(tmp_path / "whole", "train")
    assert ids(tmp_path / "small", "val") == ids(tmp_path / "whole", "val")
    assert small["unknown_chars"] == whole["unknown_chars"]
    eos = tok.special_tokens["<eos>"]
    assert ids(tmp_path / "whole", "train") + ids(tmp_path / "whole", "val") == (
        tok.encode(texts[0]) + [eos] + tok.encode(texts[1]) + [eos] + tok.encode(texts[2]))
    assert len(files) == 3


# --- unknown characters and --extend ---------------------------------------------------------

def test_unknown_characters_are_counted_not_warned(tmp_path, tok, recwarn):
    corpus = write(tmp_path / "c.txt", "caf\u00e9 na\u00efve caf\u00e9\n")
    meta = prepare_corpus([corpus], tok, tmp_path / "out", val_fraction=0)
    assert meta["unknown_chars"] == {"occurrences": 3, "distinct": 2, "first": ["\u00e9", "\u00ef"]}
    assert ids(tmp_path / "out", "train").count(tok.special_tokens["<unk>"]) == 3
    assert not recwarn.list


def test_extend_keeps_every_old_id_and_adds_new_ones_after(tmp_path, tok):
    corpus = write(tmp_path / "c.txt", "caf\u00e9 \u00fcber caf\u00e9\n")
    meta = prepare_corpus([corpus], tok, tmp_path / "out", val_fraction=0, extend=True)
    new = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert new.chars == tok.chars + ["\u00e9", "\u00fc"] and is_extension(tok, new) and not is_extension(new, tok)
    assert meta["extends"] == tok.fingerprint != new.fingerprint == meta["tokenizer_fingerprint"]
    assert meta["unknown_chars"]["occurrences"] == 0 and meta["added_tokens"] == 2
    assert ids(tmp_path / "out", "train") == new.encode("caf\u00e9 \u00fcber caf\u00e9\n")
    assert new.encode("abc") == tok.encode("abc")
    assert DataDir.open(tmp_path / "out").tokenizer.fingerprint == new.fingerprint


def test_extend_without_anything_missing_keeps_the_tokenizer(tmp_path, tok):
    meta = prepare_corpus([write(tmp_path / "c.txt", "plain\n")], tok, tmp_path / "out", val_fraction=0, extend=True)
    assert meta["tokenizer_fingerprint"] == tok.fingerprint and "extends" not in meta


def test_extend_with_bpe_is_a_clear_error(tmp_path):
    bpe = BPETokenizer.train(SAMPLE_TEXT, 280)
    with pytest.raises(QuillError, match="the 'bpe' tokenizer cannot be extended"):
        prepare_corpus([write(tmp_path / "c.txt", "x\n")], bpe, tmp_path / "out", extend=True)
    assert not bpe.missing("anything at all \u00e9")


def test_is_extension():
    old = CharTokenizer(["a", "b"])
    assert is_extension(old, old) and is_extension(old, old.extend(["c", "a"]))
    assert old.extend(["c", "a"]).chars == ["a", "b", "c"]
    assert not is_extension(old, CharTokenizer(["b", "a", "c"]))
    assert not is_extension(old, BPETokenizer.train(SAMPLE_TEXT, 270))


# --- through the CLI ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("corpora_cli")
    tok = CharTokenizer.train(ALPHABET)
    tok.save(d / "chars.json")
    write(d / "docs" / "a.txt", "hello there\n")
    write(d / "docs" / "b.md", "caf\u00e9 \u00e9t\u00e9\n")
    write(d / "docs" / "pic.bin", b"\0\1\2\3")
    write(d / "docs" / "empty.txt", b"")
    write(d / "r.jsonl", '{"text": "a record"}\nnot json\n{"text": "another one"}\n')
    return {"dir": d, "tok": tok}


def test_cli_prepare_reports_what_it_read_skipped_and_could_not_encode(cli):
    d = cli["dir"]
    stdout = ok(run_quill("prepare", str(d / "docs"), str(d / "r.jsonl"), "--skip-bad", "--tokenizer", str(d / "chars.json"),
                          "--out", str(d / "out"), "--val-fraction", "0.2"))
    meta = json.loads((d / "out" / "meta.json").read_text())
    assert stdout.startswith(f"wrote {d / 'out'}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")
    assert "read 3 files, 4 documents, separated by '<eos>'" in stdout
    assert "skipped 1 empty file, 1 binary file, 1 bad line\n" in stdout
    assert "3 unknown characters (1 distinct) became <unk>: '\u00e9'" in stdout
    assert meta["skipped"] == {"empty": 1, "binary": 1, "bad lines": 1}
    assert (meta["files"], meta["documents"], meta["separator"]) == (3, 4, "<eos>")


def test_cli_bad_line_without_skip_bad(cli):
    d = cli["dir"]
    assert f"{d / 'r.jsonl'}:2: not JSON" in fails(run_quill("prepare", str(d / "r.jsonl"), "--tokenizer", str(d / "chars.json"),
                                                             "--out", str(d / "bad")))


def test_cli_glob_extend_and_force(cli):
    d = cli["dir"]
    args = ["prepare", str(d / "docs"), "--glob", "*.md", "--tokenizer", str(d / "chars.json"), "--out", str(d / "ext"),
            "--val-fraction", "0"]
    ok(run_quill(*args))
    assert "already holds a prepared data directory" in fails(run_quill(*args, "--extend"))
    stdout = ok(run_quill(*args, "--extend", "--force"))
    meta = json.loads((d / "ext" / "meta.json").read_text())
    assert meta["extends"] == cli["tok"].fingerprint and meta["files"] == 1
    assert f"extended tokenizer {cli['tok'].fingerprint} by 1 character (new ids from {cli['tok'].vocab_size})" in stdout
    new = load_tokenizer(d / "ext" / "tokenizer.json")
    assert new.chars == cli["tok"].chars + ["\u00e9"]


def test_cli_prepare_with_a_shipped_profile_and_a_checkpoint(cli):
    d = cli["dir"]
    env = {"QUILL_SHIPPED_PROFILES": str(SHIPPED)}
    corpus = write(d / "shakespeare.txt", SAMPLE_TEXT)
    ok(run_quill("prepare", str(corpus), "--tokenizer", "shakespeare-char", "--out", str(d / "p"), env=env))
    ok(run_quill("prepare", str(corpus), "--tokenizer", str(SHIPPED / "shakespeare-char" / "model.safetensors"),
                 "--out", str(d / "c")))
    from gpt_runtime.sources import tokenizer_source

    shipped = tokenizer_source(SHIPPED / "shakespeare-char" / "model.safetensors")
    for out in ("p", "c"):
        meta = json.loads((d / out / "meta.json").read_text())
        assert meta["tokenizer_fingerprint"] == shipped.fingerprint
        assert ids(d / out, "train") + ids(d / out, "val") == shipped.encode(SAMPLE_TEXT)


def test_cli_tokenizer_encode_with_a_profile(cli):
    env = {"QUILL_SHIPPED_PROFILES": str(SHIPPED)}
    stdout = ok(run_quill("tokenizer", "encode", "--tokenizer", "shakespeare-char", "To be", env=env))
    from gpt_runtime.sources import tokenizer_source

    assert json.loads(stdout) == tokenizer_source(SHIPPED / "shakespeare-char" / "model.safetensors").encode("To be")
    assert "neither a file, a run directory nor a profile" in fails(
        run_quill("tokenizer", "encode", "--tokenizer", "no-such-profile", "x", env=env))
    assert "tokenizer file 'missing.json' does not exist" in fails(
        run_quill("tokenizer", "encode", "--tokenizer", "missing.json", "x", env=env))
