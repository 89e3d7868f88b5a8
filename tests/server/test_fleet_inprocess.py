"""A whole federation in one process over the in-memory transport: server + 3 agents, tiny model."""

from broker_server.store import Store
from tests.fleet_helpers import InProcessFleet


def test_three_devices_two_rounds_complete_and_learn(tmp_path):
    fleet = InProcessFleet(tmp_path, n_devices=3, rounds=2)
    fleet.start()
    try:
        fleet.wait_done()
    finally:
        fleet.close()
    state = Store(tmp_path / "server").load()   # state.json + the registry journal
    hist = state["history"]
    assert [h["round"] for h in hist] == [0, 1, 2]
    assert all(sorted(h["accepted"]) == ["dev0", "dev1", "dev2"] for h in hist[1:])
    assert hist[-1]["final"] is True
    # a learning signal through the whole protocol path (thresholds for learning itself live in the
    # simulation tests; this federation's 90 test examples make accuracy steps coarse)
    assert hist[2]["loss"] < 0.95 * hist[0]["loss"], [h["loss"] for h in hist]
    assert hist[2]["accuracy"] > hist[0]["accuracy"], [h["accuracy"] for h in hist]
    assert all(d["rounds_done"] == 2 for d in state["devices"].values())
    assert (tmp_path / "server" / "global" / "round_00002.safetensors").exists()
