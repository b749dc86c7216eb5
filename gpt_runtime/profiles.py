"""Profiles: TOML files that say which model to chat with, and how.

A profile binds one checkpoint (and, optionally, the tokenizer file it must
match), a sampler chain with its options, a backend and dtype, generation
limits, and a chat template. Paths are relative to the profile file::

    description = "Character-level Shakespeare, 0.8M parameters"
    checkpoint = "models/shakespeare-char.safetensors"
    tokenizer = "models/shakespeare-chars.json"   # optional: checked against the checkpoint

    [sampler]
    chain = "repetition_penalty,top_k,top_p,temperature"
    top_k = { k = 40 }
    temperature = { t = 0.8 }

    [backend]
    device = "auto"       # auto, cpu, cuda, mps, or a plugin's
    dtype = "auto"        # auto (measured: the fastest close to float32), float32, bfloat16
    quantize = "auto"     # auto (int8 when measured fastest), none, int8

    [generation]
    max_new_tokens = 200
    # seed = 42          # fixed seed for every reply; unset: a new one each time

    [template]
    system = ""                 # text before the first turn
    user_prefix = "ROMEO:\\n"
    user_suffix = "\\n\\n"
    model_prefix = "JULIET:\\n"
    model_suffix = "\\n\\n"
    stop = ["\\n\\n"]            # end of the model's turn

    [session]
    save = true           # save every chat with this profile as it happens (`quill sessions`)

Profiles are found in the shipped `profiles/` directory and in the user's
profile directory (`QUILL_PROFILES`, else ``$XDG_CONFIG_HOME/quill/profiles``
or the platform's usual place); a user profile hides a shipped one of the same
name. Nothing here imports torch: checking a profile reads only file headers.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import read_metadata, resolve_checkpoint_path
from .config import DTYPE_NAMES, QUANTIZE, load_toml
from .errors import QuillError, did_you_mean
from .fileio import atomic_write_bytes
from .plugins import get_registry
from .sampling import DEFAULT_CHAIN, build_chain, check_seed
from .tokenizer import load_tokenizer

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "profiles"  # QUILL_SHIPPED_PROFILES overrides it
SHIPPED_DEFAULT = "shakespeare-char"  # what `quill chat` opens when no profile is named


@dataclass
class ChatTemplate:
    """How turns are laid out for a base model, and what ends the model's turn.

    ``{user}`` and ``{model}`` in any of the texts and stop strings stand for
    `user_name` and `model_name`, which the chat can change (`/set user_name ROMEO`).
    """

    system: str = ""
    user_prefix: str = "User: "
    user_suffix: str = "\n"
    model_prefix: str = "Quill: "
    model_suffix: str = "\n"
    stop: list[str] = field(default_factory=lambda: ["\nUser:"])
    user_name: str = "User"
    model_name: str = "Quill"

    def _fill(self, text: str) -> str:
        return text.replace("{user}", self.user_name).replace("{model}", self.model_name)

    def segments(self, turns: list[tuple[str, str]], message: str | None = None,
                 system: str | None = None) -> list[tuple[str, bool]]:
        """The layout of a conversation as pieces of text, each True when it is the model's own.

        The (user, model) `turns` come first; with `message`, the prompt for the
        reply to it follows (ending with the model prefix). `system` replaces the
        template's system text (a training conversation's own system message) and
        is kept as given. Neighbouring pieces of one side are joined and empty ones
        left out, so the pieces alternate: chat data encodes each piece on its own,
        and fewer boundaries keep its tokens closer to those of the joined prompt.
        """
        user_prefix, user_suffix, model_prefix, model_suffix = (
            self._fill(text) for text in (self.user_prefix, self.user_suffix, self.model_prefix, self.model_suffix))
        pieces = [(self._fill(self.system) if system is None else system, False)]
        for user, model in turns:
            pieces += [(user_prefix + user + user_suffix + model_prefix, False), (model + model_suffix, True)]
        if message is not None:
            pieces.append((user_prefix + message + user_suffix + model_prefix, False))
        merged: list[tuple[str, bool]] = []
        for text, own in pieces:
            if merged and merged[-1][1] == own:
                merged[-1] = (merged[-1][0] + text, own)
            elif text:
                merged.append((text, own))
        return merged

    def render(self, turns: list[tuple[str, str]], message: str) -> str:
        """The prompt for the reply to `message`, after the (user, model) `turns`."""
        return "".join(text for text, _ in self.segments(turns, message))

    def stop_strings(self) -> list[str]:
        """The stop strings, names filled in."""
        return [self._fill(text) for text in self.stop]

    def uses_names(self) -> bool:
        """Whether `user_name` or `model_name` appear anywhere in the template."""
        texts = [self.system, self.user_prefix, self.user_suffix, self.model_prefix, self.model_suffix, *self.stop]
        return any("{user}" in t or "{model}" in t for t in texts)


@dataclass
class Profile:
    """A checked profile. Paths are absolute; `options` are per sampler."""

    name: str
    path: Path
    checkpoint: Path
    tokenizer_fingerprint: str
    description: str = ""
    tokenizer: Path | None = None
    chain: str = ""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "auto"
    max_new_tokens: int = 200
    seed: int | None = None
    template: ChatTemplate = field(default_factory=ChatTemplate)
    save: bool = True  # [session] save: chats are saved as they happen

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": str(self.path), "description": self.description,
            "checkpoint": str(self.checkpoint), "tokenizer": str(self.tokenizer) if self.tokenizer else None,
            "tokenizer_fingerprint": self.tokenizer_fingerprint, "sampler": {"chain": self.chain, **self.options},
            "backend": {"device": self.device, "dtype": self.dtype, "quantize": self.quantize},
            "generation": {"max_new_tokens": self.max_new_tokens, "seed": self.seed},
            "template": {key: value for key, value in vars(self.template).items()
                         if key not in ("user_name", "model_name") or self.template.uses_names()},
            "session": {"save": self.save},
        }


# key -> (type, description) for each table; "" is the top level.
SCHEMA: dict[str, dict[str, tuple[type, str]]] = {
    "": {"description": (str, "text"), "checkpoint": (str, "a path"), "tokenizer": (str, "a path")},
    "backend": {"device": (str, "a backend name"), "dtype": (str, "auto, float32 or bfloat16"),
                "quantize": (str, "auto, none or int8")},
    "generation": {"max_new_tokens": (int, "a whole number"), "seed": (int, "a whole number")},
    "template": {"system": (str, "text"), "user_prefix": (str, "text"), "user_suffix": (str, "text"),
                 "model_prefix": (str, "text"), "model_suffix": (str, "text"), "stop": (list, "a list of strings"),
                 "user_name": (str, "text"), "model_name": (str, "text")},
    "session": {"save": (bool, "true or false")},
}
TABLES = ("sampler", "backend", "generation", "template", "session")


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and check a profile file: its keys and types, its files, and their fingerprints."""
    path = Path(path).resolve()
    where = f"profile {str(path)!r}"
    try:
        data = load_toml(path)
    except QuillError as exc:
        raise QuillError(exc.message.replace("config file", "profile", 1), hint=exc.hint) from None
    _check_keys(data, where)
    top = {k: v for k, v in data.items() if k not in TABLES}
    if "checkpoint" not in top:
        raise QuillError(f"{where} has no checkpoint", hint='add a line like: checkpoint = "models/my-model.safetensors"')
    profile = Profile(name=profile_name(path), path=path, checkpoint=path.parent, tokenizer_fingerprint="",
                      description=top.get("description", ""))
    try:
        profile.checkpoint = resolve_checkpoint_path(path.parent / top["checkpoint"]).resolve()
        fingerprint = read_metadata(profile.checkpoint).get("tokenizer_fingerprint")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise QuillError(f"checkpoint {str(profile.checkpoint)!r} has no tokenizer fingerprint in its metadata",
                             hint="use a best.safetensors or last.safetensors written by `quill train`")
    except QuillError as exc:
        raise QuillError(f"{where}, key checkpoint: {exc.message}", hint=exc.hint) from None
    profile.tokenizer_fingerprint = fingerprint
    if "tokenizer" in top:
        profile.tokenizer = (path.parent / top["tokenizer"]).resolve()
        try:
            given = load_tokenizer(profile.tokenizer).fingerprint
        except QuillError as exc:
            raise QuillError(f"{where}, key tokenizer: {exc.message}", hint=exc.hint) from None
        if given != fingerprint:
            raise QuillError(
                f"{where}: tokenizer {str(profile.tokenizer)!r} has fingerprint {given}, but checkpoint "
                f"{str(profile.checkpoint)!r} was trained with tokenizer {fingerprint}",
                hint="point `tokenizer` at the tokenizer the model was trained with, or remove the key "
                     "(the checkpoint carries its own)")
    sampler = dict(data.get("sampler", {}))
    profile.chain = sampler.pop("chain", DEFAULT_CHAIN)
    if not isinstance(profile.chain, str):
        raise QuillError(f"{where}: [sampler] chain must be a string like {DEFAULT_CHAIN!r}, not {profile.chain!r}")
    samplers = get_registry().names("samplers")
    for name, options in sampler.items():
        as_table = f"write options as {name} = {{ option = value }}"
        if not isinstance(options, dict):  # a misspelled `chain`, or options not written as a table
            raise QuillError(f"{where}: [sampler] {name} = {options!r} is neither `chain` nor a sampler's options",
                             hint=as_table if name in samplers else did_you_mean(name, ["chain", *samplers]) or as_table)
        if name not in samplers:  # else build_chain would advise adding the unknown name to the chain
            raise QuillError(f"{where}: [sampler] {name}: no sampler named {name!r}",
                             hint=did_you_mean(name, samplers) or f"samplers: {', '.join(samplers)}")
    try:
        chain = build_chain(profile.chain, sampler)
    except QuillError as exc:
        raise QuillError(f"{where}, [sampler]: {exc.message}", hint=exc.hint) from None
    profile.options = chain.settings()
    backend = data.get("backend", {})
    profile.device = backend.get("device", profile.device)
    profile.dtype = backend.get("dtype", profile.dtype)
    profile.quantize = backend.get("quantize", profile.quantize)
    if profile.dtype != "auto" and profile.dtype not in DTYPE_NAMES:
        raise QuillError(f"{where}: [backend] dtype {profile.dtype!r} is not auto, float32 or bfloat16")
    if profile.quantize not in QUANTIZE:
        raise QuillError(f"{where}: [backend] quantize {profile.quantize!r} is not auto, none or int8")
    generation = data.get("generation", {})
    profile.max_new_tokens = generation.get("max_new_tokens", profile.max_new_tokens)
    profile.seed = generation.get("seed")
    if profile.max_new_tokens < 1:
        raise QuillError(f"{where}: [generation] max_new_tokens must be at least 1, not {profile.max_new_tokens}")
    if profile.seed is not None:
        check_seed(profile.seed, f"{where}: [generation] seed")
    template = data.get("template", {})
    if not all(isinstance(s, str) and s for s in template.get("stop", [])):
        raise QuillError(f"{where}: [template] stop must be a list of non-empty strings")
    for key in ("user_name", "model_name"):
        if key in template and not is_name(template[key]):
            raise QuillError(f"{where}: [template] {key} must be one line of text, not {template[key]!r}")
    profile.template = ChatTemplate(**template)
    profile.save = data.get("session", {}).get("save", True)
    return profile


def _check_keys(data: dict[str, Any], where: str) -> None:
    """Unknown keys and wrong types, each named with its table and what was expected."""
    for key, value in data.items():
        if key in TABLES:
            if not isinstance(value, dict):
                raise QuillError(f"{where}: {key} must be a table ([{key}]), not {value!r}")
            if key == "sampler":
                continue  # sampler names and options are checked by the sampler chain
            table, label = value, f"[{key}] "
            for sub, subvalue in table.items():
                _check_value(key, sub, subvalue, where, label)
        else:
            _check_value("", key, value, where, "")


def _check_value(table: str, key: str, value: Any, where: str, label: str) -> None:
    known = SCHEMA[table]
    if key not in known:
        choices = list(known) + (list(TABLES) if not table else [])
        raise QuillError(f"{where}: unknown key {label}{key}",
                         hint=did_you_mean(key, choices) or f"known keys here: {', '.join(choices)}")
    kind, expected = known[key]
    if type(value) is not kind:  # bool is not an int here
        raise QuillError(f"{where}: {label}{key} must be {expected}, not {value!r}")


def is_name(text: str) -> bool:
    return bool(text.strip()) and "\n" not in text


@dataclass
class ProfileEntry:
    """A profile found on disk: the checked profile, or why it could not be read."""

    name: str
    path: Path
    origin: str  # "shipped" or "user"
    profile: Profile | None = None
    error: QuillError | None = None


def user_profile_dir() -> Path:
    """Where the user's profiles live: QUILL_PROFILES, else the platform's config place."""
    if os.environ.get("QUILL_PROFILES"):
        return Path(os.environ["QUILL_PROFILES"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "quill" / "profiles"


def profile_name(path: Path) -> str:
    """A profile's name: NAME for NAME.toml, and for NAME/profile.toml (a profile
    that keeps its model, recipe and card in a folder of its own)."""
    return path.parent.name if path.name == "profile.toml" else path.stem


def find_profiles() -> list[ProfileEntry]:
    """Every profile, checked; a user profile hides a shipped one of the same name. Sorted by name."""
    found: dict[str, ProfileEntry] = {}
    shipped = Path(os.environ.get("QUILL_SHIPPED_PROFILES") or SHIPPED_DIR)
    for origin, directory in (("shipped", shipped), ("user", user_profile_dir())):
        if not directory.is_dir():
            continue
        for path in sorted([*directory.glob("*.toml"), *directory.glob("*/profile.toml")]):
            entry = ProfileEntry(profile_name(path), path, origin)
            try:
                entry.profile = load_profile(path)
            except QuillError as exc:
                entry.error = exc
            found[entry.name] = entry
    return [found[name] for name in sorted(found)]


def get_profile(name: str) -> Profile:
    """The profile called `name` (or at the path `name`, if it is a .toml file)."""
    if name.endswith(".toml") or os.sep in name:
        return load_profile(name)
    entries = find_profiles()
    for entry in entries:
        if entry.name == name:
            if entry.error:
                raise entry.error
            return entry.profile
    names = [e.name for e in entries]
    raise QuillError(f"no profile named {name!r}",
                     hint=did_you_mean(name, names) or (f"profiles: {', '.join(names)}" if names else
                                                        f"put profiles in {user_profile_dir()}"))


def default_profile() -> str:
    """The profile `quill chat` uses when none is named: one called `default`,
    else the shipped Shakespeare model, else the only good one."""
    entries = find_profiles()
    good = [e.name for e in entries if e.profile is not None]
    for name in ("default", SHIPPED_DEFAULT):
        if name in good:
            return name
    if len(good) == 1:
        return good[0]
    if not good:
        raise QuillError("there are no usable profiles to chat with",
                         hint=f"write one in {user_profile_dir()} (see the README's Profiles section)")
    raise QuillError("several profiles: say which with --profile NAME", hint=f"profiles: {', '.join(good)}")


def free_profile_name(name: str, exact: bool = False, flag: str = "--profile") -> str:
    """`name` made fit for a file name, and not yet a profile's (a user's or a shipped
    one): else NAME-2, NAME-3, ..., or with `exact` an error."""
    directory = user_profile_dir()
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "model"
    taken = {entry.name for entry in find_profiles()}
    name, n = base, 1
    while name in taken or (directory / f"{name}.toml").exists() or (directory / name).exists():
        if exact:
            raise QuillError(f"there is already a profile named {name!r}", hint=f"choose another name with {flag} NAME")
        n += 1
        name = f"{base}-{n}"
    return name


def _toml(value: Any) -> str:
    """A string, number or list of them as a TOML value.

    JSON's notation is TOML's for these, except that JSON writes a character
    beyond U+FFFF as a surrogate pair of escapes, which TOML refuses: so
    characters stay themselves, and only DEL, which TOML wants escaped, is.
    """
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def write_profile(name: str, checkpoint: Path, description: str, chain: str, options: dict[str, dict[str, Any]],
                  max_new_tokens: int, template: ChatTemplate) -> None:
    """Write NAME.toml for `checkpoint` in the user's profile directory (take the
    name from `free_profile_name`: a profile is never overwritten, nor a shipped one hidden)."""
    lines = [f"description = {_toml(description)}", f"checkpoint = {_toml(str(Path(checkpoint).resolve()))}",
             "", "[sampler]", f"chain = {_toml(chain)}"]
    for sampler, values in options.items():
        if values:
            lines.append(f"{sampler} = {{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in values.items()) + " }")
    lines += ["", "[generation]", f"max_new_tokens = {max_new_tokens}", "", "[template]"]
    lines += [f"{key} = {_toml(value)}" for key, value in vars(template).items()]
    directory = user_profile_dir()
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / f"{name}.toml", ("\n".join(lines) + "\n").encode("utf-8"))


def data_dir() -> Path:
    """The user's Quill data directory (not created): ``$XDG_DATA_HOME/quill`` on Linux,
    else the platform's usual place. The chat's input history and saved sessions live here."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "quill"


def history_path() -> Path:
    """The chat's input history file (in `data_dir`), its folder created."""
    path = data_dir() / "history"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
