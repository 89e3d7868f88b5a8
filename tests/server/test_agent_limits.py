"""A device does only what its limits allow, whatever a (retained, forged) manifest asks; it writes
only the init payload the run in force names."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.agent import Agent, AgentConfig
from edge_runtime.protocol import topics
from edge_runtime.protocol.chunking import split_payload
from edge_runtime.protocol.codec import encode_message
from edge_runtime.protocol.messages import RoundManifest
from edge_runtime.service.limits import ManifestLimits, ManifestRefused
from edge_runtime.transport.memory import MemoryBroker, MemoryTransport
from tests.fleet_helpers import device_files, toy_spec

ROOT = Path(__file__).resolve().parents[2]


def _training(**train):
    d = toy_spec().to_json()
    d["train"] = {**d["train"], **train}
    return d


@pytest.mark.parametrize("change, reason", [
    (lambda d: d["train"].update(epochs=1_000_000), "train.epochs = 1000000"),
    (lambda d: d["train"].update(lr=5.0), "train.lr = 5.0"),
    (lambda d: d["train"].update(batch_size=100_000), "train.batch_size"),
    (lambda d: d["train"].update(max_seq_len=1_000_000), "train.max_seq_len"),
    (lambda d: d["train"].update(max_steps=10**9), "train.max_steps"),
    (lambda d: d["fdlora"].update(personal_epochs=500), "fdlora.personal_epochs"),
    (lambda d: d["fdlora"].update(fusion_evals=10**7), "fdlora.fusion_evals"),
    (lambda d: d["lora"].update(rank=4096), "lora.rank"),
    (lambda d: d.update(model="/etc"), "not a known model name"),
    (lambda d: d["train"].update(epochs=19, batch_size=1), "steps, over this device's limit"),
])
def test_limits_refuse_out_of_range_settings_naming_them(change, reason):
    d = _training()
    change(d)
    with pytest.raises(ManifestRefused, match=reason.replace(".", r"\.").replace("(", r"\(")):
        ManifestLimits(max_steps=20_000).check(d, {}, n_examples=5000)


def test_limits_pass_honest_settings_and_ignore_the_servers_own():
    d = _training()
    d["fedpeptao"]["server"]["lr"] = 1.0       # the server's optimiser: not the device's business
    ManifestLimits().check(d, {"global": 900_000}, n_examples=5000)
    with pytest.raises(ManifestRefused, match="global payload"):
        ManifestLimits(max_payload_bytes=1000).check(d, {"global": 900_000}, n_examples=10)


def test_model_paths_only_under_the_models_dir(tmp_path):
    (tmp_path / "models" / "m1").mkdir(parents=True)
    lim = ManifestLimits(models_dir=tmp_path / "models")
    lim.check_model(str(tmp_path / "models" / "m1"))
    lim.check_model("m1")
    lim.check_model("minilm-l6")
    for bad in (str(tmp_path), "../x", "/etc", str(tmp_path / "models" / ".." / "other")):
        with pytest.raises(ManifestRefused, match="not under"):
            lim.check_model(bad)


def _agent(tmp_path, broker):
    f = device_files(tmp_path, 1)[0]
    agent = Agent(AgentConfig("dev0", str(f), tmp_path / "dev0", fleet="t", heartbeat_s=1.0),
                  MemoryTransport(broker, "dev0"))
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()
    return agent, th


def _status(tmp_path):
    try:
        return json.loads((tmp_path / "dev0" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def test_forged_manifest_is_refused_and_reported_and_unnamed_init_payloads_never_hit_the_disk(tmp_path):
    broker = MemoryBroker()
    attacker = MemoryTransport(broker, "attacker")
    attacker.start()
    gref, gframes = split_payload("g1", b"x" * 1000)
    forged = RoundManifest("run-x", 1, "train", ("dev0",), gref, 60.0, _training(epochs=1_000_000), time.time())
    attacker.publish(topics.round_topic("t"), encode_message(forged), retain=True)
    agent, th = _agent(tmp_path, broker)
    try:
        for i in range(30):   # 30 init payloads nobody asked for
            _, frames = split_payload(f"init-junk{i}", bytes([i]) * 50_000)
            attacker.publish(topics.init_chunk_topic("t", 0), frames[0])
        deadline = time.monotonic() + 10
        while not (_status(tmp_path).get("refused_manifest") or {}).get("reason"):
            assert time.monotonic() < deadline, _status(tmp_path)
            time.sleep(0.05)
        st = _status(tmp_path)
        assert "train.epochs = 1000000" in st["refused_manifest"]["reason"]
        assert st["activity"] == "idle" and agent.manifest is None     # nothing trained, nothing fetched
        assert not list((tmp_path / "dev0").glob("init/*"))              # no init payload written
        attacker.publish(topics.round_topic("t"), b'{"v":10,"type":[]}')   # malformed: counted, shown
        deadline = time.monotonic() + 10
        while not (_status(tmp_path).get("bad_messages") or {}).get("count"):
            assert time.monotonic() < deadline, _status(tmp_path)
            time.sleep(0.05)
        out = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "status", "--state-dir",
                              str(tmp_path / "dev0")], capture_output=True, text=True, cwd=ROOT).stdout
        assert "REFUSED the manifest of run run-x round 1: train.epochs = 1000000" in out, out
        assert "1 malformed message(s) ignored" in out and "type must be a string" in out, out
        # the run in force names one init payload: that one (only) is kept on disk
        iref, iframes = split_payload("init-real", b"r" * 30_000)
        for k, fr in enumerate(iframes):
            attacker.publish(topics.init_chunk_topic("t", k), fr, retain=True)
        honest = RoundManifest("run-x", 1, "train", ("other",), gref, 60.0, _training(), time.time(), iref)
        attacker.publish(topics.round_topic("t"), encode_message(honest), retain=True)
        deadline = time.monotonic() + 10
        while not list((tmp_path / "dev0").glob("init/*")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        assert [p.name for p in (tmp_path / "dev0" / "init").iterdir()] == ["init-real.safetensors"]
    finally:
        agent.stop_event.set()
        th.join(10)
