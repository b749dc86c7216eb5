"""`quill tokenizer ...` through the real CLI, in a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_runtime.tokenizer import load_tokenizer
from helpers import SAMPLE_TEXT, run_quill
from plugins.bpe_tokenizer import PATTERNS, SPECIALS as BPE_SPECIALS
from plugins.bpe_tokenizer import BPETokenizer
from plugins.char_tokenizer import CharTokenizer

TRICKY = "Hello, world! 😀 👨\u200d👩\u200d👧 🇫🇷\nsecond line\r\n\ttab\n\n"
BPE_VOCAB = 256 + len(BPE_SPECIALS) + 60


def ok(out) -> str:
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 0, err
    assert "Traceback" not in err
    return out.stdout.decode("utf-8", "replace")


def fails(out, code: int = 1) -> str:
    """Check the failure shape; return the one-line error message."""
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == code, (out.returncode, err)
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.splitlines()
    assert lines and lines[0].startswith("quill: error:"), err
    assert all(line.startswith("  hint:") for line in lines[1:]), err  # at most a hint follows
    assert out.stdout == b""
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer files made through the API (the CLI's training is tested separately)."""
    d = tmp_path_factory.mktemp("toks")
    paths = {"bpe": d / "bpe.json", "char": d / "char.json"}
    BPETokenizer.train(SAMPLE_TEXT + TRICKY, BPE_VOCAB).save(paths["bpe"])
    CharTokenizer.train(SAMPLE_TEXT + TRICKY).save(paths["char"])
    return paths


# --- train -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,extra", [("char", []), ("bpe", ["--vocab-size", str(BPE_VOCAB)]), ("bpe", ["--vocab-size", "300", "--pattern", "gpt4"])])
def test_train_writes_a_loadable_file(corpus, tmp_path, kind, extra):
    out_path = tmp_path / "out" / "t.json"
    stdout = ok(run_quill("tokenizer", "train", str(corpus), "--kind", kind, *extra, "--out", str(out_path)))
    tok = load_tokenizer(out_path)
    assert tok.kind == kind
    assert f"fingerprint {tok.fingerprint}" in stdout
    assert f"vocab size {tok.vocab_size}" in stdout
    assert stdout.startswith(f"wrote {out_path}")
    assert stdout.count("\n") == 1
    if kind == "char":
        assert tok.chars == sorted(set(SAMPLE_TEXT))
    else:
        size = int(extra[extra.index("--vocab-size") + 1])
        assert tok.vocab_size == size
        pattern = extra[extra.index("--pattern") + 1] if "--pattern" in extra else "gpt2"
        assert tok.pattern == PATTERNS[pattern]
        # the CLI trains exactly what the API trains
        assert tok.fingerprint == BPETokenizer.train(SAMPLE_TEXT, size, pattern=pattern).fingerprint


def test_train_default_out_is_relative_to_cwd(corpus, tmp_path):
    ok(run_quill("tokenizer", "train", str(corpus), "--kind", "char", cwd=tmp_path))
    assert load_tokenizer(tmp_path / "tokenizer.json").kind == "char"


def test_train_notes_when_the_corpus_supports_fewer_ids(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("abab")  # gpt2 split: one chunk "abab" -> at most 3 merges
    out = tmp_path / "t.json"
    stdout = ok(run_quill("tokenizer", "train", str(corpus), "--vocab-size", "1000", "--out", str(out)))
    tok = load_tokenizer(out)
    assert tok.vocab_size < 1000
    assert f"(the corpus only supports {tok.vocab_size})" in stdout


def test_train_refuses_to_overwrite_without_force(corpus, tmp_path):
    out = tmp_path / "t.json"
    out.write_text("precious")
    message = fails(run_quill("tokenizer", "train", str(corpus), "--kind", "char", "--out", str(out)))
    assert "already exists" in message and str(out) in message
    assert out.read_text() == "precious"
    ok(run_quill("tokenizer", "train", str(corpus), "--kind", "char", "--out", str(out), "--force"))
    assert load_tokenizer(out).kind == "char"


# --- encode / decode -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_encode_prints_a_json_list(files, kind):
    text = "First Citizen: speak"
    stdout = ok(run_quill("tokenizer", "encode", "--tokenizer", str(files[kind]), text))
    assert stdout.endswith("\n") and stdout.count("\n") == 1
    assert json.loads(stdout) == load_tokenizer(files[kind]).encode(text)


def test_encode_reads_stdin(files):
    tok = load_tokenizer(files["bpe"])
    stdout = ok(run_quill("tokenizer", "encode", "--tokenizer", str(files["bpe"]), "-", input=TRICKY.encode()))
    ids = json.loads(stdout)
    assert ids == tok.encode(TRICKY)  # nothing stripped: the trailing newlines are encoded too
    assert tok.decode(ids) == TRICKY


def test_encode_special_tokens_only_with_allow_special(files):
    tok = load_tokenizer(files["bpe"])
    eos = tok.special_tokens["<eos>"]
    plain = json.loads(ok(run_quill("tokenizer", "encode", "--tokenizer", str(files["bpe"]), "hi<eos>")))
    assert eos not in plain and plain == tok.encode("hi<eos>")
    special = json.loads(ok(run_quill("tokenizer", "encode", "--tokenizer", str(files["bpe"]), "--allow-special", "hi<eos>")))
    assert special == tok.encode("hi") + [eos]


def test_encode_with_unknown_chars_warns_on_stderr(files):
    out = run_quill("tokenizer", "encode", "--tokenizer", str(files["char"]), "Zebra ß")
    ok(out)
    assert "ß" not in SAMPLE_TEXT + TRICKY
    err = out.stderr.decode()
    assert err.startswith("quill: warning:") and "<unk>" in err and "'ß'" in err


def test_decode_writes_exact_bytes_without_newline(files):
    tok = load_tokenizer(files["bpe"])
    text = "no newline at the end 😀"
    ids = tok.encode(text)
    out = run_quill("tokenizer", "decode", "--tokenizer", str(files["bpe"]), json.dumps(ids))
    ok(out)
    assert out.stdout == text.encode("utf-8")


def test_decode_writes_raw_bytes_even_mid_character(files):
    # id b is the single byte b: half an emoji comes out as those bytes, not U+FFFD
    half = list("😀".encode("utf-8")[:2])
    out = run_quill("tokenizer", "decode", "--tokenizer", str(files["bpe"]), json.dumps(half))
    ok(out)
    assert out.stdout == bytes(half)


def test_decode_reads_stdin(files):
    tok = load_tokenizer(files["bpe"])
    ids = tok.encode(TRICKY)
    out = run_quill("tokenizer", "decode", "--tokenizer", str(files["bpe"]), "-", input=(json.dumps(ids) + "\n").encode())
    ok(out)
    assert out.stdout == TRICKY.encode("utf-8")


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_encode_decode_pipeline_round_trip(files, kind):
    data = TRICKY.encode("utf-8")
    encoded = run_quill("tokenizer", "encode", "--tokenizer", str(files[kind]), "-", input=data)
    ok(encoded)
    decoded = run_quill("tokenizer", "decode", "--tokenizer", str(files[kind]), "-", input=encoded.stdout)
    ok(decoded)
    assert decoded.stdout == data


# --- inspect ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_inspect_without_text(files, kind):
    tok = load_tokenizer(files[kind])
    stdout = ok(run_quill("tokenizer", "inspect", "--tokenizer", str(files[kind])))
    assert re.search(rf"^fingerprint\s+{tok.fingerprint}$", stdout, re.M)
    assert re.search(rf"^kind\s+{kind}$", stdout, re.M)
    assert re.search(rf"^vocab size\s+{tok.vocab_size}$", stdout, re.M)
    for name, i in tok.special_tokens.items():
        assert f"{name}={i}" in stdout
    assert "pieces:" not in stdout
    assert ("pre split" in stdout) == (kind == "bpe")


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_inspect_with_text(files, kind):
    tok = load_tokenizer(files[kind])
    text = "Speak, speak. 😀"
    ids = tok.encode(text)
    n_bytes = len(text.encode("utf-8"))
    stdout = ok(run_quill("tokenizer", "inspect", "--tokenizer", str(files[kind]), text))
    assert re.search(rf"^fingerprint\s+{tok.fingerprint}$", stdout, re.M)
    assert f"{n_bytes} bytes -> {len(ids)} tokens, {n_bytes / len(ids):.2f} bytes/token" in stdout
    piece_lines = stdout.split("pieces:\n", 1)[1].splitlines()
    assert [int(line.split()[0]) for line in piece_lines] == ids
    for line, i in zip(piece_lines, ids):
        shown = line.split(None, 1)[1]
        piece = tok.pieces[i]
        try:
            expected = piece.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: shown as escaped bytes
            assert shown == 'b"' + "".join(f"\\x{b:02x}" for b in piece) + '"'
        else:
            assert json.loads(shown) == expected


def test_inspect_json(files):
    tok = load_tokenizer(files["bpe"])
    text = "First Citizen:\n😀"
    ids = tok.encode(text)
    info = json.loads(ok(run_quill("tokenizer", "inspect", "--tokenizer", str(files["bpe"]), "--json", text)))
    assert info["fingerprint"] == tok.fingerprint
    assert info["kind"] == "bpe" and info["vocab_size"] == tok.vocab_size
    assert info["special_tokens"] == tok.special_tokens
    assert info["pre_split"] == "gpt2"
    assert info["tokens"] == len(ids)
    assert info["text_bytes"] == len(text.encode("utf-8"))
    assert info["bytes_per_token"] == pytest.approx(len(text.encode("utf-8")) / len(ids), abs=1e-3)
    assert [p["id"] for p in info["pieces"]] == ids
    assert "".join(p["text"] for p in info["pieces"] if "\ufffd" not in p["text"]) in text.replace("😀", "")
    # the raw bytes survive even for pieces that split a character
    assert b"".join(bytes.fromhex(p["bytes"]) for p in info["pieces"]).decode("utf-8") == text

    info = json.loads(ok(run_quill("tokenizer", "inspect", "--tokenizer", str(files["char"]), "--json")))
    assert info["fingerprint"] == load_tokenizer(files["char"]).fingerprint
    assert "pieces" not in info and "pre_split" not in info


def test_inspect_reads_stdin(files):
    tok = load_tokenizer(files["bpe"])
    info = json.loads(ok(run_quill("tokenizer", "inspect", "--tokenizer", str(files["bpe"]), "--json", "-", input=TRICKY.encode())))
    assert [p["id"] for p in info["pieces"]] == tok.encode(TRICKY)


def test_inspect_empty_text(files):
    info = json.loads(ok(run_quill("tokenizer", "inspect", "--tokenizer", str(files["bpe"]), "--json", "")))
    assert info["tokens"] == 0 and info["bytes_per_token"] is None
    stdout = ok(run_quill("tokenizer", "inspect", "--tokenizer", str(files["bpe"]), ""))
    assert "0 bytes -> 0 tokens, no tokens" in stdout


# --- errors ----------------------------------------------------------------------------------

def test_error_empty_corpus(tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_bytes(b"")
    message = fails(run_quill("tokenizer", "train", str(corpus), "--kind", "char", "--out", str(tmp_path / "t.json")))
    assert "is empty" in message and str(corpus) in message
    corpus.write_bytes(b"\xef\xbb\xbf")  # only a byte-order mark
    assert "is empty" in fails(run_quill("tokenizer", "train", str(corpus), "--kind", "char", "--out", str(tmp_path / "t.json")))
    assert not (tmp_path / "t.json").exists()


def test_error_corpus_not_utf8(tmp_path):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("café".encode("latin-1"))
    message = fails(run_quill("tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "t.json")))
    assert "not UTF-8" in message and "0xe9" in message and "offset 3" in message


def test_error_corpus_is_a_directory(tmp_path):
    message = fails(run_quill("tokenizer", "train", str(tmp_path), "--kind", "char", "--out", str(tmp_path / "t.json")))
    assert "is a directory" in message


def test_error_out_cannot_be_written(corpus, tmp_path):
    out_dir = tmp_path / "a_directory"
    out_dir.mkdir()
    message = fails(run_quill("tokenizer", "train", str(corpus), "--kind", "char", "--out", str(out_dir), "--force"))
    assert "cannot write" in message and str(out_dir) in message
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a parent "directory" that is a file
    message = fails(run_quill("tokenizer", "train", str(corpus), "--kind", "char", "--out", str(blocker / "t.json")))
    assert "cannot write" in message
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_error_corpus_missing(tmp_path):
    message = fails(run_quill("tokenizer", "train", str(tmp_path / "nope.txt"), "--kind", "char", "--out", str(tmp_path / "t.json")))
    assert "does not exist" in message


@pytest.mark.parametrize("action,arg", [("encode", "hi"), ("decode", "[1]"), ("inspect", "hi")])
def test_error_missing_tokenizer_file(tmp_path, action, arg):
    path = tmp_path / "nope.json"
    message = fails(run_quill("tokenizer", action, "--tokenizer", str(path), arg))
    assert "does not exist" in message and str(path) in message


def test_error_corrupt_tokenizer_file(files, tmp_path):
    path = tmp_path / "t.json"
    path.write_bytes(files["bpe"].read_bytes()[:100])
    message = fails(run_quill("tokenizer", "encode", "--tokenizer", str(path), "hi"))
    assert "truncated" in message and str(path) in message


def test_error_unknown_kind_suggests_the_closest(corpus, tmp_path):
    out = run_quill("tokenizer", "train", str(corpus), "--kind", "bep", "--out", str(tmp_path / "t.json"))
    message = fails(out, code=2)
    assert "'bep'" in message
    assert "did you mean 'bpe'?" in out.stderr.decode()
    out = run_quill("tokenizer", "train", str(corpus), "--kind", "chars", "--out", str(tmp_path / "t.json"))
    fails(out, code=2)
    assert "did you mean 'char'?" in out.stderr.decode()


@pytest.mark.parametrize("ids,expected", [("[1, 2", "not valid JSON"), ("hello", "not valid JSON"), ("", "not valid JSON"), ('{"a": 1}', "JSON list of integers"), ("[1.5]", "JSON list of integers"), ("[true]", "JSON list of integers"), ('["1"]', "JSON list of integers")])
def test_error_bad_ids(files, ids, expected):
    assert expected in fails(run_quill("tokenizer", "decode", "--tokenizer", str(files["bpe"]), ids))


def test_error_bad_ids_on_stdin(files):
    assert "not valid JSON" in fails(run_quill("tokenizer", "decode", "--tokenizer", str(files["bpe"]), "-", input=b"[1,"))
    assert "not UTF-8" in fails(run_quill("tokenizer", "decode", "--tokenizer", str(files["bpe"]), "-", input=b"[\xff]"))


def test_error_non_utf8_text_on_stdin(files):
    assert "not UTF-8" in fails(run_quill("tokenizer", "encode", "--tokenizer", str(files["bpe"]), "-", input=b"caf\xe9"))


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_error_id_out_of_range(files, kind):
    size = load_tokenizer(files[kind]).vocab_size
    for bad in (size, -1, 10**40):
        message = fails(run_quill("tokenizer", "decode", "--tokenizer", str(files[kind]), json.dumps([0, bad])))
        assert f"token id {bad}" in message and f"0..{size - 1}" in message


@pytest.mark.parametrize(
    "args,expected",
    [
        (["tokenizer", "encode", "hi"], "--tokenizer"),
        (["tokenizer", "decode", "[1]"], "--tokenizer"),
        (["tokenizer", "inspect"], "--tokenizer"),
        (["tokenizer", "train"], "corpus"),
        (["tokenizer", "train", "c.txt", "--vocab-size", "lots"], "invalid int value"),
        (["tokenizer", "train", "c.txt", "--vocab-size", "0"], "positive"),
        (["tokenizer", "frobnicate"], "invalid choice"),
        (["tokenizer", "encode", "--tokenizer", "t.json", "hi", "--bogus"], "unrecognized arguments"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, expected):
    message = fails(run_quill(*args, cwd=tmp_path), code=2)
    assert expected in message


def test_bad_training_options_are_usage_errors(corpus, tmp_path):
    out = str(tmp_path / "t.json")

    def train(*args):
        return fails(run_quill("tokenizer", "train", str(corpus), "--out", out, *args), code=2)

    assert "needs a vocabulary size" in train()
    assert "too small" in train("--vocab-size", "100")
    assert "invalid pre-split pattern" in train("--vocab-size", "300", "--pattern", "(")
    assert "takes no options" in train("--kind", "char", "--pattern", "gpt2")
    # a misspelled pattern name is not silently taken as a regular expression
    error = train("--vocab-size", "300", "--pattern", "gpt3")
    assert "unknown pre-split pattern 'gpt3'" in error
    assert "unknown pre-split pattern ''" in train("--vocab-size", "300", "--pattern", "")
    assert not Path(out).exists()


def test_no_action_shows_help_and_exits_2():
    out = run_quill("tokenizer")
    assert out.returncode == 2
    assert b"train" in out.stderr and b"Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args",
    [[], ["tokenizer"], ["tokenizer", "train"], ["tokenizer", "encode"], ["tokenizer", "decode"], ["tokenizer", "inspect"], ["plugins"]],
    ids=lambda a: " ".join(a) or "quill",
)
def test_help_has_examples(args):
    stdout = ok(run_quill(*args, "--help"))
    assert "examples:" in stdout
    assert "quill " in stdout.split("examples:", 1)[1]


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("action", ["encode", "inspect"])
def test_text_argument_that_is_not_utf8_is_a_clear_error(files, kind, action):
    # Bytes that are not UTF-8 reach Python as lone surrogates; say what they really are.
    out = subprocess.run(
        [sys.executable, "-m", "tui.cli", "tokenizer", action, "--tokenizer", str(files[kind]), b"caf\xe9"],
        capture_output=True, timeout=60,
    )
    assert "text given as an argument is not UTF-8 (invalid byte at offset 3)" in fails(out)


def test_help_and_version_import_nothing_heavy():
    # `quill --help` must answer instantly: no torch, and none of the plugin machinery.
    code = (
        "import sys\n"
        "from tui.cli import main\n"
        "for args in (['--help'], ['--version'], ['tokenizer', '--help'], ['train', '--help'], ['chat', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'pluggy', 'rich', 'regex', 'textual', 'safetensors', 'prompt_toolkit') if m in sys.modules)\n"
        "print(heavy, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert out.stderr.decode().strip().splitlines()[-1] == "[]"
