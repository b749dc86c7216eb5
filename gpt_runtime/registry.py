"""What plugins register into: one table per kind of thing, filled once per process.

Plugins never see this class; they get a `register(name, obj, **meta)` callable
from their hook (see `gpt_runtime.hookspecs`). Everything else asks the registry:
``get_registry().get("tokenizers", "bpe")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import QuillError, did_you_mean

KINDS = ("tokenizers", "samplers", "backends", "commands")

# Checks handed in by the modules that own a kind's base class (sampling and
# tokenizer call `check_entries` when imported), so that the registry and the
# plugin host need to know nothing about samplers or tokenizers. A valid sampler
# or tokenizer subclasses that base class, so its module is imported, and its
# check in place, before the plugin registers it; an entry of those kinds that
# comes while no check is in place cannot be one.
_checks: dict[str, Callable[[str, Any], None]] = {}
_BASES = {"tokenizers": "gpt_runtime.tokenizer.Tokenizer", "samplers": "gpt_runtime.sampling.Sampler"}


def check_entries(kind: str, check: Callable[[str, Any], None]) -> None:
    """Run `check(name, obj)` on every `kind` entry a plugin registers; it raises `QuillError` to refuse one."""
    _checks[kind] = check


@dataclass(frozen=True)
class Entry:
    """One registered thing: its name, the object, and the plugin it came from."""

    name: str
    obj: Any
    plugin: str
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Name -> `Entry` tables for each kind in `KINDS`."""

    def __init__(self) -> None:
        self._tables: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    def stage(self, kind: str, plugin: str) -> tuple[Callable[..., None], list[Entry]]:
        """Return a `register` callable for `plugin` and the list it fills.

        Nothing reaches the tables until `commit` is called, so a plugin that fails
        halfway through its hooks leaves no partial registration behind.
        """
        staged: list[Entry] = []

        def register(name: str, obj: Any, **meta: Any) -> None:
            if not isinstance(name, str) or not name:
                raise QuillError(f"plugin {plugin!r} registered a {kind[:-1]} with an invalid name {name!r}")
            for earlier in staged:
                if earlier.name == name:
                    raise QuillError(f"plugin {plugin!r} registers the {kind[:-1]} {name!r} twice")
            staged.append(Entry(name, obj, plugin, dict(meta)))

        return register, staged

    def commit(self, staged: dict[str, list[Entry]]) -> None:
        """Add one plugin's staged entries of every kind, or none of them.

        An entry its kind's check refuses, or a name already taken, is an error.
        """
        for kind, entries in staged.items():
            check = _checks.get(kind)
            for entry in entries:
                if check is not None:
                    check(entry.name, entry.obj)
                elif kind in _BASES:
                    raise QuillError(f"{kind[:-1]} {entry.name!r} must be a subclass of {_BASES[kind]}, not {entry.obj!r}")
        for kind, entries in staged.items():
            table = self._tables[kind]
            for entry in entries:
                if entry.name in table:
                    first = table[entry.name].plugin
                    raise QuillError(
                        f"{kind[:-1]} {entry.name!r} is registered by both plugin {first!r} "
                        f"and plugin {entry.plugin!r}",
                        hint=f"uninstall one, or skip it with QUILL_DISABLE_PLUGINS={entry.plugin}",
                    )
        for kind, entries in staged.items():
            for entry in entries:
                self._tables[kind][entry.name] = entry

    def get(self, kind: str, name: str) -> Entry:
        """The entry registered as `name`, or a QuillError listing what there is."""
        table = self._tables[kind]
        if name in table:
            return table[name]
        known = ", ".join(sorted(table)) or "none"
        hint = did_you_mean(name, table) or f"registered {kind}: {known}"
        raise QuillError(f"no {kind[:-1]} named {name!r}", hint=hint)

    def names(self, kind: str) -> list[str]:
        """Registered names of one kind, sorted."""
        return sorted(self._tables[kind])

    def entries(self, kind: str) -> list[Entry]:
        """Registered entries of one kind, sorted by name."""
        return [self._tables[kind][n] for n in self.names(kind)]
