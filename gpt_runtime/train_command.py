"""`quill train` and `quill eval` on the command line: their flags, the training
settings they give, and the two commands themselves.

The CLI, the chat's background jobs (`/train`, `/eval`) and each torchrun rank
(`gpt_runtime.torchrun`) all parse with these, so they take exactly the same
flags, and a rank runs the very command `quill train` runs. It lives outside the
CLI so that the engine needs nothing from `gpt_runtime.cli`. No torch here at
import: `cmd_train` and `cmd_eval` load the training and evaluation code when
they run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

from .cmdline import PROG, Parser, subcommand
from .config import TrainConfig, load_toml, saved_config
from .errors import UsageError

if TYPE_CHECKING:
    from .train import TrainResult

_TYPES = {"int": int, "float": float, "str": str}


def add_train_command(commands) -> Parser:
    """Add `train` (its help, examples, flags and handler) to argparse subparsers `commands`."""
    p = subcommand(commands, "train", "train a GPT on a prepared data directory", (
        "quill train --data data/shakespeare --out runs/small --n-layer 4 --n-embd 128 --max-steps 2000",
        "quill train --data data/shakespeare --out runs/small --config small.toml --lr 3e-4",
        "quill train --out runs/small --resume --max-steps 4000",
        "quill train --data data/shakespeare --out runs/ddp --nproc 2",
        "quill train --init-from shakespeare-bpe --data data/mine --out runs/mine --max-steps 300 --lr 3e-4",
    ), description="Train a GPT, from scratch or (--init-from) from a model's weights. Every flag can also be a key of the --config TOML file "
                   "(n_layer = 4); flags override the file. Ctrl-C saves a checkpoint and stops; "
                   "--resume continues exactly where a run stopped.")
    p.add_argument("--config", help="TOML file with any of the settings below, in snake_case")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--nproc", type=int, default=1, help="processes for data-parallel training (launches torchrun)")
    add_settings(p)
    p.set_defaults(run=cmd_train)
    return p


def add_settings(p: Parser, defaults: dict | None = None, skip: tuple[str, ...] = ()) -> None:
    """A flag for each TrainConfig setting (--n-layer, --lr, ...) but those in `skip`;
    `defaults` are shown in the help in place of TrainConfig's (`quill finetune` starts from others)."""
    # Settings are only set when given (SUPPRESS), so `train_config` can layer them
    # over the --config file or the resumed run.
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} (default: {(defaults or {}).get(f.name, f.default)})"
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        elif f.type == "bool | str":  # a switch that may also be "auto"
            _add_auto_switch(p, flag, f.name, help)
        else:
            p.add_argument(flag, type=_TYPES[f.type], default=argparse.SUPPRESS, help=help, metavar=f.type.upper())


def _add_auto_switch(p: Parser, flag: str, dest: str, help: str) -> None:
    """`--flag` (on), `--flag=auto|true|false`, and `--no-flag` (off), all setting `dest`."""
    p.add_argument(flag, dest=dest, nargs="?", const=True, type=_auto_switch, default=argparse.SUPPRESS,
                   metavar="auto|true|false", help=help)
    p.add_argument("--no-" + flag[2:], dest=dest, action="store_false", default=argparse.SUPPRESS,
                   help=f"same as {flag}=false")


def _auto_switch(text: str) -> bool | str:
    values = {"auto": "auto", "true": True, "false": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, not {text!r}")
    return values[text.lower()]


def add_eval_command(commands) -> Parser:
    """Add `eval` (its help, examples, flags and handler) to argparse subparsers `commands`."""
    p = subcommand(commands, "eval", "loss, perplexity and bits per byte of a checkpoint", (
        "quill eval runs/small --data data/shakespeare",
        "quill eval runs/small/best.safetensors --data notes.txt --json",
    ))
    p.add_argument("checkpoint", help="checkpoint file, or a run directory (its best checkpoint)")
    p.add_argument("--data", required=True, help="prepared data directory (its val split) or a text file")
    p.add_argument("--split", default="val", help="split of a data directory: train or val (default: val)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: 8)")
    p.add_argument("--device", default="auto",
                   help="backend: auto ($QUILL_DEVICE, else the best available), cpu, cuda, mps, or a plugin's")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate
    from .progress import progress_bar

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {args.batch_size}")
    with progress_bar("evaluating", unit="batches") as progress:
        result = evaluate(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size, device=args.device, progress=progress)
    if args.json:
        print(json.dumps(result.to_dict()))
        return
    over = "model-turn tokens (the chat data's mask)" if result.masked else "tokens"
    print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  bits/byte {result.bits_per_byte:.4f}  "
          f"({result.tokens:,} {over}, {result.bytes:,} bytes)")


def command_parser(*more: Callable[[Any], Parser]) -> Parser:
    """`quill` with only its `train` and `eval` commands, and those that `more` add (the
    chat's jobs add `quill finetune`'s), for parsing their arguments.

    Parsing `[kind, *argv]` with it gives what the full CLI gives, its error
    messages included: an unknown flag is `quill: unrecognized arguments: ...`.
    """
    parser = Parser(prog=PROG)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add in (add_train_command, *more, add_eval_command):
        add(commands)
    return parser


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The training settings from parsed `quill train` arguments: the flags given,
    over the --config file, the resumed run's settings or the defaults. A new run
    with `init_from` takes its model's shape from the source (`init_from.take_source_shape`)."""
    if args.resume:
        if args.config:
            raise UsageError("--resume continues a run with its own settings; it takes no --config")
        return replace(saved_config(getattr(args, "out", TrainConfig.out)), **settings_given(args))
    told = load_toml(args.config) if args.config else {}
    base = TrainConfig.from_dict(told, f"config file {args.config!r}") if args.config else TrainConfig()
    cfg = replace(base, **settings_given(args))
    if not cfg.init_from:
        return cfg
    from .init_from import take_source_shape

    return take_source_shape(cfg, set(told) | set(settings_given(args)))


def settings_given(args: argparse.Namespace) -> dict:
    """The settings given as flags (the others are absent: argparse.SUPPRESS)."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}


def cmd_train(args: argparse.Namespace) -> int:
    """Run parsed `quill train` arguments; returns the exit code."""
    cfg = train_config(args)
    if args.nproc < 1:
        raise UsageError(f"--nproc must be at least 1, not {args.nproc}")
    if args.nproc > 1:
        return _launch_torchrun(args)
    from .progress import train_display
    from .train import train

    with train_display() as on_event:
        result = train(cfg, resume=args.resume, on_event=on_event)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 speaks for all
    return report(result)


def report(result: TrainResult) -> int:
    """Say how a run ended; the exit code tells a stop by signal from the end of the run."""
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    if result.stopped in ("SIGINT", "SIGTERM"):
        print(f"stopped by {result.stopped} at step {result.step}; saved {result.out}/last.safetensors "
              f"(continue with: quill train --out {result.out} --resume)", file=sys.stderr)
        return 130 if result.stopped == "SIGINT" else 143
    ended = f"stopped at the time limit at step {result.step}" if result.stopped else f"finished {result.step} steps"
    print(f"{ended}; best val loss {best}; checkpoints in {result.out}")
    return 0


def _launch_torchrun(args: argparse.Namespace) -> int:
    """Train in `args.nproc` processes: torchrun runs `quill train` (without --nproc) in each."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "gpt_runtime.torchrun", *_train_command_line(args.argv[1:])]
    # Ctrl-C reaches torchrun and its workers through the terminal; they save and
    # stop, so the parent only waits. A SIGTERM sent to us is passed on.
    child = subprocess.Popen(command, env=env)
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)


def _train_command_line(argv: list[str]) -> list[str]:
    """The `quill train` arguments without --nproc, for torchrun to pass on."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
