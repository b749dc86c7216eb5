"""The decoding step, written flat: one new token per row against the KV cache.

`GPT.forward` runs any number of positions: it trains, evaluates and reads the
prompt. Decoding runs one position per row, hundreds of times a second, and for
a small model most of a step is the fixed cost of each PyTorch call (3-10 us
on a CPU, a kernel launch on a GPU), not arithmetic. Two steps compute what
`GPT.forward(idx, cache=cache)` computes for one position, with less of it
(`ForwardStep` runs `forward` itself, for a model that brings its own):

- `Step` (every device): the weights are looked up once, not per token; no
  module is called (each call runs hooks' bookkeeping); float32 products go
  straight to `addmm`, skipping `F.linear`'s own dispatch.
- `GraphStep` (CUDA): the whole step is captured once in a CUDA graph and
  replayed, one launch per token instead of hundreds. A graph replays fixed
  kernels on fixed memory, so its cache is one buffer for the whole context
  window, the position is a tensor on the GPU, and attention reads the whole
  window with a mask of the positions filled so far.

`step_for(model)` gives the one the model was prepared for
(`inference.prepare_model`). The tests hold both to `GPT.forward`'s logits.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import QuillError
from .model import GPT, Block, KVCache

Fn = Callable[[torch.Tensor], torch.Tensor]


# The functions below are partials of PyTorch's own functions, not lambdas: a partial of a
# builtin is called without a Python frame, and in a decoding step of a small model those
# frames cost about what the kernels do (a 6x384 int8 step took 1.63-1.72 ms with partials,
# 1.78-1.97 ms with lambdas, on a 2-core AVX2 EPYC).

def _linear(module: nn.Module) -> Fn:
    """`module` as a function of a (rows, in) tensor."""
    if type(module) is nn.Linear:
        weight_t = module.weight.t()  # a view: no copy of the weights
        if module.bias is None:
            return partial(torch.mm, mat2=weight_t)
        return partial(torch.addmm, module.bias, mat2=weight_t)
    return getattr(module, "matvec", None) or module.forward  # a prepared layer (inference.py)


def _norm(module: nn.Module) -> Fn:
    # torch.layer_norm, not F.layer_norm: the same kernel without the Python wrapper's checks
    if isinstance(module, nn.LayerNorm):
        return partial(torch.layer_norm, normalized_shape=module.normalized_shape, weight=module.weight,
                       bias=module.bias, eps=module.eps)
    return partial(torch.rms_norm, normalized_shape=module.normalized_shape, weight=module.weight, eps=module.eps)


class _Layer:
    """One transformer block, one position per row."""

    def __init__(self, block: Block, n_head: int, cast: torch.dtype | None) -> None:
        self.cast = cast  # the cache's dtype where it differs from the activations', else None
        self.norm1, self.norm2 = _norm(block.norm1), _norm(block.norm2)
        self.qkv, self.proj = _linear(block.attn.qkv), _linear(block.attn.proj)
        n_embd = block.norm1.normalized_shape[0]
        self.one_row = (3, 1, n_head, 1, n_embd // n_head)  # queries, keys and values of one row
        self.rotary = block.attn.rotary
        if self.rotary is not None:
            # Tables that turn queries and keys and leave values as they are (v * 1 + roll(v) * 0),
            # shaped (3, 1, 1, block, head_size) to meet qkv: one turn for all three, no slicing.
            cos, sin = self.rotary.cos, self.rotary.sin
            self.cos3 = torch.stack((cos, cos, torch.ones_like(cos)))[:, None, None]
            self.sin3 = torch.stack((sin, sin, torch.zeros_like(sin)))[:, None, None]
        mlp = block.mlp
        self.up, self.down = _linear(mlp.up), _linear(mlp.down)
        self.gate = _linear(mlp.gate) if mlp.kind == "swiglu" else None
        self.activation: Fn | None = {"relu2": lambda h: F.relu(h).square(),
                                      "gelu_tanh": partial(F.gelu, approximate="tanh"),
                                      "gelu": F.gelu}.get(mlp.kind)

    def __call__(self, x: torch.Tensor, kv: torch.Tensor, pos: int) -> torch.Tensor:
        # Written out rather than split into helpers: in a small model's step a Python call
        # costs about what a kernel does. `replayable` below is the same block for a CUDA graph.
        rows = x.size(0)
        qkv = self.qkv(self.norm1(x))  # one row's (1, 3C) is laid out as (3, 1, n_head, 1, head_size) already
        qkv = qkv.view(self.one_row) if rows == 1 else qkv.view(rows, 3, *self.one_row[2:]).transpose(0, 1)
        if self.rotary is not None:
            qkv = self.rotary.turn(qkv, self.cos3.narrow(3, pos, 1), self.sin3.narrow(3, pos, 1))
        kv.narrow(3, pos, 1).copy_(qkv[1:])
        k, v = kv.narrow(3, 0, pos + 1).unbind(0)
        if self.cast is None:
            x = x + self.proj(F.scaled_dot_product_attention(qkv[0], k, v).view(rows, -1))
        else:  # a float32 cache under lower-precision activations (inference.cache_dtype)
            y = F.scaled_dot_product_attention(qkv[0].to(self.cast), k, v)
            x = x + self.proj(y.view(rows, -1).to(x.dtype))
        return self.feed_forward(x)

    def replayable(self, x: torch.Tensor, kv: torch.Tensor, pos: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """The same for one row, with the position `pos` a (1,) tensor and `seen` the mask of filled positions."""
        qkv = self.qkv(self.norm1(x)).view(self.one_row)
        if self.rotary is not None:
            qkv = self.rotary.turn(qkv, self.cos3.index_select(3, pos), self.sin3.index_select(3, pos))
        kv.index_copy_(3, pos, qkv[1:].to(kv.dtype))
        y = F.scaled_dot_product_attention(qkv[0].to(kv.dtype), kv[0], kv[1], attn_mask=seen)
        x = x + self.proj(y.view(1, -1).to(x.dtype))
        return self.feed_forward(x)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's second half: x plus its MLP of the normed x."""
        h = self.norm2(x)
        if self.gate is None:
            return x + self.down(self.activation(self.up(h)))
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class ForwardStep:
    """`step(idx, cache)`: the logits after one more token per row, float32 (rows, vocab).

    `idx` holds one token id per row, (rows,); the cache must hold the rows'
    past (from a prefill through `GPT.forward`) and gains one position. This
    one runs the model's own `forward`: the step for a GPT subclass that
    overrides it, which the flat steps would bypass.
    """

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.cache_dtype = _cache_dtype(model)

    def new_cache(self) -> KVCache:
        """An empty cache for one row, for a prefill to fill."""
        return KVCache(self.config, 1, self.device, self.cache_dtype)

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        logits, _ = self.model(idx.view(-1, 1), cache=cache)
        return logits[:, -1].float()


class Step(ForwardStep):
    """The step written flat: what `GPT.forward` computes for one position, in fewer calls."""

    def __init__(self, model: GPT) -> None:
        super().__init__(model)
        self.wte = model.wte.weight
        self.wpe = model.wpe.weight if model.wpe is not None else None
        cast = None if self.cache_dtype == model.wte.weight.dtype else self.cache_dtype
        self.layers = [_Layer(block, self.config.n_head, cast) for block in model.blocks]
        self.norm_f, self.head = _norm(model.norm_f), _linear(model.lm_head)

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        pos = cache.length
        if pos >= self.config.block_size:
            raise QuillError(f"the KV cache is full ({self.config.block_size} positions)")
        x = F.embedding(idx, self.wte)
        if self.wpe is not None:
            x = x + self.wpe[pos]
        for layer, kv in zip(self.layers, cache.kv):
            x = layer(x, kv, pos)
        cache.length = pos + 1
        return self.head(self.norm_f(x)).float()


class GraphStep(Step):
    """The decoding step of one row, captured in a CUDA graph the first time it runs.

    Its cache is a single buffer that `new_cache` hands out again each time;
    while a window still uses it, another gets an eager `Step` instead (two
    generations from one model at once stay correct, the second one slower).
    A cache whose buffer was replaced (a beam search of one beam reorders it)
    is stepped eagerly too: the graph reads and writes only the buffer it was
    captured on. The logits it returns are overwritten by the next step.
    """

    def __init__(self, model: GPT) -> None:
        super().__init__(model)
        self.static = KVCache(self.config, 1, self.device, self.cache_dtype)
        self.buffer = self.static.kv  # what the graph is captured on
        self.idx = torch.zeros(1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.positions = torch.arange(self.config.block_size, device=self.device).view(1, -1)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.capture_seconds: float | None = None
        self._owner: weakref.ref | None = None

    def claim(self, owner: object) -> bool:
        """Take the static cache for `owner` (a window); False while another live owner has it."""
        if self._owner is not None and self._owner() is not None and self._owner() is not owner:
            return False
        self._owner = weakref.ref(owner)
        return True

    def new_cache(self) -> KVCache:
        self.static.kv, self.static.length = self.buffer, 0
        return self.static

    def _replayable(self) -> torch.Tensor:
        x = F.embedding(self.idx, self.wte)
        if self.wpe is not None:
            x = x + self.wpe.index_select(0, self.pos)
        seen = self.positions <= self.pos  # (1, block): the filled positions; the rest of the window is stale
        for layer, kv in zip(self.layers, self.buffer):
            x = layer.replayable(x, kv, self.pos, seen)
        return self.head(self.norm_f(x)).float()

    def _capture(self) -> None:
        # Warm-up runs set up cuBLAS and the allocator; they compute the very step that
        # follows (same token, same position), so what they write to the cache is right.
        start = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._replayable()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._replayable()
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if cache.kv is not self.buffer or idx.numel() != 1:
            return super().__call__(idx, cache)
        pos = cache.length
        if pos >= self.config.block_size:
            raise QuillError(f"the KV cache is full ({self.config.block_size} positions)")
        self.idx.copy_(idx.view(1))
        self.pos.fill_(pos)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        cache.length = pos + 1
        return self.logits


def step_for(model: GPT, owner: object | None = None) -> ForwardStep:
    """The decoding step for `model`: its captured `GraphStep` when it was prepared for one,
    else the flat `Step` (a `ForwardStep` for a subclass with a `forward` of its own).

    `owner` (a window decoding one row; any object a weak reference can point
    to) claims the graph's cache; without an owner, or while another owns it,
    the step is eager.
    """
    if type(model).forward is not GPT.forward or "forward" in vars(model):  # a forward of its own
        return ForwardStep(model)
    graph = model.__dict__.get("_graph_step")
    if getattr(model, "decode_graph", False) and owner is not None:
        if graph is None:
            graph = model.__dict__["_graph_step"] = GraphStep(model)
        if graph.claim(owner):
            return graph
    return Step(model)


def _cache_dtype(model: GPT) -> torch.dtype:
    from .inference import cache_dtype  # inference imports the plugin registry; decode stays importable alone

    return cache_dtype(model)
