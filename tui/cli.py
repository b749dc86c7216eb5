"""The `quill` command: the engine's CLI (`gpt_runtime.cli`) plus the chat.

The chat lives here because the engine never imports the interfaces; this
module hands `gpt_runtime.cli.main` one more subcommand. Nothing heavy is
imported until `quill chat` runs.
"""

from __future__ import annotations

import argparse
import sys

from gpt_runtime import cli


def add_chat(commands) -> None:
    """Add `quill chat` to the engine's subcommands."""
    p = cli.subcommand(commands, "chat", "chat with a model: the plain REPL (the full-screen chat is coming)", (
        "quill chat --profile shakespeare",
        "printf 'Good morrow\\n/set temperature 0.5\\nAnd then?\\n' | quill chat --profile shakespeare",
    ), description="Chat with a profile's model. Anything you type is sent to the model; lines starting "
                   "with / are commands (/help lists them). When stdin or stdout is not a terminal, stdin is "
                   "read as a script of messages and commands and the transcript is written to stdout.")
    p.add_argument("--profile", help="profile to chat with (default: the one named `default`, or the only one)")
    p.add_argument("--plain", action="store_true", help="the plain line-based REPL (the only one so far)")
    p.set_defaults(run=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from gpt_runtime.profiles import default_profile, history_path
    from gpt_runtime.session import ChatSession

    from .repl import run_interactive, run_script

    session = ChatSession(args.profile or default_profile())
    if sys.stdin.isatty() and sys.stdout.isatty():
        run_interactive(session, str(history_path()))
        return 0
    # a script goes on past a failed line, as a chat would, but its exit status tells
    return 1 if run_script(session, sys.stdin) else 0


def main(argv: list[str] | None = None) -> int:
    """The installed `quill` console script."""
    return cli.main(argv, extend=add_chat)


if __name__ == "__main__":
    sys.exit(main())
