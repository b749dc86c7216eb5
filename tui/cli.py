"""The `quill` command: the engine's CLI (`gpt_runtime.cli`) plus the chat.

The chat lives here because the engine never imports the interfaces; this
module hands `gpt_runtime.cli.main` one more subcommand. Nothing heavy is
imported until `quill chat` runs.
"""

from __future__ import annotations

import argparse
import sys

from gpt_runtime import cli
from gpt_runtime.cmdline import subcommand


def add_chat(commands) -> None:
    """Add `quill chat` to the engine's subcommands."""
    p = subcommand(commands, "chat", "chat with a model, full-screen (or --plain, line by line)", (
        "quill chat",
        "quill chat --profile shakespeare-bpe",
        "quill chat --plain",
        "quill chat --resume",
        "quill chat --resume 12 --no-save",
        "quill chat --resume 12:345   # at message 345, a hit of `quill sessions search`",
        "printf 'Good morrow\\n/set temperature 0.5\\nAnd then?\\n' | quill chat",
    ), description="Chat with a profile's model. Anything you type is sent to the model; lines starting "
                   "with / are commands (/help lists them; F1 in the full-screen chat lists the keys). "
                   "When stdin or stdout is not a terminal, stdin is read as a script of messages and "
                   "commands and the transcript is written to stdout.")
    p.add_argument("--profile", help="profile to chat with (default: one named `default`, else shakespeare-char)")
    p.add_argument("--plain", action="store_true", help="the plain line-based REPL, for dumb terminals, "
                                                        "screen readers and scripts")
    p.add_argument("--resume", nargs="?", const="last", metavar="ID|last|ID:MESSAGE",
                   help="carry on with a saved session (`quill sessions list` shows them; alone: the last one used; "
                        "ID:MESSAGE: at that message), with its profile unless --profile names another")
    p.add_argument("--no-save", dest="save", action="store_false", default=None,
                   help="do not save this chat (it is saved as it happens unless the profile says "
                        "[session] save = false)")
    p.set_defaults(run=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    # The chat's modules load when it runs: `quill --help` passes through here.
    from gpt_runtime.profiles import default_profile, history_path
    from gpt_runtime.session import ChatSession, saved_profile

    from .repl import resume, run_interactive, run_script, show_job_notices

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive and not args.plain:
        from .app import run_app

        run_app(args.profile, resume=args.resume, save=args.save)  # loads the model itself, showing the screen meanwhile
        return 0
    profile = args.profile or (saved_profile(args.resume) if args.resume else None) or default_profile()
    session = ChatSession(profile, save=args.save)
    if args.resume:
        resume(session, args.resume, sys.stdout, switch_profile=False)
    show_job_notices(session, sys.stdout)  # e.g. that the sessions database is unusable, so the chat is not saved
    if interactive:
        run_interactive(session, str(history_path()))
        return 0
    # a script goes on past a failed line, as a chat would, but its exit status tells
    return 1 if run_script(session, sys.stdin) else 0


def main(argv: list[str] | None = None) -> int:
    """The installed `quill` console script."""
    return cli.main(argv, extend=add_chat)


if __name__ == "__main__":
    sys.exit(main())
