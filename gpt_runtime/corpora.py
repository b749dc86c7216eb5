"""Public corpora that `quill data fetch` downloads and checks.

Only the download needs the network; any local UTF-8 text file works in a
corpus's place for everything else (`quill tokenizer train`, `quill prepare`).
A download is written under a temporary name, its SHA-256 checked, and only
then renamed into place, so a bad or interrupted download never looks like data.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import QuillError, did_you_mean
from .fileio import file_sha256


@dataclass(frozen=True)
class Corpus:
    """A downloadable text corpus and what it must hash to."""

    name: str
    url: str
    sha256: str
    filename: str
    about: str


CORPORA = {c.name: c for c in [
    Corpus("tinyshakespeare",
           "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
           "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", "tinyshakespeare.txt",
           "40,000 lines of Shakespeare's plays (1.1 MB), the corpus of char-rnn and nanoGPT"),
    Corpus("sherlock",
           "https://raw.githubusercontent.com/jsvine/markovify/6f93edb986ee6ebf2f1a8d88096416d48d406e3c/test/texts/sherlock.txt",
           "242ec73a70f0a03dcbe007e32038e7deeaee004aaec9a09a07fa322743440fa8", "sherlock.txt",
           "The Adventures of Sherlock Holmes (Conan Doyle; Project Gutenberg's text, public domain, 0.6 MB): "
           "English prose the shipped models never saw, for fine-tuning"),
]}

CHUNK = 1 << 16


def get_corpus(name: str) -> Corpus:
    """The corpus called `name`, or an error listing the ones there are."""
    if name not in CORPORA:
        raise QuillError(f"no corpus named {name!r}", hint=did_you_mean(name, list(CORPORA))
                         or f"corpora: {', '.join(CORPORA)}")
    return CORPORA[name]


def fetch(name: str, out_dir: str | os.PathLike, url: str | None = None, timeout: float = 30.0,
          progress: Callable[[int, int], None] | None = None) -> tuple[Path, bool]:
    """Download corpus `name` into `out_dir` (from `url` instead of its usual source,
    e.g. a mirror) and check its SHA-256. Returns (path, whether it was downloaded):
    a file already there with the right checksum is kept."""
    corpus = get_corpus(name)
    url = url or corpus.url
    out = Path(out_dir)
    path = out / corpus.filename
    if path.is_file():
        if file_sha256(path) == corpus.sha256:
            return path, False
        raise QuillError(f"{str(path)!r} exists but is not {name} (its SHA-256 differs); it was left alone",
                         hint="move it away, or fetch into another --out directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QuillError(f"cannot create {str(out)!r}: {exc.strerror}") from None
    partial = path.with_name(path.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(CHUNK):
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total or done)
    except BaseException as exc:  # Ctrl-C included: no half-downloaded file stays behind
        partial.unlink(missing_ok=True)
        if not isinstance(exc, (urllib.error.URLError, OSError, ValueError)):
            raise
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {exc.reason}"
        else:
            reason = getattr(exc, "reason", None) or exc
        raise QuillError(f"could not download {name} from {url}: {reason}",
                         hint="offline? any UTF-8 text file works in its place: pass it to "
                              "`quill tokenizer train` and `quill prepare`") from None
    if digest.hexdigest() != corpus.sha256:
        partial.unlink(missing_ok=True)
        raise QuillError(f"the download of {name} from {url} has SHA-256 {digest.hexdigest()[:16]}..., "
                         f"not the expected {corpus.sha256[:16]}...; nothing was saved",
                         hint="try again; if it persists the source has changed: use a copy you trust")
    try:
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise QuillError(f"cannot write {str(path)!r}: {exc.strerror}") from None
    return path, True


