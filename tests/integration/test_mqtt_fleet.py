"""The real system over a real Mosquitto: server + 3 agent processes, tiny model, failures injected.

Every scenario ends with all rounds complete and each round's global equal to the FedAvg of
exactly the updates the server accepted (recomputed here from the stored update files).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from broker_server.enrolment import enrol_local_devices
from broker_server.store import StateError, Store
from edge_runtime.algorithms.aggregation import Update
from edge_runtime.methods import METHODS
from edge_runtime.round.server import aggregate_checked
from edge_runtime.round.wire import encode_global
from edge_runtime.training.spec import TrainingSpec
from tests.conftest import make_toy_rows, write_jsonl
from tests.fleet_helpers import TOY_CORPUS
from tests.integration.mosquitto import Mosquitto

pytestmark = pytest.mark.integration
ROWS = (120, 300, 600)   # different data sizes spread the devices' finishing times


class ProcessFleet:
    def __init__(self, tmp: Path, broker: Mosquitto, rounds: int = 2, epochs: int = 12,
                 extra_server_args: tuple[str, ...] = (), agent_args: dict[int, tuple[str, ...]] | None = None,
                 state_dir: Path | None = None, secure: bool = True) -> None:
        """``secure``: signed end to end (every device enrolled, the server's key pinned); else
        ``--insecure`` on every process (what an unauthenticated attacker faces without keys)."""
        self.tmp, self.broker, self.rounds, self.epochs = tmp, broker, rounds, epochs
        self.agent_args = agent_args or {}
        self.state_dir = state_dir or tmp / "server"
        corpus = tmp / "corpus.txt"
        corpus.write_text(" ".join(TOY_CORPUS))
        # a provisioned broker (test_broker_acl.Provisioned) has a login per client and a CA to pin
        self.url_for = getattr(broker, "url_for", lambda who: broker.url)
        self.tls_args = tuple(getattr(broker, "tls_args", ()))
        self.server_args = ["broker_server.cli", "run", "--broker", self.url_for("server"), *self.tls_args,
                            "--state-dir", str(self.state_dir),
                            "--fleet", "it", "--rounds", str(rounds), "--min-devices", "3", "--quorum", "1.0",
                            "--deadline", "120", "--eval-deadline", "60", "--heartbeat-timeout", "30",
                            "--model", "tiny-llama", "--labels", "animal,food,tool", "--tokenizer-corpus", str(corpus),
                            "--rank", "4", "--epochs", str(epochs), "--lr", "0.01", "--max-seq-len", "16",
                            *extra_server_args, *(() if secure else ("--insecure",))]
        self.files = [write_jsonl(tmp / f"dev{k}.jsonl", make_toy_rows(n, seed=k)) for k, n in enumerate(ROWS)]
        # signed end to end: every device's key enrolled, the server's pinned
        self.trust = (("--server-key", enrol_local_devices(self.state_dir, {f"dev{k}": tmp / f"dev{k}"
                                                                          for k in range(len(ROWS))}))
                      if secure else ("--insecure",))
        self.server_key = self.trust[1] if secure else None
        self.server: subprocess.Popen | None = None
        self.agents: dict[int, subprocess.Popen] = {}

    def _spawn(self, args: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        return subprocess.Popen([sys.executable, "-m", *args], stdout=open(self.tmp / log, "ab"),
                                stderr=subprocess.STDOUT, env=e, cwd=Path(__file__).resolve().parents[2])

    def start_server(self, env: dict | None = None) -> subprocess.Popen:
        self.server = self._spawn(self.server_args, "server.log", env)
        return self.server

    def start_agent(self, k: int, env: dict | None = None) -> subprocess.Popen:
        self.agents[k] = self._spawn(
            ["edge_runtime.cli", "agent", "--broker", self.url_for(f"dev{k}"), *self.tls_args, "--device-id", f"dev{k}",
             "--fleet", "it",
             "--data", str(self.files[k]), "--state-dir", str(self.tmp / f"dev{k}"), "--ack-timeout", "4",
             "--heartbeat", "1", "--chunk-bytes", "4096", *self.trust,
             *self.agent_args.get(k, ())], f"dev{k}.log", env)
        return self.agents[k]

    def start(self) -> None:
        self.start_server()
        for k in range(3):
            self.start_agent(k)

    def state(self) -> dict:
        try:
            return Store(self.state_dir).load() or {}   # state.json + the registry journal
        except (OSError, StateError):
            return {}

    def wait_for(self, pred, what: str, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.state()
            if s and pred(s):
                return s
            if self.server and self.server.poll() not in (None, 0):
                raise AssertionError(f"server died ({self.server.returncode}):\n" + self.log("server.log"))
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; state: round {self.state().get('round')} "
                             f"phase {self.state().get('phase')}\n--- server log ---\n{self.log('server.log')}")

    def log(self, name: str) -> str:
        p = self.tmp / name
        return p.read_text()[-6000:] if p.exists() else ""

    def close(self) -> None:
        for p in [self.server, *self.agents.values()]:
            if p and p.poll() is None:
                p.kill()
                p.wait(10)

    def assert_complete_and_exactly_once(self, every_device_every_round: bool = True) -> dict:
        """``every_device_every_round=False``: a device that was offline when a round started (after a
        broker restart its reconnect may lose the race with the round's close) may sit that round out."""
        s = self.wait_for(lambda s: s["phase"] == "done", "the run to finish")
        hist = s["history"]
        assert [h["round"] for h in hist] == list(range(self.rounds + 1))
        for h in hist[1:]:
            expected_devices = ["dev0", "dev1", "dev2"] if every_device_every_round else sorted(h["participants"])
            assert sorted(h["accepted"]) == expected_devices, h
            # recompute FedAvg from the accepted update files: each counted exactly once
            files = sorted((self.state_dir / "updates" / f"round_{h['round']:05d}").glob("*.safetensors"))
            assert sorted(f.name.split("__")[0] for f in files) == expected_devices
            method = METHODS[s["training"]["method"]]
            reports = (h.get("configurator") or {}).get("reports", {})
            ups = [Update(d, load_file(f), h["weights"][d], h["steps"][d], reports.get(d, {}),
                          tuple(h.get("layer_steps", {}).get(d, ())))   # DropPEFT's per-block step counts
                   for f in files for d in [f.name.split("__")[0]]]
            before = self.state_dir / "server" / f"round_{h['round'] - 1:05d}.safetensors"
            # the server's path: bounded influence (weight caps, norm bound), then the method's aggregate
            expected = aggregate_checked(method, load_file(self.state_dir / "global" / f"round_{h['round'] - 1:05d}.safetensors"),
                                         ups, load_file(before) if before.exists() else {}, {},
                                         TrainingSpec.from_json(s["training"]),
                                         # the fleet size a method scales by: devices that have done a round so far
                                         len({d for h2 in hist[1:h["round"] + 1] for d in h2["accepted"]}),
                                         h["round"]).global_state
            spec = TrainingSpec.from_json(s["training"])
            if spec.compression.downlink != "none":   # the global in force is what devices rebuild from its delta
                carried = self.state_dir / "server" / f"downlink_{h['round'] - 1:05d}.safetensors"
                _, expected, _ = encode_global(expected, load_file(self.state_dir / "global" / f"round_{h['round'] - 1:05d}.safetensors"),
                                               spec.compression, load_file(carried) if carried.exists() else None)
            got = load_file(self.state_dir / "global" / f"round_{h['round']:05d}.safetensors")
            for k in expected:
                torch.testing.assert_close(got[k], expected[k])
        assert all(d["rounds_done"] == sum(name in h["accepted"] for h in hist[1:]) for name, d in s["devices"].items())
        if every_device_every_round:
            assert all(s["devices"][f"dev{k}"]["rounds_done"] == self.rounds for k in range(3))
        assert hist[-1]["final"] and hist[-1]["accuracy"] is not None
        adapter = self.state_dir / "global_adapter"
        assert (adapter / "adapter_model.safetensors").exists() or (adapter / "prompts.safetensors").exists()
        return s


@pytest.fixture
def fleet(tmp_path, mosquitto):
    f = ProcessFleet(tmp_path, mosquitto)
    yield f
    f.close()


def test_three_agents_two_rounds_over_mosquitto(fleet):
    fleet.start()
    s = fleet.assert_complete_and_exactly_once()
    assert s["history"][-1]["accuracy"] > s["history"][0]["accuracy"]
    status = subprocess.run([sys.executable, "-m", "broker_server.cli", "status", "--state-dir",
                             str(fleet.state_dir)], capture_output=True, text=True, check=True).stdout
    assert "phase done" in status and "dev2" in status
    for k, p in fleet.agents.items():
        assert p.wait(30) == 0, fleet.log(f"dev{k}.log")     # agents exit when the run is done
    # the exported adapter is a plain peft folder holding exactly the final global
    from peft import PeftModel, get_peft_model_state_dict

    from edge_runtime.training.models import (load_model, load_tokenizer,
                                              resolve_model_source)

    src = resolve_model_source("tiny-llama")
    tok = load_tokenizer(src, TOY_CORPUS)
    model = PeftModel.from_pretrained(load_model(src, "classification", 3, tok), fleet.state_dir / "global_adapter")
    final = load_file(fleet.state_dir / "global" / "round_00002.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(final)
    assert all(torch.equal(loaded[k], final[k]) for k in final)


def test_broker_restart_mid_round(fleet, mosquitto):
    fleet.start()
    fleet.wait_for(lambda s: s["phase"] == "train" and s["round"] == 1 and len(s["accepted"]) >= 1,
                   "a first accepted update in round 1")
    mosquitto.restart(down_s=2.0)
    s = fleet.assert_complete_and_exactly_once(every_device_every_round=False)
    # the round the restart hit was completed by all three (acked updates kept, the others re-sent)
    assert s["history"][1]["accepted"] == ["dev0", "dev1", "dev2"]


def test_server_sigkill_mid_round_then_restart(fleet):
    fleet.start()
    before = fleet.wait_for(lambda s: s["phase"] == "train" and s["round"] == 1 and len(s["accepted"]) >= 1,
                            "a first accepted update in round 1")
    fleet.server.send_signal(signal.SIGKILL)
    fleet.server.wait(10)
    killed_with = dict(before["accepted"])
    time.sleep(1.0)
    fleet.start_server()
    s = fleet.assert_complete_and_exactly_once()
    round1 = s["history"][1]
    for dev, acc in killed_with.items():   # what was accepted before the kill is what was counted
        assert round1["weights"][dev] == acc["n_samples"]
    assert "resuming run" in fleet.log("server.log")


def test_agent_killed_mid_upload_then_restarted(fleet):
    fleet.start_server()
    fleet.start_agent(0)
    fleet.start_agent(1)
    crashing = fleet.start_agent(2, env={"EDGE_RUNTIME_FAULT": "after_chunk:1"})
    assert crashing.wait(120) == 17, fleet.log("dev2.log")       # died after sending 2 of its chunks
    pending = json.loads((fleet.tmp / "dev2" / "agent.json").read_text())["pending"]
    assert pending is not None and pending["round"] == 1
    fleet.start_agent(2)                                            # restarted without the fault
    s = fleet.assert_complete_and_exactly_once()
    assert s["history"][1]["accepted"] == ["dev0", "dev1", "dev2"]
    # the restarted agent re-sent the update it had persisted (same idempotency key), not a new one
    stored = fleet.state_dir / "updates" / "round_00001" / f"dev2__{pending['update_id']}.safetensors"
    assert stored.exists()


@pytest.mark.parametrize("codec", [("--set", "compression.topk=0.3"),
                                   ("--set", "compression.rank=2", "--model", "tiny-bert")], ids=["top30", "rank2"])
def test_compressed_updates_over_mosquitto_with_an_agent_killed_mid_upload(tmp_path, mosquitto, codec):
    """int4 deltas with error feedback, both ways: of the top 30% entries, or dense with BERT's
    32 x 32 pooler as rank-2 factors. dev2 dies after the first chunk of its round-1 update and
    restarts: it re-sends the persisted update (same key), counted once (the aggregate is
    recomputed from the decoded updates the server stored, then passed through the downlink as
    the server does); its residual becomes the one of the update the server accepted, and carries
    into round 2; every device ends holding the server's final global."""
    from edge_runtime.agent.residual import FILE

    fleet = ProcessFleet(tmp_path, mosquitto, extra_server_args=("--set", "compression.uplink=int4",
                                                                 "--set", "compression.downlink=int4", *codec))
    try:
        fleet.start_server()
        fleet.start_agent(0)
        fleet.start_agent(1)
        crashing = fleet.start_agent(2, env={"EDGE_RUNTIME_FAULT": "after_chunk:0"})
        assert crashing.wait(120) == 17, fleet.log("dev2.log")
        pending = json.loads((tmp_path / "dev2" / "agent.json").read_text())["pending"]
        assert pending["round"] == 1 and Path(pending["residual_file"]).exists()
        assert not (tmp_path / "dev2" / FILE).exists()   # staged only: no ack yet
        fleet.start_agent(2)
        s = fleet.assert_complete_and_exactly_once()
    finally:
        fleet.close()
    stored = fleet.state_dir / "updates" / "round_00001" / f"dev2__{pending['update_id']}.safetensors"
    assert stored.exists()
    for h in s["history"][1:3]:
        assert h["bytes_up_raw"] > 2.5 * h["bytes_up"] and h["bytes_down_raw"] > 2.5 * h["bytes_down"], h
    if "compression.rank=2" in codec:   # the pooler travelled as factors: its residual is a full matrix
        from safetensors.torch import load_file

        assert s["training"]["model"] == "tiny-bert" and s["training"]["compression"]["rank"] == 2
        assert any("pooler" in k for k in load_file(tmp_path / "dev2" / FILE))
    final = (fleet.state_dir / "global" / "round_00002.safetensors").read_bytes()
    for k in range(3):
        assert (tmp_path / f"dev{k}" / FILE).exists() and not list((tmp_path / f"dev{k}" / "pending").glob("*.residual.*"))
        # every device rebuilt the final global from deltas, bit for bit (the restarted one from the
        # global it had kept on disk)
        assert (tmp_path / f"dev{k}" / "model" / "global.safetensors").read_bytes() == final, k
        assert "cannot rebuild" not in fleet.log(f"dev{k}.log")


def test_devices_that_sit_compressed_rounds_out_resync_over_mosquitto(tmp_path, mosquitto):
    """Both ways int4, two of three devices a round (seed 1 picks dev0+dev1, dev1+dev2, dev0+dev2,
    dev0+dev1): dev0 sits round 2 out and dev1 round 3. Back, each holds a global older than the
    base of the delta in force, so it fetches the whole global once (a device that is not a
    participant does not follow the deltas), trains, and every device ends holding the server's
    global bit for bit; each update is counted once."""
    fleet = ProcessFleet(tmp_path, mosquitto, rounds=4, epochs=3,
                         extra_server_args=("--set", "compression.uplink=int4", "--set", "compression.downlink=int4",
                                            "--devices-per-round", "2", "--seed", "1"))
    try:
        fleet.start()
        s = fleet.wait_for(lambda s: s["phase"] == "done", "the run to finish", timeout=300)
    finally:
        fleet.close()
    picked = [sorted(h["accepted"]) for h in s["history"][1:5]]
    assert picked == [["dev0", "dev1"], ["dev1", "dev2"], ["dev0", "dev2"], ["dev0", "dev1"]], picked
    assert {d: e["rounds_done"] for d, e in s["devices"].items()} == {"dev0": 3, "dev1": 3, "dev2": 2}
    for d in ("dev0", "dev1"):
        assert "fetching the whole global (resync)" in fleet.log(f"{d}.log"), d
    for k in range(3):
        record = json.loads((tmp_path / f"dev{k}" / "model" / "device.json").read_text())
        server = fleet.state_dir / "global" / f"round_{record['global_round']:05d}.safetensors"
        assert (tmp_path / f"dev{k}" / "model" / "global.safetensors").read_bytes() == server.read_bytes(), k
    for h in s["history"][1:5]:
        assert h["bytes_down_raw"] > 2.5 * h["bytes_down"], h


@pytest.mark.parametrize("method", ["federa", "fdlora", "fedpeptao"])
def test_methods_over_mosquitto_with_an_agent_restart(tmp_path, mosquitto, method):
    """The init payload (FeDeRA), the personal state (FDLoRA; FedPepTAO's personal prompts and AdamW
    moments) and the server's optimiser state survive an agent killed between rounds."""
    fleet = ProcessFleet(tmp_path, mosquitto, epochs=6,
                         extra_server_args=("--method", method, "--set", "fdlora.fusion_evals=6"))
    try:
        fleet.start()
        fleet.wait_for(lambda s: s["round"] >= 2 or s["phase"] == "done", "round 1 to close")
        fleet.agents[1].send_signal(signal.SIGKILL)
        fleet.agents[1].wait(10)
        fleet.start_agent(1)
        s = fleet.assert_complete_and_exactly_once()
        assert s["training"]["method"] == method
        if method == "federa":
            for k in range(3):
                inits = list((tmp_path / f"dev{k}" / "init").glob("*.safetensors"))
                assert len(inits) == 1 and inits[0].read_bytes() == \
                    (fleet.state_dir / "global" / "round_00000.safetensors").read_bytes()
            cfg = json.loads((fleet.state_dir / "global_adapter" / "adapter_config.json").read_text())
            assert cfg["r"] == 8  # exported as a plain rank-2r LoRA for the untouched base
        else:
            assert all(h.get("personal_accuracy") is not None for h in s["history"]), s["history"]
            assert "personal state loaded" in fleet.log("dev1.log")  # the restarted agent kept its adapter
        if method == "fedpeptao":  # a score round chose the shared layer; the export holds it alone
            shared = s["selection"]["shared_layers"]
            assert s["selection"]["devices"] == ["dev0", "dev1", "dev2"] and len(shared) == 1
            cfg = json.loads((fleet.state_dir / "global_adapter" / "prompt_config.json").read_text())
            assert cfg["layers"] == shared
    finally:
        fleet.close()


def test_droppeft_over_mosquitto_offers_only_fitting_configurations(tmp_path, mosquitto):
    """The server's bandit assigns each device a dropout configuration in the manifest; a device with
    little memory is only offered the arms that fit it; devices train what they were assigned; the
    dropout-aware aggregation is reproduced from the stored updates; status and report show it."""
    from edge_runtime.methods import droppeft
    from edge_runtime.training.trainer import TrainConfig

    spec = TrainingSpec(model="tiny-llama", labels=("animal", "food", "tool"), method="droppeft",
                        train=TrainConfig(batch_size=16, max_seq_len=16))
    peaks = droppeft.arm_peaks(spec)
    arms = spec.droppeft.arms()
    small = int((max(peaks) + min(peaks)) / 2 / (1 - spec.droppeft.memory_margin))   # only the lightest arms fit
    fits = {a for a, p in enumerate(peaks) if p <= small * (1 - spec.droppeft.memory_margin)}
    assert fits and len(fits) < len(arms)
    fleet = ProcessFleet(tmp_path, mosquitto, rounds=2, epochs=4, extra_server_args=("--method", "droppeft"),
                         agent_args={0: ("--memory-budget", str(small))})
    try:
        fleet.start()
        s = fleet.assert_complete_and_exactly_once()
    finally:
        fleet.close()
    tried = set()
    for h in s["history"][1:]:
        conf = h["configurator"]
        assert set(conf["assignments"]) == {"dev0", "dev1", "dev2"}
        assert set(conf["assignments"]["dev0"]["feasible"]) == fits and conf["assignments"]["dev0"]["arm"] in fits
        assert conf["assignments"]["dev0"]["budget"] == small
        for dev, a in conf["assignments"].items():   # each device trained what it was assigned
            rep = conf["reports"][dev]
            assert (rep["drop_ratio"], ["uniform", "increasing", "decreasing"][int(rep["drop_shape"])]) == \
                (a["ratio"], a["shape"])
            assert len(h["layer_steps"][dev]) == 2 and "val_loss_after" in rep   # typed per-block step counts
            tried.add(a["arm"])
        assert set(conf["rewards"]) == {"dev0", "dev1", "dev2"}
    assert len(tried) >= 4                          # round 1 spread the devices over different arms
    bandit_files = sorted((fleet.state_dir / "server").glob("configurator_*.json"))
    assert bandit_files and set(droppeft.bandit_state(json.loads(bandit_files[-1].read_text()), spec)) == \
        {"dev0", "dev1", "dev2"}
    out = subprocess.run([sys.executable, "-m", "broker_server.cli", "status", "--state-dir", str(fleet.state_dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "configurator" in out.stdout and "dev0" in out.stdout, out.stdout
    report = json.loads((fleet.state_dir / "report.json").read_text())
    assert [p["round"] for p in report["configurator"]["dev0"]] == [1, 2]
