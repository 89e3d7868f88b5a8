"""Every kind of bad update gets a reject with a reason, changes nothing, and the server keeps serving."""

import json
import queue
import threading
import time

import pytest
import torch

from broker_server.coordinator import Coordinator, ServerConfig
from broker_server.store import Store
from edge_runtime.algorithms.layer_dropout import SHAPES
from edge_runtime.methods import droppeft
from edge_runtime.protocol import topics
from edge_runtime.protocol.chunking import split_payload
from edge_runtime.protocol.codec import (decode_message, encode_message,
                                         encode_tensors)
from edge_runtime.protocol.messages import (Ack, Heartbeat, Hello,
                                            RoundManifest, Status,
                                            UpdateManifest)
from edge_runtime.transport.memory import MemoryBroker, MemoryTransport
from tests.fleet_helpers import initial_global, toy_spec

F = "t"


class FakeDevice:
    def __init__(self, broker, device_id):
        self.id = device_id
        self.t = MemoryTransport(broker, device_id)
        self.acks: queue.Queue = queue.Queue()
        self.t.subscribe(topics.device_topic(F, device_id, "ack"), lambda t, p: self.acks.put(decode_message(p, Ack)))
        self.t.start()

    def hello(self):
        self.t.publish(topics.device_topic(F, self.id, "hello"), encode_message(Hello(self.id, {}, "t", 100)), retain=True)
        self.t.publish(topics.device_topic(F, self.id, "status"), encode_message(Status(self.id, True)), retain=True)
        self.t.publish(topics.device_topic(F, self.id, "heartbeat"), encode_message(Heartbeat(self.id, "idle", -1, 0.0)))

    def send(self, round_, update_id, blob=None, n_samples=10, frames=None, payload_id=None, run_id="run-test"):
        ref, fr = split_payload(payload_id or update_id, blob, 1000) if blob is not None else (None, [])
        m = UpdateManifest(run_id, self.id, round_, update_id, ref, n_samples, {"eval_accuracy": 0.5, "eval_n": 3})
        self.t.publish(topics.device_topic(F, self.id, "update"), encode_message(m))
        for f in (frames if frames is not None else fr):
            self.t.publish(topics.device_topic(F, self.id, "update/chunk"), f)

    def ack(self, timeout=10.0) -> Ack:
        return self.acks.get(timeout=timeout)


def _serve(tmp_path, spec, rounds: int, phase: str, **cfg_kw):
    """A coordinator serving in a thread, two fake devices said hello, the first round open in ``phase``."""
    broker = MemoryBroker()
    cfg = ServerConfig(fleet=F, rounds=rounds, training=spec.to_json(),
                       **({"min_devices": 2, "deadline_s": 300, "max_update_bytes": 200_000} | cfg_kw))
    coord = Coordinator(cfg, Store(tmp_path / "server"), MemoryTransport(broker, "server"), initial_global(spec),
                        run_id="run-test")
    stop = threading.Event()
    th = threading.Thread(target=coord.serve, args=(stop,), daemon=True)
    th.start()
    devs = [FakeDevice(broker, f"d{k}") for k in range(2)]
    for d in devs:
        d.hello()
    deadline = time.monotonic() + 10
    state_file = tmp_path / "server" / "state.json"
    # the phase in memory, and on disk: the round's start is saved just after the phase is set
    while coord.phase != phase or json.loads(state_file.read_text())["phase"] != phase:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    def close():
        stop.set()
        th.join(5)

    return coord, devs, broker, close


@pytest.fixture
def server(tmp_path):
    coord, devs, broker, close = _serve(tmp_path, toy_spec(), 3, "train")
    yield coord, devs, broker, tmp_path / "server"
    close()


def _state(path):
    return json.loads((path / "state.json").read_text())


def _wait_round(coord, round_, timeout=10.0):
    deadline = time.monotonic() + timeout
    while coord.state["round"] != round_:
        assert time.monotonic() < deadline, f"still in round {coord.state['round']}"
        time.sleep(0.05)


def _good(coord, scale=1.0):
    return {k: v + scale for k, v in coord.global_state.items()}


def _assert_nothing_accepted(coord, path):
    assert coord.state["accepted"] == {}
    assert _state(path)["accepted"] == {}


def test_round_manifest_is_retained_for_late_joiners(server):
    coord, devs, broker, _ = server
    m = decode_message(broker.retained[topics.round_topic(F)], RoundManifest)
    assert (m.round, m.action, m.participants) == (1, "train", ("d0", "d1"))
    assert topics.global_chunk_topic(F, 0) in broker.retained


def test_malformed_payload_is_rejected(server):
    coord, devs, _, path = server
    devs[0].send(1, "u1", b"this is not safetensors")
    a = devs[0].ack()
    assert not a.accepted and "not valid safetensors" in a.reason
    _assert_nothing_accepted(coord, path)


def test_corrupted_chunk_is_rejected_with_retry(server):
    coord, devs, _, path = server
    ref, frames = split_payload("u1", encode_tensors(_good(coord)), 1000)
    bad = bytearray(frames[1])
    bad[-3] ^= 0x55
    devs[0].send(1, "u1", encode_tensors(_good(coord)), frames=[frames[0], bytes(bad)] + frames[2:])
    a = devs[0].ack()
    assert not a.accepted and a.retry and "sha256 mismatch" in a.reason
    _assert_nothing_accepted(coord, path)
    # the device re-sends the same update intact: accepted
    devs[0].send(1, "u1", encode_tensors(_good(coord)))
    assert devs[0].ack().accepted


def test_truncated_chunk_is_rejected(server):
    coord, devs, _, path = server
    _, frames = split_payload("u1", encode_tensors(_good(coord)), 1000)
    devs[0].send(1, "u1", encode_tensors(_good(coord)), frames=[frames[0][:-100]] + frames[1:])
    a = devs[0].ack()
    assert not a.accepted and "sha256 mismatch" in a.reason
    _assert_nothing_accepted(coord, path)


def test_whole_payload_sha_mismatch_is_rejected(server):
    coord, devs, _, path = server
    blob = bytearray(encode_tensors(_good(coord)))
    ref, frames = split_payload("u1", bytes(blob), 1000)
    blob[-1] ^= 1
    _, other = split_payload("u1", bytes(blob), 1000)   # chunk sha fine, whole-payload sha differs
    devs[0].send(1, "u1", bytes(blob), frames=frames[:-1] + other[-1:])
    a = devs[0].ack()
    assert not a.accepted and ("sha256" in a.reason or "disagrees" in a.reason)
    _assert_nothing_accepted(coord, path)


def test_oversized_declared_size_is_rejected_before_allocating(server):
    coord, devs, _, path = server
    m = UpdateManifest("run-test", "d0", 1, "u1", split_payload("u1", b"x" * 300_000)[0], 10, {})
    devs[0].t.publish(topics.device_topic(F, "d0", "update"), encode_message(m))
    a = devs[0].ack()
    assert not a.accepted and "over the 200000-byte limit" in a.reason
    assert coord.ingest.reassembler.buffered_bytes == 0
    _assert_nothing_accepted(coord, path)


@pytest.mark.parametrize("mutate, reason", [
    (lambda s: {**s, "extra.weight": torch.zeros(2)}, "keys differ"),
    (lambda s: {k: v for i, (k, v) in enumerate(s.items()) if i}, "keys differ"),
    (lambda s: {k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if i == 0 else v) for i, (k, v) in enumerate(s.items())},
     "shape"),
    (lambda s: {k: (v.double() if i == 0 else v) for i, (k, v) in enumerate(s.items())}, "dtype"),
    (lambda s: {k: (torch.full_like(v, float("nan")) if i == 0 else v) for i, (k, v) in enumerate(s.items())}, "NaN"),
    (lambda s: {k: (torch.full_like(v, float("inf")) if i == 0 else v) for i, (k, v) in enumerate(s.items())}, "NaN"),
])
def test_wrong_keys_shapes_dtypes_and_nonfinite_values_rejected(server, mutate, reason):
    coord, devs, _, path = server
    devs[0].send(1, "u1", encode_tensors(mutate(_good(coord))))
    a = devs[0].ack()
    assert not a.accepted and reason in a.reason and not a.retry
    _assert_nothing_accepted(coord, path)


@pytest.mark.parametrize("round_, reason", [(0, "stale update"), (2, "future round")])
def test_stale_and_future_rounds_rejected(server, round_, reason):
    coord, devs, _, path = server
    devs[0].send(round_, "u1", encode_tensors(_good(coord)))
    a = devs[0].ack()
    assert not a.accepted and reason in a.reason
    _assert_nothing_accepted(coord, path)


def test_unknown_device_rejected(server):
    coord, devs, broker, path = server
    stranger = FakeDevice(broker, "stranger")
    stranger.send(1, "u1", encode_tensors(_good(coord)))
    a = stranger.ack()
    assert not a.accepted and "unknown device" in a.reason
    _assert_nothing_accepted(coord, path)


def test_wrong_run_and_garbage_manifest(server):
    coord, devs, broker, path = server
    devs[0].send(1, "u1", encode_tensors(_good(coord)), run_id="other-run")
    assert "run other-run" in devs[0].ack().reason
    devs[0].t.publish(topics.device_topic(F, "d0", "update"), b"{garbage")
    devs[0].t.publish(topics.device_topic(F, "d0", "hello"), b'{"v":10,"type":"hello","device_id":"d1"}')
    time.sleep(0.3)
    assert any("update manifest from d0" in r["reason"] for r in coord.state["rejects"])
    _assert_nothing_accepted(coord, path)


def test_duplicate_delivery_counted_once_and_the_round_completes(server):
    coord, devs, _, path = server
    blob0 = encode_tensors(_good(coord, 1.0))
    devs[0].send(1, "u0", blob0)
    assert devs[0].ack().accepted
    devs[0].send(1, "u0", blob0)                           # the same update again
    a = devs[0].ack()
    assert a.accepted and a.reason == "duplicate"
    devs[0].send(1, "u0-other", blob0)                     # a second, different update
    assert "already has update u0" in devs[0].ack().reason
    assert list(_state(path)["accepted"]) == ["d0"]
    before = {k: v.clone() for k, v in coord.global_state.items()}
    devs[1].send(1, "u1", encode_tensors(_good(coord, 3.0)), n_samples=30)
    assert devs[1].ack().accepted
    _wait_round(coord, 2)
    # (1 * 10 + 3 * 30) / 40 = 2.5 added to every tensor: d0 counted exactly once
    for k, v in coord.global_state.items():
        torch.testing.assert_close(v, before[k] + 2.5)
    hist = _state(path)["history"]
    assert hist[1]["accepted"] == ["d0", "d1"]


def test_server_keeps_serving_after_bad_input(server):
    coord, devs, _, path = server
    devs[0].send(1, "bad", b"junk")
    assert not devs[0].ack().accepted
    devs[1].send(1, "good1", encode_tensors(_good(coord)))
    assert devs[1].ack().accepted
    devs[0].send(1, "good0", encode_tensors(_good(coord)))
    assert devs[0].ack().accepted
    _wait_round(coord, 2)
    assert sorted(_state(path)["history"][-1]["accepted"]) == ["d0", "d1"]


def test_bad_score_reports_are_refused_and_good_ones_choose_the_layers(tmp_path):
    import dataclasses

    from edge_runtime.methods.prompt import PromptConfig

    spec = dataclasses.replace(toy_spec(), method="fedpeptao", prompt=PromptConfig(length=2))
    coord, devs, broker, close = _serve(tmp_path, spec, 1, "score")
    try:
        def report(dev, uid, metrics, n=10, blob=None):
            ref, frames = split_payload(uid, blob, 1000) if blob is not None else (None, [])
            dev.t.publish(topics.device_topic(F, dev.id, "update"),
                          encode_message(UpdateManifest("run-test", dev.id, 0, uid, ref, n, metrics)))
            for f in frames:
                dev.t.publish(topics.device_topic(F, dev.id, "update/chunk"), f)
            return dev.ack()

        bad = [({"layer_score.0": 1.0}, 10, None, "lacks a score"),              # layer 1 missing
               ({"layer_score.0": 1.0, "layer_score.1": "high"}, 10, None, "lacks a score"),  # NaN: the codec refuses
               ({"layer_score.0": 1.0, "layer_score.1": 2.0}, 0, None, "n_samples"),
               ({"layer_score.0": 1.0, "layer_score.1": 2.0}, 10, b"x" * 10, "metrics only")]
        for i, (metrics, n, blob, reason) in enumerate(bad):
            ack = report(devs[0], f"bad{i}", metrics, n, blob)
            assert not ack.accepted and reason in ack.reason, ack
        assert coord.state["phase"] == "score" and coord.state["accepted"] == {}
        assert report(devs[0], "ok0", {"layer_score.0": 1.0, "layer_score.1": 5.0}, 10).accepted
        assert report(devs[1], "ok1", {"layer_score.0": 4.0, "layer_score.1": 3.0}, 30).accepted
        _wait_round(coord, 1)
        # (10 * [1, 5] + 30 * [4, 3]) / 40 = [3.25, 3.5]: layer 1 wins; the global keeps its prompt only
        assert coord.state["selection"]["shared_layers"] == [1]
        assert coord.state["selection"]["layer_scores"] == pytest.approx([3.25, 3.5])
        assert {k for k in coord.global_state if "prompt." in k} == {"prompt.1", "cv.prompt.1"}
        m = decode_message(broker.retained[topics.round_topic(F)], RoundManifest)
        assert m.action == "train" and m.round == 1
    finally:
        close()


def test_droppeft_updates_without_block_step_counts_are_refused_and_assignments_travel(tmp_path):
    import dataclasses

    from edge_runtime.protocol.codec import encode_tensors

    spec = dataclasses.replace(toy_spec(), method="droppeft")
    coord, devs, broker, close = _serve(tmp_path, spec, 1, "train")
    try:
        m = decode_message(broker.retained[topics.round_topic(F)], RoundManifest)
        assert set(m.assignments) == {"d0", "d1"}                     # each participant's configuration
        assert all(set(a["droppeft"]) == {"ratio", "shape"} for a in m.assignments.values())
        assert coord.state["configurator"]["d0"]["feasible"]

        def send(dev, uid, metrics, layer_steps=()):
            blob = encode_tensors(_good(coord))
            ref, frames = split_payload(uid, blob, 1000)
            dev.t.publish(topics.device_topic(F, dev.id, "update"),
                          encode_message(UpdateManifest("run-test", dev.id, 1, uid, ref, 10, metrics, layer_steps)))
            for f in frames:
                dev.t.publish(topics.device_topic(F, dev.id, "update/chunk"), f)
            return dev.ack()

        base = {"train_steps": 4, "drop_ratio": 0.0, "drop_shape": 0, "train_seconds": 1.0}
        old_style = {**base, "layer_steps.0": 4, "layer_steps.1": 2}   # the protocol-1 metric keys: no weight
        for k, (metrics, steps, reason) in enumerate(((old_style, (), "layer_steps has 0 entries"),
                                                      (base, (4,), "layer_steps has 1 entries"),
                                                      (base, (4, 9), "layer_steps[1]=9 is not a step count"))):
            ack = send(devs[0], f"bad{k}", metrics, steps)
            assert not ack.accepted and reason in ack.reason, ack
        assert coord.state["accepted"] == {}
        good = {**base, "val_loss_before": 2.0, "val_loss_after": 1.5}
        assert send(devs[0], "ok0", good, (4, 2)).accepted and send(devs[1], "ok1", good, (3, 4)).accepted
        _wait_round(coord, 2)
        row = coord.state["history"][-1]
        assert row["layer_steps"] == {"d0": [4, 2], "d1": [3, 4]} and set(row["configurator"]["rewards"]) == {"d0", "d1"}
        # the bandit's statistics: a JSON document beside the global, named by the state; no bandit tensors
        conf = json.loads((coord.store.root / coord.state["configurator_file"]).read_text())
        assert set(droppeft.bandit_state(conf, coord.spec)) == {"d0", "d1"}
        assert not any(k.startswith("bandit") for k in coord.server_state) and "server_file" not in coord.state
    finally:
        close()
    # a state saved by a protocol-1 server (the statistics as bandit.* tensors, no configurator file) migrates
    root, doc = coord.store.root, _state(coord.store.root)
    bandit_doc = conf[droppeft.BANDIT]
    legacy = {"bandit.arms": torch.tensor([[r, SHAPES.index(sh)] for r, sh in bandit_doc["arms"]], dtype=torch.float64)}
    for d, st in bandit_doc["devices"].items():
        legacy[f"bandit.n.{d}"], legacy[f"bandit.s.{d}"] = torch.tensor(st["n"]), torch.tensor(st["s"])
    coord.store.write_tensors(root / "server" / "legacy.safetensors", legacy)
    doc.pop("configurator_file")
    (root / "state.json").write_text(json.dumps({**doc, "server_file": "server/legacy.safetensors"}))
    again = Coordinator(ServerConfig(fleet=F, rounds=1, training=spec.to_json(), min_devices=2), Store(root),
                        MemoryTransport(MemoryBroker(), "server"), initial_global(spec), run_id="run-test")
    assert again.server_state == {}
    assert {d: (st.n, st.s) for d, st in droppeft.bandit_state(again.configurator_state, spec).items()} == \
        {d: (st["n"], pytest.approx(st["s"])) for d, st in bandit_doc["devices"].items()}
    # the next round's close points the state at the JSON only: the legacy tensor file is named no more
    again.rounds._persist_method_state(2, {}, again.configurator_state)
    assert "server_file" not in again.state and again.state["configurator_file"] == "server/configurator_00002.json"
    assert json.loads((root / "server" / "configurator_00002.json").read_text()) == again.configurator_state


def test_round_manifest_assignments_are_validated():
    from edge_runtime.protocol.messages import ProtocolError

    for bad in ({"no spaces!": {}}, {"d0": 3}, ["d0"]):
        with pytest.raises(ProtocolError, match="assignments"):
            RoundManifest("run-1", 1, "train", ("d0",), None, 10.0, {}, 0.0, None, bad)


def test_a_failing_configurator_leaves_the_round_running_without_assignments(tmp_path, monkeypatch):
    import dataclasses

    from edge_runtime.methods import droppeft

    def unreadable(*args):
        raise OSError("config.json: permission denied")

    monkeypatch.setattr(droppeft, "arm_peaks", unreadable)
    coord, devs, broker, close = _serve(tmp_path, dataclasses.replace(toy_spec(), method="droppeft"), 1, "train")
    try:
        m = decode_message(broker.retained[topics.round_topic(F)], RoundManifest)
        assert m.action == "train" and m.assignments == {} and coord.state["configurator"] == {}
    finally:
        close()


def test_agent_resends_back_off_exponentially_with_jitter_and_a_cap(tmp_path):
    """Three devices used to re-send 32,027 / 2,864 / 56,065 times in 90 s to a server that refused them."""
    from edge_runtime.agent import RESEND_BACKOFF_CAP_S, Agent, AgentConfig
    from edge_runtime.transport.memory import MemoryBroker, MemoryTransport
    from tests.conftest import make_toy_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", make_toy_rows(30))
    now = [1000.0]
    agent = Agent(AgentConfig("d0", str(data), tmp_path / "s", ack_timeout_s=30.0),
                  MemoryTransport(MemoryBroker(), "d0"), clock=lambda: now[0])
    waits = [agent.uploader.backoff() for _ in range(10)]
    for i, w in enumerate(waits):
        full = min(RESEND_BACKOFF_CAP_S, 1.0 * 2 ** i)
        assert full / 2 <= w <= full, (i, w)
    assert waits[-1] <= RESEND_BACKOFF_CAP_S and waits[6] > waits[1]
    up = agent.uploader
    assert up.hold_until == now[0] + waits[-1] and up.sent_at is None   # no send before the hold ends
    assert agent.uploader.resend_after == 30.0                    # the ack wait is the ack timeout ...
    assert agent.uploader.backoff(timeout=True) >= 30.0          # ... and only grows after timeouts
    assert agent.uploader.resend_after >= 30.0
    agent.shutdown()


def test_an_update_counts_at_most_the_examples_its_hello_declared(server):
    coord, devs, _, path = server
    before = {k: v.clone() for k, v in coord.global_state.items()}
    devs[0].send(1, "u0", encode_tensors(_good(coord, 1.0)), n_samples=10**9)   # its hello said 100
    assert devs[0].ack().accepted
    devs[1].send(1, "u1", encode_tensors(_good(coord, 3.0)), n_samples=100)
    assert devs[1].ack().accepted
    _wait_round(coord, 2)
    for k, v in coord.global_state.items():   # (1 * 100 + 3 * 100) / 200 = 2
        torch.testing.assert_close(v, before[k] + 2.0)
    assert _state(path)["history"][1]["defence"]["capped"] == {"d0": [10**9, 100]}
