"""`quill data fetch` against a file server on loopback: never the internet.

Good checksum, bad checksum, a server that is down, a file already there.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from functools import partial
from pathlib import Path

import pytest

from gpt_runtime import cli, corpora
from gpt_runtime.corpora import Corpus
from helpers import SAMPLE_TEXT, one_line_error, run_quill

BODY = (SAMPLE_TEXT * 20).encode("utf-8")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    (root / "input.txt").write_bytes(BODY)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def test_corpus(monkeypatch, server):
    """A corpus whose checksum is that of the served file."""
    corpus = Corpus("tiny", f"{server}/input.txt", hashlib.sha256(BODY).hexdigest(), "tiny.txt", "a test corpus")
    monkeypatch.setitem(corpora.CORPORA, "tiny", corpus)
    return corpus


def test_a_download_with_the_right_checksum_is_saved(test_corpus, tmp_path, capsys):
    out = tmp_path / "data"
    assert cli.main(["data", "fetch", "tiny", "--out", str(out)]) == 0
    assert (out / "tiny.txt").read_bytes() == BODY
    assert capsys.readouterr().out == f"downloaded {out / 'tiny.txt'} ({len(BODY):,} bytes, checksum ok)\n"
    assert sorted(p.name for p in out.iterdir()) == ["tiny.txt"]  # no partial file left
    # a second fetch keeps the good file and says so
    assert cli.main(["data", "fetch", "tiny", "--out", str(out), "--url", "http://127.0.0.1:9/none"]) == 0
    assert capsys.readouterr().out == f"already there: {out / 'tiny.txt'} ({len(BODY):,} bytes, checksum ok)\n"


def test_a_download_stopped_midway_leaves_no_partial_file(test_corpus, tmp_path):
    def ctrl_c(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        corpora.fetch("tiny", tmp_path, progress=ctrl_c)
    assert list(tmp_path.iterdir()) == []


def test_a_file_in_the_way_is_left_alone(test_corpus, tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("my own notes")
    assert cli.main(["data", "fetch", "tiny", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"quill: error: {str(tmp_path / 'tiny.txt')!r} exists but is not tiny (its SHA-256 differs)")
    assert (tmp_path / "tiny.txt").read_text() == "my own notes"


def test_a_download_with_the_wrong_checksum_is_refused_and_not_kept(server, tmp_path):
    # the real corpus's checksum, but the server has other bytes
    out = tmp_path / "data"
    message, hint = one_line_error(run_quill("data", "fetch", "tinyshakespeare", "--out", str(out),
                                             "--url", f"{server}/input.txt"))
    got = hashlib.sha256(BODY).hexdigest()[:16]
    assert message == (f"the download of tinyshakespeare from {server}/input.txt has SHA-256 {got}..., not the "
                       f"expected {corpora.CORPORA['tinyshakespeare'].sha256[:16]}...; nothing was saved")
    assert "try again" in hint
    assert not any(out.iterdir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_is_down_or_a_missing_file_is_one_clear_error(server, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/input.txt"
    message, hint = one_line_error(run_quill("data", "fetch", "tinyshakespeare", "--out", str(tmp_path), "--url", url))
    assert message == f"could not download tinyshakespeare from {url}: [Errno 111] Connection refused"
    assert hint == ("offline? any UTF-8 text file works in its place: pass it to `quill tokenizer train` and "
                    "`quill prepare`")
    message, _ = one_line_error(run_quill("data", "fetch", "tinyshakespeare", "--out", str(tmp_path),
                                          "--url", f"{server}/missing.txt"))
    assert message == f"could not download tinyshakespeare from {server}/missing.txt: HTTP 404 File not found"
    assert not any(Path(tmp_path).iterdir())


def test_unknown_corpus_and_listing():
    message, hint = one_line_error(run_quill("data", "fetch", "tinyshakespear"))
    assert (message, hint) == ("no corpus named 'tinyshakespear'", "did you mean 'tinyshakespeare'?")
    out = run_quill("data", "list")
    assert out.returncode == 0 and out.stdout.decode().startswith("tinyshakespeare  ")
    assert corpora.CORPORA["tinyshakespeare"].sha256 in out.stdout.decode()
