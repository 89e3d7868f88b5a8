"""Compressed uploads through the real server and agents (in-memory transport): the server rebuilds
each update as the global plus the decoded delta, stores and checks that, counts the bytes that
travelled against the uncompressed size; bad compressed payloads are refused with their reason; an
agent keeps its error-feedback residual only for updates the server accepted."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from broker_server.store import Store
from edge_runtime.agent.residual import (FILE, commit_residual, load_residual,
                                         stage_residual)
from edge_runtime.algorithms.compression import CompressionConfig
from edge_runtime.protocol.codec import encode_tensors
from edge_runtime.round.wire import decode_update, encode_update
from tests.fleet_helpers import InProcessFleet, initial_global, toy_spec
from tests.server.test_bad_input import _assert_nothing_accepted, _serve

INT4_TOPK = CompressionConfig(uplink="int4", topk=0.3)


def _spec(comp=INT4_TOPK):
    return dataclasses.replace(toy_spec(), compression=comp)


@pytest.fixture
def server(tmp_path):
    coord, devs, broker, close = _serve(tmp_path, _spec(), 3, "train")
    yield coord, devs, tmp_path / "server"
    close()


def test_the_server_stores_the_global_plus_the_decoded_delta(server):
    coord, devs, path = server
    g = coord.global_state
    upload = {k: v + 0.01 * torch.arange(v.numel(), dtype=torch.float32).reshape(v.shape) for k, v in g.items()}
    data, residual = encode_update(upload, g, INT4_TOPK)
    devs[0].send(1, "u1", data)
    a = devs[0].ack()
    assert a.accepted, a.reason
    rec = coord.state["accepted"]["d0"]
    stored = safetensors_load((path / rec["file"]).read_bytes())
    expect = decode_update(data, g, INT4_TOPK)
    assert all(torch.equal(stored[k], expect[k]) for k in g)   # bit for bit what the device will assume
    # what was not sent is the residual, exactly
    for k in g:
        torch.testing.assert_close(stored[k] - g[k] + residual[k], upload[k] - g[k], rtol=0, atol=1e-6)
    assert rec["bytes"] == len(data) and rec["raw_bytes"] == len(encode_tensors(expect)) > 3 * len(data)


def _bad(coord, fn):
    """A compressed update with its safetensors buffers changed by ``fn`` (as an attacker would)."""
    data, _ = encode_update({k: v + 0.5 for k, v in coord.global_state.items()}, coord.global_state, INT4_TOPK)
    (size,) = __import__("struct").unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + size])["__metadata__"]
    tensors = dict(safetensors_load(data))
    fn(tensors, meta)
    return safetensors_save(tensors, metadata=meta)


def _nan_scale(t, m):
    t["scales"] = t["scales"].clone()
    t["scales"][0] = float("nan")


def _short_scales(t, m):
    t["scales"] = t["scales"][:-1].clone()


def _indices_out_of_range(t, m):
    head = json.loads(m["edge_delta"])
    name, shape, kept, _ = head["tensors"][0]
    head["tensors"][0][3] = "index"   # claim indices, and give one past the end
    n = 1
    for s in shape:
        n *= s
    t.pop("mask")
    others = [e for e in head["tensors"][1:] if e[3] == "mask"]
    for e in others:
        e[3] = "index"
    t["index"] = torch.cat([torch.arange(kept - 1, dtype=torch.int32), torch.tensor([n], dtype=torch.int32)]
                           + [torch.arange(e[2], dtype=torch.int32) for e in others])
    m["edge_delta"] = json.dumps(head)


@pytest.mark.parametrize("fn,reason", [(_nan_scale, "scales must be finite"),
                                       (_short_scales, "the scales buffer"),
                                       (_indices_out_of_range, "indices out of")])
def test_bad_compressed_updates_are_refused_with_their_reason(server, fn, reason):
    coord, devs, path = server
    devs[0].send(1, "u1", _bad(coord, fn))
    a = devs[0].ack()
    assert not a.accepted and reason in a.reason, a.reason
    _assert_nothing_accepted(coord, path)
    # a plain (uncompressed) state is refused too: the run agreed on int4 deltas
    devs[0].send(1, "u2", encode_tensors({k: v + 0.5 for k, v in coord.global_state.items()}))
    a = devs[0].ack()
    assert not a.accepted and "edge_delta" in a.reason, a.reason


def test_the_residual_is_kept_only_for_an_accepted_update(tmp_path):
    ref = {"w": torch.zeros(4), "step": torch.zeros(1, dtype=torch.int64)}
    pending = tmp_path / "pending" / "u1.safetensors"
    staged = stage_residual(pending, {"w": torch.tensor([1.0, 2, 3, 4])}, "run-a")
    assert load_residual(tmp_path, "run-a", ref) is None   # staged only
    commit_residual(tmp_path, str(staged), accepted=True)
    assert not staged.exists() and (tmp_path / FILE).exists()
    assert load_residual(tmp_path, "run-a", ref)["w"].tolist() == [1.0, 2, 3, 4]
    assert load_residual(tmp_path, "run-b", ref) is None                     # another run starts from zero
    assert load_residual(tmp_path, "run-a", {"w": torch.zeros(5)}) is None  # another adapter too
    refused = stage_residual(tmp_path / "pending" / "u2.safetensors", {"w": torch.ones(4)}, "run-a")
    commit_residual(tmp_path, str(refused), accepted=False)
    assert not refused.exists() and load_residual(tmp_path, "run-a", ref)["w"].tolist() == [1.0, 2, 3, 4]
    (tmp_path / FILE).write_bytes(b"garbage")
    assert load_residual(tmp_path, "run-a", ref) is None


def test_a_compressed_fleet_learns_and_reports_its_bytes(tmp_path):
    fleet = InProcessFleet(tmp_path, n_devices=3, rounds=2, spec=_spec())
    fleet.start()
    try:
        fleet.wait_done()
    finally:
        fleet.close()
    state = Store(tmp_path / "server").load()
    hist = state["history"]
    assert all(sorted(h["accepted"]) == ["dev0", "dev1", "dev2"] for h in hist[1:])
    assert hist[2]["loss"] < hist[0]["loss"], [h["loss"] for h in hist]
    for h in hist[1:3]:
        assert h["bytes_up_raw"] > 3 * h["bytes_up"] > 0, h
    for k in range(3):   # each device kept the residual of its last accepted update
        r = load_residual(tmp_path / f"dev{k}", "run-test", fleet.coordinator.global_state)
        assert r is not None and all(float(v.abs().sum()) > 0 for v in r.values())


@pytest.mark.parametrize("comp", [CompressionConfig(uplink="int4", downlink="int4", topk=0.5),
                                  CompressionConfig(uplink="nf2", downlink="nf2", block=128),
                                  CompressionConfig(uplink="int4", downlink="int4", rank=2)],
                         ids=["int4-top50", "nf2", "int4-rank2"])
def test_both_ways_compressed_devices_hold_the_servers_global_bit_for_bit_and_resync(tmp_path, comp):
    """Compressed up and down, two of three devices a round: a device that sat a round out holds no
    base for the next delta and fetches the whole global (a resync); every device holds exactly the
    server's bytes of the last global it worked on."""
    spec = _spec(comp)
    if comp.rank:   # BERT's trained 32 x 32 pooler travels as rank-2 factors (tiny Llama has no such matrix)
        from edge_runtime.algorithms.compression import lowrank_shape

        spec = dataclasses.replace(spec, model="tiny-bert")
        assert any(lowrank_shape(tuple(v.shape), comp.rank) for v in initial_global(spec)().values())
    # seed 1 picks dev0+dev1, dev1+dev2, dev0+dev2, dev0+dev1: dev0 and dev1 each sit one round out
    fleet = InProcessFleet(tmp_path, n_devices=3, rounds=4, spec=spec, devices_per_round=2, seed=1)
    fleet.start()
    try:
        fleet.wait_done()
    finally:
        fleet.close()
    hist = Store(tmp_path / "server").load()["history"]
    for k in range(3):
        record = json.loads((tmp_path / f"dev{k}" / "model" / "device.json").read_text())
        server = tmp_path / "server" / "global" / f"round_{record['global_round']:05d}.safetensors"
        assert (tmp_path / f"dev{k}" / "model" / "global.safetensors").read_bytes() == server.read_bytes(), k
    for h in hist[1:5]:
        assert h["bytes_down_raw"] > 3 * h["bytes_down"] > 0, h
    resyncs = {a.cfg.device_id: a.fetcher.resyncs for a in fleet.agents}
    # a device that took part, sat a round out, and came back (before its first round a device
    # listens to the whole global anyway: it has nothing to apply a delta to)
    came_back = {d for r in range(2, 4) for d in hist[r + 1]["participants"] if d not in hist[r]["participants"]
                 and any(d in hist[j]["participants"] for j in range(1, r))}
    assert came_back, [h["participants"] for h in hist]
    assert all(resyncs[d] >= 2 for d in came_back), (resyncs, came_back)   # at the start, and after sitting out
