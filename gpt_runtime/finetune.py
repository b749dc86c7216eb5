"""Fine-tuning a profile's model in one go (`quill finetune`, `/finetune` in the chat).

Three steps, each the same as its own command: the inputs are prepared for the
profile's model in RUN/data (conversations as masked chat data, `quill prepare
--chat`; anything else as text, `quill prepare`), a run starts from the profile's
weights (`quill train --init-from`) with settings fit for fine-tuning, and the
finished run is written as a profile with the parent's sampler and chat template,
ready for `quill chat --profile NAME`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import FINETUNE_DEFAULTS, TrainConfig
from .errors import QuillError
from .profiles import Profile, find_profiles, free_profile_name, write_profile

CHAT_SUFFIXES = (".json", ".jsonl")


def is_chat_file(path: str | os.PathLike) -> bool:
    """Whether `path` holds conversations: a /save transcript (.json), or JSON Lines whose
    first record has "messages". Other files (and directories) are text."""
    path = Path(path)
    if not path.is_file() or path.suffix not in CHAT_SUFFIXES:
        return False
    with open(path, "rb") as f:
        if path.suffix == ".json":
            return b'"quill-transcript"' in f.read(4096)
        first = next((line for line in f if line.strip()), b"")
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and "messages" in record


def input_kind(inputs: list[str]) -> str:
    """"chat" if every input holds conversations, "text" if none does; both is an error."""
    chat = [is_chat_file(path) for path in inputs]
    if any(chat) and not all(chat):
        conversations = [p for p, c in zip(inputs, chat) if c]
        raise QuillError(f"conversations ({', '.join(conversations)}) and text cannot be fine-tuned on together",
                         hint="fine-tune on one kind at a time")
    return "chat" if chat and all(chat) else "text"


def prepare_inputs(inputs: list[str], profile: Profile, out: Path, val_fraction: float = 0.1,
                   progress: Callable[[int, int], None] | None = None, extend: bool = False, skip_bad: bool = False) -> dict:
    """Prepare `inputs` for `profile`'s model into `out` (as chat data or text, by `input_kind`;
    `extend` and `skip_bad` as `quill prepare`'s flags). Returns the data's metadata."""
    if input_kind(inputs) == "chat":
        from .chat_data import prepare_chat

        if extend:
            raise QuillError("--extend is for text: conversations are encoded with the profile's tokenizer as it is")
        return prepare_chat(inputs, profile, out, val_fraction, skip_bad, progress)
    from .corpus_prepare import Options, prepare_corpus
    from .sources import tokenizer_source

    return prepare_corpus(inputs, tokenizer_source(profile.checkpoint), out, val_fraction, progress,
                          Options(skip_bad=skip_bad), extend=extend)


def finetune_config(profile: Profile, out: Path, file: dict[str, Any], flags: dict[str, Any], source: str) -> TrainConfig:
    """The run's settings: `flags` over the config `file` (read from `source`) over `FINETUNE_DEFAULTS`,
    the data in out/data, the weights and shape from `profile`; a shape setting given that
    differs from the model's is refused."""
    from .init_from import take_source_shape

    fixed = sorted({"data", "out", "init_from"} & set(file))
    if fixed:
        raise QuillError(f"{source}: {', '.join(fixed)} cannot be set for a fine-tune",
                         hint="quill finetune sets them: the data in RUN/data, the weights from the profile")
    cfg = replace(TrainConfig.from_dict({**FINETUNE_DEFAULTS, **file}, source), **flags)
    cfg = replace(cfg, init_from=str(profile.checkpoint), out=str(out), data=str(out / "data"))
    return take_source_shape(cfg, set(file) | set(flags))


def adopt(run_dir: str | os.PathLike, parent: Profile, name: str | None = None, settings: Profile | None = None,
          description: str | None = None) -> str:
    """The profile for the finished run in `run_dir` (its name): one that already names this
    run (a resumed run), else a new one with the sampler, limits and template of `settings`
    (default `parent`; the chat passes its own, as changed by /set)."""
    existing = profile_of_run(run_dir)
    if existing is not None and name in (None, existing):
        return existing
    name = free_profile_name(name or Path(run_dir).resolve().name, exact=name is not None, flag="--name")
    settings = settings or parent
    write_profile(name, Path(run_dir), description or f"fine-tuned from profile {parent.name}", settings.chain, settings.options,
                  settings.max_new_tokens, settings.template)
    return name


def profile_of_run(run_dir: str | os.PathLike) -> str | None:
    """The name of a user profile whose checkpoint is in `run_dir`, if there is one."""
    run = Path(run_dir).resolve()
    return next((entry.name for entry in find_profiles() if entry.origin == "user" and entry.profile is not None
                 and entry.profile.checkpoint.parent == run), None)
