"""``broker-server provision`` output run by a real Mosquitto: TLS with the generated CA, one login
per device, and the ACL. The broker itself must refuse what the signatures would also refuse."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from broker_server.broker import free_port, wait_for_port
from broker_server.provision import mosquitto_hash, provision, server_user
from edge_runtime.protocol import topics
from edge_runtime.protocol.codec import encode_message
from edge_runtime.protocol.messages import Hello, RoundManifest, UpdateManifest
from edge_runtime.protocol.signing import Identity
from edge_runtime.transport.mqtt import BrokerAddress, MqttTransport

pytestmark = pytest.mark.integration
FLEET = "sec"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto; .ci/run does this)")
    out = tmp_path_factory.mktemp("prov")
    port = free_port()
    r = provision(out, FLEET, ["dev0", "dev1"], ["127.0.0.1", "localhost"], port=port, bind="127.0.0.1")
    conf = out / "broker" / "mosquitto.conf"
    extra = [f"log_dest file {out}/mosquitto.log"] + (["user root"] if os.geteuid() == 0 else [])
    conf.write_text(conf.read_text() + "\n".join(extra) + "\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port("127.0.0.1", port, timeout=10)
    logins = json.loads((out / "credentials.json").read_text())["logins"]
    yield {"out": out, "port": port, "logins": logins, "ca": str(out / "broker" / "ca.crt"), "result": r}
    proc.terminate()
    proc.wait(10)


def test_publishing_from_many_threads_over_tls_never_races_the_network_thread(broker):
    """paho, driven by our own loop thread, used to write a publish from the calling thread while
    the network thread read: two threads in one OpenSSL connection, which corrupts the heap (a
    server died with "malloc(): unsorted double linked list corrupted"). In a subprocess, so a
    crash fails this test instead of killing the run."""
    import sys

    url = f"mqtts://{server_user(FLEET)}:{broker['logins'][server_user(FLEET)]}@127.0.0.1:{broker['port']}"
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("tls_stress.py")), url, broker["ca"], "1500",
                          f"efl/v1/{FLEET}/stress"], capture_output=True, text=True, timeout=240,
                         cwd=Path(__file__).resolve().parents[2])
    # before the fix: "5731 of 6000" and "connection ... lost" twice (or the crash), every run
    assert out.returncode == 0 and "reconnecting" not in out.stderr, (out.returncode, out.stdout, out.stderr[-3000:])
    assert out.stdout.split()[0] == "6000", out.stdout


def test_provision_with_the_operators_own_ca_and_certificate(tmp_path):
    """``--tls-ca/--tls-cert/--tls-key``: the operator's files are checked and used (no CA key is
    written), kept when devices are added later, and a broker run from them serves TLS that
    verifies against the operator's CA."""
    from broker_server.provision import _broker_cert, _ca
    from edge_runtime.errors import ConfigError

    own = tmp_path / "own"
    ca_key, ca_cert = _ca(own, "corp")                   # stands in for the operator's PKI
    _broker_cert(own, ca_key, ca_cert, ["127.0.0.1"])
    files = (own / "broker" / "ca.crt", own / "broker" / "broker.crt", own / "broker" / "broker.key")
    other = tmp_path / "other"
    _ca(other, "other")
    with pytest.raises(ConfigError, match="not issued by the CA"):
        provision(tmp_path / "bad1", "it", ["dev0"], ["127.0.0.1"], own_tls=(other / "broker" / "ca.crt", *files[1:]))
    with pytest.raises(ConfigError, match="is not the key of the certificate"):
        provision(tmp_path / "bad2", "it", ["dev0"], ["127.0.0.1"], own_tls=(*files[:2], other / "ca.key"))
    out, port = tmp_path / "prov", free_port()
    provision(out, "it", ["dev0"], ["127.0.0.1"], port=port, bind="127.0.0.1", own_tls=files)
    provision(out, "it", ["dev0", "dev1"], ["127.0.0.1"], port=port, bind="127.0.0.1")   # a device added later
    assert not (out / "ca.key").exists()
    assert (out / "broker" / "ca.crt").read_bytes() == files[0].read_bytes()
    assert (out / "broker" / "broker.crt").read_bytes() == files[1].read_bytes()
    conf = out / "broker" / "mosquitto.conf"
    conf.write_text(conf.read_text() + "\n".join([f"log_dest file {out}/mosquitto.log"]
                                                 + (["user root"] if os.geteuid() == 0 else [])) + "\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, timeout=10)
        logins = json.loads((out / "credentials.json").read_text())["logins"]
        c = _client({"port": port, "logins": logins, "ca": str(files[0])}, "dev1")
        c.start()
        try:
            assert c.wait_connected(15), "no TLS connection verified by the operator's CA"
        finally:
            c.stop(2)
    finally:
        proc.terminate()
        proc.wait(10)


def _client(b: dict, user: str | None, password: str | None = None, tls: bool = True, name: str = "") -> MqttTransport:
    cred = f"{user}:{password if password is not None else b['logins'][user]}@" if user else ""
    url = f"{'mqtts' if tls else 'mqtt'}://{cred}127.0.0.1:{b['port']}"
    return MqttTransport(BrokerAddress.parse(url), client_id=name or f"t-{user}-{time.monotonic_ns()}",
                         ca_certs=b["ca"] if tls else None, backoff_cap=1.0)


class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.items.append((topic, payload))

    def payloads(self) -> set[bytes]:
        with self.lock:
            return {p for _, p in self.items}


def _started(t: MqttTransport) -> MqttTransport:
    t.start()
    assert t.wait_connected(15), "no connection"
    return t


def test_the_password_hash_is_mosquittos_own(tmp_path):
    """The same salt gives the hash mosquitto_passwd writes (when it is installed)."""
    exe = shutil.which("mosquitto_passwd")
    if exe is None:   # it comes with Debian's mosquitto package, which the other broker tests need too
        raise RuntimeError("mosquitto_passwd is not installed (apt-get install mosquitto; .ci/run does this)")
    f = tmp_path / "p"
    subprocess.run([exe, "-c", "-b", str(f), "u", "secret"], check=True, capture_output=True)
    line = f.read_text().strip().split(":", 1)[1]
    _, _, iterations, salt, _ = line.split("$")
    import base64

    assert mosquitto_hash("secret", base64.b64decode(salt), int(iterations)) == line
    assert mosquitto_hash("other", base64.b64decode(salt), int(iterations)) != line


def test_logins_tls_and_the_acl_are_enforced_by_the_broker(broker):
    b = broker
    server, dev0, dev1 = (_started(_client(b, u)) for u in (server_user(FLEET), "dev0", "dev1"))
    at_server, at_dev1, at_dev0 = Inbox(), Inbox(), Inbox()
    try:
        for kind in ("hello", "update", "update/chunk"):
            server.subscribe(topics.device_wildcard(FLEET, kind), at_server)
        server.subscribe(topics.round_topic(FLEET), at_server)
        dev1.subscribe(topics.round_topic(FLEET), at_dev1)
        dev1.subscribe(topics.global_wildcard(FLEET), at_dev1)
        dev1.subscribe(topics.device_topic(FLEET, "dev1", "ack"), at_dev1)
        dev0.subscribe(topics.device_wildcard(FLEET, "update"), at_dev0)      # another device's updates
        dev0.subscribe(topics.device_topic(FLEET, "dev1", "ack"), at_dev0)    # another device's acks
        time.sleep(1.0)
        # dev0 on its own topic: delivered (the control that shows the checks below can fail)
        dev0.publish(topics.device_topic(FLEET, "dev0", "hello"), b"own-hello")
        # dev0 as dev1, and dev0 as the server: the broker drops both
        dev0.publish(topics.device_topic(FLEET, "dev1", "hello"), b"dev0-as-dev1")
        dev0.publish(topics.device_topic(FLEET, "dev1", "update"), b"dev0-update-as-dev1")
        dev0.publish(topics.round_topic(FLEET), b"forged-round", retain=True)
        dev0.publish(topics.global_topic(FLEET), b"forged-global", retain=True)
        dev0.publish(topics.device_topic(FLEET, "dev1", "ack"), b"forged-ack")
        # the server publishes the fleet's topics; dev1 its own update
        server.publish(topics.round_topic(FLEET), b"real-round", retain=True)
        server.publish(topics.device_topic(FLEET, "dev1", "ack"), b"real-ack")
        dev1.publish(topics.device_topic(FLEET, "dev1", "update"), b"dev1-update")
        for t in (server, dev0, dev1):
            assert t.flush(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not {b"own-hello", b"dev1-update"} <= at_server.payloads():
            time.sleep(0.1)
        time.sleep(1.0)   # time for anything the broker wrongly forwarded to arrive
        assert {b"own-hello", b"dev1-update", b"real-round"} <= at_server.payloads()
        assert not at_server.payloads() & {b"dev0-as-dev1", b"dev0-update-as-dev1", b"forged-round"}
        assert b"real-round" in at_dev1.payloads() and b"real-ack" in at_dev1.payloads()
        assert not at_dev1.payloads() & {b"forged-round", b"forged-global", b"forged-ack"}
        assert at_dev0.payloads() == set(), at_dev0.items     # no device reads another's updates or acks
    finally:
        for t in (server, dev0, dev1):
            t.stop(2)
    # a late subscriber sees the server's retained round, never the forged one
    late = _started(_client(b, "dev1"))
    inbox = Inbox()
    try:
        late.subscribe(topics.round_topic(FLEET), inbox)
        time.sleep(1.5)
        assert inbox.payloads() == {b"real-round"}
    finally:
        late.stop(2)


@pytest.mark.parametrize("how", ["wrong password", "anonymous", "no TLS", "unknown user"])
def test_the_broker_refuses_clients_without_a_valid_login_over_tls(broker, how):
    b = broker
    t = {"wrong password": lambda: _client(b, "dev0", "nope"), "anonymous": lambda: _client(b, None),
         "no TLS": lambda: _client(b, "dev0", tls=False),
         "unknown user": lambda: _client(b, "mallory", "x")}[how]()
    t.start()
    try:
        assert not t.wait_connected(3)
    finally:
        t.stop(1)


def test_re_provisioning_adds_devices_and_keeps_issued_logins(broker, tmp_path):
    out = tmp_path / "p"
    first = provision(out, "f2", ["a"], ["broker.lan"])
    creds = json.loads((out / "credentials.json").read_text())["logins"]
    ca = (out / "broker" / "ca.crt").read_bytes()
    second = provision(out, "f2", ["a", "b"], ["broker.lan"])
    again = json.loads((out / "credentials.json").read_text())["logins"]
    assert first.added == ("a",) and second.added == ("b",)
    assert again["a"] == creds["a"] and (out / "broker" / "ca.crt").read_bytes() == ca
    for p in ("ca.key", "credentials.json", "broker/passwd", "broker/broker.key", "devices/a.env", "server.env"):
        assert (out / p).stat().st_mode & 0o777 == 0o600, p
    assert "pattern write efl/v1/f2/dev/%u/update" in (out / "broker" / "acl").read_text()
    assert (out / "devices" / "b.env").read_text().startswith("EDGE_RUNTIME_BROKER=mqtts://b:")


class ProvisionedBroker:
    """A Mosquitto run from ``broker-server provision`` output, as ProcessFleet takes a broker."""

    def __init__(self, out: Path, fleet: str, devices: list[str]) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.out, self.fleet, self.port = out, fleet, free_port()
        provision(out, fleet, devices, ["127.0.0.1"], port=self.port, bind="127.0.0.1")
        conf = out / "broker" / "mosquitto.conf"
        extra = [f"log_dest file {out}/mosquitto.log"] + (["user root"] if os.geteuid() == 0 else [])
        conf.write_text(conf.read_text() + "\n".join(extra) + "\n")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port, timeout=10)
        self.logins = json.loads((out / "credentials.json").read_text())["logins"]
        self.tls_args = ("--ca-certs", str(out / "broker" / "ca.crt"))

    def url_for(self, who: str) -> str:
        user = server_user(self.fleet) if who == "server" else who
        return f"mqtts://{user}:{self.logins[user]}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_a_signed_fleet_over_the_provisioned_broker_and_a_logged_in_intruder(tmp_path):
    """The whole fleet over TLS + ACL + logins, signed end to end. An intruder with a valid broker
    login ("intruder") but no enrolled key: its signed hello is refused by the server; its
    forged retained manifest and its update in dev0's name never get past the broker."""
    from tests.integration.test_mqtt_fleet import ProcessFleet

    broker = ProvisionedBroker(tmp_path / "prov", "it", ["dev0", "dev1", "dev2", "intruder"])
    fleet = ProcessFleet(tmp_path, broker, rounds=2, epochs=3)
    b = {"port": broker.port, "logins": broker.logins, "ca": broker.tls_args[1]}
    rogue = Identity.generate()
    try:
        fleet.start()
        fleet.wait_for(lambda s: s.get("round") == 1 and s.get("phase") == "train", "round 1 to open")
        intruder = _started(_client(b, "intruder"))
        try:
            state = fleet.state()
            for topic, msg, retain in [
                    (topics.device_topic("it", "intruder", "hello"), Hello("intruder", {}, "0.1", 10**6), True),
                    (topics.round_topic("it"), RoundManifest("run-forged", 1, "train", ("dev0", "dev1", "dev2"),
                                                             None, 600.0, state["training"], time.time() + 3600), True),
                    (topics.device_topic("it", "dev0", "update"),
                     UpdateManifest(state["run_id"], "dev0", 1, "uforged", None, 10**9), False)]:
                intruder.publish(topic, encode_message(msg, rogue, topic), retain=retain)
            assert intruder.flush(10)
        finally:
            intruder.stop(2)
        s = fleet.assert_complete_and_exactly_once()
        assert "intruder" not in s["devices"] and s["security"]["mode"] == "signed"
        reasons = " | ".join(r["reason"] for r in s["rejects"])
        assert "device intruder is not enrolled" in reasons, reasons
        assert "uforged" not in reasons and "bad signature on the update" not in reasons   # the broker dropped it
        for k in range(3):   # the forged manifest never reached them (the broker dropped it, no signature check needed)
            assert "bad signature on the round message" not in fleet.log(f"dev{k}.log")
        assert fleet.server.wait(60) == 0, fleet.log("server.log")
    finally:
        fleet.close()
        broker.stop()


def test_over_the_provisioned_broker_a_replayed_update_and_a_revoked_device_are_refused(tmp_path):
    """dev0's signed round-1 update, captured off the broker, is published again in round 2 with
    dev0's own login (what a compromised device or a leaked capture can do: the ACL lets it
    through); dev2 is revoked once its round-1 update is out. The server refuses both, and round 2
    closes with dev0 and dev1 only."""
    import signal

    from broker_server.enrolment import Enrolment
    from tests.integration.test_mqtt_fleet import ProcessFleet

    broker = ProvisionedBroker(tmp_path / "prov", "it", ["dev0", "dev1", "dev2"])
    fleet = ProcessFleet(tmp_path, broker, rounds=2, epochs=3,
                         extra_server_args=("--quorum", "0.6", "--min-devices", "3", "--deadline", "30"))
    b = {"port": broker.port, "logins": broker.logins, "ca": broker.tls_args[1]}
    captured = Inbox()
    dev2_sent = threading.Event()

    def freeze_dev2(topic: str, payload: bytes) -> None:
        # a tiny model trains a round in well under a second: dev2 is frozen the moment its round-1
        # update goes out, so that the revocation is in place before it can send anything for round 2
        if not dev2_sent.is_set() and json.loads(payload).get("round") == 1:
            fleet.agents[2].send_signal(signal.SIGSTOP)
            dev2_sent.set()

    spy = _started(_client(b, server_user("it")))   # only the server's login may read a device's messages
    spy.subscribe(topics.device_topic("it", "dev0", "update"), captured)
    spy.subscribe(topics.device_topic("it", "dev2", "update"), freeze_dev2)
    try:
        fleet.start()
        assert dev2_sent.wait(120), "dev2 never sent its round-1 update"
        try:
            Enrolment(fleet.state_dir).revoke("dev2")
            # the server re-reads the enrolment within a second of a change (on the next message):
            # dev2 stays frozen until it has, or its round-2 update could still slip in
            deadline = time.monotonic() + 30
            while "enrolment changed" not in fleet.log("server.log") and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            fleet.agents[2].send_signal(signal.SIGCONT)
        fleet.wait_for(lambda s: s.get("round") == 2 and s.get("phase") == "train", "round 2 to open")
        first = [p for _, p in captured.items if json.loads(p).get("round") == 1]
        assert first, ("dev0's round-1 update manifest was never seen", [(t, p[:120]) for t, p in captured.items],
                       fleet.log("dev0.log"))
        replayer = _started(_client(b, "dev0"))
        try:
            replayer.publish(topics.device_topic("it", "dev0", "update"), first[-1])
            assert replayer.flush(10)
        finally:
            replayer.stop(2)
        s = fleet.wait_for(lambda s: s["phase"] == "done", "the run to finish", timeout=240)
    finally:
        spy.stop(2)
        fleet.close()
        broker.stop()
    hist = {h["round"]: h for h in s["history"]}
    # round 1 may close at its deadline with 2 of 3 on a loaded machine; the replay is dev0's, so dev0 is in it
    assert "dev0" in hist[1]["accepted"] and len(hist[1]["accepted"]) >= 2, hist[1]
    assert sorted(hist[2]["accepted"]) == ["dev0", "dev1"]
    replayed_id = json.loads(first[-1])["update_id"]
    replays = [r for r in s["rejects"] if r["from"] == "dev0" and r["update_id"] == replayed_id]
    assert replays and all(r["reason"].startswith("stale update: round 1 is over") for r in replays), s["rejects"]
    reasons = " | ".join(r["reason"] for r in s["rejects"])
    assert "dev2 was revoked" in reasons, reasons
