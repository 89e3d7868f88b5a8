"""A pushed device profile changes that device's local training from its next round, and only its."""

import time

from edge_runtime.protocol import topics
from edge_runtime.protocol.codec import decode_message, encode_message
from edge_runtime.protocol.messages import ProfileAck, ProfilePush
from edge_runtime.transport.memory import MemoryTransport
from tests.fleet_helpers import InProcessFleet


def test_profile_applies_from_the_next_round_on_that_device_only(tmp_path):
    fleet = InProcessFleet(tmp_path, n_devices=2, rounds=2)
    operator = MemoryTransport(fleet.broker, "operator")
    acks = []
    operator.subscribe(topics.device_wildcard("t", "profile/ack"), lambda t, p: acks.append(decode_message(p, ProfileAck)))
    operator.start()
    push = ProfilePush("p-small", {"name": "tiny-steps", "training": {"train": {"max_steps": 2}}}, time.time())
    operator.publish(topics.device_topic("t", "dev1", "profile"), encode_message(push), retain=True)
    fleet.start()
    try:
        fleet.wait_done(timeout=180)
    finally:
        fleet.close()
        operator.stop(1.0)
    hist = fleet.coordinator.state["history"]
    assert [a.device_id for a in acks] == ["dev1"] and acks[0].accepted and acks[0].applies_from_round == 0
    for row in hist[1:3]:
        assert row["steps"]["dev1"] == 2, row["steps"]       # the profile's max_steps
        assert row["steps"]["dev0"] > 2, row["steps"]        # the run's own settings
