import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.protocol.codec import (MAX_MESSAGE_BYTES, decode_message,
                                         decode_tensors, encode_message,
                                         encode_tensors)
from edge_runtime.protocol.messages import (Ack, Heartbeat, Hello, PayloadRef,
                                            ProtocolError, RoundManifest,
                                            UpdateManifest)

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
SHA = "a" * 64


@settings(max_examples=60, deadline=None)
@given(dev=ids, upd=ids, rnd=st.integers(0, 10**6), n=st.integers(0, 10**6),
       size=st.integers(0, 10**9), chunks=st.integers(1, 5000),
       metrics=st.dictionaries(st.text(max_size=8), st.floats(allow_nan=False, allow_infinity=False), max_size=4),
       steps=st.lists(st.integers(0, 10**6), max_size=40))
def test_update_manifest_round_trips(dev, upd, rnd, n, size, chunks, metrics, steps):
    m = UpdateManifest("run-1", dev, rnd, upd, PayloadRef(upd, size, SHA, chunks), n, metrics, tuple(steps))
    got = decode_message(encode_message(m))
    assert got == m and isinstance(got.layer_steps, tuple)


@settings(max_examples=30, deadline=None)
@given(parts=st.lists(ids, max_size=10), rnd=st.integers(0, 1000), action=st.sampled_from(["train", "evaluate", "done"]))
def test_round_manifest_round_trips(parts, rnd, action):
    m = RoundManifest("run-1", rnd, action, tuple(parts), None, 12.5, {"model": "x", "labels": ["a"]}, 1.0)
    assert decode_message(encode_message(m)) == m
    init = PayloadRef("init-run-1", 1234, "ab" * 32, 1)
    with_init = RoundManifest("run-1", rnd, action, tuple(parts), None, 1.0, {}, 1.0, init)
    assert decode_message(encode_message(with_init)).init_payload == init


def test_other_messages_round_trip():
    for m in (Hello("d1", {"memory_total": 8}, "0.1", 10, 3), Ack("d1", 2, "u1", False, "stale", True),
              Heartbeat("d1", "training", 4, 123.0)):
        assert decode_message(encode_message(m)) == m


def _update_body(**over):
    body = {"v": 10, "type": "update", "run_id": "r", "device_id": "d", "round": 1, "update_id": "u",
            "payload": {"payload_id": "u", "size": 10, "sha256": SHA, "n_chunks": 1}, "n_samples": 5,
            "metrics": {}}
    body.update(over)
    return json.dumps(body).encode()


@pytest.mark.parametrize("data, message", [
    (b"\xff\xfe", "message is not UTF-8"),
    (b"{not json", "message is not valid JSON"),
    (b'{"v": 10, "type": []}', "message type must be a string, got list"),       # was: TypeError unhashable
    (b'{"v": 10, "type": {"a": 1}}', "message type must be a string, got dict"),
    (b'{"v": [1], "type": "ack"}', "unsupported protocol version"),
    (b"[" * 5000 + b"]" * 5000, "nests deeper than 12 levels"),                 # was: RecursionError
    (b'{"v": 10, "type": "hello", "device_id": "d", "n_samples": 1' + b"0" * 4000 + b"}", "not valid JSON"),
    (b'{"v": 10, "type": "hello", "device_id": "d", "profile": {"a": "' + b"x" * 20000 + b'"}}', "over the 16384"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"v": 99, "type": "ack"}', "unsupported protocol version 99"),
    (b'{"v": 10, "type": "nope"}', "unknown message type"),
    (_update_body(round=-1), "round must be an integer >= 0"),
    (_update_body(round="1"), "update.round must be an integer"),
    (_update_body(round=True), "update.round must be an integer"),
    (_update_body(device_id="../etc"), "device_id must be"),
    (_update_body(extra=1), "unknown fields ['extra']"),
    (_update_body(payload={"payload_id": "u", "size": 10, "sha256": "zz", "n_chunks": 1}), "sha256 must be"),
    (_update_body(payload={"payload_id": "u", "size": -5, "sha256": SHA, "n_chunks": 1}), "payload size"),
    (_update_body(metrics=[1]), "update.metrics must be an object"),
    (_update_body(layer_steps=[1, -2]), "layer_steps must be at most 4096 integers >= 0"),
    (_update_body(layer_steps=[1, 2.5]), "update.layer_steps must be a list of integers"),
    (_update_body(layer_steps=[True]), "update.layer_steps must be a list of integers"),
    (_update_body(layer_steps=list(range(4097))), "at most 4096"),
    (_update_body(v=1), "unsupported protocol version 1; this runtime speaks 10"),   # a protocol-1 device
    (_update_body(v=2), "unsupported protocol version 2; this runtime speaks 10"),   # before signatures
    (_update_body(v=3), "unsupported protocol version 3; this runtime speaks 10"),   # before the spec's dp section
    (_update_body(v=4), "unsupported protocol version 4; this runtime speaks 10"),   # before compression
    (_update_body(v=5), "unsupported protocol version 5; this runtime speaks 10"),   # before train.group_by_length
    (_update_body(v=6), "unsupported protocol version 6; this runtime speaks 10"),   # before train.cache_frozen, lora.top_blocks
    (_update_body(v=7), "unsupported protocol version 7; this runtime speaks 10"),   # before the eval and fedopt sections
    (_update_body(v=8), "unsupported protocol version 8; this runtime speaks 10"),   # before train.precision
    (_update_body(v=9), "unsupported protocol version 9; this runtime speaks 10"),   # before train.micro_batch_size
    (b'{"v": 10, "type": "update", "run_id": "r"}', "missing field"),
    (b'{"v": 10, "type": "heartbeat", "device_id": "d", "sent_at": NaN}', "NaN is not allowed"),
    (b'{"v": 10, "type": "hello", "device_id": "d", "profile": ' + b'{"a":' * 12 + b"1" + b"}" * 12 + b"}",
     "nests deeper"),
])
def test_malformed_messages_say_what_is_wrong(data, message):
    with pytest.raises(ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        decode_message(data)


def test_oversized_message_refused_before_parsing():
    with pytest.raises(ProtocolError, match="over the"):
        decode_message(b"{" + b" " * MAX_MESSAGE_BYTES + b"}")


def test_expected_type_enforced():
    with pytest.raises(ProtocolError, match="expected a update message, got ack"):
        decode_message(encode_message(Ack("d", 1, "u", True)), UpdateManifest)


def test_tensors_round_trip_exactly():
    state = {"a.lora_A.weight": torch.randn(4, 8), "b": torch.randn(3).half(), "c": torch.randn(2, 2).bfloat16()}
    out = decode_tensors(encode_tensors(state))
    assert set(out) == set(state) and all(torch.equal(out[k], state[k]) for k in state)


@pytest.mark.parametrize("state, message", [
    ({"w": torch.tensor([1.0, math.nan])}, "NaN or Inf"),
    ({"w": torch.tensor([math.inf])}, "NaN or Inf"),
    ({"w": torch.tensor([1, 2], dtype=torch.int64)}, "dtype"),
])
def test_bad_tensors_rejected(state, message):
    with pytest.raises(ProtocolError, match=message):
        decode_tensors(encode_tensors(state))


def test_pickle_bytes_are_not_tensors():
    import pickle

    with pytest.raises(ProtocolError, match="not valid safetensors"):
        decode_tensors(pickle.dumps({"w": [1.0]}))
    with pytest.raises(ProtocolError, match="not valid safetensors"):
        decode_tensors(encode_tensors({"w": torch.zeros(100)})[:-7])  # truncated


# -- fuzz: any bytes, any JSON, any nesting -> a message or a ProtocolError, never another exception ----
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                     max_leaves=30)
_field_names = st.sampled_from(["v", "type", "device_id", "run_id", "round", "update_id", "payload", "n_samples",
                                "metrics", "profile", "participants", "action", "training", "assignments", "accepted",
                                "retry", "reason", "online", "sent_at", "payload_id", "size", "sha256", "n_chunks"])


def _decodes_or_protocol_error(data: bytes) -> None:
    try:
        decode_message(data)
    except ProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_bytes(data):
    _decodes_or_protocol_error(data)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(sorted(__import__("edge_runtime.protocol.messages", fromlist=["x"]).MESSAGE_TYPES)),
       st.dictionaries(_field_names, _json, max_size=8), st.sampled_from([1, 1, 1, 2, "1", None, [1]]))
def test_fuzz_message_shaped_json(kind, fields, version):
    _decodes_or_protocol_error(json.dumps({**fields, "v": version, "type": kind}).encode())


@settings(max_examples=300, deadline=None)
@given(_json)
def test_fuzz_any_json_document(doc):
    _decodes_or_protocol_error(json.dumps(doc).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_tensor_payloads(data):
    from edge_runtime.protocol.codec import decode_tensors

    try:
        decode_tensors(data)
    except ProtocolError:
        pass


def test_hostile_safetensors_headers_are_protocol_errors():
    import struct

    from edge_runtime.protocol.codec import decode_tensors

    for header in (b"[" * 3000, b'{"t": {"dtype": "F32", "shape": [99999999999, 99999999999], "data_offsets": [0, 4]}}',
                   b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 99999999]}}', b"\xff" * 8):
        with pytest.raises(ProtocolError):
            decode_tensors(struct.pack("<Q", len(header)) + header + b"\0" * 4)
