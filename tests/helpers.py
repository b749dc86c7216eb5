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


def quill_env(extra: dict | None = None) -> dict[str, str]:
    """The environment for a `quill` subprocess: this one without the user's QUILL_* settings.

    QUILL_SHIPPED_PROFILES stays (tests other than test_shipped hide the shipped
    profiles), and so does QUILL_DEVICE (the test's device, set in conftest).
    """
    kept = ("QUILL_SHIPPED_PROFILES", "QUILL_DEVICE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUILL_") or k in kept}
    env.update(extra or {})
    return env


def run_quill(*args: str, input: bytes | None = None, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `quill` CLI in a subprocess; returns bytes stdout/stderr."""
    full_env = quill_env(env)
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", *args],
        input=input if input is not None else b"",
        capture_output=True,
        env=full_env,
        cwd=cwd,
        timeout=120,
    )


def pip_install_target(sources: list[Path], site: Path) -> Path:
    """Install distribution source trees into `site` with a real, offline `pip install --target`.

    Put `site` on PYTHONPATH and the distributions' entry points are found, as
    after a `pip install`. Builds with the environment's setuptools (no isolation).
    """
    import importlib.util

    import pytest

    if importlib.util.find_spec("setuptools") is None:
        pytest.fail("plugin tests build distributions offline with the environment's setuptools "
                    "(pip --no-build-isolation), and setuptools is not installed; run `make test`")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(site), *map(str, sources)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
    )
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    return site


def one_line_error(out: subprocess.CompletedProcess, code: int = 1) -> tuple[str, str | None]:
    """Check a failed CLI run: exit `code`, nothing on stdout, one `quill: error:` line and at
    most a hint line. Returns (message, hint)."""
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == code, (out.returncode, err[-3000:])
    assert out.stdout == b""
    lines = err.splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("quill: error: "), err
    if len(lines) == 2:
        assert lines[1].startswith("  hint: "), err
    return lines[0].removeprefix("quill: error: "), lines[1].removeprefix("  hint: ") if len(lines) == 2 else None
