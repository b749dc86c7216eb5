"""Starting a run from another model's weights (`quill train --init-from SOURCE`).

The source is a checkpoint, a run directory or a profile (`sources.checkpoint_source`).
The new run takes the source's shape: a shape setting the user gave that differs is
refused, naming each. The data must be tokenized with the source's tokenizer, or with
an extension of it (`quill prepare --extend` adds characters after the old ids): then
the embedding and output rows grow, the new ones started at the mean of the old, so a
new character begins as an average token rather than a random one.

`source_shape` and `take_source_shape` read only the checkpoint's header (no torch),
for the command line; `start_from` loads the weights, for the training loop.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import check_tokenizer_match, load_checkpoint, read_metadata
from .config import SHAPE, TrainConfig
from .errors import QuillError
from .fileio import file_sha256
from .sources import checkpoint_source
from .tokenizer import Tokenizer, is_extension

if TYPE_CHECKING:
    import torch

    from .model import GPT


def source_shape(spec: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint `spec` names and its model config (read from its header)."""
    path = checkpoint_source(spec)
    try:
        shape = json.loads(read_metadata(path)["config"])
        missing = [name for name in SHAPE if name not in shape]
    except (KeyError, ValueError, TypeError):
        shape, missing = None, None
    if not isinstance(shape, dict) or missing:
        raise QuillError(f"checkpoint {str(path)!r} has no readable model config" + (f" (it lacks {', '.join(missing)})" if missing else ""),
                         hint="use a checkpoint written by `quill train` or `quill import`")
    return path, shape


def take_source_shape(cfg: TrainConfig, told: set[str]) -> TrainConfig:
    """`cfg` with the shape of its `init_from` source. A shape setting in `told` (given by
    a flag or the config file) that differs from the source's is an error naming each."""
    path, shape = source_shape(cfg.init_from)
    clashes = [f"{name} = {getattr(cfg, name)!r} (it has {shape[name]!r})"
               for name in SHAPE if name in told and getattr(cfg, name) != shape[name]]
    if clashes:
        flags = ", ".join("--" + c.split(" ")[0].replace("_", "-") for c in clashes)
        raise QuillError(f"--init-from {cfg.init_from} fixes the model's shape, which these settings would change: "
                         + "; ".join(clashes),
                         hint=f"leave out {flags}; dropout, learning rate, schedule, batch and the rest are free")
    return replace(cfg, **{name: shape[name] for name in SHAPE})


def start_from(cfg: TrainConfig, tokenizer: Tokenizer, device: torch.device) -> tuple[GPT, dict[str, Any]]:
    """The model a run starts from: the `init_from` source's weights with `cfg.dropout`,
    its vocabulary grown if `tokenizer` (the data's) extends the source's. Returns the
    model and what the checkpoints record of its origin (source, SHA-256, step, tokenizer)."""
    from .model import GPT  # imports torch: loaded when first used

    path = checkpoint_source(cfg.init_from)
    source = load_checkpoint(path)
    if tokenizer.fingerprint != source.tokenizer.fingerprint and not is_extension(source.tokenizer, tokenizer):
        check_tokenizer_match(source.tokenizer.fingerprint, tokenizer, f"--init-from {cfg.init_from}", f"the data in {cfg.data!r}")
    for name in SHAPE:  # take_source_shape did this for the command line; a caller of train() may not have
        if getattr(cfg, name) != getattr(source.config, name):
            raise QuillError(f"init_from {cfg.init_from}: {name} = {getattr(cfg, name)!r}, but the source has "
                             f"{getattr(source.config, name)!r}", hint="a run started from weights keeps their shape")
    weights = grown_vocabulary(source.model.state_dict(), tokenizer.vocab_size)
    model = GPT(replace(source.config, vocab_size=tokenizer.vocab_size, dropout=cfg.dropout), init=False)
    model.load_state_dict(weights)
    origin = {"source": str(path), "sha256": file_sha256(path), "step": source.step,
              "tokenizer_fingerprint": source.tokenizer.fingerprint,
              "new_tokens": tokenizer.vocab_size - source.tokenizer.vocab_size}
    return model.to(device).train(), origin


def grown_vocabulary(weights: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """A model's `weights` with rows for ids up to `vocab_size`: each new row of the
    embedding and of the output layer is the mean of that matrix's old rows; the old
    rows stay as they were. (Tied embeddings grow alike, so they stay equal.)"""
    import torch

    weights = dict(weights)
    for name in ("wte.weight", "lm_head.weight"):
        weight = weights[name]
        if weight.size(0) < vocab_size:
            extra = weight.mean(dim=0, keepdim=True).expand(vocab_size - weight.size(0), -1)
            weights[name] = torch.cat([weight, extra])
    return weights
