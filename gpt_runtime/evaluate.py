"""Loss, perplexity and bits per byte of a model on a token sequence.

Bits per byte divides the total loss (in bits) by the number of UTF-8 bytes the
predicted tokens stand for, so it compares models across tokenizers: a
character-level and a BPE model on the same text are measured in the same unit.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .backend import get_backend, resolve_dtype
from .checkpoint import Checkpoint, check_tokenizer_match, load_checkpoint
from .data import DataDir, sequential_windows
from .errors import QuillError
from .fileio import read_corpus
from .model import GPT
from .tokenizer import Tokenizer


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per token, in nats
    perplexity: float
    bits_per_byte: float
    tokens: int  # the tokens the loss is over: for chat data, only the model's turns
    bytes: int
    masked: bool = False  # chat data: the loss is over the tokens its mask marks, not all

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_tokens(model: GPT, tokens: torch.Tensor, tokenizer: Tokenizer, batch_size: int = 8, autocast=None, progress=None,
                    mask: torch.Tensor | None = None) -> EvalResult:
    """Evaluate `model` on every token of `tokens` (each predicted once); with a `mask`
    (chat data), only on the tokens it marks."""
    if batch_size < 1:
        raise QuillError(f"batch size must be at least 1, not {batch_size}")
    if len(tokens) < 2:
        raise QuillError("need at least two tokens to evaluate")
    device = next(model.parameters()).device
    piece_bytes = torch.tensor([len(p) for p in tokenizer.pieces], dtype=torch.int64)
    was_training = model.training
    model.eval()
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    block = model.config.block_size
    n_batches = math.ceil(math.ceil((len(tokens) - 1) / block) / batch_size)
    try:
        for i, (x, y) in enumerate(sequential_windows(tokens, block, batch_size, mask)):
            x, y = x.to(device), y.to(device)
            with autocast or nullcontext():
                logits, _ = model(x)
            nats = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction="sum")
            counted = y >= 0
            total_nats += nats.item()
            total_tokens += int(counted.sum())
            total_bytes += int(piece_bytes[y[counted].cpu()].sum())
            if progress:
                progress(i + 1, n_batches)
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise QuillError("the mask leaves no tokens to evaluate on (no model turns in this split)")
    loss = total_nats / total_tokens
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=total_nats / math.log(2) / max(total_bytes, 1),
        tokens=total_tokens,
        bytes=total_bytes,
        masked=mask is not None,
    )


def evaluate(
    checkpoint: str | os.PathLike | Checkpoint,
    data: str | os.PathLike,
    split: str = "val",
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    progress=None,
) -> EvalResult:
    """Evaluate a checkpoint on a prepared data directory (one split) or a text file.

    A text file is tokenized with the checkpoint's own tokenizer; a data directory
    must have been prepared with that same tokenizer.
    """
    backend = get_backend(device)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, device=backend.device)
    ckpt.model.to(backend.device)
    data = Path(data)
    if data.is_dir():
        data_dir = DataDir.open(data)
        check_tokenizer_match(ckpt.tokenizer.fingerprint, data_dir.tokenizer, f"checkpoint {str(ckpt.path)!r}", f"data directory {str(data)!r}")
        if split not in ("train", "val"):
            raise QuillError(f"unknown split {split!r}", hint="use train or val")
        tokens, mask = data_dir.tokens(split), data_dir.mask(split)
    else:
        tokens, mask = torch.tensor(ckpt.tokenizer.encode(read_corpus(data)), dtype=torch.int64), None
    autocast = backend.autocast(resolve_dtype(backend, dtype))
    return evaluate_tokens(ckpt.model, tokens, ckpt.tokenizer, batch_size, autocast, progress, mask)
