"""Making a trained model fast to run: dtype, packed weights, int8 weights.

Decoding one token at a time is a matrix-vector product per weight matrix, so
its speed is how fast the weights stream through the CPU. Measured on this
project's 2-core AVX512-BF16 machine (see the README), three things pay off:

- bf16 weights halve the bytes per token; PyTorch's plain bf16 matrix-vector
  kernel is slow, but oneDNN's with weights packed once ahead of time is not;
- attention over the KV cache is several times faster in float32 than in bf16
  on the CPU, so the cache stays float32 there (`cache_dtype`);
- int8 weights with one scale per output row (``quantize="int8"``, opt-in)
  halve the bytes again, at a small cost in accuracy.

None of this changes the model's code: `prepare_model` swaps `nn.Linear`
layers for equivalents and leaves everything else alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .backend import Backend
from .errors import QuillError
from .model import GPT

QUANTIZE = ("none", "int8")


class PackedLinear(nn.Module):
    """A bf16 `nn.Linear` whose weight oneDNN has laid out for fast CPU products."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight  # kept: other code may read it (and tied weights stay shared)
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one scale per output row (weight-only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.qweight = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.scale = scale.to(linear.weight.dtype)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)), self.qweight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)


def _can_pack() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def prepare_model(model: GPT, backend: Backend, dtype: torch.dtype, quantize: str = "none") -> GPT:
    """Move `model` to the backend's device in `dtype`, ready to generate (in place).

    The swapped layers keep a reference to the original weight, so tied
    input and output embeddings stay one tensor.
    """
    if quantize not in QUANTIZE:
        raise QuillError(f"unknown quantization {quantize!r}", hint=f"use one of: {', '.join(QUANTIZE)}")
    model = model.to(device=backend.device, dtype=dtype).eval()
    on_cpu = backend.device.type == "cpu"
    if quantize == "int8" and not (on_cpu and hasattr(torch, "_weight_int8pack_mm")):
        raise QuillError("int8 weights need the CPU backend and PyTorch 2.3 or newer")
    swap = None
    if quantize == "int8":
        swap = Int8Linear
    elif on_cpu and dtype == torch.bfloat16 and _can_pack():
        swap = PackedLinear
    if swap is not None:
        with torch.no_grad():
            for parent in [model, *(m for block in model.blocks for m in (block.attn, block.mlp))]:
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, swap(child))
    return model


def generation_dtype(backend: Backend, model: GPT, name: str = "auto") -> torch.dtype:
    """The dtype to generate in: `name`, or for ``auto`` the fastest for this model.

    On the CPU a model whose float32 weights fit in cache (about 1M parameters)
    decodes fastest as it is; a larger one is faster in the backend's preferred
    dtype (bf16 where the CPU has it), because fewer bytes stream per token.
    """
    from .backend import resolve_dtype

    dtype = resolve_dtype(backend, name)
    if name == "auto" and backend.device.type == "cpu" and model.num_params(exclude_positions=False) < 2_000_000:
        return torch.float32
    return dtype


def cache_dtype(model: GPT) -> torch.dtype:
    """The dtype of the KV cache: float32 on the CPU (faster attention), else the model's."""
    param = next(model.parameters())
    return torch.float32 if param.device.type == "cpu" else param.dtype
