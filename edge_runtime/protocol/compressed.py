"""Compressed deltas on the wire: one safetensors file whose ``__metadata__`` names the codec and
lists the tensors in order; their parts lie end to end in a few shared buffers (a LoRA state has
dozens of small tensors, and a safetensors entry per part would cost more than the parts).

Buffers (each present only when used):

- ``codes``: the quantized kept values of every float tensor (float16 for fp16, int8 for int8,
  uint8 with two 4-bit codes a byte for int4 / nf4 or four 2-bit codes a byte for nf2, each tensor
  starting on a new byte), or
  ``values`` (float32) under codec "none";
- ``scales``: bfloat16, one per block of a tensor's kept values (blocks do not span tensors);
- ``mask``: uint8, for tensors sent top-k as a bitmask (entry ``i`` at bit ``i % 8`` of byte
  ``i // 8``, each tensor starting on a new byte); ``index``: int32, ascending, for tensors sent
  top-k as indices (whichever of the two is smaller);
- ``<name>::exact``: a non-float tensor (a counter), whole, in its own dtype.

A low-rank matrix (``compression.rank``) puts its two factors' codes and scales in those buffers,
``P`` then ``Q``, each as a tensor sent whole.

The header (``__metadata__["edge_delta"]``, JSON): ``{"format": 1, "codec", "block", ["rank",]
"tensors": [[name, shape, kept, "all" | "mask" | "index" | "lowrank"], ...]}`` (for "lowrank",
``kept`` is the rank; "rank" is in the header only when it is not 0).

Decoding never trusts the sender: the header is read with bounded JSON; the names and shapes must
be the ones expected, each once; every buffer must hold exactly what the header implies; positions
must lie in range and ascend, codes be in the codec's range, scales finite and non-negative.
Anything else is a ProtocolError saying which part is wrong.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Mapping

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from edge_runtime.algorithms.compression import (Compressed, Quantized,
                                                 decompress_tensor, lowrank_shape, n_blocks)
from edge_runtime.protocol import bounded_json
from edge_runtime.protocol.messages import ProtocolError

FORMAT = 1
HEADER_KEY = "edge_delta"
CODE_DTYPES = {"none": torch.float32, "fp16": torch.float16, "int8": torch.int8, "int4": torch.uint8,
               "nf4": torch.uint8, "nf2": torch.uint8}
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _code_len(codec: str, kept: int) -> int:
    if codec == "nf2":
        return n_blocks(kept, 4)
    return n_blocks(kept, 2) if codec in ("int4", "nf4") else kept


def encode_delta(sent: Mapping[str, Compressed], codec: str, block: int, rank: int = 0) -> bytes:
    """``compress_state``'s output -> safetensors bytes laid out as above."""
    parts: dict[str, list[Tensor]] = {"codes": [], "scales": [], "mask": [], "index": []}
    exact: dict[str, Tensor] = {}
    header = []
    for name, c in sent.items():
        n = math.prod(c.shape)
        if c.quantized is None and c.values is not None and not c.values.is_floating_point():
            exact[f"{name}::exact"] = c.values.reshape(-1).contiguous()
            header.append([name, list(c.shape), n, "all"])
            continue
        if c.factors is not None:
            for f in c.factors:
                _put_values(parts, f)
            header.append([name, list(c.shape), int(c.factors[0].shape[1]), "lowrank"])
            continue
        kept, where = n, "all"
        if c.positions is not None:
            kept = int(c.positions.numel())
            if n_blocks(n, 8) <= 4 * kept:
                where = "mask"
                parts["mask"].append(_pack_mask(c.positions, n))
            else:
                where = "index"
                parts["index"].append(c.positions.to(torch.int32))
        _put_values(parts, c)
        header.append([name, list(c.shape), kept, where])
    tensors = {("values" if codec == "none" and k == "codes" else k): torch.cat(v) for k, v in parts.items() if v}
    tensors.update(exact)
    meta = {"format": FORMAT, "codec": codec, "block": block, **({"rank": rank} if rank else {}), "tensors": header}
    return safetensors_save(tensors, metadata={HEADER_KEY: json.dumps(meta, separators=(",", ":"))})


def _put_values(parts: dict[str, list[Tensor]], c: Compressed) -> None:
    """A tensor's kept values (raw float32, or codes and their scales) onto the shared buffers."""
    if c.quantized is None:
        parts["codes"].append(c.values.reshape(-1).to(torch.float32))
    else:
        parts["codes"].append(c.quantized.codes.reshape(-1))
        if c.quantized.codec != "fp16":
            parts["scales"].append(c.quantized.scales.reshape(-1))


def decode_delta(data: bytes, reference: Mapping[str, Tensor], codec: str, block: int,
                 rank: int = 0) -> dict[str, Tensor]:
    """Bytes from the network -> the delta they stand for, one tensor per name of ``reference``
    (its shapes; float32 for float tensors, the reference's dtype for the others).

    ``codec``, ``block`` and ``rank`` are the run's (from the signed manifest): a payload naming
    others is refused, so a sender cannot choose a decoder the run did not agree on; with a rank,
    exactly the matrices :func:`lowrank_shape` admits travel as factors."""
    meta = _read_header(data)
    if meta.get("format") != FORMAT:
        raise ProtocolError(f"compressed delta has format {meta.get('format')!r}; this version reads {FORMAT}")
    if meta.get("codec") != codec or meta.get("block") != block or meta.get("rank", 0) != rank:
        raise ProtocolError(f"compressed delta uses codec {meta.get('codec')!r} block {meta.get('block')!r} rank "
                            f"{meta.get('rank', 0)!r}; the run's is {codec!r} block {block} rank {rank}")
    header = meta.get("tensors")
    if not isinstance(header, list):
        raise ProtocolError("compressed delta's header has no tensor list")
    names = [h[0] for h in header if isinstance(h, list) and h and isinstance(h[0], str)]
    if len(names) != len(header) or len(set(names)) != len(names) or set(names) != set(reference):
        raise ProtocolError(f"compressed delta names other tensors than expected (missing "
                            f"{sorted(set(reference) - set(names))[:3]}, unexpected "
                            f"{sorted(set(names) - set(reference))[:3]}, {len(names) - len(set(names))} repeated)")
    try:
        buffers = safetensors_load(bytes(data))
    except Exception as exc:  # SafetensorError, ValueError, ... from a hostile file
        raise ProtocolError(f"compressed delta is not valid safetensors: {type(exc).__name__}: {str(exc)[:200]}") from exc
    reader = _Reader(buffers, codec)
    out: dict[str, Tensor] = {}
    for h in header:
        name, ref = h[0], reference[h[0]]
        if len(h) != 4 or h[1] != list(ref.shape):
            raise ProtocolError(f"{name}: header entry {h[1:]!r}, expected shape {list(ref.shape)}")
        if not ref.is_floating_point():
            out[name] = _exact(name, buffers, ref, h)
            reader.used.add(f"{name}::exact")
            continue
        if lowrank_shape(tuple(ref.shape), rank) != (h[3] == "lowrank"):
            raise ProtocolError(f"{name}: sent as {h[3]!r}; at rank {rank} a {list(ref.shape)} tensor travels "
                                + ("as low-rank factors" if h[3] != "lowrank" else "whole"))
        if h[3] == "lowrank":
            if h[2] != rank:
                raise ProtocolError(f"{name}: factors of rank {h[2]!r}; the run's is {rank}")
            m, n = ref.shape
            c = Compressed(tuple(ref.shape), None, None, None,
                           tuple(_read_float(reader, f"{name} ({part})", torch.empty(rows, rank), rows * rank, "all",
                                             codec, block) for part, rows in (("P", m), ("Q", n))))
        else:
            c = _read_float(reader, name, ref, h[2], h[3], codec, block)
        out[name] = decompress_tensor(c, block)
        if not bool(torch.isfinite(out[name]).all()):
            raise ProtocolError(f"{name}: the decoded delta is not finite")
    reader.check_consumed()
    return out


class _Reader:
    """Hands out consecutive slices of the shared buffers, checking dtypes, and that all is used."""

    def __init__(self, buffers: Mapping[str, Tensor], codec: str) -> None:
        self.buffers, self.offsets, self.used = buffers, {}, set()
        self.dtypes = {"codes": CODE_DTYPES[codec], "values": torch.float32, "scales": torch.bfloat16,
                       "mask": torch.uint8, "index": torch.int32}

    def take(self, key: str, length: int, name: str) -> Tensor:
        t = self.buffers.get(key)
        if t is None:
            raise ProtocolError(f"{name}: compressed delta lacks its {key} buffer")
        if t.dtype != self.dtypes[key] or t.dim() != 1:
            raise ProtocolError(f"{key} buffer is {t.dtype} of shape {tuple(t.shape)}; expected 1-d {self.dtypes[key]}")
        start = self.offsets.get(key, 0)
        if start + length > t.numel():
            raise ProtocolError(f"{name}: the {key} buffer ends at {t.numel()}, {start + length} needed")
        self.offsets[key] = start + length
        self.used.add(key)
        return t[start:start + length]

    def check_consumed(self) -> None:
        for key, t in self.buffers.items():
            if key not in self.used:
                raise ProtocolError(f"compressed delta holds an unexpected buffer {key!r}")
            if key in self.offsets and self.offsets[key] != t.numel():
                raise ProtocolError(f"the {key} buffer holds {t.numel()} items; the header accounts for "
                                    f"{self.offsets[key]}")


def _read_float(reader: _Reader, name: str, ref: Tensor, kept, where, codec: str, block: int) -> Compressed:
    n = ref.numel()
    if isinstance(kept, bool) or not isinstance(kept, int) or not (0 < kept <= n or kept == n == 0):
        raise ProtocolError(f"{name}: kept count {kept!r} is not in [1, {n}]")
    if where not in ("all", "mask", "index") or (where == "all" and kept != n):
        raise ProtocolError(f"{name}: positions {where!r} do not fit kept {kept} of {n}")
    positions = None
    if where == "mask":
        positions = _unpack_mask(name, reader.take("mask", n_blocks(n, 8), name), n, kept)
    elif where == "index":
        idx = reader.take("index", kept, name).to(torch.int64)
        if kept and (int(idx[0]) < 0 or int(idx[-1]) >= n or (kept > 1 and not bool((idx[1:] > idx[:-1]).all()))):
            raise ProtocolError(f"{name}: indices out of [0, {n}) or not strictly ascending")
        positions = idx
    if codec == "none":
        values = reader.take("values", kept, name)
        if not bool(torch.isfinite(values).all()):
            raise ProtocolError(f"{name}: values are not finite")
        return Compressed(tuple(ref.shape), positions, None, values)
    codes = reader.take("codes", _code_len(codec, kept), name)
    scales = torch.empty(0, dtype=torch.bfloat16)
    if codec == "fp16":
        if not bool(torch.isfinite(codes).all()):
            raise ProtocolError(f"{name}: fp16 values are not finite")
    else:
        scales = reader.take("scales", n_blocks(kept, block), name)
        if not bool((torch.isfinite(scales) & (scales >= 0)).all()):
            raise ProtocolError(f"{name}: scales must be finite and >= 0")
        if codec == "int8" and bool((codes == -128).any()):
            raise ProtocolError(f"{name}: int8 code -128 is outside [-127, 127]")
        if codec == "int4":
            nibbles = torch.stack([codes & 0xF, codes >> 4], dim=1).reshape(-1)[:kept]
            if bool((nibbles == 0).any()):
                raise ProtocolError(f"{name}: int4 code 0 is outside [1, 15]")
    return Compressed(tuple(ref.shape), positions, Quantized(codec, kept, codes, scales))


def _exact(name: str, buffers: Mapping[str, Tensor], ref: Tensor, h: list) -> Tensor:
    t = buffers.get(f"{name}::exact")
    if h[2:] != [ref.numel(), "all"] or t is None or t.dtype != ref.dtype or t.numel() != ref.numel():
        raise ProtocolError(f"{name}: a {ref.dtype} tensor travels whole, as {name}::exact")
    return t.reshape(ref.shape).clone()


def _read_header(data: bytes) -> dict:
    if len(data) < 8:
        raise ProtocolError("compressed delta is shorter than a safetensors header")
    (size,) = struct.unpack("<Q", bytes(data[:8]))
    if size > min(len(data) - 8, 1 << 24):
        raise ProtocolError(f"compressed delta's header claims {size} bytes; the payload has {len(data) - 8}")
    limits = bounded_json.JsonLimits(max_bytes=1 << 24, max_string=1 << 22, max_items=200_000)
    head = bounded_json.loads(bytes(data[8:8 + size]), limits)
    meta = head.get("__metadata__") if isinstance(head, dict) else None
    raw = meta.get(HEADER_KEY) if isinstance(meta, dict) else None
    if not isinstance(raw, str):
        raise ProtocolError(f"compressed delta has no {HEADER_KEY!r} header")
    body = bounded_json.loads(raw.encode(), limits)
    if not isinstance(body, dict):
        raise ProtocolError("compressed delta's header is not an object")
    return body


def _pack_mask(positions: Tensor, n: int) -> Tensor:
    bits = torch.zeros(n_blocks(n, 8) * 8, dtype=torch.uint8)
    bits[positions] = 1
    return (bits.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def _unpack_mask(name: str, mask: Tensor, n: int, kept: int) -> Tensor:
    bits = ((mask.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)
    if bool(bits[n:].any()):
        raise ProtocolError(f"{name}: mask bits set past the tensor's {n} entries")
    positions = torch.nonzero(bits[:n]).reshape(-1)
    if positions.numel() != kept:
        raise ProtocolError(f"{name}: mask marks {positions.numel()} entries, the header says {kept}")
    return positions
