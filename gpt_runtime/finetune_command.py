"""`quill finetune PROFILE INPUT... --out RUN`: prepare, train from the profile's
weights, and make the result a profile, in one command (see gpt_runtime/finetune.py).

The chat's `/finetune` job runs `setup_finetune` and `adopt_finished` too. No torch at import.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .cmdline import Parser, subcommand
from .config import FINETUNE_DEFAULTS, SHAPE, load_toml, saved_config
from .errors import QuillError, UsageError
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
    p.add_argument("--extend", action="store_true", help="text for a char model: add the characters it lacks (see quill prepare)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad JSON Lines lines or conversations instead of stopping")
    add_settings(p, {**FINETUNE_DEFAULTS, **{name: "the model's" for name in SHAPE}}, skip=("data", "out", "init_from"))
    p.set_defaults(run=cmd_finetune)
    return p


def cmd_finetune(args: argparse.Namespace) -> int:
    """Run parsed `quill finetune` arguments; returns the exit code."""
    from .finetune import input_kind
    from .progress import progress_bar, train_display
    from .train import train
    from .train_command import report

    unit = "conversations" if args.inputs and input_kind(args.inputs) == "chat" else "bytes"
    with progress_bar("preparing", unit=unit) as progress:
        parent, cfg, meta = setup_finetune(args, progress)
    for line in describe_data(meta):
        print(line, file=sys.stderr)
    with train_display() as on_event:
        result = train(cfg, resume=args.resume, on_event=on_event)
    name = adopt_finished(result, parent, args.name)
    code = report(result)
    if name:
        print(f"profile {name!r} is ready: quill chat --profile {name}")
    return code


def setup_finetune(args: argparse.Namespace, progress: Callable[[int, int], None] | None):
    """The parent profile, the run's settings and (unless resuming, None then) the metadata of
    the inputs, prepared in RUN/data first. Everything that can be refused is refused before
    anything is prepared."""
    from .finetune import finetune_config, prepare_inputs, profile_of_run
    from .profiles import free_profile_name, get_profile

    parent = get_profile(args.profile)
    out = Path(args.out)
    if args.name and profile_of_run(out) != args.name:
        free_profile_name(args.name, exact=True, flag="--name")  # a name that is taken is refused now, not after training
    if args.resume:
        if args.inputs or args.config:
            raise UsageError("--resume continues the fine-tune in --out with its own data and settings",
                             hint="leave out the inputs and --config")
        return parent, replace(saved_config(out), **settings_given(args)), None
    if not args.inputs:
        raise UsageError("give the files or directories to fine-tune on", hint=f"quill finetune {args.profile} notes/ --out {args.out}")
    if (out / "last.state.pt").exists():  # a run that failed before its first checkpoint is started again
        raise QuillError(f"{str(out)!r} already holds a run", hint="continue it with --resume, or choose another --out")
    source = f"config file {args.config!r}"
    cfg = finetune_config(parent, out, load_toml(args.config) if args.config else {}, settings_given(args), source)
    meta = prepare_inputs(args.inputs, parent, out / "data", args.val_fraction, progress, args.extend, args.skip_bad)
    return parent, cfg, meta


def describe_data(meta: dict | None) -> list[str]:
    """What was prepared, in a line or a few (none when resuming)."""
    from .data_command import summary_lines, unknown_lines

    if meta is None:
        return []
    if meta.get("mask"):
        return [f"prepared {meta['conversations']:,} conversations ({meta['val_conversations']:,} of them for validation): "
                f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, the loss on the model's turns only "
                f"({meta['truncated']:,} cut to fit, {sum(meta['skipped'].values()):,} skipped)",
                *unknown_lines(meta, "the model's tokenizer does not have them")]
    return [f"prepared {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens", *summary_lines(meta)]


def adopt_finished(result, parent, name: str | None) -> str | None:
    """The finished run as a profile (its name); None for a run stopped by a signal, which is resumed instead."""
    from .finetune import adopt

    return adopt(result.out, parent, name) if result.stopped in (None, "time limit") else None
