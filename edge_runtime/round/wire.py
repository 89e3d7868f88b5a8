"""An update's bytes, both ways, for the agent, the server and the simulation alike: plain safetensors
of the method's upload, or (the spec's ``compression.uplink`` / ``topk``) the compressed *delta*
from the global the device trained from, with the sender's error-feedback residual.

The server turns a compressed delta back into the state it stands for (``base + delta``), so the
norm bound, robust aggregation, DP and every method's aggregate see real values, unchanged.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from edge_runtime.algorithms.compression import (CompressionConfig,
                                                 compress_state)
from edge_runtime.protocol.codec import decode_tensors, encode_tensors
from edge_runtime.protocol.compressed import decode_delta, encode_delta
from edge_runtime.protocol.messages import ProtocolError


def uplink_compressed(cfg: CompressionConfig) -> bool:
    return cfg.uplink != "none" or cfg.topk < 1


def encode_update(upload: Mapping[str, Tensor], base: Mapping[str, Tensor], cfg: CompressionConfig,
                  residual: Mapping[str, Tensor] | None = None) -> tuple[bytes, dict[str, Tensor] | None]:
    """``upload`` (the method's trainable state after training) -> (its bytes, the new residual).

    Uncompressed: plain safetensors and no residual. Compressed: ``upload - base`` (plus
    ``residual`` when ``cfg.error_feedback``), quantized / sparsified; the residual returned is
    what that could not carry (None without error feedback). ``base`` must hold the upload's keys
    (the server refuses an update whose keys are not the global's anyway)."""
    if not uplink_compressed(cfg):
        return encode_tensors(upload), None
    missing = sorted(set(upload) - set(base))
    if missing:
        raise ValueError(f"the upload has tensors the global does not: {missing[:3]}")
    delta = {k: _minus(v, base[k]) for k, v in upload.items()}
    sent, new_residual = compress_state(delta, cfg.uplink, cfg.topk, cfg.block,
                                        residual if cfg.error_feedback else None)
    return encode_delta(sent, cfg.uplink, cfg.block), (new_residual if cfg.error_feedback else None)


def decode_update(data: bytes, base: Mapping[str, Tensor], cfg: CompressionConfig) -> dict[str, Tensor]:
    """Bytes from a device -> the state they stand for (ProtocolError when they are malformed).
    A compressed delta must name exactly ``base``'s tensors, in their shapes; the state is
    ``base + delta`` in ``base``'s dtypes."""
    if not uplink_compressed(cfg):
        return decode_tensors(data)
    delta = decode_delta(data, base, cfg.uplink, cfg.block)
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = delta[k].to(b.dtype).clone()
            continue
        v = (b.to(torch.float32) + delta[k]).to(b.dtype)
        if not bool(torch.isfinite(v).all()):
            raise ProtocolError(f"{k}: the global plus the delta is not finite")
        out[k] = v
    return out


def raw_bytes(state: Mapping[str, Tensor]) -> int:
    """The bytes ``state`` takes uncompressed (plain safetensors): what compression ratios are
    taken against."""
    return len(encode_tensors(state))


def _minus(v: Tensor, b: Tensor) -> Tensor:
    if not v.is_floating_point():
        return v.detach().clone()   # counters travel as they are
    if v.shape != b.shape:
        raise ValueError(f"an upload tensor has shape {tuple(v.shape)}, the global's {tuple(b.shape)}")
    return v.detach().to(torch.float32) - b.detach().to(torch.float32)


