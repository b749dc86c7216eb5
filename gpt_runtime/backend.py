"""Hardware backends: the protocol plugins implement, and choosing one.

A backend answers where tensors live (`device`), which dtypes it can compute in
and which it prefers, and gives the autocast context for mixed precision.
Training and generation get their device and dtype only from here.

Backend plugins are loaded with every other plugin, so nothing here imports
torch at module level: `quill tokenizer ...` never pays for it.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from .config import DTYPE_NAMES
from .errors import QuillError, did_you_mean
from .plugins import get_registry

if TYPE_CHECKING:
    import torch

AUTO_ORDER = ("cuda", "mps", "cpu")


class Backend:
    """Base class for backends; the defaults suit a CPU.

    Subclasses set `name` (what users type, e.g. ``--device cuda``) and override
    what differs. `device` is ``torch.device(name)`` unless overridden.
    """

    name: str = "cpu"

    @property
    def device(self) -> "torch.device":
        import torch

        return torch.device(self.name)

    def is_available(self) -> bool:
        return True

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run here (for ``quill doctor``), or None when it can.

        Optional: the default only says that `is_available()` is False. Override it
        to name what is missing (a driver, a device, a PyTorch build).
        """
        return None if self.is_available() else "is_available() is False on this machine"

    def supported_dtypes(self) -> tuple["torch.dtype", ...]:
        import torch

        return (torch.float32, torch.bfloat16)

    def preferred_dtype(self) -> "torch.dtype":
        """The dtype to compute in when the user does not choose."""
        import torch

        return torch.float32

    def autocast(self, dtype: "torch.dtype"):
        """A context running matrix products in `dtype` (nothing for float32)."""
        import torch

        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def generation_dtype(self, num_params: int) -> "torch.dtype":
        """The dtype to generate in with a model of `num_params` parameters.

        Asked only of backends whose device is neither a CPU nor a CUDA GPU: on those Quill times
        its candidate paths on the machine instead (calibrate.py).
        """
        return self.preferred_dtype()

    def cache_dtype(self, dtype: "torch.dtype") -> "torch.dtype":
        """The dtype of the KV cache when the weights are in `dtype`."""
        return dtype

    def memory_in_use(self) -> int | None:
        """Bytes of device memory in use, if the backend can tell."""
        return None

    def synchronize(self) -> None:
        """Wait for queued work to finish (for honest timings)."""

    def distributed_backend(self) -> str:
        """The torch.distributed backend for data-parallel training."""
        return "gloo"

    def training(self) -> contextlib.AbstractContextManager:
        """A context that `train` holds for the whole run: settings that make training
        faster here and would surprise the rest of the process (CUDA: TF32 products).
        It must undo them on leaving. The default changes nothing."""
        return contextlib.nullcontext()


def get_backend(name: str = "auto") -> Backend:
    """The backend called `name`; for ``auto``, the one `QUILL_DEVICE` names, else the
    best one available (cuda, then mps, then cpu, then any other)."""
    registry = get_registry()
    names = registry.names("backends")
    pinned = os.environ.get("QUILL_DEVICE", "").strip()
    if name == "auto" and pinned and pinned != "auto":
        if pinned not in names:
            raise QuillError(f"QUILL_DEVICE names {pinned!r}, which is no backend here",
                             hint=f"use one of: auto, {', '.join(names)}")
        name = pinned
    if name == "auto":
        for candidate in [n for n in AUTO_ORDER if n in names] + [n for n in names if n not in AUTO_ORDER]:
            backend = registry.get("backends", candidate).obj()
            if backend.is_available():
                return backend
        raise QuillError("no backend is available")
    if name not in names:
        hint = did_you_mean(name, names)
        available = f"available here: {', '.join(available_backends()) or 'none'}"
        raise QuillError(f"no backend named {name!r}", hint=f"{hint} ({available})" if hint else available)
    backend = registry.get("backends", name).obj()
    if not backend.is_available():
        source = f" (QUILL_DEVICE={pinned})" if name == pinned else ""
        raise QuillError(f"backend {name!r} is not available on this machine{source}",
                         hint=f"available: {', '.join(available_backends()) or 'none'}")
    return backend


def available_backends() -> list[str]:
    """Names of the registered backends that can run on this machine, sorted."""
    registry = get_registry()
    return [n for n in registry.names("backends") if _probes_available(registry.get("backends", n).obj)]


def _probes_available(factory) -> bool:
    # Listing what is here must not fail because one plugin's probe does (doctor names it)
    try:
        return bool(factory().is_available())
    except Exception:
        return False


def resolve_dtype(backend: Backend, name: str = "auto") -> "torch.dtype":
    """The compute dtype: the backend's preference for ``auto``, else the one named."""
    import torch

    if name == "auto":
        return backend.preferred_dtype()
    if name not in DTYPE_NAMES:
        raise QuillError(f"unknown dtype {name!r}", hint="use auto, float32, bfloat16 or float16")
    dtype = getattr(torch, DTYPE_NAMES[name])
    if dtype not in backend.supported_dtypes():
        supported = ", ".join(str(d).removeprefix("torch.") for d in backend.supported_dtypes())
        raise QuillError(f"backend {backend.name!r} does not support {name}", hint=f"it supports {supported}")
    return dtype


def cuda_matmul_precision() -> str:
    """PyTorch's setting for float32 matrix products on CUDA, to restore it later:
    `torch.backends.cuda.matmul.fp32_precision` ("ieee", "tf32", or "none": the global
    `torch.backends.fp32_precision`) where this PyTorch has it (2.9 and later), else
    `torch.get_float32_matmul_precision()` ("highest", "high" or "medium")."""
    import torch

    matmul = torch.backends.cuda.matmul
    # The two APIs must not be mixed: with the newer one set to "tf32", reading the older
    # one raises a RuntimeError in PyTorch 2.13.
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision
    return torch.get_float32_matmul_precision()


def set_cuda_matmul_precision(value: str) -> None:
    """Set what `cuda_matmul_precision` reads; "tf32" turns TF32 on under either API."""
    import torch

    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = value
    else:
        torch.set_float32_matmul_precision("high" if value == "tf32" else value)


def cuda_uses_tf32() -> bool:
    """Whether float32 matrix products on CUDA run in TF32 now."""
    import torch

    value = cuda_matmul_precision()
    if value == "none":  # the newer API's "as the global setting says"
        value = getattr(torch.backends, "fp32_precision", "ieee")
    return value in ("tf32", "high", "medium")


def dtype_name(dtype: "torch.dtype") -> str:
    return str(dtype).removeprefix("torch.")
