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
