"""Progress bars for long CLI work, drawn on stderr only when it is a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(description: str, unit: str = "") -> Iterator[Callable[[int, int], None]]:
    """Yield a `progress(done, total)` callback that drives a bar on stderr.

    When stderr is not a terminal (pipes, CI, tests) the callback does nothing, so
    logs stay clean.
    """
    if not sys.stderr.isatty():
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns.append(TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with `message` on stderr while the block runs, for work with no
    countable steps (reading and writing a large model); only on a terminal."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _yardstick(event: dict) -> str:
    """What MFU is measured against, for the start line."""
    if not event.get("peak_flops"):
        return ""
    return f"; MFU against {event['peak_flops'] / 1e12:,.1f} TFLOP/s ({event['peak_source']})"


def describe_compile(event: dict) -> str | None:
    """The line for a `compiling` or `compiled` training event; None for other events."""
    if event["event"] == "compiling":
        return "compiling the model (torch.compile): the first step waits for it"
    if event["event"] == "compiled":
        return f"compiled: the first step took {event['seconds']:.1f} s (left out of tokens/s and the ETA)"
    return None


def describe_step(event: dict) -> str:
    """One line for a training step event: step, losses, speed, MFU, ETA."""
    parts = [f"step {event['step']}/{event['max_steps']}", f"loss {event['loss']:.4f}"]
    if event.get("val_loss") is not None:
        parts.append(f"val {event['val_loss']:.4f}")
    if event.get("tokens_per_s") is not None:
        parts.append(f"{event['tokens_per_s']:,.0f} tok/s")
    if event.get("mfu") is not None:
        parts.append(f"MFU {100 * event['mfu']:.1f}%")
    parts.append(f"ETA {_duration(event.get('eta_s'))}")
    return "  ".join(parts)


@contextmanager
def train_display() -> Iterator[Callable[[dict], None]]:
    """Yield an `on_event` callback for `train()` that shows progress on stderr.

    On a terminal: a live bar with the latest step line. Elsewhere: the step lines
    themselves, one per log interval, so logs and CI output stay readable.
    """
    if not sys.stderr.isatty():
        def log(event: dict) -> None:
            if event["event"] == "start":
                print(f"training {event['params']:,} parameters on {event['device']} ({event['dtype']}"
                      f"{', %d processes' % event['world_size'] if event['world_size'] > 1 else ''}) "
                      f"from step {event['step']}{_yardstick(event)}", file=sys.stderr, flush=True)
            elif event["event"] == "step":
                print(describe_step(event), file=sys.stderr, flush=True)
            elif describe_compile(event):
                print(describe_compile(event), file=sys.stderr, flush=True)
        yield log
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(stderr=True)
    with Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[line]}"),
                  console=console, transient=False) as bar:
        task = bar.add_task("train", total=None, line="starting")

        def show(event: dict) -> None:
            if event["event"] == "start":
                console.print(f"training {event['params']:,} parameters on {event['device']} ({event['dtype']}) "
                              f"from step {event['step']}{_yardstick(event)}")
                bar.update(task, total=event["max_steps"], completed=event["step"])
            elif event["event"] == "step":
                line = describe_step(event).split("  ", 1)[1]
                bar.update(task, completed=event["step"], line=line)
                if event.get("val_loss") is not None:
                    console.print(describe_step(event))
            elif describe_compile(event):
                console.print(describe_compile(event))

        yield show
