"""Shared fixtures. Tests never read ../shared: they make their own small data.

Every test runs on the CPU unless it is marked for a device: QUILL_DEVICE, which
is what `device = "auto"` resolves to (in this process and in every `quill` a
test starts), is `cpu` from the start of the session, so no fixture of any scope
and no expected text depends on which GPU the machine happens to have. A test
marked `cuda` or `mps` runs with QUILL_DEVICE set to that device, and skips,
saying why, where the device's backend is not available.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import SAMPLE_TEXT, write_chat_models


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small plain-text corpus file."""
    path = tmp_path / "corpus.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


DEVICE_MARKERS = ("cuda", "mps")


def _device_of(item) -> str:
    marked = [name for name in DEVICE_MARKERS if item.get_closest_marker(name)]
    return marked[0] if marked else "cpu"


def pytest_configure(config):
    os.environ["QUILL_DEVICE"] = "cpu"
    # Every generation runs float32, whatever this machine measures fastest: replies compared
    # across processes must come from the same path. test_calibrate.py unpins it.
    os.environ["QUILL_GENERATION_PATH"] = "float32"
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="quill-test-cache-")  # measurements stay out of ~/.cache
    # saved chats and input history stay out of ~/.local/share (helpers.quill_env passes it on)
    os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="quill-test-data-")


def pytest_unconfigure(config):
    for var in ("XDG_CACHE_HOME", "XDG_DATA_HOME"):
        path = os.environ.get(var, "")
        if path:
            shutil.rmtree(path, ignore_errors=True)


def pytest_runtest_setup(item):
    device = _device_of(item)
    if device != "cpu":
        # The backend's own is_available() decides, as it does for `quill --device`
        from gpt_runtime.plugins import get_registry

        backend = get_registry().get("backends", device).obj()
        if not backend.is_available():
            pytest.skip(f"needs {device}: {backend.unavailable_reason()}")


@pytest.fixture(autouse=True)
def _pinned_device(request, monkeypatch):
    """`auto` means the CPU, or the device the test is marked for."""
    monkeypatch.setenv("QUILL_DEVICE", _device_of(request.node))


@pytest.fixture(autouse=True)
def _no_shipped_profiles(monkeypatch, tmp_path_factory):
    """Tests see only the profiles they make; test_shipped.py looks at the shipped ones."""
    monkeypatch.setenv("QUILL_SHIPPED_PROFILES", str(tmp_path_factory.getbasetemp() / "no-shipped-profiles"))


@pytest.fixture(autouse=True)
def _fresh_plugin_host(monkeypatch):
    """Each test sees the plugin environment it sets up, not a cached one."""
    for var in ("QUILL_STRICT_PLUGINS", "QUILL_DISABLE_PLUGINS", "QUILL_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    from gpt_runtime.plugins import get_plugin_host

    get_plugin_host.cache_clear()
    yield
    get_plugin_host.cache_clear()


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory) -> dict:
    """The chat's two small models and their profile folders (helpers.write_chat_models)."""
    return write_chat_models(tmp_path_factory.mktemp("chat"))


@pytest.fixture
def chat_profiles(chat_models, monkeypatch, tmp_path) -> Path:
    """Profiles alpha and beta in a user directory of their own (finished runs are written there)."""
    folder = tmp_path / "profiles"
    folder.mkdir()
    for name in ("alpha", "beta"):
        (folder / f"{name}.toml").write_text((chat_models["two"] / f"{name}.toml").read_text().replace(
            f"../models/{name[0]}.safetensors", str(chat_models[name[0]])))
    monkeypatch.setenv("QUILL_PROFILES", str(folder))
    return folder


@pytest.fixture
def data_home(tmp_path, monkeypatch) -> Path:
    """A data directory of this test's own: its sessions database is `store.default_path()`."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest (and steadiest on a busy 2-core machine) on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
