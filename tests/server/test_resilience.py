"""The server under floods, restarts, failing methods and a full disk: it keeps serving, what is on
disk stays consistent, and nothing counts twice (in-process, over the in-memory transport)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from broker_server.coordinator import Coordinator, ServerConfig
from broker_server.store import Store
from edge_runtime.protocol import topics
from edge_runtime.protocol.codec import encode_message, encode_tensors
from edge_runtime.protocol.messages import Hello
from edge_runtime.transport.memory import MemoryTransport
from tests.conftest import fill_disk
from tests.fleet_helpers import TOY_CORPUS, initial_global, toy_spec
from tests.server.test_bad_input import F, _good, _serve, _wait_round

ROOT = Path(__file__).resolve().parents[2]


def _until(pred, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _hellos(broker, n, prefix="fake", profile=None):
    t = MemoryTransport(broker, f"flood-{prefix}")
    t.start()
    for i in range(n):
        d = f"{prefix}{i}"
        t.publish(topics.device_topic(F, d, "hello"), encode_message(Hello(d, profile or {"memory_total": 8 << 30},
                                                                            "0.1", 100)), retain=True)
    return t


def test_hello_flood_appends_to_the_journal_and_never_rewrites_the_state(tmp_path):
    coord, devs, broker, close = _serve(tmp_path, toy_spec(), 3, "train")
    try:
        root = tmp_path / "server"
        state_stat = (root / "state.json").stat()
        journal_before = (root / "devices.jsonl").stat().st_size
        _hellos(broker, 3000)
        _until(lambda: len(coord.fleet.devices) == 3002 and coord.hellos.empty(), "the hellos", 60)
        mark = time.time()
        _until(lambda: not coord.fleet.dirty and coord.flushed_at > mark, "the registry flush", 5)
        per_hello = ((root / "devices.jsonl").stat().st_size - journal_before) / 3000
        assert per_hello < 1024, per_hello                       # one short line each
        assert (root / "state.json").stat().st_mtime_ns == state_stat.st_mtime_ns   # no state rewrite at all
        # hello-only devices are not eligible: the round keeps its two heartbeating participants
        assert coord.state["participants"] == ["d0", "d1"]
        assert set(coord.fleet.eligible_ids(time.time())) == {"d0", "d1"}
        # the same hellos again (a restart replays retained ones): nothing is written
        size = (root / "devices.jsonl").stat().st_size
        _hellos(broker, 3000)
        _until(lambda: coord.hellos.empty(), "the replayed hellos", 60)
        time.sleep(1.5)   # past the next flush
        assert (root / "devices.jsonl").stat().st_size == size
        # an update is not held up by hellos queued before it
        _hellos(broker, 3000, prefix="late")
        devs[0].send(1, "u1", encode_tensors(_good(coord)))
        assert devs[0].ack(timeout=20).accepted
    finally:
        close()
    reloaded = Store(tmp_path / "server").load()
    assert len(reloaded["devices"]) >= 3002   # (late hellos still queued at the stop are read again at a restart)
    assert reloaded["accepted"]["d0"]["update_id"] == "u1"


def test_registry_is_bounded_and_evicts_idle_devices_first(tmp_path):
    coord, devs, broker, close = _serve(tmp_path, toy_spec(), 3, "train", max_devices=50)
    try:
        _hellos(broker, 200)
        _until(lambda: coord.hellos.empty() and len(coord.fleet.devices) == 50, "the hellos", 30)
        assert {"d0", "d1"} <= set(coord.fleet.devices)   # participants of the open round are never evicted
        huge = _hellos(broker, 1, prefix="big", profile={"x": "y" * 5000})
        _until(lambda: any("profile over" in r["reason"] for r in coord.state["rejects"]), "the refusal")
        huge.stop()
    finally:
        close()
    assert len(Store(tmp_path / "server").load()["devices"]) == 50   # tombstones replayed


def test_torn_journal_line_is_skipped_and_stale_temp_files_removed(tmp_path):
    store = Store(tmp_path)
    store.append_devices([{"device_id": "a", "n_samples": 1}, {"device_id": "b", "n_samples": 2}])
    with open(store.journal_path, "ab") as f:
        f.write(b'{"device_id":"c","n_sa')         # killed mid-append
    (tmp_path / "global").mkdir()
    (tmp_path / "global" / ".round_00001.safetensors.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".global_adapter.x1.tmp").mkdir()
    assert set(store.load_devices()) == {"a", "b"}
    store.append_devices([{"device_id": "c", "n_samples": 3}])
    assert set(Store(tmp_path).load_devices()) == {"a", "b", "c"}
    assert store.clean_stale_temp() == 2
    assert not list(tmp_path.rglob("*.tmp"))


def test_restart_waits_for_devices_and_never_opens_an_empty_round(tmp_path):
    spec = toy_spec()
    coord, devs, broker, close = _serve(tmp_path, spec, 3, "train", quorum=1.0, deadline_s=1.0)
    devs[0].send(1, "u1", encode_tensors(_good(coord)))
    assert devs[0].ack().accepted
    close()
    coord.transport.stop()
    # the devices go quiet: their retained status says online, but nobody heartbeats
    cfg = ServerConfig(fleet=F, rounds=3, min_devices=2, quorum=1.0, deadline_s=1.0, restart_grace_s=1.5,
                       heartbeat_timeout_s=2.0, training=spec.to_json())
    again = Coordinator(cfg, Store(tmp_path / "server"), MemoryTransport(broker, "server2"), initial_global(spec))
    again.attach()
    again.transport.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.2:   # inside the grace: nothing is decided although the deadline has passed
        again.serve_once(0.05)
    assert (again.state["round"], again.state["phase"]) == (1, "train")
    assert again.state["participants"] == ["d0", "d1"] and list(again.state["accepted"]) == ["d0"]
    while time.monotonic() - t0 < 6:     # grace over, devices silent: d1 leaves the round, d0's update closes it
        again.serve_once(0.05)
    row = again.state["history"][-1]
    assert row["round"] == 1 and row["accepted"] == ["d0"] and row["participants"] == ["d0"]
    # nobody is eligible for round 2: the server waits (persisted) instead of opening an empty round
    assert again.state["phase"] == "waiting" and again.state["next"]["round"] == 2
    assert Store(tmp_path / "server").load()["phase"] == "waiting"
    for d in devs:   # the devices come back: round 2 opens with them
        d.hello()
    deadline = time.monotonic() + 10
    while again.state["phase"] != "train":
        assert time.monotonic() < deadline, again.state
        again.serve_once(0.05)
    assert again.state["round"] == 2 and again.state["participants"] == ["d0", "d1"]
    again.transport.stop()


def test_round_with_no_eligible_device_waits_persisted_then_starts(tmp_path):
    spec = toy_spec()
    coord, devs, broker, close = _serve(tmp_path, spec, 3, "train", quorum=1.0, heartbeat_timeout_s=1.0,
                                        restart_grace_s=1.0)
    try:
        time.sleep(1.5)   # both devices go silent (no heartbeat within the timeout) ...
        for k, d in enumerate(devs):   # ... after sending their updates: round 1 closes, round 2 has nobody
            d.send(1, f"u{k}", encode_tensors(_good(coord)))
            assert d.ack().accepted
        _until(lambda: coord.state["history"] and coord.state["history"][-1]["round"] == 1, "round 1 to close")
        assert coord.state["phase"] == "waiting" and coord.state["participants"] == []
        saved = Store(tmp_path / "server").load()
        assert saved["phase"] == "waiting" and (saved["next"]["round"], saved["next"]["phase"]) == (2, "train")
        deadline = time.monotonic() + 10   # one device heartbeats again: round 2 opens with it after the grace
        while coord.state["round"] != 2:
            assert time.monotonic() < deadline, coord.state
            devs[0].hello()
            time.sleep(0.2)
        assert coord.state["phase"] == "train" and coord.state["participants"] == ["d0"]
    finally:
        close()


class _Failing:
    """The configured method, except that its aggregate raises."""

    def __init__(self, method):
        self._m = method

    def __getattr__(self, name):
        return getattr(self._m, name)

    def aggregate(self, *a, **k):
        raise RuntimeError("boom in aggregate")


def test_failing_aggregate_skips_the_round_visibly_then_fails_the_run(tmp_path):
    coord, devs, broker, close = _serve(tmp_path, toy_spec(), 5, "train", quorum=1.0, max_failed_rounds=2)
    try:
        coord.method = _Failing(coord.method)
        before = {k: v.clone() for k, v in coord.global_state.items()}
        for r in (1, 2):
            for k, d in enumerate(devs):
                d.send(r, f"u{r}{k}", encode_tensors(_good(coord)))
                assert d.ack().accepted
            if r == 1:
                _wait_round(coord, 2)
        _until(lambda: coord.phase == "failed", "the run to fail")
        hist = coord.state["history"]
        assert [h["round"] for h in hist if h.get("failed")] == [1, 2]
        assert all("boom in aggregate" in h["failed"] for h in hist if h.get("failed"))
        for k in before:   # the global never changed
            torch.testing.assert_close(coord.global_state[k], before[k])
        saved = Store(tmp_path / "server").load()
        assert saved["phase"] == "failed" and any("boom" in e["error"] for e in saved["errors"])
        out = subprocess.run([sys.executable, "-m", "broker_server.cli", "status", "--state-dir",
                              str(tmp_path / "server")], capture_output=True, text=True, cwd=ROOT)
        assert "the run FAILED" in out.stdout and "boom in aggregate" in out.stdout, out.stdout + out.stderr
    finally:
        close()


def test_disk_full_refuses_updates_as_retryable_and_resumes_when_space_returns(small_disk):
    spec = toy_spec()
    coord, devs, broker, close = _serve(small_disk, spec, 3, "train")
    try:
        state_before = (small_disk / "server" / "state.json").read_bytes()
        filler = fill_disk(small_disk)
        devs[0].send(1, "u1", encode_tensors(_good(coord)))
        a = devs[0].ack()
        assert not a.accepted and a.retry and "cannot store" in a.reason
        assert coord.state["accepted"] == {}
        assert (small_disk / "server" / "state.json").read_bytes() == state_before   # nothing damaged
        assert not list((small_disk / "server").rglob("*.tmp"))
        filler.unlink()
        devs[0].send(1, "u1", encode_tensors(_good(coord)))
        assert devs[0].ack().accepted
        assert Store(small_disk / "server").load()["accepted"]["d0"]["update_id"] == "u1"
    finally:
        close()


def test_server_started_on_a_full_disk_exits_with_a_one_line_reason(small_disk):
    fill_disk(small_disk)
    corpus = small_disk.parent / "corpus.txt"
    corpus.write_text(" ".join(TOY_CORPUS))
    r = subprocess.run([sys.executable, "-m", "broker_server.cli", "run", "--broker", "mqtt://127.0.0.1:9",
                        "--state-dir", str(small_disk / "server"), "--model", "tiny-llama", "--labels", "a,b",
                        "--tokenizer-corpus", str(corpus)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 75, r.stderr[-3000:]
    assert "disk full" in r.stderr and "Traceback" not in r.stderr


def test_a_participant_that_vanishes_leaves_the_round_at_the_deadline(tmp_path):
    coord, devs, broker, close = _serve(tmp_path, toy_spec(), 3, "train", quorum=1.0, deadline_s=1.5,
                                        heartbeat_timeout_s=1.0)
    try:
        devs[0].send(1, "u0", encode_tensors(_good(coord)))
        assert devs[0].ack().accepted
        # d1 never answers and goes silent: with quorum 1.0 the round would wait for it for good
        _until(lambda: coord.state["history"] and coord.state["history"][-1]["round"] == 1, "round 1 to close", 15)
        row = coord.state["history"][-1]
        assert row["accepted"] == ["d0"] and row["participants"] == ["d0"]
    finally:
        close()
