"""The run's persisted state (``state.json``): its phases and its fields, typed.

``state.json`` is the truth a restarted server resumes from: it is a plain JSON object (the
operator's ``broker-server status`` and ``report.json`` read it), so the type is a ``TypedDict``
over that object rather than a class around it, and a phase is stored as its string value.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypedDict


class Phase(str, Enum):
    """Where the run is. A round manifest's ``action`` is the phase of an open round."""

    WAITING = "waiting"     # for devices: before round 1, or before the ``next`` round after a restart
    SCORE = "score"         # the score round of methods that lay the global out first (FedPepTAO)
    TRAIN = "train"
    EVALUATE = "evaluate"   # the final global, evaluated by the devices
    DONE = "done"
    FAILED = "failed"       # --max-failed-rounds rounds in a row could not be aggregated


OPEN = (Phase.SCORE, Phase.TRAIN, Phase.EVALUATE)   # a round is open: updates and reports are taken
ANNOUNCED = (*OPEN, Phase.DONE)                     # phases a round manifest announces


class Accepted(TypedDict):
    """One device's accepted update (or report) in the open round."""

    update_id: str
    n_samples: int
    metrics: dict[str, float]
    layer_steps: list[int]  # steps each block ran (DropPEFT); absent in a protocol-1 state
    file: str | None        # the payload under the state folder; None for metrics-only reports
    bytes: int
    at: float


class RunState(TypedDict, total=False):
    run_id: str
    fleet_name: str
    round: int
    phase: str                          # a Phase value
    next: dict[str, Any]                # while waiting after a restart: {"round", "phase"} to start
    participants: list[str]
    round_started_at: float | None
    deadline_at: float | None
    global_file: str                    # the global in force, relative to the state folder
    server_file: str                    # the method's server-side tensors (FedPepTAO), when it has any
    configurator_file: str              # the method's configurator state, JSON (DropPEFT's bandit)
    delta_file: str                     # the global's compressed delta (compression.downlink), when it has one
    delta_base: str                     # sha256 (hex) of the global payload that delta applies to
    downlink_file: str                  # the server's downlink error-feedback residual
    accepted: dict[str, Accepted]
    assignments: dict[str, dict]        # the configurator's per-device overrides this round (DropPEFT)
    configurator: dict[str, dict]       # what it offered, for the history row
    selection: dict[str, Any]           # the score round's outcome
    history: list[dict]                 # one row per round (edge_runtime.round.server.round_row)
    rejects: list[dict]                 # the last 100 refused messages, with reasons
    errors: list[dict]                  # the last 20 failed steps
    failed_rounds: int                  # rounds in a row whose aggregation failed
    training: dict                      # TrainingSpec.to_json()
    config: dict                        # the ServerConfig the run was started with
    security: dict                      # signed or insecure, the server key's fingerprint (Security.describe)


def fresh_state(run_id: str, fleet: str, training: dict, config: dict, global_file: str) -> RunState:
    """A new run, waiting for devices, with round 0's global in ``global_file``."""
    return RunState(run_id=run_id, fleet_name=fleet, round=0, phase=Phase.WAITING.value, participants=[],
                    round_started_at=None, deadline_at=None, global_file=global_file, accepted={}, history=[],
                    rejects=[], errors=[], failed_rounds=0, training=training, config=config)
