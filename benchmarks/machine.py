"""Shared by the benchmarks: the corpus they read and the machine they ran on."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

# Tiny Shakespeare beside the repository, as on the project's machines; pass
# --corpus or set QUILL_CORPUS elsewhere.
DEFAULT_CORPUS = Path(os.environ.get("QUILL_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"))


def corpus_or_exit(path: Path) -> Path:
    """The corpus path, or a one-line message and exit code 1 if it is missing."""
    if not path.is_file():
        sys.exit(f"benchmark: no corpus at {path}; pass --corpus FILE or set QUILL_CORPUS")
    return path


def machine_info() -> dict:
    from gpt_runtime.cpu import cpu_flags, cpuinfo, isa_level  # torch-free

    info = cpuinfo()
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_class": isa_level(platform.machine(), cpu_flags(info)),  # AVX2, AVX512, AVX512-BF16, AMX, ...
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
