"""`quill doctor`: the machine report users paste into bug reports.

The real CLI runs in a subprocess twice, shared by the tests below: --json as
it is, and the plain report with a real plugin distribution installed whose
backend raises while probed. The facts are checked against what the test finds
out for itself and against the very functions Quill decides with. What a
subprocess cannot stage (a CUDA backend on a machine without one, a section
that fails, a GPU) is driven in-process through `gpt_runtime.doctor`."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gpt_runtime import cli, doctor
from gpt_runtime import plugins as host_mod
from gpt_runtime.backend import Backend
from gpt_runtime.hookspecs import hookimpl
from gpt_runtime.inference import bf16_packing_unavailable, int8_unavailable
from helpers import one_line_error, pip_install_target, run_quill
from plugins.backends import CpuBackend, CudaBackend, cpu_has_bf16

SECTIONS = ("platform", "cpu", "memory", "gpus", "torch", "backends", "choices")
TITLES = ("machine", "GPUs", "torch", "backends", "choices on this machine")


@pytest.fixture(scope="module")
def report() -> dict:
    out = run_quill("doctor", "--json")
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    assert out.stderr == b""
    return json.loads(out.stdout)


FLAKY_SOURCE = '''
from gpt_runtime.backend import Backend
from gpt_runtime.hookspecs import hookimpl


class FlakyBackend(Backend):
    name = "flaky"

    def is_available(self):
        raise RuntimeError("flaky driver crashed\\nwhile probing")


@hookimpl
def quill_register_backends(register):
    register("flaky", FlakyBackend)
'''

FLAKY_PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "quill-flaky"
version = "0.2.0"

[project.entry-points.quill]
flakyplug = "quill_flaky"

[tool.setuptools]
py-modules = ["quill_flaky"]
"""


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    """`quill doctor` with a distribution installed whose backend raises in is_available()."""
    root = tmp_path_factory.mktemp("doctor_plugins")
    src = root / "src" / "quill-flaky"
    src.mkdir(parents=True)
    (src / "pyproject.toml").write_text(FLAKY_PYPROJECT, encoding="utf-8")
    (src / "quill_flaky.py").write_text(textwrap.dedent(FLAKY_SOURCE), encoding="utf-8")
    site = pip_install_target([src], root / "site")
    out = run_quill("doctor", env={"PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    assert out.stderr == b""
    return out.stdout.decode("utf-8")


def _rows(text: str, title: str) -> dict[str, str]:
    """One section of the plain report: label -> the rest of its line, squeezed."""
    lines = text.splitlines()
    body = lines[lines.index(title) + 1:]
    body = body[:body.index("")] if "" in body else body
    return {line.split("  ")[1].strip(): " ".join(line.split("  ", 2)[2].split()) for line in body
            if line.split("  ")[1].strip()}


def _meminfo_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --- the real CLI ----------------------------------------------------------------------

def test_json_has_every_section_and_no_errors(report):
    assert list(report) == ["quill_version", *SECTIONS]
    for name in SECTIONS:
        assert "error" not in report[name], (name, report[name])


def test_json_machine_and_torch_facts(report):
    cpu, t, gpus = report["cpu"], report["torch"], report["gpus"]
    assert cpu["logical_cores"] == os.cpu_count()
    assert cpu["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert cpu["isa_level"] in ("AVX2", "AVX512", "AVX512-BF16", "AMX", "NEON", "baseline", "unknown")
    if cpu_has_bf16():
        assert cpu["isa_level"] in ("AMX", "AVX512-BF16")
    assert report["platform"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert (t["version"], t["cuda"], t["hip"]) == (torch.__version__, torch.version.cuda, torch.version.hip)
    assert t["build"] == (f"ROCm {torch.version.hip}" if torch.version.hip else
                          f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only")
    assert gpus["count"] == torch.cuda.device_count() == len(gpus["devices"])
    total = _meminfo_total()
    if total is not None:
        assert report["memory"]["total_bytes"] == total
        assert 0 < report["memory"]["available_bytes"] <= total


def test_json_backends_are_the_registry_s(report):
    registry = host_mod.get_registry()
    rows = {row["name"]: row for row in report["backends"]["registered"]}
    assert list(rows) == registry.names("backends")
    for name, row in rows.items():
        backend = registry.get("backends", name).obj()
        assert row["plugin"] == registry.get("backends", name).plugin
        assert row["available"] == backend.is_available()
        assert row["reason"] == backend.unavailable_reason()
        assert row["error"] is None
    assert rows["cpu"]["available"] is True and rows["cpu"]["reason"] is None
    assert report["backends"]["quill_device"] == "cpu"  # conftest pins it
    assert report["backends"]["plugin_errors"] == []


def test_json_choices_are_the_deciding_functions(report):
    choices = report["choices"]
    expected = "bfloat16" if cpu_has_bf16() else "float32"
    assert (choices["backend"], choices["backend_reason"]) == ("cpu", "QUILL_DEVICE=cpu")
    assert choices["training"]["dtype"] == expected
    generation = choices["generation"]  # measured per model on first use (test_calibrate.py shows a measurement)
    assert generation == {"cache_file": os.path.join(os.environ["XDG_CACHE_HOME"], "quill", "generation-paths.json"),
                          "measured": [], "cache_dtype": "float32"}
    why = bf16_packing_unavailable()
    assert choices["bf16_packing"] == {"available": why is None, "reason": why}
    why = int8_unavailable(CpuBackend())
    assert choices["int8"] == {"available": why is None, "reason": why}


def test_plain_report_has_every_section(text, report):
    assert text.startswith(f"quill {report['quill_version']} doctor\n")
    for title in TITLES:
        assert f"\n{title}\n" in text
    machine, backends, choices = _rows(text, "machine"), _rows(text, "backends"), _rows(text, "choices on this machine")
    assert machine["logical cores"].startswith(f"{os.cpu_count()} ")
    assert machine["ISA level"].startswith(report["cpu"]["isa_level"])
    assert _rows(text, "torch")["torch"].startswith(torch.__version__)
    for name in host_mod.get_registry().names("backends"):  # the flaky plugin's is not in this process's
        assert backends[name].split()[0] in ("available", "unavailable")
    assert backends["flaky"].startswith("ERROR in plugin flakyplug")
    assert backends["cpu"].startswith("available")
    assert backends["QUILL_DEVICE"].startswith("cpu")
    assert choices["backend"] == "cpu QUILL_DEVICE=cpu"
    assert choices["training dtype"].startswith(report["choices"]["training"]["dtype"] + " ")
    assert choices["generation"].startswith("measured per model ")
    assert choices["generation cache"].startswith(report["choices"]["generation"]["cache_file"])
    assert choices["CPU bf16 packing"].split()[0] == ("yes" if bf16_packing_unavailable() is None else "no")
    assert "Traceback" not in text


def test_help_shows_examples_and_a_bad_flag_is_a_usage_error():
    out = run_quill("doctor", "--help")
    assert out.returncode == 0
    help_text = out.stdout.decode()
    assert "--json" in help_text and "examples:\n  quill doctor\n" in help_text
    assert b"doctor" in run_quill("--help").stdout
    message, hint = one_line_error(run_quill("doctor", "--verbose"), code=2)
    assert "unrecognized arguments: --verbose" in message


def test_installed_backend_plugin_that_raises_is_named_and_the_report_goes_on(text):
    flaky = [line for line in text.splitlines() if "flaky" in line]
    assert len(flaky) == 1, text
    assert flaky[0].split()[:4] == ["flaky", "ERROR", "in", "plugin"]
    assert "flakyplug" in flaky[0] and flaky[0].endswith("RuntimeError: flaky driver crashed while probing")
    assert _rows(text, "choices on this machine")["training dtype"]  # and the report went on


# --- in-process ------------------------------------------------------------------------

@pytest.fixture
def with_backends(monkeypatch):
    """The host sees the built-in backends plus the given plugin objects, nothing else."""
    def install(**extra: object) -> None:
        monkeypatch.setattr(host_mod, "metadata", SimpleNamespace(entry_points=lambda group: []))
        builtins = [("backends", "plugins.backends")]
        for name, plugin in extra.items():
            module = f"_quill_doctor_test_{name}"
            monkeypatch.setitem(sys.modules, module, plugin)
            builtins.append((name, module))
        monkeypatch.setattr(host_mod, "BUILTINS", tuple(builtins))
        host_mod.get_plugin_host.cache_clear()

    return install


def _backend_plugin(name: str, **methods) -> object:
    cls = type(f"Backend_{name}", (Backend,), {"name": name, **methods})

    class Plugin:
        @hookimpl
        def quill_register_backends(self, register):
            register(name, cls)

    return Plugin()


def _raise(exc: BaseException):
    def method(*args, **kwargs):
        raise exc
    return method


def test_every_way_a_backend_probe_fails_is_one_line_naming_the_plugin(with_backends):
    with_backends(
        ctorplug=_backend_plugin("ctor", __init__=_raise(ValueError("no config"))),
        availplug=_backend_plugin("avail", is_available=_raise(OSError("driver gone"))),
        reasonplug=_backend_plugin("why", is_available=lambda self: False,
                                   unavailable_reason=_raise(KeyError("why"))),
        exitplug=_backend_plugin("exits", is_available=_raise(SystemExit("bye"))),
    )
    report = doctor.collect()
    rows = {row["name"]: row for row in report["backends"]["registered"]}
    assert rows["ctor"]["error"] == "ValueError: no config" and rows["ctor"]["plugin"] == "ctorplug"
    assert rows["avail"]["error"] == "OSError: driver gone"
    assert rows["why"]["error"] == "KeyError: 'why'"
    assert rows["exits"]["error"] == "SystemExit: bye"
    assert rows["cpu"] == {"name": "cpu", "plugin": "backends", "available": True, "reason": None, "error": None}
    assert all("error" not in report[name] for name in SECTIONS)
    text = doctor.render(report)
    backends = _rows(text, "backends")
    assert backends["ctor"] == "ERROR in plugin ctorplug ValueError: no config"
    assert backends["avail"] == "ERROR in plugin availplug OSError: driver gone"
    for title in TITLES:
        assert f"\n{title}\n" in text


def test_a_fake_available_cuda_backend_is_listed_as_available(monkeypatch):
    monkeypatch.setattr(CudaBackend, "is_available", lambda self: True)
    report = doctor.collect()
    rows = {row["name"]: row for row in report["backends"]["registered"]}
    assert rows["cuda"] == {"name": "cuda", "plugin": "backends", "available": True, "reason": None, "error": None}
    assert report["gpus"]["count"] == torch.cuda.device_count()  # the GPU section asks torch, not the backend
    assert _rows(doctor.render(report), "backends")["cuda"] == "available plugin backends"


def test_a_section_that_fails_is_reported_and_the_rest_goes_on(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "meminfo", _raise(RuntimeError("meminfo exploded")))
    monkeypatch.setattr(torch.cuda, "device_count", _raise(RuntimeError("CUDA driver hung")))
    assert cli.main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "  memory" in text and "could not be probed  RuntimeError: meminfo exploded" in text
    assert "could not be probed  RuntimeError: CUDA driver hung" in text
    for title in TITLES:
        assert f"\n{title}\n" in text
    assert _rows(text, "backends")["cpu"].startswith("available")
    assert cli.main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["memory"] == {"error": "RuntimeError: meminfo exploded"}
    assert report["gpus"] == {"error": "RuntimeError: CUDA driver hung"}
    assert "error" not in report["cpu"] and "error" not in report["choices"]


def test_a_backend_quill_device_cannot_name_is_reported(monkeypatch):
    monkeypatch.setenv("QUILL_DEVICE", "tpu")
    report = doctor.collect()
    assert report["choices"]["error"].startswith("cannot choose a backend: QUILL_DEVICE names 'tpu'")
    assert report["backends"]["quill_device"] == "tpu"
    assert "could not be probed  cannot choose a backend" in doctor.render(report)


def test_doctor_loads_no_model_times_nothing_and_uses_no_network(monkeypatch):
    import socket

    from gpt_runtime import checkpoint, model, peak

    monkeypatch.setattr(model.GPT, "__init__", _raise(AssertionError("doctor built a model")))
    monkeypatch.setattr(checkpoint, "load_checkpoint", _raise(AssertionError("doctor loaded a checkpoint")))
    for name in ("timed_peak_flops", "peak_flops"):
        monkeypatch.setattr(peak, name, _raise(AssertionError(f"doctor called peak.{name}")))
    monkeypatch.setattr(socket.socket, "connect", _raise(AssertionError("doctor used the network")))
    report = doctor.collect()
    assert all("error" not in report[name] for name in SECTIONS), report


def test_a_gpu_is_shown_with_its_datasheet_peak(monkeypatch):
    from gpt_runtime import peak

    names = ["NVIDIA H200", "NVIDIA Mystery 9000"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name=names[i], total_memory=141 * 2**30, major=9, minor=0))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(doctor, "nvidia_driver_version", lambda: ("580.159.03", "NVML"))
    monkeypatch.setattr(doctor, "cuda_driver_version", lambda: "13.0")
    report = doctor.collect()["gpus"]
    assert [(g["name"], g["compute_capability"], g["memory_bytes"]) for g in report["devices"]] == \
        [(name, "9.0", 141 * 2**30) for name in names]
    assert (report["driver_version"], report["peak_dtype"]) == ("580.159.03", "bfloat16")
    text = "\n".join(" ".join(line.split()) for line in doctor.render({**doctor.collect(), "gpus": report}).splitlines())
    assert "cuda:0 NVIDIA H200, 141.0 GiB compute capability 9.0" in text
    assert "NVIDIA driver 580.159.03 from NVML" in text
    assert f"CUDA {torch.version.cuda} torch was built with it; the driver supports up to 13.0" in text
    expected = peak.datasheet_peak_flops("NVIDIA H200", torch.bfloat16)
    assert report["devices"][0]["datasheet_peak_flops"] == expected == 989.4e12
    assert "GPU datasheet peak: 989.4 TFLOP/s bfloat16 the MFU yardstick" in text
    assert "GPU datasheet peak: not in the table: MFU uses a timed product" in text


class FakeNvml:
    """Stands in for libnvidia-ml through ctypes: init's return code, and the version it writes."""

    def __init__(self, init_rc: int = 0, version: bytes = b"580.159.03") -> None:
        self.init_rc, self.version, self.shut = init_rc, version, False

    def nvmlInit_v2(self) -> int:
        return self.init_rc

    def nvmlSystemGetDriverVersion(self, buffer, length) -> int:
        buffer.value = self.version
        return 0

    def nvmlShutdown(self) -> int:
        self.shut = True
        return 0


def test_driver_version_from_nvml_then_proc_else_unknown(monkeypatch, tmp_path):
    real_cdll = doctor.ctypes.CDLL
    proc = tmp_path / "version"
    monkeypatch.setattr(doctor, "NVIDIA_PROC_VERSION", proc)
    nvml = FakeNvml()
    monkeypatch.setattr(doctor.ctypes, "CDLL", lambda name: nvml)
    assert doctor.nvidia_driver_version() == ("580.159.03", "NVML") and nvml.shut

    monkeypatch.setattr(doctor.ctypes, "CDLL", lambda name: FakeNvml(init_rc=9))  # NVML_ERROR_DRIVER_NOT_LOADED
    assert doctor.nvidia_driver_version() == (None, "unknown")
    for line, version in [
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023", "535.104.05"),
        ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.03  Release Build  (dvs-builder@U16)", "580.159.03"),
    ]:
        proc.write_text(line + "\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
        assert doctor.nvidia_driver_version() == (version, str(proc))

    monkeypatch.setattr(doctor.ctypes, "CDLL", real_cdll)  # the real loader, on a library that is not there
    monkeypatch.setattr(doctor, "NVML_LIBRARY", "libnvidia-ml-not-here.so.1")
    monkeypatch.setattr(doctor, "NVIDIA_PROC_VERSION", tmp_path / "missing")
    assert doctor.nvidia_driver_version() == (None, "unknown")


@pytest.mark.parametrize("machine, flags, level", [
    ("x86_64", {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "AMX"),
    ("x86_64", {"avx2", "avx512f", "avx512_bf16"}, "AVX512-BF16"),
    ("x86_64", {"avx2", "avx512f"}, "AVX512"),
    ("x86_64", {"sse4_2", "avx2"}, "AVX2"),
    ("x86_64", {"sse4_2"}, "baseline"),
    ("AMD64", None, "unknown"),
    ("aarch64", {"fp", "asimd"}, "NEON"),
    ("arm64", None, "NEON"),
    ("riscv64", None, "baseline"),
])
def test_isa_level(machine, flags, level):
    assert doctor.isa_level(machine, flags) == level


def test_memory_falls_back_to_sysconf_without_proc_meminfo(monkeypatch, tmp_path):
    monkeypatch.setattr(doctor, "MEMINFO", tmp_path / "missing")
    memory = doctor.probe_memory()
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        assert memory["source"] == "sysconf"
        assert memory["total_bytes"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        assert memory == {"total_bytes": None, "available_bytes": None, "source": "unknown"}


def test_the_cuda_version_the_driver_supports_comes_from_libcuda(monkeypatch):
    class FakeLibcuda:
        def cuDriverGetVersion(self, pointer) -> int:
            pointer._obj.value = 12040
            return 0

    monkeypatch.setattr(doctor.ctypes, "CDLL", lambda name: FakeLibcuda())
    assert doctor.cuda_driver_version() == "12.4"
    monkeypatch.setattr(doctor.ctypes, "CDLL", _raise(OSError("libcuda.so.1: cannot open shared object file")))
    assert doctor.cuda_driver_version() is None
