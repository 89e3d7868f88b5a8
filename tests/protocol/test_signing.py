"""Signed control messages: what a signature covers, and every way a bad one is refused."""

import base64
import json
import os
import stat

import pytest

from broker_server.enrolment import Enrolment
from edge_runtime.errors import ConfigError
from edge_runtime.protocol import topics
from edge_runtime.protocol.codec import (Security, decode_message,
                                         encode_message)
from edge_runtime.protocol.messages import (Hello, PayloadRef, ProtocolError,
                                            RoundManifest, UpdateManifest)
from edge_runtime.protocol.signing import (Identity, PinnedKey, fingerprint,
                                           parse_public_key, public_key_text)

REF = PayloadRef("u1", 1000, "ab" * 32, 1)


def _update(**kw) -> UpdateManifest:
    return UpdateManifest(**({"run_id": "run-1", "device_id": "dev0", "round": 3, "update_id": "u1",
                              "payload": REF, "n_samples": 120, "metrics": {"train_loss": 0.5},
                              "layer_steps": (4, 0, 4)} | kw))


def _tamper(data: bytes, **fields) -> bytes:
    body = json.loads(data)
    body.update(fields)
    return json.dumps(body).encode()


@pytest.fixture()
def dev():
    return Identity.generate()


def test_a_signed_message_round_trips_with_the_signers_key(dev):
    topic = topics.device_topic("f", "dev0", "update")
    data = encode_message(_update(), dev, topic)
    assert json.loads(data)["sig"]["kid"] == dev.fingerprint
    m = decode_message(data, UpdateManifest, PinnedKey(dev.public), topic)
    assert m == _update()
    # an insecure receiver ignores the signature (a signed server, an insecure device)
    assert decode_message(data, UpdateManifest) == _update()


@pytest.mark.parametrize("field,value", [("round", 4), ("run_id", "run-2"), ("n_samples", 10**9),
                                         ("update_id", "u2"), ("metrics", {"train_loss": 0.1}),
                                         ("layer_steps", [4, 4, 4]),
                                         ("payload", {"payload_id": "u1", "size": 1000, "sha256": "cd" * 32,
                                                      "n_chunks": 1})])
def test_changing_any_covered_field_breaks_the_signature(dev, field, value):
    """round and run id (no replay into another round or run), the weight, the metrics, and the
    payload's sha256 (so the chunks are covered)."""
    topic = topics.device_topic("f", "dev0", "update")
    forged = _tamper(encode_message(_update(), dev, topic), **{field: value})
    with pytest.raises(ProtocolError, match="bad signature on the update message"):
        decode_message(forged, UpdateManifest, PinnedKey(dev.public), topic)


def test_the_topic_is_covered_no_replay_on_another_topic_or_fleet(dev):
    data = encode_message(Hello("dev0", {}, "1", 10), dev, topics.device_topic("f", "dev0", "hello"))
    for other in (topics.device_topic("g", "dev0", "hello"), topics.device_topic("f", "dev0", "heartbeat")):
        with pytest.raises(ProtocolError, match="bad signature"):
            decode_message(data, Hello, PinnedKey(dev.public), other)


def test_unsigned_and_wrongly_signed_messages_are_refused(dev):
    topic = topics.round_topic("f")
    m = RoundManifest("run-1", 1, "train", ("dev0",), None, 60.0)
    with pytest.raises(ProtocolError, match="unsigned round message"):
        decode_message(encode_message(m), RoundManifest, PinnedKey(dev.public), topic)
    forger = Identity.generate()
    with pytest.raises(ProtocolError, match=f"signed by key '{forger.fingerprint}'.*allowed on this topic is "
                                            f"{dev.fingerprint}"):
        decode_message(encode_message(m, forger, topic), RoundManifest, PinnedKey(dev.public), topic)
    # a forger copying the real key id changes nothing
    data = json.loads(encode_message(m, forger, topic))
    data["sig"]["kid"] = dev.fingerprint
    with pytest.raises(ProtocolError, match="bad signature"):
        decode_message(json.dumps(data).encode(), RoundManifest, PinnedKey(dev.public), topic)


@pytest.mark.parametrize("sig", ["x", None, [], {"alg": "rsa", "kid": "k", "sig": "AA=="},
                                 {"alg": "ed25519", "kid": "k"}, {"alg": "ed25519", "kid": "k", "sig": "!!"},
                                 {"alg": "ed25519", "kid": "k", "sig": base64.b64encode(b"x" * 63).decode()},
                                 {"alg": "ed25519", "kid": "k", "sig": 5},
                                 {"alg": "ed25519", "kid": "k", "sig": "AA==", "extra": 1}])
def test_malformed_signature_fields_are_protocol_errors(dev, sig):
    topic = topics.device_topic("f", "dev0", "hello")
    body = json.loads(encode_message(Hello("dev0"), dev, topic))
    body["sig"] = sig
    with pytest.raises(ProtocolError):
        decode_message(json.dumps(body).encode(), Hello, PinnedKey(dev.public), topic)


def test_security_wrapper_and_describe(dev):
    topic = topics.device_topic("f", "dev0", "hello")
    secure = Security(dev, PinnedKey(dev.public))
    assert secure.decode(secure.encode(Hello("dev0"), topic), Hello, topic) == Hello("dev0")
    assert secure.describe() == {"signed": True, "verified": True, "key": dev.fingerprint, "mode": "signed"}
    assert Security().insecure and Security().describe()["mode"] == "insecure"
    assert "sig" not in json.loads(Security().encode(Hello("dev0"), topic))


def test_key_files_are_private_and_never_overwritten(tmp_path):
    path = tmp_path / "keys" / "device.key"
    ident = Identity.create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path).public_text == ident.public_text
    with pytest.raises(ConfigError, match="already there"):
        Identity.create(path)
    again, created = Identity.load_or_create(path)
    assert not created and again.fingerprint == ident.fingerprint
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        Identity.load(path)
    (tmp_path / "junk.key").write_bytes(b"not a key")
    os.chmod(tmp_path / "junk.key", 0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM"):
        Identity.load(tmp_path / "junk.key")


def test_public_key_text_round_trips_and_bad_ones_name_the_problem(dev):
    assert fingerprint(parse_public_key(dev.public_text)) == dev.fingerprint
    assert public_key_text(parse_public_key(dev.public_text)) == dev.public_text
    for bad, why in (("abc", "looks like"), ("ed25519:!!!", "base64"),
                     ("ed25519:" + base64.b64encode(b"x" * 31).decode(), "32 bytes")):
        with pytest.raises(ConfigError, match=why):
            parse_public_key(bad)


def test_enrolment_add_revoke_and_a_running_server_sees_changes(tmp_path):
    a, b = Identity.generate(), Identity.generate()
    t = [0.0]
    server_view = Enrolment(tmp_path, clock=lambda: t[0])   # what a running server holds
    hello = topics.device_topic("f", "dev0", "hello")
    with pytest.raises(ProtocolError, match="dev0 is not enrolled"):
        server_view.key_for(hello)
    operator = Enrolment(tmp_path)                          # the CLI, another process
    operator.add("dev0", a.public_text, max_samples=500)
    t[0] += 1.5   # re-read at most once a second
    assert fingerprint(server_view.key_for(hello)) == a.fingerprint
    assert server_view.max_samples("dev0") == 500
    with pytest.raises(ConfigError, match="enrolled with another key"):
        operator.add("dev0", b.public_text)
    operator.revoke("dev0")
    t[0] += 1.5
    with pytest.raises(ProtocolError, match="dev0 was revoked"):
        server_view.key_for(hello)
    assert not server_view.active("dev0")
    with pytest.raises(ProtocolError, match="not a device topic"):
        server_view.key_for(topics.round_topic("f"))
    operator.add("dev0", b.public_text)   # re-enrolled (a new key after a revocation)
    t[0] += 1.5
    assert fingerprint(server_view.key_for(hello)) == b.fingerprint


def test_a_fresh_check_sees_a_revocation_within_the_second(tmp_path):
    """Before an update is accepted the server checks the file now (one stat), so a revocation takes
    effect at once; other look-ups still re-read at most once a second."""
    t = [0.0]
    Enrolment(tmp_path).add("dev0", Identity.generate().public_text)
    server_view = Enrolment(tmp_path, clock=lambda: t[0])
    Enrolment(tmp_path).revoke("dev0")
    t[0] += 0.5
    assert server_view.active("dev0")                   # the throttled view: not re-read yet
    assert not server_view.active("dev0", fresh=True)   # the fresh check: revoked now
    assert not server_view.active("dev0")


def test_a_corrupt_enrolment_file_keeps_the_last_good_one(tmp_path):
    a = Identity.generate()
    Enrolment(tmp_path).add("dev0", a.public_text)
    t = [0.0]
    view = Enrolment(tmp_path, clock=lambda: t[0])
    (tmp_path / "enrolled.json").write_text("{not json")
    t[0] += 1.5
    assert view.active("dev0")   # still the file read before
    with pytest.raises(ConfigError, match="unreadable"):
        Enrolment(tmp_path)      # a server starting on it says why
    (tmp_path / "enrolled.json").write_text(json.dumps({"format": 1, "devices": {"dev0": {"public_key": "x"}}}))
    with pytest.raises(ConfigError, match="looks like"):
        Enrolment(tmp_path)
