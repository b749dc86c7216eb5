"""Making a trained model fast to run: weight formats for the CPU, dtypes elsewhere.

Decoding one token at a time is a matrix-vector product per weight matrix, so
on a CPU its speed is how fast the weights stream through the caches. Three
weight formats are offered there, all under float32 activations, norms,
attention and KV cache (CPUs run those fastest in float32):

- float32 weights: exact, and fastest while they fit in the CPU's cache;
- bf16 weights (`Bf16Linear`): half the bytes, packed for oneDNN where the CPU
  has bf16 instructions, plain PyTorch bf16 products where it does not;
- int8 weights with one scale per output row (`Int8Linear`): a quarter of the
  bytes, through fbgemm's int8 kernels on x86, at a small cost in accuracy.

Which is fastest on a machine is measured, not guessed (calibrate.py). None of
this changes the model's code: `prepare_model` swaps `nn.Linear` layers for
equivalents and leaves everything else alone. It is the last step before
generating: a prepared model is not moved or prepared again.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import Backend
from .config import QUANTIZE
from .errors import QuillError
from .model import GPT
from .plugins import get_registry


class Bf16Linear(nn.Module):
    """bf16 weights under float32 activations, for the CPU: half the bytes per token.

    One or two rows (a decoding step) are multiplied in bf16, converted on the
    way in and out. More rows (a prompt, a batch, beams) are multiplied in
    float32 by the weights widened for the call: without oneDNN's bf16 kernels,
    PyTorch's bf16 product costs about one matrix-vector product per row (a
    200-token prompt at 6x384 took 222 ms that way, 33 ms widened, on an AVX2
    EPYC; at 8 rows widening was already 3x faster). Where oneDNN has bf16
    kernels (`bf16_packing_unavailable` is None: AVX512 or AVX-NE-CONVERT on
    x86-64) the weights are packed for it instead, and every product runs there.
    """

    FEW_ROWS = 2  # up to this many rows, PyTorch's bf16 matrix-vector product wins

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().to(torch.bfloat16)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16), False)
        self.packed = None
        if bf16_packing_unavailable() is None:  # only the packed copy is kept: an opaque oneDNN tensor
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            weight = None
        self.weight = None if weight is None else nn.Parameter(weight, requires_grad=False)
        # For decode.Step: a plain function over the tensors themselves (a module's attribute
        # lookups cost microseconds a token). A prepared layer is never moved, so they stay put.
        packed, weight, bias = self.packed, self.weight, self.bias
        if packed is not None:
            product = torch.ops.mkldnn._linear_pointwise.default._op
            self.matvec = lambda x: product(x.to(torch.bfloat16), packed, bias, "none", [], "").float()
        else:
            few, wide_bias = self.FEW_ROWS, None if bias is None else bias.float()
            self.matvec = lambda x: (F.linear(x.to(torch.bfloat16), weight, bias).float() if x.size(0) <= few
                                     else F.linear(x, weight.float(), wide_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matvec(x.reshape(-1, x.size(-1))).view(*x.shape[:-1], -1)


class Int8Linear(nn.Module):
    """int8 weights with one scale per output row, under float32 activations.

    On x86 the product is fbgemm's dynamic int8 kernel: each call quantizes its
    activations and multiplies in integers, a quarter of float32's bytes and
    fast for prompts too (at 6x384 on an AVX2 EPYC: 0.86 ms a token for the 24
    layers, 4.2 ms in float32; a 200-token prompt 17 ms, 29 ms in float32).
    Elsewhere it is `torch._weight_int8pack_mm`, which only widens the weights.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        qweight = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), False)
        self.packed = _fbgemm_pack(qweight, scale, self.bias)
        # The product of a (rows, in) tensor as one call into PyTorch's C++ (decode.Step calls
        # it directly). Through torch.ops.quantized.linear_dynamic by name, PyTorch would first
        # look through the arguments for fake script objects: 9 us a call. reduce_range: 7-bit
        # activations, which AVX2's integer products cannot overflow.
        self.matvec = None if self.packed is None else functools.partial(
            torch.ops.quantized.linear_dynamic.default._op, W_prepack=self.packed, reduce_range=True)
        # The fallback's operands; with fbgemm its packed copy is all that is kept.
        self.register_buffer("qweight", None if self.packed is not None else qweight, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        if self.packed is not None:
            y = self.matvec(rows)
        else:
            y = torch._weight_int8pack_mm(rows, self.qweight, self.scale)
            if self.bias is not None:
                y = y + self.bias
        return y.view(*x.shape[:-1], -1)


def _fbgemm_pack(qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's packed int8 weights, or None where PyTorch's x86 int8 kernels are missing."""
    if fbgemm_unavailable() is not None:
        return None
    with warnings.catch_warnings():  # quantized tensors are deprecated, and this is their last use
        warnings.simplefilter("ignore")
        engines = torch.backends.quantized.supported_engines
        if torch.backends.quantized.engine not in ("x86", "fbgemm"):  # packing follows the global engine
            torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm"
        zero = torch.zeros(qweight.size(0), dtype=torch.long)
        quantized = torch._make_per_channel_quantized_tensor(qweight, scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(quantized, bias)


@functools.cache
def fbgemm_unavailable() -> str | None:
    """Why fbgemm's int8 products cannot run here, or None when they can."""
    engines = torch.backends.quantized.supported_engines
    if not {"x86", "fbgemm"} & set(engines):
        return f"PyTorch has no x86 int8 engine here (engines: {', '.join(engines)})"
    if not hasattr(torch.ops.quantized, "linear_dynamic"):
        return f"this PyTorch ({torch.__version__}) has no dynamic int8 linear"
    return None


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


def prepare_model(model: GPT, backend: Backend, dtype: torch.dtype, quantize: str = "none", graph: bool = False) -> GPT:
    """Move `model` to the backend's device, ready to generate in `dtype` (in place).

    On the CPU the model stays float32 and only its linear layers change:
    bf16 weights for ``dtype=bfloat16`` (`Bf16Linear`), int8 weights with
    ``quantize="int8"`` (`Int8Linear`). Norms, attention and the residual stream
    stay float32, where CPUs run them fastest. Elsewhere the whole model moves to
    `dtype`. Tied input and output embeddings: the table itself is never replaced.
    With `graph` (CUDA only), decoding replays its step from a CUDA graph
    (`decode.GraphStep`); the model records it as `decode_graph`.
    """
    if quantize not in QUANTIZE or quantize == "auto":
        raise QuillError(f"unknown quantization {quantize!r}", hint="use none or int8")
    if any(isinstance(m, (Bf16Linear, Int8Linear)) for m in model.modules()):
        raise QuillError("this model is already prepared for generation", hint="prepare a freshly loaded model")
    if quantize == "int8" and (why := int8_unavailable(backend)):
        raise QuillError(f"cannot quantize to int8: {why}", hint="drop --quantize, or use --device cpu")
    if graph and backend.device.type != "cuda":
        raise QuillError(f"CUDA graphs need the cuda backend, not {backend.name}")
    if backend.device.type != "cpu":
        model = model.to(device=backend.device, dtype=dtype).eval()
        model.decode_graph = graph
        return model
    model = model.to(device=backend.device, dtype=torch.float32).eval()
    swap = Int8Linear if quantize == "int8" else Bf16Linear if dtype == torch.bfloat16 else None
    if swap is not None:
        with torch.no_grad():
            for parent in [model, *(m for block in model.blocks for m in (block.attn, block.mlp))]:
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, swap(child))
    return model


def cache_dtype(model: GPT) -> torch.dtype:
    """The KV cache dtype for a prepared model: its backend's choice (float32 on the CPU)."""
    param = next(model.parameters())
    registry = get_registry()
    if param.device.type in registry.names("backends"):
        return registry.get("backends", param.device.type).obj().cache_dtype(param.dtype)
    return param.dtype
