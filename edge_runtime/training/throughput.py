"""What a training round achieved: tokens per second and GFLOP/s, to compare with the device's
measured matmul peak (``edge-runtime profile``).

FLOPs are counted where they are spent: a forward hook on every ``nn.Linear`` (bitsandbytes'
4-bit and 8-bit layers and peft's LoRA factors are ``nn.Linear`` too) adds, per call, ``2 * in *
out`` per token for the forward, as much again for the gradient of its input, and as much again
for the gradient of its weight when that weight trains. Layers a method skips (DropPEFT) are
not called, so not counted; gradient checkpointing's second forward is. Attention's score and
value products (``4 * T * d`` per token and layer, ~3% of a MiniLM block at 64 tokens) and the
embedding look-ups are left out, so the figure is a slight under-count.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class FlopCounter:
    flops: float = 0.0


@contextlib.contextmanager
def count_linear_flops(model: torch.nn.Module) -> Iterator[FlopCounter]:
    """Count the training FLOPs of ``model``'s linear layers while the block runs (see the module)."""
    counter = FlopCounter()

    def hook(module: torch.nn.Linear, inputs, output) -> None:
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor) or module.in_features == 0:
            return
        tokens = x.numel() // module.in_features
        weight = getattr(module, "weight", None)
        passes = 3 if weight is not None and weight.requires_grad else 2
        counter.flops += 2.0 * module.in_features * module.out_features * tokens * passes

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield counter
    finally:
        for h in handles:
            h.remove()


def throughput_metrics(tokens: int, padded_tokens: int, flops: float, seconds: float) -> dict[str, float]:
    """The update's throughput numbers: real (unpadded) tokens, tokens/s, the share of padding, GFLOP/s."""
    s = max(seconds, 1e-9)
    return {"train_tokens": float(tokens), "train_padded_tokens": float(padded_tokens), "train_tokens_per_s": tokens / s,
            "train_padding": 1.0 - tokens / padded_tokens if padded_tokens else 0.0,
            "train_gflops_per_s": flops / s / 1e9}
