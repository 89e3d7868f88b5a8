"""Malformed messages, retained and live, on every topic the server and the agents read, over a real
Mosquitto with real processes: nothing exits, the honest round completes, every update counts once.

Each of these once ended a process (and, retained, ended it again on every restart): a control
message whose ``type`` is a list, JSON nested thousands deep, a chunk header that is a list or
nests deep. Live: 2,418 messages (random bytes, deep nesting, and every message kind with one
field of the wrong type) on the 26 topics the server and the agents read, a fifth of them retained.
Floods, forged manifests and a full disk: test_hostile_fleet.py; kill points: test_kill_points.py.
"""

from __future__ import annotations

import json
import random
import struct
import time

import paho.mqtt.client as paho
import pytest

from edge_runtime.protocol import topics
from tests.integration.mosquitto import Mosquitto
from tests.integration.test_mqtt_fleet import ProcessFleet

pytestmark = pytest.mark.integration
FLEET = "it"


def _hostile_payloads(rng: random.Random) -> list[bytes]:
    deep = b"[" * 5000 + b"]" * 5000
    header = struct.pack(">I", 7) + b"[1,2,3]" + b"x"
    deep_header = struct.pack(">I", 4000) + b"[" * 2000 + b"]" * 2000
    fixed = [b'{"v":10,"type":[]}', b'{"v":10,"type":{"a":1}}', deep, b'{"v":10,"type":"hello","device_id":"x",'
             b'"profile":' + b'{"a":' * 50 + b"1" + b"}" * 50 + b"}", header, deep_header, b"\xff\xfe\x00",
             b'{"v":10,"type":"round","run_id":"r","round":1,"action":"train","participants":[[1]]}',
             b'{"v":10,"type":"ack","device_id":"dev0","round":1,"update_id":"u","accepted":"yes"}',
             b"\x00\x00\x00\x00", b"{}", b"null", b'{"v":1e999}']
    return fixed + [rng.randbytes(rng.randint(1, 300)) for _ in range(40)] + _mutated(rng, 40)


_VALID = [  # one message of each kind, as JSON: the mutations below break exactly one field's type
    {"v": 10, "type": "hello", "device_id": "dev0", "profile": {}, "runtime_version": "0.1", "n_samples": 10},
    {"v": 10, "type": "status", "client_id": "dev0", "online": True},
    {"v": 10, "type": "heartbeat", "device_id": "dev0", "state": "idle", "round": 1, "sent_at": 0.0},
    {"v": 10, "type": "update", "run_id": "r", "device_id": "dev0", "round": 1, "update_id": "u1", "payload": None,
     "n_samples": 10, "metrics": {}},
    {"v": 10, "type": "round", "run_id": "r", "round": 1, "action": "train", "participants": ["dev0"],
     "global_payload": None, "deadline_s": 60.0, "training": {}},
    {"v": 10, "type": "ack", "device_id": "dev0", "round": 1, "update_id": "u1", "accepted": True},
]
_WRONG = {str: [None, 5, [], {}], int: ["x", None, [], {"a": 1}, 1.5], float: ["x", None, [], {}],
          bool: ["yes", 2.5, None], list: ["x", 5, {}, None], dict: ["x", 5, [], None], type(None): [[1], "x", 5]}


def _mutated(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        msg = dict(rng.choice(_VALID))
        field = rng.choice([k for k in msg if k not in ("v", "type")])
        msg[field] = rng.choice(_WRONG[type(msg[field])])
        out.append(json.dumps(msg).encode())
    return out


def _topics() -> list[str]:
    dev = [topics.device_topic(FLEET, d, k) for d in ("dev0", "dev1", "evil") for k in
           ("hello", "status", "heartbeat", "update", "update/chunk", "ack", "profile")]
    return [topics.round_topic(FLEET), topics.global_topic(FLEET), topics.global_chunk_topic(FLEET, 0),
            topics.init_chunk_topic(FLEET, 0), f"{topics.ROOT}/{FLEET}/profile", *dev]


def _publish(url_port: int, items: list[tuple[str, bytes, bool]]) -> None:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"attacker-{time.monotonic_ns()}")
    c.connect("127.0.0.1", url_port)
    c.loop_start()
    infos = [c.publish(t, p, qos=1, retain=r) for t, p, r in items]
    for info in infos:
        info.wait_for_publish(10)
    c.loop_stop()
    c.disconnect()


def test_malformed_messages_retained_and_live_stop_no_process(tmp_path):
    rng = random.Random(7)
    broker = Mosquitto(tmp_path / "mosquitto").start()
    fleet = ProcessFleet(tmp_path, broker, rounds=2, epochs=3)
    try:
        bad = _hostile_payloads(rng)
        # retained garbage on every topic before anyone starts: what a restart replays
        _publish(broker.port, [(t, bad[i % len(bad)], True) for i, t in enumerate(_topics())])
        fleet.start()
        fleet.wait_for(lambda s: s.get("round", 0) >= 1 and s.get("phase") == "train", "round 1 to open")
        # live garbage while the round runs: every payload on every topic, some retained
        live = [(t, p, rng.random() < 0.2) for t in _topics() for p in bad]
        assert len(live) >= 2000
        _publish(broker.port, live)
        # one more malformed message on every topic, last: the server keeps its last 100 rejects, and
        # which of the flood's 2,000 land last varies from run to run
        _publish(broker.port, [(t, b'{"v":10,"type":[]}', False) for t in _topics()])
        s = fleet.assert_complete_and_exactly_once()
        assert sorted(s["devices"]) == ["dev0", "dev1", "dev2"]           # no garbage became a device
        assert any("type must be a string" in r["reason"] or "nests deeper" in r["reason"] for r in s["rejects"])
        assert fleet.server.wait(60) == 0, fleet.log("server.log")
        for k, p in fleet.agents.items():
            assert p.wait(60) == 0, fleet.log(f"dev{k}.log")
        # a restart replays whatever is still retained: the server starts, ignores it and stays up
        fleet.start_server()
        time.sleep(8)
        assert fleet.server.poll() in (None, 0), fleet.log("server.log")
        assert "Traceback" not in fleet.log("server.log")
    finally:
        fleet.close()
        broker.stop()
