"""Text generation: sample tokens one at a time and stream them as text.

This first engine recomputes the whole (cropped) context for every token; the
sampler chain and KV cache come with the generation engine proper.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import torch

from .errors import QuillError
from .model import GPT
from .tokenizer import Tokenizer


@torch.no_grad()
def sample_tokens(
    model: GPT,
    tokenizer: Tokenizer,
    ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    autocast=None,
) -> Iterator[int]:
    """Yield new token ids one by one after the prompt `ids`, until <eos>.

    `temperature` 0 is greedy. The context is cropped to the model's block size.
    """
    if temperature < 0:
        raise QuillError(f"temperature must be 0 or more, not {temperature}")
    if top_k is not None and top_k < 1:
        raise QuillError(f"top-k must be at least 1, not {top_k}")
    device = next(model.parameters()).device
    model.eval()
    # Padding and markers are never text to produce; <eos> ends the sample.
    banned = [i for name, i in tokenizer.special_tokens.items() if name in ("<pad>", "<bos>", "<unk>")]
    eos = tokenizer.special_tokens.get("<eos>")
    context = torch.tensor([ids], dtype=torch.int64, device=device)
    block = model.config.block_size
    for _ in range(max_new_tokens):
        if autocast is None:
            logits, _ = model(context[:, -block:])
        else:
            with autocast:
                logits, _ = model(context[:, -block:])
        logits = logits[0, -1].float()
        logits[banned] = float("-inf")
        if temperature == 0:
            next_id = int(torch.argmax(logits))
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            next_id = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        if next_id == eos:
            return
        yield next_id
        context = torch.cat([context, torch.tensor([[next_id]], device=device)], dim=1)


def stream_text(tokenizer: Tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Turn ids into text as it becomes complete (a character may span tokens)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token_id in ids:
        text = decoder.decode(tokenizer.pieces[token_id])
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Encode a prompt; an empty prompt starts from <bos> (or <eos>, or id 0)."""
    ids = tokenizer.encode(prompt)
    if ids:
        return ids
    for name in ("<bos>", "<eos>"):
        if name in tokenizer.special_tokens:
            return [tokenizer.special_tokens[name]]
    return [0]
