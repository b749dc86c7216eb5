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

from .config import TrainConfig
from .errors import QuillError
from .profiles import Profile, free_profile_name, write_profile

# Settings a fine-tune starts from (flags override them): a learning rate well below a
# from-scratch run's, so the weights move from where they are rather than start over,
# and evaluations often enough to see whether the new text is helping.
DEFAULTS = {"max_steps": 200, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 20, "eval_interval": 50, "eval_steps": 10,
            "batch_size": 8, "log_interval": 5}
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
        return "messages" in json.loads(first)
    except (ValueError, TypeError):
        return False


def prepare_inputs(inputs: list[str], profile: Profile, out: Path, val_fraction: float = 0.1,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Prepare `inputs` for `profile`'s model into `out`: as chat data if they are all
    conversations, as text if none is. Returns the data's metadata."""
    chat = [is_chat_file(path) for path in inputs]
    if any(chat) and not all(chat):
        conversations = [p for p, c in zip(inputs, chat) if c]
        raise QuillError(f"conversations ({', '.join(conversations)}) and text cannot be fine-tuned on together",
                         hint="fine-tune on one kind at a time")
    if all(chat):
        from .chat_data import prepare_chat

        return prepare_chat(inputs, profile, out, val_fraction, progress=progress)
    from .corpus_prepare import prepare_corpus
    from .sources import tokenizer_source

    return prepare_corpus(inputs, tokenizer_source(profile.checkpoint), out, val_fraction, progress)


def finetune_config(profile: Profile, out: Path, settings: dict[str, Any], told: set[str]) -> TrainConfig:
    """The run's settings: `settings` (flags, config file) over `DEFAULTS`, the data in
    out/data, the weights and shape from `profile`; a shape setting in `told` that differs is refused."""
    from .init_from import take_source_shape

    cfg = replace(TrainConfig(), **{**DEFAULTS, **settings, "init_from": str(profile.checkpoint), "out": str(out),
                                    "data": str(out / "data")})
    return take_source_shape(cfg, told)


def adopt(run_dir: str | os.PathLike, parent: Profile, name: str | None = None, chain: str | None = None,
          options: dict | None = None, max_new_tokens: int | None = None, template=None) -> str:
    """Write a profile for the finished run in `run_dir`, with `parent`'s sampler, limits and
    template unless others are given (the chat passes its own, as changed by /set); returns its name."""
    name = free_profile_name(name or Path(run_dir).resolve().name, exact=name is not None)
    write_profile(name, Path(run_dir), f"fine-tuned from profile {parent.name}", chain if chain is not None else parent.chain,
                  options if options is not None else parent.options, max_new_tokens or parent.max_new_tokens,
                  template or parent.template)
    return name

