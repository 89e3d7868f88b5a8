import hashlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.protocol.chunking import MAX_CHUNK_BYTES, Reassembler, parse_chunk, split_payload
from edge_runtime.protocol.messages import ProtocolError


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=5000), chunk=st.integers(1, 1024), seed=st.integers(0, 1000))
def test_split_and_reassemble_in_any_order(data, chunk, seed):
    ref, frames = split_payload("p1", data, chunk)
    assert ref.size == len(data) and ref.sha256 == hashlib.sha256(data).hexdigest()
    random.Random(seed).shuffle(frames)
    r = Reassembler(max_payload_bytes=10_000)
    results = [r.add("dev1", f, now=0.0)[1] for f in frames]
    assert results[-1] == data and all(x is None for x in results[:-1])
    assert r.buffered_bytes == 0


def test_chunks_never_exceed_256_kib():
    ref, frames = split_payload("big", os.urandom(MAX_CHUNK_BYTES * 2 + 5))
    assert ref.n_chunks == 3
    assert all(len(parse_chunk(f)[1]) <= MAX_CHUNK_BYTES for f in frames)
    with pytest.raises(ValueError):
        split_payload("x", b"abc", MAX_CHUNK_BYTES + 1)


def test_duplicate_chunks_are_harmless():
    ref, frames = split_payload("p", os.urandom(3000), 1000)
    r = Reassembler(10_000)
    assert r.add("d", frames[0], 0)[1] is None
    assert r.add("d", frames[0], 0)[1] is None
    assert r.add("d", frames[1], 0)[1] is None
    assert r.add("d", frames[2], 0)[1] is not None


def test_corrupted_chunk_detected():
    _, frames = split_payload("p", os.urandom(3000), 1000)
    bad = bytearray(frames[1])
    bad[-1] ^= 0xFF
    with pytest.raises(ProtocolError, match="sha256 mismatch"):
        Reassembler(10_000).add("d", bytes(bad), 0)


def test_truncated_chunk_detected():
    _, frames = split_payload("p", os.urandom(3000), 1000)
    with pytest.raises(ProtocolError, match="sha256 mismatch"):
        Reassembler(10_000).add("d", frames[0][:-10], 0)
    with pytest.raises(ProtocolError, match="too short"):
        parse_chunk(b"\x00")
    with pytest.raises(ProtocolError, match="header length"):
        parse_chunk(b"\x00\x00\xff\xff{}")


def test_oversized_declared_size_rejected_before_buffering():
    _, frames = split_payload("p", os.urandom(2000), 1000)
    r = Reassembler(max_payload_bytes=1500)
    with pytest.raises(ProtocolError, match="over the 1500-byte limit"):
        r.add("d", frames[0], 0)
    assert r.buffered_bytes == 0


def test_whole_payload_sha_mismatch_detected():
    # chunks that are each self-consistent but belong to a payload whose total sha is wrong
    _, frames_a = split_payload("p", b"a" * 2000, 1000)
    _, frames_b = split_payload("p", b"b" * 2000, 1000)
    r = Reassembler(10_000)
    r.add("d", frames_a[0], 0)
    with pytest.raises(ProtocolError, match="disagrees with earlier chunks"):
        r.add("d", frames_b[1], 0)


def test_sources_do_not_mix_and_partials_expire():
    _, frames = split_payload("same-id", os.urandom(2000), 1000)
    r = Reassembler(10_000, ttl_s=10)
    r.add("dev1", frames[0], now=0)
    assert r.add("dev2", frames[1], now=1)[1] is None   # dev2 has only chunk 1
    assert r.buffered_bytes == 2000
    r.expire(now=100)
    assert r.buffered_bytes == 0


# -- hostile chunks --------------------------------------------------------------------------------
def _frame(header, data: bytes = b"x") -> bytes:
    import json
    import struct

    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack(">I", len(raw)) + raw + data


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=6),
                     max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), _json.map(_frame),
                 st.dictionaries(st.sampled_from(["payload_id", "size", "sha256", "n_chunks", "index", "chunk_sha256"]),
                                 _json).map(_frame)))
def test_fuzz_chunk_frames_are_chunks_or_protocol_errors(frame):
    try:
        Reassembler(10_000).add("dev0", frame, 0)
    except ProtocolError:
        pass


def test_deeply_nested_chunk_header_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="nests deeper"):
        parse_chunk(_frame(b"[" * 2000 + b"]" * 2000))
    with pytest.raises(ProtocolError, match="exactly"):
        parse_chunk(_frame([1, 2, 3]))


def test_buffer_is_accounted_on_every_chunk_per_source_and_in_total():
    """One client used to buffer 552 MiB: the cap was checked on a payload's first chunk only."""
    data = bytes(range(256)) * 40                       # 10,240 bytes -> 10 chunks of 1,024
    r = Reassembler(max_payload_bytes=10_240, max_buffered_bytes=40_000, max_per_source_bytes=12_000)
    refused = 0
    for pid in range(5):                                  # one source opens payload after payload
        _, frames = split_payload(f"p{pid}", data[:-pid or None] + bytes(pid), chunk_bytes=1024)
        for f in frames[:-1]:                             # never finishing any of them
            try:
                r.add("greedy", f, 0)
            except ProtocolError as exc:
                assert "over its share" in str(exc) and "back off" in str(exc)
                refused += 1
        assert r.source_bytes("greedy") <= 12_000 and r.buffered_bytes <= 40_000
    assert refused > 0
    # an honest device still gets its whole payload through
    ref, frames = split_payload("u1", data, chunk_bytes=1024)
    out = [r.add("honest", f, 0)[1] for f in frames]
    assert out[-1] == data and r.source_bytes("honest") == 0


def test_total_cap_refuses_the_offending_payload():
    data = bytes(5000)
    r = Reassembler(max_payload_bytes=5001, max_buffered_bytes=6000, max_per_source_bytes=5001)
    for dev in ("a", "b"):
        _, frames = split_payload(f"p-{dev}", data + dev.encode(), chunk_bytes=1000)
        for f in frames[:4]:
            try:
                r.add(dev, f, 0)
            except ProtocolError as exc:
                assert dev == "b" and "reassembly buffer full" in str(exc)
    assert r.buffered_bytes <= 6000 and r.source_bytes("a") == 4000 and r.source_bytes("b") < 4000
