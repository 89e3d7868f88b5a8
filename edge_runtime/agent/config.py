"""The agent's settings and the constants of its re-send policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol.chunking import MAX_CHUNK_BYTES
from edge_runtime.protocol.messages import check_id
from edge_runtime.service.limits import ManifestLimits

RESEND_BACKOFF_BASE_S = 1.0     # re-sends of a refused / unacked update: 0.5-1 s, then doubling ...
RESEND_BACKOFF_CAP_S = 60.0     # ... up to a minute (jittered)
FAULT_ENV = "EDGE_RUNTIME_FAULT"   # test hook: "after_chunk:K" exits the process after sending chunk K


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    data: str
    state_dir: Path
    fleet: str = "default"
    heartbeat_s: float = 10.0
    ack_timeout_s: float = 30.0
    eval_batch_size: int = 64
    chunk_bytes: int = MAX_CHUNK_BYTES   # smaller chunks for links / brokers with small message limits
    exit_when_done: bool = True
    progress: bool = False
    plan: str = "auto"                   # "auto": fit batch / sequence / checkpointing / quantization to memory
    memory_budget: int | None = None     # act as a device with this much memory (bytes)
    warm_up: bool = True                 # profile and import the model libraries while awaiting the first manifest
    test_data: str | None = None         # the device's own held-out test file (else 10% of ``data``)
    val_data: str | None = None          # the device's own validation file (else 10% of ``data``)
    limits: ManifestLimits = field(default_factory=ManifestLimits)   # what a manifest may ask of this device

    def __post_init__(self) -> None:
        check_id("device_id", self.device_id)
        check_id("fleet", self.fleet)
        if self.plan not in ("auto", "off"):
            raise EdgeRuntimeError(f"plan must be 'auto' or 'off', got {self.plan!r}")
