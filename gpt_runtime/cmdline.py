"""What every `quill` command line shares: its parser, subcommands, reading an
argument or `-` (standard input), and the runner.

Each `*_command.py` module adds its commands with these, and the CLI
(`gpt_runtime.cli`) puts them together into `quill`; the chat's background
jobs and each torchrun rank parse `quill train` / `quill eval` with them too,
without importing the CLI, so all of them parse and report alike. Only argparse
and the standard library load here: `quill --help` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import NoReturn

from .errors import QuillError, QuillWarning, UsageError, debug_enabled, explain

PROG = "quill"


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line plus a hint, exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", hint=f"see `{self.prog} --help`")


def examples_epilog(*lines: str) -> str:
    """An epilog listing example command lines."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def subcommand(subparsers, name: str, help: str, examples: tuple[str, ...], description: str | None = None) -> Parser:
    """Add a subcommand whose --help ends with `examples` (also used by `tui.cli`)."""
    return subparsers.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=examples_epilog(*examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def read_arg(value: str, what: str) -> str:
    """The argument itself, or standard input when it is '-'; UTF-8 either way."""
    # Python turns undecodable argument bytes into lone surrogates; undo that to
    # report them as what they are.
    data = sys.stdin.buffer.read() if value == "-" else os.fsencode(value)
    where = "on standard input" if value == "-" else "given as an argument"
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QuillError(f"{what} {where} is not UTF-8 (invalid byte at offset {exc.start})") from None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, QuillWarning):
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    else:
        print(f"{PROG}: warning: {category.__name__}: {message}", file=sys.stderr)


def run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Parse `argv` and run the command it names (its `run` default); returns the exit
    code: 0 ok, 1 failure, 2 usage error. Failures are one line plus a hint on stderr,
    unless QUILL_DEBUG asks for the traceback."""
    debug = debug_enabled()
    if not debug:
        warnings.showwarning = _show_warning
    try:
        args = parser.parse_args(argv)
        args.argv = argv
        if args.run is None:
            # `quill` or `quill tokenizer` alone: show what there is to run.
            args.help_parser.print_help(sys.stderr)
            return 2
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`); nothing left to say to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:  # a QuillError, or a bug: one line and a hint, unless QUILL_DEBUG
        if debug:
            raise
        kind, message, hint = explain(exc)
        print(f"{PROG}: {kind}: {message}", file=sys.stderr)
        if hint:
            print(f"  hint: {hint}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, QuillError) else 1
