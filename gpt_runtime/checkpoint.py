"""Checkpoints: weights in safetensors, everything needed to use them in its metadata.

A checkpoint file (``best.safetensors``, ``last.safetensors``) is enough to
generate: its metadata holds the model config, the whole tokenizer with its
fingerprint, the step, the validation loss and the training arguments. Resuming
needs more (optimizer, RNG and data position): that lives beside it in
``last.state.pt``, written with `torch.save` and read with
``torch.load(weights_only=True)``, so nothing is ever unpickled.

Every write is atomic: a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import QuillError
from .fileio import atomic_write_bytes
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_from_dict

if TYPE_CHECKING:  # torch loads only with the functions that need it: metadata is read without it
    import torch

    from .model import GPT, GPTConfig  # imports torch: loaded when first used

FORMAT = "quill-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode), its tokenizer and its metadata."""

    path: Path
    model: GPT
    tokenizer: Tokenizer
    step: int
    val_loss: float | None
    train_args: dict[str, Any]
    init_from: dict[str, Any] | None = None  # the weights a fine-tuning run started from: source, sha256, step

    @property
    def config(self) -> GPTConfig:
        return self.model.config


def _weights(model: GPT, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as wte.weight; safetensors stores it once
    return {k: v.detach().to(dtype=dtype or v.dtype).contiguous().cpu() for k, v in state.items()}


def save_checkpoint(
    path: str | os.PathLike,
    model: GPT,
    tokenizer: Tokenizer,
    step: int,
    val_loss: float | None = None,
    train_args: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    init_from: dict[str, Any] | None = None,
) -> None:
    """Write weights and metadata to `path` atomically; `dtype` (e.g. bfloat16)
    stores the weights smaller, and loading casts them back to the model's dtype.
    `init_from` records the weights a fine-tuning run started from."""
    from safetensors.torch import save

    metadata = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "config": json.dumps(model.config.to_dict()),
        "tokenizer": json.dumps(tokenizer.to_dict(), ensure_ascii=False),
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "step": str(step),
        "val_loss": "" if val_loss is None else repr(float(val_loss)),
        "train_args": json.dumps(train_args or {}),
        **({"init_from": json.dumps(init_from)} if init_from else {}),
    }
    atomic_write_bytes(path, save(_weights(model, dtype), metadata=metadata))


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory (its best checkpoint, else its last)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise QuillError(f"run directory {str(path)!r} has no checkpoint (best.safetensors or last.safetensors)")
    if not path.exists():
        raise QuillError(f"checkpoint {str(path)!r} does not exist")
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a checkpoint file, checked to be a Quill checkpoint.

    Reads only the file's JSON header (a safetensors file starts with its
    length, 8 bytes little-endian), so it is quick and needs no torch.
    """
    path = resolve_checkpoint_path(path)
    bad = QuillError(f"checkpoint {str(path)!r} is truncated or not a safetensors file",
                     hint="use a best.safetensors or last.safetensors written by `quill train`")
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            size = int.from_bytes(f.read(8), "little")
            if size > min(file_size - 8, 100_000_000):
                raise bad
            header = json.loads(f.read(size))
        # The tensors' byte ranges must lie inside the file: a cut-off copy is caught here.
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + size + end > file_size:
            raise bad
    except OSError as exc:
        raise QuillError(f"cannot read checkpoint {str(path)!r}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError):
        raise bad from None
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise QuillError(f"{str(path)!r} is a safetensors file but not a Quill checkpoint (no Quill metadata)")
    if not str(meta.get("version", "0")).isdigit():
        raise QuillError(f"checkpoint {str(path)!r} has a malformed format version {meta.get('version')!r}")
    if int(meta.get("version", "0")) > FORMAT_VERSION:
        raise QuillError(f"checkpoint {str(path)!r} has format version {meta['version']}, newer than this Quill reads ({FORMAT_VERSION})", hint="upgrade quillgpt")
    return meta


def check_tokenizer_match(expected: str, tokenizer: Tokenizer, what: str, other: str) -> None:
    """Raise a clear error if `tokenizer` is not the one with fingerprint `expected`."""
    if tokenizer.fingerprint != expected:
        raise QuillError(
            f"{what} was trained with tokenizer {expected}, but {other} is tokenizer {tokenizer.fingerprint}",
            hint="use the tokenizer the model was trained with (it is stored in the checkpoint)",
        )


def load_checkpoint(
    path: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    device: str | torch.device = "cpu",
) -> Checkpoint:
    """Load a checkpoint (file or run directory) ready to generate.

    With `tokenizer` (a file or object), it must be the tokenizer the checkpoint
    was trained with: a different fingerprint is an error naming both.
    """
    from safetensors.torch import load_file

    from .model import GPT, GPTConfig  # imports torch: loaded when first used

    path = resolve_checkpoint_path(path)
    meta = read_metadata(path)
    source = f"checkpoint {str(path)!r}"
    try:
        try:
            config = GPTConfig.from_dict(json.loads(meta["config"]))
        except QuillError as exc:  # an unknown key or an impossible value: name the file too
            raise QuillError(f"{source} has a malformed model config: {exc.message}", hint=exc.hint) from None
        tok = tokenizer_from_dict(json.loads(meta["tokenizer"]), f"the tokenizer in {source}")
        step = int(meta["step"])
        val_loss = float(meta["val_loss"]) if meta.get("val_loss") else None
        train_args = json.loads(meta.get("train_args") or "{}")
        init_from = json.loads(meta["init_from"]) if meta.get("init_from") else None
    except (KeyError, ValueError, TypeError) as exc:
        raise QuillError(f"{source} has malformed metadata ({type(exc).__name__}: {exc})") from None
    if tokenizer is not None:
        given = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        name = f"tokenizer file {str(tokenizer)!r}" if not isinstance(tokenizer, Tokenizer) else "the given tokenizer"
        check_tokenizer_match(tok.fingerprint, given, source, name)
    model = GPT(config, init=False)  # every weight is loaded next
    try:
        weights = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for bad payloads
        raise QuillError(f"{source} is corrupt: {str(exc).splitlines()[0][:160]}") from None
    if config.tie_embeddings and "wte.weight" in weights:
        weights["lm_head.weight"] = weights["wte.weight"]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise QuillError(f"{source} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    return Checkpoint(path, model, tok, step, val_loss, train_args, init_from)


def save_resume_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write resume state (tensors, numbers, strings, lists and dicts) atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_resume_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read resume state without unpickling arbitrary objects."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise QuillError(f"no resume state at {str(path)!r}", hint="--resume needs a run directory that `quill train` wrote")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle refused by weights_only, ...
        raise QuillError(f"resume state {str(path)!r} is corrupt or not Quill's ({str(exc).splitlines()[0][:160]})") from None
