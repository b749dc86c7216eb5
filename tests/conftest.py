"""Shared fixtures. Tests never read ../shared: they make their own small data."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import SAMPLE_TEXT


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small plain-text corpus file."""
    path = tmp_path / "corpus.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


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
def one_torch_thread():
    """Tiny models run fastest (and steadiest on a busy 2-core machine) on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
