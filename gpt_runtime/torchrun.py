"""One torchrun rank of a data-parallel `quill train`.

`quill train --nproc N` launches ``torchrun --nproc_per_node N -m gpt_runtime.torchrun
ARGS``, also the documented way to run torchrun by hand (``-m gpt_runtime.train ARGS``,
the older form, runs this module too). Each rank runs the CLI's own `train` command
through the CLI's runner, so its output, errors and exit codes are those of
`quill train`, without the engine importing the CLI.
"""

from __future__ import annotations

import sys

from .cmdline import run
from .train_command import command_parser


def main(argv: list[str]) -> int:
    """Run `quill train ARGV` on this rank; returns the exit code."""
    return run(command_parser(), ["train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
