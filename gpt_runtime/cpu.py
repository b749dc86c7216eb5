"""What the CPU is, from /proc/cpuinfo: its fields, feature flags and x86-64 ISA level.

Torch-free, so `quill doctor`, the generation-path cache key (calibrate.py) and
the benchmarks can all ask without loading anything heavy.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# x86-64 ISA levels from /proc/cpuinfo flags, best first.
X86_LEVELS = (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16"), ("AVX512", "avx512f"), ("AVX2", "avx2"))


def cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break  # every processor repeats the same fields
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    return fields


def isa_level(machine: str, flags: set[str] | None) -> str:
    """AMX, AVX512-BF16, AVX512 or AVX2 on x86-64, NEON on arm64, else baseline.

    `flags` are the CPU's /proc/cpuinfo flags, None where they could not be read
    (then an x86-64 CPU's level is "unknown" rather than a guess).
    """
    machine = machine.lower()
    if machine in ("aarch64", "arm64"):
        return "NEON"  # part of every arm64 CPU
    if machine not in ("x86_64", "amd64"):
        return "baseline"
    if flags is None:
        return "unknown"
    return next((level for level, flag in X86_LEVELS if flag in flags), "baseline")


def cpu_flags(info: dict[str, str]) -> set[str] | None:
    """The CPU's feature flags from `cpuinfo()` fields (arm64 calls them Features), or None."""
    return set((info.get("flags") or info.get("Features") or "").split()) if info else None
