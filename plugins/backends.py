"""Built-in plugin `backends`: cpu, cuda and mps.

The protocol is `gpt_runtime.backend.Backend`; `auto` picks the first available
of cuda, mps, cpu. Nothing else in Quill checks `torch.cuda.is_available()`.
CUDA and MPS are kept plain. Their own tests carry the `cuda` and `mps` pytest
markers (`make test-gpu`) and skip where the device is missing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from gpt_runtime.backend import Backend, cuda_matmul_precision, set_cuda_matmul_precision
from gpt_runtime.hookspecs import hookimpl


@cache
def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices natively (AMX or AVX512-BF16)."""
    if sys.platform != "linux":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def cuda_has_bf16() -> bool:
    """True when the current CUDA GPU multiplies bf16 natively (not by emulation)."""
    import torch

    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older PyTorch without the argument
        return torch.cuda.is_bf16_supported()


class CpuBackend(Backend):
    name = "cpu"

    def preferred_dtype(self):
        import torch

        return torch.bfloat16 if cpu_has_bf16() else torch.float32

    def cache_dtype(self, dtype):
        import torch

        # Attention over the cache runs several times faster in float32 than in
        # bf16 on CPUs (PyTorch 2.13), and the cache is small next to the weights.
        return torch.float32


class CudaBackend(Backend):
    name = "cuda"

    def is_available(self) -> bool:
        import torch

        return torch.cuda.is_available()

    def unavailable_reason(self) -> str | None:
        import torch

        if self.is_available():
            return None
        if torch.version.cuda is None:
            return f"this PyTorch ({torch.__version__}) was built without CUDA"
        if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
            return f"no CUDA device is visible (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})"
        return f"no CUDA device or driver found (PyTorch built for CUDA {torch.version.cuda})"

    def supported_dtypes(self):
        import torch

        return (torch.float32, torch.bfloat16, torch.float16)

    def preferred_dtype(self):
        import torch

        # Native bf16 needs compute capability 8.0+ (older GPUs emulate it, slowly);
        # fp16 would also need a gradient scaler.
        return torch.bfloat16 if cuda_has_bf16() else torch.float32

    def memory_in_use(self) -> int | None:
        import torch

        return torch.cuda.memory_allocated()

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize()

    def distributed_backend(self) -> str:
        return "nccl"

    @contextmanager
    def training(self) -> Iterator[None]:
        # float32 products in TF32 (inputs rounded to a 10-bit mantissa, float32 sums) on
        # tensor cores: several times the float32 rate on Ampere and later GPUs, and as good
        # for training. It speeds up --dtype float32 runs; under bf16 autocast the products
        # are bf16 already. PyTorch leaves it off by default, so it is put back as it was
        # when training ends: generation later in the same process computes as before.
        saved = cuda_matmul_precision()
        set_cuda_matmul_precision("tf32")
        try:
            yield
        finally:
            set_cuda_matmul_precision(saved)


class MpsBackend(Backend):
    name = "mps"

    def is_available(self) -> bool:
        import torch

        return torch.backends.mps.is_available()

    def unavailable_reason(self) -> str | None:
        import torch

        if self.is_available():
            return None
        if sys.platform != "darwin":
            return "MPS is Apple's GPU interface, on macOS only"
        if not torch.backends.mps.is_built():
            return f"this PyTorch ({torch.__version__}) was built without MPS"
        return "no MPS device (needs macOS 12.3+ on an Apple silicon or AMD GPU Mac)"

    def memory_in_use(self) -> int | None:
        import torch

        return torch.mps.current_allocated_memory()

    def synchronize(self) -> None:
        import torch

        torch.mps.synchronize()


@hookimpl
def quill_register_backends(register) -> None:
    register("cpu", CpuBackend)
    register("cuda", CudaBackend)
    register("mps", MpsBackend)
