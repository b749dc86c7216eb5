"""Where a model or a tokenizer comes from, as the user names it on a command line.

`--init-from` and `--tokenizer` take any of: a checkpoint file, a run directory
(its best checkpoint), or a profile's name (shipped, the user's, or one that
`quill import` wrote); `--tokenizer` also takes a tokenizer file. Nothing here
imports torch: a tokenizer is read from the checkpoint's header alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import read_metadata, resolve_checkpoint_path
from .errors import QuillError
from .profiles import find_profiles, get_profile
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_from_dict


def checkpoint_source(spec: str | os.PathLike) -> Path:
    """The checkpoint file that `spec` names: a checkpoint, a run directory or a profile
    (its name, or its .toml file)."""
    path = Path(spec)
    if path.is_dir() and (path / "profile.toml").is_file() and not (path / "config.json").is_file():
        path = path / "profile.toml"  # a profile kept in a folder of its own, not a run directory
    if path.is_file() and path.suffix == ".toml":
        return get_profile(str(path)).checkpoint
    if path.exists():
        return resolve_checkpoint_path(path)
    text = str(spec)
    if os.sep in text or "/" in text or path.suffix in (".safetensors", ".toml"):
        raise QuillError(f"{text!r} does not exist", hint="name a checkpoint file, a run directory or a profile")
    names = [entry.name for entry in find_profiles()]
    if text not in names:
        raise QuillError(f"{text!r} is neither a file, a run directory nor a profile",
                         hint=f"profiles: {', '.join(names)}" if names else "name a checkpoint file or a run directory")
    return get_profile(text).checkpoint


def tokenizer_source(spec: str | os.PathLike) -> Tokenizer:
    """The tokenizer that `spec` names: a tokenizer file, or the one stored in a
    checkpoint, a run directory's checkpoint or a profile's checkpoint."""
    path = Path(spec)
    # Quill's checkpoints end in .safetensors and profiles in .toml: any other file is a tokenizer
    # file, and a missing .json is reported as a tokenizer file, not as an unknown profile.
    if path.suffix not in (".safetensors", ".toml") and (path.is_file() or (path.suffix == ".json" and not path.is_dir())):
        return load_tokenizer(path)
    checkpoint = checkpoint_source(spec)
    meta = read_metadata(checkpoint)
    try:
        data = json.loads(meta["tokenizer"])
    except (KeyError, ValueError):
        raise QuillError(f"checkpoint {str(checkpoint)!r} has no readable tokenizer in its metadata") from None
    return tokenizer_from_dict(data, f"the tokenizer in checkpoint {str(checkpoint)!r}")

