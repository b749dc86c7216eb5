"""`quill ...`: the command line.

Only argparse and the standard library load on this path, so `quill --help`
answers instantly; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import NoReturn

from . import __version__
from .errors import QuillError, QuillWarning, UsageError

PROG = "quill"


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line plus a hint, exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", hint=f"see `{self.prog} --help`")


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _sub(subparsers, name: str, help: str, examples: tuple[str, ...], description: str | None = None) -> Parser:
    return subparsers.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=_examples(*examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Quill: train, evaluate and chat with small GPT models in the terminal.",
        epilog=_examples(
            "quill tokenizer train corpus.txt --kind bpe --vocab-size 4096 --out tokenizer.json",
            "quill tokenizer inspect --tokenizer tokenizer.json 'To be, or not to be'",
            "quill plugins",
        )
        + "\n\nSet QUILL_DEBUG=1 to see tracebacks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.set_defaults(run=None, help_parser=parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    # quill tokenizer ...
    tok = _sub(commands, "tokenizer", "train, inspect and run tokenizers", (
        "quill tokenizer train corpus.txt --kind char --out chars.json",
        "quill tokenizer encode --tokenizer chars.json 'hello'",
    ))
    tok.set_defaults(help_parser=tok)
    tok_cmds = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=Parser)

    p = _sub(tok_cmds, "train", "train a tokenizer on a UTF-8 text file", (
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

    p = _sub(tok_cmds, "encode", "text to token ids (a JSON list)", (
        "quill tokenizer encode --tokenizer tokenizer.json 'To be, or not to be'",
        "cat notes.txt | quill tokenizer encode --tokenizer tokenizer.json -",
    ))
    p.add_argument("--tokenizer", required=True, help="tokenizer file")
    p.add_argument("text", help="text to encode, or - to read standard input")
    p.add_argument("--allow-special", action="store_true", help="turn special-token strings such as <eos> in the text into their ids")
    p.set_defaults(run=cmd_tokenizer_encode)

    p = _sub(tok_cmds, "decode", "token ids (a JSON list) to text", (
        "quill tokenizer decode --tokenizer tokenizer.json '[464, 3290, 11]'",
        "quill tokenizer encode --tokenizer t.json - < a.txt | quill tokenizer decode --tokenizer t.json -",
    ))
    p.add_argument("--tokenizer", required=True, help="tokenizer file")
    p.add_argument("ids", help="a JSON list of ids, or - to read it from standard input")
    p.set_defaults(run=cmd_tokenizer_decode)

    p = _sub(tok_cmds, "inspect", "show a tokenizer, and how it splits a text", (
        "quill tokenizer inspect --tokenizer tokenizer.json",
        "quill tokenizer inspect --tokenizer tokenizer.json 'Wherefore art thou?'",
    ))
    p.add_argument("--tokenizer", required=True, help="tokenizer file")
    p.add_argument("text", nargs="?", help="text to split into pieces (- reads standard input)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_tokenizer_inspect)

    # quill plugins
    p = _sub(commands, "plugins", "list plugins: what each registered, and any error", (
        "quill plugins",
        "quill plugins --json",
        "QUILL_DISABLE_PLUGINS=my_plugin quill plugins",
    ))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_plugins)
    return parser


# --- commands ---------------------------------------------------------------

def _read_arg(value: str, what: str) -> str:
    """The argument itself, or standard input when it is '-'."""
    if value != "-":
        return value
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QuillError(f"{what} on standard input is not UTF-8 (invalid byte at offset {exc.start})") from None


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .fileio import read_corpus
    from .progress import progress_bar
    from .tokenizer import tokenizer_class

    if os.path.exists(args.out) and not args.force:
        raise QuillError(f"{args.out!r} already exists", hint="pass --force to overwrite it, or choose another --out")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise UsageError(f"--vocab-size must be a positive number, not {args.vocab_size}")
    cls = tokenizer_class(args.kind)
    text = read_corpus(args.corpus)
    options = {"pattern": args.pattern} if args.pattern else {}
    start = time.perf_counter()
    with progress_bar(f"training {args.kind} tokenizer", unit="merges" if args.kind == "bpe" else "") as progress:
        tok = cls.train(text, vocab_size=args.vocab_size, progress=progress, **options)
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


def cmd_tokenizer_encode(args: argparse.Namespace) -> None:
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = _read_arg(args.text, "text")
    ids = tok.encode(text, allowed_special="all" if args.allow_special else ())
    print(json.dumps(ids))


def cmd_tokenizer_decode(args: argparse.Namespace) -> None:
    from .tokenizer import check_ids, load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    raw = _read_arg(args.ids, "ids")
    try:
        ids = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise QuillError(f"ids are not valid JSON ({exc.msg} at column {exc.colno})", hint="give a list such as [12, 7, 301]") from None
    data = tok.decode_bytes(check_ids(ids))
    out = sys.stdout.buffer
    out.write(data)
    if sys.stdout.isatty() and not data.endswith(b"\n"):
        out.write(b"\n")  # keep the prompt off the text, but only for people
    out.flush()


def _show_piece(piece: bytes) -> str:
    try:
        return json.dumps(piece.decode("utf-8"), ensure_ascii=False)
    except UnicodeDecodeError:  # part of a multi-byte character
        return 'b"' + "".join(f"\\x{b:02x}" for b in piece) + '"'


def cmd_tokenizer_inspect(args: argparse.Namespace) -> None:
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    info = {
        "file": args.tokenizer,
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "fingerprint": tok.fingerprint,
        "special_tokens": tok.special_tokens,
    }
    pattern = getattr(tok, "pattern", None)
    if pattern is not None:
        from plugins.bpe_tokenizer import PATTERNS  # names for the known patterns

        info["pattern"] = next((name for name, p in PATTERNS.items() if p == pattern), pattern)
    if args.text is not None:
        text = _read_arg(args.text, "text")
        ids = tok.encode(text)
        n_bytes = len(text.encode("utf-8"))
        info["text_bytes"] = n_bytes
        info["tokens"] = len(ids)
        info["bytes_per_token"] = round(n_bytes / len(ids), 3) if ids else None
        info["pieces"] = [[i, tok.pieces[i].decode("utf-8", "replace")] for i in ids]
        info_pieces = [(i, tok.pieces[i]) for i in ids]
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=1))
        return
    specials = " ".join(f"{name}={i}" for name, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]))
    rows = [("file", args.tokenizer), ("kind", tok.kind), ("vocab size", str(tok.vocab_size)),
            ("fingerprint", tok.fingerprint), ("special tokens", specials)]
    if "pattern" in info:
        rows.append(("pre-split", info["pattern"]))
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


def cmd_plugins(args: argparse.Namespace) -> None:
    from .plugins import get_plugin_host

    host = get_plugin_host()
    if args.json:
        print(json.dumps([p.to_json() for p in host.plugins], indent=1))
        return
    for p in host.plugins:
        status = "disabled" if p.disabled else ("ERROR" if p.error else "ok")
        print(f"{p.name} {p.version}  [{p.origin}]  {status}")
        for kind, names in p.registered.items():
            print(f"    {kind}: {', '.join(names)}")
        if p.error:
            print(f"    error: {p.error}")


# --- entry point ----------------------------------------------------------------

def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, QuillWarning):
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    else:
        print(f"{PROG}: warning: {category.__name__}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 usage error)."""
    debug = os.environ.get("QUILL_DEBUG", "") not in ("", "0")
    if not debug:
        warnings.showwarning = _show_warning
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.run is None:
            # `quill` or `quill tokenizer` alone: show what there is to run.
            args.help_parser.print_help(sys.stderr)
            return 2
        args.run(args)
        return 0
    except QuillError as exc:
        if debug:
            raise
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`); nothing left to say to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:
        if debug:
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("  hint: run again with QUILL_DEBUG=1 for the traceback, and please report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
