"""Helpers to run a server and device agents in one process over the in-memory transport."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from broker_server.coordinator import Coordinator, ServerConfig
from broker_server.enrolment import (Enrolment, enrol_local_devices,
                                     server_identity)
from broker_server.store import Store
from edge_runtime.agent import Agent, AgentConfig
from edge_runtime.methods import METHODS
from edge_runtime.methods.lora import LoraMethodConfig
from edge_runtime.protocol.codec import Security
from edge_runtime.protocol.signing import Identity, PinnedKey
from edge_runtime.training.spec import TrainingSpec, build_model
from edge_runtime.training.trainer import TrainConfig
from edge_runtime.transport.memory import MemoryBroker, MemoryTransport
from tests.conftest import FILLER, TOY_WORDS, make_toy_rows, write_jsonl

TOY_CORPUS = tuple(FILLER + [w for ws in TOY_WORDS.values() for w in ws])


def toy_spec(**train) -> TrainingSpec:
    return TrainingSpec(model="tiny-llama", labels=tuple(sorted(TOY_WORDS)), lora=LoraMethodConfig(rank=4),
                        train=TrainConfig(**({"epochs": 3, "batch_size": 16, "lr": 1e-2, "max_seq_len": 16} | train)),
                        tokenizer_corpus=TOY_CORPUS)


def initial_global(spec: TrainingSpec):
    def make():
        model, _ = build_model(spec)
        return METHODS[spec.method].initial_global(model, spec)
    return make


def device_files(tmp: Path, n: int, rows: int = 300) -> list[Path]:
    return [write_jsonl(tmp / f"dev{k}.jsonl", make_toy_rows(rows, seed=k)) for k in range(n)]


class InProcessFleet:
    def __init__(self, tmp: Path, n_devices: int = 3, rounds: int = 2, spec: TrainingSpec | None = None,
                 secure: bool = False, rows: int = 300, **server_kw) -> None:
        """``secure``: every device's key enrolled, the server's pinned (signed end to end)."""
        self.broker = MemoryBroker()
        self.spec = spec or toy_spec()
        self.cfg = ServerConfig(fleet="t", rounds=rounds, min_devices=n_devices, training=self.spec.to_json(),
                                **({"deadline_s": 60.0} | server_kw))
        self.store = Store(tmp / "server")
        self.server_transport = MemoryTransport(self.broker, "server")
        server_sec, device_sec = Security(), {}
        if secure:
            server_key = enrol_local_devices(tmp / "server", {f"dev{k}": tmp / f"dev{k}" for k in range(n_devices)})
            server_sec = Security(server_identity(tmp / "server")[0], Enrolment(tmp / "server"))
            device_sec = {k: Security(Identity.load(tmp / f"dev{k}" / "device.key"), PinnedKey(server_key))
                          for k in range(n_devices)}
        self.coordinator = Coordinator(self.cfg, self.store, self.server_transport, initial_global(self.spec),
                                       run_id="run-test", security=server_sec)
        self.files = device_files(tmp, n_devices, rows)
        self.agents = [Agent(AgentConfig(f"dev{k}", str(f), tmp / f"dev{k}", fleet="t", ack_timeout_s=5.0,
                                         heartbeat_s=1.0), MemoryTransport(self.broker, f"dev{k}"),
                             security=device_sec.get(k))
                       for k, f in enumerate(self.files)]
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, agents: bool = True) -> None:
        self.threads.append(threading.Thread(target=self.coordinator.serve, args=(self.stop,), daemon=True))
        if agents:
            self.threads += [threading.Thread(target=a.run, daemon=True) for a in self.agents]
        for t in self.threads:
            t.start()

    def wait_done(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.coordinator.phase != "done":
            assert time.monotonic() < deadline, f"not done: {self.coordinator.state['phase']} " \
                                                f"round {self.coordinator.state['round']}"
            time.sleep(0.1)

    def close(self) -> None:
        self.stop.set()
        for a in self.agents:
            a.stop_event.set()
        for t in self.threads:
            t.join(10)
