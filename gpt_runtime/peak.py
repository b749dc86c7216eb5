"""The peak matrix-product rate of a device: the yardstick for MFU.

MFU (model FLOPs utilisation) is the model's FLOPs per second over what the
device could do at best. For a GPU that best is its datasheet's dense rate for
the dtype the matrix products run in (no 2:4 sparsity; float32 in TF32 while
training turns TF32 on, see `CudaBackend.training`, else without). A GPU missing from the table, and any
other device, is timed instead: a matrix product large enough to come near the
peak on a GPU (8192 square), and 1024 square on a CPU, where that is already
as fast as the cores go.
"""

from __future__ import annotations

import re
import time

import torch

from .backend import Backend, cuda_uses_tf32

# Dense TFLOP/s from NVIDIA's datasheets and architecture whitepapers:
# (pattern on torch.cuda.get_device_name(), bf16, fp16, fp32). None: no such rate.
# More specific patterns come first (an "H100 PCIe" is slower than an "H100").
GPU_TFLOPS: tuple[tuple[str, float | None, float | None, float | None], ...] = (
    (r"\bB200\b", 2250.0, 2250.0, None),
    (r"\bH(100|200) NVL\b", 835.5, 835.5, 60.0),
    (r"\bH100 PCIe\b", 756.5, 756.5, 51.2),
    (r"\bG?H(100|200)\b", 989.4, 989.4, 66.9),  # SXM, and the Grace Hopper superchip
    (r"\bA100\b", 312.0, 312.0, 19.5),
    (r"\bL40S\b", 362.1, 362.1, 91.6),
    (r"\bL40\b", 181.0, 181.0, 90.5),
    (r"\bL4\b", 121.0, 121.0, 30.3),
    (r"\bA10\b", 125.0, 125.0, 31.2),
    (r"\bRTX 4090$", 165.2, 165.2, 82.6),  # with float32 accumulation, as PyTorch runs it
    (r"\bRTX 3090$", 71.0, 71.0, 35.6),  # not the Ti, nor the laptop parts
    (r"\bV100[- ]SXM", None, 125.0, 15.7),
    (r"\bV100\b", None, 112.0, 14.0),
    (r"\bT4\b", None, 65.0, 8.1),
)
_COLUMN = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


def datasheet_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The dense FLOP/s the datasheet gives `device_name` in `dtype`, or None if unknown."""
    column = _COLUMN.get(dtype)
    if re.search(r"\bMIG\b", device_name):  # a slice of a GPU: some fraction of the whole one's rate
        return None
    for row in GPU_TFLOPS:
        if column and re.search(row[0], device_name, re.IGNORECASE):
            return row[column] * 1e12 if row[column] else None
    return None


def datasheet_tf32_flops(device_name: str) -> float | None:
    """The dense TF32 FLOP/s of `device_name`, or None where it has no TF32 (before Ampere).

    The datasheets of the Ampere, Ada and Hopper parts in the table give dense TF32 at half
    their dense bf16 rate (A100: 156 of 312 TFLOP/s; H100 SXM: 494.7 of 989.4), so the rate
    is derived from the bf16 column rather than kept in a column of its own.
    """
    bf16 = datasheet_peak_flops(device_name, torch.bfloat16)
    return bf16 / 2 if bf16 else None


def timed_peak_flops(backend: Backend, dtype: torch.dtype, n: int, seconds: float = 0.2) -> float:
    """FLOP/s of repeated n x n products on `backend` in `dtype`, timed here."""
    # A private generator: drawing from the global RNG would shift a resumed run's dropout.
    # Drawn on the CPU, where every backend's tensors can come from.
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(backend.device, dtype) for _ in range(2))
    a @ b  # warm up: the first product pays for kernel selection and handles
    backend.synchronize()
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
        if reps % 8 == 0:
            backend.synchronize()  # a GPU queues products faster than it runs them
    backend.synchronize()
    elapsed = time.perf_counter() - start
    del a, b
    if backend.device.type == "cuda":
        torch.cuda.empty_cache()  # give the training run back the memory the product held
    return 2 * n**3 * reps / elapsed


def peak_flops(backend: Backend, dtype: torch.dtype) -> tuple[float, str]:
    """The yardstick for MFU on `backend` in `dtype`, and where it comes from."""
    device = backend.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        label = str(dtype).removeprefix("torch.")
        if dtype == torch.float32 and cuda_uses_tf32() and datasheet_tf32_flops(name):
            label, peak = "tf32", datasheet_tf32_flops(name)  # the rate the products run at
        else:
            peak = datasheet_peak_flops(name, dtype)
        if peak:
            return peak, f"{name} datasheet, dense {label}"
    n = 1024 if device.type == "cpu" else 8192
    return timed_peak_flops(backend, dtype, n), f"timed {n}x{n} product"
