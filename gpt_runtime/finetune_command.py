"""`quill finetune PROFILE INPUT... --out RUN`: prepare, train from the profile's
weights, and make the result a profile, in one command (see gpt_runtime/finetune.py).

The chat's `/finetune` job runs `run_finetune` too. No torch at import.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .cmdline import Parser, subcommand
from .config import load_toml, saved_config
from .errors import QuillError, UsageError
from .finetune import DEFAULTS
from .train_command import add_settings, settings_given


def add_finetune_command(commands) -> Parser:
    """Add `finetune` (its help, examples, flags and handler) to argparse subparsers `commands`."""
    p = subcommand(commands, "finetune", "fine-tune a profile's model on your text or conversations", (
        "quill finetune shakespeare-bpe my-notes/ --out runs/notes",
        "quill finetune shakespeare-char chats.jsonl --out runs/polite --max-steps 300",
        "quill finetune shakespeare-bpe --out runs/notes --resume --max-steps 400",
    ), description="Prepare INPUTs for the profile's model in RUN/data (conversations, .jsonl with \"messages\" "
                   "or /save transcripts, as chat data trained only on the model's turns; anything else, files "
                   "and directories, as text), train from the profile's weights with fine-tuning settings, and "
                   "write the finished run as a profile with the parent's sampler and chat template. The "
                   "three steps are `quill prepare`, `quill train --init-from` and a profile file.")
    p.add_argument("profile", help="the profile whose model to fine-tune (its name, or its .toml file)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="text files, directories, .jsonl files or /save transcripts")
    p.add_argument("--out", required=True, help="the run directory (the prepared data goes in RUN/data)")
    p.add_argument("--name", help="the new profile's name (default: the run directory's name)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="part of the inputs kept for validation (default: 0.1)")
    p.add_argument("--config", help="TOML file with training settings, in snake_case")
    p.add_argument("--resume", action="store_true", help="continue a fine-tune in --out that stopped")
    add_settings(p, DEFAULTS, skip=("data", "out", "init_from"))
    p.set_defaults(run=cmd_finetune)
    return p


def cmd_finetune(args: argparse.Namespace) -> int:
    """Run parsed `quill finetune` arguments; returns the exit code."""
    from .progress import progress_bar, train_display
    from .train import train
    from .train_command import report

    with progress_bar("preparing", unit="bytes") as progress:
        parent, cfg = setup_finetune(args, progress, say=lambda line: print(line, file=sys.stderr))
    with train_display() as on_event:
        result = train(cfg, resume=args.resume, on_event=on_event)
    name = adopt_finished(result, parent, args.name)
    code = report(result)
    if name:
        print(f"profile {name!r} is ready: quill chat --profile {name}")
    return code


def setup_finetune(args: argparse.Namespace, progress: Callable[[int, int], None] | None, say: Callable[[str], None]):
    """The parent profile and the run's settings; unless resuming, the inputs prepared in RUN/data first."""
    from .finetune import finetune_config, prepare_inputs
    from .profiles import free_profile_name, get_profile

    parent = get_profile(args.profile)
    out = Path(args.out)
    if args.name:
        free_profile_name(args.name, exact=True)  # a name that is taken is refused now, not after training
    if args.resume:
        if args.inputs or args.config:
            raise UsageError("--resume continues the fine-tune in --out with its own data and settings",
                             hint="leave out the inputs and --config")
        return parent, replace(saved_config(out), **settings_given(args))
    if not args.inputs:
        raise UsageError("give the files or directories to fine-tune on", hint=f"quill finetune {args.profile} notes/ --out {args.out}")
    if (out / "config.json").exists() or (out / "data" / "meta.json").exists():
        raise QuillError(f"{str(out)!r} already holds a run", hint="continue it with --resume, or choose another --out")
    told = load_toml(args.config) if args.config else {}
    settings = {**told, **settings_given(args)}
    cfg = finetune_config(parent, out, settings, set(settings))  # a shape clash is refused before any work
    meta = prepare_inputs(args.inputs, parent, out / "data", args.val_fraction, progress)
    say(f"prepared {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens in {out / 'data'}"
        + (" (chat data: the loss counts on the model's turns only)" if meta.get("mask") else ""))
    return parent, cfg


def adopt_finished(result, parent, name: str | None) -> str | None:
    """The finished run as a profile (its name); None for a run stopped by a signal, which is resumed instead."""
    from .finetune import adopt

    return adopt(result.out, parent, name) if result.stopped in (None, "time limit") else None
