"""`quill doctor`: what this machine is, and what Quill will choose on it.

The report is what a user pastes into a bug report: the CPU, memory, GPUs,
Python and PyTorch, every registered backend and whether it can run, and the
dtype and kernel choices for training and generation, each with its reason.

Every choice comes from the function that makes it (`Backend.preferred_dtype`,
`cache_dtype`, `inference.bf16_packing_unavailable`, ...), never from a copy of
its logic here, so the report cannot drift from what Quill does. How each model
generates is measured the first time it runs on a machine (calibrate.py); the
report shows those measurements from their cache. Nothing here loads a model,
times a matrix product or touches the network.

Each section is probed on its own: one that fails says so in the report and the
rest still comes out. torch is imported inside the probes for the same reason.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .backend import AUTO_ORDER, dtype_name, get_backend
from .cpu import cpu_flags, cpuinfo, isa_level
from .errors import QuillError
from .plugins import get_plugin_host, get_registry

NVML_LIBRARY = "libnvidia-ml.so.1"
CUDA_DRIVER_LIBRARY = "libcuda.so.1"
NVIDIA_PROC_VERSION = Path("/proc/driver/nvidia/version")
MEMINFO = Path("/proc/meminfo")


def describe_error(exc: BaseException) -> str:
    """An exception as one line: `Type: message`."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _guarded(probe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    # A section that cannot be probed becomes {"error": ...}; the report goes on.
    try:
        return probe()
    except Exception as exc:
        return {"error": describe_error(exc)}


def collect() -> dict[str, Any]:
    """The whole report as a JSON-ready dict; sections that failed hold {"error": "..."}."""
    return {
        "quill_version": __version__,
        "platform": _guarded(probe_platform),
        "cpu": _guarded(probe_cpu),
        "memory": _guarded(probe_memory),
        "gpus": _guarded(probe_gpus),
        "torch": _guarded(probe_torch),
        "backends": _guarded(probe_backends),
        "choices": _guarded(probe_choices),
    }


# --- machine ------------------------------------------------------------------------

def probe_platform() -> dict[str, Any]:
    """The operating system and Python."""
    return {
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "executable": sys.executable,
    }


def probe_cpu() -> dict[str, Any]:
    """Model name, cores, ISA level and the kernels torch picked for this CPU."""
    import torch

    info = cpuinfo()
    flags = cpu_flags(info)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "model": info.get("model name") or platform.processor() or "unknown",
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "isa_level": isa_level(platform.machine(), flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes ({} where there is none)."""
    values: dict[str, int] = {}
    try:
        with open(MEMINFO, encoding="utf-8") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        return {}
    return values


def probe_memory() -> dict[str, Any]:
    """Total and available memory in bytes, and where the numbers come from."""
    info = meminfo()
    if "MemTotal" in info:
        return {"total_bytes": info["MemTotal"], "available_bytes": info.get("MemAvailable"), "source": str(MEMINFO)}
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return {"total_bytes": None, "available_bytes": None, "source": "unknown"}
    try:  # free pages, not counting caches the system could drop: a lower bound
        available = page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        available = None
    return {"total_bytes": total, "available_bytes": available, "source": "sysconf"}


# --- GPUs -----------------------------------------------------------------------------

def _nvml_driver_version() -> str | None:
    try:
        nvml = ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        buffer = ctypes.create_string_buffer(96)  # NVML asks for 80 at most
        if nvml.nvmlSystemGetDriverVersion(buffer, ctypes.c_uint(len(buffer))) != 0:
            return None
        return buffer.value.decode("ascii", "replace") or None
    finally:
        nvml.nvmlShutdown()


def _proc_driver_version() -> str | None:
    try:
        text = NVIDIA_PROC_VERSION.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar ..." (or "Open Kernel Module for x86_64")
    match = re.search(r"Kernel Module\b.*?\s(\d+\.\d+(?:\.\d+)*)\s", text)
    return match.group(1) if match else None


def nvidia_driver_version() -> tuple[str | None, str]:
    """The NVIDIA driver version and where it was read: NVML, then /proc, else (None, "unknown")."""
    try:
        version = _nvml_driver_version()
    except (OSError, AttributeError):  # an old or broken libnvidia-ml lacks the symbols
        version = None
    if version:
        return version, "NVML"
    version = _proc_driver_version()
    return (version, str(NVIDIA_PROC_VERSION)) if version else (None, "unknown")


def cuda_driver_version() -> str | None:
    """The newest CUDA the installed driver supports ("13.0"), from libcuda; None if unknown.

    A PyTorch built for a newer CUDA than this fails to start its kernels.
    """
    try:
        version = ctypes.c_int()
        if ctypes.CDLL(CUDA_DRIVER_LIBRARY).cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def _peak_dtype():
    # The yardstick is looked up in the dtype CUDA training would use by default.
    import torch

    registry = get_registry()
    if "cuda" in registry.names("backends"):
        backend = registry.get("backends", "cuda").obj()
        if backend.is_available():
            return backend.preferred_dtype()
    return torch.bfloat16


def _gpu(index: int, dtype) -> dict[str, Any]:
    import torch

    from .peak import datasheet_peak_flops  # imports torch: loaded when first used

    props = torch.cuda.get_device_properties(index)
    return {"index": index, "name": props.name, "memory_bytes": props.total_memory,
            "compute_capability": f"{props.major}.{props.minor}",
            "datasheet_peak_flops": datasheet_peak_flops(props.name, dtype)}


def probe_gpus() -> dict[str, Any]:
    """The GPUs torch sees (CUDA or ROCm), the NVIDIA driver, and each GPU's MFU yardstick."""
    import torch


    count = torch.cuda.device_count()  # 0 without a GPU or driver; does not initialize CUDA
    report: dict[str, Any] = {"count": count, "devices": [], "driver_version": None, "driver_source": None,
                              "torch_cuda": torch.version.cuda, "torch_hip": torch.version.hip, "peak_dtype": None}
    if count:
        dtype = _peak_dtype()
        report["peak_dtype"] = dtype_name(dtype)
        report["devices"] = [_gpu(i, dtype) for i in range(count)]
        if torch.version.hip is None:
            report["driver_version"], report["driver_source"] = nvidia_driver_version()
            report["driver_cuda"] = cuda_driver_version()
    report["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return report


# --- torch, backends ----------------------------------------------------------------------

def probe_torch() -> dict[str, Any]:
    """The torch version and build: CUDA, ROCm or CPU-only."""
    import torch

    build = f"ROCm {torch.version.hip}" if torch.version.hip else (
        f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only")
    return {"version": torch.__version__, "build": build, "cuda": torch.version.cuda, "hip": torch.version.hip,
            "onednn": torch.backends.mkldnn.is_available()}


def probe_backend(entry) -> dict[str, Any]:
    """One registry entry: available or not and why, or the error its plugin raised."""
    row: dict[str, Any] = {"name": entry.name, "plugin": entry.plugin, "available": None, "reason": None, "error": None}
    try:
        backend = entry.obj()
        row["available"] = bool(backend.is_available())
        if not row["available"]:
            row["reason"] = backend.unavailable_reason()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a plugin may fail in any way, even sys.exit(): name it, go on
        row["available"] = False
        row["error"] = describe_error(exc)
    return row


def probe_backends() -> dict[str, Any]:
    """Every registered backend, QUILL_DEVICE, and plugins that failed to load."""
    host = get_plugin_host()
    pinned = os.environ.get("QUILL_DEVICE")
    return {
        "quill_device": pinned if pinned is not None and pinned.strip() else None,
        "registered": [probe_backend(e) for e in host.registry.entries("backends")],
        "plugin_errors": [{"plugin": p.name, "origin": p.origin, "error": p.error} for p in host.plugins if p.error],
    }


# --- choices ------------------------------------------------------------------------------

def _auto_reason() -> str:
    pinned = os.environ.get("QUILL_DEVICE", "").strip()
    if pinned and pinned != "auto":
        return f"QUILL_DEVICE={pinned}"
    return f"the first available of {', '.join(AUTO_ORDER)}, then any other"


def _training_reason(backend, dtype) -> str:
    import torch

    bf16 = dtype == torch.bfloat16
    if backend.name == "cpu":
        level = isa_level(platform.machine(), cpu_flags(cpuinfo()))
        if bf16:
            return f"CPU has {level}" if level in ("AMX", "AVX512-BF16") else "CPU multiplies bf16 matrices natively"
        return "no bf16 matrix instructions on this CPU (AMX, AVX512-BF16)"
    if backend.name == "cuda":
        cc = "{}.{}".format(*torch.cuda.get_device_capability())
        return f"GPU supports bf16 (compute capability {cc})" if bf16 else \
            f"GPU has no bf16 (compute capability {cc}; needs 8.0)"
    return f"the {backend.name} backend's preferred dtype"


def _generation_paths(backend) -> dict[str, Any]:
    """The generation paths measured on this machine with this PyTorch (calibrate.py's cache), newest first."""
    from .calibrate import cached_choices, default_cache_file, hardware_id

    here = hardware_id(backend)
    rows = []
    for entry in reversed(cached_choices()):
        key = entry["key"]
        if (key["hardware"], key["torch"], key["backend"]) != (here, torch_version(), backend.name):
            continue
        m = key["model"]
        shape = f"{m['n_layer']}x{m['n_embd']}, vocab {m['vocab_size']} ({m['position']}, {m['norm']}, {m['mlp']})"
        name = entry["path"]["quantize"] if entry["path"]["quantize"] != "none" else entry["path"]["dtype"]
        rows.append({"model": shape, "path": name + (" graph" if entry["path"].get("graph") else ""),
                     "trials": entry["trials"], "measured": entry["measured"]})
    return {"cache_file": str(default_cache_file()), "measured": rows, "cache_dtype": dtype_name(backend.cache_dtype(
        backend.preferred_dtype()))}


def torch_version() -> str:
    import torch

    return torch.__version__


def probe_choices() -> dict[str, Any]:
    """What `device = "auto"` resolves to, and the dtypes and kernels Quill will use there."""
    from .inference import bf16_packing_unavailable, int8_unavailable  # imports torch: loaded when first used

    try:
        backend = get_backend("auto")
    except QuillError as exc:
        return {"error": f"cannot choose a backend: {exc}"}
    training = backend.preferred_dtype()
    packing = bf16_packing_unavailable()
    int8 = int8_unavailable(backend)
    return {
        "backend": backend.name,
        "backend_reason": _auto_reason(),
        "training": {"dtype": dtype_name(training), "reason": _training_reason(backend, training)},
        "generation": _generation_paths(backend),
        "bf16_packing": {"available": packing is None, "reason": packing},
        "int8": {"available": int8 is None, "reason": int8},
    }


# --- plain text ------------------------------------------------------------------------------

# A row of the plain report: label, value, and a note (a reason) or "".
Row = tuple[str, str, str]


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def _failed(label: str, section: dict[str, Any]) -> list[Row]:
    return [(label, "could not be probed", section["error"])]


def _machine_rows(report: dict[str, Any]) -> list[Row]:
    p, cpu, mem = report["platform"], report["cpu"], report["memory"]
    rows = _failed("os", p) if "error" in p else [
        ("os", p["os"], ""), ("python", f"{p['python']} ({p['python_implementation']})", p["executable"])]
    if "error" in cpu:
        rows += _failed("cpu", cpu)
    else:
        usable = f", {cpu['usable_cores']} usable" if cpu["usable_cores"] not in (None, cpu["logical_cores"]) else ""
        rows += [("cpu", cpu["model"], ""),
                 ("logical cores", f"{cpu['logical_cores']}{usable}", f"torch uses {cpu['torch_threads']} threads"),
                 ("ISA level", cpu["isa_level"], f"torch CPU capability: {cpu['torch_cpu_capability']}")]
    if "error" in mem:
        rows += _failed("memory", mem)
    elif mem["total_bytes"] is None:
        rows.append(("memory", "unknown", ""))
    else:
        rows += [("memory total", _gib(mem["total_bytes"]), f"from {mem['source']}"),
                 ("memory available", _gib(mem["available_bytes"]), "")]
    return rows


def _peak_row(gpus: dict[str, Any], gpu: dict[str, Any]) -> list[Row]:
    peak = gpu["datasheet_peak_flops"]
    if peak:
        return [("", f"GPU datasheet peak: {peak / 1e12:,.1f} TFLOP/s {gpus['peak_dtype']}", "the MFU yardstick")]
    return [("", "GPU datasheet peak: not in the table: MFU uses a timed product", "")]


def _gpu_rows(gpus: dict[str, Any]) -> list[Row]:
    if "error" in gpus:
        return _failed("GPUs", gpus)
    rows: list[Row] = []
    for gpu in gpus["devices"]:
        rows.append((f"cuda:{gpu['index']}", f"{gpu['name']}, {_gib(gpu['memory_bytes'])}",
                     f"compute capability {gpu['compute_capability']}"))
        rows += _peak_row(gpus, gpu)
    if not gpus["devices"]:
        rows.append(("CUDA/ROCm", "no GPU seen by torch", ""))
    elif gpus["torch_hip"] is None:
        rows.append(("NVIDIA driver", gpus["driver_version"] or "unknown",
                     f"from {gpus['driver_source']}" if gpus["driver_version"] else ""))
        supports = gpus.get("driver_cuda") or "unknown"
        rows.append(("CUDA", f"{gpus['torch_cuda']}", f"torch was built with it; the driver supports up to {supports}"))
    else:
        rows.append(("ROCm", f"{gpus['torch_hip']}", "the version torch was built with"))
    if gpus["mps"]:
        rows.append(("mps", "Apple GPU available", ""))
    return rows


def _torch_rows(t: dict[str, Any]) -> list[Row]:
    if "error" in t:
        return _failed("torch", t)
    return [("torch", t["version"], f"{t['build']} build"),
            ("torch.version.cuda", str(t["cuda"]), ""), ("torch.version.hip", str(t["hip"]), ""),
            ("oneDNN", "yes" if t["onednn"] else "no", "")]


def _backend_rows(b: dict[str, Any]) -> list[Row]:
    if "error" in b:
        return _failed("backends", b)
    rows: list[Row] = []
    for row in b["registered"]:
        plugin = f"plugin {row['plugin']}"
        if row["error"]:
            rows.append((row["name"], f"ERROR in {plugin}", row["error"]))
        elif row["available"]:
            rows.append((row["name"], "available", plugin))
        else:
            rows.append((row["name"], "unavailable", f"{row['reason']} ({plugin})"))
    rows.append(("QUILL_DEVICE", b["quill_device"] if b["quill_device"] is not None else "not set",
                 'what device = "auto" resolves to' if b["quill_device"] is not None else ""))
    rows += [(f"plugin {p['plugin']}", "failed to load", p["error"]) for p in b["plugin_errors"]]
    return rows


def _choice_rows(c: dict[str, Any]) -> list[Row]:
    if "error" in c:
        return _failed("choices", c)
    rows = [("backend", c["backend"], c["backend_reason"]),
            ("training dtype", c["training"]["dtype"], c["training"]["reason"])]
    g = c["generation"]
    for row in g["measured"]:
        times = ", ".join(f"{t['path']} {t['decode_ms']:.2f}" + (" (refused)" if t["refused"] else "")
                          for t in row["trials"])
        label, _, arch = row["model"].rstrip(")").partition(" (")
        rows.append((f"generation {label}", row["path"], f"ms per token: {times} ({arch}; measured {row['measured']})"))
    if not g["measured"]:
        rows.append(("generation", "measured per model", "on its first use here; nothing measured yet"))
    rows.append(("generation cache", g["cache_file"], "delete it to measure again"))
    rows.append(("KV cache", g["cache_dtype"], "attention over the cache runs fastest in float32 on the CPU"
                 if c["backend"] == "cpu" else f"the {c['backend']} backend's choice"))
    packing, int8 = c["bf16_packing"], c["int8"]
    # Packing is the CPU backend's, whichever backend `auto` chose: QUILL_DEVICE=cpu gets it
    rows.append(("CPU bf16 packing", "yes", "bf16 generation on the CPU uses oneDNN's packed kernels")
                if packing["available"] else ("CPU bf16 packing", "no", packing["reason"]))
    rows.append(("int8 weights", "available", "a candidate where fbgemm runs; --quantize int8 forces it")
                if int8["available"]
                else ("int8 weights", "unavailable", int8["reason"]))
    return rows


def _lines(rows: list[Row], label_width: int) -> list[str]:
    # Notes line up within a section; a long value (a path, an error) just pushes its note right.
    value_width = max((len(value) for _, value, note in rows if note and len(value) <= 24), default=0)
    return [f"  {label:<{label_width}}  {value:<{value_width}}  {note}".rstrip() if note
            else f"  {label:<{label_width}}  {value}".rstrip() for label, value, note in rows]


def render(report: dict[str, Any]) -> str:
    """The report as aligned plain text, one titled block per section."""
    sections = [("machine", _machine_rows(report)), ("GPUs", _gpu_rows(report["gpus"])),
                ("torch", _torch_rows(report["torch"])), ("backends", _backend_rows(report["backends"])),
                ("choices on this machine", _choice_rows(report["choices"]))]
    width = max(len(label) for _, rows in sections for label, _, _ in rows)
    lines = [f"quill {report['quill_version']} doctor"]
    for title, rows in sections:
        lines += ["", title] + _lines(rows, width)
    return "\n".join(lines) + "\n"
