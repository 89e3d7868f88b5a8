"""Mixed precision: bf16 autocast where the hardware multiplies bf16 natively (``train.precision``).

``fp32`` (the default) runs as the model is stored. ``bf16`` runs the forward pass of training and
evaluation under ``torch.autocast`` with bfloat16 (matmuls in bf16, reductions and the loss in fp32;
the weights, the gradients and the optimizer state stay fp32, so updates on the wire are unchanged).
``auto`` is ``bf16`` where that is fast and ``fp32`` elsewhere: a CUDA GPU with bf16 tensor cores
(Ampere and newer, Jetson Orin), an x86 CPU with AVX512-BF16 or AMX; not a Raspberry Pi, an older
x86 or a Jetson Nano, where bf16 is emulated and slower than fp32. A server's one setting so suits a
mixed fleet: each device resolves ``auto`` for itself.
"""

from __future__ import annotations

import contextlib
import functools
from typing import ContextManager

import torch

PRECISIONS = ("fp32", "bf16", "auto")


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` ("cpu" / "cuda") computes bf16 matmuls in hardware (not emulated)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")   # private, so looked up with care
        return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)
    return False


def resolve(precision: str, device_type: str) -> str:
    """``fp32`` or ``bf16``: what ``precision`` means on ``device_type``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device_type) else "fp32"
    return precision


def model_device_type(model: torch.nn.Module) -> str:
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"


def autocast(model: torch.nn.Module, precision: str) -> ContextManager:
    """The context a forward pass of ``model`` runs in for ``precision``."""
    device_type = model_device_type(model)
    if resolve(precision, device_type) == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
