"""The plugin host: loads built-in and third-party plugins and fills the registry.

Built-ins (modules in the top-level `plugins` package) and third-party
distributions (entry-point group ``quill``) go through the same path. Each plugin
is loaded and asked to register on its own, so one broken plugin is reported and
skipped instead of taking Quill down:

- ``QUILL_STRICT_PLUGINS=1`` turns any plugin failure into a hard error (for
  plugin authors);
- ``QUILL_DISABLE_PLUGINS=name,...`` skips the named plugins, built-in or not.

The host is built once per process (`get_plugin_host`); nothing here runs per token.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import __version__, hookspecs
from .errors import QuillError, QuillWarning, did_you_mean, env_flag
from .registry import KINDS, Registry

# Built-in plugins: (plugin name, module). Registered exactly like third-party ones.
BUILTINS: tuple[tuple[str, str], ...] = (
    ("char", "plugins.char_tokenizer"),
    ("bpe", "plugins.bpe_tokenizer"),
    ("backends", "plugins.backends"),
    ("samplers", "plugins.samplers"),
    ("commands", "plugins.commands"),
)

HOOK_NAMES = tuple(f"quill_register_{kind}" for kind in KINDS)


@dataclass
class PluginInfo:
    """What `quill plugins` shows about one plugin."""

    name: str
    version: str
    origin: str  # "built-in" or "distribution <dist name>"
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    disabled: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "origin": self.origin,
            "registered": self.registered,
            "error": self.error,
            "disabled": self.disabled,
        }


class PluginHost:
    """A pluggy manager plus the registry it filled and a report on every plugin."""

    def __init__(self, strict: bool = False, disabled: frozenset[str] = frozenset()) -> None:
        self.strict = strict
        self.disabled = disabled
        self.pm = pluggy.PluginManager("quill")
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.plugins: list[PluginInfo] = []

    def load_all(self) -> None:
        """Load the built-ins, then every entry point of the ``quill`` group."""
        for name, module in BUILTINS:
            info = PluginInfo(name, __version__, "built-in")
            self._add(info, lambda module=module: importlib.import_module(module))
        for ep in sorted(metadata.entry_points(group="quill"), key=lambda e: e.name):
            dist = ep.dist
            info = PluginInfo(
                ep.name,
                dist.version if dist else "unknown",
                f"distribution {dist.metadata['Name']}" if dist else f"entry point {ep.value}",
            )
            self._add(info, ep.load)

    def _add(self, info: PluginInfo, load) -> None:
        self.plugins.append(info)
        if info.name in self.disabled:
            info.disabled = True
            return
        try:
            plugin = load()
            self._register(info, plugin)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a plugin may fail in any way, even sys.exit(); report it, keep going
            info.error = _describe(exc)
            info.registered = {}
            if self.strict:
                raise QuillError(
                    f"plugin {info.name!r} ({info.origin}) failed: {info.error}",
                    hint="unset QUILL_STRICT_PLUGINS to skip broken plugins",
                ) from exc
            warnings.warn(
                f"plugin {info.name!r} skipped: {info.error} (see `quill plugins`)",
                QuillWarning,
                stacklevel=2,
            )

    def _register(self, info: PluginInfo, plugin: object) -> None:
        if self.pm.has_plugin(info.name):
            first = next(p for p in self.plugins if p.name == info.name and p is not info)
            raise QuillError(f"the plugin name {info.name!r} is taken by {first.origin}", hint="rename the entry point")
        try:
            self.pm.register(plugin, name=info.name)
            self._check_hook_names(plugin)
            staged_by_kind = {}
            for kind, hook_name in zip(KINDS, HOOK_NAMES):
                register, staged = self.registry.stage(kind, info.name)
                for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                    if impl.plugin_name == info.name:
                        impl.function(**({"register": register} if "register" in impl.argnames else {}))
                staged_by_kind[kind] = staged
            self.registry.commit(staged_by_kind)
        except BaseException:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            raise
        info.registered = {k: [e.name for e in v] for k, v in staged_by_kind.items() if v}

    def _check_hook_names(self, plugin: object) -> None:
        """A misspelled or undecorated hook would silently never run: make it an error."""
        undecorated = [
            name for name in HOOK_NAMES
            if callable(getattr(plugin, name, None)) and self.pm.parse_hookimpl_opts(plugin, name) is None
        ]
        if undecorated:
            raise QuillError(f"{undecorated[0]} is not decorated with @hookimpl (from gpt_runtime.hookspecs), so it would never run")
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError:
            unknown = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or () if not caller.has_spec())
            hint = did_you_mean(unknown[0], HOOK_NAMES) if unknown else None
            raise QuillError(
                f"implements unknown hook {', '.join(unknown) or '?'}"
                + (f"; {hint}" if hint else "")
            ) from None

    def get(self, name: str) -> PluginInfo:
        for info in self.plugins:
            if info.name == name:
                return info
        raise QuillError(f"no plugin named {name!r}", hint=did_you_mean(name, [p.name for p in self.plugins]))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, QuillError):
        return str(exc)
    # One line for `quill plugins`, keeping every line of the message (pluggy puts
    # the reason for a bad hook signature on its second line).
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@functools.lru_cache(maxsize=None)
def get_plugin_host() -> PluginHost:
    """The process-wide plugin host, loaded on first use and cached."""
    disabled = frozenset(n.strip() for n in os.environ.get("QUILL_DISABLE_PLUGINS", "").split(",") if n.strip())
    host = PluginHost(strict=env_flag("QUILL_STRICT_PLUGINS"), disabled=disabled)
    host.load_all()
    names = [p.name for p in host.plugins]
    for name in sorted(disabled - set(names)):
        hint = did_you_mean(name, names)
        warnings.warn(f"QUILL_DISABLE_PLUGINS names {name!r}, which is no plugin here" + (f"; {hint}" if hint else ""), QuillWarning, stacklevel=2)
    return host


def get_registry() -> Registry:
    """The process-wide registry of tokenizers, samplers, backends and commands."""
    return get_plugin_host().registry
