"""Tiny untrained GPTs and whole generations on them (test_generate, and test_devices on a GPU)."""

from __future__ import annotations

import queue
import threading

import torch

from gpt_runtime.generate import Done, Token, generate
from gpt_runtime.model import GPT, GPTConfig
from gpt_runtime.sampling import build_chain

BLOCK = 32
BANNED = ("<pad>", "<unk>", "<bos>")
ARCHITECTURES = [("learned", "layernorm"), ("learned", "rmsnorm"), ("rope", "layernorm"), ("rope", "rmsnorm")]


def tiny_gpt(vocab_size: int, seed: int = 0, **overrides) -> GPT:
    """A small untrained GPT with weights large enough that its greedy text varies."""
    settings = dict(vocab_size=vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**settings)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model


def run(model, tokenizer, prompt, **options) -> tuple[list[Token], Done]:
    """All events of one generation: (tokens, done), checking their shape on the way."""
    *tokens, done = list(generate(model, tokenizer, prompt, **options))
    assert isinstance(done, Done) and all(isinstance(t, Token) for t in tokens)
    assert done.new_tokens == len(tokens)
    return tokens, done


def ids_of(tokens: list[Token]) -> list[int]:
    return [t.id for t in tokens]


def greedy_without_eos(tokenizer) -> object:
    return build_chain("logit_bias,greedy", {"logit_bias": {"bias": f"{tokenizer.special_tokens['<eos>']}:-inf"}})


def cancelled_after(model, tok, k: int) -> list:
    """The events of a generation on another thread that this one cancels on receiving the k-th."""
    cancel = threading.Event()
    events: queue.Queue = queue.Queue()

    def produce():  # generation on its own thread; each event waits until the consumer has it
        for event in generate(model, tok, "First", chain=greedy_without_eos(tok), max_new_tokens=100, cancel=cancel):
            events.put(event)
            events.join()

    producer = threading.Thread(target=produce)
    producer.start()
    received = []
    while not received or not isinstance(received[-1], Done):
        received.append(events.get(timeout=30))
        if len(received) == k:
            cancel.set()
        events.task_done()
    producer.join(timeout=30)
    return received
