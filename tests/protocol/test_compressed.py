"""Compressed deltas on the wire: exact round trips through bytes for every codec, the byte counts
each codec should cost, and hostile payloads refused with a reason."""

import json
import struct

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from edge_runtime.algorithms.compression import (CODECS, compress_state,
                                                 decompress_state)
from edge_runtime.protocol.compressed import decode_delta, encode_delta
from edge_runtime.protocol.messages import ProtocolError

REF = {"a.lora_A": torch.zeros(8, 64), "head.bias": torch.zeros(5), "step": torch.zeros(1, dtype=torch.int64)}


def _delta(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A": torch.randn(8, 64, generator=g) * 0.01, "head.bias": torch.randn(5, generator=g),
            "step": torch.tensor([7])}


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("topk", [1.0, 0.3, 0.01])
def test_bytes_decode_to_exactly_what_the_sender_reconstructs(codec, topk):
    sent, _ = compress_state(_delta(), codec, topk, 64)
    data = encode_delta(sent, codec, 64)
    out = decode_delta(data, REF, codec, 64)
    mine = decompress_state(sent, 64)
    for k in REF:   # bit for bit: server and devices must hold the same global
        assert out[k].dtype == mine[k].dtype and torch.equal(out[k], mine[k]), k
    assert out["step"].tolist() == [7]


def _wire_bytes(codec, topk, n=64 * 1024):
    sent, _ = compress_state({"w": torch.randn(n)}, codec, topk, 64)
    return len(encode_delta(sent, codec, 64))


def test_what_each_codec_costs_per_value():
    n = 64 * 1024
    per_value = {c: _wire_bytes(c, 1.0) / n for c in CODECS}
    # the values, plus a 2-byte bfloat16 scale per 64 values, plus a header of a few hundred bytes
    assert per_value["none"] == pytest.approx(4.0, abs=0.01)
    assert per_value["fp16"] == pytest.approx(2.0, abs=0.01)
    assert per_value["int8"] == pytest.approx(1 + 2 / 64, abs=0.01)
    assert per_value["int4"] == pytest.approx(0.5 + 2 / 64, abs=0.01)
    assert per_value["nf4"] == pytest.approx(0.5 + 2 / 64, abs=0.01)
    assert per_value["nf2"] == pytest.approx(0.25 + 2 / 64, abs=0.01)
    # top 10% of int4: a bitmask (1/8 byte a value) beats int32 indices (0.4 byte a value)
    assert _wire_bytes("int4", 0.1) / n == pytest.approx(0.125 + 0.1 * (0.5 + 2 / 64), abs=0.01)
    # top 1%: indices (0.04 byte a value) beat the bitmask
    assert _wire_bytes("int4", 0.01) / n == pytest.approx(0.01 * (4 + 0.5 + 2 / 64), abs=0.01)


def _rewrite(data, mutate_tensors=None, mutate_header=None):
    """The payload with its buffers and / or header changed, re-serialised as an attacker would."""
    (size,) = struct.unpack("<Q", data[:8])
    meta = json.loads(json.loads(data[8:8 + size])["__metadata__"]["edge_delta"])
    tensors = dict(safetensors_load(data))
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_header:
        mutate_header(meta)
    return safetensors_save(tensors, metadata={"edge_delta": json.dumps(meta)})


def _payload(codec="int4", topk=1.0):
    sent, _ = compress_state(_delta(), codec, topk, 64)
    return encode_delta(sent, codec, 64)


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


def _entry(name, **change):
    """Change header entry ``name``: [name, shape, kept, positions]."""
    def mutate(meta):
        for e in meta["tensors"]:
            if e[0] == name:
                for k, v in change.items():
                    e[{"shape": 1, "kept": 2, "positions": 3}[k]] = v
    return mutate


def _edit(key, fn):
    return lambda t: t.__setitem__(key, fn(t[key].clone()))


def _setpart(start, stop, value):
    def fn(t):
        t[start:stop] = value
        return t
    return fn


# top-k 0.01 of int4: a.lora_A keeps 6 of 512 (indices), head.bias 1 of 5 (mask: 1 byte <= 4 x 1)
# top-k 0.3: a.lora_A keeps 154 (mask, 64 bytes), head.bias 2 (mask, 1 byte)
CASES = [
    ("int4", lambda: _rewrite(_payload("int4", 0.01), _edit("index", _setpart(0, 6, torch.tensor([3, 600, 2, 1, 0, 5], dtype=torch.int32)))),
     "indices out of [0, 512)"),
    ("int4", lambda: _rewrite(_payload("int4", 0.01), _edit("index", _setpart(0, 6, torch.tensor([5, 3, 1, 2, 4, 6], dtype=torch.int32)))),
     "not strictly ascending"),
    ("int4", lambda: _rewrite(_payload("int4", 0.3), _edit("mask", _setpart(0, 64, 255))),
     "mask marks 512 entries, the header says 154"),
    ("int4", lambda: _rewrite(_payload("int4", 0.3), _edit("mask", _setpart(64, 65, 0xFF))),
     "mask bits set past the tensor's 5 entries"),
    ("int8", lambda: _rewrite(_payload("int8"), _edit("scales", lambda t: t[:3])),
     "the scales buffer ends at 3, 8 needed"),
    ("int8", lambda: _rewrite(_payload("int8"), _edit("scales", lambda t: torch.cat([t, t]))),
     "the scales buffer holds 18 items; the header accounts for 9"),
    ("int8", lambda: _rewrite(_payload("int8"), _edit("scales", _setpart(0, 1, float("nan")))),
     "scales must be finite"),
    ("int8", lambda: _rewrite(_payload("int8"), _edit("scales", _setpart(2, 3, -1.0))),
     "scales must be finite and >= 0"),
    ("int8", lambda: _rewrite(_payload("int8"), _edit("codes", _setpart(7, 8, -128))), "int8 code -128"),
    ("int4", lambda: _rewrite(_payload("int4"), _edit("codes", _setpart(0, 1, 0))), "int4 code 0"),
    # nf2: 4 codes a byte, so a.lora_A's 512 values take 128 bytes
    ("nf2", lambda: _rewrite(_payload("nf2"), _edit("codes", lambda t: t[:100])), "the codes buffer ends at 100, 128 needed"),
    ("nf2", lambda: _rewrite(_payload("nf2"), _edit("scales", _setpart(1, 2, float("nan")))), "scales must be finite"),
    ("int4", lambda: _rewrite(_payload("int4"), _edit("codes", lambda t: t.float())), "expected 1-d torch.uint8"),
    ("fp16", lambda: _rewrite(_payload("fp16"), _edit("codes", _setpart(-1, None, float("inf")))),
     "head.bias: fp16 values are not finite"),
    ("none", lambda: _rewrite(_payload("none"), _edit("values", _setpart(-1, None, float("nan")))),
     "head.bias: values are not finite"),
    ("int8", lambda: _rewrite(_payload("int8"), _edit("scales", _setpart(0, 1, 3e38))), "decoded delta is not finite"),
    ("int4", lambda: _rewrite(_payload(), _set("extra", torch.zeros(2))), "unexpected buffer 'extra'"),
    ("int4", lambda: _rewrite(_payload(), lambda t: t.pop("scales")), "lacks its scales buffer"),
    ("int4", lambda: _rewrite(_payload(), lambda t: t.pop("step::exact")), "travels whole"),
    ("int4", lambda: _rewrite(_payload(), _set("step::exact", torch.zeros(1))), "travels whole"),
    ("int4", lambda: _rewrite(_payload(), mutate_header=_entry("a.lora_A", shape=[64, 8])), "expected shape [8, 64]"),
    ("int4", lambda: _rewrite(_payload(), mutate_header=lambda m: m["tensors"].pop()), "missing ['step']"),
    ("int4", lambda: _rewrite(_payload(), mutate_header=lambda m: m["tensors"].append(m["tensors"][0])), "1 repeated"),
    ("int4", lambda: _rewrite(_payload(), mutate_header=lambda m: m.update(tensors={"a": 1})), "no tensor list"),
    ("int4", lambda: _rewrite(_payload(), mutate_header=_entry("a.lora_A", kept=10**12)), "kept count 1000000000000"),
    ("int4", lambda: _rewrite(_payload(), mutate_header=_entry("a.lora_A", kept=5)), "do not fit kept"),
    ("int4", lambda: _rewrite(_payload(), mutate_header=_entry("step", positions="mask")), "travels whole"),
    ("int4", lambda: _rewrite(_payload(), mutate_header=lambda m: m.update(codec="nf4")), "uses codec 'nf4'"),
    ("int4", lambda: _rewrite(_payload(), mutate_header=lambda m: m.update(block=8)), "block 8"),
    ("int4", lambda: _rewrite(_payload(), mutate_header=lambda m: m.update(format=2)), "format 2"),
    ("int4", lambda: safetensors_save({"x": torch.zeros(2)}), "no 'edge_delta' header"),
    ("int4", lambda: struct.pack("<Q", 10**15) + b"{}", "header claims"),
    ("int4", lambda: b"\x01", "shorter than"),
    ("int4", lambda: struct.pack("<Q", 2) + b"[]", "no 'edge_delta' header"),
    ("int4", lambda: struct.pack("<Q", 6) + b'{"a":[', "JSON"),
]


@pytest.mark.parametrize("codec,make,reason", CASES)
def test_bad_compressed_payloads_are_refused_with_a_reason(codec, make, reason):
    with pytest.raises(ProtocolError) as e:
        decode_delta(make(), REF, codec, 64)
    assert reason in str(e.value), str(e.value)


def test_server_and_devices_hold_the_same_global_bit_for_bit_after_5_compressed_rounds():
    import hashlib

    from edge_runtime.algorithms.compression import CompressionConfig
    from edge_runtime.protocol.codec import encode_tensors
    from edge_runtime.round.wire import apply_delta, encode_global

    cfg = CompressionConfig(uplink="int4", downlink="int4", topk=0.5)
    g = torch.Generator().manual_seed(1)
    server = {"a.lora_A": torch.zeros(8, 64), "head.bias": torch.zeros(5)}
    devices = [dict(server), dict(server)]
    residual = {k: torch.zeros_like(v) for k, v in server.items()}
    for _ in range(5):
        aggregate = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in server.items()}
        carried = residual
        data, server, residual = encode_global(aggregate, server, cfg, carried)
        devices = [apply_delta(d, data, cfg.downlink, cfg.block) for d in devices]
        digest = hashlib.sha256(encode_tensors(server)).hexdigest()
        assert all(hashlib.sha256(encode_tensors(d)).hexdigest() == digest for d in devices)
        # what the devices hold plus the new residual is the aggregate plus what was carried in
        for k in server:
            torch.testing.assert_close(server[k] + residual[k], aggregate[k] + carried[k], rtol=0, atol=1e-6)


def test_no_delta_when_the_downlink_is_plain_or_the_layout_changes():
    from edge_runtime.algorithms.compression import CompressionConfig
    from edge_runtime.round.wire import encode_global

    held = {"w": torch.zeros(4)}
    new = {"w": torch.ones(4)}
    assert encode_global(new, held, CompressionConfig(uplink="int4"))[0] is None
    data, wire, res = encode_global({"v": torch.ones(3)}, held, CompressionConfig(downlink="int8"))
    assert data is None and res is None and wire["v"].tolist() == [1.0, 1.0, 1.0]


# -- low-rank factors (compression.rank) ---------------------------------------------------------
LR_REF = {"pooler.weight": torch.zeros(48, 40), "a.lora_A": torch.zeros(4, 40), "head.bias": torch.zeros(5)}


def _lr_delta(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in LR_REF.items()}


def _lr_payload(codec="int4", rank=2):
    sent, _ = compress_state(_lr_delta(), codec, 1.0, 64, None, rank)
    return encode_delta(sent, codec, 64, rank)


@pytest.mark.parametrize("codec", ["none", "int8", "int4", "nf2"])
def test_low_rank_bytes_decode_to_what_the_sender_reconstructs_and_cost_the_factors(codec):
    sent, _ = compress_state(_lr_delta(), codec, 1.0, 64, None, 2)
    # 48 x 40 qualifies at rank 2 (4 * 2 * 88 = 704 <= 1920); the 4 x 40 LoRA factor does not
    assert sent["pooler.weight"].factors is not None and sent["a.lora_A"].factors is None
    data = encode_delta(sent, codec, 64, 2)
    out, mine = decode_delta(data, LR_REF, codec, 64, 2), decompress_state(sent, 64)
    for k in LR_REF:
        assert torch.equal(out[k], mine[k]), k
    whole = len(encode_delta(compress_state(_lr_delta(), codec, 1.0, 64)[0], codec, 64))
    per = {"none": 4, "int8": 1, "int4": 0.5, "nf2": 0.25}[codec]
    # the matrix's 1,920 values give way to 2 x (48 + 40) = 176 factor values (and their scales)
    assert whole - len(data) >= (1920 - 176) * per - 16


LR_CASES = [
    (lambda: _lr_payload(rank=2), 4, "rank 2; the run's is 'int4' block 64 rank 4"),
    (lambda: _lr_payload(rank=0), 2, "rank 0; the run's is 'int4' block 64 rank 2"),
    (lambda: _rewrite(_lr_payload(), mutate_header=_entry("pooler.weight", kept=3)), 2, "factors of rank 3"),
    (lambda: _rewrite(_lr_payload(), mutate_header=_entry("pooler.weight", positions="all", kept=1920)), 2,
     "travels as low-rank factors"),
    (lambda: _rewrite(_lr_payload(), mutate_header=_entry("head.bias", positions="lowrank", kept=2)), 2,
     "travels whole"),
    (lambda: _rewrite(_lr_payload(), _set("scales", torch.full_like(safetensors_load(_lr_payload())["scales"],
                                                                   float("nan")))), 2, "scales must be finite"),
    (lambda: _rewrite(_lr_payload(), _set("codes", safetensors_load(_lr_payload())["codes"][:-3])), 2, "buffer ends"),
]


@pytest.mark.parametrize("make,rank,reason", LR_CASES)
def test_bad_low_rank_payloads_are_refused_with_a_reason(make, rank, reason):
    with pytest.raises(ProtocolError) as e:
        decode_delta(make(), LR_REF, "int4", 64, rank)
    assert reason in str(e.value), str(e.value)


def test_low_rank_globals_stay_bit_identical_on_server_and_devices_for_5_rounds():
    import hashlib

    from edge_runtime.algorithms.compression import CompressionConfig
    from edge_runtime.protocol.codec import encode_tensors
    from edge_runtime.round.wire import apply_delta, encode_global

    cfg = CompressionConfig(uplink="int4", downlink="int4", rank=2)
    g = torch.Generator().manual_seed(3)
    server = {k: torch.zeros_like(v) for k, v in LR_REF.items()}
    devices = [dict(server), dict(server)]
    residual = None
    for _ in range(5):
        aggregate = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in server.items()}
        carried = residual or {k: torch.zeros_like(v) for k, v in server.items()}
        data, server, residual = encode_global(aggregate, server, cfg, residual)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # another thread count must not change a bit of the rebuilt global
        try:
            devices = [apply_delta(d, data, cfg.downlink, cfg.block, cfg.rank) for d in devices]
        finally:
            torch.set_num_threads(threads)
        digest = hashlib.sha256(encode_tensors(server)).hexdigest()
        assert all(hashlib.sha256(encode_tensors(d)).hexdigest() == digest for d in devices)
        for k in server:   # what could not be sent is carried, not lost
            torch.testing.assert_close(server[k] + residual[k], aggregate[k] + carried[k], rtol=0, atol=1e-6)
