"""`quill ...`: the command line, put together.

Each command's flags sit next to its handler in a `*_command.py` module; this
one lists the commands in the order `quill --help` shows them, and runs one
(`cmdline.run` reports its errors). Only argparse and the standard library load
on this path, so `quill --help` answers instantly; each command imports what it
needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from . import __version__
from .checkpoint_command import add_check_command, add_export_command, add_import_command
from .cmdline import PROG, Parser, examples_epilog, run
from .data_command import add_data_command, add_prepare_command
from .finetune_command import add_finetune_command
from .generate_command import add_generate_command
from .info_command import add_doctor_command, add_plugins_command, add_samplers_command
from .profiles_command import add_profiles_command
from .sessions_command import add_sessions_command
from .tokenizer_command import add_tokenizer_command
from .train_command import add_eval_command, add_train_command


def build_parser(extend: Callable[[Any], None] | None = None) -> Parser:
    """The `quill` parser; `extend(subparsers)` adds commands from outside the engine
    (the chat, from `tui.cli`, which the engine never imports)."""
    parser = Parser(
        prog=PROG,
        description="Quill: train, evaluate and chat with small GPT models in the terminal.",
        epilog=examples_epilog(
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
    add_tokenizer_command(commands)
    add_data_command(commands)
    add_prepare_command(commands)
    add_train_command(commands)
    add_finetune_command(commands)
    add_eval_command(commands)
    add_export_command(commands)
    add_import_command(commands)
    add_check_command(commands)
    add_generate_command(commands)
    if extend is not None:
        extend(commands)
    add_profiles_command(commands)
    add_sessions_command(commands)
    add_samplers_command(commands)
    add_plugins_command(commands)
    add_doctor_command(commands)
    return parser


def main(argv: list[str] | None = None, extend: Callable[[Any], None] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 usage error).

    `extend` adds subcommands (see `build_parser`); the installed `quill` is `tui.cli:main`.
    """
    return run(build_parser(extend), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
