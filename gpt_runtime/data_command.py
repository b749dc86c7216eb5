"""`quill data list|fetch` (public corpora) and `quill prepare` (a corpus into a
data directory): each command's flags, then its handler.

Every `quill` command line imports this module, `quill --help` included, so each
handler imports the engine modules it uses when it runs (torch comes with most).
"""

from __future__ import annotations

import argparse
import time

from .cmdline import Parser, subcommand
from .errors import QuillError, UsageError
from .tokenizer_command import TOKENIZER_HELP


def add_data_command(commands) -> None:
    """Add `data` and its actions to argparse subparsers `commands`."""
    data = subcommand(commands, "data", "download public corpora (any local UTF-8 text file works as well)", (
        "quill data list",
        "quill data fetch tinyshakespeare --out data",
    ))
    data.set_defaults(help_parser=data)
    data_cmds = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=Parser)
    _add_list(data_cmds)
    _add_fetch(data_cmds)


def _add_list(actions) -> None:
    p = subcommand(actions, "list", "the corpora `quill data fetch` knows", ("quill data list",))
    p.set_defaults(run=cmd_data_list)


def cmd_data_list(args: argparse.Namespace) -> None:
    from .corpora import CORPORA

    for corpus in CORPORA.values():
        print(f"{corpus.name}  {corpus.about}\n  {corpus.url}\n  sha256 {corpus.sha256}")


def _add_fetch(actions) -> None:
    p = subcommand(actions, "fetch", "download a corpus and check its SHA-256", (
        "quill data fetch tinyshakespeare --out data",
        "quill data fetch tinyshakespeare --out data --url https://mirror.example/input.txt",
    ))
    p.add_argument("name", help="corpus name (see `quill data list`)")
    p.add_argument("--out", default="data", help="directory to write it to (default: data)")
    p.add_argument("--url", help="download from here instead (a mirror); the checksum must still match")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default: 30)")
    p.set_defaults(run=cmd_data_fetch)


def cmd_data_fetch(args: argparse.Namespace) -> None:
    from .corpora import fetch
    from .progress import progress_bar

    with progress_bar(f"downloading {args.name}", unit="bytes") as progress:
        path, downloaded = fetch(args.name, args.out, url=args.url, timeout=args.timeout, progress=progress)
    size = path.stat().st_size
    print(f"{'downloaded' if downloaded else 'already there:'} {path} ({size:,} bytes, checksum ok)")


def add_prepare_command(commands) -> None:
    """Add `prepare` to argparse subparsers `commands`."""
    p = subcommand(commands, "prepare", "tokenize a corpus into a data directory for training", (
        "quill prepare corpus.txt --tokenizer tokenizer.json --out data/shakespeare",
        "quill prepare corpus.txt --tokenizer chars.json --out data/chars --val-fraction 0.05",
        "quill prepare notes/ more.txt --glob '*.md' --tokenizer shakespeare-char --out data/notes",
        "quill prepare chats.jsonl --field content --skip-bad --tokenizer runs/small --out data/chats",
        "quill prepare letters/ --tokenizer shakespeare-char --extend --out data/letters --force",
        "quill prepare --chat chats.jsonl saved.json --profile shakespeare-char --out data/chat",
    ), description="Tokenize a corpus into a data directory for training. The corpus is any number of UTF-8 "
                   "text files, JSON Lines files (.jsonl: one JSON object per line, its text in --field) and "
                   "directories (read recursively; hidden files are left out, and files that are empty, binary "
                   "or not UTF-8 are skipped and counted). Each plain file is one document, each JSON Lines "
                   "record one; documents are separated by the tokenizer's end-of-text token (<eos> or "
                   "<|endoftext|>) or --separator. The last --val-fraction of the bytes is kept for validation. "
                   "With --chat, conversations instead, laid out by a profile's chat template, with a loss mask "
                   "that trains only on the model's turns.")
    p.add_argument("corpus", nargs="*", help="UTF-8 text files, .jsonl files and directories")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP + " (required for a corpus)")
    p.add_argument("--out", required=True, help="directory to write train.bin, val.bin, meta.json, tokenizer.json")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="last fraction of the corpus (with --chat: of the conversations) kept for validation (default: 0.1)")
    p.add_argument("--glob", metavar="PATTERN", help="in directories, read only the files whose path matches, e.g. '*.txt' (default: all)")
    p.add_argument("--field", default="text", help="the field of a JSON Lines record that holds its text (default: text)")
    p.add_argument("--separator", metavar="TEXT",
                   help="put this between documents instead of the end-of-text token: a special token's name, or text")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip JSON Lines lines that are not records with the field (with --chat: bad conversations), and count them")
    p.add_argument("--extend", action="store_true",
                   help="add the characters the (char) tokenizer lacks as new ids after its own, instead of <unk>")
    p.add_argument("--force", action="store_true", help="overwrite a data directory --out already holds")
    _add_chat_flags(p)
    p.set_defaults(run=cmd_prepare)


def _add_chat_flags(p) -> None:
    """`quill prepare --chat`: conversations for fine-tuning, laid out by a profile's template."""
    p.add_argument("--chat", nargs="+", metavar="FILE",
                   help="chat data instead of a corpus: JSON Lines ({\"messages\": [...]}) or /save transcripts (.json)")
    p.add_argument("--profile", help="with --chat: the profile whose model, tokenizer and chat template the data is for")


def cmd_prepare(args: argparse.Namespace) -> None:
    if args.chat:
        return cmd_prepare_chat(args)
    if args.profile:
        raise UsageError("--profile is for --chat: a corpus takes the model's tokenizer as --tokenizer PROFILE")
    if not args.corpus or not args.tokenizer:
        raise UsageError("give a corpus and --tokenizer, or --chat FILE... --profile NAME",
                         hint="quill prepare corpus.txt --tokenizer tokenizer.json --out DIR")
    from pathlib import Path

    from .corpus_prepare import Options, prepare_corpus
    from .progress import progress_bar
    from .sources import tokenizer_source

    if (Path(args.out) / "meta.json").exists() and not args.force:
        raise QuillError(f"{args.out!r} already holds a prepared data directory", hint="pass --force to overwrite it, or choose another --out")
    tok = tokenizer_source(args.tokenizer)
    options = Options(glob=args.glob, field=args.field, separator=args.separator, skip_bad=args.skip_bad)
    start = time.perf_counter()
    with progress_bar("tokenizing", unit="bytes") as progress:
        meta = prepare_corpus(args.corpus, tok, args.out, args.val_fraction, progress, options, extend=args.extend)
    print(f"wrote {args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"({meta['dtype']}), tokenizer {meta['tokenizer_fingerprint']}, in {time.perf_counter() - start:.1f} s")
    for line in summary_lines(meta):
        print(line)


def summary_lines(meta: dict) -> list[str]:
    """What `quill prepare` read, skipped and could not encode, from its meta.json."""
    separator = f", separated by {meta['separator']!r}" if meta["separator"] else ""
    lines = [f"read {_count(meta['files'], 'file')}, {_count(meta['documents'], 'document')}{separator}: "
             f"{meta['train_bytes']:,} train and {meta['val_bytes']:,} val bytes"]
    if meta["skipped"]:
        lines.append("skipped " + ", ".join(_count(n, "bad line") if reason == "bad lines" else _count(n, f"{reason} file")
                                            for reason, n in meta["skipped"].items()))
    if "extends" in meta:
        lines.append(f"extended tokenizer {meta['extends']} by {_count(meta['added_tokens'], 'character')} "
                     f"(new ids from {meta['vocab_size'] - meta['added_tokens']}): tokenizer.json is the extended one")
    return lines + unknown_lines(meta, "--extend adds them to the tokenizer")


def unknown_lines(meta: dict, remedy: str) -> list[str]:
    """A line on the characters that became <unk>, if any did."""
    unknown = meta.get("unknown_chars") or {"occurrences": 0}
    if not unknown["occurrences"]:
        return []
    shown = " ".join(repr(c) for c in unknown["first"]) + (" ..." if unknown["distinct"] > len(unknown["first"]) else "")
    return [f"{_count(unknown['occurrences'], 'unknown character')} ({unknown['distinct']:,} distinct) became <unk>: {shown}; {remedy}"]


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def cmd_prepare_chat(args: argparse.Namespace) -> None:
    """Conversations into masked chat data for `args.profile`'s model."""
    from pathlib import Path

    from .chat_data import prepare_chat
    from .progress import progress_bar

    if not args.profile:
        raise UsageError("--chat needs --profile NAME: the model the conversations are laid out and tokenized for",
                         hint="see `quill profiles`")
    if args.corpus or args.tokenizer:
        raise UsageError("--chat takes no corpus or --tokenizer: the profile's model gives the tokenizer")
    text_only = [flag for flag, given in (("--extend", args.extend), ("--glob", args.glob), ("--separator", args.separator),
                                          ("--field", args.field != "text")) if given]
    if text_only:
        raise UsageError(f"{', '.join(text_only)} {'is' if len(text_only) == 1 else 'are'} for a corpus, not --chat")
    if (Path(args.out) / "meta.json").exists() and not args.force:
        raise QuillError(f"{args.out!r} already holds prepared data (meta.json)", hint="add --force to replace it")
    start = time.perf_counter()
    with progress_bar("encoding conversations", unit="conversations") as progress:
        meta = prepare_chat(args.chat, args.profile, args.out, args.val_fraction, args.skip_bad, progress)
    tokens = meta["train_tokens"] + meta["val_tokens"]
    skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(meta["skipped"].items()))
    print(f"wrote {args.out}: {meta['conversations']:,} conversations ({meta['val_conversations']:,} for validation), "
          f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
          f"{meta['loss_tokens'] / tokens:.0%} of them the model's (where the loss counts), "
          f"in {time.perf_counter() - start:.1f} s")
    print(f"truncated: {meta['truncated']:,} (oldest turns dropped to fit {meta['block_size']} tokens); "
          f"skipped: {sum(meta['skipped'].values()):,}" + (f" ({skipped})" if skipped else ""))
    for line in unknown_lines(meta, "the profile's tokenizer does not have them"):
        print(line)
