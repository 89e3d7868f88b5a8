"""broker-server push-profile over a real Mosquitto: a device validates, applies and acks a profile,
refuses a bad one with the reason and keeps the previous one, across a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker_server.enrolment import enrol_local_devices
from tests.conftest import make_toy_rows, write_jsonl
from tests.integration.mosquitto import Mosquitto

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()


def _agent(tmp_path: Path, broker: Mosquitto, device: str) -> subprocess.Popen:
    data = write_jsonl(tmp_path / f"{device}.jsonl", make_toy_rows(40))
    server_key = enrol_local_devices(tmp_path / "server", {device: tmp_path / device})   # signed both ways
    return subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "agent", "--broker", broker.url, "--fleet", "pp",
                             "--device-id", device, "--data", str(data), "--state-dir", str(tmp_path / device),
                             "--server-key", server_key],
                            stdout=open(tmp_path / f"{device}.log", "ab"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _push(tmp_path: Path, broker: Mosquitto, path: Path, *target: str, key_dir: str = "server",
          wait: int = 30) -> subprocess.CompletedProcess:
    """Signed with the key of the server in ``tmp_path / key_dir`` (by default the fleet's own)."""
    return subprocess.run([sys.executable, "-m", "broker_server.cli", "push-profile", str(path), "--broker", broker.url,
                           "--fleet", "pp", "--wait", str(wait), "--state-dir", str(tmp_path / key_dir), *target],
                          capture_output=True, text=True, cwd=ROOT, timeout=90)


def _profile(tmp_path: Path, device: str) -> dict:
    return json.loads((tmp_path / device / "profile.json").read_text())


def _wait_connected(tmp_path: Path, device: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if json.loads((tmp_path / device / "status.json").read_text()).get("connected"):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError((tmp_path / f"{device}.log").read_text()[-3000:])


def test_push_reject_keep_previous_and_restart(tmp_path, broker):
    agents = [_agent(tmp_path, broker, d) for d in ("d0", "d1")]
    try:
        for d in ("d0", "d1"):
            _wait_connected(tmp_path, d)
        good = ROOT / "profiles" / "overrides" / "low-memory.yaml"
        res = _push(tmp_path, broker, good, "--device", "d0")
        assert res.returncode == 0 and "d0: accepted" in res.stdout, res.stdout + res.stderr
        first = _profile(tmp_path, "d0")
        assert first["name"] == "low-memory" and first["overrides"]["train"] == {"batch_size": 4, "max_seq_len": 48}
        assert not (tmp_path / "d1" / "profile.json").exists()   # pushed to d0 only

        bad_cases = {
            "method.yaml": ("name: x\ntraining: {method: fdlora}\n", "set by the server for the whole fleet"),
            "batch.yaml": ("name: x\ntraining: {train: {batch_size: 0}}\n", "train.batch_size must be >= 1, got 0"),
            "typo.yaml": ("name: x\ntraining: {train: {bach_size: 4}}\n", "unknown keys ['bach_size']"),
        }
        for name, (text, reason) in bad_cases.items():
            (tmp_path / name).write_text(text)
            res = _push(tmp_path, broker, tmp_path / name, "--device", "d0")
            assert res.returncode == 1 and "REJECTED" in res.stdout and reason in res.stdout, res.stdout
            assert _profile(tmp_path, "d0") == first   # the previous profile stays in force

        # a push signed by any other key (a forged server) is refused unread: no ack, nothing applied
        (tmp_path / "rogue.yaml").write_text("name: rogue\ntraining: {train: {batch_size: 2}}\n")
        res = _push(tmp_path, broker, tmp_path / "rogue.yaml", "--device", "d0", key_dir="rogue", wait=5)
        assert res.returncode == 2 and "no answer from d0" in res.stdout, res.stdout + res.stderr
        assert _profile(tmp_path, "d0") == first
        bad = json.loads((tmp_path / "d0" / "status.json").read_text())["bad_messages"]
        assert "bad signature on the profile message" in bad["last"]["reason"], bad

        (tmp_path / "broken.yaml").write_text("name: [x\n")
        res = _push(tmp_path, broker, tmp_path / "broken.yaml", "--device", "d0")
        assert res.returncode != 0 and "not valid YAML: line" in res.stderr   # never published

        status = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "status", "--state-dir",
                                 str(tmp_path / "d0"), "--json"], capture_output=True, text=True, cwd=ROOT)
        assert json.loads(status.stdout)["profile"]["name"] == "low-memory"

        # the whole fleet: both devices answer
        (tmp_path / "all.yaml").write_text("name: short\ntraining: {train: {max_seq_len: 32}}\n")
        res = _push(tmp_path, broker, tmp_path / "all.yaml", "--all")
        assert res.returncode == 0 and "d0: accepted" in res.stdout and "d1: accepted" in res.stdout, res.stdout
        assert _profile(tmp_path, "d1")["name"] == "short"

        # a restarted device gets the retained pushes again and keeps the newest valid profile
        agents[0].terminate()
        agents[0].wait(30)
        agents[0] = _agent(tmp_path, broker, "d0")
        _wait_connected(tmp_path, "d0")
        time.sleep(2)
        assert _profile(tmp_path, "d0")["name"] == "short"
    finally:
        for a in agents:
            a.kill()
            a.wait(10)
