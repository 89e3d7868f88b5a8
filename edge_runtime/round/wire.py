"""Updates and globals on the wire, for the agent, the server and the simulation alike.

Up: plain safetensors of the method's upload, or (``compression.uplink`` / ``topk``) the compressed
*delta* from the global the device trained from, with the device's error-feedback residual. The
server turns it back into the state it stands for (``base + delta``), so the norm bound, robust
aggregation, DP and every method's aggregate see real values, unchanged.

Down (``compression.downlink``): the new global as a compressed delta from the one devices hold,
with the server's residual. The global in force *is* ``held + decoded delta``, computed from the
bytes by the same function on the server and on every device, so all of them hold it bit for bit
(the manifest names its sha256; a device that cannot rebuild it fetches it whole).
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


def encode_update(upload: Mapping[str, Tensor], base: Mapping[str, Tensor], cfg: CompressionConfig,
                  residual: Mapping[str, Tensor] | None = None) -> tuple[bytes, dict[str, Tensor] | None]:
    """``upload`` (the method's trainable state after training) -> (its bytes, the new residual).

    Uncompressed: plain safetensors and no residual. Compressed: ``upload - base`` (plus
    ``residual`` when ``cfg.error_feedback``), quantized / sparsified; the residual returned is
    what that could not carry (None without error feedback). ``base`` must hold the upload's keys
    (the server refuses an update whose keys are not the global's anyway)."""
    if not cfg.compresses_uplink:
        return encode_tensors(upload), None
    missing = sorted(set(upload) - set(base))
    if missing:
        raise ValueError(f"the upload has tensors the global does not: {missing[:3]}")
    delta = {k: _minus(v, base[k]) for k, v in upload.items()}
    sent, new_residual = compress_state(delta, cfg.uplink, cfg.topk, cfg.block,
                                        residual if cfg.error_feedback else None, cfg.rank)
    return encode_delta(sent, cfg.uplink, cfg.block, cfg.rank), (new_residual if cfg.error_feedback else None)


def decode_update(data: bytes, base: Mapping[str, Tensor], cfg: CompressionConfig) -> dict[str, Tensor]:
    """Bytes from a device -> the state they stand for (ProtocolError when they are malformed).
    A compressed delta must name exactly ``base``'s tensors, in their shapes; the state is
    ``base + delta`` in ``base``'s dtypes."""
    if not cfg.compresses_uplink:
        return decode_tensors(data)
    return apply_delta(base, data, cfg.uplink, cfg.block, cfg.rank)


def encode_global(new: Mapping[str, Tensor], held: Mapping[str, Tensor], cfg: CompressionConfig,
                  residual: Mapping[str, Tensor] | None = None
                  ) -> tuple[bytes | None, dict[str, Tensor], dict[str, Tensor] | None]:
    """The server's aggregate ``new`` -> (the delta's bytes, the global in force, the new residual).

    The global in force is ``held + decoded delta`` (what every device rebuilds from the bytes), not
    ``new``: the difference is the residual, carried into the next round's delta when
    ``cfg.error_feedback``. No delta (None, ``new`` as it is, no residual) when the downlink is
    not compressed or the layout changed (a score round picks other tensors): devices fetch it whole."""
    if not cfg.compresses_downlink or {k: v.shape for k, v in new.items()} != {k: v.shape for k, v in held.items()}:
        return None, dict(new), None
    delta = {k: _minus(v, held[k]) for k, v in new.items()}
    if residual is not None and {k: v.shape for k, v in residual.items()} != {
            k: v.shape for k, v in delta.items() if v.is_floating_point()}:
        residual = None   # kept for another layout: start again from zero
    sent, new_residual = compress_state(delta, cfg.downlink, cfg.topk, cfg.block,
                                        residual if cfg.error_feedback else None, cfg.rank)
    data = encode_delta(sent, cfg.downlink, cfg.block, cfg.rank)
    return data, apply_delta(held, data, cfg.downlink, cfg.block, cfg.rank), (new_residual if cfg.error_feedback else None)


def apply_delta(base: Mapping[str, Tensor], data: bytes, codec: str, block: int, rank: int = 0) -> dict[str, Tensor]:
    """``base + decode(data)`` in ``base``'s dtypes (ProtocolError when the bytes are malformed or the
    sum is not finite): how the server rebuilds an update and every party the global."""
    delta = decode_delta(data, base, codec, block, rank)
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


