"""Making a trained model fast to run: dtype, packed weights, int8 weights.

Decoding one token at a time is a matrix-vector product per weight matrix, so
its speed is how fast the weights stream through the CPU. Measured on this
project's 2-core AVX512-BF16 machine (see the README), three things pay off:

- bf16 weights halve the bytes per token; PyTorch's plain bf16 matrix-vector
  kernel is slow, but oneDNN's with weights packed once ahead of time is not;
- attention over the KV cache is several times faster in float32 than in bf16
  on the CPU, so the cache stays float32 there (the backend's `cache_dtype`);
- int8 weights with one scale per output row (``quantize="int8"``, opt-in)
  halve the bytes again, at a small cost in accuracy.

None of this changes the model's code: `prepare_model` swaps `nn.Linear`
layers for equivalents and leaves everything else alone. It is the last step
before generating: a prepared model is not moved or prepared again.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .backend import Backend, resolve_dtype
from .config import QUANTIZE
from .errors import QuillError
from .model import GPT
from .plugins import get_registry


class PackedLinear(nn.Module):
    """A bf16 `nn.Linear` whose weight oneDNN has laid out for fast CPU products.

    Only the packed copy is kept (an opaque oneDNN tensor that cannot be moved),
    so the weights take no more memory than before; a tied output head leaves
    the embedding table where it was.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
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
        self.register_buffer("qweight", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8), persistent=False)
        self.register_buffer("scale", scale.to(linear.weight.dtype), persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)), self.qweight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)


def bf16_packing_unavailable() -> str | None:
    """Why bf16 linear layers cannot be packed for oneDNN here, or None when they can.

    `prepare_model` packs exactly when this is None; `quill doctor` and the tests
    ask the same question here rather than checking for themselves.
    """
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch was built without oneDNN (mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return f"this PyTorch ({torch.__version__}) has no oneDNN weight packing"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN has no bf16 kernels for this CPU (they need AVX512 on x86-64, the BF16 extension on arm64)"
    return None


def int8_unavailable(backend: Backend) -> str | None:
    """Why `quantize="int8"` cannot run on `backend`, or None when it can."""
    if backend.device.type != "cpu":
        return f"int8 weights run on the CPU backend only, not {backend.name}"
    if not hasattr(torch, "_weight_int8pack_mm"):
        return f"int8 weights need PyTorch 2.3 or newer (this is {torch.__version__})"
    return None


def prepare_model(model: GPT, backend: Backend, dtype: torch.dtype, quantize: str = "none") -> GPT:
    """Move `model` to the backend's device in `dtype`, ready to generate (in place).

    On the CPU in bf16 the linear layers are packed for oneDNN; with
    ``quantize="int8"`` they hold int8 weights instead. Tied input and output
    embeddings stay tied: the embedding table itself is never replaced.
    """
    if quantize not in QUANTIZE:
        raise QuillError(f"unknown quantization {quantize!r}", hint=f"use one of: {', '.join(QUANTIZE)}")
    if any(isinstance(m, (PackedLinear, Int8Linear)) for m in model.modules()):
        raise QuillError("this model is already prepared for generation", hint="prepare a freshly loaded model")
    model = model.to(device=backend.device, dtype=dtype).eval()
    if quantize == "int8" and (why := int8_unavailable(backend)):
        raise QuillError(f"cannot quantize to int8: {why}", hint="drop --quantize, or use --device cpu")
    swap = None
    if quantize == "int8":
        swap = Int8Linear
    elif backend.device.type == "cpu" and dtype == torch.bfloat16 and bf16_packing_unavailable() is None:
        swap = PackedLinear
    if swap is not None:
        with torch.no_grad():
            for parent in [model, *(m for block in model.blocks for m in (block.attn, block.mlp))]:
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, swap(child))
    return model


def generation_dtype(backend: Backend, model: GPT, name: str = "auto", quantize: str = "none") -> torch.dtype:
    """The dtype to generate in: `name`, or for ``auto`` the backend's choice for this model.

    With int8 weights, ``auto`` is the backend's preferred dtype: the int8 kernel
    is much slower with float32 activations than with bf16 ones.
    """
    if name == "auto":
        if quantize == "int8":
            return backend.preferred_dtype()
        return backend.generation_dtype(model.num_params(exclude_positions=False))
    return resolve_dtype(backend, name)


def cache_dtype(model: GPT) -> torch.dtype:
    """The KV cache dtype for a prepared model: its backend's choice (float32 on the CPU)."""
    param = next(model.parameters())
    registry = get_registry()
    if param.device.type in registry.names("backends"):
        return registry.get("backends", param.device.type).obj().cache_dtype(param.dtype)
    return param.dtype
