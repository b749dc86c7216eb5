"""`quill samplers`, `quill plugins` and `quill doctor`: reports on what this
install has and what it will choose on this machine. Each command's flags, then
its handler.

Every `quill` command line imports this module, `quill --help` included, so each
handler imports the engine modules it uses when it runs (torch comes with most).
"""

from __future__ import annotations

import argparse
import json

from .cmdline import subcommand


def add_samplers_command(commands) -> None:
    """Add `samplers` to argparse subparsers `commands`."""
    p = subcommand(commands, "samplers", "list samplers with their options and the plugin each came from", (
        "quill samplers",
        "quill samplers --json",
    ))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_samplers)


def cmd_samplers(args: argparse.Namespace) -> None:
    from .plugins import get_registry

    rows = []
    for entry in get_registry().entries("samplers"):
        options = getattr(entry.obj, "options", {})
        doc = (entry.obj.__doc__ or "").strip().splitlines()
        rows.append({
            "name": entry.name,
            "plugin": entry.plugin,
            "description": doc[0] if doc else "",
            "options": {
                name: {"type": option.type.__name__, "default": option.default, "range": option.describe_range(), "help": option.help}
                for name, option in options.items()
            },
        })
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    for row in rows:
        print(f"{row['name']}  [plugin {row['plugin']}]  {row['description']}")
        for name, option in row["options"].items():
            limits = f", {option['range'].replace('value', name)}" if option["range"] else ""
            print(f"    {row['name']}.{name} = {option['default']!r}  ({option['type']}{limits})  {option['help']}")


def add_plugins_command(commands) -> None:
    """Add `plugins` to argparse subparsers `commands`."""
    p = subcommand(commands, "plugins", "list plugins: what each registered, and any error", (
        "quill plugins",
        "quill plugins --json",
        "QUILL_DISABLE_PLUGINS=my_plugin quill plugins",
    ))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_plugins)


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


def add_doctor_command(commands) -> None:
    """Add `doctor` to argparse subparsers `commands`."""
    p = subcommand(commands, "doctor", "report this machine and what Quill will choose on it, for bug reports", (
        "quill doctor",
        "quill doctor --json > doctor.json",
        "QUILL_DEVICE=cpu quill doctor",
    ), description="Report the CPU, memory, GPUs, Python and PyTorch, every backend and whether it can run "
                   "here, and the dtypes and kernels Quill will use for training and generation, each with "
                   "its reason. Paste it into bug reports. Loads no model and times nothing.")
    p.add_argument("--json", action="store_true", help="print one JSON object with the same facts")
    p.set_defaults(run=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> None:
    from .doctor import collect, render

    report = collect()
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(render(report), end="")
