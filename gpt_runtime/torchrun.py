"""One torchrun rank of a data-parallel `quill train`.

`quill train --nproc N` launches ``torchrun --nproc_per_node N -m gpt_runtime.torchrun
ARGS``, also the documented way to run torchrun by hand (``-m gpt_runtime.train ARGS``,
the older form, runs this module too). Each rank runs the CLI's own `train` command
through the CLI's runner, so its output, errors and exit codes are those of
`quill train`, without the engine importing the CLI.
"""

from __future__ import annotations

import os
import sys

from .cmdline import run
from .train_command import command_parser


def main(argv: list[str]) -> int:
    """Run `quill train ARGV` on this rank; returns the exit code."""
    return run(command_parser(), ["train", *argv])


def leave(code: int) -> None:
    """End the rank with `code`, its output flushed, without running C++ static destructors.

    After a finished run, a rank whose process group was torn down could still abort while
    the interpreter shut down ("terminate called without an active exception", twice in a
    row in the full suite on a busy 2-core machine, never when the test ran alone): its
    work was done and saved, but torchrun reported it failed. Nothing is left to clean up.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    leave(main(sys.argv[1:]))
