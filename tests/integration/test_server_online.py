"""A server that connects after its devices starts round 1 at once, not a heartbeat interval later.

Over a real Mosquitto: the agent connects first (its on-connect heartbeat reaches nobody, the server
is not subscribed yet), then the server. The server selects only devices it hears heartbeat, so
before the agent answered the server's online status with a heartbeat, round 1 waited for the
agent's next one (here 60 s away).
"""

from __future__ import annotations

import threading
import time

import pytest

from broker_server.coordinator import Coordinator, ServerConfig
from broker_server.store import Store
from edge_runtime.agent import Agent, AgentConfig
from edge_runtime.protocol import topics
from edge_runtime.protocol.codec import Security
from edge_runtime.protocol.messages import Status
from edge_runtime.transport.mqtt import BrokerAddress, MqttTransport
from tests.fleet_helpers import device_files, initial_global, toy_spec

pytestmark = pytest.mark.integration
HEARTBEAT_S = 60.0


def _until(pred, timeout: float) -> float | None:
    """Seconds until ``pred()`` held, or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def test_a_server_that_connects_after_its_device_opens_round_1_without_waiting_a_heartbeat(tmp_path, mosquitto):
    spec = toy_spec()
    agent = Agent(AgentConfig("dev0", str(device_files(tmp_path, 1)[0]), tmp_path / "dev0", fleet="t",
                              heartbeat_s=HEARTBEAT_S, warm_up=False),
                  MqttTransport(BrokerAddress.parse(mosquitto.url), client_id="dev0"))
    stop = threading.Event()
    threads = [threading.Thread(target=agent.run, daemon=True)]
    threads[0].start()
    coord = None
    try:
        assert _until(lambda: agent.transport._connected.is_set(), 10) is not None
        time.sleep(1.0)   # the agent's on-connect heartbeat is long gone
        coord = Coordinator(ServerConfig(fleet="t", rounds=1, min_devices=1, training=spec.to_json(),
                                         heartbeat_timeout_s=3 * HEARTBEAT_S),
                            Store(tmp_path / "server"), MqttTransport(BrokerAddress.parse(mosquitto.url), client_id="server"),
                            initial_global(spec), run_id="run-late-server")
        threads.append(threading.Thread(target=coord.serve, args=(stop,), daemon=True))
        threads[1].start()
        opened = _until(lambda: coord.state["round"] >= 1, 20)
        assert opened is not None, f"round 1 did not open within 20 s (heartbeats every {HEARTBEAT_S:.0f} s)"
        assert opened < 10
    finally:
        stop.set()
        agent.stop_event.set()
        for t in threads:
            t.join(15)
        agent.transport.stop()
        if coord is not None:
            coord.transport.stop()


def test_the_online_nudge_is_rate_limited_and_ignores_offline_and_other_clients(tmp_path):
    """A flood of (retained, replayed or repeated) server statuses costs one heartbeat a second."""
    from edge_runtime.transport.memory import MemoryBroker, MemoryTransport

    mem = MemoryBroker()
    agent = Agent(AgentConfig("dev0", str(device_files(tmp_path, 1)[0]), tmp_path / "dev0", fleet="t",
                              heartbeat_s=HEARTBEAT_S, warm_up=False), MemoryTransport(mem, "dev0"))
    beats = []
    agent.presence.heartbeat = lambda: beats.append(time.monotonic())
    topic = topics.server_status_topic("t")
    for msg in (Status("server", False), Status("dev1", True)):
        agent.handle(topic, Security().encode(msg, topic))
    assert beats == []
    for _ in range(50):
        agent.handle(topic, Security().encode(Status("server", True), topic))
    assert len(beats) == 1
    agent.presence.nudged_at -= 1.0   # a second later, the next status brings one more
    agent.handle(topic, Security().encode(Status("server", True), topic))
    assert len(beats) == 2
    agent.handle(topic, b'{"v": 1, "type": "status", "client_id": 3}')   # malformed: counted, ignored
    assert len(beats) == 2 and agent.bad_messages["count"] == 1
