"""Lossy compression of update deltas: blockwise quantization, top-k sparsification, error feedback.

Pure functions over flat float32 tensors; no I/O. ``edge_runtime.protocol.compressed`` puts the
result on the wire (safetensors + a header) and validates what comes back.

- ``fp16``: each value rounded to half precision (values beyond fp16's range saturate to +-65504).
- ``int8`` / ``int4``: blocks of ``block`` values share one scale ``absmax / L`` (L = 127 / 7); a
  value is ``round(x / scale)`` in ``[-L, L]``, so the error of each value is at most ``scale / 2``.
  int4 packs two codes per byte.
- ``nf4``: QLoRA's 4-bit NormalFloat levels (Dettmers et al. 2023, appendix E), scaled by the
  block's absmax; each value goes to the nearest level, packed two per byte.
- ``nf2``: 2-bit codes at the Lloyd-Max levels of a unit normal (+-0.4528, +-1.5104: the four levels
  with the least mean squared error for Gaussian values; Max 1960), scaled by the block's RMS; each
  value goes to the nearest level, packed four per byte. Values beyond 1.51 RMS are clipped (the
  error is unbounded per value, so nf2 is meant for error feedback, which sends it next round); an
  all-zero block decodes to exact zeros.
- top-k: only the ``ceil(topk * n)`` largest-magnitude entries of a tensor are sent (their
  positions as a bitmask or as indices, whichever is smaller; ties go to the lower index).
- low rank (``rank`` r > 0; PowerSGD-style, Vogels et al. 2019): a matrix whose rank-r factors take at
  most a quarter of its entries (:func:`lowrank_shape`: MiniLM's 384 x 384 pooler, not the LoRA
  factors or the head) is sent as ``P`` (m x r) and ``Q`` (n x r), its truncated SVD with the
  singular values split evenly between them, each factor then quantized by the codec. The decoder
  rebuilds ``P @ Q.T`` in a fixed order in float64 (:func:`lowrank_product`), so every party gets
  the same bits whatever its BLAS; what the factors miss is error feedback's to carry.
- error feedback (Seide et al. 2014; Karimireddy et al. 2019): what a sender could not send this
  round, ``(delta + residual) - decoded``, is kept and added to its next delta, so over rounds the
  sum of what was sent follows the sum of the true deltas.

Rounding is deterministic, so encoder and decoder (server and every device) reconstruct the same
bits from the same codes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from edge_runtime.errors import ConfigError

log = logging.getLogger("edge_runtime.compression")

CODECS = ("none", "fp16", "int8", "int4", "nf4", "nf2")
LEVELS = {"int8": 127, "int4": 7}
FP16_MAX = 65504.0

# QLoRA's NF4 code book (bitsandbytes' ``NF4`` table): quantiles of N(0, 1) scaled to [-1, 1], with
# an exact zero.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)
# Lloyd-Max (minimum mean squared error) 4-level quantizer of N(0, 1): levels +-0.4528 and +-1.5104,
# decision thresholds 0 and +-0.9816; mean squared error 0.1175 (Max 1960, table I)
NF2_LEVELS = torch.tensor([-1.5104, -0.4528, 0.4528, 1.5104], dtype=torch.float32)
TABLES = {"nf4": (NF4_LEVELS, 4), "nf2": (NF2_LEVELS, 2)}   # code book, bits a code
MAX_RANK = 256


@dataclass(frozen=True)
class CompressionConfig:
    """How updates travel (the training spec's ``compression`` section; off by default)."""

    uplink: str = "none"          # devices -> server: none | fp16 | int8 | int4 | nf4 | nf2
    downlink: str = "none"        # server -> devices (the new global as a delta from the last one)
    topk: float = 1.0             # share of each tensor's entries sent (1.0: all of them)
    error_feedback: bool = True   # keep what could not be sent and add it to the next delta
    block: int = 64               # values sharing one scale (int8 / int4 / nf4 / nf2)
    rank: int = 0                 # > 0: matrices that lowrank_shape admits travel as rank-r factors

    def __post_init__(self) -> None:
        for side in ("uplink", "downlink"):
            if getattr(self, side) not in CODECS:
                raise ConfigError(f"compression.{side} must be one of {', '.join(CODECS)}, got {getattr(self, side)!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, (int, float)) or not 0 < self.topk <= 1:
            raise ConfigError(f"compression.topk must be in (0, 1], got {self.topk!r}")
        if not isinstance(self.error_feedback, bool):
            raise ConfigError(f"compression.error_feedback must be true or false, got {self.error_feedback!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or not 8 <= self.block <= 4096:
            raise ConfigError(f"compression.block must be an integer in [8, 4096], got {self.block!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank <= MAX_RANK:
            raise ConfigError(f"compression.rank must be an integer in [0, {MAX_RANK}] (0: off), got {self.rank!r}")
        if self.rank and self.topk < 1:
            raise ConfigError("compression.rank and compression.topk < 1 do not combine: choose one")

    @property
    def compresses_uplink(self) -> bool:
        """Devices send compressed deltas (a codec, top-k of plain values, or low-rank factors)."""
        return self.uplink != "none" or self.topk < 1 or self.rank > 0

    @property
    def compresses_downlink(self) -> bool:
        """The server sends each new global as a compressed delta."""
        return self.downlink != "none"


@dataclass(frozen=True)
class Quantized:
    """One flat tensor, quantized. ``codes``: fp16 values (fp16), int8 codes (int8), or packed 4-bit
    codes (uint8, two per byte, the first in the low nibble), or packed 2-bit codes (nf2: uint8, four
    per byte, the first in the lowest bits); ``scales``: one bfloat16 per block (empty for fp16)."""

    codec: str
    n: int
    codes: Tensor
    scales: Tensor


def n_blocks(n: int, block: int) -> int:
    return -(-n // block)


def quantize(x: Tensor, codec: str, block: int = 64) -> Quantized:
    """``x``: a flat float tensor of n values -> its codes under ``codec`` (not "none")."""
    x = x.detach().reshape(-1).to(torch.float32)
    n = x.numel()
    if codec == "fp16":
        return Quantized(codec, n, x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16), torch.empty(0, dtype=torch.bfloat16))
    if codec not in LEVELS and codec not in ("nf4", "nf2"):
        raise ConfigError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    blocks = _pad(x, block).view(-1, block)
    if codec == "nf2":   # the RMS of the block's own values (the last block's padding left out)
        count = torch.full((blocks.shape[0],), float(block))
        if n:
            count[-1] = n - (blocks.shape[0] - 1) * block
        scales = _scale_tensor(torch.sqrt(blocks.square().sum(dim=1) / count))
    else:
        absmax = blocks.abs().amax(dim=1)
        scales = _scale_tensor(absmax / LEVELS[codec] if codec in LEVELS else absmax)
    s = scales.to(torch.float32)
    safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)
    if codec in TABLES:   # the nearest level of the code book
        table, bits = TABLES[codec]
        idx = (blocks / safe).unsqueeze(-1).sub(table).abs().argmin(dim=-1)
        return Quantized(codec, n, _pack(idx.reshape(-1)[:n], bits), scales)
    level = LEVELS[codec]
    q = torch.round(blocks / safe).clamp(-level, level).to(torch.int64).reshape(-1)[:n]
    if codec == "int8":
        return Quantized(codec, n, q.to(torch.int8), scales)
    return Quantized(codec, n, _pack(q + 8, 4), scales)


def dequantize(q: Quantized, block: int = 64) -> Tensor:
    """The float32 values ``q`` stands for (flat, ``q.n`` of them)."""
    if q.codec == "fp16":
        return q.codes.to(torch.float32)
    if q.codec == "int8":
        vals = q.codes.to(torch.float32)
    elif q.codec == "int4":
        vals = (_unpack(q.codes, q.n, 4) - 8).to(torch.float32)
    elif q.codec in TABLES:
        table, bits = TABLES[q.codec]
        vals = table[_unpack(q.codes, q.n, bits)]
    else:
        raise ConfigError(f"unknown codec {q.codec!r}")
    scale = q.scales.to(torch.float32).repeat_interleave(block)[: q.n]
    return vals * scale


def select_topk(x: Tensor, share: float) -> Tensor:
    """Positions (int64, ascending) of the ``max(1, ceil(share * n))`` largest ``|x|`` entries of flat
    ``x``; ties go to the lower position, so the choice is deterministic."""
    n = x.numel()
    k = min(n, max(1, math.ceil(share * n)))
    if k == n:
        return torch.arange(n)
    # a stable sort on -|x| keeps equal magnitudes in position order
    order = torch.sort(-x.abs().reshape(-1), stable=True).indices[:k]
    return torch.sort(order).values


@dataclass(frozen=True)
class Compressed:
    """One tensor as sent: its shape, the kept positions (None: every entry) and their quantized
    values (None: the codec is "none" and ``values`` holds the raw float32 values); or, for a
    low-rank matrix, its two ``factors`` (``P`` of shape (m, r), ``Q`` of shape (n, r)), each
    compressed whole."""

    shape: tuple[int, ...]
    positions: Tensor | None
    quantized: Quantized | None
    values: Tensor | None = None
    factors: "tuple[Compressed, Compressed] | None" = None


def lowrank_shape(shape: tuple[int, ...], rank: int) -> bool:
    """Whether a tensor of ``shape`` travels as rank-``rank`` factors: a matrix whose factors hold at
    most a quarter of its entries (``4 r (m + n) <= m n``)."""
    return rank > 0 and len(shape) == 2 and 4 * rank * (shape[0] + shape[1]) <= shape[0] * shape[1]


def lowrank_factors(x: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``x`` (m x n) -> ``(P, Q)``, float32, of shapes (m, r) and (n, r) with ``P @ Q.T`` the best rank-r
    approximation of ``x`` (truncated SVD, in float64; the singular values split as square roots)."""
    try:
        u, s, vh = torch.linalg.svd(x.detach().to(torch.float64), full_matrices=False)
    except torch.linalg.LinAlgError as exc:   # did not converge (rare): send nothing; error feedback keeps it all
        log.warning("low-rank factors of a %s delta: the SVD failed (%s); sending zero factors this round, "
                    "the delta stays in the error-feedback residual", tuple(x.shape), exc)
        return torch.zeros(x.shape[0], rank), torch.zeros(x.shape[1], rank)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(torch.float32).contiguous(), (vh[:rank].T * root).to(torch.float32).contiguous()


def lowrank_product(p: Tensor, q: Tensor) -> Tensor:
    """``p @ q.T`` as float32, computed the same way everywhere: each rank-1 term exact in float64
    (a product of two float32 values is), added in factor order, rounded once. A BLAS matmul may
    sum in another order on another machine, and server and devices must agree bit for bit."""
    out = torch.zeros(p.shape[0], q.shape[0], dtype=torch.float64)
    p64, q64 = p.to(torch.float64), q.to(torch.float64)
    for j in range(p.shape[1]):
        out += p64[:, j:j + 1] * q64[:, j].unsqueeze(0)
    return out.to(torch.float32)


def compress_tensor(x: Tensor, codec: str, topk: float = 1.0, block: int = 64, rank: int = 0) -> Compressed:
    """A float tensor -> what is sent of it; a non-float one (a step counter) travels as it is."""
    if not x.is_floating_point():
        return Compressed(tuple(x.shape), None, None, x.detach().clone())
    if lowrank_shape(tuple(x.shape), rank):
        p, q = lowrank_factors(x, rank)
        return Compressed(tuple(x.shape), None, None, None,
                          (compress_tensor(p, codec, 1.0, block), compress_tensor(q, codec, 1.0, block)))
    flat = x.detach().reshape(-1).to(torch.float32)
    positions = select_topk(flat, topk) if topk < 1 else None
    kept = flat if positions is None else flat[positions]
    if codec == "none":
        return Compressed(tuple(x.shape), positions, None, kept.clone())
    return Compressed(tuple(x.shape), positions, quantize(kept, codec, block))


def decompress_tensor(c: Compressed, block: int = 64) -> Tensor:
    """The float32 tensor of ``c.shape`` that ``c`` stands for (zeros where nothing was sent)."""
    if c.factors is not None:
        return lowrank_product(decompress_tensor(c.factors[0], block), decompress_tensor(c.factors[1], block))
    vals = c.values if c.quantized is None else dequantize(c.quantized, block)
    if c.positions is None:
        return vals.reshape(c.shape).clone()
    out = torch.zeros(math.prod(c.shape), dtype=torch.float32)
    out[c.positions] = vals
    return out.reshape(c.shape)


def compress_state(delta: Mapping[str, Tensor], codec: str, topk: float = 1.0, block: int = 64,
                   residual: Mapping[str, Tensor] | None = None,
                   rank: int = 0) -> tuple[dict[str, Compressed], dict[str, Tensor]]:
    """Compress every tensor of ``delta`` (plus ``residual``, the error carried over, if given).

    Returns ``(sent, new_residual)``: ``new_residual[k] = delta[k] + residual[k] - decoded(sent[k])``,
    what error feedback adds to the next delta (zeros for a lossless codec; none for non-float
    tensors, which travel exactly)."""
    sent: dict[str, Compressed] = {}
    new_residual: dict[str, Tensor] = {}
    for name, d in delta.items():
        if not d.is_floating_point():
            sent[name] = compress_tensor(d, codec, topk, block)
            continue
        target = d.detach().to(torch.float32)
        if not bool(torch.isfinite(target).all()):
            raise ValueError(f"{name}: the delta holds NaN or Inf; nothing to compress")
        if residual is not None and name in residual:
            target = target + residual[name].to(torch.float32).reshape(target.shape)
        c = compress_tensor(target, codec, topk, block, rank)
        sent[name] = c
        new_residual[name] = target - decompress_tensor(c, block)
    return sent, new_residual


def decompress_state(sent: Mapping[str, Compressed], block: int = 64) -> dict[str, Tensor]:
    return {name: decompress_tensor(c, block) for name, c in sent.items()}


def _pad(x: Tensor, block: int) -> Tensor:
    extra = n_blocks(x.numel(), block) * block - x.numel()
    return torch.cat([x, x.new_zeros(extra)]) if extra else x


def _scale_tensor(scales: Tensor) -> Tensor:
    """float32 scales -> bfloat16 (fp32's range in 2 bytes), rounded *up* so that no value of the
    block leaves ``[-L, L]`` and the error bound stays ``scale / 2`` of the scale actually sent."""
    s = scales.to(torch.bfloat16)
    low = s.to(torch.float32) < scales
    if bool(low.any()):   # positive finite bfloat16 values: +1 on the bits is the next one up
        s = torch.where(low, (s.view(torch.int16) + 1).view(torch.bfloat16), s)
    return s


def _pack(codes: Tensor, bits: int) -> Tensor:
    """Codes in [0, 2**bits) -> bytes, 8 // bits per byte, the first in the lowest bits (bits 4 or 2)."""
    per = 8 // bits
    c = codes.to(torch.uint8)
    if c.numel() % per:
        c = torch.cat([c, c.new_zeros(per - c.numel() % per)])
    c = c.view(-1, per)
    out = c[:, 0].clone()
    for j in range(1, per):
        out |= c[:, j] << (bits * j)
    return out


def _unpack(packed: Tensor, n: int, bits: int) -> Tensor:
    p, mask = packed.to(torch.int64), (1 << bits) - 1
    return torch.stack([(p >> (bits * j)) & mask for j in range(8 // bits)], dim=1).reshape(-1)[:n]
