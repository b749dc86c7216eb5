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
        "quill prepare --chat chats.jsonl saved.json --profile shakespeare-char --out data/chat",
    ))
    p.add_argument("corpus", nargs="?", help="UTF-8 text file")
    p.add_argument("--tokenizer", help="tokenizer file (from `quill tokenizer train`); required for a corpus")
    p.add_argument("--out", required=True, help="directory to write train.bin, val.bin, meta.json, tokenizer.json")
    p.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of the corpus (with --chat: of the conversations) kept for validation (default: 0.1)")
    _add_chat_flags(p)
    p.set_defaults(run=cmd_prepare)


def _add_chat_flags(p) -> None:
    """`quill prepare --chat`: conversations for fine-tuning, laid out by a profile's template."""
    p.add_argument("--chat", nargs="+", metavar="FILE",
                   help="chat data instead of a corpus: JSON Lines ({\"messages\": [...]}) or /save transcripts (.json)")
    p.add_argument("--profile", help="with --chat: the profile whose model, tokenizer and chat template the data is for")
    p.add_argument("--skip-bad", action="store_true", help="with --chat: skip and count bad conversations instead of stopping")
    p.add_argument("--force", action="store_true", help="with --chat: replace the data in a directory that already has meta.json")


def cmd_prepare(args: argparse.Namespace) -> None:
    if args.chat:
        return cmd_prepare_chat(args)
    if not args.corpus or not args.tokenizer:
        raise UsageError("give a corpus and --tokenizer FILE, or --chat FILE... --profile NAME",
                         hint="quill prepare corpus.txt --tokenizer tokenizer.json --out DIR")
    from .data import prepare
    from .progress import progress_bar

    start = time.perf_counter()
    with progress_bar("tokenizing", unit="bytes") as progress:
        meta = prepare(args.corpus, args.tokenizer, args.out, args.val_fraction, progress)
    print(f"wrote {args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"({meta['dtype']}), tokenizer {meta['tokenizer_fingerprint']}, in {time.perf_counter() - start:.1f} s")


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
