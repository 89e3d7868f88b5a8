"""The agent as a service over a real Mosquitto: --config from install-service, sd_notify on a test
NOTIFY_SOCKET (READY, STATUS, WATCHDOG pings, STOPPING), SIGTERM during local training, restart."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from edge_runtime.service.install import ServiceOptions, install
from tests.integration.mosquitto import Mosquitto
from tests.integration.test_mqtt_fleet import ProcessFleet

pytestmark = pytest.mark.integration


def test_sigterm_during_training_then_restart_loses_no_accepted_work(tmp_path):
    broker = Mosquitto(tmp_path / "mosquitto").start()
    fleet = ProcessFleet(tmp_path, broker)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    messages: list[str] = []
    stop_reading = threading.Event()

    def read() -> None:  # systemd always drains its notify socket
        while not stop_reading.is_set():
            try:
                messages.append(sock.recv(4096).decode())
            except (socket.timeout, OSError):
                pass

    reader = threading.Thread(target=read, daemon=True)
    try:
        install(ServiceOptions("agent", {"device_id": "dev2", "data": str(fleet.files[2]), "fleet": "it",
                                         "keep_running": True, "heartbeat": 1, "server_key": fleet.server_key}),
                prefix=tmp_path / "root", echo=lambda s: None)
        config = tmp_path / "root/etc/edge-runtime/agent.yaml"
        state_dir = tmp_path / "dev2"
        args = ["edge_runtime.cli", "--log-format", "json", "agent", "--config", str(config), "--broker",
                broker.url, "--state-dir", str(state_dir), "--ack-timeout", "4", "--chunk-bytes", "4096"]
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "3000000"}
        reader.start()
        fleet.start_server()
        fleet.start_agent(0)
        fleet.start_agent(1)
        dev2 = fleet.agents[2] = fleet._spawn(args, "dev2.log", env)

        status_path = state_dir / "status.json"
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, fleet.log("dev2.log")
            time.sleep(0.02)
            try:
                if json.loads(status_path.read_text())["activity"] == "training":
                    break
            except (OSError, ValueError, KeyError):
                pass
        accepted_before = fleet.state().get("accepted", {})
        dev2.send_signal(signal.SIGTERM)
        assert dev2.wait(30) == 0, fleet.log("dev2.log")
        time.sleep(0.3)
        messages = list(messages)
        assert messages[0].startswith("READY=1\nSTATUS=device dev2 in fleet it")
        assert any(m.startswith("STATUS=training; round 1") for m in messages), messages
        assert messages.count("WATCHDOG=1") >= 1, messages
        assert "STOPPING=1\nSTATUS=leaving the fleet" in messages
        log_lines = [json.loads(x) for x in fleet.log("dev2.log").splitlines() if x.startswith("{")]
        assert any("abandoned round 1" in x["msg"] for x in log_lines), log_lines[-5:]
        saved = json.loads((state_dir / "agent.json").read_text())
        assert saved["pending"] is None and saved["last_round_done"] == -1  # nothing half-done was kept
        assert json.loads(status_path.read_text())["activity"] == "stopped"
        assert all(fleet.state()["accepted"].get(d) == a for d, a in accepted_before.items())  # nothing lost

        fleet.agents[2] = fleet._spawn(args, "dev2.log", env)  # the service restarts
        s = fleet.assert_complete_and_exactly_once()
        assert s["history"][1]["accepted"] == ["dev0", "dev1", "dev2"]
        out = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "status", "--state-dir", str(state_dir)],
                             capture_output=True, text=True, check=True).stdout
        assert "device dev2 in fleet it: running" in out and "last round done 3" in out, out  # 3: final evaluation
        assert "(done)" in out and "accepted True" in out, out
    finally:
        stop_reading.set()
        sock.close()
        fleet.close()
        broker.stop()
