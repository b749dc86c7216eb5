"""`quill sessions list|show|rm|export|search`: the saved chat sessions (`store.py`).

Every `quill` command line imports this module, `quill --help` included, so the
handlers import the store (and sqlite3 with it) when they run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from .cmdline import Parser, subcommand


def add_sessions_command(commands) -> None:
    """Add `sessions` and its actions to argparse subparsers `commands`."""
    sess = subcommand(commands, "sessions", "list, show, export, search and delete saved chat sessions", (
        "quill sessions list",
        "quill sessions show 12",
        "quill sessions export 12 --format md > chat.md",
        "quill sessions search 'to be or not'",
        "quill sessions rm 12",
    ), description="Saved chat sessions live in one SQLite file, sessions.db in the user's data directory "
                   "($XDG_DATA_HOME/quill on Linux). Each session is a tree of messages: an edited message "
                   "or a regenerated reply is a branch, and the conversation is the current branch.")
    sess.set_defaults(help_parser=sess)
    actions = sess.add_subparsers(dest="sessions_command", metavar="ACTION", parser_class=Parser)

    p = subcommand(actions, "list", "the sessions used last: id, title, profile, messages, last used", (
        "quill sessions list", "quill sessions list --limit 100 --json"))
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most N sessions (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_sessions_list)

    p = subcommand(actions, "show", "a session's current branch, message by message", (
        "quill sessions show 12", "quill sessions show 12 --json"))
    p.add_argument("id", type=int, help="the session's id (see `quill sessions list`)")
    p.add_argument("--json", action="store_true", help="print JSON: the session and its current branch")
    p.set_defaults(run=cmd_sessions_show)

    p = subcommand(actions, "rm", "delete a session and all its messages", ("quill sessions rm 12",))
    p.add_argument("id", type=int, help="the session's id")
    p.set_defaults(run=cmd_sessions_rm)

    p = subcommand(actions, "export", "print a session: Markdown (its current branch) or JSON (every branch)", (
        "quill sessions export 12 > chat.md", "quill sessions export 12 --format json > chat.json"))
    p.add_argument("id", type=int, help="the session's id")
    p.add_argument("--format", choices=("md", "json"), default="md", help="md (default) or json")
    p.set_defaults(run=cmd_sessions_export)

    p = subcommand(actions, "search", "find messages holding every word given (words match as prefixes too); "
                   "each is shown as SESSION:MESSAGE, which `quill chat --resume` opens there", (
        "quill sessions search romeo", "quill sessions search 'wherefore art' --json",
        "quill chat --resume 12:345"))
    p.add_argument("text", help="the words to look for")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most N messages (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_sessions_search)


def _open():
    from .store import Store, default_path

    return Store(default_path())


def cmd_sessions_list(args: argparse.Namespace) -> None:
    from .store import when

    with _open() as store:
        sessions = store.list_sessions(args.limit)
        if args.json:
            print(json.dumps([asdict(s) for s in sessions], indent=1, ensure_ascii=False))
            return
        if not sessions:
            print(f"no saved sessions yet (they are kept in {store.file})")
            return
    rows = [("ID", "TITLE", "PROFILE", "MESSAGES", "LAST USED")]
    rows += [(str(s.id), s.title or "(untitled)", s.profile, str(s.messages), when(s.updated)) for s in sessions]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(f"{row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]:>{widths[3]}}  {row[4]}")


def cmd_sessions_show(args: argparse.Namespace) -> None:
    from .store import when

    with _open() as store:
        info = store.get(args.id)
        path = store.path(args.id)
        if args.json:
            print(json.dumps({"session": asdict(info), "path": [asdict(m) for m in path]}, indent=1, ensure_ascii=False))
            return
        branches = [store.siblings(m.id) for m in path]
    print(f"# session {info.id}: {info.title or '(untitled)'}")
    print(f"# profile {info.profile}, {info.messages} messages, started {when(info.created)}, "
          f"last used {when(info.updated)}")
    for m, siblings in zip(path, branches):
        branch = f" (branch {[s.id for s in siblings].index(m.id) + 1} of {len(siblings)})" if len(siblings) > 1 else ""
        print(f"\n[{m.id}] {m.role}{branch}:")
        print(m.text)


def cmd_sessions_rm(args: argparse.Namespace) -> None:
    with _open() as store:
        info = store.get(args.id)
        store.delete(args.id)
    print(f"deleted session {info.id} ({info.title or 'untitled'}, {info.messages} messages)")


def cmd_sessions_export(args: argparse.Namespace) -> None:
    with _open() as store:
        print(store.export(args.id, args.format))


def cmd_sessions_search(args: argparse.Namespace) -> None:
    from .store import hit_line

    with _open() as store:
        hits = store.search(args.text, args.limit)
        if args.json:
            print(json.dumps([hit._asdict() for hit in hits], indent=1, ensure_ascii=False))
            return
    if not hits:
        print(f"no message holds {args.text!r}")
        return
    for hit in hits:
        print(hit_line(hit))
    print(f"\ncarry on at one: quill chat --resume {hits[0].session}:{hits[0].message}")
