"""Floods, forged manifests and a full disk against a live fleet: real Mosquitto, the real server
and three real agents (tiny model). Each once stalled or stopped the fleet; now no process exits,
the honest rounds complete, and every update counts exactly once.

- 5,000 retained hellos from ids that never heartbeat, before the fleet starts: none is selected,
  the honest round is not held up, each costs the server one short journal line (and a restart
  that replays them writes nothing);
- one registered device streams unfinished chunks far past its share: it is refused with a reason
  to back off, the others' updates still go through;
- a retained round manifest asking for 1,000,000 epochs at lr 5.0: every agent refuses it with the
  reason in its status and keeps working for the real server;
- the server's disk fills mid-round: updates are refused as retryable, nothing on disk is damaged,
  the server stays up, and the run finishes once space returns.
(Malformed messages: test_hostile_messages.py; kill points: test_kill_points.py.)
"""

from __future__ import annotations

import json
import time

import paho.mqtt.client as paho
import pytest

from edge_runtime.protocol import topics
from edge_runtime.protocol.chunking import split_payload
from edge_runtime.protocol.codec import encode_message
from edge_runtime.protocol.messages import Hello, PayloadRef, RoundManifest, UpdateManifest
from edge_runtime.protocol.signing import Identity
from tests.conftest import fill_disk
from tests.integration.mosquitto import Mosquitto
from tests.integration.test_mqtt_fleet import ProcessFleet

pytestmark = pytest.mark.integration
FLEET = "it"


def _client(port: int) -> paho.Client:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"attacker-{time.monotonic_ns()}")
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def _publish_all(port: int, items) -> None:
    c = _client(port)
    infos = [c.publish(t, p, qos=1, retain=r) for t, p, r in items]
    for info in infos:
        info.wait_for_publish(60)
    c.loop_stop()
    c.disconnect()


def test_hello_flood_chunk_flood_and_forged_manifest_do_not_stop_the_honest_fleet(tmp_path):
    broker = Mosquitto(tmp_path / "mosquitto").start()
    # insecure: any hello registers a device, the worst case for a flood (a signed fleet refuses
    # these unread: test_identity_fleet, test_signed_fleet_ignores_a_flood_of_unsigned_hellos)
    fleet = ProcessFleet(tmp_path, broker, rounds=2, epochs=3, extra_server_args=("--max-update-mb", "2"),
                         secure=False)
    try:
        _publish_all(broker.port, [(topics.device_topic(FLEET, f"fake{i}", "hello"),
                                    encode_message(Hello(f"fake{i}", {"memory_total": 8 << 30}, "0.1", 10**6)), True)
                                   for i in range(5000)])
        fleet.start()
        fleet.wait_for(lambda s: s.get("round") == 1 and s.get("phase") == "train", "round 1 to open")
        # a registered device that streams unfinished chunks: 3 payloads of 2 MiB each, never sent whole
        evil = "evil"
        _publish_all(broker.port, [   # registered, so its chunks are buffered; never heartbeats, so never selected
            (topics.device_topic(FLEET, evil, "hello"), encode_message(Hello(evil, {}, "0.1", 10)), False)])
        fleet.wait_for(lambda s: "evil" in s["devices"], "the attacker's registration", 30)
        items = []
        for p in range(3):
            _, frames = split_payload(f"junk{p}", bytes([p]) * (2 << 20), 128 * 1024)
            items += [(topics.device_topic(FLEET, evil, "update/chunk"), f, False) for f in frames[:-1]]
        # a forged retained manifest for the devices: a run of its own, 10^6 epochs at lr 5.0
        training = fleet.state()["training"]
        forged = RoundManifest("run-forged", 1, "train", ("dev0", "dev1", "dev2"),
                               PayloadRef("g-forged", 10, "0" * 64, 1), 600.0,
                               {**training, "train": {**training["train"], "epochs": 1_000_000, "lr": 5.0}},
                               time.time())
        items.append((topics.round_topic(FLEET), encode_message(forged), True))
        _publish_all(broker.port, items)
        s = fleet.assert_complete_and_exactly_once()
        assert all(set(h["participants"]) <= {"dev0", "dev1", "dev2"} for h in s["history"][1:])
        # registered (as many as Mosquitto replays at a subscribe: it drops retained messages past its
        # per-client queue, max_queued_messages 1000), never selected
        assert len(s["devices"]) > 900
        assert any("over its share" in r["reason"] for r in s["rejects"]), s["rejects"][-5:]
        journal = fleet.state_dir / "devices.jsonl"
        assert journal.stat().st_size / len(s["devices"]) < 1024                # one short line a device
        assert (fleet.state_dir / "state.json").stat().st_size < 200_000         # the registry is not in it
        for k in range(3):
            st = json.loads((tmp_path / f"dev{k}" / "status.json").read_text())
            refused = st.get("refused_manifest") or {}
            assert "train.epochs = 1000000" in refused.get("reason", ""), st
            assert "refused the manifest of run run-forged" in fleet.log(f"dev{k}.log")
        assert fleet.server.wait(60) == 0, fleet.log("server.log")
        # a restart replays the 5,000 retained hellos: nothing new is written for them
        size = journal.stat().st_size
        fleet.start_server()
        assert fleet.server.wait(60) == 0, fleet.log("server.log")
        assert journal.stat().st_size == size
        assert "Traceback" not in fleet.log("server.log")
    finally:
        fleet.close()
        broker.stop()


def test_signed_fleet_ignores_a_flood_of_unsigned_hellos_and_forgeries_by_a_logged_in_client(tmp_path):
    """A client with a broker login but no enrolled key: 2,000 unsigned hellos, hellos and an
    update signed by its own key (one in dev0's name), a forged retained manifest signed by its key.
    Nothing registers, nothing counts; the agents refuse the manifest and finish the real run."""
    broker = Mosquitto(tmp_path / "mosquitto").start()
    fleet = ProcessFleet(tmp_path, broker, rounds=2, epochs=3)
    rogue = Identity.generate()

    def signed(topic, msg, retain=False):
        return topic, encode_message(msg, rogue, topic), retain

    try:
        _publish_all(broker.port, [(topics.device_topic(FLEET, f"fake{i}", "hello"),
                                    encode_message(Hello(f"fake{i}", {}, "0.1", 10**6)), True) for i in range(2000)])
        fleet.start()
        fleet.wait_for(lambda s: s.get("round") == 1 and s.get("phase") == "train", "round 1 to open")
        run_id, training = fleet.state()["run_id"], fleet.state()["training"]
        forged = RoundManifest("run-forged", 1, "train", ("dev0", "dev1", "dev2"), None, 600.0, training,
                               time.time() + 3600)
        _publish_all(broker.port, [
            signed(topics.round_topic(FLEET), forged, True),
            signed(topics.device_topic(FLEET, "dev0", "update"),
                   UpdateManifest(run_id, "dev0", 1, "uforged", None, 10**9)),
            signed(topics.device_topic(FLEET, "dev0", "hello"), Hello("dev0", {}, "0.1", 10**9), True),
            signed(topics.device_topic(FLEET, "rogue", "hello"), Hello("rogue", {}, "0.1", 10**6), True)])
        s = fleet.assert_complete_and_exactly_once()
        assert set(s["devices"]) == {"dev0", "dev1", "dev2"}          # nothing of the flood was registered
        assert s["devices"]["dev0"]["n_samples"] < 10**6
        reasons = " | ".join(r["reason"] for r in s["rejects"])
        assert "is not enrolled on this server" in reasons and "bad signature on the update message" in reasons
        assert s["security"]["mode"] == "signed"
        for k in range(3):
            st = json.loads((tmp_path / f"dev{k}" / "status.json").read_text())
            assert st["run_id"] == run_id and st["security"]["mode"] == "signed"
            assert "bad signature on the round message" in fleet.log(f"dev{k}.log")
        assert fleet.server.wait(60) == 0, fleet.log("server.log")
    finally:
        fleet.close()
        broker.stop()


def test_server_disk_fills_mid_round_it_stays_up_and_finishes_when_space_returns(tmp_path, small_disk):
    broker = Mosquitto(tmp_path / "mosquitto").start()
    fleet = ProcessFleet(tmp_path, broker, rounds=2, epochs=3, state_dir=small_disk / "server")
    try:
        fleet.start()
        fleet.wait_for(lambda s: s.get("round") == 1 and s.get("phase") == "train", "round 1 to open")
        filler = fill_disk(small_disk)
        state_before = (fleet.state_dir / "state.json").read_bytes()
        deadline = time.monotonic() + 90
        while "cannot store update" not in fleet.log("server.log"):
            assert time.monotonic() < deadline, fleet.log("server.log")
            assert fleet.server.poll() is None, fleet.log("server.log")
            time.sleep(0.2)
        time.sleep(3)
        assert fleet.server.poll() is None, fleet.log("server.log")          # still serving
        assert (fleet.state_dir / "state.json").read_bytes() == state_before  # nothing persisted was touched
        filler.unlink()
        s = fleet.assert_complete_and_exactly_once()
        assert fleet.server.wait(60) == 0, fleet.log("server.log")
        assert "Traceback" not in fleet.log("server.log")
        retried = [r for r in s["rejects"] if "cannot store updates" in r["reason"]]
        assert retried, s["rejects"][-5:]
    finally:
        fleet.close()
        broker.stop()
