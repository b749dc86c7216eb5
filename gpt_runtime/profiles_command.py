"""`quill profiles list|show|validate`: each action's flags, then its handler.

Every `quill` command line imports this module, `quill --help` included, so each
handler imports the engine modules it uses when it runs (torch comes with most).
"""

from __future__ import annotations

import argparse
import json

from .cmdline import Parser, subcommand


def add_profiles_command(commands) -> None:
    """Add `profiles` and its actions to argparse subparsers `commands`."""
    prof = subcommand(commands, "profiles", "list, show and check chat profiles", (
        "quill profiles list",
        "quill profiles show shakespeare",
        "quill profiles validate my-profile.toml",
    ), description="Profiles are TOML files binding a checkpoint, a sampler chain, a backend and a chat "
                   "template. They are read from the shipped profiles/ directory and from the user's "
                   "profile directory (QUILL_PROFILES overrides it).")
    prof.set_defaults(help_parser=prof)
    prof_cmds = prof.add_subparsers(dest="profiles_command", metavar="ACTION", parser_class=Parser)
    _add_list(prof_cmds)
    _add_show(prof_cmds)
    _add_validate(prof_cmds)


def _add_list(actions) -> None:
    p = subcommand(actions, "list", "list every profile found, and what is wrong with any bad one", (
        "quill profiles list",
        "QUILL_PROFILES=~/my-profiles quill profiles list --json",
    ))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_profiles_list)


def cmd_profiles_list(args: argparse.Namespace) -> None:
    from .profiles import find_profiles, user_profile_dir

    entries = find_profiles()
    if args.json:
        print(json.dumps([{"name": e.name, "origin": e.origin, "path": str(e.path),
                           "error": str(e.error) if e.error else None,
                           "profile": e.profile.to_dict() if e.profile else None} for e in entries], indent=1))
        return
    if not entries:
        print(f"no profiles yet; put .toml files in {user_profile_dir()} (see `quill profiles --help`)")
    width = max((len(e.name) for e in entries), default=0)
    for e in entries:
        what = e.profile.description if e.profile else f"ERROR: {e.error}"
        print(f"{e.name:<{width}}  [{e.origin}]  {what}")


def _add_show(actions) -> None:
    p = subcommand(actions, "show", "show a profile's settings, defaults filled in", (
        "quill profiles show shakespeare",
        "quill profiles show ./my-profile.toml --json",
    ))
    p.add_argument("name", help="profile name, or a path to a .toml file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_profiles_show)


def cmd_profiles_show(args: argparse.Namespace) -> None:
    from .profiles import get_profile

    profile = get_profile(args.name)
    data = profile.to_dict()
    if args.json:
        print(json.dumps(data, indent=1))
        return
    print(f"# profile {profile.name}: {profile.path}")
    print(f"# tokenizer fingerprint {profile.tokenizer_fingerprint}")
    for key in ("description", "checkpoint", "tokenizer"):
        if data[key]:
            print(f"{key} = {json.dumps(data[key], ensure_ascii=False)}")
    for table in ("sampler", "backend", "generation", "template"):
        print(f"\n[{table}]")
        for key, value in data[table].items():
            if value is None:
                continue
            if isinstance(value, dict):
                inline = ", ".join(f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in value.items())
                print(f"{key} = {{ {inline} }}")
            else:
                print(f"{key} = {json.dumps(value, ensure_ascii=False)}")


def _add_validate(actions) -> None:
    p = subcommand(actions, "validate", "check a profile file: keys, types, files and the tokenizer fingerprint", (
        "quill profiles validate my-profile.toml",
    ))
    p.add_argument("file", help="the profile's .toml file")
    p.set_defaults(run=cmd_profiles_validate)


def cmd_profiles_validate(args: argparse.Namespace) -> None:
    from .profiles import load_profile

    profile = load_profile(args.file)
    print(f"ok: profile {profile.name!r}: checkpoint {profile.checkpoint} (tokenizer {profile.tokenizer_fingerprint}), "
          f"sampler chain {profile.chain}")
