"""The agent's persisted state (``agent.json`` in ``--state-dir``), typed.

A restarted agent resumes from it: the run it is in, the last round it finished, and the update
awaiting its ack (re-sent with the same idempotency key instead of training again).
"""

from __future__ import annotations

from typing import TypedDict


class Pending(TypedDict):
    """An update (or a metrics-only report) persisted before it is sent, until its ack."""

    run_id: str
    round: int
    update_id: str                  # the idempotency key: a re-send never counts twice
    file: str | None                # the payload (safetensors) under pending/; None for a report
    n_samples: int
    metrics: dict[str, float]
    layer_steps: list[int]          # steps each block ran (DropPEFT); absent in a protocol-1 pending
    timings: dict[str, float]
    action: str                     # the manifest's action: train, score or evaluate
    residual_file: str | None       # the error-feedback residual to keep once this update is accepted


class Attempt(TypedDict):
    """A training try in progress: a restart after the OOM killer steps this plan down."""

    run_id: str
    round: int
    overrides: dict


class AgentState(TypedDict, total=False):
    run_id: str | None
    last_round_done: int
    pending: Pending | None
    attempt: Attempt
    results: list[dict]             # the last 20 acks (accepted, reason, metrics)
    timings: list[dict]             # the last 100 rounds' phase seconds
    train_efficiency: dict[str, float]   # per model: the share of the matmul peak training achieved last round


def fresh_agent_state() -> AgentState:
    return AgentState(run_id=None, last_round_done=-1, pending=None)
