"""Samplers and the sampler chain: how the next token is chosen.

A sampler takes the logits for the next token and returns new logits: it may
rescale them (temperature), push some down (penalties) or remove candidates by
setting them to ``-inf`` (top-k, top-p, ...). Samplers compose into an ordered
chain, written as a comma-separated string::

    repetition_penalty,top_k,top_p,min_p,temperature

After the chain, the engine draws the token from ``softmax(logits)`` with a
seeded generator, or takes the argmax when the chain ends with ``greedy``.
The ``beam`` entry is not a logits filter but a search strategy: with it in the
chain, the engine runs beam search and the other samplers shape each step's
scores.

Writing a sampler (the whole protocol)::

    from gpt_runtime.hookspecs import hookimpl
    from gpt_runtime.sampling import Option, Sampler

    class Exclude(Sampler):
        \"\"\"Never pick token `id`.\"\"\"
        name = "exclude"
        options = {"id": Option(0, "the token id to ban", low=0)}

        def apply(self, logits, state):
            logits[:, self.id] = float("-inf")
            return logits

    @hookimpl
    def quill_register_samplers(register):
        register("exclude", Exclude)

A fresh sampler object is made for every generation, with its options as
attributes, so it may keep state from one step to the next in attributes.
The plugin host checks a registered class with `check_sampler_class`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import QuillError, UsageError, did_you_mean
from .plugins import get_registry
from .registry import check_entries

if TYPE_CHECKING:
    import torch

DEFAULT_CHAIN = "top_k,top_p,temperature"


def check_seed(seed: int, what: str = "the seed", error: type[QuillError] = QuillError) -> None:
    """Refuse a seed torch's random generators cannot take (they take 0 to 2**64 - 1),
    calling it `what` in the message: the one check of every place a seed comes from."""
    if not 0 <= seed < 2**64:
        raise error(f"{what} must be from 0 to 2**64 - 1, not {seed}")
# Samplers that belong at the end of a chain, by how late: a filter placed after
# temperature changes less than intended, nothing after greedy has any effect, and
# mirostat_v2 steers the draw that follows it.
_LATE = {"temperature": 1, "mirostat_v2": 2, "greedy": 2, "beam": 2}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class Option:
    """One typed option of a sampler.

    The type is the type of `default` (int, float, bool or str). `low` and
    `high` bound numbers; with `low_open`, the value must be strictly above `low`.
    """

    default: Any
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    @property
    def type(self) -> type:
        return type(self.default)

    def describe_range(self) -> str:
        """The allowed range as text, e.g. ``0 < value <= 1`` (empty if unbounded)."""
        parts = []
        if self.low is not None:
            parts.append(f"{self.low:g} {'<' if self.low_open else '<='} ")
        parts.append("value")
        if self.high is not None:
            parts.append(f" <= {self.high:g}")
        return "".join(parts) if len(parts) > 1 else ""

    def convert(self, value: Any, where: str) -> Any:
        """Check `value` (or parse it, if it is text) against this option.

        `where` names the option in errors, e.g. ``top_p.p``.
        """
        kind = self.type
        if kind not in _TYPE_NAMES:
            raise QuillError(f"{where} has a default of unsupported type {kind.__name__} ({self.default!r})",
                             hint="an option's default must be an int, float, bool or str; its type is the option's type")
        if isinstance(value, str) and kind is not str:
            text = value.strip()
            try:
                if kind is bool:
                    if text.lower() not in _TRUE | _FALSE:
                        raise ValueError
                    value = text.lower() in _TRUE
                else:
                    value = kind(text)
            except ValueError:
                raise QuillError(f"{where} must be {_type_name(kind)}, not {value!r}") from None
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise QuillError(f"{where} must be {_type_name(kind)}, not {value!r}")
        if kind in (int, float):
            if kind is float and not math.isfinite(value):
                raise QuillError(f"{where} must be a finite number, not {value!r}")
            too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            too_high = self.high is not None and value > self.high
            if too_low or too_high:
                raise QuillError(f"{where} = {value!r} is out of range", hint=f"it needs {self.describe_range().replace('value', where)}")
        return value


_TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


def _type_name(kind: type) -> str:
    try:
        return _TYPE_NAMES[kind]
    except KeyError:
        raise QuillError(f"options cannot be of type {kind.__name__}", hint="use int, float, bool or str") from None


@dataclass
class SamplerState:
    """What a sampler may look at besides the logits.

    `tokens` is the (batch, length) context so far: the prompt, then the tokens
    generated. `prompt_length` says where the prompt ends; `step` counts the
    tokens generated before this one. Draw any randomness from `generator`, so
    that a seeded run is reproducible. `special_ids` are token ids that never
    appear as text (padding, <bos>, ...). `pieces`, indexed by id, are the bytes
    each token stands for (the tokenizer's), for samplers that look at text;
    empty where the caller has no tokenizer (as in `check_sampler`).
    """

    tokens: torch.Tensor
    prompt_length: int
    step: int
    generator: torch.Generator
    special_ids: tuple[int, ...] = ()
    pieces: Sequence[bytes] = ()

    @property
    def generated(self) -> torch.Tensor:
        """The (batch, step) tokens generated so far."""
        return self.tokens[:, self.prompt_length:]


class Sampler:
    """Base class of samplers. Subclasses set `name` and `options` and write `apply`.

    The constructor takes the options as keyword arguments, checks them and sets
    them as attributes (an option ``p`` becomes ``self.p``); unset options take
    their defaults.
    """

    name: str = ""
    options: ClassVar[dict[str, Option]] = {}

    def __init__(self, **values: Any) -> None:
        for key in values:
            if key not in self.options:
                raise QuillError(
                    f"sampler {self.name!r} has no option {key!r}",
                    hint=did_you_mean(key, self.options) or _options_hint(self),
                )
        for key, option in self.options.items():
            value = values.get(key, option.default)
            setattr(self, key, option.convert(value, f"{self.name}.{key}"))

    def apply(self, logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
        """Return the logits for choosing the next token.

        `logits` is float32 of shape (batch, vocab); ``-inf`` marks tokens an
        earlier sampler removed, and they must stay removed. Modifying `logits`
        in place and returning it is fine. Never remove every token: keep at
        least the most likely one.
        """
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The option values in use."""
        return {key: getattr(self, key) for key in self.options}


def _options_hint(cls: type[Sampler] | Sampler) -> str:
    names = ", ".join(cls.options) or "none"
    return f"its options: {names}"


def check_sampler_class(name: str, cls: Any) -> None:
    """What the registry checks of a class a plugin registers as sampler `name`.

    It must be a `Sampler` subclass with its own `apply`, whose `name` is the
    registered one and whose `options` are `Option`s with valid defaults, so
    that a mistake is reported when the plugin loads, not in the middle of a
    generation.
    """
    if not (isinstance(cls, type) and issubclass(cls, Sampler)):
        raise QuillError(f"sampler {name!r} must be a subclass of gpt_runtime.sampling.Sampler, not {cls!r}")
    fix_name = f"set name = {name!r} on {cls.__name__}"
    if not cls.name:
        raise QuillError(f"sampler {name!r} is registered with a class that has no name", hint=fix_name)
    if cls.name != name:
        raise QuillError(f"sampler {name!r} is registered with a class whose name is {cls.name!r}", hint=fix_name)
    if cls.apply is Sampler.apply:
        raise QuillError(f"sampler {name!r}: {cls.__name__} does not define apply(logits, state)")
    if not isinstance(cls.options, dict):
        raise QuillError(f"sampler {name!r}: {cls.__name__}.options must be a dict of option names to "
                         f"gpt_runtime.sampling.Option, not {type(cls.options).__name__}")
    for key, option in cls.options.items():
        if not (isinstance(key, str) and key.isidentifier()):
            raise QuillError(f"sampler {name!r}: option name {key!r} is not a valid identifier")
        if hasattr(Sampler, key):
            raise QuillError(f"sampler {name!r}: option name {key!r} would hide Sampler.{key}", hint="rename the option")
        if not isinstance(option, Option):
            raise QuillError(f"sampler {name!r}: option {key!r} must be a gpt_runtime.sampling.Option, not {option!r}",
                             hint=f"write {key!r}: Option(default, help)")
        try:
            option.convert(option.default, f"{name}.{key}")
        except QuillError as exc:
            raise QuillError(f"sampler {name!r}: the default of option {key!r} is invalid: {exc.message}", hint=exc.hint) from None


check_entries("samplers", check_sampler_class)


def keep_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Remove every token but the most likely one of each row (the first, on ties), in place."""
    best = logits.argmax(dim=-1, keepdim=True)
    kept = logits.gather(1, best)
    return logits.fill_(float("-inf")).scatter_(1, best, kept)


class Greedy(Sampler):
    """Always the most likely token. Deterministic; later samplers have no effect."""

    name = "greedy"

    def apply(self, logits, state):
        return keep_argmax(logits)


class BeamSearch(Sampler):
    """Beam search: keep the `num_beams` best-scoring continuations at every step.

    Not a filter: with ``beam`` in the chain the engine searches instead of
    sampling, and the other samplers shape each step's log-probabilities.
    A finished sequence scores ``sum(log p) / length ** length_penalty``.
    """

    name = "beam"
    options = {
        "num_beams": Option(4, "how many continuations to keep", low=1, high=64),
        "length_penalty": Option(1.0, "exponent of the length normalisation; > 0 favours longer output"),
        "early_stopping": Option(True, "stop once num_beams sequences have finished"),
    }

    def apply(self, logits, state):
        return logits


@dataclass
class ChainLink:
    """One sampler of a chain with the plugin it came from (for error messages)."""

    name: str
    sampler: Sampler
    plugin: str


@dataclass
class Chain:
    """An ordered list of samplers, built from a chain string and option settings."""

    links: list[ChainLink] = field(default_factory=list)

    @property
    def spec(self) -> str:
        """The chain as a string, e.g. ``top_k,temperature``."""
        return ",".join(link.name for link in self.links)

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (no randomness)."""
        return bool(self.links) and isinstance(self.links[-1].sampler, Greedy)

    @property
    def beam(self) -> BeamSearch | None:
        """The beam search settings, when the chain searches instead of sampling."""
        for link in self.links:
            if isinstance(link.sampler, BeamSearch):
                return link.sampler
        return None

    def settings(self) -> dict[str, dict[str, Any]]:
        """Every sampler's option values, by sampler name."""
        return {link.name: link.sampler.settings() for link in self.links}

    def apply(self, logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
        """Run the logits through every sampler in order.

        A sampler that raises or returns something unusable becomes a
        `SamplerError` naming the sampler and its plugin.
        """
        import torch

        before = logits.clone()  # samplers may work in place; kept to find the culprit on failure
        out = self._run(logits, state, check_each=False)
        # One check per step in the common case: a row's maximum is NaN if any logit is,
        # +inf if any is, and -inf if every token was removed.
        if not bool(torch.isfinite(out.amax(dim=-1)).all()):
            self._run(before, state, check_each=True)  # again, checking each sampler: raises naming it
            raise QuillError(f"the sampler chain {self.spec} left logits that are NaN, +inf or all removed, "
                             "and did not when its samplers ran again one by one", hint="a sampler is not repeatable")
        return out

    def _run(self, logits: torch.Tensor, state: SamplerState, check_each: bool) -> torch.Tensor:
        import torch

        for link in self.links:
            try:
                out = link.sampler.apply(logits, state)
            except QuillError as exc:  # a failure the sampler explains: keep its words, name the sampler
                raise SamplerError(link, f"failed: {exc.message}", hint=exc.hint) from exc
            except Exception as exc:
                raise SamplerError(link, f"raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(out, torch.Tensor) or out.shape != logits.shape or out.dtype != logits.dtype:
                got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
                raise SamplerError(link, f"returned {got} instead of {logits.dtype} logits of shape {tuple(logits.shape)}")
            if check_each and not bool(torch.isfinite(out.amax(dim=-1)).all()):
                if torch.isnan(out).any():
                    raise SamplerError(link, "returned NaN logits")
                if torch.isposinf(out).any():
                    raise SamplerError(link, "returned +inf logits")
                raise SamplerError(link, "removed every token")
            logits = out
        return logits

    def fresh(self) -> "Chain":
        """The same chain with new sampler objects (no state carried over from a past generation)."""
        return Chain([ChainLink(link.name, type(link.sampler)(**link.sampler.settings()), link.plugin) for link in self.links])


class SamplerError(QuillError):
    """A sampler failed during generation; the message names it and its plugin.

    `hint` replaces the default hint (avoid the sampler, or report it), e.g. with
    the hint of a `QuillError` the sampler raised itself.
    """

    def __init__(self, link: ChainLink, what: str, hint: str | None = None) -> None:
        super().__init__(
            f"sampler {link.name!r} (plugin {link.plugin!r}) {what}; generation stopped",
            hint=hint or f"use a chain without {link.name!r}, or report it to the plugin's author",
        )


def parse_chain(spec: str) -> list[str]:
    """Split a chain string into sampler names (checked against the registry)."""
    names = [part.strip() for part in spec.split(",")]
    if not spec.strip() or any(not n for n in names):
        raise UsageError(f"sampler chain {spec!r} is not a comma-separated list of sampler names",
                         hint=f"for example {DEFAULT_CHAIN}")
    registry = get_registry()
    for name in names:
        _entry(registry, name)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"sampler {duplicates[0]!r} appears twice in the chain {spec!r}")
    return names


def _entry(registry, name: str):
    """The registry entry of sampler `name`; an unknown name is a usage error with a suggestion."""
    try:
        return registry.get("samplers", name)
    except QuillError as exc:
        raise UsageError(exc.message, hint=exc.hint) from None


def parse_setting(text: str) -> tuple[str, str, str]:
    """Split ``name.option=value`` (or ``name=value`` for a one-option sampler)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"setting {text!r} is not name.option=value", hint="for example top_p.p=0.9 or temperature=0.7")
    name, _, option = key.strip().partition(".")
    return name, option, value.strip()


def build_chain(spec: str, settings: dict[str, dict[str, Any]] | None = None) -> Chain:
    """Make a chain from a chain string and ``{sampler: {option: value}}`` settings.

    Option values may be text (as typed by a user) or Python values. A setting
    for a sampler outside the chain is an error.
    """
    names = parse_chain(spec)
    settings = settings or {}
    for name in settings:
        if name not in names:
            raise UsageError(f"{name!r} is not in the sampler chain {','.join(names)}",
                             hint=f"add it to the chain, e.g. --sampler {','.join(_insert(names, name))}")
    registry = get_registry()
    links = []
    for name in names:
        entry = registry.get("samplers", name)
        try:
            sampler = entry.obj(**settings.get(name, {}))
        except QuillError:
            raise
        except Exception as exc:
            raise QuillError(f"sampler {name!r} (plugin {entry.plugin!r}) failed to start: {type(exc).__name__}: {exc}") from exc
        links.append(ChainLink(name, sampler, entry.plugin))
    return Chain(links)


def _insert(names: list[str], name: str) -> list[str]:
    """`names` with `name` added where it has an effect: before a trailing temperature, greedy or beam."""
    rank = _LATE.get(name, 0)
    at = len(names)
    while at > 0 and _LATE.get(names[at - 1], 0) > rank:
        at -= 1
    return [*names[:at], name, *names[at:]]


def settings_from_strings(items: list[str]) -> dict[str, dict[str, str]]:
    """Turn ``--set`` strings into settings, resolving one-option shorthands.

    ``temperature=0.7`` means ``temperature.t=0.7`` because temperature has one
    option; a sampler with several options needs the option named.
    """
    registry = get_registry()
    settings: dict[str, dict[str, str]] = {}
    for item in items:
        name, option, value = parse_setting(item)
        cls = _entry(registry, name).obj
        known = getattr(cls, "options", {})
        if not option:
            if len(known) != 1:
                raise UsageError(f"sampler {name!r} has {len(known) or 'no'} options; say which, as {name}.OPTION={value}",
                                 hint=_options_hint(cls))
            option = next(iter(known))
        settings.setdefault(name, {})[option] = value
    return settings
