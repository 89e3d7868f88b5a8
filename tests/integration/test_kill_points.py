"""The server SIGKILLed at every point of a round where a crash could lose or double-count work,
one after the other in one run, restarted each time: the run finishes, each round's global is the
aggregate of exactly the updates the server recorded, and every device counts once per round.

The points (``EDGE_RUNTIME_CRASH_AT``, see ``edge_runtime/service/faults.py``): before an update is
written, written but not yet in the state, in the state but not acked, every update recorded but the
round not closed (the restart that once opened a round with no participants), the new global written
but not the state, the next round saved but not announced, the outputs written but "done" not saved.
"""

from __future__ import annotations

import pytest

from tests.integration.mosquitto import Mosquitto
from tests.integration.test_mqtt_fleet import ProcessFleet

pytestmark = pytest.mark.integration

POINTS = ["update:before_write", "update:before_save", "update:before_ack", "close:before_aggregate",
          "close:after_global_write", "round:after_save", "update:before_ack:2", "close:before_aggregate",
          "done:before_save"]


def test_server_killed_at_every_point_of_a_round_resumes_and_counts_once(tmp_path):
    broker = Mosquitto(tmp_path / "mosquitto").start()
    fleet = ProcessFleet(tmp_path, broker, rounds=2, epochs=3)
    try:
        fleet.start_server(env={"EDGE_RUNTIME_CRASH_AT": POINTS[0]})
        for k in range(3):
            fleet.start_agent(k)
        for i, point in enumerate(POINTS):
            code = fleet.server.wait(240)
            assert code == -9, f"the server was to be killed at {point} but exited {code}:\n" + fleet.log("server.log")
            stale = fleet.state_dir / "global" / ".round_00001.safetensors.deadbeef.tmp"
            stale.parent.mkdir(exist_ok=True)
            stale.write_bytes(b"half a file")   # what a kill in the middle of a write leaves
            nxt = POINTS[i + 1] if i + 1 < len(POINTS) else None
            fleet.start_server(env={"EDGE_RUNTIME_CRASH_AT": nxt} if nxt else None)
        s = fleet.assert_complete_and_exactly_once(every_device_every_round=False)
        assert fleet.server.wait(60) == 0, fleet.log("server.log")
        log = fleet.log("server.log")
        assert log.count("resuming run") >= 1 and "Traceback" not in log
        assert all(h["participants"] for h in s["history"][1:])   # no round ever ran without participants
        assert not list(fleet.state_dir.rglob("*.tmp"))            # stale temp files cleaned at each start
        for k, p in fleet.agents.items():
            assert p.wait(60) == 0, fleet.log(f"dev{k}.log")
    finally:
        fleet.close()
        broker.stop()
