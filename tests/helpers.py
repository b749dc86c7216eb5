"""Helpers for tests: run the real CLI, sample text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n"
) * 20


def run_quill(*args: str, input: bytes | None = None, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `quill` CLI in a subprocess; returns bytes stdout/stderr."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("QUILL_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gpt_runtime.cli", *args],
        input=input if input is not None else b"",
        capture_output=True,
        env=full_env,
        cwd=cwd,
        timeout=120,
    )
