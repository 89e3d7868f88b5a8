"""Split payloads into <= 256 KiB chunks and reassemble them, with sha256 per chunk and per payload.

A chunk on the wire: 4-byte big-endian header length, a JSON header, then the chunk bytes.
Every header repeats the payload's id, total size, total sha256 and chunk count, so a receiver
can start reassembling before (or without) the manifest, and checks each chunk on arrival.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field

from edge_runtime.protocol import bounded_json
from edge_runtime.protocol.messages import PayloadRef, ProtocolError, check_id

MAX_CHUNK_BYTES = 256 * 1024
_HEADER_LEN = struct.Struct(">I")
_MAX_HEADER_BYTES = 4096
_HEADER_LIMITS = bounded_json.JsonLimits(max_bytes=_MAX_HEADER_BYTES, max_depth=2, max_string=256, max_items=16)


@dataclass(frozen=True)
class ChunkHeader:
    payload: PayloadRef
    index: int
    chunk_sha256: str


def payload_ref(payload_id: str, data: bytes, chunk_bytes: int = MAX_CHUNK_BYTES) -> PayloadRef:
    return PayloadRef(payload_id, len(data), hashlib.sha256(data).hexdigest(), max(1, math.ceil(len(data) / chunk_bytes)))


def split_payload(payload_id: str, data: bytes, chunk_bytes: int = MAX_CHUNK_BYTES) -> tuple[PayloadRef, list[bytes]]:
    """Cut ``data`` into framed chunks of at most ``chunk_bytes`` (<= 256 KiB) each."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
    ref = payload_ref(payload_id, data, chunk_bytes)
    frames = []
    for i in range(ref.n_chunks):
        part = data[i * chunk_bytes:(i + 1) * chunk_bytes]
        header = json.dumps({"payload_id": ref.payload_id, "size": ref.size, "sha256": ref.sha256,
                             "n_chunks": ref.n_chunks, "index": i,
                             "chunk_sha256": hashlib.sha256(part).hexdigest()}, separators=(",", ":")).encode()
        frames.append(_HEADER_LEN.pack(len(header)) + header + part)
    return ref, frames


def parse_chunk(frame: bytes) -> tuple[ChunkHeader, bytes]:
    """Split a frame into its validated header and its bytes (checked against the chunk sha256)."""
    if len(frame) < _HEADER_LEN.size:
        raise ProtocolError(f"chunk frame of {len(frame)} bytes is too short for a header")
    (hlen,) = _HEADER_LEN.unpack_from(frame)
    if hlen > _MAX_HEADER_BYTES or _HEADER_LEN.size + hlen > len(frame):
        raise ProtocolError(f"chunk header length {hlen} is invalid for a {len(frame)}-byte frame")
    h = bounded_json.loads(bytes(frame[_HEADER_LEN.size:_HEADER_LEN.size + hlen]), _HEADER_LIMITS, "chunk header")
    fields = ("payload_id", "size", "sha256", "n_chunks", "index", "chunk_sha256")
    if not isinstance(h, dict) or set(h) != set(fields):
        raise ProtocolError(f"chunk header must be an object with exactly {list(fields)}")
    ref = PayloadRef(h["payload_id"], h["size"], h["sha256"], h["n_chunks"])   # validates each field
    index, chunk_sha = h["index"], h["chunk_sha256"]
    if not isinstance(chunk_sha, str) or len(chunk_sha) != 64:
        raise ProtocolError("chunk header: chunk_sha256 must be 64 hex digits")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < ref.n_chunks:
        raise ProtocolError(f"chunk index {index!r:.20} outside 0..{ref.n_chunks - 1}")
    if ref.n_chunks > max(1, ref.size) or ref.n_chunks * MAX_CHUNK_BYTES < ref.size:
        raise ProtocolError(f"{ref.n_chunks} chunks cannot carry {ref.size} bytes")
    data = frame[_HEADER_LEN.size + hlen:]
    if len(data) > MAX_CHUNK_BYTES:
        raise ProtocolError(f"chunk of {len(data)} bytes is over the {MAX_CHUNK_BYTES}-byte limit")
    if hashlib.sha256(data).hexdigest() != chunk_sha:
        raise ProtocolError(f"chunk {index} of payload {ref.payload_id}: sha256 mismatch (corrupted or truncated)")
    return ChunkHeader(ref, index, chunk_sha), data


@dataclass
class _Partial:
    ref: PayloadRef
    parts: dict[int, bytes] = field(default_factory=dict)
    nbytes: int = 0
    last_seen: float = 0.0


class Reassembler:
    """Collects chunks per (source, payload id) and returns each payload once it is whole and verified.

    Declared sizes above ``max_payload_bytes`` are refused before anything is buffered; partial
    payloads older than ``ttl_s`` are dropped, and the total buffered is capped.
    """

    def __init__(self, max_payload_bytes: int, max_buffered_bytes: int | None = None, ttl_s: float = 600.0,
                 max_per_source_bytes: int | None = None):
        self.max_payload_bytes = max_payload_bytes
        self.max_buffered_bytes = max_buffered_bytes or 8 * max_payload_bytes
        # one source (a device) may hold about one payload in flight, plus a re-send of it
        self.max_per_source_bytes = max_per_source_bytes or 2 * max_payload_bytes
        self.ttl_s = ttl_s
        self._partials: dict[tuple[str, str], _Partial] = {}
        self._buffered = 0
        self._per_source: dict[str, int] = {}

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def source_bytes(self, source: str) -> int:
        return self._per_source.get(source, 0)

    def add(self, source: str, frame: bytes, now: float) -> tuple[PayloadRef, bytes | None]:
        """Add one chunk; returns (its payload ref, the whole payload if this chunk completed it)."""
        return self.add_parsed(source, *parse_chunk(frame), now)

    def add_parsed(self, source: str, header: ChunkHeader, data: bytes, now: float) -> tuple[PayloadRef, bytes | None]:
        """:meth:`add` for a frame already split by :func:`parse_chunk` (each frame is parsed and hashed once)."""
        self.expire(now)
        ref = header.payload
        check_id("source", source)
        if ref.size > self.max_payload_bytes:
            raise ProtocolError(f"payload {ref.payload_id} declares {ref.size} bytes, over the "
                                f"{self.max_payload_bytes}-byte limit")
        key = (source, ref.payload_id)
        partial = self._partials.get(key)
        if partial is None:
            partial = self._partials[key] = _Partial(ref)
        elif partial.ref != ref:
            raise ProtocolError(f"chunk {header.index} of payload {ref.payload_id} disagrees with earlier chunks "
                                f"on size / sha256 / count")
        partial.last_seen = now
        if header.index not in partial.parts:
            if partial.nbytes + len(data) > ref.size:
                self.discard(source, ref.payload_id)
                raise ProtocolError(f"payload {ref.payload_id}: chunk {header.index} overflows the declared size")
            # every chunk is accounted (not only a payload's first): the offending payload is evicted
            mine = self._per_source.get(source, 0)
            if mine + len(data) > self.max_per_source_bytes:
                self.discard(source, ref.payload_id)
                raise ProtocolError(f"{source} has {mine} bytes of unfinished payloads buffered, over its share of "
                                    f"{self.max_per_source_bytes}: payload {ref.payload_id} dropped; back off and "
                                    f"send one payload at a time")
            if self._buffered + len(data) > self.max_buffered_bytes:
                self.discard(source, ref.payload_id)
                raise ProtocolError(f"reassembly buffer full ({self._buffered} of {self.max_buffered_bytes} bytes): "
                                    f"payload {ref.payload_id} dropped; back off and re-send")
            partial.parts[header.index] = data
            partial.nbytes += len(data)
            self._buffered += len(data)
            self._per_source[source] = mine + len(data)
        if len(partial.parts) < ref.n_chunks:
            return ref, None
        self.discard(source, ref.payload_id)
        whole = b"".join(partial.parts[i] for i in range(ref.n_chunks))
        if len(whole) != ref.size or hashlib.sha256(whole).hexdigest() != ref.sha256:
            raise ProtocolError(f"payload {ref.payload_id}: sha256 / size mismatch after reassembly")
        return ref, whole

    def discard(self, source: str, payload_id: str) -> None:
        partial = self._partials.pop((source, payload_id), None)
        if partial:
            self._buffered -= partial.nbytes
            left = self._per_source.get(source, 0) - partial.nbytes
            if left > 0:
                self._per_source[source] = left
            else:
                self._per_source.pop(source, None)

    def expire(self, now: float) -> list[tuple[str, str]]:
        old = [k for k, p in self._partials.items() if now - p.last_seen > self.ttl_s]
        for k in old:
            self.discard(*k)
        return old
