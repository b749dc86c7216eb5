"""A decoder-only GPT, readable in one sitting.

    tokens -> embeddings (+ learned positions) -> n_layer x Block -> norm -> logits
    Block:  x + Attention(norm(x)), then x + MLP(norm(x))    (pre-norm residuals)

Architecture choices live in `GPTConfig`: learned or rotary (RoPE) positions,
LayerNorm or RMSNorm, a GELU (exact, or GPT-2's tanh approximation), SwiGLU or
squared-ReLU MLP, tied or separate
input/output embeddings. `n_layer = 0` leaves only the embeddings and the output
head: a bigram model, the baseline that shows what attention buys.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .errors import QuillError, did_you_mean

CHOICES = {
    "position": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "gelu_tanh", "swiglu", "relu2"),
}


@dataclass
class GPTConfig:
    """The shape and architecture of a GPT. Stored in every checkpoint."""

    vocab_size: int = 256
    block_size: int = 256  # longest context, in tokens
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm layers
    position: str = "learned"
    norm: str = "layernorm"
    mlp: str = "gelu"
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise QuillError(f"model {name} {value!r} is not one of {', '.join(choices)}")
        for name in ("vocab_size", "block_size", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise QuillError(f"model {name} must be at least 1, not {getattr(self, name)}")
        if self.n_layer < 0:
            raise QuillError(f"model n_layer must be 0 or more, not {self.n_layer}")
        if self.n_embd % self.n_head:
            raise QuillError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise QuillError(f"rope needs an even head size; n_embd / n_head is {self.n_embd // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise QuillError(f"dropout must be in [0, 1), not {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        """Build a config, naming any key that is not a config field."""
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise QuillError(f"unknown model config key {key!r}", hint=did_you_mean(key, known))
        return cls(**data)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # Not nn.Dropout: even a no-op module call costs microseconds per layer per
    # generated token, a tenth of a small model's decoding time.
    return F.dropout(x, p, training=True) if training and p > 0 else x


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class Rotary(nn.Module):
    """Rotary position embedding: rotates pairs of query and key dimensions by
    an angle proportional to the position. Dimension i pairs with i + hs/2."""

    def __init__(self, head_size: int, block_size: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2).float() / head_size)
        angles = torch.outer(torch.arange(block_size).float(), inv_freq)  # (T, hs/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, hs): both halves of each pair
        # The first half of the sines is negated: turning a pair (a, b) gives
        # (a cos - b sin, b cos + a sin), and with the halves of x swapped by a roll, that is
        # x * cos + roll(x) * sin, two products and no slicing.
        sign = torch.cat((-torch.ones(head_size // 2), torch.ones(head_size // 2)))
        # Derived from the config, so not saved in checkpoints.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin() * sign, persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:  # x: (B, nh, T, hs)
        T = x.size(-2)
        return self.turn(x, self.cos[start:start + T], self.sin[start:start + T])

    @staticmethod
    def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate `x` by the angles of `cos` and `sin` (rows of the buffers of those names)."""
        return x * cos.to(x.dtype) + x.roll(x.size(-1) // 2, -1) * sin.to(x.dtype)


def _attention_kernel(device: torch.device, head_size: int):
    # On CPUs, PyTorch's flash-attention kernel trains small heads slowly: at head
    # size 32 the plain math kernel makes whole training steps 20-40% faster, while
    # at 64 flash is about 5% ahead (measured here; see the README). Same results.
    if device.type == "cpu" and head_size < 64:
        return sdpa_kernel([SDPBackend.MATH])
    return nullcontext()


class Attention(nn.Module):
    """Causal multi-head self-attention."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size) if config.position == "rope" else None

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """Attend over `x` (B, T, C); with `kv`, also over the cached past.

        `kv` is this layer's cache, (2, B, nh, block_size, hs): the keys and values
        of positions before `start` are read from it and those of `x` written to it.
        """
        B, T, C = x.shape
        hs = C // self.n_head
        qkv = self.qkv(x).view(B, T, 3, self.n_head, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        q, k, v = qkv.unbind(0)
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        mask, causal = None, T > 1
        if kv is not None:
            if self.rotary is None:
                kv[:, :, :, start:start + T] = qkv[1:]  # keys and values in one copy
            else:
                kv[0, :, :, start:start + T] = k
                kv[1, :, :, start:start + T] = v
            k, v = kv.narrow(3, 0, start + T).unbind(0)
            if q.dtype != kv.dtype:  # a float32 cache under bf16 weights (see inference.cache_dtype)
                q = q.to(kv.dtype)
            if start > 0 and T > 1:  # new queries see all the past and their own prefix
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
                causal = False
        with _attention_kernel(x.device, hs) if kv is None else nullcontext():
            # No dropout on the attention weights: it would force PyTorch's slow attention
            # path (training 40% slower here); dropping the residual branches regularizes as well.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, C)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    """Position-wise feed-forward layer: GELU, SwiGLU or squared ReLU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        if self.kind == "swiglu":
            # Two input projections; 8/3 x width keeps parameters equal to the 4x MLPs.
            hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64)
            self.gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        else:
            hidden = 4 * config.n_embd
        self.up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)
        elif self.kind == "relu2":
            h = F.relu(self.up(x)).square()
        elif self.kind == "gelu_tanh":  # GPT-2's GELU: imported GPT-2 models need it
            h = F.gelu(self.up(x), approximate="tanh")
        else:
            h = F.gelu(self.up(x))
        return dropout(self.down(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), kv, start)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """The model. `forward(idx, targets)` returns (logits, loss or None)."""

    def __init__(self, config: GPTConfig, init: bool = True) -> None:
        """`init=False` skips GPT-2's initialisation (PyTorch's default stays), for a
        model whose weights are loaded next: at GPT-2 small's size it saves a second."""
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # A bigram model (n_layer = 0) sees one token at a time: no positions.
        use_wpe = config.position == "learned" and config.n_layer > 0
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if use_wpe else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if init:
            self.apply(self._init_weights)
            # Scaled init of the projections into the residual stream (GPT-2).
            for name, p in self.named_parameters():
                if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: "KVCache | None" = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position of `idx` (B, T); with `targets`, the mean loss too.

        Targets equal to -1 are ignored in the loss (a batch with none left has loss 0,
        not NaN: chat data can mask a whole window). With a `cache`, `idx` continues
        the sequence the cache holds, the cache is extended, and only the last
        position's logits are computed (all that generation needs): (B, 1, vocab).
        """
        T = idx.size(1)
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise QuillError(f"sequence of {start + T} tokens is longer than the context window ({self.config.block_size})")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe.weight[start:start + T]
        x = dropout(x, self.config.dropout, self.training)
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, cache.kv[i], start)
            elif self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if cache is not None:
            cache.length = start + T
            x = x[:, -1:]
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            targets = targets.reshape(-1)
            total = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets, ignore_index=-1, reduction="sum")
            loss = total / (targets >= 0).sum().clamp(min=1)
        return logits, loss

    def num_params(self, exclude_positions: bool = True) -> int:
        """Parameter count; position embeddings are left out by default (as is usual)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_positions and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward and backward): 6N plus attention scores.

        The estimate from the PaLM paper's appendix, used for MFU.
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T


class KVCache:
    """The keys and values of every layer for the positions seen so far.

    Generation feeds the prompt once, then one token at a time; each step reads
    the past from here instead of recomputing it. Memory is allocated once for
    the whole context window: (n_layer, 2, batch, n_head, block_size, head_size).
    """

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> None:
        hs = config.n_embd // config.n_head
        self.kv = torch.zeros(config.n_layer, 2, batch_size, config.n_head, config.block_size, hs, device=device, dtype=dtype)
        self.length = 0  # positions filled

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows`, in that order, a row as often as it is named.

        Beam search follows its best beams; a prompt prefilled once is copied to every row.
        """
        self.kv = self.kv.index_select(2, rows)
