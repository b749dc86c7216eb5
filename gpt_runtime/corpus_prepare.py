"""Many inputs -> one data directory: `quill prepare` for corpora as people have them.

The inputs (files, directories, JSON Lines files; see `corpus_files`) are read in
order as one stream of documents: each plain file is one, each JSON Lines record
one. Documents are separated by the tokenizer's end-of-text token or a chosen
separator, so the model learns where one text stops and the next begins.

The validation split is the last `val_fraction` of all input bytes. Documents that
end before that point are training text and those after it validation text; the
one that holds it is cut at a line start (a plain file, exactly as `data.prepare`
cuts a single corpus) or goes to validation whole (a JSON Lines record). Files are
encoded a block at a time and JSON Lines a line at a time, so memory stays bounded.

Characters the tokenizer cannot encode are counted and reported, not warned about
one by one; with `extend`, the corpus is scanned first and the tokenizer extended
so that it has them all (`Tokenizer.extend`).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .corpus_files import CorpusFile, find_corpus_files
from .data_writer import SplitWriter, line_start_after, text_blocks, write_data_dir
from .errors import QuillError, QuillWarning
from .jsonl import read_records
from .tokenizer import END_OF_TEXT, Tokenizer, eos_id, load_tokenizer

BOM = b"\xef\xbb\xbf"
SHOWN_UNKNOWN = 10  # unknown characters listed in meta.json and the summary


@dataclass
class Options:
    """How to read the inputs (the `quill prepare` flags of the same names)."""

    glob: str | None = None
    field: str = "text"
    separator: str | None = None
    skip_bad: bool = False


@dataclass
class _Tally:
    """What one preparation read, for meta.json and the summary."""

    documents: int = 0
    bad_lines: int = 0
    unknown: Counter = field(default_factory=Counter)
    bytes: dict = field(default_factory=lambda: {"train": 0, "val": 0})


def prepare_corpus(
    inputs: Iterable[str | os.PathLike],
    tokenizer: str | os.PathLike | Tokenizer,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    progress: Callable[[int, int], None] | None = None,
    options: Options | None = None,
    extend: bool = False,
) -> dict:
    """Tokenize the documents of `inputs` into `out_dir` (train.bin, val.bin, meta.json,
    tokenizer.json); with `extend`, with the tokenizer extended to every character of
    the corpus. Returns the metadata written to meta.json."""
    if not 0.0 <= val_fraction < 1.0:
        raise QuillError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    options = options or Options()
    inputs = [os.fspath(spec) for spec in inputs]
    if not inputs:
        raise QuillError("no corpus given", hint="name text files, JSON Lines files or directories")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    out = Path(out_dir)
    files, skipped = find_corpus_files(inputs, options.glob, exclude=out)  # never the output of an earlier run
    if not files:
        raise QuillError(f"no text to prepare in {', '.join(map(repr, inputs))}" + _skipped_note(skipped),
                         hint="check the paths and --glob")
    original = tok
    if extend:
        tok = _extended(tok, files, options)
    separator, label = _separator(tok, options.separator, needed=len(files) > 1 or files[0].jsonl)
    out.mkdir(parents=True, exist_ok=True)
    splits = [SplitWriter(out, "train", tok.vocab_size), SplitWriter(out, "val", tok.vocab_size)]
    tally = _Tally()
    try:
        _Pass(tok, splits, separator, options, tally, progress, val_fraction).run(files)
        _check_splits(splits, val_fraction, tally, inputs)
    except BaseException:
        for writer in splits:
            writer.discard()
        raise
    meta = {"corpus": inputs[0] if len(inputs) == 1 else inputs, "val_fraction": val_fraction,
            "train_bytes": tally.bytes["train"], "val_bytes": tally.bytes["val"],
            "inputs": inputs, "files": len(files), "documents": tally.documents,
            "skipped": {**skipped, **({"bad lines": tally.bad_lines} if tally.bad_lines else {})},
            "separator": label, "unknown_chars": unknown_summary(tally.unknown)}
    if tok is not original:
        meta.update(extends=original.fingerprint, added_tokens=tok.vocab_size - original.vocab_size)
    return write_data_dir(out, splits, tok, meta)


def _skipped_note(skipped: Counter) -> str:
    return f" ({', '.join(f'{n} {reason}' for reason, n in skipped.items())} skipped)" if skipped else ""


def _separator(tok: Tokenizer, text: str | None, needed: bool) -> tuple[list[int], str | None]:
    """The ids put between documents and how meta.json names them (None: no separator)."""
    if text is None:
        if not needed:
            return [], None  # one plain file is one document, prepared as it always was
        eos = eos_id(tok)
        if eos is None:
            raise QuillError(f"the {tok.kind!r} tokenizer has no end-of-text token ({' or '.join(END_OF_TEXT)}) to separate documents",
                             hint="pass --separator TEXT, e.g. --separator $'\\n\\n'")
        return [eos], next(name for name, i in tok.special_tokens.items() if i == eos)
    if text in tok.special_tokens:
        return [tok.special_tokens[text]], text
    if not text:
        raise QuillError("--separator is empty", hint="give a special token such as <eos>, or some text")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuillWarning)
        return tok.encode(text), text


def _extended(tok: Tokenizer, files: list[CorpusFile], options: Options) -> Tokenizer:
    """`tok` extended by every character of the corpus it lacks (in code-point order);
    `tok` itself when it lacks none."""
    tok.extend([])  # a tokenizer that cannot be extended says so before the corpus is read
    missing: Counter = Counter()
    for text in _corpus_texts(files, options):
        missing.update(tok.missing(text))
    if options.separator and options.separator not in tok.special_tokens:
        missing.update(tok.missing(options.separator))
    return tok.extend(sorted(missing)) if missing else tok


def _corpus_texts(files: list[CorpusFile], options: Options) -> Iterator[str]:
    """All the text of the corpus, a block or a record at a time (for the scan before
    extending a tokenizer)."""
    for file in files:
        if file.jsonl:
            yield from (r.text for r in read_records(file.path, options.field, options.skip_bad))
            continue
        with open(file.path, "rb") as f:
            bom = len(BOM) if f.read(len(BOM)) == BOM else 0
            yield from text_blocks(f, bom, file.size, str(file.path))


def _check_splits(splits: list[SplitWriter], val_fraction: float, tally: _Tally, inputs: list[str]) -> None:
    """The errors for a corpus that leaves a split empty (as `data.prepare` gives them)."""
    name = f"corpus {inputs[0]!r}" if len(inputs) == 1 else "the corpus"
    if tally.documents == 0:
        raise QuillError(f"{name} holds no text", hint="every document in it is empty")
    if splits[0].tokens == 0:
        raise QuillError(f"{name} leaves no training text after the validation split")
    if val_fraction and splits[1].tokens == 0:
        raise QuillError(f"{name} is too short for a validation split", hint="use a longer corpus or --val-fraction 0")


def unknown_summary(unknown: Counter) -> dict:
    """Characters encoded as <unk>: how often, how many different, the first few seen."""
    return {"occurrences": sum(unknown.values()), "distinct": len(unknown), "first": list(unknown)[:SHOWN_UNKNOWN]}


class _Pass:
    """One pass over the corpus: each document's tokens into the split it falls in,
    a separator before each document but a split's first."""

    def __init__(self, tok: Tokenizer, splits: list[SplitWriter], separator: list[int], options: Options,
                 tally: _Tally, progress: Callable[[int, int], None] | None, val_fraction: float) -> None:
        self.tok, self.splits, self.separator = tok, splits, separator
        self.options, self.tally, self.progress = options, tally, progress
        self.val_fraction = val_fraction
        self.started = [False, False]  # whether a split has a document yet
        self.total = self.split_at = 0

    def run(self, files: list[CorpusFile]) -> None:
        self.total = sum(file.size for file in files)
        self.split_at = int(self.total * (1 - self.val_fraction)) if self.val_fraction else self.total
        base = 0
        # Warnings are the tokenizer's way to tell one caller about <unk>; here they are counted instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", QuillWarning)
            for file in files:
                if file.jsonl:
                    self._jsonl(file, base)
                else:
                    self._plain(file, base)
                base += file.size
                self._report(base)

    def encode(self, text: str) -> list[int]:
        """Text to ids, counting the characters the tokenizer lacks."""
        missing = self.tok.missing(text)
        if missing:
            self.tally.unknown.update(missing)
        return self.tok.encode(text)

    def _bad_line(self, number: int) -> None:
        self.tally.bad_lines += 1

    def _report(self, done: int) -> None:
        if self.progress:
            self.progress(done, self.total)

    def _begin(self, split: int, nbytes: int) -> SplitWriter:
        """The writer of a split, a separator written if a document came before."""
        writer = self.splits[split]
        if self.started[split] and self.separator:
            writer.write(self.separator)
        self.started[split] = True
        self.tally.bytes[writer.name] += nbytes
        return writer

    def _plain(self, file: CorpusFile, base: int) -> None:
        """A plain file: one document, cut at a line start if it holds the split point."""
        path = str(file.path)
        with open(file.path, "rb") as f:
            bom = len(BOM) if f.read(len(BOM)) == BOM else 0
            local = self.split_at - base
            cut = file.size if local >= file.size else bom if local <= 0 else max(line_start_after(f, local, file.size), bom)
            if file.size > bom:
                self.tally.documents += 1
            report = (lambda done, _: self._report(base + done)) if self.progress else None
            for split, (start, end) in enumerate([(bom, cut), (cut, file.size)]):
                if end > start:
                    writer = self._begin(split, end - start)
                    for text in text_blocks(f, start, end, path, report):
                        writer.write(self.encode(text))

    def _jsonl(self, file: CorpusFile, base: int) -> None:
        """A JSON Lines file: each record a document, in validation from the one that holds the split point on."""
        for record in read_records(file.path, self.options.field, self.options.skip_bad, self._bad_line):
            if not record.text:
                continue
            self.tally.documents += 1
            split = 0 if base + record.end <= self.split_at else 1
            self._begin(split, record.end - record.start).write(self.encode(record.text))
            self._report(base + record.end)
