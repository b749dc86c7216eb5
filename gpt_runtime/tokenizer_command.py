"""`quill tokenizer train|encode|decode|inspect`: each action's flags, then its handler.

Every `quill` command line imports this module, `quill --help` included, so each
handler imports the engine modules it uses when it runs (torch comes with most).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .cmdline import Parser, read_arg, subcommand
from .errors import QuillError, UsageError

TOKENIZER_HELP = ("a tokenizer file, or the tokenizer of a checkpoint, a run directory "
                  "or a profile (by name)")


def add_tokenizer_command(commands) -> None:
    """Add `tokenizer` and its actions to argparse subparsers `commands`."""
    tok = subcommand(commands, "tokenizer", "train, inspect and run tokenizers", (
        "quill tokenizer train corpus.txt --kind char --out chars.json",
        "quill tokenizer encode --tokenizer chars.json 'hello'",
    ))
    tok.set_defaults(help_parser=tok)
    tok_cmds = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=Parser)
    _add_train(tok_cmds)
    _add_encode(tok_cmds)
    _add_decode(tok_cmds)
    _add_inspect(tok_cmds)


def _add_train(actions) -> None:
    p = subcommand(actions, "train", "train a tokenizer on a UTF-8 text file", (
        "quill tokenizer train corpus.txt --kind bpe --vocab-size 4096 --out tokenizer.json",
        "quill tokenizer train corpus.txt --kind bpe --vocab-size 1024 --pattern gpt4 --out t.json",
        "quill tokenizer train corpus.txt --kind char --out chars.json",
    ))
    p.add_argument("corpus", help="UTF-8 text file to learn from")
    p.add_argument("--kind", default="bpe", help="tokenizer kind: char, bpe, or one a plugin adds (default: bpe)")
    p.add_argument("--vocab-size", type=int, help="vocabulary size, special tokens included (needed for bpe; optional for char)")
    p.add_argument("--pattern", help="bpe pre-split: gpt2 (default), gpt4, words, or a regular expression")
    p.add_argument("--out", default="tokenizer.json", help="file to write (default: tokenizer.json)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(run=cmd_tokenizer_train)


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .fileio import read_corpus
    from .progress import progress_bar
    from .tokenizer import tokenizer_class, train_tokenizer

    if os.path.exists(args.out) and not args.force:
        raise QuillError(f"{args.out!r} already exists", hint="pass --force to overwrite it, or choose another --out")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise UsageError(f"--vocab-size must be a positive number, not {args.vocab_size}")
    try:
        cls = tokenizer_class(args.kind)
    except QuillError as exc:
        raise UsageError(f"--kind: {exc.message}", hint=exc.hint) from None
    text = read_corpus(args.corpus)
    options = {"pattern": args.pattern} if args.pattern is not None else {}
    start = time.perf_counter()
    with progress_bar(f"training {args.kind} tokenizer", unit=cls.progress_unit) as progress:
        tok = train_tokenizer(args.kind, text, args.vocab_size, progress, **options)
    seconds = time.perf_counter() - start
    try:
        tok.save(args.out)
    except OSError as exc:  # e.g. --out is a directory, or not writable
        raise QuillError(f"cannot write {args.out!r}: {exc.strerror or exc}") from None
    note = ""
    if args.vocab_size and tok.vocab_size < args.vocab_size:
        note = f" (the corpus only supports {tok.vocab_size})"
    print(f"wrote {args.out}: {tok.kind} tokenizer, vocab size {tok.vocab_size}{note}, "
          f"fingerprint {tok.fingerprint}, trained in {seconds:.2f} s")


def _add_encode(actions) -> None:
    p = subcommand(actions, "encode", "text to token ids (a JSON list)", (
        "quill tokenizer encode --tokenizer tokenizer.json 'To be, or not to be'",
        "quill tokenizer encode --tokenizer shakespeare-char 'To be'   # a profile's tokenizer",
        "cat notes.txt | quill tokenizer encode --tokenizer tokenizer.json -",
    ))
    p.add_argument("--tokenizer", required=True, help=TOKENIZER_HELP)
    p.add_argument("text", help="text to encode, or - to read standard input")
    p.add_argument("--allow-special", action="store_true", help="turn special-token strings such as <eos> in the text into their ids")
    p.set_defaults(run=cmd_tokenizer_encode)


def cmd_tokenizer_encode(args: argparse.Namespace) -> None:
    from .sources import tokenizer_source

    tok = tokenizer_source(args.tokenizer)
    text = read_arg(args.text, "text")
    ids = tok.encode(text, allowed_special="all" if args.allow_special else ())
    print(json.dumps(ids))


def _add_decode(actions) -> None:
    p = subcommand(actions, "decode", "token ids (a JSON list) to text", (
        "quill tokenizer decode --tokenizer tokenizer.json '[464, 3290, 11]'",
        "quill tokenizer decode --tokenizer runs/small '[20, 43, 50]'   # a run's tokenizer",
        "quill tokenizer encode --tokenizer t.json - < a.txt | quill tokenizer decode --tokenizer t.json -",
    ))
    p.add_argument("--tokenizer", required=True, help=TOKENIZER_HELP)
    p.add_argument("ids", help="a JSON list of ids, or - to read it from standard input")
    p.set_defaults(run=cmd_tokenizer_decode)


def cmd_tokenizer_decode(args: argparse.Namespace) -> None:
    from .sources import tokenizer_source
    from .tokenizer import check_ids

    tok = tokenizer_source(args.tokenizer)
    raw = read_arg(args.ids, "ids")
    try:
        ids = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise QuillError(f"ids are not valid JSON ({exc.msg} at column {exc.colno})", hint="give a list such as [12, 7, 301]") from None
    except ValueError as exc:  # e.g. an integer too long to parse
        raise QuillError(f"ids are not valid: {exc}", hint="give a list such as [12, 7, 301]") from None
    data = tok.decode_bytes(check_ids(ids))
    out = sys.stdout.buffer
    out.write(data)
    if sys.stdout.isatty() and not data.endswith(b"\n"):
        out.write(b"\n")  # keep the prompt off the text, but only for people
    out.flush()


def _add_inspect(actions) -> None:
    p = subcommand(actions, "inspect", "show a tokenizer, and how it splits a text", (
        "quill tokenizer inspect --tokenizer tokenizer.json",
        "quill tokenizer inspect --tokenizer tokenizer.json 'Wherefore art thou?'",
        "quill tokenizer inspect --tokenizer runs/small/best.safetensors",
    ))
    p.add_argument("--tokenizer", required=True, help=TOKENIZER_HELP)
    p.add_argument("text", nargs="?", help="text to split into pieces (- reads standard input)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_tokenizer_inspect)


def _show_piece(piece: bytes) -> str:
    try:
        return json.dumps(piece.decode("utf-8"), ensure_ascii=False)
    except UnicodeDecodeError:  # part of a multi-byte character
        return 'b"' + "".join(f"\\x{b:02x}" for b in piece) + '"'


def cmd_tokenizer_inspect(args: argparse.Namespace) -> None:
    from .sources import tokenizer_source

    tok = tokenizer_source(args.tokenizer)
    info = {
        "file": args.tokenizer,
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "fingerprint": tok.fingerprint,
        "special_tokens": tok.special_tokens,
    }
    extra = tok.describe()
    info.update(extra)
    if args.text is not None:
        text = read_arg(args.text, "text")
        ids = tok.encode(text)
        n_bytes = len(text.encode("utf-8"))
        info["text_bytes"] = n_bytes
        info["tokens"] = len(ids)
        info["bytes_per_token"] = round(n_bytes / len(ids), 3) if ids else None
        info["pieces"] = [{"id": i, "text": tok.decode([i]), "bytes": tok.pieces[i].hex()} for i in ids]
        info_pieces = [(i, tok.pieces[i]) for i in ids]
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=1))
        return
    specials = " ".join(f"{name}={i}" for name, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]))
    rows = [("file", args.tokenizer), ("kind", tok.kind), ("vocab size", str(tok.vocab_size)),
            ("fingerprint", tok.fingerprint), ("special tokens", specials)]
    rows.extend((key.replace("_", " "), value) for key, value in extra.items())
    if args.text is not None:
        bpt = f"{info['bytes_per_token']:.2f} bytes/token" if ids else "no tokens"
        rows.append(("text", f"{info['text_bytes']} bytes -> {len(ids)} tokens, {bpt}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.text is not None and ids:
        print("pieces:")
        id_width = len(str(max(ids)))
        for i, piece in info_pieces:
            print(f"  {i:>{id_width}}  {_show_piece(piece)}")
