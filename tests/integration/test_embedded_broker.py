"""The embedded broker (``broker-server broker``, amqtt: what ``edge-runtime demo`` starts) carries a
whole federation: server + 3 agent processes, tiny model, 2 rounds, every update counted exactly once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from broker_server.broker import free_port, start_broker_process
from tests.integration.test_mqtt_fleet import ProcessFleet

pytestmark = pytest.mark.integration


class EmbeddedBroker:
    def __init__(self, log_path) -> None:
        self.port = free_port()
        self.log = open(log_path, "ab")
        self.proc = start_broker_process("127.0.0.1", self.port, self.log)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def test_a_federation_runs_over_the_embedded_broker(tmp_path):
    broker = EmbeddedBroker(tmp_path / "broker.log")
    fleet = ProcessFleet(tmp_path, broker, rounds=2, epochs=3)
    try:
        fleet.start()
        s = fleet.assert_complete_and_exactly_once()
        for k, p in fleet.agents.items():
            assert p.wait(60) == 0, fleet.log(f"dev{k}.log")
        assert broker.proc.poll() is None, (tmp_path / "broker.log").read_text()[-3000:]
        assert s["history"][-1]["bytes_up"] > 0
    finally:
        fleet.close()
        broker.stop()
    assert broker.proc.returncode is not None


def test_embedded_broker_command_starts_and_stops_cleanly(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "broker_server.cli", "broker", "--host", "127.0.0.1", "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    from broker_server.broker import wait_for_port

    try:
        wait_for_port("127.0.0.1", port, proc=proc)
    finally:
        proc.terminate()
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
